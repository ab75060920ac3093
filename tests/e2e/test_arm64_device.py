"""An arm64 device in the local testbed: its sshd, Python and agent run in an arm64 Debian root
under qemu-user, next to an x86 device. Provisioned over SSH like a Jetson (facts say aarch64,
wheels resolved for aarch64/cp311, the root's torch and numpy reused), it serves experts of the
tiny model in a small run through the CLI; the outputs are the x86 ones (the run's answers, and
an expert computed on the device against the same expert on this host)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from testbed.lab import arm64 as a64
from testbed.lab.inventory import load_inventory, ssh_runner_for
from testbed.results import schema as R
from tests.conftest import leftovers, needs_testbed, run_cli, unique_name

pytestmark = [needs_testbed, pytest.mark.root]

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

#: one expert of the tiny model on a fixed input, printed as JSON: run on the device (its venv,
#: its torch) and on this host (the controller's venv) with the same shard file
EXPERT_PY = """
import json, sys, torch
from models.kernels import load_expert
k = load_expert(sys.argv[1], uid=sys.argv[2])
h = int(k.hidden_size)
x = torch.linspace(-2.0, 2.0, 5 * h, dtype=torch.float32).reshape(5, h)
print(json.dumps({"y": k(x).flatten().tolist(), "torch": torch.__version__}))
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


def _expert_on_device(inv, dev, shard: str, uid: str) -> dict:
    with ssh_runner_for(inv, dev) as r:
        res = r.run(
            [
                "sh",
                "-c",
                f'cd {shlex.quote(dev.workdir)} && exec venv/bin/python -c "$0" "$@"',
                EXPERT_PY,
                shard,
                uid,
            ],
            timeout_s=300,
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check_device(inv_path: Path) -> None:
    """The arm64 device is one over SSH: aarch64, the root's python, its own address."""
    inv = load_inventory(inv_path)
    x86, arm = inv.devices
    assert arm.python == a64.PYTHON and tuple(arm.reuse_packages) == a64.REUSE
    for dev, machine in ((x86, "x86_64"), (arm, "aarch64")):
        with ssh_runner_for(inv, dev) as r:
            out = r.run([dev.python, "-c", "import platform; print(platform.machine())"]).stdout
        assert out.strip() == machine, (dev.name, out)


@pytest.mark.skipif(_why_no_arm64() is not None, reason=_why_no_arm64() or "")
def test_arm64_device_provisions_serves_and_matches_x86(state_dir, tmp_path):
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    name = unique_name("a")
    inv_path = tmp_path / f"{name}.inventory.toml"
    t0 = time.monotonic()
    try:
        # a cold cache builds the root here (debootstrap + wheels, minutes); warm: seconds
        up = _cli(
            env,
            "local",
            "up",
            "--devices",
            "2",
            "--arm64",
            "1",
            "--name",
            name,
            "--rate",
            "1gbit",
            "--inventory-out",
            str(inv_path),
            "--format",
            "json",
            timeout=3600,
        )
        assert [d["arch"] for d in json.loads(up.stdout)["devices"]] == ["host", "arm64"]
        t_up = time.monotonic()
        _check_device(inv_path)

        prov = _cli(env, "provision", str(inv_path), "--model", "tiny", "--format", "json")
        rows = json.loads(prov.stdout)
        rows = rows.get("devices", rows) if isinstance(rows, dict) else rows
        assert all(r["ok"] for r in rows), rows
        facts = {r["device"]: r["facts"] for r in rows}
        assert facts["dev2"]["machine"] == "aarch64" and facts["dev1"]["machine"] == "x86_64"
        inv = load_inventory(inv_path)
        arm = inv.devices[1]
        # wheels resolved for the device (aarch64, its python 3.11), torch/numpy from its root
        installed = json.loads((Path(arm.workdir) / "installed.json").read_text())
        assert installed["deps"] == ["msgpack", "pyzmq", "safetensors"], installed
        assert all("aarch64" in w for w in installed["wheels"] if not w.endswith("any.whl"))
        assert set(installed["reuse"].values()) == {"/usr/lib/python3/dist-packages"}
        t_prov = time.monotonic()

        out = tmp_path / "results"
        recipe = tmp_path / "arm64.toml"
        recipe.write_text(RECIPE)
        run = _cli(
            env,
            "run",
            str(recipe),
            "--inventory",
            str(inv_path),
            "--out",
            str(out),
            "--format",
            "json",
        )
        run_dir = Path(json.loads(run.stdout)["run_dir"])
        man = json.loads((run_dir / R.MANIFEST).read_text())
        assert man["status"] == "completed", man.get("error")
        assert man["devices"]["dev2"]["facts"]["machine"] == "aarch64", man["devices"]
        reqs = R.read_csv(run_dir / R.REQUESTS)
        calls = R.read_csv(run_dir / R.CALLS)
        # the same answers as on x86 devices (tests/e2e/test_run.py): top-k answers every
        # request of the tiny task exactly; dev2 served its share of the calls
        assert [(r["correct"], float(r["score"])) for r in reqs] == [("1", 1.0)] * 3, reqs
        assert {c["device"] for c in calls if c["status"] == "ok"} == {"dev1", "dev2"}
        assert all(c["status"] == "ok" for c in calls)
        t_run = time.monotonic()

        # one expert on the arm64 device (torch of its root, under qemu) against the same
        # shard on this host: equal within float32 tolerance
        shard = min((Path(arm.workdir) / "experts").glob("*.safetensors"))
        uid = shard.name.removesuffix(".safetensors")
        on_arm = _expert_on_device(inv, arm, str(shard), uid)
        here = subprocess.run(
            [sys.executable, "-c", EXPERT_PY, str(shard), uid],
            capture_output=True,
            text=True,
            check=True,
        )
        on_x86 = json.loads(here.stdout.strip().splitlines()[-1])

        assert on_arm["torch"].startswith("2.6.0") and on_x86["torch"] != on_arm["torch"]
        torch.testing.assert_close(
            torch.tensor(on_arm["y"]), torch.tensor(on_x86["y"]), rtol=1e-4, atol=1e-5
        )
        print(
            f"\narm64 e2e: up {t_up - t0:.1f} s, provision {t_prov - t_up:.1f} s, "
            f"run {t_run - t_prov:.1f} s, expert check {time.monotonic() - t_run:.1f} s"
        )
    finally:
        down = run_cli("local", "down", "--name", name, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}
    # the device's mounts lived in its own mount namespace: nothing of them on this host
    assert _mounts_under(state_dir) == [] and not (state_dir / name).exists()
