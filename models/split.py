"""Split an HF-format MoE checkpoint into a base-station part and one shard per routed expert.

:func:`split_checkpoint` reads ``config.json`` plus one or many ``*.safetensors`` files (with or
without ``model.safetensors.index.json``) and writes the split directory described in
:mod:`models.manifest`. It streams: tensors are copied byte-for-byte in 16 MiB chunks with plain
file reads (no mmap, no torch), so peak memory is a few chunks plus the headers, independent of
the checkpoint's size (a 90 GB Mixtral splits on a small machine). Dtypes are kept as stored.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ModelError
from models.families import NEUTRAL_PROJS, FamilyAdapter, family_for_config
from models.manifest import EXPERT_SHARD_FORMAT, MANIFEST_FORMAT, MANIFEST_NAME, write_manifest
from models.safetensors_io import (
    DTYPE_BYTES,
    OutTensor,
    TensorInfo,
    WrittenFile,
    read_header,
    write_safetensors,
)
from models.uids import format_uid

INDEX_NAME = "model.safetensors.index.json"
BS_DIR = "bs"
EXPERTS_DIR = "experts"
_COPY_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja")


@dataclass(frozen=True)
class ExpertSource:
    """Where the three projections of one expert live in the checkpoint."""

    layer: int
    expert: int
    parts: Mapping[str, OutTensor]  # neutral proj -> tensor slice to copy


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """Load ``checkpoint_dir/config.json`` (raises :class:`ModelError` naming the file)."""
    p = checkpoint_dir / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(str(p), "missing: not an HF checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise ModelError(str(p), f"invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelError(str(p), "not a JSON object")
    return cfg


def checkpoint_tensors(checkpoint_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint (headers only), checked against the index if there is one."""
    index_path = checkpoint_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(str(index_path), f"malformed index (weight_map): {e}") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (checkpoint_dir / f).is_file():
                n = sum(1 for v in weight_map.values() if v == f)
                raise ModelError(
                    str(checkpoint_dir / f),
                    f"missing shard (listed in {INDEX_NAME} for {n} tensors)",
                )
    else:
        weight_map = None
        files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
        if not files:
            has_bin = any(checkpoint_dir.glob("*.bin"))
            raise ModelError(
                str(checkpoint_dir),
                "no *.safetensors files"
                + (
                    " (only PyTorch .bin files: convert them to safetensors first)"
                    if has_bin
                    else ""
                ),
            )
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = read_header(checkpoint_dir / f)
        for name, info in infos.items():
            if name in tensors:
                raise ModelError(name, f"tensor in both {tensors[name].path.name} and {f}")
            tensors[name] = info
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors:
                raise ModelError(name, f"listed in {INDEX_NAME} (file {f}) but not in that file")
            if tensors[name].path.name != f:
                raise ModelError(
                    name, f"{INDEX_NAME} says {f} but it is in {tensors[name].path.name}"
                )
    return tensors


def _check_shape(info: TensorInfo, want: tuple[int, ...], what: str) -> None:
    if info.shape != want:
        raise ModelError(
            f"{info.name} ({info.path.name})",
            f"shape {list(info.shape)} != expected {list(want)} ({what})",
        )


def plan_experts(
    fam: FamilyAdapter,
    dims: Mapping[str, int],
    moe_layers: list[int],
    tensors: Mapping[str, TensorInfo],
) -> tuple[dict[str, ExpertSource], set[str]]:
    """Locate every routed expert's projections; return (uid -> source, checkpoint keys used).

    Raises
    ------
    ModelError
        No expert tensors at all, a missing or unexpected expert tensor, a wrong shape or dtype.
    """
    H, I, E = dims["hidden_size"], dims["expert_intermediate_size"], dims["num_experts"]
    per_key, fused, used = _find_expert_tensors(fam, E, moe_layers, tensors)
    out: dict[str, ExpertSource] = {}
    for layer in moe_layers:
        gu, dn = fused.get((layer, "gate_up_proj")), fused.get((layer, "down_proj"))
        for e in range(E):
            uid = format_uid(layer, e)
            if gu is not None or dn is not None:
                parts = _fused_parts(layer, e, gu, dn, H, I, E)
            else:
                parts = _per_key_parts(fam, per_key, layer, e, H, I)
            dtypes = {p.dtype for p in parts.values()}
            if len(dtypes) != 1:
                raise ModelError(
                    fam.expert_key(layer, e, "w1"), f"expert {uid} mixes dtypes {sorted(dtypes)}"
                )
            out[uid] = ExpertSource(layer, e, parts)
    return out, used


