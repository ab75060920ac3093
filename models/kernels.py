"""Expert kernels: what a device runs, without ``transformers``.

An expert shard (see :mod:`models.manifest`) holds ``w1`` [I, H], ``w2`` [H, I], ``w3`` [I, H];
the expert computes ``y = w2 @ (silu(w1 @ x) * (w3 @ x))`` row by row (Mixtral's SwiGLU, also
Qwen's ``down(silu(gate(x)) * up(x))``).

:func:`load_expert` turns a shard file into an :class:`ExpertKernel`, a callable
``forward(x: [n, H]) -> [n, H]`` that accepts a ``numpy.ndarray`` or a ``torch.Tensor`` and
returns the same kind (numpy in -> numpy out, so a device agent can feed it decoded ZeroMQ
frames directly). Variants:

* ``runtime="torch"``: fp weights on CPU or CUDA (``device="cuda"`` when available).
* ``runtime="torch", quant="int8"``: weight-only int8, symmetric per output channel.
* ``runtime="torch", quant="int4"``: weight-only int4, symmetric per group of 32 inputs,
  two values packed per byte.
* ``runtime="onnx"``: the expert exported to ONNX (:func:`export_expert_onnx`, graph built with
  ``onnx.helper``; no exporter dependency) and run with onnxruntime.

Quantized shards can also be written ahead of time (:func:`quantize_expert_shard`); their
tensors are ``{w}.qweight`` and ``{w}.scales`` with ``__metadata__`` ``quant``/``group_size``,
and :func:`load_expert` recognises them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Literal, Protocol, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from models.cuda_graphs import GraphedForward
from models.errors import ModelError
from models.safetensors_io import read_header

Quant = Literal["int8", "int4"]
INT4_GROUP_SIZE = 32
_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``/``"fp16"``/``"bf16"``/... or a ``torch.dtype`` -> ``torch.dtype``."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _TORCH_DTYPES:
        raise ModelError("dtype", f"unknown dtype {name!r}; use one of {sorted(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[name]


@runtime_checkable
class ExpertKernel(Protocol):
    """One loaded expert. ``forward(x)`` maps [n, hidden_size] -> [n, hidden_size]."""

    hidden_size: int
    intermediate_size: int

    def forward(self, x: Any) -> Any:
        """Rows ``x`` [n, hidden_size] (numpy array or torch tensor) -> the expert's output rows."""

    def __call__(self, x: Any) -> Any:
        """Same as :meth:`forward`."""


class _KernelBase:
    hidden_size: int
    intermediate_size: int
    uid: str | None = None
    device: torch.device
    dtype: torch.dtype
    #: replays the forward from CUDA graphs (:meth:`use_cuda_graphs`); ``None``: eager
    graphed: GraphedForward | None = None

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def use_cuda_graphs(self, enable: bool = True) -> None:
        """On a CUDA device, run calls of up to :data:`models.cuda_graphs.MAX_ROWS` rows as
        one CUDA graph launch each (:class:`~models.cuda_graphs.GraphedForward`); on a CPU,
        or with ``enable=False``, launch each op (eager)."""
        self.graphed = None
        if enable and self.device.type == "cuda":
            self.graphed = GraphedForward(
                self._forward_torch, self.hidden_size, self.device, self.dtype
            )

    def release(self) -> None:
        """Drop the CUDA graphs (their memory pool), and with them the graphs' reference back
        to this expert, so that an unloaded expert's GPU memory is freed when the caller lets
        go of it (not at some later garbage collection)."""
        self.graphed = None

    @property
    def launch(self) -> str:
        """How a call's kernels are launched: ``cuda-graph`` or ``eager`` (the agent's status
        reports it beside ``kernel``)."""
        return self.graphed.launch if self.graphed is not None else "eager"

    def forward(self, x: Any) -> Any:
        """Run the expert on rows ``x`` ([n, H] numpy array or torch tensor); same kind out."""
        as_numpy = isinstance(x, np.ndarray)
        t = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
        if t.ndim != 2 or t.shape[1] != self.hidden_size:
            raise ModelError(
                f"expert {self.uid or ''} input".strip(),
                f"shape {list(t.shape)} != [n, {self.hidden_size}]",
            )
        y = self.graphed(t) if self.graphed is not None else self._forward_torch(t)
        return y.numpy() if as_numpy else y

    __call__ = forward


