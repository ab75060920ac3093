"""``testbed run``: run every trial of a recipe against the agents and write the results folder.

For each sweep point (trial) and repeat the run (:class:`testbed.run.trial.TrialRun`)

1. asks the policy for a placement, pushes the shards each device lacks (sha256-checked) and
   loads/unloads experts on the agents so that each holds exactly its share;
2. applies the trial's link profile with in-place ``tc class change`` on the BS and records
   what tc reports as enforced;
3. runs the workload request by request through the BS runtime (attention, router, policy at
   the BS; experts on the agents over ZeroMQ), timing every step;
4. writes one row per request, per MoE layer and step, per expert call, and telemetry samples
   from the agents' status feed — each row flushed as it is produced — then the trial's
   summary row.

Energy of a request (:func:`testbed.dataplane.energy_attr.request_energy`): just before the request
and just after it, the run pings every agent that is up; each ping reply carries that agent's
cumulative meter reading, so ``energy_devices_j`` is the sum of the devices' counter deltas
over windows that enclose the request (idle power and network handling included, the two
pings' own cost too: a few dozen bytes each). ``energy_bs_j`` is the BS's own meter (the
CPU-time estimate of this process when the devices are namespaces on this host) over the
request; ``energy_j`` is their sum, ``energy_source`` says ``measured``/``estimated``/``mixed``
and names any device that could not be read. Per call, ``calls.csv`` has the device meter's
joules over the reply's compute window (see :mod:`testbed.dataplane.backend`).

Whatever happens (an error, a policy that raises, Ctrl-C), the links are restored to what they
were before the run, the manifest records the status (``completed`` / ``failed`` /
``interrupted``) with the error and the tc state after, and rows already written stay.
Without an inventory, a local testbed is created for the run and removed afterwards.

Where things are: :class:`Session` (here) sets up and tears down; :mod:`.trial` runs one trial
repeat; :mod:`.recorder` holds the manifest and tables, :mod:`.resume` continues a stopped
run; :mod:`.workload` makes the requests, :mod:`.decisions` asks the policy,
:mod:`.cluster` keeps the policy's :class:`~testbed.policy.ClusterState`, :mod:`.loading`
brings the agents to a placement, :mod:`.device_profile` profiles the devices,
:mod:`.prediction` times and predicts each layer's exchange, :mod:`.telemetry` reads energy
and the status feed, :mod:`.updates` and :mod:`.faults` (with :mod:`.fault_effects`) act
between requests, :mod:`.provenance` records where the run ran; the rows themselves are
built by :mod:`testbed.results.rows`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ..dataplane.profiling import bytes_per_token
from ..errors import ConfigError, RunFailed, TestbedError, one_line
from ..lab.inventory import bs_runner_for, load_inventory, ssh_runner_for
from ..lab.keys import client_keys
from ..net.channel import read_trace
from ..net.shaper import TcShaper
from ..net.tc import LinkSpec
from ..net.verify import shaper_for
from .decisions import check_model_and_policies
from .device_profile import DeviceProfiler
from .edge_trial import (
    PROFILE_PER_CATEGORY,
    VALIDATION_ITEMS,
    VALIDATION_SEED,
    EdgeModels,
    EdgeTrialRun,
    edge_dir,
    mc_items,
    softmax,
)
from .fault_effects import AgentEffects
from .faults import TrialFaults
from .loading import ExpertLoader
from .prediction import TimedBackend
from .provenance import bs_compute, model_entry
from .recipe import Recipe, check_bs_compute, check_device_links
from .recorder import Recorder
from .resume import prepare_resume, resume_plan
from .telemetry import DeviceSampler, open_bs_meter
from .trial import TrialRun
from .workload import AnswerKey

__all__ = ["Progress", "RunResult", "Session", "quiet_transformers", "resume_plan", "run_recipe"]


def quiet_transformers() -> None:
    """transformers' deprecation chatter (per forward step) would drown the progress bar."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class RunResult:
    """A run's folder, id, status, trials and requests done, error, and summary rows."""

    run_dir: Path
    run_id: str
    status: str
    trials: int
    requests: int
    error: str | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``testbed run --format json`` prints)."""
        return {
            "run_dir": str(self.run_dir),
            "run_id": self.run_id,
            "status": self.status,
            "trials": self.trials,
            "requests": self.requests,
            "error": self.error,
            "summary": self.summary,
        }


class Progress:
    """What a run reports while it works (the CLI draws a rich progress bar from it)."""

    def start(self, trials: int, requests_per_trial: int) -> None:
        """The run begins: ``trials`` sweep points, ``requests_per_trial`` requests each (all its
        repeats together)."""

    def trial(self, index: int, label: str) -> None:
        """Trial ``index`` begins; ``label`` is its policy and sweep point."""

    def request(self) -> None:
        """One request finished."""

    def message(self, text: str) -> None:
        """A status line for the user (provisioning, profiling a device...)."""

    def close(self) -> None:
        """The run ended, however it ended."""


def restore_links(
    shaper: TcShaper, before: Sequence[Any], was_installed: bool, manifest: dict[str, Any]
) -> None:
    """The links as they were before the run (``before``: tc's state then; no tree when there
    was none); the manifest's ``links_after`` records what tc reports after."""
    try:
        if not was_installed:
            shaper.clear()
        else:
            for s in before:
                for direction in ("down", "up"):
                    kbit = getattr(s, f"{direction}_kbit")
                    if kbit:
                        shaper.change(s.device, LinkSpec(kbit), direction)
    finally:
        after = shaper.show()
        manifest["links_after"] = {
            "installed": shaper.is_installed(),
            "links": [s.to_dict() for s in after],
        }


