"""Link shaping on the base station with Linux ``tc`` — both directions, per device.

All shaping happens on the BS host, so devices need no tc support at all:

* **downlink** (BS → device): an HTB qdisc on the BS interface's egress; one class per
  device under a parent class (the cell's total bandwidth), selected by a u32 filter on the
  device's destination address; a pfifo leaf per class (or netem when delay/loss is asked
  and the kernel has it).
* **uplink** (device → BS): the BS interface's ingress is redirected (``mirred``) to an
  ifb device that carries the same HTB tree, with u32 filters on the source address.

Changing a rate is an in-place ``tc class change`` (no qdisc re-creation, no loss burst).

The command builders here are pure (they return argv lists); :class:`TcShaper` applies them
through a :class:`~testbed.runner.Runner`, so the same code shapes the local testbed and a
lab's BS over SSH (with sudo).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .errors import CommandFailed, ConfigError, Unsupported
from .runner import Runner
from .units import format_rate

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


def _htb_params(rate_kbit: float) -> list[str]:
    b = str(burst_bytes(rate_kbit))
    r = format_rate(rate_kbit)
    return ["htb", "rate", r, "ceil", r, "burst", b, "cburst", b, "quantum", str(QUANTUM_BYTES)]


def leaf_qdisc_command(dev: str, minor: int, spec: LinkSpec) -> list[str]:
    """Leaf under a device class: netem for delay/loss, else a plain pfifo.

    The two kinds get different handles (``M:`` and ``M+0x4000:``) so switching between
    them grafts a new qdisc; ``replace`` on the same handle can only change its options.
    """
    handle = minor + NETEM_HANDLE_OFFSET if spec.needs_netem else minor
    argv = ["tc", "qdisc", "replace", "dev", dev, "parent", f"1:{minor:x}",
            "handle", f"{handle:x}:"]
    if spec.needs_netem:
        argv += ["netem", "limit", str(LEAF_LIMIT_PKTS)]
        if spec.delay_ms > 0:
            argv += ["delay", f"{spec.delay_ms:g}ms"]
        if spec.loss_pct > 0:
            argv += ["loss", f"{spec.loss_pct:g}%"]
    else:
        argv += ["pfifo", "limit", str(LEAF_LIMIT_PKTS)]
    return argv


def build_tree_commands(dev: str, addrs: Sequence[str], specs: Sequence[LinkSpec],
                        match: str, cell_rate_kbit: float | None) -> list[list[str]]:
    """HTB tree on ``dev``: root qdisc, cell class, a class + leaf + u32 filter per device.

    ``match`` is ``dst`` (downlink, on the BS interface) or ``src`` (uplink, on the ifb).
    """
    if match not in ("dst", "src"):
        raise ValueError(f"match must be 'dst' or 'src', not {match!r}")
    if len(addrs) != len(specs):
        raise ValueError("one spec per address")
    cell = cell_rate_kbit or UNLIMITED_KBIT
    cmds = [["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
             "default", f"{DEFAULT_MINOR:x}", "direct_qlen", str(LEAF_LIMIT_PKTS)],
            ["tc", "class", "replace", "dev", dev, "parent", "1:",
             "classid", f"1:{ROOT_CLASS:x}", *_htb_params(cell)]]
    for i, (addr, spec) in enumerate(zip(addrs, specs)):
        minor = class_minor(i)
        cmds.append(["tc", "class", "replace", "dev", dev, "parent", f"1:{ROOT_CLASS:x}",
                     "classid", f"1:{minor:x}", *_htb_params(spec.rate_kbit)])
        cmds.append(leaf_qdisc_command(dev, minor, spec))
        cmds.append(["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", match, f"{addr}/32",
                     "flowid", f"1:{minor:x}"])
    return cmds


def build_setup_commands(iface: str, ifb: str, addrs: Sequence[str],
                         down: Sequence[LinkSpec], up: Sequence[LinkSpec],
                         cell_rate_kbit: float | None = None) -> list[list[str]]:
    """Everything that shapes both directions from scratch (run after
    :func:`build_clear_commands`)."""
    return [
        ["ip", "link", "add", ifb, "type", "ifb"],
        ["ip", "link", "set", ifb, "up"],
        *build_tree_commands(iface, addrs, down, "dst", cell_rate_kbit),
        *build_tree_commands(ifb, addrs, up, "src", cell_rate_kbit),
        ["tc", "qdisc", "add", "dev", iface, "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", iface, "parent", "ffff:", "protocol", "ip", "prio",
         "1", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
         "dev", ifb],
    ]


def build_clear_commands(iface: str, ifb: str) -> list[list[str]]:
    """Remove our shaping; each may fail harmlessly when the thing is already gone."""
    return [["tc", "qdisc", "del", "dev", iface, "root"],
            ["tc", "qdisc", "del", "dev", iface, "ingress"],
            ["ip", "link", "del", ifb]]


def build_class_change_command(dev: str, index: int, spec: LinkSpec) -> list[str]:
    """In-place ``tc class change`` of one device's class on ``dev`` (rate, ceil, burst)."""
    return ["tc", "class", "change", "dev", dev, "parent", f"1:{ROOT_CLASS:x}",
            "classid", f"1:{class_minor(index):x}", *_htb_params(spec.rate_kbit)]


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
    r".*? rate (?P<rate>\S+) ceil (?P<ceil>\S+) burst (?P<burst>\S+)")
