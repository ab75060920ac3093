"""tc's words for the BS's shaping, as data: pure builders (argv lists) and parsers.

The builders return the ``tc``/``ip``/``ethtool`` command lines that shape both directions of
every link (an HTB tree per direction, a leaf per device class, the ingress redirect to the ifb;
see :mod:`testbed.net.shaper` for the design), change one link's rate in place, or clear it all;
the parsers read tc's, ip's and ethtool's answers back (classes, leaves, offloads, our record on
the ifb's alias). Nothing here runs a process: :class:`~testbed.net.shaper.TcShaper` applies
them through a runner.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..units import format_rate

#: rate given to classes that are not limited (and to the cell when no cell rate is set)
UNLIMITED_KBIT = 10_000_000.0
#: burst budget in time: small, so short transfers see the configured rate
BURST_MS = 2.0
MIN_BURST_BYTES = 3200
QUANTUM_BYTES = 3028
LEAF_LIMIT_PKTS = 1000
ROOT_CLASS = 1
DEFAULT_MINOR = 0xFFFF
DIRECTIONS = ("down", "up")
NETEM_HANDLE_OFFSET = 0x4000
#: ``bs.shaping``: what charges each packet under the HTB class (see the module docstring)
SHAPING_MODES = ("auto", "tbf", "netem", "htb")
#: Ethernet header: what tc counts on top of the IP packet (the MTU)
ETH_HLEN = 14
#: TBF bucket slack on top of one frame, in microseconds of the rate (see tbf_burst_bytes)
TBF_SLACK_US = 50
DEFAULT_MTU = 1500
#: the ifb's alias starts so when it carries our record
RECORD_TAG = "moe-edge-testbed"
#: offloads that make super-packets, as ``ethtool -k`` names them -> the name ``ethtool -K``
#: takes
OFFLOADS = {
    "tcp-segmentation-offload": "tso",
    "generic-segmentation-offload": "gso",
    "generic-receive-offload": "gro",
    "large-receive-offload": "lro",
    "udp-fragmentation-offload": "ufo",
    "tx-udp-segmentation": "tx-udp-segmentation",
    "rx-gro-hw": "rx-gro-hw",
    "rx-gro-list": "rx-gro-list",
    "rx-udp-gro-forwarding": "rx-udp-gro-forwarding",
}


@dataclass(frozen=True)
class LinkSpec:
    """One direction of one link."""

    rate_kbit: float
    delay_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def needs_netem(self) -> bool:
        """Whether delay or loss is asked for (only a netem leaf does those)."""
        return self.delay_ms > 0 or self.loss_pct > 0


def class_minor(index: int) -> int:
    """HTB class minor (hex in tc syntax) of the device at ``index`` in the inventory."""
    if not 0 <= index < 0xF000:
        raise ValueError(f"device index out of range: {index}")
    return 0x100 + index


def burst_bytes(rate_kbit: float) -> int:
    """Bucket size: :data:`BURST_MS` worth of the rate, at least two full frames."""
    return max(MIN_BURST_BYTES, int(rate_kbit * 1000 / 8 * BURST_MS / 1000))


def htb_params(rate_kbit: float, share_kbit: float | None = None) -> list[str]:
    """HTB class options: ``ceil`` is the link's rate; ``rate`` (what the class may send
    whatever its parent has left) is the same, or ``share_kbit`` where lower."""
    g = rate_kbit if share_kbit is None else min(rate_kbit, share_kbit)
    return [
        "htb",
        "rate",
        format_rate(g),
        "ceil",
        format_rate(rate_kbit),
        "burst",
        str(burst_bytes(g)),
        "cburst",
        str(burst_bytes(rate_kbit)),
        "quantum",
        str(QUANTUM_BYTES),
    ]


def cell_share_kbit(cell_rate_kbit: float | None, devices: int) -> float | None:
    """A device class's assured rate under a cell rate: an equal share of the cell (None
    without one). HTB never holds back a class below its own ``rate``, so the cell class caps
    the sum only when the device classes' rates add up to the cell at most; above its share a
    device borrows from the cell, up to its own link rate (``ceil``)."""
    return cell_rate_kbit / devices if cell_rate_kbit and devices else None


def class_ceil_kbit(mode: str, rate_kbit: float, cell_rate_kbit: float | None) -> float:
    """The ceiling of a device's HTB class: its link rate in htb mode, where the class is the
    shaper; where a leaf charges the rate (tbf, netem), the cell's rate (or unlimited), so
    that the class only classifies and shares the cell and a rate change touches the leaf
    alone. A class that carried the link's rate would, after a cut to a few kbit/s, stay in
    debt for seconds once the rate is back (HTB charges each frame it let through at the
    cut rate and ``tc class change`` keeps the debt: measured -5.8 to -6.0 s of tokens after
    a 2 s cut to 2 kbit/s), while a TBF leaf's bucket refills when it is changed."""
    if mode == "htb":
        return rate_kbit
    return cell_rate_kbit or UNLIMITED_KBIT


