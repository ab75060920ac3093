"""``testbed init``: a lab inventory from a few answers, its hosts' keys (fingerprints shown and
confirmed before they go into known_hosts) and the sudoers lines the BS and the devices need.

Flags answer everything; where one is missing and the terminal is interactive (and no
``--yes``), it is asked for. Nothing is written until every answer is checked (the inventory
as ``testbed inventory check`` reads it) and every host's key is fetched; sudoers lines are
printed, and written only to ``--sudoers-out`` (never to /etc: a root installs them).
"""

from __future__ import annotations

import os
import pwd
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError, HostUnreachable
from ..lab import init as I
from ..lab.inventory import HW_CLASSES, BaseStation, Device, load_inventory
from ..lab.runner import LocalRunner
from .output import Format, FormatOpt, console, emit


@dataclass
class Answers:
    """What ``testbed init`` was told (flags, then prompts)."""

    out: Path
    name: str
    bs_interface: str | None
    bs_host: str | None
    bs_ifb: str
    bs_ssh_user: str | None
    bs_ssh_key: str | None
    bs_ssh_port: int
    bs_user: str | None
    devices: list[str]
    user: str | None
    key: str | None
    ssh_port: int
    workdir: str
    python: str
    hw_class: str
    memory_mb: int
    reuse: list[str]
    known_hosts: Path | None
    sudoers_out: Path | None
    sudo: bool
    paths: dict[str, str] = field(default_factory=dict)


def _ask(a: Answers, interactive: bool) -> None:
    """Prompt for what is missing (interactive), else refuse naming each missing flag."""
    wanted = [
        ("bs_interface", "--bs-interface", "BS interface toward the devices (e.g. eth1)"),
        ("bs_host", "--bs-host", "BS address the devices reach it at"),
        ("devices", "--device", "device addresses (comma list; NAME=HOST to name one)"),
        ("user", "--user", "SSH user on the devices"),
    ]
    missing = [w for w in wanted if not getattr(a, w[0])]
    if missing and not interactive:
        raise ConfigError(
            [
                f"testbed init: {flag}: missing ({what}); give it, or run in a terminal "
                "without --yes to be asked"
                for _k, flag, what in missing
            ]
        )
    for k, _flag, what in missing:
        v = typer.prompt(what, err=True).strip()
        setattr(a, k, [v] if k == "devices" else v)
    if interactive and a.key is None:
        a.key = typer.prompt("SSH private key (empty: ssh-agent)", default="", err=True) or None


def _build(a: Answers) -> tuple[BaseStation, list[Device], Path]:
    """The BS, the devices and the known_hosts path, checked as ``inventory check`` reads
    them (ConfigError listing every problem; nothing written)."""
    kh = (a.known_hosts or a.out.with_suffix(".known_hosts")).expanduser().resolve()
    if a.hw_class not in HW_CLASSES:
        raise ConfigError(f"--hw-class: one of {', '.join(HW_CLASSES)}, not {a.hw_class!r}")
    local = a.bs_ssh_user is None
    bs = BaseStation(
        name="bs",
        host=a.bs_host or "",
        interface=a.bs_interface or "",
        ifb=a.bs_ifb,
        local=local,
        sudo=a.sudo,
        ssh_port=a.bs_ssh_port,
        ssh_user=a.bs_ssh_user,
        ssh_key=None if a.bs_ssh_key is None else I.expand_path(a.bs_ssh_key),
    )
    reuse = tuple(x.strip() for r in a.reuse for x in r.split(",") if x.strip())
    devs = [
        Device(
            name=n,
            host=h,
            ssh_user=a.user or "",
            ssh_port=a.ssh_port,
            ssh_key=None if a.key is None else I.expand_path(a.key),
            workdir=I.device_workdir(a.workdir, n),
            python=a.python,
            hw_class=a.hw_class,
            memory_budget_mb=a.memory_mb,
            reuse_packages=reuse,
        )
        for n, h in I.parse_device_specs(a.devices)
    ]
    I.check_inventory_text(I.render_lab_inventory(a.name, str(kh), bs, devs), a.out)
    if a.out.exists():
        raise ConfigError(f"{a.out}: exists already (remove it first)")
    if a.sudoers_out is not None and a.sudoers_out.resolve().is_relative_to("/etc"):
        raise ConfigError(f"--sudoers-out: {a.sudoers_out}: not under /etc (a root installs it)")
    return bs, devs, kh