_SENT_RE = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+)")


def parse_htb_classes(text: str) -> list[TcClass]:
    """Parse ``tc -s class show dev X`` (this iproute2 has no JSON for HTB classes)."""
    out: list[TcClass] = []
    for line in text.splitlines():
        m = _CLASS_RE.match(line.strip())
        if m:
            out.append(TcClass(m["id"], m["parent"], m["leaf"], parse_tc_rate_kbit(m["rate"]),
                               parse_tc_rate_kbit(m["ceil"]), m["burst"]))
            continue
        s = _SENT_RE.search(line)
        if s and out:
            out[-1].sent_bytes, out[-1].sent_packets, out[-1].dropped = map(int, s.groups())
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
    """

    def __init__(self, runner: Runner, iface: str, ifb: str, addrs: Sequence[str],
                 names: Sequence[str], cell_rate_kbit: float | None = None,
                 sudo: bool = False):
        self.runner = runner
        self.iface = iface
        self.ifb = ifb
        self.addrs = list(addrs)
        self.names = list(names)
        self.cell_rate_kbit = cell_rate_kbit
        self.sudo = sudo

    def _run(self, argv: list[str], check: bool = True):
        return self.runner.run(argv, timeout_s=15, check=check, sudo=self.sudo)

    def index(self, device: str) -> int:
        try:
            return self.names.index(device)
        except ValueError:
            raise ConfigError(f"no device named {device!r} (have: {', '.join(self.names)})") \
                from None

    def is_installed(self) -> bool:
        qdiscs = self._qdiscs(self.iface)
        has_root = any(q.get("root") and q.get("kind") == "htb" and q.get("handle") == "1:"
                       for q in qdiscs)
        has_ingress = any(q.get("kind") == "ingress" for q in qdiscs)
        ifb = self._run(["ip", "link", "show", self.ifb], check=False)
        return has_root and has_ingress and ifb.returncode == 0

    def setup(self, down: Sequence[LinkSpec], up: Sequence[LinkSpec]) -> None:
        """Shape every link from scratch. On any failure, the BS is left unshaped (never
        half-applied) and the kernel's message is raised."""
        self.clear()
        try:
            for argv in build_setup_commands(self.iface, self.ifb, self.addrs, down, up,
                                             self.cell_rate_kbit):
                self._run(argv)
        except CommandFailed as exc:
            self.clear()
            if _netem_error(exc.stderr):
                raise Unsupported(_netem_message(self.runner.host, exc.stderr)) from None
            raise

    def clear(self) -> None:
        """Remove all our shaping (idempotent)."""
        for argv in build_clear_commands(self.iface, self.ifb):
            self._run(argv, check=False)

    def change(self, device: str, spec: LinkSpec, direction: str = "both") -> None:
        """In-place change of one device's link (``down``, ``up`` or ``both``).

        If netem is needed and the kernel lacks it, nothing is changed and
        :class:`Unsupported` carries the kernel's own message.
        """
        if direction not in ("both", *DIRECTIONS):
            raise ConfigError(f"--direction: must be both, down or up, not {direction!r}")
        i = self.index(device)
        devs = [self.iface] if direction == "down" else \
            [self.ifb] if direction == "up" else [self.iface, self.ifb]
        if not self.is_installed():
            full = LinkSpec(UNLIMITED_KBIT)
            n = len(self.addrs)
            self.setup([spec if j == i and direction != "up" else full for j in range(n)],
                       [spec if j == i and direction != "down" else full for j in range(n)])
            return
        minor = class_minor(i)
        kinds = self._leaf_kinds()
        # leaves are touched only when netem comes or goes: a pure rate change re-creates
        # nothing
        leaves = [(d, leaf_qdisc_command(d, minor, spec)) for d in devs
                  if spec.needs_netem or kinds.get((d, minor)) == "netem"]
        classes = [build_class_change_command(d, i, spec) for d in devs]
        done: list[str] = []
        try:
            for d, argv in leaves:
                self._run(argv)
                done.append(d)
        except CommandFailed as exc:
            for d in done:  # undo leaves already switched (e.g. down worked, up refused)
                self._run(leaf_qdisc_command(d, minor, LinkSpec(spec.rate_kbit)), check=False)
            if _netem_error(exc.stderr):
                raise Unsupported(_netem_message(self.runner.host, exc.stderr)) from None
            raise
        for argv in classes:
            self._run(argv)

    def set_rates(self, rates: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Change the rate of several links at once and read back what tc enforces.

        ``rates`` maps a device to its (down, up) kbit/s. One ``tc -batch`` process runs every
        in-place ``tc class change`` and then ``tc class show`` of both interfaces, so a whole
        decision epoch costs one process (not two per device and direction); leaves (pfifo, or
        netem with its delay/loss) are not touched. The tree must be installed
        (:meth:`is_installed`). Returns device -> (down, up) kbit/s as tc reports them.
        """
        lines = []
        for dev, (down, up) in rates.items():
            i = self.index(dev)
            for d, kbit in ((self.iface, down), (self.ifb, up)):
                lines.append(shlex.join(build_class_change_command(d, i, LinkSpec(kbit))[1:]))
        # the ifb's root qdisc line separates the two listings (class lines never start so)
        lines += [f"class show dev {self.iface}", f"qdisc show dev {self.ifb} root",
                  f"class show dev {self.ifb}"]
        script = "tc -batch - <<'EOF'\n" + "\n".join(lines) + "\nEOF\n"
        res = self._run(["sh", "-c", script])
        parts = re.split(r"(?m)^qdisc .*$", res.stdout, maxsplit=1) + [""]
        out: dict[str, tuple[float, float]] = {}
        by_dir = [{c.classid: c.rate_kbit for c in parse_htb_classes(t)} for t in parts[:2]]
        for dev in rates:
            cid = f"1:{class_minor(self.index(dev)):x}"
            if cid not in by_dir[0] or cid not in by_dir[1]:
                raise CommandFailed(self.runner.host, ["tc", "-batch", "-"], res.returncode,
                                    res.stdout, f"class {cid} of {dev} missing from tc's listing")
            out[dev] = (by_dir[0][cid], by_dir[1][cid])
        return out

    def show(self) -> list[LinkState]:
        """Parse what tc reports now, per device and direction."""
        states = [LinkState(n, a) for n, a in zip(self.names, self.addrs)]
        for d, direction in ((self.iface, "down"), (self.ifb, "up")):
            res = self._run(["tc", "-s", "class", "show", "dev", d], check=False)
            if res.returncode != 0:
                continue
            by_id = {c.classid: c for c in parse_htb_classes(res.stdout)}
            for i, st in enumerate(states):
                c = by_id.get(f"1:{class_minor(i):x}")
                if c is None:
                    continue
                setattr(st, f"{direction}_kbit", c.rate_kbit)
                setattr(st, f"{direction}_sent_bytes", c.sent_bytes)
                st.handles[direction] = f"{d} {c.classid} leaf {c.leaf}"
            for qd in self._qdiscs(d):
                for i, st in enumerate(states):
                    if qd.get("parent") == f"1:{class_minor(i):x}":
                        setattr(st, f"{direction}_leaf", _describe_leaf(qd))
        return states

    def _leaf_kinds(self) -> dict[tuple[str, int], str]:
        out: dict[tuple[str, int], str] = {}
        for d in (self.iface, self.ifb):
            for qd in self._qdiscs(d):
                parent = qd.get("parent", "")
                if parent.startswith("1:"):
                    out[(d, int(parent[2:], 16))] = qd.get("kind", "")
        return out

    def qdisc_handles(self) -> list[tuple[str, str, str]]:
        """(device, kind, handle) of every qdisc on our two interfaces — for checking that
        an in-place change re-created nothing."""
        return [(d, q.get("kind", ""), q.get("handle", ""))
                for d in (self.iface, self.ifb) for q in self._qdiscs(d)]

    def _qdiscs(self, dev: str) -> list[dict]:
        """``tc -j qdisc show dev DEV`` parsed; empty when the device does not exist."""
        res = self._run(["tc", "-j", "qdisc", "show", "dev", dev], check=False)
        return json.loads(res.stdout or "[]") if res.returncode == 0 else []


def _describe_leaf(qd: dict) -> str:
    opts = qd.get("options", {})
    if qd.get("kind") == "netem":
        parts = ["netem"]
        if "delay" in opts:
            parts.append(f"delay {opts['delay']}")
        if "loss-random" in opts:
            parts.append(f"loss {opts['loss-random']}")
        return " ".join(parts)
    return f"{qd.get('kind')} limit {opts.get('limit', '?')}"


def _netem_message(host: str, stderr: str) -> str:
    kernel = stderr.strip().splitlines()[-1] if stderr.strip() else "netem unavailable"
    return (f"{host}: delay/loss need the netem qdisc and this kernel refused it: "
            f"\"{kernel}\" — nothing was changed (rate shaping works without netem)")
