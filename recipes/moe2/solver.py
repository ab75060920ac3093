"""MoE²'s offline expert-subset selection, solved exactly (arXiv 2501.09410).

The problem: choose a non-empty subset ``S`` of the ``n`` experts that maximises ``value(S)``
(e.g. the validation accuracy of the gate's top-k inside ``S``) subject to
``cost(S)[c] <= limits[c] + TOL`` for every component ``c`` (energy per request, delay per
prompt category). The empty set is never a solution: a subset with no expert answers nothing.
If no non-empty subset is feasible, the result says so (``feasible=False``); nothing is raised.

**Exactness needs monotonicity.** :func:`solve_exact` is a branch and bound over
include/exclude decisions that relies on ``value`` and every ``cost`` component being
non-decreasing under inclusion (as computed, in floating point): a node's bound is
``value(included ∪ undecided)`` and a node whose ``cost(included)`` is infeasible is cut
because every superset is infeasible too. MoE² proves this for its gate (trained once on all
experts, it stays optimal for any subset); a profiled accuracy may still violate it by noise.
:func:`check_monotone` samples pairs ``S ⊂ S ∪ {j}`` to look for violations; on a
non-monotone problem :func:`solve_exact` may return a sub-optimal subset (it is not claimed to
handle one). :func:`solve_brute_force` enumerates all ``2^n - 1`` subsets and needs nothing.

**Deterministic ties.** Both solvers return the same :class:`SubsetResult`: among feasible
subsets with the same value (equal floats) the smaller first cost component (energy) wins,
then fewer experts, then the lexicographically smallest sorted tuple of indices.

**MoE²'s cost model** (:func:`topk_energy`, :func:`worst_delay_ms`, :func:`moe2_problem`):
per request the gate picks its top-k inside ``S``, which ones depends on the prompt, so the
cost of ``S`` is the worst case over those choices — energy is the sum of the ``k`` largest
per-expert energies in ``S`` and the delay of a category is the slowest expert's delay in
``S`` (experts run in parallel) plus the aggregation time. If the profile holds, every request
then meets its budgets whatever the gate picks; both are monotone under inclusion.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

#: absolute tolerance of a cost component against its limit
TOL = 1e-9


@dataclass(frozen=True)
class SubsetProblem:
    """Choose a non-empty ``S ⊆ {0..n-1}`` maximising ``value(S)`` with ``cost(S) <= limits``.

    ``value`` and each component of ``cost`` must be non-decreasing under inclusion for
    :func:`solve_exact` to be exact; ``cost`` returns one number per entry of ``limits``.
    """

    n: int
    value: Callable[[frozenset[int]], float]
    cost: Callable[[frozenset[int]], tuple[float, ...]]
    limits: tuple[float, ...]

    def feasible(self, cost: Sequence[float]) -> bool:
        """Whether a cost vector is within the limits (absolute tolerance :data:`TOL`)."""
        return all(c <= lim + TOL for c, lim in zip(cost, self.limits, strict=True))


@dataclass(frozen=True)
class SubsetResult:
    """A solver's answer: the best subset, its value and cost, and what the search took.

    ``subset``, ``value`` and ``cost`` are None when no non-empty subset is feasible.
    ``value_evals`` (distinct subsets whose value was computed) and ``nodes`` (search nodes
    visited; subsets enumerated for brute force) are not compared by ``==``: two results are
    equal when they pick the same subset with the same value and cost.
    """

    feasible: bool
    subset: frozenset[int] | None
    value: float | None
    cost: tuple[float, ...] | None
    value_evals: int = field(default=0, compare=False)
    nodes: int = field(default=0, compare=False)


def tie_key(
    value: float, cost: Sequence[float], subset: frozenset[int]
) -> tuple[float, float, int, tuple[int, ...]]:
    """Sort key of a feasible candidate, smallest best: higher value, then lower first cost
    component, then fewer experts, then the lexicographically smallest sorted indices."""
    return (-value, cost[0] if cost else 0.0, len(subset), tuple(sorted(subset)))


def topk_energy(energies: Sequence[float], subset: frozenset[int], k: int) -> float:
    """Worst-case energy of one request served by the top-``k`` inside ``subset``: the sum of
    the ``k`` largest ``energies[i]``, ``i`` in ``subset`` (all of them if fewer; 0 if empty).

    Summed largest first so that the float result is monotone under inclusion too (energies
    must be non-negative).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return sum(sorted((energies[i] for i in subset), reverse=True)[:k])