def read_expert_tensors(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of one expert shard file (CPU tensors)."""
    from safetensors.torch import load_file

    p = Path(path)
    _, meta = read_header(p)  # validates the file and gives a clear error
    return load_file(str(p)), meta


def check_fp_shapes(t: dict[str, torch.Tensor], where: str) -> tuple[int, int]:
    """(hidden, intermediate) of a float shard's w1/w2/w3, checked consistent (ModelError)."""
    for name in ("w1", "w2", "w3"):
        if name not in t:
            raise ModelError(f"{where}: {name}", "tensor missing from expert shard")
    inter, hidden = t["w1"].shape
    for name, want in (("w3", (inter, hidden)), ("w2", (hidden, inter))):
        if tuple(t[name].shape) != want:
            raise ModelError(f"{where}: {name}", f"shape {list(t[name].shape)} != {list(want)}")
    return hidden, inter


class TorchExpert(_KernelBase):
    """Full-precision SwiGLU expert in torch.

    Parameters
    ----------
    w1, w2, w3
        [I, H], [H, I], [I, H] weights.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    dtype
        Compute dtype (default: the weights' dtype; bf16/fp16 weights on CPU are usually better
        run in float32).
    """

    def __init__(
        self,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        uid: str | None = None,
    ) -> None:
        dtype = dtype or w1.dtype
        self.uid = uid
        self.intermediate_size, self.hidden_size = int(w1.shape[0]), int(w1.shape[1])
        self.device = torch.device(device)
        self.dtype = dtype
        #: what serves this expert, e.g. ``torch-float32`` (the agent's status reports it)
        self.kernel = "torch-" + str(dtype).replace("torch.", "")
        # w1 and w3 fused into one [2I, H] matrix: one GEMM for both projections.
        self.w13 = torch.cat([w1, w3], 0).to(device=self.device, dtype=dtype).contiguous()
        self.w2 = w2.to(device=self.device, dtype=dtype).contiguous()

    @torch.no_grad()
    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(device=self.device, dtype=self.dtype), self.w13)
        g, u = h.split(self.intermediate_size, dim=-1)
        y = F.linear(F.silu(g) * u, self.w2)
        return y.to(device=x.device, dtype=x.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the loaded weights (``w13`` and ``w2``) in their dtype."""
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()


# ---- quantization -------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """Weight-only quantized matrix [out, in].

    ``int8``: ``qweight`` int8 [out, in], ``scales`` float32 [out, 1].
    ``int4``: ``qweight`` uint8 [out, in/2] (low nibble = even column, values stored +8),
    ``scales`` float32 [out, in/group_size].
    """

    bits: int
    qweight: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [out, in] this quantized weight represents."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales.to(dtype)
        lo = (self.qweight & 0x0F).to(torch.int8) - 8
        hi = (self.qweight >> 4).to(torch.int8) - 8
        out, g = self.qweight.shape[0], self.group_size
        q = torch.stack([lo, hi], dim=-1).reshape(out, -1)[:, : self.scales.shape[1] * g]
        w = q.to(dtype).reshape(out, -1, g) * self.scales.to(dtype).unsqueeze(-1)
        return w.reshape(out, -1)[:, : self.in_features]

    @property
    def nbytes(self) -> int:
        """Bytes of ``qweight`` plus the float32 ``scales``."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 4


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int = INT4_GROUP_SIZE
) -> QuantizedWeight:
    """Symmetric weight-only quantization of ``w`` [out, in] (round to nearest).

    8 bits: one scale per output row, values in [-127, 127]. 4 bits: one scale per row and
    group of ``group_size`` inputs (the input dimension is zero-padded to a multiple of the
    group size), values in [-8, 7], packed two per byte, the scale chosen per group among a
    few clipping ratios to minimise the squared error.
    """
    w = w.detach().to(torch.float32)
    out_f, in_f = w.shape
    if bits == 8:
        scales = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(8, q, scales, in_f, in_f)
    if bits != 4:
        raise ModelError("quant", f"unsupported bit width {bits}; use 8 or 4")
    g = group_size
    pad = (-in_f) % g
    wp = F.pad(w, (0, pad)) if pad else w
    wg = wp.reshape(out_f, -1, g)
    absmax = wg.abs().amax(dim=-1)
    # round-to-nearest with a per-group clipping search: pick the scale (absmax * r / 7) that
    # minimises the group's squared error; clipping a few outliers beats a coarse grid.
    best_s = best_e = None
    for r in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        s_ = (absmax * r / 7.0).clamp(min=1e-12)
        err = ((torch.round(wg / s_.unsqueeze(-1)).clamp(-8, 7) * s_.unsqueeze(-1) - wg) ** 2).sum(
            -1
        )
        if best_s is None:
            best_s, best_e = s_, err
        else:
            better = err < best_e
            best_s = torch.where(better, s_, best_s)
            best_e = torch.where(better, err, best_e)
    scales = best_s
    q = (torch.round(wg / scales.unsqueeze(-1)).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_f, -1)
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1), value=8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return QuantizedWeight(4, packed, scales, in_f, g)


