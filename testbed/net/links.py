"""Link shaping on the base station with Linux ``tc`` — both directions, per device.

All shaping happens on the BS host, so devices need no tc support at all:

* **downlink** (BS → device): an HTB qdisc on the BS interface's egress; one class per
  device under a parent class (the cell's total bandwidth), selected by a u32 filter on the
  device's destination address, and under each class a leaf that charges every packet.
* **uplink** (device → BS): the BS interface's ingress is redirected (``mirred``) to an
  ifb device that carries the same HTB tree, with u32 filters on the source address.

The leaf depends on the shaping mode (``bs.shaping`` in the inventory, default ``auto``):

* ``netem``: a netem leaf with ``rate`` (plus delay/loss when asked): every packet, the
  first of a burst included, waits for its own transmission time;
* ``tbf``: a TBF leaf whose bucket holds one frame (MTU + 14 bytes) plus
  :data:`TBF_SLACK_US` of the rate (for timer lateness): every packet but the first of a
  burst after an idle spell waits for its transmission time; delay/loss make the leaf a
  netem with ``rate`` (where the kernel has netem);
* ``htb``: the HTB class alone (pfifo leaf; netem without rate for delay/loss) — its bucket
  (:data:`BURST_MS` of the rate, at least :data:`MIN_BURST_BYTES`) lets short messages
  through almost free;
* ``auto``: ``netem`` where the kernel has it (probed on the ifb), else ``tbf``.

Where a leaf carries the rate, the HTB class only classifies and shares the cell
(:func:`class_ceil_kbit`); in htb mode it is the shaper. Segmentation
and receive offloads (GSO/TSO/GRO, ...) hand a qdisc super-packets of up to 64 KiB; they are
turned off on the BS interface and the ifb while shaping is installed, and the BS interface's
previous state is put back by :meth:`TcShaper.clear`. The mode, the bucket and the offloads
turned off are recorded in the ifb's alias (``ip link set ifb alias``), so any later process
(``links set``, ``links clear``, a run) reads them back from the kernel.

Changing a rate is in place: ``tc qdisc change`` of a rate-carrying leaf, or ``tc class
change`` of the class in htb mode (no qdisc re-created, no loss burst, counters keep running). A decision
epoch's changes (:meth:`TcShaper.set_rates`) go straight to the kernel over rtnetlink
(:mod:`testbed.net.netlink`) where the BS is this machine and we are root; elsewhere (a lab BS
over SSH), and for netem leaves, through one ``tc -batch`` process.

The command builders here are pure (they return argv lists); :class:`TcShaper` applies them
through a :class:`~testbed.lab.runner.Runner`, so the same code shapes the local testbed and a
lab's BS over SSH (with sudo).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CommandFailed, ConfigError, Unsupported
from ..lab.runner import LocalRunner, Runner
from ..units import format_rate
from . import netlink

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
        return self.delay_ms > 0 or self.loss_pct > 0


def class_minor(index: int) -> int:
    """HTB class minor (hex in tc syntax) of the device at ``index`` in the inventory."""
    if not 0 <= index < 0xF000:
        raise ValueError(f"device index out of range: {index}")
    return 0x100 + index


def burst_bytes(rate_kbit: float) -> int:
    """Bucket size: :data:`BURST_MS` worth of the rate, at least two full frames."""
    return max(MIN_BURST_BYTES, int(rate_kbit * 1000 / 8 * BURST_MS / 1000))


def _htb_params(rate_kbit: float, share_kbit: float | None = None) -> list[str]:
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
    cell = cell_rate_kbit or UNLIMITED_KBIT
    share = cell_share_kbit(cell_rate_kbit, len(addrs))
    cmds = [
        [
            "tc",
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "handle",
            "1:",
            "htb",
            "default",
            f"{DEFAULT_MINOR:x}",
            "direct_qlen",
            str(LEAF_LIMIT_PKTS),
        ],
        [
            "tc",
            "class",
            "replace",
            "dev",
            dev,
            "parent",
            "1:",
            "classid",
            f"1:{ROOT_CLASS:x}",
            *_htb_params(cell),
        ],
    ]
    for i, (addr, spec) in enumerate(zip(addrs, specs)):
        minor = class_minor(i)
        cmds.append(
            [
                "tc",
                "class",
                "replace",
                "dev",
                dev,
                "parent",
                f"1:{ROOT_CLASS:x}",
                "classid",
                f"1:{minor:x}",
                *_htb_params(class_ceil_kbit(mode, spec.rate_kbit, cell_rate_kbit), share),
            ]
        )
        cmds.append(leaf_qdisc_command(dev, minor, spec, mode, bucket_bytes))
        cmds.append(
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
                f"{addr}/32",
                "flowid",
                f"1:{minor:x}",
            ]
        )
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
        *_htb_params(spec.rate_kbit, share_kbit),
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


def turn_offloads_off(runner: Runner, dev: str, sudo: bool = False) -> dict[str, Any]:
    """Turn off the offloads of :data:`OFFLOADS` that are on on ``dev`` (e.g. both ends of a
    local testbed's veth). Returns ``{"turned_off": [...], "still_on": [...]}``, or
    ``{"error": ...}`` where ethtool is missing or refuses."""

    def state() -> dict[str, Offload] | None:
        try:
            res = runner.run(["ethtool", "-k", dev], timeout_s=15, check=False, sudo=sudo)
        except CommandFailed:  # no ethtool at all
            return None
        return parse_offloads(res.stdout) if res.returncode == 0 else None

    before = state()
    if before is None:
        return {"error": f"ethtool -k {dev} failed (is ethtool installed?)"}
    names = offloads_to_disable(before)
    if names:
        runner.run(build_offload_command(dev, names, False), timeout_s=15, check=False, sudo=sudo)
    after = state() or {}
    return {
        "turned_off": [n for n in names if n in after and not after[n].on],
        "still_on": offloads_on(after),
    }


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
        return asdict(self)


def _netem_error(stderr: str) -> bool:
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


class TcShaper:
    """Applies shaping on the BS through a runner.

    Parameters
    ----------
    runner:
        Runs commands on the BS (``LocalRunner`` or ``SshRunner``).
    iface, ifb:
        BS interface toward the devices, and the ifb device for the uplink.
    addrs:
        Device addresses, in inventory order (class ``1:100+i`` is device ``i``).
    names:
        Device names (for messages and :meth:`show`).
    sudo:
        Prefix with ``sudo -n`` (a lab BS).
    shaping:
        One of :data:`SHAPING_MODES` (the inventory's ``bs.shaping``); used by
        :meth:`setup`. A tree already installed keeps the mode it was built in.
    """

    def __init__(
        self,
        runner: Runner,
        iface: str,
        ifb: str,
        addrs: Sequence[str],
        names: Sequence[str],
        cell_rate_kbit: float | None = None,
        sudo: bool = False,
        shaping: str = "auto",
    ):
        if shaping not in SHAPING_MODES:
            raise ConfigError(
                f"bs.shaping: must be one of {', '.join(SHAPING_MODES)}, not {shaping!r}"
            )
        self.runner = runner
        self.iface = iface
        self.ifb = ifb
        self.addrs = list(addrs)
        self.names = list(names)
        self.cell_rate_kbit = cell_rate_kbit
        self.sudo = sudo
        self.shaping = shaping
        self._cfg: ShapingConfig | None = None
        self._leaf_cache: dict[tuple[str, int], Leaf] | None = None
        #: set_rates over rtnetlink where it can (False, or TESTBED_TC_NETLINK=0: tc CLI)
        self.netlink = os.environ.get("TESTBED_TC_NETLINK", "1") != "0"
        self._nl: netlink.TcNetlink | None = None

    def _run(self, argv: list[str], check: bool = True):
        return self.runner.run(argv, timeout_s=15, check=check, sudo=self.sudo)

    def index(self, device: str) -> int:
        try:
            return self.names.index(device)
        except ValueError:
            raise ConfigError(
                f"no device named {device!r} (have: {', '.join(self.names)})"
            ) from None

    def is_installed(self) -> bool:
        qdiscs = self._qdiscs(self.iface)
        has_root = any(
            q.get("root") and q.get("kind") == "htb" and q.get("handle") == "1:" for q in qdiscs
        )
        has_ingress = any(q.get("kind") == "ingress" for q in qdiscs)
        ifb = self._run(["ip", "link", "show", self.ifb], check=False)
        return has_root and has_ingress and ifb.returncode == 0

    # -- set-up and tear-down ---------------------------------------------------------
    def setup(self, down: Sequence[LinkSpec], up: Sequence[LinkSpec]) -> None:
        """Shape every link from scratch: the ifb, the mode (netem probed on the ifb for
        ``auto``/``netem``), the record, offloads off, both trees. On any failure, the BS is
        left unshaped (never half-applied, offloads back) and the kernel's message is
        raised."""
        self.clear()
        try:
            for argv in build_ifb_commands(self.ifb):
                self._run(argv)
            netem = None
            if self.shaping in ("auto", "netem"):
                netem, why = self._probe_netem()
                if self.shaping == "netem" and not netem:
                    kernel = why.strip().splitlines()[-1] if why.strip() else "netem unavailable"
                    raise Unsupported(
                        f'{self.runner.host}: bs.shaping = "netem" needs the netem qdisc and '
                        f'this kernel refused it: "{kernel}" — the BS is left unshaped '
                        '(shaping = "auto" or "tbf" charge every packet with a TBF leaf)'
                    )
            mode = resolve_mode(self.shaping, netem)
            mtu, _ = self._link(self.iface)
            cfg = self._offloads_off(
                ShapingConfig(mode, leaf_bucket_bytes(mtu or DEFAULT_MTU), netem)
            )
            for argv in build_shaping_commands(
                self.iface,
                self.ifb,
                self.addrs,
                down,
                up,
                self.cell_rate_kbit,
                mode,
                cfg.bucket_bytes,
            ):
                self._run(argv)
        except CommandFailed as exc:
            self.clear()
            if _netem_error(exc.stderr):
                raise Unsupported(_netem_message(self.runner.host, exc.stderr)) from None
            raise
        except BaseException:
            self.clear()
            raise
        self._cfg = cfg
        self._leaf_cache = None

    def clear(self) -> dict[str, list[str]]:
        """Remove all our shaping (idempotent); the BS interface's offloads that set-up turned
        off are turned on again. Returns ``{"offloads_restored": [...]}``."""
        restored = self.restore_offloads()
        for argv in build_clear_commands(self.iface, self.ifb):
            self._run(argv, check=False)
        self._cfg = None
        self._leaf_cache = None
        return {"offloads_restored": restored}

    def restore_offloads(self) -> list[str]:
        """Turn on again the BS interface's offloads our record says set-up turned off (the
        record stays: :meth:`clear` removes it with the ifb). Returns those now on."""
        cfg = self._record_config()
        if cfg is None or not cfg.restore:
            return []
        try:
            self._run(build_offload_command(self.iface, cfg.restore, True), check=False)
        except CommandFailed:
            return []
        state = self._offload_state(self.iface) or {}
        return [n for n in cfg.restore if n in state and state[n].on]

    def _probe_netem(self) -> tuple[bool, str]:
        add, delete = build_netem_probe_commands(self.ifb)
        res = self._run(add, check=False)
        if res.returncode == 0:
            self._run(delete, check=False)
            return True, ""
        if _netem_error(res.stderr):
            return False, res.stderr
        raise CommandFailed(self.runner.host, add, res.returncode, res.stdout, res.stderr)

    def _link(self, dev: str) -> tuple[int | None, str | None]:
        """(mtu, alias) of ``dev``; (None, None) where it does not exist."""
        res = self._run(["ip", "link", "show", "dev", dev], check=False)
        return parse_link_show(res.stdout) if res.returncode == 0 else (None, None)

    def _offload_state(self, dev: str) -> dict[str, Offload] | None:
        """``ethtool -k``; None where ethtool is missing or refuses."""
        try:
            res = self._run(["ethtool", "-k", dev], check=False)
        except CommandFailed:  # no ethtool at all
            return None
        return parse_offloads(res.stdout) if res.returncode == 0 else None

    def _offloads_off(self, cfg: ShapingConfig) -> ShapingConfig:
        """Record (on the ifb, before anything changes) then turn off the offloads that make
        super-packets on the BS interface and the ifb. Where they cannot be changed the tree
        still goes in: :meth:`shaping_info` says so."""
        state = self._offload_state(self.iface)
        cfg = ShapingConfig(
            cfg.mode,
            cfg.bucket_bytes,
            cfg.netem,
            tuple(offloads_to_disable(state)) if state else (),
        )
        self._run(["ip", "link", "set", "dev", self.ifb, "alias", self._render(cfg)])
        for dev in (self.iface, self.ifb):
            names = (
                list(cfg.restore)
                if dev == self.iface
                else offloads_to_disable(self._offload_state(dev) or {})
            )
            if names:
                try:
                    self._run(build_offload_command(dev, names, False), check=False)
                except CommandFailed:
                    pass
        return cfg

    def _render(self, cfg: ShapingConfig) -> str:
        return render_record(
            {
                "shaping": cfg.mode,
                "bucket": cfg.bucket_bytes,
                "slack_us": TBF_SLACK_US,
                "netem": {True: "yes", False: "no"}.get(cfg.netem, "-"),
                "iface": self.iface,
                "restore": ",".join(cfg.restore) or "-",
            }
        )

    def _record_config(self) -> ShapingConfig | None:
        """The config our record on the ifb holds; None without one."""
        rec = parse_record(self._link(self.ifb)[1])
        if rec is None:
            return None
        try:
            restore = tuple(x for x in rec.get("restore", "-").split(",") if x and x != "-")
            return ShapingConfig(
                resolve_mode(rec["shaping"], None),
                int(rec["bucket"]),
                {"yes": True, "no": False}.get(rec.get("netem", "-")),
                restore if rec.get("iface") == self.iface else (),
            )
        except (KeyError, ValueError):
            return None

    def _config(self) -> ShapingConfig:
        """The installed tree's config: our record, else inferred from its leaves."""
        if self._cfg is None:
            cfg = self._record_config()
            if cfg is None:
                mtu, _ = self._link(self.iface)
                cfg = ShapingConfig(
                    infer_mode(list(self._leaves().values())),
                    leaf_bucket_bytes(mtu or DEFAULT_MTU),
                    recorded=False,
                )
            self._cfg = cfg
        return self._cfg

    # -- changes ----------------------------------------------------------------------
    def change(self, device: str, spec: LinkSpec, direction: str = "both") -> None:
        """In-place change of one device's link (``down``, ``up`` or ``both``): the HTB
        class, and the leaf where it carries the rate or delay/loss come or go.

        If netem is needed and the kernel lacks it, nothing is changed and
        :class:`Unsupported` carries the kernel's own message.
        """
        if direction not in ("both", *DIRECTIONS):
            raise ConfigError(f"--direction: must be both, down or up, not {direction!r}")
        i = self.index(device)
        devs = (
            [self.iface]
            if direction == "down"
            else [self.ifb]
            if direction == "up"
            else [self.iface, self.ifb]
        )
        if not self.is_installed():
            full = LinkSpec(UNLIMITED_KBIT)
            n = len(self.addrs)
            self.setup(
                [spec if j == i and direction != "up" else full for j in range(n)],
                [spec if j == i and direction != "down" else full for j in range(n)],
            )
            return
        cfg = self._config()
        minor = class_minor(i)
        leaves = self._leaves()
        kind = leaf_kind(cfg.mode, spec)
        netem_rate = cfg.mode != "htb"
        carries_rate = kind == "tbf" or (kind == "netem" and netem_rate)
        # a pfifo leaf stays as it is; a leaf of the same kind changes in place (rate-carrying
        # ones with `change`, htb mode's netem with `replace` on its handle); a new kind is
        # grafted under the class
        steps: list[tuple[str, list[str], Leaf | None]] = []
        for d in devs:
            cur = leaves.get((d, minor))
            if cur is not None and cur.kind == kind == "pfifo":
                continue
            op = "change" if cur is not None and cur.kind == kind and carries_rate else "replace"
            steps.append(
                (d, leaf_command(op, d, minor, kind, spec, cfg.bucket_bytes, netem_rate), cur)
            )
        share = cell_share_kbit(self.cell_rate_kbit, len(self.addrs))
        # the class carries the rate in htb mode only (class_ceil_kbit)
        classes = (
            [build_class_change_command(d, i, spec, share) for d in devs]
            if cfg.mode == "htb"
            else []
        )
        done: list[tuple[str, Leaf | None]] = []
        try:
            for d, argv, cur in steps:
                self._run(argv)
                done.append((d, cur))
        except CommandFailed as exc:
            for d, cur in done:  # put back leaves already switched (e.g. down worked, up refused)
                if cur is not None and cur.kind in ("pfifo", "tbf", "netem"):
                    self._run(
                        leaf_command(
                            "replace",
                            d,
                            minor,
                            cur.kind,
                            cur.spec(cur.rate_kbit or spec.rate_kbit),
                            cfg.bucket_bytes,
                            cur.rate_kbit is not None,
                        ),
                        check=False,
                    )
            self._leaf_cache = None
            if _netem_error(exc.stderr):
                raise Unsupported(_netem_message(self.runner.host, exc.stderr)) from None
            raise
        for argv in classes:
            self._run(argv)
        for d in devs:
            leaves[(d, minor)] = Leaf(
                kind,
                f"{leaf_handle(minor, kind):x}:",
                spec.rate_kbit if carries_rate else None,
                spec.delay_ms,
                spec.loss_pct,
            )
        self._leaf_cache = leaves

    def set_rates(self, rates: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Change the rate of several links at once and read back what the kernel enforces.

        ``rates`` maps a device to its (down, up) kbit/s. Every in-place ``tc qdisc change``
        of the rate-carrying leaves (TBF, netem with a rate: its delay/loss kept), or in htb
        mode every ``tc class change``, goes out at once, then classes and qdiscs of both interfaces are read
        back; pfifo leaves and htb mode's netem are not touched. Where the BS is this machine
        and we are root, the changes are rtnetlink messages in one send (tens to hundreds of
        microseconds, :mod:`testbed.net.netlink`) and the read-back is the kernel's dumps;
        otherwise (a BS over SSH or sudo, a netem leaf to change, ``self.netlink`` off) one
        ``tc -j -batch`` process does both (milliseconds). The tree must be installed
        (:meth:`is_installed`). Returns device -> (down, up) kbit/s as the kernel reports them
        (the class's rate, or the leaf's where lower).
        """
        cfg = self._config()
        leaves = self._leaf_cache if self._leaf_cache is not None else self._leaves()
        commands: list[list[str]] = []
        share = cell_share_kbit(self.cell_rate_kbit, len(self.addrs))
        for dev, (down, up) in rates.items():
            i = self.index(dev)
            minor = class_minor(i)
            for d, kbit in ((self.iface, down), (self.ifb, up)):
                if cfg.mode == "htb":  # elsewhere the leaf alone carries the rate
                    commands.append(build_class_change_command(d, i, LinkSpec(kbit), share))
                lf = leaves.get((d, minor))
                if cfg.mode != "htb" and (lf is None or lf.rate_kbit is None):
                    leaves = self._leaves()  # a stale cache, or no leaf to change at all
                    lf = leaves.get((d, minor))
                    if lf is None or lf.rate_kbit is None:
                        raise CommandFailed(
                            self.runner.host,
                            ["tc", "qdisc", "show", "dev", d],
                            1,
                            "",
                            f"no rate-carrying leaf under class "
                            f"1:{minor:x} of {dev} in {cfg.mode} mode",
                        )
                if lf is not None and lf.rate_kbit is not None and lf.kind in ("tbf", "netem"):
                    commands.append(
                        leaf_command(
                            "change", d, minor, lf.kind, lf.spec(kbit), cfg.bucket_bytes, True
                        )
                    )
        changes = self._netlink_changes(commands)
        if changes is not None:
            return self._set_rates_netlink(rates, changes)
        lines = [shlex.join(argv[1:]) for argv in commands]
        # under -j the class listings stay text and each qdisc listing is one JSON line
        lines += [
            f"class show dev {self.iface}",
            f"qdisc show dev {self.iface}",
            f"class show dev {self.ifb}",
            f"qdisc show dev {self.ifb}",
        ]
        script = "tc -j -batch - <<'EOF'\n" + "\n".join(lines) + "\nEOF\n"
        res = self._run(["sh", "-c", script])
        parts = split_batch_listing(res.stdout)
        if len(parts) != 2:
            raise CommandFailed(
                self.runner.host,
                ["tc", "-j", "-batch", "-"],
                res.returncode,
                res.stdout,
                "tc's listings of both interfaces not found",
            )
        by_dir = []
        cache: dict[tuple[str, int], Leaf] = {}
        for d, (text, qdiscs) in zip((self.iface, self.ifb), parts):
            lv = leaves_by_class(qdiscs)
            cache.update({(d, m): lf for m, lf in lv.items()})
            by_dir.append(({c.classid: c.ceil_kbit for c in parse_htb_classes(text)}, lv))
        out: dict[str, tuple[float, float]] = {}
        for dev in rates:
            minor = class_minor(self.index(dev))
            cid = f"1:{minor:x}"
            got = []
            for classes, lv in by_dir:
                if cid not in classes:
                    raise CommandFailed(
                        self.runner.host,
                        ["tc", "-j", "-batch", "-"],
                        res.returncode,
                        res.stdout,
                        f"class {cid} of {dev} missing from tc's listing",
                    )
                got.append(enforced_kbit(classes[cid], lv.get(minor)))
            out[dev] = (got[0], got[1])
        self._leaf_cache = cache
        return out

    def _netlink_client(self) -> netlink.TcNetlink | None:
        """The rtnetlink client, where the BS is this machine (or one of its network
        namespaces) and we are root; None elsewhere (the tc CLI then)."""
        if not self.netlink:
            return None
        if self._nl is None:
            if not isinstance(self.runner, LocalRunner) or os.geteuid() != 0:
                self.netlink = False
                return None
            try:
                self._nl = netlink.TcNetlink(self.runner.netns, host=self.runner.host)
            except OSError:
                self.netlink = False
                return None
        return self._nl

    def _netlink_changes(self, commands: Sequence[Sequence[str]]) -> list[netlink.Change] | None:
        """The epoch's tc command lines as netlink changes (the very values tc would send);
        None where netlink is not used or a line is beyond it (a netem leaf)."""
        if self._netlink_client() is None:
            return None
        try:
            return [netlink.change_from_tc_argv(argv) for argv in commands]
        except netlink.NotExpressible:
            return None

    def _set_rates_netlink(
        self, rates: Mapping[str, tuple[float, float]], changes: Sequence[netlink.Change]
    ) -> dict[str, tuple[float, float]]:
        """:meth:`set_rates` over rtnetlink: one send, the acks, then class dumps of both
        interfaces and one qdisc dump, read like tc's listings."""
        nl = self._nl
        assert nl is not None
        nl.forget_interfaces()  # a re-made ifb has a new index
        nl.change(changes)
        devs = (self.iface, self.ifb)
        qdiscs = nl.qdiscs_of(devs, stats=False, where=_under_root)
        by_dir = []
        cache: dict[tuple[str, int], Leaf] | None = {}
        for d in devs:
            lv: dict[int, Leaf] = {}
            for q in qdiscs[d]:
                lf = _leaf_from_netlink(q)
                if lf is None:  # a leaf only tc reads fully (netem): re-read next time
                    cache = None
                else:
                    lv[q.parent & 0xFFFF] = lf
            if cache is not None:
                cache.update({(d, m): lf for m, lf in lv.items()})
            classes = {
                c.handle: c.ceil_kbit
                for c in nl.classes(d, stats=False, where=_of_root)
                if c.kind == "htb"
            }
            by_dir.append((classes, lv))
        out: dict[str, tuple[float, float]] = {}
        for dev in rates:
            minor = class_minor(self.index(dev))
            got = []
            for d, (classes, lv) in zip(devs, by_dir):
                kbit = classes.get(netlink.parse_handle(f"1:{minor:x}"))
                if kbit is None:
                    raise netlink.TcNetlinkError(
                        self.runner.host,
                        [
                            (
                                f"{d} class htb 1:{minor:x} of {dev}",
                                errno.ENOENT,
                                "missing from the kernel's listing",
                            )
                        ],
                    )
                got.append(enforced_kbit(kbit, lv.get(minor)))
            out[dev] = (got[0], got[1])
        self._leaf_cache = cache
        return out

    # -- reading ----------------------------------------------------------------------
    def show(self) -> list[LinkState]:
        """Parse what tc reports now, per device and direction (the rate: the class's, or
        the leaf's where that is lower)."""
        states = [LinkState(n, a) for n, a in zip(self.names, self.addrs)]
        for d, direction in ((self.iface, "down"), (self.ifb, "up")):
            res = self._run(["tc", "-s", "class", "show", "dev", d], check=False)
            if res.returncode != 0:
                continue
            by_id = {c.classid: c for c in parse_htb_classes(res.stdout)}
            qdiscs = self._qdiscs(d)
            leaves = leaves_by_class(qdiscs)
            for i, st in enumerate(states):
                minor = class_minor(i)
                c = by_id.get(f"1:{minor:x}")
                if c is None:
                    continue
                setattr(st, f"{direction}_kbit", enforced_kbit(c.ceil_kbit, leaves.get(minor)))
                setattr(st, f"{direction}_sent_bytes", c.sent_bytes)
                st.handles[direction] = f"{d} {c.classid} leaf {c.leaf}"
            for qd in qdiscs:
                for i, st in enumerate(states):
                    if qd.get("parent") == f"1:{class_minor(i):x}":
                        setattr(st, f"{direction}_leaf", _describe_leaf(qd))
        return states

    def shaping_info(self) -> dict[str, Any]:
        """How the links are shaped, for the run manifest, ``links.csv`` and ``links set``:
        the mode, the leaf, the bytes a link passes free after an idle spell (TBF: its
        one-frame bucket, plus ``bucket_slack_us`` of the rate; netem: 0; htb: the largest
        device class's bucket), the netem probe, the offloads per interface and a one-line
        ``warning`` where offloads are still on."""
        installed = self.is_installed()
        cfg = self._config() if installed else None
        info: dict[str, Any] = {
            "setting": self.shaping,
            "installed": installed,
            "mode": cfg.mode if cfg else None,
            "leaf": {"tbf": "tbf", "netem": "netem", "htb": "pfifo"}[cfg.mode] if cfg else None,
            "bucket_bytes": None,
            "bucket_slack_us": None,
            "netem": cfg.netem if cfg else None,
            "recorded": cfg.recorded if cfg else None,
            "offloads_restore": list(cfg.restore) if cfg else [],
            "offloads": {},
            "offloads_summary": None,
            "warning": None,
        }
        if cfg is not None:
            if cfg.mode == "tbf":
                info["bucket_bytes"] = cfg.bucket_bytes
                info["bucket_slack_us"] = TBF_SLACK_US
            elif cfg.mode == "netem":
                info["bucket_bytes"] = 0
            else:
                res = self._run(["tc", "class", "show", "dev", self.iface], check=False)
                bursts = [
                    parse_tc_size(c.burst)
                    for c in parse_htb_classes(res.stdout)
                    if c.parent == f"1:{ROOT_CLASS:x}"
                ]
                info["bucket_bytes"] = max(bursts) if bursts else None
        devs = (self.iface, self.ifb) if installed else (self.iface,)
        parts, unknown = [], False
        for d in devs:
            st = self._offload_state(d)
            if st is None:
                info["offloads"][d] = None
                unknown = True
                continue
            on = offloads_on(st)
            info["offloads"][d] = {"on": on, "off": [n for n, o in st.items() if not o.on]}
            if on:
                parts.append(f"{d} {','.join(on)}")
        info["offloads_summary"] = (
            "unknown" if unknown else ("on: " + "; ".join(parts) if parts else "off")
        )
        if installed and info["offloads_summary"] != "off":
            what = "ethtool is missing or refused" if unknown else f"still on: {'; '.join(parts)}"
            info["warning"] = (
                f"{self.runner.host}: segmentation/receive offloads on "
                f"{self.iface}/{self.ifb} could not be turned off ({what}): tc "
                "may see super-packets of up to 64 KiB, so short messages are "
                "charged in coarse steps"
            )
        return info

    def _leaves(self) -> dict[tuple[str, int], Leaf]:
        """(interface, class minor) -> leaf, read now (and cached for :meth:`set_rates`)."""
        out: dict[tuple[str, int], Leaf] = {}
        for d in (self.iface, self.ifb):
            out.update({(d, m): lf for m, lf in leaves_by_class(self._qdiscs(d)).items()})
        self._leaf_cache = dict(out)
        return out

    def qdisc_handles(self) -> list[tuple[str, str, str]]:
        """(device, kind, handle) of every qdisc on our two interfaces — for checking that
        an in-place change re-created nothing."""
        return [
            (d, q.get("kind", ""), q.get("handle", ""))
            for d in (self.iface, self.ifb)
            for q in self._qdiscs(d)
        ]

    def _qdiscs(self, dev: str) -> list[dict]:
        """``tc -j qdisc show dev DEV`` parsed; empty when the device does not exist."""
        res = self._run(["tc", "-j", "qdisc", "show", "dev", dev], check=False)
        return json.loads(res.stdout or "[]") if res.returncode == 0 else []


def _under_root(handle: int, parent: int) -> bool:
    """A qdisc whose parent is a class of our root HTB (``1:N``): a device class's leaf."""
    return parent >> 16 == 1 and parent & 0xFFFF != 0


def _of_root(handle: int, parent: int) -> bool:
    """A class of our root HTB (``1:N``)."""
    return handle >> 16 == 1


def _leaf_from_netlink(q: netlink.TcObject) -> Leaf | None:
    """A leaf from the kernel's qdisc dump, as :func:`parse_leaf` reads it from ``tc -j``;
    None for kinds whose options are not decoded here (netem)."""
    handle = netlink.format_handle(q.handle)
    if q.kind == "tbf":
        burst = q.burst
        return Leaf("tbf", handle, q.rate_kbit, burst_bytes=None if burst is None else int(burst))
    if q.kind == "netem":
        return None
    return Leaf(q.kind, handle)


def _describe_leaf(qd: dict) -> str:
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


def _netem_message(host: str, stderr: str) -> str:
    kernel = stderr.strip().splitlines()[-1] if stderr.strip() else "netem unavailable"
    return (
        f"{host}: delay/loss need the netem qdisc and this kernel refused it: "
        f'"{kernel}" — nothing was changed (rate shaping works without netem)'
    )
