"""Rate changes over rtnetlink: HTB class and TBF qdisc ``change`` without starting ``tc``.

A decision epoch changes the rate of every device's HTB class and TBF leaf, in both
directions. Through ``tc -batch`` that costs a process start (milliseconds); here the whole
epoch is one ``send`` of ``RTM_NEWTCLASS``/``RTM_NEWQDISC`` messages (packed with ``struct``)
on a kept ``NETLINK_ROUTE`` socket, then one read of the kernel's answer: only the last message
asks for an ack, the kernel handles a buffer's messages in order and answers every refused one
anyway (tens to hundreds of microseconds for 32 messages).

What the kernel needs (``net/sched/sch_htb.c`` ``htb_change_class``, ``sch_tbf.c``
``tbf_change``): ``TCA_HTB_PARMS`` / ``TCA_TBF_PARMS`` only. The rate tables
(``TCA_HTB_RTAB``/``CTAB``, ``TCA_TBF_RTAB``) are read solely to guess the link layer when a
rate spec says ``TC_LINKLAYER_UNAWARE``; our specs say ``ETHERNET`` (as ``tc`` does), so the
tables are left out by default (``tables=True`` adds them, byte for byte as ``tc`` would).
Rates of 2^32 bytes/s and more go in ``TCA_*_RATE64``/``CEIL64``; TBF's bucket size in bytes
goes in ``TCA_TBF_BURST`` (the kernel then derives the bucket's time from its own rate). The
``PARMS`` structures are filled exactly as iproute2's ``tc`` fills them (same cell_log, times
in psched ticks truncated the same way), so a message here equals ``tc``'s minus the tables.

The builders are pure (``bytes`` out) and :func:`decode_tc` reads both our messages and the
kernel's dumps back; :func:`change_from_tc_argv` turns a ``tc class/qdisc change`` command line
into the change it describes, so a caller keeps one definition of the values for both paths.
:class:`TcNetlink` owns the socket (optionally in a named network namespace), sends a batch,
maps every refusal back to the interface and handle it was about (with the kernel's own
message), and dumps qdiscs/classes for the read-back (or echoes each changed object). netem is
not handled here (its options are a structure followed by attributes, and this kernel has no
netem to test against): netem stays with the ``tc`` CLI.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import re
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from ..errors import NotExpressible, TcNetlinkError

# -- netlink / rtnetlink constants (linux/netlink.h, rtnetlink.h, pkt_sched.h) ---------------
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100  # on an ack: the request was not echoed back
NLM_F_ACK_TLVS = 0x200  # on an ack: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1

RTM_NEWQDISC = 36
RTM_GETQDISC = 38
RTM_NEWTCLASS = 40
RTM_GETTCLASS = 42

TCA_KIND = 1
TCA_OPTIONS = 2
TCA_STATS2 = 7
TCA_STATS_BASIC = 1
TCA_STATS_QUEUE = 3

TCA_HTB_PARMS = 1
TCA_HTB_CTAB = 3
TCA_HTB_RTAB = 4
TCA_HTB_RATE64 = 6
TCA_HTB_CEIL64 = 7

TCA_TBF_PARMS = 1
TCA_TBF_RTAB = 2
TCA_TBF_RATE64 = 4
TCA_TBF_BURST = 6

TC_H_ROOT = 0xFFFFFFFF
TC_LINKLAYER_ETHERNET = 1
NLA_TYPE_MASK = 0x3FFF
U32_MAX = 0xFFFFFFFF
_SO_RCVBUFFORCE = 33  # root may go past net.core.rmem_max
RCVBUF_BYTES = 4 << 20
#: cell_log tc puts in a rate spec for the default MTUs (1600 for HTB, 2047 for TBF): 3
CELL_LOG = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_TCMSG = struct.Struct("=BBHiIII")  # family, pad, pad, ifindex, handle, parent, info
_NLA = struct.Struct("=HH")  # len, type
_RATESPEC = struct.Struct("=BBHhHI")  # cell_log, linklayer, overhead, cell_align, mpu, rate
_HTB_OPT = struct.Struct("=12s12sIIIII")  # rate, ceil, buffer, cbuffer, quantum, level, prio
_TBF_QOPT = struct.Struct("=12s12sIII")  # rate, peakrate, limit, buffer, mtu
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_I32 = struct.Struct("=i")


# -- handles and tc's arithmetic --------------------------------------------------------------
@lru_cache(maxsize=4096)
def parse_handle(text: str) -> int:
    """tc's handle syntax ("1:100", "100:", "root", "none") → the 32-bit kernel handle."""
    t = text.strip().lower()
    if t == "root":
        return TC_H_ROOT
    if t == "none":
        return 0
    major, sep, minor = t.partition(":")
    if not sep:
        raise ValueError(f"not a tc handle: {text!r}")
    maj = int(major, 16) if major else 0
    mnr = int(minor, 16) if minor else 0
    if not (0 <= maj <= 0xFFFF and 0 <= mnr <= 0xFFFF):
        raise ValueError(f"tc handle out of range: {text!r}")
    return (maj << 16) | mnr


