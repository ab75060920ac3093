"""Widened splits (models.widen) on a small random Mixtral: the lift, the shards, the BS runtime
(logits unchanged, rows on the wire W wide, wire dtype), the short name's cache."""

import json
from pathlib import Path

import pytest
import torch

from models.backend import LayerResult, LayerWork, LocalExpertBackend
from models.errors import ModelError
from models.manifest import load_manifest, verify_split
from models.routing import make_policy
from models.runtime import BaseStationModel
from models.split import split_checkpoint
from models.testing import make_random_checkpoint
from models.widen import lift_matrix, widen_split

W = 256


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("widen")
    make_random_checkpoint("mixtral", root / "ckpt", seed=3)
    split_checkpoint(root / "ckpt", root / "split")
    return root / "split"


@pytest.fixture(scope="module")
def wide(split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wide") / "w"
    widen_split(split, out, hidden=W, seed=7)
    return out


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (3, 17), generator=torch.Generator().manual_seed(0))


def test_lift_is_orthonormal_and_seeded() -> None:
    q = lift_matrix(W, 32, seed=7)
    assert q.shape == (W, 32) and q.dtype == torch.float64
    assert torch.allclose(q.T @ q, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, lift_matrix(W, 32, seed=7))
    assert not torch.allclose(q, lift_matrix(W, 32, seed=8))
    with pytest.raises(ModelError, match="must be >="):
        lift_matrix(16, 32)


def test_manifest_and_shards(split: Path, wide: Path) -> None:
    src, m = load_manifest(split), verify_split(wide)
    H, I = src.hidden_size, int(src.dims["expert_intermediate_size"])
    assert m.hidden_size == W and m.model_hidden_size == H and src.model_hidden_size == H
    assert m.uids() == src.uids() and m.top_k == src.top_k
    assert m.lift_path is not None and m.lift_path.is_file() and src.lift_path is None
    assert m.lift_info["seed"] == 7 and m.lift_info["source"]["manifest_sha256"]
    from safetensors.torch import load_file

    q = load_file(str(m.lift_path))["lift"].double()
    for u in m.uids():
        assert dict(m.experts[u].shapes) == {"w1": (I, W), "w2": (W, I), "w3": (I, W)}
        t, s = load_file(str(m.expert_path(u))), load_file(str(src.expert_path(u)))
        assert tuple(t["w1"].shape) == (I, W) and tuple(t["w2"].shape) == (W, I)
        # the trained expert comes back through the lift
        assert torch.allclose(t["w1"].double() @ q, s["w1"].double(), atol=1e-5)
        assert torch.allclose(q.T @ t["w2"].double(), s["w2"].double(), atol=1e-5)
    # the BS part is the source's, byte for byte
    assert m.bs.sha256 == src.bs.sha256


def test_widened_logits_equal_original(split: Path, wide: Path) -> None:
    a = BaseStationModel.from_split_dir(split)
    b = BaseStationModel.from_split_dir(wide)
    ids = _ids()
    la, lb = a.logits(ids), b.logits(ids)
    assert (la - lb).abs().max().item() < 1e-4
    # the experts matter: without them the logits move far more than that
    a.policy = make_policy("random1")
    assert (a.logits(ids) - la).abs().max().item() > 1e-2


