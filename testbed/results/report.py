"""The report of one or more runs, from their results folders alone (no model, no torch).

* :func:`~testbed.results.summary.summary_row` — the metric columns of ``summary.csv`` for one
  trial, from its rows (pure; the experiment runner calls it at the end of every trial).
* :func:`load_runs` — each folder's ``manifest.json`` and CSVs.
* :func:`build_report` — one table row per (run, policy, sweep point), computed from
  ``requests.csv`` / ``layers.csv`` / ``calls.csv`` through :func:`summary_row` (never read from
  ``summary.csv``, which a crash may leave short).
* :func:`render_table` — that table with rich; :func:`~testbed.results.plots.write_plots` — the
  PNG plots (matplotlib, Agg canvas: no display needed).

``summary_row`` and the plots live in :mod:`.summary` and :mod:`.plots`; their public names are
importable from here too (this module is the report's one entry point).

Conventions: percentiles are numpy's default (linear interpolation between the closest ranks,
``numpy.percentile(..., method="linear")``); empty cells and non-numbers are "not known" and
left out of every sum, mean and percentile; a metric with nothing to compute it from is ``''``
in :func:`summary_row` (an empty CSV cell) and ``None`` in the report rows (JSON ``null``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import schema as R
from .plots import PLOT_FILES, EnergyBar, energy_bars, layer_split, write_plots
from .summary import CALL_OK, METRIC_COLUMNS, column_values, critical_sums, summary_row

__all__ = [
    "CALL_OK",
    "METRIC_COLUMNS",
    "PLOT_FILES",
    "EnergyBar",
    "Group",
    "Report",
    "Run",
    "build_report",
    "critical_sums",
    "energy_bars",
    "layer_split",
    "load_run",
    "load_runs",
    "point_label",
    "render_table",
    "report_row",
    "short_policy",
    "summary_row",
    "table",
    "write_plots",
]


# -- runs -----------------------------------------------------------------------------
@dataclass
class Run:
    """One results folder as read from disk."""

    path: Path
    run_id: str
    status: str  # manifest status: completed/failed/interrupted/running, or unknown
    error: str | None
    manifest: dict[str, Any]
    requests: list[dict[str, str]]
    layers: list[dict[str, str]]
    calls: list[dict[str, str]]

    @property
    def failed(self) -> bool:
        """The manifest says ``failed`` (an interrupted or unknown run is not)."""
        return self.status == "failed"

    @property
    def mode(self) -> str:
        """``measured`` (a run on the testbed) or ``simulated`` (the analytic twin,
        :mod:`testbed.run.twin`), as the manifest says."""
        return str(self.manifest.get("mode") or "measured")

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity, status and row counts (``testbed report``'s ``runs``)."""
        return {
            "run": self.run_id,
            "path": str(self.path),
            "status": self.status,
            "mode": self.mode,
            "failed": self.failed,
            "error": self.error,
            "requests": len(self.requests),
            "layers": len(self.layers),
            "calls": len(self.calls),
        }


def load_run(run_dir: str | Path) -> Run:
    """Read one results folder. Raises ConfigError (naming the path) when it does not exist or
    has no ``requests.csv``; a missing or unreadable manifest only makes the status ``unknown``."""
    p = Path(run_dir)
    if not p.exists():
        raise ConfigError(f"{p}: no such results folder")
    if not p.is_dir():
        raise ConfigError(f"{p}: not a results folder (a file)")
    if not (p / R.REQUESTS).is_file():
        raise ConfigError(f"{p}: not a results folder: no {R.REQUESTS}")
    manifest: dict[str, Any] = {}
    error = None
    try:
        loaded = json.loads((p / R.MANIFEST).read_text(encoding="utf-8"))
        manifest = loaded if isinstance(loaded, dict) else {}
    except FileNotFoundError:
        error = f"no {R.MANIFEST}"
    except (OSError, ValueError) as exc:
        error = f"{R.MANIFEST} unreadable: {exc}"
    try:
        reqs, layers, calls = (R.read_csv(p / f) for f in (R.REQUESTS, R.LAYERS, R.CALLS))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the CSVs: {exc}") from None
    status = str(manifest.get("status") or "unknown")
    err = manifest.get("error") or error
    run_id = str(manifest.get("run_id") or (reqs[0].get("run_id") if reqs else "") or p.name)
    return Run(p, run_id, status, None if err is None else str(err), manifest, reqs, layers, calls)


