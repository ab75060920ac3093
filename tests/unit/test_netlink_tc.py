"""Pure tests of the rtnetlink tc messages: built, decoded back, compared with tc's own bytes,
and the batch's ack bookkeeping against a scripted socket (no root, no kernel changes)."""

from __future__ import annotations

import errno
import struct
import threading
from collections import deque

import pytest

from testbed.net import netlink as N

# Captured from iproute2 6.1 (`tc` under `strace -e trace=sendmsg -e write=3`) on a veth of
# ifindex 3 whose HTB tree had class 1:100 and TBF leaf 100:, sequence number zeroed. Both
# carry tc's rate tables; the builders with tables=True must give the same bytes.
# tc class change dev v0 parent 1:1 classid 1:100 htb rate 1234kbit ceil 1234kbit burst 3200 \
#   cburst 3200 quantum 3028
TC61_HTB_1234KBIT = bytes.fromhex("""
68080000280005000000000000000000000000000300000000010100010001000000000008000100687462003c080200
3000010003010000ffff00008a5a020003010000ffff00008a5a02002cf204002cf20400d40b00000000000000000000
040404001c0300004906000075090000a20c0000ce0f0000fb1200002716000044190000711c00009d1f0000ca220000
f6250000232900004f2c00006c2f000099320000c5350000f23800001e3c00004b3f000077420000a4450000c1480000
ed4b00001a4f000046520000735500009f580000cc5b0000e85e000015620000416500006e6800009a6b0000c76e0000
f3710000107500003d780000697b0000967e0000c2810000ef8400001b880000488b0000658e000091910000be940000
ea970000179b0000439e000070a100008da40000b9a70000e6aa000012ae00003fb100006bb4000098b70000b4ba0000
e1bd00000dc100003ac4000066c7000093ca0000bfcd0000ecd0000009d4000035d7000062da00008edd0000bbe00000
e7e3000014e7000031ea00005ded00008af00000b6f30000e3f600000ffa00003cfd00005900010085030100b2060100
de0901000b0d0100371001006413010090160100ad190100d91c010006200100322301005f2601008b290100b82c0100
d52f0100013301002e3601005a390100873c0100b33f0100e0420100fd45010029490100564c0100824f0100af520100
db55010008590100345c0100515f01007e620100aa650100d7680100036c0100306f01005c72010079750100a5780100
d27b0100fe7e01002b8201005785010084880100a18b0100cd8e0100fa91010026950100539801007f9b0100ac9e0100
d8a10100f5a4010022a801004eab01007bae0100a7b10100d4b4010000b801001dbb01004abe010076c10100a3c40100
cfc70100fcca010028ce010045d1010071d401009ed70100cada0100f7dd010023e1010050e401007ce7010099ea0100
c6ed0100f2f001001ff401004bf7010078fa0100a4fd0100c1000200ee0302001a070200470a0200730d0200a0100200
cc130200e9160200161a0200421d02006f2002009b230200c8260200f4290200212d02003d3002006a33020096360200
c3390200ef3c02001c400200484302006546020092490200be4c0200eb4f02001753020044560200705902008d5c0200
ba5f0200e6620200136602003f6902006c6c0200986f0200c5720200e27502000e7902003b7c0200677f020094820200
c0850200ed880200098c0200368f0200629202008f950200bb980200e89b0200149f020041a202005ea502008aa80200
b7ab0200e3ae020010b202003cb5020069b8020086bb0200b2be0200dfc102000bc5020038c8020064cb020091ce0200
aed10200dad4020007d8020033db020060de02008ce10200b9e40200e5e7020002eb02002eee02005bf1020087f40200
b4f70200e0fa02000dfe02002a0103005604030083070300af0a0300dc0d03000811030035140300521703007e1a0300
ab1d0300d720030004240300302703005d2a0300040403001c0300004906000075090000a20c0000ce0f0000fb120000
2716000044190000711c00009d1f0000ca220000f6250000232900004f2c00006c2f000099320000c5350000f2380000
1e3c00004b3f000077420000a4450000c1480000ed4b00001a4f000046520000735500009f580000cc5b0000e85e0000
15620000416500006e6800009a6b0000c76e0000f3710000107500003d780000697b0000967e0000c2810000ef840000
1b880000488b0000658e000091910000be940000ea970000179b0000439e000070a100008da40000b9a70000e6aa0000
12ae00003fb100006bb4000098b70000b4ba0000e1bd00000dc100003ac4000066c7000093ca0000bfcd0000ecd00000
09d4000035d7000062da00008edd0000bbe00000e7e3000014e7000031ea00005ded00008af00000b6f30000e3f60000
0ffa00003cfd00005900010085030100b2060100de0901000b0d0100371001006413010090160100ad190100d91c0100
06200100322301005f2601008b290100b82c0100d52f0100013301002e3601005a390100873c0100b33f0100e0420100
fd45010029490100564c0100824f0100af520100db55010008590100345c0100515f01007e620100aa650100d7680100
036c0100306f01005c72010079750100a5780100d27b0100fe7e01002b8201005785010084880100a18b0100cd8e0100
fa91010026950100539801007f9b0100ac9e0100d8a10100f5a4010022a801004eab01007bae0100a7b10100d4b40100
00b801001dbb01004abe010076c10100a3c40100cfc70100fcca010028ce010045d1010071d401009ed70100cada0100
f7dd010023e1010050e401007ce7010099ea0100c6ed0100f2f001001ff401004bf7010078fa0100a4fd0100c1000200
ee0302001a070200470a0200730d0200a0100200cc130200e9160200161a0200421d02006f2002009b230200c8260200
f4290200212d02003d3002006a33020096360200c3390200ef3c02001c400200484302006546020092490200be4c0200
eb4f02001753020044560200705902008d5c0200ba5f0200e6620200136602003f6902006c6c0200986f0200c5720200
e27502000e7902003b7c0200677f020094820200c0850200ed880200098c0200368f0200629202008f950200bb980200
e89b0200149f020041a202005ea502008aa80200b7ab0200e3ae020010b202003cb5020069b8020086bb0200b2be0200
dfc102000bc5020038c8020064cb020091ce0200aed10200dad4020007d8020033db020060de02008ce10200b9e40200
e5e7020002eb02002eee02005bf1020087f40200b4f70200e0fa02000dfe02002a0103005604030083070300af0a0300
dc0d03000811030035140300521703007e1a0300ab1d0300d720030004240300302703005d2a0300
""")
# tc qdisc change dev v0 parent 1:100 handle 100: tbf rate 1234kbit burst 1514 latency 1s
TC61_TBF_1234KBIT = bytes.fromhex("""
640400002400050000000000000000000000000003000000000000010001010000000000080001007462660038040200
2800010003010000ffff00008a5a0200000000000000000000000000746002000f5702000000000008000600ea050000
040402001c0300004906000075090000a20c0000ce0f0000fb1200002716000044190000711c00009d1f0000ca220000
f6250000232900004f2c00006c2f000099320000c5350000f23800001e3c00004b3f000077420000a4450000c1480000
ed4b00001a4f000046520000735500009f580000cc5b0000e85e000015620000416500006e6800009a6b0000c76e0000
f3710000107500003d780000697b0000967e0000c2810000ef8400001b880000488b0000658e000091910000be940000
ea970000179b0000439e000070a100008da40000b9a70000e6aa000012ae00003fb100006bb4000098b70000b4ba0000
e1bd00000dc100003ac4000066c7000093ca0000bfcd0000ecd0000009d4000035d7000062da00008edd0000bbe00000
e7e3000014e7000031ea00005ded00008af00000b6f30000e3f600000ffa00003cfd00005900010085030100b2060100
de0901000b0d0100371001006413010090160100ad190100d91c010006200100322301005f2601008b290100b82c0100
d52f0100013301002e3601005a390100873c0100b33f0100e0420100fd45010029490100564c0100824f0100af520100
db55010008590100345c0100515f01007e620100aa650100d7680100036c0100306f01005c72010079750100a5780100
d27b0100fe7e01002b8201005785010084880100a18b0100cd8e0100fa91010026950100539801007f9b0100ac9e0100
d8a10100f5a4010022a801004eab01007bae0100a7b10100d4b4010000b801001dbb01004abe010076c10100a3c40100
cfc70100fcca010028ce010045d1010071d401009ed70100cada0100f7dd010023e1010050e401007ce7010099ea0100
c6ed0100f2f001001ff401004bf7010078fa0100a4fd0100c1000200ee0302001a070200470a0200730d0200a0100200
cc130200e9160200161a0200421d02006f2002009b230200c8260200f4290200212d02003d3002006a33020096360200
c3390200ef3c02001c400200484302006546020092490200be4c0200eb4f02001753020044560200705902008d5c0200
ba5f0200e6620200136602003f6902006c6c0200986f0200c5720200e27502000e7902003b7c0200677f020094820200
c0850200ed880200098c0200368f0200629202008f950200bb980200e89b0200149f020041a202005ea502008aa80200
b7ab0200e3ae020010b202003cb5020069b8020086bb0200b2be0200dfc102000bc5020038c8020064cb020091ce0200
aed10200dad4020007d8020033db020060de02008ce10200b9e40200e5e7020002eb02002eee02005bf1020087f40200
b4f70200e0fa02000dfe02002a0103005604030083070300af0a0300dc0d03000811030035140300521703007e1a0300
ab1d0300d720030004240300302703005d2a0300
""")

