"""Provisioning over SSH: check each device, install the agent, push expert shards, start it.

``provision(inv, model_dir)`` works on every device of an inventory at once (a thread pool,
one SSH runner per device) and returns one :class:`DeviceReport` per device; a device that
fails (unreachable, wrong Python, full disk, ...) is reported and never stops the others.
Per device, pyinfra-style: read the state (one remote Python snippet, :data:`FACTS_PY`),
compare it with what is wanted, change only what differs. A second run changes nothing: no
file is rewritten and the agent keeps its PID. The check also reads the Jetson power state
(``nvpmodel -q``/``-p --verbose``, ``jetson_clocks --show``; :mod:`testbed.lab.jetson`) into
:attr:`DeviceReport.power`, tools a device lacks recorded as not available.

What lives in the device's ``workdir``::

    venv/                 the agent's virtual environment (python -m venv --without-pip)
    wheels/               the wheelhouse pushed by the controller (+ .sha256.json cache)
    installed.json        what is installed: key = hash(project sources, wheels, reuse, python)
    experts/              expert shards (+ .sha256.json: name -> size, mtime, sha256)
    agent.pid agent.log   the detached agent (``setsid``), its output
    agent.ready.json      written by the agent once bound: endpoint, pub_endpoint, pid
    agent.json            how the running agent was started (argv, install key)

Wheels. The controller builds the project's own wheel (``pip wheel --no-deps`` on a copy of
the sources, cached under ``<cache>/wheels/project/<hash of the sources>/``, so it is built
again only when a source file changed) and obtains the wheels of the agent's dependencies
(:data:`AGENT_PACKAGES`) for the device's platform and Python with ``pip download
--only-binary=:all: --platform ... --python-version ...`` (cached under
``<cache>/wheels/deps-<platform>-<hash>/``), or takes them from ``--wheelhouse DIR`` (offline;
every ``*.whl`` there is pushed and pip resolves among them on the device). pip itself is not
needed on the device: the venv is created ``--without-pip`` and pip runs from its own wheel
(``python pip-X.whl/pip install ...``), taken from the wheelhouse, the cache or the
controller's ``ensurepip`` bundle. Everything is installed with ``--no-index``: the device
needs no internet.

Reused packages. A device's ``reuse_packages`` (JetPack's torch on a Jetson) are not installed;
the device's ``python`` is asked where it imports each from (``importlib.util.find_spec``), and
those directories are listed in ``venv/.../site-packages/moe_testbed_reuse.pth``. Chosen over
``--system-site-packages`` because it works whether the device's python is a system python, a
user install (``~/.local``) or itself a virtual environment (the local testbed's devices use the
controller's venv interpreter), and names exactly which directories are added. The added
directories come *after* the venv's own site-packages, so the installed project wins over any
other copy there; ``.pth`` files inside them are not processed.

Agents are started detached (``runner.spawn``: ``setsid``, log and pid file) with the venv's
python and the workdir as current directory, bind the device's address (``agent_port``, 0 = any
port) and are waited for until they answer a ZeroMQ ping. They are only ever stopped by PID,
after ``/proc/PID/cmdline`` shows that the PID is our agent (its ready-file path is in argv).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agent.security import AGENT_SECRET, AUTHORIZED, CurveClient

from .. import ROOT
from ..errors import CommandFailed, ConfigError, HostUnreachable, ProvisionError, TestbedError
from .inventory import Device, Inventory, ssh_runner_for
from .jetson import query_power
from .keys import BS_NAME, client_keys, ensure_keys
from .runner import Runner

#: what the agent imports besides the standard library (distribution names)
AGENT_PACKAGES: tuple[str, ...] = ("numpy", "pyzmq", "msgpack", "safetensors", "torch")
#: distribution name -> import name, where they differ
IMPORT_NAMES = {"pyzmq": "zmq", "pyyaml": "yaml", "pillow": "PIL", "onnxruntime-gpu": "onnxruntime"}
MIN_PYTHON = (3, 10)
ARCHITECTURES = ("x86_64", "aarch64")
#: free space kept on top of what is pushed
HEADROOM_BYTES = 64 << 20
PROJECT_DIST = "moe_edge_testbed"
PROJECT_PACKAGES = ("testbed", "device_agent", "models", "recipes")
#: the packages the agent runs: a device is reinstalled only when one of these changed
AGENT_SOURCES = ("device_agent", "models")
REUSE_PTH = "moe_testbed_reuse.pth"
HASH_CACHE = ".sha256.json"
STATUS_PERIOD_S = 0.5
#: perception (CoEL's hello, device_agent.hello): the agent looks at its status every
#: STATUS_PERIOD_S and publishes it only when a value moved by more than HELLO_DELTA, or when
#: HELLO_KEEPALIVE_S (T_hello) passed without a message
HELLO_DELTA = 0.1
HELLO_KEEPALIVE_S = 2.0


# -- workdir layout ---------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Paths inside a device's (expanded) workdir."""

    workdir: str

    def _p(self, *parts: str) -> str:
        return "/".join([self.workdir.rstrip("/") or "/", *parts])

    @property
    def venv(self) -> str:
        return self._p("venv")

    @property
    def venv_python(self) -> str:
        return self._p("venv", "bin", "python")

    @property
    def wheels(self) -> str:
        return self._p("wheels")

    @property
    def experts(self) -> str:
        return self._p("experts")

    @property
    def installed(self) -> str:
        return self._p("installed.json")

    @property
    def pid(self) -> str:
        return self._p("agent.pid")

    @property
    def log(self) -> str:
        return self._p("agent.log")

    @property
    def ready(self) -> str:
        return self._p("agent.ready.json")

    @property
    def agent_state(self) -> str:
        return self._p("agent.json")

    @property
    def curve(self) -> str:
        return self._p("curve")

    def site_packages(self, python: Sequence[int]) -> str:
        return self._p("venv", "lib", f"python{python[0]}.{python[1]}", "site-packages")