def _scan(targets: list[tuple[str, str, int]]) -> list[I.HostKey]:
    """Every target's (label, host, port) keys from ``ssh-keyscan``, with fingerprints;
    HostUnreachable naming the first host that offered none."""
    here = LocalRunner()

    def one(t: tuple[str, str, int]) -> list[I.HostKey]:
        label, host, port = t
        res = here.run(["ssh-keyscan", "-T", "5", "-p", str(port), host], timeout_s=20, check=False)
        lines = I.keyscan_lines(res.stdout)
        if not lines:
            why = (res.stderr.strip().splitlines() or ["no answer"])[-1]
            raise HostUnreachable(label, f"ssh-keyscan {host} port {port}: no host key ({why})")
        fp = here.run(["ssh-keygen", "-lf", "-"], input="\n".join(lines) + "\n", timeout_s=20)
        return I.with_fingerprints(label, lines, fp.stdout)

    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return [k for keys in pool.map(one, targets) for k in keys]


def _accept(
    keys: list[I.HostKey], kh: Path, yes: bool, interactive: bool, fmt: Format
) -> list[str]:
    """Show the fingerprints, ask (unless ``yes``), return the known_hosts lines to add
    (ConfigError on a conflicting key or a refusal)."""
    existing = kh.read_text() if kh.exists() else ""
    add, conflicts = I.merge_known_hosts(existing, [k.line for k in keys], str(kh))
    if conflicts:
        raise ConfigError([f"{kh}: {c}" for c in conflicts])
    shown = [f"host keys ({len(add)} new for {kh}):"] + [
        f"  {k.host}  {k.line.split()[0]}  {k.key_type} {k.bits}  {k.fingerprint}"
        + ("" if k.line in add else "  (known)")
        for k in keys
    ]
    (sys.stderr if fmt == Format.json else sys.stdout).write("\n".join(shown) + "\n")
    if add and not yes:
        if not interactive:
            raise ConfigError(
                f"{kh}: {len(add)} new host key(s) not accepted: check the fingerprints "
                "above and pass --yes"
            )
        if not typer.confirm(f"Add {len(add)} key(s) to {kh}?", err=True):
            raise ConfigError(f"{kh}: host keys refused; nothing written")
    return add


def _sudoers(a: Answers, bs: BaseStation, devs: list[Device]) -> str:
    """The sudoers text for the BS's user and the devices' users."""
    bs_user = a.bs_user or bs.ssh_user or pwd.getpwuid(os.geteuid()).pw_name
    bs_paths = {t: I.tool_path(t, bs.local, a.paths) for t, _ in I.BS_COMMANDS}
    dev_paths = {t: I.tool_path(t, False, a.paths) for t, _ in I.DEVICE_COMMANDS}
    return I.sudoers_text(
        bs_user if a.sudo else None, [d.ssh_user for d in devs], bs_paths, dev_paths
    )


def _write(path: Path, text: str, append: bool = False) -> None:
    """Write (or append to) ``path``; a new file goes in whole (``.part``, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        with open(path, "a") as fh:
            fh.write(text)
        return
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _paths(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        tool, sep, p = v.partition("=")
        if not sep or tool not in I.DEFAULT_PATHS or not p.startswith("/"):
            raise ConfigError(
                f"--path: {v!r}: TOOL=/ABSOLUTE/PATH, TOOL one of {', '.join(I.DEFAULT_PATHS)}"
            )
        out[tool] = p
    return out


def run_init(a: Answers, yes: bool, interactive: bool, fmt: Format) -> dict[str, Any]:
    """Check the answers, fetch and confirm the host keys, write known_hosts, the inventory
    and (``--sudoers-out``) the sudoers lines; return what was done."""
    _ask(a, interactive)
    bs, devs, kh = _build(a)
    sudoers = _sudoers(a, bs, devs)
    targets = [(d.name, d.host, d.ssh_port) for d in devs]
    if not bs.local:
        targets.insert(0, (bs.name, bs.host, bs.ssh_port))
    keys = _scan(targets)
    add = _accept(keys, kh, yes, interactive, fmt)
    inv_text = I.render_lab_inventory(a.name, str(kh), bs, devs)
    _write(kh, "".join(ln + "\n" for ln in add), append=True)
    _write(a.out, inv_text)
    inv = load_inventory(a.out)  # as `testbed inventory check` reads it
    if a.sudoers_out is not None:
        _write(a.sudoers_out, sudoers)
    return {
        "inventory": str(a.out),
        "devices": [d.name for d in inv.devices],
        "known_hosts": str(kh),
        "keys": [
            {
                "host": k.host,
                "type": k.key_type,
                "bits": k.bits,
                "fingerprint": k.fingerprint,
                "added": k.line in add,
            }
            for k in keys
        ],
        "sudoers": sudoers,
        "sudoers_out": None if a.sudoers_out is None else str(a.sudoers_out),
    }


def _show(res: dict[str, Any]) -> None:
    """:func:`run_init`'s result for a human: what was written, the sudoers lines, what next."""
    console.print(
        f"wrote {res['inventory']} ({len(res['devices'])} devices); "
        f"{sum(k['added'] for k in res['keys'])} key(s) added to {res['known_hosts']}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        "sudoers lines (install as root: visudo -cf FILE, then /etc/sudoers.d/, 0440):",
        highlight=False,
    )
    sys.stdout.write(res["sudoers"])
    if res["sudoers_out"]:
        console.print(f"(also written to {res['sudoers_out']})", highlight=False)
    console.print(f"next: testbed inventory check {res['inventory']}", highlight=False)


