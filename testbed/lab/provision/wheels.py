"""Controller-side wheels: the project's own (built when a source changed) and the agent's
dependencies for each device's platform and Python (downloaded once, or from a wheelhouse)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import ROOT
from ...errors import ProvisionError
from .facts import DeviceFacts

#: what the agent imports besides the standard library (distribution names)
AGENT_PACKAGES: tuple[str, ...] = ("numpy", "pyzmq", "msgpack", "safetensors", "torch")
PROJECT_DIST = "moe_edge_testbed"
PROJECT_PACKAGES = ("testbed", "device_agent", "models", "recipes")
#: the packages the agent runs: a device is reinstalled only when one of these changed
AGENT_SOURCES = ("device_agent", "models")


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


def cache_dir() -> Path:
    """Where the controller keeps the wheels it built or downloaded."""
    from ..modelstore import cache_root

    return cache_root() / "wheels"


def sha256_file(path: Path) -> str:
    """sha256 of a local file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    root = root or ROOT
    h = hashlib.sha256()
    for rel in source_files(root, AGENT_SOURCES):
        h.update(str(rel).encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


def project_wheel(root: Path | None = None, cache: Path | None = None) -> tuple[Path, str]:
    """The project's wheel and the hash of its sources; built only when a source changed.

    Built from a copy of the sources in a temporary folder (nothing is written into the
    checkout), with ``pip wheel --no-deps --no-build-isolation --no-index`` (offline).
    """
    root = root or ROOT
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


class DepWheels:
    """Dependency wheels per (platform, python, packages), obtained once per provision."""

    def __init__(self, wheelhouse: Path | None):
        self.wheelhouse = wheelhouse
        self.lock = threading.Lock()
        self.got: dict[str, list[Path]] = {}

    def get(self, facts: DeviceFacts, packages: Sequence[str]) -> list[Path]:
        """The wheels of ``packages`` for the device's platform and Python."""
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
