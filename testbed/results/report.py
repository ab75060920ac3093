"""The report of one or more runs, from their results folders alone (no model, no torch).

* :func:`~testbed.results.summary.summary_row` — the metric columns of ``summary.csv`` for one
  trial, from its rows (pure; the experiment runner calls it at the end of every trial).
* :func:`load_runs` — each folder's ``manifest.json`` and CSVs.
* :func:`build_report` — one table row per (run, policy, sweep point), computed from
  ``requests.csv`` / ``layers.csv`` / ``calls.csv`` through :func:`summary_row` (never read from
  ``summary.csv``, which a crash may leave short).
* :func:`render_table` — that table with rich; :func:`~testbed.results.plots.write_plots` — the
  PNG plots (matplotlib, Agg canvas: no display needed); :func:`print_table` — any of the
  report's tables printed whole, never cut (:func:`print_table`).

Repeats (``recipe.repeats``): the rows of a group carry their ``repeat``; each metric of
:data:`CI_METRICS` is computed per repeat (:func:`repeat_groups`, :func:`summary_row`), and the
row's value is the mean over the repeats with a 95% Student-t interval (``<metric>_ci_low``,
``<metric>_ci_high``, :func:`~testbed.results.summary.mean_ci`; ``None`` with one repeat, whose
value is the group's own). Counts (requests, calls) are totals over the repeats. The table shows
``mean ±half-width`` (:func:`ci_cell`).

``summary_row`` and the plots live in :mod:`.summary` and :mod:`.plots`; their public names are
importable from here too (this module is the report's one entry point).

Conventions: percentiles are numpy's default (linear interpolation between the closest ranks,
``numpy.percentile(..., method="linear")``); empty cells and non-numbers are "not known" and
left out of every sum, mean and percentile; a metric with nothing to compute it from is ``''``
in :func:`summary_row` (an empty CSV cell) and ``None`` in the report rows (JSON ``null``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import schema as R
from .plots import PLOT_FILES, EnergyBar, energy_bars, layer_split, write_plots
from .summary import CALL_OK, METRIC_COLUMNS, column_values, critical_sums, mean_ci, summary_row

__all__ = [
    "CALL_OK",
    "CI_METRICS",
    "METRIC_COLUMNS",
    "PLOT_FILES",
    "EnergyBar",
    "Group",
    "Report",
    "Run",
    "build_report",
    "ci_cell",
    "critical_sums",
    "energy_bars",
    "layer_split",
    "load_run",
    "load_runs",
    "point_label",
    "print_table",
    "render_table",
    "repeat_groups",
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


CI_METRICS = (
    "latency_p50_ms",
    "latency_p95_ms",
    "ttft_p50_ms",
    "tpot_p50_ms",
    "accuracy",
    "score",
    "energy_per_token_j",
    "bytes_per_token",
    "network_share",
)
"""The metrics of :func:`summary_row` that the report gives per repeat: mean and 95% CI."""


def _repeat_key(v: str) -> tuple[float, str]:
    x = R.num(v)
    return (x if x is not None else math.inf, v)


def repeat_groups(g: Group) -> dict[str, Group]:
    """The group's rows split by their ``repeat`` cell (``''`` where a row has none), in
    repeat order: one :class:`Group` (same run, policy and point) per repeat."""
    by: dict[str, Group] = {}
    for attr in ("requests", "layers", "calls"):
        for r in getattr(g, attr):
            k = str(r.get("repeat", "") or "")
            sub = by.get(k)
            if sub is None:
                sub = by[k] = Group(g.run, g.policy, g.point)
            getattr(sub, attr).append(r)
    return {k: by[k] for k in sorted(by, key=_repeat_key)}


def report_row(g: Group) -> dict[str, Any]:
    """The group's keys, its trial numbers and :func:`summary_row` (``''`` cells as
    ``None``, floats to 6 decimals); ``n_repeats``; with several repeats each metric of
    :data:`CI_METRICS` is the mean of its per-repeat values, with ``<metric>_ci_low`` and
    ``<metric>_ci_high`` (95%, Student t; ``None`` where fewer than two repeats have it)."""
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
    reps = repeat_groups(g)
    row["n_repeats"] = len(reps)
    per = [summary_row(r.requests, r.layers, r.calls) for r in reps.values()]
    for m in CI_METRICS:
        mu, lo, hi = mean_ci(column_values(per, m))
        if len(reps) > 1:
            row[m] = _json_value(mu)
        row[f"{m}_ci_low"], row[f"{m}_ci_high"] = _json_value(lo), _json_value(hi)
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


def ci_cell(v: Any, low: Any, high: Any, spec: str, unit: str = "") -> str:
    """A value with its 95% CI as ``mean ±half-width`` (e.g. ``41.2 ±3.1``, ``-12.0% ±4.1%``
    with ``unit="%"``), both formatted with ``spec`` (the half-width without a sign); the value
    alone without an interval (one repeat), ``-`` without a value."""
    if v is None or v == "":
        return "-"
    if low is None or high is None:
        return format(v, spec) + unit
    return f"{format(v, spec)}{unit} ±{format((high - low) / 2, spec.lstrip('+'))}{unit}"


CI_NOTE = (
    "x ±h: mean over the n repeats ± half-width of its 95% CI (Student t, n-1 df); "
    "n=1: one repeat, no CI"
)
"""The footer line of every table that shows :func:`ci_cell` cells."""


def key_columns(rep: Report) -> int:
    """How many text columns start :func:`table` (run, policy, point; or policy, point)."""
    return 3 if rep.many_runs or any(r.failed for r in rep.runs) else 2


_CELLS = (  # (header, metric, format) of the table's CI columns
    ("latency\np50 ms", "latency_p50_ms", ".1f"),
    ("latency\np95 ms", "latency_p95_ms", ".1f"),
    ("ttft\np50 ms", "ttft_p50_ms", ".1f"),
    ("tpot\np50 ms", "tpot_p50_ms", ".2f"),
    ("accuracy", "accuracy", ".3f"),
    ("energy\nJ/tok", "energy_per_token_j", ".3g"),
    ("bytes\n/tok", "bytes_per_token", ".0f"),
    ("network\nshare", "network_share", ".1%"),
)


def table(rep: Report):
    """The report as a rich Table (one row per run x policy x point): metrics as
    :func:`ci_cell` (mean ±95% CI over the repeats), counts as totals over them."""
    from rich import box
    from rich.table import Table

    runs = ", ".join(
        f"{r.run_id} ({r.status}" + (", SIMULATED" if r.mode == "simulated" else "") + ")"
        for r in rep.runs
    )
    t = Table(title=f"report: {runs}", box=box.SIMPLE_HEAD)
    with_run = key_columns(rep) == 3
    head = (["run"] if with_run else []) + ["policy", "point", "n", "requests\nok/all"]
    head += [h for h, _, _ in _CELLS] + ["failed\ncalls"]
    for i, h in enumerate(head):
        left = i < key_columns(rep)
        t.add_column(h, justify="left" if left else "right", overflow="fold")
    for row in rep.rows:
        cells = [row["run"] + (" (failed)" if row["run_failed"] else "")] if with_run else []
        cells += [row["policy"], point_label(row), str(row.get("n_repeats", 1))]
        cells.append(f"{row['requests_ok']}/{row['requests']}")
        cells += [
            ci_cell(row[m], row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high"), spec)
            for _, m, spec in _CELLS
        ]
        cells.append(f"{row['calls_failed']}/{row['calls']}")
        t.add_row(*cells, style="red" if with_run and cells[0].endswith("(failed)") else None)
    notes = [
        f"{r.run_id}: {r.status}" + (f": {r.error}" if r.error else "")
        for r in rep.runs
        if r.status != "completed"
    ]
    if not rep.rows:
        notes.append("no rows")
    lines = ["; ".join(notes)] if notes else []
    if rep.rows:
        lines.append(CI_NOTE + "; counts: totals over the repeats")
    t.caption = "\n".join(lines) or None
    return t


MAX_WORD = 40
"""A word longer than this may be folded over two lines; shorter words never are."""


def _part(t: Any, idx: Sequence[int], title: Any, caption: Any) -> Any:
    from rich.table import Table

    p = Table(title=title, caption=caption, box=t.box, title_justify=t.title_justify)
    cells = [list(c.cells) for c in t.columns]
    for i in idx:
        c = t.columns[i]
        p.add_column(
            c.header, justify=c.justify, overflow="fold", no_wrap=False, min_width=c.min_width
        )
    for r, row in enumerate(t.rows):
        p.add_row(*(cells[i][r] for i in idx), style=row.style, end_section=row.end_section)
    return p


def _slices(console: Any, t: Any, keys: int) -> list[Any]:
    """``t`` as tables of at most the console's width: the first ``keys`` columns in each, the
    others in order, as many as fit (one at least)."""
    from rich.measure import Measurement

    opts = console.options.update_width(10_000)
    keys = min(keys, len(t.columns) - 1)
    parts: list[list[int]] = []
    cur: list[int] = []
    for i in range(keys, len(t.columns)):
        trial = _part(t, list(range(keys)) + cur + [i], None, None)
        if cur and Measurement.get(console, opts, trial).minimum > console.width:
            parts.append(cur)
            cur = []
        cur.append(i)
    parts.append(cur)
    n = len(parts)
    return [
        _part(
            t,
            list(range(keys)) + cols,
            f"{t.title or ''} ({k + 1}/{n})".strip(),
            t.caption if k == n - 1 else None,
        )
        for k, cols in enumerate(parts)
    ]


def _words(c: Any) -> list[str]:
    return [str(x) for x in (c.header, *c.cells)]


def _fit(console: Any, t: Any) -> None:
    """Give ``t``'s columns explicit widths when it is wider than the console: each its longest
    word at least, the room left to the columns that need least to be whole (rich's own
    shrinking may go below a column's minimum and then overflow the console)."""
    from rich.cells import cell_len
    from rich.measure import Measurement

    m = Measurement.get(console, console.options.update_width(10_000), t)
    if m.maximum <= console.width:
        return
    mins = [c.min_width or 1 for c in t.columns]
    maxs = [
        max([w] + [cell_len(ln) for x in _words(c) for ln in x.splitlines()])
        for w, c in zip(mins, t.columns)
    ]
    spare = console.width - (m.minimum - sum(mins)) - sum(mins)
    widths = list(mins)
    for i in sorted(range(len(widths)), key=lambda i: maxs[i] - mins[i]):
        add = max(0, min(spare, maxs[i] - widths[i]))
        widths[i] += add
        spare -= add
    for c, w in zip(t.columns, widths):
        c.width = w


def print_table(console: Any, t: Any, keys: int = 2) -> None:
    """Print the rich Table ``t`` on ``console`` with no cell cut ("…"): every column wraps at
    spaces (a word longer than :data:`MAX_WORD` folds; no shorter one is split). A table wider
    than the console is printed whole on a pipe or a file (one line per row: the caller gives a
    wide enough console) and, on a terminal, as several tables that fit, each starting with the
    first ``keys`` columns (policy, point) and going on with as many other columns as fit."""
    from rich.cells import cell_len
    from rich.measure import Measurement

    for c in t.columns:
        longest = max((cell_len(w) for x in _words(c) for w in x.split()), default=1)
        c.overflow, c.no_wrap, c.min_width = "fold", False, min(longest, MAX_WORD)
    m = Measurement.get(console, console.options.update_width(10_000), t)
    if not console.is_terminal and m.maximum > console.width:
        t.width = m.maximum
        console.print(t, crop=False)
        return
    for part in [t] if m.minimum <= console.width else _slices(console, t, keys):
        _fit(console, part)
        console.print(part)


def render_table(rep: Report, console: Any = None) -> None:
    """Print :func:`table` on ``console`` (default: a rich Console on stdout) through
    :func:`print_table`."""
    if console is None:
        from rich.console import Console

        console = Console()
    print_table(console, table(rep), key_columns(rep))
