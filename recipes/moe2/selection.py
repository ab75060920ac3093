"""MoE²'s two levels and its baselines, on numbers: the offline subset ``S`` of the K whole-model
experts and the per-prompt top-k inside it.

The offline choice scores a subset by the accuracy of what the BS would actually do with it on
a validation set (:class:`Validation`): per prompt, the gate's top-``k`` experts inside ``S``,
their answers (each expert's probabilities over the prompt's answer options) combined by the
gate weights renormalised over the chosen ones, right when the combination's best option is the
answer. Costs are the profiled per-request energy of each expert and its delay per category
(:func:`recipes.moe2.solver.moe2_cost`: worst case over the top-``k`` choices inside ``S``).

* :func:`plan_moe2`: the exact best ``S`` under the energy budget and the per-category delay
  budgets (:func:`recipes.moe2.solver.solve_exact`). Exactness needs the accuracy to be
  monotone in ``S``, which MoE² argues for a gate trained on all experts; it is not guaranteed
  on measured numbers, so :func:`plan_moe2` also checks the answer against brute force when
  ``K <= brute_force_max`` and reports whether they agree (and the brute-force optimum is used).
* Baselines: :func:`plan_all` (every expert), :func:`plan_best_single` (the most accurate single
  expert), :func:`plan_random` (a seeded random subset of ``k`` experts) and
  :func:`plan_greedy_per_joule` (experts added by validation accuracy per joule while the
  budgets hold). They ignore the budgets except the greedy one; a run counts their violations.

Pure numpy: no torch, no testbed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recipes.moe2.solver import SubsetResult, moe2_problem, solve_brute_force, solve_exact


@dataclass(frozen=True)
class Validation:
    """What the offline choice scores subsets on.

    Attributes
    ----------
    gate:
        ``[N, K]`` gate weights per validation prompt (rows sum to 1).
    option_probs:
        ``[K, N, O]``: expert ``k``'s probabilities over prompt ``n``'s ``O`` answer options.
    answer:
        ``[N]`` index of the right option.
    category:
        ``[N]`` category (task family) index of each prompt.
    """

    gate: np.ndarray
    option_probs: np.ndarray
    answer: np.ndarray
    category: np.ndarray

    @property
    def experts(self) -> int:
        """K."""
        return int(self.gate.shape[1])


@dataclass(frozen=True)
class Costs:
    """Profiled costs: ``energy_j[k]`` per request of expert ``k``, ``delay_ms[k][c]`` on a
    prompt of category ``c`` (inference + transmission), ``aggregation_ms`` at the BS, and
    ``device_of[k]`` (experts on one device run one after another; None: all in parallel)."""

    energy_j: Sequence[float]
    delay_ms: Sequence[Sequence[float]]
    aggregation_ms: float = 0.0
    device_of: Sequence[str] | None = None

    def problem(self, value: Any, k: int, energy_budget_j: float, delay_budget_ms: Any) -> Any:
        """The :func:`~recipes.moe2.solver.moe2_problem` of these costs."""
        cats = len(self.delay_ms[0]) if self.delay_ms else 0
        return moe2_problem(
            value,
            self.energy_j,
            self.delay_ms,
            k,
            energy_budget_j,
            delay_budgets(delay_budget_ms, cats),
            self.aggregation_ms,
            self.device_of,
        )


def top_k_in(weights: Sequence[float], subset: Iterable[int], k: int) -> list[int]:
    """The ``k`` experts of ``subset`` with the largest gate ``weights`` (ties: lower index)."""
    return sorted(subset, key=lambda i: (-float(weights[i]), i))[:k]


def combine(weights: Sequence[float], chosen: Sequence[int], probs: np.ndarray) -> np.ndarray:
    """The combined option probabilities of ``chosen``: their gate ``weights`` renormalised over
    them (equal when they sum to 0) times each one's ``probs[k]`` (``[K, O]``)."""
    w = np.array([float(weights[i]) for i in chosen], dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(chosen), 1.0 / len(chosen))
    return (w[:, None] * probs[list(chosen)]).sum(axis=0)


def correct(v: Validation, subset: Iterable[int], k: int) -> np.ndarray:
    """``[N]`` bool: is the top-``k``-inside-``subset`` combination right on each prompt."""
    subset = sorted(subset)
    out = np.zeros(len(v.answer), dtype=bool)
    if not subset:
        return out
    for n in range(len(v.answer)):
        mix = combine(v.gate[n], top_k_in(v.gate[n], subset, k), v.option_probs[:, n, :])
        out[n] = int(np.argmax(mix)) == int(v.answer[n])
    return out


