"""An arm64 Debian userland for local-testbed devices, run under qemu-user.

A device made ``--arm64`` runs its sshd, its Python and its agent from an arm64 Debian root,
so the controller sees what it sees on a Jetson: ``uname -m`` and Python say ``aarch64``, wheels
are resolved for ``manylinux_*_aarch64`` and the device's own Python, and a system torch is
there to reuse (``reuse_packages = ["torch", "numpy"]``, like JetPack's).

The root. Built once by :func:`ensure_root` and cached under :func:`cache_base`
(``/var/cache/moe-edge-testbed``, ``TESTBED_ARM64_CACHE`` overrides) in a folder named after the
hash of :func:`recipe` (suite, packages, system wheels): ``debootstrap --arch=arm64
--variant=minbase`` from the mirror this host's apt uses (:func:`mirror_from_sources`), then
torch and numpy for aarch64 put into its ``/usr/lib/python3/dist-packages`` by *this host's*
pip (``pip install --target --platform manylinux_2_28_aarch64 --no-deps``: no pip runs under
emulation for them). PyPI's aarch64 torch from 2.7 on is a CUDA build that needs gigabytes of
NVIDIA wheels, so the root pins :data:`SYSTEM_WHEELS` (torch 2.6.0, CPU-only on aarch64, as
JetPack 6 ships torch 2.x). The build runs in a temporary folder beside the cache, renamed into
place when complete, under a lock; ``debootstrap`` runs in its own mount namespace (``unshare
-m``), so its ``/proc`` and ``/sys`` mounts vanish with it even when it is killed. A failed or
interrupted build leaves no root (the next build sweeps stale temporary folders).

qemu. Running arm64 binaries needs binfmt_misc mounted and ``qemu-aarch64`` registered with
the F flag (the interpreter is opened at registration, so it works inside a chroot), from
Debian's ``/usr/lib/binfmt.d/qemu-aarch64.conf``. :func:`ensure_binfmt` does only what is
absent and says what it did; :func:`release_binfmt` undoes exactly that once no process on this
host runs under qemu-aarch64 any more (a machine with systemd-binfmt keeps its own entry).

Per device: an overlay (the cached root read-only below, an upper folder in the testbed's state
dir) mounted in a private mount namespace (``unshare -m``) together with ``/proc``, ``/dev``,
``/sys`` and the device's state folder (same path inside as outside: host key, sshd config, PID
file, workdir), then ``chroot`` into it and ``exec`` the root's own ``/usr/sbin/sshd``
(:func:`sshd_script`). The mounts exist only in that namespace, so they are gone when its last
process (the sshd, the agents it started) ends: ``local down`` stops those by PID and nothing
stays mounted on the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TestbedError

SUITE = "bookworm"
#: Debian packages of the root besides minbase (procps: ``kill``, which the controller runs;
#: iproute2: ``ip``, as on a Jetson)
PACKAGES: tuple[str, ...] = ("python3", "openssh-server", "procps", "iproute2")
#: put into the root's system site-packages by the host's pip, for cp311 aarch64, no deps
#: resolved (pip would evaluate torch's x86-only CUDA markers against this host)
SYSTEM_WHEELS: tuple[str, ...] = (
    "torch==2.6.0",
    "numpy==2.2.6",
    "filelock==4.3.1",
    "typing-extensions==4.16.0",
    "sympy==1.13.1",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
    "fsspec==2026.9.0",
)
#: what the device's inventory entry reuses from the root (as a Jetson reuses JetPack's)
REUSE = ("torch", "numpy")
PYTHON = "/usr/bin/python3"
PYTHON_TAG = "3.11"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MARKER = ".testbed-root.json"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
ENTRY = "qemu-aarch64"
L4T_RE = re.compile(r"R(\d{2})\.(\d+)(?:\.(\d+))?")


def cache_base() -> Path:
    """Where arm64 roots are cached (``TESTBED_ARM64_CACHE`` overrides); outside any clone."""
    return Path(os.environ.get("TESTBED_ARM64_CACHE", "/var/cache/moe-edge-testbed"))


def recipe() -> dict[str, Any]:
    """What the root is made of: its folder name hashes this (the mirror is left out). Pure."""
    return {
        "arch": "arm64",
        "suite": SUITE,
        "variant": "minbase",
        "packages": list(PACKAGES),
        "system_wheels": list(SYSTEM_WHEELS),
        "python": PYTHON_TAG,
        "platforms": list(WHEEL_PLATFORMS),
    }


def recipe_hash(r: dict[str, Any]) -> str:
    """12 hex digits of the recipe's canonical JSON. Pure."""
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:12]


