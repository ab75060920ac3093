"""The leaf under each device's HTB class (tbf / netem with rate / pfifo), the offload record
and the in-place rate path: pure builders and parsers against tc's and ethtool's own output,
and TcShaper against a fake BS kernel that answers as tc 6.1 and ethtool 6.1 do."""

from __future__ import annotations

import json
import shlex

import pytest

from testbed.errors import CommandFailed, ConfigError, Unsupported
from testbed.lab.runner import Result
from testbed.net.shaper import TcShaper
from testbed.net.tc import (
    OFFLOADS,
    Leaf,
    LinkSpec,
    Offload,
    build_leaf_change_command,
    build_netem_probe_commands,
    build_offload_command,
    build_setup_commands,
    class_minor,
    enforced_kbit,
    infer_mode,
    leaf_bucket_bytes,
    leaf_handle,
    leaf_kind,
    leaf_qdisc_command,
    leaves_by_class,
    offloads_on,
    offloads_to_disable,
    parse_leaf,
    parse_link_show,
    parse_offloads,
    parse_record,
    parse_tc_size,
    render_record,
    resolve_mode,
    split_batch_listing,
    tbf_burst_bytes,
)


# -- builders ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,spec,kind",
    [
        ("tbf", LinkSpec(2000), "tbf"),
        ("tbf", LinkSpec(2000, delay_ms=5), "netem"),
        ("netem", LinkSpec(2000), "netem"),
        ("netem", LinkSpec(2000, loss_pct=1), "netem"),
        ("htb", LinkSpec(2000), "pfifo"),
        ("htb", LinkSpec(2000, delay_ms=5), "netem"),
    ],
)
def test_leaf_kind_per_mode(mode, spec, kind):
    assert leaf_kind(mode, spec) == kind


def test_leaf_kind_needs_a_resolved_mode():
    with pytest.raises(ValueError):
        leaf_kind("auto", LinkSpec(1000))


def test_bucket_is_one_frame_of_the_interface_plus_timer_slack():
    assert leaf_bucket_bytes(1500) == 1514
    assert leaf_bucket_bytes(9000) == 9014
    # + 50 us of the rate: 12.5 bytes at 2 Mbit/s, 312.5 at 50 Mbit/s, rounded up
    assert [tbf_burst_bytes(1514, k) for k in (2000, 10000, 50000, 1e7)] == [
        1527,
        1577,
        1827,
        1514 + 62500,
    ]


def test_tbf_leaf_command():
    argv = leaf_qdisc_command("br0", class_minor(0), LinkSpec(2000), "tbf", 1514)
    assert " ".join(argv) == (
        "tc qdisc replace dev br0 parent 1:100 handle 100: tbf rate "
        "2000kbit burst 1527 limit 1514000"
    )
    assert leaf_handle(0x100, "tbf") == 0x100 and leaf_handle(0x100, "netem") == 0x4100


def test_netem_leaf_carries_the_rate_outside_htb_mode():
    spec = LinkSpec(8000, delay_ms=5, loss_pct=0.5)
    assert " ".join(leaf_qdisc_command("ifb0", class_minor(1), spec, "netem")) == (
        "tc qdisc replace dev ifb0 parent 1:101 handle 4101: netem limit 1000 rate 8000kbit "
        "delay 5ms loss 0.5%"
    )
    assert leaf_qdisc_command("ifb0", class_minor(1), spec, "tbf") == leaf_qdisc_command(
        "ifb0", class_minor(1), spec, "netem"
    )
    # htb mode: netem for delay/loss only, the class alone sets the rate (as before)
    assert "rate" not in leaf_qdisc_command("ifb0", class_minor(1), spec, "htb")


def test_in_place_leaf_change_only_where_the_leaf_carries_the_rate():
    tbf = build_leaf_change_command("br0", 2, LinkSpec(3000), "tbf", 1514)
    assert tbf is not None and " ".join(tbf) == (
        "tc qdisc change dev br0 parent 1:102 handle 102: tbf rate 3000kbit burst 1533 "
        "limit 1514000"
    )
    net = build_leaf_change_command("br0", 2, LinkSpec(3000, delay_ms=2), "netem")
    assert net is not None and net[:3] == ["tc", "qdisc", "change"] and "4102:" in net
    assert net[net.index("rate") + 1] == "3000kbit" and net[net.index("delay") + 1] == "2ms"
    assert build_leaf_change_command("br0", 2, LinkSpec(3000), "htb") is None
    assert build_leaf_change_command("br0", 2, LinkSpec(3000, delay_ms=2), "htb") is None


