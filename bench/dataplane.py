"""Data-plane benchmark: the framework's expert-call round trip vs a raw pyzmq echo.

What is compared (DESIGN.md, "Data-plane overhead" and "Fan-out"), in one run, on one path:

* ``raw``: a bare pyzmq REQ -> REP echo of one frame holding exactly the payload's bytes (the
  echo server runs where the agent runs: same host / namespace, same address; pyzmq's default
  send: copied below 64 KiB, zero-copy above; the REP sends the received frame back as it is).
* ``framework``: ``RemoteExpertBackend.run_layer`` with one expert whose agent serves the
  built-in *identity* expert (device compute ~0; its measured compute is printed, not
  subtracted). It counts everything the framework adds: msgpack header, request id, dtype/shape
  checks on both sides, the agent's queue and timing stamps, the reply header, decoding the
  output tensor and building the per-call timing row.
* Each payload is 1, 8, 128 and 512 tokens x 4096 fp16; blocks of raw and framework calls
  alternate (3 + 3 blocks), each block gives a median; the table gives the median of those.
* ``fan-out``: one ``run_layer`` with one 8-token expert on each of k agents (k = 1, 2, 4, 8),
  against the slowest of the k single-agent calls, blocks alternating in the same run.
  Note: k agent processes + the BS share this host's CPUs (printed): with fewer cores than
  k + 1, the agents' and the BS's work cannot all run at once.

Run: ``.venv/bin/python bench/dataplane.py [--json out.json] [--quick] [--no-veth]``.
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

import zmq

HIDDEN = 4096
TOKENS = (1, 8, 128, 512)
FANOUT = (1, 2, 4, 8)
FANOUT_TOKENS = 8


def echo_server(bind: str, ready_file: str) -> None:
    """A raw REP echo server (the baseline): writes its endpoint to ``ready_file``."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(bind)
    tmp = ready_file + ".part"
    Path(tmp).write_text(json.dumps({"endpoint": s.getsockopt_string(zmq.LAST_ENDPOINT), "pid": os.getpid()}))
    os.replace(tmp, ready_file)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        if s.poll(100):
            s.send(s.recv(copy=False), copy=False)
    s.close(0)
    ctx.term()


