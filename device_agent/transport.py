"""The agent's ZeroMQ sockets and their frame-level I/O: the ROUTER and the status PUB, one
request received whole (:func:`recv_request`), one reply sent (:func:`send_reply`).

Frame by frame, with plain int flags: this is the agent's hot path. Python 3.8 (the device
side); no ``testbed``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from device_agent import protocol as P
from device_agent.security import CurveServer

log = logging.getLogger("device_agent")

# plain ints: zmq's enum members make every flag operation a Python-level enum call
_SNDMORE = int(zmq.SNDMORE)
#: frames at least this large are sent zero-copy; smaller ones are copied: a zero-copy frame is
#: released through pyzmq's garbage-collector thread (a wakeup + the GIL per frame), which on a
#: busy host costs more than a memcpy of several MiB
_ZEROCOPY_MIN = 16 << 20


def router_socket(
    ctx: zmq.Context, curve: CurveServer | None, max_message_bytes: int
) -> zmq.Socket:
    """The agent's ROUTER (not yet bound): a CURVE server when ``curve`` is given; ZeroMQ drops
    messages over twice ``max_message_bytes`` (the agent answers ``TOO_LARGE`` below that)."""
    sock = ctx.socket(zmq.ROUTER)
    if curve is not None:
        curve.secure(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    return sock


def pub_socket(ctx: zmq.Context, curve: CurveServer | None) -> zmq.Socket:
    """The status feed's PUB (not yet bound): a CURVE server when ``curve`` is given; at most 16
    status messages wait for a slow subscriber."""
    sock = ctx.socket(zmq.PUB)
    if curve is not None:
        curve.secure(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 16)
    return sock


class Request:
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


def recv_request(sock: zmq.Socket, flags: int) -> Request:
    """Receive one whole request (raises ``zmq.Again`` when none came within ``flags`` /
    ``RCVTIMEO``): envelope (identity + optional empty delimiter), then the body frames.

    Frame by frame with ``Frame.more`` (recv_multipart asks the socket for ``RCVMORE`` per
    part, a Python-level call each); the header is kept as ``bytes``, tensor frames as
    ``zmq.Frame`` (their buffers are viewed, and sent back as they are when an expert
    returns its input)."""
    recv = sock.recv
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
    return Request(env, body, time.time_ns(), time.perf_counter(), nbytes)


def send_reply(
    sock: zmq.Socket, envelope: list[Any], reply: dict[str, Any], bufs: list[Any]
) -> None:
    """Send the reply header and its frames to the request's sender.

    Frame by frame with plain int flags (send_multipart's enum arithmetic costs more than
    the send); small frames copied, large ones zero-copy; a received frame sent back as it
    is (an expert that returned its input) is shared with libzmq, never copied."""
    try:
        send = sock.send
        for f in envelope:
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
