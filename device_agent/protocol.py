"""Wire protocol between the base station (BS) and a device agent.

Transport: ZeroMQ, a ROUTER socket on the agent and one DEALER per device on the BS. A message
is a multipart ZeroMQ message::

    [b"" (optional delimiter)] [header] [tensor frame 0] [tensor frame 1] ...

* ``header`` is a msgpack map; it always carries ``v`` (:data:`PROTOCOL_VERSION`), ``op`` (on
  requests) and ``id`` (an integer chosen by the sender, echoed in the reply).
* Every tensor travels as one raw frame: its bytes in C order, no padding. The header lists,
  in frame order, ``t = [[uid, dtype, [rows, cols]], ...]``. Nothing is ever pickled.

Requests (``op``) and their extra header fields:

``ping``
    (none). Reply: ``t1_ns``/``t2_ns`` (device wall clock at receipt / at reply).
``status``
    (none). Reply: ``status`` (see :meth:`device_agent.status.StatusReport.build`).
``load``
    ``experts``: list of maps ``{uid, path, runtime?, quant?, dtype?, io_dtype?}`` (``path``
    relative to the agent's workdir) or ``{uid, builtin: "identity", hidden, io_dtype?}``.
    Reply: ``loaded`` (uids) and ``errors`` (uid -> [code, message]).
``unload``
    ``uids``: list. Reply: ``unloaded``, ``errors``.
``forward``
    ``t`` (see above) plus one frame per tensor, optional ``timeout_ms`` (the agent skips work
    that waited longer than that: code :attr:`ErrorCode.EXPIRED`). Reply: ``t`` for the
    outputs (same order, successful uids only) plus their frames, ``errors`` (uid -> [code,
    message]), ``queue_ms`` (receipt -> compute start), ``compute_ms`` (all experts),
    ``uid_ms`` (uid -> compute ms), ``t1_ns``/``t2_ns``.
``shutdown``
    (none). The agent replies, then exits cleanly.

Whole-model experts (MoE²: each expert is a whole small causal LM, a folder written by
``models.dense_lm.save_dense_lm``; :mod:`device_agent.lm`):

``load_model``
    ``model`` (an id: 1-64 letters, digits, ``.``, ``_``, ``-``), ``path`` (the model's folder,
    relative to the workdir; checked as a ``load`` path). Reply: ``model``, ``vocab_size``,
    ``max_seq_len``, ``params``. An id already held is replaced. The status lists the held
    models under ``models``.
``unload_model``
    ``models``: list of ids. Reply: ``unloaded``, ``errors`` (id -> [code, message]).
``lm``
    ``model``, ``mode`` (``next`` | ``score`` | ``generate``), ``prompt`` (a non-empty list of
    token ids < the model's vocabulary, at most its ``max_seq_len`` long), optional
    ``timeout_ms`` (as ``forward``); ``score`` also takes ``options`` (a non-empty list of
    token-id lists, each appended to the prompt within ``max_seq_len``), ``generate``
    ``max_new_tokens`` (0..max_seq_len) and ``eos_id`` (-1 = none .. vocab-1). No data frames.
    Reply: ``model``, ``mode``, ``result`` and the timing of a ``forward`` reply
    (``queue_ms``, ``compute_ms``, ``energy_j = [start, end]``, ``t1_ns``/``t2_ns``).
    ``next``: ``result`` is ``None`` and the full log-probabilities of the next token travel
    as one float32 frame ``[1, V]`` (``t = [[model, "float32", [1, V]]]``); ``score``:
    ``result`` = per option ``sum log p(option | prompt)`` (floats); ``generate``: ``result`` =
    the greedy new tokens (ints, ending with ``eos_id`` if it came). An unknown model gets
    ``UNKNOWN_EXPERT``, a bad field ``BAD_HEADER`` (``TOO_LARGE`` for a prompt or option too
    long), a model that raises ``INTERNAL``.

Every field is type-checked before use: a field of the wrong type (a list where a string
belongs, a bool where an integer does...) gets :attr:`ErrorCode.BAD_HEADER` (``BAD_PATH`` for a
load ``path``, ``SHAPE_MISMATCH`` for a tensor shape), for the request or, inside ``experts``,
``uids`` or ``t``, for that entry; never :attr:`ErrorCode.INTERNAL`.

Every reply has ``v``, ``id``, ``code`` (:class:`ErrorCode`, 0 = OK) and, when ``code`` != 0,
``error`` (a human message). A request that cannot be parsed at all still gets a reply (``id``
``None`` if unknown).
"""

