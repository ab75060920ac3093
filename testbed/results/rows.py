"""The rows of ``layers.csv``, ``calls.csv`` and ``requests.csv`` from one request's records.

A run (:mod:`testbed.run.trial`) and the analytic twin (:mod:`testbed.run.twin`) both build
their rows here, from the BS runtime's per-layer records (``models.runtime``'s
``LayerRecord``: ``step``, ``phase``, ``layer``, ``token_valid``, ``expert_ids``, ``failed``,
``rows_per_uid`` and ``info`` with the backend's ``calls`` and the timing backend's stamps).
Pure: nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .summary import critical_sums

#: layers.csv's columns with the predicted slowest device's terms (:func:`critical_terms`)
TERM_COLUMNS = ("predicted_air_ms", "predicted_device_ms", "predicted_call_ms")

#: call statuses that count as failed calls
_FAIL = ("timeout", "unreachable", "skipped", "error")


class RequestLike(Protocol):
    """What :func:`request_row` reads of a request (``testbed.run.workload.Request``)."""

    task: str
    prompt: tuple[int, ...]


def critical_terms(terms: Mapping[str, Any]) -> dict[str, float | None]:
    """The terms of the device with the largest predicted round trip (``terms`` as
    :func:`testbed.policy.latency_model.layer_terms` gives them): its airtime both ways, its device
    time and its fixed per-call cost; ``None`` each when no device is called."""
    tot = terms.get("total") if terms else None
    if tot is None or not len(tot) or not max(tot):
        return dict.fromkeys(TERM_COLUMNS)
    k = max(range(len(tot)), key=lambda i: tot[i])
    return {
        "predicted_air_ms": float(terms["air_down"][k] + terms["air_up"][k]),
        "predicted_device_ms": float(terms["device"][k]),
        "predicted_call_ms": float(terms["call"][k]),
    }


def call_status(c: Mapping[str, Any], primary: str | None) -> tuple[str, str]:
    """(status, detail) of a call for ``calls.csv``: ``rerouted`` when it was answered by
    another device than the expert's ``primary``, ``error`` with the reason for any error."""
    st = str(c.get("status", ""))
    if st == "ok":
        return ("rerouted" if primary is not None and c.get("device") != primary else "ok"), ""
    if st.startswith("error"):
        return "error", f"{st} {c.get('reason', '')}".strip()
    return st, str(c.get("reason", ""))


def new_totals() -> dict[str, int]:
    """A request's running totals, as :func:`rows_for_request` returns them."""
    return {
        "bytes_down": 0,
        "bytes_up": 0,
        "calls": 0,
        "calls_failed": 0,
        "calls_rerouted": 0,
        "expert_slots": 0,
        "token_layers": 0,
        "failed_experts": 0,
    }


def call_row(
    key: Mapping[str, Any], r: Any, c: Mapping[str, Any], status: str, detail: str
) -> dict[str, Any]:
    """The ``calls.csv`` row of call ``c`` of layer record ``r``."""
    return {
        **key,
        "step": r.step,
        "layer": r.layer,
        "expert": c["uid"],
        "device": c.get("device", ""),
        "attempt": c.get("attempt", 0),
        "tokens": c.get("tokens"),
        "status": status,
        "detail": detail,
        "serialize_ms": c.get("serialize_ms"),
        "network_ms": c.get("network_ms"),
        "queue_ms": c.get("queue_ms"),
        "compute_ms": c.get("compute_ms"),
        "rtt_ms": c.get("rtt_ms"),
        "bytes_down": int(c.get("bytes_out") or 0),
        "bytes_up": int(c.get("bytes_in") or 0),
        "energy_j": c.get("energy_j"),
        "energy_source": c.get("energy_source"),
    }


