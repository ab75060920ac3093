"""Continuing a run that stopped (controller crash, Ctrl-C, error): the recipe and inventory it
ran with, and its folder pruned to the trials (and repeats) it completed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..results import schema as R
from .provenance import git_commit
from .recipe import Recipe
from .recorder import Recorder, utc_now


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of the run folder ``run_dir``."""
    return json.loads((run_dir / R.MANIFEST).read_text())


def resume_plan(run_dir: Path) -> tuple[Recipe, Path | None]:
    """The recipe (as the run resolved it) and inventory to continue ``run_dir`` with.

    Raises
    ------
    ConfigError
        When ``run_dir`` holds no manifest, or the run completed.
    """
    from .recipe import recipe_from_dict

    try:
        man = read_manifest(run_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {run_dir}: no readable {R.MANIFEST} ({e})") from None
    if man.get("status") == "completed":
        raise ConfigError(f"--resume: {run_dir}: the run completed; nothing to resume")
    rd = dict(man["recipe"])
    path = Path(rd.pop("path"))
    # the resolved recipe holds every default; unset optional keys are None there
    raw = {
        t: ({k: v for k, v in body.items() if v is not None} if t != "sweep" else body)
        for t, body in rd.items()
        if isinstance(body, dict)
    }
    recipe = recipe_from_dict(raw, path)
    inv = (
        None
        if man.get("local_testbed") or not man.get("inventory")
        else Path(man["inventory"]["path"])
    )
    return recipe, inv


def prepare_resume(
    rec: Recorder, repeats: int
) -> tuple[set[tuple[int, int]], int, list[dict[str, Any]]]:
    """Load ``rec``'s manifest, keep the rows of the trials (and repeats) it completed, drop the
    rest, and note the resumption in the manifest (``running`` again). Returns the completed
    (trial, repeat) pairs, the requests done and the summary rows kept."""
    rec.manifest = read_manifest(rec.run_dir)
    completed = {(int(t), int(r)) for t, r in rec.manifest.get("completed", [])}
    whole = {t for t, _ in completed if all((t, r) in completed for r in range(repeats))}

    def keep(row: Mapping[str, str]) -> bool:
        if "trial" not in row:
            return True
        if "repeat" in row:
            return (int(row["trial"]), int(row["repeat"])) in completed
        return int(row["trial"]) in whole

    dropped = {p.name: R.prune_rows(p, keep) for p in sorted(rec.run_dir.glob("*.csv"))}
    requests_done = len(R.read_csv(rec.run_dir / R.REQUESTS))
    summaries = R.read_csv(rec.run_dir / R.SUMMARY)
    rec.manifest["trials"] = [
        t for t in rec.manifest.get("trials", []) if (t["trial"], t["repeat"]) in completed
    ]
    rec.manifest.setdefault("resumed", []).append(
        {
            "at": utc_now(),
            "status_before": rec.manifest.get("status"),
            "error_before": rec.manifest.get("error"),
            "completed": sorted(completed),
            "rows_dropped": dropped,
            "git_commit": git_commit(),
        }
    )
    rec.manifest.update(status="running", error=None, ended=None)
    return completed, requests_done, summaries
