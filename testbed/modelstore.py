"""Where a model comes from: a split directory, an HF checkpoint (split once into a cache), or
the built-in tiny model (``"tiny"``).

The cache lives in ``$MOE_TESTBED_CACHE`` or ``~/.cache/moe-edge-testbed/splits/<key>``; the key
hashes the checkpoint's file names, sizes and modification times, so an edited checkpoint is
split again and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"


def cache_root() -> Path:
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


def resolve_split(spec: str | os.PathLike[str], where: str = "model") -> Path:
    """Return a split directory (one with ``manifest.json``) for ``spec``.

    ``spec`` is ``"tiny"``, a split directory, or a Hugging Face MoE checkpoint directory
    (``config.json`` + ``*.safetensors``), which is split into the cache on first use.

    Raises
    ------
    ConfigError
        ``spec`` names no directory, or one that is neither a split nor a checkpoint.
    """
    path = TINY if str(spec) == "tiny" else Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: {spec}: no such model directory")
    if (path / "manifest.json").is_file():
        return path
    if not ((path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        raise ConfigError(f"{where}: {path}: neither a split model (manifest.json) nor a "
                          "checkpoint (config.json + *.safetensors)")
    out = cache_root() / "splits" / f"{path.name}-{_checkpoint_key(path)}"
    if (out / "manifest.json").is_file():
        return out
    from models.errors import ModelError
    from models.split import split_checkpoint

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        split_checkpoint(path, tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "manifest.json").is_file():  # else: a concurrent split won the race
                raise
    except ModelError as e:
        raise ConfigError(f"{where}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
