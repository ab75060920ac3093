"""The pure parts of runs with whole-model experts (testbed.run.edge_trial): the combination of
the experts' answers, the items, the budget checks, the budget plot's points."""

from __future__ import annotations

import math

import pytest

from testbed.dataplane.lm_call import LMReply
from testbed.run.edge_trial import (
    Call,
    budgets_of,
    call_row,
    combine_answers,
    edge_dir,
    mc_items,
    softmax,
    within_budget,
)


def _call(expert: int, scores, status="ok") -> Call:
    r = LMReply(f"dev{expert}", f"m{expert}", "score", status=status, result=scores)
    r.rtt_ms, r.bytes_down, r.bytes_up = 5.0, 100, 40
    return Call(expert, f"dev{expert}", r)


def test_combination_weights_renormalised_over_the_answers():
    a = _call(0, [math.log(0.7), math.log(0.1), math.log(0.1), math.log(0.1)])
    b = _call(1, [math.log(0.1), math.log(0.8), math.log(0.05), math.log(0.05)])
    # 0.6/0.4: 0.6*0.7+0.4*0.1 = 0.46 for option 0 against 0.6*0.1+0.4*0.8 = 0.38
    assert combine_answers([a, b], {0: 0.3, 1: 0.2}) == 0
    assert combine_answers([a, b], {0: 0.2, 1: 0.3}) == 1
    # a failed call is left out and the others' weights renormalised
    assert combine_answers([a, _call(1, None, status="timeout")], {0: 0.01, 1: 0.99}) == 0
    assert combine_answers([_call(1, None, status="timeout")], {1: 1.0}) is None
    assert combine_answers([], {}) is None
    assert combine_answers([a, b], {0: 0.0, 1: 0.0}) == 1  # no weight: equal shares (.4 < .45)


def test_softmax_and_budgets():
    assert softmax([0.0, math.log(3.0)]) == pytest.approx([0.25, 0.75])
    assert softmax([-1000.0, -1000.0]) == pytest.approx([0.5, 0.5])
    assert within_budget(1.0, 1.0) and not within_budget(1.01, 1.0)
    assert within_budget(None, 1.0) and within_budget(5.0, None)

    class P:
        energy_budget_j, delay_budget_ms = 0.5, [10.0, 20.0]

    assert budgets_of(P()) == (0.5, [10.0, 20.0]) and budgets_of(object()) == (None, None)


def test_items_have_categories_and_skip_excluded_prompts():
    items = mc_items(20, seed=3)
    assert len(items) == 20 and all(len(it["choices_ids"]) == 4 for it in items)
    assert all(it["category"] == it["context_ids"][1] - 4 for it in items)
    rest = mc_items(20, seed=3, exclude=[items[0]["context_ids"], items[5]["context_ids"]])
    prompts = {tuple(it["context_ids"]) for it in rest}
    assert len(rest) == 20 and tuple(items[0]["context_ids"]) not in prompts


def test_call_row_and_edge_dir(tmp_path):
    row = call_row({"run_id": "r", "request": 3}, _call(2, [0.0]), "m2", 9)
    assert (row["layer"], row["expert"], row["device"], row["tokens"]) == (-1, "m2", "dev2", 9)
    assert row["rtt_ms"] == 5.0 and row["status"] == "ok"
    assert edge_dir(str(tmp_path)) is None  # no edge_llms.json there
    (tmp_path / "edge_llms.json").write_text("{}")
    assert edge_dir(str(tmp_path)) == tmp_path


def test_p90():
    from testbed.run.edge_trial import p90

    assert p90([]) == 0.0 and p90([3.0]) == 3.0
    assert p90(list(range(11))) == pytest.approx(9.0)
    assert p90([1.0, 2.0]) == pytest.approx(1.9)


