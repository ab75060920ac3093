"""Controller-side wheels: the project's own (built when a source changed) and the agent's
dependencies for each device's platform and Python (downloaded once, or from a wheelhouse).

A wheelhouse is one flat folder of wheels for any number of platforms and Pythons (``testbed
wheelhouse build`` fills it). With one, provisioning never downloads: for each device it takes
the wheels that fit the device's Python and platform (:func:`select_wheels`: the agent's
packages and, read from each wheel's metadata, everything they require on that device), and
refuses, naming the package and the wheelhouse, when one is missing. Where it comes from, first
found: a ``wheelhouse`` argument (``testbed provision --wheelhouse``), the one a command made
current (:func:`using_wheelhouse`: ``testbed run/demo --wheelhouse``), the inventory's
``[testbed] wheelhouse`` (:func:`resolve_wheelhouse`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.tags import Tag, compatible_tags, cpython_tags
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
except ImportError:  # pragma: no cover - pip's copy (pip is needed on the controller anyway)
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import InvalidSpecifier, SpecifierSet
    from pip._vendor.packaging.tags import Tag, compatible_tags, cpython_tags
    from pip._vendor.packaging.utils import (
        InvalidWheelFilename,
        canonicalize_name,
        parse_wheel_filename,
    )

from ... import ROOT
from ...errors import ConfigError, ProvisionError
from .facts import DeviceFacts

if TYPE_CHECKING:
    from ..inventory import Inventory

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
    return download_argv(pip_platforms(facts), facts.python_tag, packages, dest, python)


def download_argv(
    platforms: Sequence[str],
    python_tag: str,
    packages: Sequence[str],
    dest: str | os.PathLike[str],
    python: str = sys.executable,
) -> list[str]:
    """``pip download`` of binary wheels for CPython ``python_tag`` (``3.8``) on ``platforms``
    (``manylinux2014_aarch64``, ...; each manylinux level down from the one given is passed
    too, :func:`compatible_platforms`: pip takes only the levels named) into ``dest``. Pure."""
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
        python_tag,
    ]
    for p in compatible_platforms(platforms):
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


def pip_admits(wheel: Path, python: tuple[int, int] | None) -> bool:
    """Whether the pip ``wheel``'s ``Requires-Python`` admits ``python`` (None: any; a wheel
    without the field or with an unreadable one: yes)."""
    if python is None:
        return True
    try:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode("utf-8", "replace")
        spec = HeaderParser().parsestr(text).get("Requires-Python")
        return spec is None or SpecifierSet(spec).contains(f"{python[0]}.{python[1]}.0")
    except (OSError, StopIteration, zipfile.BadZipFile, InvalidSpecifier):
        return True


def pip_wheel(wheelhouse: Path | None = None, python: tuple[int, int] | None = None) -> Path:
    """A pip wheel to run pip on the device from (wheelhouse, cache, ensurepip, download; never
    downloaded when there is a wheelhouse, :func:`active_wheelhouse` included): the newest one
    that runs on the device's ``python`` (``(3, 8)``: JetPack 5; pip 25.1+ needs 3.9)."""
    wheelhouse = wheelhouse if wheelhouse is not None else active_wheelhouse()
    places = [wheelhouse] if wheelhouse else []
    places.append(cache_dir() / "pip")
    try:
        import ensurepip

        places.append(Path(ensurepip.__file__).parent / "_bundled")
    except ImportError:
        pass
    places.append(Path("/usr/share/python-wheels"))
    for d in places:
        found = newest(_fitting_pips(d, python)) if d.is_dir() else None
        if found:
            return found
    if wheelhouse is not None:
        raise ProvisionError(
            f"wheelhouse {wheelhouse}: no pip wheel (pip-*-py3-none-any.whl) to install with, "
            "and none on this machine: run `testbed wheelhouse build` or `pip download pip`"
        )
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
            *(["--python-version", f"{python[0]}.{python[1]}"] if python else []),
            "pip",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = newest(_fitting_pips(dest, python))
    if res.returncode != 0 or not found:
        raise ProvisionError(
            "no pip wheel to install with: put pip-*.whl in --wheelhouse (pip download pip)"
        )
    return found