from __future__ import annotations

import math
import warnings
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 1

#: op names a version-1 agent understands
OPS = (
    "ping",
    "status",
    "load",
    "unload",
    "forward",
    "shutdown",
    "load_model",
    "unload_model",
    "lm",
)

# Frames we decode are read-only ZeroMQ buffers; we never write to them, so torch's warning
# about non-writable buffers is noise here (and costs time on every call).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning
)


class ErrorCode(IntEnum):
    """Numeric error codes of agent replies (``code`` in the header, per-uid ``errors``)."""

    OK = 0
    BAD_HEADER = 1  #: header missing, not msgpack, not a map, or a field of the wrong type
    BAD_VERSION = 2  #: ``v`` is not :data:`PROTOCOL_VERSION`
    UNKNOWN_OP = 3  #: ``op`` not in :data:`OPS`
    UNKNOWN_EXPERT = 4  #: uid not loaded on this agent
    DTYPE_MISMATCH = 5  #: tensor dtype differs from the expert's io dtype (or unknown dtype)
    SHAPE_MISMATCH = 6  #: tensor not [n, hidden] for that expert
    TOO_LARGE = 7  #: message larger than the agent's ``max_message_bytes``
    INTERNAL = 8  #: the expert raised while computing
    EXPIRED = 9  #: the request waited in the queue longer than its ``timeout_ms``
    BAD_FRAMES = 10  #: frame count or frame size does not match the header's tensor list
    BAD_PATH = 11  #: load path absolute, with ``..``, or outside the workdir
    LOAD_FAILED = 12  #: the shard could not be read / built


