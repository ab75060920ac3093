"""Provisioning for real: a local testbed (namespaces, sshd), agents installed into venvs over
SSH, shards pushed, agents answering ZeroMQ pings; each device given exactly its own CURVE
secret and the BS's public key (another device's keys are refused); idempotent second run;
status, logs, stop; an unreachable device failing alone; nothing left after `local down`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import zmq

from device_agent.security import load_public, load_secret
from testbed.dataplane.backend import AgentError, RemoteExpertBackend
from testbed.lab import local
from testbed.lab.inventory import load_inventory
from testbed.lab.keys import client_keys
from testbed.lab.modelstore import resolve_split
from testbed.lab.provision import (
    HASH_CACHE,
    agent_endpoints,
    place_experts,
    provision,
    shards_per_device,
)
from tests.conftest import leftovers, needs_testbed, run_cli
from tests.integration.test_security import _handshake

pytestmark = [needs_testbed, pytest.mark.root]


def _files(workdir: Path) -> dict[str, int]:
    """mtime_ns of every file the provisioning owns (the agent appends to its own log)."""
    return {
        str(p.relative_to(workdir)): p.stat().st_mtime_ns
        for p in workdir.rglob("*")
        if p.is_file() and p.name != "agent.log"
    }


def _alive_agent(pid: int) -> bool:
    try:
        return b"device_agent" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _cli_json(env, *args, timeout=180):
    res = run_cli(*args, "--format", "json", env=env, timeout=timeout)
    return res, (json.loads(res.stdout) if res.stdout.strip() else None)


def test_provision_idempotent_status_logs_stop_unreachable(make_testbed, state_dir, tmp_path):
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    name, inv_path = make_testbed(devices=3)
    inv = load_inventory(inv_path)
    split = resolve_split("tiny")
    from models.manifest import load_manifest

    mf = load_manifest(split)
    want = shards_per_device(place_experts(mf, inv.devices), [d.name for d in inv.devices])

    first = provision(inv, split)
    assert [r.device for r in first] == ["dev1", "dev2", "dev3"]
    assert all(r.ok and r.changed and r.error is None for r in first), first
    # agents answer a ZeroMQ ping on every device, at the endpoints in their ready files
    eps = agent_endpoints(inv)
    assert set(eps) == {"dev1", "dev2", "dev3"}
    # ... with the BS's CURVE key only: a client without it is refused (not answered)
    with (
        RemoteExpertBackend({"dev1": eps["dev1"]["endpoint"]}, timeout_s=1) as stranger,
        pytest.raises(AgentError),
    ):
        stranger.ping("dev1")
    keys_dir = inv.curve_dir()
    assert (keys_dir.stat().st_mode & 0o777) == 0o700
    assert all(
        (keys_dir / f"{n}.key_secret").stat().st_mode & 0o077 == 0
        for n in ("bs", "dev1", "dev2", "dev3")
    )
    # each device's key folder holds exactly its own secret (0600, folder 0700) and the BS's
    # public key as the one authorized client: no other device's keys, not the BS's secret
    # (beside them, the provisioning's hash caches name just those files)
    secrets = {
        n: load_secret(keys_dir / f"{n}.key_secret")[1].decode()
        for n in ("bs", "dev1", "dev2", "dev3")
    }
    for dev in inv.devices:
        cdir = Path(dev.workdir) / "curve"
        held = sorted(
            str(p.relative_to(cdir))
            for p in cdir.rglob("*")
            if not p.is_dir() and p.name != HASH_CACHE
        )
        assert held == ["agent.key_secret", "authorized/bs.key"], (dev.name, held)
        for cache, names in (
            (cdir / HASH_CACHE, ["agent.key_secret"]),
            (cdir / "authorized" / HASH_CACHE, ["bs.key"]),
        ):
            assert not cache.exists() or sorted(json.loads(cache.read_text())) == names, (
                cache,
                cache.read_text(),
            )
        assert (cdir.stat().st_mode & 0o777) == 0o700
        assert (cdir / "agent.key_secret").stat().st_mode & 0o777 == 0o600
        assert (cdir / "agent.key_secret").read_bytes() == (
            keys_dir / f"{dev.name}.key_secret"
        ).read_bytes()
        assert (cdir / "authorized" / "bs.key").read_bytes() == (keys_dir / "bs.key").read_bytes()
        # and no one else's secret anywhere in its workdir (outside the venv and the wheels)
        for p in Path(dev.workdir).rglob("*"):
            if p.is_file() and not {"venv", "wheels"} & set(p.relative_to(dev.workdir).parts):
                text = p.read_bytes().decode(errors="replace")
                assert not [n for n, sec in secrets.items() if n != dev.name and sec in text], p
    # a CURVE client with another device's keys (each agent's next neighbour's) is refused by
    # the agent's ZAP handler (status 400), nothing answered; the BS's keys are served
    names = [d.name for d in inv.devices]
    bs_keys = load_secret(keys_dir / "bs.key_secret")
    for target, other in zip(names, names[1:] + names[:1]):
        server = load_public(keys_dir / f"{target}.key")
        got, ev = _handshake(
            eps[target]["endpoint"], load_secret(keys_dir / f"{other}.key_secret"), server
        )
        assert not got and (int(zmq.EVENT_HANDSHAKE_FAILED_AUTH), 400) in ev, (target, other, ev)
        got, ev = _handshake(eps[target]["endpoint"], bs_keys, server)
        assert got and (int(zmq.EVENT_HANDSHAKE_SUCCEEDED), 0) in ev, (target, ev)
    with RemoteExpertBackend(
        {d: e["endpoint"] for d, e in eps.items()}, timeout_s=5, curve=client_keys(inv)
    ) as b:
        for d, e in eps.items():
            assert b.ping(d)["rtt_ms"] > 0
            assert e["endpoint"].startswith(f"tcp://{inv.device(d).host}:")
            assert b.status(d)["agent"]["pid"] == e["pid"]
    # every placed shard is in {workdir}/experts with the manifest's sha256
    for dev in inv.devices:
        got = sorted(p.name for p in (Path(dev.workdir) / "experts").glob("*.safetensors"))
        assert got == sorted(mf.expert_path(u).name for u in want[dev.name]) and got
        for u in want[dev.name]:
            data = (Path(dev.workdir) / "experts" / mf.expert_path(u).name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == mf.experts[u].sha256
        # the agent runs from the venv, with the installed wheel (not the checkout)
        assert (Path(dev.workdir) / "venv" / "bin" / "python").exists()
    pids = {d: e["pid"] for d, e in eps.items()}
    before = {d.name: _files(Path(d.workdir)) for d in inv.devices}

    # second run, through the CLI: nothing changed, same PIDs, no file rewritten
    res, out = _cli_json(env, "provision", str(inv_path), "--model", str(split))
    assert res.returncode == 0, res.stderr
    assert [(r["device"], r["ok"], r["changed"]) for r in out["devices"]] == [
        ("dev1", True, []),
        ("dev2", True, []),
        ("dev3", True, []),
    ]
    assert {r["device"]: r["pid"] for r in out["devices"]} == pids
    assert {d.name: _files(Path(d.workdir)) for d in inv.devices} == before

    res, rows = _cli_json(env, "agents", "status", str(inv_path))
    assert res.returncode == 0, res.stderr
    assert {r["device"]: (r["state"], r["pid"]) for r in rows} == {
        d: ("running", p) for d, p in pids.items()
    }
    res, rows = _cli_json(env, "agents", "logs", str(inv_path), "--lines", "20")
    assert res.returncode == 0, res.stderr
    for r in rows:
        assert any(f"agent pid {pids[r['device']]} serving on" in ln for ln in r["lines"]), r

    # a device that does not answer: it fails, named, with exit 5; the others are untouched
    text = inv_path.read_text()
    unused = inv.bs.host.rsplit(".", 1)[0] + ".222"  # in the testbed's subnet, nobody there
    ghost = (
        ("[[devices]]" + text.split("[[devices]]")[1])
        .replace('name = "dev1"', 'name = "ghost"')
        .replace(f'"{inv.devices[0].host}"', f'"{unused}"')
    )
    badpy = (
        ("[[devices]]" + text.split("[[devices]]")[2])
        .replace('name = "dev2"', 'name = "badpy"')
        .replace(f'"{inv.devices[1].python}"', '"/nonexistent/python3"')
    )
    ghost_inv = tmp_path / "ghost.inventory.toml"
    ghost_inv.write_text(text.rstrip("\n") + "\n\n" + ghost.rstrip("\n") + "\n\n" + badpy)
    res, out = _cli_json(env, "provision", str(ghost_inv), "--model", "tiny", "--timeout", "3")
    assert res.returncode == 5, (res.returncode, res.stderr)
    rows = {r["device"]: r for r in out["devices"]}
    assert [r["device"] for r in out["devices"]] == ["dev1", "dev2", "dev3", "ghost", "badpy"]
    assert not rows["ghost"]["ok"] and rows["ghost"]["error_type"] == "HostUnreachable"
    assert (
        not rows["badpy"]["ok"]
        and rows["badpy"]["error"] == "python /nonexistent/python3 not found on the device"
    )
    # (5 devices in the placement now: the others get more shards, their agents stay)
    assert all(
        rows[d]["ok"]
        and rows[d]["pid"] == pids[d]
        and all(c.startswith("pushed ") and c.endswith(" shards") for c in rows[d]["changed"])
        for d in pids
    ), rows
    err = res.stderr.strip().splitlines()
    assert (
        len(err) == 2
        and err[0].startswith("error: ghost: ")
        and err[1].startswith("error: badpy: python /nonexistent/python3")
    ), err

    # stop: by PID, the agents are gone; status then says stopped; a second stop is a no-op
    res, rows = _cli_json(env, "agents", "stop", str(inv_path))
    assert res.returncode == 0, res.stderr
    assert {r["device"]: (r["result"], r["pid"]) for r in rows} == {
        d: ("terminated", p) for d, p in pids.items()
    }
    assert not any(_alive_agent(p) for p in pids.values())
    res, rows = _cli_json(env, "agents", "status", str(inv_path))
    assert {r["state"] for r in rows} == {"stopped"}
    res, rows = _cli_json(env, "agents", "stop", str(inv_path))
    assert {r["result"] for r in rows} == {"not running"}

    local.down(name)
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}
    assert not Path(inv.devices[0].workdir).exists()


def test_changed_install_reinstalls_and_restarts(make_testbed):
    """A device whose install is not the current one (here: its record edited) is reinstalled
    and its agent restarted with a new PID; the other device is left alone."""
    _, inv_path = make_testbed(devices=2)
    inv = load_inventory(inv_path)
    first = {r.device: r for r in provision(inv)}
    assert all(r.ok for r in first.values()), first
    rec = Path(inv.devices[0].workdir) / "installed.json"
    data = json.loads(rec.read_text())
    data["key"] = "stale"
    rec.write_text(json.dumps(data))
    again = {r.device: r for r in provision(inv)}
    assert again["dev1"].ok and any(c.startswith("installed ") for c in again["dev1"].changed)
    assert any(
        c.startswith(f"stopped agent pid {first['dev1'].pid}") for c in again["dev1"].changed
    ), again["dev1"].changed
    assert again["dev1"].pid != first["dev1"].pid and not _alive_agent(first["dev1"].pid)
    assert again["dev2"].changed == [] and again["dev2"].pid == first["dev2"].pid
