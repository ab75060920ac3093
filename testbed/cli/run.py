"""``testbed run``, ``testbed simulate`` (the analytic twin) and ``testbed demo``."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .. import ROOT
from ..run import session
from ..run.recipe import Recipe, load_recipe
from .agents import AllowCpuOpt
from .output import Format, FormatOpt, console, emit, err_console, table

PACKAGED_RECIPES = ROOT / "recipes"
#: ``--wheelhouse`` of ``run`` and ``demo`` (``provision`` has its own)
WheelhouseOpt = typer.Option(
    None,
    "--wheelhouse",
    help="Install the agents' wheels from this folder, never downloading (offline labs; "
    "`testbed wheelhouse build` fills it). Default: the inventory's testbed.wheelhouse.",
)


def _summary_width() -> int:
    """The run table's console width: the terminal's, else wide enough that a pipe or a log file
    gets every column rather than rich's 80 (0: the default console)."""
    return 0 if console.is_terminal else 240


class RichProgress(session.Progress):
    """Trials and requests bars with an ETA on stderr (quiet in json mode / without a tty)."""

    def __init__(self, console: Console, enabled: bool) -> None:
        # a bar on a pipe or a log file would only bury the one-line error
        self.enabled = enabled and console.is_terminal
        self.console = console
        self.bar: Progress | None = None
        self.t_trials = self.t_reqs = None

    def start(self, trials: int, requests_per_trial: int) -> None:
        """Open the two bars (trials, and requests over all trials); a no-op when disabled."""
        if not self.enabled:
            return
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.bar.start()
        self.t_trials = self.bar.add_task("trials", total=trials)
        self.t_reqs = self.bar.add_task("requests", total=trials * requests_per_trial)
        self._first = True

    def trial(self, index: int, label: str) -> None:
        """Count the previous trial as done and show ``label`` for trial ``index``."""
        if self.bar is None:
            return
        if not self._first:
            self.bar.advance(self.t_trials)
        self._first = False
        self.bar.update(self.t_trials, description=f"trial {index}: {label}")

    def request(self) -> None:
        """Advance the requests bar by one."""
        if self.bar is not None:
            self.bar.advance(self.t_reqs)

    def message(self, text: str) -> None:
        """Print ``text`` dimmed above the bars (nothing when the bars are off)."""
        if self.enabled:
            self.console.print(f"[dim]{text}[/dim]")

    def close(self) -> None:
        """Fill the trials bar and stop; safe to call twice."""
        if self.bar is not None:
            self.bar.update(self.t_trials, completed=self.bar.tasks[0].total)
            self.bar.stop()
            self.bar = None


SUMMARY_TABLE_COLUMNS = (
    "trial",
    "policy",
    "point",
    "p50 ms",
    "p95 ms",
    "tpot ms",
    "accuracy",
    "net share",
    "failed calls",
)


def _summary_table(res: session.RunResult, mode: str = "") -> Table:
    """A run's summary: one row per trial."""
    return table(
        f"{mode + ' ' if mode else ''}run {res.run_id}: {res.status}, "
        f"{res.requests} requests ({res.run_dir})",
        SUMMARY_TABLE_COLUMNS,
        map(_summary_cells, res.summary),
    )


def _summary_cells(s: dict[str, Any]) -> tuple[str, ...]:
    """One trial's row of the summary table."""

    def f(v: Any, spec: str) -> str:
        return "-" if v in (None, "") else format(float(v), spec)

    return (
        str(s["trial"]),
        s["policy"],
        s["point"],
        f(s.get("latency_p50_ms"), ".1f"),
        f(s.get("latency_p95_ms"), ".1f"),
        f(s.get("tpot_p50_ms"), ".2f"),
        f(s.get("accuracy"), ".3f"),
        f(s.get("network_share"), ".0%"),
        str(s.get("calls_failed", "")),
    )


