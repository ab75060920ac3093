"""A controller killed mid-run (SIGKILL: no cleanup of its own) and `testbed run --resume`: the
run continues after its last complete trial, no row is duplicated or lost; `links clear` after
the kill clears the links it left shaped (on the tests' shared testbed, which the next test
shapes afresh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.results import schema as R
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "resume"
seed = 2
[model]
path = "tiny"
[workload]
task = "tiny"
requests = 6
[run]
bs_threads = 1
[sweep]
"links.rate" = ["5mbit", "50mbit"]
"""


def test_controller_killed_then_resumed(shared_testbed, tmp_path):
    env, inv = shared_testbed
    env = {**os.environ, **env}
    recipe = tmp_path / "resume.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed",
            "run",
            str(recipe),
            "--inventory",
            str(inv),
            "--out",
            str(out),
            "--format",
            "json",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    run_dir = None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = [p for p in out.glob("resume-*") if p.is_dir()] if out.exists() else []
            if dirs:
                run_dir = dirs[0]
                try:
                    man = json.loads((run_dir / R.MANIFEST).read_text())
                except (OSError, ValueError):
                    man = {}
                reqs = R.read_csv(run_dir / R.REQUESTS)
                if man.get("completed") == [[0, 0]] and sum(r["trial"] == "1" for r in reqs) >= 2:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # the controller dies with no chance to clean up
        proc.wait(30)
    assert run_dir is not None, proc.stderr.read().decode() if proc.stderr else ""
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "running" and man["completed"] == [[0, 0]]
    partial = R.read_csv(run_dir / R.REQUESTS)
    assert 6 < len(partial) < 12, len(partial)

    clear = run_cli("links", "clear", str(inv), env=env, timeout=120)
    assert clear.returncode == 0, clear.stderr

    res = run_cli(
        "run",
        "--resume",
        str(run_dir),
        "--inventory",
        str(inv),
        "--format",
        "json",
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert Path(json.loads(res.stdout)["run_dir"]) == run_dir
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "completed" and man["completed"] == [[0, 0], [1, 0]]
    assert len(man["resumed"]) == 1 and man["resumed"][0]["status_before"] == "running"
    assert man["resumed"][0]["rows_dropped"]["requests.csv"] == len(partial) - 6
    assert [t["trial"] for t in man["trials"]] == [0, 1]

    reqs = R.read_csv(run_dir / R.REQUESTS)
    keys = [(int(r["trial"]), int(r["request"])) for r in reqs]
    assert sorted(keys) == [(t, i) for t in (0, 1) for i in range(6)]  # once each
    assert [r["sweep.links.rate"] for r in reqs] == ["5mbit"] * 6 + ["50mbit"] * 6
    assert all(r["run_id"] == man["run_id"] for r in reqs)
    assert [int(s["trial"]) for s in R.read_csv(run_dir / R.SUMMARY)] == [0, 1]
    calls = R.read_csv(run_dir / R.CALLS)
    per_req = {}
    for c in calls:
        per_req[(int(c["trial"]), int(c["request"]))] = (
            per_req.get((int(c["trial"]), int(c["request"])), 0) + 1
        )
    assert all(per_req[(int(r["trial"]), int(r["request"]))] == int(r["calls"]) for r in reqs)

    # a completed run is not resumed again
    again = run_cli("run", "--resume", str(run_dir), env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --resume: {run_dir}: the run completed; nothing to resume"
    ]
