"""The packed int8/int4 expert kernels (issue 21): their numbers against float64, the kernel
picked per device, dtype and rows, the fallback where an op is missing, and the agent's status
naming the kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from device_agent.experts import ExpertStore
from device_agent.status import Counters
from models.errors import ModelError
from models.kernels import (
    _FALLBACK,
    KERNELS,
    UNAVAILABLE,
    QuantizedTorchExpert,
    available_kernels,
    load_expert,
    output_error,
    pick_kernel,
    reference_expert,
)

H, I = 64, 160  # I is no multiple of 64: the int8 kernel pads it


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "w1": torch.randn(I, H, generator=g) * H**-0.5,
        "w2": torch.randn(H, I, generator=g) * I**-0.5,
        "w3": torch.randn(I, H, generator=g) * H**-0.5,
    }


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, torch.Tensor]) -> Path:
    p = tmp_path_factory.mktemp("packed") / "L0.E0.safetensors"
    save_file(weights, str(p), metadata={"uid": "L0.E0"})
    return p


def test_pick_kernel_documented_table() -> None:
    everything = frozenset(KERNELS)
    assert pick_kernel("cpu", 8, None, everything) == "int8-pack-mm"
    assert pick_kernel("cpu", 4, None, everything) == "int4-pack-mm-cpu"
    assert pick_kernel("cuda", 8, torch.bfloat16, everything) == "int8-triton"
    assert pick_kernel("cuda", 4, None, everything) == "int4-tinygemm"
    # an op missing (older torch, pre-sm80 GPU): the original kernels
    assert pick_kernel("cpu", 8, None, frozenset()) == "int8-linear"
    assert pick_kernel("cuda", 4, None, frozenset({"int8-triton"})) == "int4-dequant"
    # another compute dtype asked for: the fallback, in that dtype
    assert pick_kernel("cpu", 8, torch.float32, everything) == "int8-linear"
    assert pick_kernel("mps", 4, None, everything) == "int4-dequant"
    with pytest.raises(ModelError, match="bit width 3"):
        pick_kernel("cpu", 3, None, everything)


def test_this_cpu_runs_the_packed_kernels() -> None:
    # torch 2.13 on x86-64 has both CPU ops; a torch without them would get the fallback
    assert available_kernels("cpu") == {"int8-pack-mm", "int4-pack-mm-cpu"}


@pytest.mark.parametrize(
    "quant,kernel,bound", [("int8", "int8-pack-mm", 0.02), ("int4", "int4-pack-mm-cpu", 0.17)]
)
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_packed_kernel_matches_reference(
    shard: Path, weights: dict[str, torch.Tensor], quant: str, kernel: str, bound: float, rows: int
) -> None:
    x = torch.randn(rows, H, generator=torch.Generator().manual_seed(rows))
    ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
    k = load_expert(shard, quant=quant)  # type: ignore[arg-type]
    assert isinstance(k, QuantizedTorchExpert) and k.kernel == kernel
    y = k(x)
    assert y.dtype == torch.float32 and y.shape == (rows, H)
    err = output_error(ref, y)["rel_rms"]
    assert 0 < err < bound  # int4: ~15 % on random weights, as the fallback's
    # the same quantized numbers as the fallback kernel, up to bf16 activations
    old = load_expert(shard, quant=quant, kernel=KERNELS_FALLBACK[quant])(x)  # type: ignore[arg-type]
    assert output_error(old, y)["rel_rms"] < 0.01
    assert abs(err - output_error(ref, old)["rel_rms"]) < 0.003
    assert k(x[:0]).shape == (0, H)


KERNELS_FALLBACK = {"int8": "int8-linear", "int4": "int4-dequant"}


def test_packed_error_figures_on_a_larger_expert() -> None:
    """The issue's figures: int8 ~1.6 %, int4 ~15 % relative RMS on random weights (here at
    256x512, small enough for a unit test)."""
    g = torch.Generator().manual_seed(0)
    h, i = 256, 512
    w1, w3 = torch.randn(i, h, generator=g) * h**-0.5, torch.randn(i, h, generator=g) * h**-0.5
    w2 = torch.randn(h, i, generator=g) * i**-0.5
    x = torch.randn(8, h, generator=g)
    ref = reference_expert(w1, w2, w3, x)
    for bits, kernel, lo, hi in (
        (8, "int8-pack-mm", 0.01, 0.02),
        (4, "int4-pack-mm-cpu", 0.1, 0.17),
    ):
        k = QuantizedTorchExpert.from_float(w1, w2, w3, bits, kernel=kernel)
        err = output_error(ref, k(x))["rel_rms"]
        assert lo < err < hi, (kernel, err)


def test_packed_weight_bytes() -> None:
    g = torch.Generator().manual_seed(0)
    w1, w3, w2 = (
        torch.randn(128, 64, generator=g),
        torch.randn(128, 64, generator=g),
        torch.randn(64, 128, generator=g),
    )
    k8 = QuantizedTorchExpert.from_float(w1, w2, w3, 8, kernel="int8-pack-mm")
    # int8 values + one bf16 scale per output row (no padding at these sizes)
    assert k8.weight_bytes == 3 * 128 * 64 + 2 * (256 + 64)
    k4 = QuantizedTorchExpert.from_float(w1, w2, w3, 4, kernel="int4-pack-mm-cpu")
    # two values a byte + a bf16 scale and zero per row and group of 32
    assert k4.weight_bytes == 3 * 128 * 64 // 2 + 4 * (256 * 2 + 64 * 4)


def test_unknown_or_mismatched_kernel_named(shard: Path) -> None:
    with pytest.raises(ModelError, match="unknown kernel 'int3-fast'"):
        load_expert(shard, quant="int8", kernel="int3-fast")
    with pytest.raises(ModelError, match="kernel 'int4-pack-mm-cpu' does not run int8"):
        load_expert(shard, quant="int8", kernel="int4-pack-mm-cpu")


def test_int4_group_padding_and_odd_rows() -> None:
    # inputs no multiple of the group (padded), outputs no multiple of 16 (padded, cut off)
    g = torch.Generator().manual_seed(1)
    w1, w3, w2 = (
        torch.randn(40, 48, generator=g),
        torch.randn(40, 48, generator=g),
        torch.randn(48, 40, generator=g),
    )
    x = torch.randn(5, 48, generator=g)
    for bits, kernel in ((8, "int8-pack-mm"), (4, "int4-pack-mm-cpu")):
        ref = QuantizedTorchExpert.from_float(w1, w2, w3, bits)(x)
        y = QuantizedTorchExpert.from_float(w1, w2, w3, bits, kernel=kernel)(x)
        assert output_error(ref, y)["rel_rms"] < 0.01


def test_agent_status_names_the_kernel(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    (tmp_path / "experts").mkdir()
    save_file(weights, str(tmp_path / "experts" / "L1.E2.safetensors"))
    store = ExpertStore(tmp_path, "cpu", Counters())
    specs = [
        {"uid": "L1.E2", "path": "experts/L1.E2.safetensors", "quant": "int4"},
        {"uid": "L1.E3", "path": "experts/L1.E2.safetensors", "quant": "int8", "dtype": "float32"},
        {"uid": "L1.E4", "path": "experts/L1.E2.safetensors"},
        {"uid": "L1.E5", "builtin": "identity", "hidden": H},
    ]
    assert store.load({"experts": specs})["errors"] == {}
    d = store.describe()
    assert {u: d[u]["kernel"] for u in d} == {
        "L1.E2": "int4-pack-mm-cpu",
        "L1.E3": "int8-linear",  # a float32 compute dtype asked for: the fallback
        "L1.E4": "torch-float32",
        "L1.E5": "builtin",
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("quant,bound", [("int8", 0.02), ("int4", 0.16)])
def test_cuda_packed_kernels(
    shard: Path, weights: dict[str, torch.Tensor], quant: str, bound: float
) -> None:
    for rows in (1, 8, 37):
        x = torch.randn(rows, H, generator=torch.Generator().manual_seed(rows))
        ref = reference_expert(weights["w1"], weights["w2"], weights["w3"], x)
        k = load_expert(shard, quant=quant, device="cuda")  # type: ignore[arg-type]
        bits = 8 if quant == "int8" else 4
        assert k.kernel == pick_kernel("cuda", bits, None, available_kernels("cuda"))
        if torch.cuda.get_device_capability() >= (8, 0):  # tinygemm's GPUs
            assert "int4-tinygemm" in available_kernels("cuda"), UNAVAILABLE
        y = k(x.cuda())
        assert y.is_cuda and y.dtype == torch.float32
        err = output_error(ref, y.cpu())["rel_rms"]
        assert 0 < err < bound
        # the error is the quantization's (as large as the fallback's, in float32), not the
        # kernel's: on the H200 int4's came out at 0.1501 on this 64x160 expert
        old = load_expert(shard, quant=quant, kernel=_FALLBACK[bits])  # type: ignore[arg-type]
        assert err == pytest.approx(output_error(ref, old(x))["rel_rms"], abs=0.01)


def test_probe_reports_a_kernel_that_cannot_run() -> None:
    # tinygemm's CUDA op given CPU tensors fails as a missing op would: a reason, not a crash
    from models.kernels import _probe

    why = _probe("int4-tinygemm", torch.device("cpu"))
    assert why is not None and why.split(":")[0] in ("RuntimeError", "NotImplementedError")
    assert _probe("int8-pack-mm", torch.device("cpu")) is None


_UNALIGNED = """
import sys, torch
from safetensors.torch import load_file
from models.kernels import QuantizedTorchExpert
t = load_file(sys.argv[1])
for bits, kernel in ((8, "int8-pack-mm"), (4, "int4-pack-mm-cpu")):
    k = QuantizedTorchExpert.from_float(t["w1"], t["w2"], t["w3"], bits, kernel=kernel)
    for rows in (1, 2, 8):
        src = torch.randn(rows, t["w1"].shape[1]).to(torch.bfloat16)
        buf = bytearray(2 + 2 * src.numel())
        buf[2:] = src.view(torch.uint8).numpy().tobytes()
        x = torch.frombuffer(memoryview(buf)[2:], dtype=torch.bfloat16).view(src.shape)
        assert x.data_ptr() % 64 != 0
        assert torch.equal(k(x), k(src.clone())), (kernel, rows)
print("ok")
"""


def test_rows_at_an_unaligned_address(shard: Path) -> None:
    # the agent views a received bf16 frame in place: its rows can start 2 bytes off a 64-byte
    # boundary, where _weight_int8pack_mm took the agent down (a general protection fault);
    # run in a child so that a crash fails this test instead of ending the suite
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", _UNALIGNED, str(shard)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        check=False,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-800:])