def concat_rows(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    """``a`` on top of ``b`` (same bits, inputs and groups): one matrix for two projections of
    the same input (the fused gate and up projection ``w13``). Each output row keeps its own
    scales, so the numbers are those of ``a`` and ``b`` apart."""
    return QuantizedWeight(
        a.bits,
        torch.cat([a.qweight, b.qweight], 0),
        torch.cat([a.scales, b.scales], 0),
        a.in_features,
        a.group_size,
    )


#: The kernels a quantized expert runs on, by the name its ``kernel`` attribute (and the agent's
#: status) gives. The first two are the fallbacks, the original kernels, float activations in
#: the compute dtype; the others take bf16 activations (the packed ops are fast for bf16 only:
#: measured here, ``_weight_int8pack_mm`` at 1 row 0.13 ms with bf16 activations, 2.1 ms with
#: float32 ones).
KERNELS = {
    "int8-linear": "int8 matrix cast to the compute dtype, F.linear, per-row scale on the output",
    "int4-dequant": "int4 matrix dequantized to the compute dtype per call, F.linear",
    "int8-pack-mm": "torch.ops.aten._weight_int8pack_mm (per-row bf16 scales), bf16 activations",
    "int8-triton": "a Triton kernel (models.kernels_triton): int8 tiles cast to bf16 in registers"
    " and tl.dot, bf16 activations and per-row scales (CUDA)",
    "int4-pack-mm-cpu": "aten._convert_weight_to_int4pack_for_cpu + _weight_int4pack_mm_for_cpu"
    " (group 32, bf16 scales, zero 0), bf16 activations",
    "int4-tinygemm": "aten._convert_weight_to_int4pack + _weight_int4pack_mm (CUDA sm80+, group "
    "32), bf16 activations; slow for many rows (on an H200, 4096x14336 expert: 0.074 ms at 1 "
    "row, 0.14 ms at 8, 1.6 ms at 128), but dequantizing per call was slower still (1.8 ms)",
}
_FALLBACK = {8: "int8-linear", 4: "int4-dequant"}
_PREFERRED = {
    ("cpu", 8): "int8-pack-mm",
    ("cpu", 4): "int4-pack-mm-cpu",
    ("cuda", 8): "int8-triton",
    ("cuda", 4): "int4-tinygemm",
}


def pick_kernel(
    device_type: str, bits: int, dtype: torch.dtype | None, available: Collection[str]
) -> str:
    """The kernel a ``bits``-bit expert on ``device_type`` (``"cpu"``/``"cuda"``) runs on.

    The preferred kernel of the device (CPU: ``int8-pack-mm``, ``int4-pack-mm-cpu``; CUDA:
    ``int8-triton``, ``int4-tinygemm``) where it is among ``available`` (see
    :func:`available_kernels`) and the compute ``dtype`` is unset or bf16; else the fallback
    (``int8-linear``, ``int4-dequant``), which computes in the given dtype. Pure.
    """
    if bits not in _FALLBACK:
        raise ModelError("quant", f"unsupported bit width {bits}; use 8 or 4")
    want = _PREFERRED.get((device_type, bits))
    if want is None or want not in available or dtype not in (None, torch.bfloat16):
        return _FALLBACK[bits]
    return want


_AVAILABLE: dict[str, frozenset[str]] = {}
#: device -> kernel -> why :func:`available_kernels` left it out
UNAVAILABLE: dict[str, dict[str, str]] = {}


def _probe(name: str, dev: torch.device) -> str | None:
    """Why ``name`` does not run on ``dev`` (``None``: it does, within 2 % of float on a
    64x64 matrix)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    q = quantize_weight(w, 8 if name.startswith("int8") else 4)
    want = F.linear(x.float(), q.dequantize())
    try:
        got = _make_linear(name, q, dev, torch.bfloat16)(x.to(dev)).float().cpu()
    except Exception as e:  # noqa: BLE001 - any failure (no op, no triton, old GPU): not there
        return f"{type(e).__name__}: {e}"[:300]
    err = float((got - want).norm() / want.norm())
    return None if err < 0.02 else f"wrong numbers: relative error {err:.3g}"


def available_kernels(device: str | torch.device) -> frozenset[str]:
    """The packed kernels that run on ``device``: each one's ops exist in this torch and give
    the right numbers on a small matrix (probed once per device, then cached; why one is left
    out, an older torch or a GPU before sm80, say, is in :data:`UNAVAILABLE`)."""
    dev = torch.device(device)
    key = str(dev)
    if key not in _AVAILABLE:
        why = {n: _probe(n, dev) for (t, _), n in sorted(_PREFERRED.items()) if t == dev.type}
        _AVAILABLE[key] = frozenset(n for n, w in why.items() if w is None)
        UNAVAILABLE[key] = {n: w for n, w in why.items() if w is not None}
    return _AVAILABLE[key]


def _pad_to(n: int, m: int) -> int:
    return n + (-n) % m


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous at a 64-byte aligned address (a copy if it is not). A tensor viewed on
    a received frame (the agent's ``frame_tensor``) can start anywhere; the CPU's
    ``_weight_int8pack_mm`` given bf16 rows at an address 2 bytes off alignment took the agent
    down with a general protection fault."""
    x = x.contiguous()
    return x if x.data_ptr() % 64 == 0 else x.clone()


class _DequantLinear:
    """The fallback kernels ``int8-linear`` / ``int4-dequant`` (the original ones)."""

    def __init__(self, q: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        self.q = QuantizedWeight(
            q.bits, q.qweight.to(device), q.scales.to(device), q.in_features, q.group_size
        )
        self.dtype = dtype
        self.kernel = _FALLBACK[q.bits]
        self.nbytes = q.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if q.bits == 8:
            return F.linear(x, q.qweight.to(self.dtype)) * q.scales.to(self.dtype).reshape(1, -1)
        return F.linear(x, q.dequantize(self.dtype))


class _Int8PackLinear:
    """``int8-pack-mm``: ``_weight_int8pack_mm(x_bf16, qweight, scales_bf16)``. The weights are
    copied into a fresh matrix padded to a multiple of 16 rows and 64 inputs (zeros): the CPU
    op crashed here on inputs not a multiple of 16, and on an unpadded matrix read from a
    shard file; padded inputs are zero-padded per call, padded outputs cut off."""

    kernel = "int8-pack-mm"

    def __init__(self, q: QuantizedWeight, device: torch.device) -> None:
        self.n, self.k = int(q.qweight.shape[0]), q.in_features
        self.kp = _pad_to(self.k, 64)
        w = torch.zeros(_pad_to(self.n, 16), self.kp, dtype=torch.int8, device=device)
        w[: self.n, : self.k] = q.qweight.to(device)
        s = torch.ones(w.shape[0], dtype=torch.bfloat16, device=device)
        s[: self.n] = q.scales.reshape(-1).to(device=device, dtype=torch.bfloat16)
        self.w, self.s = w, s
        self.nbytes = self.w.numel() + 2 * self.s.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kp != self.k:
            x = F.pad(x, (0, self.kp - self.k))
        y = torch.ops.aten._weight_int8pack_mm(_aligned(x), self.w, self.s)
        return y[:, : self.n] if y.shape[1] != self.n else y


class _Int4PackLinear:
    """``int4-pack-mm-cpu`` / ``int4-tinygemm``: the tinygemm layout of the int4 weights
    (nibbles ``q + 8``, scale and zero 0 per row and group: ``w = (q - 8) * scale``). Output
    rows are padded to a multiple of 16 (the CPU op needs it), the input to the group size."""

    def __init__(self, q: QuantizedWeight, device: torch.device, kernel: str) -> None:
        self.kernel = kernel
        self.g = q.group_size
        self.n, self.k = int(q.qweight.shape[0]), q.in_features
        self.kp = int(q.scales.shape[1]) * self.g
        np_ = _pad_to(self.n, 16)
        nib = torch.stack([q.qweight & 0x0F, q.qweight >> 4], -1).reshape(self.n, -1)
        nib = F.pad(nib[:, : self.kp].to(torch.int32), (0, 0, 0, np_ - self.n), value=8)
        scales = F.pad(q.scales, (0, 0, 0, np_ - self.n), value=1.0)
        sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1)
        self.sz = sz.to(device=device, dtype=torch.bfloat16).contiguous()
        if kernel == "int4-pack-mm-cpu":
            self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.contiguous(), 8)
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:  # CUDA: uint8 pairs, the even column in the high nibble
            pairs = (nib[:, 0::2] << 4 | nib[:, 1::2]).to(torch.uint8).to(device).contiguous()
            tiles = 8 if self.kp % 128 == 0 else 4 if self.kp % 64 == 0 else 2  # K % (16 tiles)
            self.w = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
            self.mm = torch.ops.aten._weight_int4pack_mm
        self.nbytes = self.w.numel() * self.w.element_size() + 2 * self.sz.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kp != self.k:
            x = F.pad(x, (0, self.kp - self.k))
        y = self.mm(_aligned(x), self.w, self.g, self.sz)
        return y[:, : self.n] if y.shape[1] != self.n else y


