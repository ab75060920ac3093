"""Weight-only int8 matrix product on CUDA in Triton: ``y = (x @ q.T) * scales``.

The ``int8-triton`` kernel of :mod:`models.kernels` (imported only there, and only on CUDA
where ``triton`` is installed): bf16 activations ``x`` [M, K], int8 weights ``q`` [N, K] (one
byte a value read from memory, half of bf16's), bf16 per-output-row ``scales`` [N], bf16 out.
Each program multiplies a block of rows by a block of output columns, the int8 tile cast to
bf16 in registers before ``tl.dot``; made for the few rows of a decode step (PyTorch's own
``_weight_int8pack_mm`` on CUDA took 1.65 ms where three bf16 matmuls took 0.14 ms, for one
row through a 4096x14336 expert on an H200). With few rows and few output columns (a down
projection) K is split into slices run by separate programs (:func:`split_k`), so that every
multiprocessor streams weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 512}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=8, num_stages=3),
    ],
    key=["N", "K", "BLOCK_M", "SPLIT_K"],
)
@triton.jit
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ys,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # this program's share of K: SPLIT_K slices, each a whole number of BLOCK_K tiles
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
            mask=(offs_m[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
            mask=(offs_n[:, None] < N) & (kk[None, :] < K),
            other=0,
        )
        acc += tl.dot(x, tl.trans(w.to(tl.bfloat16)))
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, y.to(tl.bfloat16), mask=mask)
    else:  # fp32 partial sums, added up (in a fixed order) by the caller
        tl.store(out, y, mask=mask)


#: programs a launch should have at least, per streaming multiprocessor, before K is split
_PROGRAMS_PER_SM = 4
#: the least K a slice of a split product keeps
_MIN_K_SLICE = 1024
_SMS: dict[int, int] = {}


def split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """How many K slices a few-row product is cut into, so that a matrix with few output
    columns (the down projection: 4096 outputs over 14336 inputs) still gives every
    multiprocessor several programs to stream weights through (1 to 8; 1 above 16 rows)."""
    if m > 16:
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    programs = triton.cdiv(n, 16)
    want = triton.cdiv(_PROGRAMS_PER_SM * _SMS[idx], programs)
    return max(1, min(8, want, k // _MIN_K_SLICE))


def w8a16_linear(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, splits: int | None = None
) -> torch.Tensor:
    """``(x @ q.T) * scales`` for bf16 ``x`` [M, K], int8 ``q`` [N, K], bf16 ``scales`` [N]
    (all on one CUDA device, contiguous) -> bf16 [M, N]. ``splits``: K slices (default
    :func:`split_k`); with more than one, fp32 partial products are summed in slice order
    (deterministic, no atomics)."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    if m == 0:
        return torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    block_m = 16 if m <= 16 else 64
    sk = splits or split_k(m, n, k, x.device)
    if sk == 1:
        y = torch.empty(1, m, n, dtype=torch.bfloat16, device=x.device)
    else:
        y = torch.empty(sk, m, n, dtype=torch.float32, device=x.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m), sk)

    _w8a16_kernel[grid](
        x,
        q,
        scales,
        y,
        m,
        n,
        k,
        x.stride(0),
        q.stride(0),
        y.stride(0),
        y.stride(1),
        BLOCK_M=block_m,
        SPLIT_K=sk,
    )
    return y[0] if sk == 1 else y.sum(0).to(torch.bfloat16)