def test_rows_on_the_wire_are_wide_and_typed(wide: Path) -> None:
    seen: list[torch.Tensor] = []
    inner = LocalExpertBackend.from_split_dir(wide)

    class Spy:
        def run_layer(self, work: LayerWork) -> LayerResult:
            seen.extend(work.inputs.values())
            res = inner.run_layer(work)
            assert all(
                y.dtype == x.dtype
                for (u, x), y in zip(work.inputs.items(), (res.outputs[u] for u in work.inputs))
            )
            return res

    for wire, dt in ((None, torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        seen.clear()
        b = BaseStationModel.from_split_dir(wide, backend=Spy(), wire_dtype=wire)
        lb = b.logits(_ids())
        assert seen and all(x.shape[1] == W and x.dtype == dt for x in seen)
        assert torch.isfinite(lb).all()


def test_broken_lift_changes_logits(split: Path, wide: Path) -> None:
    """The checks above would catch a lift that is not orthonormal or a forgotten Qᵀ."""
    a = BaseStationModel.from_split_dir(split)
    ids = _ids()
    la = a.logits(ids)
    b = BaseStationModel.from_split_dir(wide)
    q = b.controller.lift
    b.controller.lift = q * 1.1  # not orthonormal
    assert (b.logits(ids) - la).abs().max().item() > 1e-3
    b.controller.lift = torch.roll(q, 1, dims=1)  # orthonormal, but not the experts' Q
    assert (b.logits(ids) - la).abs().max().item() > 1e-3


def test_intermediate_padding_and_dtype(split: Path, tmp_path: Path) -> None:
    src = load_manifest(split)
    I = int(src.dims["expert_intermediate_size"])
    out = tmp_path / "pad"
    man = widen_split(split, out, hidden=W, seed=7, intermediate=I + 16, dtype="bfloat16")
    m = load_manifest(out)
    assert man["dims"]["expert_intermediate_size"] == I + 16 and m.dtype == "BF16"
    assert dict(m.experts["L0.E0"].shapes)["w2"] == (W, I + 16)
    a, b = BaseStationModel.from_split_dir(split), BaseStationModel.from_split_dir(out)
    # bf16 weights: close, not exact
    assert (a.logits(_ids()) - b.logits(_ids())).abs().max().item() < 0.5
    with pytest.raises(ModelError, match="intermediate"):
        widen_split(split, tmp_path / "x", hidden=W, intermediate=I - 1)
    with pytest.raises(ModelError, match="already widened"):
        widen_split(out, tmp_path / "y", hidden=W)
    with pytest.raises(ModelError, match="dtype"):
        widen_split(split, tmp_path / "z", hidden=W, dtype="int8")


def test_manifest_lift_checked(wide: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(wide, bad)
    raw = json.loads((bad / "manifest.json").read_text())
    raw["lift"]["hidden_size"] = W + 1
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="lift.hidden_size"):
        load_manifest(bad)
    raw["lift"]["hidden_size"] = W
    (bad / "manifest.json").write_text(json.dumps(raw))
    (bad / "bs" / "lift.safetensors").unlink()
    with pytest.raises(ModelError, match="missing shard"):
        load_manifest(bad)


def test_short_name_built_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.errors import ConfigError
    from testbed.lab.modelstore import is_short_name, resolve_split

    monkeypatch.setenv("MOE_TESTBED_CACHE", str(tmp_path / "cache"))
    assert is_short_name("tiny-4096") and is_short_name("tiny") and not is_short_name("tiny-x")
    p = resolve_split("tiny-128")
    m = load_manifest(p)
    assert p.parent == tmp_path / "cache" / "splits" and m.hidden_size == 128
    assert m.model_hidden_size == 64 and m.lift_info["seed"] == 0
    mtime = (p / "manifest.json").stat().st_mtime_ns
    assert resolve_split("tiny-128") == p and (p / "manifest.json").stat().st_mtime_ns == mtime
    assert not list(p.parent.glob("*.tmp*"))
    with pytest.raises(ConfigError, match="width must be"):
        resolve_split("tiny-32")
    # tiny-<W>x<I>: the experts' intermediate size zero-padded to I (its own cache entry)
    assert is_short_name("tiny-128x96") and not is_short_name("tiny-128x")
    q = resolve_split("tiny-128x96")
    mq = load_manifest(q)
    assert q != p and mq.hidden_size == 128 and mq.dims["expert_intermediate_size"] == 96
    with pytest.raises(ConfigError, match="< the trained intermediate size"):
        resolve_split("tiny-128x16")


def test_recipe_wire_dtype_and_short_name(tmp_path: Path) -> None:
    from testbed.errors import ConfigError
    from testbed.run.recipe import load_recipe

    p = tmp_path / "r.toml"
    p.write_text('[model]\npath = "tiny-4096"\nwire_dtype = "bf16"\n')
    r = load_recipe(p)
    assert r.model_spec() == "tiny-4096" and r.wire_dtype == "bfloat16"
    p.write_text('[model]\npath = "tiny"\n')
    assert load_recipe(p).wire_dtype is None
    p.write_text('[model]\nwire_dtype = "int8"\n')
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert any("model.wire_dtype: must be one of fp32, bf16, fp16" in m for m in e.value.problems)
