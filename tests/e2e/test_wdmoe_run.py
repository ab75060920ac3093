"""WDMoE on the real links: one tc batch per epoch reads back what it set, a run's links.csv
holds the rates tc enforced for the policy's bandwidth (down and up each its own) and for a
replayed channel trace, the layers carry the calibrated model's prediction and the policy's
own, profiling covers exactly the trial's devices."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from testbed.lab.inventory import load_inventory
from testbed.lab.runner import LocalRunner
from testbed.net.channel import read_trace
from testbed.net.verify import shaper_for
from testbed.results import schema as R
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "wd"
seed = 1
[model]
path = "tiny"
[policy]
epoch = "step"
[links]
bandwidth_mhz = 0.5
trace = "tr.csv"
[workload]
task = "tiny"
requests = 2
[run]
devices = 2
bs_threads = 1
[sweep]
"policy.name" = ["wdmoe", "topk"]
"""


def _close(enforced: float, asked: float) -> bool:
    """tc keeps a rate in bytes/s and prints it in whole kbit (or Mbit with decimals)."""
    return abs(enforced - asked) <= 1.0 + 0.002 * asked


def _check_epochs_follow_each_other(links: list[dict]) -> None:
    """Within a trial an epoch's rates stay from the end of its tc change (``time_s`` +
    ``change_ms``) for ``epoch_ms``, until the next change starts: the three add up to the next
    epoch's ``time_s`` (to the CSV's rounding)."""
    by_trial: dict[str, dict[float, dict]] = {}
    for r in links:  # one change per time_s (its devices' rows share the timings)
        by_trial.setdefault(r["trial"], {})[float(r["time_s"])] = r
    pairs = 0
    for changes in by_trial.values():
        order = [changes[t] for t in sorted(changes)]
        for r, nxt in pairwise(order):
            ends_ms = float(r["time_s"]) * 1e3 + float(r["change_ms"]) + float(r["epoch_ms"])
            assert ends_ms == pytest.approx(float(nxt["time_s"]) * 1e3, abs=0.01), (r, nxt)
            pairs += 1
    assert pairs >= 4


def _check_profile_fit(profile: dict, samples: list[dict]) -> None:
    """Each device's ``c(N) = a + b N`` is the one fitted to its own samples in profile.csv: its
    recorded rmse is that of those samples, and no candidate line with ``a, b >= 0`` fits them
    better: the best constant, the best line through 0, the free least-squares line (closed
    form, here) where its coefficients are both >= 0."""

    def rmse(pts: list[tuple[float, float]], a: float, b: float) -> float:
        return (sum((a + b * n - y) ** 2 for n, y in pts) / len(pts)) ** 0.5

    for dev, p in profile.items():
        pts = [(float(s["tokens"]), float(s["compute_ms"])) for s in samples if s["device"] == dev]
        assert len(pts) == p["samples"] and p["a_ms"] >= 0 and p["b_ms"] >= 0, (dev, p)
        assert p["rmse_ms"] == pytest.approx(rmse(pts, p["a_ms"], p["b_ms"]), rel=1e-6, abs=1e-5)
        mean_n = sum(n for n, _ in pts) / len(pts)
        mean = sum(y for _, y in pts) / len(pts)
        slope0 = sum(n * y for n, y in pts) / sum(n * n for n, _ in pts)
        cands = [(mean, 0.0), (0.0, slope0)]
        b = sum((n - mean_n) * (y - mean) for n, y in pts) / sum((n - mean_n) ** 2 for n, _ in pts)
        if mean - b * mean_n >= 0 and b >= 0:
            cands.append((mean - b * mean_n, b))
        best = min(rmse(pts, a_, b_) for a_, b_ in cands)
        assert p["rmse_ms"] <= best + 1e-5, (dev, p, cands)