def format_handle(handle: int) -> str:
    """The kernel handle as tc prints it ("1:100", "100:", "root")."""
    if handle == TC_H_ROOT:
        return "root"
    maj, mnr = handle >> 16, handle & 0xFFFF
    return f"{maj:x}:" + (f"{mnr:x}" if mnr else "")


def rate_bytes(rate_kbit: float) -> int:
    """Bytes/s the kernel keeps for tc's ``<N>kbit`` with ``N = round(rate_kbit)`` (tc's
    ``get_rate64``: bits/s divided by 8, truncated)."""
    return round(rate_kbit) * 1000 // 8


def _read_tick_in_usec() -> float:
    """psched ticks per microsecond, from ``/proc/net/psched`` as tc reads it (15.625 on
    every kernel since 2.6.31: 64 ns ticks)."""
    try:
        with open("/proc/net/psched") as f:
            t2us, us2t, clock_res = (int(x, 16) for x in f.read().split()[:3])
    except (OSError, ValueError):
        return 15.625
    if clock_res == 1_000_000_000:
        t2us = us2t
    return t2us / us2t * (clock_res / 1_000_000)


#: psched ticks per microsecond (read once; the same in every network namespace)
TICK_IN_USEC = _read_tick_in_usec()


def xmittime(rate_bps: int, size: int) -> int:
    """Ticks to send ``size`` bytes at ``rate_bps`` bytes/s, truncated twice like tc's
    ``tc_calc_xmittime`` (microseconds to an unsigned, then ticks to an unsigned)."""
    ticks = int(int(1_000_000 * (size / rate_bps)) * TICK_IN_USEC)
    return min(ticks, U32_MAX)


def tbf_limit(rate_bps: int, burst: int, latency_us: int) -> int:
    """TBF queue limit in bytes for ``latency`` as tc computes it (rate × latency + burst),
    held to 32 bits."""
    return min(int(rate_bps * latency_us / 1_000_000 + burst), U32_MAX)


def ratespec(rate_bps: int) -> bytes:
    """``struct tc_ratespec`` as tc fills it (ethernet, cell_log 3, cell_align -1); rates of
    2^32 bytes/s and more are capped here and sent in full as a 64-bit attribute."""
    return _RATESPEC.pack(CELL_LOG, TC_LINKLAYER_ETHERNET, 0, -1, 0, min(rate_bps, U32_MAX))


@lru_cache(maxsize=256)
def rate_table(rate_bps: int) -> bytes:
    """The 256-entry rate table tc sends (ticks per 8-byte cell multiple). Only needed by a
    kernel for a ``TC_LINKLAYER_UNAWARE`` rate spec; kept for byte-exact comparison."""
    r = min(rate_bps, U32_MAX)
    return struct.pack("=256I", *(xmittime(r, (i + 1) << CELL_LOG) for i in range(256)))


# -- what to change ---------------------------------------------------------------------------
class HtbClass(NamedTuple):
    """In-place change of an HTB class (``tc class change ... htb``). Rates in bytes/s,
    bursts in bytes (as ``burst``/``cburst`` on tc's command line)."""

    dev: str
    classid: int
    parent: int
    rate: int
    ceil: int
    burst: int
    cburst: int
    quantum: int = 0
    prio: int = 0

    def describe(self) -> str:
        """How an error names it: ``dev class htb 1:10``."""
        return f"{self.dev} class htb {format_handle(self.classid)}"


class TbfQdisc(NamedTuple):
    """In-place change of a TBF qdisc (``tc qdisc change ... tbf``). ``limit`` is the queue
    in bytes (:func:`tbf_limit` for tc's ``latency``)."""

    dev: str
    handle: int
    parent: int
    rate: int
    burst: int
    limit: int

    def describe(self) -> str:
        """How an error names it: ``dev qdisc tbf 10:``."""
        return f"{self.dev} qdisc tbf {format_handle(self.handle)}"


Change = HtbClass | TbfQdisc


# -- from tc's own words ----------------------------------------------------------------------
# The subset of tc's syntax the shaper's command builders produce: a change built from their
# argv carries exactly the values ``tc`` would send, so both paths stay one definition.
_RATE_SCALE = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
    "bps": 8,
    "kbps": 8000,
    "mbps": 8 * 1000**2,
    "gbps": 8 * 1000**3,
    "tbps": 8 * 1000**4,
}
_SIZE_SCALE = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
}
_TIME_SCALE_US = {
    "": 1,
    "us": 1,
    "usec": 1,
    "ms": 1000,
    "msec": 1000,
    "s": 1_000_000,
    "sec": 1_000_000,
}


