"""``testbed provision`` and ``testbed agents status|stop|logs``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ..errors import HostUnreachable
from ..lab.inventory import load_inventory
from .output import Format, FormatOpt, InvArg, console, emit, err_console, table

# paramiko logs a failed handshake's traceback from its transport thread; the reason is
# already in the per-device error line
logging.getLogger("paramiko").addHandler(logging.NullHandler())

#: ``--allow-cpu`` of ``provision``, ``run`` and ``demo``
AllowCpuOpt = typer.Option(
    False,
    "--allow-cpu",
    help="Provision a Jetson (L4T found) whose torch has no CUDA all the same: its experts "
    "run on the CPU (default: refused, naming the fix).",
)

agents_app = typer.Typer(
    help="Device agents started by `testbed provision`: status, stop, logs.",
    no_args_is_help=True,
)


def _fail(rows: list[dict[str, Any]]) -> None:
    """One line per failed device on stderr (never wrapped), then exit non-zero: 5
    (HostUnreachable) when any host could not be reached, else the exit code of the first
    failure."""
    failed = [r for r in rows if not r["ok"]]
    if not failed:
        return
    for r in failed:
        err_console.print(
            f"error: {r['device']}: {r['error']}", highlight=False, markup=False, soft_wrap=True
        )
    codes = [int(r.get("exit_code") or 1) for r in failed]
    raise typer.Exit(HostUnreachable.exit_code if HostUnreachable.exit_code in codes else codes[0])


def provision_cmd(
    inventory: Path = InvArg,
    model: str | None = typer.Option(
        None,
        "--model",
        help="Split model dir, 'tiny', or an HF MoE checkpoint: its expert "
        "shards are placed over the devices and pushed.",
    ),
    placement: str = typer.Option(
        "round-robin",
        "--placement",
        help="How shards are spread over the devices: round-robin or random.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random placement."),
    wheelhouse: Path | None = typer.Option(
        None,
        "--wheelhouse",
        help="Folder of wheels for the agent's dependencies "
        "(offline; default: pip download for each device's platform, cached).",
    ),
    timeout: float = typer.Option(
        10.0, "--timeout", help="Per-device SSH connect timeout, seconds."
    ),
    allow_cpu: bool = AllowCpuOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Check every device, install the agent in a venv, push shards, start the agent.

    Idempotent: a second run changes nothing (no file rewritten, agents keep their PIDs).
    """
    from ..lab.provision import provision

    inv = load_inventory(inventory)
    t0 = time.monotonic()
    reports = provision(
        inv,
        model,
        placement,
        seed=seed,
        wheelhouse=wheelhouse,
        connect_timeout_s=timeout,
        allow_cpu=allow_cpu,
    )
    rows = [r.to_dict() for r in reports]
    wall = time.monotonic() - t0
    t = table(
        f"provision {inventory}: {sum(r['ok'] for r in rows)}/{len(rows)} "
        f"devices ok in {wall:.1f} s",
        ("device", "status", "what changed / why it failed", "agent", "s"),
        map(_provision_cells, rows),
    )
    emit(
        fmt,
        {
            "inventory": str(inventory),
            "ok": all(r["ok"] for r in rows),
            "seconds": round(wall, 3),
            "devices": rows,
        },
        t,
    )
    _fail(rows)


def _provision_cells(r: dict[str, Any]) -> tuple[str, ...]:
    """One device's row of the provision table."""
    if not r["ok"]:
        status, what = "[red]failed[/red]", r["error"]
    elif r["changed"]:
        status, what = "[yellow]changed[/yellow]", "; ".join(r["changed"])
    else:
        status, what = "[green]ok[/green]", "nothing changed"
    if r["ok"] and r.get("warnings"):
        what += "".join(f"; [yellow]{w}[/yellow]" for w in r["warnings"])
    agent = f"pid {r['pid']} {r['endpoint']}" if r["ok"] else "-"
    return (r["device"], status, what, agent, f"{r['seconds']:.1f}")