class ProtocolError(Exception):
    """A request the agent refuses; carries the :class:`ErrorCode` of the reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


#: wire dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
}
_NAME_OF = {v[0]: k for k, v in DTYPES.items()}
#: wire dtype name -> numpy dtype, where numpy has one (bfloat16 goes through torch.frombuffer)
_NP_DTYPE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}

#: limits applied while unpacking a header (a header is small; these bound a hostile one)
MAX_HEADER_BYTES = 1 << 20
_UNPACK_LIMITS = {
    "max_str_len": 1 << 16,
    "max_bin_len": 1 << 16,
    "max_array_len": 1 << 14,
    "max_map_len": 1 << 12,
    "max_ext_len": 0,
}
#: a header shorter than this cannot break the limits above (an array needs >= 1 byte per item, a
#: map >= 2 per entry), so those need not be passed (msgpack's keyword parsing costs on every call)
_SMALL_HEADER = 4096


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_HEADER, "msgpack ext types are not accepted")


def pack(header: dict[str, Any]) -> bytes:
    """Encode a header map with msgpack (``bin`` type for bytes)."""
    return msgpack.packb(header, use_bin_type=True)


def unpack(data: bytes | memoryview) -> dict[str, Any]:
    """Decode and minimally validate a header.

    Raises
    ------
    ProtocolError
        ``BAD_HEADER`` if it is not a msgpack map with an integer-or-absent ``id``;
        ``BAD_VERSION`` if ``v`` is not :data:`PROTOCOL_VERSION`.
    """
    n = len(data)
    if n > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header of {n} bytes > {MAX_HEADER_BYTES}")
    try:
        if n < _SMALL_HEADER:  # (the hot path) too short to exceed any limit but the ext one
            h = msgpack.unpackb(
                data, raw=False, strict_map_key=True, ext_hook=_no_ext, max_ext_len=0
            )
        else:
            h = msgpack.unpackb(
                data, raw=False, strict_map_key=True, ext_hook=_no_ext, **_UNPACK_LIMITS
            )
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated exception types
        raise ProtocolError(
            ErrorCode.BAD_HEADER, f"header is not valid msgpack: {type(e).__name__}"
        ) from None
    if not isinstance(h, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is a {type(h).__name__}, not a map")
    rid = h.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int)):
        raise ProtocolError(ErrorCode.BAD_HEADER, "id must be an integer")
    if "v" not in h:
        raise ProtocolError(ErrorCode.BAD_HEADER, "missing protocol version 'v'")
    v = h["v"]
    if not is_int(v) or v != PROTOCOL_VERSION:  # (not 1.0 nor True, though both == 1)
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {brief(v)} not supported (agent speaks {PROTOCOL_VERSION})",
        )
    return h


def is_int(x: Any) -> bool:
    """True for an int that is not a bool (msgpack decodes ``true`` as a bool, an int subclass)."""
    return isinstance(x, int) and not isinstance(x, bool)


def brief(x: Any, limit: int = 60) -> str:
    """``repr(x)`` cut to ``limit`` characters: a hostile value quoted in a reply stays short."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (``float32``/``float16``/``bfloat16``)."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ProtocolError(
            ErrorCode.DTYPE_MISMATCH, f"dtype {dtype} cannot travel on the wire"
        ) from None


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (copied first if not contiguous/CPU)."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def check_descriptor(desc: Any) -> tuple[str, str, tuple[int, int]]:
    """Validate one ``[uid, dtype, [rows, cols]]`` entry of ``t``.

    Raises
    ------
    ProtocolError
        ``BAD_HEADER`` for a malformed entry, ``DTYPE_MISMATCH`` for an unknown dtype name.
    """
    if not isinstance(desc, (list, tuple)) or len(desc) != 3:
        raise ProtocolError(ErrorCode.BAD_HEADER, "tensor entry must be [uid, dtype, shape]")
    uid, dt, shape = desc
    if not isinstance(uid, str) or not isinstance(
        dt, str
    ):  # (before any dict lookup: a list is unhashable)
        raise ProtocolError(ErrorCode.BAD_HEADER, "tensor entry: uid and dtype must be strings")
    if dt not in DTYPES:
        raise ProtocolError(
            ErrorCode.DTYPE_MISMATCH, f"unknown dtype {brief(dt)}; use one of {sorted(DTYPES)}"
        )
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 2
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 31 for s in shape
        )
    ):
        raise ProtocolError(
            ErrorCode.SHAPE_MISMATCH,
            f"shape must be [rows, cols] of non-negative ints, got {brief(shape)}",
        )
    return uid, dt, (int(shape[0]), int(shape[1]))


def frame_tensor(buf: memoryview | bytes, dtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """View a received frame as a tensor (no copy; read-only memory, do not write to it).

    Raises
    ------
    ProtocolError
        ``BAD_FRAMES`` if the frame's size is not ``rows * cols * itemsize``.
    """
    tdtype, itemsize = DTYPES[dtype]
    want = math.prod(shape) * itemsize
    if len(buf) != want:
        raise ProtocolError(
            ErrorCode.BAD_FRAMES,
            f"frame of {len(buf)} bytes for {dtype}{list(shape)} (want {want})",
        )
    if want == 0:
        return torch.empty(shape, dtype=tdtype)
    npd = _NP_DTYPE.get(dtype)
    if npd is not None:  # numpy's view + from_numpy: several times cheaper than frombuffer + view
        return torch.from_numpy(np.frombuffer(buf, dtype=npd).reshape(shape))
    return torch.frombuffer(buf, dtype=tdtype).view(shape)


def reply_header(
    rid: Any, code: ErrorCode = ErrorCode.OK, error: str | None = None, **fields: Any
) -> dict[str, Any]:
    """The header of a reply (``id`` echoed when it was a valid integer)."""
    h: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": rid if isinstance(rid, int) and not isinstance(rid, bool) else None,
        "code": int(code),
    }
    if code != ErrorCode.OK:
        h["error"] = error or ErrorCode(code).name.lower()
    h.update(fields)
    return h
