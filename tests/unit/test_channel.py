"""Channel model: path loss law, Shannon rate, determinism, fading statistics; trace round trip
and one-line errors naming file:line:column."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed.channel import (
    ChannelModel,
    dbm_to_w,
    read_trace,
    shannon_rate_bps,
    trace_rows,
    write_trace,
)
from testbed.errors import ConfigError


def test_shannon_rate_matches_formula_and_saturates() -> None:
    s = 1e9
    for b in (1e5, 1e6, 1e7):
        assert shannon_rate_bps(b, s) == pytest.approx(b * math.log2(1 + s / b), rel=1e-12)
    assert shannon_rate_bps(0.0, s) == 0.0
    # concave, increasing, bounded by s / ln 2
    r = shannon_rate_bps(np.array([1e6, 2e6, 4e6, 1e12]), s)
    assert np.all(np.diff(r) > 0) and r[-1] < s / math.log(2)
    assert r[1] - r[0] > (r[2] - r[1]) / 2


def test_gain_follows_path_loss_without_shadowing_or_fading() -> None:
    ch = ChannelModel(["a", "b", "c"], seed=3, shadowing_db=0.0, fading="none")
    pl = 128.1 + 37.6 * np.log10(ch.distance_m / 1000)
    np.testing.assert_allclose(10 * np.log10(ch.gains(0)), -pl, rtol=1e-12)
    n0 = dbm_to_w(-174 + 9)
    np.testing.assert_allclose(ch.snr_per_hz(0, "down"), dbm_to_w(30) * ch.gains(0) / n0)
    np.testing.assert_allclose(ch.snr_per_hz(0, "up"), dbm_to_w(23) * ch.gains(0) / n0)
    assert ch.rate_bps("b", 1e7, "down") == pytest.approx(
        1e7 * math.log2(1 + ch.snr_per_hz(0, "down")[1] / 1e7))


def test_positions_inside_cell_and_deterministic_per_seed_and_name() -> None:
    ch = ChannelModel(200, seed=1)
    assert np.all(ch.distance_m >= 10) and np.all(ch.distance_m <= 100)
    # uniform by area: about a quarter of the devices within half the radius
    assert 0.12 < np.mean(ch.distance_m < 50) < 0.38
    a, b = ChannelModel(["x", "y"], seed=5), ChannelModel(["y", "x", "z"], seed=5)
    assert a.distance_m[0] == b.distance_m[1] and a.shadowing_db[1] == b.shadowing_db[0]
    assert ChannelModel(["x"], seed=6).distance_m[0] != a.distance_m[0]
    np.testing.assert_array_equal(a.gains(7), ChannelModel(["x", "y"], seed=5).gains(7))


def test_block_fading_changes_per_epoch_with_unit_mean() -> None:
    ch = ChannelModel(4, seed=2)
    assert not np.allclose(ch.gains(0), ch.gains(1))
    np.testing.assert_array_equal(ch.gains(3), ch.gains(3))
    fad = np.array([ch.fading_gain(e) for e in range(3000)])
    assert fad.mean() == pytest.approx(1.0, abs=0.05)       # Exp(1)
    assert np.mean(fad < 1.0) == pytest.approx(1 - math.exp(-1), abs=0.03)


def test_shadowing_spread() -> None:
    ch = ChannelModel(2000, seed=0)
    assert np.std(ch.shadowing_db) == pytest.approx(8.0, rel=0.06)


def test_bad_parameters_rejected() -> None:
    with pytest.raises(ConfigError, match="fading"):
        ChannelModel(2, fading="rician")
    with pytest.raises(ConfigError, match="duplicate"):
        ChannelModel(["a", "a"])
    with pytest.raises(KeyError, match="unknown device"):
        ChannelModel(["a"]).rate_bps("b", 1e6)


def test_trace_round_trip(tmp_path) -> None:
    ch = ChannelModel(["d1", "d2"], seed=4)
    p = tmp_path / "trace.csv"
    rows = write_trace(p, ch, epochs=3, bandwidth_hz=20e6, epoch_s=0.5)
    assert p.read_text().splitlines()[0] == "time_s,device,rate_down_kbit,rate_up_kbit"
    back = read_trace(p)
    assert [(r.time_s, r.device) for r in back] == [(0.0, "d1"), (0.0, "d2"), (0.5, "d1"),
                                                  (0.5, "d2"), (1.0, "d1"), (1.0, "d2")]
    for a, b in zip(rows, back):
        assert b.rate_down_kbit == pytest.approx(a.rate_down_kbit, abs=1e-5)
    # an equal split of 20 MHz: 10 MHz each, epoch 1 fading
    assert back[2].rate_up_kbit == pytest.approx(ch.rate_bps("d1", 10e6, "up", epoch=1) / 1e3,
                                                 abs=1e-5)
    per = trace_rows(ch, 1, {"d2": 5e6})
    assert per[0].rate_down_kbit == 0.0 and per[1].rate_down_kbit > 0


@pytest.mark.parametrize("body, where", [
    ("time_s,device,rate_down\n", ":1:3: bad header"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,2\n0,b,x,2\n", ":3:3: rate_down_kbit"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,-2\n", ":2:4: rate_up_kbit"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,nan\n", ":2:4: rate_up_kbit"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1\n", ":2: expected 4 fields"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n1,a,1,1\n0,a,1,1\n", ":3:1: time_s"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n0,a,1,1\n0,a,1,1\n", ":3:2: device"),
    ("time_s,device,rate_down_kbit,rate_up_kbit\n0, ,1,1\n", ":2:2: device: empty"),
    ("", ":1: empty"),
])
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
