"""The split directory's ``manifest.json``: the contract between the splitter, the BS runtime,
the device agents and provisioning.

Layout of a split directory::

    OUT_DIR/
      manifest.json
      bs/model.safetensors        everything except the routed experts (checkpoint key names)
      bs/config.json              the checkpoint's config.json (+ tokenizer / generation files)
      experts/L{l}.E{e}.safetensors   one routed expert: tensors w1 [I,H], w2 [H,I], w3 [I,H]

``manifest.json`` (``format`` = :data:`MANIFEST_FORMAT`)::

    {
      "format": "moe-edge-split/1",
      "family": "mixtral", "model_type": "mixtral",
      "dtype": "BF16",                 # safetensors dtype of the expert weights
      "dims": {"hidden_size", "num_layers", "num_experts", "expert_intermediate_size",
               "top_k", "vocab_size", ["shared_expert_intermediate_size"]},
      "top_k": 2,
      "norm_topk_prob": true,          # default routing renormalises the top-k probabilities
      "moe_layers": [0, 1, ...],
      "experts_per_layer": {"0": 8, ...},
      "activation": "silu",
      "bs": {"path": "bs/model.safetensors", "bytes", "sha256", "dtype", "num_tensors",
             "config": "bs/config.json", "extra_files": [...]},
      "experts": {"L0.E0": {"path": "experts/L0.E0.safetensors", "layer": 0, "expert": 0,
                             "bytes", "sha256", "dtype",
                             "shapes": {"w1": [I, H], "w2": [H, I], "w3": [I, H]}}, ...},
      "largest_tensor_bytes": int, "source": {"dir": str, "files": [...], "bytes": int},
      "lift": {...}                    # only in a widened split (models.widen), see below
    }

A widened split (``testbed model widen``) re-expresses a trained model's experts in a wider
basis: ``dims.hidden_size`` is the experts' (and the wire's) width W, the BS model keeps its own
width H, and ``lift`` names the orthonormal matrix Q [W, H] (QᵀQ = I) the BS applies at the MoE
boundary (rows x -> x Qᵀ before dispatch, y -> y Q after)::

      "lift": {"path": "bs/lift.safetensors", "bytes", "sha256", "dtype": "F32",
               "tensor": "lift", "model_hidden_size": H, "hidden_size": W, "seed": int,
               "intermediate_size": I, "source": {"dir": str, "manifest_sha256": str}}

``bytes``/``sha256`` are of the whole file, so provisioning can skip unchanged shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ModelError
from models.safetensors_io import sha256_file
from models.uids import format_uid, is_uid, parse_uid

MANIFEST_FORMAT = "moe-edge-split/1"
MANIFEST_NAME = "manifest.json"
EXPERT_SHARD_FORMAT = "moe-edge-expert/1"


@dataclass(frozen=True)
class ShardEntry:
    """One file of the split: relative ``path``, size, sha256, dtype and tensor shapes."""

    path: str
    bytes: int
    sha256: str
    dtype: str
    shapes: Mapping[str, tuple[int, ...]]
    layer: int | None = None
    expert: int | None = None


@dataclass(frozen=True)
class Manifest:
    """Parsed ``manifest.json`` of a split directory (see the module docstring)."""

    root: Path
    family: str
    model_type: str
    dtype: str
    dims: Mapping[str, int]
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]
    experts_per_layer: Mapping[int, int]
    bs: ShardEntry
    bs_config: str
    experts: Mapping[str, ShardEntry]
    raw: Mapping[str, Any]
    lift: ShardEntry | None = None
    lift_info: Mapping[str, Any] | None = None

    @property
    def hidden_size(self) -> int:
        """Width of the experts' input/output rows (what travels on the wire)."""
        return int(self.dims["hidden_size"])

    @property
    def model_hidden_size(self) -> int:
        """Width of the BS model's hidden states (differs from :attr:`hidden_size` only in a
        widened split)."""
        if self.lift_info is not None:
            return int(self.lift_info["model_hidden_size"])
        return self.hidden_size

    @property
    def lift_path(self) -> Path | None:
        """Absolute path of the lift matrix file of a widened split (``None`` otherwise)."""
        return None if self.lift is None else self.root / self.lift.path

    @property
    def num_experts(self) -> int:
        """E, the experts per MoE layer (``dims["num_experts"]``)."""
        return int(self.dims["num_experts"])

    def uids(self, layer: int | None = None) -> list[str]:
        """All expert uids (of one layer if given), in (layer, expert) order."""
        out = [u for u in self.experts if layer is None or parse_uid(u).layer == layer]
        return sorted(out, key=lambda u: tuple(parse_uid(u)))

    def expert_path(self, uid: str) -> Path:
        """Absolute path of the shard of ``uid``."""
        if uid not in self.experts:
            raise ModelError(str(self.root / MANIFEST_NAME), f"no expert {uid!r} in the manifest")
        return self.root / self.experts[uid].path

    @property
    def bs_path(self) -> Path:
        """Absolute path of the BS part's safetensors file."""
        return self.root / self.bs.path

    @property
    def bs_config_path(self) -> Path:
        """Absolute path of the BS part's model config (the HF ``config.json``)."""
        return self.root / self.bs_config