def _median_ms(fn: Callable[[], Any], iters: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _iters(tokens: int, quick: bool) -> int:
    n = {1: 2000, 8: 1500, 128: 500, 512: 150}[tokens]
    return max(20, n // 10) if quick else n


@contextlib.contextmanager
def _echo(runner: Any, host: str, workdir: str) -> Iterator[str]:
    ready = f"{workdir}/echo.ready.json"
    runner.run(["rm", "-f", ready], timeout_s=30)
    pid = runner.spawn([sys.executable, os.path.abspath(__file__), "echo-server", "--bind", f"tcp://{host}:*",
                        "--ready-file", ready], log_path=f"{workdir}/echo.log", pid_path=f"{workdir}/echo.pid")
    try:
        for _ in range(200):
            res = runner.run(["cat", ready], timeout_s=30, check=False)
            if res.ok and res.stdout.strip():
                yield json.loads(res.stdout)["endpoint"]
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("echo server did not start")
    finally:
        runner.run(["kill", "-TERM", str(pid)], timeout_s=30, check=False)


def measure_path(label: str, echo_ep: str, backend: Any, device: str, quick: bool) -> list[dict[str, Any]]:
    """Raw vs framework medians for every payload size on one path."""
    import torch

    from models.backend import LayerWork

    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(echo_ep)
    uid = backend.test_uids[device]
    rows = []
    try:
        for n in TOKENS:
            x = torch.randn(n, HIDDEN).half()
            buf = memoryview(x.numpy()).cast("B")

            def raw() -> None:
                req.send(buf, copy=False)
                req.recv(copy=False)

            work = LayerWork(0, -1, {uid: x})

            def fw() -> None:
                r = backend.run_layer(work)
                assert uid in r.outputs, r.failed

            it = _iters(n, quick)
            # interleave blocks so slow drift (other users of the machine) hits both alike
            raw_ms, fw_ms = [], []
            for _ in range(3):
                raw_ms.append(_median_ms(raw, it // 3))
                fw_ms.append(_median_ms(fw, it // 3))
            r_ms, f_ms = statistics.median(raw_ms), statistics.median(fw_ms)
            res = backend.run_layer(work)
            assert torch.equal(res.outputs[uid], x)
            # the framework's own breakdown: medians over 50 more calls' timing rows
            calls = [backend.run_layer(work).info["calls"][0] for _ in range(50)]

            def med(key: str, calls: list[dict[str, Any]] = calls) -> float:
                return statistics.median(c[key] for c in calls)

            rows.append({"path": label, "tokens": n, "bytes": x.numel() * 2, "raw_ms": r_ms, "framework_ms": f_ms,
                         "ratio": f_ms / r_ms, "target": 1.25 if n == 1 else (1.10 if n >= 128 else None),
                         "device_ms": med("device_ms"), "queue_ms": med("queue_ms"),
                         "compute_ms": med("compute_ms"), "serialize_ms": med("serialize_ms"),
                         "deserialize_ms": med("deserialize_ms"), "rtt_ms": med("rtt_ms")})
    finally:
        req.close(0)
    return rows


def measure_fanout(label: str, backend: Any, devices: list[str], quick: bool) -> list[dict[str, Any]]:
    """Fan-out to k agents vs the slowest single call among them, interleaved: every block of
    k-agent calls alternates with blocks of single calls to each of those agents, so drift on
    the host hits both alike; medians of all blocks."""
    import torch

    from models.backend import LayerWork

    x = torch.randn(FANOUT_TOKENS, HIDDEN).half()
    it = 300 if quick else 1500
    singles = {d: LayerWork(0, -1, {backend.test_uids[d]: x}) for d in devices}
    rows = []
    for k in FANOUT:
        if k > len(devices):
            break
        sub = devices[:k]
        w = LayerWork(0, -1, {backend.test_uids[d]: x for d in sub})

        def fan() -> None:
            r = backend.run_layer(w)
            assert not r.failed, r.failed

        fan_ms: list[float] = []
        single_ms: dict[str, list[float]] = {d: [] for d in sub}
        for _ in range(3):
            for d in sub:
                single_ms[d].append(_median_ms(lambda w1=singles[d]: backend.run_layer(w1), it // 6))
            fan_ms.append(_median_ms(fan, it // 6))
        f_ms = statistics.median(fan_ms)
        slowest = max(statistics.median(v) for v in single_ms.values())
        rows.append({"path": label, "agents": k, "tokens_per_agent": FANOUT_TOKENS, "fanout_ms": f_ms,
                     "slowest_single_ms": slowest, "ratio": f_ms / slowest, "target": 1.2,
                     "cpus": os.cpu_count()})
    return rows


@contextlib.contextmanager
def _agents(specs: list[tuple[str, Any, str, str]]) -> Iterator[Any]:
    """Start one agent per (name, runner, host, workdir) with an identity expert each; yields a
    connected backend with ``test_uids`` (device -> uid)."""
    from testbed.agents_local import start_agent, stop_agent
    from testbed.remote_backend import RemoteExpertBackend

    started = []
    backend = None
    try:
        for name, runner, host, wd in specs:
            started.append(start_agent(runner, device=name, host=host, workdir=wd, tag="bench-agent",
                                       pub=False, threads=1))
        uids = {a.device: f"L0.E{i}" for i, a in enumerate(started)}
        backend = RemoteExpertBackend({a.device: a.endpoint for a in started},
                                      {u: [d] for d, u in uids.items()}, timeout_s=10.0)
        backend.connect()
        for d, u in uids.items():
            backend.load_experts(d, [{"uid": u, "builtin": "identity", "hidden": HIDDEN, "io_dtype": "float16"}])
        backend.test_uids = uids  # type: ignore[attr-defined]
        yield backend
    finally:
        if backend is not None:
            backend.close()
        for a in started:
            stop_agent(a)


def _table(path_rows: list[dict[str, Any]], fan_rows: list[dict[str, Any]]) -> str:
    host = f"Host: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}."
    out = [("raw = pyzmq REQ->REP echo of one frame of the same bytes to an echo server at the agent's "
            "address (same path), sent with pyzmq's default copy policy; framework = "
            "RemoteExpertBackend.run_layer on one expert that the agent serves with the identity expert "
            "(nothing subtracted: its time at the agent, receipt to reply, median of 50 calls, is the last column); ratio = "
            f"framework / raw; medians of alternating blocks, same run. {host}"), "",
           ("| path | tokens x 4096 fp16 | bytes | raw pyzmq echo (ms) | framework call (ms) | ratio | target | "
            "agent time in call (ms) |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in path_rows:
        tgt = f"<= {r['target']:.2f}" if r["target"] else "-"
        ok = "" if not r["target"] else (" ok" if r["ratio"] <= r["target"] else " MISS")
        out.append(f"| {r['path']} | {r['tokens']} | {r['bytes']} | {r['raw_ms']:.3f} | {r['framework_ms']:.3f} | "
                   f"{r['ratio']:.2f} | {tgt}{ok} | {r['device_ms']:.3f} |")
    out += ["", (f"fan-out = one run_layer over k agents (one {FANOUT_TOKENS}-token identity expert each) against the "
                 "slowest of the k single-agent run_layer calls, blocks alternating in the same run; the k agents "
                 f"and this process share the host's {os.cpu_count()} CPUs."), "",
            (f"| path | agents | fan-out, {FANOUT_TOKENS} tokens each (ms) | slowest single call (ms) | ratio | "
             "target |"), "|---|---:|---:|---:|---:|---:|"]
    for r in fan_rows:
        ok = " ok" if r["ratio"] <= r["target"] else " MISS"
        out.append(f"| {r['path']} | {r['agents']} | {r['fanout_ms']:.3f} | {r['slowest_single_ms']:.3f} | "
                   f"{r['ratio']:.2f} | <= {r['target']:.1f}{ok} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    e = sub.add_parser("echo-server")
    e.add_argument("--bind", required=True)
    e.add_argument("--ready-file", required=True)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true", help="10x fewer iterations (smoke run)")
    ap.add_argument("--no-veth", action="store_true", help="loopback only (no root needed)")
    ap.add_argument("--rate-kbit", type=float, default=10_000_000, help="tc rate of the testbed links")
    a = ap.parse_args(argv)
    if a.cmd == "echo-server":
        echo_server(a.bind, a.ready_file)
        return 0

    import tempfile

    from testbed.runner import LocalRunner

    path_rows: list[dict[str, Any]] = []
    fan_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dpbench-") as tmp:
        lo = LocalRunner()
        specs = [(f"lo{i}", lo, "127.0.0.1", f"{tmp}/lo{i}") for i in range(max(FANOUT))]
        with _agents(specs) as be, _echo(lo, "127.0.0.1", tmp) as ep:
            path_rows += measure_path("loopback", ep, be, "lo0", a.quick)
            fan_rows += measure_fanout("loopback", be, [s[0] for s in specs], a.quick)
        if not a.no_veth:
            from testbed import local
            from testbed.inventory import load_inventory, ssh_runner_for

            name = "dpb" + os.urandom(2).hex()
            os.environ.setdefault("TESTBED_STATE_DIR", f"{tmp}/state")
            res = local.up(name, max(FANOUT), a.rate_kbit, Path(tmp) / "inv.toml")
            try:
                inv = load_inventory(res["inventory"])
                runners = {d.name: ssh_runner_for(inv, d) for d in inv.devices}
                specs = [(d.name, runners[d.name], d.host, d.workdir) for d in inv.devices]
                d1 = inv.devices[0]
                with _agents(specs) as be, _echo(runners[d1.name], d1.host, d1.workdir) as ep:
                    label = f"veth ({a.rate_kbit / 1e6:g} Gbit/s tc)"
                    path_rows += measure_path(label, ep, be, d1.name, a.quick)
                    fan_rows += measure_fanout(label, be, [s[0] for s in specs], a.quick)
                for r in runners.values():
                    r.close()
            finally:
                local.down(name)
    print(_table(path_rows, fan_rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"paths": path_rows, "fanout": fan_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
