"""The numbers of one trial: :func:`summary_row` (the metric columns of ``summary.csv``) and
the helpers every summary of rows uses (:func:`as_float`, :func:`column_values`,
:func:`percentile`, :func:`mean`, :func:`ratio`).

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

METRIC_COLUMNS = R.SUMMARY_COLUMNS[len(R.KEY_COLUMNS) :]
"""The columns :func:`summary_row` fills: everything in ``SUMMARY_COLUMNS`` after the keys."""

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