def root_path(base: Path | None = None) -> Path:
    """The cached root of the current :func:`recipe`."""
    return (base or cache_base()) / f"arm64-{SUITE}-{recipe_hash(recipe())}"


def mirror_from_sources(texts: Iterable[str], suite: str = SUITE) -> str | None:
    """The Debian mirror this host's apt uses for ``suite`` (not its -updates or -security),
    from sources.list lines or deb822 ``.sources`` stanzas; None if there is none. Pure."""
    for text in texts:
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                return parts[1].rstrip("/")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            if (
                "deb" in fields.get("types", "").split()
                and suite in fields.get("suites", "").split()
            ):
                uris = fields.get("uris", "").split()
                if uris:
                    return uris[0].rstrip("/")
    return None


def host_mirror() -> str:
    """The mirror of this host's apt sources for :data:`SUITE`, else :data:`DEFAULT_MIRROR`."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    texts = []
    for f in files:
        try:
            texts.append(f.read_text())
        except OSError:
            pass
    return mirror_from_sources(texts) or DEFAULT_MIRROR


def l4t_release_text(release: str) -> str:
    """``/etc/nv_tegra_release`` as L4T writes it, for ``--l4t R35.4.1``; ConfigError naming
    ``--l4t`` otherwise. Pure."""
    m = L4T_RE.fullmatch(release.strip())
    if not m:
        raise ConfigError(f"--l4t: {release!r} is not an L4T release like R35.4.1 or R36.4")
    major, minor, patch = m.group(1), m.group(2), m.group(3)
    revision = f"{minor}.{patch}" if patch is not None else minor
    return (
        f"# R{major} (release), REVISION: {revision}, GCID: 00000000, BOARD: t186ref, "
        "EABI: aarch64, DATE: Thu Jan  1 00:00:00 UTC 1970\n"
        "# written by `testbed local up --l4t` (an emulated device, no Tegra here)\n"
        "TARGET_USERSPACE_LIB_DIR=nvidia\n"
        "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/tegra\n"
    )


def root_info(path: Path) -> dict[str, Any] | None:
    """The marker of a complete root (what it was built from, when, in how long), or None."""
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _run(argv: list[str], what: str, timeout_s: float) -> None:
    """Run a build step in its own process group (killed whole on timeout, error or Ctrl-C:
    no dpkg left writing into a folder being removed); TestbedError naming ``what`` with the
    output's last line on failure."""
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise TestbedError(f"{what}: {argv[0]} not found (apt-get install {argv[0]})") from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise TestbedError(f"{what}: no result after {timeout_s:g} s") from None
        raise
    if proc.returncode != 0:
        tail = (err.strip() or out.strip()).splitlines()[-1:] or [""]
        raise TestbedError(f"{what} failed (exit {proc.returncode}): {tail[0]}")


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    out = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == str(path) or mp.startswith(f"{path}/"):
                out.append(mp)
    except (OSError, IndexError):
        pass
    return sorted(out, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove ``path``, first unmounting anything mounted below it (never descend into a
    mount: ``rm -r`` over a bound ``/dev`` would delete the host's device nodes)."""
    for mp in _mounts_under(path):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
    if path.exists() and not _mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)


def _debootstrap(dest: Path, mirror: str) -> None:
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "debootstrap",
        "--arch=arm64",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(dest),
        mirror,
    ]
    _run(argv, f"debootstrap --arch=arm64 {SUITE} from {mirror}", 1800)


def _system_wheels(dest: Path) -> None:
    target = dest / "usr" / "lib" / "python3" / "dist-packages"
    argv = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    argv += ["--no-deps", "--only-binary=:all:", "--implementation", "cp"]
    argv += ["--python-version", PYTHON_TAG, "--target", str(target)]
    for p in WHEEL_PLATFORMS:
        argv += ["--platform", p]
    _run([*argv, *SYSTEM_WHEELS], "pip install of the arm64 system wheels", 1800)