def _fitting_pips(folder: Path, python: tuple[int, int] | None) -> list[Path]:
    return [p for p in folder.glob("pip-*-py3-none-any.whl") if pip_admits(p, python)]


def newest(wheels: Iterable[Path]) -> Path | None:
    """The wheel of the highest version among ``wheels`` (by version, not by name), or None."""
    best: tuple[Any, Path] | None = None
    for p in wheels:
        try:
            v = parse_wheel_filename(p.name)[1]
        except InvalidWheelFilename:
            continue
        if best is None or v > best[0]:
            best = (v, p)
    return best[1] if best else None


class DepWheels:
    """Dependency wheels per (platform, python, packages), obtained once per provision."""

    def __init__(self, wheelhouse: Path | None):
        self.wheelhouse = wheelhouse if wheelhouse is not None else active_wheelhouse()
        self.lock = threading.Lock()
        self.got: dict[str, list[Path]] = {}

    def get(self, facts: DeviceFacts, packages: Sequence[str]) -> list[Path]:
        """The wheels of ``packages`` for the device's platform and Python."""
        if not packages:
            return []
        if self.wheelhouse is not None:
            return select_wheels(self.wheelhouse, Target.of(facts), packages)
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


# wheelhouses ---------------------------------------------------------------------------------
_LEGACY_MANYLINUX = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}


@dataclass(frozen=True)
class Target:
    """A device's Python and platform, as a wheelhouse is built and read for it."""

    #: CPython version (major, minor[, micro])
    python: tuple[int, ...]
    #: ``x86_64`` or ``aarch64``
    machine: str
    #: ``pip download --platform`` values (:func:`pip_platforms`)
    platforms: tuple[str, ...]
    #: distributions the device brings itself (``reuse_packages``): never taken from wheels
    skip: tuple[str, ...] = ()

    @classmethod
    def of(cls, facts: DeviceFacts) -> Target:
        """The target of a device, from its facts (its reused packages skipped). Pure."""
        machine = "aarch64" if facts.machine == "arm64" else facts.machine
        return cls(facts.python, machine, tuple(pip_platforms(facts)), tuple(facts.reuse))

    @property
    def python_tag(self) -> str:
        """``major.minor``, e.g. ``"3.8"``."""
        return f"{self.python[0]}.{self.python[1]}"

    @property
    def label(self) -> str:
        """``cp38 manylinux_2_31_aarch64``: for messages."""
        return f"cp{self.python[0]}{self.python[1]} {self.platforms[0]}"

    def tags(self) -> set[Tag]:
        """Every wheel tag this target installs (CPython, abi3, pure Python; each manylinux
        level up to its glibc). Pure."""
        plats = compatible_platforms(self.platforms)
        py = (self.python[0], self.python[1])
        return set(cpython_tags(py, platforms=plats)) | set(
            compatible_tags(py, interpreter=f"cp{py[0]}{py[1]}", platforms=plats)
        )

    def markers(self) -> dict[str, str]:
        """The environment markers (PEP 508) of the target. Pure."""
        full = ".".join(map(str, self.python)) if len(self.python) > 2 else f"{self.python_tag}.0"
        return {
            "python_version": self.python_tag,
            "python_full_version": full,
            "implementation_name": "cpython",
            "implementation_version": full,
            "platform_python_implementation": "CPython",
            "platform_machine": self.machine,
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "extra": "",
        }


def compatible_platforms(platforms: Iterable[str]) -> list[str]:
    """Platform tags a wheel may carry for these ``--platform`` values: each manylinux level
    down from the one given (``manylinux_2_31`` takes ``manylinux_2_17`` and ``manylinux2014``
    wheels), in order, no repeats. Pure."""
    out: list[str] = []
    for plat in platforms:
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", plat)
        legacy = re.fullmatch(r"(manylinux(?:2014|2010|1))_(\w+)", plat)
        if m:
            major, minor, arch = int(m[1]), int(m[2]), m[3]
        elif legacy:
            (major, minor), arch = _LEGACY_MANYLINUX[legacy[1]], legacy[2]
        else:
            out += [plat] if plat not in out else []
            continue
        for mi in range(minor, -1, -1):
            out.append(f"manylinux_{major}_{mi}_{arch}")
            out += [f"{k}_{arch}" for k, v in _LEGACY_MANYLINUX.items() if v == (major, mi)]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class _Wheel:
    path: Path
    name: str
    version: Any


