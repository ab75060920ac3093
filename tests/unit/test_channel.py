"""Channel model: TS 38.214 CQI tables and the spectral-efficiency cap, the downlink power split,
path loss, SNRs in a realistic range (against the earlier model's), rates increasing in
bandwidth, determinism, fading statistics, parameters named in errors; trace round trip and
one-line errors naming file:line:column."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from testbed.errors import ConfigError
from testbed.net.channel import (
    CHANNEL_DEFAULTS,
    CQI_TABLES,
    PAPER_PARAMS,
    ChannelModel,
    check_channel_params,
    dbm_to_w,
    read_trace,
    shannon_rate_bps,
    spectral_efficiency,
    trace_rows,
    write_trace,
)

#: a device 35 m from the BS with neither shadowing nor fading: the best channel of the cell
NEAR = {"cell_radius_m": 35.0, "shadowing_db": 0.0, "fading": "none"}


def test_shannon_rate_matches_formula_and_saturates() -> None:
    s = 1e9
    for b in (1e5, 1e6, 1e7):
        assert shannon_rate_bps(b, s) == pytest.approx(b * math.log2(1 + s / b), rel=1e-12)
    assert shannon_rate_bps(0.0, s) == 0.0
    # concave, increasing, bounded by s / ln 2
    r = shannon_rate_bps(np.array([1e6, 2e6, 4e6, 1e12]), s)
    assert np.all(np.diff(r) > 0) and r[-1] < s / math.log(2)
    assert r[1] - r[0] > (r[2] - r[1]) / 2


def test_cqi_tables_are_ts38214s() -> None:
    """Table 5.2.2.1-2 (64QAM) and 5.2.2.1-3 (256QAM): 15 entries each, efficiency = Q_m x code
    rate / 1024 to the table's 4 decimals, increasing, tops 5.5547 and 7.4063."""
    for table, top, qm_top in ((1, 5.5547, 6), (2, 7.4063, 8)):
        rows = CQI_TABLES[table]
        assert len(rows) == 15 and rows[-1][2] == top and rows[-1][0] == qm_top
        for qm, rate, eff in rows:
            assert eff == pytest.approx(qm * rate / 1024, abs=5e-5)
        assert all(a[2] < b[2] for a, b in itertools.pairwise(rows))
    assert CQI_TABLES[1][0] == CQI_TABLES[2][0] == (2, 78, 0.1523)


def test_spectral_efficiency_models() -> None:
    snr = 10.0 ** (np.array([-15.0, 0.0, 9.0, 20.0, 40.0]) / 10)
    shannon = np.log2(1 + snr)
    np.testing.assert_allclose(spectral_efficiency(snr, "shannon"), shannon)
    np.testing.assert_allclose(spectral_efficiency(snr, "capped", 1), np.minimum(shannon, 5.5547))
    np.testing.assert_allclose(spectral_efficiency(snr, "capped", 2), np.minimum(shannon, 7.4063))
    # 3.17 bit/s/Hz at 9 dB: CQI 10 of table 1 (2.7305) is the highest reached, CQI 11 (3.3223) not
    assert shannon[2] == pytest.approx(3.16, abs=0.01)
    np.testing.assert_allclose(
        spectral_efficiency(snr, "cqi", 1), [0.0, 0.8770, 2.7305, 5.5547, 5.5547]
    )
    np.testing.assert_allclose(
        spectral_efficiency(snr, "cqi", 2), [0.0, 0.8770, 2.7305, 6.2266, 7.4063]
    )
    # a 3 dB gap halves the SNR inside the log
    np.testing.assert_allclose(
        spectral_efficiency(snr, "shannon", snr_gap_db=10 * math.log10(2)), np.log2(1 + snr / 2)
    )


def test_gain_follows_path_loss_penetration_and_antenna_gain() -> None:
    ch = ChannelModel(["a", "b", "c"], seed=3, shadowing_db=0.0, fading="none", antenna_gain_db=3.0)
    pl = 128.1 + 37.6 * np.log10(ch.distance_m / 1000)
    np.testing.assert_allclose(10 * np.log10(ch.gains(0)), 3.0 - 20.0 - pl, rtol=1e-12)
    g = ch.gains(0)
    np.testing.assert_allclose(ch.snr_per_hz(0, "down"), dbm_to_w(46) * g / dbm_to_w(-174 + 9))
    np.testing.assert_allclose(ch.snr_per_hz(0, "up"), dbm_to_w(23) * g / dbm_to_w(-174 + 5))


