"""``testbed links set|show|clear|trace|verify``: the tc-shaped BS⇄device links."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import ConfigError
from ..lab.inventory import Inventory, bs_runner_for, load_inventory
from ..units import parse_percent, parse_rate_kbit, parse_time_ms
from .output import Format, FormatOpt, InvArg, emit, err_console, table

links_app = typer.Typer(
    help="Shape, show, clear and verify the BS⇄device links (tc).", no_args_is_help=True
)


def _shaper(inv: Inventory):
    from ..net.verify import shaper_for

    return shaper_for(inv, bs_runner_for(inv))


def _require_bs_rights(inv: Inventory, what: str) -> None:
    import os

    if inv.bs.local and not inv.bs.sudo and os.geteuid() != 0:
        from ..errors import NeedsRoot

        raise NeedsRoot(
            f"`testbed links {what}` shapes {inv.bs.interface} with tc: run it "
            "as root, or set bs.sudo = true in the inventory"
        )


@links_app.command("set")
def links_set(
    inventory: Path = InvArg,
    device: str = typer.Argument(..., help="Device name from the inventory."),
    rate: str = typer.Option(..., "--rate", help="Rate, e.g. 10mbit."),
    delay: str | None = typer.Option(
        None, "--delay", help="One-way delay, e.g. 5ms (needs netem)."
    ),
    loss: str | None = typer.Option(None, "--loss", help="Loss, e.g. 0.5% (needs netem)."),
    direction: str = typer.Option("both", "--direction", help="both, down or up."),
    fmt: Format = FormatOpt,
) -> None:
    """Set one device's link in place (tc class change on the BS)."""
    from ..net.tc import LinkSpec

    inv = load_inventory(inventory)
    if direction not in ("both", "down", "up"):
        raise ConfigError(f"--direction: must be both, down or up, not {direction!r}")
    try:
        spec = LinkSpec(
            parse_rate_kbit(rate),
            parse_time_ms(delay) if delay else 0.0,
            parse_percent(loss) if loss else 0.0,
        )
    except ValueError as exc:
        raise ConfigError(f"--rate/--delay/--loss: {exc}") from None
    inv.device(device)
    _require_bs_rights(inv, "set")
    shaper = _shaper(inv)
    t0 = time.monotonic()
    shaper.change(device, spec, direction)
    dt = time.monotonic() - t0
    st = {s.device: s for s in shaper.show()}[device]
    info = shaper.shaping_info()
    if info["warning"]:
        err_console.print(
            f"warning: {info['warning']}", highlight=False, markup=False, soft_wrap=True
        )
    emit(
        fmt,
        {
            "device": device,
            "direction": direction,
            "requested": spec.__dict__,
            "enforced": st.to_dict(),
            "seconds": round(dt, 4),
            "shaping": info,
        },
        f"{device}: down {st.down_kbit} kbit/s, up {st.up_kbit} kbit/s "
        f"(applied in {dt * 1000:.1f} ms)",
    )


LINK_COLUMNS = (
    "device",
    "address",
    "down kbit/s",
    "down leaf",
    "up kbit/s",
    "up leaf",
    "down sent B",
    "up sent B",
)


def _links_table(states: list, title: str) -> Table:
    """What tc enforces: one row per device."""
    cells = (
        (
            s.device,
            s.address,
            _n(s.down_kbit),
            s.down_leaf or "-",
            _n(s.up_kbit),
            s.up_leaf or "-",
            str(s.down_sent_bytes),
            str(s.up_sent_bytes),
        )
        for s in states
    )
    return table(title, LINK_COLUMNS, cells)


def _n(x: float | None) -> str:
    return "unshaped" if x is None else f"{x:g}"


@links_app.command("show")
def links_show(inventory: Path = InvArg, fmt: Format = FormatOpt) -> None:
    """Show what tc enforces per device and direction (parsed from tc -s / tc -j)."""
    inv = load_inventory(inventory)
    states = _shaper(inv).show()
    emit(fmt, [s.to_dict() for s in states], _links_table(states, f"links of {inventory}"))


@links_app.command("clear")
def links_clear(inventory: Path = InvArg, fmt: Format = FormatOpt) -> None:
    """Remove all shaping from the BS interface (and the ifb device)."""
    inv = load_inventory(inventory)
    _require_bs_rights(inv, "clear")
    _shaper(inv).clear()
    emit(
        fmt,
        {"cleared": inv.bs.interface, "ifb": inv.bs.ifb},
        f"cleared shaping on {inv.bs.interface} and removed {inv.bs.ifb}",
    )


