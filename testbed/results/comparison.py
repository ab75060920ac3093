"""Each policy against a baseline (``topk``) at equal link budget, and how well a policy's
latency model predicted the layers it decided (pure; from the report's groups).

* Equal link budget = the same run and sweep point but for ``policy.name``: the same link rate,
  or the same cell bandwidth under the same channel (``links.bandwidth_mhz``). The point is
  matched by its sweep values other than ``policy.name``, however the policy is spelled
  (:func:`baseline_key`); :func:`missing_baseline` names the points that have no baseline.
* Per-token latency of a request = ``total_ms / output_tokens``; a group's figure is the mean
  over its requests. ``latency_change_pct`` = 100 x (policy - baseline) / baseline (negative:
  faster); ``accuracy_change`` = policy accuracy - baseline accuracy.
* Prediction ratio = ``predicted_ms / moe_ms`` per layer row that has both; median, p10 and
  p90 over the rows. ``predicted_ms`` is the calibrated latency model's
  (:func:`testbed.policy.latency_model.predict_layer_ms`, every policy) and predicts exactly what
  ``moe_ms`` measures: the layer's expert exchange at the BS (``run_layer``, first request
  out to last reply handled). The policy's decision and an epoch's rate change run in-line
  before it (in ``bs_ms``, not in ``moe_ms``); :func:`prediction_rows` also compares
  ``predicted_critical_ms`` with ``decision_ms + change_ms + moe_ms`` (the layer's critical
  path from the decision on), and a policy's own model (``policy_predicted_ms``, e.g.
  WDMoE's paper formula) with ``moe_ms``.
* Repeats (``recipe.repeats``): ``per_token_ms`` and ``accuracy`` are means over the repeats of
  each repeat's figure, with 95% Student-t intervals (``*_ci_low``/``*_ci_high``; ``None`` with
  one repeat). The changes against the baseline are **paired** by repeat index (same seed:
  the same channel and workload draws) when the policy and the baseline ran the same repeats,
  two or more: the mean over repeats of each repeat's change, and the t interval of those
  changes. Otherwise they are **unpaired**: the change of the means, its interval by Welch
  (relative change: by the delta method). ``ci_method`` says which (``None``: no interval).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .report import CI_NOTE, POLICY_KEY, ci_cell, point_label, repeat_groups, short_policy
from .summary import as_float, difference_ci, mean_ci


def per_token_ms(requests: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean over requests of ``total_ms / output_tokens`` (requests lacking either skipped)."""
    xs = []
    for r in requests:
        t, n = as_float(r.get("total_ms")), as_float(r.get("output_tokens"))
        if t is not None and n:
            xs.append(t / n)
    return float(np.mean(xs)) if xs else None


