"""MoE²'s offline subset and its baselines on numbers (recipes.moe2.selection): the combination
rule, budgets met, never less accurate than a baseline that meets the same budgets, accuracy
never falling as the energy budget grows."""

from __future__ import annotations

import random

import numpy as np
import pytest

from recipes.moe2.selection import (
    Costs,
    Validation,
    accuracy,
    combine,
    plan_all,
    plan_best_single,
    plan_greedy_per_joule,
    plan_moe2,
    plan_random,
    top_k_in,
)


def test_top_k_in_and_combine_by_hand():
    assert top_k_in([0.1, 0.5, 0.2, 0.2], {0, 2, 3}, 2) == [2, 3]  # tie: lower index first
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    # weights 0.1 and 0.3 renormalised to 0.25 / 0.75 over experts 0 and 1
    mix = combine([0.1, 0.3, 0.6], [0, 1], probs)
    assert mix.tolist() == pytest.approx([0.25 * 0.9 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.8])
    assert combine([0.0, 0.0, 1.0], [0, 1], probs).tolist() == pytest.approx([0.55, 0.45])


def _instance(rng: random.Random, k_experts: int, n: int = 40, cats: int = 3):
    """Experts good at some categories: an expert's right-option probability depends on the
    category; the gate knows roughly who is good where."""
    skill = np.array([[rng.random() for _ in range(cats)] for _ in range(k_experts)])
    category = np.array([rng.randrange(cats) for _ in range(n)])
    answer = np.array([rng.randrange(4) for _ in range(n)])
    probs = np.zeros((k_experts, n, 4))
    for e in range(k_experts):
        for i in range(n):
            p = np.full(4, 0.1)
            pick = answer[i] if rng.random() < skill[e, category[i]] else rng.randrange(4)
            p[pick] += 0.6
            probs[e, i] = p / p.sum()
    gate = np.array(
        [[skill[e, category[i]] + 0.3 * rng.random() for e in range(k_experts)] for i in range(n)]
    )
    gate = gate / gate.sum(axis=1, keepdims=True)
    costs = Costs(
        [rng.uniform(0.1, 2.0) for _ in range(k_experts)],
        [[rng.uniform(5, 100) for _ in range(cats)] for _ in range(k_experts)],
        rng.uniform(0, 5),
    )
    return Validation(gate, probs, answer, category), costs


def test_accuracy_of_a_subset_is_what_the_combination_gets_right():
    v, _ = _instance(random.Random(1), 3, n=10)
    for s in ([0], [1, 2], [0, 1, 2]):
        want = 0
        for i in range(10):
            chosen = top_k_in(v.gate[i], s, 2)
            want += int(np.argmax(combine(v.gate[i], chosen, v.option_probs[:, i]))) == v.answer[i]
        assert accuracy(v, s, 2) == pytest.approx(want / 10)
    assert accuracy(v, [], 2) == 0.0


def _meets(plan, energy, delay):
    return (
        plan.cost is not None
        and plan.cost[0] <= energy + 1e-9
        and all(d <= delay + 1e-9 for d in plan.cost[1:])
    )


def test_moe2_meets_its_budgets_and_beats_every_baseline_that_does():
    rng = random.Random(7)
    checked = agree = feasible = 0
    for _ in range(60):
        k_experts = rng.randint(2, 6)
        v, costs = _instance(rng, k_experts)
        energy, delay = rng.uniform(0.3, 4.0), rng.uniform(20, 110)
        plan = plan_moe2(v, costs, 2, energy, delay)
        baselines = [
            plan_all(v, costs, 2),
            plan_best_single(v, costs, 2),
            plan_random(v, costs, 2, seed=3),
            plan_greedy_per_joule(v, costs, 2, energy, delay),
        ]
        if plan.subset is None:  # nothing fits: no baseline may fit either
            assert not any(_meets(b, energy, delay) for b in baselines)
            continue
        feasible += 1
        assert _meets(plan, energy, delay) and plan.exact_equals_brute is not None
        exact = plan_moe2(v, costs, 2, energy, delay, brute_force_max=0)  # the search alone
        agree += exact.accuracy == plan.accuracy
        assert plan.accuracy == pytest.approx(accuracy(v, plan.subset, 2))
        for b in baselines:
            if _meets(b, energy, delay):
                assert plan.accuracy >= b.accuracy - 1e-12, (b.method, plan, b)
                checked += 1
    assert checked > 50
    assert agree >= feasible - 3  # the exact search alone: the optimum but where not monotone


