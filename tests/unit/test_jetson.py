"""Jetson power-mode parsers on fixture text written from the documented formats of
``nvpmodel -q``, ``nvpmodel -p --verbose`` and ``jetson_clocks --show``; the mode resolution
that a recipe's ``devices.power_mode`` goes through; and the query script on this host."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.lab.jetson import (
    PowerMode,
    parse_jetson_clocks_show,
    parse_nvpmodel_modes,
    parse_nvpmodel_query,
    power_info_from_output,
    query_power,
    resolve_power_mode,
    split_sections,
)
from testbed.lab.runner import LocalRunner

Q_AGX = "NV Power Mode: MAXN\n0\n"
Q_NANO_WARN = (
    "NVPM WARN: Golden image context is already created\n"
    "NVPM WARN: Reading /var/lib/nvpmodel/status: No such file or directory\n"
    "NV Power Mode: 7W\n1\n"
)

P_AGX = (
    "NVPM VERB: Config file: /etc/nvpmodel.conf\n"
    "NVPM VERB: parsing done for /etc/nvpmodel.conf\n"
    "NVPM VERB: POWER_MODEL: ID=0 NAME=MAXN\n"
    "NVPM VERB: PARAM CPU_ONLINE: ARG CORE_0: PATH /sys/devices/system/cpu/cpu0/online: "
    "REAL_VAL: 1 CONF_VAL: 1\n"
    "NVPM VERB: PARAM GPU: ARG MAX_FREQ: PATH /sys/devices/gpu.0/devfreq/17000000.ga10b/max_freq: "
    "REAL_VAL: 1300500000 CONF_VAL: 2147483647\n"
    "NVPM VERB: POWER_MODEL: ID=1 NAME=MODE_15W\n"
    "NVPM VERB: PARAM CPU_ONLINE: ARG CORE_4: PATH /sys/devices/system/cpu/cpu4/online: "
    "REAL_VAL: 1 CONF_VAL: 0\n"
    "NVPM VERB: POWER_MODEL: ID=2 NAME=MODE_30W\n"
    "NVPM VERB: POWER_MODEL: ID=3 NAME=MODE_50W\n"
    "NVPM VERB: Current mode: NV Power Mode: MODE_30W\n"
    "2\n"
)

P_NANO = """NVPM VERB: Config file: /etc/nvpmodel.conf
NVPM VERB: POWER_MODEL: ID=0 NAME=15W
NVPM VERB: POWER_MODEL: ID=1 NAME=7W
NVPM VERB: Current mode: NV Power Mode: 15W
0
"""

CLOCKS_OFF = (
    "SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit\n"
    "Online CPUs: 0-11\n"
    "cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=1420800 "
    "IdleStates: WFI=1 c7=1\n"
    "cpu1: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=729600 "
    "IdleStates: WFI=1 c7=1\n"
    "GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000\n"
    "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=2133000000 FreqOverride=0\n"
    "FAN Dynamic Speed control=active hwmon4_pwm1=35\n"
    "NV Power Mode: MAXN\n"
)

CLOCKS_ON = (
    "SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit\n"
    "Online CPUs: 0-11\n"
    "cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 "
    "IdleStates: WFI=0 c7=0\n"
    "cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 "
    "IdleStates: WFI=0 c7=0\n"
    "GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000\n"
    "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1\n"
    "NV Power Mode: MAXN\n"
)


def test_query_current_mode():
    assert parse_nvpmodel_query(Q_AGX) == PowerMode(0, "MAXN")
    assert parse_nvpmodel_query(Q_NANO_WARN) == PowerMode(1, "7W")
    assert parse_nvpmodel_query(P_AGX) == PowerMode(2, "MODE_30W")  # "Current mode:" line
    assert parse_nvpmodel_query("bash: nvpmodel: command not found\n") is None
    assert parse_nvpmodel_query("NV Power Mode: MAXN\n") is None  # no id after it


def test_modes_listing_maps_names_and_ids_per_module():
    assert parse_nvpmodel_modes(P_AGX) == [
        PowerMode(0, "MAXN"),
        PowerMode(1, "MODE_15W"),
        PowerMode(2, "MODE_30W"),
        PowerMode(3, "MODE_50W"),
    ]
    assert parse_nvpmodel_modes(P_NANO) == [PowerMode(0, "15W"), PowerMode(1, "7W")]
    assert parse_nvpmodel_modes("") == []
    with pytest.raises(ValueError, match="twice"):
        parse_nvpmodel_modes("POWER_MODEL: ID=0 NAME=A\nPOWER_MODEL: ID=0 NAME=B\n")


def test_jetson_clocks_show():
    off = parse_jetson_clocks_show(CLOCKS_OFF)
    assert off["pinned"] is False and off["cpus"] == 2 and off["cpus_pinned"] == 0
    assert off["gpu"] == {"min_hz": 306000000, "max_hz": 1300500000, "cur_hz": 306000000}
    assert off["power_mode"] == "MAXN"
    on = parse_jetson_clocks_show(CLOCKS_ON)
    assert on["cpus_pinned"] == 2 and on["gpu"]["min_hz"] == on["gpu"]["max_hz"]
    assert on["pinned"] is True  # EMC held at its maximum by FreqOverride=1
    # one CPU left at its governor's range: not pinned
    half = CLOCKS_ON.replace(
        "cpu1: Online=1 Governor=schedutil MinFreq=2201600",
        "cpu1: Online=1 Governor=schedutil MinFreq=729600",
    )
    assert parse_jetson_clocks_show(half)["pinned"] is False
    assert parse_jetson_clocks_show(half)["cpus_pinned"] == 1
    no_override = CLOCKS_ON.replace("FreqOverride=1", "FreqOverride=0")
    assert parse_jetson_clocks_show(no_override)["pinned"] is False
    assert parse_jetson_clocks_show("nothing here")["pinned"] is None


def _script_output(query: tuple[str, str], modes: tuple[str, str], clocks: tuple[str, str]) -> str:
    out = []
    for name, (st, body) in (("query", query), ("modes", modes), ("clocks", clocks)):
        out.append(f"@@moe-testbed begin {name}")
        if st != "missing":
            out.append(body.rstrip("\n"))
        out.append(f"@@moe-testbed end {name} {st}")
    return "\n".join(out) + "\n"


def test_power_info_from_the_query_script_output():
    text = _script_output(("0", Q_AGX), ("0", P_AGX), ("0", CLOCKS_OFF))
    assert split_sections(text)["query"] == ("0", Q_AGX.rstrip("\n"))
    info = power_info_from_output(text)
    assert info["nvpmodel"] == {
        "available": True,
        "mode": "MAXN",
        "mode_id": 0,
        "modes": {"0": "MAXN", "1": "MODE_15W", "2": "MODE_30W", "3": "MODE_50W"},
    }
    assert info["jetson_clocks"]["available"] and info["jetson_clocks"]["pinned"] is False
    none = power_info_from_output(_script_output(("missing", ""), ("missing", ""), ("missing", "")))
    assert none == {
        "nvpmodel": {"available": False, "reason": "not installed"},
        "jetson_clocks": {"available": False, "reason": "not installed"},
    }
    denied = power_info_from_output(
        _script_output(
            ("0", Q_AGX),
            ("1", "NVPM ERROR: failed to open /etc/nvpmodel.conf"),
            ("1", "Error: jetson_clocks must be run as root"),
        )
    )
    assert denied["nvpmodel"]["mode"] == "MAXN"
    assert (
        denied["nvpmodel"]["modes_error"] == "exit 1: NVPM ERROR: failed to open /etc/nvpmodel.conf"
    )
    assert denied["jetson_clocks"] == {
        "available": True,
        "error": "exit 1: Error: jetson_clocks must be run as root",
    }


def test_resolve_power_mode_by_name_or_id_and_errors_name_device_and_key():
    agx = power_info_from_output(_script_output(("0", Q_AGX), ("0", P_AGX), ("0", CLOCKS_OFF)))
    nano = power_info_from_output(
        _script_output(("0", Q_NANO_WARN), ("0", P_NANO), ("missing", ""))
    )
    key = "r.toml: devices.power_mode"
    assert resolve_power_mode(agx, "maxn", "orin1", key) == 0
    assert resolve_power_mode(agx, "MODE_50W", "orin1", key) == 3
    assert resolve_power_mode(nano, "7W", "nano1", key) == 1
    assert resolve_power_mode(nano, 0, "nano1", key) == 0
    with pytest.raises(ConfigError) as e:
        resolve_power_mode(nano, "MAXN", "nano1", key)
    assert (
        str(e.value)
        == "r.toml: devices.power_mode: nano1: no nvpmodel mode 'MAXN' (has 0=15W, 1=7W)"
    )
    missing = power_info_from_output(
        _script_output(("missing", ""), ("missing", ""), ("missing", ""))
    )
    with pytest.raises(ConfigError) as e:
        resolve_power_mode(missing, "MAXN", "dev1", key)
    assert str(e.value) == (
        "r.toml: devices.power_mode: dev1: has no nvpmodel (not installed); "
        "cannot set power mode 'MAXN'"
    )
    assert len(str(e.value).splitlines()) == 1


def test_query_on_this_host_reports_absent_tools_as_not_available():
    import shutil

    info = query_power(LocalRunner())
    assert set(info) == {"nvpmodel", "jetson_clocks"}
    for tool, key in (("nvpmodel", "nvpmodel"), ("jetson_clocks", "jetson_clocks")):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            assert info[key] == {"available": False, "reason": "not installed"}, info
        else:
            assert info[key]["available"] is True
