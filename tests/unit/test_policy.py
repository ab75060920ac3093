"""Policy plug-ins: loading by entry point, module path and file path; parameters; placement."""

from __future__ import annotations

import json

import pytest
import torch

from models.routing import RoutingContext
from recipes.baselines import Top1, TopK
from testbed.errors import ConfigError
from testbed.policy import (
    ClusterView,
    DeviceInfo,
    ExpertInfo,
    Policy,
    load_policy,
    load_policy_class,
    random_placement,
    round_robin_placement,
)
from tests.conftest import run_main

EXPERTS = [ExpertInfo(f"L{layer}.E{e}", layer, e, 1000) for layer in range(2) for e in range(8)]
DEVICES = [DeviceInfo(f"dev{i}", 1024) for i in range(1, 4)]
VIEW = ClusterView.static([d.name for d in DEVICES])


def _ctx(n=5, e=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    return RoutingContext(0, 0, logits, torch.softmax(logits, -1), k, True)


def test_builtins_by_entry_point_name():
    assert load_policy_class("topk") is TopK and load_policy_class("top1") is Top1


def test_by_module_path_and_file_path(tmp_path):
    assert load_policy_class("recipes.baselines:Top1") is Top1
    f = tmp_path / "mine.py"
    f.write_text(
        "from testbed.policy import Policy, Decision\n"
        "from models.routing import TopKSelection\n"
        "class Greedy(Policy):\n"
        "    '''Top-3 always.'''\n"
        "    name = 'greedy'\n"
        "    def __init__(self, k: int = 3, **kw):\n"
        "        super().__init__(**kw)\n"
        "        self.k = k\n"
        "    def select(self, ctx, cluster=None):\n"
        "        return Decision(TopKSelection(k=self.k)(ctx))\n"
    )
    pol = load_policy(f"{f}:Greedy", {"k": 4, "seed": 3})
    assert pol.k == 4 and pol.seed == 3
    sel = pol.select(_ctx(), VIEW).selection
    assert sel.expert_ids.shape == (5, 4)


def test_wrong_name_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown policy 'wdmeo' \(valid: .*top1, topk"):
        load_policy_class("wdmeo")


@pytest.mark.parametrize(
    "spec,words",
    [
        ("recipes.baselines:Nope", "has no attribute 'Nope'"),
        ("no_such_pkg.mod:X", "cannot import no_such_pkg.mod"),
        ("testbed.policy:DeviceInfo", "not a subclass"),
        ("testbed.policy:Policy", "abstract"),
        ("/nonexistent/p.py:X", "no such file"),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(ConfigError, match=words):
        load_policy_class(spec)


def test_unknown_parameter_named():
    with pytest.raises(ConfigError) as ei:
        load_policy("topk", {"theta": 0.5, "seed": 1}, where="recipe.toml: policy.params")
    assert ei.value.problems == [
        (
            "recipe.toml: policy.params.theta: unknown parameter of "
            "policy topk (allowed: placement, seed)"
        )
    ]
    with pytest.raises(ConfigError, match="placement: unknown strategy 'zigzag'"):
        load_policy("topk", {"placement": "zigzag"})


def test_topk_and_top1_select():
    ctx = _ctx()
    sel = TopK().select(ctx, VIEW).selection
    top = torch.topk(ctx.router_probs, 2, dim=-1)
    assert torch.equal(sel.expert_ids, top.indices)
    assert torch.allclose(sel.weights.sum(-1), torch.ones(5))
    one = Top1().select(ctx, VIEW).selection
    assert torch.equal(one.expert_ids[:, 0], top.indices[:, 0])
    assert torch.allclose(one.weights, torch.ones(5, 1))


def test_round_robin_spreads_every_layer_over_all_devices():
    p = round_robin_placement(EXPERTS, DEVICES)
    assert set(p) == {e.uid for e in EXPERTS}
    for layer in range(2):
        used = [p[f"L{layer}.E{e}"][0] for e in range(8)]
        counts = {d.name: used.count(d.name) for d in DEVICES}
        assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_random_placement_is_seeded():
    a = random_placement(EXPERTS, DEVICES, seed=7)
    assert a == random_placement(EXPERTS, DEVICES, seed=7)
    assert a != random_placement(EXPERTS, DEVICES, seed=8)
    assert Policy.place(TopK(placement="random", seed=7), EXPERTS, DEVICES) == a


def test_cli_policies_list_json(monkeypatch, capsys):
    rc, out, err = run_main(monkeypatch, capsys, "policies", "list", "--format", "json")
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["topk"]["target"] == "recipes.baselines:TopK"
    assert rows["top1"]["doc"].startswith("Always top-1")