def test_accuracy_never_falls_as_the_energy_budget_grows():
    rng = random.Random(11)
    for _ in range(15):
        v, costs = _instance(rng, rng.randint(3, 6))
        accs = []
        for budget in (0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 100.0):
            p = plan_moe2(v, costs, 2, budget, 1e9)
            accs.append(-1.0 if p.accuracy is None else p.accuracy)
        assert accs == sorted(accs), accs
        assert accs[-1] == pytest.approx(
            max(accuracy(v, s, 2) for s in _subsets(v.experts))
        )  # an unbounded budget reaches the best of every subset


def _subsets(k):
    return [[i for i in range(k) if m >> i & 1] for m in range(1, 2**k)]


def test_greedy_and_random_baselines():
    v, costs = _instance(random.Random(3), 5)
    g = plan_greedy_per_joule(v, costs, 2, 1.5, 1e9)
    assert g.subset and g.cost[0] <= 1.5 + 1e-9
    assert plan_random(v, costs, 2, 5).subset == plan_random(v, costs, 2, 5).subset
    assert len(plan_random(v, costs, 2, 5).subset) == 2
    assert plan_greedy_per_joule(v, costs, 2, 0.0, 1e9).subset is None
    assert plan_all(v, costs, 2).subset == frozenset(range(5))


def test_the_policies_plan_and_serve_requests():
    from recipes.moe2.policy import AllExperts, BestSingle, MoE2
    from testbed.errors import ConfigError
    from testbed.policy import ClusterView, RequestContext, RequestProfile, load_policy

    v, costs = _instance(random.Random(5), 4)
    profile = RequestProfile(
        ("a", "b", "c", "d"),
        ("dev1", "dev2", "dev3", "dev4"),
        tuple(costs.energy_j),
        tuple(map(tuple, costs.delay_ms)),
        costs.aggregation_ms,
        ("x", "y", "z"),
        v.gate,
        v.option_probs,
        v.answer,
        v.category,
    )
    view = ClusterView.static(profile.devices)
    pol = load_policy("moe2", {"energy_budget_j": 2.0, "delay_budget_ms": 80, "top_k": 2})
    assert isinstance(pol, MoE2)
    pol.plan(profile)
    want = plan_moe2(v, costs, 2, 2.0, 80)
    assert pol.plan_result == want and pol.describe()["plan"]["subset"] == sorted(want.subset)
    req = RequestContext(0, (1, 2), 1, tuple(v.gate[0]))
    d = pol.select_request(req, view)
    assert list(d.experts) == top_k_in(v.gate[0], want.subset, 2)
    assert set(d.experts) <= want.subset and d.stats == {"subset_size": len(want.subset)}
    everyone = AllExperts(top_k=2)
    everyone.plan(profile)
    assert everyone.plan_result.subset == frozenset(range(4))
    none = MoE2(energy_budget_j=0.0)
    none.plan(profile)
    assert none.select_request(req, view).experts == ()  # nothing fits: refused
    with pytest.raises(ConfigError, match="decides per request"):
        BestSingle().select(None, view)
    with pytest.raises(ConfigError, match="energy_budget_j: expected float"):
        load_policy("moe2", {"energy_budget_j": "lots"})


def test_experts_sharing_a_device_add_up():
    from recipes.moe2.solver import worst_delay_ms

    d = [[10.0], [20.0], [5.0]]
    s = frozenset({0, 1, 2})
    assert worst_delay_ms(d, s, 0, 1.0) == 21.0  # all in parallel
    assert worst_delay_ms(d, s, 0, 1.0, ["a", "a", "b"], 2) == 31.0  # 10 + 20 on a
    assert worst_delay_ms(d, s, 0, 0.0, ["a", "a", "a"], 2) == 30.0  # the top-2 only
    costs = Costs([1.0, 1.0, 1.0], d, 0.0, ["a", "a", "b"])
    assert costs.problem(lambda _s: 0.0, 2, 5.0, 25.0).cost(s) == (2.0, 30.0)