def test_setup_in_tbf_mode_puts_a_tbf_under_every_device_class():
    cmds = [
        " ".join(c)
        for c in build_setup_commands(
            "br0",
            "ifb0",
            ["10.0.0.11", "10.0.0.12"],
            [LinkSpec(8000), LinkSpec(2000)],
            [LinkSpec(4000), LinkSpec(1000)],
            None,
            "tbf",
            1514,
        )
    ]
    assert cmds[:2] == ["ip link add ifb0 type ifb", "ip link set ifb0 up"]
    leaves = [c for c in cmds if c.startswith("tc qdisc replace") and "parent 1:1" in c]
    assert leaves == [
        (
            "tc qdisc replace dev br0 parent 1:100 handle 100: "
            "tbf rate 8000kbit burst 1564 limit 1514000"
        ),
        (
            "tc qdisc replace dev br0 parent 1:101 handle 101: "
            "tbf rate 2000kbit burst 1527 limit 1514000"
        ),
        (
            "tc qdisc replace dev ifb0 parent 1:100 handle 100: "
            "tbf rate 4000kbit burst 1539 limit 1514000"
        ),
        (
            "tc qdisc replace dev ifb0 parent 1:101 handle 101: "
            "tbf rate 1000kbit burst 1521 limit 1514000"
        ),
    ]
    # the HTB class over each leaf only classifies (and shares a cell): it is never the
    # bottleneck, so a cut link leaves it no debt (tc.class_ceil_kbit)
    assert any("classid 1:101 htb rate 10000000kbit ceil 10000000kbit" in c for c in cmds), cmds
    assert not any("htb rate 2000kbit" in c or "ceil 2000kbit" in c for c in cmds)
    cell = [
        " ".join(c)
        for c in build_setup_commands(
            "br0",
            "ifb0",
            ["10.0.0.11", "10.0.0.12"],
            [LinkSpec(8000), LinkSpec(2000)],
            [LinkSpec(4000), LinkSpec(1000)],
            6000,
            "tbf",
            1514,
        )
    ]
    assert any("classid 1:101 htb rate 3000kbit ceil 6000kbit" in c for c in cell), cell
    # in htb mode the class is the shaper and carries the link's rate
    htb = [
        " ".join(c)
        for c in build_setup_commands(
            "br0",
            "ifb0",
            ["10.0.0.11", "10.0.0.12"],
            [LinkSpec(8000), LinkSpec(2000)],
            [LinkSpec(4000), LinkSpec(1000)],
            None,
            "htb",
            1514,
        )
    ]
    assert any("classid 1:101 htb rate 2000kbit ceil 2000kbit" in c for c in htb), htb
    assert cmds[-1].endswith("action mirred egress redirect dev ifb0")


def test_resolve_mode_and_probe():
    assert resolve_mode("auto", True) == "netem"
    assert resolve_mode("auto", False) == resolve_mode("auto", None) == "tbf"
    assert resolve_mode("htb", True) == "htb" and resolve_mode("netem", False) == "netem"
    with pytest.raises(ValueError):
        resolve_mode("fq", True)
    add, delete = build_netem_probe_commands("ifb0")
    assert add[:6] == ["tc", "qdisc", "add", "dev", "ifb0", "root"] and "netem" in add
    assert delete == ["tc", "qdisc", "del", "dev", "ifb0", "root"]


# -- parsers (tc 6.1 / ethtool 6.1 output captured on this machine) ----------------------
TC_J_QDISC_TBF = (
    '[{"kind":"htb","handle":"1:","root":true,"refcnt":2,"options":{"r2q":10,'
    '"default":"0xffff","direct_packets_stat":2,"direct_qlen":1000}},{"kind":"tbf",'
    '"handle":"100:","parent":"1:100","options":{"rate":250000,"burst":1514,"lat":6049944}}]'
)
# netem with rate, delay and loss as iproute2 6.1's netem_print_opt prints them under -j
NETEM_QD = {
    "kind": "netem",
    "handle": "4101:",
    "parent": "1:101",
    "options": {
        "limit": 1000,
        "delay": {"delay": 0.005, "jitter": 0, "correlation": 0},
        "loss-random": {"loss": 0.01, "correlation": 0},
        "ecn": False,
        "gap": 0,
        "rate": {"rate": 1000000, "packetoverhead": 0, "cellsize": 0, "celloverhead": 0},
    },
}