def test_wdmoe_run_enforces_and_records(shared_testbed, tmp_path: Path) -> None:
    env, inv_path = shared_testbed
    inv = load_inventory(inv_path)
    shaper = shaper_for(inv, LocalRunner())
    shaper.set_rates({d: (20000.0, 20000.0) for d in ("dev1", "dev2", "dev3")})

    # one batch: both directions of two devices changed in place, read back as tc shows them
    handles = shaper.qdisc_handles()
    got = shaper.set_rates({"dev1": (1234.0, 567.0), "dev2": (8000.0, 9000.0)})
    shown = {s.device: (s.down_kbit, s.up_kbit) for s in shaper.show()}
    assert got == {d: shown[d] for d in ("dev1", "dev2")}
    assert got["dev1"] == (1234.0, 567.0) and got["dev2"] == (8000.0, 9000.0)
    assert shown["dev3"] == (20000.0, 20000.0) and shaper.qdisc_handles() == handles
    shaper.set_rates({"dev1": (20000.0, 20000.0), "dev2": (20000.0, 20000.0)})
    before = {s.device: (s.down_kbit, s.up_kbit) for s in shaper.show()}

    tr = run_cli(
        "links",
        "trace",
        str(tmp_path / "tr.csv"),
        "--devices",
        "3",
        "--epochs",
        "6",
        "--bandwidth-mhz",
        "0.5",
        "--seed",
        "1",
        env=env,
    )
    assert tr.returncode == 0, tr.stderr
    (tmp_path / "wd.toml").write_text(RECIPE)
    out = tmp_path / "results"
    res = run_cli(
        "run",
        str(tmp_path / "wd.toml"),
        "--inventory",
        str(inv_path),
        "--out",
        str(out),
        "--format",
        "json",
        env=env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    assert {s.device: (s.down_kbit, s.up_kbit) for s in shaper.show()} == before  # restored

    links = R.read_csv(run_dir / R.LINKS)
    pol = [r for r in links if r["policy"] == "wdmoe" and r["source"] == "policy"]
    trace = [r for r in links if r["policy"] == "topk"]
    assert pol and trace and all(r["source"] == "trace" for r in trace)
    for r in links:  # enforced = what tc reported after the change, = what was asked
        assert _close(float(r["enforced_down_kbit"]), float(r["asked_down_kbit"])), r
        assert _close(float(r["enforced_up_kbit"]), float(r["asked_up_kbit"])), r
        assert (
            float(r["change_ms"]) > 0
            and float(r["epoch_ms"]) > 0
            and r["device"] in ("dev1", "dev2")
        )
    _check_epochs_follow_each_other(links)
    # each direction at the channel's own rate (the uplink's differs from the downlink's)
    assert any(abs(float(r["asked_down_kbit"]) - float(r["asked_up_kbit"])) > 1 for r in pol)
    assert {r["epoch_scope"] for r in links} == {"step"}
    # the trace's k-th block at the k-th epoch (6 blocks, cycling)
    blocks = {}
    for row in read_trace(tmp_path / "tr.csv"):
        blocks.setdefault(row.time_s, {})[row.device] = row
    order = [blocks[t] for t in sorted(blocks)]
    for r in trace:
        want = order[int(r["epoch"]) % 6][r["device"]]
        assert float(r["asked_down_kbit"]) == pytest.approx(want.rate_down_kbit, abs=1e-5)
        assert float(r["asked_up_kbit"]) == pytest.approx(want.rate_up_kbit, abs=1e-5)
    # epochs are forward steps: one change per (request, step), at layer 0
    steps = {(r["request"], r["step"]) for r in trace}
    assert len({r["epoch"] for r in trace}) == len(steps) and {r["layer"] for r in trace} == {"0"}

    layers = R.read_csv(run_dir / R.LAYERS)
    wd = [r for r in layers if r["policy"] == "wdmoe"]
    # the calibrated model predicts every policy's layers; WDMoE's own model is beside it
    assert wd and all(float(r["predicted_ms"]) > 0 for r in layers)
    assert all(float(r["policy_predicted_ms"]) > 0 for r in wd)
    assert all(r["policy_predicted_ms"] == "" for r in layers if r["policy"] == "topk")
    calls = R.read_csv(run_dir / R.CALLS)
    assert {c["device"] for c in calls} == {"dev1", "dev2"}  # run.devices = 2 of 3

    man = json.loads((run_dir / R.MANIFEST).read_text())
    assert set(man["compute_profile"]) == {"dev1", "dev2"}
    assert all(
        p["samples"] == 30 and p["tokens"] == [1, 2, 4, 8, 16, 32]
        for p in man["compute_profile"].values()
    )
    assert all(
        t["devices"] == ["dev1", "dev2"] and t["link_epochs"]["changes"] > 0 for t in man["trials"]
    )
    prof = R.read_csv(run_dir / R.PROFILE)
    # every trial profiles its two devices: alone with 1 and 2 experts (6 token counts x 5
    # repeats each), and both at once (1, 2, 4 and 8 tokens)
    assert len(prof) == 2 * (2 * 30 + 2 * 30 + 2 * 20)
    assert all(float(p["compute_ms"]) > 0 for p in prof)
    assert {p["device"] for p in prof} == {"dev1", "dev2"}
    # the compute profile: the first trial's lone one-expert calls
    _check_profile_fit(
        man["compute_profile"],
        [p for p in prof if p["trial"] == "0" and p["experts"] == "1" and p["devices"] == "1"],
    )

    rep = run_cli("report", str(run_dir), "--format", "json", env=env)
    assert rep.returncode == 0, rep.stderr
    vs = json.loads(rep.stdout)["versus_topk"]
    assert [v["policy"] for v in vs] == ["wdmoe"] and vs[0]["latency_change_pct"] is not None
    assert vs[0]["prediction_ratio"]["n"] == len(wd)
