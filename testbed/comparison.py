"""Each policy against a baseline (``topk``) at equal link budget, and how well a policy's
latency model predicted the layers it decided (pure; from the report's groups).

* Equal link budget = the same run and sweep point but for ``policy.name``: the same link rate,
  or the same cell bandwidth under the same channel (``links.bandwidth_mhz``).
* Per-token latency of a request = ``total_ms / output_tokens``; a group's figure is the mean
  over its requests. ``latency_change_pct`` = 100 x (policy - baseline) / baseline (negative:
  faster); ``accuracy_change`` = policy accuracy - baseline accuracy.
* Prediction ratio = ``predicted_ms / moe_ms`` per layer row that has both (``moe_ms``: the
  layer's expert exchange measured at the BS); median, p10 and p90 over the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .report import _f, _point_label


def per_token_ms(requests: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean over requests of ``total_ms / output_tokens`` (requests lacking either skipped)."""
    xs = []
    for r in requests:
        t, n = _f(r.get("total_ms")), _f(r.get("output_tokens"))
        if t is not None and n:
            xs.append(t / n)
    return float(np.mean(xs)) if xs else None


def accuracy(requests: Iterable[Mapping[str, Any]]) -> float | None:
    xs = [x for x in (_f(r.get("correct")) for r in requests) if x is not None]
    return float(np.mean(xs)) if xs else None


def prediction_ratio(layers: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``predicted_ms / moe_ms`` over the layer rows with both: n, median, p10, p90."""
    xs = []
    for r in layers:
        p, m = _f(r.get("predicted_ms")), _f(r.get("moe_ms"))
        if p is not None and m:
            xs.append(p / m)
    if not xs:
        return None
    a = np.asarray(xs)
    return {"n": len(xs), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90))}


def versus_baseline(groups: Sequence[Any], baseline: str = "topk") -> list[dict[str, Any]]:
    """One row per group (a :class:`testbed.report.Group`) that is not the baseline: its
    latency and accuracy against the baseline's group of the same run and point (``None``
    where the run has no such group), and its prediction ratio (``None`` without
    predictions)."""
    def key(g: Any) -> tuple[str, str]:
        return g.run.run_id, _point_label({"policy": g.policy, "point": g.point})

    base = {key(g): g for g in groups if g.policy == baseline}
    out = []
    for g in groups:
        if g.policy == baseline:
            continue
        b = base.get(key(g))
        lat, acc = per_token_ms(g.requests), accuracy(g.requests)
        b_lat = per_token_ms(b.requests) if b else None
        b_acc = accuracy(b.requests) if b else None
        out.append({
            "run": g.run.run_id, "policy": g.policy, "point": key(g)[1],
            "per_token_ms": lat, "baseline_per_token_ms": b_lat,
            "latency_change_pct": 100.0 * (lat - b_lat) / b_lat if lat is not None and b_lat
            else None,
            "accuracy": acc, "baseline_accuracy": b_acc,
            "accuracy_change": acc - b_acc if acc is not None and b_acc is not None else None,
            "prediction_ratio": prediction_ratio(g.layers),
        })
    return out


def table(rows: Sequence[Mapping[str, Any]], baseline: str = "topk") -> Any:
    """The rows as a rich Table."""
    from rich import box
    from rich.table import Table

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    t = Table(title=f"each policy against {baseline} at equal link budget (same run and point)",
              box=box.SIMPLE_HEAD)
    for h in ("policy", "point", f"ms/token\n(vs {baseline})", "latency\nchange",
              "accuracy\nchange", "predicted/measured\nmedian [p10-p90]"):
        t.add_column(h, justify="left" if h in ("policy", "point") else "right")
    for r in rows:
        pr = r["prediction_ratio"]
        t.add_row(r["policy"], r["point"],
                  f"{f(r['per_token_ms'], '.2f')} ({f(r['baseline_per_token_ms'], '.2f')})",
                  f(r["latency_change_pct"], "+.1f") + ("%" if r["latency_change_pct"] is not None
                                                         else ""),
                  f(r["accuracy_change"], "+.3f"),
                  f"{pr['median']:.2f} [{pr['p10']:.2f}-{pr['p90']:.2f}] n={pr['n']}" if pr
                  else "-")
    return t
