"""The tc command builders and parsers are pure: table-driven tests, golden text."""

import pytest

from testbed.net.tc import (
    LinkSpec,
    build_class_change_command,
    build_clear_commands,
    build_setup_commands,
    burst_bytes,
    class_minor,
    leaf_qdisc_command,
    parse_htb_classes,
    parse_tc_rate_kbit,
)


def test_setup_shapes_both_directions_per_device():
    cmds = build_setup_commands(
        "br0",
        "ifb0",
        ["10.0.0.11", "10.0.0.12"],
        [LinkSpec(8000), LinkSpec(2000)],
        [LinkSpec(4000), LinkSpec(1000)],
        cell_rate_kbit=20000,
    )
    text = [" ".join(c) for c in cmds]
    assert "ip link add ifb0 type ifb" in text
    assert any(
        t.startswith("tc qdisc replace dev br0 root handle 1: htb default ffff") for t in text
    )
    # downlink classes on br0 by destination, uplink classes on the ifb by source
    assert any(
        "dev br0 parent 1:1 classid 1:100 htb rate 8000kbit ceil 8000kbit" in t for t in text
    )
    assert any(
        "dev ifb0 parent 1:1 classid 1:101 htb rate 1000kbit ceil 1000kbit" in t for t in text
    )
    assert any(
        "dev br0 parent 1: protocol ip prio 1 u32 match ip dst 10.0.0.12/32 flowid 1:101" in t
        for t in text
    )
    assert any(
        "dev ifb0 parent 1: protocol ip prio 1 u32 match ip src 10.0.0.11/32 flowid 1:100" in t
        for t in text
    )
    # cell class carries the total bandwidth
    assert any("classid 1:1 htb rate 20000kbit" in t for t in text)
    # ingress redirected to the ifb, after the ifb's tree exists
    assert text[-1].endswith("action mirred egress redirect dev ifb0")
    assert text.index("ip link add ifb0 type ifb") < len(text) - 1
    assert all(isinstance(a, str) for c in cmds for a in c)


def test_change_is_in_place_class_change():
    cls = build_class_change_command("br0", 2, LinkSpec(2000))
    assert cls[:3] == ["tc", "class", "change"]
    assert "1:102" in cls and "2000kbit" in cls
    leaf = leaf_qdisc_command("br0", class_minor(2), LinkSpec(2000))
    assert leaf[:3] == ["tc", "qdisc", "replace"] and "pfifo" in leaf


def test_netem_leaf_has_own_handle_and_parameters():
    argv = leaf_qdisc_command("br0", class_minor(0), LinkSpec(8000, delay_ms=5, loss_pct=0.5))
    assert argv[argv.index("handle") + 1] == "4100:"
    assert argv[argv.index("delay") + 1] == "5ms" and argv[argv.index("loss") + 1] == "0.5%"
    plain = leaf_qdisc_command("br0", class_minor(0), LinkSpec(8000))
    assert plain[plain.index("handle") + 1] == "100:" and "netem" not in plain


def test_burst_is_small_but_at_least_two_frames():
    assert burst_bytes(2000) == 3200
    assert burst_bytes(50_000) == 12_500  # 2 ms at 50 mbit
    assert burst_bytes(1_000_000) == 250_000


def test_clear_commands():
    assert build_clear_commands("br0", "ifb0") == [
        ["tc", "qdisc", "del", "dev", "br0", "root"],
        ["tc", "qdisc", "del", "dev", "br0", "ingress"],
        ["ip", "link", "del", "ifb0"],
    ]


@pytest.mark.parametrize(
    "text,kbit", [("8Mbit", 8000), ("500Kbit", 500), ("10Gbit", 1e7), ("999bit", 0.999)]
)
def test_parse_tc_rate(text, kbit):
    assert parse_tc_rate_kbit(text) == pytest.approx(kbit)


GOLDEN_TC_S_CLASS = """\
class htb 1:101 parent 1:1 leaf 101: prio 0 rate 2Mbit ceil 2Mbit burst 3200b cburst 3200b 
 Sent 4054290 bytes 2937 pkt (dropped 3, overlimits 137 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 2660 borrowed: 0 giants: 0
 tokens: 186812 ctokens: 186812

class htb 1:1 root rate 10Gbit ceil 10Gbit burst 2500000b cburst 2500000b 
 Sent 8119116 bytes 5874 pkt (dropped 0, overlimits 0 requeues 0) 
 backlog 0b 0p requeues 0
"""