def run_cmd(
    recipe: Path | None = typer.Argument(
        None, help="Recipe TOML file (not with --resume).", show_default=False
    ),
    inventory: Path | None = typer.Option(
        None,
        "--inventory",
        "-i",
        help="Inventory TOML (default: a local testbed is created "
        "for the run and removed afterwards).",
    ),
    out: Path = typer.Option(Path("results"), "--out", help="Parent folder of the run folder."),
    sets: list[str] = typer.Option(
        [],
        "--set",
        help="Override a recipe key: key=value "
        "(e.g. workload.requests=5, sweep.links.rate='[\"2mbit\"]').",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Continue RUN_DIR (a run that stopped: controller crash, "
        "Ctrl-C, error) after its last complete trial, with its own recipe; rows of the "
        "unfinished trial are dropped first, so nothing is duplicated.",
        metavar="RUN_DIR",
    ),
    allow_cpu: bool = AllowCpuOpt,
    wheelhouse: Path | None = WheelhouseOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Run every trial of RECIPE; write results/<run-id>/ (manifest + CSVs)."""
    from ..errors import ConfigError
    from ..lab.provision import allowing_cpu

    if resume is not None:
        if recipe is not None or sets:
            raise ConfigError("--resume: takes no RECIPE or --set (the run's own recipe is used)")
        rcp, inv_default = session.resume_plan(resume)
        inventory = inventory or inv_default
    elif recipe is None:
        raise ConfigError("RECIPE: missing (or give --resume RUN_DIR)")
    else:
        rcp = load_recipe(recipe, sets)
    prog = RichProgress(err_console, fmt == Format.table)
    with allowing_cpu(allow_cpu), run_wheelhouse(wheelhouse, inventory):
        res = session.run_recipe(rcp, inventory, out, prog, resume=resume)
    emit(fmt, res.to_dict(), _summary_table(res), width=_summary_width())


def simulate_cmd(
    recipe: Path = typer.Argument(..., help="Recipe TOML file.", show_default=False),
    devices: int | None = typer.Option(
        None,
        "--devices",
        "-n",
        min=1,
        help="Devices of every trial (replaces the "
        "recipe's run.devices and its sweep; 1000+ is fine). Default: run.devices, else 3.",
    ),
    calibrate: Path | None = typer.Option(
        None,
        "--calibrate",
        help="A measured run's results folder to calibrate the latency "
        "model from (default: the documented defaults, testbed.run.calibration.DEFAULTS).",
        metavar="RUN_DIR",
    ),
    out: Path = typer.Option(Path("results"), "--out", help="Parent folder of the run folder."),
    sets: list[str] = typer.Option([], "--set", help="Override a recipe key: key=value."),
    fmt: Format = FormatOpt,
) -> None:
    """The analytic twin: replay RECIPE's policies (the same objects, routing from the model
    run here) against the calibrated latency model instead of agents, over N devices; writes
    results/<run-id>/ like `run`, its manifest marked "mode": "simulated"."""
    from ..run.twin import simulate_recipe

    rcp = load_recipe(recipe, sets)
    prog = RichProgress(err_console, fmt == Format.table)
    res = simulate_recipe(rcp, devices, calibrate, out, prog)
    emit(
        fmt,
        {**res.to_dict(), "mode": "simulated"},
        _summary_table(res, "simulated"),
        width=_summary_width(),
    )


def demo_cmd(
    devices: int = typer.Option(4, "--devices", "-n", help="Emulated devices."),
    recipe: Path = typer.Option(
        PACKAGED_RECIPES / "compare.toml",
        "--recipe",
        help="Recipe to run (default: the packaged comparison).",
    ),
    out: Path = typer.Option(Path("results"), "--out", help="Where results and plots go."),
    name: str = typer.Option("demo", "--name", help="Local testbed name."),
    allow_cpu: bool = AllowCpuOpt,
    wheelhouse: Path | None = WheelhouseOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Local testbed → provision → run the comparison recipe → report → tear down."""
    from ..lab.provision import allowing_cpu

    rcp = load_recipe(recipe)
    say = (
        (lambda m: err_console.print(f"[bold]{m}[/bold]"))
        if fmt == Format.table
        else (lambda m: None)
    )
    t_start = time.monotonic()
    out_data: dict[str, Any] = {}
    with allowing_cpu(allow_cpu), run_wheelhouse(wheelhouse, None):
        res = _demo_run(rcp, recipe, devices, name, out, say, fmt, out_data)
    say("4/4 report")
    from ..results.plots import write_plots
    from ..results.report import build_report, render_table

    rep = build_report([res.run_dir])
    plots = write_plots(rep, res.run_dir / "plots")
    out_data.update(
        report=rep.rows if hasattr(rep, "rows") else None,
        plots=[str(p) for p in plots],
        wall_s=round(time.monotonic() - t_start, 1),
    )
    if fmt == Format.table:
        render_table(rep, None)
    emit(
        fmt,
        out_data,
        f"\nresults: {res.run_dir}\nplots:   {res.run_dir / 'plots'} "
        f"({len(plots)} PNG)\ndemo wall time {out_data['wall_s']} s",
    )


def run_wheelhouse(wheelhouse: Path | None, inventory: Path | None) -> AbstractContextManager[None]:
    """The wheelhouse every provisioning of a run or demo takes (the session's own, restarted
    agents): ``--wheelhouse``, else the inventory's ``testbed.wheelhouse``; none: downloads.

    Raises
    ------
    ConfigError
        ``--wheelhouse`` is not a folder, or the inventory is bad.
    """
    from ..errors import ConfigError
    from ..lab.inventory import load_inventory
    from ..lab.provision.wheels import using_wheelhouse

    if wheelhouse is not None and not wheelhouse.is_dir():
        raise ConfigError(f"--wheelhouse: {wheelhouse}: no such directory")
    if wheelhouse is None and inventory is not None:
        found = load_inventory(inventory).wheelhouse
        wheelhouse = Path(found) if found else None
    return using_wheelhouse(wheelhouse)


def _demo_run(
    rcp: Recipe,
    recipe: Path,
    devices: int,
    name: str,
    out: Path,
    say: Callable[[str], None],
    fmt: Format,
    out_data: dict[str, Any],
) -> session.RunResult:
    """The demo's steps 1-3 on a fresh local testbed, torn down afterwards whatever happens:
    up, provision (its time into ``out_data``), run (its result into ``out_data``)."""
    from ..lab import local as local_tb
    from ..lab import provision as prov
    from ..lab.inventory import load_inventory

    local_tb.down(name)  # a previous demo killed halfway
    try:
        say(f"1/4 local testbed '{name}' with {devices} devices")
        up = local_tb.up(name, devices, 1_000_000.0)
        inv_path = Path(up["inventory"])
        say("2/4 provisioning agents over SSH")
        t0 = time.monotonic()
        from ..lab.modelstore import resolve_split

        reports = prov.provision(load_inventory(inv_path), resolve_split(rcp.model_spec()))
        out_data["provision_s"] = round(time.monotonic() - t0, 2)
        bad = [r for r in reports if not r.ok]
        if bad:
            from ..errors import TestbedError

            raise TestbedError("; ".join(f"{r.device}: {r.error}" for r in bad))
        say(f"3/4 running {recipe.name}: {len(rcp.trials())} trials")
        res = session.run_recipe(rcp, inv_path, out, RichProgress(err_console, fmt == Format.table))
        out_data["run"] = res.to_dict()
    finally:
        say(f"tearing down '{name}'")
        local_tb.down(name)
    return res
