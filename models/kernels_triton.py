"""Weight-only int8 matrix product on CUDA in Triton: ``y = (x @ q.T) * scales``.

The ``int8-triton`` kernel of :mod:`models.kernels` (imported only there, and only on CUDA
where ``triton`` is installed): bf16 activations ``x`` [M, K], int8 weights ``q`` [N, K] (one
byte a value read from memory, half of bf16's), bf16 per-output-row ``scales`` [N], bf16 out.
Each program multiplies a block of rows by a block of output columns, the int8 tile cast to
bf16 in registers before ``tl.dot``; made for the few rows of a decode step (PyTorch's own
``_weight_int8pack_mm`` on CUDA took 1.65 ms where three bf16 matmuls took 0.14 ms, for one
row through a 4096x14336 expert on an H200).
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
    ],
    key=["N", "K", "BLOCK_M"],
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
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
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
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        y.to(tl.bfloat16),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


def w8a16_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x @ q.T) * scales`` for bf16 ``x`` [M, K], int8 ``q`` [N, K], bf16 ``scales`` [N]
    (all on one CUDA device, contiguous) -> bf16 [M, N]."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else 64

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    _w8a16_kernel[grid](
        x, q, scales, y, m, n, k, x.stride(0), q.stride(0), y.stride(0), BLOCK_M=block_m
    )
    return y
