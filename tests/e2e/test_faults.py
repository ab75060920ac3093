"""Fault injection through `testbed run` on the local testbed: an agent killed and restarted,
one stopped and resumed, a link cut to a near-zero rate. The run completes; faults.csv says what
was done and undone; the requests and calls during each fault carry its id and show the
fallback (failed calls, degraded requests); within two requests of each fault's end every
request is served again by every device and answers the tiny task exactly, as before the
faults (a restarted agent that reloaded a wrong shard would not); the cut rate is read back
from tc while it lasts, and the trial's rate after it; the agents serve again after the run
(the next test on the shared testbed uses them)."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.lab.inventory import load_inventory
from testbed.net.tc import class_minor, enforced_kbit, leaves_by_class, parse_htb_classes
from testbed.results import schema as R
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
rate = "50mbit"
[workload]
task = "tiny"
requests = 30
[run]
timeout_s = 1.0
bs_threads = 1
down_backoff_s = 0.2
[faults]
events = [
  { at_request = 2, device = "dev2", action = "kill" },
  { at_request = 5, device = "dev2", action = "restart" },
  { at_request = 9, device = "dev1", action = "stop", until_request = 11 },
  { at_request = 15, device = "dev3", action = "link", rate = "24kbit", for_requests = 3 },
]
"""
TRIAL_KBIT = 50000.0  # the recipe's rate (the shared testbed is shaped at 1 Gbit/s)
CUT_KBIT = 24.0
#: (fault, device, first request during it, first request after it, next fault's first request)
WINDOWS = [
    ("f0-kill-dev2", "dev2", 2, 5, 9),
    ("f2-stop-dev1", "dev1", 9, 11, 15),
    ("f3-link-dev3", "dev3", 15, 18, 30),
]
RECOVERY = 2  # requests after a fault's end by which everything is served again

FAILED = {"timeout", "unreachable", "skipped", "error"}


@dataclass
class Sample:
    """tc's class rates, with the number of request rows on disk before and after reading."""

    rows_before: int
    rows_after: int
    rates: dict[str, tuple[float, float]]  # device -> (down, up) kbit/s


class TcSampler(threading.Thread):
    """Reads every device's link rate from tc (its class's ceiling in `tc class show` of the BS
    interface and of the ifb, or its leaf's rate where lower: the TBF leaf carries the rate)
    every 0.05 s while the run goes on."""

    def __init__(self, inv_path: Path, out: Path):
        super().__init__(daemon=True)
        inv = load_inventory(inv_path)
        self.classes = {f"1:{class_minor(i):x}": d.name for i, d in enumerate(inv.devices)}
        self.ifaces = (inv.bs.interface, inv.bs.ifb)
        self.out = out
        self.samples: list[Sample] = []
        self.halt = threading.Event()

    def _rows(self) -> int:
        return len(R.read_csv(next(iter(self.out.glob("*/requests.csv")), self.out / "none")))

    def run(self) -> None:
        while not self.halt.wait(0.05):
            before = self._rows()
            per_dir = []
            for dev in self.ifaces:
                res = subprocess.run(
                    ["tc", "class", "show", "dev", dev], check=False, capture_output=True, text=True
                )
                qd = subprocess.run(
                    ["tc", "-j", "qdisc", "show", "dev", dev],
                    check=False,
                    capture_output=True,
                    text=True,
                )
                leaves = leaves_by_class(json.loads(qd.stdout or "[]"))
                per_dir.append(
                    {
                        c.classid: enforced_kbit(
                            c.ceil_kbit, leaves.get(int(c.classid.partition(":")[2], 16))
                        )
                        for c in parse_htb_classes(res.stdout)
                    }
                )
            after = self._rows()
            if all(cid in d for d in per_dir for cid in self.classes):
                self.samples.append(
                    Sample(
                        before,
                        after,
                        {
                            name: (per_dir[0][cid], per_dir[1][cid])
                            for cid, name in self.classes.items()
                        },
                    )
                )