_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)([a-z]*)\s*")


def _split_number(text: str) -> tuple[float, str]:
    m = _NUMBER_UNIT.fullmatch(text.lower())
    if m is None:
        raise NotExpressible(f"not a number: {text!r}")
    return float(m.group(1)), m.group(2)


@lru_cache(maxsize=4096)
def tc_rate_bytes(text: str) -> int:
    """tc's rate words ("1234kbit", "10gbit", "500kbps") → bytes/s as tc computes them
    (``get_rate64``: bits/s divided by 8, truncated)."""
    value, unit = _split_number(text)
    if unit not in _RATE_SCALE:
        raise NotExpressible(f"rate unit not handled: {text!r}")
    return int(value * _RATE_SCALE[unit] / 8.0)


@lru_cache(maxsize=4096)
def tc_size_bytes(text: str) -> int:
    """tc's size words ("1514", "3200b", "12kb") → bytes (``get_size``)."""
    value, unit = _split_number(text)
    if unit not in _SIZE_SCALE:
        raise NotExpressible(f"size unit not handled: {text!r}")
    return int(value * _SIZE_SCALE[unit])


@lru_cache(maxsize=4096)
def tc_time_us(text: str) -> int:
    """tc's time words ("50ms", "200us", "1s"; a bare number is µs) → whole microseconds."""
    value, unit = _split_number(text)
    if unit not in _TIME_SCALE_US:
        raise NotExpressible(f"time unit not handled: {text!r}")
    return int(value * _TIME_SCALE_US[unit])


def _count(text: str) -> int:
    if not text.isdigit():
        raise NotExpressible(f"not a count: {text!r}")
    return int(text)


def _pairs(words: Sequence[str], what: str) -> dict[str, str]:
    if len(words) % 2:
        raise NotExpressible(f"{what}: odd option list {list(words)}")
    out = dict(zip(words[::2], words[1::2]))
    if len(out) != len(words) // 2:
        raise NotExpressible(f"{what}: repeated option in {list(words)}")
    return out


def change_from_tc_argv(argv: Sequence[str]) -> Change:
    """The netlink change for a tc command line (see :func:`_change_from_words`; the last
    thousand are remembered: an epoch's lines repeat across epochs and devices)."""
    return _change_from_words(tuple(argv))


_KIND = {"class": "htb", "qdisc": "tbf"}


@lru_cache(maxsize=1024)
def _change_from_words(argv: tuple[str, ...]) -> Change:
    """``tc class change dev D parent P classid C htb rate R [ceil C] burst B cburst CB
    [quantum Q] [prio N]`` or ``tc qdisc change dev D [parent P] handle H tbf rate R burst B
    (limit L | latency T)`` → the same change as a netlink message carries it. Anything else
    raises :class:`NotExpressible`."""
    start = 1 if argv and argv[0] == "tc" else 0
    obj = argv[start] if len(argv) > start + 2 else ""
    if obj not in _KIND or argv[start + 1] != "change":
        raise NotExpressible(f"not an in-place class/qdisc change: {list(argv)}")
    kind = _KIND[obj]
    try:
        k = argv.index(kind, start + 2)
    except ValueError:
        raise NotExpressible(f"kind not handled in {list(argv)} (netlink does {kind})") from None
    head, opts = _pairs(argv[start + 2 : k], "selector"), _pairs(argv[k + 1 :], kind)
    dev = head.pop("dev", None)
    parent = parse_handle(head.pop("parent", "none"))
    handle = parse_handle(head.pop("classid" if obj == "class" else "handle", "none"))
    if dev is None or not handle or head:
        raise NotExpressible(f"selector not handled in {list(argv)}")
    if "rate" not in opts:
        raise NotExpressible(f"rate must be given: {list(argv)}")
    if obj == "class":
        rate = tc_rate_bytes(opts.pop("rate"))
        ceil = tc_rate_bytes(opts.pop("ceil")) if "ceil" in opts else rate
        if "burst" not in opts or "cburst" not in opts:
            raise NotExpressible(f"burst and cburst must be given: {list(argv)}")
        out: Change = HtbClass(
            dev,
            handle,
            parent,
            rate,
            ceil,
            tc_size_bytes(opts.pop("burst")),
            tc_size_bytes(opts.pop("cburst")),
            _count(opts.pop("quantum", "0")),
            _count(opts.pop("prio", "0")),
        )
    else:
        if "burst" not in opts:
            raise NotExpressible(f"burst must be given: {list(argv)}")
        rate = tc_rate_bytes(opts.pop("rate"))
        burst = tc_size_bytes(opts.pop("burst"))
        if ("limit" in opts) == ("latency" in opts):
            raise NotExpressible(f"one of limit/latency must be given: {list(argv)}")
        limit = (
            tc_size_bytes(opts.pop("limit"))
            if "limit" in opts
            else tbf_limit(rate, burst, tc_time_us(opts.pop("latency")))
        )
        out = TbfQdisc(dev, handle, parent, rate, burst, limit)
    if opts:
        raise NotExpressible(f"options not handled: {sorted(opts)} in {list(argv)}")
    return out


