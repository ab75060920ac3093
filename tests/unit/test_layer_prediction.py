"""The runner's side of the calibrated latency model (pure, with fakes): EpochLinks enforces a
policy's down and up rates each on its own direction and records the epoch scope in force in
links.csv (per layer or per step), the exchange predictor reads the rows actually handed to the
backend, the placement and the enforced rates of each direction, and the report compares
predicted with measured for every policy, the baseline too."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from testbed.policy import ClusterState
from testbed.policy.latency_model import (
    DeviceCosts,
    LayerCostParams,
    layer_terms,
    overlap_ms,
    predict_layer_ms,
)
from testbed.results.comparison import SHARES, prediction_rows, shares_rows, time_shares
from testbed.results.report import Group, Run
from testbed.results.rows import TERM_COLUMNS, critical_terms
from testbed.results.schema import LAYER_COLUMNS
from testbed.run.epochs import EpochLinks, Epochs, LinkRecorder
from testbed.run.prediction import ExchangePredictor, LayerPrediction, TimedBackend


class FakeShaper:
    def __init__(self):
        self.calls = []

    def set_rates(self, rates):
        self.calls.append(dict(rates))
        return {d: (round(dn), round(up)) for d, (dn, up) in rates.items()}


class FakeTable:
    def __init__(self):
        self.rows = []

    def write_many(self, rows, common=None):  # as CsvTable: each row {**common, **row}
        self.rows.extend({**(common or {}), **r} for r in rows)


def _links(scope: str) -> tuple[EpochLinks, FakeShaper, FakeTable, ClusterState]:
    sh, tab, cl = FakeShaper(), FakeTable(), ClusterState()
    return (
        EpochLinks(Epochs(scope), LinkRecorder(sh, tab, 0.0), cl, ["d1", "d2"], {"trial": 0}),
        sh,
        tab,
        cl,
    )


def test_policy_rates_are_enforced_each_direction_and_links_rows_carry_the_epoch_scope():
    links, sh, tab, cl = _links("layer")
    for layer in range(2):  # per layer: every decision starts an epoch
        assert links.begin(0, 0, layer)
        links.apply_policy(None, {"d1": 9000.4, "d2": 3000.0}, {"d1": 2000.0, "d2": 700.0})
    assert sh.calls[0] == {"d1": (9000.4, 2000.0), "d2": (3000.0, 700.0)}
    assert cl.rate_down_kbit == {"d1": 9000, "d2": 3000}
    assert cl.rate_up_kbit == {"d1": 2000, "d2": 700}
    links.close()
    assert [r["layer"] for r in tab.rows] == [0, 0, 1, 1]
    assert {r["epoch_scope"] for r in tab.rows} == {"layer"}
    assert [(r["asked_down_kbit"], r["asked_up_kbit"]) for r in tab.rows[:2]] == [
        (9000.4, 2000.0),
        (3000.0, 700.0),
    ]
    # one rate both ways where the decision gives only bandwidth_kbit; a direction's own
    # rate wins
    links.begin(0, 0, 2)
    n = links.changes
    links.apply_policy({"d1": 500.0, "d2": 600.0}, {"d2": 800.0})
    assert sh.calls[-1] == {"d1": (500.0, 500.0), "d2": (800.0, 600.0)}
    assert links.changes == n + 1 and links.last_changed == ("d1", "d2")
    with pytest.raises(ValueError, match="both needed"):
        links.apply_policy(None, {"d1": 1.0})

    links, sh, tab, cl = _links("step")  # per step: layer 0 starts it, layer 1 keeps it
    assert links.begin(0, 0, 0)
    links.apply_policy(None, {"d1": 1.0, "d2": 1.0}, {"d1": 1.0, "d2": 1.0})
    assert not links.begin(0, 0, 1) and links.begin(0, 1, 0)
    links.close()
    assert [(r["step"], r["layer"], r["epoch_scope"]) for r in tab.rows] == [(0, 0, "step")] * 2


def _params() -> LayerCostParams:
    return LayerCostParams(
        8192,
        (DeviceCosts(0.5, 0.2, 0.3, 0.02), DeviceCosts(0.4)),
        ("d1", "d2"),
        bs_ms=0.2,
        bs_per_device_ms=0.3,
    )


def test_predictor_uses_the_rows_handed_over_the_placement_and_each_directions_rate():
    cl = ClusterState(
        rate_down_kbit={"d1": 20_000.0, "d2": 50_000.0}, rate_up_kbit={"d1": 4000.0, "d2": 30_000.0}
    )
    place = {"L0.E0": ("d1",), "L0.E1": ("d2",), "L0.E2": ("d1", "d2"), "L0.E3": ("d2",)}
    pr = ExchangePredictor(_params(), ["d2", "d1"], lambda: place, cl)  # order: any
    work = SimpleNamespace(
        inputs={
            "L0.E0": torch.zeros(3, 4),
            "L0.E2": torch.zeros(2, 4),
            "L0.E1": torch.zeros(1, 4),
            "L0.E3": torch.zeros(0, 4),
        }
    )
    rows, experts = pr.loads(work)
    assert rows.tolist() == [1, 5] and experts.tolist() == [1, 2]  # d2, d1
    got = pr.predict(work, {"decision_ms": 2.0, "change_ms": 1.0, "epoch_start": True}).columns
    want, _ = predict_layer_ms([5, 1], [20_000, 50_000], [4000, 30_000], _params(), experts=[2, 1])
    assert got["predicted_ms"] == pytest.approx(want)
    assert got["predicted_critical_ms"] == pytest.approx(want)  # nothing seen yet
    got = pr.predict(work, {"decision_ms": 4.0, "change_ms": 0.0, "epoch_start": False}).columns
    assert got["predicted_critical_ms"] == pytest.approx(want + 2.0)  # + median decision
    got = pr.predict(work, {"decision_ms": 4.0, "change_ms": 3.0, "epoch_start": True}).columns
    assert got["predicted_critical_ms"] == pytest.approx(want + 3.0 + 1.0)
    # the up rate matters on its own: a slower uplink, a longer prediction
    cl.rate_up_kbit["d1"] = 2000.0
    assert pr.predict(work, {}).columns["predicted_ms"] > want


def test_timed_backend_predicts_before_the_clock_and_merges_the_hooks_notes():
    seen = {}

    class Inner:
        def run_layer(self, work):
            seen["t"] = True
            return SimpleNamespace(info={})

    class Predictor:  # as ExchangePredictor: predict before the exchange, observe after
        observed = None

        def predict(self, work, pending):
            cols = {"predicted_ms": 7.0, "predicted_critical_ms": 9.0}
            return LayerPrediction(cols, {}, (None, None), (None, None))

        def observe(self, pred, res):
            self.observed = (pred, res)

    tb = TimedBackend(Inner())
    tb.predictor = pr = Predictor()
    tb.pending = {
        "policy_predicted_ms": 3.0,
        "decision_ms": 1.5,
        "change_ms": 0.5,
        "epoch_start": True,
    }
    info = tb.run_layer(SimpleNamespace(inputs={})).info
    assert info["predicted_ms"] == 7.0 and info["policy_predicted_ms"] == 3.0
    assert info["decision_ms"] == 1.5 and "epoch_start" not in info and tb.pending == {}
    assert info["t_exit"] >= info["t_enter"]
    assert pr.observed[0].columns["predicted_ms"] == 7.0 and pr.observed[1].info is info


def test_prediction_rows_for_every_policy_the_baseline_too():
    run = Run.__new__(Run)
    run.run_id = "r"
    rows = [
        {
            "predicted_ms": 10 * k,
            "moe_ms": 10.0,
            "decision_ms": 1.0,
            "change_ms": 0.0,
            "predicted_critical_ms": 10 * k + 1,
            "policy_predicted_ms": "",
        }
        for k in (0.9, 1.0, 1.1)
    ]
    g = [
        Group(run, "topk", "x=1 policy.name=topk", layers=rows),
        Group(
            run,
            "wdmoe",
            "x=1 policy.name=wdmoe",
            layers=[{**r, "policy_predicted_ms": 20.0} for r in rows],
        ),
        Group(run, "top1", "x=1 policy.name=top1", layers=[{"moe_ms": 3.0}]),
    ]
    out = prediction_rows(g)
    assert [r["policy"] for r in out] == ["topk", "wdmoe"]
    assert out[0]["exchange"]["median"] == pytest.approx(1.0)
    assert out[0]["exchange"]["n"] == 3 and out[0]["policy_model"] is None
    assert out[0]["critical"]["median"] == pytest.approx(11 / 11)
    assert out[1]["policy_model"]["median"] == pytest.approx(2.0)
    assert np.isclose(out[0]["exchange"]["p10"], 0.92)


def test_predictor_follows_each_links_bucket_from_message_to_message():
    """A slow link still refilling its TBF bucket when the next message comes lets less of it
    through free: right after a message, the same exchange is predicted longer; after an idle
    spell long enough to refill, as from a full bucket."""
    p = LayerCostParams(256, (DeviceCosts(0.3),), ("d1",), bs_ms=0.1)
    cl = ClusterState(rate_down_kbit={"d1": 300.0}, rate_up_kbit={"d1": 200.0})
    pr = ExchangePredictor(p, ["d1"], lambda: {"L0.E0": ("d1",)}, cl)
    work = SimpleNamespace(inputs={"L0.E0": torch.zeros(2, 64)})  # 512 B + headers: 1 frame
    pred = pr.predict(work, {})
    full = pred.columns["predicted_ms"]
    assert full == pytest.approx(predict_layer_ms([2], 300, 200, p)[0])
    import time as _t

    t0 = _t.perf_counter()
    pr.observe(
        pred,
        SimpleNamespace(
            info={
                "t_enter": t0,
                "calls": [{"device": "d1", "status": "ok", "rtt_ms": 1.0, "serialize_ms": 0.0}],
            }
        ),
    )
    # the request (665 + 66 B) and the reply (754 + 66 B) passed free, spending that much of
    # their 1516 B buckets, which refill at 37.5 / 25 B per ms: the next request still passes
    # free, the next reply waits for ~124 B (less what the request's time refilled)
    pred = pr.predict(work, {})
    soon = pred.columns["predicted_ms"]
    assert soon == pytest.approx(full + (820 - 696) * 8 / 200, abs=0.3)
    seen = pr.buckets.seen
    seen.update({k: (t - 1.0, tok) for k, (t, tok) in seen.items() if k[0] == "d1"})  # 1 s ago
    pred = pr.predict(work, {})
    assert pred.columns["predicted_ms"] == pytest.approx(full)
    # a rate change refills the bucket (tbf_change): right after a message, yet full
    pr.observe(
        pred,
        SimpleNamespace(
            info={
                "t_enter": _t.perf_counter(),
                "calls": [{"device": "d1", "status": "ok", "rtt_ms": 1.0, "serialize_ms": 0.0}],
            }
        ),
    )
    assert pr.predict(work, {"links_changed": ("d1",)}).columns["predicted_ms"] == pytest.approx(
        full
    )


def test_the_predicted_slowest_devices_terms_go_with_the_prediction():
    """predicted_air_ms/_device_ms/_call_ms are the terms of the device with the largest
    predicted round trip, and add up with the BS's part to predicted_ms."""
    p = LayerCostParams(
        512,
        (DeviceCosts(0.3, 0.2, 0.1, 0.01), DeviceCosts(0.5, 0.4, 0.2, 0.02)),
        ("d1", "d2"),
        bs_ms=0.7,
    )
    cl = ClusterState(
        rate_down_kbit={"d1": 5000.0, "d2": 400.0}, rate_up_kbit={"d1": 5000.0, "d2": 300.0}
    )
    pr = ExchangePredictor(p, ["d1", "d2"], lambda: {"L0.E0": ("d1",), "L0.E1": ("d2",)}, cl)
    out = pr.predict(
        SimpleNamespace(inputs={"L0.E0": torch.zeros(8, 128), "L0.E1": torch.zeros(4, 128)}), {}
    ).columns
    t = layer_terms([8, 4], [5000, 400], [5000, 300], p, experts=[1, 1])
    assert t["total"][1] > t["total"][0]  # the slow link, though it has fewer rows
    assert out["predicted_air_ms"] == pytest.approx(t["air_down"][1] + t["air_up"][1])
    assert out["predicted_device_ms"] == pytest.approx(t["device"][1])
    assert out["predicted_call_ms"] == pytest.approx(t["call"][1])
    assert out["predicted_ms"] == pytest.approx(
        0.7
        + out["predicted_air_ms"]
        + out["predicted_device_ms"]
        + out["predicted_call_ms"]
        + overlap_ms(t["total"], 0.0)
    )
    assert critical_terms({}) == dict.fromkeys(TERM_COLUMNS)
    assert set(TERM_COLUMNS) <= set(LAYER_COLUMNS)


