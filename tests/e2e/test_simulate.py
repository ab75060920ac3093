"""`testbed simulate` (the analytic twin, testbed.run.twin) through the real CLI: a 1000-device twin
writes a run's CSVs marked simulated and `testbed report` shows it; and against a measured run on
the local testbed, calibrated from it, the twin's per-token latency per policy and device count
is within 15% of the measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.results import schema as R
from testbed.run.twin import per_policy_token_ms
from tests.conftest import needs_testbed, run_cli

SMALL = """
[recipe]
name = "tw"
seed = 0
[model]
path = "tiny"
[policy]
epoch = "step"
[links]
bandwidth_mhz = 0.5
[workload]
task = "tiny"
requests = 2
[run]
bs_threads = 1
[sweep]
"run.devices" = [2, 4]
"policy.name" = ["topk", "wdmoe"]
"""


def _header(path: Path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


def test_simulate_1000_devices_writes_a_run_marked_simulated(tmp_path: Path) -> None:
    (tmp_path / "tw.toml").write_text(SMALL)
    res = run_cli(
        "simulate",
        str(tmp_path / "tw.toml"),
        "--devices",
        "1000",
        "--out",
        str(tmp_path / "out"),
        "--format",
        "json",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    run = Path(out["run_dir"])
    assert out["mode"] == "simulated" and out["status"] == "completed" and "-sim-" in out["run_id"]
    assert out["trials"] == 2 and out["requests"] == 4  # --devices replaced the device sweep
    extra = ["sweep.policy.name"]
    for name, cols, x in (
        (R.REQUESTS, R.REQUEST_COLUMNS, extra),
        (R.LAYERS, R.LAYER_COLUMNS, extra),
        (R.CALLS, R.CALL_COLUMNS, extra),
        (R.SUMMARY, R.SUMMARY_COLUMNS, extra),
        (R.LINKS, R.LINK_COLUMNS, extra),
        (R.DEVICES, R.DEVICE_COLUMNS, []),
        (R.PROFILE, R.PROFILE_COLUMNS, []),
    ):
        head = _header(run / name)
        if name == R.LAYERS:  # then the policy's own Decision.stats, as a run adds them
            policy_cols, head = head[len(cols) + len(x) :], head[: len(cols) + len(x)]
            assert policy_cols == ["policy.experts_dropped", "policy.tokens_pruned", "policy.wlr"]
        assert head == list(cols) + x, name  # a real run's columns
    man = json.loads((run / R.MANIFEST).read_text())
    assert man["mode"] == "simulated" and man["twin"]["devices"] == 1000
    assert (
        len(man["compute_profile"]) == 1000 and man["twin"]["calibration"]["source"] == "defaults"
    )
    assert all(t["devices"] == 1000 and t["devices_used"] == 32 for t in man["trials"])
    reqs = R.read_csv(run / R.REQUESTS)
    assert all(r["correct"] == "1" for r in reqs if r["policy"] == "topk")  # real routing
    assert all(float(r["total_ms"]) > 0 and r["energy_j"] == "" for r in reqs)
    calls = R.read_csv(run / R.CALLS)
    assert {c["device"] for c in calls} <= {f"dev{i}" for i in range(1, 33)}
    assert all(
        c["status"] == "ok" and int(c["bytes_down"]) == 256 * int(c["tokens"]) for c in calls
    )
    layers = R.read_csv(run / R.LAYERS)
    assert all(float(r["moe_ms"]) > 0 and float(r["bs_ms"]) > 0 for r in layers)
    own = "policy_predicted_ms" if "policy_predicted_ms" in R.LAYER_COLUMNS else "predicted_ms"
    assert all(r[own] for r in layers if r["policy"] == "wdmoe")  # WDMoE's own prediction
    links = R.read_csv(run / R.LINKS)
    topk_epochs = {r["epoch"] for r in links if r["policy"] == "topk"}
    assert len([r for r in links if r["policy"] == "topk"]) == 1000 * len(topk_epochs)

    rep = run_cli("report", str(run), "--format", "json", timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["runs"][0]["mode"] == "simulated"
    rep = run_cli("report", str(run), timeout=120)
    assert rep.returncode == 0 and "SIMULATED" in rep.stdout, rep.stdout + rep.stderr


MEASURED = """
[recipe]
name = "twincal"
seed = 0
[model]
path = "tiny-4096"
wire_dtype = "bf16"
[policy]
epoch = "step"
[links]
bandwidth_mhz = 5.0
[workload]
task = "tiny"
requests = 2
[run]
timeout_s = 10.0
bs_threads = 1
[sweep]
"run.devices" = [2, 3]
"policy.name" = ["topk", "top1", "wdmoe"]
"""

#: the band the twin must hold against the measurement, per (policy, device count)
BAND = 0.15


@needs_testbed
@pytest.mark.root
def test_the_run_table_keeps_every_column_when_piped(tmp_path: Path) -> None:
    recipe = tmp_path / "tw.toml"
    recipe.write_text(SMALL.replace('"run.devices" = [2, 4]', '"run.devices" = [2]'))
    res = run_cli("simulate", str(recipe), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(line for line in lines if "trial" in line and "policy" in line)
    # rich cut this table at 80 columns when stdout was not a terminal
    assert "failed calls" in header and "net share" in header, header
    assert max(len(line) for line in lines) > 80


@needs_testbed
@pytest.mark.root
def test_twin_per_token_latency_within_15_percent_of_the_measured_run(
    shared_testbed, tmp_path: Path
) -> None:
    env, inv = shared_testbed
    recipe = tmp_path / "twincal.toml"
    recipe.write_text(MEASURED)
    res = run_cli(
        "run",
        str(recipe),
        "--inventory",
        str(inv),
        "--out",
        str(tmp_path / "measured"),
        "--format",
        "json",
        env=env,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr
    measured = Path(json.loads(res.stdout)["run_dir"])
    sim = run_cli(
        "simulate",
        str(recipe),
        "--calibrate",
        str(measured),
        "--out",
        str(tmp_path / "twin"),
        "--format",
        "json",
        timeout=300,
    )
    assert sim.returncode == 0, sim.stderr
    twin = Path(json.loads(sim.stdout)["run_dir"])
    m, s = per_policy_token_ms(measured), per_policy_token_ms(twin)
    assert set(m) == set(s) and len(m) == 6
    errs = {k: (s[k] - m[k]) / m[k] for k in m}
    lines = [
        f"{p:6s} {pt:40s} measured {m[(p, pt)]:8.1f} ms/token, twin {s[(p, pt)]:8.1f} "
        f"({100 * e:+.1f}%)"
        for (p, pt), e in sorted(errs.items())
    ]
    print("\n" + "\n".join(lines))
    assert max(abs(e) for e in errs.values()) <= BAND, "\n".join(lines)
    # the same decisions: the twin's accuracy is the measurement's (routing, WDMoE's pruning)
    acc = lambda run: {
        (r["policy"], r["point"]): r["accuracy"] for r in R.read_csv(run / R.SUMMARY)
    }
    assert acc(twin) == acc(measured)
