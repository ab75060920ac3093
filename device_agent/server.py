"""The device agent: a ZeroMQ ROUTER server that runs routed experts for the base station.

Single-threaded for compute, but queue-aware: every loop turn first drains all requests that
have arrived (stamping their receipt time), then runs the oldest one, so the reply's
``queue_ms`` (receipt -> compute start) shows how long work waited behind other work. A PUB
socket (optional) publishes the agent's status every ``status_period_s``.

See :mod:`device_agent.protocol` for the messages and error codes. This module must not
import ``testbed`` (a device install stays small).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import zmq

from device_agent import protocol as P
from device_agent.energy import Meter, MeterOptions, detect_meter
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.security import CurveServer, ServerKeys

log = logging.getLogger("device_agent")

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
#: most token rows in one tensor, and tensors (experts) in one forward request
DEFAULT_MAX_ROWS = 1 << 16
DEFAULT_MAX_TENSORS = 1024

# plain ints: zmq's enum members make every flag operation a Python-level enum call
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVTIMEO = int(zmq.RCVTIMEO)
#: frames at least this large are sent zero-copy; smaller ones are copied: a zero-copy frame is
#: released through pyzmq's garbage-collector thread (a wakeup + the GIL per frame), which on a
#: busy host costs more than a memcpy of several MiB
_ZEROCOPY_MIN = 16 << 20


class IdentityExpert:
    """A built-in expert that returns its input unchanged (data-plane benchmarks, tests)."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.intermediate_size = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Pending:
    """A received request waiting in the agent's queue (slots: built once per request)."""

    __slots__ = ("envelope", "frames", "nbytes", "recv_ns", "recv_perf")

    def __init__(
        self, envelope: list[Any], frames: list[Any], recv_ns: int, recv_perf: float, nbytes: int
    ) -> None:
        self.envelope = envelope
        self.frames = frames  #: header (bytes) then the tensor frames (zmq.Frame)
        self.recv_ns = recv_ns
        self.recv_perf = recv_perf
        self.nbytes = nbytes


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    forward_calls: int = 0
    rows: int = 0
    by_code: dict[int, int] = field(default_factory=dict)


