"""Rate-change benchmark (issue 15, item 2): one decision epoch's rate change, ``tc`` CLI vs
rtnetlink.

A scratch network namespace gets a tree like the testbed's BS: a veth (downlink) and an ifb
(uplink, fed by an ingress mirred redirect), each with HTB class ``1:(100+i)`` per device
(links' rate/ceil/burst/cburst/quantum) and a TBF leaf ``(100+i):`` holding one MTU. Every
epoch gives all devices new random (down, up) rates; per epoch it times:

* ``tc -batch, HTB only + show`` — what ``TcShaper.set_rates`` ran before netlink: one
  ``sh -c 'tc -batch -'`` process changing every HTB class, then listing the classes of both
  interfaces, parsed for the read-back;
* ``tc -batch, HTB+TBF`` — one ``tc -batch`` process changing every class and every TBF leaf
  (what the CLI costs for the new tree), no read-back;
* ``netlink change`` — the same 4 messages per device (HTB class + TBF leaf, both
  directions) built and sent in one ``send``, every ack read;
* ``netlink read-back`` — class dumps of both interfaces and one qdisc dump, parsed, every
  class checked against its leaf;
* ``netlink change + read-back`` — the two together (what ``set_rates`` does over netlink);
* ``TcShaper.set_rates`` — the shaper's own call, whatever path it takes in this checkout.

Methods run interleaved, one epoch each in turn. Target: netlink change <= 0.5 ms per epoch.
The namespace is deleted on exit, on an error and on Ctrl-C/SIGTERM.

Run (root): ``.venv/bin/python bench/rate_change.py [--devices 8] [--epochs 200] [--json f]``.
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

from testbed import links
from testbed import netlink_tc as N
from testbed.runner import LocalRunner

TARGET_MS = 0.5
TBF_BURST = 1514
TBF_LATENCY_US = 1_000_000
IFACE, IFB = "v0", "ifb0"


def _addr(i: int) -> str:
    return f"10.232.0.{11 + i}"


def _run(argv: list[str], ns: str | None = None, check: bool = True) -> None:
    full = (["ip", "netns", "exec", ns] if ns else []) + argv
    res = subprocess.run(full, check=False, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {res.stderr.strip()}")


def _tree(dev: str, n: int, kbit: float, match: str) -> list[list[str]]:
    cmds = [["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default",
             "ffff", "direct_qlen", "1000"],
            ["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
             *links._htb_params(links.UNLIMITED_KBIT)]]
    for i in range(n):
        m = links.class_minor(i)
        cmds += [["tc", "class", "add", "dev", dev, "parent", "1:1", "classid", f"1:{m:x}",
                  *links._htb_params(kbit)],
                 ["tc", "qdisc", "add", "dev", dev, "parent", f"1:{m:x}", "handle", f"{m:x}:",
                  "tbf", "rate", links.format_rate(kbit), "burst", str(TBF_BURST),
                  "latency", "1s"],
                 ["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio",
                  "1", "u32", "match", "ip", match, f"{_addr(i)}/32", "flowid", f"1:{m:x}"]]
    return cmds


def make_namespace(ns: str, n: int) -> None:
    _run(["ip", "netns", "add", ns])
    _run(["ip", "link", "add", IFACE, "type", "veth", "peer", "name", "v1"], ns)
    _run(["ip", "link", "add", IFB, "type", "ifb"], ns)
    for dev in (IFACE, "v1", IFB, "lo"):
        _run(["ip", "link", "set", dev, "up"], ns)
    for argv in (_tree(IFACE, n, 20000, "dst") + _tree(IFB, n, 20000, "src")
                 + [["tc", "qdisc", "add", "dev", IFACE, "handle", "ffff:", "ingress"],
                    ["tc", "filter", "add", "dev", IFACE, "parent", "ffff:", "protocol", "ip",
                     "prio", "1", "u32", "match", "u32", "0", "0", "action", "mirred",
                     "egress", "redirect", "dev", IFB]]):
        _run(argv, ns)


# -- the methods ------------------------------------------------------------------------------
def cli_set_rates_before(shaper: links.TcShaper, rates: dict[str, tuple[float, float]]) -> None:
    """TcShaper.set_rates as it was before netlink: HTB changes + class listings, one
    ``sh -c 'tc -batch -'``, parsed."""
    lines = []
    for dev, (down, up) in rates.items():
        i = shaper.index(dev)
        for d, kbit in ((IFACE, down), (IFB, up)):
            lines.append(shlex.join(
                links.build_class_change_command(d, i, links.LinkSpec(kbit))[1:]))
    lines += [f"class show dev {IFACE}", f"qdisc show dev {IFB} root", f"class show dev {IFB}"]
    script = "tc -batch - <<'EOF'\n" + "\n".join(lines) + "\nEOF\n"
    res = shaper.runner.run(["sh", "-c", script], timeout_s=15)
    parts = re.split(r"(?m)^qdisc .*$", res.stdout, maxsplit=1) + [""]
    got = [{c.classid: c.rate_kbit for c in links.parse_htb_classes(t)} for t in parts[:2]]
    for dev in rates:
        cid = f"1:{links.class_minor(shaper.index(dev)):x}"
        assert cid in got[0] and cid in got[1], f"{cid} missing from tc's listing"


def cli_htb_tbf(n: int, rates: dict[int, tuple[float, float]]) -> None:
    lines = []
    for i, (down, up) in rates.items():
        m = links.class_minor(i)
        for d, kbit in ((IFACE, down), (IFB, up)):
            lines.append(shlex.join(
                links.build_class_change_command(d, i, links.LinkSpec(kbit))[1:]))
            lines.append(f"qdisc change dev {d} parent 1:{m:x} handle {m:x}: tbf rate "
                         f"{links.format_rate(kbit)} burst {TBF_BURST} latency 1s")
    subprocess.run(["tc", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                   check=True, capture_output=True)


def netlink_changes(rates: dict[int, tuple[float, float]]) -> list[N.Change]:
    out: list[N.Change] = []
    for i, (down, up) in rates.items():
        m = links.class_minor(i)
        for dev, kbit in ((IFACE, down), (IFB, up)):
            r, b = N.rate_bytes(kbit), links.burst_bytes(kbit)
            out.append(N.HtbClass(dev, 0x10000 | m, 0x10001, r, r, b, b, links.QUANTUM_BYTES))
            out.append(N.TbfQdisc(dev, m << 16, 0x10000 | m, r, TBF_BURST,
                                  N.tbf_limit(r, TBF_BURST, TBF_LATENCY_US)))
    return out


def netlink_readback(nl: N.TcNetlink, n: int) -> dict[int, tuple[float, float]]:
    """Class dumps of both interfaces and one qdisc dump (all interfaces): every class and
    its TBF leaf must agree."""
    got: list[dict[int, float]] = []
    qdiscs = nl.qdiscs_of([IFACE, IFB], stats=False)
    for dev in (IFACE, IFB):
        rates = {c.handle & 0xFFFF: c.rate_kbit for c in nl.classes(dev, stats=False)
                 if c.kind == "htb"}
        leaves = {q.parent & 0xFFFF: q.rate_kbit for q in qdiscs[dev] if q.kind == "tbf"}
        for i in range(n):
            m = links.class_minor(i)
            if rates.get(m) != leaves.get(m):
                raise AssertionError(f"{dev} 1:{m:x}: class {rates.get(m)} vs leaf "
                                     f"{leaves.get(m)} kbit/s")
        got.append(rates)
    return {i: (got[0][links.class_minor(i)], got[1][links.class_minor(i)]) for i in range(n)}


# -- the run ----------------------------------------------------------------------------------
def _stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p90_ms": s[min(len(s) - 1, int(0.9 * len(s)))],
            "min_ms": s[0], "max_ms": s[-1], "n": len(s)}


def bench(ns: str, n: int, epochs: int, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    names = [f"dev{i + 1}" for i in range(n)]
    times: dict[str, list[float]] = {}
    with N.in_netns(ns):  # this thread (and the processes it starts) work in the namespace
        shaper = links.TcShaper(LocalRunner(host="bs"), IFACE, IFB,
                                [_addr(i) for i in range(n)], names)
        nl = N.TcNetlink()
        last: dict[int, tuple[float, float]] = {}

        def new_rates() -> dict[int, tuple[float, float]]:
            last.clear()
            last.update({i: (float(rng.randrange(100, 50000)), float(rng.randrange(100, 50000)))
                         for i in range(n)})
            return dict(last)

        def by_name(r):
            return {names[i]: v for i, v in r.items()}

        def nl_both(r):
            nl.change(netlink_changes(r))
            got = netlink_readback(nl, n)
            assert got == r, (got, r)

        methods: dict[str, Callable[[dict[int, tuple[float, float]]], object]] = {
            "tc -batch, HTB only + show (set_rates before)":
                lambda r: cli_set_rates_before(shaper, by_name(r)),
            "tc -batch, HTB+TBF": lambda r: cli_htb_tbf(n, r),
            "netlink change (HTB+TBF, acks)": lambda r: nl.change(netlink_changes(r)),
            "netlink read-back (3 dumps)": lambda r: netlink_readback(nl, n),
            "netlink change + read-back": nl_both,
            "TcShaper.set_rates (this checkout)": lambda r: shaper.set_rates(by_name(r)),
        }
        try:
            for _ in range(3):  # warm-up (page cache for tc, socket, caches)
                for fn in methods.values():
                    fn(new_rates())
            for _ in range(epochs):
                for name, fn in methods.items():
                    r = new_rates()
                    t0 = time.perf_counter()
                    fn(r)
                    times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
            # what is enforced at the end is the last epoch's rates
            final = new_rates()
            nl.change(netlink_changes(final))
            assert netlink_readback(nl, n) == final
            shown = {s.device: (s.down_kbit, s.up_kbit) for s in shaper.show()}
            assert shown == by_name(final), (shown, final)
        finally:
            nl.close()
    return {k: _stats(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=200)
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
    msgs = 4 * args.devices
    print(f"{args.devices} devices x 2 directions, {args.epochs} epochs per method "
          f"({msgs} messages per netlink epoch: HTB class + TBF leaf per device and direction)")
    print(f"{'method':50s} {'median ms':>10s} {'p90 ms':>8s} {'min ms':>8s}")
    for name, s in res.items():
        print(f"{name:50s} {s['median_ms']:10.3f} {s['p90_ms']:8.3f} {s['min_ms']:8.3f}")
    cli = res["tc -batch, HTB+TBF"]["median_ms"]
    nlc = res["netlink change (HTB+TBF, acks)"]["median_ms"]
    old = res["tc -batch, HTB only + show (set_rates before)"]["median_ms"]
    both = res["netlink change + read-back"]["median_ms"]
    print(f"ratio tc -batch HTB+TBF / netlink change: {cli / nlc:.0f}x")
    print(f"ratio set_rates before / netlink change + read-back: {old / both:.0f}x")
    print(f"netlink change median {nlc:.3f} ms vs target {TARGET_MS} ms: "
          f"{'met' if nlc <= TARGET_MS else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"devices": args.devices, "epochs": args.epochs,
                                         "methods": res, "target_ms": TARGET_MS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
