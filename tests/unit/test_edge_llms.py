"""MoE²'s whole-model experts: the dense LM (models/dense_lm.py), the committed expert set
models/edge/ and its report (models/edge_llms.py), the gate and its combination
(models/moe2_gate.py)."""

from __future__ import annotations

import math

import pytest
import torch

from models import tinytask as tt
from models.dense_lm import DenseLM, DenseLMConfig, load_dense_lm, save_dense_lm
from models.edge_llms import (
    CATEGORIES,
    THREADS,
    ExpertSpec,
    best_everywhere,
    check_heterogeneous,
    edge_llms_dir,
    heldout_examples,
    mc_category,
    read_report,
    train_expert,
)
from models.errors import ModelError
from models.moe2_gate import combine_options, combined_choices, load_gate


def small_model(seed: int = 0) -> DenseLM:
    torch.manual_seed(seed)
    cfg = DenseLMConfig(tt.VOCAB_SIZE, 32, 2, 4, 64, tt.MAX_SEQ_LEN)
    return DenseLM(cfg).eval()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    m = small_model()
    save_dense_lm(m, tmp_path / "m", {"name": "x", "params": m.num_params()})
    back = load_dense_lm(tmp_path / "m")
    assert back.config == m.config and not back.training
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == torch.float32 and torch.equal(sd[k], sd2[k]), k
    ids = torch.tensor([[1, 5, 14, 15, 3]])
    assert torch.equal(m(ids), back(ids))


def test_load_rejects_a_foreign_config(tmp_path):
    save_dense_lm(small_model(), tmp_path)
    (tmp_path / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ModelError):
        load_dense_lm(tmp_path)


def test_option_logprobs_is_the_token_by_token_sum():
    m = small_model(1)
    prompt = [tt.BOS_ID, tt.TASK_BASE_ID + 2, 14, 17, 20, tt.SEP_ID]
    options = [[19, 22, 25, tt.EOS_ID], [14, tt.EOS_ID], [], [27, 27, 27, 27, 27, tt.EOS_ID]]
    got = m.option_logprobs(prompt, options)
    assert len(got) == len(options)
    with torch.no_grad():
        for opt, value in zip(options, got):
            want = 0.0
            for j, tok in enumerate(opt):
                logits = m(torch.tensor([prompt + opt[:j]]))[0, -1]
                want += float(torch.log_softmax(logits, -1)[tok])
            assert value == pytest.approx(want, abs=1e-4)
    lp = m.next_token_logprobs(prompt)
    assert lp.shape == (tt.VOCAB_SIZE,) and lp.dtype == torch.float32
    assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def scripted(m: DenseLM, prompt_len: int, script: list[int]) -> None:
    """Make ``m`` predict ``script[i]`` as the i-th new token, whatever the input."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], tt.VOCAB_SIZE)
        for t in range(ids.shape[1]):
            i = t + 1 - prompt_len
            if 0 <= i < len(script):
                logits[:, t, script[i]] = 5.0
        return logits

    m.forward = forward


def test_generate_is_greedy_and_stops_after_eos():
    m = small_model()
    prompt = [tt.BOS_ID, tt.TASK_BASE_ID, 14, tt.SEP_ID]
    scripted(m, len(prompt), [15, 16, tt.EOS_ID, 17, 18])
    assert m.generate(prompt, 10, tt.EOS_ID) == [15, 16, tt.EOS_ID]
    assert m.generate(prompt, 2, tt.EOS_ID) == [15, 16]
    assert m.generate(prompt, 10, eos_id=99) == [15, 16, tt.EOS_ID, 17, 18, 0, 0, 0, 0, 0]


def test_training_is_deterministic_on_a_tiny_config():
    spec = ExpertSpec("t", 16, 1, 2, focus=("copy", "add5"), steps=4, batch_size=8)
    a, b = train_expert(spec, seed=0), train_expert(spec, seed=0)
    c = train_expert(spec, seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert spec.mixture()[0] == pytest.approx(0.48) and sum(spec.mixture()) == pytest.approx(1)


@pytest.fixture(scope="module")
def edge():
    """The committed report and experts, evaluated with the thread count of the report."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    report = read_report(edge_llms_dir())
    models = {e["name"]: load_dense_lm(edge_llms_dir() / e["name"]) for e in report["experts"]}
    yield report, models
    torch.set_num_threads(prev)