@agents_app.command("status")
def agents_status_cmd(
    inventory: Path = InvArg,
    timeout: float = typer.Option(10.0, "--timeout", help="Per-device SSH timeout, s."),
    fmt: Format = FormatOpt,
) -> None:
    """Per device: is the agent running and answering a ping, its PID and endpoint."""
    from ..lab.provision import agents_status

    inv = load_inventory(inventory)
    rows = agents_status(inv, connect_timeout_s=timeout)
    columns = (
        "device",
        "state",
        "pid",
        "endpoint",
        "ping ms",
        "experts",
        "installed",
        "python",
        "torch",
        "cuda",
        "l4t",
    )
    t = table(f"agents of {inventory}", columns, map(_status_cells, rows))
    emit(fmt, rows, t)
    _fail(rows)


def _status_cells(r: dict[str, Any]) -> tuple[str, ...]:
    """One device's row of the agents status table."""
    st = r["state"]
    colour = {"running": "green", "stopped": "yellow"}.get(st, "red")
    return (
        r["device"],
        f"[{colour}]{st}[/]" + (f" ({r['error']})" if r.get("error") else ""),
        str(r["pid"] or "-"),
        r["endpoint"] or "-",
        "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f}",
        "-" if r["experts"] is None else str(r["experts"]),
        r["installed"] or "-",
        r["python"] or "-",
        *_preflight_cells(r),
    )


def _preflight_cells(r: dict[str, Any]) -> tuple[str, str, str]:
    """A device's torch, cuda and l4t cells: ``2.1.0`` / ``Orin`` (or ``no: CPU-only build``,
    ``no (CUDA 11.4 build)``) / ``R35.4.1 (JetPack 5.1.2)``; interop failures in red."""
    t = r["torch"]
    torch = t["version"] or ("[red]does not import[/red]" if t["error"] else "-")
    if r["interop_ok"] is False:
        torch += f" [red]numpy {r['numpy']}: {escape(str(r['interop_error']))}[/red]"
    if t["version"] is None:
        cuda = "-"
    elif t["cuda_available"]:
        cuda = escape(t["device_name"] or "yes")
    elif t["cuda_build"] is None:
        cuda = "no: CPU-only build"
    else:
        cuda = f"no (CUDA {t['cuda_build']} build)"
    l4t = r["l4t"] or "-"
    if r["jetpack"]:
        l4t += f" (JetPack {r['jetpack']})"
    return torch, cuda, l4t


@agents_app.command("stop")
def agents_stop_cmd(
    inventory: Path = InvArg,
    grace: float = typer.Option(5.0, "--grace", help="Seconds between SIGTERM and SIGKILL."),
    timeout: float = typer.Option(10.0, "--timeout", help="Per-device SSH timeout, s."),
    fmt: Format = FormatOpt,
) -> None:
    """Stop every device's agent by PID (SIGTERM, then SIGKILL), after checking it is ours."""
    from ..lab.provision import agents_stop

    inv = load_inventory(inventory)
    rows = agents_stop(inv, connect_timeout_s=timeout, grace_s=grace)
    cells = (
        (
            r["device"],
            r["result"] if r["ok"] else f"[red]failed[/red] ({r['error']})",
            str(r["pid"] or "-"),
        )
        for r in rows
    )
    emit(fmt, rows, table(f"agents of {inventory} stopped", ("device", "result", "pid"), cells))
    _fail(rows)


@agents_app.command("logs")
def agents_logs_cmd(
    inventory: Path = InvArg,
    lines: int = typer.Option(50, "--lines", "-n", help="Last lines of each log."),
    timeout: float = typer.Option(10.0, "--timeout", help="Per-device SSH timeout, s."),
    fmt: Format = FormatOpt,
) -> None:
    """The last lines of every device's agent log."""
    from ..lab.provision import agents_logs

    inv = load_inventory(inventory)
    rows = agents_logs(inv, lines, connect_timeout_s=timeout)
    if fmt == Format.json:
        emit(fmt, rows)
    else:
        for r in rows:
            console.rule(f"{r['device']}  {r.get('log') or ''}")
            if not r["ok"]:
                console.print(f"[red]failed[/red]: {r['error']}", highlight=False)
            elif not r["lines"]:
                console.print("(no log yet)")
            for line in r["lines"]:
                console.print(line, highlight=False, markup=False)
    _fail(rows)
