"""An arm64 device in the local testbed: its sshd, Python and agent run in an arm64 Debian root
under qemu-user, next to an x86 device. Provisioned over SSH like a Jetson (facts say aarch64,
wheels resolved for aarch64/cp311, the root's torch and numpy reused), it serves experts of the
tiny model in a small run through the CLI; the outputs are the x86 ones (the run's answers, and
an expert computed on the device against the same expert on this host)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from testbed.lab import arm64 as a64
from testbed.lab.inventory import load_inventory, ssh_runner_for
from testbed.results import schema as R
from tests.conftest import leftovers, needs_testbed, run_cli, unique_name

pytestmark = [needs_testbed, pytest.mark.root]
#: the L4T release the arm64 device presents (JetPack 5), with the root's CPU-only torch
L4T = "R35.4.1"

RECIPE = """
[recipe]
name = "arm64"
seed = 1
[model]
path = "tiny"
[workload]
task = "tiny"
requests = 3
[run]
timeout_s = 60
[sweep]
"links.rate" = ["1gbit"]
"policy.name" = ["topk"]
"""


def _why_no_arm64() -> str | None:
    if "binfmt_misc" not in Path("/proc/filesystems").read_text():
        return "the kernel has no binfmt_misc (qemu-user cannot run arm64 binaries)"
    if not a64.BINFMT_CONF.exists():
        return "qemu-user-static not installed (bash scripts/setup.sh installs it)"
    if shutil.which("debootstrap") is None:
        return "debootstrap not installed (bash scripts/setup.sh installs it)"
    return None


def _cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    res = run_cli(*args, env=env, timeout=timeout)
    assert res.returncode == 0, (args[:2], res.stderr[-2000:])
    return res


def _mounts_under(path: Path) -> list[str]:
    argv = ["findmnt", "-rn", "-o", "TARGET"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return [m for m in out.stdout.split() if m.startswith(str(path))]


def _expert_on_arm64(inv_path: Path) -> float:
    """One expert of the tiny model on a fixed input through the arm64 device's running agent
    (its root's torch 2.6, under qemu) against the same shard computed in this process (x86,
    the controller's torch): the largest absolute difference."""
    from device_agent import protocol as P
    from models.kernels import load_expert
    from testbed.dataplane.backend import RemoteExpertBackend
    from testbed.lab import provision as prov
    from testbed.lab.keys import client_keys

    inv = load_inventory(inv_path)
    arm = inv.devices[1]
    shard = min((Path(arm.workdir) / "experts").glob("*.safetensors"))
    uid = shard.name.removesuffix(".safetensors")
    kernel = load_expert(shard, uid=uid)
    h = int(kernel.hidden_size)
    x = torch.linspace(-2.0, 2.0, 5 * h).reshape(5, h)
    ep = prov.agent_endpoints(inv)[arm.name]["endpoint"]
    with RemoteExpertBackend({arm.name: ep}, timeout_s=60, curve=client_keys(inv)) as be:
        be.request(arm.name, "load", experts=[{"uid": uid, "path": f"experts/{shard.name}"}])
        hdr, frames = be.request(
            arm.name, "forward", t=[[uid, "float32", [5, h]]], frames=[P.tensor_buffer(x)]
        )
    _, dtype, shape = hdr["t"][0]
    got = P.frame_tensor(frames[0].buffer, dtype, tuple(shape))
    return float((got - kernel(x)).abs().max())


def _check_device(inv_path: Path) -> None:
    """The arm64 device is one over SSH: aarch64, the root's python, its own address."""
    inv = load_inventory(inv_path)
    x86, arm = inv.devices
    assert arm.python == a64.PYTHON and tuple(arm.reuse_packages) == a64.REUSE
    for dev, machine in ((x86, "x86_64"), (arm, "aarch64")):
        with ssh_runner_for(inv, dev) as r:
            out = r.run([dev.python, "-c", "import platform; print(platform.machine())"]).stdout
        assert out.strip() == machine, (dev.name, out)


def _up(env: dict, name: str, inv_path: Path) -> None:
    """``local up`` of one x86 and one arm64 device (a cold cache builds the root here:
    debootstrap and wheels, minutes; warm: seconds)."""
    up = _cli(
        env,
        *("local", "up", "--devices", "2", "--arm64", "1", "--name", name, "--rate", "1gbit"),
        *("--l4t", L4T),
        *("--inventory-out", str(inv_path), "--format", "json"),
        timeout=3600,
    )
    assert [d["arch"] for d in json.loads(up.stdout)["devices"]] == ["host", "arm64"]


def _provision(env: dict, inv_path: Path) -> None:
    """Provisioned like a Jetson: facts say aarch64, the agent's wheels resolved for aarch64
    and the device's python 3.11, torch and numpy reused from the root's system packages. The
    device presents itself as L4T (``/etc/nv_tegra_release`` in its root) and its torch is a
    CPU build: refused in one line naming the fix, then provisioned with ``--allow-cpu``."""
    argv = ("provision", str(inv_path), "--model", "tiny", "--format", "json")
    refused = run_cli(*argv, env=env, timeout=600)
    arm = load_inventory(inv_path).devices[1]
    line = re.escape(f"error: dev2: L4T {L4T} (JetPack 5) on {arm.host} but torch ") + (
        r"\S+ has no CUDA \(a CPU-only build\); install JetPack's torch and set "
        + re.escape('reuse_packages = ["torch", "numpy"] for this device in the inventory, ')
        + "or pass --allow-cpu"
    )
    lines = refused.stderr.splitlines()
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr
    assert re.fullmatch(line, lines[0]), lines[0]
    rows = json.loads(_cli(env, *argv, "--allow-cpu").stdout)
    rows = rows.get("devices", rows) if isinstance(rows, dict) else rows
    assert all(r["ok"] for r in rows), rows
    pre = {r["device"]: r["preflight"] for r in rows}
    assert pre["dev2"]["l4t"] == L4T and pre["dev2"]["torch"]["cuda_available"] is False
    assert pre["dev1"]["l4t"] is None, pre["dev1"]
    facts = {r["device"]: r["facts"] for r in rows}
    assert facts["dev2"]["machine"] == "aarch64" and facts["dev1"]["machine"] == "x86_64"
    arm = load_inventory(inv_path).devices[1]
    installed = json.loads((Path(arm.workdir) / "installed.json").read_text())
    assert installed["deps"] == ["msgpack", "pyzmq", "safetensors"], installed
    binary = [w for w in installed["wheels"] if not w.endswith("-any.whl")]
    assert len(binary) == 3 and all("aarch64" in w and "cp31" in w for w in binary), binary
    assert set(installed["reuse"].values()) == {"/usr/lib/python3/dist-packages"}


def _run(env: dict, inv_path: Path, tmp_path: Path) -> None:
    """A small run completes with the x86 answers, dev2 serving its share; the manifest
    records dev2's facts."""
    recipe = tmp_path / "arm64.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "results"
    run = _cli(env, "run", str(recipe), "--inventory", str(inv_path), "--out", str(out),
               "--allow-cpu", "--format", "json")  # fmt: skip
    run_dir = Path(json.loads(run.stdout)["run_dir"])
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "completed", man.get("error")
    assert man["devices"]["dev2"]["facts"]["machine"] == "aarch64", man["devices"]
    assert man["devices"]["dev1"]["facts"]["machine"] == "x86_64", man["devices"]
    assert man["devices"]["dev2"]["preflight"]["jetpack"] == "5", man["devices"]["dev2"]
    assert man["devices"]["dev2"]["warnings"][0].startswith("allowed by --allow-cpu: L4T")
    reqs = R.read_csv(run_dir / R.REQUESTS)
    calls = R.read_csv(run_dir / R.CALLS)
    # the answers of x86 devices (tests/e2e/test_run.py): top-k gets every request of the
    # tiny task right, token by token (score 1.0 = every token equals the reference)
    assert [(r["correct"], float(r["score"])) for r in reqs] == [("1", 1.0)] * 3, reqs
    assert all(c["status"] == "ok" for c in calls)
    assert {c["device"] for c in calls} == {"dev1", "dev2"}


@pytest.mark.skipif(_why_no_arm64() is not None, reason=_why_no_arm64() or "")
def test_arm64_device_provisions_serves_and_matches_x86(state_dir, tmp_path):
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    name = unique_name("a")
    inv_path = tmp_path / f"{name}.inventory.toml"
    registered_before = (a64.BINFMT / a64.ENTRY).exists()
    t = [time.monotonic()]
    try:
        _up(env, name, inv_path)
        t.append(time.monotonic())
        _check_device(inv_path)
        _provision(env, inv_path)
        t.append(time.monotonic())
        _run(env, inv_path, tmp_path)
        t.append(time.monotonic())
        # one expert through the arm64 agent against the same shard on this host
        assert _expert_on_arm64(inv_path) < 1e-5
    finally:
        down = run_cli("local", "down", "--name", name, env=env, timeout=120)
    t.append(time.monotonic())
    print(
        "\narm64 e2e s: up {:.1f}, provision {:.1f}, run {:.1f}, expert + down {:.1f}".format(
            *(b - a for a, b in itertools.pairwise(t))
        )
    )
    assert down.returncode == 0, down.stderr
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}
    # the device's mounts lived in its own mount namespace: nothing of them on this host
    assert _mounts_under(state_dir) == [] and not (state_dir / name).exists()
    # qemu-aarch64 in binfmt_misc: as it was before (what `up` registered, `down` undid)
    assert (a64.BINFMT / a64.ENTRY).exists() == registered_before
    assert registered_before or not a64.BINFMT_RECORD.exists()


