"""Rate-change benchmark (issue 15, item 2): one decision epoch's rate change, ``tc`` CLI vs
rtnetlink.

A scratch network namespace gets the testbed's BS tree, built by ``testbed.net.tc`` itself in
``tbf`` mode: a veth (downlink) and an ifb (uplink, fed by an ingress mirred redirect), each
with HTB class ``1:(100+i)`` per device and a one-frame TBF leaf ``(100+i):``. Every epoch
gives all devices new random (down, up) rates; per epoch it times:

* ``tc -batch HTB + show (old set_rates)`` — what ``TcShaper.set_rates`` ran before the TBF
  leaves and netlink: one ``sh -c 'tc -batch -'`` changing every HTB class, then listing the
  classes of both interfaces, parsed;
* ``tc -batch HTB+TBF, no listing`` — one ``tc -batch`` process changing every class and TBF
  leaf: the CLI's floor for this tree;
* ``set_rates, tc CLI path`` — ``TcShaper.set_rates`` with netlink off (one ``tc -j -batch``
  with the changes and the listings, parsed);
* ``netlink change`` — the 4 messages per device (HTB class + TBF leaf, both directions) built
  and sent in one ``send``, the kernel's answer read;
* ``netlink read-back`` — class dumps of both interfaces and one qdisc dump, decoding only
  the device classes and their leaves (as ``set_rates`` does), every class checked against
  its leaf;
* ``netlink change + read-back`` — the two together;
* ``set_rates, netlink path`` — ``TcShaper.set_rates`` as the testbed calls it here (local BS,
  root): the same as the line above plus building the tc words and translating them.

Methods run interleaved, one epoch each in turn. Target: netlink change <= 0.5 ms per epoch.
The namespace is deleted on exit, on an error and on Ctrl-C/SIGTERM.

Run (root): ``.venv/bin/python bench/rate_change.py [--devices 8] [--epochs 300] [--json f]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.lab.runner import LocalRunner
from testbed.net import netlink as N
from testbed.net import tc
from testbed.net.rates import of_root, under_root
from testbed.net.shaper import TcShaper

TARGET_MS = 0.5
BUCKET = tc.DEFAULT_BUCKET_BYTES
IFACE, IFB = "v0", "ifb0"


def _addr(i: int) -> str:
    return f"10.232.0.{11 + i}"


def _run(argv: list[str], ns: str | None = None, check: bool = True) -> None:
    full = (["ip", "netns", "exec", ns] if ns else []) + argv
    res = subprocess.run(full, check=False, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {res.stderr.strip()}")


def make_namespace(ns: str, n: int) -> None:
    """veth + ifb and the testbed's tree (tbf mode, 20 Mbit/s everywhere) in ``ns``."""
    _run(["ip", "netns", "add", ns])
    _run(["ip", "link", "add", IFACE, "type", "veth", "peer", "name", "v1"], ns)
    for dev in (IFACE, "v1", "lo"):
        _run(["ip", "link", "set", dev, "up"], ns)
    specs = [tc.LinkSpec(20000)] * n
    for argv in tc.build_setup_commands(
        IFACE, IFB, [_addr(i) for i in range(n)], specs, specs, None, "tbf", BUCKET
    ):
        _run(argv, ns)


# -- the methods ------------------------------------------------------------------------------
def cli_old_set_rates(shaper: TcShaper, rates: dict[str, tuple[float, float]]) -> None:
    """TcShaper.set_rates before TBF leaves and netlink: HTB changes + class listings, one
    ``sh -c 'tc -batch -'``, parsed."""
    lines = []
    for dev, (down, up) in rates.items():
        i = shaper.index(dev)
        for d, kbit in ((IFACE, down), (IFB, up)):
            lines.append(shlex.join(tc.build_class_change_command(d, i, tc.LinkSpec(kbit))[1:]))
    lines += [f"class show dev {IFACE}", f"qdisc show dev {IFB} root", f"class show dev {IFB}"]
    script = "tc -batch - <<'EOF'\n" + "\n".join(lines) + "\nEOF\n"
    res = shaper.runner.run(["sh", "-c", script], timeout_s=15)
    parts = re.split(r"(?m)^qdisc .*$", res.stdout, maxsplit=1) + [""]
    got = [{c.classid: c.rate_kbit for c in tc.parse_htb_classes(t)} for t in parts[:2]]
    for dev in rates:
        cid = f"1:{tc.class_minor(shaper.index(dev)):x}"
        assert cid in got[0] and cid in got[1], f"{cid} missing from tc's listing"


