"""Runs with whole-model experts and budgets (MoE²): per policy and point, accuracy against the
budgets it was held to, the measured energy and delay, and how many requests went over
(``requests.csv``'s ``energy_budget_j``, ``delay_budget_ms``, ``over_budget``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .summary import as_float, column_values, percentile


def budget_rows(groups: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per group whose every request carries budgets: ``run``, ``policy``,
    ``energy_budget_j``, ``delay_budget_ms`` (the largest over its categories), ``requests``,
    ``accuracy``, ``energy_per_request_j`` (mean of the devices' joules), ``delay_p50_ms``,
    ``delay_p95_ms`` and ``over_budget`` (requests over a budget, or refused)."""
    out = []
    for g in groups:
        rows = g.requests
        if not rows or any(as_float(r.get("energy_budget_j")) is None for r in rows):
            continue
        acc = column_values(rows, "correct")
        joules = column_values(rows, "energy_devices_j")
        delays = column_values(rows, "total_ms")
        out.append(
            {
                "run": g.run.run_id,
                "policy": g.policy,
                "energy_budget_j": as_float(rows[0]["energy_budget_j"]),
                "delay_budget_ms": max(as_float(r.get("delay_budget_ms")) or 0.0 for r in rows),
                "requests": len(rows),
                "accuracy": sum(acc) / len(acc) if acc else None,
                "energy_per_request_j": sum(joules) / len(joules) if joules else None,
                "delay_p50_ms": percentile(delays, 50) if delays else None,
                "delay_p95_ms": percentile(delays, 95) if delays else None,
                "over_budget": sum(int(as_float(r.get("over_budget")) or 0) for r in rows),
            }
        )
    return out


def table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A rich table of :func:`budget_rows`."""
    from rich.table import Table

    t = Table(title="budgets: accuracy, energy and delay per request", title_justify="left")
    for c in (
        "policy",
        "energy\nbudget J",
        "delay\nbudget ms",
        "accuracy",
        "energy/req\nmJ",
        "delay p50\nms",
        "delay p95\nms",
        "over budget",
    ):
        t.add_column(c, justify="left" if c == "policy" else "right")

    def f(v: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v * scale, spec)

    for r in rows:
        t.add_row(
            r["policy"],
            f(r["energy_budget_j"], "g"),
            f(r["delay_budget_ms"], "g"),
            f(r["accuracy"], ".3f"),
            f(r["energy_per_request_j"], ".2f", 1e3),
            f(r["delay_p50_ms"], ".1f"),
            f(r["delay_p95_ms"], ".1f"),
            f"{r['over_budget']}/{r['requests']}",
        )
    return t
