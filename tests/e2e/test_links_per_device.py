"""Per-device link settings on a real run (issue 18, item 2): 2 devices of the shared local
testbed, a recipe whose cell rate is 20 Mbit/s and whose ``[links.device.1]`` (the second
device, index from 0) asks 2 Mbit/s; tc's read-back in the manifest's ``links_enforced``
shows each device at its own rate, both ways, and a key naming no device is refused before
the run touches anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "pd"
seed = 0
[model]
path = "tiny"
[links]
rate = "20mbit"
[links.device.{device}]
rate = "2mbit"
[workload]
task = "tiny"
requests = 1
[run]
devices = 2
bs_threads = 1
timeout_s = 5.0
"""


def _run(env: dict, recipe: Path, inv: Path, out: Path):
    return run_cli(
        "run",
        str(recipe),
        "--inventory",
        str(inv),
        "--out",
        str(out),
        "--format",
        "json",
        env=env,
        timeout=240,
    )


def test_each_device_is_enforced_at_its_own_rate(shared_testbed, tmp_path: Path):
    env, inv = shared_testbed
    recipe = tmp_path / "pd.toml"

    recipe.write_text(RECIPE.format(device="dev9"))
    bad = _run(env, recipe, inv, tmp_path / "bad")
    assert bad.returncode != 0
    assert "links.device.dev9: no device 'dev9' (devices: dev1, dev2, dev3)" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before the run folder (and any tc change)

    recipe.write_text(RECIPE.format(device="1"))
    res = _run(env, recipe, inv, tmp_path / "results")
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    man = json.loads((run_dir / "manifest.json").read_text())
    (trial,) = man["trials"]
    enforced = {r["device"]: (r["down_kbit"], r["up_kbit"]) for r in trial["links_enforced"]}
    print("links_enforced (kbit/s down, up):", enforced)
    # every device of the inventory is shaped: the run's two, and dev3 at the cell rate
    assert set(enforced) == {"dev1", "dev2", "dev3"}
    assert enforced["dev3"] == pytest.approx((20_000, 20_000), rel=0.02), enforced
    for way in (0, 1):
        assert enforced["dev1"][way] == pytest.approx(20_000, rel=0.02), enforced
        assert enforced["dev2"][way] == pytest.approx(2_000, rel=0.02), enforced
    assert man["status"] == "completed"