# -- facts: one remote snippet, a pure parser, pure checks ------------------------------
#: Runs on the device's python (kept valid down to 3.6 so an old python can say its version).
#: argv: workdir, JSON {"reuse": [[dist, import name], ...]}. Prints one JSON object.
FACTS_PY = r"""
import json, os, platform, sys
wd = os.path.expanduser(sys.argv[1])
spec = json.loads(sys.argv[2])
out = {"system": platform.system(), "machine": platform.machine(),
       "python": list(sys.version_info[:3]), "implementation": platform.python_implementation(),
       "libc": list(platform.libc_ver()), "executable": sys.executable, "workdir": wd}
p = wd
while not os.path.isdir(p) and p != os.path.dirname(p):
    p = os.path.dirname(p)
st = os.statvfs(p)
out["free_bytes"] = st.f_bavail * st.f_frsize
out["writable"] = os.access(p, os.W_OK)
reuse = {}
for dist, mod in spec["reuse"]:
    info = None
    try:
        import importlib.util
        s = importlib.util.find_spec(mod)
    except Exception:
        s = None
    if s is not None:
        if s.submodule_search_locations:
            d = os.path.dirname(os.path.abspath(list(s.submodule_search_locations)[0]))
        else:
            d = os.path.dirname(os.path.abspath(s.origin))
        ver = None
        try:
            from importlib import metadata
            ver = metadata.version(dist)
        except Exception:
            pass
        info = {"path": d, "version": ver}
    reuse[dist] = info
out["reuse"] = reuse
def read(name):
    try:
        with open(os.path.join(wd, name)) as f:
            return f.read()
    except (OSError, ValueError):
        return None
for key, name in (("installed", "installed.json"), ("agent_state", "agent.json"),
                  ("ready", "agent.ready.json"), ("pid", "agent.pid")):
    out[key] = read(name)
out["venv_python"] = os.path.exists(os.path.join(wd, "venv", "bin", "python"))
cmd = None
try:
    pid = int((out["pid"] or "").split()[0])
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        cmd = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
except (ValueError, IndexError, OSError):
    pass
out["cmdline"] = cmd
print(json.dumps(out))
"""


@dataclass(frozen=True)
class DeviceFacts:
    """What :data:`FACTS_PY` found on a device."""

    system: str
    machine: str
    python: tuple[int, int, int]
    implementation: str
    libc: tuple[str, str]
    executable: str
    workdir: str
    free_bytes: int
    writable: bool
    reuse: Mapping[str, Mapping[str, Any] | None]
    installed: Mapping[str, Any] | None = None
    agent_state: Mapping[str, Any] | None = None
    ready: Mapping[str, Any] | None = None
    pid: int | None = None
    cmdline: tuple[str, ...] | None = None
    venv_python: bool = False

    @property
    def python_tag(self) -> str:
        return f"{self.python[0]}.{self.python[1]}"


def _json_or_none(text: Any) -> Any:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        v = json.loads(text)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def parse_facts(stdout: str) -> DeviceFacts:
    """Parse :data:`FACTS_PY`'s output (the last line holding JSON). Raises ValueError."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise ValueError(f"no JSON in the device check's output: {stdout.strip()[:200]!r}")
    d = json.loads(lines[-1])
    try:
        pid_s = (d.get("pid") or "").split()
        pid = int(pid_s[0]) if pid_s and pid_s[0].isdigit() else None
        py = tuple(int(x) for x in d["python"])
        return DeviceFacts(
            system=str(d["system"]),
            machine=str(d["machine"]),
            python=(py[0], py[1], py[2]),
            implementation=str(d["implementation"]),
            libc=(str(d["libc"][0]), str(d["libc"][1])),
            executable=str(d["executable"]),
            workdir=str(d["workdir"]),
            free_bytes=int(d["free_bytes"]),
            writable=bool(d["writable"]),
            reuse=dict(d.get("reuse") or {}),
            installed=_json_or_none(d.get("installed")),
            agent_state=_json_or_none(d.get("agent_state")),
            ready=_json_or_none(d.get("ready")),
            pid=pid,
            cmdline=tuple(d["cmdline"]) if d.get("cmdline") else None,
            venv_python=bool(d.get("venv_python")),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"device check output lacks or garbles {exc}") from None


def check_facts(facts: DeviceFacts, device: Device, need_bytes: int = 0) -> list[str]:
    """Problems that stop provisioning ``device`` (empty: fine). Pure."""
    problems = []
    if facts.system != "Linux":
        problems.append(f"OS {facts.system} is not supported (need Linux)")
    machine = "aarch64" if facts.machine == "arm64" else facts.machine
    if machine not in ARCHITECTURES:
        problems.append(
            f"architecture {facts.machine} is not supported (need {' or '.join(ARCHITECTURES)})"
        )
    if facts.implementation != "CPython":
        problems.append(f"python {device.python} is {facts.implementation}, need CPython")
    if facts.python[:2] < MIN_PYTHON:
        problems.append(
            f"python {device.python} is {'.'.join(map(str, facts.python))}, "
            f"need >= {'.'.join(map(str, MIN_PYTHON))}"
        )
    if not facts.writable:
        problems.append(f"workdir {facts.workdir} is not writable by {device.ssh_user}")
    missing = [p for p in device.reuse_packages if not facts.reuse.get(p)]
    if missing:
        problems.append(f"reuse_packages: {', '.join(missing)} not importable by {device.python}")
    if need_bytes and facts.free_bytes < need_bytes:
        problems.append(
            f"disk full: {facts.free_bytes / 1e6:.0f} MB free at {facts.workdir}, "
            f"need {need_bytes / 1e6:.0f} MB"
        )
    return problems


def agent_is_ours(cmdline: Sequence[str] | None, lay: Layout) -> bool:
    """True if a process's argv is a device agent started with ``lay``'s ready file. Pure."""
    if not cmdline:
        return False
    return "device_agent" in cmdline and lay.ready in cmdline


# -- pure planning ------------------------------------------------------------------------
def import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist.lower(), dist.replace("-", "_"))


def place_experts(
    manifest: Any, devices: Sequence[Device], placement: str = "round-robin", seed: int = 0
) -> dict[str, tuple[str, ...]]:
    """uid -> device names, with one of :data:`testbed.policy.PLACEMENTS`."""
    from models.uids import parse_uid

    from ..policy.api import PLACEMENTS, DeviceInfo, ExpertInfo

    if placement not in PLACEMENTS:
        raise ConfigError(
            f"--placement: unknown placement {placement!r} (one of: {', '.join(PLACEMENTS)})"
        )
    experts = []
    for u in manifest.uids():
        layer, e = parse_uid(u)
        experts.append(ExpertInfo(u, layer, e, int(manifest.experts[u].bytes)))
    infos = [DeviceInfo(d.name, d.memory_budget_mb, d.hw_class) for d in devices]
    return {u: tuple(ds) for u, ds in PLACEMENTS[placement](experts, infos, seed).items()}


def shards_per_device(
    placement: Mapping[str, Sequence[str]], devices: Iterable[str]
) -> dict[str, list[str]]:
    """Invert a placement: device -> sorted uids it holds (every device listed). Pure."""
    out: dict[str, list[str]] = {d: [] for d in devices}
    for uid, ds in placement.items():
        for d in ds:
            if d not in out:
                raise ConfigError(f"placement: expert {uid} placed on unknown device {d!r}")
            out[d].append(uid)
    for uids in out.values():
        uids.sort()
    return out


def pip_platforms(facts: DeviceFacts) -> list[str]:
    """``pip download --platform`` values for the device (manylinux up to its glibc). Pure."""
    machine = "aarch64" if facts.machine == "arm64" else facts.machine
    lib, ver = facts.libc
    plats = []
    if lib == "glibc" and ver.count(".") >= 1:
        major, minor = (int(x) for x in ver.split(".")[:2])
        plats.append(f"manylinux_{major}_{minor}_{machine}")
    plats += [f"manylinux2014_{machine}", f"linux_{machine}"]
    return plats


def pip_download_argv(
    facts: DeviceFacts,
    packages: Sequence[str],
    dest: str | os.PathLike[str],
    python: str = sys.executable,
) -> list[str]:
    """The controller-side ``pip download`` of binary wheels for the device. Pure."""
    argv = [
        python,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        os.fspath(dest),
        "--implementation",
        "cp",
        "--python-version",
        facts.python_tag,
    ]
    for p in pip_platforms(facts):
        argv += ["--platform", p]
    return argv + list(packages)


def bind_address(host: str) -> str:
    """Address the agent binds: the device's IP, or all interfaces for a host name. Pure."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return "0.0.0.0"