def worst_delay_ms(
    delays_ms: Sequence[Sequence[float]],
    subset: frozenset[int],
    category: int,
    aggregation_ms: float = 0.0,
    device_of: Sequence[str] | None = None,
    k: int | None = None,
) -> float:
    """Worst-case delay of a prompt of ``category``: the slowest expert of ``subset``
    (``delays_ms[i][category]``; experts on different devices run in parallel) plus
    ``aggregation_ms``; 0 for the empty subset (nothing runs). With ``device_of`` (expert ->
    device) and ``k``, experts that share a device run one after another: a device's time is
    the sum of the ``k`` largest delays of its experts in ``subset`` (the worst top-``k``
    choice), the delay the slowest device's (monotone under inclusion too)."""
    if not subset:
        return 0.0
    if device_of is None or k is None:
        return max(delays_ms[i][category] for i in subset) + aggregation_ms
    per_dev: dict[str, list[float]] = {}
    for i in subset:
        per_dev.setdefault(device_of[i], []).append(delays_ms[i][category])
    return max(sum(sorted(v, reverse=True)[:k]) for v in per_dev.values()) + aggregation_ms


def moe2_cost(
    energies: Sequence[float],
    delays_ms: Sequence[Sequence[float]],
    k: int,
    aggregation_ms: float = 0.0,
    device_of: Sequence[str] | None = None,
) -> Callable[[frozenset[int]], tuple[float, ...]]:
    """MoE²'s cost vector of a subset, ``(energy, delay_cat0, delay_cat1, ...)``, as a function.

    ``energies[i]``: energy (J) of expert ``i`` for one request; ``delays_ms[i][c]``: its delay
    on a prompt of category ``c``. Worst case over the gate's top-``k`` choices inside the
    subset (see the module docstring); with ``device_of``, experts sharing a device count one
    after another (:func:`worst_delay_ms`). Energies, delays and ``aggregation_ms`` must be
    non-negative for the costs to be monotone.
    """
    if any(e < 0 for e in energies) or aggregation_ms < 0:
        raise ValueError("energies and aggregation_ms must be non-negative")
    if any(d < 0 for row in delays_ms for d in row):
        raise ValueError("delays must be non-negative")
    if len(delays_ms) != len(energies):
        raise ValueError(f"{len(energies)} energies but {len(delays_ms)} delay rows")
    cats = len(delays_ms[0]) if delays_ms else 0
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    def cost(subset: frozenset[int]) -> tuple[float, ...]:
        delays = tuple(
            worst_delay_ms(delays_ms, subset, c, aggregation_ms, device_of, k) for c in range(cats)
        )
        return (topk_energy(energies, subset, k), *delays)

    return cost


def moe2_problem(
    value: Callable[[frozenset[int]], float],
    energies: Sequence[float],
    delays_ms: Sequence[Sequence[float]],
    k: int,
    energy_budget_j: float,
    delay_budget_ms: Sequence[float],
    aggregation_ms: float = 0.0,
    device_of: Sequence[str] | None = None,
) -> SubsetProblem:
    """The MoE² problem from profiled numbers: :func:`moe2_cost` against the limits
    ``(energy_budget_j, delay_budget_ms[0], ...)``, one delay budget per category."""
    cats = len(delays_ms[0]) if delays_ms else 0
    if len(delay_budget_ms) != cats:
        raise ValueError(f"{cats} categories but {len(delay_budget_ms)} delay budgets")
    return SubsetProblem(
        n=len(energies),
        value=value,
        cost=moe2_cost(energies, delays_ms, k, aggregation_ms, device_of),
        limits=(float(energy_budget_j), *map(float, delay_budget_ms)),
    )


def solve_brute_force(problem: SubsetProblem) -> SubsetResult:
    """Enumerate every non-empty subset; ``value`` is computed for the feasible ones only."""
    best: tuple | None = None
    evals = nodes = 0
    for size in range(1, problem.n + 1):
        for combo in combinations(range(problem.n), size):
            nodes += 1
            s = frozenset(combo)
            c = tuple(problem.cost(s))
            if not problem.feasible(c):
                continue
            v = problem.value(s)
            evals += 1
            key = tie_key(v, c, s)
            if best is None or key < best[0]:
                best = (key, s, v, c)
    if best is None:
        return SubsetResult(False, None, None, None, evals, nodes)
    return SubsetResult(True, best[1], best[2], best[3], evals, nodes)