@pytest.mark.skipif(_why_no_arm64() is not None, reason=_why_no_arm64() or "")
def test_arm64_device_with_l4t_release_and_refusals(state_dir, tmp_path):
    """``--l4t`` puts an ``/etc/nv_tegra_release`` in the arm64 device's own root (not the
    host's); bad ``--arm64``/``--l4t`` are refused in one line before anything is made."""
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    for args, where in (
        (["--devices", "2", "--arm64", "3"], "--arm64: must be 0..2"),
        (["--devices", "1", "--l4t", "R35.4.1"], "--l4t: only arm64 devices"),
        (["--devices", "1", "--arm64", "1", "--l4t", "35.4"], "--l4t: '35.4' is not"),
    ):
        res = run_cli("local", "up", "--name", unique_name("a"), *args, env=env)
        assert res.returncode == 2 and where in res.stderr, (args, res.stderr)
    assert list(state_dir.iterdir()) == []
    name = unique_name("a")
    inv_path = tmp_path / f"{name}.inventory.toml"
    try:
        _cli(env, "local", "up", "--devices", "1", "--arm64", "1", "--l4t", "R35.4.1",
             "--name", name, "--inventory-out", str(inv_path))  # fmt: skip
        inv = load_inventory(inv_path)
        with ssh_runner_for(inv, inv.devices[0]) as r:
            out = r.run(["sh", "-c", "uname -m; cat /etc/nv_tegra_release"]).stdout
        first = "# R35 (release), REVISION: 4.1, GCID: 00000000, BOARD: t186ref, EABI: aarch64, "
        assert out.splitlines()[:2] == ["aarch64", first + "DATE: Thu Jan  1 00:00:00 UTC 1970"]
        assert not Path("/etc/nv_tegra_release").exists()
    finally:
        down = run_cli("local", "down", "--name", name, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}
    assert _mounts_under(state_dir) == [] and not (state_dir / name).exists()