def test_parse_leaves_from_tc_json():
    lv = leaves_by_class(json.loads(TC_J_QDISC_TBF) + [NETEM_QD])
    assert lv[0x100] == Leaf("tbf", "100:", 2000.0, burst_bytes=1514)
    assert lv[0x101] == Leaf("netem", "4101:", 8000.0, 5.0, 1.0)
    assert parse_leaf({"kind": "pfifo", "handle": "102:", "options": {"limit": 1000}}) == Leaf(
        "pfifo", "102:"
    )
    assert lv[0x101].spec(3000) == LinkSpec(3000, 5.0, 1.0)


def test_infer_mode_and_enforced_rate():
    assert infer_mode([Leaf("tbf", "100:", 2000), Leaf("netem", "4101:", 2000, 5)]) == "tbf"
    assert infer_mode([Leaf("netem", "4100:", 2000)]) == "netem"
    assert infer_mode([Leaf("pfifo", "100:"), Leaf("netem", "4101:", None, 5)]) == "htb"
    assert enforced_kbit(8000, Leaf("tbf", "100:", 2000)) == 2000
    # a rate-carrying leaf is the link's rate even under a lower class ceiling (the cell's)
    assert enforced_kbit(2000, Leaf("tbf", "100:", 50000)) == 50000
    assert enforced_kbit(2000, Leaf("pfifo", "100:")) == enforced_kbit(2000, None) == 2000


ETHTOOL_K_BRIDGE = """\
Features for tstbr0:
rx-checksumming: off [fixed]
tx-checksumming: on
\ttx-checksum-ip-generic: on
scatter-gather: on
tcp-segmentation-offload: on
\ttx-tcp-segmentation: on
\ttx-tcp6-segmentation: on
generic-segmentation-offload: on
generic-receive-offload: off [requested on]
large-receive-offload: off [fixed]
tx-udp-segmentation: on
rx-gro-hw: on [fixed]
rx-gro-list: off
rx-udp-gro-forwarding: off
"""


def test_parse_offloads_from_ethtool():
    st = parse_offloads(ETHTOOL_K_BRIDGE)
    assert st["tso"] == Offload(True) and st["gso"] == Offload(True)
    assert st["gro"] == Offload(False) and st["lro"] == Offload(False, True)
    assert st["rx-gro-hw"] == Offload(True, True) and "ufo" not in st
    assert offloads_to_disable(st) == ["tso", "gso", "tx-udp-segmentation"]
    assert offloads_on(st) == ["tso", "gso", "tx-udp-segmentation", "rx-gro-hw (fixed)"]
    assert build_offload_command("br0", ["tso", "gro"], False) == [
        "ethtool",
        "-K",
        "br0",
        "tso",
        "off",
        "gro",
        "off",
    ]
    assert set(OFFLOADS.values()) >= {"tso", "gso", "gro", "lro", "ufo"}


def test_record_round_trip():
    text = render_record(
        {"shaping": "tbf", "bucket": 1514, "netem": "no", "iface": "br0", "restore": "tso,gso"}
    )
    assert text == "moe-edge-testbed shaping=tbf bucket=1514 netem=no iface=br0 restore=tso,gso"
    assert parse_record(text) == {
        "shaping": "tbf",
        "bucket": "1514",
        "netem": "no",
        "iface": "br0",
        "restore": "tso,gso",
    }
    assert parse_record("uplink to the lab") is None and parse_record(None) is None
    with pytest.raises(ValueError):
        render_record({"iface": "a b"})


IP_LINK_SHOW = (
    "50: tbi-x: <BROADCAST,NOARP,UP,LOWER_UP> mtu 1500 qdisc htb state UNKNOWN mode DEFAULT "
    "group default qlen 32\n"
    "    link/ether 1e:29:1f:b9:d2:0f brd ff:ff:ff:ff:ff:ff\n"
    "    alias moe-edge-testbed shaping=tbf bucket=1514\n"
)


def test_parse_link_show():
    assert parse_link_show(IP_LINK_SHOW) == (1500, "moe-edge-testbed shaping=tbf bucket=1514")
    assert parse_link_show(
        IP_LINK_SHOW.replace("    alias moe-edge-testbed shaping=tbf bucket=1514\n", "")
    ) == (1500, None)


