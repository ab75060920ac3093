"""BS side of the data plane: an expert backend whose experts run on device agents.

:class:`RemoteExpertBackend` implements ``models.backend.ExpertBackend``: per MoE layer it
groups the layer's experts by the device holding each one, sends one ``forward`` request per
device (a DEALER socket per device, all sent before any reply is awaited), then waits on all
devices at once (zmq_poll on their sockets; one device: a blocking receive; a wait longer than
50 ms wakes every 50 ms to look after the connections). Every request has a deadline; on a
timeout, an error reply or an unreachable device the affected experts are re-routed to a
replica when the placement has one, otherwise reported in ``LayerResult.failed`` (the split
MoE block then drops them and renormalises). Nothing here is fatal to generation. A
connection that stalls (a request unacknowledged for ``tcp_user_timeout_s``: the kernel drops
it) is replaced, and the requests waiting on it are sent again on the fresh one (see
:meth:`RemoteExpertBackend.reconnect`).

``LayerResult.info["calls"]`` holds one row per (expert, attempt): uid, device, tokens, bytes,
status, and the timing breakdown serialise / network (= round trip - device time) / device
queue / device compute, plus one-way up/down estimates that use the clock offsets measured by
:meth:`RemoteExpertBackend.estimate_clock_offsets` (NTP-style, best of several pings). A served
call's row also has ``energy_j``: the device meter's joules over the reply's compute window
(the agent's ``energy_j = [start, end]`` stamps), shared among the reply's experts by compute
time (:func:`testbed.dataplane.energy_attr.split_call_energy`), and ``energy_source``, the
agent's meter label as its status said at :meth:`RemoteExpertBackend.connect`.

Where the parts live: this module holds the backend (its connections, the control requests
and ``run_layer``); :mod:`.connection` one agent's connection (:class:`AgentLink`, the socket
options, :class:`ClockEstimate`); :mod:`.call` one layer's calls (``LayerCall``) and the
per-call ``CallRecord``; :mod:`.inflight` the requests while they are out (sending, waiting,
deadlines, re-sending on a fresh connection); :mod:`.wire` a request's and a reply's bytes;
:mod:`.status_feed` :class:`StatusFeed`, the agents' status PUB sockets for a live cluster
view. ``ClockEstimate`` and ``StatusFeed`` are importable from here too.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import zmq

from device_agent import protocol as P
from device_agent.memtune import keep_large_buffers
from device_agent.protocol import ProtocolError
from device_agent.security import CurveClient

from ..errors import AgentError
from .call import LayerCall
from .connection import AgentLink, ClockEstimate, LinkOptions
from .status_feed import StatusFeed

try:  # the models package is needed for the backend protocol types only
    from models.backend import LayerResult, LayerWork
except ImportError:  # pragma: no cover - models always ships with the BS
    LayerResult = LayerWork = None  # type: ignore[assignment,misc]

__all__ = ["ClockEstimate", "RemoteExpertBackend", "StatusFeed", "round_robin_placement"]


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
        #: socket option values of every connection, in ms
        self.link_options = LinkOptions.from_seconds(
            tcp_user_timeout_s, connect_timeout_s, reconnect_ivl_s
        )
        self.curve = curve
        keep_large_buffers()  # reply frames of 1 MiB+ would page-fault fresh mmap pages per call
        self.ctx = zmq.Context(io_threads=io_threads)
        self.timeout_s = float(timeout_s)
        self.down_backoff_s = float(down_backoff_s)
        self.placement: dict[str, list[str]] = {u: list(d) for u, d in (placement or {}).items()}
        self.agents: dict[str, AgentLink] = {}
        #: every request's id (control requests and the layers' forward requests)
        self.request_ids = itertools.count(1)
        self._by_sock: dict[zmq.Socket, AgentLink] = {}
        self.stale_replies = 0
        #: device -> connections renewed after a timeout or a lost connection (:meth:`reconnect`)
        self.reconnects: dict[str, int] = {}
        #: device -> requests re-sent on a fresh connection after theirs was lost
        self.resent: dict[str, int] = {}
        self._monitors = itertools.count(1)
        #: how long the first call on a renewed connection waits for its handshake
        self.renew_wait_ms = int(min(self.timeout_s, 0.5) * 1e3)
        for name, ep in agents.items():
            self.add_agent(name, ep)

    @property
    def io_threads(self) -> int:
        """The ZeroMQ I/O threads of the backend's context."""
        return int(self.ctx.get(zmq.IO_THREADS))

    # ---- connections ---------------------------------------------------------------------
    def add_agent(self, name: str, endpoint: str, connect_timeout_ms: int = 0) -> None:
        """Open a DEALER to ``endpoint`` (sends fail at once while it is not connected)."""
        a = AgentLink.open(
            self.ctx,
            name,
            endpoint,
            self.link_options,
            curve=self.curve,
            monitor_addr=f"inproc://remote-backend-{id(self):x}-{next(self._monitors)}",
            connect_timeout_ms=connect_timeout_ms,
        )
        self.agents[name] = a
        self._by_sock[a.sock] = a

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
        ct_ms = self.link_options.connect_timeout_ms
        if ct_ms and old.clock is not None:
            ct_ms = max(ct_ms, int(4 * old.clock.rtt_ms))
        # replaced in place, never popped and re-added: the device keeps its key (and its place)
        # in self.agents, so a loop over the devices whose call renews one goes on unharmed
        self.add_agent(name, old.endpoint, connect_timeout_ms=ct_ms)
        self._by_sock.pop(old.sock).close()
        new = self.agents[name]
        new.clock, new.down_until, new.failures = old.clock, old.down_until, old.failures
        new.energy_source = old.energy_source
        new.renewed = True  # its first call waits a little for the handshake (not for a dead peer)
        self.reconnects[name] = self.reconnects.get(name, 0) + 1

    def remove_agent(self, name: str) -> None:
        """Close the connection to ``name`` and forget it (its experts then fail or re-route)."""
        a = self.agents.pop(name)
        del self._by_sock[a.sock]
        a.close()

    def close(self) -> None:
        """Close every socket (pending requests are abandoned)."""
        for a in self.agents.values():
            a.close()
        self.agents.clear()
        self.ctx.term()

    def __enter__(self) -> RemoteExpertBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _agent(self, device: str) -> AgentLink:
        try:
            return self.agents[device]
        except KeyError:
            raise AgentError(device, f"unknown device (have {sorted(self.agents)})") from None

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
        if a.lost():
            self.reconnect(device)
            a = self.agents[device]
        budget_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget_s
        rid = next(self.request_ids)
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
        """Unload experts from ``device``; returns the uids it unloaded."""
        return list(self.request(device, "unload", uids=list(uids))[0]["unloaded"])

    def shutdown_agent(self, device: str, timeout_s: float = 5.0) -> None:
        """Ask the agent to exit cleanly."""
        self.request(device, "shutdown", timeout_s=timeout_s)

    # ---- the data plane ------------------------------------------------------------------
    def is_up(self, device: str) -> bool:
        """False while ``device`` is in its back-off after a failure."""
        return time.monotonic() >= self.agents[device].down_until

    def mark_down(self, device: str) -> None:
        """Put ``device`` in its back-off after a failure (``down_backoff_s``)."""
        a = self.agents[device]
        a.failures += 1
        a.down_until = time.monotonic() + self.down_backoff_s

    def run_layer(self, work: LayerWork) -> LayerResult:  # type: ignore[valid-type]
        """Run all experts of one MoE layer on their devices, in parallel (see module doc and
        :class:`~testbed.dataplane.call.LayerCall`)."""
        return LayerCall(self, work).run()
