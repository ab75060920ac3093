"""``testbed init``'s pure parts (inventory text, sudoers lines, host keys and fingerprints) and
the narrowed sudo: which commands need root, and the command line sent over SSH."""

from __future__ import annotations

import fnmatch
import subprocess

import pytest

from testbed.errors import ConfigError
from testbed.lab import init as I
from testbed.lab.inventory import BaseStation, Device, load_inventory
from testbed.lab.runner import needs_root, remote_command
from tests.conftest import run_main

PATHS = {"tc": "/usr/sbin/tc", "ip": "/usr/sbin/ip", "ethtool": "/usr/sbin/ethtool"}


@pytest.mark.parametrize(
    ("argv", "root"),
    [
        (["tc", "-j", "qdisc", "show", "dev", "eth0"], False),
        (["tc", "-s", "class", "show", "dev", "eth0"], False),
        (["tc", "class", "show", "dev", "eth0"], False),
        (["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb"], True),
        (["tc", "qdisc", "del", "dev", "eth0", "root"], True),
        (["ip", "link", "show", "dev", "ifb0"], False),
        (["ip", "link", "set", "dev", "ifb0", "alias", "x"], True),
        (["ip", "link", "add", "ifb0", "type", "ifb"], True),
        (["ip", "netns", "exec", "ns", "true"], True),
        (["ethtool", "-k", "eth0"], False),
        (["ethtool", "-K", "eth0", "gso", "off"], True),
    ],
)
def test_needs_root_reads_run_as_the_user(argv, root):
    assert needs_root(argv) is root


def test_remote_timeout_wraps_sudo_not_the_other_way():
    line = remote_command(["tc", "-batch", "-"], 15, sudo=True)
    assert line == "timeout -k 2 15 sudo -n tc -batch -"
    assert remote_command(["uname"], 5) == "timeout -k 2 5 uname"


def test_sudoers_lines_name_each_command_and_skip_root():
    line = I.sudoers_line("lab", I.BS_COMMANDS, PATHS)
    assert line == (
        "lab ALL=(root) NOPASSWD: /usr/sbin/tc -batch -, /usr/sbin/tc -j -batch -, "
        "/usr/sbin/ip link add *, /usr/sbin/ip link set *, /usr/sbin/ip link del *, "
        "/usr/sbin/ethtool -K *"
    )
    dev_paths = {"nvpmodel": "/usr/sbin/nvpmodel", "jetson_clocks": "/usr/bin/jetson_clocks"}
    text = I.sudoers_text("lab", ["nvidia", "root", "nvidia"], PATHS, dev_paths)
    rules = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert rules == [
        line,
        (
            "nvidia ALL=(root) NOPASSWD: /usr/sbin/nvpmodel -q, /usr/sbin/nvpmodel -p --verbose, "
            "/usr/sbin/nvpmodel -m [0-9], /usr/sbin/nvpmodel -m [0-9][0-9], "
            "/usr/bin/jetson_clocks --show"
        ),
    ]
    assert [ln for ln in I.sudoers_text("root", ["root"], PATHS, dev_paths).splitlines()
            if not ln.startswith("#")] == []  # fmt: skip
    with pytest.raises(ConfigError, match="^--user: not a user name"):
        I.sudoers_line("bad user", I.BS_COMMANDS, PATHS)
    with pytest.raises(ConfigError, match="^--bs-user: not a user name"):
        I.sudoers_text("bad user", [], PATHS, dev_paths)


def test_power_mode_rule_admits_a_mode_number_only():
    """sudoers' ``*`` matches spaces too: ``-m [0-9]*`` would let ``-m 0 -f FILE`` (a config
    that writes any path as root) through; the rules take one or two digits only."""
    rules = [args for tool, args in I.DEVICE_COMMANDS if tool == "nvpmodel"]
    for ok in ("-m 0", "-m 7", "-m 15", "-q", "-p --verbose"):
        assert any(fnmatch.fnmatchcase(ok, r) for r in rules), ok
    for bad in ("-m 0 -f /tmp/evil.conf", "-m 100", "-m x", "-m 1 --force"):
        assert not any(fnmatch.fnmatchcase(bad, r) for r in rules), bad


def test_inventory_values_with_control_characters_refused():
    with pytest.raises(ConfigError, match="control characters"):
        I._q("/home/nvidia\n[bs]")
    assert I._q('a"b') == '"a\\"b"'


def test_tool_path_prefers_overrides_then_secure_path():
    assert I.tool_path("tc", True, {"tc": "/opt/tc"}) == "/opt/tc"
    assert I.tool_path("nvpmodel", False) == "/usr/sbin/nvpmodel"
    assert I.tool_path("tc", True).endswith("/tc") and I.tool_path("tc", True).startswith("/")