def load_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Read every folder (see :func:`load_run`), in the order given."""
    return [load_run(d) for d in run_dirs]


# -- report ---------------------------------------------------------------------------
@dataclass
class Group:
    """The rows of one (run, policy, sweep point)."""

    run: Run
    policy: str
    point: str
    requests: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)

    def label(self, with_run: bool = False) -> str:
        """``policy | point`` (the point without its ``policy.name=`` part), run id first when
        several runs are plotted together."""
        point = point_label({"policy": self.policy, "point": self.point})
        lab = self.policy if point == "-" else f"{self.policy} | {point}"
        return f"{self.run.run_id}: {lab}" if with_run else lab


@dataclass
class Report:
    """The runs read, their groups, and one summary row per group (same order)."""

    runs: list[Run]
    groups: list[Group]
    rows: list[dict[str, Any]]  # one per group, JSON-ready

    @property
    def many_runs(self) -> bool:
        """More than one run was read (group labels then carry the run id)."""
        return len(self.runs) > 1


def _groups(run: Run) -> list[Group]:
    by: dict[tuple[str, str], Group] = {}
    for attr in ("requests", "layers", "calls"):
        for r in getattr(run, attr):
            k = (str(r.get("policy", "")), str(r.get("point", "")))
            g = by.get(k)
            if g is None:
                g = by[k] = Group(run, *k)
            getattr(g, attr).append(r)
    return list(by.values())


def _json_value(v: Any) -> Any:
    if v == "":
        return None
    if isinstance(v, float):
        return round(v, 6)
    return v


def report_row(g: Group) -> dict[str, Any]:
    """The group's keys, its trial numbers and :func:`summary_row` (``''`` cells as
    ``None``, floats to 6 decimals)."""
    trials = sorted({int(x) for x in column_values(g.requests or g.layers or g.calls, "trial")})
    row: dict[str, Any] = {
        "run": g.run.run_id,
        "run_status": g.run.status,
        "run_failed": g.run.failed,
        "policy": g.policy,
        "point": g.point,
        "trials": trials,
    }
    row.update({k: _json_value(v) for k, v in summary_row(g.requests, g.layers, g.calls).items()})
    return row


def build_report(run_dirs: Iterable[str | Path]) -> Report:
    """Load the runs and compute one row per (run, policy, point), in the order the rows first
    appear in each run's CSVs."""
    runs = load_runs(run_dirs)
    groups = [g for run in runs for g in _groups(run)]
    return Report(runs, groups, [report_row(g) for g in groups])


# -- text table -----------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or v == "" else format(v, spec)


POLICY_KEY = "policy.name"
"""The sweep key that names the policy (its ``point`` word is ``policy.name=<spec>``)."""


def short_policy(spec: str) -> str:
    """A policy spec as a short label: an entry-point name as it is; ``pkg.mod:Class`` and
    ``path/to/file.py:Class`` as ``Class``."""
    return spec.rpartition(":")[2] if ":" in spec else spec


def point_label(row: Mapping[str, Any]) -> str:
    """The point without its ``policy.name=<spec>`` part when the policy column says it (the
    spec is the policy's name, or a ``pkg.mod:Class`` / ``file.py:Class`` whose class name is
    that name, case aside); otherwise that part with the spec shortened to its class name
    (:func:`short_policy`), never a long file path."""
    policy = str(row["policy"])
    parts = []
    for x in str(row["point"]).split():
        if x.startswith(f"{POLICY_KEY}="):
            spec = x[len(POLICY_KEY) + 1 :]
            short = short_policy(spec)
            if spec == policy or (short != spec and short.lower() == policy.lower()):
                continue
            x = f"{POLICY_KEY}={short}"
        parts.append(x)
    return " ".join(parts) or "-"


def table(rep: Report):
    """The report as a rich Table (one row per run x policy x point)."""
    from rich import box
    from rich.table import Table

    runs = ", ".join(
        f"{r.run_id} ({r.status}" + (", SIMULATED" if r.mode == "simulated" else "") + ")"
        for r in rep.runs
    )
    t = Table(title=f"report: {runs}", box=box.SIMPLE_HEAD)
    with_run = rep.many_runs or any(r.failed for r in rep.runs)
    head = (["run"] if with_run else []) + [
        "policy",
        "point",
        "requests\nok/all",
        "latency\np50 ms",
        "latency\np95 ms",
        "ttft\np50 ms",
        "tpot\np50 ms",
        "accuracy",
        "energy\nJ/tok",
        "bytes\n/tok",
        "network\nshare",
        "failed\ncalls",
    ]
    body = []
    for row in rep.rows:
        cells = [row["run"] + (" (failed)" if row["run_failed"] else "")] if with_run else []
        cells += [
            row["policy"],
            point_label(row),
            f"{row['requests_ok']}/{row['requests']}",
            _fmt(row["latency_p50_ms"], ".1f"),
            _fmt(row["latency_p95_ms"], ".1f"),
            _fmt(row["ttft_p50_ms"], ".1f"),
            _fmt(row["tpot_p50_ms"], ".2f"),
            _fmt(row["accuracy"], ".3f"),
            _fmt(row["energy_per_token_j"], ".3g"),
            _fmt(row["bytes_per_token"], ".0f"),
            _fmt(row["network_share"], ".1%"),
            f"{row['calls_failed']}/{row['calls']}",
        ]
        body.append(cells)
    text_cols = 3 if with_run else 2
    for i, h in enumerate(head):
        if i < text_cols:
            w = max([len(h)] + [len(c[i]) for c in body])
            t.add_column(h, overflow="fold", min_width=min(w, 12))
        else:  # numbers are never cut: the text columns fold instead
            w = max([len(x) for x in h.split("\n")] + [len(c[i]) for c in body])
            t.add_column(h, justify="right", no_wrap=True, min_width=w)
    for cells in body:
        t.add_row(*cells, style="red" if with_run and cells[0].endswith("(failed)") else None)
    notes = [
        f"{r.run_id}: {r.status}" + (f": {r.error}" if r.error else "")
        for r in rep.runs
        if r.status != "completed"
    ]
    if not rep.rows:
        notes.append("no rows")
    if notes:
        t.caption = "; ".join(notes)
    return t


def render_table(rep: Report, console: Any = None) -> None:
    """Print the table on ``console`` (default: a rich Console on stdout)."""
    from rich.measure import Measurement

    if console is None:
        from rich.console import Console

        console = Console()
    t = table(rep)
    # never cut columns off on a narrow terminal: at least the table's minimum width
    need = Measurement.get(console, console.options.update_width(10_000), t).minimum
    if need > console.width:
        t.width = need
    console.print(t, crop=False)