def test_downlink_power_split_sums_to_bs_power_and_flat_psd() -> None:
    """The BS's 46 dBm is shared in proportion to bandwidth: the shares add up to it, and every
    device's SNR is P g / (N0 B_cell) however the cell is split; the uplink is each device's
    own 23 dBm over its own bandwidth."""
    ch = ChannelModel(4, seed=1)
    total = 20e6
    a = np.array([2e6, 4e6, 6e6, 8e6])
    b = np.array([5e6, 5e6, 5e6, 5e6])
    p = ch.tx_power_w(a, "down", total_hz=total)
    assert p.sum() == pytest.approx(dbm_to_w(46), rel=1e-12)
    np.testing.assert_allclose(p / p.sum(), a / total)
    n0_dev = dbm_to_w(-174 + 9)
    want = dbm_to_w(46) * ch.gains(0) / (n0_dev * total)
    for bw in (a, b):
        np.testing.assert_allclose(ch.snr(bw, "down", 0, total_hz=total), want, rtol=1e-12)
    np.testing.assert_allclose(ch.tx_power_w(a, "up", total_hz=total), dbm_to_w(23))
    np.testing.assert_allclose(
        ch.snr(a, "up", 0), dbm_to_w(23) * ch.gains(0) / (dbm_to_w(-174 + 5) * a)
    )
    for d in ("down", "up"):  # SNR = P_k g / (N0 B_k) with those powers
        np.testing.assert_allclose(
            ch.snr(a, d, 0, total_hz=total),
            ch.tx_power_w(a, d, total_hz=total) * ch.gains(0) / (ch.noise_w_hz[d] * a),
            rtol=1e-12,
        )
    # the default total is the bandwidths' sum; a scalar counts once per device
    np.testing.assert_allclose(ch.snr(a, "down", 0), want)
    np.testing.assert_allclose(ch.snr(5e6, "down", 0), want)
    # without the split every device gets the whole power (the paper's model)
    full = ChannelModel(4, seed=1, power_split="none")
    assert full.tx_power_w(a, "down", total_hz=total).sum() == pytest.approx(4 * dbm_to_w(46))
    np.testing.assert_allclose(full.snr(a, "down", 0), dbm_to_w(46) * ch.gains(0) / (n0_dev * a))


def _snr_db(
    params: dict,
    cell_hz: float,
    direction: str,
    devices: int = 4,
    seeds: int = 200,
    epochs: int = 25,
) -> tuple[np.ndarray, np.ndarray]:
    snr, rate = [], []
    for seed in range(seeds):
        ch = ChannelModel(devices, seed, **params)
        for ep in range(epochs):
            b = cell_hz / devices
            snr.append(ch.snr(b, direction, ep, total_hz=cell_hz))
            rate.append(ch.rates_bps(b, direction, ep, total_hz=cell_hz))
    return 10 * np.log10(np.concatenate(snr)), np.concatenate(rate)


@pytest.mark.parametrize("cell_mhz", [20, 100])
def test_snr_in_a_realistic_range_unlike_the_earlier_model(cell_mhz: int) -> None:
    """4 devices, equal split, 200 seeds x 25 epochs. The default downlink's median SNR lies in
    5-30 dB (the earlier model's: above 35 dB) and its median spectral efficiency is at most
    the CQI table's top (the earlier model's: 11-14 bit/s/Hz); the uplink is weaker still."""
    cell = cell_mhz * 1e6
    lines = []
    for name, params in (("default", {}), ("earlier", PAPER_PARAMS)):
        for direction in ("down", "up"):
            s, r = _snr_db(params, cell, direction)
            se = np.median(r) / (cell / 4)
            lines.append(
                f"{cell_mhz} MHz / 4 devices {name:<8}{direction:<5} SNR p5/p50/p95 "
                f"{np.percentile(s, 5):6.1f}/{np.median(s):5.1f}/"
                f"{np.percentile(s, 95):5.1f} dB, rate p50 {np.median(r) / 1e6:6.1f} "
                f"Mbit/s, {se:5.2f} bit/s/Hz"
            )
            if name == "default":
                assert se <= 5.5547 + 1e-9
                if direction == "down":
                    assert 5.0 <= np.median(s) <= 30.0
                else:
                    assert -5.0 <= np.median(s) <= 15.0
            else:
                assert np.median(s) > 25.0 and se > 9.0
    print("\n" + "\n".join(lines))