def _leaf_argv(dev: str, i: int, kbit: float) -> list[str]:
    return tc.leaf_command("change", dev, tc.class_minor(i), "tbf", tc.LinkSpec(kbit), BUCKET, True)


def cli_htb_tbf(rates: dict[int, tuple[float, float]]) -> None:
    lines = []
    for i, (down, up) in rates.items():
        for d, kbit in ((IFACE, down), (IFB, up)):
            lines.append(shlex.join(tc.build_class_change_command(d, i, tc.LinkSpec(kbit))[1:]))
            lines.append(shlex.join(_leaf_argv(d, i, kbit)[1:]))
    subprocess.run(
        ["tc", "-batch", "-"],
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
        capture_output=True,
    )


def netlink_changes(rates: dict[int, tuple[float, float]]) -> list[N.Change]:
    """The epoch as netlink changes, straight from the rates (tc.py's class parameters, the
    tree's TBF bucket and limit)."""
    out: list[N.Change] = []
    limit = tc.tbf_limit_bytes(BUCKET)
    for i, (down, up) in rates.items():
        m = tc.class_minor(i)
        for dev, kbit in ((IFACE, down), (IFB, up)):
            r, b = N.rate_bytes(kbit), tc.burst_bytes(kbit)
            out.append(N.HtbClass(dev, 0x10000 | m, 0x10001, r, r, b, b, tc.QUANTUM_BYTES))
            out.append(N.TbfQdisc(dev, m << 16, 0x10000 | m, r, BUCKET, limit))
    return out


def netlink_readback(nl: N.TcNetlink, n: int) -> dict[int, tuple[float, float]]:
    """Class dumps of both interfaces and one qdisc dump (all interfaces): every class and
    its TBF leaf must agree."""
    got: list[dict[int, float]] = []
    qdiscs = nl.qdiscs_of([IFACE, IFB], stats=False, where=under_root)
    for dev in (IFACE, IFB):
        rates = {
            c.handle & 0xFFFF: c.rate_kbit
            for c in nl.classes(dev, stats=False, where=of_root)
            if c.kind == "htb"
        }
        leaves = {q.parent & 0xFFFF: q.rate_kbit for q in qdiscs[dev] if q.kind == "tbf"}
        for i in range(n):
            m = tc.class_minor(i)
            if rates.get(m) != leaves.get(m):
                raise AssertionError(
                    f"{dev} 1:{m:x}: class {rates.get(m)} vs leaf {leaves.get(m)} kbit/s"
                )
        got.append(rates)
    return {i: (got[0][tc.class_minor(i)], got[1][tc.class_minor(i)]) for i in range(n)}


# -- the run ----------------------------------------------------------------------------------
def _stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "median_ms": statistics.median(s),
        "p90_ms": s[min(len(s) - 1, int(0.9 * len(s)))],
        "min_ms": s[0],
        "max_ms": s[-1],
        "n": len(s),
    }


OLD = "tc -batch HTB + show (old set_rates)"
CLI_FLOOR = "tc -batch HTB+TBF, no listing"
CLI_PATH = "set_rates, tc CLI path"
NL_CHANGE = "netlink change"
NL_READ = "netlink read-back (3 dumps)"
NL_BOTH = "netlink change + read-back"
NL_PATH = "set_rates, netlink path"


