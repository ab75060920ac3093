"""The example policy's recipe on a real local testbed (issue 18; as shipped but for the model,
the requests and the repeats, cut for time): a sweep of topk
against ``recipes/examples/slowlink.py:SlowLink`` whose ``min_kbit`` is given to SlowLink
only (``[policy.params."slowlink.py:SlowLink"]``), the first device behind a 2 Mbit/s link
(``[links.device.0]``); the policy's ``Decision.stats`` in layers.csv as ``policy.dropped``,
and the report's comparison with topk filled for the file-path policy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from testbed import ROOT
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = ROOT / "recipes" / "examples" / "slowlink.toml"


def test_example_policy_against_topk(shared_testbed, tmp_path: Path):
    env, inv = shared_testbed
    res = run_cli(
        "run",
        str(RECIPE),
        "--inventory",
        str(inv),
        "--out",
        str(tmp_path / "results"),
        "--set",
        "workload.requests=3",
        "--set",
        "model.path=tiny",  # the tiny model's width: CI checks the plumbing, not the figures
        "--set",
        "recipe.repeats=2",
        "--format",
        "json",
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "completed" and len(man["trials"]) == 4  # 2 policies x 2 repeats
    by_policy = {t["policy"]["name"]: t for t in man["trials"]}
    assert by_policy["slowlink"]["policy"]["min_kbit"] == 5000
    assert "min_kbit" not in by_policy["topk"]["policy"]  # the parameter is SlowLink's only
    for t in man["trials"]:  # [links.device.0]: the first device at 2 Mbit/s, both ways
        rates = {r["device"]: (r["down_kbit"], r["up_kbit"]) for r in t["links_enforced"]}
        assert rates["dev1"] == pytest.approx((2000, 2000), rel=0.02), rates
        assert rates["dev2"] == pytest.approx((20000, 20000), rel=0.02), rates

    with (run_dir / "layers.csv").open() as f:
        layers = list(csv.DictReader(f))
    dropped = {
        p: [r["policy.dropped"] for r in layers if r["policy"] == p] for p in ("topk", "slowlink")
    }
    assert set(dropped["topk"]) == {""}  # topk gives no stats: empty cells
    assert sum(int(v) for v in dropped["slowlink"]) > 0  # experts behind dev1's link dropped
    sel = {
        p: sum(int(r["experts_selected"]) for r in layers if r["policy"] == p)
        for p in ("topk", "slowlink")
    }
    assert sel["topk"] - sel["slowlink"] == sum(int(v) for v in dropped["slowlink"])

    rep = run_cli("report", str(run_dir), "--format", "json", env=env, timeout=120)
    assert rep.returncode == 0, rep.stderr
    (vs,) = json.loads(rep.stdout)["versus_topk"]
    print("slowlink vs topk:", {k: vs[k] for k in ("latency_change_pct", "accuracy_change")})
    assert vs["policy"] == "slowlink" and vs["latency_change_pct"] is not None
    assert vs["n_repeats"] == vs["baseline_n_repeats"] == 2
    assert "no topk" not in rep.stderr