def leaf_bucket_bytes(mtu: int) -> int:
    """The TBF bucket's fixed part: one full frame on an interface of this MTU (the IP packet
    plus the Ethernet header), so no packet is too big for it."""
    return int(mtu) + ETH_HLEN


def tbf_burst_bytes(bucket_bytes: int, rate_kbit: float) -> int:
    """TBF ``burst``: the one-frame bucket plus :data:`TBF_SLACK_US` of the rate. TBF sends a
    packet only once the bucket holds all of it and never holds more than ``burst``, so with
    exactly one frame every microsecond its timer fires late is lost to the link (measured
    here: 88% of 50 Mbit/s instead of 95% on a loaded 2-core host); the slack absorbs that
    lateness and costs a lone message only the slack's worth of airtime (13 bytes at 2 Mbit/s,
    313 at 50 Mbit/s)."""
    return int(bucket_bytes) + math.ceil(rate_kbit * TBF_SLACK_US / 8000)


def tbf_limit_bytes(bucket_bytes: int) -> int:
    """TBF queue in bytes: as many full frames as the pfifo leaf holds packets."""
    return LEAF_LIMIT_PKTS * int(bucket_bytes)


DEFAULT_BUCKET_BYTES = leaf_bucket_bytes(DEFAULT_MTU)


def leaf_kind(mode: str, spec: LinkSpec) -> str:
    """The leaf a link gets in ``mode``: ``netem`` (always in netem mode; with delay/loss in
    the others), ``tbf`` (tbf mode) or ``pfifo`` (htb mode)."""
    if mode not in SHAPING_MODES or mode == "auto":
        raise ValueError(f"not a resolved shaping mode: {mode!r}")
    if mode == "netem" or spec.needs_netem:
        return "netem"
    return "tbf" if mode == "tbf" else "pfifo"


def leaf_handle(minor: int, kind: str) -> int:
    """netem leaves get ``M+0x4000:``, the others ``M:``: switching between them grafts a new
    qdisc, while ``replace``/``change`` on the same handle only changes options."""
    return minor + NETEM_HANDLE_OFFSET if kind == "netem" else minor


def leaf_options(
    kind: str, spec: LinkSpec, bucket_bytes: int = DEFAULT_BUCKET_BYTES, netem_rate: bool = False
) -> list[str]:
    """tc's words for a leaf of ``kind``; a netem leaf carries the rate if ``netem_rate``."""
    if kind == "pfifo":
        return ["pfifo", "limit", str(LEAF_LIMIT_PKTS)]
    if kind == "tbf":
        return [
            "tbf",
            "rate",
            format_rate(spec.rate_kbit),
            "burst",
            str(tbf_burst_bytes(bucket_bytes, round(spec.rate_kbit))),
            "limit",
            str(tbf_limit_bytes(bucket_bytes)),
        ]
    if kind != "netem":
        raise ValueError(f"unknown leaf kind {kind!r}")
    argv = ["netem", "limit", str(LEAF_LIMIT_PKTS)]
    if netem_rate:
        argv += ["rate", format_rate(spec.rate_kbit)]
    if spec.delay_ms > 0:
        argv += ["delay", f"{spec.delay_ms:g}ms"]
    if spec.loss_pct > 0:
        argv += ["loss", f"{spec.loss_pct:g}%"]
    return argv


