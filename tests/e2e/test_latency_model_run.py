"""The calibrated latency model on a real run (issue 16, items 1 and 2): for every policy the
runner predicts each layer's exchange from the actual selection's per-device loads, the
rates tc enforces each way and the trial's own profiling fit, and the median of
predicted_ms / moe_ms lies within 0.75-1.33 for each policy. Decision epochs per layer:
WDMoE decides each layer's bandwidth from that layer's loads, down and up at their own rates,
and links.csv records the epoch scope in force."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from testbed.results import schema as R
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "lm"
seed = 3
[model]
path = "tiny-4096"
wire_dtype = "bf16"
[policy]
epoch = "layer"
[links]
bandwidth_mhz = 20.0
[links.channel]
# no fading or shadowing: a deep fade (tens of kbit/s) would time a prefill's call out
fading = "none"
shadowing_db = 0.0
[workload]
task = "tiny"
requests = 3
[run]
devices = 3
bs_threads = 1
timeout_s = 5.0
[sweep]
"policy.name" = ["topk", "wdmoe"]
"""

#: the band the median of predicted/measured must hold (the issue asks no looser than this)
BAND = (0.75, 1.33)


def test_latency_model_predicts_every_policys_layers(shared_testbed, tmp_path: Path) -> None:
    env, inv_path = shared_testbed
    (tmp_path / "lm.toml").write_text(RECIPE)
    res = run_cli(
        "run",
        str(tmp_path / "lm.toml"),
        "--inventory",
        str(inv_path),
        "--out",
        str(tmp_path / "results"),
        "--format",
        "json",
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])

    layers = R.read_csv(run_dir / R.LAYERS)
    ratios: dict[str, list[float]] = {}
    for r in layers:
        assert r["predicted_ms"] != "" and float(r["predicted_ms"]) > 0, r  # every policy
        assert float(r["decision_ms"]) > 0 and float(r["change_ms"]) >= 0
        ratios.setdefault(r["policy"], []).append(float(r["predicted_ms"]) / float(r["moe_ms"]))
    assert set(ratios) == {"topk", "wdmoe"}
    med = {p: statistics.median(x) for p, x in ratios.items()}
    assert all(BAND[0] <= m <= BAND[1] for m in med.values()), med
    # WDMoE's own model is recorded beside it
    assert all(r["policy_predicted_ms"] != "" for r in layers if r["policy"] == "wdmoe")

    # the fit, its parameters and residuals, per trial
    man = json.loads((run_dir / R.MANIFEST).read_text())
    for t in man["trials"]:
        lm = t["latency_model"]
        assert set(lm["params"]["devices"]) == {"dev1", "dev2", "dev3"}
        assert lm["params"]["shaping"] == man["shaping"]["mode"]
        assert lm["residuals"]["layer"]["n"] > 0
        assert all(d["rtt"]["n"] > 0 for d in lm["residuals"]["devices"].values())
    prof = R.read_csv(run_dir / R.PROFILE)
    assert {p["trial"] for p in prof} == {"0", "1"}  # every trial profiles its devices
    assert {p["experts"] for p in prof} == {"1", "2"}
    assert {p["devices"] for p in prof} == {"1", "2", "3"}  # alone, two at a time, all

    # epochs per layer: one change per decision, each recorded with its scope
    links = R.read_csv(run_dir / R.LINKS)
    assert links and {r["epoch_scope"] for r in links} == {"layer"}
    # (the trial's first epoch starts at the channel's equal split, before WDMoE's first
    # decision; from then on WDMoE sets the rates)
    wd = [r for r in links if r["policy"] == "wdmoe" and r["source"] == "policy"]
    assert wd and {r["source"] for r in links if r["policy"] == "wdmoe"} == {"channel", "policy"}
    decided = {(r["request"], r["step"], r["layer"]) for r in wd}
    assert len({r["epoch"] for r in wd}) == len(decided)
    assert {r["layer"] for r in wd} == {"0", "1", "2", "3"}  # every layer its own decision
    # down and up each at the channel's own rate
    assert any(abs(float(r["asked_down_kbit"]) - float(r["asked_up_kbit"])) > 1 for r in wd)
    # within a step, layers' allocations differ (each from that layer's loads)
    by_step: dict[tuple[str, str], set] = {}
    for r in wd:
        by_step.setdefault((r["request"], r["step"]), set()).add(
            (r["layer"], r["device"], round(float(r["asked_down_kbit"])))
        )
    assert any(len({(d, k) for _, d, k in s}) > len({d for _, d, _ in s}) for s in by_step.values())

    rep = run_cli("report", str(run_dir), "--format", "json", env=env)
    assert rep.returncode == 0, rep.stderr
    pred = {p["policy"]: p for p in json.loads(rep.stdout)["prediction"]}
    assert set(pred) == {"topk", "wdmoe"}
    assert all(p["exchange"]["median"] == pytest.approx(med[k]) for k, p in pred.items())
