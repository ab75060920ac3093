"""Offline labs for real (issue 20): `testbed wheelhouse build` for a local testbed device (its
platform and Python asked over SSH), then a run that installs the agent from the wheelhouse
with nothing downloaded: a wheelhouse lacking a wheel fails the run naming the package and the
wheelhouse, the complete one (the inventory's testbed.wheelhouse) runs it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "offline"
seed = 1
[model]
path = "tiny"
[workload]
task = "tiny"
requests = 2
[run]
timeout_s = 5.0
[policy]
name = "topk"
"""


def test_wheelhouse_build_then_a_run_that_never_downloads(make_testbed, state_dir, tmp_path):
    _, inv_path = make_testbed(devices=1)
    # the device installs pyzmq, msgpack and safetensors from wheels (reuses torch and numpy)
    text = inv_path.read_text()
    start = text.index("reuse_packages = [")
    end = text.index("\n", start)
    inv_path.write_text(text[:start] + 'reuse_packages = ["torch", "numpy"]' + text[end:])
    cache = tmp_path / "cache"  # a cache with no wheels: a download would land here
    env = {"TESTBED_STATE_DIR": str(state_dir), "MOE_TESTBED_CACHE": str(cache)}
    wh = tmp_path / "wh"
    t0 = time.monotonic()
    res = run_cli("wheelhouse", "build", str(inv_path), str(wh), "--format", "json", env=env)
    assert res.returncode == 0, res.stderr
    built = json.loads(res.stdout)
    names = {w["file"].split("-")[0].lower() for w in built["written"]}
    assert names == {"pyzmq", "msgpack", "safetensors", "pip", "moe_edge_testbed"}, names
    assert built["files"] == 5 and built["mb"] > 0 and list(built["devices"]) == ["dev1"]
    print(f"wheelhouse build: {time.monotonic() - t0:.1f} s, {built['mb']} MB")
    assert not (cache / "wheels" / "pip").exists()  # the cache has the project wheel, no deps

    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "results"
    # a wheelhouse without msgpack: refused in one line naming it, nothing downloaded
    partial = tmp_path / "partial"
    partial.mkdir()
    for w in wh.glob("*.whl"):
        if not w.name.startswith("msgpack-"):
            shutil.copy2(w, partial / w.name)
    args = ("run", str(recipe), "--inventory", str(inv_path), "--out", str(out))
    t0 = time.monotonic()
    res = run_cli(*args, "--wheelhouse", str(partial), env=env, timeout=300)
    print(f"refused run: {time.monotonic() - t0:.1f} s")
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"wheelhouse {partial}: no wheel of msgpack" in errors[0], (
        res.stderr
    )
    assert not list((cache / "wheels").glob("deps-*")), "a pip download was attempted"

    # the inventory's wheelhouse: the run completes, the device's wheels are the wheelhouse's
    inv_path.write_text(
        inv_path.read_text().replace("[testbed]\n", f'[testbed]\nwheelhouse = "{wh}"\n', 1)
    )
    t0 = time.monotonic()
    res = run_cli(*args, "--format", "json", env=env, timeout=300)
    print(f"offline run: {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "completed"
    assert not list((cache / "wheels").glob("deps-*")) and not (cache / "wheels" / "pip").exists()
    workdir = Path(next(ln for ln in text.splitlines() if ln.startswith("workdir")).split('"')[1])
    installed = json.loads((workdir / "installed.json").read_text())
    assert {w for w in installed["wheels"] if not w.startswith("moe_edge")} == {
        w.name for w in wh.glob("*.whl") if not w.name.startswith("moe_edge")
    }
