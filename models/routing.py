"""Selection hooks: the policy that decides which experts each token uses, with which weights.

A selection hook is any callable ``hook(ctx: RoutingContext) -> Selection``. The split MoE block
(:class:`models.moe_block.SplitMoEBlock`) calls it once per MoE layer per forward step with the
router output for the N tokens of that step (prefill: every prompt token of the batch; decode:
one per sequence). The returned :class:`Selection` is a padded [N, K] index tensor (``-1`` = no
expert in that slot, so tokens may use different numbers of experts, including none) with
combine weights [N, K]; the MoE output of token i is
``sum_j weights[i, j] * expert_{ids[i, j]}(x_i)`` (plus the family's shared expert, which always
runs at the BS).

Built-in policies (:func:`make_policy` names):

* ``topk`` (default): the family's own routing: softmax over the router logits in float32,
  top-k with the model's k, renormalised to sum 1 iff ``ctx.norm_topk_prob`` (Mixtral: always;
  Qwen2-MoE / Qwen3-MoE / OLMoE: as configured by ``norm_topk_prob``).
* ``top<n>`` (``top1``, ``top2``, ...): the same with k = n.
* ``random<n>``: n distinct experts drawn uniformly per token (seeded), weights = their router
  probabilities renormalised to sum 1 (``random1``: weight 1). The "one random expert" baseline.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.errors import ModelError


@dataclass(frozen=True)
class RoutingContext:
    """What a selection hook sees for one MoE layer at one forward step.

    Attributes
    ----------
    layer
        Decoder-layer index of this MoE block.
    step
        Forward-step index within the current run (0 = prefill, then one per decoded token);
        -1 outside a :class:`models.runtime.BaseStationModel` run.
    router_logits
        [N, E] router logits in the model dtype (N tokens = batch * new positions, row-major).
    router_probs
        [N, E] float32 softmax of ``router_logits``.
    top_k
        The model's configured experts per token.
    norm_topk_prob
        Whether the family's default routing renormalises the top-k probabilities.
    token_valid
        [N] bool, False for padding tokens (their selection is irrelevant); None if unknown.
    """

    layer: int
    step: int
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    top_k: int
    norm_topk_prob: bool
    token_valid: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """N, the tokens in this call."""
        return int(self.router_logits.shape[0])

    @property
    def num_experts(self) -> int:
        """E, the experts of this layer."""
        return int(self.router_logits.shape[1])


@dataclass(frozen=True)
class Selection:
    """Per-token expert choice: ``expert_ids`` int64 [N, K] (-1 = empty slot), ``weights``
    [N, K]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor

    def drop(self, mask: torch.Tensor, renormalize: bool = True) -> Selection:
        """This selection with the slots where ``mask`` ([N, K] bool) is True emptied (id -1,
        weight 0). With ``renormalize``, each token's remaining weights are rescaled to the sum
        its weights had before (a token whose every slot is dropped uses no expert)."""
        keep = ~mask.to(torch.bool) & (self.expert_ids >= 0)
        w = torch.where(keep, self.weights, torch.zeros((), dtype=self.weights.dtype))
        if renormalize:
            before = torch.where(self.expert_ids >= 0, self.weights, 0.0).sum(-1, keepdim=True)
            after = w.sum(-1, keepdim=True)
            w = torch.where(after > 0, w * before / after.clamp_min(1e-30), w)
        return Selection(torch.where(keep, self.expert_ids, -1), w)


SelectionHook = Callable[[RoutingContext], Selection]
"""Signature of a policy: ``hook(ctx) -> Selection``."""


