"""Rate changes over rtnetlink on a real HTB+TBF tree, in scratch network namespaces.

Two namespaces per test: ``bs`` holds a veth (downlink tree on its egress) and an ifb (uplink
tree, fed by an ingress mirred redirect), shaped as the testbed shapes the BS: HTB class
``1:(100+i)`` per device with a TBF leaf ``(100+i):``; ``peer`` holds the other end of the veth
with one address per device. Both namespaces (and so every link and qdisc in them) are deleted
after each test, whatever happened. The host's own namespace is never touched.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from testbed.errors import CommandFailed
from testbed.lab.runner import LocalRunner
from testbed.net import netlink as N
from testbed.net import tc
from testbed.net.shaper import TcShaper
from testbed.units import format_rate
from tests.conftest import needs_testbed, unique_name

pytestmark = needs_testbed

NET = "10.231.0"
BS_ADDR = f"{NET}.1"
START_KBIT = 8000.0
TBF_BURST = 1514
TBF_LATENCY_US = 1_000_000


def _addr(i: int) -> str:
    return f"{NET}.{11 + i}"


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    res = subprocess.run(full, check=False, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: {res.stderr.strip()}")
    return res


def tree_commands(dev: str, n: int, kbit: float, match: str) -> list[list[str]]:
    """The testbed's per-device tree: HTB class 1:(100+i) with tc.py's parameters and a TBF
    leaf (100+i): holding one MTU, selected by a u32 filter on the device's address."""
    cmds = [
        [
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "handle",
            "1:",
            "htb",
            "default",
            "ffff",
            "direct_qlen",
            "1000",
        ],
        [
            "tc",
            "class",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "classid",
            "1:1",
            *tc.htb_params(tc.UNLIMITED_KBIT),
        ],
    ]
    for i in range(n):
        m = tc.class_minor(i)
        cmds += [
            [
                "tc",
                "class",
                "add",
                "dev",
                dev,
                "parent",
                "1:1",
                "classid",
                f"1:{m:x}",
                *tc.htb_params(kbit),
            ],
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "parent",
                f"1:{m:x}",
                "handle",
                f"{m:x}:",
                "tbf",
                "rate",
                format_rate(kbit),
                "burst",
                str(TBF_BURST),
                "latency",
                "1s",
            ],
            [
                "tc",
                "filter",
                "add",
                "dev",
                dev,
                "parent",
                "1:",
                "protocol",
                "ip",
                "prio",
                "1",
                "u32",
                "match",
                "ip",
                match,
                f"{_addr(i)}/32",
                "flowid",
                f"1:{m:x}",
            ],
        ]
    return cmds


@pytest.fixture
def scratch():
    """(bs namespace, peer namespace, n devices) with the shaping tree on v0 and ifb0."""
    bs, peer = unique_name("nb"), unique_name("np")
    n = 3
    try:
        sh("ip", "netns", "add", bs)
        sh("ip", "netns", "add", peer)
        sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", peer, ns=bs)
        sh("ip", "link", "add", "ifb0", "type", "ifb", ns=bs)
        sh("ip", "addr", "add", f"{BS_ADDR}/24", "dev", "v0", ns=bs)
        for i in range(n):
            sh("ip", "addr", "add", f"{_addr(i)}/24", "dev", "v1", ns=peer)
        for ns, dev in ((bs, "v0"), (bs, "ifb0"), (bs, "lo"), (peer, "v1"), (peer, "lo")):
            sh("ip", "link", "set", dev, "up", ns=ns)
        for argv in (
            tree_commands("v0", n, START_KBIT, "dst")
            + tree_commands("ifb0", n, START_KBIT, "src")
            + [
                ["tc", "qdisc", "add", "dev", "v0", "handle", "ffff:", "ingress"],
                [
                    "tc",
                    "filter",
                    "add",
                    "dev",
                    "v0",
                    "parent",
                    "ffff:",
                    "protocol",
                    "ip",
                    "prio",
                    "1",
                    "u32",
                    "match",
                    "u32",
                    "0",
                    "0",
                    "action",
                    "mirred",
                    "egress",
                    "redirect",
                    "dev",
                    "ifb0",
                ],
            ]
        ):
            sh(*argv, ns=bs)
        yield bs, peer, n
    finally:
        for ns in (bs, peer):
            sh("ip", "netns", "del", ns, check=False)
        left = sh("ip", "netns", "list").stdout
        assert bs not in left and peer not in left