IFINDEX = 3
R1234 = N.rate_bytes(1234)


def _htb(rate_kbit: float = 1234, **kw) -> N.HtbClass:
    r = N.rate_bytes(rate_kbit)
    return N.HtbClass(
        "v0", 0x10100, 0x10001, rate=r, ceil=r, burst=3200, cburst=3200, quantum=3028
    )._replace(**kw)


def _tbf(rate_kbit: float = 1234, **kw) -> N.TbfQdisc:
    r = N.rate_bytes(rate_kbit)
    return N.TbfQdisc(
        "v0", 0x1000000, 0x10100, rate=r, burst=1514, limit=N.tbf_limit(r, 1514, 1_000_000)
    )._replace(**kw)


def _one(buf: bytes) -> N.NlMsg:
    msgs = list(N.split_messages(buf))
    assert len(msgs) == 1
    return msgs[0]


@pytest.fixture(autouse=True)
def _ticks(monkeypatch):
    """Every kernel since 2.6.31 has 64 ns psched ticks; pin it so the tests do not depend
    on /proc of the machine running them."""
    monkeypatch.setattr(N, "TICK_IN_USEC", 15.625)


# -- handles and arithmetic -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,value",
    [
        ("1:100", 0x10100),
        ("100:", 0x1000000),
        ("1:", 0x10000),
        ("ffff:", 0xFFFF0000),
        ("root", N.TC_H_ROOT),
        ("1:1", 0x10001),
    ],
)
def test_handles_round_trip(text, value):
    assert N.parse_handle(text) == value
    assert N.parse_handle(N.format_handle(value)) == value


