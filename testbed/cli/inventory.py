"""``testbed inventory check``: validate an inventory and probe its hosts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import typer

from ..errors import HostUnreachable, TestbedError
from ..lab.inventory import Inventory, bs_runner_for, load_inventory, ssh_runner_for
from .output import Format, FormatOpt, InvArg, emit, err_console, table

inventory_app = typer.Typer(
    help="Validate inventories and probe their hosts.", no_args_is_help=True
)


def probe_hosts(inv: Inventory, timeout_s: float) -> list[dict[str, Any]]:
    """Connect to every device (and a remote BS) in parallel and run ``uname``."""
    targets: list[tuple[str, str, Any]] = [
        (d.name, d.host, lambda d=d: ssh_runner_for(inv, d, connect_timeout_s=timeout_s))
        for d in inv.devices
    ]
    if not inv.bs.local:
        targets.insert(0, (inv.bs.name, inv.bs.host, lambda: bs_runner_for(inv)))

    def one(t: tuple[str, str, Any]) -> dict[str, Any]:
        name, host, make = t
        t0 = time.monotonic()
        try:
            with make() as r:
                res = r.run(["uname", "-srm"], timeout_s=timeout_s)
            return {
                "name": name,
                "host": host,
                "ok": True,
                "detail": res.stdout.strip(),
                "seconds": round(time.monotonic() - t0, 3),
            }
        except TestbedError as exc:
            reason = exc.reason if isinstance(exc, HostUnreachable) else str(exc)
            return {
                "name": name,
                "host": host,
                "ok": False,
                "detail": reason,
                "seconds": round(time.monotonic() - t0, 3),
            }

    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        return list(pool.map(one, targets))


@inventory_app.command("check")
def inventory_check(
    inventory: Path = InvArg,
    timeout: float = typer.Option(5.0, "--timeout", help="Per-host SSH timeout, seconds."),
    no_probe: bool = typer.Option(False, "--no-probe", help="Only validate the file."),
    fmt: Format = FormatOpt,
) -> None:
    """Validate an inventory, then probe every host over SSH in parallel."""
    inv = load_inventory(inventory)
    rows = [] if no_probe else probe_hosts(inv, timeout)
    cells = (
        (
            r["name"],
            r["host"],
            "[green]ok[/green]" if r["ok"] else "[red]failed[/red]",
            r["detail"],
            f"{r['seconds']:.2f}",
        )
        for r in rows
    )
    t = table(
        f"{inventory}: {len(inv.devices)} devices, file ok",
        ("host", "address", "status", "detail", "s"),
        cells,
    )
    emit(fmt, {"inventory": inv.to_dict(), "hosts": rows, "ok": all(r["ok"] for r in rows)}, t)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        for r in failed:
            err_console.print(
                f"error: {r['name']} ({r['host']}): {r['detail']}", highlight=False, markup=False
            )
        raise typer.Exit(HostUnreachable.exit_code)
