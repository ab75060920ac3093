"""Soak: thousands of requests across 4 agents on the local testbed, a protocol fuzzer beside them.

What runs, in one process tree on this host:

* ``testbed local up`` with 4 devices (namespaces, sshd, tc links at ``--rate``);
* the real runner (``testbed.run.session.run_recipe``) in this process: provisioning over SSH with
  CURVE, then ``--requests`` requests of the tiny model's task (topk) through the BS runtime
  against the 4 agents, every row written to a results folder;
* a fuzzer process that, with the BS's own CURVE key (an insider: the handshake would stop an
  outsider before the parser is reached), sends random and mutated protocol messages to every
  agent at ``--fuzz-rate`` messages per second per agent, for as long as the run lasts, and
  counts the replies by error code;
* a sampler thread that reads the resident set size (``VmRSS``) of this process (the BS) and of
  every agent (``/proc/PID/status``; the namespaces share this host's /proc) once a second.

Bound (stated before the run, checked after it): between the end of the warm-up (the first
``--warmup`` requests) and the end of the run, no process's RSS may grow by more than
``--bound-mb`` MiB. Every request must be accounted for: a row in requests.csv with status
``ok`` or ``degraded``, and every failed expert call a row with its reason.

Run (root): ``.venv/bin/python bench/soak.py [--requests 2000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = """
[recipe]
name = "soak"
seed = 7
[model]
path = "tiny"
[policy]
name = "topk"
[links]
rate = "{rate}"
[workload]
task = "tiny"
requests = {requests}
[run]
timeout_s = 5.0
devices = 4
telemetry_period_s = 2.0
"""


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _mutations(rng: random.Random, valid: list[bytes]) -> list[bytes]:
    """One fuzz message: random bytes, a valid message with bytes flipped, a header with a
    wrong version / op / dtype / shape, too many frames, or an empty frame."""
    import msgpack

    kind = rng.randrange(6)
    if kind == 0:
        return [os.urandom(rng.randrange(0, 64))]
    if kind == 1:
        m = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            if m:
                m[rng.randrange(len(m))] = rng.randrange(256)
        return [bytes(m)]
    if kind == 2:
        h = {"v": rng.choice([0, 2, 99, "1"]), "op": "ping", "id": rng.randrange(1 << 30)}
        return [msgpack.packb(h)]
    if kind == 3:
        h = {
            "v": 1,
            "op": "forward",
            "id": rng.randrange(1 << 30),
            "layer": 0,
            "step": 0,
            "t": [
                [
                    f"L{rng.randrange(9)}.E{rng.randrange(9)}",
                    rng.choice(["float32", "int8", "x"]),
                    [rng.randrange(-2, 5), rng.randrange(0, 128)],
                ]
            ],
        }
        return [msgpack.packb(h), os.urandom(rng.randrange(0, 2048))]
    if kind == 4:
        h = {"v": 1, "op": rng.choice(["forward", "load", "status", "nope", ""]), "id": 1}
        return [msgpack.packb(h)] + [
            b"\0" * rng.randrange(0, 64) for _ in range(rng.randrange(1, 6))
        ]
    return [b""]


def fuzzer(
    endpoints: dict[str, str],
    keys: tuple[bytes, bytes, dict[str, bytes]],
    rate: float,
    stop_file: str,
    out_file: str,
    seed: int,
) -> None:
    """Fuzz every agent until ``stop_file`` exists; write counts to ``out_file``."""
    import msgpack
    import zmq

    rng = random.Random(seed)
    ctx = zmq.Context()
    socks = {}
    for d, ep in endpoints.items():
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_publickey, s.curve_secretkey = keys[0], keys[1]
        s.curve_serverkey = keys[2][d]
        s.connect(ep)
        socks[d] = s
    valid = [
        msgpack.packb({"v": 1, "op": "ping", "id": 7}),
        msgpack.packb({"v": 1, "op": "status", "id": 8}),
    ]
    sent = 0
    codes: collections.Counter[str] = collections.Counter()
    period = 1.0 / rate if rate > 0 else 1.0
    next_t = time.monotonic()

    def drain(s: zmq.Socket) -> None:
        while s.poll(0):
            fr = s.recv_multipart()
            if len(fr) > 1 and not fr[0]:  # a message that began with an empty frame got it
                fr = fr[1:]  # back as a delimiter before the reply header
            try:
                codes[str(msgpack.unpackb(fr[0]).get("code"))] += 1
            except Exception:  # noqa: BLE001 - a reply the fuzzer cannot read is counted too
                codes["unreadable"] += 1

    while not os.path.exists(stop_file):
        for s in socks.values():
            try:
                s.send_multipart(_mutations(rng, valid), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
            drain(s)
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for s in socks.values():
            drain(s)
        time.sleep(0.05)
    Path(out_file).write_text(json.dumps({"sent": sent, "replies_by_code": dict(codes)}))
    for s in socks.values():
        s.close(0)
    ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200, help="requests before the RSS baseline")
    ap.add_argument("--bound-mb", type=float, default=32.0, help="allowed RSS growth per process")
    ap.add_argument("--rate", default="100mbit", help="link rate of every device")
    ap.add_argument("--fuzz-rate", type=float, default=20.0, help="fuzz messages/s per agent")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from testbed.lab import local
    from testbed.lab import provision as prov
    from testbed.lab.inventory import load_inventory
    from testbed.lab.keys import client_keys
    from testbed.results import schema as R
    from testbed.run.recipe import load_recipe
    from testbed.run.session import Progress, run_recipe
    from testbed.units import parse_rate_kbit

    name = "soak" + os.urandom(2).hex()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        os.environ.setdefault("TESTBED_STATE_DIR", f"{tmp}/state")
        recipe = Path(tmp) / "soak.toml"
        recipe.write_text(RECIPE.format(rate=a.rate, requests=a.requests))
        t_start = time.monotonic()
        up = local.up(name, 4, parse_rate_kbit(a.rate), Path(tmp) / "inv.toml")
        inv_path = Path(up["inventory"])
        samples: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
        progress_n = [0]
        stop = threading.Event()
        fuzz_proc = None
        try:
            inv = load_inventory(inv_path)
            reports = prov.provision(inv, "tiny")
            bad = [r for r in reports if not r.ok]
            if bad:
                raise SystemExit(f"provision failed: {[(r.device, r.error) for r in bad]}")
            eps = prov.agent_endpoints(inv)
            pids = {d: int(e["pid"]) for d, e in eps.items()}
            curve = client_keys(inv)
            assert curve is not None
            stop_file, fuzz_out = f"{tmp}/fuzz.stop", f"{tmp}/fuzz.json"
            fuzz_proc = mp.get_context("spawn").Process(
                target=fuzzer,
                args=(
                    {d: e["endpoint"] for d, e in eps.items()},
                    (curve.public, curve.secret, dict(curve.server_keys)),
                    a.fuzz_rate,
                    stop_file,
                    fuzz_out,
                    1,
                ),
                daemon=True,
            )
            fuzz_proc.start()

            def sampler() -> None:
                while not stop.wait(1.0):
                    n = progress_n[0]
                    for who, pid in [("bs", os.getpid()), *pids.items()]:
                        v = rss_mb(pid)
                        if v is not None:
                            samples[who].append((n, v))

            th = threading.Thread(target=sampler, daemon=True)
            th.start()

            class Count(Progress):
                def request(self) -> None:
                    progress_n[0] += 1

            res = run_recipe(load_recipe(recipe), inv_path, Path(tmp) / "results", Count())
            stop.set()
            th.join(5)
            Path(stop_file).write_text("")
            fuzz_proc.join(30)
            fuzz = json.loads(Path(fuzz_out).read_text()) if Path(fuzz_out).exists() else {}
            reqs = R.read_csv(res.run_dir / R.REQUESTS)
            calls = R.read_csv(res.run_dir / R.CALLS)
        finally:
            stop.set()
            if fuzz_proc is not None and fuzz_proc.is_alive():
                fuzz_proc.kill()
            local.down(name)
        wall = time.monotonic() - t_start

    by_status = collections.Counter(r["status"] for r in reqs)
    fails = collections.Counter(
        f"{c['status']}: {c['detail'][:60]}" for c in calls if c["status"] != "ok"
    )
    rows = []
    ok_all = True
    for who, ss in sorted(samples.items()):
        base = [v for n, v in ss if n >= a.warmup][:1] or [ss[0][1]]
        start, end, peak = base[0], ss[-1][1], max(v for _, v in ss)
        grow = end - start
        ok = grow <= a.bound_mb
        ok_all &= ok
        rows.append(
            {
                "process": who,
                "rss_after_warmup_mb": round(start, 1),
                "rss_end_mb": round(end, 1),
                "rss_peak_mb": round(peak, 1),
                "growth_mb": round(grow, 1),
                "ok": ok,
            }
        )
    accounted = len(reqs) == a.requests and set(by_status) <= {"ok", "degraded"}
    print(
        f"soak: {a.requests} requests of the tiny task across 4 agents (CURVE, {a.rate} links), "
        f"fuzzer at {a.fuzz_rate:g} msg/s per agent beside them; {wall:.0f} s wall, "
        f"run {res.status}"
    )
    print(f"requests: {len(reqs)} rows, by status {dict(by_status)}; accounted for: {accounted}")
    print(
        f"expert calls: {len(calls)}, not ok: {sum(fails.values())} {dict(fails) if fails else ''}"
    )
    print(
        f"fuzzer: {fuzz.get('sent')} messages sent, "
        f"replies by error code {fuzz.get('replies_by_code')}"
    )
    print(
        f"RSS bound: growth after the first {a.warmup} requests <= {a.bound_mb:g} MiB per process"
    )
    print("| process | RSS after warm-up (MiB) | RSS at end | peak | growth | within bound |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['process']} | {r['rss_after_warmup_mb']} | {r['rss_end_mb']} | "
            f"{r['rss_peak_mb']} | {r['growth_mb']} | {'yes' if r['ok'] else 'NO'} |"
        )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "requests": len(reqs),
                    "by_status": by_status,
                    "calls": len(calls),
                    "failures": fails,
                    "fuzz": fuzz,
                    "rss": rows,
                    "wall_s": wall,
                },
                indent=1,
                default=dict,
            )
        )
    return 0 if ok_all and accounted else 1


if __name__ == "__main__":
    sys.exit(main())
