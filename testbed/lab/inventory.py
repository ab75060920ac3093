"""The inventory: which hosts make up a testbed (TOML).

::

    [testbed]
    name = "lab"
    known_hosts = "lab.known_hosts"   # relative paths resolve against this file's folder
    security = "curve"                # data plane: CURVE, only the BS's key accepted ("none": off)
    keys_dir = "lab.keys"             # the controller's CURVE keys (default <inventory stem>.keys)
    wheelhouse = "wheels"             # optional: install the agents' wheels from here (offline)

    [bs]                      # the base station: runs the gating side, shapes every link
    name = "bs"
    host = "192.168.50.1"     # the address the devices reach the BS at
    interface = "eth1"        # BS interface toward the devices: shaping happens here
    ifb = "ifb-tb0"           # ifb device for uplink shaping (created on demand)
    local = true              # the controller runs on the BS; else give ssh_user/ssh_key
    sudo = false              # prefix ip/tc with `sudo -n`
    cell_rate = "100mbit"     # optional: total bandwidth shared by all links
    shaping = "auto"          # what charges each packet: auto (netem if the kernel has it,
                              # else tbf), tbf, netem, or htb (the class alone; see links.py)
    probe_port = 5557         # `links verify`: the BS end listens here (uplink)

    [[devices]]
    name = "orin1"
    host = "192.168.50.11"    # an IPv4 address, or a name resolving to exactly one
    ssh_port = 22
    ssh_user = "nvidia"
    ssh_key = "~/.ssh/id_ed25519"    # a path (or leave out to use ssh-agent); never the key
    interface = "eth0"
    workdir = "/home/nvidia/moe-testbed"
    python = "/usr/bin/python3"
    hw_class = "orin-agx"
    memory_budget_mb = 24000
    reuse_packages = ["torch"]       # optional: use the device python's own copies (JetPack torch)
    agent_port = 5555                # optional: the agent's ZeroMQ ROUTER port (0 = any free port)
    status_port = 5556               # optional: the agent's status PUB port (0 = any free port)
    probe_port = 5557                # optional: `links verify`: the device end listens here

``reuse_packages`` names distributions (``torch``, ``numpy``, ``pyzmq``, ``msgpack``,
``safetensors``, ...) that ``testbed provision`` does not install: the agent's virtual
environment sees the copies the device's ``python`` already imports (see
:mod:`testbed.lab.provision`).

Ports are fixed so that a firewall can let them through: ``agent_port`` (the agent's ZeroMQ
ROUTER, default :data:`AGENT_PORT`) and ``status_port`` (its status PUB, default
:data:`STATUS_PORT`) are bound on the device's address, 0 = any free port (the agent reports
the one it got in its ready file); ``probe_port`` (default :data:`PROBE_PORT`) is where
``testbed links verify`` listens: on the device for the downlink, on the BS (``bs.probe_port``)
for the uplink, 0 = a random port.

A device's ``host`` may be a name: it stays the name for SSH and ZeroMQ, and is resolved
(IPv4, when the inventory is loaded) into :attr:`Device.ipv4`, the address the BS's tc filters
match and the link probes use. A name that does not resolve to exactly one IPv4 address, and
an IPv6 address, are refused.

``wheelhouse`` (a folder beside the inventory, or absolute) makes every command that provisions
install the agents' dependencies from there, never downloading (``testbed wheelhouse build``
fills it; a command's ``--wheelhouse`` wins over it).

Loading collects *every* problem, each naming the file and the field, and raises one
:class:`~testbed.errors.ConfigError` with all of them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError
from ..units import parse_rate_kbit

HW_CLASSES = (
    "netns",
    "orin-agx",
    "orin-nx",
    "orin-nano",
    "jetson-other",
    "x86-gpu",
    "x86-cpu",
    "arm64-cpu",
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
#: default ports (inventory ``agent_port``, ``status_port``, ``probe_port``; see the docstring)
AGENT_PORT = 5555
STATUS_PORT = 5556
PROBE_PORT = 5557


@dataclass(frozen=True)
class Device:
    """A host that runs ``device_agent``."""

    name: str
    host: str
    ssh_user: str
    workdir: str
    python: str
    hw_class: str
    memory_budget_mb: int
    ssh_port: int = 22
    ssh_key: str | None = None
    interface: str = "eth0"
    reuse_packages: tuple[str, ...] = ()
    #: the agent's ZeroMQ ROUTER port (0 = any free port)
    agent_port: int = AGENT_PORT
    #: the agent's status PUB port (0 = any free port)
    status_port: int = STATUS_PORT
    #: where ``links verify`` listens on the device (downlink; 0 = a random port)
    probe_port: int = PROBE_PORT
    #: ``host`` resolved to IPv4 when the inventory was loaded (None: ``host`` is the address)
    ipv4: str | None = None

    @property
    def address(self) -> str:
        """The device's IPv4 address: what the BS's tc filters match and the probes use."""
        return self.ipv4 or self.host


@dataclass(frozen=True)
class BaseStation:
    """The host that runs the gating side and shapes every link."""

    name: str
    host: str
    interface: str
    ifb: str = "ifb-tb0"
    local: bool = True
    sudo: bool = False
    cell_rate_kbit: float | None = None
    ssh_port: int = 22
    ssh_user: str | None = None
    ssh_key: str | None = None
    #: ``bs.shaping``: the leaf under each device's HTB class (see :mod:`testbed.net.tc`)
    shaping: str = "auto"
    #: where ``links verify`` listens on the BS (uplink; 0 = a random port)
    probe_port: int = PROBE_PORT


@dataclass(frozen=True)
class Inventory:
    """One testbed as loaded from its TOML file: the BS, the devices, the security settings."""

    path: Path
    bs: BaseStation
    devices: tuple[Device, ...]
    name: str = "testbed"
    known_hosts: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: data-plane security: ``curve`` (agents accept only the BS's CURVE key) or ``none``
    security: str = "curve"
    #: where the controller keeps the CURVE keys (default: ``<inventory stem>.keys`` beside it)
    keys_dir: str | None = None
    #: ``testbed.wheelhouse``: the folder the agents' wheels are installed from (absolute)
    wheelhouse: str | None = None

    def curve_dir(self) -> Path:
        """The controller's CURVE key folder for this testbed."""
        return Path(self.keys_dir) if self.keys_dir else self.path.parent / f"{self.path.stem}.keys"

    def device(self, name: str) -> Device:
        """The device called ``name``; ConfigError (listing the names there are) if none is."""
        for d in self.devices:
            if d.name == name:
                return d
        raise ConfigError(
            f"{self.path}: devices: no device named {name!r} "
            f"(have: {', '.join(d.name for d in self.devices)})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (no secrets are ever held here: keys are paths)."""
        return {
            "path": str(self.path),
            "name": self.name,
            "known_hosts": self.known_hosts,
            "security": self.security,
            "keys_dir": str(self.curve_dir()),
            "wheelhouse": self.wheelhouse,
            "bs": asdict(self.bs),
            "devices": [asdict(d) for d in self.devices],
        }


_TOP_KEYS = {"testbed", "bs", "devices"}
_TESTBED_KEYS = {"name", "known_hosts", "security", "keys_dir", "wheelhouse"}
SECURITY = ("curve", "none")
_BS_REQUIRED = {"name", "host", "interface"}
_BS_OPTIONAL = {
    "ifb",
    "local",
    "sudo",
    "cell_rate",
    "ssh_port",
    "ssh_user",
    "ssh_key",
    "shaping",
    "probe_port",
}
#: ``bs.shaping`` values (testbed.net.tc.SHAPING_MODES)
SHAPING = ("auto", "tbf", "netem", "htb")
_DEV_REQUIRED = {"name", "host", "ssh_user", "workdir", "python", "hw_class", "memory_budget_mb"}
_DEV_OPTIONAL = {
    "ssh_port",
    "ssh_key",
    "interface",
    "reuse_packages",
    "agent_port",
    "status_port",
    "probe_port",
}
#: a device's listening ports (0 = any)
_DEV_PORTS = ("agent_port", "status_port", "probe_port")
_PKG_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")


class _Checker:
    """Collects problems as ``file: field: message`` lines."""

    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def bad(self, where: str, msg: str) -> None:
        self.problems.append(f"{self.path}: {where}: {msg}")

    def keys(
        self, where: str, table: dict[str, Any], required: set[str], optional: set[str]
    ) -> None:
        for k in sorted(required - table.keys()):
            self.bad(f"{where}.{k}" if where else k, "missing required field")
        for k in sorted(table.keys() - required - optional):
            allowed = ", ".join(sorted(required | optional))
            self.bad(f"{where}.{k}" if where else k, f"unknown key (allowed: {allowed})")

    def string(
        self, where: str, value: Any, pattern: re.Pattern[str] | None = None, what: str = ""
    ) -> str | None:
        if not isinstance(value, str) or not value:
            self.bad(where, f"must be a non-empty string, got {value!r}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.bad(where, f"not a valid {what}: {value!r}")
            return None
        return value

    def port(self, where: str, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.bad(where, f"must be an integer port 1..65535, got {value!r}")
            return None
        return value

    def port_or_any(self, where: str, value: Any) -> int | None:
        """A port 1..65535, or 0 (any)."""
        if value == 0 and not isinstance(value, bool):
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.bad(where, f"must be an integer port 1..65535 (or 0: any), got {value!r}")
            return None
        return value

    def ipv4(self, where: str, host: str) -> str | None:
        """The IPv4 address ``host`` is (or resolves to); a problem if none, or IPv6."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip.version == 4:
                return host
            self.bad(where, f"{host!r} is an IPv6 address: the BS's tc filters match IPv4 only")
            return None
        try:
            return resolve_ipv4(host)
        except ValueError as exc:
            self.bad(where, str(exc))
            return None

    def directory(self, where: str, value: Any) -> str | None:
        """An existing folder (relative to the inventory's folder); its absolute path."""
        s = self.string(where, value)
        if s is None:
            return None
        p = Path(os.path.expanduser(s))
        if not p.is_absolute():
            p = self.path.parent / p
        if not p.is_dir():
            self.bad(where, f"{p}: no such directory")
            return None
        return str(p.resolve())

    def host(self, where: str, value: Any) -> str | None:
        s = self.string(where, value)
        if s is None:
            return None
        try:
            ipaddress.ip_address(s)
            return s
        except ValueError:
            pass
        if not _HOST_RE.fullmatch(s) or s.replace(".", "").isdigit():
            self.bad(where, f"not an IP address or host name: {s!r}")
            return None
        return s

    def readable_file(self, where: str, value: Any) -> str | None:
        s = self.string(where, value)
        if s is None:
            return None
        p = Path(os.path.expanduser(s))
        if not p.is_absolute():
            p = self.path.parent / p
        try:
            with open(p, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            self.bad(where, f"cannot read {p}: {exc.strerror or exc}")
            return None
        return str(p)

    def boolean(self, where: str, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.bad(where, f"must be true or false, got {value!r}")
            return None
        return value


def resolve_ipv4(host: str) -> str:
    """The one IPv4 address ``host`` resolves to (``getaddrinfo``, AF_INET).

    Raises
    ------
    ValueError
        One line naming ``host``: it does not resolve to an IPv4 address (IPv6 only, unknown,
        no DNS), or it resolves to several (which one the device uses is not known).
    """
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"{host!r} does not resolve to an IPv4 address ({why})") from None
    addrs = sorted({str(info[4][0]) for info in infos})
    if not addrs:
        raise ValueError(f"{host!r} does not resolve to an IPv4 address (no A record)")
    if len(addrs) > 1:
        raise ValueError(
            f"{host!r} resolves to {len(addrs)} IPv4 addresses ({', '.join(addrs)}): "
            "give the device's own address"
        )
    return addrs[0]


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate an inventory file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read inventory: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: TOML syntax: {exc}") from None
    return parse_inventory(data, p)


def parse_inventory(data: dict[str, Any], path: Path) -> Inventory:
    """Validate already-parsed TOML data (``path`` is used in messages and for relative
    paths)."""
    c = _Checker(path)
    for k in sorted(data.keys() - _TOP_KEYS):
        c.bad(k, f"unknown top-level key (allowed: {', '.join(sorted(_TOP_KEYS))})")

    tb = data.get("testbed", {})
    name, known_hosts = "testbed", None
    security, keys_dir, wheelhouse = "curve", None, None
    if not isinstance(tb, dict):
        c.bad("testbed", "must be a table")
    else:
        c.keys("testbed", tb, set(), _TESTBED_KEYS)
        if "name" in tb:
            name = c.string("testbed.name", tb["name"], _NAME_RE, "name") or name
        if "known_hosts" in tb:
            known_hosts = c.readable_file("testbed.known_hosts", tb["known_hosts"])
        if "security" in tb and tb["security"] not in SECURITY:
            c.bad(
                "testbed.security", f"must be one of {', '.join(SECURITY)}, got {tb['security']!r}"
            )
        else:
            security = tb.get("security", "curve")
        if "keys_dir" in tb and c.string("testbed.keys_dir", tb["keys_dir"]) is not None:
            kd = Path(os.path.expanduser(tb["keys_dir"]))
            keys_dir = str(kd if kd.is_absolute() else path.parent / kd)
        if "wheelhouse" in tb:
            wheelhouse = c.directory("testbed.wheelhouse", tb["wheelhouse"])

    bs = _parse_bs(c, data.get("bs"))
    devices = _parse_devices(c, data.get("devices"))
    if c.problems:
        raise ConfigError(c.problems)
    assert bs is not None
    return Inventory(
        path=path,
        bs=bs,
        devices=tuple(devices),
        name=name,
        known_hosts=known_hosts,
        security=security,
        keys_dir=keys_dir,
        wheelhouse=wheelhouse,
    )


def _parse_bs(c: _Checker, bs: Any) -> BaseStation | None:
    if bs is None:
        c.bad("bs", "missing required table [bs]")
        return None
    if not isinstance(bs, dict):
        c.bad("bs", "must be a table")
        return None
    before = len(c.problems)
    c.keys("bs", bs, _BS_REQUIRED, _BS_OPTIONAL)
    v: dict[str, Any] = {}
    if "name" in bs:
        v["name"] = c.string("bs.name", bs["name"], _NAME_RE, "name")
    if "host" in bs:
        v["host"] = c.host("bs.host", bs["host"])
    for k in ("interface", "ifb"):
        if k in bs:
            v[k] = c.string(f"bs.{k}", bs[k], _IFNAME_RE, "interface name (<= 15 chars)")
    for k in ("local", "sudo"):
        if k in bs:
            v[k] = c.boolean(f"bs.{k}", bs[k])
    if "cell_rate" in bs:
        try:
            v["cell_rate_kbit"] = parse_rate_kbit(str(bs["cell_rate"]))
        except ValueError as exc:
            c.bad("bs.cell_rate", str(exc))
            v["cell_rate_kbit"] = None
    if "shaping" in bs:
        if bs["shaping"] not in SHAPING:
            c.bad("bs.shaping", f"must be one of {', '.join(SHAPING)}, got {bs['shaping']!r}")
        v["shaping"] = bs["shaping"]
    if "ssh_port" in bs:
        v["ssh_port"] = c.port("bs.ssh_port", bs["ssh_port"])
    if "probe_port" in bs:
        v["probe_port"] = c.port_or_any("bs.probe_port", bs["probe_port"])
    if "ssh_user" in bs:
        v["ssh_user"] = c.string("bs.ssh_user", bs["ssh_user"])
    if "ssh_key" in bs:
        v["ssh_key"] = c.readable_file("bs.ssh_key", bs["ssh_key"])
    if bs.get("local") is False and "ssh_user" not in bs:
        c.bad(
            "bs.ssh_user", "required when bs.local = false (the controller reaches the BS over SSH)"
        )
    if len(c.problems) > before:
        return None
    return BaseStation(**v)


def _parse_devices(c: _Checker, devs: Any) -> list[Device]:
    if devs is None:
        c.bad("devices", "missing: add at least one [[devices]] table")
        return []
    if not isinstance(devs, list) or not devs:
        c.bad("devices", "must be a non-empty array of tables ([[devices]])")
        return []
    out: list[Device] = []
    seen: dict[str, int] = {}
    for i, d in enumerate(devs):
        w = f"devices[{i}]"
        if not isinstance(d, dict):
            c.bad(w, "must be a table")
            continue
        before = len(c.problems)
        v = _parse_device(c, w, d)
        name = v.get("name")
        if name is not None:
            if name in seen:
                c.bad(f"{w}.name", f"duplicate device name {name!r} (also devices[{seen[name]}])")
            seen.setdefault(name, i)
        if v.get("host") is not None:
            v["ipv4"] = c.ipv4(f"{w}.host", v["host"])
            if v["ipv4"] == v["host"]:
                v["ipv4"] = None  # the host is the address
        if len(c.problems) == before:
            out.append(Device(**v))
    return out


def _parse_device(c: _Checker, w: str, d: dict[str, Any]) -> dict[str, Any]:
    """One ``[[devices]]`` table's fields (problems go to ``c``)."""
    c.keys(w, d, _DEV_REQUIRED, _DEV_OPTIONAL)
    v: dict[str, Any] = {}
    if "name" in d:
        v["name"] = c.string(f"{w}.name", d["name"], _NAME_RE, "device name")
    if "host" in d:
        v["host"] = c.host(f"{w}.host", d["host"])
    for k in ("ssh_user", "workdir", "python"):
        if k in d:
            v[k] = c.string(f"{w}.{k}", d[k])
    for k in ("workdir", "python"):
        if isinstance(v.get(k), str) and not v[k].startswith(("/", "~")):
            c.bad(f"{w}.{k}", f"must be an absolute path on the device, got {v[k]!r}")
    if "hw_class" in d:
        hw = c.string(f"{w}.hw_class", d["hw_class"])
        if hw is not None and hw not in HW_CLASSES:
            c.bad(
                f"{w}.hw_class",
                f"unknown hardware class {hw!r} (one of: {', '.join(HW_CLASSES)})",
            )
        v["hw_class"] = hw
    if "memory_budget_mb" in d:
        m = d["memory_budget_mb"]
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            c.bad(f"{w}.memory_budget_mb", f"must be a positive integer (MB), got {m!r}")
        v["memory_budget_mb"] = m
    if "ssh_port" in d:
        v["ssh_port"] = c.port(f"{w}.ssh_port", d["ssh_port"])
    if "ssh_key" in d:
        v["ssh_key"] = c.readable_file(f"{w}.ssh_key", d["ssh_key"])
    if "interface" in d:
        v["interface"] = c.string(
            f"{w}.interface", d["interface"], _IFNAME_RE, "interface name (<= 15 chars)"
        )
    if "reuse_packages" in d:
        v["reuse_packages"] = _packages(c, f"{w}.reuse_packages", d["reuse_packages"])
    _device_ports(c, w, d, v)
    return v


def _device_ports(c: _Checker, w: str, d: dict[str, Any], v: dict[str, Any]) -> None:
    """A device's listening ports into ``v``: each 0 (any) or 1..65535, no two the same."""
    taken: dict[int, str] = {}
    for k in _DEV_PORTS:
        if k in d:
            v[k] = c.port_or_any(f"{w}.{k}", d[k])
        port = v.get(k, getattr(Device, k))
        if port in taken:
            c.bad(f"{w}.{k}", f"{port} is also {w}.{taken[port]} (one process per port)")
        elif port:
            taken[port] = k


def _packages(c: _Checker, where: str, value: Any) -> tuple[str, ...] | None:
    """A list of distinct package (distribution) names."""
    if not isinstance(value, list):
        c.bad(where, f"must be a list of package names, got {value!r}")
        return None
    names: list[str] = []
    for i, x in enumerate(value):
        if not isinstance(x, str) or not _PKG_RE.fullmatch(x):
            c.bad(f"{where}[{i}]", f"not a package name: {x!r}")
            return None
        if x.lower() in (n.lower() for n in names):
            c.bad(f"{where}[{i}]", f"{x!r} listed twice")
            return None
        names.append(x)
    return tuple(names)


def render_inventory(
    inv_name: str,
    known_hosts: str,
    bs: BaseStation,
    devices: list[Device],
    keys_dir: str | None = None,
) -> str:
    """Write an inventory back as TOML (used by ``testbed local up``)."""

    q = toml_str

    lines = [
        "# written by `testbed local up`",
        "[testbed]",
        f"name = {q(inv_name)}",
        f"known_hosts = {q(known_hosts)}",
        *([f"keys_dir = {q(keys_dir)}"] if keys_dir else []),
        "",
        "[bs]",
        f"name = {q(bs.name)}",
        f"host = {q(bs.host)}",
        f"interface = {q(bs.interface)}",
        f"ifb = {q(bs.ifb)}",
        f"local = {str(bs.local).lower()}",
        f"sudo = {str(bs.sudo).lower()}",
    ]
    if bs.cell_rate_kbit:
        lines.append(f'cell_rate = "{int(bs.cell_rate_kbit)}kbit"')
    if bs.shaping != "auto":
        lines.append(f"shaping = {q(bs.shaping)}")
    if bs.probe_port != PROBE_PORT:
        lines.append(f"probe_port = {bs.probe_port}")
    for d in devices:
        lines += device_toml(d)
    return "\n".join(lines) + "\n"


def toml_str(s: str) -> str:
    """``s`` as a TOML basic string; control characters (a newline in a flag's value) refused.
    Pure."""
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise ConfigError(f"inventory value {s!r}: control characters (a newline?) not allowed")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def device_toml(d: Device) -> list[str]:
    """The lines of one ``[[devices]]`` table (a blank line first; ports only where they differ
    from the defaults), as ``testbed local up`` and ``testbed init`` write them. Pure."""
    q = toml_str
    lines = ["", "[[devices]]", f"name = {q(d.name)}", f"host = {q(d.host)}"]
    lines += [f"ssh_port = {d.ssh_port}", f"ssh_user = {q(d.ssh_user)}"]
    if d.ssh_key:
        lines.append(f"ssh_key = {q(d.ssh_key)}")
    lines += [
        f"interface = {q(d.interface)}",
        f"workdir = {q(d.workdir)}",
        f"python = {q(d.python)}",
        f"hw_class = {q(d.hw_class)}",
        f"memory_budget_mb = {d.memory_budget_mb}",
    ]
    if d.reuse_packages:
        lines.append(f"reuse_packages = [{', '.join(q(p) for p in d.reuse_packages)}]")
    lines += [f"{k} = {getattr(d, k)}" for k in _DEV_PORTS if getattr(d, k) != getattr(Device, k)]
    return lines


def ssh_runner_for(inv: Inventory, dev: Device, connect_timeout_s: float = 10.0):
    """An :class:`~testbed.lab.runner.SshRunner` for a device, with the inventory's host keys."""
    from .runner import SshRunner

    return SshRunner(
        dev.host,
        port=dev.ssh_port,
        user=dev.ssh_user,
        key_path=dev.ssh_key,
        known_hosts=inv.known_hosts,
        connect_timeout_s=connect_timeout_s,
        name=dev.name,
    )


def bs_runner_for(inv: Inventory):
    """The runner for the BS: local when the controller is the BS, else SSH."""
    from .runner import LocalRunner, SshRunner

    if inv.bs.local:
        return LocalRunner(host=inv.bs.name)
    return SshRunner(
        inv.bs.host,
        port=inv.bs.ssh_port,
        user=inv.bs.ssh_user,
        key_path=inv.bs.ssh_key,
        known_hosts=inv.known_hosts,
        name=inv.bs.name,
    )
