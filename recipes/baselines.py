"""Baseline policies: the model's own top-k routing and always-top-1, with an equal
bandwidth split. Read this file as the smallest example of a policy."""

from __future__ import annotations

from models.routing import RoutingContext, TopKSelection
from testbed.policy import ClusterView, Decision, Policy


class TopK(Policy):
    """The model's own top-K routing (Mixtral: top-2, weights renormalised), equal bandwidth."""

    name = "topk"

    def __init__(self, placement: str = "round-robin", seed: int = 0):
        super().__init__(placement, seed)
        self._select = TopKSelection()

    def select(self, ctx: RoutingContext, cluster: ClusterView) -> Decision:
        """The model's own top-k selection, unchanged."""
        return Decision(self._select(ctx))


class Top1(Policy):
    """Always top-1: the latency floor of expert pruning, with its accuracy cost."""

    name = "top1"

    def __init__(self, placement: str = "round-robin", seed: int = 0):
        super().__init__(placement, seed)
        self._select = TopKSelection(k=1)

    def select(self, ctx: RoutingContext, cluster: ClusterView) -> Decision:
        """Each token's single most probable expert (weight renormalised as the model does)."""
        return Decision(self._select(ctx))
