"""What a device has: one remote Python check (:data:`FACTS_PY`), a pure parser, pure checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ProvisionError
from ..inventory import Device
from ..runner import Runner

MIN_PYTHON = (3, 10)
ARCHITECTURES = ("x86_64", "aarch64")
#: distribution name -> import name, where they differ
IMPORT_NAMES = {"pyzmq": "zmq", "pyyaml": "yaml", "pillow": "PIL", "onnxruntime-gpu": "onnxruntime"}
#: the device check, run with ``python -c`` on the device's python (:mod:`.facts_probe`: kept
#: valid down to 3.6 so an old python can say its version). argv: workdir, JSON
#: {"reuse": [[dist, import name], ...]}. Prints one JSON object.
FACTS_PY = Path(__file__).with_name("facts_probe.py").read_text()


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
        """The device python's ``major.minor``, e.g. ``"3.10"``."""
        return f"{self.python[0]}.{self.python[1]}"


def json_or_none(text: Any) -> Any:
    """The JSON object in ``text`` (a file read on the device), or None. Pure."""
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
            installed=json_or_none(d.get("installed")),
            agent_state=json_or_none(d.get("agent_state")),
            ready=json_or_none(d.get("ready")),
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


def import_name(dist: str) -> str:
    """The name a distribution is imported by (``pyzmq`` -> ``zmq``). Pure."""
    return IMPORT_NAMES.get(dist.lower(), dist.replace("-", "_"))


def read_facts(runner: Runner, device: Device) -> DeviceFacts:
    """Run the device check with the device's python; raises ProvisionError if it cannot."""
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