def _find_expert_tensors(
    fam: FamilyAdapter, E: int, moe_layers: list[int], tensors: Mapping[str, TensorInfo]
) -> tuple[dict[tuple[int, int, str], TensorInfo], dict[tuple[int, str], TensorInfo], set[str]]:
    """The checkpoint's expert tensors: per expert and projection ((layer, e, proj) -> info),
    fused per layer ((layer, "gate_up_proj" | "down_proj") -> info), and their keys."""
    moe = set(moe_layers)
    per_key: dict[tuple[int, int, str], TensorInfo] = {}
    fused: dict[tuple[int, str], TensorInfo] = {}
    used: set[str] = set()
    for name, info in tensors.items():
        m = fam.match_expert_key(name)
        if m is not None:
            layer, e, proj = m
            if layer not in moe or e >= E:
                raise ModelError(
                    f"{name} ({info.path.name})",
                    f"unexpected expert tensor: config has {E} experts in MoE layers {moe_layers}",
                )
            per_key[(layer, e, proj)] = info
            used.add(name)
            continue
        f = fam.match_fused_key(name)
        if f is not None:
            if f[0] not in moe:
                raise ModelError(
                    f"{name} ({info.path.name})", f"fused expert tensor in non-MoE layer {f[0]}"
                )
            fused[f] = info
            used.add(name)
    if not per_key and not fused:
        raise ModelError(
            f"config.json: model_type={fam.name}",
            "no routed-expert tensors found (expected keys like "
            f"{fam.expert_key(moe_layers[0] if moe_layers else 0, 0, 'w1')}); "
            "dense checkpoint or wrong family?",
        )
    return per_key, fused, used


def _fused_parts(
    layer: int,
    e: int,
    gu: TensorInfo | None,
    dn: TensorInfo | None,
    H: int,
    I: int,
    E: int,
) -> dict[str, OutTensor]:
    """Expert ``e``'s w1/w3/w2 as slices of its layer's fused ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I]."""
    if gu is None or dn is None:
        missing = "gate_up_proj" if gu is None else "down_proj"
        raise ModelError(f"model.layers.{layer}.mlp.experts.{missing}", "missing from checkpoint")
    _check_shape(gu, (E, 2 * I, H), "experts, 2*intermediate, hidden")
    _check_shape(dn, (E, H, I), "experts, hidden, intermediate")
    esz = DTYPE_BYTES[gu.dtype]
    return {
        "w1": OutTensor("w1", gu.dtype, (I, H), gu, offset=(e * 2 * I * H) * esz),
        "w3": OutTensor("w3", gu.dtype, (I, H), gu, offset=(e * 2 * I * H + I * H) * esz),
        "w2": OutTensor("w2", dn.dtype, (H, I), dn, offset=(e * H * I) * DTYPE_BYTES[dn.dtype]),
    }


def _per_key_parts(
    fam: FamilyAdapter,
    per_key: Mapping[tuple[int, int, str], TensorInfo],
    layer: int,
    e: int,
    H: int,
    I: int,
) -> dict[str, OutTensor]:
    """Expert ``e``'s w1/w2/w3 from their own checkpoint tensors."""
    parts: dict[str, OutTensor] = {}
    for proj in NEUTRAL_PROJS:
        info = per_key.get((layer, e, proj))
        if info is None:
            raise ModelError(
                fam.expert_key(layer, e, proj),
                f"missing from checkpoint (expert {format_uid(layer, e)})",
            )
        want = (H, I) if proj == "w2" else (I, H)
        _check_shape(
            info,
            want,
            "hidden, intermediate" if proj == "w2" else "intermediate, hidden",
        )
        parts[proj] = OutTensor(proj, info.dtype, want, info)
    return parts


def _check_bs_tensors(
    fam: FamilyAdapter, dims: Mapping[str, int], moe_layers: list[int], bs: Mapping[str, TensorInfo]
) -> None:
    H, E, V = dims["hidden_size"], dims["num_experts"], dims["vocab_size"]
    for layer in moe_layers:
        key = fam.router_key(layer)
        alt = f"model.layers.{layer}.mlp.gate.weight"  # transformers>=5 in-memory naming
        if key not in bs and alt not in bs:
            raise ModelError(key, "router weight missing from checkpoint")
        _check_shape(bs[key] if key in bs else bs[alt], (E, H), "num_experts, hidden")
    emb = bs.get("model.embed_tokens.weight")
    if emb is None:
        raise ModelError("model.embed_tokens.weight", "missing from checkpoint")
    _check_shape(emb, (V, H), "vocab_size, hidden")
    if "lm_head.weight" in bs:
        _check_shape(bs["lm_head.weight"], (V, H), "vocab_size, hidden")


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ModelError(str(out_dir), "exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise ModelError(
                str(out_dir),
                "not empty and not a previous split (no manifest.json); refusing to write",
            )
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (out_dir / BS_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)