def bs_threads(config: dict[str, Any], inv: Any) -> int | None:
    """The BS runtime's torch threads: ``run.bs_threads``, else 1 on a local namespace testbed
    (the BS shares this host's cores with every device's agent and sshd: a second thread waits
    at each of the model's small ops for a core they hold; on a loaded 2-core host the tiny
    model's ops took 0.21 s with one thread and did not finish in 230 s with two), else None
    (torch's default)."""
    if config["run"].get("bs_threads"):
        return int(config["run"]["bs_threads"])
    devices = getattr(inv, "devices", ())
    if devices and all(d.hw_class == "netns" for d in devices):
        return 1
    return None


class Session:
    """One run of a recipe (see the module docstring): a context manager whose ``with`` sets
    up, stage by stage, what the trials need (inputs checked, inventory or local testbed, power
    modes, links, agents, BS model, tables) and tears all of it down on the way out, on errors
    and Ctrl-C too; :meth:`run_trials` runs the trials inside it. :func:`run_recipe` is the
    way in (it starts the manifest and records the run's status)."""

    def __init__(
        self,
        recipe: Recipe,
        inventory: Path | None,
        out: Path,
        progress: Progress | None = None,
        local_name: str | None = None,
        resume: Path | None = None,
    ) -> None:
        self.recipe = recipe
        self.resume = resume
        #: (trial, repeat) pairs whose rows are all written (the manifest's ``completed``)
        self.completed: set[tuple[int, int]] = set()
        self.inventory_path = inventory
        self.progress = progress or Progress()
        self.local_name = local_name
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.run_id = f"{recipe.name}-{stamp}-{secrets.token_hex(2)}"
        run_dir = out / self.run_id if resume is None else resume
        self.recorder = Recorder(run_dir)
        self.trials = recipe.trials()
        self.t0 = time.monotonic()
        self.requests_done = 0
        self.summaries: list[dict[str, Any]] = []
        self.stack = contextlib.ExitStack()
        #: the faults of the trial being run (cleared at its end, or on the way out)
        self.faults: TrialFaults | None = None
        # set up by the stages of __enter__
        self.checked = False  # check_inputs done (before the run folder, or by __enter__)
        self.split: Path | None = None
        self.traces: dict[int, Any] = {}
        self.inv: Any = None
        self.mf: Any = None
        self.power: Any = None
        self.shaper: Any = None
        self.backend: Any = None
        self.bs_meter: Any = None
        self.runners: dict[str, Any] = {}
        self.loader: Any = None
        self.fault_effects: Any = None
        self.feed: Any = None
        self.sampler: Any = None
        self.timed: Any = None
        self.bsm: Any = None
        self.wire_dtype: Any = None
        self.bytes_per_token = 0
        self.profiler: Any = None
        self.answer_key: Any = None

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return self.recorder.run_dir

    @property
    def manifest(self) -> dict[str, Any]:
        """The run's manifest (the recorder's)."""
        return self.recorder.manifest

    def run_trials(self) -> None:
        """Every trial and repeat not completed yet."""
        rec = self.recipe
        per_trial = int(rec.config["workload"]["requests"]) * rec.repeats
        self.progress.start(len(self.trials), per_trial)
        for t in self.trials:
            self.progress.trial(t.index, f"{t.policy} {t.label}")
            for rep in range(rec.repeats):
                if (t.index, rep) not in self.completed:
                    TrialRun(self, t, rep).run()

    # set-up and teardown -------------------------------------------------------------------------
    def __enter__(self) -> Session:
        try:
            if not self.checked:
                self.check_inputs()
            self._open_inventory()
            self._open_power()
            self._open_links()
            self._open_agents()
            self._open_model()
            self._open_tables()
        except BaseException:
            if not self.stack.__exit__(*sys.exc_info()):
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self.stack.__exit__(exc_type, exc, tb))

    def check_inputs(self) -> None:
        """What can be checked before touching anything: the model, every trial's policy, the
        traces, and the devices ``links.device`` names (against the inventory's, or the local
        testbed's ``dev1..devN`` the run will create) (a new run does it before its folder
        exists: a refused recipe leaves none)."""
        rec = self.recipe
        self.split = check_model_and_policies(rec, self.trials)
        check_bs_compute(rec)
        self.checked = True
        for t in self.trials:
            path = rec.trace_path(t)
            self.traces[t.index] = read_trace(path) if path is not None else None
        if any(t.config["links"].get("device") for t in self.trials):
            if self.inventory_path is not None:
                names = [d.name for d in load_inventory(self.inventory_path).devices]
            else:  # testbed.lab.local names its devices dev1..devN
                names = [f"dev{i}" for i in range(1, self._local_devices() + 1)]
            check_device_links(self.trials, lambda t: names, str(rec.path))

    def _local_devices(self) -> int:
        """How many devices the local testbed made for the run has: the largest
        ``run.devices`` of its trials (default 3)."""
        wanted = [t.config["run"]["devices"] for t in self.trials]
        return max((int(n) for n in wanted if n), default=3)

    def _open_inventory(self) -> None:
        """The inventory (else a local testbed, removed on the way out) and the model's
        manifest; both in the run's manifest."""
        rec = self.recipe
        inv_path = self.inventory_path
        wanted = [t.config["run"]["devices"] for t in self.trials]
        if inv_path is None:
            inv_path = self._local_testbed(self._local_devices())
        inv = load_inventory(inv_path)
        self.inv = inv
        # again against the devices there are, before any link is set
        names = [d.name for d in inv.devices]
        check_device_links(self.trials, lambda t: names, str(rec.path))
        too_many = sorted({int(n) for n in wanted if n and int(n) > len(inv.devices)})
        if too_many:
            raise ConfigError(
                f"{rec.path}: run.devices: {too_many[-1]} > the {len(inv.devices)} "
                f"devices of {inv_path}"
            )
        self.manifest["inventory"] = {"path": str(inv_path), **inv.to_dict()}
        self._record_model()
        self.recorder.save()

    def _record_model(self) -> None:
        """The model's manifest, and its entry in the run's manifest."""
        from models.manifest import load_manifest

        self.mf = load_manifest(self.split)
        self.manifest["model"] = model_entry(self.split, self.mf)

    def _local_testbed(self, devices: int) -> Path:
        """A local testbed of ``devices`` namespaces for the run; its inventory."""
        from ..lab import local

        name = self.local_name or f"run{os.getpid() % 100000}"
        self.progress.message(f"creating local testbed {name} with {devices} devices")
        self.stack.callback(local.down, name)
        info = local.up(name, devices, 1_000_000.0)
        return Path(info["inventory"])

    def _open_power(self) -> None:
        """Jetson power modes (devices.power_mode): every device checked before anything
        changes, each one's own mode restored on the way out."""
        from ..lab.jetson import PowerModeControl

        inv, trials = self.inv, self.trials
        self.power = PowerModeControl.open(
            {d.name: ssh_runner_for(inv, d) for d in inv.devices}
            if any(t.config["devices"]["power_mode"] is not None for t in trials)
            else {},
            [t.config["devices"]["power_mode"] for t in trials],
            f"{self.recipe.path}: devices.power_mode",
        )
        if self.power is not None:
            self.manifest["power_modes_before"] = {
                d: i.get("nvpmodel") for d, i in self.power.infos.items()
            }
            self.stack.callback(
                lambda: self.manifest.update(power_modes_restored=self.power.restore())
            )

    def _open_links(self) -> None:
        """The BS's shaper; the links as they are now, restored on the way out."""
        bs = bs_runner_for(self.inv)
        self.stack.callback(bs.close)
        shaper = shaper_for(self.inv, bs)
        before = shaper.show()
        was_installed = shaper.is_installed()
        self.manifest["links_before"] = {
            "installed": was_installed,
            "links": [s.to_dict() for s in before],
        }
        self.recorder.save()
        self.stack.callback(restore_links, shaper, before, was_installed, self.manifest)
        self.shaper = shaper

    def _open_agents(self) -> None:
        """Agents provisioned and connected (clocks compared), the BS's energy meter, SSH to
        every device, the status feed; each closed on the way out."""
        from ..dataplane.backend import RemoteExpertBackend, StatusFeed
        from ..lab import provision as prov

        inv, stack, man = self.inv, self.stack, self.manifest
        self.progress.message("provisioning agents")
        reports = prov.provision(inv, self.split)
        bad = [r for r in reports if not r.ok]
        if bad:
            raise TestbedError("; ".join(f"{r.device}: {r.error}" for r in bad))
        keys = ("power", "facts", "preflight", "warnings")
        man["devices"] = {r.device: {k: getattr(r, k) for k in keys} for r in reports}
        eps = prov.agent_endpoints(inv)
        curve = client_keys(inv)  # None when the inventory says security = "none"
        man["security"] = inv.security
        run_cfg = self.recipe.config["run"]
        self.backend = backend = RemoteExpertBackend(
            {d: e["endpoint"] for d, e in eps.items()},
            {},
            timeout_s=float(run_cfg["timeout_s"]),
            down_backoff_s=float(run_cfg["down_backoff_s"]),
            curve=curve,
        )
        stack.callback(backend.close)
        clocks = backend.connect()
        man["clock_offsets"] = {
            d: {"offset_ms": c.offset_ns / 1e6, "rtt_ms": c.rtt_ms} for d, c in clocks.items()
        }
        self.bs_meter, man["energy"] = open_bs_meter(inv.devices, backend)
        stack.callback(self.bs_meter.close)
        self.recorder.save()
        self.runners = {d.name: ssh_runner_for(inv, d) for d in inv.devices}
        for r in self.runners.values():
            stack.callback(r.close)
        pubs = {d: e["pub_endpoint"] for d, e in eps.items() if e.get("pub_endpoint")}
        self.feed = StatusFeed(pubs, curve=curve)
        stack.callback(self.feed.close)

    def _open_model(self) -> None:
        """The BS model (its expert backend timed), the wire dtype, the profiler, the loader
        and the answer key."""
        rec = self.recipe
        quiet_transformers()
        if (threads := bs_threads(rec.config, self.inv)) is not None:
            import torch

            torch.set_num_threads(threads)
        self.timed = TimedBackend(self.backend)
        self.bsm = open_bs_model(self.split, rec, self.timed)
        self.manifest["bs_compute"] = bs_compute(self.bsm)
        # the agents load experts with the wire dtype as io dtype; profiling, bytes_per_token
        self.wire_dtype = self.bsm.controller.wire_dtype
        io_dtype = str(self.wire_dtype).removeprefix("torch.")
        self.manifest["model"]["wire_dtype"] = io_dtype
        self.manifest["compute_profile"] = {}
        self.bytes_per_token = bytes_per_token(self.mf.hidden_size, self.wire_dtype.itemsize)
        self.loader = ExpertLoader(self.inv.devices, self.backend, self.runners, self.mf, io_dtype)
        self.fault_effects = AgentEffects(
            self.inv, self.runners, self.shaper, self.backend, self.loader
        )
        self.answer_key = AnswerKey(self.split, rec.bs_device, rec.bs_dtype)

    def _open_tables(self) -> None:
        """The run's tables (closed on the way out), the profiler and the device sampler that
        write to them; an active fault is cleared before the tables close."""
        rec, tables = self.recorder, self.recorder.tables
        rec.open_tables(self.stack, self.recipe.sweep)
        self.profiler = DeviceProfiler(
            self.shaper,
            len(self.inv.devices),
            self.backend,
            (self.mf.hidden_size, self.wire_dtype, self.recipe.seed),
            tables["profile"],
            rec.manifest,
            self.run_id,
        )
        self.sampler = DeviceSampler(
            self.feed,
            tables["devices"],
            self.run_id,
            self.t0,
            float(self.recipe.config["run"]["telemetry_period_s"]),
        )
        # before the tables close: a stopped agent is resumed, a cut link restored, a killed
        # agent restarted, each recorded
        self.stack.callback(self._finish_faults)

    def _finish_faults(self) -> None:
        if self.faults is not None:
            self.faults.finish()