def critical_call(calls: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The answered request (device, request id) with the longest serialise + round trip:
    ``total``, ``network``, ``compute`` (the device's time) and ``device``; None if none."""
    per_req: dict[Any, dict[str, Any]] = {}
    for c in calls:
        if c.get("status") == "ok" and c.get("rtt_ms") is not None:
            per_req[(c.get("device"), c.get("req_id"))] = {
                "total": float(c.get("serialize_ms") or 0) + float(c["rtt_ms"]),
                "network": float(c.get("network_ms") or 0.0),
                "compute": float(c.get("device_ms") or 0.0),
                "device": c.get("device"),
            }
    return max(per_req.values(), key=lambda d: d["total"], default=None)


def layer_row(
    key: Mapping[str, Any],
    r: Any,
    calls: Sequence[Mapping[str, Any]],
    bs_ms: float | None,
    bytes_down_up: tuple[int, int],
) -> dict[str, Any]:
    """The ``layers.csv`` row of layer record ``r`` (its ``calls`` as the backend gave them,
    the BS's time before the layer ``bs_ms``, the bytes its calls moved each way)."""
    info = r.info or {}
    valid = r.token_valid.astype(bool)
    failed = set(r.failed)
    crit = critical_call(calls)
    t_enter, t_exit = info.get("t_enter"), info.get("t_exit")
    return {
        **key,
        "step": r.step,
        "phase": r.phase,
        "layer": r.layer,
        "tokens": int(valid.sum()),
        "experts_selected": int((r.expert_ids[valid] >= 0).sum()),
        "experts_used": len(r.rows_per_uid),
        "devices_used": len({c.get("device") for c in calls if c.get("status") == "ok"}),
        "moe_ms": (t_exit - t_enter) * 1e3 if t_enter is not None and t_exit is not None else None,
        "bs_ms": bs_ms,
        "critical_path_ms": crit["total"] if crit else None,
        "critical_network_ms": crit["network"] if crit else None,
        "critical_compute_ms": crit["compute"] if crit else None,
        "critical_device": crit["device"] if crit else "",
        "predicted_ms": info.get("predicted_ms"),
        "policy_predicted_ms": info.get("policy_predicted_ms"),
        "decision_ms": info.get("decision_ms"),
        "change_ms": info.get("change_ms"),
        "predicted_critical_ms": info.get("predicted_critical_ms"),
        **{c: info.get(c) for c in TERM_COLUMNS},
        "bytes_down": bytes_down_up[0],
        "bytes_up": bytes_down_up[1],
        "failed_experts": " ".join(sorted(failed)),
        "rerouted_experts": " ".join(sorted(info.get("rerouted", {}))),
        **{f"policy.{k}": v for k, v in (info.get("policy_stats") or {}).items()},
    }


def _expert_slots(r: Any) -> int:
    """The (token, expert) slots of layer record ``r`` that an expert actually served."""
    failed = set(r.failed)
    used = 0
    for row in r.expert_ids[r.token_valid.astype(bool)]:
        used += sum(1 for e in row if e >= 0 and f"L{r.layer}.E{int(e)}" not in failed)
    return used


def rows_for_request(
    records: Sequence[Any],
    key: Mapping[str, Any],
    step_start: Mapping[int, float],
    placement: Mapping[str, Sequence[str]],
) -> tuple[list[dict], list[dict], dict]:
    """(layer rows, call rows, request totals) from one request's MoE layer records."""
    layer_rows: list[dict] = []
    call_rows: list[dict] = []
    tot = new_totals()
    prev_exit: dict[int, float] = {}
    for r in records:
        info = r.info or {}
        tot["expert_slots"] += _expert_slots(r)
        tot["token_layers"] += int(r.token_valid.astype(bool).sum())
        calls = info.get("calls", [])
        b_down = b_up = 0
        for c in calls:
            status, detail = call_status(c, (placement.get(c["uid"]) or [None])[0])
            row = call_row(key, r, c, status, detail)
            b_down += row["bytes_down"]
            b_up += row["bytes_up"]
            tot["calls"] += 1
            tot["calls_failed"] += status in _FAIL
            tot["calls_rerouted"] += status == "rerouted"
            call_rows.append(row)
        tot["bytes_down"] += b_down
        tot["bytes_up"] += b_up
        tot["failed_experts"] += len(set(r.failed))
        t_enter, t_exit = info.get("t_enter"), info.get("t_exit")
        start = prev_exit.get(r.step, step_start.get(r.step))
        bs_ms = (t_enter - start) * 1e3 if t_enter is not None and start is not None else None
        if t_exit is not None:
            prev_exit[r.step] = t_exit
        layer_rows.append(layer_row(key, r, calls, bs_ms, (b_down, b_up)))
    return layer_rows, call_rows, tot


def layer_total(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """One request's layer rows as one row that :func:`testbed.results.summary.summary_row` sums
    the same (the critical path and its network part, over the layers that have both)."""
    path, net, seen = critical_sums(rows)
    return {
        "critical_path_ms": path if seen else None,
        "critical_network_ms": net if seen else None,
    }


def request_row(
    q: RequestLike,
    rkey: Mapping[str, Any],
    out: Sequence[int],
    ref: Sequence[int],
    tot: Mapping[str, Any],
    t0: float,
    ttft_end: float,
    t_end: float,
    energy: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``requests.csv`` row of request ``q`` (key ``rkey``) that produced ``out`` against
    the answer ``ref``, from :func:`rows_for_request`'s totals ``tot``, its start ``t0``, the end
    of its first step ``ttft_end`` and its end ``t_end`` (seconds on one clock), and its energy
    columns."""
    matched = sum(1 for a, b in zip(out, ref) if a == b)
    status = "degraded" if tot["failed_experts"] else "ok"
    n_out = len(out)
    ttft = (ttft_end - t0) * 1e3
    total = (t_end - t0) * 1e3
    return {
        **rkey,
        "task": q.task,
        "prompt_tokens": len(q.prompt),
        "output_tokens": n_out,
        "ttft_ms": ttft,
        "tpot_ms": (total - ttft) / (n_out - 1) if n_out > 1 else None,
        "total_ms": total,
        "correct": int(tuple(out) == tuple(ref)),
        "score": matched / max(1, len(ref)),
        "experts_per_token": tot["expert_slots"] / tot["token_layers"]
        if tot["token_layers"]
        else None,
        "bytes_down": tot["bytes_down"],
        "bytes_up": tot["bytes_up"],
        "calls": tot["calls"],
        "calls_failed": tot["calls_failed"],
        "calls_rerouted": tot["calls_rerouted"],
        **energy,
        "status": status,
        "error": "",
    }