@links_app.command("trace")
def links_trace(
    out: Path = typer.Argument(
        ..., help="CSV to write (time_s,device,rate_down_kbit,rate_up_kbit).", show_default=False
    ),
    devices: int = typer.Option(
        3,
        "--devices",
        "-n",
        help="Devices, named dev1..devN as on the local testbed (the channel is seeded per name).",
    ),
    epochs: int = typer.Option(100, "--epochs", help="Epochs (time blocks) to write."),
    bandwidth_mhz: float = typer.Option(
        0.2, "--bandwidth-mhz", help="Cell bandwidth, split equally over the devices."
    ),
    epoch_s: float = typer.Option(1.0, "--epoch-s", help="time_s step between blocks."),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Channel seed (a recipe's recipe.seed gives the same channel as links.bandwidth_mhz).",
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Write a channel trace from the channel model (testbed.net.channel): per epoch and device
    the Shannon rates of an equal bandwidth split, in that epoch's Rayleigh fading. Replay it
    with a recipe's links.trace."""
    from ..net.channel import ChannelModel, write_trace

    problems = [
        m
        for bad, m in (
            (devices < 1, "--devices: must be >= 1"),
            (epochs < 1, "--epochs: must be >= 1"),
            (not bandwidth_mhz > 0, "--bandwidth-mhz: must be > 0"),
            (not epoch_s > 0, "--epoch-s: must be > 0"),
        )
        if bad
    ]
    if problems:
        raise ConfigError(problems)
    model = ChannelModel([f"dev{i}" for i in range(1, devices + 1)], seed)
    try:
        rows = write_trace(out, model, epochs, bandwidth_mhz * 1e6, epoch_s)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the trace: {exc.strerror or exc}") from None
    down = [r.rate_down_kbit for r in rows]
    up = [r.rate_up_kbit for r in rows]
    emit(
        fmt,
        {
            "path": str(out),
            "rows": len(rows),
            "devices": devices,
            "epochs": epochs,
            "down_kbit_min": min(down),
            "down_kbit_max": max(down),
            "up_kbit_min": min(up),
            "up_kbit_max": max(up),
        },
        f"{out}: {len(rows)} rows ({devices} devices x {epochs} epochs); down "
        f"{min(down):.0f}-{max(down):.0f} kbit/s, up {min(up):.0f}-{max(up):.0f} kbit/s",
    )


@links_app.command("verify")
def links_verify(
    inventory: Path = InvArg,
    seconds: float = typer.Option(3.0, "--seconds", help="Transfer time per direction."),
    device: list[str] | None = typer.Option(None, "--device", help="Only these devices."),
    airtime: bool = typer.Option(
        False,
        "--airtime",
        help="Instead of goodput: lone messages "
        "(1.5, 8 and 64 KiB) after an idle gap, each as the share of "
        "its airtime (bytes*8/rate) the link charged it.",
    ),
    repeats: int = typer.Option(3, "--repeats", help="--airtime: messages per size."),
    idle: float = typer.Option(1.0, "--idle", help="--airtime: idle seconds before each message."),
    fmt: Format = FormatOpt,
) -> None:
    """Measure goodput per device and direction on the receiving side (--airtime: what lone
    messages are charged, timed by their sender)."""
    from ..net.verify import summarize_airtime, verify, verify_airtime

    inv = load_inventory(inventory)
    if airtime:
        if repeats < 1 or not idle >= 0:
            raise ConfigError("--repeats must be >= 1 and --idle >= 0")
        info, msgs = verify_airtime(inv, repeats=repeats, idle_s=idle, devices=device)
        summary = summarize_airtime(msgs)
        t = _airtime_table(idle, info, summary)
        emit(fmt, {"shaping": info, "summary": summary, "messages": [m.to_dict() for m in msgs]}, t)
        return
    rows = verify(inv, seconds, device)
    emit(fmt, [g.to_dict() for g in rows], _goodput_table(seconds, rows))


def _airtime_table(idle: float, info: dict[str, Any], summary: list[dict[str, Any]]) -> Table:
    """``links verify --airtime``: per device, direction and size, the share of its airtime a
    lone message was charged."""
    title = (
        f"lone messages after {idle:g} s idle: (delivery - 1-byte RTT) / "
        f"airtime; shaping {info['mode']} (bucket {info['bucket_bytes']} B"
        + (f" + {info['bucket_slack_us']} us of the rate" if info.get("bucket_slack_us") else "")
        + f", offloads {info['offloads_summary']})"
    )
    cells = (
        (
            str(r["device"]),
            str(r["direction"]),
            _n(r["configured_kbit"]),
            str(r["bytes"]),
            " ".join(f"{x:.2f}" for x in r["ratios"]),
            "-" if r["ratio_median"] is None else f"{r['ratio_median']:.2f}",
            f"{r['rtt_ms_median']:.3f}",
        )
        for r in summary
    )
    columns = ("device", "direction", "kbit/s", "bytes", "ratio per repeat", "median", "RTT ms")
    return table(title, columns, cells)


def _goodput_table(seconds: float, rows: list) -> Table:
    """``links verify``: the receiver-measured goodput per device and direction."""
    cells = (
        (
            g.device,
            g.direction,
            _n(g.configured_kbit),
            f"{g.measured_kbit:.0f}",
            "-" if g.ratio is None else f"{g.ratio:.1%}",
        )
        for g in rows
    )
    return table(
        f"receiver-measured goodput ({seconds:g} s per direction)",
        ("device", "direction", "configured kbit/s", "measured kbit/s", "ratio"),
        cells,
    )
