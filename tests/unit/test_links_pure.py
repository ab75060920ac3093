"""The tc command builders and parsers are pure: table-driven tests, golden text."""

import pytest

from testbed.links import (
    LinkSpec, build_class_change_command, build_clear_commands, build_setup_commands,
    burst_bytes, class_minor, leaf_qdisc_command, parse_htb_classes, parse_tc_rate_kbit,
)


def test_setup_shapes_both_directions_per_device():
    cmds = build_setup_commands("br0", "ifb0", ["10.0.0.11", "10.0.0.12"],
                                [LinkSpec(8000), LinkSpec(2000)],
                                [LinkSpec(4000), LinkSpec(1000)], cell_rate_kbit=20000)
    text = [" ".join(c) for c in cmds]
    assert "ip link add ifb0 type ifb" in text
    assert any(t.startswith("tc qdisc replace dev br0 root handle 1: htb default ffff")
               for t in text)
    # downlink classes on br0 by destination, uplink classes on the ifb by source
    assert any("dev br0 parent 1:1 classid 1:100 htb rate 8000kbit ceil 8000kbit" in t
               for t in text)
    assert any("dev ifb0 parent 1:1 classid 1:101 htb rate 1000kbit ceil 1000kbit" in t
               for t in text)
    assert any("dev br0 parent 1: protocol ip prio 1 u32 match ip dst 10.0.0.12/32 "
               "flowid 1:101" in t for t in text)
    assert any("dev ifb0 parent 1: protocol ip prio 1 u32 match ip src 10.0.0.11/32 "
               "flowid 1:100" in t for t in text)
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
        ["ip", "link", "del", "ifb0"]]


@pytest.mark.parametrize("text,kbit", [("8Mbit", 8000), ("500Kbit", 500), ("10Gbit", 1e7),
                                       ("999bit", 0.999)])
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
