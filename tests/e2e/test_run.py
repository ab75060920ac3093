"""The experiment path through the real CLI: local testbed, provisioning over SSH, `testbed run`
of a swept recipe against agents in namespaces over tc-shaped links, the results folder, faults.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from testbed.lab.runner import LocalRunner
from testbed.net.shaper import TcShaper
from testbed.results import schema as R
from testbed.results.report import PLOT_FILES
from tests.conftest import leftovers, needs_testbed, run_cli, unique_name

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "e2e"
seed = 1
[model]
path = "tiny"
[workload]
task = "tiny"
requests = {requests}
[run]
timeout_s = {timeout}
bs_threads = 1
[sweep]
"links.rate" = {rates}
"policy.name" = {policies}
"""


#: ``python -c`` that runs ``python -m testbed`` with SIGINT raising KeyboardInterrupt
_WITH_SIGINT = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('testbed', run_name='__main__', alter_sys=True)"
)


def _recipe(
    tmp_path: Path,
    requests: int = 5,
    timeout: float = 5.0,
    policies: str = '["topk", "top1"]',
    name: str = "r.toml",
    rates: str = '["1mbit", "100mbit"]',
) -> Path:
    p = tmp_path / name
    p.write_text(RECIPE.format(requests=requests, timeout=timeout, policies=policies, rates=rates))
    return p


def _cli(env, *args, timeout=300):
    return run_cli(*args, env=env, timeout=timeout)


def _up(env, tmp_path, devices=3):
    name = unique_name("r")
    inv = tmp_path / f"{name}.inventory.toml"
    res = _cli(
        env,
        "local",
        "up",
        "--devices",
        str(devices),
        "--name",
        name,
        "--rate",
        "1gbit",
        "--inventory-out",
        str(inv),
    )
    assert res.returncode == 0, res.stderr
    return name, inv