def test_parse_htb_classes_golden():
    classes = {c.classid: c for c in parse_htb_classes(GOLDEN_TC_S_CLASS)}
    assert set(classes) == {"1:101", "1:1"}
    c = classes["1:101"]
    assert (c.parent, c.leaf, c.rate_kbit, c.ceil_kbit) == ("1:1", "101:", 2000, 2000)
    assert (c.sent_bytes, c.sent_packets, c.dropped) == (4054290, 2937, 3)
    assert classes["1:1"].parent is None and classes["1:1"].rate_kbit == 1e7


# -- netem: delay/loss set and undone, against tc's own output (this kernel has no netem, so
# -- the kernel side is a fake that keeps the leaves and prints them as tc 6.1 does) ---------

# `tc -j qdisc show dev br0` (iproute2 6.1) with netem leaves: delay in seconds, loss as a
# fraction, as tc's JSON prints them
CANNED_QDISCS_NETEM = {
    "br0": '[{"kind":"htb","handle":"1:","root":true,"refcnt":3,"options":{"r2q":10,'
    '"default":"0xffff","direct_packets_stat":0,"direct_qlen":1000}},'
    '{"kind":"netem","handle":"4100:","parent":"1:100","options":{"limit":1000,'
    '"delay":{"delay":0.005,"jitter":0,"correlation":0},'
    '"loss-random":{"loss":0.005,"correlation":0},"ecn":false,"gap":0}},'
    '{"kind":"pfifo","handle":"101:","parent":"1:101","options":{"limit":1000}},'
    '{"kind":"ingress","handle":"ffff:","parent":"ffff:fff1","options":{}}]',
    "ifb0": '[{"kind":"htb","handle":"1:","root":true,"refcnt":3,"options":{"r2q":10,'
    '"default":"0xffff","direct_packets_stat":0,"direct_qlen":1000}},'
    '{"kind":"netem","handle":"4100:","parent":"1:100","options":{"limit":1000,'
    '"delay":{"delay":0.02,"jitter":0,"correlation":0},"ecn":false,"gap":0}},'
    '{"kind":"pfifo","handle":"101:","parent":"1:101","options":{"limit":1000}}]',
}
# `tc -s class show`: the class of a netem leaf names the netem's handle
CANNED_CLASSES_NETEM = """\
class htb 1:101 parent 1:1 leaf 101: prio 0 rate 8Mbit ceil 8Mbit burst 3200b cburst 3200b 
 Sent 1200 bytes 10 pkt (dropped 0, overlimits 0 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 10 borrowed: 0 giants: 0
 tokens: 50000 ctokens: 50000

class htb 1:100 parent 1:1 leaf 4100: prio 0 rate 4Mbit ceil 4Mbit burst 3200b cburst 3200b 
 Sent 9000 bytes 60 pkt (dropped 1, overlimits 3 requeues 0) 
 backlog 0b 0p requeues 0
 lended: 60 borrowed: 0 giants: 0
 tokens: 100000 ctokens: 100000

class htb 1:1 root rate 10Gbit ceil 10Gbit burst 2500000b cburst 2500000b 
 Sent 10200 bytes 70 pkt (dropped 0, overlimits 0 requeues 0) 
 backlog 0b 0p requeues 0
"""


class CannedTc:
    """A runner answering tc's queries with canned text and recording everything else."""

    host = "bs"

    def __init__(self, qdiscs: dict[str, str], classes: str):
        self.qdiscs, self.classes = qdiscs, classes
        self.changes: list[list[str]] = []

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, input=None):
        from testbed.lab.runner import Result

        argv = list(argv)
        out = ""
        if argv[:4] == ["tc", "-j", "qdisc", "show"]:
            out = self.qdiscs[argv[5]]
        elif argv[:4] == ["tc", "-s", "class", "show"]:
            out = self.classes
        elif argv[:3] != ["ip", "link", "show"]:
            self.changes.append(argv)
        return Result("bs", tuple(argv), 0, out, "", 0.0)


def _class_change(dev: str, rate: str) -> str:
    return (
        f"tc class change dev {dev} parent 1:1 classid 1:100 htb rate {rate} ceil {rate} "
        "burst 3200 cburst 3200 quantum 3028"
    )