def test_cap_binds_at_high_snr() -> None:
    """At 35 m without shadowing or fading the downlink of a 20 MHz cell sees ~46 dB: the rate
    is the CQI table's top efficiency x bandwidth (5.5547, or 7.4063 with table 2), where pure
    Shannon would give ~15 bit/s/Hz."""
    b, cell = 5e6, 20e6
    ch = ChannelModel(4, **NEAR)
    assert np.all(10 * np.log10(ch.snr(b, "down", total_hz=cell)) > 40)
    np.testing.assert_allclose(ch.rates_bps(b, "down", total_hz=cell), 5.5547 * b)
    np.testing.assert_allclose(
        ChannelModel(4, cqi_table=2, **NEAR).rates_bps(b, "down", total_hz=cell), 7.4063 * b
    )
    np.testing.assert_allclose(
        ChannelModel(4, se_model="cqi", **NEAR).rates_bps(b, "down", total_hz=cell), 5.5547 * b
    )
    free = ChannelModel(4, se_model="shannon", **NEAR).rates_bps(b, "down", total_hz=cell)
    assert np.all(free > 14 * b)
    # far from the cap the capped and pure-Shannon rates agree
    low = {**NEAR, "cell_radius_m": 200.0, "min_distance_m": 200.0}
    np.testing.assert_allclose(
        ChannelModel(4, **low).rates_bps(b, "up", total_hz=cell),
        ChannelModel(4, se_model="shannon", **low).rates_bps(b, "up", total_hz=cell),
    )


@pytest.mark.parametrize(
    "params",
    [{}, {"se_model": "shannon"}, {"cqi_table": 2}, {"power_split": "none"}, {"snr_gap_db": 3.0}],
)
def test_rates_increase_with_bandwidth(params: dict) -> None:
    """In a fixed cell (the BS's power spread over it) a device's rate grows with its share,
    both ways, under the cap too: the uplink's SNR falls as its bandwidth grows, but not fast
    enough to lose rate."""
    cell = 100e6
    grid = np.geomspace(1e4, cell, 60)
    ch = ChannelModel(6, seed=9, **params)
    for direction in ("down", "up"):
        for ep in range(5):
            r = np.array([ch.rates_bps(b, direction, ep, total_hz=cell) for b in grid])  # [B, dev]
            assert np.all(np.diff(r, axis=0) > 0), (direction, ep)
    assert ch.rates_bps(0.0, "up", 0, total_hz=cell).tolist() == [0.0] * 6


def test_paper_params_give_the_earlier_models_rates() -> None:
    """PAPER_PARAMS: full BS power to every device, pure Shannon: B log2(1 + P g / (N0 B))."""
    ch = ChannelModel(["x", "y", "z"], seed=2, **PAPER_PARAMS)
    assert np.all((ch.distance_m >= 10) & (ch.distance_m <= 100))
    for direction in ("down", "up"):
        for b in (1e5, 2e6):
            np.testing.assert_allclose(
                ch.rates_bps(b, direction, 3),
                shannon_rate_bps(b, ch.snr_per_hz(3, direction)),
                rtol=1e-12,
            )
    np.testing.assert_allclose(
        ch.snr_per_hz(0, "down") / ch.snr_per_hz(0, "up"), dbm_to_w(30) / dbm_to_w(23)
    )


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"se_model": "shannon"},
        {"cqi_table": 2},
        {"power_split": "none"},
        {"snr_gap_db": 3.0},
        {"se_model": "cqi"},
    ],
)
def test_rate_form_is_the_rate_in_closed_form(params: dict) -> None:
    """B min(log2(1 + x/B), cap): the rate itself, or (uplink under "cqi") its envelope."""
    ch = ChannelModel(5, seed=8, **params)
    cell = 50e6
    for b in (np.full(5, 10e6), np.array([1e5, 2e6, 7e6, 15e6, 25.9e6])):
        for direction in ("down", "up"):
            x, cap = ch.rate_form(direction, 3, total_hz=cell)
            with np.errstate(divide="ignore"):
                form = b * np.minimum(np.log2(1 + x / b), cap)
            rate = ch.rates_bps(b, direction, 3, total_hz=cell)
            if params.get("se_model") == "cqi" and direction == "up":
                assert np.all(form >= rate) and np.any(form > rate)
            else:
                np.testing.assert_allclose(form, rate, rtol=1e-12)