# -- encoding ---------------------------------------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n & 3)


def _message(
    msg_type: int, flags: int, seq: int, ifindex: int, handle: int, parent: int, body: bytes
) -> bytes:
    head = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, ifindex, handle, parent, 0)
    return _NLMSGHDR.pack(16 + len(head) + len(body), msg_type, flags, seq, 0) + head + body


_KIND_HTB = _attr(TCA_KIND, b"htb\0")
_KIND_TBF = _attr(TCA_KIND, b"tbf\0")
ACK = NLM_F_REQUEST | NLM_F_ACK

# The common case (rates under 2^32 bytes/s, no tables) as one fixed layout each, packed in one
# call: header, tcmsg, TCA_KIND, TCA_OPTIONS { PARMS [, TBF_BURST] }. Same bytes as the general
# path below (the unit tests hold them equal).
_HTB_FAST = struct.Struct("=IHHII BBHiIII 8s HH HH BBHhHI BBHhHI IIIII".replace(" ", ""))
_HTB_FAST_LEN = _HTB_FAST.size
_TBF_FAST = struct.Struct("=IHHII BBHiIII 8s HH HH BBHhHI 12s III HHI".replace(" ", ""))
_TBF_FAST_LEN = _TBF_FAST.size
_NO_PEAK = bytes(12)


def encode_htb_class(
    c: HtbClass, ifindex: int, seq: int = 0, *, tables: bool = False, flags: int = ACK
) -> bytes:
    """``RTM_NEWTCLASS`` that changes HTB class ``c`` in place (no ``NLM_F_CREATE``: a class
    that does not exist is an error, never created)."""
    if not tables and c.rate <= U32_MAX and c.ceil <= U32_MAX:
        return _HTB_FAST.pack(
            _HTB_FAST_LEN,
            RTM_NEWTCLASS,
            flags,
            seq,
            0,
            socket.AF_UNSPEC,
            0,
            0,
            ifindex,
            c.classid,
            c.parent,
            0,
            _KIND_HTB,
            _HTB_FAST_LEN - 44,
            TCA_OPTIONS,
            48,
            TCA_HTB_PARMS,
            CELL_LOG,
            TC_LINKLAYER_ETHERNET,
            0,
            -1,
            0,
            c.rate,
            CELL_LOG,
            TC_LINKLAYER_ETHERNET,
            0,
            -1,
            0,
            c.ceil,
            xmittime(c.rate, c.burst),
            xmittime(c.ceil, c.cburst),
            c.quantum,
            0,
            c.prio,
        )
    parms = _HTB_OPT.pack(
        ratespec(c.rate),
        ratespec(c.ceil),
        xmittime(c.rate, c.burst),
        xmittime(c.ceil, c.cburst),
        c.quantum,
        0,
        c.prio,
    )
    opts = b""
    if c.rate > U32_MAX:
        opts += _attr(TCA_HTB_RATE64, _U64.pack(c.rate))
    if c.ceil > U32_MAX:
        opts += _attr(TCA_HTB_CEIL64, _U64.pack(c.ceil))
    opts += _attr(TCA_HTB_PARMS, parms)
    if tables:
        opts += _attr(TCA_HTB_RTAB, rate_table(c.rate)) + _attr(TCA_HTB_CTAB, rate_table(c.ceil))
    return _message(
        RTM_NEWTCLASS,
        flags,
        seq,
        ifindex,
        c.classid,
        c.parent,
        _KIND_HTB + _attr(TCA_OPTIONS, opts),
    )