def _req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ModelError(where, f"missing key {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise ModelError(f"{where}: {key}", f"expected {typ}, got {type(v).__name__}")
    return v


def _entry(d: Mapping[str, Any], where: str) -> ShardEntry:
    shapes = d.get("shapes", {})
    return ShardEntry(
        path=_req(d, "path", str, where),
        bytes=_req(d, "bytes", int, where),
        sha256=_req(d, "sha256", str, where),
        dtype=_req(d, "dtype", str, where),
        shapes={str(k): tuple(int(x) for x in v) for k, v in shapes.items()},
        layer=d.get("layer"),
        expert=d.get("expert"),
    )


def load_manifest(split_dir: str | os.PathLike[str], *, check_files: bool = True) -> Manifest:
    """Read and validate ``split_dir/manifest.json``.

    Parameters
    ----------
    split_dir
        A directory written by :func:`models.split.split_checkpoint`.
    check_files
        Also check that every listed file exists and has the listed size (not the sha256; see
        :func:`verify_split`).

    Raises
    ------
    ModelError
        Naming the manifest, the key or the shard file at fault.
    """
    root = Path(split_dir)
    where = str(root / MANIFEST_NAME)
    raw = _read_raw(root / MANIFEST_NAME)
    experts = _parse_experts(raw, where)
    bs_raw = _req(raw, "bs", dict, where)
    lift_raw = raw.get("lift")
    lift = None if lift_raw is None else _parse_lift(lift_raw, raw, where)
    m = Manifest(
        root=root,
        family=_req(raw, "family", str, where),
        model_type=_req(raw, "model_type", str, where),
        dtype=_req(raw, "dtype", str, where),
        dims={k: int(v) for k, v in _req(raw, "dims", dict, where).items()},
        top_k=_req(raw, "top_k", int, where),
        norm_topk_prob=bool(_req(raw, "norm_topk_prob", bool, where)),
        moe_layers=tuple(int(x) for x in _req(raw, "moe_layers", list, where)),
        experts_per_layer={
            int(k): int(v) for k, v in _req(raw, "experts_per_layer", dict, where).items()
        },
        bs=_entry(bs_raw, f"{where}: bs"),
        bs_config=_req(bs_raw, "config", str, f"{where}: bs"),
        experts=experts,
        raw=raw,
        lift=lift,
        lift_info=lift_raw,
    )
    _check_complete(m, where)
    if check_files:
        _check_files(m)
    return m


def _read_raw(mpath: Path) -> dict[str, Any]:
    """The manifest's JSON object, of our format."""
    where = str(mpath)
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            where, "missing: not a split directory (run `testbed model split` first)"
        ) from None
    except json.JSONDecodeError as e:
        raise ModelError(where, f"invalid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ModelError(
            f"{where}: format",
            f"expected {MANIFEST_FORMAT!r}, "
            f"got {raw.get('format') if isinstance(raw, dict) else raw!r}",
        )
    return raw


def _parse_experts(raw: Mapping[str, Any], where: str) -> dict[str, ShardEntry]:
    """uid -> shard entry of the manifest's ``experts``."""
    experts: dict[str, ShardEntry] = {}
    for uid, d in _req(raw, "experts", dict, where).items():
        if not is_uid(uid):
            raise ModelError(f"{where}: experts", f"bad expert uid {uid!r}")
        experts[uid] = _entry(d, f"{where}: experts.{uid}")
    return experts


def _parse_lift(lift_raw: Any, raw: Mapping[str, Any], where: str) -> ShardEntry:
    """The ``lift`` entry of a widened split, its widths checked against ``dims``."""
    if not isinstance(lift_raw, dict):
        raise ModelError(f"{where}: lift", "expected an object")
    lift = _entry(lift_raw, f"{where}: lift")
    for k in ("model_hidden_size", "hidden_size"):
        _req(lift_raw, k, int, f"{where}: lift")
    if int(lift_raw["hidden_size"]) != int(raw.get("dims", {}).get("hidden_size", -1)):
        raise ModelError(
            f"{where}: lift.hidden_size", f"{lift_raw['hidden_size']} != dims.hidden_size"
        )
    return lift


def _check_complete(m: Manifest, where: str) -> None:
    """Every expert of every MoE layer has an entry."""
    for layer in m.moe_layers:
        for e in range(m.experts_per_layer.get(layer, 0)):
            if format_uid(layer, e) not in m.experts:
                raise ModelError(
                    f"{where}: experts", f"missing entry for expert {format_uid(layer, e)}"
                )


def _check_files(m: Manifest) -> None:
    """Every listed file exists with the listed size, and the BS config exists."""
    entries = [m.bs, *m.experts.values(), *([m.lift] if m.lift is not None else [])]
    for entry in entries:
        p = m.root / entry.path
        if not p.is_file():
            raise ModelError(str(p), "missing shard file listed in manifest.json")
        size = p.stat().st_size
        if size != entry.bytes:
            raise ModelError(str(p), f"size {size} bytes != {entry.bytes} in manifest.json")
    if not (m.root / m.bs_config).is_file():
        raise ModelError(str(m.root / m.bs_config), "missing (listed in manifest.json)")


def write_manifest(split_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write ``split_dir/manifest.json`` atomically (a split is complete once it is there)."""
    out = Path(split_dir)
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)


def verify_split(split_dir: str | os.PathLike[str]) -> Manifest:
    """:func:`load_manifest` plus a sha256 check of every shard (reads every byte)."""
    m = load_manifest(split_dir)
    for entry in [m.bs, *m.experts.values(), *([m.lift] if m.lift is not None else [])]:
        p = m.root / entry.path
        if sha256_file(p) != entry.sha256:
            raise ModelError(str(p), "sha256 differs from manifest.json (corrupt or stale shard)")
    return m