def test_faults_are_survived_and_recorded(shared_testbed, tmp_path):
    env, inv = shared_testbed
    recipe = tmp_path / "faults.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "results"
    sampler = TcSampler(inv, out)
    sampler.start()
    try:
        res = run_cli(
            "run",
            str(recipe),
            "--inventory",
            str(inv),
            "--out",
            str(out),
            "--format",
            "json",
            env=env,
            timeout=600,
        )
    finally:
        sampler.halt.set()
        sampler.join(10)
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "completed" and man["requests_done"] == 30

    faults = R.read_csv(run_dir / R.FAULTS)
    assert [(f["fault"], f["event"], int(f["request"]), f["ok"]) for f in faults] == [
        ("f0-kill-dev2", "injected", 2, "1"),
        ("f1-restart-dev2", "injected", 5, "1"),
        ("f0-kill-dev2", "cleared", 5, "1"),
        ("f2-stop-dev1", "injected", 9, "1"),
        ("f2-stop-dev1", "cleared", 11, "1"),
        ("f3-link-dev3", "injected", 15, "1"),
        ("f3-link-dev3", "cleared", 18, "1"),
    ], faults
    assert "SIGKILL" in faults[0]["detail"] and "SIGSTOP" in faults[3]["detail"]
    assert "SIGCONT" in faults[4]["detail"]
    # the restart is a new agent that loaded every expert placed on dev2
    killed_pid = int(faults[0]["detail"].split("pid ")[1].split()[0])
    restarted_pid = int(faults[1]["detail"].split("pid ")[1].split()[0])
    placed = [u for u, ds in man["trials"][0]["placement"].items() if "dev2" in ds]
    assert restarted_pid != killed_pid and placed
    assert f", {len(placed)} experts loaded" in faults[1]["detail"], faults[1]["detail"]

    # the cut rate as tc reports it, in both directions, only while the fault lasts: injected
    # before request 15 (15 rows on disk), cleared before request 18 (18 rows); with 16 or 17
    # rows on disk it is certainly in force (two requests: a sample every 0.05 s cannot miss
    # both on a loaded host, where one fast request did)
    samples = sampler.samples
    cut = [s for s in samples if s.rates["dev3"] == (CUT_KBIT, CUT_KBIT)]
    assert cut, [s.rates["dev3"] for s in samples]
    assert all(s.rows_after >= 15 and s.rows_before <= 18 for s in cut), cut
    assert not any(CUT_KBIT in s.rates[d] for s in samples for d in ("dev1", "dev2"))
    mid = [s for s in samples if 16 <= s.rows_before and s.rows_after <= 17]
    assert mid and all(s.rates["dev3"] == (CUT_KBIT, CUT_KBIT) for s in mid), mid
    # ... then the trial's rate again (not the testbed's rate before the run) for the rest of it
    restored = [s for s in samples if s.rows_before >= 19 and s.rows_after <= 29]
    assert restored and all(
        s.rates[d] == (TRIAL_KBIT, TRIAL_KBIT) for s in restored for d in ("dev1", "dev2", "dev3")
    ), restored
    assert "link 24/24 kbit/s" in faults[5]["detail"]
    assert (
        "link 50000/50000 kbit/s" in faults[6]["detail"] and "trial's rate" in faults[6]["detail"]
    )

    reqs = {int(r["request"]): r for r in R.read_csv(run_dir / R.REQUESTS)}
    assert sorted(reqs) == list(range(30))
    calls = R.read_csv(run_dir / R.CALLS)

    def on(dev: str, request: int) -> list[dict]:
        return [c for c in calls if c["device"] == dev and int(c["request"]) == request]

    def served(request: int) -> bool:
        """Fault-free, every call answered, and the tiny task answered exactly (top-k scores
        1.000 on it)."""
        r = reqs[request]
        mine = [c for c in calls if int(c["request"]) == request]
        return (
            r["faults"] == ""
            and r["status"] == "ok"
            and r["correct"] == "1"
            and float(r["score"]) == 1.0
            and int(r["calls_failed"]) == 0
            and len(mine) == int(r["calls"]) > 0
            and all(c["status"] == "ok" for c in mine)
        )

    # before any fault: everything served, every answer right
    assert served(0) and served(1), (reqs[0], reqs[1])
    # the kill: dev2's calls fail (dropped and renormalised: the request is degraded)
    assert "f0-kill-dev2" in reqs[2]["faults"] and reqs[2]["status"] == "degraded"
    dead = [c for r in (2, 3, 4) for c in on("dev2", r)]
    assert dead and {c["status"] for c in dead} <= FAILED, dead
    assert all(c["faults"] == reqs[int(c["request"])]["faults"] for c in dead)
    # the stop: dev1's calls time out while it is stopped
    assert all("f2-stop-dev1" in reqs[r]["faults"] for r in (9, 10))
    assert any(c["status"] == "timeout" for r in (9, 10) for c in on("dev1", r))
    # the cut link: dev3's calls cannot make it in time
    assert all("f3-link-dev3" in reqs[r]["faults"] for r in (15, 16))
    assert any(c["status"] in FAILED for r in (15, 16) for c in on("dev3", r))

    # recovery: from each fault's end on, no request carries its id; within RECOVERY requests
    # every request up to the next fault is served in full, the faulted device's calls included
    for fid, dev, start, end, nxt in WINDOWS:
        assert all(fid in reqs[r]["faults"] for r in range(start, end)), fid
        assert all(reqs[r]["faults"] == "" for r in range(end, nxt)), fid
        window = range(end + RECOVERY, nxt)
        bad = [
            (r, reqs[r]["status"], reqs[r]["faults"], reqs[r]["correct"], reqs[r]["score"])
            for r in window
            if not served(r)
        ]
        assert not bad, (
            fid,
            "(request, status, faults, correct, score):",
            bad,
            [
                (c["request"], c["device"], c["status"])
                for r in window
                for c in calls
                if int(c["request"]) == r and c["status"] != "ok"
            ],
        )
        back = [c for r in window for c in on(dev, r)]
        assert back and all(c["status"] == "ok" for c in back), (fid, back)
    # links back to the testbed's rates after the run (not the trial's), as tc reports them
    rates = [
        {(s["device"], s["down_kbit"], s["up_kbit"]) for s in man[k]["links"]}
        for k in ("links_before", "links_after")
    ]
    assert rates[0] == rates[1] and {d for d, _, _ in rates[1]} == {"dev1", "dev2", "dev3"}
    assert all(down != TRIAL_KBIT for _, down, _ in rates[1]), rates
    # and every agent serves again: the restarted one, the one stopped and continued
    st = run_cli("agents", "status", str(inv), "--format", "json", env=env, timeout=120)
    assert st.returncode == 0, st.stderr
    rows = json.loads(st.stdout)
    rows = rows.get("devices", rows) if isinstance(rows, dict) else rows
    assert [r["state"] for r in rows] == ["running"] * 3, rows

    rep = run_cli("report", str(run_dir), "--format", "json", env=env, timeout=120)
    assert rep.returncode == 0, rep.stderr
    fr = {f["fault"]: f for f in json.loads(rep.stdout)["faults"]}
    assert set(fr) == {"f0-kill-dev2", "f1-restart-dev2", "f2-stop-dev1", "f3-link-dev3"}
    kill = fr["f0-kill-dev2"]
    assert kill["requests_during"] == 3 and kill["calls_failed_during"] >= len(dead)
    assert kill["latency_p50_during_ms"] > 0
    for fid, _, start, end, _ in WINDOWS:
        f = fr[fid]
        before = [int(reqs[r]["correct"]) for r in range(start) if reqs[r]["faults"] == ""]
        assert f["requests_during"] == end - start, f
        # the report's "after": every later fault-free request; as accurate as before the fault
        assert f["requests_after"] == sum(reqs[r]["faults"] == "" for r in range(end, 30)), f
        assert before and sum(before) / len(before) == 1.0, (fid, before)
        # served in full again within RECOVERY requests of the fault's end, and as accurate
        # as before it whenever served in full; "after" also holds the degraded tails (a device
        # marked down by a timeout is skipped until its back-off ends)
        assert f["recovery_requests"] is not None and f["recovery_requests"] <= RECOVERY, f
        assert f["accuracy_recovered"] == sum(before) / len(before), f
        after = [int(reqs[r]["correct"]) for r in range(end, 30) if reqs[r]["faults"] == ""]
        assert f["accuracy_after"] == pytest.approx(sum(after) / len(after), abs=1e-4), f
        tail = [r for r in range(end, 30) if reqs[r]["faults"] == ""][: f["recovery_requests"]]
        assert all(reqs[r]["status"] == "degraded" for r in tail), (fid, tail)
