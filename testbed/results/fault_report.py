"""Faults in ``testbed report``: latency and accuracy during and after each injected fault,
and how the run reacted (failed calls dropped and renormalised, calls re-routed to a replica).

Works from the CSVs alone: ``faults.csv`` says which faults were injected (and cleared), and
each request and call row carries the ids of the faults active while it ran (``faults``).
"During" is every request whose ``faults`` names the fault; "after" is every later request of
the same trial and repeat that ran with no fault at all. ``recovery_requests`` counts the
degraded requests of "after" before the first one served in full (status ``ok``: no call
failed or skipped) — a device marked down by a timeout is skipped until its back-off ends,
whether or not its link is back. ``accuracy_after`` includes such requests (this fault's tail,
and a later fault's, which carries no fault id either); ``accuracy_recovered`` is over the
requests of "after" served in full: whether the model answers as before once every expert is
reachable again (an agent restarted with a wrong shard would not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import schema as R
from .report import Run
from .summary import column_values, mean, percentile

_FAILED = ("timeout", "unreachable", "skipped", "error")


def _key(r: Mapping[str, Any]) -> tuple[str, str]:
    return str(r.get("trial", "")), str(r.get("repeat", ""))


def _num(v: Any) -> float | None:
    return None if v in ("", None) else round(float(v), 4)


def fault_rows(run: Run) -> list[dict[str, Any]]:
    """One row per injected fault of ``run`` (empty when the run had none)."""
    path = run.path / R.FAULTS
    if not path.is_file():
        return []
    injected = [f for f in R.read_csv(path) if f.get("event") == "injected"]
    out = []
    for f in injected:
        fid, k = f["fault"], _key(f)
        reqs = [r for r in run.requests if _key(r) == k]
        during = [r for r in reqs if fid in str(r.get("faults", "")).split()]
        last = max((int(r["request"]) for r in during), default=None)
        after = [
            r
            for r in reqs
            if last is not None
            and int(r["request"]) > last
            and not str(r.get("faults", "")).strip()
        ]
        first_ok = next((i for i, r in enumerate(after) if r.get("status") == "ok"), None)
        recovered = [r for r in after if r.get("status") == "ok"]
        calls = [c for c in run.calls if _key(c) == k and fid in str(c.get("faults", "")).split()]
        failed = sum(c.get("status") in _FAILED for c in calls)
        rerouted = sum(c.get("status") == "rerouted" for c in calls)
        out.append(
            {
                "run": run.run_id,
                "trial": int(f["trial"]),
                "repeat": int(f["repeat"]),
                "policy": f.get("policy", ""),
                "fault": fid,
                "device": f["device"],
                "action": f["action"],
                "applied": f.get("ok") == "1",
                "detail": f.get("detail", ""),
                "requests_during": len(during),
                "requests_after": len(after),
                "latency_p50_during_ms": _num(percentile(column_values(during, "total_ms"), 50)),
                "latency_p50_after_ms": _num(percentile(column_values(after, "total_ms"), 50)),
                "accuracy_during": _num(mean(column_values(during, "correct"))),
                "accuracy_after": _num(mean(column_values(after, "correct"))),
                "recovery_requests": first_ok,
                "accuracy_recovered": _num(mean(column_values(recovered, "correct"))),
                "calls_during": len(calls),
                "calls_failed_during": failed,
                "calls_rerouted_during": rerouted,
                "reaction": (
                    f"{failed} calls failed (their experts dropped, weights renormalised), "
                    f"{rerouted} re-routed to a replica"
                )
                if calls
                else "no calls during it",
            }
        )
    return out


def fault_summary(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """:func:`fault_rows` of every run, in order."""
    return [row for run in runs for row in fault_rows(run)]


def table(rows: Sequence[Mapping[str, Any]]):
    """A rich table of :func:`fault_summary` rows."""
    from rich.table import Table

    t = Table(title="faults: latency and accuracy during and after", title_justify="left")
    for c in (
        "trial",
        "fault",
        "requests\nduring",
        "p50 ms\nduring",
        "p50 ms\nafter",
        "accuracy\nduring",
        "accuracy\nafter",
        "recovery\nrequests",
        "accuracy\nrecovered",
        "calls failed /\nre-routed",
    ):
        t.add_column(c, justify="left" if c in ("fault",) else "right")

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        t.add_row(
            str(r["trial"]),
            r["fault"] + ("" if r["applied"] else " (not applied)"),
            str(r["requests_during"]),
            f(r["latency_p50_during_ms"], ".1f"),
            f(r["latency_p50_after_ms"], ".1f"),
            f(r["accuracy_during"], ".2f"),
            f(r["accuracy_after"], ".2f"),
            f(r["recovery_requests"], "d"),
            f(r["accuracy_recovered"], ".2f"),
            f"{r['calls_failed_during']} / {r['calls_rerouted_during']}",
        )
    return t