class _Search:
    """State of one :func:`solve_exact` run: memoised value and cost, and the incumbent."""

    def __init__(self, problem: SubsetProblem) -> None:
        self.p = problem
        self.values: dict[frozenset[int], float] = {}
        self.costs: dict[frozenset[int], tuple[float, ...]] = {}
        self.nodes = 0
        self.best: tuple | None = None  # (tie key, subset, value, cost)

    def value(self, s: frozenset[int]) -> float:
        """``value(s)``, computed once."""
        if s not in self.values:
            self.values[s] = self.p.value(s)
        return self.values[s]

    def cost(self, s: frozenset[int]) -> tuple[float, ...]:
        """``cost(s)``, computed once."""
        if s not in self.costs:
            self.costs[s] = tuple(self.p.cost(s))
        return self.costs[s]

    def offer(self, s: frozenset[int], v: float) -> None:
        """Make the feasible ``s`` of value ``v`` the incumbent if its tie key is smaller."""
        key = tie_key(v, self.cost(s), s)
        if self.best is None or key < self.best[0]:
            self.best = (key, s, v, self.cost(s))

    def beaten(self, bound: float, included: frozenset[int]) -> bool:
        """Whether no subset ``T ⊇ included`` of value <= ``bound`` can beat the incumbent.

        Strictly: a bound below the incumbent's value, or equal to it while the smallest
        energy and size any such ``T`` can have (those of ``included``) already lose the tie.
        A bound equal to the incumbent's value with a tie still winnable is not cut.
        """
        if self.best is None:
            return False
        inc_v = self.best[2]
        if bound != inc_v or not included:
            return bound < inc_v
        c = self.cost(included)
        return (c[0] if c else 0.0, len(included)) > self.best[0][1:3]

    def visit(self, included: frozenset[int], undecided: tuple[int, ...], fresh: bool) -> None:
        """Search the subsets ``included ⊆ T ⊆ included ∪ undecided``; ``fresh`` when
        ``included`` itself (feasible, non-empty) has not been offered yet."""
        self.nodes += 1
        # an expert that alone breaks a limit with `included` is in no feasible T of this node
        undecided = tuple(j for j in undecided if self.p.feasible(self.cost(included | {j})))
        top = included.union(undecided)
        if not top:
            return
        bound = self.value(top)  # monotone: no T here has a higher value
        if self.p.feasible(self.cost(top)):
            self.offer(top, bound)
        if self.beaten(bound, included):
            return
        if fresh and top != included:
            self.offer(included, self.value(included))
        if not undecided:
            return
        j, rest = undecided[0], undecided[1:]
        self.visit(included | {j}, rest, True)
        self.visit(included, rest, False)


def solve_exact(problem: SubsetProblem) -> SubsetResult:
    """The best feasible non-empty subset by branch and bound (exact for monotone problems).

    Experts infeasible on their own are dropped; the others are branched on in decreasing
    order of their singleton value (ties by index), include before exclude, so that good
    incumbents come early. At each node the undecided experts that would break a limit with
    the included ones are dropped, the bound ``value(included ∪ undecided)`` is computed (and
    that set offered as a candidate when feasible), and the node is cut when the bound cannot
    beat the incumbent under the tie-break. ``value`` and ``cost`` are memoised.
    """
    search = _Search(problem)
    alone = [i for i in range(problem.n) if problem.feasible(search.cost(frozenset((i,))))]
    order = sorted(alone, key=lambda i: (-search.value(frozenset((i,))), i))
    search.visit(frozenset(), tuple(order), False)
    evals, nodes = len(search.values), search.nodes
    if search.best is None:
        return SubsetResult(False, None, None, None, evals, nodes)
    _, s, v, c = search.best
    return SubsetResult(True, s, v, c, evals, nodes)


def check_monotone(
    problem: SubsetProblem, samples: int = 200, seed: int = 0
) -> list[tuple[frozenset[int], int, str]]:
    """Violations of monotonicity found by sampling: ``(S, j, what)`` where adding expert ``j``
    to a random ``S`` lowered ``value`` (``what == "value"``) or cost component ``c``
    (``what == "cost[c]"``). Empty when none was found (which proves nothing)."""
    rng = random.Random(seed)
    out: list[tuple[frozenset[int], int, str]] = []
    for _ in range(samples):
        if problem.n < 2:
            break
        s = frozenset(i for i in range(problem.n) if rng.random() < 0.5)
        missing = [i for i in range(problem.n) if i not in s]
        if not s or not missing:
            continue
        j = rng.choice(missing)
        t = s | {j}
        if problem.value(t) < problem.value(s):
            out.append((s, j, "value"))
        for c, (a, b) in enumerate(zip(problem.cost(s), problem.cost(t), strict=True)):
            if b < a:
                out.append((s, j, f"cost[{c}]"))
    return out
