"""A run folder: its manifest (JSON, keys in the order they were first set) and its CSV
tables, each row flushed as it is written."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..results import schema as R
from .provenance import git_commit, host_info, package_versions


def utc_now() -> str:
    """The time now as the manifest writes it (``2026-01-31T12:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Recorder:
    """The manifest (:attr:`manifest`, saved by :meth:`save`) and the tables (:attr:`tables`:
    ``requests``, ``layers``, ``calls``, ``devices``, ``summary``, ``profile``, ``links``,
    ``faults``, ``migrations``) of the run folder ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.manifest: dict[str, Any] = {}
        self.tables: dict[str, R.CsvTable] = {}

    def save(self) -> None:
        """Write the manifest (atomically: a crash leaves the last one whole)."""
        R.write_json_atomic(self.run_dir / R.MANIFEST, self.manifest)

    def create(self, run_id: str, recipe: Any, local_testbed: bool) -> None:
        """A new run folder and its first manifest (``running``).

        Raises
        ------
        ConfigError
            When the folder cannot be created (it exists, or no permission).
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            raise ConfigError(
                f"--out: {self.run_dir.parent}: cannot create the run folder: {e}"
            ) from None
        self.manifest = {
            "run_id": run_id,
            "status": "running",
            "error": None,
            "started": utc_now(),
            "ended": None,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "host": host_info(),
            "recipe": recipe.to_dict(),
            "trials": [],
            "completed": [],
            "local_testbed": local_testbed,
            "inventory": None,
            "model": None,
            "links_before": None,
            "links_after": None,
            "clock_offsets": None,
        }

    def open_tables(self, stack: contextlib.ExitStack, sweep: Any) -> None:
        """Open (append to) every table; ``stack`` closes them. The tables keyed by trial point
        get a ``sweep.<key>`` column for each key of ``sweep``."""
        extra = [f"sweep.{k}" for k in sweep]
        d = self.run_dir

        def table(name: str, path: str, columns: Any, *more: Any) -> None:
            self.tables[name] = stack.enter_context(R.CsvTable(d / path, columns, *more))

        table("requests", R.REQUESTS, R.REQUEST_COLUMNS, extra, R.POLICY_PREFIX)
        table("layers", R.LAYERS, R.LAYER_COLUMNS, extra, R.POLICY_PREFIX)
        table("calls", R.CALLS, R.CALL_COLUMNS, extra)
        table("devices", R.DEVICES, R.DEVICE_COLUMNS)
        table("summary", R.SUMMARY, R.SUMMARY_COLUMNS, extra)
        table("profile", R.PROFILE, R.PROFILE_COLUMNS)
        table("links", R.LINKS, R.LINK_COLUMNS, extra)
        table("faults", R.FAULTS, R.FAULT_COLUMNS, extra)
        table("migrations", R.MIGRATIONS, R.MIGRATION_COLUMNS, extra)

    def finish(self, status: str, error: str | None, requests_done: int) -> None:
        """The run's end: its status, error, end time and requests done; saved."""
        self.manifest.update(
            status=status, error=error, ended=utc_now(), requests_done=requests_done
        )
        self.save()
