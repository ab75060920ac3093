"""`testbed model ...` through typer's CliRunner: success output and one-line errors (exit 2)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from models.testing import make_random_checkpoint
from models.tinytask import make_mc_items
from testbed.cli.model import app

runner = CliRunner()


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ck")
    make_random_checkpoint("mixtral", d / "ckpt", max_shard_size="30KB")
    return d / "ckpt"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_split_json(tmp_path: Path, sharded: Path) -> None:
    r = runner.invoke(app, ["split", str(sharded), str(tmp_path / "out"), "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["family"] == "mixtral" and data["experts"] == 8 and data["bs_bytes"] > 0
    assert (tmp_path / "out/manifest.json").is_file()
    t = runner.invoke(app, ["split", str(sharded), str(tmp_path / "out")])
    assert t.exit_code == 0 and "mixtral" in t.stdout


def test_dense_checkpoint(tmp_path: Path) -> None:
    make_random_checkpoint("llama", tmp_path / "dense")
    r = runner.invoke(app, ["split", str(tmp_path / "dense"), str(tmp_path / "out")])
    assert r.exit_code == 2
    line = _error_line(r)
    assert "config.json" in line and "dense" in line and "llama" in line


def test_unknown_family(tmp_path: Path, sharded: Path) -> None:
    d = _copy(sharded, tmp_path / "unk")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "frobnicator_moe"
    (d / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["split", str(d), str(tmp_path / "out"), "--format", "json"])
    assert r.exit_code == 2
    line = _error_line(r)
    assert "config.json: model_type" in line and "unknown MoE family 'frobnicator_moe'" in line
    assert json.loads(r.stdout)["error"]["exit_code"] == 2


def test_missing_shard_file(tmp_path: Path, sharded: Path) -> None:
    d = _copy(sharded, tmp_path / "miss")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    r = runner.invoke(app, ["split", str(d), str(tmp_path / "out")])
    assert r.exit_code == 2
    line = _error_line(r)
    assert victim.name in line and "missing shard" in line


def test_missing_expert_tensor(tmp_path: Path) -> None:
    _, d = make_random_checkpoint("mixtral", tmp_path / "one")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = runner.invoke(app, ["split", str(d), str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight: missing" in _error_line(r)


def test_mismatched_shape(tmp_path: Path) -> None:
    _, d = make_random_checkpoint("mixtral", tmp_path / "shape")
    t = load_file(str(d / "model.safetensors"))
    key = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    t[key] = t[key][:, :31].contiguous()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = runner.invoke(app, ["split", str(d), str(tmp_path / "out")])
    assert r.exit_code == 2
    line = _error_line(r)
    assert key in line and "[48, 31]" in line and "[48, 32]" in line


def test_config_shape_mismatch_in_router(tmp_path: Path) -> None:
    _, d = make_random_checkpoint("mixtral", tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["split", str(d), str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "experts.0.w1.weight" in _error_line(r)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["split", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "config.json: missing" in _error_line(r)


def test_eval_errors(tmp_path: Path, sharded: Path) -> None:
    r = runner.invoke(app, ["eval", str(sharded)])
    assert r.exit_code == 2 and "--mc" in _error_line(r)
    r = runner.invoke(app, ["eval", str(sharded), "--policy", "bogus"])
    assert r.exit_code == 2 and "policy" in _error_line(r)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"context_ids": [5, 6], "choices_ids": [[7], [8]], "label": 0}\n'
        '{"context_ids": [5, 6], "choices_ids": [[7], [8]], "label": 5}\n'
    )
    r = runner.invoke(app, ["eval", str(sharded), "--mc", str(bad)])
    assert r.exit_code == 2 and f"{bad}:2" in _error_line(r)


def test_eval_mc_on_random_checkpoint(tmp_path: Path, sharded: Path) -> None:
    """A random model on token-id MC items: runs, and scores are in range."""
    f = tmp_path / "mc.jsonl"
    f.write_text(
        "\n".join(
            json.dumps(
                {"context_ids": [5, 6, 7], "choices_ids": [[10 + i], [20 + i, 3]], "label": i % 2}
            )
            for i in range(6)
        )
        + "\n"
    )
    r = runner.invoke(
        app,
        [
            "eval",
            str(sharded),
            "--mc",
            str(f),
            "--policy",
            "topk,top1",
            "--threads",
            "1",
            "--format",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert [x["policy"] for x in res] == ["topk", "top1"]
    assert all(x["mc_n"] == 6 and 0 <= x["mc_acc"] <= 1 for x in res)
    assert make_mc_items(3)[0]["choices_ids"]  # the tiny task's MC generator yields items
