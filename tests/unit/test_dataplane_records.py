"""The data plane's pure pieces: a call record's row (its keys and their order are what the
runner's ``calls.csv`` and the profiling read) and the profiled exchanges' plans and samples."""

from __future__ import annotations

import torch

from testbed.dataplane.call import CallRecord
from testbed.dataplane.inflight import Request
from testbed.dataplane.profiling import exchange_plans, exchange_samples
from testbed.dataplane.wire import ReplyTiming, encode_inputs

ROW_KEYS = [
    "layer",
    "step",
    "uid",
    "device",
    "attempt",
    "tokens",
    "bytes_out",
    "bytes_in",
    "status",
    "reason",
    "req_id",
    "serialize_ms",
    "rtt_ms",
    "network_ms",
    "queue_ms",
    "compute_ms",
    "device_ms",
    "up_ms",
    "down_ms",
    "deserialize_ms",
]


def test_served_row_has_every_key_in_order_and_the_energy_pair():
    rec = CallRecord(3, 7, "L3.E1", "dev1", 0, 4, 800, 800, req_id=11, energy_j=0.5)
    rec.energy_source = "estimated"
    row = rec.as_dict()
    assert list(row) == [*ROW_KEYS, "energy_j", "energy_source"]
    assert (row["status"], row["reason"], row["energy_j"], row["energy_source"]) == (
        "ok",
        "",
        0.5,
        "estimated",
    )


def test_unserved_rows_have_no_energy_pair():
    req = Request(5, "dev2", ["a", "b"], 1, 0, 0.0, 0.25, {"a": 64, "b": 32})
    timing = ReplyTiming(2.0, 0.5, 1.5, 0.7, 0.8)
    rec = CallRecord.unserved(0, 1, "b", 2, req, "error:3", "boom", timing, 0.1)
    row = rec.as_dict()
    assert list(row) == ROW_KEYS
    assert row == {
        **dict.fromkeys(ROW_KEYS),
        "layer": 0,
        "step": 1,
        "uid": "b",
        "device": "dev2",
        "attempt": 1,
        "tokens": 2,
        "bytes_out": 32,
        "bytes_in": 0,
        "status": "error:3",
        "reason": "boom",
        "req_id": 5,
        "serialize_ms": 0.25,
        "rtt_ms": 2.0,
        "network_ms": 1.5,
        "queue_ms": 0.1,
        "device_ms": 0.5,
        "up_ms": 0.7,
        "down_ms": 0.8,
    }
    skipped = CallRecord.unserved(0, 1, "c", 3, None, "skipped", "not placed").as_dict()
    assert (skipped["device"], skipped["attempt"], skipped["req_id"]) == ("", 0, None)
    assert (skipped["bytes_out"], skipped["serialize_ms"], skipped["rtt_ms"]) == (0, 0.0, None)


def test_encode_inputs_views_cpu_tensors():
    x = torch.arange(8, dtype=torch.float16).reshape(2, 4)
    y = torch.zeros(3, 4, dtype=torch.bfloat16)
    descs, bufs, nbytes = encode_inputs({"a": x, "b": y}, ["a", "b"])
    assert descs == [["a", "float16", [2, 4]], ["b", "bfloat16", [3, 4]]]
    assert nbytes == {"a": 16, "b": 24}
    assert bytes(bufs[0]) == x.numpy().tobytes()


def test_exchange_plans_alone_then_together():
    by_dev = {"d1": ["a", "b"], "d2": ["c"], "d3": ["e", "f"]}
    plans, shared = exchange_plans(by_dev, (1, 2), together=True)
    assert plans == [
        {"d1": ["a"]},
        {"d2": ["c"]},
        {"d3": ["e"]},
        {"d1": ["a", "b"]},
        {"d3": ["e", "f"]},
    ]
    assert shared == [
        {"d1": ["a"], "d2": ["c"]},
        {"d2": ["c"], "d3": ["e"]},
        {"d1": ["a"], "d2": ["c"], "d3": ["e"]},
    ]
    assert exchange_plans(by_dev, (1,), together=False)[1] == []


def test_exchange_samples_one_per_request():
    calls = [
        {"req_id": 1, "device": "d1", "uid": "a", "tokens": 2, "compute_ms": 0.5, "rtt_ms": 3.0},
        {"req_id": 1, "device": "d1", "uid": "b", "tokens": 2, "compute_ms": 0.25},
        {"req_id": 2, "device": "d2", "uid": "c", "tokens": 2, "compute_ms": None},
    ]
    ex = {"tokens": 2, "repeat": 0, "layer": 9, "devices": 2}
    rows = exchange_samples(calls, ex, 4.5)
    assert [list(r) for r in rows] == [
        [
            "device",
            "expert",
            "experts",
            "tokens",
            "rows",
            "repeat",
            "layer",
            "devices",
            "compute_ms",
            "device_ms",
            "rtt_ms",
            "serialize_ms",
            "layer_ms",
        ]
    ] * 2
    assert rows[0]["expert"] == "a b" and rows[0]["experts"] == 2 and rows[0]["rows"] == 4
    assert rows[0]["compute_ms"] == 0.75 and rows[0]["rtt_ms"] == 3.0
    assert rows[1]["expert"] == "c" and rows[1]["compute_ms"] == 0.0
    assert rows[1]["layer"] == 9 and rows[1]["layer_ms"] == 4.5