def accuracy(v: Validation, subset: Iterable[int], k: int) -> float:
    """Validation accuracy of a subset (0 for the empty one)."""
    return float(correct(v, subset, k).mean()) if len(v.answer) else 0.0


def delay_budgets(budget_ms: float | Sequence[float], categories: int) -> list[float]:
    """One delay budget per category: the same for all, or as given (length checked)."""
    if isinstance(budget_ms, (int, float)):
        return [float(budget_ms)] * categories
    if len(budget_ms) != categories:
        raise ValueError(f"{categories} categories but {len(budget_ms)} delay budgets")
    return [float(b) for b in budget_ms]


@dataclass(frozen=True)
class Plan:
    """An offline choice: the subset (None: nothing meets the budgets), its validation accuracy
    and cost vector (energy, delay per category), and how it was found."""

    subset: frozenset[int] | None
    accuracy: float | None
    cost: tuple[float, ...] | None
    method: str
    exact_equals_brute: bool | None = None
    value_evals: int = 0


def plan_moe2(
    v: Validation,
    costs: Costs,
    k: int,
    energy_budget_j: float,
    delay_budget_ms: float | Sequence[float],
    brute_force_max: int = 10,
) -> Plan:
    """MoE²'s offline subset: the most accurate ``S`` whose worst-case request energy is within
    ``energy_budget_j`` and whose worst-case delay per category is within its budget."""
    memo: dict[frozenset[int], float] = {}

    def value(s: frozenset[int]) -> float:
        if s not in memo:
            memo[s] = accuracy(v, s, k)
        return memo[s]

    problem = costs.problem(value, k, energy_budget_j, delay_budget_ms)
    exact = solve_exact(problem)
    agree = None
    if v.experts <= brute_force_max:
        brute = solve_brute_force(problem)
        agree = brute == exact
        if not agree:  # the accuracy was not monotone here: the true optimum is brute force's
            return _plan(brute, "brute-force (exact search disagreed)", False, len(memo))
    return _plan(exact, "exact", agree, len(memo))


def _plan(r: SubsetResult, method: str, agree: bool | None, evals: int) -> Plan:
    if not r.feasible:
        return Plan(None, None, None, method, agree, evals)
    return Plan(r.subset, r.value, r.cost, method, agree, evals)


def _fixed(v: Validation, costs: Costs, k: int, subset: Iterable[int], method: str) -> Plan:
    s = frozenset(subset)
    cost = costs.problem(lambda _s: 0.0, k, 0.0, 0.0).cost(s)
    return Plan(s, accuracy(v, s, k), cost, method)


def plan_all(v: Validation, costs: Costs, k: int) -> Plan:
    """Every expert (the gate's top-``k`` of all K per prompt)."""
    return _fixed(v, costs, k, range(v.experts), "all")


def plan_best_single(v: Validation, costs: Costs, k: int) -> Plan:
    """The single most accurate expert on the validation set (ties: lower index)."""
    best = max(range(v.experts), key=lambda i: (accuracy(v, [i], 1), -i))
    return _fixed(v, costs, k, [best], "best-single")


def plan_random(v: Validation, costs: Costs, k: int, seed: int) -> Plan:
    """A seeded random subset of ``k`` experts (all of them when K <= k)."""
    rng = random.Random(seed)
    return _fixed(v, costs, k, rng.sample(range(v.experts), min(k, v.experts)), "random")


def plan_greedy_per_joule(
    v: Validation,
    costs: Costs,
    k: int,
    energy_budget_j: float,
    delay_budget_ms: float | Sequence[float],
) -> Plan:
    """Experts in decreasing single-expert accuracy per joule, each added while the subset stays
    within the budgets (None when not even one fits)."""
    problem = costs.problem(lambda s: accuracy(v, s, k), k, energy_budget_j, delay_budget_ms)
    order = sorted(
        range(v.experts),
        key=lambda i: (-accuracy(v, [i], 1) / max(float(costs.energy_j[i]), 1e-12), i),
    )
    chosen: frozenset[int] = frozenset()
    for i in order:
        if problem.feasible(problem.cost(chosen | {i})):
            chosen = chosen | {i}
    if not chosen:
        return Plan(None, None, None, "greedy-acc-per-joule")
    return Plan(chosen, accuracy(v, chosen, k), problem.cost(chosen), "greedy-acc-per-joule")
