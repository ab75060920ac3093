"""Live cluster view from the agents' status PUB sockets (one SUB per agent).

:class:`StatusFeed` keeps each device's last published ``status`` map, when it came, and the
signalling it cost (messages and bytes per device). The data plane's requests go through
:class:`testbed.dataplane.backend.RemoteExpertBackend`; this is the other, one-way channel.

The BS connects out to each agent's PUB socket: the ``pub_endpoint`` of the agent's ready file,
bound by provisioning at the device's ``status_port`` (inventory; 5556 by default, 0 = a port
the agent picks), so a device's firewall lets it in like the agent's own ``agent_port``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import zmq

from device_agent import protocol as P
from device_agent.protocol import ProtocolError
from device_agent.security import CurveClient, CurveKeyError

from ..errors import TestbedError


class StatusFeed:
    """Live cluster view from the agents' status PUB sockets (one SUB per agent).

    Parameters
    ----------
    endpoints
        device name -> agent status endpoint (the agent's ``--pub``).
    curve
        As for :class:`RemoteExpertBackend` (the PUB sockets are CURVE servers too).
    """

    def __init__(self, endpoints: Mapping[str, str], curve: CurveClient | None = None) -> None:
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self._names: dict[zmq.Socket, str] = {}
        self.view: dict[str, dict[str, Any]] = {}
        self.received: dict[str, float] = {}
        #: signalling counters per device: status messages and their bytes (topic + body)
        self.messages: dict[str, int] = {}
        self.bytes_received: dict[str, int] = {}
        for name, ep in endpoints.items():
            s = self.ctx.socket(zmq.SUB)
            if curve is not None:
                try:
                    curve.secure(s, name)
                except CurveKeyError as e:
                    s.close(0)
                    self.close()
                    raise TestbedError(str(e)) from None
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, b"status")
            s.setsockopt(zmq.CONFLATE, 0)
            s.connect(ep)
            self.poller.register(s, zmq.POLLIN)
            self._names[s] = name

    def poll(self, timeout_s: float = 0.0) -> int:
        """Take in the status messages that arrived (waiting up to ``timeout_s`` for the
        first); returns how many were taken."""
        n = 0
        for sock, _ in self.poller.poll(int(timeout_s * 1e3)):
            while True:
                try:
                    msg = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                name = self._names[sock]
                self.messages[name] = self.messages.get(name, 0) + 1
                self.bytes_received[name] = self.bytes_received.get(name, 0) + sum(
                    len(f) for f in msg
                )
                if len(msg) != 2:
                    continue
                try:
                    h = P.unpack(msg[1])
                except ProtocolError:
                    continue
                if isinstance(h.get("status"), dict):
                    self.view[name] = h["status"]
                    self.received[name] = time.monotonic()
                    n += 1
        return n

    def age_s(self, device: str) -> float | None:
        """Seconds since ``device`` last published, or ``None`` if never."""
        t = self.received.get(device)
        return None if t is None else time.monotonic() - t

    def close(self) -> None:
        """Close every SUB socket and the feed's context."""
        for s in self._names:
            s.close(0)
        self.ctx.term()
