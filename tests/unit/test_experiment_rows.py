"""Rows of layers.csv / calls.csv / requests.csv from MoE layer records (pure)."""

from __future__ import annotations

import numpy as np

from models.moe_block import MoELayerRecord
from testbed.results.rows import rows_for_request


def _rec(step, layer, ids, valid, calls, failed=None, t=(0.0, 0.0), rerouted=None):
    ids = np.array(ids, dtype=np.int32)
    return MoELayerRecord(
        step=step,
        phase="prefill" if step == 0 else "decode",
        layer=layer,
        expert_ids=ids,
        weights=np.ones(ids.shape, np.float32),
        seq_index=np.zeros(len(ids), np.int64),
        position=np.arange(len(ids)),
        token_valid=np.array(valid, bool),
        failed=failed or {},
        dropped_tokens=0,
        rows_per_uid={c["uid"]: c["tokens"] for c in calls},
        info={"calls": calls, "t_enter": t[0], "t_exit": t[1], "rerouted": rerouted or {}},
    )


def _call(uid, dev, status="ok", rtt=2.0, dev_ms=0.5, req=1, tokens=1, nbytes=256, attempt=0):
    ok = status == "ok"
    return {
        "uid": uid,
        "device": dev,
        "status": status,
        "reason": "" if ok else "no reply",
        "tokens": tokens,
        "bytes_out": nbytes,
        "bytes_in": nbytes if ok else 0,
        "req_id": req,
        "serialize_ms": 0.1,
        "rtt_ms": rtt if ok else None,
        "device_ms": dev_ms if ok else None,
        "network_ms": rtt - dev_ms if ok else None,
        "queue_ms": 0.05 if ok else None,
        "compute_ms": 0.4 if ok else None,
        "attempt": attempt,
    }


def test_rows_critical_path_bs_time_and_totals():
    key = {"run_id": "r", "trial": 0, "point": "p", "policy": "topk", "repeat": 0, "request": 3}
    placement = {"L0.E0": ["d1"], "L0.E1": ["d2", "d1"], "L1.E0": ["d1"], "L1.E2": ["d2"]}
    recs = [
        # prefill, layer 0: 2 valid tokens + 1 padding; d2 is the slow device (rtt 5 ms)
        _rec(
            0,
            0,
            [[0, 1], [1, 0], [0, 1]],
            [True, True, False],
            [
                _call("L0.E0", "d1", rtt=2.0, req=1, tokens=2),
                _call("L0.E1", "d2", rtt=5.0, dev_ms=1.0, req=2, tokens=2),
            ],
            t=(10.0, 10.006),
        ),
        # prefill, layer 1: L1.E2 failed on d2, L1.E0 ok
        _rec(
            0,
            1,
            [[0, 2], [2, 0], [0, 0]],
            [True, True, False],
            [
                _call("L1.E0", "d1", req=3, tokens=2),
                _call("L1.E2", "d2", status="timeout", req=4, tokens=2),
            ],
            failed={"L1.E2": "timeout on d2"},
            t=(10.008, 10.01),
        ),
        # decode step 1, layer 0: L0.E1 served by the replica d1 after d2 failed
        _rec(
            1,
            0,
            [[1, -1]],
            [True],
            [
                _call("L0.E1", "d2", status="unreachable", req=5),
                _call("L0.E1", "d1", req=6, attempt=1),
            ],
            t=(10.02, 10.023),
            rerouted={"L0.E1": "d1"},
        ),
    ]
    layers, calls, tot = rows_for_request(recs, key, {0: 9.99, 1: 10.015}, placement)
    assert len(layers) == 3 and len(calls) == 6
    l0, l1, l2 = layers
    assert l0["tokens"] == 2 and l0["experts_selected"] == 4 and l0["devices_used"] == 2
    assert abs(l0["critical_path_ms"] - 5.1) < 1e-9 and l0["critical_device"] == "d2"
    assert (
        abs(l0["critical_network_ms"] - 4.0) < 1e-9 and abs(l0["critical_compute_ms"] - 1.0) < 1e-9
    )
    assert abs(l0["moe_ms"] - 6.0) < 1e-6 and abs(l0["bs_ms"] - 10.0) < 1e-6  # 9.99 -> 10.0
    assert abs(l1["bs_ms"] - 2.0) < 1e-6  # previous layer's exit 10.006 -> 10.008
    assert l1["failed_experts"] == "L1.E2" and l1["critical_device"] == "d1"
    assert abs(l2["bs_ms"] - 5.0) < 1e-6 and l2["rerouted_experts"] == "L0.E1"
    assert [c["status"] for c in calls] == ["ok", "ok", "ok", "timeout", "unreachable", "rerouted"]
    assert all(c["request"] == 3 and c["policy"] == "topk" for c in calls)
    assert calls[3]["detail"] == "no reply"
    assert tot["calls"] == 6 and tot["calls_failed"] == 2 and tot["calls_rerouted"] == 1
    # experts per (token, layer) after failures: layer0 4 of 2 tokens, layer1 3 (E2 failed twice ->
    # 2 used)
    assert tot["expert_slots"] == 4 + 2 + 1 and tot["token_layers"] == 5
    assert tot["bytes_down"] == 6 * 256 and tot["bytes_up"] == 4 * 256
