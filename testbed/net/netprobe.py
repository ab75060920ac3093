"""Goodput probe, measured by the receiver. Standard library only.

This file is copied as-is to a device (``runner.put``) and run with the device's own
Python, so it must not import anything from the project.

    python netprobe.py recv --bind ADDR --port P [--accept-timeout S]   # prints JSON
    python netprobe.py send --to ADDR --port P --seconds S
    python netprobe.py echo --bind ADDR --port P [--accept-timeout S]
    python netprobe.py airtime --to ADDR --port P --sizes 1536,8192 --repeats 3 --idle 1

``recv``/``send``: the receiver counts application bytes as they arrive and reports goodput
over the window from ``warmup`` seconds after the first byte to the last byte, so connection
set-up and the first burst do not count.

``echo``/``airtime``: lone messages, timed by the sender. For every message the sender opens
a fresh connection (Nagle off on both ends) and leaves the link idle for ``--idle`` seconds,
measures the 1-byte round trip on that connection (``--pings`` ping-pongs, the fastest: a ping
the scheduler delayed must not shorten the message's charge), waits ``--settle`` seconds (the
link's bucket refills what the pings took: 5 frames of 67 bytes, under 3 ms at 1 Mbit/s),
then sends the message in one write; the receiver answers one byte once the whole message has
arrived. (Pinging before the idle gap instead would compare a warm round trip with a message
sent after a second's sleep: ~0.2 ms more on this host, which reads as link time.) Delivery
time = send -> that answer; minus the round trip, it is what the link charged the message. The
sender prints one JSON line with every message.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

CHUNK = 64 * 1024


def receive(bind: str, port: int, accept_timeout_s: float, warmup_s: float) -> dict:
    """``recv``: accept one connection, read it to the end; goodput (kbit/s) over the window
    from ``warmup_s`` after the first byte to the last byte."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1)
    srv.settimeout(accept_timeout_s)
    print("listening", file=sys.stderr, flush=True)
    conn, peer = srv.accept()
    srv.close()
    conn.settimeout(accept_timeout_s)
    buf = bytearray(CHUNK)
    total = 0
    t_first = None
    t_last = 0.0
    window_bytes = 0
    t_window = None
    with conn:
        while True:
            n = conn.recv_into(buf)
            now = time.monotonic()
            if n == 0:
                break
            if t_first is None:
                t_first = now
            total += n
            t_last = now
            if now - t_first >= warmup_s:
                if t_window is None:
                    t_window = now  # bytes of this read arrived before the window opened
                else:
                    window_bytes += n
    seconds = (t_last - t_window) if t_window is not None else 0.0
    goodput = window_bytes * 8 / seconds / 1000 if seconds > 0 else 0.0
    return {
        "peer": peer[0],
        "bytes_total": total,
        "window_bytes": window_bytes,
        "window_s": round(seconds, 4),
        "goodput_kbit": round(goodput, 1),
    }


