"""Deployment in ``testbed report``: per trial the memory each device held (the agents' own
count of weight bytes, at the end of the trial, against the budget), bytes per token (as in
``summary.csv``),
latency and accuracy, signalling bytes of the status feed, and the re-deployments
(``migrations.csv``): moves, bytes pushed, seconds, and the latency p50 of the requests before
the link event / update and after it.

Works from a results folder alone (manifest ``trials[*].memory``/``signalling``/``events``,
``requests.csv``, ``migrations.csv``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import schema as R
from .report import Run
from .summary import column_values, percentile

MB = 1 << 20


def deployment_rows(run: Run) -> list[dict[str, Any]]:
    """One row per trial and repeat of ``run`` that recorded its memory (empty otherwise)."""
    migs = R.read_csv(run.path / R.MIGRATIONS)
    summ = {(r.get("trial"), r.get("repeat")): r for r in R.read_csv(run.path / R.SUMMARY)}
    budget = (run.manifest.get("recipe") or {}).get("run", {}).get("memory_budget_mb")
    out = []
    for t in run.manifest.get("trials") or []:
        mem = t.get("memory")
        if not mem:
            continue
        k = (str(t.get("trial")), str(t.get("repeat")))
        reqs = [r for r in run.requests if (r.get("trial"), r.get("repeat")) == k]
        mine = [m for m in migs if (m.get("trial"), m.get("repeat")) == k]
        split = min(
            [int(e["request"]) for e in t.get("events") or []] + [int(m["request"]) for m in mine],
            default=None,
        )
        before = [r for r in reqs if split is not None and int(r["request"]) < split]
        after = [r for r in reqs if split is not None and int(r["request"]) >= split]
        acc = column_values(reqs, "correct")
        out.append(
            {
                "trial": t.get("trial"),
                "repeat": t.get("repeat"),
                "policy": (t.get("policy") or {}).get("name", ""),
                "memory_kb": {
                    d: round(int(v.get("weight_bytes") or 0) / 1024, 1)
                    for d, v in sorted(mem.items())
                },
                "quant": {d: v.get("quant") for d, v in sorted(mem.items())},
                "budget_kb": round(float(budget) * MB / 1024, 1) if budget else None,
                "bytes_per_token": R.num((summ.get(k) or {}).get("bytes_per_token")),
                "latency_p50_ms": _num(percentile(column_values(reqs, "total_ms"), 50)),
                "accuracy": sum(acc) / len(acc) if acc else None,
                "signalling_bytes": sum(
                    int(v.get("bytes") or 0) for v in (t.get("signalling") or {}).values()
                ),
                "split_request": split,
                "latency_p50_before_ms": _num(percentile(column_values(before, "total_ms"), 50)),
                "latency_p50_after_ms": _num(percentile(column_values(after, "total_ms"), 50)),
                "migrations": len(mine),
                "migration_bytes": sum(int(m.get("bytes") or 0) for m in mine),
                "migration_s": sum(
                    {m["request"]: float(m.get("seconds") or 0) for m in mine}.values()
                ),
            }
        )
    return out


def _num(v: Any) -> float | None:
    return None if v in ("", None) or isinstance(v, str) else round(float(v), 2)


def deployment_summary(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """:func:`deployment_rows` of every run, concatenated in the order given."""
    return [r for run in runs for r in deployment_rows(run)]


def table(rows: Sequence[Mapping[str, Any]]):
    """A rich table of :func:`deployment_summary` rows."""
    from rich.table import Table

    t = Table(title="deployment: memory, traffic, re-deployment", title_justify="left")
    for c in (
        "trial",
        "policy",
        "memory KB per device\n(budget)",
        "bytes /\ntoken",
        "p50 ms",
        "accuracy",
        "signalling\nbytes",
        "p50 ms before /\nafter (request)",
        "migrations:\nmoves, bytes, s",
    ):
        t.add_column(c, justify="left" if c in ("policy",) else "right")

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        mem = " ".join(f"{d}={v:g}" for d, v in r["memory_kb"].items())
        t.add_row(
            str(r["trial"]),
            r["policy"],
            mem + (f" ({r['budget_kb']:g})" if r["budget_kb"] else ""),
            f(r["bytes_per_token"], ".0f"),
            f(r["latency_p50_ms"], ".1f"),
            f(r["accuracy"], ".3f"),
            str(r["signalling_bytes"]),
            f"{f(r['latency_p50_before_ms'], '.1f')} / {f(r['latency_p50_after_ms'], '.1f')}"
            f" ({r['split_request'] if r['split_request'] is not None else '-'})",
            f"{r['migrations']}, {r['migration_bytes']}, {r['migration_s']:.2f}",
        )
    return t
