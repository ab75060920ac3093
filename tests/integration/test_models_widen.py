"""The widened tiny model (`testbed model widen tiny OUT --hidden 4096`): Mixtral-8x7B-wide
experts and payloads with the trained tiny model's logits and accuracy."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from models.manifest import load_manifest
from models.runtime import BaseStationModel
from models.split import split_checkpoint
from models.tinytrain import TINY_DIR
from testbed.cli.model import app

runner = CliRunner()
WIDTH = 4096


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tinywide")
    split_checkpoint(TINY_DIR, root / "tiny")
    r = runner.invoke(
        app,
        [
            "widen",
            str(root / "tiny"),
            str(root / "wide"),
            "--hidden",
            str(WIDTH),
            "--format",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["hidden_size"] == WIDTH and out["model_hidden_size"] == 64
    assert out["experts"] == 32 and out["expert_bytes"] > 32 * 3 * WIDTH * 32 * 4
    return root / "tiny", root / "wide"


def test_shards_are_4096_wide(splits: tuple[Path, Path]) -> None:
    from safetensors import safe_open

    m = load_manifest(splits[1])
    assert m.hidden_size == WIDTH and m.model_hidden_size == 64 and len(m.uids()) == 32
    for u in m.uids():
        with safe_open(str(m.expert_path(u)), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        assert shapes == {"w1": (32, WIDTH), "w2": (WIDTH, 32), "w3": (32, WIDTH)}, u


def test_logits_within_1e4_of_the_original(splits: tuple[Path, Path]) -> None:
    from models import tinytask as tt

    a = BaseStationModel.from_split_dir(splits[0])
    b = BaseStationModel.from_split_dir(splits[1])
    ex = tt.generate("heldout", 32, seed=3)
    ids, mask = a.left_pad([list(e.prompt) + list(e.target) for e in ex], tt.PAD_ID)
    la, lb = a.logits(ids, mask), b.logits(ids, mask)
    assert (la - lb).abs().max().item() < 1e-4
    assert torch.equal(la.argmax(-1), lb.argmax(-1))


def _eval(model: str, *extra: str) -> list[dict]:
    r = runner.invoke(
        app,
        [
            "eval",
            model,
            "--policy",
            "topk,top1,random1",
            "--n",
            "96",
            "--threads",
            "1",
            "--format",
            "json",
            *extra,
        ],
    )
    assert r.exit_code == 0, r.output
    return [
        {k: v for k, v in row.items() if k != "wall_s"} for row in json.loads(r.stdout)["results"]
    ]


def test_accuracy_table_identical(splits: tuple[Path, Path]) -> None:
    base = _eval(str(splits[0]))
    wide = _eval(str(splits[1]))
    for a, b in zip(base, wide, strict=True):
        assert a["policy"] == b["policy"]
        assert a["exact_match"] == b["exact_match"] and a["next_token_acc"] == b["next_token_acc"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    assert base[0]["exact_match"] == 1.0 and base[2]["exact_match"] < 0.1
    # bf16 on the wire: the same exact-match and next-token accuracy on the tiny task
    bf = _eval(str(splits[1]), "--wire-dtype", "bf16")
    assert [(r["exact_match"], r["next_token_acc"]) for r in bf] == [
        (r["exact_match"], r["next_token_acc"]) for r in base
    ]