@pytest.fixture(scope="module")
def testbed3(tmp_path_factory):
    """One 3-device testbed (``local up`` at 1 Gbit/s) for this module's tests: (env, inventory
    path). Each test leaves the links as it found them; agents may be left running (a test that
    needs them stopped stops them). Taken down at the module's end through ``local down``, which
    must succeed and leave nothing behind."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "state").mkdir()
    env = {"TESTBED_STATE_DIR": str(tmp / "state")}
    name, inv = _up(env, tmp)
    try:
        yield env, inv
    finally:
        down = _cli(env, "local", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}


def _tc_rates(inv_path: Path) -> dict[str, tuple]:
    from testbed.lab.inventory import load_inventory

    inv = load_inventory(inv_path)
    sh = TcShaper(
        LocalRunner(host="bs"),
        inv.bs.interface,
        inv.bs.ifb,
        [d.host for d in inv.devices],
        [d.name for d in inv.devices],
    )
    return {s.device: (s.down_kbit, s.up_kbit) for s in sh.show()}


def _check_png(path: Path) -> None:
    """A real plot: a PNG that decodes, of figure size, with drawn data (coloured pixels, not
    only the black-and-white of empty axes and their labels)."""
    import numpy as np
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert len(data) > 10_000, (path, len(data))
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= 400 and im.height >= 300, (path, im.size)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    coloured = int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 60).sum())
    assert coloured >= 50, (path, coloured)


def _only_run_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_provision_run_sweep_results(testbed3, tmp_path):
    env, inv = testbed3
    first = _cli(env, "provision", str(inv), "--model", "tiny", "--format", "json")
    assert first.returncode == 0, first.stderr
    second = _cli(env, "provision", str(inv), "--model", "tiny", "--format", "json")
    assert second.returncode == 0, second.stderr
    rows2 = json.loads(second.stdout)
    rows2 = rows2.get("devices", rows2) if isinstance(rows2, dict) else rows2
    assert len(rows2) == 3 and all(r["ok"] and not r["changed"] for r in rows2), rows2
    before = _tc_rates(inv)

    out = tmp_path / "results"
    # the tiny model's messages (256 B a token) fit in the tc bucket (2 ms of the rate, at
    # least 2 frames = 3 kB) at 1 Mbit/s and pass at line speed while it refills in time;
    # at 300 kbit/s the bucket runs dry within a step and the link's rate shows
    res = _cli(
        env,
        "run",
        str(_recipe(tmp_path, rates='["300kbit", "100mbit"]')),
        "--inventory",
        str(inv),
        "--out",
        str(out),
        "--format",
        "json",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    run_dir = _only_run_dir(out)
    assert summary["status"] == "completed" and Path(summary["run_dir"]) == run_dir

    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "completed" and man["error"] is None and man["git_commit"]
    assert man["links_before"]["links"] and man["links_after"]["links"]
    assert {t["links_enforced"][0]["down_kbit"] for t in man["trials"]} == {300.0, 100000.0}
    assert set(man["clock_offsets"]) == {"dev1", "dev2", "dev3"}
    # links are restored to what they were before the run
    assert _tc_rates(inv) == before

    sweep = ["sweep.links.rate", "sweep.policy.name"]
    files = {
        R.REQUESTS: R.REQUEST_COLUMNS,
        R.LAYERS: R.LAYER_COLUMNS,
        R.CALLS: R.CALL_COLUMNS,
        R.SUMMARY: R.SUMMARY_COLUMNS,
    }
    for fname, cols in files.items():
        header = (run_dir / fname).read_text().splitlines()[0].split(",")
        assert header == list(cols) + sweep, fname
    assert (run_dir / R.DEVICES).read_text().splitlines()[0].split(",") == list(R.DEVICE_COLUMNS)

    reqs = R.read_csv(run_dir / R.REQUESTS)
    calls = R.read_csv(run_dir / R.CALLS)
    layers = R.read_csv(run_dir / R.LAYERS)
    assert len(reqs) == 4 * 5  # one row per request: 2 rates x 2 policies x 5 requests
    assert {(r["policy"], r["sweep.links.rate"]) for r in reqs} == {
        (p, r) for p in ("topk", "top1") for r in ("300kbit", "100mbit")
    }
    # one row per expert call, and they add up to the requests' counts
    per_req: dict[tuple, int] = {}
    for c in calls:
        per_req[(c["trial"], c["request"])] = per_req.get((c["trial"], c["request"]), 0) + 1
    assert all(per_req[(r["trial"], r["request"])] == int(r["calls"]) for r in reqs)
    assert all(c["status"] == "ok" and float(c["network_ms"]) > 0 for c in calls)
    assert {c["device"] for c in calls} == {"dev1", "dev2", "dev3"}
    # the model really ran: top-k answers the tiny task, and top-1 uses one expert per token
    topk = [r for r in reqs if r["policy"] == "topk"]
    top1 = [r for r in reqs if r["policy"] == "top1"]
    # (top-k scores 1.000 exact match on the tiny task: every answer right, every token)
    assert [(r["correct"], float(r["score"])) for r in topk] == [("1", 1.0)] * len(topk), [
        (r["sweep.links.rate"], r["request"], r["correct"], r["score"]) for r in topk
    ]
    assert all(float(r["experts_per_token"]) == 2.0 for r in topk)
    assert all(float(r["experts_per_token"]) == 1.0 for r in top1)

    def share(rate: str) -> float:
        ls = [x for x in layers if x["sweep.links.rate"] == rate and x["critical_path_ms"]]
        return sum(float(x["critical_network_ms"]) for x in ls) / sum(
            float(x["critical_path_ms"]) for x in ls
        )

    slow, fast = share("300kbit"), share("100mbit")
    assert slow > fast, (slow, fast)
    summ = R.read_csv(run_dir / R.SUMMARY)
    assert len(summ) == 4 and all(int(s["requests"]) == 5 for s in summ)

    # energy: namespace devices and this BS have no meter of their own, so every figure is
    # the CPU-time estimate, positive and marked so, never blank
    est = "estimated:cpu-time(5 W/core)"
    for r in reqs:
        dev_j, bs_j, tot_j = (float(r[k]) for k in ("energy_devices_j", "energy_bs_j", "energy_j"))
        assert dev_j > 0 and bs_j > 0 and tot_j == pytest.approx(dev_j + bs_j, abs=2e-6), r
        assert r["energy_source"] == "estimated", r
    assert all(float(c["energy_j"]) >= 0 and c["energy_source"] == est for c in calls)
    assert sum(float(c["energy_j"]) for c in calls) > 0
    # a device's compute windows lie inside the request's window around them
    per_req_dev: dict[tuple, float] = {}
    for c in calls:
        k = (c["trial"], c["request"])
        per_req_dev[k] = per_req_dev.get(k, 0.0) + float(c["energy_j"])
    assert all(
        per_req_dev[(r["trial"], r["request"])] <= float(r["energy_devices_j"]) + 1e-6 for r in reqs
    )
    devs = R.read_csv(run_dir / R.DEVICES)
    assert devs and {d["device"] for d in devs} == {"dev1", "dev2", "dev3"}
    assert all(
        float(d["energy_j"]) > 0 and float(d["power_w"]) >= 0 and d["energy_source"] == est
        for d in devs
    ), devs[:3]
    assert all(float(s["energy_per_token_j"]) > 0 for s in summ)
    assert man["energy"]["bs"]["label"] == est and set(man["energy"]["devices"].values()) == {est}

    rep = _cli(env, "report", str(run_dir), "--format", "json")
    assert rep.returncode == 0, rep.stderr
    plots = [Path(p) for p in json.loads(rep.stdout)["plots"]]
    assert sorted(p.name for p in plots) == sorted(PLOT_FILES), plots
    assert all(p.parent == run_dir / "plots" for p in plots), plots
    for p in plots:
        _check_png(p)


BOOM = """
from testbed.policy import Policy