# `tc -j -batch` of class show / qdisc show / class show / qdisc show (tc 6.1): the HTB class
# listings stay text, each qdisc listing is one JSON line
BATCH_OUT = """\
class htb 1:100 parent 1:1 leaf 100: prio 0 rate 1234Kbit ceil 1234Kbit burst 3199b cburst 3199b 
class tbf 100:1 parent 100: 
class htb 1:1 root rate 10Gbit ceil 10Gbit burst 2500000b cburst 2500000b 
[{"kind":"htb","handle":"1:","root":true,"refcnt":2,"options":{}},{"kind":"tbf","handle":"100:","parent":"1:100","options":{"rate":154250,"burst":1513,"lat":9800000}},{"kind":"ingress","handle":"ffff:","parent":"ffff:fff1","options":{}}]
class htb 1:100 parent 1:1 leaf 100: prio 0 rate 777Kbit ceil 777Kbit burst 3200b cburst 3200b 
class tbf 100:1 parent 100: 
[{"kind":"htb","handle":"1:","root":true,"refcnt":2,"options":{}},{"kind":"tbf","handle":"100:","parent":"1:100","options":{"rate":97125,"burst":1513,"lat":9800000}}]
"""


def test_split_batch_listing():
    parts = split_batch_listing(BATCH_OUT)
    assert len(parts) == 2
    assert parts[0][0].startswith("class htb 1:100") and parts[1][1][1]["kind"] == "tbf"
    assert leaves_by_class(parts[0][1])[0x100].rate_kbit == 1234.0
    assert leaves_by_class(parts[1][1])[0x100].rate_kbit == 777.0


@pytest.mark.parametrize("text,n", [("3200b", 3200), ("12Kb", 12288), ("2Mb", 2 * 1024 * 1024)])
def test_parse_tc_size(text, n):
    assert parse_tc_size(text) == n


# -- TcShaper against a fake BS kernel ---------------------------------------------------
def _rate_kbit(word: str) -> float:
    return float(word.removesuffix("kbit"))


def _tc_rate(kbit: float) -> str:
    bits = round(kbit * 1000)
    for unit in ("bit", "Kbit", "Mbit"):
        if bits < 1000 or bits % 1000:
            return f"{bits}{unit}"
        bits //= 1000
    return f"{bits}Gbit"