class EdgeSession(Session):
    """A run whose experts are whole models on the devices (``model.path = "edge"``; see
    :mod:`testbed.run.edge_trial`): the same stages, but the models are pushed and loaded per
    trial where its policy places them, the BS holds the gate, and each trial is an
    :class:`~testbed.run.edge_trial.EdgeTrialRun`."""

    def check_inputs(self) -> None:
        """The expert set, every trial's (request-level) policy and the devices the recipe's
        ``links.device`` names; nothing is touched."""
        from ..policy.api import RequestPolicy
        from ..policy.loading import load_policy_class

        rec = self.recipe
        folder = edge_dir(rec.model_spec())
        if folder is None or not folder.is_dir():
            raise ConfigError(f"{rec.path}: model.path: no whole-model expert set there")
        self.edge_folder = folder
        for t in self.trials:
            cls = load_policy_class(rec.policy_spec(t.policy))
            cls.from_params(t.config["policy"]["params"], f"{rec.path}: policy.params")
            if not issubclass(cls, RequestPolicy):
                raise ConfigError(
                    f"{rec.path}: policy.name: {t.policy} decides per layer; whole-model "
                    "experts need a request-level policy (moe2, moe2-all, ...)"
                )
            if t.config["faults"]["events"] or t.config["run"].get("events"):
                raise ConfigError(
                    f"{rec.path}: faults.events, run.events: not supported with whole-model "
                    "experts yet"
                )
        if (rec.bs_device, rec.bs_dtype) != ("cpu", "float32"):
            raise ConfigError(
                f"{rec.path}: run.bs_device, run.bs_dtype: not supported with whole-model "
                "experts (the gate runs on the CPU in float32)"
            )
        if any(t.config["links"].get("device") for t in self.trials):
            names = (
                [d.name for d in load_inventory(self.inventory_path).devices]
                if self.inventory_path is not None
                else [f"dev{i}" for i in range(1, self._local_devices() + 1)]
            )
            check_device_links(self.trials, lambda t: names, str(rec.path))
        self.checked = True

    def _record_model(self) -> None:
        from models.edge_llms import read_report

        report = read_report(self.edge_folder)
        self.manifest["model"] = {
            "kind": "whole-model experts",
            "path": str(self.edge_folder),
            "experts": [e["name"] for e in report["experts"]],
            "categories": report["categories"],
        }

    def _open_model(self) -> None:
        """The expert set at the BS, its validation set and profiling items, the BS's
        aggregation time (gate and combination, median of 20)."""
        rec = self.recipe
        if (threads := bs_threads(rec.config, self.inv)) is not None:
            import torch

            torch.set_num_threads(threads)
        self.progress.message("scoring the validation set at the BS")
        self.edge = EdgeModels(self.edge_folder)
        val = mc_items(VALIDATION_ITEMS, rec.seed + VALIDATION_SEED)
        self.validation = self.edge.validation(val)
        self.validation_prompts = [it["context_ids"] for it in val]
        self.profile_items = mc_items(
            8 * PROFILE_PER_CATEGORY * 3, rec.seed + VALIDATION_SEED + 1, self.validation_prompts
        )
        self.aggregation_ms = aggregation_time_ms(self.edge, val[:20])
        self.manifest["aggregation_ms"] = self.aggregation_ms
        self.loaded: dict[str, dict[str, str]] = {}
        self.profiles: dict[Any, Any] = {}  # (placement, links) -> the trial's RequestProfile
        self.stack.callback(self._unload_all)  # before the backend closes (a later callback)

    def _open_tables(self) -> None:
        rec = self.recorder
        rec.open_tables(self.stack, self.recipe.sweep)
        self.sampler = DeviceSampler(
            self.feed,
            rec.tables["devices"],
            self.run_id,
            self.t0,
            float(self.recipe.config["run"]["telemetry_period_s"]),
        )

    def load_models(self, where: dict[str, str]) -> None:
        """Each model (id -> device) pushed where it is not yet (sha256 reuse) and loaded; a
        model loaded on another device before (an earlier trial's placement) is unloaded."""
        from ..dataplane.lm_call import load_model, unload_model
        from ..lab import provision as prov

        for dev, held in self.loaded.items():  # moved elsewhere: unloaded here
            gone = [m for m in held if where.get(m) != dev]
            if gone:
                unload_model(self.backend, dev, gone)
                for m in gone:
                    del held[m]
        todo: dict[str, dict[str, Any]] = {}
        for mid, dev in where.items():
            if mid not in self.loaded.get(dev, {}):
                todo.setdefault(dev, {})[mid] = self.edge.folders[self.edge.names.index(mid)]
        if not todo:
            return
        self.progress.message(f"pushing {sum(map(len, todo.values()))} models")
        for row in prov.agents_push_models(self.inv, todo):
            if not row["ok"]:
                raise TestbedError(f"{row['device']}: pushing models failed: {row['error']}")
            for mid, path in row["models"].items():
                load_model(self.backend, row["device"], mid, path)
                self.loaded.setdefault(row["device"], {})[mid] = path

    def _unload_all(self) -> None:
        """Every model the run loaded, unloaded from its agent (agents outlive a run); a device
        that does not answer any more is left as it is."""
        from ..dataplane.lm_call import unload_model

        for dev, held in self.loaded.items():
            if held:
                try:
                    unload_model(self.backend, dev, list(held))
                except TestbedError:
                    pass  # its agent is gone or stuck: nothing of the run is left to free there
        self.loaded = {}

    def score(self, device: str, model: str, item: dict[str, Any]) -> Any:
        """One ``score`` call of ``model`` on ``device`` for a multiple-choice ``item``."""
        from ..dataplane.lm_call import lm_request

        return lm_request(
            self.backend,
            device,
            model,
            "score",
            item["context_ids"],
            options=item["choices_ids"],
        )

    def run_trials(self) -> None:
        """Every trial and repeat not completed yet."""
        rec = self.recipe
        self.progress.start(len(self.trials), int(rec.config["workload"]["requests"]) * rec.repeats)
        for t in self.trials:
            self.progress.trial(t.index, f"{t.policy} {t.label}")
            for rep in range(rec.repeats):
                if (t.index, rep) not in self.completed:
                    EdgeTrialRun(self, t, rep).run()