def _shaper(runner, cell_rate_kbit=None):
    from testbed.net.shaper import TcShaper

    return TcShaper(
        runner, "br0", "ifb0", ["10.0.0.11", "10.0.0.12"], ["dev1", "dev2"], cell_rate_kbit
    )


def test_netem_leaves_parsed_from_tc_output():
    st = {s.device: s for s in _shaper(CannedTc(CANNED_QDISCS_NETEM, CANNED_CLASSES_NETEM)).show()}
    assert st["dev1"].down_leaf == "netem delay 5ms loss 0.5%"
    assert st["dev1"].up_leaf == "netem delay 20ms"
    assert st["dev2"].down_leaf == st["dev2"].up_leaf == "pfifo limit 1000"
    assert (st["dev1"].down_kbit, st["dev2"].down_kbit) == (4000, 8000)
    assert st["dev1"].handles["down"] == "br0 1:100 leaf 4100:"
    assert st["dev1"].down_sent_bytes == 9000
    c = {c.classid: c for c in parse_htb_classes(CANNED_CLASSES_NETEM)}["1:100"]
    assert (c.leaf, c.rate_kbit, c.dropped) == ("4100:", 4000, 1)


def test_undo_of_netem_restores_the_plain_leaf_then_the_rate():
    tc = CannedTc(CANNED_QDISCS_NETEM, CANNED_CLASSES_NETEM)
    _shaper(tc).change("dev1", LinkSpec(4000), "both")
    assert [" ".join(c) for c in tc.changes] == [
        # the netem leaves (handle 4100:) are replaced by pfifo leaves under the same classes
        "tc qdisc replace dev br0 parent 1:100 handle 100: pfifo limit 1000",
        "tc qdisc replace dev ifb0 parent 1:100 handle 100: pfifo limit 1000",
        _class_change("br0", "4000kbit"),
        _class_change("ifb0", "4000kbit"),
    ]
    # a rate change of the other device, whose leaves are plain, touches no leaf
    tc.changes.clear()
    _shaper(tc).change("dev2", LinkSpec(2000), "down")
    assert [c[:3] for c in tc.changes] == [["tc", "class", "change"]]


def _tc_rate(kbit: float) -> str:
    """A rate as tc prints it: the largest unit that divides it (8Mbit, 2500Kbit, 24Kbit)."""
    bits = round(kbit * 1000)
    for unit in ("bit", "Kbit", "Mbit"):
        if bits < 1000 or bits % 1000:
            return f"{bits}{unit}"
        bits //= 1000
    return f"{bits}Gbit"


