"""MoE² on the local testbed (issue 19), ``recipes/moe2.toml`` at a reduced size: the five
whole-model experts of ``models/edge`` pushed to 3 namespaced devices and served by their
agents, MoE² against every expert and the best single one at two energy budgets. Checked: the
run completes with budgets and violations in summary.csv; MoE²'s planned subset meets its
budgets, is at least as accurate on the validation set as a baseline that meets the same
budgets, and never less accurate at the larger budget; every request over a budget is counted;
the report draws accuracy against the budgets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from testbed import ROOT
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = ROOT / "recipes" / "moe2.toml"


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_moe2_recipe_reduced(shared_testbed, tmp_path: Path):
    env, inv = shared_testbed
    res = run_cli(
        "run",
        str(RECIPE),
        "--inventory",
        str(inv),
        "--out",
        str(tmp_path / "results"),
        "--set",
        "workload.requests=8",
        "--set",
        "run.devices=3",
        "--set",
        'sweep.policy.name=["moe2", "moe2-all", "moe2-best"]',
        "--set",
        "sweep.policy.params.energy_budget_j=[0.02, 1.0]",
        "--set",
        "sweep.policy.params.delay_budget_ms=[1000.0]",
        "--format",
        "json",
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "completed" and len(man["trials"]) == 6
    plans = {}
    for t in man["trials"]:
        pol = t["policy"]
        plans[(pol["name"], pol["energy_budget_j"])] = pol["plan"]
        assert set(t["edge_profile"]["energy_j"]) == set(man["model"]["experts"])
    for budget in (0.02, 1.0):
        mine = plans[("moe2", budget)]
        if mine["subset"]:
            assert mine["cost"][0] <= budget + 1e-9 and max(mine["cost"][1:]) <= 1000.0 + 1e-9
        for base in ("moe2-all", "moe2-best"):
            b = plans[(base, budget)]
            if b["cost"][0] <= budget + 1e-9 and max(b["cost"][1:]) <= 1000.0 + 1e-9:
                assert mine["accuracy"] >= b["accuracy"] - 1e-12, (base, budget, mine, b)
    small, big = plans[("moe2", 0.02)], plans[("moe2", 1.0)]
    assert (small["accuracy"] or 0.0) <= big["accuracy"]

    summary = _rows(run_dir / "summary.csv")
    reqs = _rows(run_dir / "requests.csv")
    assert len(summary) == 6 and len(reqs) == 6 * 8
    for row in summary:
        assert row["energy_budget_j"] in ("0.02", "1.0") and row["delay_budget_ms"] == "1000.0"
        mine = [r for r in reqs if r["trial"] == row["trial"]]
        assert int(row["budget_violations"]) == sum(int(r["over_budget"]) for r in mine)
    for r in reqs:  # a request within its budgets is not counted, one over them is
        joules = float(r["energy_devices_j"]) if r["energy_devices_j"] != "" else 0.0
        over = float(r["total_ms"]) > float(r["delay_budget_ms"])
        over = over or joules > float(r["energy_budget_j"]) + 1e-12
        assert int(r["over_budget"]) == int(over or r["status"] == "refused"), r

    rep = run_cli("report", str(run_dir), "--format", "json", env=env, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert any(p.endswith("accuracy_vs_budget.png") for p in json.loads(rep.stdout)["plots"])
