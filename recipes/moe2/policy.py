"""MoE² and its baselines as request-level policies (:class:`testbed.policy.RequestPolicy`).

Every one plans a subset of the whole-model experts once per trial from the measured profile
(:meth:`plan`) and serves each request with the gate's top-``top_k`` experts inside it
(:meth:`select_request`); they differ only in the subset:

* ``moe2``: the most accurate subset whose worst-case request energy is within
  ``energy_budget_j`` and whose worst-case delay on each category is within
  ``delay_budget_ms`` (:func:`recipes.moe2.selection.plan_moe2`, exact);
* ``moe2-all``: every expert; ``moe2-best``: the single most accurate one; ``moe2-random``: a
  seeded random ``top_k`` of them; ``moe2-greedy``: experts by validation accuracy per joule
  while the budgets hold.

The budgets are parameters of every one of them, so that a sweep gives them to all and the
run counts each request's violations against the same budgets. When no subset meets the
budgets, ``moe2`` and ``moe2-greedy`` refuse every request (counted as wrong and as
violations: nothing could be served within budget).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recipes.moe2.selection import (
    Costs,
    Plan,
    Validation,
    plan_all,
    plan_best_single,
    plan_greedy_per_joule,
    plan_moe2,
    plan_random,
    top_k_in,
)
from testbed.errors import ConfigError
from testbed.policy import (
    ClusterView,
    RequestContext,
    RequestDecision,
    RequestPolicy,
    RequestProfile,
)


class MoE2(RequestPolicy):
    """MoE²: the exact best expert subset under the energy and per-category delay budgets,
    the gate's top-k inside it per request.

    Parameters
    ----------
    energy_budget_j:
        Per-request energy budget (J), worst case over the top-k choices.
    delay_budget_ms:
        Per-request delay budget (ms): one for every category, or one per category.
    top_k:
        Experts per request (inside the subset).
    """

    name = "moe2"

    def __init__(
        self,
        energy_budget_j: float = 1.0,
        delay_budget_ms: float | list[float] = 100.0,
        top_k: int = 2,
        placement: str = "round-robin",
        seed: int = 0,
    ):
        super().__init__(placement, seed)
        if energy_budget_j < 0 or top_k < 1:
            raise ConfigError("energy_budget_j must be >= 0 and top_k >= 1")
        self.energy_budget_j = float(energy_budget_j)
        self.delay_budget_ms = delay_budget_ms
        self.top_k = int(top_k)
        self.plan_result: Plan | None = None

    def plan(self, profile: RequestProfile) -> None:
        """Choose the trial's subset from the profile."""
        v = Validation(
            np.asarray(profile.gate),
            np.asarray(profile.option_probs),
            np.asarray(profile.answer),
            np.asarray(profile.category),
        )
        costs = Costs(profile.energy_j, profile.delay_ms, profile.aggregation_ms, profile.devices)
        self.plan_result = self.choose(v, costs)

    def choose(self, v: Validation, costs: Costs) -> Plan:
        """The subset (MoE²'s exact choice; the baselines override this)."""
        return plan_moe2(v, costs, self.top_k, self.energy_budget_j, self.delay_budget_ms)

    def select_request(self, req: RequestContext, cluster: ClusterView) -> RequestDecision:
        """The gate's top-k inside the planned subset (none when nothing met the budgets)."""
        if self.plan_result is None:
            raise ConfigError(f"policy {self.name}: select_request before plan")
        subset = self.plan_result.subset
        if not subset:
            return RequestDecision((), stats={"subset_size": 0})
        chosen = tuple(top_k_in(req.gate, subset, self.top_k))
        return RequestDecision(chosen, stats={"subset_size": len(subset)})

    def describe(self) -> dict[str, Any]:
        """Parameters plus the planned subset, its validation accuracy and cost, how found."""
        d = super().describe()
        p = self.plan_result
        if p is not None:
            d["plan"] = {
                "subset": sorted(p.subset) if p.subset else [],
                "accuracy": p.accuracy,
                "cost": list(p.cost) if p.cost else None,
                "method": p.method,
                "exact_equals_brute": p.exact_equals_brute,
            }
        return d


class AllExperts(MoE2):
    """Baseline: every expert, the gate's top-k of all of them."""

    name = "moe2-all"

    def choose(self, v: Validation, costs: Costs) -> Plan:
        """Every expert."""
        return plan_all(v, costs, self.top_k)


class BestSingle(MoE2):
    """Baseline: the single expert most accurate on the validation set."""

    name = "moe2-best"

    def choose(self, v: Validation, costs: Costs) -> Plan:
        """The most accurate single expert."""
        return plan_best_single(v, costs, self.top_k)


class RandomSubset(MoE2):
    """Baseline: a random subset of ``top_k`` experts (seeded by ``seed``)."""

    name = "moe2-random"

    def choose(self, v: Validation, costs: Costs) -> Plan:
        """A seeded random ``top_k`` experts."""
        return plan_random(v, costs, self.top_k, self.seed)


class GreedyPerJoule(MoE2):
    """Baseline: experts by validation accuracy per joule, added while the budgets hold."""

    name = "moe2-greedy"

    def choose(self, v: Validation, costs: Costs) -> Plan:
        """Greedy by accuracy per joule under the budgets."""
        return plan_greedy_per_joule(
            v, costs, self.top_k, self.energy_budget_j, self.delay_budget_ms
        )