def encode_tbf_qdisc(
    q: TbfQdisc, ifindex: int, seq: int = 0, *, tables: bool = False, flags: int = ACK
) -> bytes:
    """``RTM_NEWQDISC`` that changes TBF qdisc ``q`` in place (no create/replace flags)."""
    if not tables and q.rate <= U32_MAX:
        return _TBF_FAST.pack(
            _TBF_FAST_LEN,
            RTM_NEWQDISC,
            flags,
            seq,
            0,
            socket.AF_UNSPEC,
            0,
            0,
            ifindex,
            q.handle,
            q.parent,
            0,
            _KIND_TBF,
            _TBF_FAST_LEN - 44,
            TCA_OPTIONS,
            40,
            TCA_TBF_PARMS,
            CELL_LOG,
            TC_LINKLAYER_ETHERNET,
            0,
            -1,
            0,
            q.rate,
            _NO_PEAK,
            q.limit,
            xmittime(q.rate, q.burst),
            0,
            8,
            TCA_TBF_BURST,
            q.burst,
        )
    parms = _TBF_QOPT.pack(ratespec(q.rate), _NO_PEAK, q.limit, xmittime(q.rate, q.burst), 0)
    opts = _attr(TCA_TBF_PARMS, parms) + _attr(TCA_TBF_BURST, _U32.pack(q.burst))
    if q.rate > U32_MAX:
        opts += _attr(TCA_TBF_RATE64, _U64.pack(q.rate))
    if tables:
        opts += _attr(TCA_TBF_RTAB, rate_table(q.rate))
    return _message(
        RTM_NEWQDISC, flags, seq, ifindex, q.handle, q.parent, _KIND_TBF + _attr(TCA_OPTIONS, opts)
    )


def encode_change(
    c: Change, ifindex: int, seq: int = 0, *, tables: bool = False, flags: int = ACK
) -> bytes:
    """The message for change ``c`` (:func:`encode_htb_class` or :func:`encode_tbf_qdisc`)."""
    enc = _ENCODERS.get(type(c))
    if enc is None:
        raise TypeError(f"not a tc change: {c!r}")
    return enc(c, ifindex, seq, tables=tables, flags=flags)


_ENCODERS = {HtbClass: encode_htb_class, TbfQdisc: encode_tbf_qdisc}


def encode_dump(msg_type: int, ifindex: int, seq: int = 0) -> bytes:
    """Dump request (``RTM_GETQDISC``/``RTM_GETTCLASS``) for one interface."""
    return _message(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, ifindex, 0, 0, b"")


# -- decoding ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NlMsg:
    """One netlink message: its header's fields and the payload after the 16-byte header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def split_messages(buf: bytes) -> Iterator[NlMsg]:
    """The netlink messages in a buffer (as sent or as received)."""
    off = 0
    while off + 16 <= len(buf):
        length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(buf, off)
        if length < 16 or off + length > len(buf):
            raise ValueError(f"truncated netlink message at offset {off}")
        yield NlMsg(kind, flags, seq, pid, buf[off + 16 : off + length])
        off += (length + 3) & ~3


def parse_attrs(buf: bytes, want: frozenset[int] | None = None) -> dict[int, bytes]:
    """Attributes (type → payload; the nested/byte-order flag bits dropped); only the types
    in ``want`` when given (the others are skipped without a copy)."""
    out: dict[int, bytes] = {}
    off, end = 0, len(buf)
    unpack = _NLA.unpack_from
    while off + 4 <= end:
        length, kind = unpack(buf, off)
        if length < 4 or off + length > end:
            raise ValueError(f"truncated attribute at offset {off}")
        kind &= NLA_TYPE_MASK
        if want is None or kind in want:
            out[kind] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def parse_ratespec(b: bytes) -> dict[str, int]:
    """The fields of one ``struct tc_ratespec`` (12 bytes; ``rate`` in bytes/s, 32 bits)."""
    cell_log, linklayer, overhead, cell_align, mpu, rate = _RATESPEC.unpack(b[:12])
    return {
        "cell_log": cell_log,
        "linklayer": linklayer,
        "overhead": overhead,
        "cell_align": cell_align,
        "mpu": mpu,
        "rate": rate,
    }


@dataclass
class TcObject:
    """A qdisc or class as a message carries it. Rates in bytes/s (64-bit attributes
    applied), bucket times in psched ticks, ``burst``/``cburst`` in bytes as tc computes
    them back from the times."""

    msg_type: int
    kind: str
    ifindex: int
    handle: int
    parent: int
    rate: int | None = None
    ceil: int | None = None
    buffer: int | None = None
    cbuffer: int | None = None
    quantum: int | None = None
    level: int | None = None
    prio: int | None = None
    limit: int | None = None
    burst_bytes: int | None = None  # TCA_TBF_BURST, when sent
    specs: bytes = b""  # the PARMS' two tc_ratespec, raw
    tables: tuple[int, ...] = ()  # attribute types of rate tables present
    sent_bytes: int = 0
    sent_packets: int = 0
    drops: int = 0
    overlimits: int = 0

    @property
    def ratespecs(self) -> tuple[dict[str, int], ...]:
        """(rate, ceil) for HTB, (rate, peakrate) for TBF, as tc_ratespec fields."""
        return tuple(parse_ratespec(self.specs[k : k + 12]) for k in range(0, len(self.specs), 12))

    @property
    def rate_kbit(self) -> float | None:
        """``rate`` in kbit/s (1000 bit), or None."""
        return None if self.rate is None else self.rate * 8 / 1000

    @property
    def ceil_kbit(self) -> float | None:
        """``ceil`` in kbit/s (1000 bit), or None."""
        return None if self.ceil is None else self.ceil * 8 / 1000

    @property
    def burst(self) -> float | None:
        """Bucket in bytes from its time, as ``tc`` prints ``burst`` (``tc_calc_xmitsize``:
        the time truncated to whole microseconds first)."""
        if self.rate is None or self.buffer is None:
            return None
        return self.rate * int(self.buffer / TICK_IN_USEC) / 1e6

    @property
    def cburst(self) -> float | None:
        """HTB's ceil bucket in bytes, computed as :attr:`burst` is."""
        if self.ceil is None or self.cbuffer is None:
            return None
        return self.ceil * int(self.cbuffer / TICK_IN_USEC) / 1e6


