"""WDMoE policies: the WLR rule on hand-made gate scores, the journal's cosine pruning and its
WLR acceptance, the ablations, determinism, valid selections, parameters and entry points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.routing import RoutingContext, TopKSelection, validate_selection
from recipes.wdmoe import WDMoE, WDMoEBandwidthOnly, WDMoEConference, WDMoESelectionOnly
from testbed.errors import ConfigError
from testbed.policy import ClusterState, load_policy, load_policy_class

DEVS = ("d0", "d1", "d2", "d3")


def _ctx(probs, k: int = 2, valid=None, layer: int = 0) -> RoutingContext:
    p = torch.tensor(probs, dtype=torch.float32)
    return RoutingContext(
        layer, 0, p.log(), p, k, True, None if valid is None else torch.tensor(valid)
    )


def _random_ctx(n: int, e: int = 8, seed: int = 0, valid=None) -> RoutingContext:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g) * 2
    return RoutingContext(
        0,
        0,
        logits,
        torch.softmax(logits, -1),
        2,
        True,
        None if valid is None else torch.tensor(valid),
    )


def _cluster(a_ms=(1.0, 1.0, 4.0, 1.0), b_ms=0.0, bytes_per_token=1, experts=4) -> ClusterState:
    """Expert e on device d{e mod 4}; tiny payload: t_k is the compute a_k + b_k N."""
    return ClusterState(
        placement={f"L0.E{e}": (DEVS[e % 4],) for e in range(experts)},
        compute_profile={d: (a, b_ms) for d, a in zip(DEVS, a_ms)},
        bytes_per_token=bytes_per_token,
    )


HAND = [
    [0.50, 0.30, 0.10, 0.10],  # w2/w1 = 0.6           -> keep both
    [0.50, 0.05, 0.40, 0.05],  # e2 on the 4 ms device: w2/w1 = 0.2 -> drop e2
    [0.10, 0.60, 0.10, 0.20],  # w2/w1 = 0.33          -> drop e3
    [0.05, 0.05, 0.50, 0.40],
]  # w1 slow: w2/w1 = 3.2  -> keep both


@pytest.mark.parametrize("variant, theta", [("ratio", 0.5), ("share", 1 / 3)])
def test_conference_drops_exactly_the_low_wlr_experts(variant: str, theta: float) -> None:
    pol = WDMoEConference(theta=theta, variant=variant, bandwidth_mhz=100.0)
    sel = validate_selection(pol.select(_ctx(HAND), _cluster()).selection, 4, 4)
    assert sel.expert_ids.tolist() == [[0, 1], [0, -1], [1, -1], [2, 3]]
    w = sel.weights
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.3]) / 0.8)
    torch.testing.assert_close(w[1:3], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    st = pol.last_stats()
    assert st["tokens_pruned"] == 2 and st["experts_dropped"] == 2


def test_conference_theta_zero_is_topk() -> None:
    ctx = _random_ctx(16)
    sel = WDMoEConference(theta=0.0).select(ctx, _cluster(experts=8)).selection
    want = TopKSelection()(ctx)
    assert torch.equal(sel.expert_ids, want.expert_ids)
    torch.testing.assert_close(sel.weights, want.weights)


def test_journal_prunes_tokens_whose_cosine_is_below_theta() -> None:
    # equal device latencies: t = (1,1,1,1); cos(g, t) = sum(g) / (2 |g|)
    probs = [
        [0.50, 0.30, 0.10, 0.10],  # cos 0.833 > 0.8: kept
        [0.60, 0.30, 0.05, 0.05],  # cos 0.741: drops its 2nd expert
        [0.32, 0.28, 0.20, 0.20],
    ]  # cos 0.979: kept
    pol = WDMoE(alpha=0.8, theta_max=0.8, gamma=0.0, max_rounds=1)
    sel = pol.select(_ctx(probs), _cluster(a_ms=(1, 1, 1, 1))).selection
    assert sel.expert_ids.tolist() == [[0, 1], [0, -1], [0, 1]]
    st = pol.last_stats()
    assert st["rounds"] == 1 and st["theta"] == [0.8] and st["tokens_pruned"] == 1


def test_journal_rejects_pruning_that_does_not_shorten_the_critical_path() -> None:
    # compute a_k dominates and does not depend on the load: pruning only loses gate mass
    ctx = _random_ctx(32, e=4)
    pol = WDMoE()
    sel = pol.select(ctx, _cluster(a_ms=(1, 1, 1, 1))).selection
    assert torch.equal(sel.expert_ids, TopKSelection()(ctx).expert_ids)
    assert pol.last_stats()["rounds"] == 0


@pytest.mark.parametrize(
    "gamma, theta, ratio, pruned",
    [
        (1.05, 0.80, 1.4028, 124),  # the first threshold already reaches 1.05x
        (1.41, 0.90, 1.4265, 128),  # 0.80 (1.403x) and 0.85 (1.390x) < 1.41x: rejected, 0.90 taken
        (1.50, None, 1.0, 0),  # no threshold reaches 1.5x: no round, nothing pruned
    ],
)
def test_journal_accepts_only_with_gamma_improvement(gamma, theta, ratio, pruned) -> None:
    """Pruned at theta 0.80, this context reaches 1.403x the top-K WLR, at 0.85 1.390x; at
    0.90 (every token pruned) 1.4265x, the most any threshold gives: gamma decides which one,
    if any, is taken."""
    ctx = _random_ctx(128, seed=3)
    pol = WDMoE(gamma=gamma, max_rounds=1)
    sel = pol.select(ctx, _cluster(b_ms=0.5, bytes_per_token=8192, experts=8)).selection
    st = pol.last_stats()
    assert st["wlr"] / st["wlr_topk"] == pytest.approx(ratio, abs=1e-3)
    assert st["tokens_pruned"] == pruned and st["experts_dropped"] == pruned
    if theta is None:
        assert st["rounds"] == 0 and st["theta"] == [] and st["wlr"] == st["wlr_topk"]
        assert torch.equal(sel.expert_ids, TopKSelection()(ctx).expert_ids)
        assert st["predicted_ms"] == st["predicted_topk_ms"]
    else:
        assert st["rounds"] == 1 and st["theta"] == [pytest.approx(theta)]
        assert st["wlr"] >= gamma * st["wlr_topk"]
        assert int((sel.expert_ids == -1).sum()) == pruned


def test_journal_accepts_anything_with_gamma_zero() -> None:
    ctx = _random_ctx(128, seed=3)
    # accept anything, threshold 1.0 (every cosine passes): each round drops one expert per
    # token down to one
    pol = WDMoE(alpha=1.0, gamma=0.0, max_rounds=3)
    sel = pol.select(ctx, _cluster(experts=8)).selection
    assert torch.equal(sel.expert_ids[:, 0], TopKSelection(k=1)(ctx).expert_ids[:, 0])
    assert bool((sel.expert_ids[:, 1] == -1).all()) and pol.last_stats()["rounds"] == 1


def test_bandwidth_only_is_topk_with_min_max_bandwidth() -> None:
    ctx = _random_ctx(24, seed=1)
    cl = _cluster(b_ms=0.3, bytes_per_token=8192, experts=8)
    pol = WDMoEBandwidthOnly(bandwidth_mhz=40.0, seed=2)
    d = pol.select(ctx, cl)
    assert torch.equal(d.selection.expert_ids, TopKSelection()(ctx).expert_ids)
    st = pol.last_stats()
    ch = pol._channel_model
    assert ch.devices == DEVS
    loads = np.array([st["loads"].get(x, 0) for x in DEVS])
    bw = np.array([st["bandwidth_hz"].get(x, 0.0) for x in DEVS])
    # min-max at the channel's rates (the BS's power spread over the 40 MHz cell): every
    # loaded device finishes together, at the predicted time
    down, up = (ch.rates_bps(bw, d, 0, total_hz=40e6) for d in ("down", "up"))
    bits, on = 8 * 8192 * loads, loads > 0
    t = (
        1e3 * (bits[on] / down[on] + bits[on] / up[on])
        + np.array([1.0, 1.0, 4.0, 1.0])[on]
        + 0.3 * loads[on]
    )
    assert st["predicted_ms"] == pytest.approx(t.max(), rel=1e-9)
    np.testing.assert_allclose(t, t.max(), rtol=1e-6)
    assert sum(st["bandwidth_hz"].values()) == pytest.approx(40e6, rel=1e-6)
    for i, dev in enumerate(DEVS):
        if on[i]:
            assert st["rate_down_kbit"][dev] == pytest.approx(down[i] / 1e3)
            assert st["rate_up_kbit"][dev] == pytest.approx(up[i] / 1e3)
    # each direction its own rate (the channel's), for the runner to enforce separately
    assert d.bandwidth_kbit is None
    assert set(d.rate_down_kbit) == set(d.rate_up_kbit) == {x for x in DEVS if st["loads"].get(x)}
    assert d.rate_down_kbit == st["rate_down_kbit"] and d.rate_up_kbit == st["rate_up_kbit"]
    assert any(d.rate_down_kbit[x] != d.rate_up_kbit[x] for x in d.rate_down_kbit)


def test_selection_only_splits_bandwidth_equally() -> None:
    pol = WDMoESelectionOnly(bandwidth_mhz=20.0)
    d = pol.select(_random_ctx(64), _cluster(b_ms=0.5, bytes_per_token=8192, experts=8))
    assert pol.last_stats()["bandwidth_hz"] == {x: 5e6 for x in DEVS}
    assert set(d.rate_down_kbit) == set(d.rate_up_kbit) == set(DEVS)


@pytest.mark.parametrize("cls", [WDMoE, WDMoEConference, WDMoESelectionOnly, WDMoEBandwidthOnly])
def test_deterministic_valid_and_padding_gets_no_expert(cls) -> None:
    valid = [True] * 10 + [False] * 2
    cl = _cluster(b_ms=0.4, bytes_per_token=8192, experts=8)

    def run(seed: int) -> list:
        pol = cls(seed=seed)
        out = []
        for step in range(4):
            d = pol.select(_random_ctx(12, seed=step, valid=valid), cl)
            sel = validate_selection(d.selection, 12, 8)
            assert bool((sel.expert_ids[10:] == -1).all())
            kept = sel.expert_ids[:10] >= 0
            assert bool(kept.any(1).all())  # every valid token keeps one
            torch.testing.assert_close(sel.weights[:10].sum(1), torch.ones(10))
            out.append((sel.expert_ids.tolist(), dict(d.rate_down_kbit), dict(d.rate_up_kbit)))
        assert [s["epoch"] for s in pol.stats] == [0, 1, 2, 3]
        return out

    a = run(7)
    assert a == run(7)
    assert [x[1] for x in a] != [x[1] for x in run(8)]  # the channel follows the seed
    assert a[0][1] != a[1][1]  # fresh fading every decision


def test_without_cluster_experts_spread_over_default_devices() -> None:
    pol = WDMoE(default_devices=3)
    d = pol.select(_random_ctx(5))
    validate_selection(d.selection, 5, 8)
    assert set(d.rate_down_kbit) <= {"dev0", "dev1", "dev2"}


def test_parameters_and_entry_points() -> None:
    for name, cls in (
        ("wdmoe", WDMoE),
        ("wdmoe-conf", WDMoEConference),
        ("wdmoe-sel", WDMoESelectionOnly),
        ("wdmoe-bw", WDMoEBandwidthOnly),
    ):
        assert load_policy_class(name) is cls
    pol = load_policy(
        "wdmoe", {"alpha": 0.7, "bandwidth_mhz": 50, "seed": 3, "channel": {"cell_radius_m": 50.0}}
    )
    assert pol.alpha == 0.7 and pol.bandwidth_mhz == 50.0 and pol.describe()["name"] == "wdmoe"
    with pytest.raises(ConfigError, match="policy.params.theta: unknown parameter"):
        load_policy("wdmoe", {"theta": 0.5})
    with pytest.raises(ConfigError, match="policy.params.alpha: unknown parameter"):
        load_policy("wdmoe-conf", {"alpha": 0.5})
    with pytest.raises(ConfigError, match="channel.radius: unknown channel parameter"):
        load_policy("wdmoe-bw", {"channel": {"radius": 5}})
    with pytest.raises(ConfigError, match="variant"):
        WDMoEConference(variant="b")
    with pytest.raises(ConfigError, match="bandwidth_mhz"):
        WDMoE(bandwidth_mhz=0)


def test_runner_state_wins_channel_budget_epoch_and_fixed_links() -> None:
    """With the runner's channel, budget and epoch in the cluster state the policy allocates
    exactly that budget in that epoch's fading; mid-epoch (links_fixed) it allocates nothing
    and predicts with the enforced rates."""
    from testbed.net.channel import ChannelModel

    ctx = _random_ctx(6)
    cl = _cluster(a_ms=(0.5, 0.5, 0.5, 0.5), bytes_per_token=256, experts=8)
    cl.channel, cl.bandwidth_hz, cl.epoch = ChannelModel(list(DEVS), 3), 2e5, 7
    pol = WDMoEBandwidthOnly(bandwidth_mhz=50.0)  # its own budget must not be used
    d = pol.select(ctx, cl)
    st = pol.last_stats()
    assert sum(st["bandwidth_hz"].values()) == pytest.approx(2e5, rel=1e-6)
    loads = np.array([st["loads"].get(x, 0) for x in DEVS])
    bw = np.array([st["bandwidth_hz"].get(x, 0.0) for x in DEVS])
    down, up = (cl.channel.rates_bps(bw, d, 7, total_hz=2e5) for d in ("down", "up"))
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = np.where(loads > 0, 1e3 * 8 * 256 * loads * (1 / down + 1 / up) + 0.5, 0.0)
    assert st["predicted_ms"] == pytest.approx(dev.max(), rel=1e-6)
    assert set(d.rate_down_kbit) == {x for x in DEVS if loads[DEVS.index(x)]}

    cl.links_fixed = True
    cl.rate_down_kbit = dict.fromkeys(DEVS, 1000.0)
    cl.rate_up_kbit = dict.fromkeys(DEVS, 500.0)
    d = pol.select(ctx, cl)
    st = pol.last_stats()
    assert not d.rate_down_kbit and not d.rate_up_kbit and not st["bandwidth_hz"]
    n_max = max(st["loads"].values())
    bits = 8 * 256 * n_max
    assert st["predicted_ms"] == pytest.approx(bits / 1000.0 + bits / 500.0 + 0.5, rel=1e-9)


def test_epoch_allocation_keeps_a_share_for_idle_devices() -> None:
    """An allocation that covers an epoch of several layers leaves no device without bandwidth
    (the later layers may need it); a per-layer one gives idle devices none."""
    ctx = _ctx([[0.6, 0.4, 0.0, 0.0]])  # one token: experts 0, 1 only
    cl = _cluster(bytes_per_token=256)
    pol = WDMoEBandwidthOnly(bandwidth_mhz=0.2)
    pol.select(ctx, cl)
    assert set(pol.last_stats()["bandwidth_hz"]) == {"d0", "d1"}
    cl.epoch_scope = "step"
    pol.select(ctx, cl)
    bw = pol.last_stats()["bandwidth_hz"]
    assert (
        set(bw) == set(DEVS)
        and bw["d0"] > bw["d2"]
        and sum(bw.values()) == pytest.approx(2e5, rel=1e-6)
    )
