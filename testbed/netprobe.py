"""Goodput probe, measured by the receiver. Standard library only.

This file is copied as-is to a device (``runner.put``) and run with the device's own
Python, so it must not import anything from the project.

    python netprobe.py recv --bind ADDR --port P [--accept-timeout S]   # prints JSON
    python netprobe.py send --to ADDR --port P --seconds S

The receiver counts application bytes as they arrive and reports goodput over the window
from ``warmup`` seconds after the first byte to the last byte, so connection set-up and
the first burst do not count.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

CHUNK = 64 * 1024


def receive(bind: str, port: int, accept_timeout_s: float, warmup_s: float) -> dict:
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
    return {"peer": peer[0], "bytes_total": total, "window_bytes": window_bytes,
            "window_s": round(seconds, 4), "goodput_kbit": round(goodput, 1)}


def send(to: str, port: int, seconds: float, connect_timeout_s: float) -> dict:
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


def main(argv: list[str] | None = None) -> int:
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
    a = ap.parse_args(argv)
    if a.mode == "recv":
        out = receive(a.bind, a.port, a.accept_timeout, a.warmup)
    else:
        out = send(a.to, a.port, a.seconds, a.connect_timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