def _index(wheelhouse: Path, target: Target) -> dict[str, list[_Wheel]]:
    """The wheelhouse's wheels that fit ``target``, by distribution, newest first."""
    tags = target.tags()
    out: dict[str, list[_Wheel]] = {}
    for p in sorted(wheelhouse.glob("*.whl")):
        try:
            name, version, _, wtags = parse_wheel_filename(p.name)
        except InvalidWheelFilename:
            continue
        if wtags & tags:
            out.setdefault(str(name), []).append(_Wheel(p, str(name), version))
    for ws in out.values():
        ws.sort(key=lambda w: w.version, reverse=True)
    return out


def wheel_requires(path: Path) -> list[str]:
    """A wheel's ``Requires-Dist`` lines (its ``*.dist-info/METADATA``)."""
    try:
        with zipfile.ZipFile(path) as z:
            meta = next(
                n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            )
            text = z.read(meta).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile, StopIteration):
        raise ProvisionError(f"{path}: not a readable wheel (no .dist-info/METADATA)") from None
    return HeaderParser().parsestr(text).get_all("Requires-Dist") or []


def select_wheels(wheelhouse: Path, target: Target, packages: Sequence[str]) -> list[Path]:
    """The wheels of ``wheelhouse`` that install ``packages`` on ``target``: for each package
    and each requirement they have there (their metadata, markers evaluated for the target),
    the newest wheel that fits the target and the version asked; packages the target reuses
    are left out.

    Raises
    ------
    ProvisionError
        One line naming each package with no such wheel (and what needs it) and the wheelhouse.
    """
    index = _index(wheelhouse, target)
    env = target.markers()
    skip = {canonicalize_name(p) for p in target.skip}
    chosen: dict[str, _Wheel] = {}
    missing: list[str] = []
    seen: set[tuple[str, str]] = set()
    todo: deque[tuple[Requirement, str]] = deque((Requirement(p), "") for p in packages)
    while todo:
        req, by = todo.popleft()
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        w = chosen.get(name) or next(
            (w for w in index.get(name, []) if req.specifier.contains(w.version, prereleases=True)),
            None,
        )
        if w is None or not req.specifier.contains(w.version, prereleases=True):
            missing.append(f"{req}{f' (for {by})' if by else ''}")
            continue
        chosen[name] = w
        for extra in ("", *sorted(req.extras)):
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo.extend((r, w.name) for r in _requires(w.path, {**env, "extra": extra}))
    if missing:
        raise ProvisionError(
            f"wheelhouse {wheelhouse}: no wheel of {', '.join(missing)} for {target.label} "
            f"(add it: testbed wheelhouse build; nothing is downloaded with a wheelhouse)"
        )
    return sorted(w.path for w in chosen.values())


def _requires(path: Path, env: dict[str, str]) -> Iterator[Requirement]:
    """The requirements of a wheel that apply in ``env`` (its markers evaluated there)."""
    for line in wheel_requires(path):
        try:
            r = Requirement(line)
        except InvalidRequirement:
            raise ProvisionError(f"{path}: bad Requires-Dist {line!r}") from None
        if r.marker is None or r.marker.evaluate(env):
            yield r


_ACTIVE: list[Path] = []


