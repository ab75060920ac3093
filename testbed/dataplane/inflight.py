"""A layer's requests while they are out: sending them, waiting for replies, deadlines.

:class:`InFlight` holds one layer's outstanding :class:`Request` objects by id and the backend
whose connections they use. It sends a request (:meth:`InFlight.send`: a connection that
dropped is renewed first), waits for replies (:meth:`~InFlight.wait_one`,
:meth:`~InFlight.wait_many`; each reply goes to the caller's ``on_reply`` as it comes),
fails the requests past their deadline (:meth:`~InFlight.expire`) and looks after the
connections they wait on (:meth:`~InFlight.tend`: requests on a dropped connection are sent
again on a fresh one). What a reply means for the layer is :class:`~.call.LayerCall`'s part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from .wire import recv_reply

if TYPE_CHECKING:
    from .backend import RemoteExpertBackend
    from .connection import AgentLink

# plain ints: zmq's enum members make every flag operation a Python-level enum call
_NOBLOCK = int(zmq.NOBLOCK)
_NB_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLOUT = int(zmq.POLLOUT)
_RCVTIMEO = int(zmq.RCVTIMEO)
_POLL_ITEM = int(zmq.POLLIN)
#: while requests are out, the wait wakes this often to look after lost connections (a reply
#: ends the wait at once; only calls slower than this see the wake-ups)
TEND_MS = 50


@dataclass(slots=True)
class Request:
    """One ``forward`` request out to one device: some of the layer's experts, one attempt."""

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


class InFlight:
    """One layer's requests that are out (``pending``: id -> request) and their connections."""

    def __init__(self, backend: RemoteExpertBackend) -> None:
        self.backend = backend
        self.pending: dict[int, Request] = {}

    # ---- sending -----------------------------------------------------------------------------
    def send(self, dev: str, hb: bytes, bufs: list[Any]) -> tuple[zmq.Socket, Any]:
        """Send a request (header ``hb``, then ``bufs``) to ``dev``; returns the socket it went
        out on (the device's connection as it is now) and the send's zmq error, if any."""
        be = self.backend
        try:
            a = self.send_header(be.agents[dev], hb)
            send = a.sock.send
            last = len(bufs) - 1
            for i, b in enumerate(bufs):
                # pyzmq's own policy, as the raw echo baseline's: copied below
                # zmq.COPY_THRESHOLD (64 KiB), zero-copy above (a fresh 1 MiB+ buffer to
                # copy into page-faults, which costs more than the release notification)
                send(b, _NOBLOCK if i == last else _NB_MORE, copy=False)
        except zmq.ZMQError as e:  # zmq.Again: no live connection (IMMEDIATE)
            return be.agents[dev].sock, e  # send_header may have renewed the connection
        return a.sock, None

    def send_header(self, a: AgentLink, hb: bytes) -> AgentLink:
        """Send a request's first part on ``a``'s connection and return the link it went out
        on: a connection that dropped since its last call is renewed first, and a renewed one
        still in its handshake is waited for a little. Raises ``zmq.Again`` when there is no
        live connection."""
        # no empty delimiter (the agent's ROUTER takes [header, frames...] from a DEALER);
        # the first part fails at once (zmq.Again) when there is no live connection
        try:
            a.sock.send(hb, _NB_MORE)
        except zmq.Again:
            be = self.backend
            if a.lost():  # dropped since its last call: a fresh connection
                be.reconnect(a.name)
                a = be.agents[a.name]
            # a connection renewed after a timeout may still be in its handshake
            if not (a.renewed and a.sock.poll(be.renew_wait_ms, _POLLOUT)):
                raise
            a.sock.send(hb, _NB_MORE)
        if a.renewed:
            a.renewed = False
        return a

    # ---- waiting -----------------------------------------------------------------------------
    def wait_one(self, now: float, on_reply: Callable[[AgentLink, list[Any]], None]) -> None:
        """One request out: block in its socket's own receive (RCVTIMEO = time left, at most
        :data:`TEND_MS`), no poller and no readiness check per reply."""
        only = next(iter(self.pending.values()))
        oa = self.backend.agents.get(only.device)
        if oa is None:  # its agent was removed: nothing can come; wait for the deadline
            time.sleep(max(0.0, only.deadline - now))
            return
        wait_ms = max(0, min(TEND_MS, int(math.ceil((only.deadline - now) * 1e3))))
        if oa.rcvtimeo != wait_ms:
            oa.sock.setsockopt(_RCVTIMEO, wait_ms)
            oa.rcvtimeo = wait_ms
        try:
            body = recv_reply(oa.sock, 0)
        except zmq.Again:
            return
        on_reply(oa, body)

    def wait_many(self, now: float, on_reply: Callable[[AgentLink, list[Any]], None]) -> None:
        """Several requests out: zmq_poll on the sockets with a request out (not a Poller of
        every agent), one message per ready socket and turn (the poll returns at once while
        more wait)."""
        pending = self.pending
        wait_ms = max(
            0,
            min(TEND_MS, int(math.ceil((min(c.deadline for c in pending.values()) - now) * 1e3))),
        )
        agents = self.backend.agents
        links: dict[zmq.Socket, AgentLink] = {}
        for c in pending.values():
            a = agents.get(c.device)
            if a is not None:
                links[a.sock] = a
        if not links:  # their agents were removed: nothing can come; wait for the deadline
            time.sleep(wait_ms / 1e3)
            return
        for sock, _ in zmq.zmq_poll([(s, _POLL_ITEM) for s in links], wait_ms):
            try:
                body = recv_reply(sock, _NOBLOCK)
            except zmq.Again:
                continue
            on_reply(links[sock], body)

    def expire(self, on_timeout: Callable[[Request], None]) -> None:
        """Take out the requests past their deadline, one by one: the device goes into its
        back-off and, with no other request out on it, its connection is renewed; then
        ``on_timeout`` (which may send the experts elsewhere)."""
        be = self.backend
        pending = self.pending
        now = time.monotonic()
        for rid in [r for r, c in pending.items() if c.deadline <= now]:
            req = pending.pop(rid)
            be.mark_down(req.device)
            if req.device in be.agents and not any(
                c.device == req.device for c in pending.values()
            ):
                be.reconnect(req.device)
            on_timeout(req)

    # ---- connections -------------------------------------------------------------------------
    def tend(self) -> None:
        """Look after the connections that requests wait on: one that dropped (the kernel's
        user timeout, a reset) is renewed, and once a fresh connection is up, the requests that
        went out on an older one are sent again on it (same id, same deadline)."""
        be = self.backend
        pending = self.pending
        for dev in {c.device for c in pending.values()}:
            a = be.agents.get(dev)
            if a is None:
                continue
            if a.lost():
                be.reconnect(dev)
                a = be.agents[dev]
            stale = [c for c in pending.values() if c.device == dev and c.sock is not a.sock]
            if stale and a.sock.get(_EVENTS) & _POLLOUT:  # some, and connected
                self.resend(a, stale)

    def resend(self, a: AgentLink, stale: list[Request]) -> None:
        """Send ``stale``'s requests again, as they were, on ``a``'s fresh connection."""
        resent = self.backend.resent
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
            resent[a.name] = resent.get(a.name, 0) + 1