def _latency_ms(
    ch: ChannelModel, bw: np.ndarray, bits: np.ndarray, fixed: np.ndarray, epoch: int, cell: float
) -> np.ndarray:
    down, up = (ch.rates_bps(bw, d, epoch, total_hz=cell) for d in ("down", "up"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bits > 0, fixed + 1e3 * (bits / down + bits / up), 0.0)


@pytest.mark.parametrize(
    "params",
    [{}, {"se_model": "shannon"}, {"power_split": "none"}, {"cqi_table": 2, "cell_radius_m": 60.0}],
)
@pytest.mark.parametrize("cell_mhz", [20, 100])
def test_min_max_bandwidth_equalises_the_loaded_devices(params: dict, cell_mhz: int) -> None:
    """At the channel's own rates: the budget used, idle devices given nothing, every loaded
    device done at the same time, and no shift of bandwidth between two devices does better."""
    cell = cell_mhz * 1e6
    ch = ChannelModel(6, seed=cell_mhz, **params)
    rows = np.array([40.0, 0.0, 10.0, 64.0, 25.0, 5.0])
    bits = 8 * 8192 * rows
    fixed = np.where(rows > 0, 1.0 + 0.3 * rows, 0.0)
    bw = ch.min_max_bandwidth(bits, bits, fixed, 2, cell)
    assert bw.sum() == pytest.approx(cell, rel=1e-6) and bw[1] == 0.0
    t = _latency_ms(ch, bw, bits, fixed, 2, cell)
    on = rows > 0
    np.testing.assert_allclose(t[on], t.max(), rtol=1e-6)
    assert t.max() < _latency_ms(ch, np.full(6, cell / 6), bits, fixed, 2, cell).max()
    for i, j in itertools.permutations(np.flatnonzero(on), 2):
        moved = bw.copy()
        moved[i] -= 0.01 * bw[i]
        moved[j] += 0.01 * bw[i]
        assert _latency_ms(ch, moved, bits, fixed, 2, cell).max() > t.max()


def test_min_max_bandwidth_agrees_with_the_latency_models_for_the_paper_channel() -> None:
    """Under PAPER_PARAMS the rates are the latency model's B log2(1 + s/B): both solvers give
    the same split."""
    from testbed.policy.bandwidth import min_max_bandwidth

    ch = ChannelModel(5, seed=4, **PAPER_PARAMS)
    rows = np.array([30.0, 12.0, 0.0, 50.0, 7.0])
    a, b = np.array([1.0, 2.0, 1.0, 0.5, 3.0]), 0.2
    al = min_max_bandwidth(rows, 2e6, ch.snr_per_hz(6, "down"), ch.snr_per_hz(6, "up"), 8192, a, b)
    bits = 8 * 8192 * rows
    bw = ch.min_max_bandwidth(bits, bits, np.where(rows > 0, a + b * rows, 0.0), 6, 2e6)
    np.testing.assert_allclose(bw, al.bandwidth_hz, rtol=1e-6)


def test_min_max_bandwidth_without_any_rate_or_load() -> None:
    ch = ChannelModel(3, seed=1)
    assert ch.min_max_bandwidth(np.zeros(3), np.zeros(3), 1.0, 0, 1e6).tolist() == [0.0] * 3
    # a downlink no CQI reaches (SNR below CQI 1): no split helps, the loaded devices share
    dead = ChannelModel(3, seed=1, se_model="cqi", bs_power_dbm=-80.0)
    bits = np.array([1e5, 0.0, 1e5])
    np.testing.assert_allclose(dead.min_max_bandwidth(bits, bits, 0.0, 0, 1e6), [5e5, 0, 5e5])
    with pytest.raises(ValueError, match="total_hz"):
        ch.min_max_bandwidth(bits, bits, 0.0, 0, 0.0)


def test_positions_inside_cell_and_deterministic_per_seed_and_name() -> None:
    ch = ChannelModel(400, seed=1)
    assert np.all(ch.distance_m >= 35) and np.all(ch.distance_m <= 200)
    # uniform by area in the annulus: (100^2 - 35^2) / (200^2 - 35^2) = 0.23 within 100 m
    assert 0.16 < np.mean(ch.distance_m < 100) < 0.30
    a, b = ChannelModel(["x", "y"], seed=5), ChannelModel(["y", "x", "z"], seed=5)
    assert a.distance_m[0] == b.distance_m[1] and a.shadowing_db[1] == b.shadowing_db[0]
    assert ChannelModel(["x"], seed=6).distance_m[0] != a.distance_m[0]
    np.testing.assert_array_equal(a.gains(7), ChannelModel(["x", "y"], seed=5).gains(7))


def test_rates_deterministic_per_seed_and_epoch() -> None:
    def rates(seed: int, epoch: int, fading: str = "rayleigh") -> list[float]:
        ch = ChannelModel(["d0", "d1", "d2"], seed, fading=fading)
        return [
            *ch.rates_bps(5e6, "down", epoch, total_hz=20e6),
            *ch.rates_bps(5e6, "up", epoch, total_hz=20e6),
        ]

    for fading in ("rayleigh", "rician"):
        assert rates(4, 2, fading) == rates(4, 2, fading)
        assert rates(4, 2, fading) != rates(5, 2, fading)
        assert rates(4, 2, fading) != rates(4, 3, fading)


def test_block_fading_changes_per_epoch_with_unit_mean() -> None:
    ch = ChannelModel(4, seed=2)
    assert not np.allclose(ch.gains(0), ch.gains(1), rtol=1e-3, atol=0)
    np.testing.assert_array_equal(ch.gains(3), ch.gains(3))
    fad = np.array([ch.fading_gain(e) for e in range(3000)])
    assert fad.mean() == pytest.approx(1.0, abs=0.05)  # Exp(1)
    assert np.mean(fad < 1.0) == pytest.approx(1 - math.exp(-1), abs=0.03)


def test_rician_fading_unit_mean_and_k_factor_spread() -> None:
    """|h|^2 of Rician fading with K: mean 1, variance (1 + 2K) / (1 + K)^2 (0.21 at 9 dB)."""
    ch = ChannelModel(8, seed=3, fading="rician", rician_k_db=9.0)
    fad = np.array([ch.fading_gain(e) for e in range(4000)]).ravel()
    k = 10**0.9
    assert fad.mean() == pytest.approx(1.0, abs=0.02)
    assert fad.var() == pytest.approx((1 + 2 * k) / (1 + k) ** 2, rel=0.08)
    assert ChannelModel(8, seed=3, fading="rician", rician_k_db=30.0).fading_gain(
        0
    ) == pytest.approx(1.0, abs=0.2)  # K -> inf: no fading


def test_shadowing_spread() -> None:
    ch = ChannelModel(2000, seed=0)
    assert np.std(ch.shadowing_db) == pytest.approx(8.0, rel=0.06)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fading", "nakagami", "channel.fading: must be one of rayleigh, rician, none"),
        ("power_split", "even", "channel.power_split: must be one of bandwidth, none"),
        ("se_model", "mcs", "channel.se_model: must be one of capped, cqi, shannon"),
        ("cqi_table", 3, "channel.cqi_table: must be one of 1, 2"),
        ("cqi_table", True, "channel.cqi_table: must be one of 1, 2"),
        ("bs_power_dbm", "46dBm", "channel.bs_power_dbm: must be a finite number (dBm)"),
        ("device_power_dbm", math.nan, "channel.device_power_dbm: must be a finite number"),
        ("shadowing_db", -1.0, "channel.shadowing_db: must be >= 0 (dB)"),
        ("snr_gap_db", -3, "channel.snr_gap_db: must be >= 0"),
        ("cell_radius_m", 0, "channel.cell_radius_m: must be > 0 (m)"),
        ("min_distance_m", 300.0, "channel.min_distance_m: must be <= cell_radius_m (200)"),
        ("pathloss_slope_db", 0.0, "channel.pathloss_slope_db: must be > 0"),
        ("bs_noise_figure_db", -1, "channel.bs_noise_figure_db: must be >= 0"),
    ],
)
def test_bad_parameters_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        ChannelModel(2, **{key: value})
    assert len(ei.value.problems) == 1 and ei.value.problems[0].startswith(message), (
        ei.value.problems
    )