@pytest.mark.parametrize("bad", ["100", "1:10000", "g:1", ""])
def test_bad_handles_refused(bad):
    with pytest.raises(ValueError):
        N.parse_handle(bad)


def test_tc_arithmetic():
    # what tc 6.1 sent for "rate 1234kbit burst 1514 latency 1s" / "burst 3200"
    assert N.rate_bytes(1234) == 154250 and N.rate_bytes(1234.4) == 154250
    assert N.rate_bytes(10_000_000) == 1_250_000_000
    assert N.xmittime(154250, 1514) == 153359  # 9815 us (truncated) * 15.625
    assert N.xmittime(154250, 3200) == 324140
    assert N.xmittime(6_250_000_000, 3200) == 0
    assert N.tbf_limit(154250, 1514, 1_000_000) == 155764
    assert N.tbf_limit(6_250_000_000, 1514, 1_000_000) == N.U32_MAX  # tc would wrap; we cap
    spec = N.parse_ratespec(N.ratespec(154250))
    assert spec == {
        "cell_log": 3,
        "linklayer": N.TC_LINKLAYER_ETHERNET,
        "overhead": 0,
        "cell_align": -1,
        "mpu": 0,
        "rate": 154250,
    }
    assert N.parse_ratespec(N.ratespec(1 << 40))["rate"] == N.U32_MAX
    tab = struct.unpack("=256I", N.rate_table(154250))
    assert tab[0] == N.xmittime(154250, 8) and tab[255] == N.xmittime(154250, 2048)