def _finish_root(dest: Path, mirror: str, seconds: dict[str, float]) -> None:
    """Drop the host keys openssh-server's install made (each device makes its own) and write
    the marker that makes the root complete."""
    for key in (dest / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (dest / "run" / "sshd").mkdir(parents=True, exist_ok=True)
    info = {
        "recipe": recipe(),
        "hash": recipe_hash(recipe()),
        "mirror": mirror,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
    }
    (dest / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def _build(path: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Build the root into a temporary folder beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove_tree(tmp)
    mirror = host_mirror()
    binfmt = ensure_binfmt()
    seconds: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        say(f"debootstrap --arch=arm64 --variant=minbase {SUITE} from {mirror} (about 2-5 min)")
        _debootstrap(tmp, mirror)
        seconds["debootstrap"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        say(f"system wheels for aarch64 by this host's pip: {', '.join(SYSTEM_WHEELS[:2])}")
        _system_wheels(tmp)
        seconds["system_wheels"] = round(time.monotonic() - t0, 1)
        _finish_root(tmp, mirror, seconds)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            remove_tree(old)
        os.replace(tmp, path)
    finally:
        remove_tree(tmp)
        release_binfmt(binfmt)
    return root_info(path) or {}


def ensure_root(rebuild: bool = False, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The cached arm64 root (built if missing or ``rebuild``); its marker plus ``path`` and
    ``built`` (whether this call built it). A rebuild is refused while anything runs under
    qemu-aarch64: a testbed's arm64 devices have the root mounted below their overlays."""
    say = say or (lambda _m: None)
    path = root_path()
    busy = qemu_pids() if rebuild else []
    if busy:
        raise TestbedError(
            f"--rebuild: {len(busy)} processes run under qemu-aarch64 (pid {busy[0]}; a "
            "testbed with arm64 devices is up?): take it down first (testbed local down)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".arm64.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in path.parent.glob(f".{path.name}.*"):
            remove_tree(stale)  # an earlier build killed before its own cleanup
        info = root_info(path)
        built = False
        if info is None or rebuild:
            info = _build(path, say)
            built = True
    return {**info, "path": str(path), "built": built}


def cached_roots(base: Path | None = None) -> list[dict[str, Any]]:
    """Every complete root in the cache (current or of an older recipe), with its size."""
    base = base or cache_base()
    out = []
    for p in sorted(base.glob("arm64-*")) if base.is_dir() else []:
        info = root_info(p)
        if info is not None:
            du = subprocess.run(["du", "-sb", str(p)], capture_output=True, text=True, check=False)
            size = int(du.stdout.split()[0]) if du.returncode == 0 and du.stdout else None
            current = p == root_path(base)
            out.append({**info, "path": str(p), "size_bytes": size, "current": current})
    return out


# --- qemu-user through binfmt_misc -------------------------------------------------------


def qemu_interpreter() -> str:
    """The interpreter named by Debian's binfmt line for qemu-aarch64 (must exist)."""
    try:
        line = BINFMT_CONF.read_text().strip()
    except OSError:
        raise TestbedError(
            f"{BINFMT_CONF} missing: install qemu-user-static (apt-get install qemu-user-static)"
        ) from None
    interp = line.split(":")[6] if line.count(":") >= 6 else ""
    if not interp or not os.path.exists(interp):
        raise TestbedError(
            f"{BINFMT_CONF}: interpreter {interp!r} not found: reinstall qemu-user-static"
        )
    return interp


def binfmt_flags(entry_text: str) -> str:
    """The ``flags:`` of a binfmt_misc entry file's text ('' if none). Pure."""
    for line in entry_text.splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


#: what the testbed did to binfmt_misc on this host, whichever testbed or build did it: the
#: last ``local down`` (or build) with nothing left under qemu undoes it, even when the testbed
#: that registered it went down first while another still ran arm64 devices
BINFMT_RECORD = Path(os.environ.get("TESTBED_BINFMT_RECORD", "/run/moe-edge-testbed/binfmt.json"))


def _binfmt_record() -> dict[str, bool]:
    try:
        data = json.loads(BINFMT_RECORD.read_text())
    except (OSError, ValueError):
        return {}
    return {k: bool(data.get(k)) for k in ("mounted", "registered")}


def _write_binfmt_record(rec: dict[str, bool]) -> None:
    if any(rec.values()):
        BINFMT_RECORD.parent.mkdir(parents=True, exist_ok=True)
        BINFMT_RECORD.write_text(json.dumps(rec))
    else:
        BINFMT_RECORD.unlink(missing_ok=True)


def ensure_binfmt() -> dict[str, bool]:
    """binfmt_misc mounted and qemu-aarch64 registered with the F flag; does only what is
    absent and returns what it did (``mounted``, ``registered``) for :func:`release_binfmt`."""
    interp = qemu_interpreter()
    did = {"mounted": False, "registered": False}
    if not (BINFMT / "register").exists():
        res = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise TestbedError(
                f"binfmt_misc cannot be mounted on {BINFMT} (this kernel has no binfmt_misc?): "
                f"{res.stderr.strip()}"
            )
        did["mounted"] = True
    entry = BINFMT / ENTRY
    if not entry.exists():
        try:
            (BINFMT / "register").write_text(BINFMT_CONF.read_text().strip() + "\n")
        except OSError as exc:
            release_binfmt(did)
            raise TestbedError(f"registering {ENTRY} in {BINFMT}: {exc}") from None
        did["registered"] = True
    if any(did.values()):
        rec = _binfmt_record()
        _write_binfmt_record({k: v or rec.get(k, False) for k, v in did.items()})
    text = entry.read_text()
    if not text.startswith("enabled") or "F" not in binfmt_flags(text):
        release_binfmt(did)
        raise TestbedError(
            f"{entry} is {'disabled' if not text.startswith('enabled') else 'registered without'}"
            f" the F flag, so {interp} cannot run inside a chroot: re-register it from "
            f"{BINFMT_CONF} (echo -1 > {entry}; cat {BINFMT_CONF} > {BINFMT}/register)"
        )
    return did


def qemu_pids() -> list[int]:
    """Processes on this host that run under the qemu-aarch64 interpreter."""
    try:
        interp = os.path.realpath(qemu_interpreter())
    except TestbedError:
        return []
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.path.realpath(p / "exe") == interp:
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def release_binfmt(did: dict[str, Any] | None) -> list[str]:
    """Undo what :func:`ensure_binfmt` did (``did``) or any testbed recorded in
    :data:`BINFMT_RECORD`, once nothing runs under qemu-aarch64 any more; returns what was
    undone."""
    undone: list[str] = []
    rec = _binfmt_record()
    want = {k: bool((did or {}).get(k)) or rec.get(k, False) for k in ("mounted", "registered")}
    if not any(want.values()) or qemu_pids():
        return undone
    entry = BINFMT / ENTRY
    if want["registered"] and entry.exists():
        try:
            entry.write_text("-1\n")
            undone.append(f"unregistered {ENTRY}")
        except OSError:
            pass
    left = {"registered": want["registered"] and entry.exists(), "mounted": False}
    others = [p for p in BINFMT.glob("*") if p.name not in ("register", "status")]
    if want["mounted"] and not others:
        res = subprocess.run(["umount", str(BINFMT)], capture_output=True, check=False)
        if res.returncode == 0:
            undone.append(f"unmounted {BINFMT}")
    left["mounted"] = want["mounted"] and (BINFMT / "register").exists()
    _write_binfmt_record(left)
    return undone


# --- one device ---------------------------------------------------------------------------


def device_root_dirs(state_dir: Path, device: str) -> dict[str, Path]:
    """The overlay folders of ``device`` in a testbed's state dir. Pure."""
    base = state_dir / "roots" / device
    return {"upper": base / "upper", "work": base / "ovlwork", "merged": base / "merged"}


def prepare_device_root(
    state_dir: Path, device: str, dev_dir: Path, l4t: str | None = None
) -> dict[str, Path]:
    """Make the overlay folders; an ``/etc/nv_tegra_release`` in the upper one if ``l4t``."""
    dirs = device_root_dirs(state_dir, device)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(dirs["upper"], 0o755)
    for sub in (f"./{dev_dir}", "run/sshd"):
        (dirs["upper"] / sub).mkdir(parents=True, exist_ok=True)
    if l4t is not None:
        (dirs["upper"] / "etc").mkdir(exist_ok=True)
        (dirs["upper"] / "etc" / "nv_tegra_release").write_text(l4t_release_text(l4t))
    return dirs


def sshd_script(root: Path, dirs: dict[str, Path], dev_dir: Path, sshd_args: list[str]) -> str:
    """The shell script, run under ``unshare -m`` in the device's namespace, that mounts the
    device's root (overlay, /proc, /dev, /sys, its state folder) and becomes its sshd. Pure."""
    q = shlex.quote
    m = dirs["merged"]
    opts = f"lowerdir={root},upperdir={dirs['upper']},workdir={dirs['work']}"
    return "; ".join(
        [
            "set -e",
            f"mount -t overlay overlay -o {q(opts)} {q(str(m))}",
            f"mount -t proc proc {q(str(m / 'proc'))}",
            f"mount --rbind /dev {q(str(m / 'dev'))}",
            f"mount --rbind /sys {q(str(m / 'sys'))}",
            f"mount --bind {q(str(dev_dir))} {q(str(m) + str(dev_dir))}",
            f"exec chroot {q(str(m))} /usr/sbin/sshd {shlex.join(sshd_args)}",
        ]
    )


def sshd_argv(root: Path, dirs: dict[str, Path], dev_dir: Path, sshd_args: list[str]) -> list[str]:
    """argv (to run with ``ip netns exec``) of the arm64 device's sshd; its PID stays the
    sshd's (``exec``). Pure."""
    script = sshd_script(root, dirs, dev_dir, sshd_args)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