def leaf_command(
    op: str,
    dev: str,
    minor: int,
    kind: str,
    spec: LinkSpec,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    netem_rate: bool = False,
) -> list[str]:
    """``tc qdisc OP`` (``replace``: create or graft; ``change``: in place) of one leaf."""
    if op not in ("replace", "change"):
        raise ValueError(f"op must be replace or change, not {op!r}")
    return [
        "tc",
        "qdisc",
        op,
        "dev",
        dev,
        "parent",
        f"1:{minor:x}",
        "handle",
        f"{leaf_handle(minor, kind):x}:",
        *leaf_options(kind, spec, bucket_bytes, netem_rate),
    ]


def leaf_qdisc_command(
    dev: str,
    minor: int,
    spec: LinkSpec,
    mode: str = "htb",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> list[str]:
    """The leaf under a device class in ``mode`` (``tc qdisc replace``): in htb mode netem for
    delay/loss, else a plain pfifo; in tbf mode a one-frame TBF, or netem with the rate for
    delay/loss; in netem mode always netem with the rate."""
    return leaf_command(
        "replace", dev, minor, leaf_kind(mode, spec), spec, bucket_bytes, netem_rate=mode != "htb"
    )


def build_leaf_change_command(
    dev: str, index: int, spec: LinkSpec, mode: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[str] | None:
    """In-place ``tc qdisc change`` of one device's leaf to ``spec``'s rate (and delay/loss),
    or None where the leaf carries no rate (htb mode: the class alone sets it)."""
    kind = leaf_kind(mode, spec)
    if kind == "pfifo" or (kind == "netem" and mode == "htb"):
        return None
    return leaf_command("change", dev, class_minor(index), kind, spec, bucket_bytes, True)


def root_qdisc_command(dev: str) -> list[str]:
    """The root HTB qdisc ``1:`` on ``dev``; unclassified traffic goes to :data:`DEFAULT_MINOR`."""
    return [
        *("tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb"),
        *("default", f"{DEFAULT_MINOR:x}", "direct_qlen", str(LEAF_LIMIT_PKTS)),
    ]


def cell_class_command(dev: str, cell_kbit: float) -> list[str]:
    """The cell's class ``1:1`` under the root: the total bandwidth the devices share."""
    return [
        *("tc", "class", "replace", "dev", dev, "parent", "1:", "classid", f"1:{ROOT_CLASS:x}"),
        *htb_params(cell_kbit),
    ]


def device_class_command(
    dev: str, minor: int, ceil_kbit: float, share_kbit: float | None
) -> list[str]:
    """One device's class ``1:minor`` under the cell (:func:`htb_params`)."""
    return [
        *("tc", "class", "replace", "dev", dev, "parent", f"1:{ROOT_CLASS:x}"),
        *("classid", f"1:{minor:x}", *htb_params(ceil_kbit, share_kbit)),
    ]


def device_filter_command(dev: str, match: str, addr: str, minor: int) -> list[str]:
    """The u32 filter that sends ``addr``'s packets (``match``: ``dst`` or ``src``) to its
    class."""
    return [
        *("tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1"),
        *("u32", "match", "ip", match, f"{addr}/32", "flowid", f"1:{minor:x}"),
    ]


def build_tree_commands(
    dev: str,
    addrs: Sequence[str],
    specs: Sequence[LinkSpec],
    match: str,
    cell_rate_kbit: float | None,
    mode: str = "htb",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> list[list[str]]:
    """HTB tree on ``dev``: root qdisc, cell class, a class + leaf + u32 filter per device.

    ``match`` is ``dst`` (downlink, on the BS interface) or ``src`` (uplink, on the ifb);
    ``mode`` picks the leaves (:func:`leaf_qdisc_command`).
    """
    if match not in ("dst", "src"):
        raise ValueError(f"match must be 'dst' or 'src', not {match!r}")
    if len(addrs) != len(specs):
        raise ValueError("one spec per address")
    share = cell_share_kbit(cell_rate_kbit, len(addrs))
    cmds = [root_qdisc_command(dev), cell_class_command(dev, cell_rate_kbit or UNLIMITED_KBIT)]
    for i, (addr, spec) in enumerate(zip(addrs, specs)):
        minor = class_minor(i)
        ceil = class_ceil_kbit(mode, spec.rate_kbit, cell_rate_kbit)
        cmds.append(device_class_command(dev, minor, ceil, share))
        cmds.append(leaf_qdisc_command(dev, minor, spec, mode, bucket_bytes))
        cmds.append(device_filter_command(dev, match, addr, minor))
    return cmds


def build_ifb_commands(ifb: str) -> list[list[str]]:
    """Create the ifb device (first of the set-up: the netem probe runs on it)."""
    return [["ip", "link", "add", ifb, "type", "ifb"], ["ip", "link", "set", ifb, "up"]]


def build_shaping_commands(
    iface: str,
    ifb: str,
    addrs: Sequence[str],
    down: Sequence[LinkSpec],
    up: Sequence[LinkSpec],
    cell_rate_kbit: float | None = None,
    mode: str = "htb",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> list[list[str]]:
    """Both trees and the ingress redirect (the ifb exists already)."""
    return [
        *build_tree_commands(iface, addrs, down, "dst", cell_rate_kbit, mode, bucket_bytes),
        *build_tree_commands(ifb, addrs, up, "src", cell_rate_kbit, mode, bucket_bytes),
        ["tc", "qdisc", "add", "dev", iface, "handle", "ffff:", "ingress"],
        [
            "tc",
            "filter",
            "add",
            "dev",
            iface,
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
            ifb,
        ],
    ]


def build_setup_commands(
    iface: str,
    ifb: str,
    addrs: Sequence[str],
    down: Sequence[LinkSpec],
    up: Sequence[LinkSpec],
    cell_rate_kbit: float | None = None,
    mode: str = "htb",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> list[list[str]]:
    """Everything that shapes both directions from scratch (run after
    :func:`build_clear_commands`)."""
    return [
        *build_ifb_commands(ifb),
        *build_shaping_commands(iface, ifb, addrs, down, up, cell_rate_kbit, mode, bucket_bytes),
    ]


def build_netem_probe_commands(ifb: str) -> tuple[list[str], list[str]]:
    """(add, delete) of a scratch netem with a rate at the root of our own ifb: the kernel
    answers "Specified qdisc kind is unknown." where it lacks netem."""
    return (
        ["tc", "qdisc", "add", "dev", ifb, "root", "handle", "1:", "netem", "rate", "1000kbit"],
        ["tc", "qdisc", "del", "dev", ifb, "root"],
    )


def resolve_mode(setting: str, netem_available: bool | None) -> str:
    """The mode a setting gives on a kernel with or without netem (``auto``: netem, else
    tbf). A forced ``netem`` without netem is the caller's error to raise."""
    if setting not in SHAPING_MODES:
        raise ValueError(f"shaping must be one of {', '.join(SHAPING_MODES)}, not {setting!r}")
    if setting == "auto":
        return "netem" if netem_available else "tbf"
    return setting


def build_clear_commands(iface: str, ifb: str) -> list[list[str]]:
    """Remove our shaping; each may fail harmlessly when the thing is already gone."""
    return [
        ["tc", "qdisc", "del", "dev", iface, "root"],
        ["tc", "qdisc", "del", "dev", iface, "ingress"],
        ["ip", "link", "del", ifb],
    ]


def build_class_change_command(
    dev: str, index: int, spec: LinkSpec, share_kbit: float | None = None
) -> list[str]:
    """In-place ``tc class change`` of one device's class on ``dev`` (rate, ceil, burst);
    ``share_kbit``: its share of the cell (:func:`cell_share_kbit`)."""
    return [
        "tc",
        "class",
        "change",
        "dev",
        dev,
        "parent",
        f"1:{ROOT_CLASS:x}",
        "classid",
        f"1:{class_minor(index):x}",
        *htb_params(spec.rate_kbit, share_kbit),
    ]


# -- parsing --------------------------------------------------------------------------
_TC_RATE = {"bit": 1e-3, "kbit": 1.0, "mbit": 1e3, "gbit": 1e6, "tbit": 1e9}


def parse_tc_rate_kbit(text: str) -> float:
    """tc's printed rates ("8Mbit", "500Kbit", "10Gbit", "999bit") → kbit/s."""
    m = re.fullmatch(r"([\d.]+)([KMGT]?bit)", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a tc rate: {text!r}")
    return float(m.group(1)) * _TC_RATE[m.group(2).lower()]


@dataclass
class TcClass:
    """One HTB class as ``tc -s class show`` prints it; rates in kbit/s, ``burst`` as printed."""

    classid: str
    parent: str | None
    leaf: str | None
    rate_kbit: float
    ceil_kbit: float
    burst: str
    sent_bytes: int = 0
    sent_packets: int = 0
    dropped: int = 0


_CLASS_RE = re.compile(
    r"^class htb (?P<id>\S+) (?:root|parent (?P<parent>\S+))(?: leaf (?P<leaf>\S+))?"
    r".*? rate (?P<rate>\S+) ceil (?P<ceil>\S+) burst (?P<burst>\S+)"
)
_SENT_RE = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+)")


def parse_htb_classes(text: str) -> list[TcClass]:
    """Parse ``tc -s class show dev X`` (this iproute2 has no JSON for HTB classes)."""
    out: list[TcClass] = []
    for line in text.splitlines():
        m = _CLASS_RE.match(line.strip())
        if m:
            out.append(
                TcClass(
                    m["id"],
                    m["parent"],
                    m["leaf"],
                    parse_tc_rate_kbit(m["rate"]),
                    parse_tc_rate_kbit(m["ceil"]),
                    m["burst"],
                )
            )
            continue
        s = _SENT_RE.search(line)
        if s and out:
            out[-1].sent_bytes, out[-1].sent_packets, out[-1].dropped = map(int, s.groups())
    return out


@dataclass(frozen=True)
class Leaf:
    """One device class's leaf as ``tc -j qdisc show`` reports it."""

    kind: str
    handle: str
    rate_kbit: float | None = None  # tbf, or netem with a rate: what the leaf charges
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    burst_bytes: int | None = None  # tbf's bucket as tc prints it back (may read 1 less)

    def spec(self, rate_kbit: float) -> LinkSpec:
        """This leaf's delay/loss at another rate."""
        return LinkSpec(rate_kbit, self.delay_ms, self.loss_pct)


def _json_rate_kbit(value: Any) -> float | None:
    """tc -j prints rates as bytes per second."""
    return float(value) * 8 / 1000 if isinstance(value, (int, float)) and value else None


def parse_leaf(qd: Mapping[str, Any]) -> Leaf:
    """A leaf from one entry of ``tc -j qdisc show`` (tbf: ``rate`` in bytes/s, ``burst`` in
    bytes; netem: ``rate: {rate}``, ``delay: {delay}`` in seconds, ``loss-random: {loss}`` as a
    fraction — as iproute2 6.1 prints them)."""
    kind, opts = str(qd.get("kind", "")), qd.get("options") or {}
    if kind == "tbf":
        burst = opts.get("burst")
        return Leaf(
            kind,
            str(qd.get("handle", "")),
            _json_rate_kbit(opts.get("rate")),
            burst_bytes=int(burst) if isinstance(burst, (int, float)) else None,
        )
    if kind == "netem":
        rate = opts.get("rate")
        rate = rate.get("rate") if isinstance(rate, dict) else rate
        delay = opts.get("delay")
        delay = delay.get("delay") if isinstance(delay, dict) else delay
        loss = opts.get("loss-random")
        loss = loss.get("loss") if isinstance(loss, dict) else loss
        return Leaf(
            kind,
            str(qd.get("handle", "")),
            _json_rate_kbit(rate),
            round(float(delay) * 1e3, 6) if delay else 0.0,
            round(float(loss) * 100, 6) if loss else 0.0,
        )
    return Leaf(kind, str(qd.get("handle", "")))


def leaves_by_class(qdiscs: Sequence[Mapping[str, Any]]) -> dict[int, Leaf]:
    """class minor -> its leaf, from ``tc -j qdisc show`` of one interface."""
    out: dict[int, Leaf] = {}
    for qd in qdiscs:
        parent = str(qd.get("parent", ""))
        if parent.startswith("1:") and len(parent) > 2:
            out[int(parent.split(":", 1)[1], 16)] = parse_leaf(qd)
    return out


def infer_mode(leaves: Sequence[Leaf]) -> str:
    """The mode a tree was built in, from its leaves (for a tree without our record): any TBF
    leaf -> tbf; netem leaves with a rate -> netem; else htb."""
    if any(lf.kind == "tbf" for lf in leaves):
        return "tbf"
    if any(lf.kind == "netem" and lf.rate_kbit for lf in leaves):
        return "netem"
    return "htb"


def enforced_kbit(class_kbit: float, leaf: Leaf | None) -> float:
    """A link's rate: its leaf's where the leaf carries one (tbf, netem modes: the class's
    ceiling is then the cell's, a cap shared with the other devices), else its class's."""
    if leaf is not None and leaf.rate_kbit:
        return leaf.rate_kbit
    return class_kbit


@dataclass(frozen=True)
class Offload:
    """One offload's state from ``ethtool -k``: ``fixed`` ones cannot be changed."""

    on: bool
    fixed: bool = False


_ETHTOOL_K_RE = re.compile(r"^([a-z0-9_-]+): (on|off)(?: \[(fixed|requested on|requested off)\])?")


def parse_offloads(text: str) -> dict[str, Offload]:
    """``ethtool -k DEV`` -> the offloads of :data:`OFFLOADS` it lists, by ``ethtool -K``
    name (only top-level lines: the group lines ``tcp-segmentation-offload`` & co)."""
    out: dict[str, Offload] = {}
    for line in text.splitlines():
        m = _ETHTOOL_K_RE.match(line)
        if m and m.group(1) in OFFLOADS:
            out[OFFLOADS[m.group(1)]] = Offload(m.group(2) == "on", m.group(3) == "fixed")
    return out


def offloads_to_disable(state: Mapping[str, Offload]) -> list[str]:
    """The offloads that are on and can be changed."""
    return [n for n, o in state.items() if o.on and not o.fixed]


def offloads_on(state: Mapping[str, Offload]) -> list[str]:
    """The offloads still on, ``NAME (fixed)`` where the driver does not let them change."""
    return [f"{n} (fixed)" if o.fixed else n for n, o in state.items() if o.on]


def build_offload_command(dev: str, names: Sequence[str], on: bool) -> list[str]:
    """One ``ethtool -K`` setting every named offload on or off."""
    argv = ["ethtool", "-K", dev]
    for n in names:
        argv += [n, "on" if on else "off"]
    return argv


def render_record(fields: Mapping[str, object]) -> str:
    """Our record for the ifb's alias: ``moe-edge-testbed k=v ...`` (values without spaces)."""
    parts = []
    for k, v in fields.items():
        text = "-" if v is None or v == "" else str(v)
        if not re.fullmatch(r"[A-Za-z0-9_.,:@/+-]+", text) or not re.fullmatch(r"[a-z_]+", k):
            raise ValueError(f"record field {k}={text!r} must be one word")
        parts.append(f"{k}={text}")
    return " ".join([RECORD_TAG, *parts])


def parse_record(alias: str | None) -> dict[str, str] | None:
    """The fields of our record, or None where the alias is not ours."""
    if not alias:
        return None
    words = alias.split()
    if not words or words[0] != RECORD_TAG:
        return None
    return dict(w.split("=", 1) for w in words[1:] if "=" in w)


def parse_link_show(text: str) -> tuple[int | None, str | None]:
    """(mtu, alias) from ``ip link show dev DEV``."""
    mtu = re.search(r" mtu (\d+)", text)
    alias = re.search(r"(?m)^\s+alias (.*)$", text)
    return (int(mtu.group(1)) if mtu else None, alias.group(1).strip() if alias else None)


def split_batch_listing(text: str) -> list[tuple[str, list[dict]]]:
    """``tc -j -batch`` output of ``class show`` (text: this iproute2 has no JSON for HTB
    classes) and ``qdisc show`` (one JSON line) of each interface in turn -> per interface
    (class text, qdiscs)."""
    out: list[tuple[str, list[dict]]] = []
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("["):
            out.append(("\n".join(lines), json.loads(line)))
            lines = []
        else:
            lines.append(line)
    return out


@dataclass
class LinkState:
    """What tc says is enforced for one device, per direction (None: not shaped)."""

    device: str
    address: str
    down_kbit: float | None = None
    up_kbit: float | None = None
    down_leaf: str | None = None
    up_leaf: str | None = None
    down_sent_bytes: int = 0
    up_sent_bytes: int = 0
    handles: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON (every field)."""
        return asdict(self)


def netem_error(stderr: str) -> bool:
    """Whether tc's ``stderr`` says the kernel has no netem."""
    return "qdisc kind is unknown" in stderr or "Unknown qdisc" in stderr


@dataclass(frozen=True)
class ShapingConfig:
    """How the installed tree shapes: mode, TBF bucket, netem probe, offloads to restore."""

    mode: str
    bucket_bytes: int
    netem: bool | None = None  # the kernel has netem (None: not probed)
    restore: tuple[str, ...] = ()  # offloads of the BS interface to turn on again at clear
    recorded: bool = True  # False: inferred from the leaves (no record on the ifb)


_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024 * 1024, "gb": 1024**3}


def parse_tc_size(text: str) -> int:
    """tc's printed sizes ("3200b", "12Kb", "2Mb") -> bytes."""
    m = re.fullmatch(r"([\d.]+)([KMG]?b)", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a tc size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def netem_message(host: str, stderr: str) -> str:
    """The error for a change that needs netem on a kernel without it (nothing changed)."""
    kernel = stderr.strip().splitlines()[-1] if stderr.strip() else "netem unavailable"
    return (
        f"{host}: delay/loss need the netem qdisc and this kernel refused it: "
        f'"{kernel}" — nothing was changed (rate shaping works without netem)'
    )


def describe_leaf(qd: dict) -> str:
    """One line for a leaf of ``tc -j qdisc show`` (``links show``): kind and options."""
    opts = qd.get("options", {})
    if qd.get("kind") == "netem":
        # tc -j prints {"delay": {"delay": SECONDS, ...}, "loss-random": {"loss": FRACTION, ...}}
        parts = ["netem"]
        delay = (opts.get("delay") or {}).get("delay")
        if delay:
            parts.append(f"delay {delay * 1e3:g}ms")
        loss = (opts.get("loss-random") or {}).get("loss")
        if loss:
            parts.append(f"loss {loss * 100:g}%")
        rate = parse_leaf(qd).rate_kbit
        if rate:
            parts.append(f"rate {format_rate(rate)}")
        return " ".join(parts)
    if qd.get("kind") == "tbf":
        lf = parse_leaf(qd)
        return f"tbf rate {format_rate(lf.rate_kbit or 0)} burst {lf.burst_bytes}b"
    return f"{qd.get('kind')} limit {opts.get('limit', '?')}"


def render_shaping_record(cfg: ShapingConfig, iface: str) -> str:
    """Our record of ``cfg`` for the ifb's alias (:func:`render_record`)."""
    return render_record(
        {
            "shaping": cfg.mode,
            "bucket": cfg.bucket_bytes,
            "slack_us": TBF_SLACK_US,
            "netem": {True: "yes", False: "no"}.get(cfg.netem, "-"),
            "iface": iface,
            "restore": ",".join(cfg.restore) or "-",
        }
    )


def shaping_config_of(alias: str | None, iface: str) -> ShapingConfig | None:
    """The config our record in the ifb's ``alias`` holds (offloads to restore only where it
    was made for ``iface``); None without one, or with one we cannot read."""
    rec = parse_record(alias)
    if rec is None:
        return None
    try:
        restore = tuple(x for x in rec.get("restore", "-").split(",") if x and x != "-")
        return ShapingConfig(
            resolve_mode(rec["shaping"], None),
            int(rec["bucket"]),
            {"yes": True, "no": False}.get(rec.get("netem", "-")),
            restore if rec.get("iface") == iface else (),
        )
    except (KeyError, ValueError):
        return None