class KernelTc:
    """A BS kernel's tc state for two devices (leaves and class rates per interface) printed in
    tc's formats; ``netem`` False: a kernel without netem (``refuse``: only on those
    interfaces). Every command that changes something is recorded."""

    host = "bs"

    def __init__(self, netem: bool = True, refuse: tuple[str, ...] = ()):
        self.refuse = set(refuse) if netem else {"br0", "ifb0"}
        self.leaves = {
            (d, m): ("pfifo", f"{m:x}:", {"limit": 1000})
            for d in ("br0", "ifb0")
            for m in (0x100, 0x101)
        }
        self.rates = {k: (8000.0, 8000.0) for k in self.leaves}  # (rate, ceil)
        self.changes: list[str] = []

    def _qdiscs(self, dev: str) -> str:
        import json

        out = [
            {
                "kind": "htb",
                "handle": "1:",
                "root": True,
                "refcnt": 3,
                "options": {
                    "r2q": 10,
                    "default": "0xffff",
                    "direct_packets_stat": 0,
                    "direct_qlen": 1000,
                },
            }
        ]
        out += [
            {"kind": k, "handle": h, "parent": f"1:{m:x}", "options": o}
            for (d, m), (k, h, o) in sorted(self.leaves.items())
            if d == dev
        ]
        if dev == "br0":
            out.append({"kind": "ingress", "handle": "ffff:", "parent": "ffff:fff1", "options": {}})
        return json.dumps(out, separators=(",", ":"))

    def _classes(self, dev: str) -> str:
        lines = []
        for (d, m), (rate, ceil) in sorted(self.rates.items(), reverse=True):
            if d == dev:
                r, c = _tc_rate(rate), _tc_rate(ceil)
                lines += [
                    (
                        f"class htb 1:{m:x} parent 1:1 leaf {self.leaves[(d, m)][1]} prio 0 "
                        f"rate {r} ceil {c} burst 3200b cburst 3200b "
                    ),
                    " Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) ",
                    "",
                ]
        lines.append("class htb 1:1 root rate 10Gbit ceil 10Gbit burst 2500000b cburst 2500000b ")
        return "\n".join(lines) + "\n"

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, input=None):
        from testbed.errors import CommandFailed
        from testbed.lab.runner import Result
        from testbed.units import parse_rate_kbit

        argv = list(argv)
        out, rc, err = "", 0, ""
        if argv[:4] == ["tc", "-j", "qdisc", "show"]:
            out = self._qdiscs(argv[5])
        elif argv[:4] == ["tc", "-s", "class", "show"]:
            out = self._classes(argv[5])
        elif argv[:3] == ["ip", "link", "show"]:
            pass
        elif argv[:3] == ["tc", "qdisc", "replace"]:
            self.changes.append(" ".join(argv))
            dev, minor, handle, kind = argv[4], int(argv[6].split(":")[1], 16), argv[8], argv[9]
            opts: dict = {"limit": int(argv[11])}
            if kind == "netem" and dev in self.refuse:
                rc, err = 2, "Error: Specified qdisc kind is unknown.\n"
            else:
                if "delay" in argv:
                    ms = float(argv[argv.index("delay") + 1].removesuffix("ms"))
                    opts["delay"] = {"delay": ms / 1e3, "jitter": 0, "correlation": 0}
                if "loss" in argv:
                    pct = float(argv[argv.index("loss") + 1].removesuffix("%"))
                    opts["loss-random"] = {"loss": pct / 100, "correlation": 0}
                if kind == "netem":
                    opts.update(ecn=False, gap=0)
                self.leaves[(dev, minor)] = (kind, handle, opts)
        elif argv[:3] == ["tc", "class", "change"]:
            self.changes.append(" ".join(argv))
            minor = int(argv[argv.index("classid") + 1].split(":")[1], 16)
            self.rates[(argv[4], minor)] = (
                parse_rate_kbit(argv[argv.index("rate") + 1]),
                parse_rate_kbit(argv[argv.index("ceil") + 1]),
            )
        else:
            raise AssertionError(f"unexpected command {argv}")
        if check and rc:
            raise CommandFailed("bs", argv, rc, out, err)
        return Result("bs", tuple(argv), rc, out, err, 0.0)


def _leaves(tc: KernelTc, device: str = "dev1") -> tuple:
    s = {s.device: s for s in _shaper(tc).show()}[device]
    return s.down_leaf, s.up_leaf, s.down_kbit, s.up_kbit


def test_netem_set_then_undo_round_trip():
    tc = KernelTc()
    sh = _shaper(tc)
    sh.change("dev1", LinkSpec(4000, delay_ms=5, loss_pct=0.5), "both")
    assert tc.changes == [
        "tc qdisc replace dev br0 parent 1:100 handle 4100: netem limit 1000 delay 5ms loss 0.5%",
        "tc qdisc replace dev ifb0 parent 1:100 handle 4100: netem limit 1000 delay 5ms loss 0.5%",
        _class_change("br0", "4000kbit"),
        _class_change("ifb0", "4000kbit"),
    ]
    assert _leaves(tc) == ("netem delay 5ms loss 0.5%", "netem delay 5ms loss 0.5%", 4000, 4000)
    assert _leaves(tc, "dev2") == ("pfifo limit 1000", "pfifo limit 1000", 8000, 8000)
    # another delay on the same netem: its options change in place (same handle)
    tc.changes.clear()
    sh.change("dev1", LinkSpec(4000, delay_ms=20), "down")
    assert (
        tc.changes[0] == "tc qdisc replace dev br0 parent 1:100 handle 4100: netem limit "
        "1000 delay 20ms"
    )
    assert len(tc.changes) == 2 and _leaves(tc)[:2] == (
        "netem delay 20ms",
        "netem delay 5ms loss 0.5%",
    )
    # the undo: no delay/loss -> the plain pfifo leaf again, the rate as asked
    tc.changes.clear()
    sh.change("dev1", LinkSpec(8000), "both")
    assert tc.changes[:2] == [
        "tc qdisc replace dev br0 parent 1:100 handle 100: pfifo limit 1000",
        "tc qdisc replace dev ifb0 parent 1:100 handle 100: pfifo limit 1000",
    ]
    assert _leaves(tc) == ("pfifo limit 1000", "pfifo limit 1000", 8000, 8000)
    assert all(k == "pfifo" for k, _, _ in tc.leaves.values())


