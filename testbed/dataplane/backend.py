"""BS side of the data plane: an expert backend whose experts run on device agents.

:class:`RemoteExpertBackend` implements ``models.backend.ExpertBackend``: per MoE layer it
groups the layer's experts by the device holding each one, sends one ``forward`` request per
device (a DEALER socket per device, all sent before any reply is awaited), then waits on all
devices at once (zmq_poll on their sockets; one device: a blocking receive; a wait longer than
50 ms wakes every 50 ms to look after the connections). Every request has
a deadline; on a timeout, an error reply or an unreachable device the affected experts are
re-routed to a replica when the placement has one, otherwise reported in ``LayerResult.failed`` (the split MoE block then drops them and
renormalises). Nothing here is fatal to generation. A connection that stalls (a request
unacknowledged for ``tcp_user_timeout_s``: the kernel drops it) is replaced, and the requests
waiting on it are sent again on the fresh one (see :meth:`RemoteExpertBackend.reconnect`).

``LayerResult.info["calls"]`` holds one row per (expert, attempt): uid, device, tokens, bytes,
status, and the timing breakdown serialise / network (= round trip - device time) / device
queue / device compute, plus one-way up/down estimates that use the clock offsets measured by
:meth:`RemoteExpertBackend.estimate_clock_offsets` (NTP-style, best of several pings). A served
call's row also has ``energy_j``: the device meter's joules over the reply's compute window
(the agent's ``energy_j = [start, end]`` stamps), shared among the reply's experts by compute
time (:func:`testbed.dataplane.energy_attr.split_call_energy`), and ``energy_source``, the agent's meter
label as its status said at :meth:`RemoteExpertBackend.connect`.

:class:`~testbed.dataplane.status_feed.StatusFeed` (importable from here too) subscribes to the
agents' status PUB sockets for a live cluster view.
"""

from __future__ import annotations

import itertools
import math
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from device_agent import protocol as P
from device_agent.memtune import keep_large_buffers
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.security import CurveClient, CurveKeyError

from ..errors import AgentError, TestbedError
from .energy_attr import call_energy_j, split_call_energy
from .status_feed import StatusFeed

try:  # the models package is needed for the backend protocol types only
    from models.backend import LayerResult, LayerWork
except ImportError:  # pragma: no cover - models always ships with the BS
    LayerResult = LayerWork = None  # type: ignore[assignment,misc]

__all__ = ["ClockEstimate", "RemoteExpertBackend", "StatusFeed", "round_robin_placement"]

# plain ints: zmq's enum members make every flag operation a Python-level enum call
_NOBLOCK = int(zmq.NOBLOCK)
_NB_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_RCVTIMEO = int(zmq.RCVTIMEO)
_POLL_ITEM = int(zmq.POLLIN)
_EV_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
#: while requests are out, the wait wakes this often to look after lost connections (a reply
#: ends the wait at once; only calls slower than this see the wake-ups)
_TEND_MS = 50
#: dtypes whose CPU tensors numpy views directly (bfloat16 goes through P.tensor_buffer)
_NP_VIEWABLE = frozenset((torch.float32, torch.float16))
_NO_ENERGY: dict[str, float] = {}  #: shared, never written: a reply without energy stamps


def round_robin_placement(
    uids: Iterable[str], devices: Sequence[str], replicas: int = 1
) -> dict[str, list[str]]:
    """uid -> devices holding it: expert ``i`` on devices ``i, i+1, ...`` (``replicas`` of them).

    The first device of each list is the primary; the rest are replicas tried in order.
    """
    if not devices or not 1 <= replicas <= len(devices):
        raise ValueError(f"replicas must be 1..{len(devices)}")
    return {
        u: [devices[(i + r) % len(devices)] for r in range(replicas)] for i, u in enumerate(uids)
    }