def send(to: str, port: int, seconds: float, connect_timeout_s: float) -> dict:
    """``send``: connect (retrying up to ``connect_timeout_s``), write zeros for ``seconds``,
    then wait until the receiver has closed (all bytes arrived)."""
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            sock = socket.create_connection((to, port), timeout=connect_timeout_s)
            break
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    payload = b"\0" * CHUNK
    sent = 0
    end = time.monotonic() + seconds
    with sock:
        sock.settimeout(max(seconds, 1.0) + 30)
        while time.monotonic() < end:
            sent += sock.send(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the receiver to close: all bytes have arrived
    return {"bytes_sent": sent}


_HEADER = struct.Struct("!cI")  # op, length


def _recv_exact(conn: socket.socket, buf: memoryview, n: int) -> bool:
    got = 0
    while got < n:
        k = conn.recv_into(buf[got:n])
        if k == 0:
            return False
        got += k
    return True


def echo(bind: str, port: int, accept_timeout_s: float) -> dict:
    """Serve airtime clients until one says ``q``: ``p`` -> ``p`` (ping-pong); ``m`` + length
    + payload -> ``a`` once every byte of the payload has arrived."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(4)
    srv.settimeout(accept_timeout_s)
    print("listening", file=sys.stderr, flush=True)
    buf = memoryview(bytearray(1 << 20))
    messages = 0
    with srv:
        while True:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(accept_timeout_s)
            with conn:
                while _recv_exact(conn, buf, 1):
                    op = bytes(buf[:1])
                    if op == b"p":
                        conn.sendall(b"p")
                    elif op == b"m":
                        if not _recv_exact(conn, buf, 4):
                            break
                        (n,) = struct.unpack("!I", buf[:4])
                        left = n
                        while left > 0:
                            k = conn.recv_into(buf[: min(left, len(buf))])
                            if k == 0:
                                break
                            left -= k
                        conn.sendall(b"a")
                        messages += 1
                    elif op == b"q":
                        return {"messages": messages}
                    else:
                        break


def _connect(to: str, port: int, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((to, port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def airtime(
    to: str,
    port: int,
    sizes: list[int],
    repeats: int,
    idle_s: float,
    pings: int,
    connect_timeout_s: float,
    settle_s: float = 0.02,
) -> dict:
    """Time lone messages of each size (``repeats`` rounds over ``sizes``), one fresh
    connection each, after ``idle_s`` of silence (but for the pings, ``settle_s`` before the
    message). Times in milliseconds."""
    rows = []
    for rep in range(repeats):
        for size in sizes:
            sock = _connect(to, port, connect_timeout_s)
            with sock:
                sock.settimeout(connect_timeout_s + 30)
                time.sleep(idle_s)
                rtts = []
                for _ in range(max(1, pings)):
                    t0 = time.perf_counter_ns()
                    sock.sendall(b"p")
                    if sock.recv(1) != b"p":
                        raise ConnectionError("echo: bad ping answer")
                    rtts.append((time.perf_counter_ns() - t0) / 1e6)
                rtt = min(rtts)
                msg = _HEADER.pack(b"m", size) + b"\0" * size
                time.sleep(settle_s)
                t0 = time.perf_counter_ns()
                sock.sendall(msg)
                if sock.recv(1) != b"a":
                    raise ConnectionError("echo: no answer to the message")
                delivery = (time.perf_counter_ns() - t0) / 1e6
            rows.append(
                {
                    "repeat": rep,
                    "bytes": size,
                    "rtt_ms": round(rtt, 4),
                    "pings_ms": [round(x, 4) for x in rtts],
                    "delivery_ms": round(delivery, 4),
                    "charged_ms": round(delivery - rtt, 4),
                }
            )
    sock = _connect(to, port, connect_timeout_s)
    with sock:
        sock.sendall(b"q")
    return {"messages": rows, "idle_s": idle_s, "settle_s": settle_s}


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); prints one JSON line, returns 0."""
    ap = argparse.ArgumentParser(prog="netprobe")
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--accept-timeout", type=float, default=15.0)
    r.add_argument("--warmup", type=float, default=0.5)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, default=3.0)
    s.add_argument("--connect-timeout", type=float, default=10.0)
    e = sub.add_parser("echo")
    e.add_argument("--bind", required=True)
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--accept-timeout", type=float, default=30.0)
    t = sub.add_parser("airtime")
    t.add_argument("--to", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--sizes", default="1536,8192,65536")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--idle", type=float, default=1.0)
    t.add_argument("--pings", type=int, default=5)
    t.add_argument("--settle", type=float, default=0.02)
    t.add_argument("--connect-timeout", type=float, default=10.0)
    a = ap.parse_args(argv)
    if a.mode == "recv":
        out = receive(a.bind, a.port, a.accept_timeout, a.warmup)
    elif a.mode == "echo":
        out = echo(a.bind, a.port, a.accept_timeout)
    elif a.mode == "airtime":
        out = airtime(
            a.to,
            a.port,
            [int(x) for x in a.sizes.split(",") if x],
            a.repeats,
            a.idle,
            a.pings,
            a.connect_timeout,
            a.settle,
        )
    else:
        out = send(a.to, a.port, a.seconds, a.connect_timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
