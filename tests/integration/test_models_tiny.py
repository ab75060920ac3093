"""The committed tiny model: real accuracy, experts matter, same split path, deterministic build."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models import tinytask as tt
from models.evaluate import eval_multiple_choice, eval_tiny, load_mc_jsonl, load_tokenizer
from models.routing import make_policy
from models.runtime import BaseStationModel
from models.split import split_checkpoint
from models.tinytrain import TINY_DIR
from testbed.cli.model import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "split"
    man = split_checkpoint(TINY_DIR, out)
    assert man["family"] == "mixtral" and len(man["experts"]) == 4 * 8
    return out


def test_accuracy_table_from_cli(tiny_split: Path) -> None:
    r = runner.invoke(
        app,
        [
            "eval",
            str(tiny_split),
            "--policy",
            "topk,top1,random1",
            "--n",
            "256",
            "--threads",
            "1",
            "--format",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = {row["policy"]: row for row in json.loads(r.stdout)["results"]}
    top2, top1, rnd = res["topk"], res["top1"], res["random1"]
    assert top2["exact_match"] >= 0.97 and top2["next_token_acc"] >= 0.99
    assert top1["exact_match"] <= top2["exact_match"] - 0.04
    assert top1["perplexity"] > top2["perplexity"]
    assert rnd["exact_match"] <= 0.2 and rnd["next_token_acc"] <= top2["next_token_acc"] - 0.3
    assert rnd["perplexity"] > 10 * top2["perplexity"]


def test_eval_accepts_hf_checkpoint_dir_directly() -> None:
    r = runner.invoke(
        app, ["eval", str(TINY_DIR), "--n", "32", "--threads", "1", "--format", "json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["exact_match"] >= 0.9


def test_multiple_choice_ids_and_text(tmp_path: Path, tiny_split: Path) -> None:
    bs = BaseStationModel.from_split_dir(tiny_split)
    ids_file = tmp_path / "mc.jsonl"
    ids_file.write_text("\n".join(json.dumps(x) for x in tt.make_mc_items(48, seed=2)) + "\n")
    items = load_mc_jsonl(ids_file)
    good = eval_multiple_choice(bs, items, pad_token_id=tt.PAD_ID)
    assert good["n"] == 48 and good["acc"] >= 0.95 and good["acc_norm"] >= 0.95
    bs.policy = make_policy("random1", seed=0)
    assert eval_multiple_choice(bs, items, pad_token_id=tt.PAD_ID)["acc"] < good["acc"] - 0.2
    # the same questions as text through the tiny model's tokenizer
    text = tmp_path / "mc_text.jsonl"
    with open(text, "w") as f:
        f.writelines(
            json.dumps(
                {
                    "context": tt.decode(x["context_ids"]),
                    "choices": [" " + tt.decode(c) for c in x["choices_ids"]],
                    "label": x["label"],
                }
            )
            + "\n"
            for x in tt.make_mc_items(16, seed=2)
        )
    tok = load_tokenizer(bs)
    assert tok is not None
    t_items = load_mc_jsonl(text, tokenizer=tok)
    assert [it.context for it in t_items] == [it.context for it in items[:16]]
    assert [it.choices for it in t_items] == [it.choices for it in items[:16]]


@pytest.mark.parametrize("runtime,quant", [("onnx", None), ("torch", "int8")])
def test_device_kernels_keep_accuracy(tiny_split: Path, runtime: str, quant: str | None) -> None:
    ref = eval_tiny(BaseStationModel.from_split_dir(tiny_split), n_examples=64)
    got = eval_tiny(
        BaseStationModel.from_split_dir(tiny_split, expert_runtime=runtime, quant=quant),
        n_examples=64,
    )
    if quant is None:
        assert got["exact_match"] == ref["exact_match"]
        assert abs(got["perplexity"] - ref["perplexity"]) < 1e-4
    else:
        assert got["exact_match"] >= ref["exact_match"] - 0.05
        assert got["perplexity"] != ref["perplexity"]


def test_build_tiny_is_deterministic(tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        r = runner.invoke(
            app, ["build-tiny", str(tmp_path / name), "--steps", "3", "--quiet", "--format", "json"]
        )
        assert r.exit_code == 0, r.output
        outs.append(json.loads(r.stdout))
    assert outs[0]["weights_sha256"] == outs[1]["weights_sha256"]
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()
    cfg_a = json.loads((tmp_path / "a/config.json").read_text())
    cfg_tiny = json.loads((TINY_DIR / "config.json").read_text())
    cfg_a.pop("transformers_version", None)
    cfg_tiny.pop("transformers_version", None)
    assert cfg_a == cfg_tiny  # the committed weights come from this exact architecture
    r = runner.invoke(
        app,
        [
            "build-tiny",
            str(tmp_path / "c"),
            "--steps",
            "3",
            "--seed",
            "1",
            "--quiet",
            "--format",
            "json",
        ],
    )
    assert json.loads(r.stdout)["weights_sha256"] != outs[0]["weights_sha256"]