_O = typer.Option
_BS_SSH_USER = _O(
    None,
    "--bs-ssh-user",
    help="Reach the BS over SSH as this user (default: the controller runs on the BS).",
)
_BS_USER = _O(
    None, "--bs-user", help="BS user for the sudoers line (default: --bs-ssh-user, else you)."
)
_KNOWN = _O(
    None,
    "--known-hosts",
    help="known_hosts to add the keys to (default: OUT's stem + .known_hosts).",
)
_PATH = _O(
    [],
    "--path",
    help="TOOL=/abs/path for a sudoers line (tc, ip, ethtool, nvpmodel, jetson_clocks).",
)

_DEVICE = _O([], "--device", help="HOST or NAME=HOST (repeat, or a comma list).")
_REUSE = _O([], "--reuse", help="reuse_packages, e.g. torch,numpy (JetPack's).")
_SUDOERS_OUT = _O(None, "--sudoers-out", help="Also write the sudoers lines here (not /etc).")


def init_cmd(
    out: Path = typer.Argument(..., help="The inventory file to write.", show_default=False),
    name: str = _O("lab", "--name", help="The testbed's name."),
    bs_interface: str | None = _O(None, "--bs-interface", help="BS interface toward devices."),
    bs_host: str | None = _O(None, "--bs-host", help="BS address the devices reach it at."),
    bs_ifb: str = _O("ifb-tb0", "--bs-ifb", help="ifb device for uplink shaping."),
    bs_ssh_user: str | None = _BS_SSH_USER,
    bs_ssh_key: str | None = _O(None, "--bs-ssh-key", help="Key for --bs-ssh-user."),
    bs_ssh_port: int = _O(22, "--bs-ssh-port"),
    bs_user: str | None = _BS_USER,
    device: list[str] = _DEVICE,
    user: str | None = _O(None, "--user", help="SSH user on the devices."),
    key: str | None = _O(None, "--key", help="Devices' SSH private key (default: ssh-agent)."),
    ssh_port: int = _O(22, "--ssh-port", help="Devices' SSH port."),
    workdir: str = _O("~/moe-testbed", "--workdir", help="Device workdir ({name}: its name)."),
    python: str = _O("/usr/bin/python3", "--python", help="Device Python."),
    hw_class: str = _O("orin-agx", "--hw-class", help=f"One of {', '.join(HW_CLASSES)}."),
    memory_mb: int = _O(8000, "--memory-mb", help="Device memory budget, MB."),
    reuse: list[str] = _REUSE,
    known_hosts: Path | None = _KNOWN,
    sudoers_out: Path | None = _SUDOERS_OUT,
    sudo: bool = _O(True, "--sudo/--no-sudo", help="bs.sudo: changes through sudo -n."),
    path: list[str] = _PATH,
    yes: bool = _O(False, "--yes", "-y", help="Ask nothing: flags only, accept the keys shown."),
    fmt: Format = FormatOpt,
) -> None:
    """Write a lab inventory, add its hosts' keys to known_hosts, print the sudoers lines."""
    a = Answers(
        out.expanduser().resolve(), name, bs_interface, bs_host, bs_ifb, bs_ssh_user, bs_ssh_key,
        bs_ssh_port, bs_user, list(device), user, key, ssh_port, workdir, python, hw_class,
        memory_mb, list(reuse), known_hosts, sudoers_out, sudo, _paths(list(path)),
    )  # fmt: skip
    res = run_init(a, yes, not yes and sys.stdin.isatty(), fmt)
    if fmt == Format.json:
        emit(fmt, res)
    else:
        _show(res)
