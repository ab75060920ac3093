"""Splitting random HF checkpoints: manifest contract, byte-exact shards, sharded inputs."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import ModelError
from models.manifest import load_manifest, verify_split
from models.split import split_checkpoint
from models.testing import make_random_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mixtral")
    model, path = make_random_checkpoint(
        "mixtral", d, seed=1, max_shard_size="30KB", num_hidden_layers=3
    )
    return model, path


def test_split_sharded_mixtral(tmp_path: Path, mixtral_ckpt) -> None:
    model, ckpt = mixtral_ckpt
    assert len(list(ckpt.glob("*.safetensors"))) >= 3  # really a multi-file checkpoint
    out = tmp_path / "split"
    man = split_checkpoint(ckpt, out)
    assert man["family"] == "mixtral" and man["top_k"] == 2 and man["dtype"] == "F32"
    assert man["moe_layers"] == [0, 1, 2] and man["experts_per_layer"] == {"0": 4, "1": 4, "2": 4}
    assert sorted(man["experts"]) == sorted(f"L{l}.E{e}" for l in range(3) for e in range(4))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == man
    for ent in man["experts"].values():
        p = out / ent["path"]
        assert p.stat().st_size == ent["bytes"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == ent["sha256"]
        assert ent["shapes"] == {"w1": [48, 32], "w2": [32, 48], "w3": [48, 32]}
    # every expert tensor is byte-identical to the model's (fused in transformers 5) weights
    sd = model.state_dict()
    for l in range(3):
        gu = sd[f"model.layers.{l}.mlp.experts.gate_up_proj"]
        dn = sd[f"model.layers.{l}.mlp.experts.down_proj"]
        for e in range(4):
            t = load_file(str(out / f"experts/L{l}.E{e}.safetensors"))
            assert set(t) == {"w1", "w2", "w3"}
            assert torch.equal(t["w1"], gu[e, :48]) and torch.equal(t["w3"], gu[e, 48:])
            assert torch.equal(t["w2"], dn[e])
    bs = load_file(str(out / "bs/model.safetensors"))
    assert not any(".experts." in k for k in bs)
    assert "model.layers.2.block_sparse_moe.gate.weight" in bs and "lm_head.weight" in bs
    assert man["bs"]["num_tensors"] == len(bs)
    assert (out / "bs/config.json").is_file()
    m = verify_split(out)
    assert m.uids(layer=1) == ["L1.E0", "L1.E1", "L1.E2", "L1.E3"]
    # source sizes add up: BS + experts == checkpoint tensor bytes
    expert_tensor_bytes = sum(4 * 3 * 48 * 32 for _ in man["experts"])
    bs_tensor_bytes = sum(v.numel() * 4 for v in bs.values())
    assert bs_tensor_bytes + expert_tensor_bytes == man["source"]["bytes"]


def test_resplit_is_identical_and_detects_corruption(tmp_path: Path, mixtral_ckpt) -> None:
    _, ckpt = mixtral_ckpt
    a = split_checkpoint(ckpt, tmp_path / "a")
    b = split_checkpoint(ckpt, tmp_path / "a")  # overwriting a previous split is allowed
    assert {u: e["sha256"] for u, e in a["experts"].items()} == {
        u: e["sha256"] for u, e in b["experts"].items()
    }
    p = tmp_path / "a/experts/L1.E2.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"L1\.E2\.safetensors: sha256 differs"):
        verify_split(tmp_path / "a")
    p.write_bytes(bytes(data[:-4]))
    with pytest.raises(ModelError, match=r"L1\.E2\.safetensors: size"):
        load_manifest(tmp_path / "a")


def test_refuses_non_split_nonempty_out(tmp_path: Path, mixtral_ckpt) -> None:
    _, ckpt = mixtral_ckpt
    (tmp_path / "o").mkdir()
    (tmp_path / "o/precious.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        split_checkpoint(ckpt, tmp_path / "o")


def test_fused_layout_checkpoint(tmp_path: Path, mixtral_ckpt) -> None:
    """A state dict saved in transformers-5 in-memory layout (3D expert tensors) splits the same."""
    model, ckpt = mixtral_ckpt
    d = tmp_path / "fused"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors")
    )
    a = split_checkpoint(ckpt, tmp_path / "a")
    b = split_checkpoint(d, tmp_path / "b")
    for uid in a["experts"]:
        ta = load_file(str(tmp_path / "a" / a["experts"][uid]["path"]))
        tb = load_file(str(tmp_path / "b" / b["experts"][uid]["path"]))
        assert all(torch.equal(ta[k], tb[k]) for k in ("w1", "w2", "w3"))


def test_qwen2_moe_split_keeps_shared_expert_and_dense_layers_at_bs(tmp_path: Path) -> None:
    _, ckpt = make_random_checkpoint(
        "qwen2_moe", tmp_path / "q", num_hidden_layers=3, mlp_only_layers=[1]
    )
    man = split_checkpoint(ckpt, tmp_path / "s")
    assert man["family"] == "qwen2_moe" and man["moe_layers"] == [0, 2] and man["shared_expert"]
    assert man["norm_topk_prob"] is False
    assert sorted(man["experts"]) == [f"L{l}.E{e}" for l in (0, 2) for e in range(4)]
    assert man["experts"]["L0.E0"]["shapes"] == {"w1": [24, 32], "w2": [32, 24], "w3": [24, 32]}
    bs = load_file(str(tmp_path / "s/bs/model.safetensors"))
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in bs
    assert "model.layers.0.mlp.shared_expert_gate.weight" in bs
    assert "model.layers.1.mlp.gate_proj.weight" in bs  # the dense layer's MLP stays at the BS


def test_bf16_checkpoint_keeps_dtype(tmp_path: Path) -> None:
    model, _ = make_random_checkpoint("mixtral", tmp_path / "f32")
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    man = split_checkpoint(tmp_path / "bf16", tmp_path / "s")
    assert man["dtype"] == "BF16" and man["bs"]["dtype"] == "BF16"
    t = load_file(str(tmp_path / "s/experts/L0.E3.safetensors"))
    assert t["w1"].dtype == torch.bfloat16
    assert torch.equal(t["w2"], model.state_dict()["model.layers.0.mlp.experts.down_proj"][3])


def _child_vmhwm_bytes(code: str) -> int:
    import re
    import subprocess
    import sys

    probe = (
        "; import re as _r; print('HWM', "
        "_r.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code + probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    return int(re.search(r"HWM (\d+)", out).group(1)) * 1024


def test_split_memory_is_bounded(tmp_path: Path) -> None:
    """Peak RSS of a split child (its own VmHWM, minus the bare import) stays under
    BS part + 2 x largest tensor on a ~60 MB checkpoint (bench/model_split_memory.py does 1 GB)."""
    _, ckpt = make_random_checkpoint(
        "mixtral",
        tmp_path / "big",
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=1024,
        num_local_experts=4,
        num_hidden_layers=3,
        initializer_range=0.02,
        max_shard_size="20MB",
    )
    base = _child_vmhwm_bytes("import models.split")
    peak = _child_vmhwm_bytes(
        f"from models.split import split_checkpoint; "
        f"split_checkpoint({str(ckpt)!r}, {str(tmp_path / 'out')!r})"
    )
    man = json.loads((tmp_path / "out/manifest.json").read_text())
    assert man["source"]["bytes"] > 50e6
    bound = man["bs"]["bytes"] + 2 * man["largest_tensor_bytes"]
    assert peak - base <= bound, (peak, base, bound)
    assert peak - base < man["source"]["bytes"] / 2  # really streaming, not loading the checkpoint
