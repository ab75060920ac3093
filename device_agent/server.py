"""The device agent: a ZeroMQ ROUTER server that runs routed experts for the base station.

Single-threaded for compute, but queue-aware: every loop turn first drains all requests that
have arrived (stamping their receipt time), then runs the oldest one, so the reply's
``queue_ms`` (receipt -> compute start) shows how long work waited behind other work. A PUB
socket (optional) publishes the agent's status every ``status_period_s``.

The server keeps the sockets, the queue, the loop and the dispatch of ops; its collaborators:
:mod:`device_agent.transport` (the sockets' frame-level I/O), :mod:`device_agent.experts` (the
loaded experts, ``load``/``unload``), :mod:`device_agent.forward` (the ``forward`` op),
:mod:`device_agent.lm` (whole models, ``load_model``/``unload_model``/``lm``) and
:mod:`device_agent.status` (counters, the status report).

See :mod:`device_agent.protocol` for the messages and error codes. This module must not
import ``testbed`` (a device install stays small).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from device_agent import protocol as P
from device_agent.energy import Meter, MeterOptions, detect_meter
from device_agent.experts import (
    ExpertStore,
    pick_device,
    resolve_in_workdir,  # noqa: F401 - still imported from here by tests/unit/test_agent_protocol.py
)
from device_agent.forward import ForwardOp
from device_agent.lm import LM_OPS, LMOp
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.security import CurveServer, ServerKeys
from device_agent.status import Counters, StatusReport
from device_agent.transport import Request, pub_socket, recv_request, router_socket, send_reply

log = logging.getLogger("device_agent")

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
#: most token rows in one tensor, and tensors (experts) in one forward request
DEFAULT_MAX_ROWS = 1 << 16
DEFAULT_MAX_TENSORS = 1024

# plain ints: zmq's enum members make every flag operation a Python-level enum call
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVTIMEO = int(zmq.RCVTIMEO)


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` atomically (a ``.part`` file, then renamed)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


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
        # keys first: a bad key file fails before any socket or meter exists
        self.curve_keys = ServerKeys.from_dir(curve_dir) if curve_dir is not None else None
        self.meter: Meter = meter if isinstance(meter, Meter) else detect_meter("/", meter)
        first = self.meter.read()
        self.max_message_bytes = int(max_message_bytes)
        self.status_period_s = float(status_period_s)
        self.max_queue = max_queue
        self.counters = Counters()
        self.queue: collections.deque[Request] = collections.deque()
        self._stop = False
        try:
            self.store = ExpertStore(workdir, pick_device(device), self.counters)
            self.workdir, self.device = self.store.workdir, self.store.device
            self.experts = self.store.experts
            self.forward = ForwardOp(
                self.experts, self.counters, self.meter.now_j, max_rows, max_tensors
            )
            self.lm = LMOp(self.workdir, self.device, self.counters, self.meter.now_j)
            if threads:
                torch.set_num_threads(int(threads))
            self.started_ns = time.time_ns()
            self._open_sockets(bind, pub)
            self.report = StatusReport(
                self.meter,
                first,
                self.status_period_s,
                endpoint=self.endpoint,
                device=self.device,
                started_ns=self.started_ns,
                max_message_bytes=self.max_message_bytes,
                models=self.lm.store.describe,
            )
            self.ready_file = Path(ready_file) if ready_file else None
            self._announce()
        except BaseException:
            if getattr(self, "curve", None) is not None:
                self.curve.stop()
            self.meter.close()
            raise

    def _open_sockets(self, bind: str, pub: str | None) -> None:
        """The ZeroMQ context, the CURVE authenticator (with keys), the ROUTER and the optional
        status PUB, bound."""
        self.ctx = zmq.Context()
        self.curve = CurveServer(self.ctx, self.curve_keys) if self.curve_keys else None
        self.sock = router_socket(self.ctx, self.curve, self.max_message_bytes)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_sock: zmq.Socket | None = None
        self.pub_endpoint: str | None = None
        if pub:
            self.pub_sock = pub_socket(self.ctx, self.curve)
            self.pub_sock.bind(pub)
            self.pub_endpoint = self.pub_sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _announce(self) -> None:
        """Write the ready file (when asked for) and log where the agent serves."""
        if self.ready_file:
            write_ready_file(
                self.ready_file,
                {
                    "endpoint": self.endpoint,
                    "pub_endpoint": self.pub_endpoint,
                    "pid": os.getpid(),
                    "device": self.device,
                    "energy_source": self.meter.energy_source,
                    "curve_public": (self.curve_keys.public.decode() if self.curve_keys else None),
                },
            )
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

    def status(self) -> dict[str, Any]:
        """The agent's live state (loaded experts, memory, load, power, clock)."""
        return self.report.build(self.store.describe(), self.counters, len(self.queue))

    # ---- requests ------------------------------------------------------------------------
    def handle(self, item: Request) -> None:
        """Process one queued request and send its reply."""
        self.counters.requests += 1
        rid: Any = None
        bufs: list[Any] = []
        try:
            if item.nbytes > self.max_message_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"message of {item.nbytes} bytes > limit {self.max_message_bytes}",
                )
            if not item.frames:
                raise ProtocolError(ErrorCode.BAD_HEADER, "no header frame")
            h = P.unpack(item.frames[0])
            rid = h.get("id")
            fields, bufs = self._dispatch(h, item)
            # rid is an int or None here (unpack checked it)
            reply = {"v": P.PROTOCOL_VERSION, "id": rid, "code": 0, "t1_ns": item.recv_ns, **fields}
        except ProtocolError as err:
            self.counters.count_error(err.code)
            reply = P.reply_header(rid, err.code, err.message, t1_ns=item.recv_ns)
            bufs = []
        except Exception as err:  # never let one request kill the agent
            log.exception("internal error")
            self.counters.count_error(ErrorCode.INTERNAL)
            reply = P.reply_header(
                rid, ErrorCode.INTERNAL, f"{type(err).__name__}: {err}", t1_ns=item.recv_ns
            )
            bufs = []
        reply["t2_ns"] = time.time_ns()
        send_reply(self.sock, item.envelope, reply, bufs)

    def _dispatch(self, h: dict[str, Any], item: Request) -> tuple[dict[str, Any], list[Any]]:
        """Run the request's op: the reply's fields (beyond ``v``, ``id``, ``code``) and
        frames."""
        op = h.get("op")
        if not isinstance(op, str):
            raise ProtocolError(
                ErrorCode.BAD_HEADER,
                "missing op" if op is None else f"op must be a string, got {P.brief(op)}",
            )
        if op == "forward":
            return self.forward(h, item.frames, item.recv_perf)
        if op not in P.OPS:
            raise ProtocolError(
                ErrorCode.UNKNOWN_OP, f"unknown op {P.brief(op, 40)}; use one of {list(P.OPS)}"
            )
        if len(item.frames) > 1:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"op {op} takes no data frames")
        if op == "ping":
            return {"energy_j": self.meter.read().energy_j}, []
        if op == "status":
            return {"status": self.status()}, []
        if op == "load":
            return self.store.load(h), []
        if op == "unload":
            return self.store.unload(h), []
        if op in LM_OPS:
            return self.lm.dispatch(op, h, item.recv_perf)
        self._stop = True  # shutdown
        return {}, []

    def _drain(self) -> None:
        """Queue every request that has already arrived (no waiting)."""
        # EVENTS first: cheaper than provoking zmq.Again on the hot path
        queue, sock = self.queue, self.sock
        while len(queue) < self.max_queue and sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                queue.append(recv_request(sock, _NOBLOCK))
            except zmq.Again:
                return

    #: a :class:`device_agent.hello.HelloGate` (``serve --hello-s``): publish only when the
    #: status moved by more than its delta (or its keep-alive is due); None: every period
    hello: Any = None

    def publish_status(self) -> None:
        """Publish the status on the feed (if any), unless the hello gate holds it back."""
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
                        queue.append(recv_request(sock, 0))
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
        """Close the sockets, the CURVE authenticator, the context and the meter; remove the
        ready file."""
        # a short linger: the last replies (the shutdown's own) still leave; LINGER 0 drops them
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
