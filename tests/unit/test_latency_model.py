"""Shared latency model: formula, loads, compute-profile fit, and the min–max bandwidth
allocation against a brute-force grid optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed.net.channel import ChannelModel
from testbed.policy.bandwidth import (
    device_latency_ms,
    device_loads,
    fit_compute_profile,
    layer_latency_ms,
    min_max_bandwidth,
    transfer_ms,
)

S = 8192  # bytes per token per direction (Mixtral fp16)


def _instance(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 5))
    ch = ChannelModel(d, seed=seed)
    loads = rng.integers(1, 20, d)
    if d > 2 and seed % 2:
        loads[int(rng.integers(d))] = 0  # an idle device
    return {
        "loads": loads,
        "total_hz": float(rng.uniform(10e6, 100e6)),
        "snr_down_hz": ch.snr_per_hz(seed, "down"),
        "snr_up_hz": ch.snr_per_hz(seed, "up"),
        "bytes_per_token": S,
        "a_ms": rng.uniform(0, 5, d),
        "b_ms": rng.uniform(0, 1, d),
    }


def _t(inst: dict, bw: np.ndarray) -> np.ndarray:
    """t_k for bandwidths bw[..., D] (broadcast)."""
    return device_latency_ms(
        inst["loads"], bw, inst["snr_down_hz"], inst["snr_up_hz"], S, inst["a_ms"], inst["b_ms"]
    )


def _grid_optimum(
    inst: dict, steps: int, center: np.ndarray | None = None, width: float = 1.0
) -> tuple[float, np.ndarray]:
    """min over a grid of splits of max_k t_k; the last loaded device gets the rest."""
    on = np.flatnonzero(inst["loads"] > 0)
    tot = inst["total_hz"]
    free = len(on) - 1
    if center is None:
        axes = [np.linspace(0, tot, steps + 1)[1:]] * free
    else:
        axes = [
            np.clip(center[on[i]] + np.linspace(-width, width, steps + 1), 1.0, tot)
            for i in range(free)
        ]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, free)
    rest = tot - mesh.sum(1)
    mesh, rest = mesh[rest > 0], rest[rest > 0]
    bw = np.zeros((len(mesh), len(inst["loads"])))
    bw[:, on[:-1]] = mesh
    bw[:, on[-1]] = rest
    worst = _t(inst, bw).max(1)
    i = int(np.argmin(worst))
    return float(worst[i]), bw[i]


def test_latency_formula_by_hand() -> None:
    sd, su, b = 1e10, 2e9, 5e6
    rd, ru = b * math.log2(1 + sd / b), b * math.log2(1 + su / b)
    want = 3 * S * 8 / rd * 1e3 + (2.0 + 0.5 * 3) + 3 * S * 8 / ru * 1e3
    assert device_latency_ms(3, b, sd, su, S, 2.0, 0.5) == pytest.approx(want, rel=1e-12)
    assert transfer_ms(0, 0.0, sd, su, S) == 0.0
    assert device_latency_ms(np.array([0, 2]), np.array([0.0, b]), sd, su, S, 2.0, 0.5)[0] == 0
    assert device_latency_ms(1, 0.0, sd, su, S, 0, 0) == math.inf
    assert layer_latency_ms(np.array([1.0, 4.0, 0.0]), bs_ms=2.5) == 6.5


def test_device_loads_count_token_rows_per_device() -> None:
    ids = np.array([[0, 3], [3, -1], [5, 1], [-1, -1]])
    where = np.array([0, 1, 1, 2, 0, 2])  # expert -> device
    np.testing.assert_array_equal(device_loads(ids, where, 4), [1, 1, 3, 0])


def test_fit_compute_profile() -> None:
    n = np.arange(1, 9)
    assert fit_compute_profile(zip(n, 3.0 + 0.25 * n)) == pytest.approx((3.0, 0.25))
    a, b = fit_compute_profile([(1, 0.5), (2, 2.0), (4, 6.0)])  # free fit: a < 0
    assert a == 0.0 and b == pytest.approx((0.5 + 4 + 24) / (1 + 4 + 16))
    a, b = fit_compute_profile([(1, 5.0), (2, 4.0), (3, 3.0)])  # free fit: b < 0
    assert b == 0.0 and a == pytest.approx(4.0)
    a, b = fit_compute_profile([(4, 8.0), (4, 10.0)])  # one N: only a + 4b is fixed
    assert a >= 0 and b >= 0 and a + 4 * b == pytest.approx(9.0)
    with pytest.raises(ValueError, match="no samples"):
        fit_compute_profile([])


@pytest.mark.parametrize("seed", range(8))
def test_min_max_matches_brute_force_grid(seed: int) -> None:
    inst = _instance(seed)
    al = min_max_bandwidth(**inst)
    n_on = int((inst["loads"] > 0).sum())
    steps = {2: 20000, 3: 600, 4: 90}[n_on]
    best, bw = _grid_optimum(inst, steps)
    if n_on == 4:  # refine around the coarse optimum
        best, _ = _grid_optimum(inst, 60, center=bw, width=2 * inst["total_hz"] / 90)
    assert al.latency_ms <= best * (1 + 1e-9), (al.latency_ms, best, inst)
    assert best <= al.latency_ms * 1.01, (al.latency_ms, best, inst)


@pytest.mark.parametrize("seed", range(8))
def test_min_max_equalises_loaded_devices_and_spends_the_budget(seed: int) -> None:
    inst = _instance(seed)
    al = min_max_bandwidth(**inst)
    on = inst["loads"] > 0
    t = _t(inst, al.bandwidth_hz)
    np.testing.assert_allclose(t[on], al.latency_ms, rtol=1e-6)
    np.testing.assert_allclose(al.device_ms, t)
    assert np.all(al.bandwidth_hz[~on] == 0) and np.all(al.bandwidth_hz[on] > 0)
    assert al.bandwidth_hz.sum() <= inst["total_hz"] * (1 + 1e-12)
    assert al.bandwidth_hz.sum() >= inst["total_hz"] * (1 - 1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_newton_agrees_with_literal_bisection(seed: int) -> None:
    inst = _instance(seed)
    fast = min_max_bandwidth(**inst)
    ref = min_max_bandwidth(**inst, method="bisection")
    assert fast.latency_ms == pytest.approx(ref.latency_ms, rel=1e-6)
    np.testing.assert_allclose(
        fast.bandwidth_hz, ref.bandwidth_hz, rtol=1e-4, atol=inst["total_hz"] * 1e-7
    )


def test_min_max_beats_equal_split_and_improves_with_bandwidth() -> None:
    inst = _instance(3)
    on = inst["loads"] > 0
    eq = np.where(on, inst["total_hz"] / on.sum(), 0.0)
    t_eq = _t(inst, eq).max()
    t10 = min_max_bandwidth(**inst).latency_ms
    t20 = min_max_bandwidth(**{**inst, "total_hz": 2 * inst["total_hz"]}).latency_ms
    assert t10 <= t_eq and t20 < t10


def test_min_max_edge_cases() -> None:
    inst = _instance(0)
    idle = min_max_bandwidth(**{**inst, "loads": np.zeros_like(inst["loads"])})
    assert idle.latency_ms == 0.0 and not idle.bandwidth_hz.any()
    one = min_max_bandwidth(**{**inst, "loads": np.array([0, 4] + [0] * (len(inst["loads"]) - 2))})
    assert one.bandwidth_hz[1] == pytest.approx(inst["total_hz"], rel=1e-6)
    with pytest.raises(ValueError, match="total_hz"):
        min_max_bandwidth(**{**inst, "total_hz": 0.0})
    with pytest.raises(ValueError, match="method"):
        min_max_bandwidth(**inst, method="simplex")
