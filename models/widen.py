"""Widen a split model: the same trained model, its experts re-expressed in a wider basis.

:func:`widen_split` takes a split directory (hidden size H) and writes one whose routed experts
are W-wide SwiGLU experts (W >= H, e.g. 4096, Mixtral-8x7B's width) computing exactly the trained
experts in a rotated, embedded basis. With an orthonormal lift Q [W, H] (QᵀQ = I, a seeded
random matrix orthonormalised by a float64 QR):

* expert e's weights become ``w1' = w1 Qᵀ`` [I, W], ``w3' = w3 Qᵀ`` [I, W], ``w2' = Q w2`` [W, I];
* the BS sends ``Q x`` (rows: ``x Qᵀ``) and maps the reply back with ``Qᵀ`` (rows: ``y Q``):
  ``Qᵀ w2' f(w1' Q x, w3' Q x) = w2 f(w1 x, w3 x)`` because ``QᵀQ = I``.

Routing, gate weights and outputs stay the trained model's (up to float rounding), while the
experts' matrices and the bytes on the wire are those of a W-wide model. ``intermediate`` larger
than the trained one zero-pads the experts (silu(0)·0 = 0: no effect on the output).

The BS part is copied unchanged; Q goes to ``bs/lift.safetensors`` (tensor ``lift``), named by
the manifest's ``lift`` entry (:mod:`models.manifest`), which the BS runtime
(:class:`models.runtime.BaseStationModel`) reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from models.errors import ModelError
from models.manifest import (
    EXPERT_SHARD_FORMAT,
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    write_manifest,
)
from models.safetensors_io import sha256_file

LIFT_PATH = "bs/lift.safetensors"
LIFT_TENSOR = "lift"
#: bumped when the widened format or the construction of Q changes (part of cache keys)
WIDEN_VERSION = 1
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def lift_matrix(hidden: int, model_hidden: int, seed: int = 0) -> Any:
    """The orthonormal lift Q [hidden, model_hidden] (float64, QᵀQ = I), a function of the seed.

    A Gaussian matrix from ``torch.Generator().manual_seed(seed)`` orthonormalised by a reduced
    QR, column signs fixed so that R's diagonal is positive (the QR is then unique).
    """
    import torch

    if model_hidden < 1 or hidden < model_hidden:
        raise ModelError("--hidden", f"{hidden} must be >= the model's hidden size {model_hidden}")
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(hidden, model_hidden, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a, mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).contiguous()


def manifest_sha256(split_dir: str | os.PathLike[str]) -> str:
    """sha256 of a split's ``manifest.json`` (it lists every shard's sha256)."""
    return hashlib.sha256((Path(split_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def widen_split(
    split_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hidden: int = 4096,
    seed: int = 0,
    intermediate: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write the widened copy of ``split_dir`` to ``out_dir`` (see the module docstring).

    Parameters
    ----------
    split_dir
        A split directory (``testbed model split``), not itself widened.
    out_dir
        Created if needed; must be empty or hold a previous split (overwritten).
    hidden
        The experts' width W (>= the model's hidden size).
    seed
        Seed of the lift Q.
    intermediate
        Experts' intermediate size (>= the trained one; zero-padded); default: as trained.
    dtype
        Stored dtype of the widened experts: ``float32``, ``bfloat16`` or ``float16`` (default:
        the source experts' dtype). Q is always stored in float32.

    Returns
    -------
    dict
        The manifest written (last, atomically) to ``out_dir/manifest.json``.

    Raises
    ------
    ModelError
        A widened or quantized source, a bad width/intermediate/dtype, or an unwritable output.
    """
    src = load_manifest(split_dir)
    if src.lift is not None:
        raise ModelError(str(src.root / MANIFEST_NAME), "already widened; widen the original split")
    I0 = int(src.dims["expert_intermediate_size"])
    I1 = I0 if intermediate is None else int(intermediate)
    if I1 < I0:
        raise ModelError("--intermediate", f"{I1} < the trained intermediate size {I0}")
    if dtype is not None and dtype not in _ST_DTYPES:
        raise ModelError("--dtype", f"unknown dtype {dtype!r}; use one of {sorted(_ST_DTYPES)}")
    q = lift_matrix(hidden, src.hidden_size, seed)  # float64 [W, H]
    out = Path(out_dir)
    _prepare_out_dir(out, src.root)
    _write_bs_part(src, out, q, seed)
    experts: dict[str, Any] = {}
    largest = 0
    for uid in src.uids():
        experts[uid], size = _widen_expert(src, uid, out, q, I1, dtype, seed)
        largest = max(largest, size)
    manifest = _widened_manifest(src, out, experts, largest, hidden=int(hidden), seed=seed, I1=I1)
    write_manifest(out, manifest)
    return manifest


def _prepare_out_dir(out: Path, src_root: Path) -> None:
    """Make ``out/bs`` and ``out/experts``: ``out`` empty or a previous split (its manifest
    removed first, so that a half-written widening never looks complete), not the source."""
    if out.exists():
        if not out.is_dir():
            raise ModelError(str(out), "exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise ModelError(
                str(out), "not empty and not a previous split (no manifest.json); refusing to write"
            )
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    if out.resolve() == src_root.resolve():
        raise ModelError(str(out), "is the source split")
    (out / "bs").mkdir(parents=True, exist_ok=True)
    (out / "experts").mkdir(parents=True, exist_ok=True)