class FakeBS:
    """The BS kernel as tc/ip/ethtool show it: qdiscs, classes, the ifb and its alias, each
    interface's offloads. ``netem``: the kernel has netem; ``fixed``: offloads the driver
    will not change. Every command that changes something is recorded in ``log``."""

    host = "bs"

    def __init__(self, netem: bool = False, fixed: tuple[str, ...] = (), ethtool: bool = True):
        self.netem, self.ethtool = netem, ethtool
        self.links: dict[str, dict] = {"br0": {"alias": None, "mtu": 1500}}
        self.feat = {"br0": {n: [True, n in fixed] for n in ("tso", "gso", "gro")}}
        self.feat["br0"]["lro"] = [False, True]
        self.root: dict[str, bool] = {}
        self.ingress = False
        self.leaves: dict[tuple[str, int], dict] = {}
        self.rates: dict[tuple[str, int], float] = {}
        self.log: list[str] = []

    # what tc prints
    def qdisc_json(self, dev: str) -> str:
        out = (
            [{"kind": "htb", "handle": "1:", "root": True, "options": {}}]
            if self.root.get(dev)
            else []
        )
        out += [qd for (d, _), qd in sorted(self.leaves.items()) if d == dev]
        if dev == "br0" and self.ingress:
            out.append({"kind": "ingress", "handle": "ffff:", "parent": "ffff:fff1", "options": {}})
        return json.dumps(out)

    def class_text(self, dev: str) -> str:
        lines = []
        for (d, m), kbit in sorted(self.rates.items()):
            if d == dev:
                leaf = self.leaves.get((d, m), {}).get("handle", f"{m:x}:")
                r = _tc_rate(kbit)
                lines += [
                    (
                        f"class htb 1:{m:x} parent 1:1 leaf {leaf} prio 0 rate {r} ceil {r} "
                        "burst 3200b cburst 3200b "
                    ),
                    " Sent 100 bytes 1 pkt (dropped 0, overlimits 0 requeues 0) ",
                ]
        return "\n".join(lines) + "\n"

    def _ethtool_k(self, dev: str) -> str:
        names = {v: k for k, v in OFFLOADS.items()}
        return "".join(
            f"{names[n]}: {'on' if on else 'off'}{' [fixed]' if fx else ''}\n"
            for n, (on, fx) in self.feat[dev].items()
        )

    def _leaf(self, op: str, argv: list[str]) -> None:
        dev, parent, handle, kind = argv[4], argv[6], argv[8], argv[9]
        minor = int(parent.split(":")[1], 16)
        if kind == "netem" and not self.netem:
            raise _Refused("Error: Specified qdisc kind is unknown.")
        cur = self.leaves.get((dev, minor))
        if op == "change" and (cur is None or cur["handle"] != handle or cur["kind"] != kind):
            raise _Refused("Error: Qdisc not found.")
        opts: dict = {}
        if kind == "tbf":
            opts = {
                "rate": _rate_kbit(argv[argv.index("rate") + 1]) * 1000 / 8,
                "burst": int(argv[argv.index("burst") + 1]),
            }
        elif kind == "netem":
            opts = {"limit": 1000}
            if "rate" in argv:
                opts["rate"] = {"rate": _rate_kbit(argv[argv.index("rate") + 1]) * 1000 / 8}
            if "delay" in argv:
                opts["delay"] = {"delay": float(argv[argv.index("delay") + 1][:-2]) / 1e3}
        else:
            opts = {"limit": 1000}
        self.leaves[(dev, minor)] = {
            "kind": kind,
            "handle": handle,
            "parent": parent,
            "options": opts,
        }

    def apply(self, argv: list[str]) -> str:
        """One command; returns stdout or raises _Refused."""
        a = argv
        if a[:4] == ["tc", "-j", "qdisc", "show"]:
            return self.qdisc_json(a[5])
        if a[:2] == ["tc", "-s"] or a[:3] == ["tc", "class", "show"]:
            return self.class_text(a[-1])
        if a[:3] == ["ip", "link", "show"]:
            dev = a[-1]
            if dev not in self.links:
                raise _Refused(f'Device "{dev}" does not exist.')
            lk = self.links[dev]
            alias = f"\n    alias {lk['alias']}" if lk["alias"] else ""
            return f"9: {dev}: <UP> mtu {lk['mtu']} qdisc noqueue\n    link/ether x{alias}\n"
        if a[0] == "ethtool":
            if not self.ethtool:
                raise CommandFailed("bs", a, 127, "", "No such file or directory: 'ethtool'")
            if a[1] == "-k":
                return self._ethtool_k(a[2])
            self.log.append(" ".join(a))
            for n, v in zip(a[3::2], a[4::2]):
                if not self.feat[a[2]][n][1]:
                    self.feat[a[2]][n][0] = v == "on"
            return ""
        self.log.append(" ".join(a))
        if a[:3] == ["ip", "link", "add"]:
            self.links[a[3]] = {"alias": None, "mtu": 1500}
            self.feat[a[3]] = {"tso": [True, False], "gso": [True, False], "gro": [True, False]}
        elif a[:3] == ["ip", "link", "del"]:
            if self.links.pop(a[3], None) is None:
                raise _Refused("Cannot find device")
            self.feat.pop(a[3])
            self._drop(a[3])
        elif a[:3] == ["ip", "link", "set"] and "alias" in a:
            self.links[a[4]]["alias"] = a[a.index("alias") + 1]
        elif a[:3] == ["ip", "link", "set"]:
            pass
        elif a[:3] == ["tc", "qdisc", "add"] and "netem" in a:
            if not self.netem:
                raise _Refused("Error: Specified qdisc kind is unknown.")
        elif a[:3] == ["tc", "qdisc", "add"] and "ingress" in a:
            self.ingress = True
        elif a[:3] == ["tc", "qdisc", "del"]:
            if "ingress" in a:
                self.ingress = False
            else:
                self._drop(a[4])
        elif a[:3] == ["tc", "qdisc", "replace"] and "root" in a:
            self.root[a[4]] = True
        elif a[:3] in (["tc", "qdisc", "replace"], ["tc", "qdisc", "change"]):
            self._leaf(a[2], a)
        elif a[:2] == ["tc", "class"]:
            minor = int(a[a.index("classid") + 1].split(":")[1], 16)
            if minor >= 0x100:
                self.rates[(a[4], minor)] = _rate_kbit(a[a.index("rate") + 1])
        elif a[:3] == ["tc", "filter", "add"]:
            pass
        else:
            raise AssertionError(f"unexpected command {a}")
        return ""

    def _drop(self, dev: str) -> None:
        self.root.pop(dev, None)
        for k in [k for k in self.leaves if k[0] == dev]:
            del self.leaves[k]
        for k in [k for k in self.rates if k[0] == dev]:
            del self.rates[k]

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, input=None):
        argv = list(argv)
        if argv == ["tc", "-j", "-batch", "-"]:
            return self._batch(argv, input, check)
        try:
            out, rc, err = self.apply(argv), 0, ""
        except _Refused as exc:
            out, rc, err = "", 2, str(exc) + "\n"
        if check and rc:
            raise CommandFailed("bs", argv, rc, out, err)
        return Result("bs", tuple(argv), rc, out, err, 0.0)

    def _batch(self, argv: list[str], script: str, check: bool) -> Result:
        assert script.endswith("\n"), script
        out = []
        for line in script.splitlines():
            words = ["tc", *shlex.split(line)]
            if words[1:3] == ["qdisc", "show"]:
                out.append(self.qdisc_json(words[-1]))
            elif words[1:3] == ["class", "show"]:
                out.append(self.class_text(words[-1]).rstrip("\n"))
            else:
                self.apply(words)
        return Result("bs", tuple(argv), 0, "\n".join(out) + "\n", "", 0.0)


