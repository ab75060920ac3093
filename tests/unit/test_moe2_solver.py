"""MoE²'s exact subset solver (recipes/moe2/solver.py): branch and bound against brute force on
seeded random monotone instances (same subset, value and cost, ties included), the worst-case
cost model by hand, fewer value evaluations than brute force, and what monotonicity buys."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from recipes.moe2 import (
    SubsetProblem,
    SubsetResult,
    check_monotone,
    moe2_cost,
    moe2_problem,
    solve_brute_force,
    solve_exact,
    topk_energy,
    worst_delay_ms,
)


def _coverage(rng: random.Random, n: int):
    """Weighted coverage (integer weights, one division: exactly monotone); plateaus when an
    expert covers nothing new."""
    items = rng.randint(1, 12)
    weights = [rng.randint(1, 5) for _ in range(items)]
    covers = [{u for u in range(items) if rng.random() < 0.3} for _ in range(n)]
    total = sum(weights)
    return lambda s: sum(weights[u] for u in set().union(*(covers[i] for i in s))) / total


def _noisy_or(rng: random.Random, n: int):
    """``1 - prod(1 - p_i)`` in exact fractions, rounded once (monotone as floats too); some
    ``p_i`` are 0 (plateaus) or 1 (saturation: ties)."""
    ps = [Fraction(rng.choice([0, 0, 1, 2, 3, 4]), 4) for _ in range(n)]

    def value(s):
        q = Fraction(1)
        for i in s:
            q *= 1 - ps[i]
        return float(1 - q)

    return value


def _max_level(rng: random.Random, n: int):
    """Best single expert on a coarse scale: many exact ties."""
    levels = [rng.randint(0, 3) for _ in range(n)]
    return lambda s: float(max(levels[i] for i in s))


def _constant(rng: random.Random, n: int):
    """Every subset ties: the tie-break alone decides."""
    return lambda s: 0.5


VALUES = (_coverage, _noisy_or, _max_level, _constant)


def random_problem(rng: random.Random, n: int) -> SubsetProblem:
    """A random monotone MoE² instance; budgets from loose to infeasible."""
    value = rng.choice(VALUES)(rng, n)
    if rng.random() < 0.5:
        energies = [float(rng.randint(1, 4)) for _ in range(n)]  # equal energies: ties
    else:
        energies = [rng.uniform(0.1, 5.0) for _ in range(n)]
    cats = rng.randint(1, 3)
    delays = [[rng.uniform(5.0, 50.0) for _ in range(cats)] for _ in range(n)]
    k = rng.randint(1, 3)
    agg = rng.choice([0.0, 2.0])
    top = sum(sorted(energies, reverse=True)[:k])
    if rng.random() < 0.75:  # around a random expert r, which fits alone: feasible
        r = rng.randrange(n)
        energy_budget = energies[r] + rng.uniform(0.0, 1.1) * max(0.0, top - energies[r])
        delay_budgets = [delays[r][c] + agg + rng.uniform(0.0, 40.0) for c in range(cats)]
    else:  # anything, often infeasible
        energy_budget = rng.uniform(0.0, 1.1) * top
        delay_budgets = [rng.uniform(0.0, 60.0) for _ in range(cats)]
    return moe2_problem(value, energies, delays, k, energy_budget, delay_budgets, agg)


def test_exact_equals_brute_force_on_random_monotone_instances():
    rng = random.Random(20250116)
    infeasible = ties = 0
    for case in range(300):
        n = 1 + case % 10
        p = random_problem(rng, n)
        brute, exact = solve_brute_force(p), solve_exact(p)
        assert exact == brute, f"case {case}: n={n}"
        assert (exact.subset, exact.value, exact.cost) == (brute.subset, brute.value, brute.cost)
        infeasible += not brute.feasible
        if brute.feasible:
            assert p.feasible(exact.cost) and exact.value == p.value(exact.subset)
            same = [
                s
                for s in _subsets(n)
                if p.feasible(p.cost(s)) and p.value(s) == brute.value and s != brute.subset
            ]
            ties += bool(same)
    # the instances exercise both infeasibility and ties, not just easy optima
    assert 20 <= infeasible <= 200
    assert ties >= 100


def _subsets(n: int):
    for mask in range(1, 1 << n):
        yield frozenset(i for i in range(n) if mask >> i & 1)


def test_infeasible_gives_a_result_not_an_exception():
    p = moe2_problem(lambda s: 1.0, [1.0, 2.0], [[10.0], [20.0]], 1, 0.5, [100.0])
    for solve in (solve_exact, solve_brute_force):
        r = solve(p)
        assert r == SubsetResult(False, None, None, None)
        assert not r.feasible


def test_tie_break_prefers_lower_energy_then_fewer_experts_then_smallest_indices():
    # all values equal: energy decides ({1} alone costs 1), then size, then indices
    p = moe2_problem(lambda s: 1.0, [3.0, 1.0, 1.0, 2.0], [[1.0]] * 4, 2, 10.0, [5.0])
    for solve in (solve_exact, solve_brute_force):
        assert solve(p).subset == frozenset({1})
    p = SubsetProblem(4, lambda s: 1.0, lambda s: (0.0,), (1.0,))
    for solve in (solve_exact, solve_brute_force):
        assert solve(p).subset == frozenset({0})
    p = SubsetProblem(3, lambda s: float(len(s) >= 2), lambda s: (0.0,), (1.0,))
    for solve in (solve_exact, solve_brute_force):
        assert solve(p).subset == frozenset({0, 1})


def test_a_bound_equal_to_the_incumbent_is_not_cut_when_a_tie_can_still_win():
    # {0, 1} (value 1, energy 2+2=4 with k=2) is found first (largest singleton values); {2}
    # alone has value 1 too and energy 3 < 4, so it must win the tie
    levels = {0: 0.6, 1: 0.6, 2: 0.5}

    def value(s):
        return 1.0 if (len(s) >= 2 or 2 in s) else max(levels[i] for i in s)

    p = moe2_problem(value, [2.0, 2.0, 3.0], [[1.0]] * 3, 2, 10.0, [10.0])
    assert check_monotone(p, 500) == []
    assert solve_brute_force(p).subset == frozenset({2})
    assert solve_exact(p).subset == frozenset({2})


def test_equal_energy_and_size_leave_the_tie_to_the_indices_not_to_the_search_order():
    # experts 1 and 2 are branched on first (singleton value 0.9), so {1, 2} is the first
    # incumbent of value 1; {0, 3} has the same value, energy (k=1) and size and must win on
    # its indices, also when it is reached with expert 4 still undecided
    single = [0.5, 0.9, 0.9, 0.5, 0.1]

    def value(s):
        return 1.0 if s >= {0, 3} or s >= {1, 2} else max(single[i] for i in s)

    p = moe2_problem(value, [1.0] * 5, [[1.0]] * 5, 1, 10.0, [10.0])
    assert check_monotone(p, 500) == []
    for solve in (solve_exact, solve_brute_force):
        assert solve(p).subset == frozenset({0, 3})


def test_topk_energy_and_worst_delay_by_hand():
    e = [1.0, 4.0, 2.5, 3.0]
    assert topk_energy(e, frozenset({0, 1, 2, 3}), 2) == 7.0
    assert topk_energy(e, frozenset({0, 2}), 2) == 3.5
    assert topk_energy(e, frozenset({0, 2, 3}), 1) == 3.0
    assert topk_energy(e, frozenset({2}), 3) == 2.5
    assert topk_energy(e, frozenset(), 2) == 0.0
    with pytest.raises(ValueError):
        topk_energy(e, frozenset({0}), 0)
    d = [[10.0, 40.0], [30.0, 5.0], [20.0, 20.0]]
    assert worst_delay_ms(d, frozenset({0, 2}), 0, 3.0) == 23.0
    assert worst_delay_ms(d, frozenset({0, 2}), 1, 3.0) == 43.0
    assert worst_delay_ms(d, frozenset({1}), 1, 0.0) == 5.0
    assert worst_delay_ms(d, frozenset(), 0, 3.0) == 0.0


def test_moe2_cost_vector_and_limits():
    cost = moe2_cost([1.0, 4.0, 2.5], [[10.0, 40.0], [30.0, 5.0], [20.0, 20.0]], 2, 1.5)
    assert cost(frozenset({0, 2})) == (3.5, 21.5, 41.5)
    assert cost(frozenset({0, 1, 2})) == (6.5, 31.5, 41.5)
    p = moe2_problem(lambda s: 0.0, [1.0, 4.0], [[10.0, 40.0], [30.0, 5.0]], 1, 2.0, [12.0, 50])
    assert p.n == 2 and p.limits == (2.0, 12.0, 50.0)
    assert p.feasible(p.cost(frozenset({0})))  # 1 J, 11 ms, 41 ms
    assert not p.feasible(p.cost(frozenset({1})))  # 4 J > 2 J
    assert p.feasible((2.0 + 1e-10, 12.0, 50.0)) and not p.feasible((2.0 + 1e-6, 12.0, 50.0))
    with pytest.raises(ValueError):
        moe2_cost([-1.0], [[1.0]], 1)
    with pytest.raises(ValueError):
        moe2_problem(lambda s: 0.0, [1.0], [[1.0, 2.0]], 1, 1.0, [1.0])


def test_monotone_cost_model_on_random_instances():
    rng = random.Random(7)
    for _ in range(50):
        p = random_problem(rng, rng.randint(2, 8))
        assert check_monotone(p, 100, seed=rng.randint(0, 999)) == []


def test_branch_and_bound_evaluates_value_less_often_than_brute_force():
    rng = random.Random(11)
    exact = brute = 0
    for _ in range(40):
        p = random_problem(rng, 10)
        calls = {"n": 0}
        inner = p.value

        def counted(s, inner=inner, calls=calls):
            calls["n"] += 1
            return inner(s)

        q = SubsetProblem(p.n, counted, p.cost, p.limits)
        r = solve_exact(q)
        assert calls["n"] == r.value_evals  # memoised: one call per distinct subset
        exact += r.value_evals
        calls["n"] = 0
        brute += solve_brute_force(q).value_evals
    assert exact < 0.5 * brute, (exact, brute)


def test_non_monotone_objective_is_detected_and_not_claimed_exact():
    # the full set drops to 0: once {0} (0.5) is the incumbent, the node {0, 1} with bound
    # value({0, 1, 2}) = 0 is cut, so B&B misses {0, 1} (value 1); brute force finds it
    def value(s):
        return 1.0 if s == frozenset({0, 1}) else 0.0 if len(s) == 3 else 0.5

    p = SubsetProblem(3, value, lambda s: (float(len(s)),), (3.0,))
    assert any(what == "value" for _, _, what in check_monotone(p, 200))
    assert solve_brute_force(p).subset == frozenset({0, 1})
    assert solve_exact(p).value == 0.5
    assert check_monotone(SubsetProblem(3, lambda s: float(len(s)), p.cost, p.limits)) == []


def test_check_monotone_flags_a_decreasing_cost():
    p = SubsetProblem(3, lambda s: float(len(s)), lambda s: (3.0 - len(s),), (5.0,))
    assert {what for _, _, what in check_monotone(p, 100)} == {"cost[0]"}
