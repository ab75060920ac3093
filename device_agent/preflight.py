"""Device preflight: what the agent's own environment can compute with.

``python -m device_agent.preflight WORKDIR`` runs with the agent's venv python (provisioning
runs it after each install, in the workdir, the way the agent is started) and prints one JSON
object:

- ``python``: the interpreter's version, ``[major, minor, micro]``, and ``executable``;
- ``l4t``: the Jetson Linux (L4T) release file's first line, where it was read and the
  ``nvidia-jetpack`` package's version when dpkg knows it; ``null`` off a Jetson. The file is
  ``WORKDIR/nv_tegra_release`` if there is one, else ``/etc/nv_tegra_release``: a device whose
  root filesystem is not its own (a local-testbed namespace shares the host's ``/etc``) presents
  itself as a Jetson with a copy in its workdir, and ``source`` says which file was read;
- ``torch``: version, the CUDA it was built with (``null``: a CPU-only build), git version,
  whether CUDA is available, the first CUDA device's name; ``error`` when it does not import;
- ``numpy``: version (or ``error``);
- ``interop``: a small array through ``torch.from_numpy`` and ``Tensor.numpy`` and back, what
  the agent's tensor frames do (``ok``, ``error``), and ``notes``: what importing torch printed
  about NumPy (a torch built against NumPy 1.x next to NumPy 2.x says so, then fails here).

Runs on Python 3.8 (JetPack 5): standard library only, torch and numpy imported inside the
functions, so a broken install is reported, not a crash. The controller reads the JSON with
``testbed.lab.provision.facts.preflight_summary``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from typing import Any

#: bumped when the JSON's fields change
PREFLIGHT_VERSION = 1
NV_TEGRA_RELEASE = "/etc/nv_tegra_release"
#: a copy of the release file in the workdir, read first (see the module docstring)
WORKDIR_RELEASE = "nv_tegra_release"
#: what importing torch prints when it was built against another NumPy major
_NUMPY_ABI_MARKS = ("compiled using NumPy 1.x", "Failed to initialize NumPy", "_ARRAY_API")


def _error(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_l4t(workdir: str) -> dict[str, Any] | None:
    """The L4T release file's first line and where it was read, or None off a Jetson."""
    for path in (os.path.join(workdir, WORKDIR_RELEASE), NV_TEGRA_RELEASE):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return {"source": path, "text": lines[0] if lines else "", "jetpack_deb": jetpack_deb()}
    return None


def jetpack_deb() -> str | None:
    """The ``nvidia-jetpack`` package's version (``5.1.2-b104``), or None without it or dpkg."""
    try:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = res.stdout.decode("utf-8", "replace").strip()
    return out if res.returncode == 0 and out else None


def _import_torch(notes: list[str]) -> Any:
    """``import torch`` with what it prints and warns kept in ``notes`` (NumPy ABI lines)."""
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(buf):
        warnings.simplefilter("always")
        import torch
    said = [str(w.message) for w in caught] + buf.getvalue().splitlines()
    for line in said:
        line = " ".join(line.split())
        if line and any(m in line for m in _NUMPY_ABI_MARKS) and line not in notes:
            notes.append(line[:300])
    return torch


def torch_facts(notes: list[str]) -> dict[str, Any]:
    """torch's version, build and CUDA device (``error`` when it does not import)."""
    out: dict[str, Any] = {
        "version": None,
        "cuda_build": None,
        "git_version": None,
        "cuda_available": False,
        "device_name": None,
        "error": None,
    }
    try:
        torch = _import_torch(notes)
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        out["error"] = _error(exc)
        return out
    out["version"] = str(torch.__version__)
    out["cuda_build"] = getattr(torch.version, "cuda", None)
    out["git_version"] = getattr(torch.version, "git_version", None)
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        if out["cuda_available"]:
            out["device_name"] = str(torch.cuda.get_device_name(0))
    except Exception as exc:  # noqa: BLE001 - a broken driver is the finding
        out["cuda_available"] = False
        out["error"] = "torch.cuda: " + _error(exc)
    return out


def numpy_facts() -> dict[str, Any]:
    """numpy's version (``error`` when it does not import)."""
    try:
        import numpy
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return {"version": None, "error": _error(exc)}
    return {"version": str(numpy.__version__), "error": None}


def interop(torch_ok: bool, numpy_ok: bool) -> dict[str, Any]:
    """A 2x3 float32 array to a tensor (``torch.from_numpy``), doubled, back (``.numpy()``);
    ``ok`` None when torch or numpy is missing."""
    if not (torch_ok and numpy_ok):
        return {"ok": None, "error": None}
    try:
        import numpy
        import torch

        a = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
        b = (torch.from_numpy(a) * 2).numpy()
        if b.tolist() != [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]:
            return {"ok": False, "error": f"round trip gave {b.tolist()}"}
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return {"ok": False, "error": _error(exc)}
    return {"ok": True, "error": None}


def preflight(workdir: str) -> dict[str, Any]:
    """Everything the module docstring lists, as one JSON-ready dict."""
    notes: list[str] = []
    t = torch_facts(notes)
    n = numpy_facts()
    link = interop(t["version"] is not None, n["version"] is not None)
    link["notes"] = notes
    return {
        "preflight": PREFLIGHT_VERSION,
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "l4t": read_l4t(workdir),
        "torch": t,
        "numpy": n,
        "interop": link,
    }


def main(argv: list[str] | None = None) -> int:
    """Print :func:`preflight`'s JSON for the workdir in ``argv`` (default: the current one)."""
    args = sys.argv[1:] if argv is None else argv
    workdir = os.path.expanduser(args[0]) if args else os.getcwd()
    sys.stdout.write(json.dumps(preflight(workdir)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