def bench(ns: str, n: int, epochs: int, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    names = [f"dev{i + 1}" for i in range(n)]
    addrs = [_addr(i) for i in range(n)]
    times: dict[str, list[float]] = {}
    with N.in_netns(ns):  # this thread (and the processes it starts) work in the namespace

        def shaper(netlink: bool) -> TcShaper:
            s = TcShaper(LocalRunner(host="bs"), IFACE, IFB, addrs, names, shaping="tbf")
            s.netlink = netlink
            return s

        nl_shaper, cli_shaper = shaper(True), shaper(False)
        nl = N.TcNetlink()

        def new_rates() -> dict[int, tuple[float, float]]:
            return {
                i: (float(rng.randrange(100, 50000)), float(rng.randrange(100, 50000)))
                for i in range(n)
            }

        def by_name(r):
            return {names[i]: v for i, v in r.items()}

        def nl_both(r):
            nl.change(netlink_changes(r))
            assert netlink_readback(nl, n) == r

        def via_shaper(s: TcShaper, r) -> None:
            assert s.set_rates(by_name(r)) == by_name(r)

        methods: dict[str, Callable[[dict[int, tuple[float, float]]], object]] = {
            OLD: lambda r: cli_old_set_rates(cli_shaper, by_name(r)),
            CLI_FLOOR: cli_htb_tbf,
            CLI_PATH: lambda r: via_shaper(cli_shaper, r),
            NL_CHANGE: lambda r: nl.change(netlink_changes(r)),
            NL_READ: lambda r: netlink_readback(nl, n),
            NL_BOTH: nl_both,
            NL_PATH: lambda r: via_shaper(nl_shaper, r),
        }
        try:
            for _ in range(3):  # warm-up (page cache for tc, socket, leaf caches)
                for fn in methods.values():
                    fn(new_rates())
            for _ in range(epochs):
                for name, fn in methods.items():
                    r = new_rates()
                    t0 = time.perf_counter()
                    fn(r)
                    times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
            assert nl_shaper._nl is not None and cli_shaper._nl is None
            final = new_rates()
            nl_shaper.set_rates(by_name(final))
            shown = {s.device: (s.down_kbit, s.up_kbit) for s in nl_shaper.show()}
            assert shown == by_name(final), (shown, final)
        finally:
            nl.close()
    return {k: _stats(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespace, tc)", file=sys.stderr)
        return 2
    ns = "rc" + secrets.token_hex(3)

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        make_namespace(ns, args.devices)
        res = bench(ns, args.devices, args.epochs, args.seed)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    print(
        f"{args.devices} devices x 2 directions, {args.epochs} epochs per method, "
        f"{4 * args.devices} netlink messages per epoch (HTB class + TBF leaf per device and "
        f"direction); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'method':40s} {'median ms':>10s} {'p90 ms':>8s} {'min ms':>8s}")
    for name, s in res.items():
        print(f"{name:40s} {s['median_ms']:10.3f} {s['p90_ms']:8.3f} {s['min_ms']:8.3f}")
    med = {k: v["median_ms"] for k, v in res.items()}
    print(f"ratio {CLI_FLOOR} / {NL_CHANGE}: {med[CLI_FLOOR] / med[NL_CHANGE]:.0f}x")
    print(f"ratio {CLI_PATH} / {NL_PATH}: {med[CLI_PATH] / med[NL_PATH]:.0f}x")
    print(f"ratio {OLD} / {NL_PATH}: {med[OLD] / med[NL_PATH]:.0f}x")
    print(
        f"{NL_CHANGE} median {med[NL_CHANGE]:.3f} ms, p90 {res[NL_CHANGE]['p90_ms']:.3f} ms "
        f"vs target {TARGET_MS} ms: {'met' if med[NL_CHANGE] <= TARGET_MS else 'MISSED'}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "devices": args.devices,
                    "epochs": args.epochs,
                    "load_average": os.getloadavg()[0],
                    "methods": res,
                    "target_ms": TARGET_MS,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
