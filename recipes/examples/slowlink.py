"""Example policy: the model's top-k, minus the extra experts that sit behind a slow link."""

from __future__ import annotations

import torch

from models.routing import RoutingContext, TopKSelection
from testbed.policy import ClusterView, Decision, Policy


class SlowLink(Policy):
    """Top-k, but a token's non-first experts on a device whose downlink is below ``min_kbit``
    are dropped (their weight goes to the token's other experts)."""

    name = "slowlink"

    def __init__(self, min_kbit: float = 5000.0, placement: str = "round-robin", seed: int = 0):
        super().__init__(placement, seed)
        self.min_kbit = min_kbit
        self.topk = TopKSelection()

    def select(self, ctx: RoutingContext, cluster: ClusterView) -> Decision:
        """Drop slot j > 0 of a token when its expert's device is slower than ``min_kbit``."""
        sel = self.topk(ctx)
        devices = cluster.layer_devices(ctx.layer, ctx.num_experts)
        slow = torch.tensor([cluster.rate_down_kbit.get(d, 0.0) < self.min_kbit for d in devices])
        drop = slow[sel.expert_ids.clamp(min=0)] & (sel.expert_ids >= 0)
        drop[:, 0] = False  # every token keeps its most probable expert
        if ctx.token_valid is not None:  # count real tokens only (padding is never run)
            drop &= ctx.token_valid.to(torch.bool)[:, None]
        return Decision(sel.drop(drop), stats={"dropped": int(drop.sum())})
