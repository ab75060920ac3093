"""The report's PNG plots (matplotlib, imported only when a plot is drawn; Agg canvas: no
display needed): :func:`write_plots` writes :data:`PLOT_FILES` — the latency CDF, accuracy vs
latency, the per-layer critical path (network vs compute) and energy per token. Where a point
ran two repeats or more, accuracy vs latency and energy per token show the 95% confidence
intervals of the report's rows (``<metric>_ci_low``/``_ci_high``) as error bars
(:func:`ci_errors`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, Unsupported
from .summary import as_float, column_values

if TYPE_CHECKING:
    from .report import Report

PLOT_FILES = (
    "latency_cdf.png",
    "accuracy_vs_latency.png",
    "layer_critical_path.png",
    "energy_per_token.png",
)


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
        xs = np.sort(np.asarray(column_values(g.requests, "total_ms"), dtype=float))
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


def ci_errors(row: Mapping[str, Any], metric: str) -> list[list[float]] | None:
    """``[[below], [above]]`` of ``row[metric]`` to its 95% CI (matplotlib's ``xerr``/``yerr``
    of one point), or None without an interval (one repeat)."""
    v, lo, hi = row.get(metric), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if v is None or lo is None or hi is None:
        return None
    return [[max(0.0, v - lo)], [max(0.0, hi - v)]]


def _plot_acc_lat(rep: Report, path: Path) -> None:
    accuracy_latency_figure(rep).savefig(path, dpi=110)


def accuracy_latency_figure(rep: Report) -> Any:
    """The accuracy-vs-latency figure (one marker per group; error bars of the 95% CIs over
    the repeats where there are two or more)."""
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
        sc = ax.scatter([x], [y], marker=markers[i % len(markers)], s=60, label=lab, zorder=3)
        xerr, yerr = ci_errors(row, "latency_p50_ms"), ci_errors(row, "accuracy")
        if xerr or yerr:
            ax.errorbar(
                [x], [y], xerr=xerr, yerr=yerr, fmt="none", capsize=3, ecolor=sc.get_facecolor()
            )
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
    ax.set_xlabel("p50 request latency (ms)" + _ci_label(rep))
    ax.set_ylabel("accuracy (fraction of requests correct)")
    ax.grid(True, alpha=0.3)
    return fig


def _ci_label(rep: Report) -> str:
    many = any((r.get("n_repeats") or 1) > 1 for r in rep.rows)
    return "; mean over repeats, bars: 95% CI" if many else ""


def layer_split(layers: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, float]]:
    """(layer, mean critical_network_ms, mean critical_compute_ms) per MoE layer, sorted by
    layer; each mean over that layer's rows where the value is known."""
    acc: dict[int, list[list[float]]] = {}
    for r in layers:
        layer = as_float(r.get("layer"))
        if layer is None:
            continue
        net, comp = acc.setdefault(int(layer), [[], []])
        n, c = as_float(r.get("critical_network_ms")), as_float(r.get("critical_compute_ms"))
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
    ci_low: float | None = None  # 95% CI of per_token_j over the repeats (None: one repeat)
    ci_high: float | None = None


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
            if as_float(r.get("energy_j")) is None:
                continue
            tokens += as_float(r.get("output_tokens")) or 0.0
            d, b = as_float(r.get("energy_devices_j")), as_float(r.get("energy_bs_j"))
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
                row.get("energy_per_token_j_ci_low"),
                row.get("energy_per_token_j_ci_high"),
            )
        )
    return out


def _plot_energy(rep: Report, path: Path) -> None:
    energy_figure(rep).savefig(path, dpi=110)


def energy_figure(rep: Report) -> Any:
    """The energy-per-token figure (:func:`energy_bars`; error bars of the 95% CIs over the
    repeats where there are two or more)."""
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
        _energy_errors(ax, xs, shown)
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
    ax.set_ylabel("joules per output token" + _ci_label(rep).replace("; ", "\n"))
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def _energy_errors(ax: Any, xs: Any, shown: Sequence[EnergyBar]) -> None:
    """Error bars (95% CI) on the bars that have an interval."""
    pts = [
        (x, b.per_token_j, b.per_token_j - b.ci_low, b.ci_high - b.per_token_j)
        for x, b in zip(xs, shown)
        if b.per_token_j is not None and b.ci_low is not None and b.ci_high is not None
    ]
    if pts:
        x, y, lo, hi = (list(c) for c in zip(*pts))
        ax.errorbar(x, y, yerr=[lo, hi], fmt="none", ecolor="black", capsize=4, zorder=4)


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
    points = budget_points(rep)
    if points:  # whole-model experts (MoE²) with budgets: accuracy against each budget
        budget_figure(points).savefig(out / BUDGET_PLOT, dpi=110)
        paths.append(out / BUDGET_PLOT)
    return paths


BUDGET_PLOT = "accuracy_vs_budget.png"


@dataclass(frozen=True)
class BudgetPoint:
    """One group of a run with budgets (MoE²): its policy, budgets, accuracy and whether any
    request went over a budget."""

    policy: str
    energy_budget_j: float
    delay_budget_ms: float
    accuracy: float
    violations: int


def budget_points(rep: Report) -> list[BudgetPoint]:
    """The report's groups whose requests carry ``energy_budget_j`` and ``delay_budget_ms``."""
    out = []
    for g in rep.groups:
        rows = [r for r in g.requests if as_float(r.get("energy_budget_j")) is not None]
        if not rows or len(rows) != len(g.requests):
            continue
        e = as_float(rows[0]["energy_budget_j"])
        d = max(as_float(r.get("delay_budget_ms")) or 0.0 for r in rows)
        acc = column_values(rows, "correct")
        out.append(
            BudgetPoint(
                g.policy,
                float(e or 0.0),
                d,
                sum(acc) / len(acc) if acc else 0.0,
                sum(int(as_float(r.get("over_budget")) or 0) for r in rows),
            )
        )
    return out


def budget_figure(points: Sequence[BudgetPoint]) -> Any:
    """Accuracy against the energy budget (at the loosest delay budget) and against the delay
    budget (at the loosest energy budget), one line per policy; a hollow marker where some
    request of that point went over a budget."""
    fig = _figure(figsize=(11, 4.5), layout="constrained")
    loosest_d = max(p.delay_budget_ms for p in points)
    loosest_e = max(p.energy_budget_j for p in points)
    panels = (
        ("energy_budget_j", "energy budget per request (J)", "delay_budget_ms", loosest_d),
        ("delay_budget_ms", "delay budget per request (ms)", "energy_budget_j", loosest_e),
    )
    for i, (axis, xlabel, fixed, at) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for pol in sorted({p.policy for p in points}):
            mine = sorted(
                (p for p in points if p.policy == pol and getattr(p, fixed) == at),
                key=lambda p: getattr(p, axis),
            )
            if not mine:
                continue
            xs = [getattr(p, axis) for p in mine]
            (line,) = ax.plot(xs, [p.accuracy for p in mine], label=pol, marker="o")
            over = [p for p in mine if p.violations]
            ax.scatter(
                [getattr(p, axis) for p in over],
                [p.accuracy for p in over],
                s=90,
                facecolors="white",
                edgecolors=line.get_color(),
                zorder=3,
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + (f" (at {fixed} = {at:g})"))
        ax.set_ylabel("accuracy (fraction of requests correct)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Accuracy against the budgets (hollow: some request went over a budget)")
    return fig
