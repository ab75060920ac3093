"""Decision epochs, the channel's equal split against `testbed links trace`, trace replay,
the tc-change summary, compute-profile fits, and the policy-vs-topk comparison (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.dataplane.profiling import bytes_per_token, fit_profiles
from testbed.errors import ConfigError
from testbed.net.channel import ChannelModel, TraceRow, trace_rows
from testbed.results.comparison import per_token_ms, prediction_ratio, versus_baseline
from testbed.results.report import Group, Run
from testbed.run.epochs import Epochs, LinkRecorder, TraceReplay, equal_split_kbit


def _starts(scope: str, decisions) -> list[int]:
    ep = Epochs(scope)
    return [ep.index for r, s, layer in decisions if ep.advance(r, s, layer)]


DECISIONS = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1)]


def test_epochs_start_per_layer_step_or_request() -> None:
    assert _starts("layer", DECISIONS) == [0, 1, 2, 3, 4, 5]
    assert _starts("step", DECISIONS) == [0, 1, 2]
    assert _starts("request", DECISIONS) == [0, 1]
    with pytest.raises(ConfigError, match="policy.epoch"):
        Epochs("token")


def test_equal_split_is_what_links_trace_writes() -> None:
    names = ["dev1", "dev2", "dev3"]
    ch = ChannelModel(names, 5)
    rows = trace_rows(ChannelModel(names, 5), 4, 3e5)
    for epoch in range(4):
        got = equal_split_kbit(ch, 3e5, epoch, names[::-1])  # order does not matter
        want = {
            r.device: (r.rate_down_kbit, r.rate_up_kbit) for r in rows[3 * epoch : 3 * epoch + 3]
        }
        assert set(got) == set(want)
        assert all(got[d] == pytest.approx(want[d]) for d in want)
    assert equal_split_kbit(ch, 3e5, 0, names) != equal_split_kbit(ch, 3e5, 1, names)


def test_trace_replay_blocks_cycle_and_ignore_other_devices() -> None:
    rows = [
        TraceRow(0.0, "dev1", 100, 50),
        TraceRow(0.0, "dev9", 1, 1),
        TraceRow(1.0, "dev1", 200, 60),
        TraceRow(1.0, "dev2", 300, 70),
    ]
    tr = TraceReplay(rows, ["dev1", "dev2"], "t.csv")
    assert tr.rates(0) == {"dev1": (100, 50)}
    assert tr.rates(1) == {"dev1": (200, 60), "dev2": (300, 70)}
    assert tr.rates(2) == tr.rates(0)
    with pytest.raises(ConfigError, match=r"t.csv: the trace has no rows for .*dev5"):
        TraceReplay(rows, ["dev5"], "t.csv")


def test_link_summary_flags_epochs_shorter_than_their_change() -> None:
    rec = LinkRecorder(None, None, 0.0)
    assert rec.summary("step") == {"epoch": "step", "changes": 0}
    rec.change_ms, rec.epoch_ms = [5.0, 5.0, 6.0], [20.0, 2.0, 30.0]
    s = rec.summary("layer")
    assert s["changes"] == 3 and s["change_ms_p50"] == 5.0 and s["epoch_ms_p50"] == 20.0
    assert s["epochs_shorter_than_change"] == 1 and "1 of 3 epochs (layer)" in s["note"]


def test_fit_profiles_per_device() -> None:
    samples = [{"device": "a", "tokens": n, "compute_ms": 0.3 + 0.05 * n} for n in (1, 2, 4, 8)]
    samples += [{"device": "b", "tokens": n, "compute_ms": 2.0} for n in (1, 32)]
    samples += [{"device": "b", "tokens": 4, "compute_ms": None}]
    fit = fit_profiles(samples)
    assert fit["a"]["a_ms"] == pytest.approx(0.3) and fit["a"]["b_ms"] == pytest.approx(0.05)
    assert fit["a"]["rmse_ms"] == pytest.approx(0.0, abs=1e-9) and fit["a"]["tokens"] == [
        1,
        2,
        4,
        8,
    ]
    assert fit["b"]["samples"] == 2 and fit["b"]["b_ms"] == pytest.approx(0.0, abs=1e-12)
    assert bytes_per_token(64, 4) == 256
    with pytest.raises(ValueError):
        bytes_per_token(0, 4)


def _group(run: Run, policy: str, point: str, ms_per_tok: float, correct: int, ratios=()) -> Group:
    reqs = [{"total_ms": str(ms_per_tok * 4), "output_tokens": "4", "correct": str(correct)}]
    layers = [{"predicted_ms": str(r), "moe_ms": "1.0"} for r in ratios]
    return Group(run, policy, point, reqs, layers, [])


def test_versus_topk_at_the_same_point() -> None:
    run = Run(Path("x"), "r1", "completed", None, {}, [], [], [])
    groups = [
        _group(run, "topk", "links.bandwidth_mhz=0.1 policy.name=topk", 10.0, 1),
        _group(run, "topk", "links.bandwidth_mhz=2.0 policy.name=topk", 2.0, 1),
        _group(
            run,
            "wdmoe",
            "links.bandwidth_mhz=0.1 policy.name=wdmoe",
            8.0,
            0,
            ratios=[0.5, 1.0, 2.0, 4.0, 8.0],
        ),
        _group(run, "top1", "links.bandwidth_mhz=5.0 policy.name=top1", 1.0, 1),
    ]
    rows = versus_baseline(groups)
    wd, t1 = rows
    assert wd["policy"] == "wdmoe" and wd["point"] == "links.bandwidth_mhz=0.1"
    assert wd["latency_change_pct"] == pytest.approx(-20.0) and wd["accuracy_change"] == -1.0
    assert wd["prediction_ratio"]["median"] == 2.0 and wd["prediction_ratio"]["n"] == 5
    assert t1["latency_change_pct"] is None and t1["prediction_ratio"] is None  # no topk there
    assert per_token_ms([{"total_ms": "8", "output_tokens": "0"}]) is None
    assert prediction_ratio([{"predicted_ms": "", "moe_ms": "1"}]) is None
