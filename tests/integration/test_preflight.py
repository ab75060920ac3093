"""The device preflight on the local testbed: a device that presents itself as a Jetson (an
L4T release file in its workdir: namespace devices share the host's /etc) with this host's
CPU-only torch is refused at provision in one line naming the fix, while the other device is
provisioned; ``--allow-cpu`` provisions it (no reinstall) with a warning; ``agents status``
shows torch's build and CUDA availability per device, in its table and ``--format json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch

from testbed.lab.inventory import load_inventory
from testbed.lab.provision import CUDA_FIX
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RELEASE = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
)


def _cli_json(env, *args, timeout=240):
    res = run_cli(*args, "--format", "json", env=env, timeout=timeout)
    return res, (json.loads(res.stdout) if res.stdout.strip() else None)


def test_jetson_with_cpu_torch_refused_then_allowed_and_shown(make_testbed, state_dir):
    if torch.version.cuda is not None:
        pytest.skip("this host's torch is a CUDA build: the refusal needs a CPU-only one")
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    _, inv_path = make_testbed(devices=2)
    inv = load_inventory(inv_path)
    jetson = Path(inv.devices[0].workdir)
    jetson.mkdir(parents=True, exist_ok=True)
    (jetson / "nv_tegra_release").write_text(RELEASE)
    host = inv.devices[0].host

    res, out = _cli_json(env, "provision", str(inv_path))
    rows = {r["device"]: r for r in out["devices"]}
    line = (
        f"L4T R35.4.1 (JetPack 5) on {host} but torch {torch.__version__} has no CUDA "
        f"(a CPU-only build); {CUDA_FIX}"
    )
    assert res.returncode != 0 and res.stderr.splitlines() == [f"error: dev1: {line}"], res.stderr
    assert not rows["dev1"]["ok"] and rows["dev1"]["pid"] is None
    assert not (jetson / "agent.pid").exists()  # no agent started on the refused device
    assert rows["dev2"]["ok"] and rows["dev2"]["preflight"]["l4t"] is None, rows["dev2"]
    assert rows["dev2"]["preflight"]["torch"]["version"] == torch.__version__

    res, out = _cli_json(env, "provision", str(inv_path), "--allow-cpu")
    assert res.returncode == 0, res.stderr
    dev1 = {r["device"]: r for r in out["devices"]}["dev1"]
    assert dev1["ok"] and dev1["pid"], dev1
    assert not any(c.startswith("installed") for c in dev1["changed"]), dev1["changed"]
    assert dev1["warnings"] == [f"allowed by --allow-cpu: {line.split('; ')[0]}"]
    assert dev1["preflight"]["l4t_source"] == str(jetson / "nv_tegra_release")

    res, status = _cli_json(env, "agents", "status", str(inv_path))
    assert res.returncode == 0, res.stderr
    by = {r["device"]: r for r in status}
    assert {d: r["state"] for d, r in by.items()} == {"dev1": "running", "dev2": "running"}
    for d, l4t, jp in (("dev1", "R35.4.1", "5"), ("dev2", None, None)):
        r = by[d]
        assert r["torch"] == {
            "version": torch.__version__,
            "cuda_build": None,
            "cuda_available": False,
            "device_name": None,
            "git_version": torch.version.git_version,
            "error": None,
        }, r
        assert (r["l4t"], r["jetpack"], r["numpy"], r["interop_ok"]) == (
            l4t,
            jp,
            numpy.__version__,
            True,
        )
        assert r["python"].count(".") == 2
    table = run_cli("agents", "status", str(inv_path), env={**env, "COLUMNS": "300"})
    assert table.returncode == 0, table.stderr
    for col in ("python", "torch", "cuda", "l4t", "R35.4.1 (JetPack 5)", "no: CPU-only build"):
        assert col in table.stdout, table.stdout
