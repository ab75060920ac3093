"""What a run's manifest records of where it ran: the git commit, package versions, the host,
the model (its split folder, its manifest's sha256) and where the BS part computed."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import ROOT


def git_commit() -> str | None:
    """This checkout's commit (``-dirty`` when it has changes); None outside git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Python's and the installed versions of the packages a run depends on."""
    out = {"python": platform.python_version()}
    for p in (
        "moe-edge-testbed",
        "torch",
        "transformers",
        "pyzmq",
        "numpy",
        "safetensors",
        "fabric",
        "paramiko",
        "onnxruntime",
        "msgpack",
    ):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def host_info() -> dict[str, Any]:
    """The controller host: name, platform, CPUs, L4T release and power mode where they exist."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        info["l4t"] = tegra.read_text(errors="replace").splitlines()[0][:200]
    from ..lab.jetson import query_power
    from ..lab.runner import LocalRunner

    info["power"] = query_power(LocalRunner())  # nvpmodel / jetson_clocks, where they exist
    return info


def sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_entry(split: Path, m: Any) -> dict[str, Any]:
    """The manifest's ``model`` entry for the split folder ``split`` and its manifest ``m``."""
    return {
        "path": str(split),
        "family": m.family,
        "model_type": m.model_type,
        "manifest_sha256": sha256(split / "manifest.json"),
        "moe_layers": list(m.moe_layers),
        "experts": len(m.uids()),
        "hidden_size": m.model_hidden_size,
        "expert_hidden_size": m.hidden_size,
        "lift": dict(m.lift_info) if m.lift_info else None,
    }


def bs_compute(bsm: Any) -> dict[str, Any]:
    """The manifest's ``bs_compute``: where and in which dtype the BS part of ``bsm`` (a
    :class:`models.runtime.BaseStationModel`) ran, the dtype of its router (float32 in a
    half-precision BS) and torch's threads; on CUDA also the GPU's name, compute capability
    and torch's CUDA version."""
    import torch

    dev, dtype = bsm.device, bsm.dtype
    half = dtype in (torch.float16, torch.bfloat16)
    out: dict[str, Any] = {
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "router_dtype": "float32" if half else str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        out.update(
            device=f"cuda:{index}",
            gpu=torch.cuda.get_device_name(index),
            capability=f"{major}.{minor}",
            torch_cuda=torch.version.cuda,
        )
    return out
