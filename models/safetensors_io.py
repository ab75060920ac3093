"""Streaming safetensors reading and writing, in plain Python (no torch, no mmap).

:mod:`models.split` copies tensors byte-for-byte from checkpoint files into the split's files in
fixed-size chunks through ``read``/``write``, so the splitter's resident memory stays a few
chunks however large the checkpoint (a memory-mapped reader would count every touched page of
the checkpoint in the process' RSS). The files written are ordinary safetensors files:
8-byte little-endian header length, JSON header padded with spaces to 8 bytes, then the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelError

DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
"""Bytes per element of every safetensors dtype string."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``path`` from byte ``start`` (absolute) for ``nbytes``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header without reading its data.

    Returns
    -------
    tensors, metadata
        ``name -> TensorInfo`` in file order, and the ``__metadata__`` mapping (may be empty).

    Raises
    ------
    ModelError
        Naming the file, if it is missing, truncated or its header is malformed.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(str(p), "not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelError(
                    str(p),
                    f"not a safetensors file (header length {n} invalid for a {size}-byte file)",
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelError(str(p), "file not found") from None
    except IsADirectoryError:
        raise ModelError(str(p), "is a directory, expected a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(str(p), f"malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelError(str(p), "malformed safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    items = sorted(header.items(), key=lambda kv: tuple(kv[1].get("data_offsets", (0, 0))))
    for name, h in items:
        try:
            dtype = str(h["dtype"])
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"{p}: {name}", "malformed tensor entry in safetensors header"
            ) from None
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"{p}: {name}", f"unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, p, data_start + b, e - b)
        if e < b or data_start + e > size or info.numel * DTYPE_BYTES[dtype] != e - b:
            raise ModelError(
                f"{p}: {name}",
                f"data offsets [{b}, {e}) do not match shape {list(shape)} "
                f"{dtype} or the file size {size} (truncated file?)",
            )
        tensors[name] = info
    return tensors, {str(k): str(v) for k, v in meta.items()}


def read_tensor_bytes(info: TensorInfo) -> bytes:
    """Read one tensor's raw little-endian bytes (loads the whole tensor)."""
    with open(info.path, "rb") as f:
        f.seek(info.start)
        data = f.read(info.nbytes)
    if len(data) != info.nbytes:
        raise ModelError(str(info.path), f"truncated while reading {info.name}")
    return data


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its name/dtype/shape and the byte source (a :class:`TensorInfo` slice
    ``source`` from ``offset`` for ``nbytes``, or in-memory ``data``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    offset: int = 0
    data: bytes | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (elements × dtype size)."""
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class WrittenFile:
    """Result of :func:`write_safetensors`: size in bytes and sha256 of the whole file."""

    path: Path
    nbytes: int
    sha256: str


def _header_bytes(tensors: Sequence[OutTensor], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Iterable[OutTensor],
    metadata: Mapping[str, str] | None = None,
    chunk_bytes: int = COPY_CHUNK_BYTES,
) -> WrittenFile:
    """Write a safetensors file, copying sources in chunks and hashing on the fly.

    Tensors are ordered by decreasing element size then name (keeps every tensor aligned to its
    element size). The file is written to ``path + ".tmp"`` and renamed at the end, so an
    interrupted split never leaves a complete-looking shard.
    """
    order = sorted(tensors, key=lambda t: (-DTYPE_BYTES[t.dtype], t.name))
    names = [t.name for t in order]
    if len(set(names)) != len(names):
        raise ValueError("write_safetensors: duplicate tensor names")
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    h = hashlib.sha256()
    total = 0
    with open(tmp, "wb") as out:
        head = _header_bytes(order, metadata)
        out.write(head)
        h.update(head)
        total += len(head)
        for t in order:
            if t.data is not None:
                if len(t.data) != t.nbytes:
                    raise ValueError(f"{t.name}: {len(t.data)} bytes given, shape needs {t.nbytes}")
                out.write(t.data)
                h.update(t.data)
                total += len(t.data)
                continue
            if t.source is None:
                raise ValueError(f"{t.name}: no data and no source")
            if t.offset + t.nbytes > t.source.nbytes:
                raise ValueError(f"{t.name}: slice exceeds source tensor {t.source.name}")
            with open(t.source.path, "rb") as src:
                src.seek(t.source.start + t.offset)
                left = t.nbytes
                while left:
                    buf = src.read(min(chunk_bytes, left))
                    if not buf:
                        raise ModelError(
                            str(t.source.path), f"truncated while reading {t.source.name}"
                        )
                    out.write(buf)
                    h.update(buf)
                    left -= len(buf)
                    total += len(buf)
                    del buf
    os.replace(tmp, p)
    return WrittenFile(p, total, h.hexdigest())


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = COPY_CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk_bytes)
            if not buf:
                return h.hexdigest()
            h.update(buf)
