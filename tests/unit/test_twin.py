"""The analytic twin's pure parts (testbed.run.twin, twin_clock, calibration): calibration from a
results folder's rows, the virtual clock's links and expert exchange, the recipe's device count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backend import LayerResult, LayerWork
from testbed.errors import ConfigError
from testbed.policy import ClusterState
from testbed.policy.latency_model import DeviceCosts, LayerCostParams, layer_terms, predict_layer_ms
from testbed.results import schema as R
from testbed.run.calibration import (
    DEFAULTS,
    Calibration,
    RatesInForce,
    bs_layer_times,
    calibrate_from_run,
    combine_params,
    default_calibration,
    exchange_samples,
    rate_change_fit,
    step_tail_ms,
)
from testbed.run.recipe import load_recipe
from testbed.run.twin import device_names, with_devices
from testbed.run.twin_clock import SimBackend, SimClock, SimLinkRecorder, TimedSelect

KEY = {"run_id": "r", "trial": "0", "point": "p", "policy": "topk", "repeat": "0"}


def _link(request, step, layer, device, down, up, time_s, change_ms=1.0, source="channel"):
    return {
        **KEY,
        "request": str(request),
        "step": str(step),
        "layer": str(layer),
        "device": device,
        "enforced_down_kbit": str(down),
        "enforced_up_kbit": str(up),
        "time_s": str(time_s),
        "change_ms": str(change_ms),
        "source": source,
    }


def test_rates_in_force_latest_epoch_policy_after_channel_and_fixed_links():
    links = [
        _link(0, 0, 0, "dev1", 1000, 500, 1.0),
        _link(0, 0, 0, "dev2", 2000, 800, 1.0),
        # the policy's change in the same epoch comes after the channel's: it wins
        _link(0, 0, 0, "dev1", 700, 700, 1.1, source="policy"),
        _link(0, 1, 0, "dev1", 3000, 3000, 2.0, source="policy"),
    ]  # dev2 left out
    trials = [
        {
            "trial": 0,
            "repeat": 0,
            "links_enforced": [
                {"device": "dev1", "down_kbit": 20000.0, "up_kbit": 20000.0},
                {"device": "dev3", "down_kbit": 9000.0, "up_kbit": 8000.0},
            ],
        },
        {
            "trial": 1,
            "repeat": 0,
            "links_enforced": [{"device": "dev1", "down_kbit": 5.0, "up_kbit": 6.0}],
        },
    ]
    r = RatesInForce(links, trials)
    at = lambda req, step, layer, dev, trial="0": r.at(
        {"trial": trial, "repeat": "0", "request": req, "step": step, "layer": layer}, dev
    )
    assert at(0, 0, 0, "dev1") == (700.0, 700.0) and at(0, 0, 3, "dev1") == (700.0, 700.0)
    assert at(0, 1, 0, "dev1") == (3000.0, 3000.0) and at(1, 0, 2, "dev1") == (3000.0, 3000.0)
    assert at(0, 1, 2, "dev2") == (2000.0, 800.0)  # kept from the epoch before
    assert at(0, 1, 2, "dev3") == (9000.0, 8000.0)  # never changed: the trial's links
    assert at(0, 0, 0, "dev1", trial="1") == (5.0, 6.0)  # a trial without links.csv rows
    assert at(0, 0, 0, "dev9") is None


def _call(req, step, layer, dev, uid, tokens, rtt, net, status="ok"):
    return {
        **KEY,
        "request": str(req),
        "step": str(step),
        "layer": str(layer),
        "device": dev,
        "expert": uid,
        "attempt": "0",
        "tokens": str(tokens),
        "status": status,
        "rtt_ms": str(rtt),
        "network_ms": str(net),
        "bytes_down": str(tokens * 100),
    }


def _layer(req, step, layer, moe, bs=2.0, predicted=""):
    return {
        **KEY,
        "request": str(req),
        "step": str(step),
        "layer": str(layer),
        "moe_ms": str(moe),
        "bs_ms": str(bs),
        "predicted_ms": predicted,
    }


def test_exchange_samples_one_per_device_call_with_rates_and_layer_time():
    calls = [
        _call(0, 0, 0, "dev1", "L0.E0", 3, 10.0, 9.0),
        _call(0, 0, 0, "dev1", "L0.E2", 2, 10.0, 9.0),
        _call(0, 0, 0, "dev2", "L0.E1", 4, 12.0, 10.5),
        # an exchange with a failed call is left out whole
        _call(0, 0, 1, "dev1", "L1.E0", 1, 5.0, 4.0),
        _call(0, 0, 1, "dev2", "L1.E1", 1, 0, 0, status="timeout"),
    ]
    calls[-1]["rtt_ms"] = calls[-1]["network_ms"] = ""
    layers = [_layer(0, 0, 0, 13.0), _layer(0, 0, 1, 5000.0)]
    rates = RatesInForce(
        [_link(0, 0, 0, "dev1", 1000, 500, 1.0), _link(0, 0, 0, "dev2", 2000, 800, 1.0)], []
    )
    s = sorted(exchange_samples(calls, layers, rates), key=lambda x: x["device"])
    assert [(x["device"], x["experts"], x["rows"]) for x in s] == [("dev1", 2, 5), ("dev2", 1, 4)]
    assert s[0]["device_ms"] == pytest.approx(1.0) and s[1]["device_ms"] == pytest.approx(1.5)
    assert (s[0]["rate_down_kbit"], s[0]["rate_up_kbit"]) == (1000.0, 500.0)
    assert s[0]["layer"] == s[1]["layer"] and s[0]["layer_ms"] == 13.0


def test_bs_layer_times_without_rate_change_and_decision_heavy_policies():
    layers = [
        _layer(0, 0, 0, 1, bs=7.0),
        _layer(0, 0, 1, 1, bs=3.0),
        _layer(0, 1, 0, 1, bs=5.0),
        _layer(0, 1, 1, 1, bs=2.0),
        _layer(0, 2, 0, 1, bs=4.0),
        _layer(0, 2, 1, 1, bs=2.0),
        # a policy that predicts (its decision is in bs_ms): not used
        _layer(1, 1, 0, 1, bs=50.0, predicted="3.0"),
    ]
    links = [
        _link(0, 0, 0, "dev1", 1, 1, 1.0, change_ms=2.0),
        _link(0, 0, 0, "dev2", 1, 1, 1.0, change_ms=2.0),  # the same change
        _link(0, 1, 0, "dev1", 1, 1, 2.0, change_ms=1.0),
    ]
    bs = bs_layer_times(layers, links)
    assert bs == {"prefill": (5.0, 3.0), "decode": (4.0, 2.0)}
    # recorded decisions are subtracted instead, every policy's rows used
    for r in layers:
        r["decision_ms"] = "1.0"
    assert bs_layer_times(layers, [])["decode"] == (4.0, 1.0)


def test_step_tail_is_what_the_layers_leave_of_the_request():
    reqs = [{**KEY, "request": "0", "total_ms": "26.0"}, {**KEY, "request": "1", "total_ms": "9.0"}]
    layers = [
        _layer(0, 0, 0, 5.0, bs=2.0),
        _layer(0, 0, 1, 5.0, bs=2.0),
        _layer(0, 1, 0, 4.0, bs=1.0),
        _layer(0, 1, 1, 4.0, bs=1.0),  # 24 ms in 2 steps
        _layer(1, 0, 0, 3.0, bs=1.0),
        _layer(1, 0, 1, 3.0, bs=1.0),
    ]  # 8 ms in 1 step
    assert step_tail_ms(reqs, layers) == pytest.approx(1.0)  # median of 1.0 and 1.0
    assert step_tail_ms([], layers) is None


def test_rate_change_fit_per_source_and_overall():
    links = []
    for i, n in enumerate((2, 4, 2, 4)):
        for d in range(n):
            links.append(
                _link(
                    0,
                    i,
                    0,
                    f"dev{d + 1}",
                    1,
                    1,
                    float(i),
                    change_ms=0.5 + 0.25 * n,
                    source="channel" if i < 2 else "policy",
                )
            )
    fit = rate_change_fit(links)
    assert set(fit) == {"", "channel", "policy"}
    for a, b in fit.values():
        assert (a, b) == pytest.approx((0.5, 0.25))


def test_rate_change_from_the_layers_own_record_where_there_is_one():
    links = [
        _link(0, s, 0, f"dev{d}", 1, 1, float(s), change_ms=0.1, source="channel")
        for s, n in ((0, 2), (1, 4))
        for d in range(1, n + 1)
    ]
    layers = [
        {**_layer(0, 0, 0, 1), "change_ms": "1.0"},
        {**_layer(0, 1, 0, 1), "change_ms": "2.0"},
        {**_layer(0, 1, 1, 1), "change_ms": "0"},
    ]
    assert rate_change_fit(links, layers)["channel"] == pytest.approx((0.0, 0.5))
    assert rate_change_fit(links)["channel"] == pytest.approx((0.1, 0.0))


def test_combine_params_takes_each_devices_median_over_the_trials():
    a = LayerCostParams(100.0, (DeviceCosts(1.0, 0, 0, 0.1),), ("dev1",), bs_ms=0.2, shaping="tbf")
    b = LayerCostParams(
        100.0,
        (DeviceCosts(3.0, 0, 0, 0.3), DeviceCosts(5.0)),
        ("dev1", "dev2"),
        bs_ms=0.4,
        shaping="tbf",
    )
    c = combine_params([a, b])
    assert c.device_names == ("dev1", "dev2") and c.bs_ms == pytest.approx(0.3)
    assert c.devices[0] == DeviceCosts(2.0, 0, 0, 0.2) and c.devices[1] == DeviceCosts(5.0)
    assert c.shaping == "tbf" and c.mtu == 1500 and isinstance(c.mtu, int)


def _params() -> LayerCostParams:
    return LayerCostParams(
        8192.0,
        (DeviceCosts(2.0, 0.5, 0.1, 0.03), DeviceCosts(1.5, 0.4, 0.2, 0.02)),
        ("dev1", "dev2"),
        bs_ms=0.4,
        bs_per_device_ms=0.1,
    )


def _synthetic_run(tmp: Path, params: LayerCostParams) -> Path:
    """A measured run's folder whose timings are exactly ``params``' predictions."""
    rng = np.random.default_rng(1)
    run = tmp / "run"
    run.mkdir()
    rates0 = {"dev1": (4000.0, 1500.0), "dev2": (9000.0, 700.0)}
    man = {
        "run_id": "r",
        "status": "completed",
        "shaping": {"mode": "tbf", "bucket_bytes": 1514, "bucket_slack_us": 50},
        "compute_profile": {
            "dev1": {"a_ms": 0.3, "b_ms": 0.03},
            "dev2": {"a_ms": 0.5, "b_ms": 0.05},
        },
        "trials": [
            {
                "trial": 0,
                "repeat": 0,
                "links_enforced": [
                    {"device": d, "down_kbit": r[0], "up_kbit": r[1]} for d, r in rates0.items()
                ],
            }
        ],
    }
    (run / R.MANIFEST).write_text(json.dumps(man))
    calls, layers, reqs = [], [], []
    with R.CsvTable(run / R.LINKS, R.LINK_COLUMNS) as lt:
        lt.write_many(
            [
                {
                    **KEY,
                    "time_s": 5.0,
                    "epoch": 0,
                    "request": 1,
                    "step": 0,
                    "layer": 0,
                    "source": "channel",
                    "device": d,
                    "enforced_down_kbit": r[0] / 2,
                    "enforced_up_kbit": r[1] * 2,
                    "change_ms": 1.0,
                }
                for d, r in rates0.items()
            ]
        )
    for req in range(3):
        total = 0.0
        for layer in range(4):
            names = ["dev1", "dev2"] if layer % 2 == 0 else ["dev1"]
            rates = {d: (r[0] / 2, r[1] * 2) if req >= 1 else r for d, r in rates0.items()}
            ex = np.array([float(rng.integers(1, 3)) for _ in names])
            tok = [[int(rng.integers(1, 12)) for _ in range(int(e))] for e in ex]
            loads = np.array([float(sum(t)) for t in tok])
            p = params.for_devices(names)
            down = [rates[d][0] for d in names]
            up = [rates[d][1] for d in names]
            moe, _ = predict_layer_ms(loads, down, up, p, experts=ex)
            terms = layer_terms(loads, down, up, p, experts=ex)
            for k, d in enumerate(names):
                for j, n in enumerate(tok[k]):
                    calls.append(
                        {
                            **KEY,
                            "request": req,
                            "step": 0,
                            "layer": layer,
                            "expert": f"L{layer}.E{k}{j}",
                            "device": d,
                            "attempt": 0,
                            "tokens": n,
                            "status": "ok",
                            "rtt_ms": terms["total"][k],
                            "network_ms": terms["total"][k] - terms["device"][k],
                            "bytes_down": n * 8192,
                            "bytes_up": n * 8192,
                        }
                    )
            layers.append(
                {
                    **KEY,
                    "request": req,
                    "step": 0,
                    "phase": "prefill",
                    "layer": layer,
                    "moe_ms": moe,
                    "bs_ms": 2.0 + layer,
                }
            )
            total += moe + 2.0 + layer
        reqs.append({**KEY, "request": req, "total_ms": total + 1.5, "output_tokens": 1})
    for name, cols, rows in (
        (R.CALLS, R.CALL_COLUMNS, calls),
        (R.LAYERS, R.LAYER_COLUMNS, layers),
        (R.REQUESTS, R.REQUEST_COLUMNS, reqs),
    ):
        with R.CsvTable(run / name, cols) as t:
            t.write_many(rows)
    return run


def test_calibrate_from_run_recovers_the_model_that_made_the_timings(tmp_path):
    true = _params()
    cal = calibrate_from_run(_synthetic_run(tmp_path, true))
    assert cal.params.bytes_per_token == 8192.0 and cal.params.shaping == "tbf"
    assert cal.compute_profile == {"dev1": (0.3, 0.03), "dev2": (0.5, 0.05)}
    assert cal.default_profile == pytest.approx((0.4, 0.04))
    assert cal.tail_ms == pytest.approx(1.5)
    assert cal.bs_layer_ms["prefill"] == pytest.approx((2.0, 3.0, 4.0, 5.0))
    rng = np.random.default_rng(7)
    for _ in range(20):  # any loads and rates: the calibrated model predicts what made them
        loads = rng.integers(0, 40, 2).astype(float)
        ex = np.where(loads > 0, rng.integers(1, 3, 2), 0).astype(float)
        down, up = rng.uniform(300, 20000, 2), rng.uniform(300, 20000, 2)
        want, _ = predict_layer_ms(loads, down, up, true, experts=ex)
        got, _ = predict_layer_ms(
            loads, down, up, cal.params.for_devices(["dev1", "dev2"]), experts=ex
        )
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    # a device the run did not have: the median of the run's devices
    d = cal.params.for_devices(["dev7"]).devices[0]
    assert d.call_ms == pytest.approx(1.75) and d.compute_b_ms == pytest.approx(0.025)
    assert cal.to_dict()["source"] == str(tmp_path / "run")


def test_calibrate_refuses_simulated_runs_and_empty_folders(tmp_path):
    (tmp_path / R.MANIFEST).write_text(json.dumps({"mode": "simulated"}))
    with pytest.raises(ConfigError, match="a simulated run"):
        calibrate_from_run(tmp_path)
    (tmp_path / R.MANIFEST).write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ConfigError, match="no calls or layers"):
        calibrate_from_run(tmp_path)
    with pytest.raises(ConfigError, match="no readable manifest"):
        calibrate_from_run(tmp_path / "nope")


def test_defaults_and_calibration_lookups():
    cal = default_calibration(256)
    assert cal.params.bytes_per_token == 256 and cal.params.devices == ()
    assert cal.params.default_device == DeviceCosts(**DEFAULTS["device"])
    assert cal.profiles(["dev1", "dev2"]) == {
        "dev1": DEFAULTS["compute_profile"],
        "dev2": DEFAULTS["compute_profile"],
    }
    assert cal.bs_ms(0, 0) == DEFAULTS["bs_layer_ms"]["prefill"][0]
    assert cal.bs_ms(3, 99) == DEFAULTS["bs_layer_ms"]["decode"][-1]  # beyond: the last
    a, b = DEFAULTS["rate_change"]
    assert cal.change_ms("policy", 1000) == pytest.approx(a + 1000 * b)
    c = Calibration(
        cal.params,
        {},
        (0, 0),
        {"prefill": (), "decode": ()},
        0.0,
        {"policy": (5.0, 0.0), "": (1.0, 0.0)},
    )
    assert c.change_ms("policy", 3) == 5.0 and c.change_ms("trace", 3) == 1.0
    assert c.bs_ms(1, 0) == 0.0


class _Table:
    def __init__(self):
        self.rows = []

    def write_many(self, rows, common=None):  # as CsvTable: each row {**common, **row}
        self.rows.extend({**(common or {}), **r} for r in rows)


def test_sim_link_recorder_charges_the_change_to_the_clock_and_writes_epochs():
    clock, table = SimClock(), _Table()
    rec = SimLinkRecorder(table, clock, lambda src, n: {"channel": 2.0, "policy": 1.0}[src] * n)
    got = rec.apply({"dev1": (100.0, 3.0), "dev2": (200.0, 300.0)}, {"k": 1}, {"source": "channel"})
    assert got == {"dev1": (100.0, 8.0), "dev2": (200.0, 300.0)}  # tc's floor, as asked else
    assert clock.now == pytest.approx(0.004) and table.rows == []
    clock.advance_ms(10.0)
    rec.apply({"dev1": (50.0, 50.0)}, {"k": 1}, {"source": "policy"})
    assert clock.now == pytest.approx(0.015)
    first = table.rows
    assert [r["device"] for r in first] == ["dev1", "dev2"]
    assert first[0]["time_s"] == 0.0 and first[0]["change_ms"] == 4.0
    assert first[0]["epoch_ms"] == pytest.approx(10.0) and not first[0]["tc_slower"]
    assert first[0]["asked_up_kbit"] == 3.0 and first[0]["enforced_up_kbit"] == 8.0
    clock.advance_ms(0.5)
    rec.end_epoch()
    last = table.rows[-1]
    assert last["time_s"] == pytest.approx(0.014) and last["epoch_ms"] == pytest.approx(0.5)
    assert last["tc_slower"]  # 1 ms change for a 0.5 ms epoch
    assert rec.summary("step")["changes"] == 2


class _Inner:
    def run_layer(self, work):
        return LayerResult({u: x * 2 for u, x in work.inputs.items()}, {}, {"wall_s": 0.1})


def test_sim_backend_times_the_exchange_with_the_latency_model():
    clock = SimClock()
    clock.advance_ms(3.0)
    cal = Calibration(_params(), {}, (0, 0), {"prefill": (1.0,), "decode": (1.0,)}, 0.0, {})
    sim = SimBackend(_Inner(), clock, cal, 512)
    sim.placement = {"L0.E0": ("dev1",), "L0.E1": ("dev2", "dev1"), "L0.E2": ("dev1",)}
    sim.cluster = ClusterState(
        rate_down_kbit={"dev1": 1000.0, "dev2": 300.0}, rate_up_kbit={"dev1": 800.0, "dev2": 200.0}
    )
    sim.pending.update(policy_predicted_ms=7.0, epoch_start=True)

    class Charged:
        def __init__(self, ms):
            self.ms = ms

        def take(self):
            ms, self.ms = self.ms, 0.0
            return ms

    sim.decision, sim.change = Charged(0.5), Charged(1.5)
    work = LayerWork(
        0, 2, {"L0.E0": torch.ones(3, 4), "L0.E1": torch.ones(1, 4), "L0.E2": torch.ones(2, 4)}
    )
    res = sim.run_layer(work)
    assert torch.equal(res.outputs["L0.E1"], torch.full((1, 4), 2.0))  # the experts' own output
    p = LayerCostParams(512.0, _params().devices, ("dev1", "dev2"), bs_ms=0.4, bs_per_device_ms=0.1)
    want, dev = predict_layer_ms([5, 1], [1000, 300], [800, 200], p, experts=[2, 1])
    assert res.info["t_enter"] == pytest.approx(0.003)
    assert (res.info["t_exit"] - res.info["t_enter"]) * 1e3 == pytest.approx(want)
    assert clock.now == res.info["t_exit"] and res.info["policy_predicted_ms"] == 7.0
    assert not sim.pending and "epoch_start" not in res.info
    # the layer's decision and change as charged to the clock
    assert res.info["decision_ms"] == 0.5 and res.info["change_ms"] == 1.5
    if "policy_predicted_ms" in R.LAYER_COLUMNS:  # predicted_ms: the calibrated model's
        assert res.info["predicted_ms"] == pytest.approx(want)
        assert res.info["predicted_critical_ms"] == pytest.approx(want + 2.0)
    assert sim.run_layer(work).info["change_ms"] == 0.0  # taken once
    calls = {c["uid"]: c for c in res.info["calls"]}
    assert calls["L0.E0"]["device"] == calls["L0.E2"]["device"] == "dev1"
    assert calls["L0.E0"]["req_id"] == calls["L0.E2"]["req_id"] != calls["L0.E1"]["req_id"]
    assert calls["L0.E1"]["rtt_ms"] == pytest.approx(dev[1])
    assert calls["L0.E0"]["bytes_out"] == calls["L0.E0"]["bytes_in"] == 3 * 512
    assert calls["L0.E0"]["compute_ms"] == pytest.approx(0.1 + 0.03 * 3)
    assert calls["L0.E0"]["network_ms"] + calls["L0.E0"]["device_ms"] == pytest.approx(
        calls["L0.E0"]["rtt_ms"]
    )
    assert res.info["served_by"]["L0.E1"] == "dev2" and res.info["rerouted"] == {}


def test_timed_select_charges_the_decision_and_passes_the_rest_through():
    class P:
        name = "p"

        def select(self, ctx, cluster=None):
            return ("decided", ctx, cluster)

        def last_stats(self):
            return {"predicted_ms": 1.0}

    clock = SimClock()
    t = TimedSelect(P(), clock)
    assert t.select(1, 2) == ("decided", 1, 2) and t.name == "p"
    assert t.last_stats() == {"predicted_ms": 1.0}
    assert len(t.decisions_ms) == 1 and clock.now == pytest.approx(t.decisions_ms[0] / 1e3)


def test_run_devices_up_to_1000_and_more_and_the_twin_override(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(
        '[run]\ndevices = 1000\n[sweep]\n"run.devices" = [2, 4, 2000]\n'
        '"policy.name" = ["topk", "top1"]\n'
    )
    r = load_recipe(p)
    assert sorted({t.config["run"]["devices"] for t in r.trials()}) == [2, 4, 2000]
    w = with_devices(r, 1000)
    assert [t.config["run"]["devices"] for t in w.trials()] == [1000, 1000]
    assert list(w.sweep) == ["policy.name"] and len(r.trials()) == 6  # the original kept
    assert device_names(3) == ["dev1", "dev2", "dev3"]
    with pytest.raises(ConfigError, match="--devices"):
        with_devices(r, 0)


def test_sim_backend_follows_each_links_bucket_from_message_to_message():
    """A message right after another on a slow link finds the bucket still refilling and pays
    for its first frame too; after a long idle spell the bucket is full again."""
    clock = SimClock()
    cal = Calibration(_params(), {}, (0, 0), {"prefill": (1.0,), "decode": (1.0,)}, 0.0, {})
    sim = SimBackend(_Inner(), clock, cal, 512)
    sim.placement = {"L0.E0": ("dev1",)}
    sim.cluster = ClusterState(rate_down_kbit={"dev1": 100.0}, rate_up_kbit={"dev1": 100.0})
    work = LayerWork(0, 1, {"L0.E0": torch.ones(4, 4)})  # 2 KiB: more than a bucket

    def moe() -> float:
        r = sim.run_layer(work).info
        return (r["t_exit"] - r["t_enter"]) * 1e3

    full = moe()
    again = moe()  # at once: both buckets were spent by the first call
    # the down bucket refilled only while the first call's reply and compute ran (~75 ms at
    # 12.5 B/ms: ~940 of 1515 B), so ~580 B more are charged: ~46 ms; the up bucket refilled
    # almost fully while the second request crossed
    assert 40.0 < again - full < 2 * 1515 * 8 / 100.0
    clock.advance_ms(10_000.0)
    assert moe() == pytest.approx(full)


def test_sim_backend_refills_the_buckets_of_links_a_rate_change_touched():
    """As the kernel's tbf_change does (and the runner's predictor follows): right after a
    message, a link whose rate was changed starts full again; one that was not, does not."""
    clock = SimClock()
    cal = Calibration(_params(), {}, (0, 0), {"prefill": (1.0,), "decode": (1.0,)}, 0.0, {})
    sim = SimBackend(_Inner(), clock, cal, 512)
    sim.placement = {"L0.E0": ("dev1",)}
    sim.cluster = ClusterState(rate_down_kbit={"dev1": 100.0}, rate_up_kbit={"dev1": 100.0})
    work = LayerWork(0, 1, {"L0.E0": torch.ones(4, 4)})

    def moe(**pending) -> float:
        sim.pending.update(pending)
        r = sim.run_layer(work).info
        assert "links_changed" not in r
        return (r["t_exit"] - r["t_enter"]) * 1e3

    full = moe()
    assert moe(links_changed=("dev2",)) > full + 40.0  # another link's change: still spent
    assert moe(links_changed=("dev1",)) == pytest.approx(full)
