"""Selection hooks: default top-k equals the families' routers; validation; named policies."""

import pytest
import torch

from models.errors import ModelError
from models.routing import (
    RandomSelection,
    RoutingContext,
    Selection,
    TopKSelection,
    make_policy,
    validate_selection,
)


def _ctx(n: int = 6, e: int = 8, k: int = 2, norm: bool = True, seed: int = 0) -> RoutingContext:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    return RoutingContext(3, 0, logits, torch.softmax(logits, -1), k, norm)


def test_topk_matches_mixtral_router() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(10, 16)
    logits, scores, idx = router(x)
    ctx = RoutingContext(0, 0, logits, torch.softmax(logits.float(), -1), 2, True)
    sel = TopKSelection()(ctx)
    assert torch.equal(sel.expert_ids, idx)
    torch.testing.assert_close(sel.weights, scores, rtol=0, atol=1e-7)
    assert torch.allclose(sel.weights.sum(-1), torch.ones(10))


@pytest.mark.parametrize("norm", [False, True])
def test_topk_matches_qwen2_router(norm: bool) -> None:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm)
    router = Qwen2MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    logits, scores, idx = router(torch.randn(9, 16))
    sel = TopKSelection()(RoutingContext(0, 0, logits, torch.softmax(logits.float(), -1), 3, norm))
    assert torch.equal(sel.expert_ids, idx)
    torch.testing.assert_close(sel.weights, scores.float(), rtol=0, atol=1e-7)
    assert bool((sel.weights.sum(-1) < 0.999).any()) is (not norm)


def test_top1_weight_is_one_and_top_choice() -> None:
    ctx = _ctx()
    sel = make_policy("top1")(ctx)
    assert sel.expert_ids.shape == (6, 1)
    assert torch.equal(sel.expert_ids[:, 0], ctx.router_probs.argmax(-1))
    assert torch.allclose(sel.weights, torch.ones(6, 1))


def test_random_policy_is_seeded_and_spread() -> None:
    ctx = _ctx(n=4000)
    a = RandomSelection(1, seed=5)(ctx)
    b = RandomSelection(1, seed=5)(ctx)
    c = RandomSelection(1, seed=6)(ctx)
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert not torch.equal(a.expert_ids, c.expert_ids)
    counts = torch.bincount(a.expert_ids[:, 0], minlength=8)
    assert counts.min() > 400  # ~500 each: uniform, not the router's choice
    assert torch.allclose(a.weights, torch.ones_like(a.weights))
    two = make_policy("random2", seed=1)(ctx)
    assert bool((two.expert_ids[:, 0] != two.expert_ids[:, 1]).all())
    assert torch.allclose(two.weights.sum(-1), torch.ones(4000))


@pytest.mark.parametrize("name", ["", "top0", "best", "random", "top-1", "TOP2"])
def test_unknown_policy(name: str) -> None:
    with pytest.raises(ModelError, match="policy"):
        make_policy(name)


def test_validate_selection() -> None:
    ids = torch.tensor([[0, -1], [2, 1]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    v = validate_selection(Selection(ids, w), 2, 3)
    assert v.weights[0, 1] == 0  # weight of an empty slot is zeroed
    with pytest.raises(ModelError, match="outside"):
        validate_selection(Selection(torch.tensor([[3, 0], [0, 0]]), w), 2, 3)
    with pytest.raises(ModelError, match=r"\[3, K\]"):
        validate_selection(Selection(ids, w), 3, 3)