class _Int8TritonLinear:
    """``int8-triton``: :func:`models.kernels_triton.w8a16_linear` (CUDA, ``triton``)."""

    kernel = "int8-triton"

    def __init__(self, q: QuantizedWeight, device: torch.device) -> None:
        from models.kernels_triton import w8a16_linear

        self.mm = w8a16_linear
        self.w = q.qweight.to(device).contiguous()
        self.s = q.scales.reshape(-1).to(device=device, dtype=torch.bfloat16).contiguous()
        self.nbytes = self.w.numel() + 2 * self.s.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm(x, self.w, self.s)


_Linear = Union[_DequantLinear, _Int8PackLinear, _Int4PackLinear, _Int8TritonLinear]


def _make_linear(
    kernel: str, q: QuantizedWeight, device: torch.device, dtype: torch.dtype
) -> _Linear:
    """One quantized matrix ready for ``kernel`` on ``device`` (see :data:`KERNELS`)."""
    if kernel in ("int8-linear", "int4-dequant"):
        return _DequantLinear(q, device, dtype)
    if kernel == "int8-pack-mm" and q.bits == 8:
        return _Int8PackLinear(q, device)
    if kernel == "int8-triton" and q.bits == 8:
        return _Int8TritonLinear(q, device)
    if kernel in ("int4-pack-mm-cpu", "int4-tinygemm") and q.bits == 4:
        return _Int4PackLinear(q, device, kernel)
    raise ModelError("kernel", f"kernel {kernel!r} does not run int{q.bits}; see KERNELS")


