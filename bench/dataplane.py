"""Data-plane benchmark: the framework's expert-call round trip vs a raw pyzmq echo.

What is compared (DESIGN.md, "Data-plane overhead" and "Fan-out"), in one run, on one path:

* ``raw``: a bare pyzmq REQ -> REP echo of one frame holding exactly the payload's bytes (the
  echo server runs where the agent runs: same host / namespace, same address; pyzmq's default
  send: copied below 64 KiB, zero-copy above; the REP sends the received frame back as it is).
* ``minimal``: the least any Python data plane with a versioned header and a raw tensor frame
  does (DEALER -> ROUTER, msgpack header with a request id both ways, a torch view of the frame
  at both ends; no checks, no timing, no error handling). Not something to deploy: the floor
  that shows how much of the framework's overhead is Python's own, on this host.
* ``framework``: ``RemoteExpertBackend.run_layer`` with one expert whose agent serves the
  built-in *identity* expert (device compute ~0; its measured compute is printed, not
  subtracted). It counts everything the framework adds: msgpack header, request id, dtype/shape
  checks on both sides, the agent's queue and timing stamps, the reply header, decoding the
  output tensor and building the per-call timing row.
* Each payload is 1, 8, 128 and 512 tokens x 4096 fp16. The three kinds run in alternating
  blocks of 25 calls (10 at >= 128 tokens), so drift on the host hits all alike; the table
  gives the median of every call of each kind. The three servers get the agent's malloc
  settings (:mod:`device_agent.memtune`) and the same blocking receive.
* ``fan-out``: one ``run_layer`` with one 8-token expert on each of k agents (k = 1, 2, 4, 8),
  against the slowest of the k single-agent calls; next to it the same ratio for raw pyzmq
  (k REQ sockets to k echo servers, all sent, then a poller): the host's own floor. Measured on
  loopback, across unshaped veths, and across veths shaped to ``--fanout-rate-kbit`` per
  device (the testbed's case: every device behind its own link).
  Note: k agent processes + the BS share this host's CPUs (printed): with fewer cores than
  k + 1, the agents' and the BS's work cannot all run at once.

Run: ``.venv/bin/python bench/dataplane.py [--json out.json] [--quick] [--no-veth]
[--fanout-rate-kbit 100000] [--io-threads 1]`` (the veth sections need root: they create a
local testbed and remove it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq

HIDDEN = 4096
TOKENS = (1, 8, 128, 512)
FANOUT = (1, 2, 4, 8)
FANOUT_TOKENS = 8


@contextlib.contextmanager
def _serving(sock_type: int, bind: str, ready_file: str) -> Iterator[tuple[zmq.Socket, list[int]]]:
    """A baseline server's socket, bound, its endpoint in ``ready_file``; yields the socket and a
    list that SIGTERM appends to (stop when non-empty). The agent's malloc settings; a blocking
    receive with a timeout, as the agent's loop (no poll per message)."""
    from device_agent.memtune import keep_large_buffers

    keep_large_buffers()
    ctx = zmq.Context()
    s = ctx.socket(sock_type)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 100)
    s.bind(bind)
    tmp = ready_file + ".part"
    Path(tmp).write_text(
        json.dumps({"endpoint": s.getsockopt_string(zmq.LAST_ENDPOINT), "pid": os.getpid()})
    )
    os.replace(tmp, ready_file)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        yield s, stop
    finally:
        s.close(0)
        ctx.term()


def echo_server(bind: str, ready_file: str) -> None:
    """The raw baseline: a bare REP that sends every received frame back as it is (zero-copy)."""
    with _serving(zmq.REP, bind, ready_file) as (s, stop):
        while not stop:
            try:
                fr = s.recv(copy=False)
            except zmq.Again:
                continue
            s.send(fr, copy=False)


def min_server(bind: str, ready_file: str) -> None:
    """The floor of any Python data plane with a header and a tensor frame (not the agent): a
    ROUTER that decodes the msgpack header, views the frame as a torch tensor, and sends a
    msgpack reply header with the request id plus the same frame back. No checks, no timing,
    no error handling."""
    import numpy as np
    import torch

    f16 = np.dtype(np.float16)
    with _serving(zmq.ROUTER, bind, ready_file) as (s, stop):
        while not stop:
            try:
                env, hf, df = s.recv_multipart(copy=False)
            except zmq.Again:
                continue
            h = msgpack.unpackb(hf.bytes)
            rows, cols = h["t"][0][2]
            # the "expert" is the identity: the view is made, and the received frame goes back as
            # it is
            torch.from_numpy(np.frombuffer(df.buffer, dtype=f16).reshape(rows, cols))
            s.send_multipart(
                [env, msgpack.packb({"v": 1, "id": h["id"], "t": h["t"]}), df], copy=False
            )