class _Refused(Exception):
    pass


def _shaper(bs: FakeBS, shaping: str = "auto") -> TcShaper:
    return TcShaper(
        bs, "br0", "ifb0", ["10.0.0.11", "10.0.0.12"], ["dev1", "dev2"], shaping=shaping
    )


def _setup(bs: FakeBS, shaping: str = "auto") -> TcShaper:
    sh = _shaper(bs, shaping)
    sh.setup([LinkSpec(8000)] * 2, [LinkSpec(4000)] * 2)
    return sh


def test_auto_without_netem_builds_tbf_leaves_and_records_before_offloads_change():
    bs = FakeBS(netem=False)
    sh = _setup(bs)
    kinds = {k: q["kind"] for k, q in bs.leaves.items()}
    assert set(kinds.values()) == {"tbf"} and len(kinds) == 4
    assert bs.leaves[("br0", 0x100)]["options"]["burst"] == 1514 + 50  # + 50 us of 8 Mbit/s
    # the probe ran on the ifb; the record was written before any offload changed
    alias_at = next(i for i, c in enumerate(bs.log) if " alias " in c)
    first_ethtool = next(i for i, c in enumerate(bs.log) if c.startswith("ethtool -K"))
    probe_at = next(
        i
        for i, c in enumerate(bs.log)
        if c.startswith("tc qdisc add dev ifb0 root handle 1: netem")
    )
    assert bs.log.index("ip link add ifb0 type ifb") < probe_at < alias_at < first_ethtool
    assert parse_record(bs.links["ifb0"]["alias"]) == {
        "shaping": "tbf",
        "bucket": "1514",
        "slack_us": "50",
        "netem": "no",
        "iface": "br0",
        "restore": "tso,gso,gro",
    }
    assert not any(on for on, _ in bs.feat["br0"].values())
    assert not any(on for on, _ in bs.feat["ifb0"].values())
    info = _shaper(bs).shaping_info()  # a fresh process reads it all back from the kernel
    assert (info["mode"], info["leaf"], info["bucket_bytes"], info["netem"]) == (
        "tbf",
        "tbf",
        1514,
        False,
    )
    assert info["offloads_summary"] == "off" and info["warning"] is None
    st = {s.device: s for s in sh.show()}
    assert (st["dev1"].down_kbit, st["dev1"].up_kbit) == (8000, 4000)
    assert st["dev1"].down_leaf == "tbf rate 8000kbit burst 1564b"


def test_auto_with_netem_builds_netem_leaves_with_the_rate():
    bs = FakeBS(netem=True)
    _setup(bs)
    assert {q["kind"] for q in bs.leaves.values()} == {"netem"}
    assert bs.leaves[("ifb0", 0x101)]["options"]["rate"]["rate"] == 4000 * 1000 / 8
    assert bs.leaves[("ifb0", 0x101)]["handle"] == "4101:"
    info = _shaper(bs).shaping_info()
    assert (info["mode"], info["bucket_bytes"], info["netem"]) == ("netem", 0, True)


def test_forced_modes():
    bs = FakeBS(netem=True)
    _setup(bs, "tbf")
    assert {q["kind"] for q in bs.leaves.values()} == {"tbf"}
    bs = FakeBS(netem=True)
    _setup(bs, "htb")
    assert {q["kind"] for q in bs.leaves.values()} == {"pfifo"}
    assert _shaper(bs).shaping_info()["bucket_bytes"] == 3200
    with pytest.raises(ConfigError, match="bs.shaping"):
        _shaper(bs, "fq")


