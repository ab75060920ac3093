"""The run session's parts that need no lab: a recipe refused by its checks leaves no run folder;
a run that fails at a later set-up stage leaves a manifest saying so (keys in their order); the
recorder's tables and manifest, and a resume that keeps only the completed trial repeats' rows."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from testbed.errors import ConfigError, RunFailed
from testbed.results import schema as R
from testbed.run.recipe import load_recipe
from testbed.run.recorder import Recorder
from testbed.run.resume import prepare_resume
from testbed.run.session import run_recipe

RECIPE = """
[recipe]
name = "unit"
seed = 1
[model]
path = "tiny"
[workload]
task = "tiny"
requests = 2
[sweep]
"policy.name" = ["topk", "top1"]
"""

#: the manifest's first keys, in their order, as a run writes them before its set-up
FIRST_KEYS = [
    "run_id",
    "status",
    "error",
    "started",
    "ended",
    "git_commit",
    "versions",
    "host",
    "recipe",
    "trials",
    "completed",
    "local_testbed",
    "inventory",
    "model",
    "links_before",
    "links_after",
    "clock_offsets",
]


def _recipe(tmp_path: Path):
    p = tmp_path / "r.toml"
    p.write_text(RECIPE)
    return load_recipe(p)


def test_a_recipe_refused_by_its_checks_leaves_no_run_folder(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(RECIPE.replace('["topk", "top1"]', '["topk", "nosuch"]'))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="unknown policy 'nosuch'"):
        run_recipe(load_recipe(p), tmp_path / "missing.toml", out)
    assert not out.exists()


def test_a_run_failing_in_set_up_records_failed_with_its_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RunFailed) as ei:
        run_recipe(_recipe(tmp_path), tmp_path / "missing.toml", out)
    (run_dir,) = out.iterdir()
    assert ei.value.run_dir == run_dir
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert list(man) == [*FIRST_KEYS, "requests_done"]
    assert man["status"] == "failed" and "missing.toml" in man["error"]
    assert man["ended"] and man["requests_done"] == 0 and man["local_testbed"] is False
    assert not list(run_dir.glob("*.csv"))  # the tables are the last stage


def test_recorder_tables_carry_the_sweep_columns_and_resume_keeps_completed_rows(tmp_path):
    rec = Recorder(tmp_path / "run")
    rec.create("r1", _recipe(tmp_path), True)
    rows = [
        {"run_id": "r1", "trial": t, "point": "p", "policy": "topk", "repeat": 0, "request": 0}
        for t in (0, 1)
    ]
    with contextlib.ExitStack() as stack:
        rec.open_tables(stack, {"policy.name": ["topk", "top1"]})
        assert set(rec.tables) == {
            "requests",
            "layers",
            "calls",
            "devices",
            "summary",
            "profile",
            "links",
            "faults",
            "migrations",
        }
        for r in rows:
            rec.tables["requests"].write({**r, "sweep.policy.name": "topk"})
    header = (rec.run_dir / R.REQUESTS).read_text().splitlines()[0].split(",")
    assert header == [*R.REQUEST_COLUMNS, "sweep.policy.name"]
    rec.manifest["completed"].append([0, 0])
    rec.manifest["trials"] = [{"trial": 0, "repeat": 0}, {"trial": 1, "repeat": 0}]
    rec.manifest["status"] = "interrupted"
    rec.save()
    completed, done, summaries = prepare_resume(rec, 1)
    assert completed == {(0, 0)} and done == 1 and summaries == []
    assert [r["trial"] for r in R.read_csv(rec.run_dir / R.REQUESTS)] == ["0"]
    assert rec.manifest["trials"] == [{"trial": 0, "repeat": 0}]
    assert rec.manifest["status"] == "running" and list(rec.manifest)[-1] == "resumed"
    assert rec.manifest["resumed"][0]["status_before"] == "interrupted"
