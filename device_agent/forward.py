"""The ``forward`` op: check a request's tensors against the loaded experts, run each on its
expert, and build the reply (header fields and tensor frames).

This is the agent's hot path: no I/O, the received frames are viewed (never copied), and an
expert that returns its input gets the received frame sent back as it is. Python 3.8 (the
device side); no ``testbed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from device_agent import protocol as P
from device_agent.experts import LoadedExpert
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.status import Counters

_perf = time.perf_counter


def request_timeout_ms(h: dict[str, Any], op: str) -> Any:
    """A request's optional ``timeout_ms``: ``None`` or a number (a bool, or a NaN that would
    never expire, gets ``BAD_HEADER`` naming ``op``)."""
    timeout_ms = h.get("timeout_ms")
    if timeout_ms is not None and (
        isinstance(timeout_ms, bool)
        or not isinstance(timeout_ms, (int, float))
        or (isinstance(timeout_ms, float) and math.isnan(timeout_ms))
    ):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{op}: timeout_ms must be a number")
    return timeout_ms


def start_compute(
    recv_perf: float, timeout_ms: Any, now_j: Callable[[], float]
) -> tuple[float, float, float]:
    """Open a request's compute window: (start ``perf_counter``, the meter's joules then, ms
    the request waited in the queue since its receipt ``recv_perf``).

    Raises
    ------
    ProtocolError
        ``EXPIRED`` when it waited longer than ``timeout_ms`` (``None``: no limit).
    """
    start = _perf()
    e_start = now_j()
    queue_ms = (start - recv_perf) * 1e3
    if timeout_ms is not None and queue_ms > timeout_ms:
        raise ProtocolError(
            ErrorCode.EXPIRED,
            f"waited {queue_ms:.1f} ms in the queue > timeout {timeout_ms} ms",
        )
    return start, e_start, queue_ms


def end_compute(
    start: float, e_start: float, queue_ms: float, now_j: Callable[[], float]
) -> dict[str, Any]:
    """Close a compute window opened by :func:`start_compute`: the reply's ``queue_ms``,
    ``compute_ms`` and ``energy_j = [at start, at end]`` (the end never below the start)."""
    e_end = now_j()
    return {
        "queue_ms": queue_ms,
        "compute_ms": (_perf() - start) * 1e3,
        "energy_j": [e_start, max(e_start, e_end)],
    }


class ForwardOp:
    """Runs ``forward`` requests on the agent's experts (the dict it is given, shared with the
    :class:`~device_agent.experts.ExpertStore`); counts rows, calls and per-tensor errors.

    ``now_j`` is the meter's :meth:`~device_agent.energy.Meter.now_j` (no I/O: called at compute
    start and end); ``max_rows`` and ``max_tensors`` are the limits past which a tensor or a
    request gets ``TOO_LARGE``."""

    def __init__(
        self,
        experts: dict[str, LoadedExpert],
        counters: Counters,
        now_j: Callable[[], float],
        max_rows: int,
        max_tensors: int,
    ) -> None:
        self.experts = experts
        self.counters = counters
        self.now_j = now_j
        self.max_rows = int(max_rows)
        self.max_tensors = int(max_tensors)

    def check_request(self, h: dict[str, Any], n_frames: int) -> tuple[list[Any], Any]:
        """The request's tensor descriptors ``t``, checked against the frames that came with it
        and the limits, and its ``timeout_ms`` (``None`` or a number: a bool, or a NaN that
        would never expire, gets ``BAD_HEADER``)."""
        descs = h.get("t")
        if not isinstance(descs, list):
            raise ProtocolError(ErrorCode.BAD_HEADER, "forward: 't' must be a list")
        n = len(descs)
        if n > self.max_tensors:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"{n} tensors in one request > limit {self.max_tensors}"
            )
        if n != n_frames:
            raise ProtocolError(
                ErrorCode.BAD_FRAMES, f"{n} tensors declared, {n_frames} frames sent"
            )
        return descs, request_timeout_ms(h, "forward")

    def expert_for(self, uid: str, dt: str, shape: tuple[int, int]) -> LoadedExpert:
        """The loaded expert ``uid``, if it takes a tensor of this dtype and shape."""
        e = self.experts.get(uid)
        if e is None:
            raise ProtocolError(ErrorCode.UNKNOWN_EXPERT, f"expert {uid} is not loaded here")
        if dt != e.io_dtype:
            raise ProtocolError(
                ErrorCode.DTYPE_MISMATCH, f"{uid}: got {dt}, expert takes {e.io_dtype}"
            )
        if shape[0] > self.max_rows:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"{uid}: {shape[0]} rows > limit {self.max_rows}"
            )
        if shape[1] != e.hidden_size:
            raise ProtocolError(
                ErrorCode.SHAPE_MISMATCH,
                f"{uid}: got {list(shape)}, expert takes [n, {e.hidden_size}]",
            )
        return e

    def run_one(
        self, e: LoadedExpert, fr: Any, dt: str, shape: tuple[int, int]
    ) -> tuple[Any, float]:
        """Run expert ``e`` on the received frame ``fr``: (the reply's frame or buffer, compute
        ms); the expert's and the agent's counts updated."""
        x = P.frame_tensor(fr.buffer, dt, shape)
        t0 = _perf()
        try:
            y = e.kernel(x) if shape[0] else x
        except Exception as err:  # noqa: BLE001 - a faulty expert is reported, the agent serves on
            raise ProtocolError(
                ErrorCode.INTERNAL, f"{e.uid}: {type(err).__name__}: {err}"
            ) from None
        ms = (_perf() - t0) * 1e3
        if y is not x and (tuple(y.shape) != shape or y.dtype != x.dtype):
            raise ProtocolError(
                ErrorCode.INTERNAL, f"{e.uid}: expert returned {y.dtype}{list(y.shape)}"
            )
        e.calls += 1
        e.rows += shape[0]
        e.compute_ms += ms
        self.counters.rows += shape[0]
        # the input's own bytes (an expert that returned its input or a contiguous view of it):
        # send the received frame back as it is, shared with libzmq, not copied
        if y is x or (
            shape[0]
            and y.data_ptr() == x.data_ptr()
            and y.is_contiguous()
            and y.device.type == "cpu"
        ):
            return fr, ms
        return P.tensor_buffer(y), ms

    def __call__(
        self, h: dict[str, Any], body: list[Any], recv_perf: float
    ) -> tuple[dict[str, Any], list[Any]]:
        """Run the experts of one request; ``body`` is [header, tensor frames...], ``recv_perf``
        its receipt (``perf_counter``). Returns the reply's fields and frames."""
        descs, timeout_ms = self.check_request(h, len(body) - 1)
        start, e_start, queue_ms = start_compute(recv_perf, timeout_ms, self.now_j)
        errors: dict[str, list[Any]] = {}
        out_desc: list[list[Any]] = []
        out_bufs: list[Any] = []
        uid_ms: dict[str, float] = {}
        seen: set[str] = set()
        expert_for, run_one = self.expert_for, self.run_one
        for i in range(len(descs)):
            desc = descs[i]
            key = f"#{i}"
            try:
                uid, dt, shape = P.check_descriptor(desc)
                key = uid
                if uid in seen:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"uid {uid} sent twice")
                seen.add(uid)
                buf, uid_ms[uid] = run_one(expert_for(uid, dt, shape), body[i + 1], dt, shape)
                out_desc.append(desc)  # == [uid, dt, [rows, cols]] (checked above)
                out_bufs.append(buf)
            except ProtocolError as err:
                errors[key[:64]] = [int(err.code), err.message]
                self.counters.count_error(err.code)
        self.counters.forward_calls += 1
        return (
            {
                "t": out_desc,
                "errors": errors,
                **end_compute(start, e_start, queue_ms, self.now_j),
                "uid_ms": uid_ms,
            },
            out_bufs,
        )