def aggregation_time_ms(edge: EdgeModels, items: Sequence[dict[str, Any]]) -> float:
    """The BS's own time per request: the gate's weights for one prompt and the combination of
    two experts' answers (median over ``items``)."""
    times = []
    for it in items:
        t0 = time.perf_counter()
        w = edge.gate_weights([it["context_ids"]])[0]
        probs = [softmax([0.0] * len(it["choices_ids"])) for _ in range(2)]
        mix = [w[0] * p0 + w[1] * p1 for p0, p1 in zip(*probs)]
        max(range(len(mix)), key=mix.__getitem__)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) if times else 0.0


def open_bs_model(split: Path, rec: Recipe, backend: Any) -> Any:
    """The run's :class:`models.runtime.BaseStationModel` on ``run.bs_device`` in
    ``run.bs_dtype``, its policy and ``backend`` at the host boundary (host tensors, after a
    synchronize: bs_ms stays honest on a GPU), ``model.wire_dtype`` on the wire (float32 when
    unset, whatever the BS dtype)."""
    from models.runtime import BaseStationModel

    return BaseStationModel.from_split_dir(
        split,
        backend=backend,
        wire_dtype=rec.wire_dtype or "float32",
        device=rec.bs_device,
        dtype=rec.bs_dtype,
        host_boundary=True,
    )


