"""The report of one or more runs, from their results folders alone (no model, no torch).

* :func:`summary_row` — the metric columns of ``summary.csv`` for one trial, from its rows
  (pure; the experiment runner calls it at the end of every trial).
* :func:`load_runs` — each folder's ``manifest.json`` and CSVs.
* :func:`build_report` — one table row per (run, policy, sweep point), computed from
  ``requests.csv`` / ``layers.csv`` / ``calls.csv`` through :func:`summary_row` (never read from
  ``summary.csv``, which a crash may leave short).
* :func:`render_table` — that table with rich; :func:`write_plots` — the PNG plots (matplotlib,
  Agg canvas: no display needed).

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

import numpy as np

from . import schema as R
from ..errors import ConfigError, Unsupported

METRIC_COLUMNS = R.SUMMARY_COLUMNS[len(R.KEY_COLUMNS) :]
"""The columns :func:`summary_row` fills: everything in ``SUMMARY_COLUMNS`` after the keys."""

CALL_OK = ("ok", "rerouted")
"""Call statuses that are not failures; every other status (timeout, error, unreachable,
skipped, ...) counts in ``calls_failed``."""

PLOT_FILES = (
    "latency_cdf.png",
    "accuracy_vs_latency.png",
    "layer_critical_path.png",
    "energy_per_token.png",
)


# -- one trial ------------------------------------------------------------------------
def _f(v: Any) -> float | None:
    """A cell (string as read_csv gives it, or a number/bool/None as the runner has it) as float,
    or None when empty, not a number or NaN."""
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        x = float(v)
    else:
        x = R.num(str(v).strip())
        if x is None:
            return None
    return None if math.isnan(x) else x


def _vals(rows: Iterable[Mapping[str, Any]], col: str) -> list[float]:
    out = []
    for r in rows:
        x = _f(r.get(col))
        if x is not None:
            out.append(x)
    return out


def _pct(xs: Sequence[float], q: float) -> float | str:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else ""


def _mean(xs: Sequence[float]) -> float | str:
    return math.fsum(xs) / len(xs) if xs else ""


def _ratio(num: float, den: float) -> float | str:
    return num / den if den > 0 else ""


def critical_sums(layers: Iterable[Mapping[str, Any]]) -> tuple[float, float, bool]:
    """(critical path ms, its network part ms, whether any layer had both), summed over the
    layer rows that have both."""
    net = path = 0.0
    seen = False
    for lr in layers:
        p, n = _f(lr.get("critical_path_ms")), _f(lr.get("critical_network_ms"))
        if p is not None and n is not None:
            path += p
            net += n
            seen = True
    return path, net, seen


def summary_row(requests: list[dict], layers: list[dict], calls: list[dict]) -> dict:
    """The metric columns of ``SUMMARY_COLUMNS`` (all but the key columns) for one trial.

    Rows are dicts as :func:`testbed.results.read_csv` returns them (strings) or as the runner
    builds them (numbers, bools, None). Unknown cells are skipped; a metric that cannot be
    computed is ``''``.

    * ``requests``, ``requests_ok`` (status ``ok``; ``degraded``/``error`` are not).
    * ``latency_p50_ms``/``latency_p95_ms`` of ``total_ms``; ``ttft_p50_ms``; ``tpot_p50_ms``
      (numpy's linear-interpolation percentile over the requests with a value).
    * ``accuracy`` = mean ``correct``; ``score`` = mean ``score``.
    * ``energy_per_token_j`` = sum ``energy_j`` / sum ``output_tokens``, both over the requests
      whose ``energy_j`` is known (``''`` when none is); ``energy_j`` is the request's devices'
      plus BS's joules (``energy_devices_j + energy_bs_j``, see :mod:`testbed.dataplane.energy_attr`).
    * ``bytes_per_token`` = sum (``bytes_down`` + ``bytes_up``) / sum ``output_tokens``.
    * ``network_share`` = sum ``critical_network_ms`` / sum ``critical_path_ms`` over the layer
      rows that have both.
    * ``calls`` = call rows; ``calls_failed`` = status not ok/rerouted; ``calls_rerouted``.
    """
    total = _vals(requests, "total_ms")
    out_tokens = 0.0
    bytes_sum = 0.0
    e_sum = e_tokens = 0.0
    e_known = False
    ok = 0
    for r in requests:
        tok = _f(r.get("output_tokens")) or 0.0
        out_tokens += tok
        bytes_sum += (_f(r.get("bytes_down")) or 0.0) + (_f(r.get("bytes_up")) or 0.0)
        e = _f(r.get("energy_j"))
        if e is not None:
            e_known = True
            e_sum += e
            e_tokens += tok
        ok += str(r.get("status", "")).strip() == "ok"

    path, net, _ = critical_sums(layers)

    failed = rerouted = 0
    for c in calls:
        st = str(c.get("status", "")).strip()
        failed += st not in CALL_OK
        rerouted += st == "rerouted"

    return {
        "requests": len(requests),
        "requests_ok": ok,
        "latency_p50_ms": _pct(total, 50),
        "latency_p95_ms": _pct(total, 95),
        "ttft_p50_ms": _pct(_vals(requests, "ttft_ms"), 50),
        "tpot_p50_ms": _pct(_vals(requests, "tpot_ms"), 50),
        "accuracy": _mean(_vals(requests, "correct")),
        "score": _mean(_vals(requests, "score")),
        "energy_per_token_j": _ratio(e_sum, e_tokens) if e_known else "",
        "bytes_per_token": _ratio(bytes_sum, out_tokens),
        "network_share": _ratio(net, path),
        "calls": len(calls),
        "calls_failed": failed,
        "calls_rerouted": rerouted,
    }


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
        return self.status == "failed"

    @property
    def mode(self) -> str:
        """``measured`` (a run on the testbed) or ``simulated`` (the analytic twin,
        :mod:`testbed.run.twin`), as the manifest says."""
        return str(self.manifest.get("mode") or "measured")

    def describe(self) -> dict[str, Any]:
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
        point = _point_label({"policy": self.policy, "point": self.point})
        lab = self.policy if point == "-" else f"{self.policy} | {point}"
        return f"{self.run.run_id}: {lab}" if with_run else lab


@dataclass
class Report:
    runs: list[Run]
    groups: list[Group]
    rows: list[dict[str, Any]]  # one per group, JSON-ready

    @property
    def many_runs(self) -> bool:
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
    trials = sorted({int(x) for x in _vals(g.requests or g.layers or g.calls, "trial")})
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


def _point_label(row: Mapping[str, Any]) -> str:
    """The point without its ``policy.name=<policy>`` part (the policy column says it)."""
    parts = [x for x in str(row["point"]).split() if x != f"policy.name={row['policy']}"]
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
            _point_label(row),
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


# -- plots ----------------------------------------------------------------------------
def _figure(**kw: Any):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise Unsupported("plots need matplotlib: pip install 'moe-edge-testbed[plot]'") from None
    return Figure(**kw)  # Agg canvas on savefig: no pyplot, no display, no global state


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_cdf(rep: Report, path: Path) -> None:
    fig = _figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    n = 0
    styles = ("-", "--", ":", "-.")
    policies = list(dict.fromkeys(g.policy for g in rep.groups))
    for g in rep.groups:
        xs = np.sort(np.asarray(_vals(g.requests, "total_ms"), dtype=float))
        if xs.size == 0:
            continue
        ys = np.arange(1, xs.size + 1) / xs.size
        # empirical CDF as a step function; line style per policy so that equal curves show
        ax.step(
            np.concatenate([[xs[0]], xs]),
            np.concatenate([[0.0], ys]),
            where="post",
            linestyle=styles[policies.index(g.policy) % len(styles)],
            linewidth=1.8,
            label=g.label(rep.many_runs),
        )
        n += 1
    if n:
        ax.legend(fontsize="small", title="policy | point")
    else:
        _no_data(ax, "no requests with total_ms")
    ax.set_title("Request latency CDF (total_ms)")
    ax.set_xlabel("request latency, prompt in → last token (ms)")
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)


def _plot_acc_lat(rep: Report, path: Path) -> None:
    fig = _figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^v<>PX*"
    n = 0
    for i, (g, row) in enumerate(zip(rep.groups, rep.rows)):
        x, y = row["latency_p50_ms"], row["accuracy"]
        if x is None or y is None:
            continue
        # a short number next to the marker, the full label in the legend (long labels of
        # nearby points would overlap)
        lab = f"{i + 1}: {g.label(rep.many_runs)}" + (" (failed run)" if g.run.failed else "")
        ax.scatter([x], [y], marker=markers[i % len(markers)], s=60, label=lab, zorder=3)
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small")
        n += 1
    if n:
        fig.legend(
            fontsize="small",
            title="policy | point",
            loc="outside lower center",
            ncols=2 if n > 3 else 1,
        )
        ax.margins(0.15)
    else:
        _no_data(ax, "no requests with total_ms and correct")
    fig.suptitle("Accuracy vs latency (one marker per policy × sweep point)")
    ax.set_xlabel("p50 request latency (ms)")
    ax.set_ylabel("accuracy (fraction of requests correct)")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)


def layer_split(layers: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, float]]:
    """(layer, mean critical_network_ms, mean critical_compute_ms) per MoE layer, sorted by
    layer; each mean over that layer's rows where the value is known."""
    acc: dict[int, list[list[float]]] = {}
    for r in layers:
        layer = _f(r.get("layer"))
        if layer is None:
            continue
        net, comp = acc.setdefault(int(layer), [[], []])
        n, c = _f(r.get("critical_network_ms")), _f(r.get("critical_compute_ms"))
        if n is not None:
            net.append(n)
        if c is not None:
            comp.append(c)
    return [
        (layer, float(np.mean(n)) if n else 0.0, float(np.mean(c)) if c else 0.0)
        for layer, (n, c) in sorted(acc.items())
        if n or c
    ]


def _plot_layers(rep: Report, path: Path) -> None:
    k = max(1, len(rep.groups))
    ncols = min(3, k)
    nrows = math.ceil(k / ncols)
    fig = _figure(figsize=(max(7.5, 4.2 * ncols + 0.5), 3.4 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    handles = None
    for i, ax in enumerate(axes.flat):
        if i >= len(rep.groups):
            if rep.groups:
                ax.set_visible(False)
                continue
            _no_data(ax, "no layer rows")
            continue
        g = rep.groups[i]
        split = layer_split(g.layers)
        ax.set_title(
            g.label(rep.many_runs) + (" (failed run)" if g.run.failed else ""), fontsize="medium"
        )
        ax.set_xlabel("MoE layer")
        ax.grid(True, axis="y", alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("mean critical path per step (ms)")
        if not split:
            _no_data(ax, "no layer rows with critical path")
            continue
        xs = [s[0] for s in split]
        net = [s[1] for s in split]
        comp = [s[2] for s in split]
        b1 = ax.bar(xs, net, color="tab:blue", label="network (critical_network_ms)")
        b2 = ax.bar(
            xs,
            comp,
            bottom=net,
            color="tab:orange",
            label="device queue + compute (critical_compute_ms)",
        )
        ax.set_xticks(xs)
        handles = handles or [b1, b2]
    fig.suptitle("Per-layer critical path: network vs compute (slowest device per step)")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
    fig.savefig(path, dpi=110)


@dataclass
class EnergyBar:
    """One bar of the energy plot: a (run, policy, point) group's joules per output token."""

    label: str
    policy: str
    per_token_j: float | None  # sum energy_j / sum output_tokens (requests with energy_j)
    devices_per_token_j: float | None  # the same for energy_devices_j (None: column absent)
    bs_per_token_j: float | None
    source: str  # measured / estimated / mixed / unavailable (of the requests)


def energy_bars(rep: Report) -> list[EnergyBar]:
    """The energy plot's bars, one per group, in the report's order. Only requests whose
    ``energy_j`` is known count (as in :func:`summary_row`); the device/BS split is given when
    every counted request has both parts. ``source`` is the class of the requests'
    ``energy_source`` (its part before any ``;``), ``mixed`` when they differ."""
    out = []
    for g, row in zip(rep.groups, rep.rows):
        tokens = e_dev = e_bs = 0.0
        split = True
        kinds: set[str] = set()
        for r in g.requests:
            if _f(r.get("energy_j")) is None:
                continue
            tokens += _f(r.get("output_tokens")) or 0.0
            d, b = _f(r.get("energy_devices_j")), _f(r.get("energy_bs_j"))
            if d is None or b is None:
                split = False
            else:
                e_dev += d
                e_bs += b
            kinds.add(str(r.get("energy_source") or "").split(";")[0].strip() or "unknown")
        per = row.get("energy_per_token_j")
        both = split and tokens > 0 and per is not None
        src = "unavailable" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
        out.append(
            EnergyBar(
                g.label(rep.many_runs),
                g.policy,
                per,
                e_dev / tokens if both else None,
                e_bs / tokens if both else None,
                src,
            )
        )
    return out


def _plot_energy(rep: Report, path: Path) -> None:
    bars = energy_bars(rep)
    fig = _figure(figsize=(max(8.0, 1.1 * len(bars) + 4.5), 5.2), layout="constrained")
    ax = fig.add_subplot()
    shown = [b for b in bars if b.per_token_j is not None]
    if shown:
        xs = np.arange(len(shown))
        policies = list(dict.fromkeys(b.policy for b in shown))
        colors = [f"C{policies.index(b.policy) % 10}" for b in shown]
        hatch = ["//" if b.source != "measured" else "" for b in shown]
        dev = [
            b.devices_per_token_j if b.devices_per_token_j is not None else b.per_token_j
            for b in shown
        ]
        bs = [b.bs_per_token_j or 0.0 for b in shown]
        ax.bar(xs, dev, color=colors, hatch=hatch, edgecolor="black", linewidth=0.6)
        ax.bar(
            xs,
            bs,
            bottom=dev,
            color=colors,
            alpha=0.45,
            hatch=hatch,
            edgecolor="black",
            linewidth=0.6,
        )
        for x, b in zip(xs, shown):
            ax.annotate(
                f"{b.per_token_j:.3g} J\n{b.source}",
                (x, b.per_token_j),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize="x-small",
            )
        ax.set_xticks(xs, [b.label for b in shown], rotation=20, ha="right", fontsize="small")
        ax.margins(y=0.18)
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor=f"C{i % 10}", edgecolor="black", label=p)
            for i, p in enumerate(policies)
        ]
        handles += [
            Patch(facecolor="white", edgecolor="black", label="devices (solid)"),
            Patch(facecolor="lightgrey", edgecolor="black", alpha=0.45, label="BS (light, on top)"),
            Patch(
                facecolor="white", edgecolor="black", hatch="//", label="estimated (not measured)"
            ),
        ]
        fig.legend(handles=handles, fontsize="small", loc="outside right upper")
    else:
        _no_data(ax, "no requests with energy_j")
    ax.set_title("Energy per output token by policy × sweep point (devices + BS)")
    ax.set_ylabel("joules per output token")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)


def write_plots(rep: Report, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNG plots to ``out_dir`` (default ``<first run dir>/plots``) and return their
    paths: ``latency_cdf.png`` (CDF of total_ms, one line per policy x point),
    ``accuracy_vs_latency.png`` (p50 latency vs accuracy, one labelled marker per policy x
    point) and ``layer_critical_path.png`` (per MoE layer, mean critical_network_ms stacked
    under mean critical_compute_ms, one panel per policy x point) and ``energy_per_token.png``
    (joules per output token, one bar per policy x point, devices' part under the BS's,
    hatched where the energy is estimated: :func:`energy_bars`)."""
    if out_dir is None:
        if not rep.runs:
            raise ConfigError("report: no run folders given")
        out_dir = rep.runs[0].path / "plots"
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the plots folder: {exc.strerror or exc}") from None
    paths = [out / name for name in PLOT_FILES]
    for draw, p in zip((_plot_cdf, _plot_acc_lat, _plot_layers, _plot_energy), paths):
        draw(rep, p)
    return paths