# PARMS with the rate specs' fields flat: rate is field 5, ceil/peakrate field 11
_HTB_OPT_FLAT = struct.Struct("=BBHhHI BBHhHI IIIII".replace(" ", ""))
_TBF_QOPT_FLAT = struct.Struct("=BBHhHI BBHhHI III".replace(" ", ""))
_BASIC = struct.Struct("=QI")
_QUEUE = struct.Struct("=5I")


_TOP = frozenset((TCA_KIND, TCA_OPTIONS, TCA_STATS2))
_TOP_NO_STATS = frozenset((TCA_KIND, TCA_OPTIONS))


def decode_tc(msg: NlMsg, stats: bool = True) -> TcObject:
    """A qdisc/class message (``RTM_NEW*``, sent or dumped) → :class:`TcObject` (without
    the counters unless ``stats``)."""
    payload = msg.payload
    _, _, _, ifindex, handle, parent, _ = _TCMSG.unpack_from(payload)
    attrs = parse_attrs(payload[_TCMSG.size :], _TOP if stats else _TOP_NO_STATS)
    kind = attrs.get(TCA_KIND, b"").split(b"\0", 1)[0].decode()
    obj = TcObject(msg.type, kind, ifindex, handle, parent)
    opts = parse_attrs(attrs[TCA_OPTIONS]) if TCA_OPTIONS in attrs else {}
    if kind == "htb" and TCA_HTB_PARMS in opts:
        p = opts[TCA_HTB_PARMS]
        f = _HTB_OPT_FLAT.unpack_from(p)
        obj.specs = p[:24]
        obj.buffer, obj.cbuffer, obj.quantum, obj.level, obj.prio = f[12:]
        r64, c64 = opts.get(TCA_HTB_RATE64), opts.get(TCA_HTB_CEIL64)
        obj.rate = _U64.unpack(r64)[0] if r64 else f[5]
        obj.ceil = _U64.unpack(c64)[0] if c64 else f[11]
        if TCA_HTB_RTAB in opts or TCA_HTB_CTAB in opts:
            obj.tables = tuple(t for t in (TCA_HTB_RTAB, TCA_HTB_CTAB) if t in opts)
    elif kind == "tbf" and TCA_TBF_PARMS in opts:
        p = opts[TCA_TBF_PARMS]
        f = _TBF_QOPT_FLAT.unpack_from(p)
        obj.specs = p[:24]
        obj.limit, obj.buffer = f[12], f[13]
        r64, burst = opts.get(TCA_TBF_RATE64), opts.get(TCA_TBF_BURST)
        obj.rate = _U64.unpack(r64)[0] if r64 else f[5]
        if burst:
            obj.burst_bytes = _U32.unpack(burst)[0]
        if TCA_TBF_RTAB in opts:
            obj.tables = (TCA_TBF_RTAB,)
    counters = attrs.get(TCA_STATS2)
    if counters:
        st = parse_attrs(counters)
        if TCA_STATS_BASIC in st:
            obj.sent_bytes, obj.sent_packets = _BASIC.unpack_from(st[TCA_STATS_BASIC])
        if TCA_STATS_QUEUE in st:  # qlen, backlog, drops, requeues, overlimits
            _, _, obj.drops, _, obj.overlimits = _QUEUE.unpack_from(st[TCA_STATS_QUEUE])
    return obj