# -- against tc's own bytes -------------------------------------------------------------------
def _diff(a: bytes, b: bytes) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f"lengths {len(a)}/{len(b)}, first difference at byte {i}: "
        f"{a[i : i + 12].hex()} vs {b[i : i + 12].hex()}"
    )


def test_htb_class_change_equals_tc():
    mine = N.encode_htb_class(_htb(), IFINDEX, 0, tables=True)
    assert mine == TC61_HTB_1234KBIT, _diff(mine, TC61_HTB_1234KBIT)


def test_tbf_qdisc_change_equals_tc():
    mine = N.encode_tbf_qdisc(_tbf(), IFINDEX, 0, tables=True)
    assert mine == TC61_TBF_1234KBIT, _diff(mine, TC61_TBF_1234KBIT)


def test_without_tables_only_the_tables_differ_from_tc():
    for mine, theirs in (
        (N.encode_htb_class(_htb(), IFINDEX), TC61_HTB_1234KBIT),
        (N.encode_tbf_qdisc(_tbf(), IFINDEX), TC61_TBF_1234KBIT),
    ):
        a, b = _one(mine), _one(theirs)
        assert (a.type, a.flags, a.seq) == (b.type, b.flags, b.seq)
        x, y = N.decode_tc(a), N.decode_tc(b)
        assert x.tables == () and len(y.tables) >= 1
        x.tables = y.tables = ()
        x.msg_type = y.msg_type
        assert x == y
        assert len(mine) < 150 and len(theirs) > 1000


# -- decoding our own messages ----------------------------------------------------------------
def test_htb_message_decodes_back():
    m = _one(N.encode_htb_class(_htb(8000, quantum=1500, prio=2), 7, seq=42))
    assert m.type == N.RTM_NEWTCLASS and m.seq == 42
    assert m.flags == N.NLM_F_REQUEST | N.NLM_F_ACK  # change: never create, never replace
    o = N.decode_tc(m)
    assert (o.kind, o.ifindex, o.handle, o.parent) == ("htb", 7, 0x10100, 0x10001)
    assert (o.rate, o.ceil, o.quantum, o.prio, o.level) == (1_000_000, 1_000_000, 1500, 2, 0)
    assert o.rate_kbit == 8000.0 and o.ceil_kbit == 8000.0
    assert o.buffer == N.xmittime(1_000_000, 3200) and o.cbuffer == o.buffer
    assert o.burst == pytest.approx(3200, abs=1)
    assert o.tables == ()


def test_tbf_message_decodes_back():
    m = _one(N.encode_tbf_qdisc(_tbf(567, burst=3028, limit=9999), 5, seq=9))
    assert m.type == N.RTM_NEWQDISC and m.flags == N.NLM_F_REQUEST | N.NLM_F_ACK
    o = N.decode_tc(m)
    assert (o.kind, o.ifindex, o.handle, o.parent) == ("tbf", 5, 0x1000000, 0x10100)
    assert (o.rate, o.limit, o.burst_bytes) == (N.rate_bytes(567), 9999, 3028)
    assert o.burst == pytest.approx(3028, abs=1)
    assert o.ratespecs[1]["rate"] == 0  # no peak rate