def test_forced_netem_without_netem_is_refused_and_leaves_the_bs_as_it_was():
    bs = FakeBS(netem=False)
    with pytest.raises(Unsupported, match="Specified qdisc kind is unknown"):
        _setup(bs, "netem")
    assert "ifb0" not in bs.links and not bs.leaves and not bs.root
    assert all(on for n, (on, _) in bs.feat["br0"].items() if n != "lro")


def test_clear_restores_the_interface_offloads():
    bs = FakeBS()
    sh = _setup(bs)
    assert _shaper(bs).clear() == {"offloads_restored": ["tso", "gso", "gro"]}
    assert [on for on, _ in bs.feat["br0"].values()] == [True, True, True, False]
    assert "ifb0" not in bs.links
    assert sh.clear() == {"offloads_restored": []}  # idempotent: nothing recorded any more


def test_offloads_that_cannot_change_give_a_one_line_warning():
    bs = FakeBS(fixed=("gro",))
    _setup(bs)
    info = _shaper(bs).shaping_info()
    assert info["offloads"]["br0"]["on"] == ["gro (fixed)"]
    assert info["offloads_summary"] == "on: br0 gro (fixed)"
    assert "\n" not in info["warning"] and "gro" in info["warning"]
    bs = FakeBS(ethtool=False)
    _setup(bs)
    info = _shaper(bs).shaping_info()
    assert info["offloads_summary"] == "unknown" and "ethtool" in info["warning"]
    assert {q["kind"] for q in bs.leaves.values()} == {"tbf"}  # the shaping went in anyway


def test_set_rates_changes_the_leaves_in_place_in_one_batch():
    bs = FakeBS()
    _setup(bs)
    sh = _shaper(bs)
    handles = sh.qdisc_handles()
    bs.log.clear()
    assert sh.set_rates({"dev1": (1234, 777), "dev2": (50000, 10000)}) == {
        "dev1": (1234, 777),
        "dev2": (50000, 10000),
    }
    assert sh.qdisc_handles() == handles
    # the leaves alone carry the rate: 2 devices x 2 directions
    assert bs.log[:1] == [
        (
            "tc qdisc change dev br0 parent 1:100 handle 100: tbf rate 1234kbit burst 1522 "
            "limit 1514000"
        )
    ]
    assert len(bs.log) == 4 and all(c.startswith("tc qdisc change") for c in bs.log), bs.log
    # the read-back is the leaf's rate where it charges less than the class
    bs.leaves[("ifb0", 0x101)]["options"]["rate"] = 500 * 1000 / 8
    assert sh.set_rates({"dev1": (100, 100)}) == {"dev1": (100, 100)}
    assert sh._leaf_cache[("ifb0", 0x101)].rate_kbit == 500
    assert sh.show()[1].up_kbit == 500


def test_set_rates_keeps_a_netem_leafs_delay():
    bs = FakeBS(netem=True)
    sh = _setup(bs)
    sh.change("dev1", LinkSpec(8000, delay_ms=5), "down")
    bs.log.clear()
    sh.set_rates({"dev1": (3000, 3000)})
    leaf = [c for c in bs.log if c.startswith("tc qdisc change dev br0")]
    assert leaf == [
        (
            "tc qdisc change dev br0 parent 1:100 handle 4100: netem limit 1000 rate "
            "3000kbit delay 5ms"
        )
    ]


def test_change_in_tbf_mode_is_in_place_and_refusals_change_nothing():
    bs = FakeBS(netem=False)
    sh = _setup(bs)
    handles = sh.qdisc_handles()
    bs.log.clear()
    sh.change("dev2", LinkSpec(3000), "both")
    assert [c.split(" dev ")[0] for c in bs.log] == ["tc qdisc change"] * 2
    assert sh.qdisc_handles() == handles
    assert {(s.down_kbit, s.up_kbit) for s in sh.show() if s.device == "dev2"} == {(3000, 3000)}
    before = dict(bs.leaves), dict(bs.rates)
    with pytest.raises(Unsupported, match="qdisc kind is unknown"):
        sh.change("dev2", LinkSpec(1000, delay_ms=5), "both")
    assert (dict(bs.leaves), dict(bs.rates)) == before


