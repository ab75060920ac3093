"""What a device has: one remote Python check (:data:`FACTS_PY`), a pure parser, pure checks;
and what its agent's venv can compute with (the preflight, :mod:`device_agent.preflight`, run
after each install): :func:`read_preflight`, its summary and the refusal of a Jetson whose torch
has no CUDA, or whose torch and numpy cannot exchange arrays."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ProvisionError
from ..inventory import Device
from ..runner import Runner

#: the device side runs on JetPack 5's python3 (3.8) and JetPack 6's (3.10)
MIN_PYTHON = (3, 8)
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
            f"need >= {'.'.join(map(str, MIN_PYTHON))} (JetPack 5's python3 is 3.8, "
            "JetPack 6's 3.10)"
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


# ---- the preflight: what the agent's venv computes with ------------------------------------------
#: L4T major release -> JetPack major (when dpkg does not know ``nvidia-jetpack``)
JETPACK_OF_L4T = {32: "4", 34: "5", 35: "5", 36: "6"}
#: the fix named when a Jetson's torch has no CUDA
CUDA_FIX = (
    'install JetPack\'s torch and set reuse_packages = ["torch", "numpy"] for this device '
    "in the inventory, or pass --allow-cpu"
)
#: the fix named when torch and numpy cannot exchange arrays
INTEROP_FIX = (
    'use the numpy that torch was built against: set reuse_packages = ["torch", "numpy"] '
    "for this device in the inventory (JetPack's torch with its numpy 1.x), or install "
    '"numpy<2" for that python and reuse it'
)
_L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def parse_nv_tegra_release(text: str) -> str | None:
    """``R35.4.1`` from ``/etc/nv_tegra_release``'s first line (``# R35 (release), REVISION:
    4.1, GCID: ...``), or None if it does not say. Pure."""
    m = _L4T_RE.search(text or "")
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def jetpack_version(l4t: str | None, deb_version: str | None) -> str | None:
    """The JetPack release: the ``nvidia-jetpack`` package's (``5.1.2-b104`` -> ``5.1.2``,
    ``6.0+b106`` -> ``6.0``), else the major from the L4T release (R35 -> ``5``). Pure."""
    m = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", deb_version or "")
    if m:
        return m.group(1)
    m = re.match(r"R(\d+)", l4t or "")
    return JETPACK_OF_L4T.get(int(m.group(1))) if m else None


def preflight_summary(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preflight's JSON (:mod:`device_agent.preflight`) as recorded per device (the
    provision report, the run's manifest, ``agents status``); every key present, None where
    unknown (``raw`` None: no preflight recorded). Pure."""
    raw = raw or {}
    t = raw.get("torch") or {}
    n = raw.get("numpy") or {}
    link = raw.get("interop") or {}
    l4t = raw.get("l4t") or {}
    py = raw.get("python")
    release = None
    if l4t:
        release = parse_nv_tegra_release(str(l4t.get("text") or "")) or "unknown release"
    return {
        "python": ".".join(map(str, py)) if py else None,
        "l4t": release,
        "jetpack": jetpack_version(release, l4t.get("jetpack_deb")) if l4t else None,
        "l4t_source": l4t.get("source") if l4t else None,
        "torch": {
            "version": t.get("version"),
            "cuda_build": t.get("cuda_build"),
            "cuda_available": t.get("cuda_available") if t else None,
            "device_name": t.get("device_name"),
            "git_version": t.get("git_version"),
            "error": t.get("error"),
        },
        "numpy": n.get("version"),
        "interop_ok": link.get("ok"),
        "interop_error": link.get("error"),
        "interop_notes": list(link.get("notes") or []),
    }


def preflight_refusal(summary: Mapping[str, Any], host: str, allow_cpu: bool) -> str | None:
    """Why a device cannot take the agent (one line naming ``host`` and the fix), or None.

    Refused: torch and numpy that cannot exchange arrays (always), and a Jetson (L4T detected)
    whose torch has no CUDA (unless ``allow_cpu``). Pure."""
    t = summary["torch"]
    if summary["interop_ok"] is False:
        why = summary["interop_error"] or "failed"
        if summary["interop_notes"]:
            why += "; torch was built against another NumPy major"
        return (
            f"torch {t['version']} and numpy {summary['numpy']} on {host} cannot exchange arrays "
            f"(torch.from_numpy: {why}); {INTEROP_FIX}"
        )
    if summary["l4t"] is None or allow_cpu:
        return None
    jp = f" (JetPack {summary['jetpack']})" if summary["jetpack"] else ""
    where = f"L4T {summary['l4t']}{jp} on {host}"
    if t["version"] is None:
        return f"{where} but torch does not import in the agent's venv ({t['error']}); {CUDA_FIX}"
    if t["cuda_build"] is None:
        return f"{where} but torch {t['version']} has no CUDA (a CPU-only build); {CUDA_FIX}"
    if not t["cuda_available"]:
        return (
            f"{where} but torch {t['version']} (built for CUDA {t['cuda_build']}) finds no CUDA "
            f"device{': ' + t['error'] if t['error'] else ''}; check that the ssh user is in the "
            f"video group and that torch matches this JetPack, or pass --allow-cpu"
        )
    return None


def preflight_argv(venv_python: str, workdir: str) -> list[str]:
    """How the preflight is run: the venv's python in the workdir, as the agent is. Pure."""
    script = 'cd "$1" && exec "$2" -m device_agent.preflight "$1"'
    return ["sh", "-c", script, "preflight", workdir, venv_python]


def read_preflight(runner: Runner, device: Device, workdir: str, venv_python: str) -> dict:
    """Run the preflight in the agent's venv; its JSON. Raises ProvisionError if it cannot."""
    res = runner.run(preflight_argv(venv_python, workdir), timeout_s=300, check=False)
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if not res.ok or not lines:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
        raise ProvisionError(
            f"preflight with {venv_python} on {device.host} failed "
            f"(exit {res.returncode}): {tail[0]}"
        )
    try:
        out = json.loads(lines[-1])
    except ValueError as exc:
        raise ProvisionError(f"preflight on {device.host}: bad JSON: {exc}") from None
    if not isinstance(out, dict):
        raise ProvisionError(f"preflight on {device.host}: not a JSON object")
    return out