def test_rates_over_32_bits_use_the_64_bit_attributes():
    big = 50_000_000  # kbit/s: 6.25e9 bytes/s
    o = N.decode_tc(_one(N.encode_htb_class(_htb(big, ceil=N.rate_bytes(2 * big)), 1)))
    assert (o.rate, o.ceil) == (N.rate_bytes(big), N.rate_bytes(2 * big))
    assert o.ratespecs[0]["rate"] == N.U32_MAX
    t = N.decode_tc(_one(N.encode_tbf_qdisc(_tbf(big), 1)))
    assert t.rate == N.rate_bytes(big) and t.ratespecs[0]["rate"] == N.U32_MAX
    small = N.decode_tc(_one(N.encode_htb_class(_htb(1234), 1)))
    assert small.rate == R1234


def test_tables_attached_when_asked():
    o = N.decode_tc(_one(N.encode_htb_class(_htb(), 1, tables=True)))
    assert set(o.tables) == {N.TCA_HTB_RTAB, N.TCA_HTB_CTAB}
    t = N.decode_tc(_one(N.encode_tbf_qdisc(_tbf(), 1, tables=True)))
    assert t.tables == (N.TCA_TBF_RTAB,)


def test_batch_is_concatenated_messages_with_their_own_seq():
    buf = b"".join(
        N.encode_change(c, 2, seq)
        for seq, c in enumerate([_htb(), _tbf(), _htb(999, classid=0x10101)], start=1)
    )
    msgs = list(N.split_messages(buf))
    assert [m.seq for m in msgs] == [1, 2, 3]
    assert [N.decode_tc(m).kind for m in msgs] == ["htb", "tbf", "htb"]
    assert N.decode_tc(msgs[2]).rate == N.rate_bytes(999)


def test_dump_request():
    m = _one(N.encode_dump(N.RTM_GETTCLASS, 4, 11))
    assert m.type == N.RTM_GETTCLASS and m.flags == N.NLM_F_REQUEST | N.NLM_F_DUMP
    assert N.decode_tc(m).ifindex == 4


def test_truncated_buffers_refused():
    buf = N.encode_htb_class(_htb(), 1)
    with pytest.raises(ValueError):
        list(N.split_messages(buf[:-4]))
    with pytest.raises(ValueError):
        N.parse_attrs(b"\x10\x00\x01\x00abc")


