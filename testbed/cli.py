"""The ``testbed`` command line.

Library code raises :class:`~testbed.errors.TestbedError`; :func:`main` is the one place
that turns errors into a one-line message per problem on stderr and an exit code. Every
command takes ``--format json`` for machine-readable output on stdout.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from . import local as local_tb
from .errors import ConfigError, HostUnreachable, TestbedError
from .inventory import Inventory, bs_runner_for, load_inventory, ssh_runner_for
from .units import parse_percent, parse_rate_kbit, parse_time_ms

app = typer.Typer(
    help="moe-edge-testbed: distributed MoE inference on a wireless edge "
    "testbed (BS + devices, tc-shaped links, ZeroMQ).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
local_app = typer.Typer(
    help="The local testbed: devices as network namespaces with sshd.", no_args_is_help=True
)
inventory_app = typer.Typer(
    help="Validate inventories and probe their hosts.", no_args_is_help=True
)
links_app = typer.Typer(
    help="Shape, show, clear and verify the BS⇄device links (tc).", no_args_is_help=True
)
app.add_typer(local_app, name="local")
app.add_typer(inventory_app, name="inventory")
app.add_typer(links_app, name="links")
policies_app = typer.Typer(help="Policies: built-in and plug-in.", no_args_is_help=True)
app.add_typer(policies_app, name="policies")

console = Console()
err_console = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    json = "json"


_state: dict[str, Any] = {"format": Format.table}
FormatOpt = typer.Option(Format.table, "--format", help="Output: table (human) or json.")
InvArg = typer.Argument(..., help="Inventory TOML file.", show_default=False)
NameOpt = typer.Option("tb", "--name", help="Testbed name (1-8 lowercase letters/digits).")


def _fmt(fmt: Format) -> Format:
    _state["format"] = fmt
    return fmt


def emit(fmt: Format, data: Any, table: Table | str | None = None) -> None:
    """JSON on stdout, or a human rendering."""
    if fmt == Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        console.print(table)


def _rate(opt: str, text: str) -> float:
    try:
        return parse_rate_kbit(text)
    except ValueError as exc:
        raise ConfigError(f"{opt}: {exc}") from None


# -- local --------------------------------------------------------------------------
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
    _fmt(fmt)
    rate_kbit = _rate("--rate", rate)
    say = (lambda m: err_console.print(f"[dim]{m}[/dim]")) if fmt == Format.table else None
    res = local_tb.up(name, devices, rate_kbit, inventory_out, memory_budget_mb, say)
    t = Table(
        title=f"local testbed {name} up in {res['elapsed_s']:.2f} s (inventory: {res['inventory']})"
    )
    for c in ("device", "address", "netns", "rate each way"):
        t.add_column(c)
    for d in res["devices"]:
        t.add_row(d["name"], d["host"], d["netns"], rate)
    emit(fmt, res, t)


@local_app.command("down")
def local_down(name: str = NameOpt, fmt: Format = FormatOpt) -> None:
    """Remove the namespaces, links, sshds and files of a local testbed (idempotent)."""
    _fmt(fmt)
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
    _fmt(fmt)
    res = local_tb.status(name)
    t = Table(title=f"local testbed {name}: {res['status']} ({res['subnet']})")
    for c in ("device", "address", "netns", "sshd pid", "down kbit/s", "up kbit/s"):
        t.add_column(c)
    for d in res["devices"]:
        t.add_row(
            d["name"],
            d["address"],
            d["netns"] + ("" if d["netns_present"] else " (missing)"),
            str(d["sshd_pid"] or "-"),
            str(d.get("down_kbit") or "-"),
            str(d.get("up_kbit") or "-"),
        )
    emit(fmt, res, t)


# -- inventory ----------------------------------------------------------------------
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
    _fmt(fmt)
    inv = load_inventory(inventory)
    rows = [] if no_probe else probe_hosts(inv, timeout)
    t = Table(title=f"{inventory}: {len(inv.devices)} devices, file ok")
    for c in ("host", "address", "status", "detail", "s"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["name"],
            r["host"],
            "[green]ok[/green]" if r["ok"] else "[red]failed[/red]",
            r["detail"],
            f"{r['seconds']:.2f}",
        )
    emit(fmt, {"inventory": inv.to_dict(), "hosts": rows, "ok": all(r["ok"] for r in rows)}, t)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        for r in failed:
            err_console.print(
                f"error: {r['name']} ({r['host']}): {r['detail']}", highlight=False, markup=False
            )
        raise typer.Exit(HostUnreachable.exit_code)


# -- links --------------------------------------------------------------------------
def _shaper(inv: Inventory):
    from .linkcheck import shaper_for

    return shaper_for(inv, bs_runner_for(inv))


def _require_bs_rights(inv: Inventory, what: str) -> None:
    import os

    if inv.bs.local and not inv.bs.sudo and os.geteuid() != 0:
        from .errors import NeedsRoot

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
    from .links import LinkSpec

    _fmt(fmt)
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


def _links_table(states: list, title: str) -> Table:
    t = Table(title=title)
    for c in (
        "device",
        "address",
        "down kbit/s",
        "down leaf",
        "up kbit/s",
        "up leaf",
        "down sent B",
        "up sent B",
    ):
        t.add_column(c)
    for s in states:
        t.add_row(
            s.device,
            s.address,
            _n(s.down_kbit),
            s.down_leaf or "-",
            _n(s.up_kbit),
            s.up_leaf or "-",
            str(s.down_sent_bytes),
            str(s.up_sent_bytes),
        )
    return t


def _n(x: float | None) -> str:
    return "unshaped" if x is None else f"{x:g}"


@links_app.command("show")
def links_show(inventory: Path = InvArg, fmt: Format = FormatOpt) -> None:
    """Show what tc enforces per device and direction (parsed from tc -s / tc -j)."""
    _fmt(fmt)
    inv = load_inventory(inventory)
    states = _shaper(inv).show()
    emit(fmt, [s.to_dict() for s in states], _links_table(states, f"links of {inventory}"))


@links_app.command("clear")
def links_clear(inventory: Path = InvArg, fmt: Format = FormatOpt) -> None:
    """Remove all shaping from the BS interface (and the ifb device)."""
    _fmt(fmt)
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
    """Write a channel trace from the channel model (testbed.channel): per epoch and device
    the Shannon rates of an equal bandwidth split, in that epoch's Rayleigh fading. Replay it
    with a recipe's links.trace."""
    from .channel import ChannelModel, write_trace

    _fmt(fmt)
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
    from .linkcheck import summarize_airtime, verify, verify_airtime

    _fmt(fmt)
    inv = load_inventory(inventory)
    if airtime:
        if repeats < 1 or not idle >= 0:
            raise ConfigError("--repeats must be >= 1 and --idle >= 0")
        info, msgs = verify_airtime(inv, repeats=repeats, idle_s=idle, devices=device)
        summary = summarize_airtime(msgs)
        t = Table(
            title=f"lone messages after {idle:g} s idle: (delivery - 1-byte RTT) / "
            f"airtime; shaping {info['mode']} (bucket {info['bucket_bytes']} B"
            + (
                f" + {info['bucket_slack_us']} us of the rate"
                if info.get("bucket_slack_us")
                else ""
            )
            + f", offloads {info['offloads_summary']})"
        )
        for c in ("device", "direction", "kbit/s", "bytes", "ratio per repeat", "median", "RTT ms"):
            t.add_column(c)
        for r in summary:
            t.add_row(
                str(r["device"]),
                str(r["direction"]),
                _n(r["configured_kbit"]),
                str(r["bytes"]),
                " ".join(f"{x:.2f}" for x in r["ratios"]),
                "-" if r["ratio_median"] is None else f"{r['ratio_median']:.2f}",
                f"{r['rtt_ms_median']:.3f}",
            )
        emit(fmt, {"shaping": info, "summary": summary, "messages": [m.to_dict() for m in msgs]}, t)
        return
    rows = verify(inv, seconds, device)
    t = Table(title=f"receiver-measured goodput ({seconds:g} s per direction)")
    for c in ("device", "direction", "configured kbit/s", "measured kbit/s", "ratio"):
        t.add_column(c)
    for g in rows:
        t.add_row(
            g.device,
            g.direction,
            _n(g.configured_kbit),
            f"{g.measured_kbit:.0f}",
            "-" if g.ratio is None else f"{g.ratio:.1%}",
        )
    emit(fmt, [g.to_dict() for g in rows], t)


