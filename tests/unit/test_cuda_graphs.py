"""CUDA graphs for an expert's few-row calls (issue 21): the buckets, eager on a CPU, and on a
GPU the graphed outputs equal to the eager ones for every kernel and row count, a forward that
cannot be captured run eagerly with its reason, the int8 Triton product split along K equal
to the unsplit one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.cuda_graphs import MAX_ROWS, GraphedForward, bucket
from models.kernels import load_expert

H, I = 64, 160
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(5)
    w = {
        "w1": torch.randn(I, H, generator=g) * H**-0.5,
        "w2": torch.randn(H, I, generator=g) * I**-0.5,
        "w3": torch.randn(I, H, generator=g) * H**-0.5,
    }
    p = tmp_path_factory.mktemp("graphs") / "L0.E0.safetensors"
    save_file(w, str(p), metadata={"uid": "L0.E0"})
    return p


def test_bucket_is_the_least_power_of_two_not_below() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 100, 128)] == [1, 2, 4, 4, 8, 8, 16, 128, 128]


def test_cpu_experts_launch_eagerly(shard: Path) -> None:
    k = load_expert(shard)
    assert k.launch == "eager" and k.graphed is None
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedForward(lambda x: x, H, torch.device("cpu"), torch.float32)


@needs_cuda
@pytest.mark.parametrize(
    "kw",
    [
        {"dtype": "bfloat16"},
        {"dtype": "float32"},
        {"quant": "int8"},
        {"quant": "int4"},
    ],
    ids=["bf16", "fp32", "int8", "int4"],
)
def test_graphed_equals_eager_on_cuda(shard: Path, kw: dict) -> None:
    graphed = load_expert(shard, device="cuda", **kw)
    eager = load_expert(shard, device="cuda", cuda_graphs=False, **kw)
    assert graphed.launch == "cuda-graph" and eager.launch == "eager"
    g = torch.Generator().manual_seed(1)
    for rows in (1, 3, 8, 1, 37, MAX_ROWS, MAX_ROWS + 9):
        x = torch.randn(rows, H, generator=g)
        for inp in (x, x.cuda()):  # rows from the host or already on the GPU
            want = eager(inp)
            got = graphed(inp)
            assert got.device == inp.device and got.dtype == inp.dtype
            # a bucket of more rows may take another GEMM algorithm: equal to rounding
            err = float((got.cpu() - want.cpu()).norm() / want.cpu().norm())
            assert err < (1e-5 if kw.get("dtype") == "float32" else 1e-2), (kw, rows, err)
    # a returned tensor is the caller's: the next replay does not overwrite it
    x1 = torch.randn(2, H, generator=g).cuda()
    y1 = graphed(x1)
    keep = y1.clone()
    graphed(torch.randn(2, H, generator=g).cuda())
    assert torch.equal(y1, keep)
    assert graphed.graphed is not None and graphed.graphed.error is None
    # every bucket captured when the expert was loaded, none by a timed call
    assert set(graphed.graphed.graphs) == {1, 2, 4, 8, 16, 32, 64, MAX_ROWS}
    graphed.release()  # unloading: the graphs (and their reference back to it) dropped
    assert graphed.graphed is None and graphed.launch == "eager"


@needs_cuda
def test_a_forward_that_cannot_be_captured_runs_eagerly() -> None:
    def syncs(x: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().sum().item() >= 0)  # .item() synchronises: not capturable

    gf = GraphedForward(syncs, 4, torch.device("cuda"), torch.float32)
    x = torch.randn(3, 4)
    assert torch.equal(gf(x), x) and gf.launch == "eager"
    assert gf.error is not None and gf.graphs == {}
    assert torch.equal(gf(x), x)  # and stays eager


@needs_cuda
def test_int8_triton_split_k_equals_unsplit() -> None:
    pytest.importorskip("triton", reason="no CUDA device")  # triton ships with CUDA torch
    from models.kernels import quantize_weight
    from models.kernels_triton import split_k, w8a16_linear

    g = torch.Generator().manual_seed(2)
    for m, n, k in ((1, 256, 4096), (5, 96, 3000), (16, 64, 2048)):
        q = quantize_weight(torch.randn(n, k, generator=g), 8)
        w = q.qweight.cuda().contiguous()
        s = q.scales.reshape(-1).cuda().to(torch.bfloat16).contiguous()
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
        ref = (x.float() @ (w.float() * s.float()[:, None]).T).cpu()
        outs = [w8a16_linear(x, w, s, splits=sk).float().cpu() for sk in (1, 2, 3, 8)]
        for y in outs:
            assert ((y - ref).norm() / ref.norm()) < 0.01, (m, n, k)
        assert 1 <= split_k(m, n, k, x.device) <= 8
    assert split_k(64, 256, 4096, torch.device("cuda")) == 1  # many rows: never split


@needs_cuda
def test_a_released_expert_frees_its_gpu_memory(tmp_path: Path) -> None:
    import gc

    g = torch.Generator().manual_seed(3)
    big = {n: torch.randn(*shape, generator=g) for n, shape in
           (("w1", (4096, 1024)), ("w2", (1024, 4096)), ("w3", (4096, 1024)))}  # fmt: skip
    p = tmp_path / "L0.E1.safetensors"
    save_file(big, str(p))
    held = 3 * 4096 * 1024 * 2  # its bf16 weights: 24 MiB

    def cycle() -> int:
        """Load, call, release and drop one expert with the collector off; the bytes that
        stay allocated."""
        gc.collect()
        gc.disable()  # the memory must come back without a garbage collection
        try:
            before = torch.cuda.memory_allocated()
            k = load_expert(p, device="cuda", dtype="bfloat16")
            k(torch.randn(3, 1024))
            assert torch.cuda.memory_allocated() - before >= held
            k.release()  # what the agent's unload does
            del k
            torch.cuda.empty_cache()
            return torch.cuda.memory_allocated() - before
        finally:
            gc.enable()

    cycle()  # the first may leave cuBLAS workspaces behind, for good
    assert cycle() < held // 8