def test_committed_set_loads_and_is_heterogeneous(edge):
    report, models = edge
    assert edge_llms_dir().is_dir() and 4 <= len(models) <= 6
    assert report["categories"] == list(CATEGORIES)
    sizes = {m.num_params() for m in models.values()}
    assert len(sizes) == len(models)  # all sizes differ
    exact = {e["name"]: e["exact"] for e in report["experts"]}
    assert best_everywhere(exact) == []
    check_heterogeneous(report)
    for name, m in models.items():
        assert m.config.vocab_size == tt.VOCAB_SIZE, name
    total = sum(f.stat().st_size for f in edge_llms_dir().rglob("*") if f.is_file())
    assert total < 5_000_000


def test_check_heterogeneous_rejects_one_best_everywhere():
    acc = {"a": dict.fromkeys(CATEGORIES, 0.9), "b": dict.fromkeys(CATEGORIES, 0.5)}
    acc["b"]["copy"] = 0.9  # a tie still counts as best
    assert best_everywhere(acc) == ["a"]
    acc["b"]["copy"] = 0.95
    assert best_everywhere(acc) == []
    with pytest.raises(ModelError):
        check_heterogeneous({"experts": [{"name": "a", "exact": acc["a"]}]})


@pytest.mark.parametrize("category", ["reverse", "cipher_a"])
def test_reported_exact_match_reproduces(edge, category):
    report, models = edge
    n = report["eval"]["heldout_per_category"]
    sample = [
        ex for ex in heldout_examples(n, report["eval"]["heldout_seed"]) if ex.task == category
    ]
    assert len(sample) == n
    for e in report["experts"]:
        m = models[e["name"]]
        hits = sum(
            tuple(m.generate(ex.prompt, tt.MAX_LEN + 1, tt.EOS_ID)) == ex.target for ex in sample
        )
        assert hits / n == pytest.approx(e["exact"][category], abs=1e-9), e["name"]


def test_reported_mc_and_gate_accuracy_reproduce(edge):
    report, models = edge
    gate = load_gate(edge_llms_dir())
    names = [e["name"] for e in report["experts"]]
    assert gate.experts == names
    items = tt.make_mc_items(report["mc_eval"]["items"], seed=report["mc_eval"]["seed"])
    items = [it for it in items if mc_category(it) == "mul3"]
    lps = [
        [models[n].option_logprobs(it["context_ids"], it["choices_ids"]) for it in items]
        for n in names
    ]
    labels = [it["label"] for it in items]
    for k, n in enumerate(names):
        hits = sum(max(range(4), key=lambda j: lp[j]) == y for lp, y in zip(lps[k], labels))
        assert hits / len(items) == pytest.approx(report["mc"]["experts"][n]["mul3"], abs=1e-9)
    w = gate.weights([it["context_ids"] for it in items])
    assert w.shape == (len(items), len(names))
    assert torch.allclose(w.sum(1), torch.ones(len(items)), atol=1e-5)
    for key, m in (("all", None), ("top1", 1), ("top2", 2)):
        picks = combined_choices(w, lps, m)
        acc = sum(p == y for p, y in zip(picks, labels)) / len(items)
        assert acc == pytest.approx(report["mc"]["gate"][key]["mul3"], abs=1e-9), key


def test_combine_options_renormalises_over_the_chosen():
    w = torch.tensor([0.5, 0.3, 0.2])
    lp = {
        0: [math.log(0.01), math.log(0.99)],  # heavy, but not chosen
        1: [math.log(0.9) - 50, math.log(0.1) - 50],  # unnormalised: softmax per expert
        2: [math.log(0.4), math.log(0.6)],
    }
    # renormalised 0.6 / 0.4: 0.6 * (0.9, 0.1) + 0.4 * (0.4, 0.6) = (0.70, 0.30)
    assert combine_options(w, [1, 2], lp) == 0
    assert combine_options(w, [0, 1, 2], lp) == 1  # 0.5*0.99 + 0.3*0.1 + 0.2*0.6 wins
    assert combine_options(w, [2], lp) == 1
    # 0.1 / 0.9 of the chosen: 0.1 * (0.9, 0.1) + 0.9 * (0.4, 0.6) = (0.45, 0.55)
    assert combine_options(torch.tensor([0.5, 0.02, 0.18]), [1, 2], lp) == 1
    assert combine_options(torch.tensor([0.0, 0.0, 0.0]), [1, 2], lp) == 0  # uniform: (.65, .35)
    with pytest.raises(ModelError):
        combine_options(w, [], lp)