class Boom(Policy):
    \"\"\"Raises on its third selection.\"\"\"
    name = "boom"

    def __init__(self, placement="round-robin", seed=0):
        super().__init__(placement, seed)
        self.n = 0

    def select(self, ctx, cluster=None):
        self.n += 1
        if self.n == 3:
            raise RuntimeError("boom at selection 3")
        from models.routing import TopKSelection
        from testbed.policy import Decision
        return Decision(TopKSelection()(ctx))
"""


def test_bad_input_and_faults(testbed3, tmp_path):
    env, inv = testbed3
    out = tmp_path / "results"
    # malformed recipe: one line, exit 2, nothing created
    bad = tmp_path / "bad.toml"
    bad.write_text('[workload]\nrequests = "many"\n')
    res = _cli(env, "run", str(bad), "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        (f"error: {bad}: workload.requests: must be an integer in 1..100000, not 'many'")
    ]
    assert not out.exists()

    # unknown policy name: lists the valid ones, refused before a run folder is made
    res = _cli(
        env,
        "run",
        str(_recipe(tmp_path, policies='["topk", "nosuch"]')),
        "--inventory",
        str(inv),
        "--out",
        str(out / "a"),
    )
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "topk" in err[0], err
    assert "run folder" not in err[0] and not (out / "a").exists()

    # a power mode on devices without nvpmodel: one line naming the key and every device,
    # exit 2, before any link or agent is touched (the agents stopped first: the module's
    # testbed may have them running)
    stop = _cli(env, "agents", "stop", str(inv))
    assert stop.returncode == 0, stop.stderr
    tc_before = _tc_rates(inv)
    pm = _recipe(tmp_path, policies='["topk"]', name="pm.toml")
    pm.write_text(pm.read_text().replace("[sweep]", '[devices]\npower_mode = "MAXN"\n[sweep]'))
    res = _cli(env, "run", str(pm), "--inventory", str(inv), "--out", str(out / "pm"))
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"{pm}: devices.power_mode: dev1: has no nvpmodel" in err[0], err
    assert all(f"{d}: has no nvpmodel (not installed)" in err[0] for d in ("dev2", "dev3")), err
    assert _tc_rates(inv) == tc_before
    st = _cli(env, "agents", "status", str(inv), "--format", "json")
    assert st.returncode == 0, st.stderr
    rows = json.loads(st.stdout)
    rows = rows.get("devices", rows) if isinstance(rows, dict) else rows
    assert [r["state"] for r in rows] == ["stopped"] * 3, rows  # none started

    assert _cli(env, "provision", str(inv), "--model", "tiny").returncode == 0
    before = _tc_rates(inv)
    # a policy that raises mid-run: one line naming it, non-zero, rows so far kept, links
    # restored
    (tmp_path / "boom.py").write_text(BOOM)
    res = _cli(
        env,
        "run",
        str(_recipe(tmp_path, policies='["boom.py:Boom"]')),
        "--inventory",
        str(inv),
        "--out",
        str(out / "b"),
    )
    assert res.returncode == 8, res.stderr
    err = res.stderr.strip().splitlines()
    assert (
        len(err) == 1 and "policy boom: select raised RuntimeError: boom at selection 3" in err[0]
    ), err
    run_dir = _only_run_dir(out / "b")
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "failed" and "boom at selection 3" in man["error"]
    assert man["links_after"] is not None
    assert _tc_rates(inv) == before

    # an agent killed mid-run: the run completes, its rows say which calls failed
    st = _cli(env, "agents", "status", str(inv), "--format", "json")
    assert st.returncode == 0, st.stderr
    agents = json.loads(st.stdout)
    agents = agents.get("devices", agents) if isinstance(agents, dict) else agents
    victim = next(a for a in agents if a.get("device", a.get("name")) == "dev2")
    pid = int(victim["pid"])
    recipe = _recipe(tmp_path, requests=12, timeout=1.0, policies='["topk"]', name="kill.toml")
    proc_out = out / "c"
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            rows = R.read_csv(next(iter(proc_out.glob("*/requests.csv")), proc_out / "none"))
            if len(rows) >= 3:
                import os
                import signal

                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert b"device_agent" in cmd
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res = _cli(
        env,
        "run",
        str(recipe),
        "--inventory",
        str(inv),
        "--out",
        str(proc_out),
        "--format",
        "json",
    )
    th.join(5)
    assert killed.is_set()
    assert res.returncode == 0, res.stderr
    run_dir = _only_run_dir(proc_out)
    reqs = R.read_csv(run_dir / R.REQUESTS)
    calls = R.read_csv(run_dir / R.CALLS)
    assert len(reqs) == 2 * 12
    bad_calls = [c for c in calls if c["status"] not in ("ok", "rerouted")]
    assert bad_calls and {c["device"] for c in bad_calls} == {"dev2"}
    assert all(c["status"] == "ok" for c in calls if c["device"] != "dev2")
    assert {c["status"] for c in bad_calls} <= {"timeout", "unreachable", "skipped", "error"}
    assert any(r["status"] == "degraded" and int(r["calls_failed"]) > 0 for r in reqs)
    assert all(r["status"] == "ok" for r in reqs[:3])

    # Ctrl-C mid-run: exit 130, manifest "interrupted", rows kept, links restored
    import os
    import signal
    import subprocess
    import sys

    before = _tc_rates(inv)
    int_out = out / "d"
    # long enough that the signal lands mid-run: 12 requests of a 1-thread BS can all finish
    # between two looks at requests.csv (exit 0, as it did once in CI)
    long = _recipe(tmp_path, requests=200, timeout=1.0, policies='["topk"]', name="int.toml")
    # SIGINT as a terminal's Ctrl-C finds it: a suite started as a background job of a
    # non-interactive shell (`cmd &`) inherits SIGINT ignored, and so would this run
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _WITH_SIGINT,
            "run",
            str(long),
            "--inventory",
            str(inv),
            "--out",
            str(int_out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and p.poll() is None:
        if len(R.read_csv(next(iter(int_out.glob("*/requests.csv")), int_out / "none"))) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, (stderr[-2000:], stdout[-2000:])
    run_dir = _only_run_dir(int_out)
    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert man["status"] == "interrupted" and man["links_after"] is not None
    assert 2 <= len(R.read_csv(run_dir / R.REQUESTS)) < 400
    assert _tc_rates(inv) == before
