"""The calibrated layer model (testbed.policy.latency_model.predict_layer_ms): frames on the wire,
what each leaf charges (TBF's free first frame and slack, netem's every frame), the header
bytes per call and direction, separate down/up rates, the BS terms, and the fit from
profiling samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed.net import tc
from testbed.policy.latency_model import (
    DeviceCosts,
    LayerCostParams,
    airtime_ms,
    fit_layer_costs,
    free_bytes,
    layer_terms,
    nnls,
    overlap_ms,
    predict_critical_ms,
    predict_layer_ms,
    wire_frames,
)


def test_wire_frames_counts_tcp_ip_and_ethernet_per_segment():
    assert wire_frames(0) == (0, 0.0)
    assert wire_frames(1) == (1, 1 + 66)
    assert wire_frames(1448) == (1, 1514)  # one full frame at MTU 1500
    assert wire_frames(1449) == (2, 1449 + 2 * 66)
    n, w = wire_frames(8192)  # 8 KiB in one write: 6 frames
    assert (n, w) == (6, 8192 + 6 * 66) and w == 8588
    # beyond one zmq batch (8 KiB) the tensor and the rest go in separate writes: one short
    # segment more (captured: 8192 + 153 B as 5 x 1448 + 952 + 153)
    assert wire_frames(8192 + 153) == (7, 8192 + 153 + 7 * 66)
    assert wire_frames(8192 + 153, extra_segments=0) == (6, 8192 + 153 + 6 * 66)
    assert wire_frames(8000, mtu=9000) == (1, 8000 + 66)


def test_tbf_lets_one_frame_plus_slack_through_free_netem_charges_every_frame():
    # the TBF's burst, as links sets it: one frame + 50 us of the rate
    for kbit in (2000, 10_000, 50_000, 333_333):
        assert free_bytes(kbit, "tbf", 1514, 50) == tc.tbf_burst_bytes(1514, kbit)
    # a lone frame passes free under TBF, costs its transmission time under netem
    assert airtime_ms(1448, 2000, "tbf") == 0.0
    assert airtime_ms(1448, 2000, "netem") == pytest.approx(1514 * 8 / 2000)
    # 8 KiB at 2 Mbit/s: TBF charges all but the burst (1514 + 13 B), netem all 8588 B
    assert airtime_ms(8192, 2000, "tbf") == pytest.approx((8588 - 1527) * 8 / 2000)
    assert airtime_ms(8192, 2000, "netem") == pytest.approx(8588 * 8 / 2000)
    # 64 KiB: the free frame is a small share
    assert airtime_ms(65536, 10_000, "tbf") / airtime_ms(65536, 10_000, "netem") > 0.97
    # a bucket still refilling lets through only what it holds (never more than full)
    assert airtime_ms(8192, 2000, "tbf", tokens_bytes=0) == airtime_ms(8192, 2000, "netem")
    assert airtime_ms(8192, 2000, "tbf", tokens_bytes=1e9) == airtime_ms(8192, 2000, "tbf")
    # the HTB-only tree: its class bucket, max(3200 B, 2 ms of the rate)
    assert airtime_ms(3000, 2000, "htb", bucket_bytes=0) == 0.0
    assert airtime_ms(65536, 50_000, "htb", bucket_bytes=0) == pytest.approx(
        (65536 + 47 * 66 - 12_500) * 8 / 50_000
    )
    assert airtime_ms(8192, 0, "tbf") == math.inf
    assert airtime_ms(8192, 5, "none") == 0.0
    with pytest.raises(ValueError):
        airtime_ms(1, 1, "fq")


def test_headers_per_call_and_expert_each_direction_and_separate_rates():
    p = LayerCostParams(
        bytes_per_token=100,
        header_down_bytes=80,
        header_down_per_expert_bytes=20,
        header_up_bytes=160,
        header_up_per_expert_bytes=40,
        shaping="netem",
    )
    assert p.message_bytes("down", 2, 10) == 80 + 40 + 1000
    assert p.message_bytes("up", 2, 10) == 160 + 80 + 1000
    t = layer_terms([10, 0, 3], [1000, 1000, 1000], [500, 500, 2000], p, experts=[2, 0, 1])
    assert t["bytes_down"].tolist() == [1120, 0, 80 + 20 + 300]
    # down and up each at their own rate: the same bytes cost twice as long at half the rate
    assert t["air_down"][0] == pytest.approx((1120 + 66) * 8 / 1000)
    assert t["air_up"][0] == pytest.approx((1240 + 66) * 8 / 500)
    assert t["air_up"][2] == pytest.approx((160 + 40 + 300 + 66) * 8 / 2000)
    assert t["total"][1] == 0.0


def test_predict_layer_is_bs_time_plus_the_slowest_call():
    dev = (
        DeviceCosts(call_ms=0.3, device_call_ms=0.1, compute_a_ms=0.2, compute_b_ms=0.05),
        DeviceCosts(call_ms=0.5),
    )
    p = LayerCostParams(
        8192,
        dev,
        ("d1", "d2"),
        bs_ms=0.4,
        bs_per_device_ms=0.1,
        decision_ms=1.0,
        rate_change_ms=0.5,
    )
    layer, per = predict_layer_ms([4, 1], [20_000, 20_000], [5000, 5000], p, experts=[2, 1])
    t = layer_terms([4, 1], [20_000, 20_000], [5000, 5000], p, experts=[2, 1])
    assert per[0] == pytest.approx(0.3 + 0.1 + 0.4 + 0.2 + t["air_down"][0] + t["air_up"][0])
    assert layer == pytest.approx(0.4 + per.max() + 0.1 * per.min() / per.max())
    assert predict_layer_ms([0, 0], [1, 1], [1, 1], p) == (0.0, pytest.approx(np.zeros(2)))
    assert predict_critical_ms(layer, p, True) == pytest.approx(layer + 1.5)
    assert predict_critical_ms(layer, p, False) == pytest.approx(layer + 1.0)
    # reordering by name, defaults for unknown devices, a manifest round trip
    q = p.for_devices(["d2", "x", "d1"])
    assert q.devices == (dev[1], DeviceCosts(), dev[0])
    assert LayerCostParams.from_dict(p.to_dict()) == p


def test_calls_running_together_cost_in_proportion_to_their_overlap():
    assert overlap_ms([5.0, 0.0, 5.0, 5.0], 0.5) == pytest.approx(1.0)  # two more, all along
    assert overlap_ms([1.0, 10.0], 0.5) == pytest.approx(0.05)  # a tenth of the time
    assert overlap_ms([7.0], 0.5) == 0.0 and overlap_ms([0.0, 0.0], 0.5) == 0.0


def test_nnls_clips_negative_coefficients():
    x = np.column_stack([np.ones(5), np.arange(5.0)])
    assert nnls(x, 2 + 3 * np.arange(5.0)) == pytest.approx([2, 3])
    assert nnls(x, 2 - 0.1 * np.arange(5.0)) == pytest.approx([1.8, 0])


def test_fit_recovers_costs_from_samples_and_reports_residuals():
    truth = LayerCostParams(
        8192,
        (DeviceCosts(0.25, 0.08, 0.15, 0.04), DeviceCosts(0.4, 0.1, 0.3, 0.02)),
        ("d1", "d2"),
        bs_ms=0.3,
        bs_per_device_ms=0.12,
    )
    rng = np.random.default_rng(0)
    samples, lid = [], 0
    for rate in (1e6, 50_000):
        for n in (1, 2, 4, 8, 16, 32):
            for e in (1, 2):
                for both in (False, True):
                    lid += 1
                    used = [0, 1] if both else [lid % 2]
                    loads = np.array([n if k in used else 0 for k in range(2)])
                    ex = np.array([e if k in used else 0 for k in range(2)])
                    layer, per = predict_layer_ms(loads, rate, rate / 2, truth, experts=ex)
                    for k in used:
                        c = truth.devices[k]
                        samples.append(
                            {
                                "device": f"d{k + 1}",
                                "tokens": n,
                                "experts": e,
                                "device_ms": c.device_ms(e, n) + rng.normal(0, 0.005),
                                "rtt_ms": per[k] + rng.normal(0, 0.005),
                                "rate_down_kbit": rate,
                                "rate_up_kbit": rate / 2,
                                "layer": lid,
                                "layer_ms": layer,
                            }
                        )
    base = LayerCostParams(8192, device_names=("d1", "d2"))
    p, res = fit_layer_costs(samples, base)
    for got, want in zip(p.devices, truth.devices):
        assert got.call_ms == pytest.approx(want.call_ms, abs=0.01)
        assert got.device_call_ms == pytest.approx(want.device_call_ms, abs=0.01)
        assert got.compute_a_ms == pytest.approx(want.compute_a_ms, abs=0.01)
        assert got.compute_b_ms == pytest.approx(want.compute_b_ms, abs=0.001)
    assert p.bs_ms == pytest.approx(0.3, abs=0.02)
    assert p.bs_per_device_ms == pytest.approx(0.12, abs=0.03)
    assert res["devices"]["d1"]["rtt"]["rmse_ms"] < 0.02
    assert res["layer"]["n"] == lid and res["layer"]["rmse_ms"] < 0.03
