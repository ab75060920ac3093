"""One DEALER connection from the BS to a device agent, as the data plane keeps it.

:class:`AgentLink` holds the socket and what the backend knows of the agent (its clock offset,
its back-off after a failure, its meter's label); :meth:`AgentLink.open` sets the socket up
(CURVE, no linger, no queueing while disconnected, the reconnect and TCP timeouts, a monitor
of lost connections) and :meth:`AgentLink.lost` reads that monitor. :class:`LinkOptions` holds
the socket option values, checked once (:func:`option_ms`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import zmq

from device_agent.security import CurveClient, CurveKeyError

from ..errors import TestbedError

# plain ints: zmq's enum members make every flag operation a Python-level enum call
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_EV_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)


def option_ms(name: str, value: object, zero: bool = True) -> int:
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


@dataclass(frozen=True)
class LinkOptions:
    """Socket option values of every agent connection, in ms (0: not set)."""

    user_timeout_ms: int  #: ``ZMQ_TCP_MAXRT`` (TCP_USER_TIMEOUT)
    connect_timeout_ms: int  #: ``ZMQ_CONNECT_TIMEOUT`` of a renewed connection
    reconnect_ivl_ms: int  #: ``ZMQ_RECONNECT_IVL``

    @classmethod
    def from_seconds(
        cls, tcp_user_timeout_s: float, connect_timeout_s: float, reconnect_ivl_s: float
    ) -> LinkOptions:
        """The options from the backend's arguments in seconds (ValueError naming a bad one)."""
        return cls(
            option_ms("tcp_user_timeout_s", tcp_user_timeout_s),
            option_ms("connect_timeout_s", connect_timeout_s),
            option_ms("reconnect_ivl_s", reconnect_ivl_s, zero=False),
        )


@dataclass
class ClockEstimate:
    """NTP-style estimate from the ping with the smallest round trip.

    ``offset_ns`` = device clock - BS clock; ``rtt_ms`` excludes the device's own time.
    """

    offset_ns: int
    rtt_ms: float
    samples: int


@dataclass
class AgentLink:
    """The connection to one device agent and what is known of the agent."""

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

    @classmethod
    def open(
        cls,
        ctx: zmq.Context,
        name: str,
        endpoint: str,
        options: LinkOptions,
        *,
        curve: CurveClient | None,
        monitor_addr: str,
        connect_timeout_ms: int = 0,
    ) -> AgentLink:
        """Open a DEALER to ``endpoint`` (sends fail at once while it is not connected); its
        lost connections are reported on a monitor at ``monitor_addr`` (an ``inproc://``)."""
        s = ctx.socket(zmq.DEALER)
        if curve is not None:
            try:
                curve.secure(s, name)
            except CurveKeyError as e:
                s.close(0)
                raise TestbedError(str(e)) from None
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.RECONNECT_IVL, options.reconnect_ivl_ms)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 0)  # no doubling
        if connect_timeout_ms:
            s.setsockopt(zmq.CONNECT_TIMEOUT, connect_timeout_ms)
        if options.user_timeout_ms:
            s.setsockopt(zmq.TCP_MAXRT, options.user_timeout_ms)  # TCP_USER_TIMEOUT on Linux
        # a lost connection (the user timeout, a reset) is reported here: its requests are
        # re-sent on a fresh one instead of waiting for their deadlines
        mon = s.get_monitor_socket(_EV_DISCONNECTED, monitor_addr)
        link = cls(name, endpoint, s, mon=mon)
        try:
            s.connect(endpoint)
        except zmq.ZMQError:
            link.close()
            raise
        return link

    def lost(self) -> bool:
        """Whether the connection dropped since last asked (reads the monitor's notices)."""
        mon = self.mon
        lost = False
        while mon is not None and mon.get(_EVENTS) & _POLLIN:
            ev = mon.recv_multipart()  # [event id (uint16) + value (uint32), endpoint]
            lost = lost or (
                len(ev[0]) >= 2 and struct.unpack_from("<H", ev[0])[0] == _EV_DISCONNECTED
            )
        return lost

    def close(self) -> None:
        """Close the socket and its monitor."""
        if self.mon is not None:
            self.sock.disable_monitor()
            self.mon.close(0)
        self.sock.close(0)