def accuracy(requests: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean ``correct`` (0..1) over the request rows that have it; ``None`` when none does."""
    xs = [x for x in (as_float(r.get("correct")) for r in requests) if x is not None]
    return float(np.mean(xs)) if xs else None


def prediction_ratio(
    layers: Iterable[Mapping[str, Any]],
    predicted: str = "predicted_ms",
    measured: Sequence[str] = ("moe_ms",),
) -> dict[str, Any] | None:
    """``predicted / sum(measured)`` over the layer rows with all of them: n, median, p10,
    p90 (default ``predicted_ms / moe_ms``)."""
    xs = []
    for r in layers:
        p = as_float(r.get(predicted))
        ms = [as_float(r.get(k)) for k in measured]
        if p is not None and all(m is not None for m in ms) and sum(ms):  # type: ignore[arg-type]
            xs.append(p / sum(ms))  # type: ignore[arg-type]
    if not xs:
        return None
    a = np.asarray(xs)
    return {
        "n": len(xs),
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
    }


def prediction_rows(groups: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per group (a :class:`testbed.results.report.Group`, every policy, the baseline too)
    with layer rows: ``exchange`` = ``predicted_ms / moe_ms``, ``critical`` =
    ``predicted_critical_ms / (decision_ms + change_ms + moe_ms)`` and ``policy_model`` =
    ``policy_predicted_ms / moe_ms`` (``None`` where the rows lack them)."""
    out = []
    for g in groups:
        ex = prediction_ratio(g.layers)
        if ex is None:
            continue
        out.append(
            {
                "run": g.run.run_id,
                "policy": g.policy,
                "point": point_label({"policy": g.policy, "point": g.point}),
                "exchange": ex,
                "critical": prediction_ratio(
                    g.layers, "predicted_critical_ms", ("decision_ms", "change_ms", "moe_ms")
                ),
                "policy_model": prediction_ratio(g.layers, "policy_predicted_ms"),
            }
        )
    return out


def prediction_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """:func:`prediction_rows` as a rich Table."""
    from rich import box
    from rich.table import Table

    def f(pr: Mapping[str, Any] | None) -> str:
        return f"{pr['median']:.2f} [{pr['p10']:.2f}-{pr['p90']:.2f}] n={pr['n']}" if pr else "-"

    t = Table(
        title="latency model: predicted / measured per layer, median [p10-p90]", box=box.SIMPLE_HEAD
    )
    for h in (
        "policy",
        "point",
        "exchange\n(predicted_ms / moe_ms)",
        "critical path\n(+ decision, rate change)",
        "policy's own model\n(/ moe_ms)",
    ):
        t.add_column(h, justify="left" if h in ("policy", "point") else "right")
    for r in rows:
        t.add_row(r["policy"], r["point"], f(r["exchange"]), f(r["critical"]), f(r["policy_model"]))
    return t


#: :func:`time_shares`' parts, in the order they are shown
SHARES = ("airtime", "device", "call", "exchange_rest", "decision", "rate_change", "bs_model")


def time_shares(layers: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Where the layers' time goes, from the calibrated model's terms for each layer's slowest
    device (``predicted_air_ms``, ``predicted_device_ms``, ``predicted_call_ms``) and the
    measured rest, summed over the rows that have them, as shares of ``sum(bs_ms + moe_ms)``
    (the time a forward step spends in its MoE layers):

    * ``airtime``: the slowest device's airtime, down + up (model);
    * ``device``: its device time, compute and the agent's per-call cost (model);
    * ``call``: its fixed per-call cost besides both: zmq, TCP, Python, CURVE (model);
    * ``exchange_rest``: ``moe_ms`` less those three -- the BS's own time in the exchange,
      the other calls' overlap, and what the model missed (measured - model);
    * ``decision``, ``rate_change``: ``decision_ms``, ``change_ms`` (measured, in ``bs_ms``);
    * ``bs_model``: the rest of ``bs_ms``: attention, router, norms at the BS (measured).

    Returns ``{"n", "layer_ms"`` (the mean of ``bs_ms + moe_ms``), each share``}``, or
    ``None`` without such rows."""
    tot = dict.fromkeys(SHARES, 0.0)
    whole, n = 0.0, 0
    for r in layers:
        v = {
            k: as_float(r.get(k))
            for k in (
                "bs_ms",
                "moe_ms",
                "predicted_air_ms",
                "predicted_device_ms",
                "predicted_call_ms",
            )
        }
        if any(x is None for x in v.values()):
            continue
        dec, chg = as_float(r.get("decision_ms")) or 0.0, as_float(r.get("change_ms")) or 0.0
        model = v["predicted_air_ms"] + v["predicted_device_ms"] + v["predicted_call_ms"]
        tot["airtime"] += v["predicted_air_ms"]
        tot["device"] += v["predicted_device_ms"]
        tot["call"] += v["predicted_call_ms"]
        tot["exchange_rest"] += v["moe_ms"] - model
        tot["decision"] += dec
        tot["rate_change"] += chg
        tot["bs_model"] += v["bs_ms"] - dec - chg
        whole += v["bs_ms"] + v["moe_ms"]
        n += 1
    if not n or whole <= 0:
        return None
    return {"n": n, "layer_ms": whole / n, **{k: x / whole for k, x in tot.items()}}


def shares_rows(groups: Sequence[Any]) -> list[dict[str, Any]]:
    """:func:`time_shares` per group (a :class:`testbed.results.report.Group`) that has the
    terms."""
    out = []
    for g in groups:
        sh = time_shares(g.layers)
        if sh is not None:
            out.append(
                {
                    "run": g.run.run_id,
                    "policy": g.policy,
                    "point": point_label({"policy": g.policy, "point": g.point}),
                    **sh,
                }
            )
    return out


def shares_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """:func:`shares_rows` as a rich Table."""
    from rich import box
    from rich.table import Table

    t = Table(
        title="where a MoE layer's time goes (bs_ms + moe_ms): the model's terms for the "
        "slowest device, the rest measured",
        box=box.SIMPLE_HEAD,
    )
    heads = {
        "airtime": "airtime",
        "device": "device\ncompute",
        "call": "call\nfixed",
        "exchange_rest": "exchange\nrest",
        "decision": "decision",
        "rate_change": "rate\nchange",
        "bs_model": "BS\nmodel",
    }
    for h in ("policy", "point", "ms/layer", *heads.values()):
        t.add_column(h, justify="left" if h in ("policy", "point") else "right")
    for r in rows:
        t.add_row(
            r["policy"], r["point"], f"{r['layer_ms']:.2f}", *(f"{100 * r[k]:.0f}%" for k in heads)
        )
    return t


def baseline_key(g: Any) -> tuple[str, tuple[str, ...]]:
    """What a group (a :class:`testbed.results.report.Group`) shares with its baseline: its run
    and its sweep values but the policy's, however the policy was spelled (entry-point name,
    ``pkg.mod:Class``, ``path/file.py:Class``). The values come from the rows' ``sweep.<key>``
    columns; rows without them (older folders) give the ``point`` words. Repeats are in one
    group either way, for the policy as for the baseline."""
    row = next(iter(g.requests or g.layers or g.calls), None) or {}
    sweep = [f"{k[6:]}={v}" for k, v in row.items() if k.startswith("sweep.") and v is not None]
    words = sweep or str(g.point).split()
    return g.run.run_id, tuple(w for w in words if not w.startswith(f"{POLICY_KEY}="))


def missing_baseline(groups: Sequence[Any], baseline: str = "topk") -> list[str]:
    """One line per (run, point) whose policies have no ``baseline`` group to compare with
    (their "vs baseline" cells stay empty), naming the run, the point and the policies; not
    for groups with budgets (MoE² runs compare against their own baselines)."""
    have = {baseline_key(g) for g in groups if g.policy == baseline}
    lacking: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for g in groups:
        k = baseline_key(g)
        budgeted = any(r.get("energy_budget_j") not in (None, "") for r in g.requests[:1])
        if g.policy != baseline and k not in have and not budgeted:
            tag = f"{POLICY_KEY}="
            spec = [w[len(tag) :] for w in g.point.split() if w.startswith(tag)]
            lacking.setdefault(k, []).append(short_policy(spec[0]) if spec else g.policy)
    return [
        f"warning: report: run {run}: no {baseline} at point {' '.join(words) or '-'} to compare "
        f"{', '.join(dict.fromkeys(pols))} with: its 'vs {baseline}' cells are empty"
        for (run, words), pols in lacking.items()
    ]


def _per_repeat(g: Any, fn: Any) -> dict[str, float]:
    """``fn(requests)`` of each repeat of group ``g`` that has a value, by repeat."""
    out = {}
    for k, sub in repeat_groups(g).items():
        v = fn(sub.requests)
        if v is not None:
            out[k] = v
    return out


def change_ci(
    xs: Mapping[str, float], ys: Mapping[str, float], relative: bool
) -> tuple[float | None, float | None, float | None, str | None]:
    """(change, low, high, method) of the policy's per-repeat values ``xs`` against the
    baseline's ``ys`` (by repeat): ``100 (x - y) / y`` with ``relative``, else ``x - y``.
    ``paired`` when both have the same two or more repeats (mean and t interval of the
    per-repeat changes), else ``unpaired`` (:func:`~testbed.results.summary.difference_ci`);
    the method is ``None`` when there is no interval."""
    if len(xs) >= 2 and xs.keys() == ys.keys() and (not relative or all(ys.values())):
        d = [100.0 * (xs[k] - ys[k]) / ys[k] if relative else xs[k] - ys[k] for k in xs]
        mu, lo, hi = mean_ci(d)
        return mu, lo, hi, "paired"
    mu, lo, hi = difference_ci(list(xs.values()), list(ys.values()), relative)
    return mu, lo, hi, None if lo is None else "unpaired"


def _versus_row(g: Any, b: Any) -> dict[str, Any]:
    lat, acc = _per_repeat(g, per_token_ms), _per_repeat(g, accuracy)
    b_lat = _per_repeat(b, per_token_ms) if b else {}
    b_acc = _per_repeat(b, accuracy) if b else {}
    m_lat, m_blat, m_acc, m_bacc = (mean_ci(list(v.values())) for v in (lat, b_lat, acc, b_acc))
    d_lat = change_ci(lat, b_lat, True) if lat and b_lat else (None,) * 4
    d_acc = change_ci(acc, b_acc, False) if acc and b_acc else (None,) * 4
    return {
        "run": g.run.run_id,
        "policy": g.policy,
        "point": point_label({"policy": g.policy, "point": g.point}),
        "per_token_ms": m_lat[0],
        "baseline_per_token_ms": m_blat[0],
        "latency_change_pct": d_lat[0],
        "accuracy": m_acc[0],
        "baseline_accuracy": m_bacc[0],
        "accuracy_change": d_acc[0],
        "prediction_ratio": prediction_ratio(g.layers),
        "n_repeats": len(repeat_groups(g)),
        "baseline_n_repeats": len(repeat_groups(b)) if b else 0,
        "per_token_ms_ci_low": m_lat[1],
        "per_token_ms_ci_high": m_lat[2],
        "baseline_per_token_ms_ci_low": m_blat[1],
        "baseline_per_token_ms_ci_high": m_blat[2],
        "latency_change_pct_ci_low": d_lat[1],
        "latency_change_pct_ci_high": d_lat[2],
        "accuracy_ci_low": m_acc[1],
        "accuracy_ci_high": m_acc[2],
        "accuracy_change_ci_low": d_acc[1],
        "accuracy_change_ci_high": d_acc[2],
        "ci_method": d_lat[3] or d_acc[3],
    }


def versus_baseline(groups: Sequence[Any], baseline: str = "topk") -> list[dict[str, Any]]:
    """One row per group (a :class:`testbed.results.report.Group`) that is not the baseline: its
    latency and accuracy against the baseline's group of the same run and point
    (:func:`baseline_key`; ``None`` where the run has no such group), and its prediction ratio
    (``None`` without predictions). ``point`` is :func:`~testbed.results.report.point_label`'s.
    Means over repeats with 95% intervals, the changes paired by repeat where they can be (see
    the module; :func:`change_ci`); ``n_repeats``, ``baseline_n_repeats``, ``ci_method``."""
    base = {baseline_key(g): g for g in groups if g.policy == baseline}
    return [_versus_row(g, base.get(baseline_key(g))) for g in groups if g.policy != baseline]


def table(rows: Sequence[Mapping[str, Any]], baseline: str = "topk") -> Any:
    """The rows as a rich Table: ``mean ±half-width`` of the 95% CI (:func:`ci_cell`), the
    repeats as ``n`` (``n/m`` when the baseline ran ``m``), and a footer that says how the
    changes' intervals were computed."""
    from rich import box
    from rich.table import Table

    t = Table(
        title=f"each policy against {baseline} at equal link budget (same run and point)",
        box=box.SIMPLE_HEAD,
    )
    for h in (
        "policy",
        "point",
        "n",
        f"ms/token\n(vs {baseline})",
        "latency\nchange",
        "accuracy\nchange",
        "predicted/measured\nmedian [p10-p90]",
    ):
        t.add_column(h, justify="left" if h in ("policy", "point") else "right")

    def c(r: Mapping[str, Any], k: str, spec: str, unit: str = "") -> str:
        return ci_cell(r[k], r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high"), spec, unit)

    for r in rows:
        pr = r["prediction_ratio"]
        n, nb = r.get("n_repeats", 1), r.get("baseline_n_repeats", 1)
        t.add_row(
            r["policy"],
            r["point"],
            str(n) if n == nb else f"{n}/{nb}",
            f"{c(r, 'per_token_ms', '.2f')} ({c(r, 'baseline_per_token_ms', '.2f')})",
            c(r, "latency_change_pct", "+.1f", "%"),
            c(r, "accuracy_change", "+.3f"),
            f"{pr['median']:.2f} [{pr['p10']:.2f}-{pr['p90']:.2f}] n={pr['n']}" if pr else "-",
        )
    methods = sorted({r["ci_method"] for r in rows if r.get("ci_method")})
    how = {
        "paired": "paired by repeat (same seed)",
        "unpaired": "unpaired (different repeats: Welch)",
    }
    t.caption = CI_NOTE + (f"; changes {' / '.join(how[m] for m in methods)}" if methods else "")
    return t