def session_for(recipe: Recipe) -> type[Session]:
    """The session class for ``recipe``: :class:`EdgeSession` for whole-model experts."""
    return EdgeSession if edge_dir(recipe.model_spec()) is not None else Session


def run_recipe(
    recipe: Recipe,
    inventory: Path | None = None,
    out: Path = Path("results"),
    progress: Progress | None = None,
    local_name: str | None = None,
    resume: Path | None = None,
) -> RunResult:
    """Run ``recipe``; returns the run's folder and status.

    Raises
    ------
    RunFailed
        On any error (the run folder's manifest says ``failed`` and why; rows written stay).
    KeyboardInterrupt
        Re-raised after the manifest says ``interrupted`` and links are restored.
    """
    session = session_for(recipe)(recipe, inventory, out, progress, local_name, resume)
    rec = session.recorder
    if resume is not None:
        session.completed, session.requests_done, session.summaries = prepare_resume(
            rec, recipe.repeats
        )
        session.run_id = str(rec.manifest["run_id"])
    else:
        session.check_inputs()
        rec.create(session.run_id, recipe, inventory is None)
    rec.save()
    status, err = "failed", None
    try:
        with session:
            session.run_trials()
        status = "completed"
    except KeyboardInterrupt:
        status, err = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        raise
    except BaseException as e:
        err = one_line(e)
        raise RunFailed(rec.run_dir, e) from e
    finally:
        session.progress.close()
        rec.finish(status, err, session.requests_done)
    return RunResult(
        rec.run_dir,
        session.run_id,
        status,
        len(session.trials),
        session.requests_done,
        err,
        session.summaries,
    )
