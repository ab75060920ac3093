"""``testbed model eval --policy SPEC --param KEY=VALUE --cluster FILE``: any testbed policy
evaluated offline on the tiny model, in-process (``run_main``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_main

pytest.importorskip("torch")

N = "48"  # held-out examples: enough for top-1 to miss some

POLICIES = textwrap.dedent(
    '''
    """Test policies."""
    import torch

    from models.routing import TopKSelection
    from testbed.policy import Decision, Policy


    class KPolicy(Policy):
        """Top-1 when k == 1, else the model's top-k; logs k."""

        name = "kpol"

        def __init__(self, k: int = 2, placement: str = "round-robin", seed: int = 0):
            super().__init__(placement, seed)
            self.k = k

        def select(self, ctx, cluster):
            sel = TopKSelection(k=1 if self.k == 1 else None)(ctx)
            return Decision(sel, predicted_ms=2.5, stats={"k_used": self.k, "mode": "x"})


    class SlowDrop(Policy):
        """Top-k, minus the experts on devices whose downlink is below min_kbit."""

        name = "slowdrop"

        def __init__(self, min_kbit: float = 1000.0, placement: str = "round-robin",
                     seed: int = 0):
            super().__init__(placement, seed)
            self.min_kbit = min_kbit

        def select(self, ctx, cluster):
            sel = TopKSelection()(ctx)
            slow = [
                cluster.rate_down_kbit[cluster.device_of(ctx.layer, e)] < self.min_kbit
                for e in range(ctx.num_experts)
            ]
            mask = torch.tensor(slow)[sel.expert_ids.clamp_min(0)]
            mask[:, 0] = False  # keep each token's best expert
            return Decision(sel.drop(mask), stats={"dropped": int(mask.sum())})
    '''
)


@pytest.fixture
def policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``pol.py`` in a working directory of its own (file specs are relative to it)."""
    (tmp_path / "pol.py").write_text(POLICIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _eval(monkeypatch, capsys, *args: str) -> dict[str, dict]:
    rc, out, err = run_main(
        monkeypatch,
        capsys,
        "model",
        "eval",
        "tiny",
        "--n",
        N,
        "--threads",
        "1",  # as the reference evals in this process (tests/conftest.py)
        "--format",
        "json",
        *args,
    )
    assert rc == 0, err
    return {r["policy"]: r for r in json.loads(out)["results"]}


ACCURACY = ("exact_match", "next_token_acc", "perplexity", "n_examples", "n_tokens")


def test_file_policy_with_typed_param_matches_top1(policies, monkeypatch, capsys) -> None:
    rows = _eval(monkeypatch, capsys, "--policy", "pol.py:KPolicy,top1", "--param", "k=1")
    k1, top1 = rows["pol.py:KPolicy"], rows["top1"]
    assert top1["exact_match"] < 1.0  # else k=1 and k=2 could not be told apart
    assert {a: k1[a] for a in ACCURACY} == {a: top1[a] for a in ACCURACY}
    assert k1["bytes_down_per_token"] == top1["bytes_down_per_token"] > 0
    assert k1["policy.k_used"] == 1.0 and k1["policy_predicted_ms"] == 2.5
    assert "policy.mode" not in k1  # strings are not averaged
    assert "policy.k_used" not in top1
    # a per-policy NAME.KEY parameter; without it, k = 2 is the model's own top-k
    rows = _eval(
        monkeypatch, capsys, "--policy", "pol.py:KPolicy,topk", "--param", "pol.py:KPolicy.k=2"
    )
    assert rows["pol.py:KPolicy"]["exact_match"] == rows["topk"]["exact_match"] == 1.0
    assert rows["pol.py:KPolicy"]["policy.k_used"] == 2.0


def test_cluster_file_changes_a_rate_aware_policy(policies, monkeypatch, capsys) -> None:
    spec = "pol.py:SlowDrop"
    base = _eval(monkeypatch, capsys, "--policy", f"topk,{spec}")
    assert base[spec]["bytes_down_per_token"] == base["topk"]["bytes_down_per_token"]
    assert base[spec]["policy.dropped"] == 0.0
    cl = policies / "cluster.toml"
    cl.write_text(
        'devices = ["a", "b", "c"]\n'
        "rate_down_kbit = {a = 20000, b = 500, c = 20000}\n"
        "rate_up_kbit = 20000\n"
        "memory_budget_mb = 64\n"
    )
    slow = _eval(monkeypatch, capsys, "--policy", f"topk,{spec}", "--cluster", str(cl))
    assert slow["topk"] == {**base["topk"], "wall_s": slow["topk"]["wall_s"]}
    assert slow[spec]["bytes_down_per_token"] < slow["topk"]["bytes_down_per_token"]
    assert slow[spec]["bytes_up_per_token"] < slow["topk"]["bytes_up_per_token"]
    assert slow[spec]["policy.dropped"] > 0
    # the threshold is a typed parameter: below b's rate, nothing is dropped
    low = _eval(
        monkeypatch, capsys, "--policy", spec, "--cluster", str(cl), "--param", "min_kbit=400"
    )
    assert low[spec]["bytes_down_per_token"] == base["topk"]["bytes_down_per_token"]


@pytest.mark.parametrize(
    ("args", "cluster", "needle"),
    [
        (["--param", 'k="one"'], None, "--param.k: expected int, got str 'one'"),
        (["--param", "k=fast"], None, "--param.k: expected int, got str 'fast'"),
        (["--param", "zz=1"], None, "--param.zz: unknown parameter of policy kpol"),
        (["--param", "topk.k=1"], None, "topk is a routing name"),
        ([], "rates = 1\n", "cluster.toml: rates: unknown key"),
        ([], "rate_down_kbit = {dev1 = 1, dev9 = 2}\n", "cluster.toml: rate_down_kbit.dev9"),
        ([], 'rate_up_kbit = "fast"\n', "cluster.toml: rate_up_kbit: expected a number"),
        ([], "devices = 0\n", "cluster.toml: devices: expected a count >= 1"),
        ([], "compute_profile = {dev1 = [1]}\n", "cluster.toml: compute_profile.dev1"),
    ],
)
def test_bad_param_or_cluster_is_one_error_line(
    policies, monkeypatch, capsys, args, cluster, needle
) -> None:
    extra = list(args)
    if cluster is not None:
        (policies / "cluster.toml").write_text(cluster)
        extra += ["--cluster", "cluster.toml"]
    rc, _, err = run_main(
        monkeypatch, capsys, "model", "eval", "tiny", "--policy", "pol.py:KPolicy,topk", *extra
    )
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_unknown_policy_names_routing_and_registered(monkeypatch, capsys) -> None:
    rc, _, err = run_main(monkeypatch, capsys, "model", "eval", "tiny", "--policy", "bogus")
    assert rc == 2 and "not a routing name" in err and "wdmoe" in err


def test_routing_names_unchanged(monkeypatch, capsys) -> None:
    """topk, top<n>, random<n> give what the routing hooks give by themselves (the eval before
    plug-in policies), plus bytes per token."""
    from models.evaluate import eval_tiny
    from models.routing import make_policy
    from models.runtime import BaseStationModel
    from testbed.lab.modelstore import resolve_split

    rows = _eval(monkeypatch, capsys, "--policy", "topk,top1,random1")
    bs = BaseStationModel.from_split_dir(resolve_split("tiny"))
    hidden, layers = bs.manifest.hidden_size, len(bs.manifest.moe_layers)
    for name, k in (("topk", 2), ("top1", 1), ("random1", 1)):
        bs.policy = make_policy(name, seed=0)
        want = eval_tiny(bs, n_examples=int(N), batch_size=64, seed=0)
        got = rows[name]
        assert {a: got[a] for a in want} == want
        assert got["bytes_down_per_token"] == got["bytes_up_per_token"] == k * layers * hidden * 4
        assert set(got) == {*want, "policy", "bytes_down_per_token", "bytes_up_per_token", "wall_s"}


def test_the_example_policy_offline(monkeypatch, capsys, tmp_path: Path):
    """``recipes/examples/slowlink.py`` as the README's walk-through checks it: dev1 slow."""
    from testbed import ROOT

    cluster = tmp_path / "slow.toml"
    cluster.write_text(
        'devices = ["dev1", "dev2", "dev3"]\n'
        "[rate_down_kbit]\ndev1 = 2000\ndev2 = 20000\ndev3 = 20000\n"
    )
    spec = f"{ROOT / 'recipes/examples/slowlink.py'}:SlowLink"
    got = _eval(
        monkeypatch,
        capsys,
        "--policy",
        f"topk,{spec}",
        "--param",
        "min_kbit=5000",
        "--cluster",
        str(cluster),
    )
    topk, slow = got["topk"], got[spec]
    assert slow["policy.dropped"] > 0
    assert slow["bytes_down_per_token"] < topk["bytes_down_per_token"]
    assert slow["exact_match"] <= topk["exact_match"]
