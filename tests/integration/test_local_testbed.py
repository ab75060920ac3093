"""The local testbed for real: namespaces, veths, a bridge, an sshd per device, fabric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.errors import CommandTimeout, HostUnreachable
from testbed.lab import local
from testbed.lab.inventory import load_inventory, ssh_runner_for
from testbed.lab.runner import SshRunner
from tests.conftest import ROOT, leftovers, needs_testbed, run_cli, unique_name

pytestmark = needs_testbed


def test_up_three_devices_ssh_with_host_key_checking(make_testbed, tmp_path):
    _name, inv_path = make_testbed(devices=3)
    inv = load_inventory(inv_path)
    assert len(inv.devices) == 3
    for dev in inv.devices:
        with ssh_runner_for(inv, dev) as r:
            res = r.run(["ip", "-j", "-4", "addr", "show"])
        addrs = {a["local"] for ifc in json.loads(res.stdout) for a in ifc["addr_info"]}
        # the device has only its own address (and loopback)
        assert addrs == {dev.host, "127.0.0.1"}, (dev.name, addrs)
    dev = inv.devices[0]
    # an empty known_hosts: the key is unknown and the connection is refused
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostUnreachable, match="host key unknown"):
        SshRunner(dev.host, user="root", key_path=dev.ssh_key, known_hosts=str(empty)).connect()
    # another device's key under this address: a mismatch, refused
    lines = Path(inv.known_hosts).read_text().splitlines()
    other_key = lines[1].split(" ", 1)[1]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{dev.host} {other_key}\n")
    with pytest.raises(HostUnreachable, match="host key mismatch"):
        SshRunner(dev.host, user="root", key_path=dev.ssh_key, known_hosts=str(wrong)).connect()
    # password-less login without the key is refused (key-only auth)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(HostUnreachable, match="authentication failed"):
        SshRunner(dev.host, user="root", key_path=str(other), known_hosts=inv.known_hosts).connect()


def test_remote_timeout_stops_the_remote_command(make_testbed):
    _name, inv_path = make_testbed(devices=1)
    inv = load_inventory(inv_path)
    dev = inv.devices[0]
    pidfile = f"{dev.workdir}/sleeper.pid"
    with ssh_runner_for(inv, dev) as r:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout):
            r.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout_s=1)
        assert time.monotonic() - t0 < 10
        pid = int(Path(pidfile).read_text())
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), "remote command still running after timeout"


def test_put_and_spawn_detached(make_testbed, tmp_path):
    name, inv_path = make_testbed(devices=1)
    inv = load_inventory(inv_path)
    dev = inv.devices[0]
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    with ssh_runner_for(inv, dev) as r:
        r.put(src, f"{dev.workdir}/sub/payload.bin", mode=0o600)
        assert Path(f"{dev.workdir}/sub/payload.bin").read_bytes() == src.read_bytes()
        assert Path(f"{dev.workdir}/sub/payload.bin").stat().st_mode & 0o777 == 0o600
        pid = r.spawn(
            ["sleep", "120"], log_path=f"{dev.workdir}/logs/s.log", pid_path=f"{dev.workdir}/s.pid"
        )
    # the SSH session is closed; the process lives on, in the device's namespace
    try:
        assert Path(f"/proc/{pid}").exists()
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
        ns = subprocess.run(
            ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=False
        ).stdout.strip()
        assert ns == local.Names(name).netns(1)
    finally:
        os.kill(pid, signal.SIGKILL)


def _snapshot(name: str) -> dict[str, list[str]]:
    return {k: v for k, v in leftovers(name).items() if v}


def test_down_removes_everything_and_is_idempotent(state_dir, tmp_path):
    name = unique_name()
    local.up(name, 2, 8000, tmp_path / "x.inventory.toml")
    assert _snapshot(name)["netns"] and _snapshot(name)["processes"]
    local.down(name)
    assert _snapshot(name) == {}
    assert not (state_dir / name).exists() and not (tmp_path / "x.inventory.toml").exists()
    again = local.down(name)
    assert again["was_present"] is False


def test_down_after_up_killed_halfway(state_dir, tmp_path):
    name = unique_name()
    env = {**os.environ, "TESTBED_STATE_DIR": str(state_dir)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed",
            "local",
            "up",
            "--name",
            name,
            "--devices",
            "12",
            "--inventory-out",
            str(tmp_path / "k.toml"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # kill it -9 as soon as the third device's sshd is being started
    deadline = time.monotonic() + 30
    st = state_dir / name / "state.json"
    while time.monotonic() < deadline:
        try:
            if len(json.loads(st.read_text()).get("pids", [])) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _snapshot(name)
    assert left.get("netns") and left.get("processes"), f"nothing half-made to clean: {left}"
    res = run_cli("local", "down", "--name", name, "--format", "json", env=env)
    assert res.returncode == 0, res.stderr
    assert _snapshot(name) == {}
    assert not (state_dir / name).exists()


def test_two_testbeds_coexist(make_testbed):
    a, inv_a = make_testbed(devices=1)
    _b, inv_b = make_testbed(devices=1)
    ia, ib = load_inventory(inv_a), load_inventory(inv_b)
    assert ia.bs.host != ib.bs.host and ia.bs.interface != ib.bs.interface
    local.down(a)
    assert _snapshot(a) == {}
    with ssh_runner_for(ib, ib.devices[0]) as r:
        assert r.run(["true"]).ok


def test_up_refuses_existing_name(make_testbed):
    name, _ = make_testbed(devices=1)
    with pytest.raises(Exception, match="exists already"):
        local.up(name, 1, 8000)


def test_without_root_one_clear_line(tmp_path, monkeypatch, capsys):
    # as an unprivileged user (the venv's interpreter may not be reachable by another
    # user, so the uid check is what is faked here; nothing else is)
    from testbed import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["testbed", "local", "up", "--name", "nroot"])
    with pytest.raises(SystemExit) as ei:
        cli.main()
    assert ei.value.code == 6
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0] and "sudo testbed local up" in lines[0]
    assert not (tmp_path / "nroot").exists()