def test_netem_refused_changes_nothing():
    from testbed.errors import Unsupported

    # no netem at all: the kernel's own words, no class touched
    tc = KernelTc(netem=False)
    with pytest.raises(Unsupported, match="Specified qdisc kind is unknown"):
        _shaper(tc).change("dev1", LinkSpec(4000, delay_ms=5), "both")
    assert _leaves(tc) == ("pfifo limit 1000", "pfifo limit 1000", 8000, 8000)
    assert not any(" class " in c for c in tc.changes)
    # refused on the uplink's ifb only: the downlink's netem, already grafted, is undone
    tc = KernelTc(refuse=("ifb0",))
    with pytest.raises(Unsupported):
        _shaper(tc).change("dev1", LinkSpec(4000, loss_pct=1), "both")
    assert tc.changes == [
        "tc qdisc replace dev br0 parent 1:100 handle 4100: netem limit 1000 loss 1%",
        "tc qdisc replace dev ifb0 parent 1:100 handle 4100: netem limit 1000 loss 1%",
        "tc qdisc replace dev br0 parent 1:100 handle 100: pfifo limit 1000",
    ]
    assert _leaves(tc) == ("pfifo limit 1000", "pfifo limit 1000", 8000, 8000)


@pytest.mark.parametrize(
    "kbit,text", [(8000, "8Mbit"), (2500, "2500Kbit"), (24, "24Kbit"), (1e7, "10Gbit")]
)
def test_fake_prints_rates_as_tc_and_parser_reads_them(kbit, text):
    assert _tc_rate(kbit) == text and parse_tc_rate_kbit(text) == kbit


# -- the cell rate: HTB never holds back a class below its own `rate`, so the device classes'
# -- rates must add up to the cell at most; each may borrow up to its link rate (`ceil`) -----


def test_cell_rate_gives_each_device_a_share_and_its_rate_as_ceiling():
    cmds = [
        " ".join(c)
        for c in build_setup_commands(
            "br0",
            "ifb0",
            ["10.0.0.11", "10.0.0.12"],
            [LinkSpec(50000), LinkSpec(1000)],
            [LinkSpec(50000), LinkSpec(50000)],
            cell_rate_kbit=4000,
        )
    ]
    cls = [c for c in cmds if c.startswith("tc class replace")]
    assert len(cls) == 6
    for dev in ("br0", "ifb0"):
        assert (
            f"tc class replace dev {dev} parent 1: classid 1:1 htb rate 4000kbit "
            "ceil 4000kbit burst 3200 cburst 3200 quantum 3028" in cls
        )
    assert (
        "tc class replace dev br0 parent 1:1 classid 1:100 htb rate 2000kbit ceil 50000kbit "
        "burst 3200 cburst 12500 quantum 3028" in cls
    )
    # a link slower than its share keeps rate = ceil
    assert (
        "tc class replace dev br0 parent 1:1 classid 1:101 htb rate 1000kbit ceil 1000kbit "
        "burst 3200 cburst 3200 quantum 3028" in cls
    )
    # the device classes' assured rates never add up to more than the cell
    for dev in ("br0", "ifb0"):
        rates = [
            parse_tc_rate_kbit(c.split(" rate ")[1].split()[0])
            for c in cls
            if f"dev {dev} parent 1:1 " in c
        ]
        assert sum(rates) <= 4000, (dev, rates)
    # no cell rate: every class's rate is its ceiling
    plain = build_class_change_command("br0", 0, LinkSpec(50000))
    assert plain[plain.index("rate") + 1] == plain[plain.index("ceil") + 1] == "50000kbit"


def test_cell_share_kept_by_in_place_changes_and_ceiling_read_back():
    tc = KernelTc()
    sh = _shaper(tc, cell_rate_kbit=4000)
    sh.change("dev1", LinkSpec(30000), "both")
    assert tc.changes == [
        f"tc class change dev {d} parent 1:1 classid 1:100 htb rate 2000kbit "
        "ceil 30000kbit burst 3200 cburst 7500 quantum 3028"
        for d in ("br0", "ifb0")
    ]
    # what a link gets is its ceiling (tc prints "rate 2Mbit ceil 30Mbit")
    assert _leaves(tc)[2:] == (30000, 30000)
    assert "rate 2Mbit ceil 30Mbit" in tc._classes("br0")