def connect_endpoint(endpoint: str | None, host: str) -> str | None:
    """An endpoint the controller can connect to (a wildcard bind gets the device's host)."""
    if endpoint and endpoint.startswith("tcp://0.0.0.0:"):
        return f"tcp://{host}:{endpoint.rsplit(':', 1)[1]}"
    return endpoint


def agent_argv(device: Device, lay: Layout, curve: bool = True) -> list[str]:
    """How the agent is started on ``device`` (the venv's python); ``curve``: with its CURVE
    keys in ``lay.curve`` (:mod:`device_agent.security`). Pure."""
    addr = bind_address(device.host)
    port = str(device.agent_port) if device.agent_port else "*"
    argv = [
        lay.venv_python,
        "-m",
        "device_agent",
        "serve",
        "--bind",
        f"tcp://{addr}:{port}",
        "--workdir",
        lay.workdir,
        "--ready-file",
        lay.ready,
        "--pub",
        f"tcp://{addr}:*",
        "--hello-s",
        f"{STATUS_PERIOD_S:g}",
        "--hello-delta",
        f"{HELLO_DELTA:g}",
        "--hello-keepalive-s",
        f"{HELLO_KEEPALIVE_S:g}",
    ]
    if curve:
        argv += ["--curve-dir", lay.curve]
    if device.hw_class == "netns":
        # namespace devices share this host's cores: one compute thread each; and its meters: a
        # host-wide one (RAPL, a GPU) would count every device's and the BS's work, so each
        # agent estimates its own from its CPU time
        argv += ["--threads", "1", "--meter", "estimated"]
    return argv


