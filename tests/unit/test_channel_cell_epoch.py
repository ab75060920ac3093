"""The channel's per-epoch caches and :class:`testbed.net.channel.CellEpoch`: the WDMoE policies'
fast path gives exactly the numbers of :meth:`ChannelModel.rates_bps` and
:meth:`ChannelModel.min_max_bandwidth`, for any subset of the devices in any order, and the
caches never leak between epochs or into the arrays handed out."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.net.channel import PAPER_PARAMS, CellEpoch, ChannelModel

VARIANTS = [
    {},
    PAPER_PARAMS,
    {"se_model": "cqi"},
    {"se_model": "shannon"},
    {"fading": "rician", "snr_gap_db": 2.0},
    {"power_split": "none"},
    {"cqi_table": 2, "fading": "none"},
]


def _instances(count: int):
    for i in range(count):
        rng = np.random.default_rng([11, i])
        n = int(rng.integers(1, 10))
        ch = ChannelModel(n, int(rng.integers(0, 50)), **VARIANTS[i % len(VARIANTS)])
        index = rng.permutation(n)[: int(rng.integers(1, n + 1))].tolist()
        total = float(rng.choice([1e5, 2e6, 20e6, 100e6]))
        yield rng, ch, index, int(rng.integers(0, 1000)), total


def test_cell_epoch_rates_are_the_models() -> None:
    for rng, ch, index, epoch, total in _instances(200):
        bw = rng.dirichlet(np.ones(len(index))) * total * (rng.random(len(index)) < 0.7)
        cell = ch.cell_epoch(epoch, total, index)
        full = np.zeros(len(ch.devices))
        full[index] = bw
        down, up = cell.rates(bw.tolist())
        assert down == ch.rates_bps(full, "down", epoch, total_hz=total)[index].tolist()
        assert up == ch.rates_bps(full, "up", epoch, total_hz=total)[index].tolist()


def test_cell_epoch_min_max_is_the_models() -> None:
    for rng, ch, index, epoch, total in _instances(200):
        rows = rng.integers(0, 100, len(index)) * (rng.random(len(index)) < 0.8)
        bits_down = 8.0 * 8192 * rows
        bits_up = bits_down * rng.choice([0.0, 0.5, 1.0], len(index))
        fixed = np.where(rows > 0, rng.uniform(0.0, 3.0, len(index)) + 0.2 * rows, 0.0)
        full = [np.zeros(len(ch.devices)) for _ in range(3)]
        for f, a in zip(full, (bits_down, bits_up, fixed)):
            f[index] = a
        want = ch.min_max_bandwidth(*full, epoch, total)[index].tolist()
        cell = CellEpoch(ch, epoch, total, index)
        assert cell.min_max(bits_down.tolist(), bits_up.tolist(), fixed.tolist()) == want


def test_cell_epoch_without_a_cell_uses_the_models_methods() -> None:
    ch = ChannelModel(3, 1)
    cell = ch.cell_epoch(2, 0.0, [2, 0])
    assert cell.rates([1e6, 0.0]) == tuple(
        ch.rates_bps(np.array([0.0, 0.0, 1e6]), d, 2, total_hz=0.0)[[2, 0]].tolist()
        for d in ("down", "up")
    )
    with pytest.raises(ValueError, match="total_hz must be > 0"):
        cell.min_max([1.0, 0.0], [1.0, 0.0], [0.0, 0.0])


def test_caches_follow_the_epoch_and_hand_out_copies() -> None:
    params = {"fading": "rician", "se_model": "cqi"}
    ch, fresh = ChannelModel(5, 4, **params), ChannelModel(5, 4, **params)
    bw = np.array([1e6, 0.0, 3e6, 2e6, 4e6])
    for epoch in (3, 4, 3, 3, 9, 4):
        for d in ("down", "up"):
            got = ch.rates_bps(bw, d, epoch, total_hz=1e7)
            assert (
                got.tolist()
                == ChannelModel(5, 4, **params).rates_bps(bw, d, epoch, total_hz=1e7).tolist()
            )
            got[:] = -1.0  # the caller's to change
            s = ch.snr_per_hz(epoch, d)
            s[:] = -1.0
            x, cap = ch.rate_form(d, epoch, total_hz=1e7)
            x[:], cap[:] = -1.0, -1.0
            assert ch.snr_per_hz(epoch, d).tolist() == fresh.snr_per_hz(epoch, d).tolist()
            assert [a.tolist() for a in ch.rate_form(d, epoch, total_hz=1e7)] == [
                a.tolist() for a in fresh.rate_form(d, epoch, total_hz=1e7)
            ]
    bits = np.array([8e4, 0.0, 8e4, 1.6e5, 8e4])
    assert (
        ch.min_max_bandwidth(bits, bits, 1.0, 7, 1e7).tolist()
        == ChannelModel(5, 4, **params).min_max_bandwidth(bits, bits, 1.0, 7, 1e7).tolist()
    )


def test_spectral_efficiency_of_one_snr_is_the_arrays() -> None:
    snr = np.concatenate(
        [[0.0, 1e-300, np.inf], np.exp(np.random.default_rng(3).uniform(-10, 25, 2000))]
    )
    for kw in (
        {},
        {"se_model": "cqi"},
        {"se_model": "shannon"},
        {"snr_gap_db": 3.0},
        {"cqi_table": 2},
    ):
        ch = ChannelModel(1, **kw)
        assert [ch._se_scalar(s) for s in snr.tolist()] == ch.spectral_efficiency(snr).tolist()