def test_parameter_checks_and_defaults() -> None:
    assert set(CHANNEL_DEFAULTS) == set(ChannelModel(1).params)
    assert CHANNEL_DEFAULTS["bs_power_dbm"] == 46.0 and CHANNEL_DEFAULTS["cqi_table"] == 1
    assert check_channel_params(CHANNEL_DEFAULTS) == []
    assert check_channel_params({"radius": 5})[0][0] == "radius"
    assert "unknown channel parameter" in check_channel_params({"radius": 5})[0][1]
    # keys checked one by one (a sweep's single value) skip the cross-key check
    assert check_channel_params({"min_distance_m": 500.0}, complete=False) == []
    with pytest.raises(ConfigError, match="duplicate"):
        ChannelModel(["a", "a"])
    with pytest.raises(KeyError, match="unknown device"):
        ChannelModel(["a"]).rate_bps("b", 1e6)
    with pytest.raises(ValueError, match="direction"):
        ChannelModel(["a"]).rates_bps(1e6, "sideways")


def test_trace_round_trip(tmp_path) -> None:
    ch = ChannelModel(["d1", "d2"], seed=4)
    p = tmp_path / "trace.csv"
    rows = write_trace(p, ch, epochs=3, bandwidth_hz=20e6, epoch_s=0.5)
    assert p.read_text().splitlines()[0] == "time_s,device,rate_down_kbit,rate_up_kbit"
    back = read_trace(p)
    assert [(r.time_s, r.device) for r in back] == [
        (0.0, "d1"),
        (0.0, "d2"),
        (0.5, "d1"),
        (0.5, "d2"),
        (1.0, "d1"),
        (1.0, "d2"),
    ]
    for a, b in zip(rows, back):
        assert b.rate_down_kbit == pytest.approx(a.rate_down_kbit, abs=1e-5)
    # an equal split of 20 MHz: 10 MHz each, epoch 1 fading
    assert back[2].rate_up_kbit == pytest.approx(
        ch.rate_bps("d1", 10e6, "up", epoch=1) / 1e3, abs=1e-5
    )
    assert back[2].rate_down_kbit == pytest.approx(
        ch.rate_bps("d1", 10e6, "down", epoch=1, total_hz=20e6) / 1e3, abs=1e-5
    )
    per = trace_rows(ch, 1, {"d2": 5e6})
    assert per[0].rate_down_kbit == 0.0 and per[1].rate_down_kbit > 0
    # the BS's power spread over a 20 MHz cell rather than over the 5 MHz in use
    wide = trace_rows(ch, 1, {"d2": 5e6}, total_hz=20e6)
    assert wide[1].rate_down_kbit == pytest.approx(
        ch.rate_bps("d2", 5e6, "down", 0, total_hz=20e6) / 1e3
    )
    assert wide[1].rate_up_kbit == per[1].rate_up_kbit


@pytest.mark.parametrize(
    "body, where",
    [
        ("time_s,device,rate_down\n", ":1:3: bad header"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,2\n0,b,x,2\n", ":3:3: rate_down_kbit"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,-2\n", ":2:4: rate_up_kbit"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,nan\n", ":2:4: rate_up_kbit"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1\n", ":2: expected 4 fields"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n1,a,1,1\n0,a,1,1\n", ":3:1: time_s"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,1\n0,a,1,1\n", ":3:2: device"),
        ("time_s,device,rate_down_kbit,rate_up_kbit\n0, ,1,1\n", ":2:2: device: empty"),
        ("", ":1: empty"),
    ],
)
def test_trace_errors_name_file_line_column(tmp_path, body: str, where: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(ConfigError) as ei:
        read_trace(p)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{p}{where}"), msg


def test_trace_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_trace(tmp_path / "nope.csv")