def split_checkpoint(
    checkpoint_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Split ``checkpoint_dir`` into ``out_dir`` (BS part + one shard per expert + manifest).

    Parameters
    ----------
    checkpoint_dir
        HF-format checkpoint: ``config.json`` and ``*.safetensors`` (optionally sharded with
        ``model.safetensors.index.json``). Tokenizer/generation JSON files are copied to
        ``out_dir/bs/``.
    out_dir
        Created if needed; must be empty or hold a previous split (which is overwritten).

    Returns
    -------
    dict
        The manifest written to ``out_dir/manifest.json`` (last, atomically).

    Raises
    ------
    ModelError
        For a dense or unknown-family checkpoint, a missing shard/tensor, mismatched shapes etc.;
        nothing is reported as success unless every shard was written.
    """
    src = Path(checkpoint_dir)
    if not src.is_dir():
        raise ModelError(str(src), "not a directory")
    out = Path(out_dir)
    config = read_config(src)
    fam = family_for_config(config, where=str(src / "config.json"))
    dims = fam.dims(config)
    moe_layers = fam.moe_layers(config)
    tensors = checkpoint_tensors(src)
    experts, used = plan_experts(fam, dims, moe_layers, tensors)
    bs = {k: v for k, v in tensors.items() if k not in used}
    _check_bs_tensors(fam, dims, moe_layers, bs)
    _prepare_out_dir(out)

    bs_file, extra = _write_bs_part(src, out, bs, fam.name)
    expert_entries = _write_experts(out, experts, fam.name)
    expert_dtypes = sorted({e["dtype"] for e in expert_entries.values()})
    bs_dtypes = sorted({t.dtype for t in bs.values()})
    largest = max(
        max(t.nbytes for t in tensors.values()),
        max(p.nbytes for es in experts.values() for p in es.parts.values()),
    )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "family": fam.name,
        "model_type": config.get("model_type"),
        "dtype": expert_dtypes[0] if len(expert_dtypes) == 1 else ",".join(expert_dtypes),
        "dims": dims,
        "top_k": dims["top_k"],
        "norm_topk_prob": fam.norm_topk_prob(config),
        "shared_expert": fam.has_shared_expert
        and dims.get("shared_expert_intermediate_size", 0) > 0,
        "activation": "silu",
        "moe_layers": moe_layers,
        "experts_per_layer": {str(layer): dims["num_experts"] for layer in moe_layers},
        "bs": {
            "path": f"{BS_DIR}/model.safetensors",
            "bytes": bs_file.nbytes,
            "sha256": bs_file.sha256,
            "dtype": bs_dtypes[0] if len(bs_dtypes) == 1 else ",".join(bs_dtypes),
            "num_tensors": len(bs),
            "config": f"{BS_DIR}/config.json",
            "extra_files": extra,
        },
        "experts": expert_entries,
        "largest_tensor_bytes": largest,
        "source": {
            "dir": str(src.resolve()),
            "files": sorted({t.path.name for t in tensors.values()}),
            "bytes": sum(t.nbytes for t in tensors.values()),
        },
    }
    write_manifest(out, manifest)
    return manifest


def _write_bs_part(
    src: Path, out: Path, bs: Mapping[str, TensorInfo], family: str
) -> tuple[WrittenFile, list[str]]:
    """Write the BS tensors to ``bs/model.safetensors`` and copy the tokenizer/config files
    beside them: (what :func:`write_safetensors` returned, the names of the files copied)."""
    bs_file = write_safetensors(
        out / BS_DIR / "model.safetensors",
        [OutTensor(k, v.dtype, v.shape, v) for k, v in bs.items()],
        metadata={"format": "pt", "family": family},
    )
    extra: list[str] = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in _COPY_SUFFIXES and p.name != INDEX_NAME:
            shutil.copyfile(p, out / BS_DIR / p.name)
            extra.append(p.name)
    return bs_file, extra


def _write_experts(
    out: Path, experts: Mapping[str, ExpertSource], family: str
) -> dict[str, dict[str, Any]]:
    """Write one shard per expert: uid -> its manifest entry."""
    entries: dict[str, dict[str, Any]] = {}
    for uid, es in experts.items():
        rel = f"{EXPERTS_DIR}/{uid}.safetensors"
        w = write_safetensors(
            out / rel,
            list(es.parts.values()),
            metadata={
                "format": EXPERT_SHARD_FORMAT,
                "uid": uid,
                "family": family,
                "activation": "silu",
            },
        )
        entries[uid] = {
            "path": rel,
            "layer": es.layer,
            "expert": es.expert,
            "bytes": w.nbytes,
            "sha256": w.sha256,
            "dtype": next(iter(es.parts.values())).dtype,
            "shapes": {p: list(t.shape) for p, t in sorted(es.parts.items())},
        }
    return entries