def epoch(n: int, rates: dict[int, tuple[float, float]]) -> list[N.Change]:
    """One epoch's messages: HTB class (tc.py's rate/ceil/burst/cburst/quantum) and TBF leaf
    of every device, both directions."""
    out: list[N.Change] = []
    for i, (down, up) in rates.items():
        m = tc.class_minor(i)
        for dev, kbit in (("v0", down), ("ifb0", up)):
            r, b = N.rate_bytes(kbit), tc.burst_bytes(kbit)
            out.append(N.HtbClass(dev, 0x10000 | m, 0x10001, r, r, b, b, tc.QUANTUM_BYTES))
            out.append(
                N.TbfQdisc(
                    dev,
                    m << 16,
                    0x10000 | m,
                    r,
                    TBF_BURST,
                    N.tbf_limit(r, TBF_BURST, TBF_LATENCY_US),
                )
            )
    return out


# -- what tc says ----------------------------------------------------------------------------
def tc_qdiscs(ns: str, dev: str) -> list[dict]:
    return json.loads(sh("tc", "-s", "-j", "qdisc", "show", "dev", dev, ns=ns).stdout)


def tc_classes(ns: str, dev: str) -> dict[str, tc.TcClass]:
    text = sh("tc", "-s", "class", "show", "dev", dev, ns=ns).stdout
    return {c.classid: c for c in tc.parse_htb_classes(text) if c.classid.startswith("1:")}


def tc_burst_bytes(ns: str, dev: str) -> dict[str, tuple[int, int]]:
    """classid -> (burst, cburst) in bytes as ``tc -d class show`` prints them."""
    text = sh("tc", "-d", "class", "show", "dev", dev, ns=ns).stdout
    return {
        m[1]: (int(m[2]), int(m[3]))
        for m in re.finditer(r"class htb (\S+) .*? burst (\d+)b/\d+ .*? cburst (\d+)b/\d+", text)
    }


def handles(ns: str) -> list[tuple[str, str, str, str]]:
    return [
        (d, q["kind"], q["handle"], q.get("parent", "root"))
        for d in ("v0", "ifb0")
        for q in tc_qdiscs(ns, d)
    ]


def leaf_sent(ns: str) -> dict[tuple[str, str], int]:
    return {
        (d, q["handle"]): q["bytes"]
        for d in ("v0", "ifb0")
        for q in tc_qdiscs(ns, d)
        if q["kind"] == "tbf"
    }


def class_sent(ns: str) -> dict[tuple[str, str], int]:
    return {(d, cid): c.sent_bytes for d in ("v0", "ifb0") for cid, c in tc_classes(ns, d).items()}