def decode_ack(msg: NlMsg) -> tuple[int, str]:
    """An ``NLMSG_ERROR`` → (errno, kernel's extended-ack message or ""); errno 0 is an ack."""
    err = -_I32.unpack_from(msg.payload)[0]
    text = ""
    if msg.flags & NLM_F_ACK_TLVS:
        orig_len = _NLMSGHDR.unpack_from(msg.payload, 4)[0]
        off = 4 + (16 if msg.flags & NLM_F_CAPPED else (orig_len + 3) & ~3)
        tlvs = parse_attrs(msg.payload[off:])
        if NLMSGERR_ATTR_MSG in tlvs:
            text = tlvs[NLMSGERR_ATTR_MSG].split(b"\0", 1)[0].decode(errors="replace")
    return err, text


# -- network namespaces -----------------------------------------------------------------------
_CLONE_NEWNET = 0x40000000
_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace ``name`` (``ip netns`` name; None: stay). Only
    this thread moves, and it moves back. Sockets made inside stay in that namespace."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


# -- the client -------------------------------------------------------------------------------
class TcNetlink:
    """A ``NETLINK_ROUTE`` socket for in-place tc changes and read-backs.

    Parameters
    ----------
    netns:
        ``ip netns`` name to work in (None: this process's namespace).
    tables:
        Also send rate tables (not needed by the kernel; see the module docstring).
    timeout_s:
        Longest wait for the kernel's answers.
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        tables: bool = False,
        timeout_s: float = 5.0,
        host: str | None = None,
    ):
        self.netns = netns
        self.tables = tables
        self.host = host or (f"netns:{netns}" if netns else "local")
        #: the kernel's warnings on accepted messages (the latest hundred)
        self.warnings: deque[str] = deque(maxlen=100)
        self._ifindex: dict[str, int] = {}
        self._lock = threading.Lock()  # one batch or dump at a time on the socket
        self._seq = 0
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
            # echoed objects arrive one buffer each (~4-8 KiB of receive memory apiece)
            for opt in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF_BYTES)
                    break
                except OSError:
                    pass
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                try:
                    self.sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass  # older kernels: plain acks, no kernel message
            self.sock.settimeout(timeout_s)
        except BaseException:
            self.sock.close()
            raise
        self._buf = bytearray(1 << 16)

    def close(self) -> None:
        """Close the netlink socket."""
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ifindex(self, dev: str) -> int:
        """The interface index of ``dev`` in this socket's namespace (cached; see
        :meth:`forget_interfaces`); TcNetlinkError (ENODEV) if there is no such interface."""
        idx = self._ifindex.get(dev)
        if idx is None:
            try:
                with in_netns(self.netns):
                    idx = socket.if_nametoindex(dev)
            except OSError:
                raise TcNetlinkError(
                    self.host, [(f"{dev}: no such interface", errno_mod.ENODEV, "")]
                ) from None
            self._ifindex[dev] = idx
        return idx

    def forget_interfaces(self) -> None:
        """Drop the cached interface indexes (an interface deleted and made again, like the
        ifb at a new set-up, has a new one)."""
        self._ifindex.clear()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    # -- changes
    def encode(
        self, changes: Sequence[Change], *, echo: bool = False
    ) -> tuple[bytes, dict[int, Change]]:
        """One buffer with every change, and seq → its change (to name it in errors).

        Only the last message asks for an ack: the kernel handles a buffer's messages in
        order and answers every refused one anyway, so the last ack means all are done.
        ``echo`` asks for each object's new state back (``NLM_F_ECHO``)."""
        parts, labels = [], {}
        last = len(changes) - 1
        flags = NLM_F_REQUEST | (NLM_F_ECHO if echo else 0)
        ifindex, tables = self._ifindex, self.tables
        for k, c in enumerate(changes):
            seq = self._next_seq()
            idx = ifindex.get(c.dev) or self.ifindex(c.dev)
            parts.append(
                encode_change(
                    c, idx, seq, tables=tables, flags=(flags | NLM_F_ACK) if k == last else flags
                )
            )
            labels[seq] = c
        return b"".join(parts), labels

    def change(self, changes: Sequence[Change], *, echo: bool = False) -> list[TcObject]:
        """Apply ``changes`` in one send and read the kernel's answers. The kernel keeps going
        past a refused message; every refusal is raised together (:class:`TcNetlinkError`)
        once the last message is acknowledged. With ``echo``, returns each changed object as
        the kernel reports it right after its change (the read-back, in ``changes`` order)."""
        if not changes:
            return []
        with self._lock:
            return self._send_batch(*self.encode(changes, echo=echo))

    def send_batch(self, batch: bytes, labels: dict[int, Change]) -> list[TcObject]:
        """Send an :meth:`encode`'d buffer; wait for the ack of its last message."""
        with self._lock:
            return self._send_batch(batch, labels)

    def _send_batch(self, batch: bytes, labels: dict[int, Change]) -> list[TcObject]:
        try:
            self.sock.send(batch)
        except OSError as exc:
            raise TcNetlinkError(self.host, [("send", exc.errno or 0, str(exc))]) from None
        last = next(reversed(labels))
        failures: list[tuple[str, int, str]] = []
        echoed: dict[int, TcObject] = {}
        done = False
        while not done:
            for msg in self._recv():
                if msg.seq not in labels:
                    continue
                if msg.type == NLMSG_ERROR:
                    err, text = decode_ack(msg)
                    if err:
                        failures.append((labels[msg.seq].describe(), err, text))
                    elif text:
                        self.warnings.append(f"{labels[msg.seq].describe()} -> {text}")
                    done = done or msg.seq == last
                elif msg.type in (RTM_NEWTCLASS, RTM_NEWQDISC):
                    echoed[msg.seq] = decode_tc(msg)
        if failures:
            raise TcNetlinkError(self.host, failures)
        return [echoed[s] for s in labels if s in echoed]

    def _recv(self) -> list[NlMsg]:
        try:
            n = self.sock.recv_into(self._buf)
        except TimeoutError:
            raise TcNetlinkError(
                self.host, [("waiting for the kernel's answer", errno_mod.ETIMEDOUT, "")]
            ) from None
        except OSError as exc:  # ENOBUFS: answers were dropped, the batch's outcome is unknown
            raise TcNetlinkError(
                self.host,
                [("reading the kernel's answers", exc.errno or 0, "receive buffer overrun")],
            ) from None
        return list(split_messages(bytes(self._buf[:n])))

    # -- read-back
    def dump(
        self,
        msg_type: int,
        dev: str | None,
        *,
        stats: bool = True,
        ifindexes: Collection[int] | None = None,
        where: Callable[[int, int], bool] | None = None,
    ) -> list[TcObject]:
        """Every qdisc (``RTM_GETQDISC``) or class (``RTM_GETTCLASS``) of ``dev``; qdiscs of
        every interface when ``dev`` is None (or of those in ``ifindexes``; classes are dumped
        one interface at a time). Counters are read when ``stats``; ``where(handle, parent)``
        picks the objects to decode."""
        idx = 0 if dev is None else self.ifindex(dev)
        with self._lock:
            return self._dump(msg_type, dev, idx, stats, {idx} if idx else ifindexes, where)

    def _dump(
        self,
        msg_type: int,
        dev: str | None,
        idx: int,
        stats: bool,
        keep: Collection[int] | None,
        where: Callable[[int, int], bool] | None,
    ) -> list[TcObject]:
        seq = self._next_seq()
        self.sock.send(encode_dump(msg_type, idx, seq))
        out: list[TcObject] = []
        unpack = _TCMSG.unpack_from
        while True:
            for msg in self._recv():
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_DONE:
                    return out
                if msg.type == NLMSG_ERROR:
                    err, text = decode_ack(msg)
                    if not err:
                        continue
                    what = "qdiscs" if msg_type == RTM_GETQDISC else "classes"
                    raise TcNetlinkError(self.host, [(f"{dev or 'all'} dump {what}", err, text)])
                # qdisc dumps cover every interface: skip what is not asked before decoding
                _, _, _, ifindex, handle, parent, _ = unpack(msg.payload)
                if (keep is None or ifindex in keep) and (where is None or where(handle, parent)):
                    out.append(decode_tc(msg, stats))

    def qdiscs(
        self, dev: str, *, stats: bool = True, where: Callable[[int, int], bool] | None = None
    ) -> list[TcObject]:
        """The qdiscs of ``dev`` (``where(handle, parent)`` filters; counters if ``stats``)."""
        return self.dump(RTM_GETQDISC, dev, stats=stats, where=where)

    def classes(
        self, dev: str, *, stats: bool = True, where: Callable[[int, int], bool] | None = None
    ) -> list[TcObject]:
        """The classes of ``dev`` (``where(handle, parent)`` filters; counters if ``stats``)."""
        return self.dump(RTM_GETTCLASS, dev, stats=stats, where=where)

    def qdiscs_of(
        self,
        devs: Sequence[str],
        *,
        stats: bool = True,
        where: Callable[[int, int], bool] | None = None,
    ) -> dict[str, list[TcObject]]:
        """The qdiscs of several interfaces from one dump."""
        by_index = {self.ifindex(d): d for d in devs}
        out: dict[str, list[TcObject]] = {d: [] for d in devs}
        for q in self.dump(RTM_GETQDISC, None, stats=stats, ifindexes=by_index, where=where):
            out[by_index[q.ifindex]].append(q)
        return out
