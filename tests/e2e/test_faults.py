"""Fault injection through `testbed run` on the local testbed: an agent killed and restarted,
one stopped and resumed, a link cut to a near-zero rate. The run completes; faults.csv says what
was done and undone; the requests and calls during each fault carry its id and show the
fallback (failed calls, degraded requests), the ones after it are served again; nothing is left
behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed import results as R
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "faults"
seed = 3
[model]
path = "tiny"
[policy]
name = "topk"
[links]
rate = "20mbit"
[workload]
task = "tiny"
requests = 30
[run]
timeout_s = 1.0
down_backoff_s = 0.2
[faults]
events = [
  { at_request = 2, device = "dev2", action = "kill" },
  { at_request = 5, device = "dev2", action = "restart" },
  { at_request = 6, device = "dev1", action = "stop", until_request = 8 },
  { at_request = 9, device = "dev3", action = "link", rate = "24kbit", for_requests = 2 },
]
"""

FAILED = {"timeout", "unreachable", "skipped", "error"}


def test_faults_are_survived_and_recorded(cli_testbed, tmp_path):
    env, _, inv = cli_testbed(3, "f")
    recipe = tmp_path / "faults.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "results"
    res = run_cli("run", str(recipe), "--inventory", str(inv), "--out", str(out),
                  "--format", "json", env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "completed" and man["requests_done"] == 30

    faults = R.read_csv(run_dir / R.FAULTS)
    assert [(f["fault"], f["event"], int(f["request"]), f["ok"]) for f in faults] == [
        ("f0-kill-dev2", "injected", 2, "1"),
        ("f1-restart-dev2", "injected", 5, "1"),
        ("f0-kill-dev2", "cleared", 5, "1"),
        ("f2-stop-dev1", "injected", 6, "1"),
        ("f2-stop-dev1", "cleared", 8, "1"),
        ("f3-link-dev3", "injected", 9, "1"),
        ("f3-link-dev3", "cleared", 11, "1"),
    ], faults
    assert "SIGKILL" in faults[0]["detail"] and "SIGSTOP" in faults[3]["detail"]
    assert "24/24 kbit/s" in faults[5]["detail"] and "trial's rate" in faults[6]["detail"]

    reqs = {int(r["request"]): r for r in R.read_csv(run_dir / R.REQUESTS)}
    assert sorted(reqs) == list(range(30))
    calls = R.read_csv(run_dir / R.CALLS)

    def on(dev: str, request: int) -> list[dict]:
        return [c for c in calls if c["device"] == dev and int(c["request"]) == request]

    # before any fault: everything served
    assert all(c["status"] == "ok" for c in calls if int(c["request"]) < 2)
    assert reqs[0]["faults"] == "" and reqs[0]["status"] == "ok"
    # the kill: dev2's calls fail (dropped and renormalised: the request is degraded)
    assert "f0-kill-dev2" in reqs[2]["faults"] and reqs[2]["status"] == "degraded"
    dead = [c for r in (2, 3, 4) for c in on("dev2", r)]
    assert dead and {c["status"] for c in dead} <= FAILED, dead
    assert all(c["faults"] == reqs[int(c["request"])]["faults"] for c in dead)
    # restarted before request 5: dev2 serves again, with its experts reloaded
    assert on("dev2", 5) and all(c["status"] == "ok" for c in on("dev2", 5))
    # the stop: dev1's calls time out while it is stopped
    assert "f2-stop-dev1" in reqs[6]["faults"]
    assert any(c["status"] == "timeout" for r in (6, 7) for c in on("dev1", r))
    # the cut link: dev3's calls cannot make it in time
    assert "f3-link-dev3" in reqs[9]["faults"]
    assert any(c["status"] in FAILED for r in (9, 10) for c in on("dev3", r))
    # and at the end all three devices serve every call again (after the cut, packets queued
    # in tc and TCP's retransmission back-off can still time out a call or two, and the
    # device then sits out run.down_backoff_s: the last requests are well past that)
    last = [c for c in calls if int(c["request"]) >= 27]
    assert {c["device"] for c in last} == {"dev1", "dev2", "dev3"}
    assert all(c["status"] == "ok" for c in last), [c for c in last if c["status"] != "ok"]
    assert all(reqs[i]["faults"] == "" and reqs[i]["status"] == "ok" for i in (27, 28, 29))
    # links back to the trial's rate after the cut, as tc reports it
    rates = [{(s["device"], s["down_kbit"], s["up_kbit"]) for s in man[k]["links"]}
             for k in ("links_before", "links_after")]
    assert rates[0] == rates[1] and len(rates[0]) == 3

    rep = run_cli("report", str(run_dir), "--format", "json", env=env, timeout=120)
    assert rep.returncode == 0, rep.stderr
    fr = json.loads(rep.stdout)["faults"]
    kill = next(f for f in fr if f["fault"] == "f0-kill-dev2")
    assert kill["requests_during"] == 3 and kill["calls_failed_during"] >= len(dead)
    assert kill["accuracy_after"] is not None and kill["latency_p50_during_ms"] > 0