def _write_bs_part(src: Manifest, out: Path, q: Any, seed: int) -> None:
    """The BS part copied unchanged (model, config, tokenizer files), and the lift Q (float32)."""
    import torch
    from safetensors.torch import save_file

    for p in sorted(src.bs_path.parent.iterdir()):
        if p.is_file() and p.name != Path(LIFT_PATH).name:
            shutil.copyfile(p, out / "bs" / p.name)
    save_file(
        {LIFT_TENSOR: q.to(torch.float32).contiguous()},
        str(out / LIFT_PATH),
        metadata={"format": "moe-edge-lift/1", "seed": str(seed)},
    )


def _widen_expert(
    src: Manifest, uid: str, out: Path, q: Any, I1: int, dtype: str | None, seed: int
) -> tuple[dict[str, Any], int]:
    """Write expert ``uid`` widened by Q (zero-padded to ``I1``): its manifest entry and the
    byte size of its largest tensor."""
    import torch
    from safetensors.torch import save_file

    from models.kernels import check_fp_shapes, read_expert_tensors

    I0 = int(src.dims["expert_intermediate_size"])
    path = src.expert_path(uid)
    t, meta = read_expert_tensors(path)
    if meta.get("quant"):
        raise ModelError(str(path), "quantized shard: widen the float split")
    check_fp_shapes(t, str(path))
    st_dtype = dtype or {v: k for k, v in _ST_DTYPES.items()}.get(src.experts[uid].dtype)
    if st_dtype is None:
        raise ModelError(str(path), f"expert dtype {src.experts[uid].dtype}: pass --dtype")
    tdtype = getattr(torch, st_dtype)
    w1, w2, w3 = (t[k].to(torch.float64) for k in ("w1", "w2", "w3"))
    w1w, w3w, w2w = w1 @ q.T, w3 @ q.T, q @ w2  # [I, W], [I, W], [W, I]
    if I1 > I0:
        w1w = torch.nn.functional.pad(w1w, (0, 0, 0, I1 - I0))
        w3w = torch.nn.functional.pad(w3w, (0, 0, 0, I1 - I0))
        w2w = torch.nn.functional.pad(w2w, (0, I1 - I0))
    tensors = {
        "w1": w1w.to(tdtype).contiguous(),
        "w2": w2w.to(tdtype).contiguous(),
        "w3": w3w.to(tdtype).contiguous(),
    }
    rel = f"experts/{uid}.safetensors"
    save_file(
        tensors,
        str(out / rel),
        metadata={
            "format": EXPERT_SHARD_FORMAT,
            "uid": uid,
            "family": src.family,
            "activation": "silu",
            "widened_from": str(src.hidden_size),
            "lift_seed": str(seed),
        },
    )
    entry = {
        "path": rel,
        "layer": src.experts[uid].layer,
        "expert": src.experts[uid].expert,
        "bytes": (out / rel).stat().st_size,
        "sha256": sha256_file(out / rel),
        "dtype": _ST_DTYPES[st_dtype],
        "shapes": {k: list(v.shape) for k, v in sorted(tensors.items())},
    }
    return entry, max(x.numel() * x.element_size() for x in tensors.values())


def _widened_manifest(
    src: Manifest,
    out: Path,
    experts: dict[str, Any],
    largest: int,
    *,
    hidden: int,
    seed: int,
    I1: int,
) -> dict[str, Any]:
    """The source's manifest with the widened dims, experts, BS file and ``lift`` entry."""
    H = src.hidden_size
    raw = json.loads((src.root / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest = dict(raw)
    manifest["dims"] = {**raw["dims"], "hidden_size": hidden, "expert_intermediate_size": I1}
    manifest["dtype"] = ",".join(sorted({e["dtype"] for e in experts.values()}))
    manifest["experts"] = experts
    manifest["largest_tensor_bytes"] = max(int(raw.get("largest_tensor_bytes", 0)), largest)
    bs_file = out / src.bs.path
    manifest["bs"] = {**raw["bs"], "bytes": bs_file.stat().st_size, "sha256": sha256_file(bs_file)}
    lift_file = out / LIFT_PATH
    manifest["lift"] = {
        "path": LIFT_PATH,
        "bytes": lift_file.stat().st_size,
        "sha256": sha256_file(lift_file),
        "dtype": "F32",
        "tensor": LIFT_TENSOR,
        "shapes": {LIFT_TENSOR: [hidden, H]},
        "model_hidden_size": H,
        "hidden_size": hidden,
        "seed": int(seed),
        "intermediate_size": I1,
        "trained_intermediate_size": int(src.dims["expert_intermediate_size"]),
        "version": WIDEN_VERSION,
        "source": {"dir": str(src.root.resolve()), "manifest_sha256": manifest_sha256(src.root)},
    }
    return manifest