def install_key(
    project_key: str, wheels: Sequence[str], reuse: Mapping[str, Any], python: str
) -> str:
    """What identifies an install: project sources, wheel names, reused dirs, python. Pure."""
    blob = json.dumps(
        {
            "project": project_key,
            "wheels": sorted(wheels),
            "reuse": {k: reuse[k] for k in sorted(reuse)},
            "python": python,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# -- controller-side wheels ---------------------------------------------------------------
def cache_dir() -> Path:
    from .modelstore import cache_root

    return cache_root() / "wheels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _root() -> Path:
    return ROOT


def source_files(root: Path, packages: Sequence[str] = PROJECT_PACKAGES) -> list[Path]:
    """The files the project wheel is built from (relative to ``root``), sorted."""
    out = [Path(n) for n in ("pyproject.toml", "README.md") if (root / n).is_file()]
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*")):
            rel = p.relative_to(root)
            if (
                p.is_file()
                and "__pycache__" not in rel.parts
                and p.suffix != ".pyc"
                and not p.name.startswith(".")
            ):
                out.append(rel)
    return out


def agent_source_key(root: Path | None = None) -> str:
    """Hash of what the device runs (``pyproject.toml`` + :data:`AGENT_SOURCES`): the
    install on a device is current while this is unchanged, whatever else was edited."""
    root = root or _root()
    h = hashlib.sha256()
    for rel in source_files(root, AGENT_SOURCES):
        h.update(str(rel).encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


def project_wheel(root: Path | None = None, cache: Path | None = None) -> tuple[Path, str]:
    """The project's wheel and the hash of its sources; built only when a source changed.

    Built from a copy of the sources in a temporary folder (nothing is written into the
    checkout), with ``pip wheel --no-deps --no-build-isolation --no-index`` (offline).
    """
    root = root or _root()
    files = source_files(root)
    h = hashlib.sha256()
    blobs = {}
    for rel in files:
        data = (root / rel).read_bytes()
        blobs[rel] = data
        h.update(str(rel).encode() + b"\0" + hashlib.sha256(data).digest())
    key = h.hexdigest()[:16]
    out = (cache or cache_dir()) / "project" / key
    found = sorted(out.glob(f"{PROJECT_DIST}-*.whl")) if out.is_dir() else []
    if found:
        return found[-1], key
    with tempfile.TemporaryDirectory(prefix="tb-wheel-") as tmp:
        src = Path(tmp) / "src"
        for rel, data in blobs.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        dist = Path(tmp) / "dist"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-q",
                "--disable-pip-version-check",
                "-w",
                str(dist),
                str(src),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        built = sorted(dist.glob(f"{PROJECT_DIST}-*.whl"))
        if res.returncode != 0 or not built:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
            raise ProvisionError(
                f"building the project wheel failed (needs pip and setuptools "
                f"on the controller): {tail[0]}"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.with_name(f"{key}.tmp{os.getpid()}.{threading.get_ident()}")
        stage.mkdir()
        shutil.copy2(built[-1], stage / built[-1].name)
        try:
            os.replace(stage, out)
        except OSError:  # a concurrent build won the race
            shutil.rmtree(stage, ignore_errors=True)
    return max(out.glob(f"{PROJECT_DIST}-*.whl")), key


def pip_wheel(wheelhouse: Path | None = None) -> Path:
    """A pip wheel to run pip on the device from (wheelhouse, cache, ensurepip, download)."""
    places = [wheelhouse] if wheelhouse else []
    places.append(cache_dir() / "pip")
    try:
        import ensurepip

        places.append(Path(ensurepip.__file__).parent / "_bundled")
    except ImportError:
        pass
    places.append(Path("/usr/share/python-wheels"))
    for d in places:
        found = sorted(d.glob("pip-*-py3-none-any.whl")) if d.is_dir() else []
        if found:
            return found[-1]
    dest = cache_dir() / "pip"
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "--no-deps",
            "-q",
            "-d",
            str(dest),
            "pip",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(dest.glob("pip-*-py3-none-any.whl"))
    if res.returncode != 0 or not found:
        raise ProvisionError(
            "no pip wheel to install with: put pip-*.whl in --wheelhouse (pip download pip)"
        )
    return found[-1]


class _DepWheels:
    """Dependency wheels per (platform, python, packages), obtained once per provision."""

    def __init__(self, wheelhouse: Path | None):
        self.wheelhouse = wheelhouse
        self.lock = threading.Lock()
        self.got: dict[str, list[Path]] = {}

    def get(self, facts: DeviceFacts, packages: Sequence[str]) -> list[Path]:
        if not packages:
            return []
        if self.wheelhouse is not None:
            found = sorted(
                p
                for p in self.wheelhouse.glob("*.whl")
                if not p.name.startswith((f"{PROJECT_DIST}-", "pip-"))
            )
            if not found:
                raise ProvisionError(
                    f"--wheelhouse {self.wheelhouse}: no wheels there for {', '.join(packages)}"
                )
            return found
        key = hashlib.sha256(
            json.dumps([pip_platforms(facts), facts.python_tag, sorted(packages)]).encode()
        ).hexdigest()[:12]
        with self.lock:
            if key in self.got:
                return self.got[key]
            dest = cache_dir() / f"deps-{facts.machine}-py{facts.python_tag}-{key}"
            if not (dest / ".complete").exists():
                dest.mkdir(parents=True, exist_ok=True)
                res = subprocess.run(
                    pip_download_argv(facts, packages, dest),
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if res.returncode != 0:
                    tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
                    raise ProvisionError(
                        f"pip download of {', '.join(packages)} for "
                        f"{pip_platforms(facts)[0]} py{facts.python_tag} failed "
                        f"(no internet? use --wheelhouse DIR): {tail[0]}"
                    )
                (dest / ".complete").write_text("\n".join(packages) + "\n")
            self.got[key] = sorted(dest.glob("*.whl"))
            return self.got[key]


# -- remote files with a sha256 cache ------------------------------------------------------
#: argv: directory, JSON {file name: expected sha256 or ""}. Prints {name: sha256 or null}.
#: Hashes a file only when its size or mtime differ from the cache file's entry; rewrites the
#: cache only when an entry changed.
HASH_PY = r"""
import hashlib, json, os, sys
d = sys.argv[1]
want = json.loads(sys.argv[2])
cpath = os.path.join(d, ".sha256.json")
try:
    with open(cpath) as f:
        cache = json.load(f)
except (OSError, ValueError):
    cache = {}
new = dict(cache)
out = {}
for name in want:
    p = os.path.join(d, name)
    try:
        st = os.stat(p)
    except OSError:
        out[name] = None
        new.pop(name, None)
        continue
    c = cache.get(name)
    if c and c[0] == st.st_size and c[1] == st.st_mtime_ns:
        out[name] = c[2]
        continue
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    out[name] = h.hexdigest()
    new[name] = [st.st_size, st.st_mtime_ns, out[name]]
if new != cache:
    os.makedirs(d, exist_ok=True)
    with open(cpath + ".part", "w") as f:
        json.dump(new, f)
    os.replace(cpath + ".part", cpath)
print(json.dumps(out))
"""


def remote_hashes(
    runner: Runner, python: str, directory: str, names: Iterable[str]
) -> dict[str, str | None]:
    """sha256 of each file in ``directory`` on the device (None: missing), cached by stat."""
    names = list(names)
    if not names:
        return {}
    res = runner.run(
        [python, "-c", HASH_PY, directory, json.dumps({n: "" for n in names})], timeout_s=600
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def push_files(
    runner: Runner,
    python: str,
    directory: str,
    files: Mapping[str, tuple[Path, str]],
    mode: int = 0o644,
) -> list[str]:
    """Copy ``name -> (local path, sha256)`` into ``directory`` where the device's copy differs
    (file mode ``mode``); verify the pushed ones on the device. Returns the names pushed."""
    have = remote_hashes(runner, python, directory, files)
    todo = sorted(n for n, (_, sha) in files.items() if have.get(n) != sha)
    for n in todo:
        runner.put(files[n][0], f"{directory}/{n}", mode=mode)
    if todo:
        got = remote_hashes(runner, python, directory, todo)
        bad = [n for n in todo if got.get(n) != files[n][1]]
        if bad:
            raise ProvisionError(
                f"{runner.host}: sha256 of {', '.join(bad)} differs on the device after copying"
            )
    return todo


def _remote_workdir(runner: Runner, device: Device) -> str:
    if not device.workdir.startswith("~"):
        return device.workdir
    res = runner.run(
        [
            device.python,
            "-c",
            "import os,sys; print(os.path.expanduser(sys.argv[1]))",
            device.workdir,
        ],
        timeout_s=30,
    )
    return res.stdout.strip().splitlines()[-1]


def sync_shards(
    runner: Runner,
    device: Device,
    manifest: Any,
    uids: Iterable[str],
    *,
    workdir: str | None = None,
) -> tuple[dict[str, str], int]:
    """Make the shards of ``uids`` present in the device's ``{workdir}/experts/``.

    Files whose sha256 on the device (cached by size and mtime in ``experts/.sha256.json``)
    already matches the manifest's are left alone.

    Parameters
    ----------
    runner
        The device's runner (SSH).
    device
        The inventory's device (its ``python`` runs the hashing, its ``workdir`` holds them).
    manifest
        A :class:`models.manifest.Manifest`.
    uids
        Expert uids to make present.

    Returns
    -------
    (uid -> path relative to the workdir, what the agent's ``load`` takes; number pushed)
    """
    lay = Layout(workdir or _remote_workdir(runner, device))
    files: dict[str, tuple[Path, str]] = {}
    rel: dict[str, str] = {}
    for u in uids:
        src = Path(manifest.expert_path(u))
        files[src.name] = (src, manifest.experts[u].sha256)
        rel[u] = f"experts/{src.name}"
    pushed = push_files(runner, device.python, lay.experts, files)
    return rel, len(pushed)


# -- agents ---------------------------------------------------------------------------------
def _ping(
    endpoint: str, timeout_s: float, device: str = "a", curve: CurveClient | None = None
) -> float | None:
    """RTT in ms of one ZeroMQ ping, or None if no answer within ``timeout_s``."""
    from ..dataplane.backend import AgentError, RemoteExpertBackend

    with RemoteExpertBackend({device: endpoint}, timeout_s=timeout_s, curve=curve) as b:
        try:
            return float(b.ping(device, timeout_s=timeout_s)["rtt_ms"])
        except AgentError:
            return None


def _wait_ping(
    endpoint: str, timeout_s: float, device: str = "a", curve: CurveClient | None = None
) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        rtt = _ping(endpoint, max(0.2, min(1.0, deadline - time.monotonic())), device, curve)
        if rtt is not None or time.monotonic() >= deadline:
            return rtt


def _cmdline(runner: Runner, pid: int) -> list[str]:
    res = runner.run(["cat", f"/proc/{pid}/cmdline"], timeout_s=30, check=False)
    return [a for a in res.stdout.split("\0") if a] if res.ok else []


def stop_pid(runner: Runner, lay: Layout, pid: int, grace_s: float = 5.0) -> str:
    """Stop our agent ``pid``: SIGTERM, then SIGKILL after ``grace_s``; only after checking
    ``/proc/PID/cmdline`` shows our agent. Returns not running / terminated / killed."""
    if not agent_is_ours(_cmdline(runner, pid), lay):
        return "not running"
    runner.run(["kill", "-TERM", str(pid)], timeout_s=30, check=False)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not agent_is_ours(_cmdline(runner, pid), lay):
            return "terminated"
    if agent_is_ours(_cmdline(runner, pid), lay):
        runner.run(["kill", "-KILL", str(pid)], timeout_s=30, check=False)
        return "killed"
    return "terminated"


def start_agent(
    runner: Runner,
    device: Device,
    lay: Layout,
    argv: Sequence[str],
    ready_timeout_s: float = 60.0,
    curve: CurveClient | None = None,
) -> dict[str, Any]:
    """Spawn the agent detached, wait for its ready file (with its PID) and a ping answer.
    Returns the ready file's content (endpoint made connectable)."""
    runner.run(["rm", "-f", lay.ready], timeout_s=30)
    pid = runner.spawn(list(argv), log_path=lay.log, pid_path=lay.pid, cwd=lay.workdir)
    deadline = time.monotonic() + ready_timeout_s
    delay_s = 0.1
    while True:
        res = runner.run(["cat", lay.ready], timeout_s=30, check=False)
        info = _json_or_none(res.stdout) if res.ok else None
        if info and int(info.get("pid", -1)) == pid:
            break
        alive = agent_is_ours(_cmdline(runner, pid), lay)
        if not alive or time.monotonic() > deadline:
            tail = runner.run(["tail", "-n", "5", lay.log], timeout_s=30, check=False).stdout
            if alive:
                stop_pid(runner, lay, pid)
            last = (tail.strip().splitlines() or ["(empty log)"])[-1]
            raise ProvisionError(
                f"agent (pid {pid}) {'exited' if not alive else 'not ready'} "
                f"before writing {lay.ready}: {last}"
            )
        time.sleep(delay_s)
        delay_s = min(0.5, delay_s * 1.5)
    info["endpoint"] = connect_endpoint(info.get("endpoint"), device.host)
    info["pub_endpoint"] = connect_endpoint(info.get("pub_endpoint"), device.host)
    if (
        _wait_ping(info["endpoint"], max(2.0, deadline - time.monotonic()), device.name, curve)
        is None
    ):
        stop_pid(runner, lay, pid)
        raise ProvisionError(f"agent (pid {pid}) does not answer a ping at {info['endpoint']}")
    return info


# -- one device ---------------------------------------------------------------------------
@dataclass
class DeviceReport:
    """What provisioning did on one device."""

    device: str
    ok: bool
    changed: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    error_type: str | None = None
    exit_code: int = 0
    pid: int | None = None
    endpoint: str | None = None
    shards: int = 0
    #: seconds per step (check, install, shards, agent)
    steps: dict[str, float] = field(default_factory=dict)
    #: Jetson power state (:func:`testbed.lab.jetson.query_power`): nvpmodel mode and modes,
    #: jetson_clocks; tools the device lacks are ``{"available": false}``
    power: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Plan:
    """Controller-side inputs shared by every device of one provision call."""

    def __init__(
        self, inv: Inventory, split: Path | None, placement: str, seed: int, wheelhouse: Path | None
    ):
        self.wheelhouse = wheelhouse
        self.manifest: Any = None
        self.shards: dict[str, list[str]] = {d.name: [] for d in inv.devices}
        if split is not None:
            from models.errors import ModelError
            from models.manifest import load_manifest

            try:
                self.manifest = load_manifest(split)
            except ModelError as exc:
                raise ConfigError(f"--model: {exc}") from None
            self.shards = shards_per_device(
                place_experts(self.manifest, inv.devices, placement, seed),
                [d.name for d in inv.devices],
            )
        self.agent_key = agent_source_key()
        #: CURVE: the controller's key files (name -> (public, secret)) and the BS's client side
        self.keys: dict[str, tuple[Path, Path]] = {}
        self.curve: CurveClient | None = None
        if inv.security == "curve":
            self.keys = ensure_keys(inv)
            self.curve = client_keys(inv)
        self._project: tuple[Path, str] | None = None
        self.pip = pip_wheel(wheelhouse)
        self.deps = _DepWheels(wheelhouse)
        self._sha: dict[Path, str] = {}
        self._lock = threading.Lock()

    def project(self) -> tuple[Path, str]:
        """The project wheel and its source hash, built (or found in the cache) on first use:
        only when some device needs an install."""
        with self._lock:
            if self._project is None:
                self._project = project_wheel()
            return self._project

    def sha(self, p: Path) -> str:
        with self._lock:
            if p not in self._sha:
                self._sha[p] = _sha256(p)
            return self._sha[p]


def _facts(runner: Runner, device: Device) -> DeviceFacts:
    spec = {"reuse": [[p, import_name(p)] for p in device.reuse_packages]}
    res = runner.run(
        [device.python, "-c", FACTS_PY, device.workdir, json.dumps(spec)], timeout_s=60, check=False
    )
    if res.returncode in (126, 127):
        raise ProvisionError(f"python {device.python} not found on the device")
    if not res.ok:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
        raise ProvisionError(f"device check with {device.python} failed: {tail[0]}")
    try:
        return parse_facts(res.stdout)
    except ValueError as exc:
        raise ProvisionError(f"device check with {device.python}: {exc}") from None


def _install(
    runner: Runner,
    device: Device,
    facts: DeviceFacts,
    lay: Layout,
    plan: _Plan,
    wheels: Mapping[str, tuple[Path, str]],
    dep_names: Sequence[str],
    key: str,
    reuse_dirs: Sequence[str],
    changed: list[str],
) -> None:
    project, source_hash = plan.project()
    pushed = push_files(runner, device.python, lay.wheels, wheels)
    if pushed:
        changed.append(f"pushed {len(pushed)} wheel{'s' * (len(pushed) != 1)}")
    old = facts.installed or {}
    if not facts.venv_python or old.get("python") != facts.executable:
        runner.run(
            [device.python, "-m", "venv", "--without-pip", "--clear", lay.venv], timeout_s=120
        )
        changed.append("created venv")
    sp = lay.site_packages(facts.python)
    pth = "".join(f"{d}\n" for d in reuse_dirs)
    with tempfile.NamedTemporaryFile("w", suffix=".pth", delete=False) as f:
        f.write(pth)
    try:
        runner.put(f.name, f"{sp}/{REUSE_PTH}")
    finally:
        os.unlink(f.name)
    pip = [
        lay.venv_python,
        f"{lay.wheels}/{plan.pip.name}/pip",
        "install",
        "--no-index",
        "--disable-pip-version-check",
        "--no-input",
        "-q",
        "--no-warn-script-location",
    ]
    if dep_names:
        runner.run([*pip, "--find-links", lay.wheels, *dep_names], timeout_s=1800)
    runner.run(
        [*pip, "--no-deps", "--force-reinstall", f"{lay.wheels}/{project.name}"], timeout_s=600
    )
    state = {
        "key": key,
        "project": project.name,
        "agent_sources": plan.agent_key,
        "source_hash": source_hash,
        "python": facts.executable,
        "deps": sorted(dep_names),
        "wheels": sorted(wheels),
        "reuse": dict(zip(device.reuse_packages, reuse_dirs)),
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _put_text(runner, lay.installed, json.dumps(state, indent=1))
    changed.append(
        f"installed {project.name}" + (f" + {len(dep_names)} packages" if dep_names else "")
    )


def _push_keys(runner: Runner, device: Device, lay: Layout, plan: _Plan) -> bool:
    """The device's own CURVE secret key (mode 0600, folder 0700) and the BS's public key, where
    the device's copies differ; True if anything was pushed."""
    if plan.curve is None:
        return False
    _, secret = plan.keys[device.name]
    bs_public, _ = plan.keys[BS_NAME]
    pushed = push_files(
        runner, device.python, lay.curve, {AGENT_SECRET: (secret, plan.sha(secret))}, mode=0o600
    )
    pushed += push_files(
        runner,
        device.python,
        f"{lay.curve}/{AUTHORIZED}",
        {f"{BS_NAME}.key": (bs_public, plan.sha(bs_public))},
    )
    if pushed:
        runner.run(["chmod", "700", lay.curve], timeout_s=30)
    return bool(pushed)


def _put_text(runner: Runner, remote: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(text)
    try:
        runner.put(f.name, remote)
    finally:
        os.unlink(f.name)


def provision_device(runner: Runner, device: Device, plan: _Plan) -> DeviceReport:
    """Check, install, push shards, (re)start the agent on one device. Raises on failure."""
    t0 = time.monotonic()
    rep = DeviceReport(device.name, ok=False)

    def step(name: str) -> None:
        nonlocal t0
        now = time.monotonic()
        rep.steps[name] = round(now - t0, 3)
        t0 = now

    t_start = t0
    facts = _facts(runner, device)
    problems = check_facts(facts, device)
    if problems:
        raise ProvisionError("; ".join(problems))
    lay = Layout(facts.workdir)
    reuse_dirs = []
    for p in device.reuse_packages:
        d = str((facts.reuse[p] or {})["path"])
        if d not in reuse_dirs:
            reuse_dirs.append(d)
    dep_names = [
        p for p in AGENT_PACKAGES if p.lower() not in {r.lower() for r in device.reuse_packages}
    ]
    deps = plan.deps.get(facts, dep_names)
    key = install_key(
        plan.agent_key,
        sorted(p.name for p in [plan.pip, *deps]),
        dict(zip(device.reuse_packages, (facts.reuse[p] for p in device.reuse_packages))),
        facts.executable,
    )
    need = HEADROOM_BYTES
    wheels: dict[str, tuple[Path, str]] = {}
    install = (facts.installed or {}).get("key") != key or not facts.venv_python
    if install:
        wheels = {p.name: (p, plan.sha(p)) for p in [plan.project()[0], plan.pip, *deps]}
        need += sum(p.stat().st_size for p, _ in wheels.values())
    if plan.manifest is not None:
        need += sum(plan.manifest.experts[u].bytes for u in plan.shards[device.name])
    problems = check_facts(facts, device, need)
    if problems:
        raise ProvisionError("; ".join(problems))
    changed = rep.changed
    rep.power = query_power(runner)
    step("check")
    if install:
        _install(runner, device, facts, lay, plan, wheels, dep_names, key, reuse_dirs, changed)
        step("install")
    if plan.manifest is not None and plan.shards[device.name]:
        _, n = sync_shards(
            runner, device, plan.manifest, plan.shards[device.name], workdir=lay.workdir
        )
        rep.shards = len(plan.shards[device.name])
        if n:
            changed.append(f"pushed {n} of {rep.shards} shards")
        step("shards")
    keys_pushed = _push_keys(runner, device, lay, plan)
    if keys_pushed:
        changed.append("pushed CURVE keys")
        step("keys")
    argv = agent_argv(device, lay, curve=plan.curve is not None)
    st = facts.agent_state or {}
    running = facts.pid is not None and agent_is_ours(facts.cmdline, lay)
    ready = facts.ready or {}
    endpoint = connect_endpoint(ready.get("endpoint"), device.host)
    keep = (
        running
        and not install
        and not keys_pushed
        and st.get("argv") == argv
        and st.get("key") == key
        and st.get("pid") == facts.pid
        and ready.get("pid") == facts.pid
        and endpoint is not None
        and _ping(endpoint, 3.0, device.name, plan.curve) is not None
    )
    if keep:
        rep.pid, rep.endpoint = facts.pid, endpoint
    else:
        if running and facts.pid is not None:
            how = stop_pid(runner, lay, facts.pid)
            changed.append(f"stopped agent pid {facts.pid} ({how})")
        info = start_agent(runner, device, lay, argv, curve=plan.curve)
        rep.pid, rep.endpoint = int(info["pid"]), info["endpoint"]
        _put_text(runner, lay.agent_state, json.dumps({"pid": rep.pid, "argv": argv, "key": key}))
        changed.append(f"started agent pid {rep.pid} at {rep.endpoint}")
    step("agent")
    rep.ok = True
    rep.seconds = round(time.monotonic() - t_start, 3)
    return rep


def _failed(device: str, exc: BaseException, t0: float) -> DeviceReport:
    if isinstance(exc, HostUnreachable):
        msg = exc.reason
    elif isinstance(exc, CommandFailed):
        tail = (exc.stderr.strip() or exc.stdout.strip()).splitlines()[-1:] or [""]
        msg = (
            f"`{shlex.join(exc.argv[:3])} ...` exited {exc.returncode}: {tail[0]}"
            if exc.returncode is not None
            else str(exc)
        )
    else:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = exc.exit_code if isinstance(exc, TestbedError) else 1
    return DeviceReport(
        device,
        ok=False,
        error=msg,
        seconds=round(time.monotonic() - t0, 3),
        error_type=type(exc).__name__,
        exit_code=code,
    )


def _each_device(
    inv: Inventory,
    work: Callable[[Runner, Device], DeviceReport | Any],
    connect_timeout_s: float,
    devices: Sequence[str] | None = None,
) -> list[Any]:
    """Run ``work(runner, device)`` on every device in parallel; exceptions become failed
    :class:`DeviceReport` rows (one device never stops the others)."""
    targets = [d for d in inv.devices if devices is None or d.name in devices]

    def one(d: Device) -> Any:
        t0 = time.monotonic()
        try:
            with ssh_runner_for(inv, d, connect_timeout_s=connect_timeout_s) as r:
                return work(r, d)
        except Exception as exc:  # noqa: BLE001 - recorded per device
            return _failed(d.name, exc, t0)

    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(one, targets))


def provision(
    inv: Inventory,
    model_dir: str | os.PathLike[str] | None = None,
    placement: str = "round-robin",
    *,
    seed: int = 0,
    wheelhouse: str | os.PathLike[str] | None = None,
    connect_timeout_s: float = 10.0,
    devices: Sequence[str] | None = None,
) -> list[DeviceReport]:
    """Install and start the agent on every device and push the placed expert shards.

    Parameters
    ----------
    inv
        The inventory.
    model_dir
        A split directory, ``"tiny"`` or a checkpoint (see :func:`testbed.lab.modelstore.resolve_split`);
        ``None`` pushes no shards.
    placement
        ``round-robin`` or ``random`` (seeded with ``seed``): which device gets which shard.
    wheelhouse
        A folder of wheels to install the agent's dependencies from (offline), instead of
        ``pip download``.
    connect_timeout_s
        SSH connect budget per device.
    devices
        Only these devices (default: all); the others are not touched.

    Returns
    -------
    One :class:`DeviceReport` per device, in inventory order; ``changed`` is empty when nothing
    had to be done.

    Raises
    ------
    ConfigError
        Bad model directory, placement or wheelhouse (before any device is touched).
    """
    from ..policy.api import PLACEMENTS

    if placement not in PLACEMENTS:
        raise ConfigError(
            f"--placement: unknown placement {placement!r} (one of: {', '.join(PLACEMENTS)})"
        )
    split = None
    if model_dir is not None:
        from .modelstore import resolve_split

        split = resolve_split(model_dir, where="--model")
    wh = Path(wheelhouse).expanduser() if wheelhouse is not None else None
    if wh is not None and not wh.is_dir():
        raise ConfigError(f"--wheelhouse: {wh}: no such directory")
    plan = _Plan(inv, split, placement, seed, wh)
    return _each_device(inv, lambda r, d: provision_device(r, d, plan), connect_timeout_s, devices)


# -- agents: endpoints, status, stop, logs ---------------------------------------------------
def agent_view(runner: Runner, device: Device) -> tuple[Layout, DeviceFacts]:
    facts = _facts(runner, device)
    return Layout(facts.workdir), facts


def agent_running(facts: DeviceFacts, lay: Layout) -> bool:
    return facts.pid is not None and agent_is_ours(facts.cmdline, lay)


def agent_endpoints(inv: Inventory, connect_timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """device -> ``{"endpoint", "pub_endpoint", "pid"}`` of its running agent, read from the
    ready files over SSH.

    Raises
    ------
    TestbedError
        Naming every device whose agent is not running (or that could not be reached).
    """

    def one(r: Runner, d: Device) -> Any:
        lay, facts = agent_view(r, d)
        ready = facts.ready or {}
        if not agent_running(facts, lay) or ready.get("pid") != facts.pid:
            return _failed(
                d.name,
                ProvisionError("no agent running (run `testbed provision`)"),
                time.monotonic(),
            )
        return (
            d.name,
            {
                "endpoint": connect_endpoint(ready.get("endpoint"), d.host),
                "pub_endpoint": connect_endpoint(ready.get("pub_endpoint"), d.host),
                "pid": facts.pid,
            },
        )

    rows = _each_device(inv, one, connect_timeout_s)
    bad = [r for r in rows if isinstance(r, DeviceReport)]
    if bad:
        raise TestbedError("; ".join(f"{r.device}: {r.error}" for r in bad))
    return dict(rows)


def agents_status(
    inv: Inventory, connect_timeout_s: float = 10.0, ping_timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """Per device: ``state`` (running / not answering / stopped / unreachable), pid, endpoint,
    ping RTT, loaded experts, installed project wheel."""
    try:
        curve = client_keys(inv)
    except ConfigError:  # never provisioned: no agent can be answering
        curve = None

    def one(r: Runner, d: Device) -> dict[str, Any]:
        lay, facts = agent_view(r, d)
        ready = facts.ready or {}
        row: dict[str, Any] = {
            "device": d.name,
            "ok": True,
            "state": "stopped",
            "pid": None,
            "endpoint": None,
            "rtt_ms": None,
            "experts": None,
            "installed": (facts.installed or {}).get("project"),
            "error": None,
        }
        if agent_running(facts, lay):
            row["pid"] = facts.pid
            row["endpoint"] = connect_endpoint(ready.get("endpoint"), d.host)
            row["state"] = "not answering"
            if row["endpoint"] and ready.get("pid") == facts.pid:
                from ..dataplane.backend import AgentError, RemoteExpertBackend

                with RemoteExpertBackend(
                    {d.name: row["endpoint"]}, timeout_s=ping_timeout_s, curve=curve
                ) as b:
                    try:
                        row["rtt_ms"] = round(float(b.ping(d.name)["rtt_ms"]), 3)
                        row["experts"] = len(b.status(d.name).get("experts", {}))
                        row["state"] = "running"
                    except AgentError:
                        pass
        return row

    rows = _each_device(inv, one, connect_timeout_s)
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "state": "unreachable" if r.error_type == "HostUnreachable" else "error",
            "pid": None,
            "endpoint": None,
            "rtt_ms": None,
            "experts": None,
            "installed": None,
            "error": r.error,
            "exit_code": r.exit_code,
        }
        for r in rows
    ]


def agents_stop(
    inv: Inventory, connect_timeout_s: float = 10.0, grace_s: float = 5.0
) -> list[dict[str, Any]]:
    """Stop every device's agent by PID (SIGTERM, then SIGKILL after ``grace_s``), after
    checking the PID is our agent. Per device: ``result`` (terminated / killed / not running)."""

    def one(r: Runner, d: Device) -> dict[str, Any]:
        lay, facts = agent_view(r, d)
        result, pid = "not running", None
        if agent_running(facts, lay) and facts.pid is not None:
            pid = facts.pid
            result = stop_pid(r, lay, pid, grace_s)
        if facts.pid is not None or facts.ready or facts.agent_state:
            r.run(["rm", "-f", lay.pid, lay.ready, lay.agent_state], timeout_s=30)
        return {"device": d.name, "ok": True, "result": result, "pid": pid, "error": None}

    rows = _each_device(inv, one, connect_timeout_s)
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "result": "failed",
            "pid": None,
            "error": r.error,
            "exit_code": r.exit_code,
        }
        for r in rows
    ]


def agents_logs(
    inv: Inventory, lines: int = 50, connect_timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """The last ``lines`` lines of each device's agent log."""
    if lines < 1:
        raise ConfigError(f"--lines: must be >= 1, got {lines}")

    def one(r: Runner, d: Device) -> dict[str, Any]:
        lay = Layout(_remote_workdir(r, d))
        res = r.run(["tail", "-n", str(lines), lay.log], timeout_s=30, check=False)
        if not res.ok:
            return {
                "device": d.name,
                "ok": True,
                "lines": [],
                "log": lay.log,
                "error": None,
                "note": "no log yet",
            }
        return {
            "device": d.name,
            "ok": True,
            "lines": res.stdout.splitlines(),
            "log": lay.log,
            "error": None,
        }

    rows = _each_device(inv, one, connect_timeout_s)
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "lines": [],
            "log": None,
            "error": r.error,
            "exit_code": r.exit_code,
        }
        for r in rows
    ]
