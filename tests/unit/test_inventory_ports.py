"""Inventory names and ports (issue 20): device host names resolved to IPv4 for the tc filters
(or refused naming the field), the fixed ports of the agent, its status feed and the link probe,
and the wheelhouse key."""

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.lab.inventory import (
    AGENT_PORT,
    PROBE_PORT,
    STATUS_PORT,
    load_inventory,
    render_inventory,
    resolve_ipv4,
)
from testbed.lab.runner import LocalRunner
from testbed.net.verify import shaper_for

INV = """
[testbed]
name = "lab"
{testbed}
[bs]
name = "bs"
host = "10.9.0.1"
interface = "eth1"
{bs}
[[devices]]
name = "d0"
host = "{host0}"
ssh_user = "u"
workdir = "/w"
python = "/usr/bin/python3"
hw_class = "orin-nx"
memory_budget_mb = 8000
{dev0}
[[devices]]
name = "d1"
host = "10.9.0.12"
ssh_user = "u"
workdir = "/w"
python = "/usr/bin/python3"
hw_class = "orin-nx"
memory_budget_mb = 8000
"""


def write(tmp_path: Path, host0: str = "10.9.0.11", **kw: str) -> Path:
    p = tmp_path / "inv.toml"
    fields = {"testbed": "", "bs": "", "dev0": "", **kw}
    p.write_text(INV.format(host0=host0, **fields))
    return p


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_inventory(path)
    return ei.value.problems


def test_resolve_ipv4():
    assert resolve_ipv4("localhost") == "127.0.0.1"
    with pytest.raises(ValueError, match=r"'orin9\.invalid' does not resolve to an IPv4 address"):
        resolve_ipv4("orin9.invalid")


def test_a_device_name_is_resolved_for_the_tc_filters_and_stays_the_ssh_host(tmp_path):
    inv = load_inventory(write(tmp_path, host0="localhost"))
    d0, d1 = inv.devices
    assert (d0.host, d0.ipv4, d0.address) == ("localhost", "127.0.0.1", "127.0.0.1")
    assert (d1.host, d1.ipv4, d1.address) == ("10.9.0.12", None, "10.9.0.12")
    assert inv.to_dict()["devices"][0]["ipv4"] == "127.0.0.1"  # recorded in run manifests
    # the shaper matches the addresses, never the names (u32 match ip dst ADDR/32)
    assert shaper_for(inv, LocalRunner()).addrs == ["127.0.0.1", "10.9.0.12"]


def test_two_devices_at_one_address_cannot_be_shaped(tmp_path):
    """Loading allows it (provisioning tests put two devices on one host), shaping does not:
    the second device's class would see no traffic while its rate read back as enforced."""
    path = write(tmp_path, host0="10.9.0.12")
    inv = load_inventory(path)
    with pytest.raises(ConfigError) as ei:
        shaper_for(inv, LocalRunner())
    assert str(ei.value) == (
        f"{path}: devices 'd0' and 'd1' share the address 10.9.0.12: the BS's tc filters "
        "tell devices apart by address"
    )


@pytest.mark.parametrize(
    "host0, msg",
    [
        (
            "orin9.invalid",
            "devices[0].host: 'orin9.invalid' does not resolve to an IPv4 address (",
        ),
        ("fd00::11", "devices[0].host: 'fd00::11' is an IPv6 address: the BS's tc filters"),
    ],
)
def test_unresolvable_or_ipv6_hosts_are_refused_naming_file_and_field(tmp_path, host0, msg):
    p = write(tmp_path, host0=host0)
    got = problems(p)
    assert len(got) == 1 and got[0].startswith(f"{p}: {msg}"), got


def test_ports_are_fixed_by_default_and_configurable(tmp_path):
    inv = load_inventory(write(tmp_path))
    d = inv.devices[0]
    assert (d.agent_port, d.status_port, d.probe_port) == (5555, 5556, 5557)
    assert (AGENT_PORT, STATUS_PORT, PROBE_PORT, inv.bs.probe_port) == (5555, 5556, 5557, 5557)
    p = write(
        tmp_path,
        bs="probe_port = 6001",
        dev0="agent_port = 7001\nstatus_port = 0\nprobe_port = 7003",
    )
    inv = load_inventory(p)
    d = inv.devices[0]
    assert (d.agent_port, d.status_port, d.probe_port, inv.bs.probe_port) == (7001, 0, 7003, 6001)
    again = tmp_path / "again.toml"
    again.write_text(
        render_inventory("lab", "", inv.bs, list(inv.devices)).replace('known_hosts = ""\n', "")
    )
    back = load_inventory(again)
    assert back.devices == inv.devices and back.bs == inv.bs


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"dev0": "status_port = 70000"}, "devices[0].status_port: must be an integer port"),
        ({"dev0": "probe_port = true"}, "devices[0].probe_port: must be an integer port"),
        ({"bs": 'probe_port = "5557"'}, "bs.probe_port: must be an integer port"),
        (
            {"dev0": "status_port = 5555"},
            "devices[0].status_port: 5555 is also devices[0].agent_port",
        ),
        (
            {"dev0": "agent_port = 6000\nprobe_port = 6000"},
            "devices[0].probe_port: 6000 is also devices[0].agent_port",
        ),
        ({"testbed": 'wheelhouse = "nowhere"'}, "testbed.wheelhouse: "),
    ],
)
def test_bad_ports_and_wheelhouse_are_refused_naming_file_and_field(tmp_path, kw, msg):
    p = write(tmp_path, **kw)
    got = problems(p)
    assert len(got) == 1 and got[0].startswith(f"{p}: {msg}"), got


def test_wheelhouse_resolves_against_the_inventory_folder(tmp_path):
    (tmp_path / "wh").mkdir()
    inv = load_inventory(write(tmp_path, testbed='wheelhouse = "wh"'))
    assert inv.wheelhouse == str(tmp_path / "wh") and inv.to_dict()["wheelhouse"] == inv.wheelhouse
    assert load_inventory(write(tmp_path)).wheelhouse is None


def test_the_link_probe_listens_on_the_inventory_ports(tmp_path):
    from testbed.net.verify import probe_port

    inv = load_inventory(write(tmp_path, bs="probe_port = 6001", dev0="probe_port = 7003"))
    assert probe_port(inv, inv.devices[0], "down") == 7003
    assert probe_port(inv, inv.devices[0], "up") == 6001
    assert probe_port(inv, inv.devices[1], "down") == PROBE_PORT
    inv = load_inventory(write(tmp_path, dev0="probe_port = 0"))
    assert 20000 <= probe_port(inv, inv.devices[0], "down") <= 59999  # 0: a random port
