"""Inventory validation: every problem on its own line, naming the file and the field."""

import json
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.lab.inventory import load_inventory, parse_inventory, render_inventory
from tests.conftest import run_cli, run_main

GOOD = """
[testbed]
name = "lab"
[bs]
name = "bs"
host = "192.168.50.1"
interface = "eth1"
[[devices]]
name = "orin1"
host = "192.168.50.11"
ssh_user = "nvidia"
ssh_key = "KEY"
workdir = "/home/nvidia/tb"
python = "/usr/bin/python3"
hw_class = "orin-agx"
memory_budget_mb = 24000
[[devices]]
name = "orin2"
host = "localhost"
ssh_port = 2222
ssh_user = "nvidia"
workdir = "/home/nvidia/tb"
python = "/usr/bin/python3"
hw_class = "orin-nx"
memory_budget_mb = 12000
"""


@pytest.fixture
def key(tmp_path):
    k = tmp_path / "id_test"
    k.write_text("not really a key, only needs to be readable")
    return k


def write(tmp_path, text, key):
    p = tmp_path / "inv.toml"
    p.write_text(text.replace("KEY", str(key)))
    return p


def test_good_inventory_loads(tmp_path, key):
    inv = load_inventory(write(tmp_path, GOOD, key))
    assert [d.name for d in inv.devices] == ["orin1", "orin2"]
    assert inv.devices[1].ssh_port == 2222 and inv.devices[1].ssh_key is None
    assert inv.devices[0].ssh_key == str(key)
    assert inv.bs.local and inv.bs.ifb == "ifb-tb0"
    # CURVE by default, keys beside the inventory; a relative keys_dir resolves against it
    assert inv.security == "curve" and inv.curve_dir() == tmp_path / "inv.keys"
    other = load_inventory(
        write(
            tmp_path,
            GOOD.replace('name = "lab"', 'name = "lab"\nsecurity = "none"\nkeys_dir = "k"'),
            key,
        )
    )
    assert other.security == "none" and other.curve_dir() == tmp_path / "k"
    # round trip through the renderer used by `local up`
    again = tmp_path / "again.toml"
    again.write_text(render_inventory("lab", str(key), inv.bs, list(inv.devices)))
    assert load_inventory(again).devices == inv.devices


BAD = (
    GOOD.replace("ssh_port = 2222", "ssh_port = 99999")
    .replace('name = "orin2"', 'name = "orin1"')
    .replace('hw_class = "orin-agx"\n', 'hw_class = "orin-agx"\ncolour = "blue"\n')
    .replace('interface = "eth1"\n', "")
    .replace('ssh_key = "KEY"', 'ssh_key = "/nonexistent/key"')
)


def test_all_problems_reported_with_file_and_field(tmp_path, key):
    p = write(tmp_path, BAD, key)
    with pytest.raises(ConfigError) as ei:
        load_inventory(p)
    problems = ei.value.problems
    expect = {
        "bs.interface": "missing required field",
        "devices[1].ssh_port": "1..65535",
        "devices[1].name": "duplicate device name 'orin1'",
        "devices[0].colour": "unknown key",
        "devices[0].ssh_key": "cannot read /nonexistent/key",
    }
    for field, words in expect.items():
        hits = [x for x in problems if x.startswith(f"{p}: {field}: ")]
        assert len(hits) == 1 and words in hits[0], (field, problems)
    assert len(problems) == len(expect), problems


def test_cli_bad_inventory_exit_2_one_line_each(tmp_path, key, monkeypatch, capsys):
    p = write(tmp_path, BAD, key)
    res = run_cli("inventory", "check", str(p))  # the real entry point, in a subprocess
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 5 and all(ln.startswith(f"error: {p}: ") for ln in lines), lines
    rc, out, _ = run_main(monkeypatch, capsys, "inventory", "check", str(p), "--format", "json")
    assert rc == 2
    assert len(json.loads(out)["error"]["messages"]) == 5


@pytest.mark.parametrize(
    "mutate,field",
    [
        (
            lambda s: s.replace("memory_budget_mb = 12000", "memory_budget_mb = -5"),
            "devices[1].memory_budget_mb",
        ),
        (
            lambda s: s.replace('hw_class = "orin-nx"', 'hw_class = "toaster"'),
            "devices[1].hw_class",
        ),
        (lambda s: s.replace('host = "localhost"', 'host = "not a host!"'), "devices[1].host"),
        (
            lambda s: s.replace(
                'workdir = "/home/nvidia/tb"\npython = "/usr/bin/python3"\nhw_class = "orin-nx"',
                'workdir = "rel/dir"\npython = "/usr/bin/python3"\nhw_class = "orin-nx"',
            ),
            "devices[1].workdir",
        ),
        (lambda s: s + "\n[extra]\nx = 1\n", "extra"),
        (lambda s: s.replace("[bs]", "[bs]\nlocal = false"), "bs.ssh_user"),
        (lambda s: s.replace('name = "lab"', 'name = "lab"\nsecurity = "tls"'), "testbed.security"),
        (lambda s: s.replace('name = "lab"', 'name = "lab"\nkeys_dir = 3'), "testbed.keys_dir"),
    ],
)
def test_single_problems(tmp_path, key, mutate, field):
    p = write(tmp_path, mutate(GOOD), key)
    with pytest.raises(ConfigError) as ei:
        load_inventory(p)
    assert [x for x in ei.value.problems if x.startswith(f"{p}: {field}: ")], ei.value.problems


def test_toml_syntax_error_names_file(tmp_path, monkeypatch, capsys):
    p = tmp_path / "broken.toml"
    p.write_text("[bs\nname=")
    rc, _, err = run_main(monkeypatch, capsys, "inventory", "check", str(p))
    assert rc == 2 and f"error: {p}: TOML syntax" in err


def test_no_devices(tmp_path):
    with pytest.raises(ConfigError, match="devices: missing"):
        parse_inventory(
            {"bs": {"name": "bs", "host": "10.0.0.1", "interface": "eth0"}}, Path("x.toml")
        )
