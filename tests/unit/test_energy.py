"""Energy meters: parsers on sysfs trees and tegrastats lines built from the documented layouts,
trapezoid integration and RAPL wrap-around against hand-computed values, detection order and
fallbacks. Fixture trees are built under tmp_path by the helpers below; nothing touches the
host's own /sys except the last test, which reads what this host really has."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from device_agent.energy import (
    METER_KINDS,
    CpuTimeEstimate,
    MeterOptions,
    MeterUnavailable,
    PowerSampler,
    Reading,
    SampledMeter,
    TegrastatsMeter,
    choose_rails,
    detect_meter,
    energy_between,
    find_ina3221_hwmon,
    find_ina3221_iio,
    find_rapl_zones,
    parse_tegrastats,
    rapl_delta,
    trapezoid,
)

S = 1_000_000_000  # ns per s

# ---- fixture trees ------------------------------------------------------------------------


def _w(p: Path, text: str | int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"{text}\n")


def make_hwmon_chip(
    root: Path, chip: str, hwmon_n: int, channels: list[tuple[str, int, int]], sum_channel: bool
) -> Path:
    """One INA3221 under the hwmon driver (JetPack 5/6): ``channels`` = [(label, mV, mA)] for
    channels 1..3; shunt voltages in4..in6 (no labels); with ``sum_channel`` the summation
    channel as the upstream driver has it (in7 'sum of shunt voltages', curr4)."""
    hw = root / "sys/bus/i2c/drivers/ina3221" / chip / "hwmon" / f"hwmon{hwmon_n}"
    _w(hw / "name", "ina3221")
    for n, (label, mv, ma) in enumerate(channels, start=1):
        _w(hw / f"in{n}_label", label)
        _w(hw / f"in{n}_input", mv)
        _w(hw / f"in{n}_enable", 1)
        _w(hw / f"curr{n}_input", ma)
        _w(hw / f"curr{n}_crit", 32760)
        _w(hw / f"curr{n}_max", 32760)
        _w(hw / f"shunt{n}_resistor", 5000)
        _w(hw / f"in{n + 3}_input", ma * 5)  # shunt voltage, µV
    if sum_channel:
        _w(hw / "in7_label", "sum of shunt voltages")
        _w(hw / "in7_input", sum(ma for _, _, ma in channels) * 5)
        _w(hw / "curr4_input", sum(ma for _, _, ma in channels))
        _w(hw / "curr4_crit", 32760)
    _w(hw / "update_interval", 6432)
    return hw


def agx_orin(root: Path, jetpack: int) -> None:
    """AGX Orin: two chips, no module-total rail. JetPack 6 numbers hwmon differently."""
    n0, n1 = (2, 3) if jetpack == 5 else (1, 4)
    make_hwmon_chip(
        root,
        "1-0040",
        n0,
        [("VDD_GPU_SOC", 5000, 800), ("VDD_CPU_CV", 5000, 400), ("VIN_SYS_5V0", 5000, 700)],
        sum_channel=jetpack == 6,
    )
    make_hwmon_chip(
        root,
        "1-0041",
        n1,
        [("NC", 0, 0), ("VDDQ_VDD2_1V8AO", 5000, 100), ("NC", 0, 0)],
        sum_channel=jetpack == 6,
    )


def orin_nx(root: Path, jetpack: int, vdd_in_ma: int = 1234) -> Path:
    """Orin NX / Orin Nano: one chip with VDD_IN (module total) and two of its parts."""
    return make_hwmon_chip(
        root,
        "1-0040",
        1 if jetpack == 5 else 3,
        [("VDD_IN", 5080, vdd_in_ma), ("VDD_CPU_GPU_CV", 5070, 100), ("VDD_SOC", 5070, 250)],
        sum_channel=jetpack == 6,
    )


def xavier_nx_jp4(root: Path) -> None:
    """JetPack 4, IIO ina3221x driver: rail_name_N and in_power N _input (mW)."""
    dev = root / "sys/bus/i2c/drivers/ina3221x/7-0040/iio:device0"
    for n, (name, mw) in enumerate([("VDD_IN", 4859), ("VDD_CPU_GPU_CV", 612), ("VDD_SOC", 1143)]):
        _w(dev / f"rail_name_{n}", name)
        _w(dev / f"in_power{n}_input", mw)
        _w(dev / f"in_current{n}_input", mw * 1000 // 5000)
        _w(dev / f"in_voltage{n}_input", 5000)


def rapl_tree(root: Path, package_uj: list[int], max_uj: int = 262143328850) -> Path:
    """powercap: package zones, a core sub-zone of package 0 and a psys zone."""
    pc = root / "sys/class/powercap"
    for i, uj in enumerate(package_uj):
        _w(pc / f"intel-rapl:{i}/name", f"package-{i}")
        _w(pc / f"intel-rapl:{i}/energy_uj", uj)
        _w(pc / f"intel-rapl:{i}/max_energy_range_uj", max_uj)
    _w(pc / "intel-rapl:0:0/name", "core")
    _w(pc / "intel-rapl:0:0/energy_uj", 5)
    _w(pc / "intel-rapl:0:0/max_energy_range_uj", max_uj)
    _w(pc / f"intel-rapl:{len(package_uj)}/name", "psys")
    _w(pc / f"intel-rapl:{len(package_uj)}/energy_uj", 7)
    _w(pc / f"intel-rapl:{len(package_uj)}/max_energy_range_uj", max_uj)
    return pc


NO_HOST = {"only": ["ina3221", "rapl", "estimated"]}  # kinds that read only under root


# ---- pure functions -----------------------------------------------------------------------


def test_trapezoid_hand_computed():
    pts = [(0, 10.0), (1 * S, 20.0), (3 * S, 20.0)]
    assert trapezoid(pts) == pytest.approx(15.0 + 40.0)  # (10+20)/2·1 + 20·2
    # window 0.5..2 s: p(0.5)=15 → (15+20)/2·0.5 + 20·1
    assert trapezoid(pts, int(0.5 * S), 2 * S) == pytest.approx(8.75 + 20.0)
    assert trapezoid(pts, 0, 3 * S) == pytest.approx(55.0)
    assert trapezoid([(5, 100.0)]) == 0.0
    assert trapezoid([]) == 0.0


def test_trapezoid_rejects_bad_input():
    with pytest.raises(ValueError, match="out of time order"):
        trapezoid([(2 * S, 1.0), (1 * S, 1.0)])
    with pytest.raises(ValueError, match="not within"):
        trapezoid([(0, 1.0), (S, 1.0)], 0, 2 * S)


@pytest.mark.parametrize(
    "prev, cur, max_range, want",
    [
        (100, 250, 1000, 150),
        (900, 50, 1000, 150),  # wrapped once: 1000 - 900 + 50
        (0, 1000, 1000, 1000),
        (1000, 0, 1000, 0),  # max and 0 are the same point of the circle
        (262143000000, 1000000, 262143328850, 1328850),
        (5, 5, 1000, 0),
    ],
)
def test_rapl_delta_hand_computed(prev, cur, max_range, want):
    assert rapl_delta(prev, cur, max_range) == want


def test_rapl_delta_rejects_out_of_range():
    with pytest.raises(ValueError):
        rapl_delta(10, 2000, 1000)
    with pytest.raises(ValueError):
        rapl_delta(0, 0, 0)


def test_energy_between():
    a, b = Reading(1 * S, 10.0, 5.0), Reading(3 * S, 14.5, None)
    assert energy_between(a, b) == pytest.approx(4.5)
    with pytest.raises(ValueError, match="before"):
        energy_between(b, a)
    with pytest.raises(ValueError, match="different meters"):
        energy_between(Reading(1, 9.0, None), Reading(2, 3.0, None))


# ---- tegrastats ---------------------------------------------------------------------------

JP5_ORIN_NX = (
    "RAM 2452/7620MB (lfb 1070x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[624] "
    "VIC_FREQ 729 APE 174 CV0@-256C CPU@44.875C SOC2@43.156C SOC0@43.875C CV1@-256C "
    "GPU@-256C tj@44.875C SOC1@43.062C CV2@-256C "
    "VDD_IN 3860mW/3921mW VDD_CPU_GPU_CV 480mW/502mW VDD_SOC 1201mW/1199mW"
)
JP6_AGX_ORIN = (
    "06-18-2024 10:11:12 RAM 5020/62841MB (lfb 3x4MB) SWAP 0/31421MB (cached 0MB) "
    "CPU [2%@1728,1%@1728,0%@1728,0%@1728,3%@1728,0%@1728,0%@1728,0%@1728] "
    "EMC_FREQ 0%@3199 GR3D_FREQ 0%@[0,0] NVENC off NVDEC off VIC_FREQ 0%@115 "
    "APE 174 cpu@46.5C soc2@44.1C soc0@45.2C gpu@43.9C tj@46.5C soc1@44.6C "
    "VDD_GPU_SOC 2791mW/2800mW VDD_CPU_CV 798mW/810mW VIN_SYS_5V0 3328mW/3330mW "
    "VDDQ_VDD2_1V8AO 503mW/505mW"
)
JP7_THOR = (
    "10-02-2025 09:00:01 RAM 9630/125772MB (lfb 46x4MB) SWAP 0/0MB (cached 0MB) "
    "CPU [0%@972,1%@972,0%@972,0%@972] cpu@47.218C tj@49.375C soc012@48.0C "
    "VDD_GPU 1200mW/1100mW/2400mW VDD_CPU_SOC_MSS 6510mW/6420mW/8800mW "
    "VIN_SYS_5V0 6520mW/6500mW/7000mW VIN 23040mW/22950mW/25000mW"
)
JP4_NANO = (
    "RAM 1745/3964MB (lfb 4x4MB) SWAP 0/1982MB (cached 0MB) CPU [5%@1479,3%@1479,"
    "3%@1479,7%@1479] EMC_FREQ 0% GR3D_FREQ 0% PLL@40C CPU@43C GPU@40.5C "
    "POM_5V_IN 4859/4899 POM_5V_GPU 0/0 POM_5V_CPU 1184/1210"
)


def test_tegrastats_jp5_orin_nx():
    r = parse_tegrastats(JP5_ORIN_NX)
    assert r == {
        "VDD_IN": (3860.0, 3921.0),
        "VDD_CPU_GPU_CV": (480.0, 502.0),
        "VDD_SOC": (1201.0, 1199.0),
    }
    assert choose_rails(list(r)) == ["VDD_IN"]


def test_tegrastats_jp6_agx_orin_has_no_total_rail():
    r = parse_tegrastats(JP6_AGX_ORIN)
    assert list(r) == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert r["VIN_SYS_5V0"] == (3328.0, 3330.0)
    assert choose_rails(list(r)) == list(r)  # the sum of every rail


def test_tegrastats_jp7_three_values_second_is_the_average():
    r = parse_tegrastats(JP7_THOR)
    assert r["VDD_GPU"] == (1200.0, 1100.0)  # instant, average since start; peak dropped
    assert r["VDD_CPU_SOC_MSS"] == (6510.0, 6420.0)
    assert r["VIN"] == (23040.0, 22950.0)
    assert choose_rails(list(r)) == ["VIN"]
    assert "RAM" not in r and "SWAP" not in r


def test_tegrastats_jp4_without_units_and_non_power_fields():
    r = parse_tegrastats(JP4_NANO)
    assert r == {
        "POM_5V_IN": (4859.0, 4899.0),
        "POM_5V_GPU": (0.0, 0.0),
        "POM_5V_CPU": (1184.0, 1210.0),
    }
    assert parse_tegrastats("RAM 2452/7620MB SWAP 0/3810MB (cached 0MB)") == {}


def test_tegrastats_meter_from_a_running_process(tmp_path):
    """A stand-in tegrastats (prints the JP5 Orin NX line every --interval ms) as a real
    process: the meter integrates VDD_IN's instant value, 3.860 W."""
    fake = tmp_path / "tegrastats"
    fake.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        ms = int(sys.argv[sys.argv.index("--interval") + 1])
        while True:
            print({JP5_ORIN_NX!r}, flush=True)
            time.sleep(ms / 1000)
        """)
    )
    fake.chmod(0o755)
    with detect_meter(
        tmp_path, {"only": ["ina3221", "tegrastats"], "tegrastats_argv": [str(fake)]}
    ) as m:
        assert isinstance(m, TegrastatsMeter)
        assert m.source == "tegrastats:VDD_IN" and m.rails == ["VDD_IN"]
        assert "ina3221" in m.skipped
        deadline = time.monotonic() + 5
        while m.sampler.samples < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        a = m.read()
        time.sleep(0.45)
        b = m.read()
    assert b.t_ns > a.t_ns and b.power_w == pytest.approx(3.86)
    assert energy_between(a, b) == pytest.approx(3.86 * (b.t_ns - a.t_ns) / S, rel=1e-9)
    assert m.proc.poll() is not None  # closed: the process is gone


# ---- INA3221 trees ------------------------------------------------------------------------


@pytest.mark.parametrize("jetpack", [5, 6])
def test_hwmon_orin_nx_reports_vdd_in_alone(tmp_path, jetpack):
    orin_nx(tmp_path, jetpack)
    rails = find_ina3221_hwmon(tmp_path)
    assert [r.name for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # no sum channel
    assert rails[0].read_w() == pytest.approx(5080 * 1234 / 1e6)  # 6.26872 W
    with detect_meter(tmp_path, NO_HOST) as m:
        assert m.source == "ina3221-hwmon:VDD_IN" and m.rails == ["VDD_IN"]
        assert not m.estimated
        assert m.read().power_w == pytest.approx(6.26872)


@pytest.mark.parametrize("jetpack", [5, 6])
def test_hwmon_agx_orin_sums_connected_rails(tmp_path, jetpack):
    agx_orin(tmp_path, jetpack)
    rails = find_ina3221_hwmon(tmp_path)
    want = ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert [r.name for r in rails] == want  # NC channels and the sum channel left out
    assert {r.chip for r in rails} == {"1-0040", "1-0041"}
    with detect_meter(tmp_path, NO_HOST) as m:
        assert m.rails == want
        assert m.source == "ina3221-hwmon:" + "+".join(want)
        assert m.read().power_w == pytest.approx(4.0 + 2.0 + 3.5 + 0.5)


def test_hwmon_meter_integrates_changing_power(tmp_path):
    """0.1 s at 5.08 W, then 0.5 s at 10.16 W: the step is off the window's middle, so the
    sampled integral (5.588 J for those times) is far from what the end readings alone give
    (their mean power x time: 4.572 J; the last power x time: 6.096 J)."""
    hw = orin_nx(tmp_path, 5, vdd_in_ma=1000)  # 5.08 W
    tmp = hw / "curr1_input.new"
    with detect_meter(tmp_path, {**NO_HOST, "sample_period_s": 0.02}) as m:
        assert isinstance(m, SampledMeter)
        a = m.read()
        time.sleep(0.1)
        tmp.write_text("2000\n")
        t0 = time.monotonic_ns()
        tmp.replace(hw / "curr1_input")  # atomic: no sample reads a half-written file
        t1 = time.monotonic_ns()  # 10.16 W from now on
        time.sleep(0.5)
        b = m.read()
        assert m.sampler.samples >= 15  # the thread samples, not just read()
        assert m.sampler.errors == 0
    e = energy_between(a, b)
    t_step = (t0 + t1) // 2
    want = (5.08 * (t_step - a.t_ns) + 10.16 * (b.t_ns - t_step)) / S
    assert b.power_w == pytest.approx(10.16)
    # the trapezoid smears the step over the gap between the samples around it: 2.54 W x gap
    # at most; 0.25 J allows a 100 ms gap (5 periods) and still excludes 4.572 J and 6.096 J
    assert e == pytest.approx(want, abs=0.25)


def test_iio_jetpack4_tree(tmp_path):
    xavier_nx_jp4(tmp_path)
    rails = find_ina3221_iio(tmp_path)
    assert [r.name for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert rails[0].read_w() == pytest.approx(4.859)
    assert find_ina3221_hwmon(tmp_path) == []
    with detect_meter(tmp_path, NO_HOST) as m:
        assert m.source == "ina3221-iio:VDD_IN" and m.read().power_w == pytest.approx(4.859)


def test_hwmon_unreadable_value_is_skipped_with_reason(tmp_path):
    hw = orin_nx(tmp_path, 6)
    (hw / "in1_input").write_text("garbage\n")
    with detect_meter(tmp_path, NO_HOST) as m:
        assert m.source != "ina3221-hwmon:VDD_IN"
        assert "ValueError" in m.skipped["ina3221"]


# ---- sampler ------------------------------------------------------------------------------


def test_power_sampler_trapezoid_with_fake_clock_and_a_failed_read():
    clock = iter([0, S // 10, 3 * S // 10])
    powers: list[object] = [10.0, 20.0, OSError("EIO"), 0.0]

    def read() -> float:
        v = powers.pop(0)
        if isinstance(v, Exception):
            raise v
        return float(v)  # type: ignore[arg-type]

    s = PowerSampler(read, 0.05, clock=lambda: next(clock))
    assert s.sample().energy_j == 0.0
    assert s.sample().energy_j == pytest.approx(1.5)  # (10+20)/2 · 0.1
    r = s.sample()  # failed: last reading again
    assert (r.t_ns, r.energy_j) == (S // 10, pytest.approx(1.5)) and s.errors == 1
    assert "EIO" in (s.last_error or "")
    assert s.sample().energy_j == pytest.approx(1.5 + 2.0)  # (20+0)/2 · 0.2
    assert s.add(0, 99.0).energy_j == pytest.approx(3.5)  # older than the last: dropped


def test_power_sampler_thread_rate_and_clean_stop():
    s = PowerSampler(lambda: 2.0, 0.05).start()
    first = s.reading()
    time.sleep(0.5)
    s.stop()
    assert not s.running
    n, last = s.samples, s.reading()
    assert n >= 5, f"{n} samples in 0.5 s at a 0.05 s period (10 Hz would give 5)"
    assert last.energy_j == pytest.approx(2.0 * (last.t_ns - first.t_ns) / S)
    time.sleep(0.15)
    assert s.samples == n  # stopped means stopped


def test_power_sampler_refuses_slower_than_10_hz():
    with pytest.raises(ValueError, match="10 Hz"):
        PowerSampler(lambda: 1.0, 0.2)


# ---- RAPL ---------------------------------------------------------------------------------


def test_rapl_zones_and_wraparound(tmp_path):
    pc = rapl_tree(tmp_path, [1_000_000, 5_000_000], max_uj=10_000_000)
    zones = find_rapl_zones(tmp_path)
    assert [z.name for z in zones] == ["package-0", "package-1"]  # no core sub-zone, no psys
    with detect_meter(tmp_path, {"only": ["rapl"], "rapl_poll_s": 60}) as m:
        assert m.source == "rapl:package-0+package-1"
        (pc / "intel-rapl:0/energy_uj").write_text("9000000\n")  # +8 J
        (pc / "intel-rapl:1/energy_uj").write_text("6000000\n")  # +1 J
        assert m.read().energy_j == pytest.approx(9.0)
        (pc / "intel-rapl:0/energy_uj").write_text("500000\n")  # wrapped: +1.5 J
        r = m.read()
        assert r.energy_j == pytest.approx(10.5)
        assert r.power_w is not None and r.power_w > 0


def test_rapl_unreadable_says_why(tmp_path):
    pc = tmp_path / "sys/class/powercap/intel-rapl:0"
    _w(pc / "name", "package-0")
    _w(pc / "max_energy_range_uj", 1000)  # energy_uj missing (as if not readable)
    with pytest.raises(MeterUnavailable, match="energy_uj"):
        find_rapl_zones(tmp_path)


# ---- estimate and detection ---------------------------------------------------------------


def test_cpu_time_estimate_hand_computed():
    cpu = iter([10.0, 10.0, 12.5])
    m = CpuTimeEstimate(core_w=4.0, cpu_time_s=lambda: next(cpu))
    assert m.source == "estimated:cpu-time" and m.estimated
    assert m.read().energy_j == 0.0
    assert m.read().energy_j == pytest.approx(2.5 * 4.0)
    assert m.describe()["energy_source"] == "estimated"
    with pytest.raises(ValueError):
        CpuTimeEstimate(core_w=0)


def test_empty_tree_falls_back_to_estimate_with_reasons(tmp_path):
    with detect_meter(tmp_path, {**NO_HOST, "cpu_core_w": 3.0}) as m:
        assert isinstance(m, CpuTimeEstimate) and m.estimated
        assert m.source == "estimated:cpu-time" and m.core_w == 3.0
        assert set(m.skipped) == {"ina3221", "rapl"}
        assert all(m.skipped.values())


def test_detection_order_prefers_ina3221_over_rapl(tmp_path):
    orin_nx(tmp_path, 6)
    rapl_tree(tmp_path, [0])
    with detect_meter(tmp_path, NO_HOST) as m:
        assert m.source.startswith("ina3221-hwmon")
    with detect_meter(tmp_path, {"only": ["rapl", "estimated"]}) as m:
        assert m.source == "rapl:package-0"


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown energy meter option"):
        MeterOptions.from_mapping({"sample_hz": 20})
    with pytest.raises(ValueError, match="unknown meter kind"):
        detect_meter("/", {"only": ["joulescope"]})
    with pytest.raises(MeterUnavailable, match="rapl"):
        detect_meter("/nonexistent-root", {"only": ["rapl"]})


def test_this_host(tmp_path):
    """What this host really has: here (no Jetson rails, no NVML, no readable RAPL) that is the
    estimate, with a reason for every meter above it; elsewhere a measured meter."""
    with detect_meter() as m:
        a = m.read()
        sum(i * i for i in range(200_000))  # some CPU time for the estimate to see
        b = m.read()
        if m.estimated:
            assert m.source == "estimated:cpu-time"
            assert list(m.skipped) == list(METER_KINDS[:-1]), m.skipped
            assert energy_between(a, b) > 0
        else:
            assert list(m.skipped) == list(METER_KINDS[: len(m.skipped)])
            assert energy_between(a, b) >= 0


def test_cli_prints_json(capsys):
    from device_agent.energy import main

    assert (
        main(
            [
                "--seconds",
                "0.2",
                "--every-s",
                "0.1",
                "--root",
                "/nonexistent-root",
                "--meter",
                "rapl",
                "--meter",
                "estimated",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["meter"]["source"] == "estimated:cpu-time"
    assert "rapl" in lines[0]["meter"]["skipped"]
    assert all({"t_ns", "energy_j", "power_w"} <= set(x) for x in lines[1:-1])
    assert lines[-1]["seconds"] >= 0.2 and lines[-1]["energy_j"] >= 0