def test_time_shares_split_the_layers_time_and_add_up_to_one():
    run = Run.__new__(Run)
    run.run_id = "r"
    rows = [
        {
            "bs_ms": 4.0,
            "moe_ms": 16.0,
            "predicted_air_ms": 10.0,
            "predicted_device_ms": 2.0,
            "predicted_call_ms": 1.0,
            "decision_ms": 1.0,
            "change_ms": 0.5,
        },
        {
            "bs_ms": 2.0,
            "moe_ms": 8.0,
            "predicted_air_ms": 4.0,
            "predicted_device_ms": 2.0,
            "predicted_call_ms": 1.0,
            "decision_ms": 0.5,
            "change_ms": 0.0,
        },
        {"bs_ms": 2.0, "moe_ms": 8.0},
    ]  # no terms: left out
    sh = time_shares(rows)
    assert sh["n"] == 2 and sh["layer_ms"] == pytest.approx(15.0)
    assert sh["airtime"] == pytest.approx(14 / 30) and sh["device"] == pytest.approx(4 / 30)
    assert sh["call"] == pytest.approx(2 / 30) and sh["exchange_rest"] == pytest.approx(4 / 30)
    assert sh["decision"] == pytest.approx(1.5 / 30)
    assert sh["rate_change"] == pytest.approx(0.5 / 30)
    assert sh["bs_model"] == pytest.approx(4 / 30)
    assert sum(sh[k] for k in SHARES) == pytest.approx(1.0)
    assert time_shares(rows[2:]) is None
    out = shares_rows(
        [
            Group(run, "topk", "x=1 policy.name=topk", layers=rows),
            Group(run, "top1", "x=1 policy.name=top1", layers=rows[2:]),
        ]
    )
    assert [r["policy"] for r in out] == ["topk"] and out[0]["airtime"] == sh["airtime"]
