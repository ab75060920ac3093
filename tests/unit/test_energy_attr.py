"""Energy attribution at the BS (testbed.dataplane.energy_attr) on hand-computed numbers, and the
meter side it relies on: now_j, extrapolation, labels (device_agent.energy)."""

from __future__ import annotations

import pytest

from device_agent.energy import CpuTimeEstimate, Reading, extrapolate_j
from testbed.dataplane.energy_attr import (
    call_energy_j,
    request_energy,
    source_class,
    split_call_energy,
)

EST = "estimated:cpu-time(5 W/core)"


def test_call_energy_from_stamps():
    assert call_energy_j([10.0, 10.25]) == pytest.approx(0.25)
    assert call_energy_j((3, 3)) == 0.0
    for bad in (
        None,
        [],
        [1.0],
        [1.0, 2.0, 3.0],
        [2.0, 1.0],
        ["1", 2.0],
        [1.0, float("nan")],
        [True, 2.0],
        "12",
    ):
        assert call_energy_j(bad) is None, bad


def test_split_by_compute_time_adds_up():
    got = split_call_energy(
        0.9, ["L0.E1", "L0.E2", "L0.E3"], {"L0.E1": 1.0, "L0.E2": 2.0, "L0.E3": 0.0}
    )
    assert got == pytest.approx({"L0.E1": 0.3, "L0.E2": 0.6, "L0.E3": 0.0})
    assert sum(got.values()) == pytest.approx(0.9)
    # no (usable) compute times: equal shares
    assert split_call_energy(1.0, ["a", "b"], {}) == {"a": 0.5, "b": 0.5}
    assert split_call_energy(1.0, ["a", "b"], {"a": "x", "b": -3}) == {"a": 0.5, "b": 0.5}
    assert split_call_energy(1.0, [], {"a": 1.0}) == {}


def test_source_class():
    assert source_class(["measured:nvml:gpu0", "measured:ina3221-hwmon:VDD_IN"]) == "measured"
    assert source_class([EST, EST]) == "estimated"
    assert source_class(["measured:nvml:gpu0", EST]) == "mixed"
    assert source_class([]) == "unavailable"


def test_request_energy_sums_device_deltas_and_bs():
    before = {"dev1": 100.0, "dev2": 50.0, "dev3": 7.0}
    after = {"dev1": 101.5, "dev2": 50.25, "dev3": 7.0}
    got = request_energy(before, after, dict.fromkeys(before, EST), 20.0, 20.75, EST)
    assert got["energy_devices_j"] == pytest.approx(1.75)
    assert got["energy_bs_j"] == pytest.approx(0.75)
    assert got["energy_j"] == pytest.approx(2.5)
    assert got["energy_source"] == "estimated"


def test_request_energy_names_missing_devices_and_mixed_sources():
    got = request_energy(
        {"dev1": 1.0, "dev2": 5.0},
        {"dev1": 3.0, "dev2": None},
        {"dev1": "measured:nvml:gpu0", "dev2": EST},
        0.0,
        0.5,
        EST,
    )
    assert got["energy_devices_j"] == pytest.approx(2.0) and got["energy_j"] == pytest.approx(2.5)
    assert got["energy_source"] == "mixed; missing dev2"
    # a counter that went down (an agent restarted in between) is not a negative energy
    got = request_energy({"dev1": 9.0}, {"dev1": 1.0}, {"dev1": EST}, 0.0, 0.5, EST)
    assert got["energy_devices_j"] is None and got["energy_j"] is None
    assert got["energy_bs_j"] == pytest.approx(0.5)
    assert got["energy_source"] == "estimated; no device counter"
    got = request_energy({"dev1": 1.0}, {"dev1": 2.0}, {"dev1": EST}, None, 1.0, EST)
    assert got["energy_j"] is None and got["energy_devices_j"] == 1.0
    assert got["energy_source"] == "estimated; no BS meter"


def test_extrapolation_holds_the_last_power_for_a_bounded_time():
    r = Reading(t_ns=1_000_000_000, energy_j=10.0, power_w=4.0)
    assert extrapolate_j(r, 1_500_000_000) == pytest.approx(12.0)
    assert extrapolate_j(r, 900_000_000) == 10.0  # before the sample: the sample itself
    assert extrapolate_j(r, 61_000_000_000) == pytest.approx(14.0)  # at most 1 s of power
    assert extrapolate_j(Reading(5, 3.0, None), 10**12) == 3.0


def test_cpu_estimate_now_j_and_label():
    t = [100.0]
    m = CpuTimeEstimate(core_w=7.5, cpu_time_s=lambda: t[0])
    t[0] = 100.4
    assert m.now_j() == pytest.approx(3.0)
    assert m.read().energy_j == pytest.approx(3.0)
    assert m.energy_source == "estimated:cpu-time(7.5 W/core)"
    assert m.describe()["label"] == m.energy_source


def test_sampled_meter_latest_and_now_j_do_not_touch_the_source():
    from device_agent.energy import SampledMeter

    calls = [0]

    def read_w() -> float:
        calls[0] += 1
        return 2.0

    m = SampledMeter("test:rail", ["rail"], read_w, period_s=0.1)
    try:
        m.sampler.stop()  # no background samples: count only what latest/now_j would cause
        n = calls[0]
        r = m.latest()
        assert r == m.sampler.latest and r.power_w == 2.0
        assert m.now_j() >= r.energy_j
        assert calls[0] == n
        assert m.read().t_ns >= r.t_ns and calls[0] == n + 1  # read() asks the source
        assert m.energy_source == "measured:test:rail"
    finally:
        m.close()
