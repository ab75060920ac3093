"""``testbed local up|down|status``: the local testbed (devices as network namespaces)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..errors import ConfigError
from ..lab import local as local_tb
from ..units import parse_rate_kbit
from .output import Format, FormatOpt, NameOpt, emit, err_console, table

local_app = typer.Typer(
    help="The local testbed: devices as network namespaces with sshd.", no_args_is_help=True
)


def _rate(opt: str, text: str) -> float:
    try:
        return parse_rate_kbit(text)
    except ValueError as exc:
        raise ConfigError(f"{opt}: {exc}") from None


@local_app.command("up")
def local_up(
    devices: int = typer.Option(3, "--devices", "-n", help="Number of emulated devices."),
    rate: str = typer.Option(
        "20mbit", "--rate", help="Initial rate of every link, each direction (e.g. 20mbit)."
    ),
    name: str = NameOpt,
    inventory_out: Path | None = typer.Option(
        None,
        "--inventory-out",
        help="Where to write the inventory (default ./NAME.inventory.toml).",
    ),
    memory_budget_mb: int = typer.Option(
        2048, "--memory-budget-mb", help="Memory budget written for each device."
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Create an emulated testbed: per device a netns, a veth to the BS bridge, an sshd."""
    rate_kbit = _rate("--rate", rate)
    say = (lambda m: err_console.print(f"[dim]{m}[/dim]")) if fmt == Format.table else None
    res = local_tb.up(name, devices, rate_kbit, inventory_out, memory_budget_mb, say)
    t = table(
        f"local testbed {name} up in {res['elapsed_s']:.2f} s (inventory: {res['inventory']})",
        ("device", "address", "netns", "rate each way"),
        ((d["name"], d["host"], d["netns"], rate) for d in res["devices"]),
    )
    emit(fmt, res, t)


@local_app.command("down")
def local_down(name: str = NameOpt, fmt: Format = FormatOpt) -> None:
    """Remove the namespaces, links, sshds and files of a local testbed (idempotent)."""
    t0 = time.monotonic()
    res = local_tb.down(name)
    res["elapsed_s"] = round(time.monotonic() - t0, 3)
    r = res["removed"]
    emit(
        fmt,
        res,
        f"local testbed {name}: removed {len(r['netns'])} namespaces, "
        f"{len(r['links'])} links, {len(r['processes'])} processes in "
        f"{res['elapsed_s']:.2f} s"
        if res["was_present"]
        else f"local testbed {name}: nothing to remove",
    )


@local_app.command("status")
def local_status(name: str = NameOpt, fmt: Format = FormatOpt) -> None:
    """Show a local testbed's devices, sshds and link rates."""
    res = local_tb.status(name)
    cells = (
        (
            d["name"],
            d["address"],
            d["netns"] + ("" if d["netns_present"] else " (missing)"),
            str(d["sshd_pid"] or "-"),
            str(d.get("down_kbit") or "-"),
            str(d.get("up_kbit") or "-"),
        )
        for d in res["devices"]
    )
    t = table(
        f"local testbed {name}: {res['status']} ({res['subnet']})",
        ("device", "address", "netns", "sshd pid", "down kbit/s", "up kbit/s"),
        cells,
    )
    emit(fmt, res, t)