class AgentServer:
    """The agent's server loop.

    Parameters
    ----------
    bind
        ZeroMQ endpoint of the ROUTER, e.g. ``tcp://10.77.0.11:5555`` (``:*`` picks a port).
    workdir
        Directory expert shard paths are relative to.
    pub
        Endpoint of the status PUB socket, or ``None`` for no status feed.
    status_period_s
        Seconds between published status messages.
    max_message_bytes
        Requests larger than this get ``TOO_LARGE``; ones over twice this are dropped by
        ZeroMQ itself (the connection is reset, no reply).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present).
    threads
        ``torch.set_num_threads`` for the compute (``None``: torch's default).
    ready_file
        Written (JSON: endpoints, pid) once the sockets are bound; removed on exit.
    max_queue
        At most this many received requests wait in the agent's queue; more stay in ZeroMQ.
    max_rows, max_tensors
        A forward request with more tensors, or a tensor with more rows, gets ``TOO_LARGE``.
    meter
        Options of the energy meter opened with :func:`device_agent.energy.detect_meter`
        (``None``: every kind, in the standard order; the CPU-time estimate is the last
        resort), or an open :class:`~device_agent.energy.Meter` (closed with the server).
    curve_dir
        Folder with the agent's CURVE keypair and the authorized client keys
        (:mod:`device_agent.security`): both sockets become CURVE servers that accept only
        those clients. ``None``: no authentication (benchmarks, tests on loopback).

    Energy. The status (reply and feed) carries ``energy_j`` (joules since the agent started,
    :meth:`Meter.latest`: at most a sampling period old), ``power_w`` and ``energy_source``
    (:attr:`Meter.energy_source`); ``energy_meter`` describes the meter (and why others were
    skipped). ``ping`` replies carry ``energy_j`` from :meth:`Meter.read`, exact at that moment
    (a small exchange for the BS to read the counter at a request's ends).
    ``forward`` replies carry ``energy_j = [at compute start, at compute end]`` from
    :meth:`Meter.now_j` (no I/O on the call path; the end is never below the start).
    """

    def __init__(
        self,
        bind: str,
        workdir: str | os.PathLike[str],
        *,
        pub: str | None = None,
        status_period_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        device: str = "auto",
        threads: int | None = None,
        ready_file: str | os.PathLike[str] | None = None,
        max_queue: int = 256,
        meter: MeterOptions | Meter | None = None,
        curve_dir: str | os.PathLike[str] | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_tensors: int = DEFAULT_MAX_TENSORS,
    ) -> None:
        self.max_rows = int(max_rows)
        self.max_tensors = int(max_tensors)
        # keys first: a bad key file fails before any socket or meter exists
        self.curve_keys = ServerKeys.from_dir(curve_dir) if curve_dir is not None else None
        self.meter: Meter = meter if isinstance(meter, Meter) else detect_meter("/", meter)
        first = self.meter.read()
        #: (t_ns, energy_j) the status's average power is taken from (see :meth:`_energy`)
        self._power_ref = (first.t_ns, first.energy_j)
        self._now_j = self.meter.now_j  # bound once: the forward path calls it twice
        try:
            self._setup(
                bind,
                workdir,
                pub,
                status_period_s,
                max_message_bytes,
                device,
                threads,
                ready_file,
                max_queue,
            )
        except BaseException:
            if getattr(self, "curve", None) is not None:
                self.curve.stop()
            self.meter.close()
            raise

    def _setup(
        self,
        bind: str,
        workdir: str | os.PathLike[str],
        pub: str | None,
        status_period_s: float,
        max_message_bytes: int,
        device: str,
        threads: int | None,
        ready_file: str | os.PathLike[str] | None,
        max_queue: int,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        if threads:
            torch.set_num_threads(int(threads))
        self.max_message_bytes = int(max_message_bytes)
        self.status_period_s = float(status_period_s)
        self.max_queue = max_queue
        self.experts: dict[str, LoadedExpert] = {}
        self.counters = Counters()
        self.queue: collections.deque[_Pending] = collections.deque()
        self.started_ns = time.time_ns()
        self._stop = False
        self.ctx = zmq.Context()
        self.curve = CurveServer(self.ctx, self.curve_keys) if self.curve_keys else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        if self.curve is not None:
            self.curve.secure(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_sock: zmq.Socket | None = None
        self.pub_endpoint: str | None = None
        if pub:
            self.pub_sock = self.ctx.socket(zmq.PUB)
            if self.curve is not None:
                self.curve.secure(self.pub_sock)
            self.pub_sock.setsockopt(zmq.LINGER, 0)
            self.pub_sock.setsockopt(zmq.SNDHWM, 16)
            self.pub_sock.bind(pub)
            self.pub_endpoint = self.pub_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ready_file = Path(ready_file) if ready_file else None
        if self.ready_file:
            tmp = self.ready_file.with_name(self.ready_file.name + ".part")
            tmp.write_text(
                json.dumps(
                    {
                        "endpoint": self.endpoint,
                        "pub_endpoint": self.pub_endpoint,
                        "pid": os.getpid(),
                        "device": self.device,
                        "energy_source": self.meter.energy_source,
                        "curve_public": (
                            self.curve_keys.public.decode() if self.curve_keys else None
                        ),
                    }
                )
            )
            os.replace(tmp, self.ready_file)
        log.info(
            "agent pid %d serving on %s (status feed %s), workdir %s, device %s, energy %s, %s",
            os.getpid(),
            self.endpoint,
            self.pub_endpoint,
            self.workdir,
            self.device,
            self.meter.energy_source,
            f"CURVE (clients: the keys in {self.curve_keys.authorized_dir})"
            if self.curve_keys
            else "no CURVE (any client on the network is served)",
        )

    # ---- energy --------------------------------------------------------------------------
    def _energy(self) -> dict[str, Any]:
        """``energy_j``, ``power_w``, ``energy_source`` for the status.

        From :meth:`Meter.latest` (no driver or file access where the meter samples in the
        background: an NVML energy query took 4 ms on a virtualised H200, too long for the
        serving loop every status period). ``power_w`` is the meter's own instant value where
        it has one; for the CPU-time estimate (and a meter without a power figure) it is the
        average since a reference reading renewed once it is older than the status period, so
        that back-to-back status reads do not report the power of the status code itself."""
        r = self.meter.latest()
        p = r.power_w
        if p is None or self.meter.estimated:
            t0, e0 = self._power_ref
            p = (r.energy_j - e0) / ((r.t_ns - t0) / 1e9) if r.t_ns > t0 else None
            if r.t_ns - t0 >= self.status_period_s * 1e9:
                self._power_ref = (r.t_ns, r.energy_j)
        return {"energy_j": r.energy_j, "power_w": p, "energy_source": self.meter.energy_source}

    # ---- status --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The agent's live state (loaded experts, memory, load, power, clock)."""
        mem = _meminfo()
        memory: dict[str, Any] = {
            "rss_bytes": _rss_bytes(),
            "total_bytes": mem.get("MemTotal"),
            "available_bytes": mem.get("MemAvailable"),
        }
        if self.device.startswith("cuda"):
            free_b, total_b = torch.cuda.mem_get_info()
            memory.update(
                cuda_allocated_bytes=torch.cuda.memory_allocated(),
                cuda_free_bytes=free_b,
                cuda_total_bytes=total_b,
            )
        c = self.counters
        return {
            "agent": {
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "endpoint": self.endpoint,
                "protocol": P.PROTOCOL_VERSION,
                "device": self.device,
                "threads": torch.get_num_threads(),
                "started_ns": self.started_ns,
                "uptime_s": (time.time_ns() - self.started_ns) / 1e9,
                "max_message_bytes": self.max_message_bytes,
            },
            "experts": {
                u: {
                    "hidden_size": e.hidden_size,
                    "io_dtype": e.io_dtype,
                    "source": e.source,
                    "runtime": e.runtime,
                    "quant": e.quant,
                    "weight_bytes": e.weight_bytes,
                    "calls": e.calls,
                    "rows": e.rows,
                    "compute_ms": round(e.compute_ms, 3),
                }
                for u, e in self.experts.items()
            },
            "memory": memory,
            "load": {
                "loadavg_1m": os.getloadavg()[0],
                "queue_len": len(self.queue),
                "requests": c.requests,
                "errors": c.errors,
                "forward_calls": c.forward_calls,
                "rows": c.rows,
                "errors_by_code": {str(k): v for k, v in c.by_code.items()},
            },
            **self._energy(),
            "energy_meter": self.meter.describe(),
            "clock_ns": time.time_ns(),
        }

    # ---- load / unload -------------------------------------------------------------------
    def _load_one(self, spec: Any) -> LoadedExpert:
        from models.uids import is_uid

        # every field's type is checked before the field is used (a list or map is unhashable:
        # a dict lookup or set test with one raises; a bool passes isinstance(x, int))
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
        if "builtin" in spec:
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
                uid,
                IdentityExpert(hidden),
                hidden,
                io_dtype,
                "builtin:identity",
                "builtin",
                None,
                0,
            )
        path = resolve_in_workdir(self.workdir, spec.get("path"))
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
                "runtime must be torch|onnx, quant None|int8|int4, "
                "dtype None|float32|float16|bfloat16",
            )
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

    def _op_load(self, h: dict[str, Any]) -> dict[str, Any]:
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
                e = self._load_one(spec)
            except ProtocolError as err:
                errors[key[:64]] = [int(err.code), err.message]
                self._count_error(err.code)
                continue
            self.experts[e.uid] = e
            loaded.append(e.uid)
        return {"loaded": loaded, "errors": errors}

    def _op_unload(self, h: dict[str, Any]) -> dict[str, Any]:
        uids = h.get("uids")
        if not isinstance(uids, list):
            raise ProtocolError(ErrorCode.BAD_HEADER, "unload: 'uids' must be a list")
        done, errors = [], {}
        for u in uids:
            if not isinstance(u, str):
                errors[P.brief(u, 64)] = [int(ErrorCode.BAD_HEADER), "uid must be a string"]
                self._count_error(ErrorCode.BAD_HEADER)
            elif self.experts.pop(u, None) is not None:
                done.append(u)
            else:
                errors[u[:64]] = [int(ErrorCode.UNKNOWN_EXPERT), "not loaded"]
                self._count_error(ErrorCode.UNKNOWN_EXPERT)
        if done and self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"unloaded": done, "errors": errors}

    # ---- forward -------------------------------------------------------------------------
    def _op_forward(
        self, h: dict[str, Any], body: list[Any], item: _Pending
    ) -> tuple[dict[str, Any], list[Any]]:
        """Run the experts of one request; ``body`` is [header, tensor frames...]."""
        descs = h.get("t")
        if not isinstance(descs, list):
            raise ProtocolError(ErrorCode.BAD_HEADER, "forward: 't' must be a list")
        n = len(descs)
        if n > self.max_tensors:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"{n} tensors in one request > limit {self.max_tensors}"
            )
        if n != len(body) - 1:
            raise ProtocolError(
                ErrorCode.BAD_FRAMES, f"{n} tensors declared, {len(body) - 1} frames sent"
            )
        timeout_ms = h.get("timeout_ms")
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool)
            or not isinstance(timeout_ms, (int, float))
            or (isinstance(timeout_ms, float) and math.isnan(timeout_ms))
        ):
            # (a NaN timeout would never expire)
            raise ProtocolError(ErrorCode.BAD_HEADER, "forward: timeout_ms must be a number")
        perf = time.perf_counter
        start = perf()
        e_start = self._now_j()
        queue_ms = (start - item.recv_perf) * 1e3
        errors: dict[str, list[Any]] = {}
        if timeout_ms is not None and queue_ms > timeout_ms:
            raise ProtocolError(
                ErrorCode.EXPIRED,
                f"waited {queue_ms:.1f} ms in the queue > timeout {timeout_ms} ms",
            )
        out_desc: list[list[Any]] = []
        out_bufs: list[Any] = []
        uid_ms: dict[str, float] = {}
        experts = self.experts
        seen: set[str] = set()
        for i in range(n):
            desc = descs[i]
            fr = body[i + 1]
            key = f"#{i}"
            try:
                uid, dt, shape = P.check_descriptor(desc)
                key = uid
                if uid in seen:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"uid {uid} sent twice")
                seen.add(uid)
                e = experts.get(uid)
                if e is None:
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_EXPERT, f"expert {uid} is not loaded here"
                    )
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
                x = P.frame_tensor(fr.buffer, dt, shape)
                t0 = perf()
                try:
                    y = e.kernel(x) if shape[0] else x
                except Exception as err:  # noqa: BLE001 - a faulty expert is reported, the agent serves on
                    raise ProtocolError(
                        ErrorCode.INTERNAL, f"{uid}: {type(err).__name__}: {err}"
                    ) from None
                ms = (perf() - t0) * 1e3
                if y is not x and (tuple(y.shape) != shape or y.dtype != x.dtype):
                    raise ProtocolError(
                        ErrorCode.INTERNAL, f"{uid}: expert returned {y.dtype}{list(y.shape)}"
                    )
                e.calls += 1
                e.rows += shape[0]
                e.compute_ms += ms
                uid_ms[uid] = ms
                self.counters.rows += shape[0]
                out_desc.append(desc)  # == [uid, dt, [rows, cols]] (checked above)
                # the input's own bytes (an expert that returned its input or a contiguous view of
                # it): send the received frame back as it is, shared with libzmq, not copied
                if y is x or (
                    shape[0]
                    and y.data_ptr() == x.data_ptr()
                    and y.is_contiguous()
                    and y.device.type == "cpu"
                ):
                    out_bufs.append(fr)
                else:
                    out_bufs.append(P.tensor_buffer(y))
            except ProtocolError as err:
                errors[key[:64]] = [int(err.code), err.message]
                self._count_error(err.code)
        self.counters.forward_calls += 1
        e_end = self._now_j()
        compute_ms = (perf() - start) * 1e3
        return (
            {
                "t": out_desc,
                "errors": errors,
                "queue_ms": queue_ms,
                "compute_ms": compute_ms,
                "uid_ms": uid_ms,
                "energy_j": [e_start, max(e_start, e_end)],
            },
            out_bufs,
        )

    # ---- dispatch ------------------------------------------------------------------------
    def _count_error(self, code: ErrorCode) -> None:
        self.counters.errors += 1
        self.counters.by_code[int(code)] = self.counters.by_code.get(int(code), 0) + 1

    def _recv(self, flags: int) -> _Pending:
        """Receive one whole request (raises ``zmq.Again`` when none came within ``flags`` /
        ``RCVTIMEO``): envelope (identity + optional empty delimiter), then the body frames.

        Frame by frame with ``Frame.more`` (recv_multipart asks the socket for ``RCVMORE`` per
        part, a Python-level call each); the header is kept as ``bytes``, tensor frames as
        ``zmq.Frame`` (their buffers are viewed, and sent back as they are when an expert
        returns its input)."""
        recv = self.sock.recv
        fr = recv(flags, copy=False)
        env: list[Any] = [fr.bytes]
        body: list[Any] = []
        nbytes = 0
        if fr.more:
            fr = recv(0, copy=False)
            hb = fr.bytes
            if not hb:  # the optional empty delimiter (a REQ-style peer)
                env.append(hb)
                if fr.more:
                    fr = recv(0, copy=False)
                    hb = fr.bytes
                else:
                    hb = None
            if hb is not None:
                body.append(hb)
                nbytes = len(hb)
                while fr.more:
                    fr = recv(0, copy=False)
                    body.append(fr)
                    nbytes += len(fr)
        return _Pending(env, body, time.time_ns(), time.perf_counter(), nbytes)

    def handle(self, item: _Pending) -> None:
        """Process one queued request and send its reply."""
        self.counters.requests += 1
        body = item.frames
        rid: Any = None
        bufs: list[Any] = []
        try:
            if item.nbytes > self.max_message_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"message of {item.nbytes} bytes > limit {self.max_message_bytes}",
                )
            if not body:
                raise ProtocolError(ErrorCode.BAD_HEADER, "no header frame")
            h = P.unpack(body[0])
            rid = h.get("id")
            op = h.get("op")
            if not isinstance(op, str):
                raise ProtocolError(
                    ErrorCode.BAD_HEADER,
                    "missing op" if op is None else f"op must be a string, got {P.brief(op)}",
                )
            if op == "forward":
                fields, bufs = self._op_forward(h, body, item)
            else:
                if op not in P.OPS:
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_OP,
                        f"unknown op {P.brief(op, 40)}; use one of {list(P.OPS)}",
                    )
                if len(body) > 1:
                    raise ProtocolError(ErrorCode.BAD_FRAMES, f"op {op} takes no data frames")
                if op == "ping":
                    fields = {"energy_j": self.meter.read().energy_j}
                elif op == "status":
                    fields = {"status": self.status()}
                elif op == "load":
                    fields = self._op_load(h)
                elif op == "unload":
                    fields = self._op_unload(h)
                else:  # shutdown
                    fields = {}
                    self._stop = True
            # rid is an int or None here (unpack checked it)
            reply = {"v": P.PROTOCOL_VERSION, "id": rid, "code": 0, "t1_ns": item.recv_ns, **fields}
        except ProtocolError as err:
            self._count_error(err.code)
            reply = P.reply_header(rid, err.code, err.message, t1_ns=item.recv_ns)
            bufs = []
        except Exception as err:  # never let one request kill the agent
            log.exception("internal error")
            self._count_error(ErrorCode.INTERNAL)
            reply = P.reply_header(
                rid, ErrorCode.INTERNAL, f"{type(err).__name__}: {err}", t1_ns=item.recv_ns
            )
            bufs = []
        reply["t2_ns"] = time.time_ns()
        try:
            # frame by frame with plain int flags (send_multipart's enum arithmetic costs more than
            # the send); small frames copied, large ones zero-copy; a received frame sent back as
            # it is (an expert that returned its input) is shared with libzmq, never copied
            send = self.sock.send
            for f in item.envelope:
                send(f, _SNDMORE)
            if not bufs:
                send(P.pack(reply), 0)
            else:
                send(P.pack(reply), _SNDMORE)
                last = len(bufs) - 1
                for i, b in enumerate(bufs):
                    send(
                        b,
                        0 if i == last else _SNDMORE,
                        copy=not (b.__class__ is zmq.Frame or len(b) >= _ZEROCOPY_MIN),
                    )
        except zmq.ZMQError as err:  # peer gone or envelope invalid: nothing to reply to
            log.warning("reply not sent: %s", err)

    def _drain(self) -> None:
        """Queue every request that has already arrived (no waiting)."""
        # EVENTS first: cheaper than provoking zmq.Again on the hot path
        queue, sock = self.queue, self.sock
        while len(queue) < self.max_queue and sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                queue.append(self._recv(_NOBLOCK))
            except zmq.Again:
                return

    #: a :class:`device_agent.hello.HelloGate` (``serve --hello-s``): publish only when the
    #: status moved by more than its delta (or its keep-alive is due); None: every period
    hello: Any = None

    def publish_status(self) -> None:
        if self.pub_sock is not None:
            st = self.status()
            if self.hello is not None:
                from device_agent.hello import hello_values

                if not self.hello.should_send(hello_values(st), time.monotonic()):
                    return
            try:
                self.pub_sock.send_multipart(
                    [b"status", P.pack({"v": P.PROTOCOL_VERSION, "status": st})], flags=zmq.NOBLOCK
                )
            except zmq.Again:
                pass

    def stop(self, *_: Any) -> None:
        """Ask the loop to exit (signal-handler safe)."""
        self._stop = True

    def serve_forever(self, poll_ms: int = 100) -> None:
        """Serve until ``shutdown``/:meth:`stop`/SIGTERM; then close cleanly.

        With an empty queue the loop blocks in the socket's own receive (``RCVTIMEO`` bounds
        the wait: no poller, no extra readiness check per request); after each receipt it
        queues whatever else has arrived, then handles the oldest request."""
        sock, queue = self.sock, self.queue
        timeo = -2
        next_pub = time.monotonic()
        try:
            while not self._stop:
                if not queue:
                    wait_ms = poll_ms
                    if self.pub_sock is not None:
                        wait_ms = max(0, min(wait_ms, int((next_pub - time.monotonic()) * 1e3)))
                    if wait_ms != timeo:
                        sock.setsockopt(_RCVTIMEO, wait_ms)
                        timeo = wait_ms
                    try:
                        queue.append(self._recv(0))
                    except zmq.Again:  # nothing within wait_ms (or a signal): loop
                        pass
                    if queue:
                        self._drain()
                else:
                    self._drain()
                if queue:
                    self.handle(queue.popleft())
                if self.pub_sock is not None and time.monotonic() >= next_pub:
                    self.publish_status()
                    next_pub = time.monotonic() + self.status_period_s
        finally:
            self.close()

    def close(self) -> None:
        # a short linger: the last replies (the shutdown's own) still leave; LINGER 0 could drop them
        self.sock.close(linger=1000)
        if self.pub_sock is not None:
            self.pub_sock.close(0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
        self.meter.close()
        if self.ready_file is not None:
            try:
                self.ready_file.unlink()
            except OSError:
                pass
        log.info(
            "agent pid %d: shut down cleanly (%d requests, %d errors)",
            os.getpid(),
            self.counters.requests,
            self.counters.errors,
        )


def install_signal_handlers(server: AgentServer) -> None:
    """SIGTERM and SIGINT stop the loop after the current request."""
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
