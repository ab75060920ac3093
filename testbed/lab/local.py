"""The local testbed: each device is a network namespace with its own sshd.

``up`` creates, per device, a namespace ``tb-NAME-dI`` holding one end of a veth pair
(``eth0``, the device's only address), the other end enslaved to a bridge ``tb-NAME`` on
this host that carries the BS address — so the BS has *one* interface toward all devices,
as in a lab, and the same HTB/ifb shaping applies. Each namespace runs its own sshd (own
host key, key-only auth, listening only on the device's address) and gets its own workdir.
``up`` writes an inventory, a known_hosts file and a client key, and a state file.

Everything ``up`` creates is named after the testbed (so two testbeds coexist) and journaled
in the state file before it is created, so ``down`` removes all of it — also after a crash
or an ``up`` killed halfway (it sweeps namespaces and links by their exact name pattern and
stops only processes that run inside our namespaces or that it recorded itself).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NeedsRoot, TestbedError
from ..net.offloads import turn_offloads_off
from ..net.shaper import TcShaper
from ..net.tc import LinkSpec
from . import arm64 as a64
from .inventory import BaseStation, Device, render_inventory
from .provision import AGENT_PACKAGES
from .runner import LocalRunner

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")
DEVICE_HOST_OFFSET = 10
MAX_DEVICES = 64


def state_root() -> Path:
    """Where testbeds keep their state (``TESTBED_STATE_DIR`` overrides)."""
    return Path(os.environ.get("TESTBED_STATE_DIR", "/var/lib/moe-edge-testbed"))


@dataclass(frozen=True)
class Names:
    """Every kernel object name of testbed ``name`` — one place, used by up, down, sweep."""

    name: str

    @property
    def bridge(self) -> str:
        """The bridge on this host that carries the BS address and every device's veth."""
        return f"tb-{self.name}"

    @property
    def ifb(self) -> str:
        """The ifb device that the uplink (device -> BS) is redirected to for shaping."""
        return f"tbi-{self.name}"

    def netns(self, i: int) -> str:
        """The network namespace of device ``i``."""
        return f"tb-{self.name}-d{i}"

    def veth(self, i: int) -> str:
        """The host end (on the bridge) of device ``i``'s veth pair."""
        return f"tb-{self.name}-{i}"

    def is_our_netns(self, ns: str) -> bool:
        """Whether namespace ``ns`` matches this testbed's pattern (what ``down`` may delete)."""
        return re.fullmatch(rf"tb-{re.escape(self.name)}-d\d+", ns) is not None

    def is_our_link(self, link: str) -> bool:
        """Whether link ``link`` is this testbed's bridge, ifb or a device veth."""
        return (
            link in (self.bridge, self.ifb)
            or re.fullmatch(rf"tb-{re.escape(self.name)}-\d+", link) is not None
        )


