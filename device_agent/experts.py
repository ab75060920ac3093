"""The experts an agent serves: the ``load`` and ``unload`` ops, and the checks of an expert
spec and of a shard's path in the workdir.

Python 3.8 (the device side); no ``testbed``.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from device_agent import protocol as P
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.status import Counters


class IdentityExpert:
    """A built-in expert that returns its input unchanged (data-plane benchmarks, tests)."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.intermediate_size = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` itself (no copy)."""
        return x


@dataclass
class LoadedExpert:
    """One expert the agent serves."""

    uid: str
    kernel: Any
    hidden_size: int
    io_dtype: str
    source: str
    runtime: str
    quant: str | None
    weight_bytes: int
    calls: int = 0
    rows: int = 0
    compute_ms: float = 0.0


def resolve_in_workdir(workdir: Path, rel: Any) -> Path:
    """Resolve a shard path given relative to ``workdir``.

    Raises
    ------
    ProtocolError
        ``BAD_PATH`` for a non-string, empty or absolute path, one with ``..`` or a NUL byte, one
        that resolves (through symlinks) outside ``workdir``, or one the OS cannot resolve (a
        symlink loop).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ProtocolError(ErrorCode.BAD_PATH, "path must be a non-empty string")
    pp = PurePosixPath(rel)
    if pp.is_absolute() or rel.startswith("~") or ".." in pp.parts:
        raise ProtocolError(
            ErrorCode.BAD_PATH, f"path {P.brief(rel)} must be relative to the workdir, without '..'"
        )
    root = workdir.resolve()
    try:
        full = (root / pp).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ProtocolError(
            ErrorCode.BAD_PATH, f"path {P.brief(rel)} cannot be resolved: {type(e).__name__}"
        ) from None
    if root != full and root not in full.parents:
        raise ProtocolError(ErrorCode.BAD_PATH, f"path {P.brief(rel)} leaves the workdir")
    return full


def pick_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when CUDA is present, else ``"cpu"``; any other name as it is."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# every field's type is checked before the field is used (a list or map is unhashable: a dict
# lookup or set test with one raises; a bool passes isinstance(x, int))
def check_spec(spec: Any) -> tuple[str, str]:
    """The ``uid`` and ``io_dtype`` (default ``float32``) of one ``load`` entry.

    Raises
    ------
    ProtocolError
        ``BAD_HEADER`` for a spec that is not a map, a bad uid or a non-string io_dtype;
        ``DTYPE_MISMATCH`` for an unknown io_dtype.
    """
    from models.uids import is_uid

    if not isinstance(spec, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, "expert spec must be a map")
    uid = spec.get("uid")
    if not is_uid(uid):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"bad expert uid {P.brief(uid)}")
    io_dtype = spec.get("io_dtype", "float32")
    if not isinstance(io_dtype, str):
        raise ProtocolError(
            ErrorCode.BAD_HEADER, f"io_dtype must be a string, got {P.brief(io_dtype)}"
        )
    if io_dtype not in P.DTYPES:
        raise ProtocolError(ErrorCode.DTYPE_MISMATCH, f"unknown io_dtype {P.brief(io_dtype)}")
    return uid, io_dtype


def builtin_expert(uid: str, io_dtype: str, spec: dict[str, Any]) -> LoadedExpert:
    """A spec with ``builtin``: only ``{builtin: 'identity', hidden: int}`` (``BAD_HEADER``
    otherwise)."""
    builtin, hidden = spec["builtin"], spec.get("hidden")
    if (
        not isinstance(builtin, str)
        or builtin != "identity"
        or not P.is_int(hidden)
        or not 0 < hidden < 1 << 20
    ):
        raise ProtocolError(
            ErrorCode.BAD_HEADER, "builtin expert: use {builtin: 'identity', hidden: int}"
        )
    return LoadedExpert(
        uid, IdentityExpert(hidden), hidden, io_dtype, "builtin:identity", "builtin", None, 0
    )


def shard_options(spec: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """``runtime`` (default torch), ``quant`` and ``dtype`` of a shard spec (``BAD_HEADER`` for
    a value of the wrong type or not among the choices)."""
    runtime = spec.get("runtime", "torch")
    quant = spec.get("quant")
    dtype = spec.get("dtype")
    if (
        not isinstance(runtime, str)
        or not (quant is None or isinstance(quant, str))
        or not (dtype is None or isinstance(dtype, str))
        or runtime not in ("torch", "onnx")
        or quant not in (None, "int8", "int4")
        or dtype not in (None, "float32", "float16", "bfloat16")
    ):
        raise ProtocolError(
            ErrorCode.BAD_HEADER,
            "runtime must be torch|onnx, quant None|int8|int4, dtype None|float32|float16|bfloat16",
        )
    return runtime, quant, dtype


class ExpertStore:
    """The experts loaded on this agent (``experts``: uid -> :class:`LoadedExpert`), and the
    ``load`` / ``unload`` ops that change them. Every per-entry error is counted in
    ``counters``."""

    def __init__(self, workdir: str | os.PathLike[str], device: str, counters: Counters) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.counters = counters
        self.experts: dict[str, LoadedExpert] = {}

    def load_one(self, spec: Any) -> LoadedExpert:
        """Check one ``load`` entry and load its expert (not yet served: see :meth:`load`)."""
        uid, io_dtype = check_spec(spec)
        if "builtin" in spec:
            return builtin_expert(uid, io_dtype, spec)
        path = resolve_in_workdir(self.workdir, spec.get("path"))
        runtime, quant, dtype = shard_options(spec)
        try:
            is_file = path.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise ProtocolError(
                ErrorCode.BAD_PATH, f"path {P.brief(spec['path'])}: {e.strerror}"
            ) from None
        if not is_file:
            raise ProtocolError(
                ErrorCode.LOAD_FAILED, f"no shard file {P.brief(spec['path'])} in the workdir"
            )
        from models.kernels import load_expert

        try:
            k = load_expert(
                path, runtime=runtime, quant=quant, device=self.device, dtype=dtype, uid=uid
            )
        except Exception as e:  # noqa: BLE001 - a bad shard must not take the agent down
            raise ProtocolError(ErrorCode.LOAD_FAILED, f"{type(e).__name__}: {e}") from None
        return LoadedExpert(
            uid,
            k,
            int(k.hidden_size),
            io_dtype,
            str(spec.get("path")),
            runtime,
            quant,
            int(getattr(k, "weight_bytes", 0) or 0),
        )

    def load(self, h: dict[str, Any]) -> dict[str, Any]:
        """The ``load`` op: the reply's ``loaded`` (uids) and ``errors`` (uid -> [code, msg])."""
        specs = h.get("experts")
        if not isinstance(specs, list):
            raise ProtocolError(ErrorCode.BAD_HEADER, "load: 'experts' must be a list")
        loaded, errors = [], {}
        for i, spec in enumerate(specs):
            key = (
                spec.get("uid")
                if isinstance(spec, dict) and isinstance(spec.get("uid"), str)
                else f"#{i}"
            )
            try:
                e = self.load_one(spec)
            except ProtocolError as err:
                errors[key[:64]] = [int(err.code), err.message]
                self.counters.count_error(err.code)
                continue
            self.experts[e.uid] = e
            loaded.append(e.uid)
        return {"loaded": loaded, "errors": errors}

    def unload(self, h: dict[str, Any]) -> dict[str, Any]:
        """The ``unload`` op: the reply's ``unloaded`` (uids) and ``errors``."""
        uids = h.get("uids")
        if not isinstance(uids, list):
            raise ProtocolError(ErrorCode.BAD_HEADER, "unload: 'uids' must be a list")
        done, errors = [], {}
        for u in uids:
            if not isinstance(u, str):
                errors[P.brief(u, 64)] = [int(ErrorCode.BAD_HEADER), "uid must be a string"]
                self.counters.count_error(ErrorCode.BAD_HEADER)
            elif (e := self.experts.pop(u, None)) is not None:
                release = getattr(e.kernel, "release", None)
                if release is not None:
                    release()  # its CUDA graphs hold a reference back to it
                done.append(u)
            else:
                errors[u[:64]] = [int(ErrorCode.UNKNOWN_EXPERT), "not loaded"]
                self.counters.count_error(ErrorCode.UNKNOWN_EXPERT)
        if done and self.device.startswith("cuda"):
            gc.collect()
            torch.cuda.empty_cache()
        return {"unloaded": done, "errors": errors}

    def describe(self) -> dict[str, Any]:
        """The status's ``experts`` section: uid -> what it is and what it has done."""
        return {
            u: {
                "hidden_size": e.hidden_size,
                "io_dtype": e.io_dtype,
                "source": e.source,
                "runtime": e.runtime,
                "quant": e.quant,
                "kernel": getattr(e.kernel, "kernel", e.runtime),
                "launch": getattr(e.kernel, "launch", "eager"),
                "launch_error": getattr(getattr(e.kernel, "graphed", None), "error", None),
                "weight_bytes": e.weight_bytes,
                "calls": e.calls,
                "rows": e.rows,
                "compute_ms": round(e.compute_ms, 3),
            }
            for u, e in self.experts.items()
        }
