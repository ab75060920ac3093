"""The numbers of one trial: :func:`summary_row` (the metric columns of ``summary.csv``) and
the helpers every summary of rows uses (:func:`as_float`, :func:`column_values`,
:func:`percentile`, :func:`mean`, :func:`ratio`), and the spread over repeats
(:func:`t_quantile`, :func:`mean_ci`, :func:`difference_ci`).

Confidence intervals are 95%, Student t on the repeat values (n - 1 degrees of freedom):
``mean ± t(0.975, n-1) · s / sqrt(n)`` with ``s`` the sample standard deviation (ddof 1). The
t quantile is :data:`T_975` for df 1..30 and the Cornish-Fisher expansion beyond (a
fractional df, e.g. Welch's, is rounded down, which widens the interval a little). One value:
no interval.

Conventions: percentiles are numpy's default (linear interpolation between the closest ranks,
``numpy.percentile(..., method="linear")``); empty cells and non-numbers are "not known" and
left out of every sum, mean and percentile; a metric with nothing to compute it from is ``''``
(an empty CSV cell).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import schema as R

METRIC_COLUMNS = R.SUMMARY_COLUMNS[len(R.KEY_COLUMNS) : -len(R.SUMMARY_BUDGET_COLUMNS)]
"""The columns :func:`summary_row` fills: ``SUMMARY_COLUMNS`` after the keys, but the budget
columns of runs with whole-model experts (:data:`~testbed.results.schema.SUMMARY_BUDGET_COLUMNS`,
filled by :class:`testbed.run.edge_trial.EdgeTrialRun`)."""

CALL_OK = ("ok", "rerouted")
"""Call statuses that are not failures; every other status (timeout, error, unreachable,
skipped, ...) counts in ``calls_failed``."""


def as_float(v: Any) -> float | None:
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


def column_values(rows: Iterable[Mapping[str, Any]], col: str) -> list[float]:
    """The known numbers of column ``col`` (see :func:`as_float`), in row order."""
    out = []
    for r in rows:
        x = as_float(r.get(col))
        if x is not None:
            out.append(x)
    return out


def percentile(xs: Sequence[float], q: float) -> float | str:
    """numpy's linear-interpolation percentile ``q`` of ``xs``; ``''`` when there is none."""
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else ""


def mean(xs: Sequence[float]) -> float | str:
    """The mean of ``xs`` (an exact sum); ``''`` when there is none."""
    return math.fsum(xs) / len(xs) if xs else ""


def ratio(num: float, den: float) -> float | str:
    """``num / den``; ``''`` unless ``den > 0``."""
    return num / den if den > 0 else ""


T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
"""Student t's 0.975 quantile for 1..30 degrees of freedom (``T_975[df - 1]``)."""


def t_quantile(df: float) -> float:
    """Student t's 0.975 quantile for ``df`` degrees of freedom (two-sided 95%) at
    ``floor(df)`` (never narrower): :data:`T_975` up to 30, past it the Cornish-Fisher
    expansion around the normal's 1.96 (within 1e-4 of the exact value there)."""
    k = max(1, int(df))
    if k <= len(T_975):
        return T_975[k - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * k)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * k**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * k**3)
    )


def mean_ci(xs: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of ``xs``: the 95% Student-t interval of the mean (see the module);
    low and high are None with fewer than two values, all three with none."""
    if not xs:
        return None, None, None
    m = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return m, None, None
    half = t_quantile(len(xs) - 1) * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))
    return m, m - half, m + half


def difference_ci(
    xs: Sequence[float], ys: Sequence[float], relative: bool = False
) -> tuple[float | None, float | None, float | None]:
    """Unpaired (mean, low, high) of ``mean(xs) - mean(ys)`` (Welch: the variances apart,
    Welch-Satterthwaite's degrees of freedom), or with ``relative`` of
    ``100 * (mean(xs) - mean(ys)) / mean(ys)`` in percent (delta method: the relative
    variance of the ratio of the means). No interval unless both have two values or more; nothing
    without values (or, relative, with a zero ``mean(ys)``)."""
    if not xs or not ys:
        return None, None, None
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    if relative and my == 0:
        return None, None, None
    center = 100.0 * (mx - my) / my if relative else mx - my
    if len(xs) < 2 or len(ys) < 2:
        return center, None, None
    vx = float(np.var(xs, ddof=1)) / len(xs)
    vy = float(np.var(ys, ddof=1)) / len(ys)
    if relative:  # var(mx / my) ~ vx / my² + mx² vy / my⁴, in percent
        vx, vy = 1e4 * vx / my**2, 1e4 * mx**2 * vy / my**4
    if vx + vy == 0:
        return center, center, center
    df = (vx + vy) ** 2 / (vx**2 / (len(xs) - 1) + vy**2 / (len(ys) - 1))
    half = t_quantile(df) * math.sqrt(vx + vy)
    return center, center - half, center + half


def critical_sums(layers: Iterable[Mapping[str, Any]]) -> tuple[float, float, bool]:
    """(critical path ms, its network part ms, whether any layer had both), summed over the
    layer rows that have both."""
    net = path = 0.0
    seen = False
    for lr in layers:
        p, n = as_float(lr.get("critical_path_ms")), as_float(lr.get("critical_network_ms"))
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
      plus BS's joules (``energy_devices_j + energy_bs_j``, see
      :mod:`testbed.dataplane.energy_attr`).
    * ``bytes_per_token`` = sum (``bytes_down`` + ``bytes_up``) / sum ``output_tokens``.
    * ``network_share`` = sum ``critical_network_ms`` / sum ``critical_path_ms`` over the layer
      rows that have both.
    * ``calls`` = call rows; ``calls_failed`` = status not ok/rerouted; ``calls_rerouted``.
    """
    total = column_values(requests, "total_ms")
    out_tokens = 0.0
    bytes_sum = 0.0
    e_sum = e_tokens = 0.0
    e_known = False
    ok = 0
    for r in requests:
        tok = as_float(r.get("output_tokens")) or 0.0
        out_tokens += tok
        bytes_sum += (as_float(r.get("bytes_down")) or 0.0) + (as_float(r.get("bytes_up")) or 0.0)
        e = as_float(r.get("energy_j"))
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
        "latency_p50_ms": percentile(total, 50),
        "latency_p95_ms": percentile(total, 95),
        "ttft_p50_ms": percentile(column_values(requests, "ttft_ms"), 50),
        "tpot_p50_ms": percentile(column_values(requests, "tpot_ms"), 50),
        "accuracy": mean(column_values(requests, "correct")),
        "score": mean(column_values(requests, "score")),
        "energy_per_token_j": ratio(e_sum, e_tokens) if e_known else "",
        "bytes_per_token": ratio(bytes_sum, out_tokens),
        "network_share": ratio(net, path),
        "calls": len(calls),
        "calls_failed": failed,
        "calls_rerouted": rerouted,
    }