def test_fingerprints_of_real_keys_pair_with_their_lines(tmp_path):
    for kind in ("ed25519", "ecdsa"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(tmp_path / kind)], check=True
        )
    lines = [
        "10.0.0.1 " + " ".join((tmp_path / f"{k}.pub").read_text().split()[:2])
        for k in ("ed25519", "ecdsa")
    ]
    scan = "# 10.0.0.1:22 SSH-2.0-OpenSSH\n" + "\n".join(lines) + "\n"
    assert I.keyscan_lines(scan) == lines
    listing = subprocess.run(
        ["ssh-keygen", "-lf", "-"], input="\n".join(lines) + "\n", capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    keys = I.with_fingerprints("dev1", lines, listing)
    assert [(k.key_type, k.bits) for k in keys] == [("ED25519", 256), ("ECDSA", 256)]
    assert all(k.fingerprint.startswith("SHA256:") and k.line in lines for k in keys)
    with pytest.raises(ConfigError, match="2 fingerprints for 1 keys"):
        I.with_fingerprints("dev1", lines[:1], listing)
    with pytest.raises(ConfigError, match="cannot read fingerprint"):
        I.parse_fingerprints("not a listing")


def test_known_hosts_merge_skips_known_and_refuses_a_changed_key():
    existing = "10.0.0.1 ssh-ed25519 AAAA1\n|1|hashed= ssh-ed25519 AAAA9\n"
    add, bad = I.merge_known_hosts(
        existing,
        ["10.0.0.1 ssh-ed25519 AAAA1", "10.0.0.2 ssh-ed25519 AAAA2", "10.0.0.2 ssh-ed25519 AAAA2"],
    )
    assert add == ["10.0.0.2 ssh-ed25519 AAAA2"] and bad == []
    add, bad = I.merge_known_hosts(existing, ["10.0.0.1 ssh-ed25519 OTHER"])
    assert add == [] and len(bad) == 1 and "ssh-keygen -R '10.0.0.1' -f FILE" in bad[0]
    assert I.known_hosts_name("h", 22) == "h" and I.known_hosts_name("h", 2222) == "[h]:2222"


def test_device_specs():
    assert I.parse_device_specs(["10.0.0.11,10.0.0.12", "orin3=10.0.0.13"]) == [
        ("dev1", "10.0.0.11"),
        ("dev2", "10.0.0.12"),
        ("orin3", "10.0.0.13"),
    ]
    with pytest.raises(ConfigError, match="given twice"):
        I.parse_device_specs(["a=10.0.0.1", "a=10.0.0.2"])
    with pytest.raises(ConfigError, match="not HOST or NAME=HOST"):
        I.parse_device_specs(["=10.0.0.1"])
    assert I.device_workdir("/srv/{name}/w", "dev2") == "/srv/dev2/w"


@pytest.mark.parametrize("local", [True, False])
def test_rendered_inventory_loads(tmp_path, local):
    key = tmp_path / "id"
    key.write_text("k")
    kh = tmp_path / "kh"
    kh.write_text("")
    bs = BaseStation(
        "bs", "192.168.50.1", "eth1", "ifb-tb0", local=local, sudo=True,
        ssh_user=None if local else "lab", ssh_key=None if local else str(key),
    )  # fmt: skip
    devs = [
        Device(f"orin{i}", f"192.168.50.1{i}", "nvidia", f"/home/nvidia/w{i}", "/usr/bin/python3",
               "orin-agx", 8000, ssh_key=str(key), reuse_packages=("torch", "numpy"))
        for i in (1, 2)
    ]  # fmt: skip
    path = tmp_path / "lab.toml"
    path.write_text(I.render_lab_inventory("lab", str(kh), bs, devs))
    inv = load_inventory(path)
    assert inv.bs == bs and list(inv.devices) == devs and inv.known_hosts == str(kh)


def test_cli_refuses_missing_flags_and_etc_without_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "lab.toml"
    code, _, err = run_main(monkeypatch, capsys, "init", str(out), "--yes", "--user", "n")
    assert code == 2 and out.exists() is False
    assert [ln.split(":")[2].strip() for ln in err.strip().splitlines()] == [
        "--bs-interface", "--bs-host", "--device",
    ]  # fmt: skip
    code, _, err = run_main(
        monkeypatch, capsys, "init", str(out), "--yes", "--user", "n", "--bs-interface", "eth1",
        "--bs-host", "10.0.0.1", "--device", "10.0.0.11", "--sudoers-out", "/etc/sudoers.d/x",
    )  # fmt: skip
    assert code == 2 and "--sudoers-out" in err and "/etc" in err and not out.exists()
    code, _, err = run_main(
        monkeypatch, capsys, "init", str(out), "--yes", "--user", "n", "--bs-interface", "eth1",
        "--bs-host", "10.0.0.1", "--device", "10.0.0.11", "--hw-class", "orin",
    )  # fmt: skip
    assert code == 2 and "--hw-class" in err and not out.exists()