def _option_ms(name: str, value: object, zero: bool = True) -> int:
    """A duration option in seconds as whole milliseconds for a socket option (0 allowed
    when ``zero``); raises ValueError naming the option."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
        and value <= 3600
    )
    if not ok:
        least = "0 or more" if zero else "more than 0"
        raise ValueError(
            f"{name} must be a number of seconds, {least} and at most 3600, got {value!r}"
        )
    return max(1, round(value * 1e3)) if value else 0  # type: ignore[operator]


@dataclass
class ClockEstimate:
    """NTP-style estimate from the ping with the smallest round trip.

    ``offset_ns`` = device clock - BS clock; ``rtt_ms`` excludes the device's own time.
    """

    offset_ns: int
    rtt_ms: float
    samples: int


@dataclass
class _Agent:
    name: str
    endpoint: str
    sock: zmq.Socket
    clock: ClockEstimate | None = None
    down_until: float = 0.0
    failures: int = 0
    rcvtimeo: int = -1  #: the socket's RCVTIMEO as last set (the one-device wait blocks in recv)
    energy_source: str | None = None  #: the agent's meter label (its status), set by connect()
    renewed: bool = False  #: the connection was renewed (reconnect) and has carried no call yet
    mon: zmq.Socket | None = None  #: PAIR receiving the socket's EVENT_DISCONNECTED notices


@dataclass(slots=True)
class _Call:
    rid: int
    device: str
    uids: list[str]
    attempt: int
    t0_ns: int
    deadline: float
    serialize_ms: float
    bytes_out: dict[str, int] = field(default_factory=dict)
    descs: list[list[Any]] = field(
        default_factory=list
    )  #: the request's ``t`` (a full reply echoes it)
    sock: Any = None  #: the socket the request went out on
    frames: tuple[Any, ...] = ()  #: (header, buffers): re-sent as they are on a fresh connection


class RemoteExpertBackend:
    """Expert backend over ZeroMQ device agents.

    Parameters
    ----------
    agents
        device name -> agent ROUTER endpoint (``tcp://10.77.0.11:5555``).
    placement
        uid -> device names holding it, primary first (replicas after). Experts with no entry
        are reported failed (``"not placed"``).
    timeout_s
        Deadline of every request, from its send.
    down_backoff_s
        After a timeout or a send failure the device is skipped (its experts re-routed or
        failed at once) for this long, then tried again.
    curve
        The BS's CURVE keypair and every agent's public key
        (:class:`device_agent.security.CurveClient`); ``None`` for agents started without
        ``--curve-dir``.
    io_threads
        ZeroMQ I/O threads of the backend's context (libzmq's default: 1). One I/O thread
        moves the bytes of every device's connection in turn; with several the connections
        are spread over them. Measured on a 16-core host (``bench/dataplane.py --io-threads``,
        loopback, 8 agents): 4 threads gave no faster fan-out and slower single calls, so 1
        stays the default; more may pay off for many devices on fast links.
    tcp_user_timeout_s
        A connection whose sent data (a request) stays unacknowledged this long is dropped by
        the kernel (``TCP_USER_TIMEOUT``, set through ``ZMQ_TCP_MAXRT``); the backend then
        opens a fresh one and re-sends the requests still waiting, with their own deadlines.
        After a cut link comes back, the old connection would otherwise wait out its
        retransmission back-off (0.2 s doubling: seconds after a cut of seconds). A working
        link, however slow, acknowledges within a packet's time, so this only ends stalls.
        ``0`` turns it off.
    connect_timeout_s
        A renewed connection's TCP handshake (SYN-SENT) is given up after this long and a fresh
        one started ``reconnect_ivl_s`` later (``ZMQ_CONNECT_TIMEOUT``), instead of waiting
        for the kernel's SYN retransmissions 1 s, 3 s, 7 s after the first. Raised to 4x the
        agent's measured round trip when that is longer. First connections have none (their
        round trip is unknown). ``0``: the kernel's own retries.
    reconnect_ivl_s
        Pause between connection attempts (``ZMQ_RECONNECT_IVL``, plus up to as much again at
        random); it does not grow, so the first attempt after a link comes back is at most
        ``connect_timeout_s + 2 * reconnect_ivl_s`` away.
    """

    def __init__(
        self,
        agents: Mapping[str, str],
        placement: Mapping[str, Sequence[str]] | None = None,
        *,
        timeout_s: float = 5.0,
        down_backoff_s: float = 2.0,
        curve: CurveClient | None = None,
        io_threads: int = 1,
        tcp_user_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.2,
        reconnect_ivl_s: float = 0.05,
    ) -> None:
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1:
            raise ValueError(f"io_threads must be a positive integer, got {io_threads!r}")
        #: socket option values in ms (0: not set)
        self._user_timeout_ms = _option_ms("tcp_user_timeout_s", tcp_user_timeout_s)
        self._connect_timeout_ms = _option_ms("connect_timeout_s", connect_timeout_s)
        self._reconnect_ivl_ms = _option_ms("reconnect_ivl_s", reconnect_ivl_s, zero=False)
        self.curve = curve
        keep_large_buffers()  # reply frames of 1 MiB+ would page-fault fresh mmap pages per call
        self.ctx = zmq.Context(io_threads=io_threads)
        self.timeout_s = float(timeout_s)
        self.down_backoff_s = float(down_backoff_s)
        self.placement: dict[str, list[str]] = {u: list(d) for u, d in (placement or {}).items()}
        self.agents: dict[str, _Agent] = {}
        self._ids = itertools.count(1)
        self._by_sock: dict[zmq.Socket, _Agent] = {}
        self.stale_replies = 0
        #: device -> connections renewed after a timeout or a lost connection (:meth:`reconnect`)
        self.reconnects: dict[str, int] = {}
        #: device -> requests re-sent on a fresh connection after theirs was lost
        self.resent: dict[str, int] = {}
        self._monitors = itertools.count(1)
        #: how long the first call on a renewed connection waits for its handshake
        self._renew_wait_ms = int(min(self.timeout_s, 0.5) * 1e3)
        for name, ep in agents.items():
            self.add_agent(name, ep)

    @property
    def io_threads(self) -> int:
        """The ZeroMQ I/O threads of the backend's context."""
        return int(self.ctx.get(zmq.IO_THREADS))

    # ---- connections ---------------------------------------------------------------------
    def add_agent(self, name: str, endpoint: str, connect_timeout_ms: int = 0) -> None:
        """Open a DEALER to ``endpoint`` (sends fail at once while it is not connected)."""
        s = self.ctx.socket(zmq.DEALER)
        if self.curve is not None:
            try:
                self.curve.secure(s, name)
            except CurveKeyError as e:
                s.close(0)
                raise TestbedError(str(e)) from None
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.RECONNECT_IVL, self._reconnect_ivl_ms)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 0)  # no doubling
        if connect_timeout_ms:
            s.setsockopt(zmq.CONNECT_TIMEOUT, connect_timeout_ms)
        if self._user_timeout_ms:
            s.setsockopt(zmq.TCP_MAXRT, self._user_timeout_ms)  # TCP_USER_TIMEOUT on Linux
        # a lost connection (the user timeout, a reset) is reported here: its requests are
        # re-sent on a fresh one instead of waiting for their deadlines
        mon = s.get_monitor_socket(
            _EV_DISCONNECTED, f"inproc://remote-backend-{id(self):x}-{next(self._monitors)}"
        )
        a = _Agent(name, endpoint, s, mon=mon)
        try:
            s.connect(endpoint)
        except zmq.ZMQError:
            self._close_agent(a)
            raise
        self.agents[name] = a
        self._by_sock[s] = a

    def reconnect(self, name: str) -> None:
        """Replace the connection to ``name`` by a fresh one, keeping what is known of the agent
        (the Lazy Pirate pattern): after a call's timeout, or when the kernel dropped the
        connection (``tcp_user_timeout_s``). The old TCP connection may sit in its
        retransmission back-off for seconds after a cut link comes back (0.2 s doubling), and
        whatever it still queues is stale; a new connection starts with a fresh back-off. Its
        handshake gets ``connect_timeout_s`` (at least 4x the agent's measured round trip)
        before a fresh attempt replaces it: a SYN lost in the cut is not waited for (the
        kernel would retry after 1 s, then 3 s, 7 s), and a handshake without retried SYNs
        does not start the connection with the 3 s fallback RTO."""
        old = self.agents[name]
        ct_ms = self._connect_timeout_ms
        if ct_ms and old.clock is not None:
            ct_ms = max(ct_ms, int(4 * old.clock.rtt_ms))
        # replaced in place, never popped and re-added: the device keeps its key (and its place)
        # in self.agents, so a loop over the devices whose call renews one goes on unharmed
        self.add_agent(name, old.endpoint, connect_timeout_ms=ct_ms)
        self._close_agent(self._by_sock.pop(old.sock))
        new = self.agents[name]
        new.clock, new.down_until, new.failures = old.clock, old.down_until, old.failures
        new.energy_source = old.energy_source
        new.renewed = True  # its first call waits a little for the handshake (not for a dead peer)
        self.reconnects[name] = self.reconnects.get(name, 0) + 1

    def remove_agent(self, name: str) -> None:
        """Close the connection to ``name`` and forget it (its experts then fail or re-route)."""
        a = self.agents.pop(name)
        del self._by_sock[a.sock]
        self._close_agent(a)

    @staticmethod
    def _close_agent(a: _Agent) -> None:
        if a.mon is not None:
            a.sock.disable_monitor()
            a.mon.close(0)
        a.sock.close(0)

    def close(self) -> None:
        """Close every socket (pending requests are abandoned)."""
        for a in self.agents.values():
            self._close_agent(a)
        self.agents.clear()
        self.ctx.term()

    def __enter__(self) -> RemoteExpertBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _agent(self, device: str) -> _Agent:
        try:
            return self.agents[device]
        except KeyError:
            raise AgentError(device, f"unknown device (have {sorted(self.agents)})") from None

    def _lost(self, a: _Agent) -> bool:
        """Whether ``a``'s connection dropped since last asked (reads its monitor's notices)."""
        mon = a.mon
        lost = False
        while mon is not None and mon.get(_EVENTS) & _POLLIN:
            ev = mon.recv_multipart()  # [event id (uint16) + value (uint32), endpoint]
            lost = lost or (
                len(ev[0]) >= 2 and struct.unpack_from("<H", ev[0])[0] == _EV_DISCONNECTED
            )
        return lost

    @staticmethod
    def _recv_body(sock: zmq.Socket) -> list[zmq.Frame]:
        msg = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        return msg[1:] if msg and len(msg[0]) == 0 else msg

    # ---- control requests ----------------------------------------------------------------
    def request(
        self,
        device: str,
        op: str,
        *,
        timeout_s: float | None = None,
        check: bool = True,
        frames: Sequence[Any] = (),
        **fields: Any,
    ) -> tuple[dict[str, Any], list[zmq.Frame]]:
        """Send one request to ``device`` and wait for its reply (synchronous).

        Returns ``(header, data frames)``; replies to other, older requests are discarded.

        Raises
        ------
        AgentError
            On timeout, or (``check``) when the reply's ``code`` is not 0.
        """
        a = self._agent(device)
        if self._lost(a):
            self.reconnect(device)
            a = self.agents[device]
        budget_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget_s
        rid = next(self._ids)
        hb = P.pack({"v": P.PROTOCOL_VERSION, "op": op, "id": rid, **fields})
        if not a.sock.poll(max(0, int((deadline - time.monotonic()) * 1e3)), zmq.POLLOUT):
            raise AgentError(device, f"{op}: not connected to {a.endpoint} within {budget_s:g} s")
        a.sock.send_multipart([b"", hb, *frames], copy=False, flags=zmq.NOBLOCK)
        while True:
            left_ms = int(math.ceil((deadline - time.monotonic()) * 1e3))
            if left_ms <= 0 or not a.sock.poll(left_ms, zmq.POLLIN):
                raise AgentError(device, f"{op}: no reply from {a.endpoint} within {budget_s:g} s")
            body = self._recv_body(a.sock)
            try:
                h = P.unpack(body[0].buffer)
            except (ProtocolError, IndexError):
                self.stale_replies += 1
                continue
            if h.get("id") != rid:
                self.stale_replies += 1
                continue
            if check and h.get("code", 0) != 0:
                raise AgentError(
                    device, f"{op}: error {h.get('code')} ({h.get('error')})", h.get("code")
                )
            return h, body[1:]

    def ping(self, device: str, timeout_s: float | None = None) -> dict[str, Any]:
        """One ping; returns ``t0_ns``/``t1_ns``/``t2_ns``/``t3_ns``, ``rtt_ms``, ``offset_ns``."""
        t0 = time.time_ns()
        h, _ = self.request(device, "ping", timeout_s=timeout_s)
        t3 = time.time_ns()
        t1, t2 = int(h["t1_ns"]), int(h["t2_ns"])
        return {
            "t0_ns": t0,
            "t1_ns": t1,
            "t2_ns": t2,
            "t3_ns": t3,
            "rtt_ms": ((t3 - t0) - (t2 - t1)) / 1e6,
            "offset_ns": ((t1 - t0) + (t2 - t3)) // 2,
        }

    def connect(self, timeout_s: float = 15.0, pings: int = 5) -> dict[str, ClockEstimate]:
        """Wait until every agent answers a ping, then estimate their clock offsets."""
        deadline = time.monotonic() + timeout_s
        for name in list(self.agents):
            while True:
                try:
                    self.ping(name, timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))
                    break
                except AgentError:
                    if time.monotonic() >= deadline:
                        raise
        self.fetch_energy_sources()
        return self.estimate_clock_offsets(pings)

    def fetch_energy_sources(self) -> dict[str, str | None]:
        """Ask every agent for its meter's label (``energy_source`` of its status; call rows
        carry it). An agent that does not say keeps ``None``."""
        for name in list(self.agents):  # the agent after the call (a lost one is renewed)
            src = self.status(name).get("energy_source")
            self.agents[name].energy_source = src if isinstance(src, str) else None
        return {n: a.energy_source for n, a in self.agents.items()}

    def estimate_clock_offsets(self, pings: int = 5) -> dict[str, ClockEstimate]:
        """NTP-style offsets, keeping the minimum-RTT sample of ``pings`` per agent."""
        out: dict[str, ClockEstimate] = {}
        for name in list(self.agents):
            best = min((self.ping(name) for _ in range(pings)), key=lambda p: p["rtt_ms"])
            out[name] = ClockEstimate(int(best["offset_ns"]), float(best["rtt_ms"]), pings)
            self.agents[name].clock = out[name]  # the agent now: a ping may have renewed it
        return out

    def status(self, device: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The agent's ``status`` map."""
        return self.request(device, "status", timeout_s=timeout_s)[0]["status"]

    def load_experts(
        self, device: str, specs: Sequence[Mapping[str, Any]], timeout_s: float = 120.0
    ) -> list[str]:
        """Load experts on ``device`` (see the ``load`` op); raises if any failed."""
        h, _ = self.request(device, "load", timeout_s=timeout_s, experts=[dict(s) for s in specs])
        if h.get("errors"):
            raise AgentError(device, f"load failed: {h['errors']}")
        return list(h["loaded"])

    def unload_experts(self, device: str, uids: Sequence[str]) -> list[str]:
        return list(self.request(device, "unload", uids=list(uids))[0]["unloaded"])

    def shutdown_agent(self, device: str, timeout_s: float = 5.0) -> None:
        """Ask the agent to exit cleanly."""
        self.request(device, "shutdown", timeout_s=timeout_s)

    # ---- the data plane ------------------------------------------------------------------
    def is_up(self, device: str) -> bool:
        """False while ``device`` is in its back-off after a failure."""
        return time.monotonic() >= self.agents[device].down_until

    def _mark_down(self, device: str) -> None:
        a = self.agents[device]
        a.failures += 1
        a.down_until = time.monotonic() + self.down_backoff_s

    def run_layer(self, work: LayerWork) -> LayerResult:  # type: ignore[valid-type]
        """Run all experts of one MoE layer on their devices, in parallel (see module doc)."""
        t_start = time.perf_counter()
        outputs: dict[str, Any] = {}
        failed: dict[str, str] = {}
        calls: list[dict[str, Any]] = []
        served_by: dict[str, str] = {}
        inputs = work.inputs
        tried: dict[str, set[str]] = {u: set() for u in inputs}
        pending: dict[int, _Call] = {}

        def row(
            call: _Call | None, uid: str, device: str, attempt: int, status: str, **kw: Any
        ) -> None:
            r = {
                "layer": work.layer,
                "step": work.step,
                "uid": uid,
                "device": device,
                "attempt": attempt,
                "tokens": int(inputs[uid].shape[0]),
                "bytes_out": call.bytes_out.get(uid, 0) if call else 0,
                "bytes_in": 0,
                "status": status,
                "reason": "",
                "req_id": call.rid if call else None,
                "serialize_ms": call.serialize_ms if call else 0.0,
                "rtt_ms": None,
                "network_ms": None,
                "queue_ms": None,
                "compute_ms": None,
                "device_ms": None,
                "up_ms": None,
                "down_ms": None,
                "deserialize_ms": None,
            }
            r.update(kw)
            calls.append(r)

        def pick(uid: str) -> str | None:
            for d in self.placement.get(uid, ()):
                if d in self.agents and d not in tried[uid] and self.is_up(d):
                    return d
            return None

        def dispatch(groups: dict[str, list[str]], attempt: int) -> None:
            # every request goes out first (serialise + send, device after device); the bookkeeping
            # follows, while the requests are on their way
            perf = time.perf_counter
            sent: list[tuple[Any, ...]] = []
            for dev, uids in groups.items():
                a = self.agents[dev]
                t0 = perf()
                rid = next(self._ids)
                descs, bufs, nbytes = [], [], {}
                for u in uids:
                    x = inputs[u]
                    shape = x.shape
                    dt = x.dtype
                    descs.append([u, P.dtype_name(dt), [shape[0], shape[1]]])
                    if (
                        dt in _NP_VIEWABLE
                        and x.is_contiguous()
                        and x.device.type == "cpu"
                        and not x.requires_grad
                    ):
                        b = (
                            x.numpy()
                        )  # the hot path of P.tensor_buffer: a plain view, no memoryview cast
                    else:
                        b = P.tensor_buffer(x)
                    bufs.append(b)
                    nbytes[u] = b.nbytes
                hb = P.pack(
                    {
                        "v": P.PROTOCOL_VERSION,
                        "op": "forward",
                        "id": rid,
                        "layer": work.layer,
                        "step": work.step,
                        "t": descs,
                        "timeout_ms": self.timeout_s * 1e3,
                    }
                )
                ser_ms = (perf() - t0) * 1e3
                t0_ns = time.time_ns()
                err: zmq.ZMQError | None = None
                try:
                    send = a.sock.send
                    # no empty delimiter (the agent's ROUTER takes [header, frames...] from a DEALER);
                    # the first part fails at once (zmq.Again) when there is no live connection
                    try:
                        send(hb, _NB_MORE)
                    except zmq.Again:
                        if self._lost(a):  # dropped since its last call: a fresh connection
                            self.reconnect(dev)
                            a = self.agents[dev]
                            send = a.sock.send
                        # a connection renewed after a timeout may still be in its handshake
                        if not (a.renewed and a.sock.poll(self._renew_wait_ms, _POLLOUT)):
                            raise
                        send(hb, _NB_MORE)
                    if a.renewed:
                        a.renewed = False
                    last = len(bufs) - 1
                    for i, b in enumerate(bufs):
                        # pyzmq's own policy, as the raw echo baseline's: copied below
                        # zmq.COPY_THRESHOLD (64 KiB), zero-copy above (a fresh 1 MiB+ buffer to
                        # copy into page-faults, which costs more than the release notification)
                        send(b, _NOBLOCK if i == last else _NB_MORE, copy=False)
                except zmq.ZMQError as e:  # zmq.Again: no live connection (IMMEDIATE)
                    err = e
                sent.append((dev, uids, rid, t0_ns, ser_ms, nbytes, descs, err, a.sock, (hb, bufs)))
            deadline = time.monotonic() + self.timeout_s
            for dev, uids, rid, t0_ns, ser_ms, nbytes, descs, err, sock, frames in sent:
                for u in uids:
                    tried[u].add(dev)
                call = _Call(
                    rid,
                    dev,
                    list(uids),
                    attempt,
                    t0_ns,
                    deadline,
                    ser_ms,
                    nbytes,
                    descs,
                    sock,
                    frames,
                )
                if err is not None:
                    self._mark_down(dev)
                    fail(call, list(uids), "unreachable", str(err) or "not connected")
                    continue
                pending[rid] = call

        def fail(call: _Call, uids: list[str], status: str, reason: str, **kw: Any) -> None:
            regroup: dict[str, list[str]] = {}
            for u in uids:
                row(call, u, call.device, call.attempt, status, reason=reason, **kw)
                nd = pick(u)
                if nd is not None:
                    regroup.setdefault(nd, []).append(u)
                else:
                    failed[u] = f"{status} on {call.device}: {reason}"[:200]
            if regroup:
                dispatch(regroup, call.attempt + 1)

        first: dict[str, list[str]] = {}
        for u in inputs:
            d = pick(u)
            if d is None:
                holders = self.placement.get(u)
                failed[u] = (
                    "not placed" if not holders else f"all holders down ({', '.join(holders)})"
                )
                row(None, u, holders[0] if holders else "", 0, "skipped", reason=failed[u])
            else:
                first.setdefault(d, []).append(u)
        dispatch(first, 0)

        recv_reply = self._recv_reply
        tend_at = time.monotonic() + _TEND_MS / 1e3
        while pending:
            now = time.monotonic()
            if now >= tend_at:
                self._tend(pending)
                now = time.monotonic()
                tend_at = now + _TEND_MS / 1e3
            if len(pending) == 1:
                # one request out: block in its socket's own receive (RCVTIMEO = time left), no
                # poller and no readiness check per reply
                only = next(iter(pending.values()))
                oa = self.agents.get(only.device)
                if oa is not None:
                    wait_ms = max(0, min(_TEND_MS, int(math.ceil((only.deadline - now) * 1e3))))
                    if oa.rcvtimeo != wait_ms:
                        oa.sock.setsockopt(_RCVTIMEO, wait_ms)
                        oa.rcvtimeo = wait_ms
                    try:
                        body = recv_reply(oa.sock, 0)
                    except zmq.Again:
                        pass
                    else:
                        self._on_reply(oa, body, pending, outputs, served_by, work, calls, fail)
                else:  # its agent was removed: nothing can come; wait for the deadline
                    time.sleep(max(0.0, only.deadline - now))
            else:
                wait_ms = max(
                    0,
                    min(
                        _TEND_MS,
                        int(math.ceil((min(c.deadline for c in pending.values()) - now) * 1e3)),
                    ),
                )
                # only the sockets with a request out (zmq_poll itself, not a Poller of every agent);
                # one message per ready socket and turn: the poll returns at once while more wait
                agents = self.agents
                items = list(
                    {
                        agents[c.device].sock: _POLL_ITEM
                        for c in pending.values()
                        if c.device in agents
                    }.items()
                )
                if not items:  # their agents were removed: nothing can come; wait for the deadline
                    time.sleep(wait_ms / 1e3)
                for sock, _ in zmq.zmq_poll(items, wait_ms) if items else ():
                    try:
                        body = recv_reply(sock, _NOBLOCK)
                    except zmq.Again:
                        continue
                    self._on_reply(
                        self._by_sock[sock], body, pending, outputs, served_by, work, calls, fail
                    )
            if pending:
                now = time.monotonic()
                for rid in [r for r, c in pending.items() if c.deadline <= now]:
                    call = pending.pop(rid)
                    self._mark_down(call.device)
                    if call.device in self.agents and not any(
                        c.device == call.device for c in pending.values()
                    ):
                        self.reconnect(call.device)
                    fail(
                        call,
                        call.uids,
                        "timeout",
                        f"no reply within {self.timeout_s:g} s (connection renewed)",
                    )

        rerouted = {u: d for u, d in served_by.items() if self.placement.get(u, [d])[0] != d}
        return LayerResult(
            outputs,
            failed,
            {
                "wall_s": time.perf_counter() - t_start,
                "calls": calls,
                "served_by": served_by,
                "rerouted": rerouted,
            },
        )

    def _tend(self, pending: dict[int, _Call]) -> None:
        """Look after the connections that requests wait on: one that dropped (the kernel's
        user timeout, a reset) is renewed, and once a fresh connection is up, the requests that
        went out on an older one are sent again on it (same id, same deadline)."""
        for dev in {c.device for c in pending.values()}:
            a = self.agents.get(dev)
            if a is None:
                continue
            if self._lost(a):
                self.reconnect(dev)
                a = self.agents[dev]
            stale = [c for c in pending.values() if c.device == dev and c.sock is not a.sock]
            if not stale or not a.sock.get(_EVENTS) & _POLLOUT:  # none, or not connected yet
                continue
            send = a.sock.send
            for c in stale:
                hb, bufs = c.frames
                try:
                    send(hb, _NB_MORE)
                except zmq.Again:
                    break
                last = len(bufs) - 1
                for i, b in enumerate(bufs):
                    send(b, _NOBLOCK if i == last else _NB_MORE, copy=False)
                c.sock = a.sock
                a.renewed = False
                self.resent[dev] = self.resent.get(dev, 0) + 1

    @staticmethod
    def _recv_reply(sock: zmq.Socket, flags: int) -> list[Any]:
        """One whole reply: [header bytes, data frames...] (a leading empty delimiter dropped).

        Frame by frame with ``Frame.more`` (recv_multipart asks the socket for ``RCVMORE`` per
        part, a Python-level call each). Raises ``zmq.Again`` when none came in time."""
        recv = sock.recv
        fr = recv(flags, copy=False)
        hb = fr.bytes
        if not hb and fr.more:  # a delimiter (replies to requests sent with one)
            fr = recv(0, copy=False)
            hb = fr.bytes
        body: list[Any] = [hb]
        while fr.more:
            fr = recv(0, copy=False)
            body.append(fr)
        return body

    def _on_reply(
        self,
        a: _Agent,
        body: list[Any],
        pending: dict[int, _Call],
        outputs: dict[str, Any],
        served_by: dict[str, str],
        work: Any,
        calls: list[dict[str, Any]],
        fail: Any,
    ) -> None:
        t3 = time.time_ns()
        try:
            h = P.unpack(body[0])
        except ProtocolError:
            self.stale_replies += 1
            return
        call = pending.get(h.get("id"))  # type: ignore[arg-type]
        if call is None or call.device != a.name:
            self.stale_replies += 1  # a reply to a request we gave up on
            return
        del pending[call.rid]
        t1, t2 = h.get("t1_ns"), h.get("t2_ns")
        rtt_ms = (t3 - call.t0_ns) / 1e6
        device_ms = network_ms = up_ms = down_ms = None
        if isinstance(t1, int) and isinstance(t2, int):
            device_ms = (t2 - t1) / 1e6
            network_ms = rtt_ms - device_ms
            if a.clock is not None:
                off = a.clock.offset_ns
                up_ms = (t1 - off - call.t0_ns) / 1e6
                down_ms = (t3 - (t2 - off)) / 1e6
        code = h.get("code", ErrorCode.INTERNAL)
        if code != 0:
            fail(
                call,
                call.uids,
                f"error:{code}",
                str(h.get("error", ""))[:200],
                rtt_ms=rtt_ms,
                device_ms=device_ms,
                network_ms=network_ms,
                up_ms=up_ms,
                down_ms=down_ms,
            )
            return
        queue_ms = h.get("queue_ms")
        uid_ms = h.get("uid_ms") or {}
        t_de = time.perf_counter()
        got: dict[str, Any] = {}
        bytes_in: dict[str, int] = {}
        descs = h.get("t") or []
        bad: list[tuple[str, str]] = []
        inputs = work.inputs
        if not isinstance(descs, list) or len(descs) != len(body) - 1:
            bad = [(u, "reply frames do not match its header") for u in call.uids]
        elif descs == call.descs:  # every expert answered: exactly the tensors that were sent
            for i, (uid, dt, shape) in enumerate(descs):
                fr = body[i + 1]
                try:
                    got[uid] = P.frame_tensor(fr.buffer, dt, (shape[0], shape[1]))
                    bytes_in[uid] = len(fr)
                except ProtocolError as e:
                    bad.append((uid, e.message))
        else:
            for i, desc in enumerate(descs):
                try:
                    uid, dt, shape = P.check_descriptor(desc)
                    x = inputs.get(uid)
                    if (
                        uid not in call.uids
                        or x is None
                        or shape != tuple(x.shape)
                        or dt != P.dtype_name(x.dtype)
                    ):
                        raise ProtocolError(ErrorCode.SHAPE_MISMATCH, f"unexpected output {desc!r}")
                    fr = body[i + 1]
                    got[uid] = P.frame_tensor(fr.buffer, dt, shape)
                    bytes_in[uid] = len(fr)
                except ProtocolError as e:
                    bad.append((str(desc)[:40], e.message))
        de_ms = (time.perf_counter() - t_de) * 1e3
        # the device's meter over the compute window, shared by the experts served
        e_uid: dict[str, float] = _NO_ENERGY
        ej = h.get("energy_j")
        if got and ej is not None:
            # the usual reply (two floats, not decreasing) without a function call
            if (
                ej.__class__ is list
                and len(ej) == 2
                and ej[0].__class__ is float
                and ej[1].__class__ is float
                and ej[1] >= ej[0]
            ):
                e_call: float | None = ej[1] - ej[0]
            else:
                e_call = call_energy_j(ej)
            if e_call is not None:
                e_uid = (
                    dict.fromkeys(got, e_call)
                    if len(got) == 1
                    else split_call_energy(e_call, list(got), uid_ms)
                )
        e_src = a.energy_source
        retry: list[str] = []
        name = a.name
        layer, step, attempt, rid, ser_ms, bytes_out = (
            work.layer,
            work.step,
            call.attempt,
            call.rid,
            call.serialize_ms,
            call.bytes_out,
        )
        for u in call.uids:
            y = got.get(u)
            if y is not None:
                outputs[u] = y
                served_by[u] = name
                calls.append(
                    {
                        "layer": layer,
                        "step": step,
                        "uid": u,
                        "device": name,
                        "attempt": attempt,
                        "tokens": y.shape[0],
                        "bytes_out": bytes_out.get(u, 0),
                        "bytes_in": bytes_in[u],
                        "status": "ok",
                        "reason": "",
                        "req_id": rid,
                        "serialize_ms": ser_ms,
                        "rtt_ms": rtt_ms,
                        "network_ms": network_ms,
                        "queue_ms": queue_ms,
                        "compute_ms": uid_ms.get(u),
                        "device_ms": device_ms,
                        "up_ms": up_ms,
                        "down_ms": down_ms,
                        "deserialize_ms": de_ms,
                        "energy_j": e_uid.get(u),
                        "energy_source": e_src,
                    }
                )
            else:
                retry.append(u)
        if retry:
            errs = h.get("errors") or {}
            first_err = next(iter(errs.values()), None) if errs else None
            reason = "; ".join(
                f"{u}: {errs[u][1]}"
                for u in retry
                if u in errs and isinstance(errs[u], list) and len(errs[u]) == 2
            ) or (bad[0][1] if bad else "missing from reply")
            status = (
                f"error:{first_err[0]}" if isinstance(first_err, list) and first_err else "error"
            )
            timing = {"rtt_ms": rtt_ms, "queue_ms": queue_ms}
            if device_ms is not None:
                timing.update(device_ms=device_ms, network_ms=network_ms)
            if up_ms is not None:
                timing.update(up_ms=up_ms, down_ms=down_ms)
            fail(call, retry, status, reason[:200], **timing)
