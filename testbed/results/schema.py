"""The results folder of a run: file names, CSV columns, and writers that flush every row.

One folder per run (``results/<run-id>/``)::

    manifest.json   run id, start/end, status (running/completed/failed/interrupted) and error,
                    git commit, package versions, inventory (no secrets), resolved recipe,
                    model id + hash, tc state of every link before and after, clock offsets, host
    requests.csv    one row per request
    layers.csv      one row per forward step per MoE layer
    calls.csv       one row per expert call (one expert on one device at one step)
    devices.csv     telemetry samples from the agents' status feed
    summary.csv     one row per trial
    profile.csv     profiling samples, each trial: expert calls of 1..32 tokens per device
                    timed through the BS's exchange (the fit c(N) = a + b N per device is
                    the manifest's ``compute_profile``, the calibrated latency model each
                    trial's ``latency_model``)
    links.csv       one row per device per link change a policy's bandwidth or a channel
                    trace caused: asked and enforced (tc) rates, how long tc took
    migrations.csv  one row per expert moved by a policy's update (run.update_every): from,
                    to, bytes pushed, seconds (testbed.run.updates)

Column names carry their units (``_ms``, ``_j``, ``_w``, ``_kbit``, ``_mb``, ``bytes_``).
Besides the fixed columns below, ``requests.csv``, ``layers.csv``, ``calls.csv`` and
``summary.csv`` carry one ``sweep.<key>`` column per swept recipe key (e.g.
``sweep.links.rate``), in the order of the recipe's sweep table; ``point`` repeats them as
one label (``links.rate=2mbit policy.name=top1``).

``layers.csv`` also carries a policy's own statistics (``Decision.stats``) as ``policy.<key>``
columns (:data:`POLICY_PREFIX`), added after the others when a key is first seen; a row of a
policy that did not give a key has an empty cell there.

Empty cells mean "not known" (e.g. ``energy_j`` of a request during which a device could not be
read; ``energy_source`` then says which). Energy is always marked ``measured`` or
``estimated`` (the CPU-time estimate where no meter exists).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
REQUESTS = "requests.csv"
LAYERS = "layers.csv"
CALLS = "calls.csv"
DEVICES = "devices.csv"
SUMMARY = "summary.csv"
PROFILE = "profile.csv"
LINKS = "links.csv"
MIGRATIONS = "migrations.csv"
FAULTS = "faults.csv"

POLICY_PREFIX = "policy."
"""Prefix of the ``layers.csv`` columns a policy adds with ``Decision.stats``."""

KEY_COLUMNS = ("run_id", "trial", "point", "policy", "repeat")
"""Columns that identify the trial a row belongs to (all CSVs but devices.csv start so)."""

REQUEST_COLUMNS = KEY_COLUMNS + (
    "request",  # index within the trial's repeat
    "task",  # workload task name (tiny task: its transformation)
    "prompt_tokens",
    "output_tokens",
    "ttft_ms",  # prompt in -> first output token (prefill step)
    "tpot_ms",  # mean time per output token after the first
    "total_ms",
    "correct",  # 1/0: the whole output equals the reference answer
    "score",  # fraction of reference tokens matched position by position
    "experts_per_token",  # mean experts used per (token, MoE layer), after failures
    "bytes_down",  # BS -> devices, tensor payload bytes of this request's expert calls
    "bytes_up",  # devices -> BS
    "calls",  # expert calls made for this request
    "calls_failed",  # calls that ended in timeout/error/unreachable/skipped
    "calls_rerouted",  # calls served by a replica
    "energy_devices_j",  # sum over devices of each one's meter delta around the request
    "energy_bs_j",  # the BS's own meter delta over the request
    "energy_j",  # energy_devices_j + energy_bs_j ('' if either is unknown)
    "energy_source",  # measured / estimated / mixed [; missing DEVICES] (dataplane.energy_attr)
    "status",  # ok / degraded (some expert failed) / error
    "error",
    "faults",  # ids of the injected faults active during the request (faults.csv)
    # runs with whole-model experts (MoE²): the request-level policy's budgets and whether the
    # request's measured energy or delay went over them (or it was refused: 1)
    "energy_budget_j",
    "delay_budget_ms",  # its category's
    "over_budget",
)

LAYER_COLUMNS = KEY_COLUMNS + (
    "request",
    "step",  # 0 = prefill, then one per decoded token
    "phase",  # prefill / decode
    "layer",
    "tokens",  # valid tokens in this step
    "experts_selected",  # (token, expert) pairs selected by the policy
    "experts_used",  # distinct experts called
    "devices_used",  # distinct devices called
    "moe_ms",  # wall time of the layer's expert exchange at the BS (dispatch .. gather)
    "bs_ms",  # BS time of this layer outside the expert exchange (attention, router, policy)
    "critical_path_ms",  # the slowest device's round trip (serialise + network + queue + compute)
    "critical_network_ms",  # network part of that round trip
    "critical_compute_ms",  # device queue + compute part of that round trip
    "critical_device",
    "predicted_ms",  # moe_ms as the calibrated latency model predicts it (every policy)
    "bytes_down",
    "bytes_up",
    "failed_experts",
    "rerouted_experts",
    "policy_predicted_ms",  # the layer time the policy's own model predicted ('' if none)
    "decision_ms",  # the policy's decision (in bs_ms, before the exchange)
    "change_ms",  # the rate change this layer's decision started (0 mid-epoch; in bs_ms)
    "predicted_critical_ms",  # predicted_ms + the decision's and the change's predicted time
    # predicted_ms's terms for the device the model predicts slowest (the rest of predicted_ms
    # is the BS's own time in the exchange and the calls' overlap)
    "predicted_air_ms",  # its airtime, down + up
    "predicted_device_ms",  # its device time (per-call cost + a E + b N)
    "predicted_call_ms",  # its fixed per-call cost (zmq, TCP, Python; per KiB of messages)
)

CALL_COLUMNS = KEY_COLUMNS + (
    "request",
    "step",
    "layer",
    "expert",  # uid L{layer}.E{expert}
    "device",
    "attempt",  # 0 = first try, 1.. = after a re-route
    "tokens",
    "status",  # ok / rerouted (ok, on a replica) / timeout / error / unreachable / skipped
    "detail",  # error code and reason when not ok
    "serialize_ms",
    "network_ms",  # round trip minus the device's own time
    "queue_ms",
    "compute_ms",
    "rtt_ms",
    "bytes_down",
    "bytes_up",
    "energy_j",  # device meter over the reply's compute window, shared by compute time
    "energy_source",  # the device meter's label, e.g. measured:nvml:gpu0
    "faults",  # ids of the injected faults active during the call's request
)

DEVICE_COLUMNS = (
    "run_id",
    "trial",
    "time_s",  # seconds since the run started
    "device",
    "power_w",
    "energy_j",  # cumulative since the agent started, as the device's meter reports it
    "energy_source",  # meter label: measured:ina3221-hwmon:VDD_IN, estimated:cpu-time(5 W/core)
    "memory_used_mb",
    "memory_free_mb",
    "utilisation",  # load as the agent reports it (0..1 per core, or GPU busy)
    "experts_loaded",
    "rate_down_kbit",  # enforced link rates (tc) when the sample was taken
    "rate_up_kbit",
)

SUMMARY_COLUMNS = (
    KEY_COLUMNS
    + (
        "requests",
        "requests_ok",
        "latency_p50_ms",
        "latency_p95_ms",
        "ttft_p50_ms",
        "tpot_p50_ms",
        "accuracy",  # mean of requests.correct
        "score",  # mean of requests.score
        "energy_per_token_j",
        "bytes_per_token",
        "network_share",  # sum of critical_network_ms / sum of (critical_path_ms) over layers
        "calls",
        "calls_failed",
        "calls_rerouted",
    )
    + (
        # runs with whole-model experts (MoE²; empty otherwise): SUMMARY_BUDGET_COLUMNS
        "energy_per_request_j",  # mean of requests.energy_devices_j
        "energy_budget_j",  # the policy's budgets (one delay budget for every category)
        "delay_budget_ms",
        "budget_violations",  # requests over a budget or refused
    )
)
SUMMARY_BUDGET_COLUMNS = SUMMARY_COLUMNS[-4:]
"""The summary columns only runs with whole-model experts fill."""


PROFILE_COLUMNS = (
    "run_id",
    "trial",  # the trial profiled (at its start, links at PROFILE_KBIT)
    "device",
    "expert",  # the loaded expert timed
    "tokens",  # token-rows sent in one forward request
    "repeat",
    "compute_ms",  # the agent's own compute time for the request
    "device_ms",  # agent receipt -> reply (compute + queue + framing)
    "rtt_ms",  # BS round trip (send -> reply)
    "experts",  # experts in the call (their uids space-separated in expert)
    "rows",  # token-rows of the call (tokens x experts)
    "exchange",  # id of the timed exchange (run_layer) the call was part of
    "devices",  # devices that exchange called
    "serialize_ms",
    "layer_ms",  # the exchange's wall time (what layers.csv's moe_ms measures)
    "rate_down_kbit",  # enforced while profiling
    "rate_up_kbit",
)

FAULT_COLUMNS = KEY_COLUMNS + (
    "time_s",  # seconds since the trial's first request
    "request",  # the request about to start (at_request) or running (at_s)
    "fault",  # id: f{index}-{action}-{device}
    "device",
    "action",  # kill / stop / link / restart
    "event",  # injected / cleared
    "ok",  # 1: done; 0: it could not be applied (detail says why)
    "detail",
)

LINK_COLUMNS = KEY_COLUMNS + (
    "time_s",  # seconds since the run started, when the change began
    "epoch",  # decision epoch within the trial (recipe policy.epoch)
    "request",
    "step",
    "layer",  # the layer whose decision set the rates
    "source",  # policy (Decision.bandwidth_kbit), channel (links.bandwidth_mhz) or trace
    "device",
    "asked_down_kbit",
    "asked_up_kbit",
    "enforced_down_kbit",  # what tc reports after the change
    "enforced_up_kbit",
    "change_ms",  # wall time of the epoch's tc batch (every device's change, plus read-back)
    "epoch_ms",  # how long the rates then stayed (until the next epoch's change)
    "tc_slower",  # 1: the change took longer than the epoch it governed
    "shaping",  # what charges packets under the HTB class: tbf / netem / htb (links.py)
    "bucket_bytes",  # bytes a link passes free after an idle spell (tbf: one frame) ...
    "bucket_slack_us",  # ... plus this many microseconds of the rate (tbf's timer slack)
    "offloads",  # GSO/TSO/GRO on the shaped BS interfaces: off, or which are still on
    "epoch_scope",  # what one epoch spans (recipe policy.epoch): layer, step or request
)


MIGRATION_COLUMNS = KEY_COLUMNS + (
    "request",  # the update ran just before this request (recipe run.update_every)
    "expert",  # uid that gained a device
    "from_device",  # its device(s) before ('+'-joined; empty: it had none)
    "to_device",
    "bytes",  # shard bytes pushed to to_device (0: the device still had the file)
    "seconds",  # wall time of the whole re-deployment this move was part of
    "time_s",  # seconds since the run started, when it ended
)


class CsvTable:
    """Append-only CSV file that writes its header once and flushes (and fsyncs) every row.

    ``extra`` columns (the ``sweep.*`` ones) are appended after the fixed ``columns``. Missing
    keys are written as empty cells; unknown keys raise ``ValueError`` (a typo in a column
    name must not silently drop data), except keys starting with ``open_prefix`` (e.g.
    ``policy.`` for a policy's own statistics): the first row that has a new one adds it as a
    column at the end, the file rewritten with the wider header (earlier rows: empty cells).
    An existing file's own columns of that prefix are kept when it is opened again (resume).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        columns: Sequence[str],
        extra: Sequence[str] = (),
        open_prefix: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.columns = list(columns) + [c for c in extra if c not in columns]
        self.open_prefix = open_prefix
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new and open_prefix:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            self.columns += [c for c in header if c.startswith(open_prefix)]
        self._index()
        # held open across writes, closed by close() / the with block
        self._f = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(self.columns)
            self._flush()

    def _index(self) -> None:
        self._known = frozenset(self.columns)
        self._pos = {c: i for i, c in enumerate(self.columns)}

    def _grow(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add the ``open_prefix`` columns first seen in ``rows``: the file is rewritten (a
        temporary file renamed over it) with them at the end of the header."""
        new = [
            k
            for r in rows
            for k in r
            if k not in self._known and k.startswith(str(self.open_prefix))
        ]
        if not new:
            return
        new = list(dict.fromkeys(new))
        self._f.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with (
                open(self.path, newline="", encoding="utf-8") as src,
                open(tmp, "w", newline="", encoding="utf-8") as dst,
            ):
                w = csv.writer(dst)
                for i, line in enumerate(csv.reader(src)):
                    w.writerow(line + (new if i == 0 else [""] * len(new)))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)  # the rename survives a power cut
            self.columns += new
            self._index()
        finally:  # on a failed rewrite: the old file as it was, still open for appending
            tmp.unlink(missing_ok=True)
            self._f = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
            self._w = csv.writer(self._f)

    def _flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def _cells(self, row: Mapping[str, Any]) -> list[Any]:
        if not self._known.issuperset(row):
            unknown = ", ".join(repr(k) for k in row if k not in self._known)
            raise ValueError(f"{self.path.name}: dict contains fields not in fieldnames: {unknown}")
        out: list[Any] = []
        add, get = out.append, row.get
        for c in self.columns:  # _cell, its common cases inline (a twin writes millions)
            v = get(c)
            t = type(v)
            if t is float:
                add(round(v, 6) if v == v else "")  # noqa: PLR0124 - NaN
            elif t is str or t is int:
                add(v)
            else:
                add(_cell(v))
        return out

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row and flush it to disk (fsync)."""
        if self.open_prefix:
            self._grow((row,))
        self._w.writerow(self._cells(row))
        self._flush()

    def write_many(
        self, rows: Sequence[Mapping[str, Any]], common: Mapping[str, Any] | None = None
    ) -> None:
        """Write ``rows`` (each as :meth:`write` would) and flush once; with ``common``, each
        row is ``{**common, **row}`` (the shared cells formatted once: a link epoch's rows
        differ only in the device and its rates)."""
        if self.open_prefix:
            self._grow([*rows, common] if common else rows)
        if common is None:
            lines = [self._cells(r) for r in rows]
        else:
            base, pos, known = self._cells(common), self._pos, self._known
            lines = []
            for r in rows:
                if not known.issuperset(r):
                    self._cells(r)  # raises, naming the unknown keys
                line = base.copy()
                for c, v in r.items():
                    line[pos[c]] = _cell(v)
                lines.append(line)
        self._w.writerows(lines)
        self._flush()

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> CsvTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cell(v: Any) -> Any:
    """A value as its CSV cell: ``None`` and NaN empty, floats to 6 decimals, booleans 0/1,
    lists and tuples space-joined."""
    t = type(v)
    if t is str or t is int:
        return v
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:  # noqa: PLR0124 - NaN
            return ""
        return round(v, 6)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file + rename (never a half-written file)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def prune_rows(path: str | os.PathLike[str], keep: Any) -> int:
    """Rewrite a results CSV with only the rows ``keep(row)`` accepts (atomically: temp file +
    rename); a row cut short by a crash is dropped too. Returns the number of rows dropped."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    kept = [r for r in rows if None not in r.values() and None not in r and keep(r)]
    tmp = p.with_name(p.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(rows) - len(kept)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """All rows of a results CSV as dicts of strings (empty file -> [])."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def num(v: str | None) -> float | None:
    """A CSV cell as float, or None when empty/not a number."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None