def test_budget_rows_and_plot_points():
    from types import SimpleNamespace

    from testbed.results.budgets import budget_rows, table
    from testbed.results.plots import budget_figure, budget_points

    def req(correct, joules, ms, over, cat_budget=6.0):
        return {
            "correct": str(correct),
            "energy_devices_j": str(joules),
            "total_ms": str(ms),
            "over_budget": str(over),
            "energy_budget_j": "0.02",
            "delay_budget_ms": str(cat_budget),
        }

    run = SimpleNamespace(run_id="r1")
    g = SimpleNamespace(
        run=run,
        policy="moe2",
        point="p",
        requests=[req(1, 0.01, 4.0, 0), req(0, 0.03, 5.0, 1), req(1, 0.01, 9.0, 1, 10.0)],
    )
    plain = SimpleNamespace(run=run, policy="topk", point="p", requests=[{"correct": "1"}])
    (row,) = budget_rows([g, plain])
    assert row["accuracy"] == pytest.approx(2 / 3) and row["over_budget"] == 2
    assert row["energy_per_request_j"] == pytest.approx(0.05 / 3)
    assert row["delay_budget_ms"] == 10.0 and row["requests"] == 3
    assert table([row]).row_count == 1
    rep = SimpleNamespace(groups=[g, plain])
    (pt,) = budget_points(rep)
    assert (pt.policy, pt.energy_budget_j, pt.violations) == ("moe2", 0.02, 2)
    assert len(budget_figure([pt]).axes) == 2


def test_the_twin_refuses_whole_model_experts(monkeypatch, capsys, tmp_path):
    from testbed import ROOT
    from tests.conftest import run_main

    rc, _, err = run_main(
        monkeypatch, capsys, "simulate", str(ROOT / "recipes/moe2.toml"), "--out", str(tmp_path)
    )
    assert rc == 2 and "whole-model experts (MoE²) run on the testbed" in err
    assert err.count("error:") == 1 and not list(tmp_path.iterdir())  # no run folder


class _Table:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(row)

    def write_many(self, rows):
        self.rows.extend(rows)


def _trial_run(energy_budget=0.02, delay_budget=(6.0, 60.0)):
    """An EdgeTrialRun whose session is only what _record reads."""
    from types import SimpleNamespace

    from recipes.moe2.policy import MoE2
    from testbed.run.edge_trial import EdgeTrialRun

    tr = EdgeTrialRun.__new__(EdgeTrialRun)
    tr.s = SimpleNamespace(edge=SimpleNamespace(names=["m0", "m1", "m2"], categories=["a", "b"]))
    tr.policy = MoE2(energy_budget_j=energy_budget, delay_budget_ms=list(delay_budget))
    tr.key, tr.rows, tr.calls = {"run_id": "r"}, [], []
    tr.tables = {"calls": _Table(), "requests": _Table()}
    return tr


def _decision():
    from testbed.policy import RequestDecision

    return RequestDecision((0, 1), stats={"subset_size": 2})


def test_request_rows_count_what_is_not_known_to_be_within_budget():
    item = {"context_ids": [1, 4, 12, 3], "label": 1, "category": 1}
    tr = _trial_run()
    ok = [_call(0, [0.0, 1.0]), _call(1, [0.0, 1.0])]
    for c, j in zip(ok, (0.004, 0.005)):
        c.reply.energy_j, c.reply.energy_source = j, "estimated:cpu-time"
    tr._record(0, item, _decision(), ok, 1, 50.0)  # category 1: 60 ms budget
    row = tr.rows[-1]
    assert (row["status"], row["over_budget"], row["correct"]) == ("ok", 0, 1)
    assert row["energy_devices_j"] == pytest.approx(0.009) and row["delay_budget_ms"] == 60.0
    assert row["policy.subset_size"] == 2 and len(tr.tables["calls"].rows) == 2
    tr._record(1, {**item, "category": 0}, _decision(), ok, 1, 50.0)  # 6 ms budget: over
    assert tr.rows[-1]["over_budget"] == 1
    half = [ok[0], _call(1, None, status="timeout")]
    tr._record(2, item, _decision(), half, 1, 50.0)  # a failed call's joules are unknown
    assert tr.rows[-1]["status"] == "degraded" and tr.rows[-1]["energy_devices_j"] is None
    assert tr.rows[-1]["over_budget"] == 1
    dead = [_call(0, None, status="timeout"), _call(1, None, status="error:8")]
    tr._record(3, item, _decision(), dead, None, 50.0)
    assert (tr.rows[-1]["status"], tr.rows[-1]["correct"]) == ("error", 0)
    tr._record(4, item, _decision(), [], None, 1.0)  # refused: nothing served, over budget
    assert (tr.rows[-1]["status"], tr.rows[-1]["over_budget"]) == ("refused", 1)
    assert tr.rows[-1]["energy_devices_j"] is None
