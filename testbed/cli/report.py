"""``testbed report``: the table and the PNG plots of one or more results folders."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..errors import ConfigError
from .output import Format, FormatOpt, console, emit, err_console

PIPE_WIDTH = 240
"""The tables' width on a pipe or a file (rich's default there is 80): wide enough that every
column is there; a wider table is printed whole anyway (testbed.results.report.print_table)."""


def _out_console() -> Console:
    """stdout's console: the terminal's, else one :data:`PIPE_WIDTH` wide."""
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


def _per_run(summary: Callable[[Sequence[Any]], list], runs: Sequence[Any]) -> list:
    """``summary`` of each run in turn; a CSV of a run that cannot be read is a ConfigError
    naming the run's folder (one error line, not a traceback)."""
    out = []
    for run in runs:
        try:
            out += summary([run])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{run.path}: cannot read the results: {exc}") from None
    return out


def report_cmd(
    run_dirs: list[Path] = typer.Argument(
        ..., help="Results folders (results/<run-id>/).", metavar="RUN_DIR", show_default=False
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Where the PNG plots go (default: <first RUN_DIR>/plots)."
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Table per run x policy x sweep point (from requests/layers/calls.csv); each policy
    against topk at equal link budget (per-token latency change, accuracy change, the
    predicted/measured per-layer latency ratio of policies that predict); then PNG plots:
    latency CDF, accuracy vs latency, per-layer critical path (network vs compute).

    With injected faults (faults.csv): latency and accuracy during and after each, and the
    calls that failed or were re-routed meanwhile (testbed.results.fault_report).

    Deployment (testbed.results.deployment): memory per device against the budget, bytes per
    token, latency, accuracy, status-feed bytes, migrations and latency before/after.

    Latency model: per policy and point, the calibrated model's predicted / measured
    per-layer exchange time (and critical path, and the policy's own model's), median and
    p10-p90 (testbed.results.comparison.prediction_rows), and where a MoE layer's time goes:
    airtime, device compute, fixed call cost, the rest of the exchange, decision, rate
    change and the BS's own model, as shares (testbed.results.comparison.time_shares).

    A point with other policies but no topk is named on stderr (one warning line each); runs
    with budgets (MoE²) get a table of accuracy, energy and delay against them instead.

    Repeats: each metric is the mean over the repeats with its 95% confidence interval,
    shown as "mean ±half-width" (Student t, n-1 df; none with one repeat); the changes
    against topk are paired by repeat (same seed) where both ran the same repeats. Tables
    wrap rather than cut; on a narrow terminal a wide table comes in column groups.

    JSON: an object with runs, rows (one per run x policy x point), versus_topk,
    prediction and time_shares (see testbed.results.comparison), faults and plots (PNG paths).
    """
    from ..results import budgets, comparison, deployment, fault_report
    from ..results.plots import write_plots
    from ..results.report import build_report, print_table, render_table

    rep = build_report(run_dirs)
    versus = comparison.versus_baseline(rep.groups)
    for line in comparison.missing_baseline(rep.groups):
        err_console.print(line, highlight=False, markup=False, soft_wrap=True)
    prediction = comparison.prediction_rows(rep.groups)
    shares = comparison.shares_rows(rep.groups)
    faults = _per_run(fault_report.fault_summary, rep.runs)
    deployments = _per_run(deployment.deployment_summary, rep.runs)
    budget, plots = budgets.budget_rows(rep.groups), write_plots(rep, out)
    if fmt == Format.table:
        out_con = _out_console()
        render_table(rep, out_con)
        for rows, draw, keys in (
            (versus, comparison.table, 2),
            (prediction, comparison.prediction_table, 2),
            (shares, comparison.shares_table, 2),
            (faults, fault_report.table, 2),
            (deployments, deployment.table, 2),
            (budget, budgets.table, 1),
        ):
            if rows:
                print_table(out_con, draw(rows), keys)
    if fmt == Format.json:
        emit(fmt, _json(rep, versus, prediction, shares, faults, deployments, budget, plots))
    else:  # one unwrapped line per path, so that they can be copied
        console.print(f"plots: {plots[0].parent}/", soft_wrap=True, highlight=False, markup=False)
        for p in plots:
            console.print(f"  {p.name}", soft_wrap=True, highlight=False, markup=False)


def _json(rep: Any, *parts: Any) -> dict[str, Any]:
    """The report as JSON: runs, rows, then ``parts`` in :data:`JSON_PARTS`' order."""
    *tables, plots = parts
    return {
        "runs": [r.describe() for r in rep.runs],
        "rows": rep.rows,
        **dict(zip(JSON_PARTS, tables)),
        "plots": [str(p) for p in plots],
    }


JSON_PARTS = ("versus_topk", "prediction", "time_shares", "faults", "deployment", "budgets")
