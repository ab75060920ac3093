"""Expert kernels (torch fp/int8/int4, onnxruntime) against a float64 reference."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.errors import ModelError
from models.kernels import (
    OnnxExpert,
    QuantizedTorchExpert,
    TorchExpert,
    export_expert_onnx,
    load_expert,
    output_error,
    quantize_expert_shard,
    quantize_weight,
    reference_expert,
)

H, I = 48, 80


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(I, H, generator=g) * 0.2,
        "w2": torch.randn(H, I, generator=g) * 0.2,
        "w3": torch.randn(I, H, generator=g) * 0.2,
    }


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, torch.Tensor]) -> Path:
    p = tmp_path_factory.mktemp("shard") / "L0.E1.safetensors"
    save_file(weights, str(p), metadata={"uid": "L0.E1", "format": "moe-edge-expert/1"})
    return p


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(37, H, generator=torch.Generator().manual_seed(1))


def test_torch_kernel_matches_reference(
    shard: Path, weights: dict[str, torch.Tensor], x: torch.Tensor
) -> None:
    k = load_expert(shard)
    assert isinstance(k, TorchExpert) and k.uid == "L0.E1"
    ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
    y = k(x)
    assert y.shape == (37, H) and y.dtype == torch.float32
    assert output_error(ref, y)["max_abs"] < 1e-5
    # numpy in -> numpy out, same numbers
    yn = k(x.numpy())
    assert isinstance(yn, np.ndarray)
    np.testing.assert_allclose(yn, y.numpy(), atol=1e-6)
    # zero rows are fine (an expert nobody chose)
    assert k(torch.zeros(0, H)).shape == (0, H)


def test_onnx_kernel_matches_reference(
    tmp_path: Path, shard: Path, weights: dict[str, torch.Tensor], x: torch.Tensor
) -> None:
    onnx_file = export_expert_onnx(shard, tmp_path / "e.onnx")
    k = load_expert(shard, runtime="onnx", onnx_path=onnx_file, threads=1)
    assert isinstance(k, OnnxExpert)
    ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
    assert output_error(ref, k(x))["max_abs"] < 1e-5
    assert output_error(ref, torch.from_numpy(k(x.numpy())))["max_abs"] < 1e-5
    # in-memory export path gives the same result
    k2 = load_expert(shard, runtime="onnx", threads=1)
    torch.testing.assert_close(k2(x), k(x))
    with pytest.raises(ModelError, match=r"input.*\[n, 48\]"):
        k(torch.zeros(2, H + 1))


@pytest.mark.parametrize("quant,bound", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_error_is_measured_and_bounded(
    shard: Path, weights: dict[str, torch.Tensor], x: torch.Tensor, quant: str, bound: float
) -> None:
    ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
    k = load_expert(shard, quant=quant)  # type: ignore[arg-type]
    assert isinstance(k, QuantizedTorchExpert)
    err = output_error(ref, k(x))
    assert 0 < err["rel_rms"] < bound, err
    fp_bytes = sum(w.numel() * 4 for w in weights.values())
    # the packed kernels pad this small expert's matrices (see test_packed_kernels.py); the
    # stored format's bytes are the fallback kernel's
    fallback = load_expert(
        shard, quant=quant, kernel=f"{quant}-{'linear' if quant == 'int8' else 'dequant'}"
    )  # type: ignore[arg-type]
    assert fallback.weight_bytes < fp_bytes / (3.5 if quant == "int8" else 4.5)


def test_int4_is_worse_than_int8(
    shard: Path, weights: dict[str, torch.Tensor], x: torch.Tensor
) -> None:
    ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
    e8 = output_error(ref, load_expert(shard, quant="int8")(x))["rel_rms"]
    e4 = output_error(ref, load_expert(shard, quant="int4")(x))["rel_rms"]
    assert e8 < e4


def test_quantize_weight_roundtrip_odd_sizes() -> None:
    w = torch.randn(5, 45)
    for bits, tol in ((8, 1 / 127), (4, 1 / 7 * 4)):
        q = quantize_weight(w, bits)
        d = q.dequantize()
        assert d.shape == w.shape
        # per element error at most half a quantization step of its row/group scale
        assert float((d - w).abs().max()) <= float(w.abs().max()) * tol / 2 + 1e-6


def test_prequantized_shard_loads_same_numbers(
    tmp_path: Path, shard: Path, x: torch.Tensor
) -> None:
    for quant in ("int8", "int4"):
        qp = quantize_expert_shard(shard, tmp_path / f"q{quant}.safetensors", quant)  # type: ignore[arg-type]
        assert qp.stat().st_size < shard.stat().st_size / (3 if quant == "int8" else 4)
        a = load_expert(qp)(x)
        b = load_expert(shard, quant=quant)(x)  # type: ignore[arg-type]
        torch.testing.assert_close(a, b)


def test_bad_shard_named(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    p = tmp_path / "L1.E0.safetensors"
    save_file({"w1": weights["w1"], "w2": weights["w2"]}, str(p))
    with pytest.raises(ModelError, match=r"L1\.E0\.safetensors: w3: tensor missing"):
        load_expert(p)
    save_file(
        {"w1": weights["w1"], "w2": weights["w2"], "w3": weights["w3"][:, :-1].contiguous()}, str(p)
    )
    with pytest.raises(ModelError, match=r"L1\.E0\.safetensors: w3: shape"):
        load_expert(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernel(shard: Path, weights: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
    k = load_expert(shard, device="cuda", dtype="float32")
    y = k(x.cuda())
    assert y.is_cuda
    assert output_error(ref, y.cpu())["max_abs"] < 1e-4
    y8 = load_expert(shard, device="cuda", quant="int8")(x)
    assert output_error(ref, y8)["rel_rms"] < 0.02