# -- traffic ----------------------------------------------------------------------------------
def goodput_kbit(
    src_ns: str, src: str, dst_ns: str, dst: str, kbit: float, seconds: float
) -> float:
    """UDP payload kbit/s received over ``seconds`` (from the first datagram), the sender
    offering twice ``kbit``."""
    with N.in_netns(dst_ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with N.in_netns(src_ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()
    try:
        rx.bind((dst, 0))
        rx.settimeout(2.0)
        tx.bind((src, 0))
        port = rx.getsockname()[1]
        payload = b"x" * 1000
        per_ms = max(1, int(2 * kbit * 1000 / 8 / 1000 / len(payload)))

        def send() -> None:
            while not stop.is_set():
                for _ in range(per_ms):
                    try:
                        tx.sendto(payload, (dst, port))
                    except OSError:
                        pass
                time.sleep(0.001)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        got = len(rx.recv(65536))
        t0 = time.monotonic()
        while (left := t0 + seconds - time.monotonic()) > 0:
            rx.settimeout(left)
            try:
                got += len(rx.recv(65536))
            except TimeoutError:
                break
        return got * 8 / 1000 / seconds
    finally:
        stop.set()
        tx.close()
        rx.close()


def traffic(bs: str, peer: str, n: int, seconds: float = 0.3) -> None:
    """A little traffic both ways through every device's classes."""
    for i in range(n):
        goodput_kbit(bs, BS_ADDR, peer, _addr(i), 2000, seconds)
        goodput_kbit(peer, _addr(i), bs, BS_ADDR, 2000, seconds)


# -- tests ------------------------------------------------------------------------------------
def test_epoch_changes_rates_in_place(scratch):
    bs, peer, n = scratch
    traffic(bs, peer, n)
    before_handles = handles(bs)
    before_leaf, before_class = leaf_sent(bs), class_sent(bs)
    assert all(before_leaf.values()) and all(v for (_, c), v in before_class.items() if c != "1:1")

    rates = {0: (1234.0, 567.0), 1: (20000.0, 3000.0), 2: (8.0, 100000.0)}
    changes = epoch(n, rates)
    with N.TcNetlink(bs) as nl:
        echoed = nl.change(changes, echo=True)
        ours_classes = {d: {c.handle: c for c in nl.classes(d)} for d in ("v0", "ifb0")}
        ours_qdiscs = {d: {q.handle: q for q in nl.qdiscs(d)} for d in ("v0", "ifb0")}
        assert {
            d: {q.handle: q.rate for q in qs} for d, qs in nl.qdiscs_of(["v0", "ifb0"]).items()
        } == {d: {h: q.rate for h, q in qs.items()} for d, qs in ours_qdiscs.items()}
    # the echo is each object's state right after its change, as a dump shows it
    assert len(echoed) == len(changes)
    for c, e in zip(changes, echoed):
        key = c.classid if isinstance(c, N.HtbClass) else c.handle
        dumped = (ours_classes if isinstance(c, N.HtbClass) else ours_qdiscs)[c.dev][key]
        assert (e.kind, e.handle, e.parent, e.rate, e.ceil, e.buffer, e.limit) == (
            dumped.kind,
            dumped.handle,
            dumped.parent,
            dumped.rate,
            dumped.ceil,
            dumped.buffer,
            dumped.limit,
        )

    # nothing re-created: same qdiscs (kind, handle, parent), counters not reset
    assert handles(bs) == before_handles
    after_leaf, after_class = leaf_sent(bs), class_sent(bs)
    assert all(after_leaf[k] >= v for k, v in before_leaf.items())
    assert all(after_class[k] >= v for k, v in before_class.items())

    for i, (down, up) in rates.items():
        m = tc.class_minor(i)
        for dev, kbit in (("v0", down), ("ifb0", up)):
            cls = tc_classes(bs, dev)[f"1:{m:x}"]
            assert (cls.rate_kbit, cls.ceil_kbit) == (kbit, kbit), (dev, i)
            assert cls.leaf == f"{m:x}:"
            burst, cburst = tc_burst_bytes(bs, dev)[f"1:{m:x}"]
            want = tc.burst_bytes(kbit)
            assert want - 2 <= burst <= want and want - 2 <= cburst <= want, (dev, i, burst)
            leaf = next(q for q in tc_qdiscs(bs, dev) if q["handle"] == f"{m:x}:")
            assert leaf["kind"] == "tbf" and leaf["parent"] == f"1:{m:x}"
            assert leaf["options"]["rate"] == N.rate_bytes(kbit)  # tc -j: bytes/s
            assert TBF_BURST - 2 <= leaf["options"]["burst"] <= TBF_BURST
            assert leaf["options"]["lat"] == pytest.approx(TBF_LATENCY_US, rel=1e-3)
            # our read-back says the same as tc
            ours = ours_classes[dev][0x10000 | m]
            assert (ours.rate_kbit, ours.ceil_kbit, ours.quantum) == (
                kbit,
                kbit,
                tc.QUANTUM_BYTES,
            )
            assert ours_qdiscs[dev][m << 16].rate == N.rate_bytes(kbit)
            assert ours_qdiscs[dev][m << 16].limit == N.tbf_limit(
                N.rate_bytes(kbit), TBF_BURST, TBF_LATENCY_US
            )

    traffic(bs, peer, n)
    final_leaf = leaf_sent(bs)
    assert all(final_leaf[k] > v for k, v in after_leaf.items()), "counters keep running"


def test_new_rates_are_what_the_link_carries(scratch):
    bs, peer, n = scratch
    with N.TcNetlink(bs) as nl:
        nl.change(epoch(n, {0: (2000.0, 3000.0), 1: (500.0, 500.0)}))
    down = goodput_kbit(bs, BS_ADDR, peer, _addr(0), 2000, 1.0)
    up = goodput_kbit(peer, _addr(0), bs, BS_ADDR, 3000, 1.0)
    # payload only: 1000 of every 1042 bytes on the wire
    print(f"goodput down {down:.0f} up {up:.0f} kbit/s")
    assert 0.85 * 2000 <= down <= 1.02 * 2000, down
    assert 0.85 * 3000 <= up <= 1.02 * 3000, up


def test_bad_handle_is_a_clear_error_and_the_rest_applies(scratch):
    bs, _, n = scratch
    r = N.rate_bytes(4000)
    good = epoch(n, {1: (4000.0, 4000.0)})
    bad = [
        N.HtbClass("v0", 0x101FF, 0x10001, r, r, 3200, 3200, 3028),
        N.TbfQdisc("ifb0", 0x1FF0000, 0x101FF, r, TBF_BURST, 9999),
    ]
    with N.TcNetlink(bs) as nl, pytest.raises(N.TcNetlinkError) as ei:
        nl.change([bad[0], *good, bad[1]])  # the refused one is the last: its ack says so
    msg = str(ei.value)
    assert "v0 class htb 1:1ff -> ENOENT" in msg
    assert "ifb0 qdisc tbf 1ff: -> ENOENT" in msg
    assert [f[1] for f in ei.value.failures] == [errno.ENOENT, errno.ENOENT]
    m = f"1:{tc.class_minor(1):x}"
    assert tc_classes(bs, "v0")[m].rate_kbit == 4000 and tc_classes(bs, "ifb0")[m].rate_kbit == 4000
    # refused in the middle, the last one applied (only it asks for an ack)
    with N.TcNetlink(bs) as nl, pytest.raises(N.TcNetlinkError) as ei:
        nl.change([*epoch(n, {0: (111.0, 111.0)}), bad[1], *epoch(n, {2: (222.0, 222.0)})])
    assert [f[0] for f in ei.value.failures] == ["ifb0 qdisc tbf 1ff:"]
    for i, kbit in ((0, 111), (2, 222)):
        assert tc_classes(bs, "ifb0")[f"1:{tc.class_minor(i):x}"].rate_kbit == kbit
    # a kind that is not the qdisc's: refused, not replaced
    with N.TcNetlink(bs) as nl, pytest.raises(N.TcNetlinkError, match="EINVAL"):
        nl.change([N.TbfQdisc("v0", 0x10000, N.TC_H_ROOT, r, TBF_BURST, 9999)])
    assert [q["kind"] for q in tc_qdiscs(bs, "v0") if q.get("root")] == ["htb"]
    with N.TcNetlink(bs) as nl, pytest.raises(N.TcNetlinkError, match="nosuch0: no such interface"):
        nl.change([N.HtbClass("nosuch0", 0x10100, 0x10001, r, r, 3200, 3200, 3028)])


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_messages_equal_what_tc_sends_and_tableless_ones_act_the_same(scratch):
    """For each tc command line: tc's own message (captured with strace) equals ours built
    from the same words, with tables; the kernel's state after ours without tables equals its
    state after tc's."""
    bs, _, _ = scratch
    kbit, share = 7777.0, 3333.0
    argvs = [
        [
            "tc",
            "class",
            "change",
            "dev",
            "v0",
            "parent",
            "1:1",
            "classid",
            "1:101",
            *tc.htb_params(kbit),
        ],
        [
            "tc",
            "class",
            "change",
            "dev",
            "ifb0",
            "parent",
            "1:1",
            "classid",
            "1:102",
            "htb",
            "rate",
            format_rate(share),
            "ceil",
            format_rate(kbit),
            "burst",
            str(tc.burst_bytes(share)),
            "cburst",
            str(tc.burst_bytes(kbit)),
            "quantum",
            str(tc.QUANTUM_BYTES),
        ],
        [
            "tc",
            "qdisc",
            "change",
            "dev",
            "v0",
            "parent",
            "1:101",
            "handle",
            "101:",
            "tbf",
            "rate",
            format_rate(kbit),
            "burst",
            str(TBF_BURST),
            "latency",
            "1s",
        ],
        [
            "tc",
            "qdisc",
            "change",
            "dev",
            "ifb0",
            "parent",
            "1:102",
            "handle",
            "102:",
            "tbf",
            "rate",
            format_rate(kbit),
            "burst",
            str(TBF_BURST),
            "limit",
            str(1000 * TBF_BURST),
        ],
    ]
    changes = [N.change_from_tc_argv(a) for a in argvs]
    with N.TcNetlink(bs) as nl:
        for change, argv in zip(changes, argvs):
            sent = strace_sendmsg(bs, argv)
            theirs = list(N.split_messages(sent))[-1]
            ours = N.encode_change(
                change, nl.ifindex(change.dev), theirs.seq, tables=True, flags=theirs.flags
            )
            assert ours == sent[-len(ours) :], argv
        after_tc = state(nl)
        nl.change(
            [
                c._replace(rate=125, ceil=125)
                if isinstance(c, N.HtbClass)
                else c._replace(rate=125)
                for c in changes
            ]
        )
        assert state(nl) != after_tc
        nl.change(changes)  # no tables
        assert state(nl) == after_tc


def state(nl: N.TcNetlink) -> list[tuple]:
    objs = [o for d in ("v0", "ifb0") for o in nl.classes(d) + nl.qdiscs(d)]
    return sorted(
        (
            o.ifindex,
            o.kind,
            o.handle,
            o.rate,
            o.ceil,
            o.buffer,
            o.cbuffer,
            o.quantum,
            o.limit,
            tuple(tuple(sorted(s.items())) for s in o.ratespecs),
        )
        for o in objs
    )


def strace_sendmsg(ns: str, argv: list[str]) -> bytes:
    """The bytes of the last sendmsg ``argv`` made on its netlink socket (fd 3)."""
    res = sh("strace", "-e", "trace=sendmsg", "-e", "write=3", "-o", "/dev/stderr", *argv, ns=ns)
    chunks: list[bytearray] = []
    for line in res.stderr.splitlines():
        if line.startswith("sendmsg("):
            chunks.append(bytearray())
        m = re.match(r"\s*\|\s*[0-9a-f]{5}\s+((?:[0-9a-f]{2}\s+)+)", line)
        if m and chunks:
            chunks[-1] += bytes.fromhex(m.group(1).replace(" ", ""))
    assert chunks, res.stderr
    return bytes(chunks[-1])


# -- TcShaper.set_rates over netlink ----------------------------------------------------------
class CountingRunner(LocalRunner):
    """A LocalRunner that counts the commands it runs."""

    def __init__(self, netns: str):
        super().__init__(netns=netns, host="bs")
        self.calls: list[list[str]] = []

    def run(self, argv, **kw):
        self.calls.append(list(argv))
        return super().run(argv, **kw)


@pytest.fixture
def shaped():
    """A bs namespace with a veth and the shaper's own tree (tbf mode) for 3 devices;
    (shaper over netlink, shaper over the tc CLI) on it."""
    bs, peer = unique_name("nb"), unique_name("np")
    try:
        sh("ip", "netns", "add", bs)
        sh("ip", "netns", "add", peer)
        sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", peer, ns=bs)
        sh("ip", "link", "set", "v0", "up", ns=bs)
        names, addrs = ["dev1", "dev2", "dev3"], [_addr(i) for i in range(3)]

        def shaper(netlink: bool) -> TcShaper:
            s = TcShaper(CountingRunner(bs), "v0", "ifb0", addrs, names, shaping="tbf")
            s.netlink = netlink
            return s

        first = shaper(True)
        first.setup([tc.LinkSpec(8000)] * 3, [tc.LinkSpec(8000)] * 3)
        yield bs, shaper(True), shaper(False)
    finally:
        for ns in (bs, peer):
            sh("ip", "netns", "del", ns, check=False)
        left = sh("ip", "netns", "list").stdout
        assert bs not in left and peer not in left


def test_set_rates_over_netlink_equals_the_cli_path(shaped):
    bs, nl_shaper, cli_shaper = shaped
    assert [q[1] for q in nl_shaper.qdisc_handles() if q[1] == "tbf"] == ["tbf"] * 6
    handles = nl_shaper.qdisc_handles()
    rates = {"dev1": (1234.0, 567.0), "dev2": (20000.0, 3000.0)}
    got = nl_shaper.set_rates(rates)
    assert nl_shaper._nl is not None, "netlink was not used"
    assert got == rates
    shown = {s.device: (s.down_kbit, s.up_kbit) for s in nl_shaper.show()}
    assert shown == {**rates, "dev3": (8000.0, 8000.0)}
    leaves = {
        (d, q["handle"]): q["options"]["rate"]
        for d in ("v0", "ifb0")
        for q in tc_qdiscs(bs, d)
        if q["kind"] == "tbf"
    }
    assert leaves[("v0", "100:")] == N.rate_bytes(1234) and leaves[
        ("ifb0", "101:")
    ] == N.rate_bytes(3000)
    assert nl_shaper.qdisc_handles() == handles
    # once the leaves are known, an epoch runs no command at all
    nl_shaper.runner.calls.clear()
    assert nl_shaper.set_rates({"dev3": (999.0, 998.0)}) == {"dev3": (999.0, 998.0)}
    assert nl_shaper.runner.calls == []
    # the CLI path (one tc -batch) reports the same and leaves the kernel in the same state
    cli_shaper.runner.calls.clear()
    assert cli_shaper.set_rates(rates) == got
    assert sum(c == ["tc", "-j", "-batch", "-"] for c in cli_shaper.runner.calls) == 1
    assert cli_shaper._nl is None
    nl_shaper.set_rates(rates)  # what each path keeps of the leaves, as tc -j reads them
    assert nl_shaper._leaf_cache == cli_shaper._leaf_cache
    assert nl_shaper._leaf_cache == nl_shaper._leaves()
    assert {s.device: (s.down_kbit, s.up_kbit) for s in cli_shaper.show()} == {
        **rates,
        "dev3": (999.0, 998.0),
    }


def test_set_rates_netlink_refusal_and_rebuilt_ifb(shaped):
    _, nl_shaper, _ = shaped
    nl_shaper.set_rates({"dev1": (1000.0, 1000.0)})
    # a class the tree does not have: the kernel's refusal, named
    nl_shaper.addrs.append(_addr(3))
    nl_shaper.names.append("dev4")
    # a device the tree does not have: named, nothing sent
    with pytest.raises(CommandFailed, match=r"no rate-carrying leaf under class 1:103 of dev4"):
        nl_shaper.set_rates({"dev4": (1000.0, 1000.0)})
    nl_shaper.addrs.pop()
    nl_shaper.names.pop()
    # the ifb deleted and made again (a new set-up) gets a new index: still found
    nl_shaper.setup([tc.LinkSpec(4000)] * 3, [tc.LinkSpec(4000)] * 3)
    assert nl_shaper.set_rates({"dev2": (3000.0, 2000.0)}) == {"dev2": (3000.0, 2000.0)}


def test_set_rates_keeps_the_cli_for_what_netlink_does_not_do(shaped):
    _, nl_shaper, cli_shaper = shaped
    netem = tc.leaf_command("change", "v0", 0x100, "netem", tc.LinkSpec(1000), 1514, True)
    tbf = tc.leaf_command("change", "v0", 0x100, "tbf", tc.LinkSpec(1000), 1514, True)
    assert nl_shaper._netlink_changes([tbf]) == [N.change_from_tc_argv(tbf)]
    assert nl_shaper._netlink_changes([tbf, netem]) is None
    assert cli_shaper._netlink_changes([tbf]) is None
    from testbed.lab.runner import SshRunner

    remote = TcShaper(SshRunner("192.0.2.1"), "eth0", "ifb0", [], [], shaping="tbf")
    assert remote._netlink_client() is None and remote.netlink is False