# -- acks -------------------------------------------------------------------------------------
def _ack(seq: int, err: int = 0, text: str = "") -> bytes:
    """What the kernel sends back with NETLINK_CAP_ACK/EXT_ACK: the error, the request's
    header only, then the message attribute."""
    flags = N.NLM_F_CAPPED
    tlv = b""
    if text:
        flags |= N.NLM_F_ACK_TLVS
        tlv = N._attr(N.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    body = struct.pack("=i", -err) + N._NLMSGHDR.pack(96, N.RTM_NEWTCLASS, 5, seq, 0) + tlv
    return N._NLMSGHDR.pack(16 + len(body), N.NLMSG_ERROR, flags, seq, 1234) + body


def test_decode_ack():
    assert N.decode_ack(_one(_ack(3))) == (0, "")
    assert N.decode_ack(_one(_ack(3, errno.ENOENT, "Specified class not found"))) == (
        errno.ENOENT,
        "Specified class not found",
    )


class FakeKernel:
    """Stands in for the netlink socket and answers as rtnetlink does: for each message in
    order, its new state if it asked for an echo and was applied, then an ack if it asked for
    one or was refused. ``verdict(i, obj)`` gives (errno, kernel message) per message; each
    answer is a separate read unless ``merge``."""

    def __init__(self, verdict=lambda i, obj: (0, ""), merge: bool = False):
        self.verdict = verdict
        self.merge = merge
        self.sent: list[bytes] = []
        self.chunks: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        out = []
        for i, m in enumerate(N.split_messages(data)):
            err, text = self.verdict(i, N.decode_tc(m))
            if not err and m.flags & N.NLM_F_ECHO:
                out.append(N._NLMSGHDR.pack(16 + len(m.payload), m.type, 0, m.seq, 77) + m.payload)
            if m.flags & N.NLM_F_ACK or err:
                out.append(_ack(m.seq, err, text))
        self.chunks.extend([b"".join(out)] if self.merge else out)
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        if not self.chunks:
            raise TimeoutError
        c = self.chunks.pop(0)
        if isinstance(c, OSError):
            raise c
        buf[: len(c)] = c
        return len(c)

    def close(self) -> None:
        pass


def _client(kernel: FakeKernel) -> N.TcNetlink:
    nl = N.TcNetlink.__new__(N.TcNetlink)
    nl.netns, nl.tables, nl.host, nl.warnings = None, False, "bs", deque(maxlen=100)
    nl._lock = threading.Lock()
    nl._ifindex, nl._seq, nl._buf = {"v0": 3, "ifb0": 4}, 0, bytearray(1 << 16)
    nl.sock = kernel
    return nl


EPOCH = [_htb(), _tbf(), _htb(dev="ifb0", rate=999), _tbf(dev="ifb0", rate=999)]


@pytest.mark.parametrize("merge", [False, True])
def test_batch_is_one_send_and_only_the_last_message_asks_for_an_ack(merge):
    kernel = FakeKernel(lambda i, o: (0, "quantum is big" if i == 3 else ""), merge=merge)
    nl = _client(kernel)
    assert nl.change(EPOCH) == []
    assert len(kernel.sent) == 1
    msgs = list(N.split_messages(kernel.sent[0]))
    assert [m.flags for m in msgs] == [N.NLM_F_REQUEST] * 3 + [N.NLM_F_REQUEST | N.NLM_F_ACK]
    assert len({m.seq for m in msgs}) == 4
    assert [N.decode_tc(m).ifindex for m in msgs] == [3, 3, 4, 4]
    assert list(nl.warnings) == ["ifb0 qdisc tbf 100: -> quantum is big"]
    assert kernel.chunks == []


def test_echo_returns_each_object_as_the_kernel_reports_it():
    kernel = FakeKernel()
    nl = _client(kernel)
    got = nl.change(EPOCH, echo=True)
    assert all(m.flags & N.NLM_F_ECHO for m in N.split_messages(kernel.sent[0]))
    assert [(o.kind, o.ifindex, o.rate) for o in got] == [
        ("htb", 3, R1234),
        ("tbf", 3, R1234),
        ("htb", 4, 999),
        ("tbf", 4, 999),
    ]


def test_refusals_name_interface_handle_and_errno():
    def verdict(i, obj):
        return {1: (errno.ENOENT, "Specified class not found"), 2: (errno.EINVAL, "")}.get(
            i, (0, "")
        )

    nl = _client(FakeKernel(verdict))
    with pytest.raises(N.TcNetlinkError) as ei:
        nl.change(
            [_htb(), _tbf(parent=0x10177), _htb(dev="ifb0", classid=0x10105), _tbf()], echo=True
        )
    msg = str(ei.value)
    assert msg.startswith("bs: tc over netlink failed: ")
    assert (
        "v0 qdisc tbf 100: -> ENOENT No such file or directory (Specified class not found)" in msg
    )
    assert "ifb0 class htb 1:105 -> EINVAL Invalid argument" in msg
    assert [f[1] for f in ei.value.failures] == [errno.ENOENT, errno.EINVAL]
    assert ei.value.exit_code == 3


def test_refused_last_message_still_ends_the_batch():
    nl = _client(FakeKernel(lambda i, o: (errno.ENOENT, "") if i == 3 else (0, "")))
    with pytest.raises(N.TcNetlinkError, match="ifb0 qdisc tbf 100: -> ENOENT"):
        nl.change(EPOCH)


def test_missing_ack_times_out_with_an_error():
    kernel = FakeKernel()
    nl = _client(kernel)
    kernel.send = lambda data: len(data)  # the kernel never answers
    with pytest.raises(N.TcNetlinkError, match="ETIMEDOUT"):
        nl.change(EPOCH)


def test_receive_overrun_is_an_error():
    kernel = FakeKernel()
    nl = _client(kernel)
    kernel.send = lambda data: kernel.chunks.append(OSError(errno.ENOBUFS, "overrun")) or 0
    with pytest.raises(N.TcNetlinkError, match="ENOBUFS .*receive buffer overrun"):
        nl.change(EPOCH)


def test_unknown_interface_is_named():
    nl = _client(FakeKernel())
    nl._ifindex = {}
    with pytest.raises(N.TcNetlinkError, match="nosuchdev0: no such interface"):
        nl.change([_htb(dev="nosuchdev0")])


def test_fast_path_equals_general_path():
    """The one-struct encodings (the common case) equal the attribute-by-attribute ones."""
    for c in (_htb(), _htb(8), _htb(10_000_000, quantum=0, prio=7), _htb(1234, ceil=99)):
        fast = N.encode_htb_class(c, 9, 5, flags=N.NLM_F_REQUEST)
        parms = N._HTB_OPT.pack(
            N.ratespec(c.rate),
            N.ratespec(c.ceil),
            N.xmittime(c.rate, c.burst),
            N.xmittime(c.ceil, c.cburst),
            c.quantum,
            0,
            c.prio,
        )
        slow = N._message(
            N.RTM_NEWTCLASS,
            N.NLM_F_REQUEST,
            5,
            9,
            c.classid,
            c.parent,
            N._KIND_HTB + N._attr(N.TCA_OPTIONS, N._attr(N.TCA_HTB_PARMS, parms)),
        )
        assert fast == slow
    for q in (_tbf(), _tbf(8), _tbf(10_000_000, limit=1, burst=99999)):
        fast = N.encode_tbf_qdisc(q, 9, 5)
        parms = N._TBF_QOPT.pack(
            N.ratespec(q.rate), bytes(12), q.limit, N.xmittime(q.rate, q.burst), 0
        )
        opts = N._attr(N.TCA_TBF_PARMS, parms) + N._attr(
            N.TCA_TBF_BURST, struct.pack("=I", q.burst)
        )
        slow = N._message(
            N.RTM_NEWQDISC,
            N.ACK,
            5,
            9,
            q.handle,
            q.parent,
            N._KIND_TBF + N._attr(N.TCA_OPTIONS, opts),
        )
        assert fast == slow


def test_dumped_counters_read_only_when_asked():
    """A dump carries TCA_STATS2 {basic: bytes, packets; queue: ..., drops, ..., overlimits}."""
    sent = _one(N.encode_tbf_qdisc(_tbf(), 3, 8))
    stats = N._attr(
        N.TCA_STATS2,
        N._attr(N.TCA_STATS_BASIC, struct.pack("=QI4x", 123456, 78))
        + N._attr(N.TCA_STATS_QUEUE, struct.pack("=5I", 0, 0, 9, 0, 11)),
    )
    dumped = N.NlMsg(N.RTM_NEWQDISC, N.NLM_F_MULTI, 8, 0, sent.payload + stats)
    o = N.decode_tc(dumped)
    assert (o.sent_bytes, o.sent_packets, o.drops, o.overlimits) == (123456, 78, 9, 11)
    assert o.rate == R1234
    lean = N.decode_tc(dumped, stats=False)
    assert (lean.sent_bytes, lean.rate, lean.limit) == (0, R1234, o.limit)
    assert set(N.parse_attrs(dumped.payload[20:], frozenset({N.TCA_KIND}))) == {N.TCA_KIND}


# -- from tc's words --------------------------------------------------------------------------
def test_units_as_tc_reads_them():
    assert N.tc_rate_bytes("1234kbit") == 154250 == N.tc_rate_bytes("1234Kbit")
    assert N.tc_rate_bytes("10gbit") == 1_250_000_000
    assert N.tc_rate_bytes("1.5mbit") == 187500 and N.tc_rate_bytes("100kbps") == 100_000
    assert N.tc_rate_bytes("999bit") == 124  # truncated, like tc
    assert N.tc_size_bytes("1514") == 1514 == N.tc_size_bytes("1514b")
    assert N.tc_size_bytes("12kb") == 12288 and N.tc_size_bytes("2m") == 2 << 20
    assert N.tc_time_us("1s") == 1_000_000 and N.tc_time_us("50ms") == 50_000
    for bad in ("12kibit", "fast", "10%"):
        with pytest.raises(N.NotExpressible):
            N.tc_rate_bytes(bad)


def test_htb_class_change_from_tc_argv():
    argv = [
        "tc",
        "class",
        "change",
        "dev",
        "v0",
        "parent",
        "1:1",
        "classid",
        "1:100",
        "htb",
        "rate",
        "1234kbit",
        "ceil",
        "1234kbit",
        "burst",
        "3200",
        "cburst",
        "3200",
        "quantum",
        "3028",
    ]
    assert N.change_from_tc_argv(argv) == _htb()
    shared = N.change_from_tc_argv(argv[:11] + ["617kbit"] + argv[12:])
    assert (shared.rate, shared.ceil) == (N.rate_bytes(617), R1234)
    no_ceil = N.change_from_tc_argv(argv[1:12] + argv[14:])  # without "tc" and "ceil"
    assert no_ceil.ceil == no_ceil.rate == R1234


def test_tbf_qdisc_change_from_tc_argv():
    base = [
        "tc",
        "qdisc",
        "change",
        "dev",
        "v0",
        "parent",
        "1:100",
        "handle",
        "100:",
        "tbf",
        "rate",
        "1234kbit",
        "burst",
        "1514",
    ]
    assert N.change_from_tc_argv(base + ["latency", "1s"]) == _tbf()
    assert N.change_from_tc_argv(base + ["limit", "1514000"]) == _tbf(limit=1514000)


@pytest.mark.parametrize(
    "argv",
    [
        # what netlink here does not do: the CLI keeps them
        "tc qdisc change dev v0 parent 1:100 handle 4100: netem limit 1000 rate 1234kbit",
        "tc qdisc replace dev v0 parent 1:100 handle 100: tbf rate 1kbit burst 1514 limit 9",
        "tc class change dev v0 parent 1:1 classid 1:100 htb rate 1kbit ceil 2kbit",
        "tc class change dev v0 parent 1:1 classid 1:100 htb rate 1kbit burst 9 cburst 9 mtu 9",
        "tc qdisc change dev v0 parent 1:100 handle 100: tbf rate 1kbit burst 1514",
        (
            "tc qdisc change dev v0 parent 1:100 handle 100: "
            "tbf rate 1kbit burst 1514 limit 9 latency 1"
        ),
        "tc qdisc change dev v0 parent 1:100 handle 100: tbf burst 1514 limit 9",
        "tc class change dev v0 parent 1:1 classid 1:100 htb rate 1kbit burst 9 cburst 9 quantum x",
        "tc class change parent 1:1 classid 1:100 htb rate 1kbit burst 9 cburst 9",
        "tc class change dev v0 parent 1:1 classid 1:100 htb rate 1kbit burst 9 cburst 9 rate 2",
    ],
)
def test_words_not_handled_are_refused(argv):
    with pytest.raises(N.NotExpressible):
        N.change_from_tc_argv(argv.split())