def test_delay_in_tbf_mode_grafts_netem_with_the_rate_and_back():
    bs = FakeBS(netem=True)
    sh = _setup(bs, "tbf")
    sh.change("dev1", LinkSpec(2000, delay_ms=10), "up")
    assert bs.leaves[("ifb0", 0x100)]["kind"] == "netem"
    assert bs.leaves[("ifb0", 0x100)]["options"]["rate"]["rate"] == 2000 * 1000 / 8
    sh.change("dev1", LinkSpec(2000), "up")
    assert bs.leaves[("ifb0", 0x100)]["kind"] == "tbf"
    assert bs.leaves[("ifb0", 0x100)]["handle"] == "100:"


def test_refused_up_puts_the_down_leaf_back_as_it_was():
    bs = FakeBS(netem=True)
    sh = _setup(bs, "tbf")
    real = bs.apply

    def refuse_ifb(argv):
        if argv[:3] == ["tc", "qdisc", "replace"] and argv[4] == "ifb0" and "netem" in argv:
            raise _Refused("Error: Specified qdisc kind is unknown.")
        return real(argv)

    bs.apply = refuse_ifb
    before = {k: json.dumps(v) for k, v in bs.leaves.items()}
    with pytest.raises(Unsupported):
        sh.change("dev1", LinkSpec(5000, loss_pct=1), "both")
    assert {k: json.dumps(v) for k, v in bs.leaves.items()} == before


# -- the inventory's bs.shaping ---------------------------------------------------------
def _inventory(**bs):
    from pathlib import Path

    from testbed.lab.inventory import parse_inventory

    return parse_inventory(
        {
            "bs": {"name": "bs", "host": "10.0.0.1", "interface": "eth0", **bs},
            "devices": [
                {
                    "name": "d1",
                    "host": "10.0.0.11",
                    "ssh_user": "u",
                    "workdir": "/w",
                    "python": "/usr/bin/python3",
                    "hw_class": "netns",
                    "memory_budget_mb": 100,
                }
            ],
        },
        Path("lab.toml"),
    )


def test_inventory_shaping_option():
    from testbed.lab.inventory import render_inventory
    from testbed.net.verify import shaper_for

    assert _inventory().bs.shaping == "auto"
    inv = _inventory(shaping="tbf")
    assert inv.bs.shaping == "tbf" and shaper_for(inv, FakeBS()).shaping == "tbf"
    assert 'shaping = "tbf"' in render_inventory("x", "kh", inv.bs, list(inv.devices))
    assert "shaping" not in render_inventory("x", "kh", _inventory().bs, [])
    with pytest.raises(ConfigError, match=r"bs\.shaping: must be one of auto, tbf, netem, htb"):
        _inventory(shaping="fq")


# -- the airtime probe (netprobe echo/airtime) on loopback --------------------------------
def test_airtime_probe_times_lone_messages_on_loopback():
    import socket
    import threading

    from testbed.net import netprobe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served: dict = {}
    th = threading.Thread(target=lambda: served.update(netprobe.echo("127.0.0.1", port, 10)))
    th.start()
    out = netprobe.airtime(
        "127.0.0.1", port, [100, 300_000], repeats=2, idle_s=0.0, pings=5, connect_timeout_s=5
    )
    th.join(10)
    assert served == {"messages": 4}
    assert [(m["repeat"], m["bytes"]) for m in out["messages"]] == [
        (0, 100),
        (0, 300_000),
        (1, 100),
        (1, 300_000),
    ]
    for m in out["messages"]:
        assert len(m["pings_ms"]) == 5 and m["rtt_ms"] == min(m["pings_ms"])
        assert m["delivery_ms"] > 0 and m["charged_ms"] == pytest.approx(
            m["delivery_ms"] - m["rtt_ms"], abs=1e-3
        )


def test_airtime_ratio_and_summary():
    from testbed.net.verify import Airtime, summarize_airtime

    rows = [
        Airtime("d1", "down", 2000, 8192, r, 0.1, 0.1 + ms, "tbf")
        for r, ms in enumerate((30.0, 29.0, 31.0))
    ]
    assert rows[0].airtime_ms == pytest.approx(32.768)
    assert rows[0].ratio == pytest.approx(30 / 32.768)
    (s,) = summarize_airtime(rows)
    assert (s["repeats"], s["shaping"], s["bytes"]) == (3, "tbf", 8192)
    assert s["ratio_min"] == round(29 / 32.768, 4) and s["ratio_max"] == round(31 / 32.768, 4)
    assert s["ratio_median"] == round(30 / 32.768, 4)
    assert Airtime("d1", "up", None, 10, 0, 0.1, 1.0).ratio is None
