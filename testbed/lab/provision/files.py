"""Files on a device, pushed only where the device's copy differs (sha256, cached on the
device by size and mtime); expert shards; whole-model folders (MoE²)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ...errors import ProvisionError
from ..inventory import Device
from ..runner import Runner
from .layout import Layout
from .wheels import sha256_file

#: a model id as the agent's ``load_model`` takes it (see :mod:`device_agent.lm`)
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: the hash cache in each folder :func:`push_files` writes to (name -> size, mtime, sha256)
HASH_CACHE = ".sha256.json"
#: run with ``python -c`` on the device (:mod:`.hash_probe`). argv: directory, JSON {file name:
#: expected sha256 or ""}. Prints {name: sha256 or null}.
HASH_PY = Path(__file__).with_name("hash_probe.py").read_text()


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


def remote_workdir(runner: Runner, device: Device) -> str:
    """``device.workdir`` as an absolute path: a leading ``~`` is expanded by the device's
    python (one SSH round trip); any other path is returned as written."""
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
    lay = Layout(workdir or remote_workdir(runner, device))
    files: dict[str, tuple[Path, str]] = {}
    rel: dict[str, str] = {}
    for u in uids:
        src = Path(manifest.expert_path(u))
        files[src.name] = (src, manifest.experts[u].sha256)
        rel[u] = f"experts/{src.name}"
    pushed = push_files(runner, device.python, lay.experts, files)
    return rel, len(pushed)


def model_files(model_id: str, folder: Path) -> dict[str, tuple[Path, str]]:
    """The files of one model folder: ``name -> (local path, sha256)``.

    Raises
    ------
    ProvisionError
        For a bad model id, a folder that is missing, empty or holds a sub-folder (a model
        folder is flat: ``config.json`` + ``model.safetensors``).
    """
    if not _MODEL_ID.fullmatch(model_id):
        raise ProvisionError(f"model id {model_id!r}: use 1-64 letters, digits, '.', '_', '-'")
    folder = Path(folder)
    if not folder.is_dir():
        raise ProvisionError(f"model {model_id}: {folder} is not a folder")
    files: dict[str, tuple[Path, str]] = {}
    for p in sorted(folder.iterdir()):
        if p.name == HASH_CACHE:
            continue
        if not p.is_file():
            raise ProvisionError(f"model {model_id}: {p} is not a plain file (folders are flat)")
        files[p.name] = (p, sha256_file(p))
    if not files:
        raise ProvisionError(f"model {model_id}: {folder} is empty")
    return files


def sync_models(
    runner: Runner,
    device: Device,
    models: Mapping[str, Path],
    *,
    workdir: str | None = None,
) -> tuple[dict[str, str], int]:
    """Make each model folder (``model id -> local folder``, as
    :func:`models.dense_lm.save_dense_lm` writes it) present in the device's
    ``{workdir}/models/<id>/``.

    As :func:`sync_shards`: a file whose sha256 on the device (cached by size and mtime in
    ``models/<id>/.sha256.json``) matches the local one is left alone; the pushed ones are
    verified on the device.

    Returns
    -------
    (model id -> folder relative to the workdir, what the agent's ``load_model`` takes;
    number of files pushed)
    """
    wanted = {mid: model_files(mid, Path(folder)) for mid, folder in models.items()}
    lay = Layout(workdir or remote_workdir(runner, device))
    rel: dict[str, str] = {}
    pushed = 0
    for mid, files in wanted.items():
        rel[mid] = f"models/{mid}"
        pushed += len(
            push_files(runner, device.python, f"{lay.workdir.rstrip('/')}/models/{mid}", files)
        )
    return rel, pushed