class QuantizedTorchExpert(_KernelBase):
    """SwiGLU expert with int8 or int4 weight-only quantized matrices.

    The gate and up projections run as one matrix (``w13``, :func:`concat_rows`). ``kernel``
    (see :data:`KERNELS`) says how each matrix is multiplied; by default the fallback
    (``int8-linear`` / ``int4-dequant``: float activations in ``dtype``); :func:`load_expert`
    picks the device's packed kernel (:func:`pick_kernel`), which computes in bf16.
    ``weight_bytes`` counts the tensors the kernel holds.
    """

    def __init__(
        self,
        w1: QuantizedWeight,
        w2: QuantizedWeight,
        w3: QuantizedWeight,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        uid: str | None = None,
        kernel: str | None = None,
    ) -> None:
        self.uid = uid
        self.device = torch.device(device)
        self.bits = w1.bits
        self.kernel = kernel or _FALLBACK.get(self.bits, "")
        if self.kernel not in KERNELS:
            raise ModelError("kernel", f"unknown kernel {kernel!r}; use one of {sorted(KERNELS)}")
        self.dtype = dtype if self.kernel in _FALLBACK.values() else torch.bfloat16
        self.intermediate_size, self.hidden_size = int(w1.scales.shape[0]), int(w1.in_features)
        self.w13 = _make_linear(self.kernel, concat_rows(w1, w3), self.device, self.dtype)
        self.w2 = _make_linear(self.kernel, w2, self.device, self.dtype)

    @classmethod
    def from_float(
        cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, bits: int, **kw: Any
    ) -> QuantizedTorchExpert:
        """Quantize full-precision weights."""
        return cls(
            quantize_weight(w1, bits), quantize_weight(w2, bits), quantize_weight(w3, bits), **kw
        )

    @torch.no_grad()
    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x.to(device=self.device, dtype=self.dtype))
        g, u = h.split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(g) * u).to(device=x.device, dtype=x.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the quantized matrices with their scales, as the kernel holds them."""
        return int(self.w13.nbytes + self.w2.nbytes)


# ---- ONNX ----------------------------------------------------------------------------------


def build_expert_onnx(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, dtype: str = "float32"
) -> bytes:
    """Serialized ONNX model of one SwiGLU expert: input ``x`` [n, H] -> output ``y`` [n, H].

    Built node by node with ``onnx.helper`` (MatMul, Sigmoid, Mul; opset 17), weights as
    initializers, dynamic row count.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    inter, hidden = w1.shape
    w13t = torch.cat([w1, w3], 0).t().contiguous().to(torch.float32).numpy().astype(np_dtype)
    w2t = w2.t().contiguous().to(torch.float32).numpy().astype(np_dtype)
    inits = [
        numpy_helper.from_array(w13t, "w13t"),
        numpy_helper.from_array(w2t, "w2t"),
        numpy_helper.from_array(np.array([inter, inter], dtype=np.int64), "split_sizes"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w13t"], ["h13"]),
        helper.make_node("Split", ["h13", "split_sizes"], ["g", "u"], axis=1),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu_g"]),
        helper.make_node("Mul", ["silu_g", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "w2t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "swiglu_expert",
        [helper.make_tensor_value_info("x", elem, ["n", int(hidden)])],
        [helper.make_tensor_value_info("y", elem, ["n", int(hidden)])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="moe-edge-testbed"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_expert_onnx(
    shard_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str], dtype: str = "float32"
) -> Path:
    """Export the expert in ``shard_path`` to ``onnx_path`` (see :func:`build_expert_onnx`)."""
    t, meta = read_expert_tensors(shard_path)
    if meta.get("quant"):
        raise ModelError(
            str(shard_path), "cannot export a quantized shard to ONNX; use the float shard"
        )
    check_fp_shapes(t, str(shard_path))
    out = Path(onnx_path)
    out.write_bytes(build_expert_onnx(t["w1"], t["w2"], t["w3"], dtype))
    return out


class OnnxExpert(_KernelBase):
    """An expert run by onnxruntime (CPU, or the CUDA provider when installed and asked for)."""

    def __init__(
        self,
        model: bytes | str | os.PathLike[str],
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        uid: str | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(
            src, sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
        inp = self.session.get_inputs()[0]
        self.hidden_size = int(inp.shape[1])
        self._np_dtype = np.float16 if "float16" in inp.type else np.float32
        self.intermediate_size = -1  # not recorded in the graph's signature
        self.uid = uid
        provider = self.session.get_providers()[0]
        #: ``onnx-cpu`` or ``onnx-cuda``: the provider that runs the graph
        self.kernel = "onnx-" + ("cuda" if provider.startswith("CUDA") else "cpu")

    def forward(self, x: Any) -> Any:
        """Run the ONNX session on rows ``x`` ([n, H] numpy array or torch tensor); same kind,
        dtype and device out. Raises :class:`ModelError` for another shape.
        """
        as_numpy = isinstance(x, np.ndarray)
        arr = x if as_numpy else x.detach().cpu().numpy()
        if arr.ndim != 2 or arr.shape[1] != self.hidden_size:
            raise ModelError(
                f"expert {self.uid or ''} input".strip(),
                f"shape {list(arr.shape)} != [n, {self.hidden_size}]",
            )
        y = self.session.run(["y"], {"x": np.ascontiguousarray(arr, dtype=self._np_dtype)})[0]
        if as_numpy:
            return y.astype(arr.dtype, copy=False)
        return torch.from_numpy(y).to(device=x.device, dtype=x.dtype)

    __call__ = forward


# ---- quantized shard files ----------------------------------------------------------------


def quantize_expert_shard(
    shard_path: str | os.PathLike[str], out_path: str | os.PathLike[str], quant: Quant = "int8"
) -> Path:
    """Write a weight-only quantized copy of an expert shard (loadable by :func:`load_expert`)."""
    from safetensors.torch import save_file

    t, meta = read_expert_tensors(shard_path)
    check_fp_shapes(t, str(shard_path))
    bits = {"int8": 8, "int4": 4}.get(quant)
    if bits is None:
        raise ModelError("quant", f"unknown quantization {quant!r}; use int8 or int4")
    out: dict[str, torch.Tensor] = {}
    for name in ("w1", "w2", "w3"):
        q = quantize_weight(t[name], bits)
        out[f"{name}.qweight"] = q.qweight.contiguous()
        out[f"{name}.scales"] = q.scales.contiguous()
        out[f"{name}.in_features"] = torch.tensor([q.in_features], dtype=torch.int64)
    new_meta = dict(meta, quant=quant, group_size=str(INT4_GROUP_SIZE if bits == 4 else 0))
    save_file(out, str(out_path), metadata=new_meta)
    return Path(out_path)


def _load_quantized(
    t: dict[str, torch.Tensor], meta: dict[str, str], where: str
) -> tuple[QuantizedWeight, QuantizedWeight, QuantizedWeight]:
    bits = {"int8": 8, "int4": 4}.get(meta.get("quant", ""))
    if bits is None:
        raise ModelError(
            f"{where}: __metadata__.quant", f"unknown quantization {meta.get('quant')!r}"
        )
    ws = []
    for name in ("w1", "w2", "w3"):
        for part in ("qweight", "scales", "in_features"):
            if f"{name}.{part}" not in t:
                raise ModelError(
                    f"{where}: {name}.{part}", "tensor missing from quantized expert shard"
                )
        in_f = int(t[f"{name}.in_features"][0])
        g = int(meta.get("group_size", "0")) if bits == 4 else in_f
        ws.append(QuantizedWeight(bits, t[f"{name}.qweight"], t[f"{name}.scales"], in_f, g))
    return ws[0], ws[1], ws[2]


def _load_quantized_expert(
    t: dict[str, torch.Tensor],
    meta: dict[str, str],
    p: Path,
    quant: Quant | None,
    device: str,
    dtype: torch.dtype | None,
    kernel: str | None,
    uid: str | None,
) -> QuantizedTorchExpert:
    """:func:`load_expert`'s int8/int4 case: a pre-quantized shard as stored, or a float one
    quantized now; the kernel given, or the device's (:func:`pick_kernel`)."""
    if meta.get("quant"):
        w1, w2, w3 = _load_quantized(t, meta, str(p))
    else:
        check_fp_shapes(t, str(p))
        bits = {"int8": 8, "int4": 4}.get(str(quant))
        if bits is None:
            raise ModelError("quant", f"unknown quantization {quant!r}; use int8 or int4")
        w1, w2, w3 = (quantize_weight(t[n], bits) for n in ("w1", "w2", "w3"))
    if kernel is None:
        kernel = pick_kernel(torch.device(device).type, w1.bits, dtype, available_kernels(device))
    return QuantizedTorchExpert(
        w1, w2, w3, device=device, dtype=dtype or torch.float32, uid=uid, kernel=kernel
    )


def load_expert(
    path: str | os.PathLike[str],
    *,
    runtime: Literal["torch", "onnx"] = "torch",
    quant: Quant | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    uid: str | None = None,
    kernel: str | None = None,
    cuda_graphs: bool = True,
) -> ExpertKernel:
    """Load one expert shard as a kernel (the device-side entry point).

    Parameters
    ----------
    path
        Expert shard (``experts/L{l}.E{e}.safetensors``), float or pre-quantized.
    runtime
        ``"torch"`` or ``"onnx"`` (onnxruntime; the ONNX file is ``onnx_path`` if it exists,
        else built in memory from the shard; written there if ``onnx_path`` is given).
    quant
        ``None``, ``"int8"`` or ``"int4"`` weight-only quantization (torch runtime). A
        pre-quantized shard is used as stored.
    device
        torch device for the torch runtime (``"cuda"`` if available); the onnx runtime uses the
        CUDA provider when ``device`` starts with ``"cuda"``.
    dtype
        Compute dtype (default float32 on CPU, the stored dtype on CUDA; ONNX: float32). For
        int8/int4: unset or bfloat16 lets the packed kernels run (bf16 activations); another
        dtype runs the fallback kernel in it.
    kernel
        int8/int4 only: one of :data:`KERNELS`; default the device's, :func:`pick_kernel`.
    cuda_graphs
        Torch runtime on CUDA: replay calls of a few rows from CUDA graphs
        (:meth:`_KernelBase.use_cuda_graphs`; ``launch`` says which serves). ``False``:
        launch each op.

    Raises
    ------
    ModelError
        Naming the file or tensor at fault.
    """
    p = Path(path)
    t, meta = read_expert_tensors(p)
    uid = uid or meta.get("uid")
    tdtype = torch_dtype(dtype)
    if runtime == "onnx":
        if quant or meta.get("quant"):
            raise ModelError(
                str(p), "ONNX experts are float only; use runtime='torch' for int8/int4"
            )
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        )
        if onnx_path is not None and Path(onnx_path).is_file():
            return OnnxExpert(onnx_path, providers=providers, threads=threads, uid=uid)
        check_fp_shapes(t, str(p))
        onnx_dtype = "float16" if tdtype == torch.float16 else "float32"
        blob = build_expert_onnx(t["w1"], t["w2"], t["w3"], onnx_dtype)
        if onnx_path is not None:
            Path(onnx_path).write_bytes(blob)
        return OnnxExpert(blob, providers=providers, threads=threads, uid=uid)
    if runtime != "torch":
        raise ModelError("runtime", f"unknown expert runtime {runtime!r}; use torch or onnx")
    k: QuantizedTorchExpert | TorchExpert
    if meta.get("quant") or quant is not None:
        k = _load_quantized_expert(t, meta, p, quant, device, tdtype, kernel, uid)
    else:
        check_fp_shapes(t, str(p))
        if tdtype is None and torch.device(device).type == "cpu":
            tdtype = torch.float32
        k = TorchExpert(t["w1"], t["w2"], t["w3"], device=device, dtype=tdtype, uid=uid)
    k.use_cuda_graphs(cuda_graphs)
    if k.graphed is not None:
        k.graphed.capture_all()  # now, not in the first timed call of each row count
    return k


def reference_expert(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Float64 reference ``w2 (silu(w1 x) * w3 x)`` for testing kernels."""
    w1d, w2d, w3d, xd = (a.to(torch.float64) for a in (w1, w2, w3, x))
    return F.linear(F.silu(F.linear(xd, w1d)) * F.linear(xd, w3d), w2d)


def output_error(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Error of ``candidate`` vs ``reference``: ``max_abs`` and ``rel_rms``
    (||d||_2 / ||ref||_2)."""
    ref = reference.to(torch.float64)
    d = candidate.to(torch.float64) - ref
    return {
        "max_abs": float(d.abs().max()),
        "rel_rms": float(d.norm() / ref.norm().clamp(min=1e-300)),
    }
