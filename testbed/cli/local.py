"""``testbed local up|down|status``: the local testbed (devices as network namespaces)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..errors import ConfigError
from ..lab import arm64 as a64
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
    arm64: int = typer.Option(
        0,
        "--arm64",
        help="Make the last N devices arm64: sshd, Python and agent from an arm64 Debian root "
        "under qemu-user, reusing its system torch/numpy like a Jetson (root built once).",
    ),
    l4t: str | None = typer.Option(
        None,
        "--l4t",
        help="Give the arm64 devices an /etc/nv_tegra_release of this L4T release (e.g. R35.4.1).",
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Create an emulated testbed: per device a netns, a veth to the BS bridge, an sshd."""
    rate_kbit = _rate("--rate", rate)
    say = (lambda m: err_console.print(f"[dim]{m}[/dim]")) if fmt == Format.table else None
    res = local_tb.up(
        name, devices, rate_kbit, inventory_out, memory_budget_mb, say, arm64=arm64, l4t=l4t
    )
    t = table(
        f"local testbed {name} up in {res['elapsed_s']:.2f} s (inventory: {res['inventory']})",
        ("device", "address", "netns", "arch", "rate each way"),
        ((d["name"], d["host"], d["netns"], d["arch"], rate) for d in res["devices"]),
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
        f"{len(r['links'])} links, {len(r['processes'])} processes"
        + "".join(f", {x}" for x in r["binfmt"])
        + " in "
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
            d["arch"],
            str(d["sshd_pid"] or "-"),
            str(d.get("down_kbit") or "-"),
            str(d.get("up_kbit") or "-"),
        )
        for d in res["devices"]
    )
    t = table(
        f"local testbed {name}: {res['status']} ({res['subnet']})",
        ("device", "address", "netns", "arch", "sshd pid", "down kbit/s", "up kbit/s"),
        cells,
    )
    emit(fmt, res, t)


@local_app.command("arm64-root")
def local_arm64_root(
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Build the root again even if the cache has it."
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Prepare (or show) the cached arm64 Debian root that `local up --arm64` devices run."""
    local_tb.require_root("local arm64-root")
    say = (lambda m: err_console.print(f"[dim]{m}[/dim]")) if fmt == Format.table else None
    t0 = time.monotonic()
    info = a64.ensure_root(rebuild=rebuild, say=say)
    roots = a64.cached_roots()
    res = {**info, "elapsed_s": round(time.monotonic() - t0, 3), "cached": roots}
    how = f"built in {res['elapsed_s']:.0f} s" if info["built"] else "cached"
    t = table(
        f"arm64 root {how}: {info['path']}",
        ("root", "current", "built at", "build s", "size MB"),
        (
            (
                r["path"],
                "yes" if r["current"] else "no",
                r.get("built_at", "-"),
                f"{sum((r.get('seconds') or {}).values()):.0f}",
                f"{(r['size_bytes'] or 0) / 1e6:.0f}",
            )
            for r in roots
        ),
    )
    emit(fmt, res, t)