def validate_selection(
    sel: Selection, num_tokens: int, num_experts: int, where: str = "selection"
) -> Selection:
    """Check shapes/ranges of a hook's answer; return it with int64 ids and float32 weights,
    weights of empty slots zeroed.

    Raises
    ------
    ModelError
        If the shapes are not [N, K] or an id is outside ``[-1, num_experts)``.
    """
    ids, w = sel.expert_ids, sel.weights
    if not isinstance(ids, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise ModelError(where, "expert_ids and weights must be torch tensors")
    if ids.ndim != 2 or ids.shape[0] != num_tokens or w.shape != ids.shape:
        raise ModelError(
            where,
            f"expert_ids {list(ids.shape)} / weights {list(w.shape)} "
            f"must both be [{num_tokens}, K]",
        )
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_experts):
        raise ModelError(where, f"expert id outside [-1, {num_experts})")
    w = torch.where(
        ids >= 0, w.to(torch.float32), torch.zeros((), dtype=torch.float32, device=w.device)
    )
    return Selection(ids, w)


class TopKSelection:
    """The family's top-k routing (default policy). Each token's slots are in descending
    router probability (slot 0: its most probable expert).

    Parameters
    ----------
    k
        Experts per token; ``None`` = the model's ``top_k``.
    renormalize
        Renormalise the chosen probabilities to sum 1; ``None`` = the family's default
        (``ctx.norm_topk_prob``). With ``k=1`` and renormalisation the weight is 1.
    """

    def __init__(self, k: int | None = None, renormalize: bool | None = None) -> None:
        if k is not None and k < 1:
            raise ModelError("policy", f"top-k needs k >= 1, got {k}")
        self.k = k
        self.renormalize = renormalize

    def __call__(self, ctx: RoutingContext) -> Selection:
        """The top ``k`` (default: the model's top-k) experts by router probability, weights
        renormalised to sum 1 when asked (default: as the model does).
        """
        k = min(self.k or ctx.top_k, ctx.num_experts)
        top_w, top_i = torch.topk(ctx.router_probs, k, dim=-1)
        renorm = ctx.norm_topk_prob if self.renormalize is None else self.renormalize
        if renorm:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return Selection(top_i, top_w)

    def __repr__(self) -> str:
        return f"TopKSelection(k={self.k}, renormalize={self.renormalize})"


class RandomSelection:
    """``n`` distinct uniformly random experts per token (the random-expert baseline).

    Weights are the chosen experts' router probabilities renormalised to sum 1. Deterministic
    for a given ``seed`` and call sequence.
    """

    def __init__(self, n: int = 1, seed: int = 0) -> None:
        if n < 1:
            raise ModelError("policy", f"random selection needs n >= 1, got {n}")
        self.n = n
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, ctx: RoutingContext) -> Selection:
        """``n`` distinct random experts per token, weighted by their router probabilities
        renormalised to sum 1.
        """
        n = min(self.n, ctx.num_experts)
        scores = torch.rand((ctx.num_tokens, ctx.num_experts), generator=self._gen)
        ids = scores.topk(n, dim=-1).indices.to(ctx.router_probs.device)
        w = torch.gather(ctx.router_probs, 1, ids)
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        return Selection(ids, w)

    def __repr__(self) -> str:
        return f"RandomSelection(n={self.n}, seed={self.seed})"


_POLICY_RE = re.compile(r"(top|random)([1-9][0-9]*)")
POLICY_NAMES = ("topk", "top<n>", "random<n>")


def make_policy(name: str, *, seed: int = 0) -> SelectionHook:
    """Build a built-in policy by name: ``topk``, ``top<n>`` or ``random<n>`` (see module doc).

    Raises
    ------
    ModelError
        ``policy: unknown policy ...`` for any other name.
    """
    if name == "topk":
        return TopKSelection()
    m = _POLICY_RE.fullmatch(name or "")
    if m is None:
        raise ModelError(
            "policy",
            f"unknown policy {name!r}; use one of {', '.join(POLICY_NAMES)} (e.g. top1, random1)",
        )
    n = int(m.group(2))
    return TopKSelection(k=n) if m.group(1) == "top" else RandomSelection(n, seed=seed)