@contextmanager
def using_wheelhouse(wheelhouse: Path | None) -> Iterator[None]:
    """Within the ``with``, provisioning that is given no wheelhouse takes this one (``testbed
    run/demo --wheelhouse``: the run's own provisioning has no parameter for it); None: no
    change."""
    if wheelhouse is None:
        yield
        return
    _ACTIVE.append(wheelhouse)
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_wheelhouse() -> Path | None:
    """The wheelhouse of the innermost :func:`using_wheelhouse`, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def resolve_wheelhouse(given: str | os.PathLike[str] | None, inv: Inventory) -> Path | None:
    """The wheelhouse to provision ``inv`` from: ``given`` (``--wheelhouse``), else the current
    one (:func:`using_wheelhouse`), else the inventory's ``[testbed] wheelhouse``; None: none
    (wheels are downloaded).

    Raises
    ------
    ConfigError
        ``given`` is not a folder.
    """
    if given is not None:
        wh = Path(given).expanduser()
        if not wh.is_dir():
            raise ConfigError(f"--wheelhouse: {wh}: no such directory")
        return wh
    active = active_wheelhouse()
    if active is not None:
        return active
    return Path(inv.wheelhouse) if inv.wheelhouse else None


def build_wheelhouse(
    targets: Sequence[Target], out: Path, packages: Sequence[str] = AGENT_PACKAGES
) -> dict[str, Any]:
    """Fill ``out`` (one flat folder) with binary wheels of ``packages`` (less each target's
    ``skip``) and what they require, for every target's Python and platform (``pip download
    --only-binary=:all:``, wheels already there are kept), one pip wheel that runs on the
    oldest Python there, and the project's own wheel; then check that provisioning finds
    everything in it (:func:`select_wheels`).

    Returns ``{"wheelhouse", "targets": [{"target", "packages"}], "written": [{"file",
    "mb"}], "files", "mb"}`` (``written``: the wheels new or changed in ``out``).

    Raises
    ------
    ProvisionError
        A download failed (naming the target and pip's last line), or a target lacks a wheel.
    """
    out.mkdir(parents=True, exist_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.whl")}
    rows = []
    for t in dict.fromkeys(targets):
        skip = {canonicalize_name(s) for s in t.skip}
        pkgs = [p for p in packages if canonicalize_name(p) not in skip]
        rows.append({"target": t.label, "packages": pkgs})
        if pkgs:
            _pip_download(download_argv(t.platforms, t.python_tag, pkgs, out), t.label)
    _pip_for_oldest(out, [t.python for t in targets])
    project, _ = project_wheel()
    for old in out.glob(f"{PROJECT_DIST}-*.whl"):
        if old.name != project.name:
            old.unlink()
    shutil.copy2(project, out / project.name)
    for t, row in zip(dict.fromkeys(targets), rows):
        select_wheels(out, t, row["packages"])
    written = [
        {"file": p.name, "mb": round(p.stat().st_size / 1e6, 2)}
        for p in sorted(out.glob("*.whl"))
        if before.get(p.name) != p.stat().st_mtime_ns
    ]
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    return {
        "wheelhouse": str(out),
        "targets": rows,
        "written": written,
        "files": len(list(out.glob("*.whl"))),
        "mb": round(total / 1e6, 2),
    }


def _pip_download(argv: list[str], what: str) -> None:
    """Run one ``pip download``; ProvisionError with pip's last line if it fails."""
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
        raise ProvisionError(f"pip download for {what} failed: {tail[0]}")


def _pip_for_oldest(out: Path, pythons: Sequence[tuple[int, ...]]) -> None:
    """One pip wheel in ``out``: the newest pip that runs on the oldest Python of ``pythons``
    and of the ``cpXY`` wheels already there (provisioning pushes one pip to every device)."""
    have = [(int(m[1]), int(m[2])) for m in _CP_TAGS.finditer(" ".join(os.listdir(out)))]
    oldest = min([(p[0], p[1]) for p in pythons] + have)
    stage = out / f".pip-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        tag = f"{oldest[0]}.{oldest[1]}"
        _pip_download(download_argv((), tag, ["--no-deps", "pip"], stage), f"pip (python {tag})")
        got = newest(stage.glob("pip-*.whl"))
        if got is None:
            raise ProvisionError(f"pip download of pip left no wheel in {stage}")
        if not (out / got.name).is_file():
            for old in out.glob("pip-*.whl"):
                old.unlink()
            os.replace(got, out / got.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_CP_TAGS = re.compile(r"-cp(3)(\d+)-")