def _interleaved(
    fns: dict[str, Callable[[], Any]], calls: int, block: int, warmup: int = 30
) -> dict[str, float]:
    """Median ms of each function's calls, taken in alternating blocks of ``block`` calls (every
    kind sees the same drift of the host); ``calls`` per kind."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    pc = time.perf_counter
    while len(next(iter(samples.values()))) < calls:
        for k, f in fns.items():
            out = samples[k]
            for _ in range(block):
                t0 = pc()
                f()
                out.append(pc() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def _calls(tokens: int, quick: bool) -> int:
    n = {1: 3000, 8: 2000, 128: 800, 512: 240}[tokens]
    return max(60, n // 10) if quick else n


@contextlib.contextmanager
def _server(runner: Any, host: str, workdir: str, kind: str) -> Iterator[str]:
    """Start this script's ``echo-server`` or ``min-server`` where the agent runs; yields its
    endpoint."""
    ready = f"{workdir}/{kind}.ready.json"
    runner.run(["rm", "-f", ready], timeout_s=30)
    pid = runner.spawn(
        [
            sys.executable,
            os.path.abspath(__file__),
            kind,
            "--bind",
            f"tcp://{host}:*",
            "--ready-file",
            ready,
        ],
        log_path=f"{workdir}/{kind}.log",
        pid_path=f"{workdir}/{kind}.pid",
    )
    try:
        for _ in range(400):
            res = runner.run(["cat", ready], timeout_s=30, check=False)
            if res.ok and res.stdout.strip():
                yield json.loads(res.stdout)["endpoint"]
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{kind} did not start on {host}")
    finally:
        runner.run(["kill", "-TERM", str(pid)], timeout_s=30, check=False)


def _raw_client(ctx: zmq.Context, ep: str) -> zmq.Socket:
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    return s


def _raw_call(req: zmq.Socket, buf: memoryview) -> Callable[[], None]:
    """One raw echo round trip of ``buf`` on ``req``."""

    def call() -> None:
        req.send(buf, copy=False)
        req.recv(copy=False)

    return call


def _min_client(ctx: zmq.Context, ep: str, x: Any) -> Callable[[], Any]:
    """One call of the minimal exchange (the client half of :func:`min_server`)."""
    import numpy as np
    import torch

    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(ep)
    buf = x.numpy()
    rows, cols = x.shape
    rid = [0]
    f16 = np.dtype(np.float16)

    def call() -> Any:
        rid[0] += 1
        d.send(
            msgpack.packb(
                {"v": 1, "op": "forward", "id": rid[0], "t": [["e", "float16", [rows, cols]]]}
            ),
            zmq.SNDMORE,
        )
        d.send(buf, copy=False)
        hf, df = d.recv_multipart(copy=False)
        h = msgpack.unpackb(hf.bytes)
        if h["id"] != rid[0]:
            raise RuntimeError("minimal exchange: reply out of order")
        r, c = h["t"][0][2]
        return torch.from_numpy(np.frombuffer(df.buffer, dtype=f16).reshape(r, c))

    call.sock = d  # type: ignore[attr-defined]
    return call


def measure_path(
    label: str, echo_ep: str, min_ep: str, backend: Any, device: str, quick: bool
) -> list[dict[str, Any]]:
    """Raw, minimal and framework medians for every payload size on one path."""
    import torch

    from models.backend import LayerWork

    ctx = zmq.Context.instance()
    req = _raw_client(ctx, echo_ep)
    uid = backend.test_uids[device]
    rows = []
    socks = [req]
    try:
        for n in TOKENS:
            x = torch.randn(n, HIDDEN).half()
            buf = memoryview(x.numpy()).cast("B")

            raw = _raw_call(req, buf)
            work = LayerWork(0, -1, {uid: x})

            def fw(work: Any = work) -> None:
                r = backend.run_layer(work)
                assert uid in r.outputs, r.failed

            minimal = _min_client(ctx, min_ep, x)
            socks.append(minimal.sock)  # type: ignore[attr-defined]
            assert torch.equal(minimal(), x)
            med = _interleaved(
                {"raw": raw, "min": minimal, "fw": fw}, _calls(n, quick), 10 if n >= 128 else 25
            )
            res = backend.run_layer(work)
            assert torch.equal(res.outputs[uid], x)
            # the framework's own breakdown: medians over 50 more calls' timing rows
            calls = [backend.run_layer(work).info["calls"][0] for _ in range(50)]

            def cmed(key: str, calls: list[dict[str, Any]] = calls) -> float:
                return statistics.median(c[key] for c in calls)

            rows.append(
                {
                    "path": label,
                    "tokens": n,
                    "bytes": x.numel() * 2,
                    "raw_ms": med["raw"],
                    "min_ms": med["min"],
                    "framework_ms": med["fw"],
                    "ratio": med["fw"] / med["raw"],
                    "min_ratio": med["min"] / med["raw"],
                    "fw_over_min": med["fw"] / med["min"],
                    "target": 1.25 if n == 1 else (1.10 if n >= 128 else None),
                    "device_ms": cmed("device_ms"),
                    "queue_ms": cmed("queue_ms"),
                    "compute_ms": cmed("compute_ms"),
                    "serialize_ms": cmed("serialize_ms"),
                    "deserialize_ms": cmed("deserialize_ms"),
                    "rtt_ms": cmed("rtt_ms"),
                }
            )
    finally:
        for s in socks:
            s.close(0)
    return rows


def measure_fanout(
    label: str, backend: Any, devices: list[str], echo_eps: list[str], quick: bool
) -> list[dict[str, Any]]:
    """Fan-out to k agents vs the slowest single call among them, and the same for raw pyzmq
    echoes (k REQ sockets: all sent, then a poller) as the host's own floor; every kind in
    alternating blocks of the same run."""
    import torch

    from models.backend import LayerWork

    x = torch.randn(FANOUT_TOKENS, HIDDEN).half()
    buf = memoryview(x.numpy()).cast("B")
    calls = 300 if quick else 1500
    singles = {d: LayerWork(0, -1, {backend.test_uids[d]: x}) for d in devices}
    ctx = zmq.Context(io_threads=backend.io_threads)  # the raw floor gets the backend's I/O threads
    reqs = [_raw_client(ctx, ep) for ep in echo_eps]
    rows = []
    try:
        for k in FANOUT:
            if k > len(devices):
                break
            sub = devices[:k]
            w = LayerWork(0, -1, {backend.test_uids[d]: x for d in sub})
            fns: dict[str, Callable[[], Any]] = {}

            def fan(w: Any = w) -> None:
                r = backend.run_layer(w)
                assert not r.failed, r.failed

            fns["fan"] = fan
            for d in sub:
                fns[f"fw:{d}"] = lambda w1=singles[d]: backend.run_layer(w1)
            sub_reqs = reqs[:k]
            poller = zmq.Poller()
            for r in sub_reqs:
                poller.register(r, zmq.POLLIN)

            def raw_fan(sub_reqs: list[zmq.Socket] = sub_reqs, poller: zmq.Poller = poller) -> None:
                for r in sub_reqs:
                    r.send(buf, copy=False)
                left = len(sub_reqs)
                while left:
                    for s, _ in poller.poll():
                        s.recv(copy=False)
                        left -= 1

            fns["rawfan"] = raw_fan
            for i, r in enumerate(sub_reqs):
                fns[f"raw:{i}"] = _raw_call(r, buf)
            med = _interleaved(fns, calls // 3, 10)
            slowest = max(v for key, v in med.items() if key.startswith("fw:"))
            raw_slowest = max(v for key, v in med.items() if key.startswith("raw:"))
            rows.append(
                {
                    "path": label,
                    "agents": k,
                    "tokens_per_agent": FANOUT_TOKENS,
                    "fanout_ms": med["fan"],
                    "slowest_single_ms": slowest,
                    "ratio": med["fan"] / slowest,
                    "target": 1.2,
                    "raw_fanout_ms": med["rawfan"],
                    "raw_slowest_single_ms": raw_slowest,
                    "raw_ratio": med["rawfan"] / raw_slowest,
                    "cpus": os.cpu_count(),
                    "io_threads": backend.io_threads,
                }
            )
    finally:
        for r in reqs:
            r.close(0)
        ctx.term()
    return rows


@contextlib.contextmanager
def _agents(specs: list[tuple[str, Any, str, str]], io_threads: int = 1) -> Iterator[Any]:
    """Start one agent per (name, runner, host, workdir) with an identity expert each; yields a
    connected backend with ``test_uids`` (device -> uid)."""
    from testbed.dataplane.backend import RemoteExpertBackend
    from testbed.lab.agents import start_agent, stop_agent

    started = []
    backend = None
    try:
        for name, runner, host, wd in specs:
            started.append(
                start_agent(
                    runner,
                    device=name,
                    host=host,
                    workdir=wd,
                    tag="bench-agent",
                    pub=False,
                    threads=1,
                )
            )
        uids = {a.device: f"L0.E{i}" for i, a in enumerate(started)}
        backend = RemoteExpertBackend(
            {a.device: a.endpoint for a in started},
            {u: [d] for d, u in uids.items()},
            timeout_s=10.0,
            io_threads=io_threads,
        )
        backend.connect()
        for d, u in uids.items():
            backend.load_experts(
                d, [{"uid": u, "builtin": "identity", "hidden": HIDDEN, "io_dtype": "float16"}]
            )
        backend.test_uids = uids  # type: ignore[attr-defined]
        yield backend
    finally:
        if backend is not None:
            backend.close()
        for a in started:
            stop_agent(a)


def _table(path_rows: list[dict[str, Any]], fan_rows: list[dict[str, Any]]) -> str:
    host = f"Host: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}."
    out = [
        (
            "raw = pyzmq REQ->REP echo of one frame of the same bytes (the REP sends the received "
            "frame back); minimal = the least any Python data plane with a header and a tensor "
            "frame does (DEALER->ROUTER, msgpack header with a request id both ways, a torch view "
            "of the frame at both ends, no checks, no timing); framework = "
            "RemoteExpertBackend.run_layer on one expert that the agent serves with the identity "
            "expert (nothing subtracted; the agent's own time in the call, receipt to reply, is "
            "the last column). All three servers run at the agent's address (same path) with the "
            "same malloc settings; medians of all calls, taken in alternating blocks of the same "
            f"run. {host}"
        ),
        "",
        (
            "| path | tokens x 4096 fp16 | bytes | raw echo (ms) | minimal (ms) | framework (ms) | "
            "framework / raw | target | minimal / raw | framework / minimal | "
            "agent time in call (ms) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in path_rows:
        tgt = f"<= {r['target']:.2f}" if r["target"] else "-"
        ok = "" if not r["target"] else (" ok" if r["ratio"] <= r["target"] else " MISS")
        out.append(
            f"| {r['path']} | {r['tokens']} | {r['bytes']} | {r['raw_ms']:.3f} | "
            f"{r['min_ms']:.3f} | "
            f"{r['framework_ms']:.3f} | {r['ratio']:.2f} | {tgt}{ok} | {r['min_ratio']:.2f} | "
            f"{r['fw_over_min']:.2f} | {r['device_ms']:.3f} |"
        )
    bs_io = fan_rows[0]["io_threads"] if fan_rows else "?"
    out += [
        "",
        (
            f"fan-out = one run_layer over k agents (one {FANOUT_TOKENS}-token identity expert "
            "each) against the slowest of the k single-agent run_layer calls; raw = the same with "
            "k raw echo servers (all k requests sent, then a poller) against the slowest single "
            "raw echo: the host's own floor. Alternating blocks, same run; the k agents and this "
            f"process share the host's {os.cpu_count()} CPUs; the BS side (framework and raw) has "
            f"{bs_io} ZeroMQ I/O thread(s)."
        ),
        "",
        (
            f"| path | agents | fan-out, {FANOUT_TOKENS} tokens each (ms) | "
            "slowest single call (ms) | ratio | "
            "target | raw fan-out / slowest raw |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in fan_rows:
        ok = " ok" if r["ratio"] <= r["target"] else " MISS"
        out.append(
            f"| {r['path']} | {r['agents']} | {r['fanout_ms']:.3f} | "
            f"{r['slowest_single_ms']:.3f} | "
            f"{r['ratio']:.2f} | <= {r['target']:.1f}{ok} | {r['raw_ratio']:.2f} |"
        )
    return "\n".join(out)


@contextlib.contextmanager
def _servers(specs: list[tuple[str, Any, str, str]], kind: str) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(_server(runner, host, wd, kind)) for _, runner, host, wd in specs
        ]


@contextlib.contextmanager
def _testbed(
    tmp: str,
    devices: int,
    rate_kbit: float,
) -> Iterator[list[tuple[str, Any, str, str]]]:
    """Local namespace testbed of ``devices`` at ``rate_kbit``; yields agent specs (SSH runners)."""
    from testbed.lab import local
    from testbed.lab.inventory import load_inventory, ssh_runner_for

    name = "dpb" + os.urandom(2).hex()
    os.environ.setdefault("TESTBED_STATE_DIR", f"{tmp}/state")
    res = local.up(name, devices, rate_kbit, Path(tmp) / f"{name}.toml")
    runners: dict[str, Any] = {}
    try:
        inv = load_inventory(res["inventory"])
        runners = {d.name: ssh_runner_for(inv, d) for d in inv.devices}
        yield [(d.name, runners[d.name], d.host, d.workdir) for d in inv.devices]
    finally:
        for r in runners.values():
            r.close()
        local.down(name)


def _rate_label(kbit: float) -> str:
    return f"{kbit / 1e6:g} Gbit/s" if kbit >= 1e6 else f"{kbit / 1e3:g} Mbit/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    for kind in ("echo-server", "min-server"):
        e = sub.add_parser(kind)
        e.add_argument("--bind", required=True)
        e.add_argument("--ready-file", required=True)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true", help="10x fewer iterations (smoke run)")
    ap.add_argument("--no-veth", action="store_true", help="loopback only (no root needed)")
    ap.add_argument(
        "--rate-kbit", type=float, default=10_000_000, help="tc rate of the unshaped-class links"
    )
    ap.add_argument(
        "--io-threads", type=int, default=1, help="ZeroMQ I/O threads of the BS backend"
    )
    ap.add_argument(
        "--fanout-rate-kbit",
        type=float,
        default=100_000,
        help="tc rate of every device link in the shaped fan-out section (0: skip it)",
    )
    a = ap.parse_args(argv)
    if a.cmd == "echo-server":
        echo_server(a.bind, a.ready_file)
        return 0
    if a.cmd == "min-server":
        min_server(a.bind, a.ready_file)
        return 0

    import tempfile

    from testbed.lab.runner import LocalRunner

    path_rows: list[dict[str, Any]] = []
    fan_rows: list[dict[str, Any]] = []
    k = max(FANOUT)
    with tempfile.TemporaryDirectory(prefix="dpbench-") as tmp:
        lo = LocalRunner()
        specs = [(f"lo{i}", lo, "127.0.0.1", f"{tmp}/lo{i}") for i in range(k)]
        with (
            _agents(specs, a.io_threads) as be,
            _servers(specs, "echo-server") as eps,
            _servers(specs[:1], "min-server") as mins,
        ):
            path_rows += measure_path("loopback", eps[0], mins[0], be, "lo0", a.quick)
            fan_rows += measure_fanout("loopback", be, [s[0] for s in specs], eps, a.quick)
        if not a.no_veth:
            label = f"veth ({_rate_label(a.rate_kbit)} tc)"
            with (
                _testbed(tmp, k, a.rate_kbit) as specs,
                _agents(specs, a.io_threads) as be,
                _servers(specs, "echo-server") as eps,
                _servers(specs[:1], "min-server") as mins,
            ):
                path_rows += measure_path(label, eps[0], mins[0], be, specs[0][0], a.quick)
                fan_rows += measure_fanout(label, be, [s[0] for s in specs], eps, a.quick)
            if a.fanout_rate_kbit > 0:
                label = f"veth ({_rate_label(a.fanout_rate_kbit)} tc per device)"
                with (
                    _testbed(tmp, k, a.fanout_rate_kbit) as specs,
                    _agents(specs, a.io_threads) as be,
                    _servers(specs, "echo-server") as eps,
                ):
                    fan_rows += measure_fanout(label, be, [s[0] for s in specs], eps, a.quick)
    print(_table(path_rows, fan_rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"paths": path_rows, "fanout": fan_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
