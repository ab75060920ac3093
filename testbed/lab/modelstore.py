"""Where a model comes from: a split directory, an HF checkpoint (split once into a cache), the
built-in tiny model (``"tiny"``) or the widened tiny model (``"tiny-4096"``: ``tiny-<W>``).

The cache lives in ``$MOE_TESTBED_CACHE`` or ``~/.cache/moe-edge-testbed/splits/<key>``; the key
hashes the checkpoint's file names, sizes and modification times, so an edited checkpoint is
split again and an unchanged one never is. ``tiny-<W>`` is the tiny model's split widened to W
(:mod:`models.widen`, lift seed 0, experts as trained otherwise, float32), built on first use
(under a second for W = 4096: 50 MB) into ``splits/tiny-w<W>-s0-v<version>-<key>``, the key
hashing the tiny split's ``manifest.json`` (which lists every shard's sha256).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import ROOT
from ..errors import ConfigError

TINY = ROOT / "models" / "tiny"


def cache_root() -> Path:
    """The controller's cache folder (``$MOE_TESTBED_CACHE``, else
    ``~/.cache/moe-edge-testbed``); splits go under ``splits/``, wheels under ``wheels/``."""
    env = os.environ.get("MOE_TESTBED_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "moe-edge-testbed"
    return base


def _checkpoint_key(ckpt: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(ckpt.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


#: ``tiny-<W>``: the tiny model widened to W (64 .. 16384); ``tiny-<W>x<I>``: and its experts'
#: intermediate size zero-padded to I (an expert computes as much as an I-wide one)
_WIDE_TINY = re.compile(r"^tiny-([0-9]+)(?:x([0-9]+))?$")
MAX_SHORT_WIDTH = 16384


def is_short_name(spec: str | os.PathLike[str]) -> bool:
    """Whether ``spec`` is a built-in model name (``tiny``, ``tiny-<W>``), not a path."""
    return str(spec) == "tiny" or _WIDE_TINY.match(str(spec)) is not None


def _build_once(out: Path, build: Callable[[Path], object], where: str) -> Path:
    """``build(tmp)`` then rename to ``out`` (a concurrent builder that won is fine)."""
    if (out / "manifest.json").is_file():
        return out
    from models.errors import ModelError

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        build(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "manifest.json").is_file():  # else: a concurrent build won the race
                raise
    except ModelError as e:
        raise ConfigError(f"{where}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _wide_tiny(width: int, inter: int | None, where: str) -> Path:
    name = f"tiny-{width}" + (f"x{inter}" if inter is not None else "")
    if not 64 <= width <= MAX_SHORT_WIDTH:
        raise ConfigError(f"{where}: {name}: width must be 64 .. {MAX_SHORT_WIDTH}")
    if inter is not None and not 1 <= inter <= 4 * MAX_SHORT_WIDTH:
        raise ConfigError(f"{where}: {name}: intermediate size must be 1 .. {4 * MAX_SHORT_WIDTH}")
    from models.widen import WIDEN_VERSION, manifest_sha256, widen_split

    base = resolve_split("tiny", where)
    key = manifest_sha256(base)[:16]
    i = f"-i{inter}" if inter is not None else ""
    out = cache_root() / "splits" / f"tiny-w{width}{i}-s0-v{WIDEN_VERSION}-{key}"
    return _build_once(
        out,
        lambda tmp: widen_split(base, tmp, hidden=width, seed=0, intermediate=inter),
        where,
    )


def resolve_split(spec: str | os.PathLike[str], where: str = "model") -> Path:
    """Return a split directory (one with ``manifest.json``) for ``spec``.

    ``spec`` is ``"tiny"``, ``"tiny-<W>"`` (the tiny model widened to W, built into the cache on
    first use; ``"tiny-<W>x<I>"``: with I-wide experts), a split directory, or a Hugging Face
    MoE checkpoint directory (``config.json`` + ``*.safetensors``), which is split into the
    cache on first use.

    Raises
    ------
    ConfigError
        ``spec`` names no directory, or one that is neither a split nor a checkpoint.
    """
    wide = _WIDE_TINY.match(str(spec))
    if wide is not None:
        inter = wide.group(2)
        return _wide_tiny(int(wide.group(1)), None if inter is None else int(inter), where)
    path = TINY if str(spec) == "tiny" else Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: {spec}: no such model directory")
    if (path / "manifest.json").is_file():
        return path
    if not ((path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        raise ConfigError(
            f"{where}: {path}: neither a split model (manifest.json) nor a "
            "checkpoint (config.json + *.safetensors)"
        )
    out = cache_root() / "splits" / f"{path.name}-{_checkpoint_key(path)}"

    def split(tmp: Path) -> None:
        from models.split import split_checkpoint

        split_checkpoint(path, tmp)

    return _build_once(out, split, where)
