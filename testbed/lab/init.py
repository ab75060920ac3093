"""``testbed init``'s pure parts: a lab inventory from a few answers, the sudoers lines the BS and
the devices need, and the host keys ``ssh-keyscan`` found, with their fingerprints.

What runs as root, and how (the controller never runs a shell as root):

* on the BS (``bs.sudo = true``, :func:`testbed.lab.runner.run_bs`): a tc change as
  ``sudo -n tc -batch -`` and a decision epoch's rates as ``sudo -n tc -j -batch -``, the lines
  on standard input; ``sudo -n ip link add|set|del ...`` (the ifb and its record; never
  ``ip netns exec``, which would be root for anything); ``sudo -n ethtool -K ...`` (offloads).
  Reads (``tc ... show``, ``ip link show``, ``ethtool -k``) need no root.
* on a Jetson (:mod:`testbed.lab.jetson`): ``sudo -n nvpmodel -q``, ``-p --verbose`` (where they
  fail without root), ``-m ID``; ``sudo -n jetson_clocks --show``. Power is read from sysfs and
  ``tegrastats`` without root.

Over SSH, the remote ``timeout`` wraps ``sudo -n CMD`` (:func:`~testbed.lab.runner.
remote_command`), so these lines are all a lab's users need; a user that is root needs none.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError
from .inventory import BaseStation, Device, device_toml, parse_inventory, toml_str

#: where ``sudo`` looks commands up (Debian's and Ubuntu's ``secure_path``)
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: a tool's path where it cannot be looked up here (a remote host; L4T keeps these)
DEFAULT_PATHS = {
    "tc": "/usr/sbin/tc",
    "ip": "/usr/sbin/ip",
    "ethtool": "/usr/sbin/ethtool",
    "nvpmodel": "/usr/sbin/nvpmodel",
    "jetson_clocks": "/usr/bin/jetson_clocks",
}
#: (tool, arguments as sudoers matches them) the BS's user may run as root
BS_COMMANDS: tuple[tuple[str, str], ...] = (
    ("tc", "-batch -"),
    ("tc", "-j -batch -"),
    ("ip", "link add *"),
    ("ip", "link set *"),
    ("ip", "link del *"),
    ("ethtool", "-K *"),
)
#: (tool, arguments) a device's user may run as root (Jetson power modes)
DEVICE_COMMANDS: tuple[tuple[str, str], ...] = (
    ("nvpmodel", "-q"),
    ("nvpmodel", "-p --verbose"),
    # one or two digits, no `*`: sudoers' `*` matches spaces too (`-m 0 -f FILE` would pass)
    ("nvpmodel", "-m [0-9]"),
    ("nvpmodel", "-m [0-9][0-9]"),
    ("jetson_clocks", "--show"),
)
_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
_DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def tool_path(tool: str, local: bool, overrides: Mapping[str, str] | None = None) -> str:
    """The absolute path of ``tool`` for a sudoers line: an override, else (``local``) the
    first in :data:`SECURE_PATH` on this machine, else :data:`DEFAULT_PATHS`."""
    if overrides and tool in overrides:
        return overrides[tool]
    found = shutil.which(tool, path=SECURE_PATH) if local else None
    return found or DEFAULT_PATHS[tool]


def sudoers_line(
    user: str,
    commands: Sequence[tuple[str, str]],
    paths: Mapping[str, str],
    where: str = "--user",
) -> str:
    """One sudoers line: ``user`` (given by the flag ``where``) may run exactly ``commands``
    (tool, arguments) as root, without a password, each by its absolute path from ``paths``.
    Pure."""
    if not _USER_RE.fullmatch(user):
        raise ConfigError(f"{where}: not a user name for sudoers: {user!r}")
    cmds = ", ".join(f"{paths[tool]} {args}" for tool, args in commands)
    return f"{user} ALL=(root) NOPASSWD: {cmds}"


def sudoers_text(
    bs_user: str | None,
    device_users: Sequence[str],
    bs_paths: Mapping[str, str],
    device_paths: Mapping[str, str],
) -> str:
    """The sudoers file ``testbed init`` prints: a line for the BS's user (None or root: none
    needed) and one for each distinct device user other than root. Pure."""
    out = [
        "# written by `testbed init`: check with `visudo -cf FILE`, install as root to",
        "# /etc/sudoers.d/ (mode 0440)",
    ]
    if bs_user and bs_user != "root":
        out += [
            "# the BS: tc changes (batch on stdin), ip link, ethtool -K",
            sudoers_line(bs_user, BS_COMMANDS, bs_paths, "--bs-user"),
        ]
    users = [u for u in dict.fromkeys(device_users) if u != "root"]
    if users:
        out.append("# the devices: Jetson power modes (nvpmodel, jetson_clocks --show)")
        out += [sudoers_line(u, DEVICE_COMMANDS, device_paths) for u in users]
    if len(out) == 2:
        out.append("# none needed: every user here is root")
    return "\n".join(out) + "\n"


# -- host keys ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostKey:
    """One key ``ssh-keyscan`` found, and its fingerprint (``ssh-keygen -lf``)."""

    host: str
    line: str
    fingerprint: str = ""
    key_type: str = ""
    bits: int = 0


def keyscan_lines(text: str) -> list[str]:
    """The key lines of ``ssh-keyscan``'s output (``HOST TYPE BASE64``; comments dropped).
    Pure."""
    return [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.lstrip().startswith("#") and len(ln.split()) >= 3
    ]


_FPR = re.compile(r"^(\d+)\s+(SHA256:\S+)\s+(.*?)\s*\((\S+)\)\s*$")


def parse_fingerprints(text: str) -> list[tuple[int, str, str, str]]:
    """``ssh-keygen -lf``'s lines (``256 SHA256:... HOST (ED25519)``) as (bits, fingerprint,
    comment, type); raises ConfigError on a line it cannot read. Pure."""
    out = []
    for ln in text.splitlines():
        if not ln.strip():
            continue
        m = _FPR.match(ln.strip())
        if m is None:
            raise ConfigError(f"ssh-keygen -lf: cannot read fingerprint line {ln.strip()!r}")
        out.append((int(m.group(1)), m.group(2), m.group(3), m.group(4)))
    return out


def with_fingerprints(host: str, lines: Sequence[str], listing: str) -> list[HostKey]:
    """``host``'s key lines paired, in order, with ``ssh-keygen -lf``'s listing of them."""
    fps = parse_fingerprints(listing)
    if len(fps) != len(lines):
        raise ConfigError(
            f"{host}: ssh-keygen listed {len(fps)} fingerprints for {len(lines)} keys"
        )
    return [HostKey(host, ln, fp, kt, bits) for ln, (bits, fp, _c, kt) in zip(lines, fps)]


def merge_known_hosts(
    existing: str, lines: Sequence[str], file: str = "FILE"
) -> tuple[list[str], list[str]]:
    """(lines to append, conflicts): a key already there for its host and type is skipped; a
    different key of the same type for the same host is a conflict (one line naming the host
    and the command that removes the old key from ``file``).
    Hashed entries (``|1|``) are not compared. Pure."""
    have: dict[tuple[str, str], str] = {}
    for ln in existing.splitlines():
        parts = ln.split()
        if len(parts) >= 3 and not parts[0].startswith(("#", "|")):
            for h in parts[0].split(","):
                have[(h, parts[1])] = parts[2]
    add, conflicts = [], []
    for ln in lines:
        host, kind, key = ln.split()[:3]
        old = have.get((host, kind))
        if old is None:
            add.append(ln)
            have[(host, kind)] = key
        elif old != key:
            conflicts.append(
                f"{host}: known_hosts has a different {kind} key (the host was re-installed, "
                f"or this is not it): remove it with `ssh-keygen -R '{host}' -f {file}` to accept"
            )
    return add, conflicts


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts (and ssh-keyscan) name ``host`` on ``port``: plain on 22, else
    ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


# -- the inventory --------------------------------------------------------------------------------
def parse_device_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """``--device`` values (each ``HOST`` or ``NAME=HOST``, or a comma list of them) as (name,
    host) pairs; unnamed ones become ``dev1``, ``dev2``, ... by position. Pure."""
    items = [x.strip() for v in values for x in v.split(",") if x.strip()]
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items, start=1):
        name, sep, host = item.partition("=")
        if not sep:
            name, host = f"dev{i}", item
        if not _DEVICE_NAME_RE.fullmatch(name) or not host:
            raise ConfigError(f"--device: {item!r} is not HOST or NAME=HOST")
        out.append((name, host))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--device: device name(s) given twice: {', '.join(dup)}")
    return out


def device_workdir(template: str, name: str) -> str:
    """A device's workdir: ``template`` with ``{name}`` replaced by the device's name (devices
    that share a filesystem, like the local testbed's namespaces, need one each)."""
    return template.replace("{name}", name)


_q = toml_str


def render_lab_inventory(
    name: str, known_hosts: str, bs: BaseStation, devices: Sequence[Device]
) -> str:
    """The inventory TOML for a lab (:mod:`testbed.lab.inventory`'s format), a remote BS's ssh
    fields included. Pure."""
    lines = [
        "# written by `testbed init` (format: testbed/lab/inventory.py)",
        "[testbed]",
        f"name = {_q(name)}",
        f"known_hosts = {_q(known_hosts)}",
        "",
        "[bs]",
        f"name = {_q(bs.name)}",
        f"host = {_q(bs.host)}",
        f"interface = {_q(bs.interface)}",
        f"ifb = {_q(bs.ifb)}",
        f"local = {str(bs.local).lower()}",
        f"sudo = {str(bs.sudo).lower()}          # tc/ip/ethtool changes through `sudo -n`",
    ]
    if not bs.local:
        lines += [f"ssh_user = {_q(bs.ssh_user or '')}", f"ssh_port = {bs.ssh_port}"]
        if bs.ssh_key:
            lines.append(f"ssh_key = {_q(bs.ssh_key)}")
    if bs.cell_rate_kbit:
        lines.append(f'cell_rate = "{int(bs.cell_rate_kbit)}kbit"')
    for d in devices:
        lines += device_toml(d)
    return "\n".join(lines) + "\n"


def expand_path(p: str, base: str | os.PathLike[str] | None = None) -> str:
    """``p`` with ``~`` expanded, made absolute (against ``base``, else the working folder)."""
    q = os.path.expanduser(p)
    return os.path.abspath(q if base is None else os.path.join(base, q))


def check_inventory_text(text: str, path: Path) -> None:
    """Check an inventory :func:`render_lab_inventory` wrote as ``testbed inventory check``
    reads it (ConfigError listing every problem), all but its known_hosts file, which is
    written only once the host keys are confirmed."""
    data = tomllib.loads(text)
    data.get("testbed", {}).pop("known_hosts", None)
    parse_inventory(data, path)