def check_name(name: str) -> None:
    """Refuse a testbed name that cannot become part of an interface name (ConfigError)."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"--name: {name!r} must be 1-8 lowercase letters/digits, starting "
            "with a letter (it becomes part of interface names)"
        )


def require_root(command: str) -> None:
    """Raise NeedsRoot, naming ``testbed {command}``, unless running as root."""
    if os.geteuid() != 0:
        raise NeedsRoot(
            f"`testbed {command}` needs root to create network namespaces, "
            f"veths, tc qdiscs and sshds: run `sudo testbed {command} ...`"
        )


class State:
    """The journal of one testbed: written before each thing is created."""

    def __init__(self, name: str):
        self.name = name
        self.dir = state_root() / name
        self.path = self.dir / "state.json"
        self.data: dict[str, Any] = {}

    def exists(self) -> bool:
        """Whether the state file is there (the testbed was brought up, maybe halfway)."""
        return self.path.exists()

    def load(self) -> dict[str, Any]:
        """Read the state file into :attr:`data` (``{}`` if missing or unreadable)."""
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        return self.data

    def save(self) -> None:
        """Write :attr:`data` atomically (a temporary file, then rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def _ip(argv: list[str], check: bool = True, netns: str | None = None):
    return LocalRunner(netns=netns).run(argv, timeout_s=20, check=check)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    """Subnets in use by this host's addresses/routes and by other testbeds' state."""
    used: set[ipaddress.IPv4Network] = set()
    res = _ip(["ip", "-j", "-4", "route", "show", "table", "all"], check=False)
    for r in json.loads(res.stdout or "[]") if res.ok else []:
        dst = r.get("dst", "")
        if dst and dst != "default":
            try:
                used.add(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
            except ValueError:
                pass
    root = state_root()
    if root.is_dir():
        for st in root.glob("*/state.json"):
            try:
                used.add(ipaddress.ip_network(json.loads(st.read_text())["subnet"]))
            except (OSError, ValueError, KeyError):
                pass
    return used


def pick_subnet(used: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """First /24 of 10.213.0.0/16 that overlaps nothing in ``used`` (pure)."""
    for net in SUBNET_BASE.subnets(new_prefix=24):
        if net.network_address.packed[2] == 0:
            continue
        if not any(net.overlaps(u) for u in used):
            return net
    raise TestbedError("no free /24 left in 10.213.0.0/16 for a local testbed")


def _sshd_config(d: Path, addr: str) -> str:
    return "\n".join(
        [
            f"ListenAddress {addr}",
            "Port 22",
            f"HostKey {d / 'ssh_host_ed25519_key'}",
            f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            # the state dir may sit under a world-writable /tmp (tests); the key file's own
            # folder is 0700 and ours, which is what StrictModes would protect
            "StrictModes no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _wait_port(addr: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=0.5) as s:
                s.settimeout(2)
                if s.recv(4) == b"SSH-":
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def check_arm64(devices: int, arm64: int, l4t: str | None) -> None:
    """Refuse an arm64 count outside 0..devices, or ``--l4t`` without arm64 devices or not
    like ``R35.4.1`` (ConfigError naming the option). Pure."""
    if not 0 <= arm64 <= devices:
        raise ConfigError(f"--arm64: must be 0..{devices} (of --devices {devices}), got {arm64}")
    if l4t is not None:
        if arm64 == 0:
            raise ConfigError("--l4t: only arm64 devices carry an L4T release; add --arm64 N")
        a64.l4t_release_text(l4t)


def _preflight(name: str, devices: int, arm64: int = 0, l4t: str | None = None) -> str:
    """Refuse to start (bad name or count, not root, missing tools, testbed exists); returns the
    sshd to run."""
    check_name(name)
    require_root("local up")
    if not 1 <= devices <= MAX_DEVICES:
        raise ConfigError(f"--devices: must be 1..{MAX_DEVICES}, got {devices}")
    check_arm64(devices, arm64, l4t)
    if arm64:
        a64.qemu_interpreter()
        for tool in ("debootstrap", "unshare", "chroot"):
            if shutil.which(tool) is None:
                raise TestbedError(f"`{tool}` not found: --arm64 needs debootstrap and util-linux")
    for tool in ("ip", "tc", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise TestbedError(f"`{tool}` not found: install iproute2 and openssh-client")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        raise TestbedError(
            "sshd not found: install openssh-server (apt-get install openssh-server)"
        )
    st = State(name)
    if st.exists():
        raise ConfigError(
            f"--name: testbed {name!r} exists already ({st.path}); run "
            f"`testbed local down --name {name}` first"
        )
    return sshd


def _ssh_keygen(path: Path, comment: str) -> None:
    _ip(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _open_state(st: State, inv_path: Path) -> ipaddress.IPv4Network:
    """Pick a free subnet and start the journal (status ``creating``); returns the subnet."""
    subnet = pick_subnet(_used_subnets())
    st.data = {
        "name": st.name,
        "subnet": str(subnet),
        "status": "creating",
        "inventory": str(inv_path),
        "devices": [],
        "pids": [],
        "created": time.time(),
    }
    st.save()
    os.chmod(st.dir, 0o700)
    return subnet


def _add_bridge(names: Names, bs_addr: str, prefixlen: int) -> None:
    """The BS's one interface toward every device: a bridge carrying the BS address."""
    _ip(["ip", "link", "add", names.bridge, "type", "bridge"])
    _ip(["ip", "addr", "add", f"{bs_addr}/{prefixlen}", "dev", names.bridge])
    _ip(["ip", "link", "set", names.bridge, "up"])


def _add_netns(st: State, names: Names, i: int, addr: str, prefixlen: int) -> None:
    """Device ``i``'s namespace and veth pair (``eth0`` inside, the other end on the bridge),
    offloads off on both ends (recorded in the journal)."""
    ns, veth = names.netns(i), names.veth(i)
    _ip(["ip", "netns", "add", ns])
    _ip(["ip", "link", "set", "lo", "up"], netns=ns)
    _ip(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    _ip(["ip", "link", "set", veth, "master", names.bridge])
    _ip(["ip", "link", "set", veth, "up"])
    _ip(["ip", "addr", "add", f"{addr}/{prefixlen}", "dev", "eth0"], netns=ns)
    _ip(["ip", "link", "set", "eth0", "up"], netns=ns)
    # no super-packets on either end (TSO/GSO on the sender's side, GRO on the
    # receiver's): the BS's qdiscs then see, and charge, every frame
    st.data["devices"][-1]["offloads"] = {
        "veth": turn_offloads_off(LocalRunner(), veth),
        "eth0": turn_offloads_off(LocalRunner(netns=ns), "eth0"),
    }
    st.save()


def _start_sshd(
    st: State,
    ns: str,
    d: Path,
    addr: str,
    sshd: str,
    client_pub: str,
    launch: Callable[[list[str]], list[str]] | None = None,
) -> str:
    """The device's own sshd in its namespace (own host key, our client key only), its PID
    journaled; returns its known_hosts line. ``launch`` turns sshd's arguments into the argv
    that starts it (an arm64 device: mounts and chroot, :func:`.arm64.sshd_argv`)."""
    (d / "work").mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    _ssh_keygen(d / "ssh_host_ed25519_key", f"{ns}-host")
    (d / "authorized_keys").write_text(client_pub)
    os.chmod(d / "authorized_keys", 0o600)
    (d / "sshd_config").write_text(_sshd_config(d, addr))
    args = ["-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")]
    pid = LocalRunner(netns=ns).spawn(
        launch(args) if launch else [sshd, *args],
        log_path=str(d / "sshd.out"),
        pid_path=str(d / "sshd.spawn.pid"),
    )
    st.data["pids"].append({"pid": pid, "marker": str(d / "sshd_config")})
    st.save()
    hk = (d / "ssh_host_ed25519_key.pub").read_text().split()
    return f"{addr} {hk[0]} {hk[1]}"


def _wait_sshds(st: State, devs: list[Device]) -> None:
    """Wait until every device's sshd answers (an emulated arm64 one gets longer); raises
    naming the first that does not."""
    arm = {x["name"] for x in st.data["devices"] if x.get("arch") == "arm64"}
    for dv in devs:
        if not _wait_port(dv.host, 22, 60 if dv.name in arm else 10):
            d = st.dir / "devices" / dv.name
            tail: list[str] = []
            # sshd's own log, else what ran before it (an arm64 device's mounts and chroot)
            for log in (d / "sshd.log", d / "sshd.out"):
                if not tail and log.exists():
                    tail = log.read_text().strip().splitlines()[-1:]
            raise TestbedError(
                f"{dv.name}: sshd did not come up on {dv.host}:22 "
                f"{'(' + tail[0] + ')' if tail else ''}".strip()
            )


@dataclass(frozen=True)
class Arm64Spec:
    """Which devices of a testbed are arm64 (the last ``count``), from which root, with which
    ``/etc/nv_tegra_release`` (``l4t``, e.g. ``R35.4.1``; None: none)."""

    count: int = 0
    root: Path | None = None
    l4t: str | None = None

    def is_arm64(self, i: int, devices: int) -> bool:
        """Whether device ``i`` (1-based) of ``devices`` is an arm64 one. Pure."""
        return i > devices - self.count


def _arm64_launch(
    st: State, d: Path, name: str, arm: Arm64Spec
) -> Callable[[list[str]], list[str]]:
    """Prepare device ``name``'s overlay (journaled); returns how its sshd is started."""
    assert arm.root is not None
    dirs = a64.prepare_device_root(st.dir, name, d, arm.l4t)
    st.data["devices"][-1]["root"] = {k: str(v) for k, v in dirs.items()}
    st.save()
    return lambda args: a64.sshd_argv(arm.root, dirs, d, args)  # type: ignore[arg-type]


def _add_devices(
    st: State,
    names: Names,
    subnet: ipaddress.IPv4Network,
    sshd: str,
    memory_budget_mb: int,
    count: int,
    say: Callable[[str], None],
    arm: Arm64Spec | None = None,
) -> tuple[list[Device], list[str]]:
    """Every device: journal entry, namespace, sshd (arm64 ones from their root, under qemu);
    returns the devices and their known_hosts lines."""
    arm = arm or Arm64Spec()
    hosts = list(subnet.hosts())
    key = st.dir / "id_ed25519"
    pub = (st.dir / "id_ed25519.pub").read_text()
    devs: list[Device] = []
    known: list[str] = []
    for i in range(1, count + 1):
        ns, veth = names.netns(i), names.veth(i)
        addr = str(hosts[DEVICE_HOST_OFFSET + i - 1])
        d = st.dir / "devices" / f"dev{i}"
        is_arm = arm.is_arm64(i, count)
        st.data["devices"].append(
            {
                "name": f"dev{i}",
                "netns": ns,
                "veth": veth,
                "address": addr,
                "dir": str(d),
                "arch": "arm64" if is_arm else "host",
            }
        )
        st.save()
        say(f"dev{i}: netns {ns}, {addr}, sshd" + (" (arm64, qemu)" if is_arm else ""))
        _add_netns(st, names, i, addr, subnet.prefixlen)
        launch = _arm64_launch(st, d, f"dev{i}", arm) if is_arm else None
        known.append(_start_sshd(st, ns, d, addr, sshd, pub, launch))
        devs.append(
            Device(
                name=f"dev{i}",
                host=addr,
                ssh_user="root",
                ssh_key=str(key),
                workdir=str(d / "work"),
                python=a64.PYTHON if is_arm else _device_python(),
                hw_class="netns",
                memory_budget_mb=memory_budget_mb,
                interface="eth0",
                reuse_packages=a64.REUSE if is_arm else AGENT_PACKAGES,
            )
        )
    return devs, known


def _shape_and_write_inventory(
    st: State,
    names: Names,
    bs_addr: str,
    devs: list[Device],
    known: list[str],
    rate_kbit: float,
    inv_path: Path,
) -> None:
    """known_hosts, every link shaped at ``rate_kbit`` each way, the inventory; status ``up``."""
    kh = st.dir / "known_hosts"
    kh.write_text("\n".join(known) + "\n")
    bs = BaseStation(
        name="bs", host=bs_addr, interface=names.bridge, ifb=names.ifb, local=True, sudo=False
    )
    TcShaper(
        LocalRunner(host="bs"),
        names.bridge,
        names.ifb,
        [d.host for d in devs],
        [d.name for d in devs],
    ).setup([LinkSpec(rate_kbit)] * len(devs), [LinkSpec(rate_kbit)] * len(devs))
    inv_path.parent.mkdir(parents=True, exist_ok=True)
    # the CURVE keys `provision` makes go to the state dir: `down` removes them with it
    inv_path.write_text(render_inventory(st.name, str(kh), bs, devs, str(st.dir / "curve")))
    st.data["status"] = "up"
    st.data["rate_kbit"] = rate_kbit
    st.save()


def up(
    name: str,
    devices: int,
    rate_kbit: float,
    inventory_out: Path | None = None,
    memory_budget_mb: int = 2048,
    progress: Callable[[str], None] | None = None,
    arm64: int = 0,
    l4t: str | None = None,
) -> dict[str, Any]:
    """Create testbed ``name`` with ``devices`` namespaces, the last ``arm64`` of them running
    an arm64 userland under qemu (:mod:`.arm64`; ``l4t``: their ``/etc/nv_tegra_release``);
    return its description.

    On any error (or Ctrl-C) everything created so far is removed before re-raising.
    """
    sshd = _preflight(name, devices, arm64, l4t)
    st = State(name)
    say = progress or (lambda _m: None)
    names = Names(name)
    inv_path = (inventory_out or Path(f"{name}.inventory.toml")).resolve()
    t0 = time.monotonic()
    # the cached root first (built once, minutes): nothing of the testbed exists yet
    arm = Arm64Spec(arm64, Path(a64.ensure_root(say=say)["path"]), l4t) if arm64 else None
    try:
        subnet = _open_state(st, inv_path)
        if arm is not None:
            st.data["binfmt"] = a64.ensure_binfmt()
            st.save()
        bs_addr = str(next(subnet.hosts()))
        _ssh_keygen(st.dir / "id_ed25519", f"testbed-{name}")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        say(f"bridge {names.bridge} {bs_addr}/{subnet.prefixlen}")
        _add_bridge(names, bs_addr, subnet.prefixlen)
        devs, known = _add_devices(st, names, subnet, sshd, memory_budget_mb, devices, say, arm)
        _wait_sshds(st, devs)
        say(f"shaping {devices} links at {rate_kbit:g} kbit/s each way")
        _shape_and_write_inventory(st, names, bs_addr, devs, known, rate_kbit, inv_path)
    except BaseException:
        down(name)
        raise
    return {
        "name": name,
        "inventory": str(inv_path),
        "subnet": str(subnet),
        "bs": bs_addr,
        "devices": [
            {
                "name": d.name,
                "host": d.host,
                "netns": names.netns(k + 1),
                "arch": st.data["devices"][k]["arch"],
            }
            for k, d in enumerate(devs)
        ],
        "rate_kbit": rate_kbit,
        "elapsed_s": round(time.monotonic() - t0, 3),
    }


def _device_python() -> str:
    """The Python a namespace device uses: the controller's own interpreter (devices share
    this host's filesystem), so provisioning reuses its packages (``AGENT_PACKAGES``) and
    installs only the project wheel, offline."""
    return sys.executable or "/usr/bin/python3"


def _netns_list() -> list[str]:
    res = _ip(["ip", "-j", "netns", "list"], check=False)
    try:
        return [n["name"] for n in json.loads(res.stdout or "[]")] if res.ok else []
    except ValueError:
        return []


def _links() -> list[str]:
    res = _ip(["ip", "-j", "link", "show"], check=False)
    return [lk["ifname"] for lk in json.loads(res.stdout or "[]")] if res.ok else []


def _pid_matches(pid: int, marker: str) -> bool:
    """True if ``pid`` is still the process we started (its argv mentions ``marker``)."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _stop_pids(pids: list[int], grace_s: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for p in pids:
            try:
                os.kill(p, sig)
                alive.append(p)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            for p in list(alive):
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass
                if not Path(f"/proc/{p}").exists() or _is_zombie(p):
                    alive.remove(p)
            time.sleep(0.02)
        pids = alive


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def down(name: str) -> dict[str, Any]:
    """Remove everything of testbed ``name``. Idempotent; works from the state file, from
    exact name patterns, and from the namespaces' own process lists."""
    check_name(name)
    require_root("local down")
    names = Names(name)
    st = State(name)
    data = st.load()
    removed: dict[str, list[Any]] = {
        "processes": [],
        "netns": [],
        "links": [],
        "files": [],
        "offloads_restored": [],
        "binfmt": [],
    }
    namespaces = [ns for ns in _netns_list() if names.is_our_netns(ns)]
    # 1. processes: everything inside our namespaces, plus recorded PIDs still ours
    pids: set[int] = set()
    for ns in namespaces:
        res = _ip(["ip", "netns", "pids", ns], check=False)
        pids |= {int(x) for x in res.stdout.split() if x.isdigit()}
    for rec in data.get("pids", []):
        if _pid_matches(rec["pid"], rec["marker"]):
            pids.add(rec["pid"])
    for dv in data.get("devices", []):
        pf = Path(dv["dir"]) / "sshd.pid"
        try:
            p = int(pf.read_text().split()[0])
            if _pid_matches(p, str(Path(dv["dir"]) / "sshd_config")):
                pids.add(p)
        except (OSError, ValueError, IndexError):
            pass
    pids.discard(os.getpid())
    _stop_pids(sorted(pids))
    removed["processes"] = sorted(pids)
    # (an arm64 device's mounts lived in its sshd's own mount namespace: gone with it)
    removed["binfmt"] = a64.release_binfmt(data.get("binfmt"))
    # 2. shaping (the bridge's offloads first, from the record on the ifb), links, namespaces
    removed["offloads_restored"] = TcShaper(
        LocalRunner(host="bs"), names.bridge, names.ifb, [], []
    ).restore_offloads()
    for argv in (
        ["tc", "qdisc", "del", "dev", names.bridge, "root"],
        ["tc", "qdisc", "del", "dev", names.bridge, "ingress"],
    ):
        _ip(argv, check=False)
    for link in _links():
        if (
            names.is_our_link(link)
            and link != names.bridge
            and _ip(["ip", "link", "del", link], check=False).ok
        ):
            removed["links"].append(link)
    for ns in namespaces:
        if _ip(["ip", "netns", "del", ns], check=False).ok:
            removed["netns"].append(ns)
    if names.bridge in _links() and _ip(["ip", "link", "del", names.bridge], check=False).ok:
        removed["links"].append(names.bridge)
    # 3. files: the inventory we wrote (only if it is still ours), then the state dir
    inv = data.get("inventory")
    if inv:
        try:
            text = Path(inv).read_text()
            if text.startswith("# written by `testbed local up`") and f'name = "{name}"' in text:
                Path(inv).unlink()
                removed["files"].append(inv)
        except OSError:
            pass
    if st.dir.exists():
        a64.remove_tree(st.dir / "roots")  # never descend into a mount, should one be left
        shutil.rmtree(st.dir, ignore_errors=True)
        removed["files"].append(str(st.dir))
    return {"name": name, "removed": removed, "was_present": bool(data) or any(removed.values())}


def status(name: str) -> dict[str, Any]:
    """What exists of testbed ``name`` now."""
    check_name(name)
    names = Names(name)
    st = State(name)
    data = st.load()
    if not data:
        raise ConfigError(f"--name: no local testbed named {name!r} (no {st.path})")
    present_ns = set(_netns_list())
    out_devs = []
    for dv in data.get("devices", []):
        pf = Path(dv["dir"]) / "sshd.pid"
        sshd_pid = None
        try:
            p = int(pf.read_text().split()[0])
            sshd_pid = p if _pid_matches(p, str(Path(dv["dir"]) / "sshd_config")) else None
        except (OSError, ValueError, IndexError):
            pass
        out_devs.append(
            {
                "name": dv["name"],
                "address": dv["address"],
                "netns": dv["netns"],
                "netns_present": dv["netns"] in present_ns,
                "arch": dv.get("arch", "host"),
                "sshd_pid": sshd_pid,
            }
        )
    rates = {}
    if os.geteuid() == 0 and data.get("devices"):
        shaper = TcShaper(
            LocalRunner(host="bs"),
            names.bridge,
            names.ifb,
            [d["address"] for d in data["devices"]],
            [d["name"] for d in data["devices"]],
        )
        rates = {s.device: {"down_kbit": s.down_kbit, "up_kbit": s.up_kbit} for s in shaper.show()}
    for d in out_devs:
        d.update(rates.get(d["name"], {}))
    return {
        "name": name,
        "status": data.get("status"),
        "subnet": data.get("subnet"),
        "inventory": data.get("inventory"),
        "devices": out_devs,
    }


def list_testbeds() -> list[str]:
    """Names of the testbeds with a state file under :func:`state_root`, sorted."""
    root = state_root()
    return sorted(p.parent.name for p in root.glob("*/state.json")) if root.is_dir() else []