# -- policies -----------------------------------------------------------------------
@policies_app.command("list")
def policies_list(fmt: Format = FormatOpt) -> None:
    """List the registered policies (entry points) with their one-line docs."""
    from .policy import ENTRY_POINT_GROUP, available_policies

    _fmt(fmt)
    rows = available_policies()
    t = Table(
        title=f"policies (entry-point group {ENTRY_POINT_GROUP}; also "
        "package.module:Class or path/file.py:Class)"
    )
    for c in ("name", "class", "what it does"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["target"], r["doc"])
    emit(fmt, rows, t)


def _mount_model_cli() -> None:
    try:
        from .cli_model import app as model_app
    except ImportError:  # the model layer is optional at import time (torch)
        return
    app.add_typer(model_app, name="model", help="Split, build and evaluate MoE models.")


_mount_model_cli()
from .cli_agents import register as _register_agents

_register_agents(app)

from .cli_run import register as _register_run

_register_run(app)

from .cli_report import register as _register_report

_register_report(app)


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: run the app, turn errors into one line each and an exit code."""
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit's code here
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except TestbedError as exc:
        lines = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        if _state["format"] == Format.json:
            sys.stdout.write(
                json.dumps(
                    {
                        "error": {
                            "type": type(exc).__name__,
                            "messages": lines,
                            "exit_code": exc.exit_code,
                        }
                    }
                )
                + "\n"
            )
        for line in lines:
            sys.stderr.write(f"error: {line}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.stderr.write("aborted\n")
            sys.exit(130)
        raise
