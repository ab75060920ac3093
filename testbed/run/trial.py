"""One trial repeat of a run (:class:`TrialRun`): a sweep point's policy places the experts,
its devices are profiled, its links set, then its requests run one by one, between them the
link events, policy updates and faults due, and every row written as it is produced."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..dataplane.energy_attr import request_energy
from ..policy.api import ClusterState, DeviceInfo, PlacementProfile, Policy
from ..policy.loading import load_policy
from ..results.rows import layer_total, request_row, rows_for_request
from ..results.summary import summary_row
from . import updates
from .cluster import record_devices, trial_cluster
from .decisions import place_experts, policy_hook
from .epochs import EpochLinks, Epochs, LinkRecorder, TraceReplay
from .faults import TrialFaults
from .prediction import ExchangePredictor
from .recipe import Trial
from .telemetry import energy_counters
from .workload import Request, make_workload


class TrialTotals:
    """What a trial's summary row needs, kept small (a long trial has ~10^5 call rows, all on
    disk already): request rows, one layer total per request, one shared dict per call
    status."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.layers: list[dict] = []
        self.calls: list[dict] = []
        self.statuses: dict[str, dict] = {}

    def add(self, row: dict, layer_rows: Sequence[dict], call_rows: Sequence[dict]) -> None:
        """One request's rows."""
        self.requests.append(row)
        self.layers.append(layer_total(layer_rows))
        self.calls.extend(
            self.statuses.setdefault(str(c["status"]), {"status": c["status"]}) for c in call_rows
        )

    def summary(self) -> dict[str, Any]:
        """The summary columns (:func:`testbed.results.summary.summary_row`)."""
        return summary_row(self.requests, self.layers, self.calls)


class TrialRun:
    """Repeat ``rep`` of trial ``t`` in the set-up :class:`~testbed.run.session.Session` ``s``
    (its recorder, agents, links, BS model and profiler). :meth:`run` runs it."""

    def __init__(self, s: Any, t: Trial, rep: int):
        self.s, self.t, self.rep = s, t, rep
        self.recipe = s.recipe
        self.manifest = s.recorder.manifest
        self.tables = s.recorder.tables
        self.request_index = 0
        self.policy: Policy = load_policy(
            self.recipe.policy_spec(t.policy),
            t.config["policy"]["params"],
            f"{self.recipe.path}: policy.params",
        )
        self.key = {
            "run_id": s.run_id,
            "trial": t.index,
            "point": t.label,
            "policy": self.policy.name,
            "repeat": rep,
            **{f"sweep.{k}": v for k, v in t.point.items()},
        }
        n = t.config["run"]["devices"]
        #: the trial's devices: the first ``run.devices`` of the inventory (default: all)
        self.devices = list(s.inv.devices[: int(n)] if n else s.inv.devices)
        self.names = [d.name for d in self.devices]
        self.link_shaping: dict[str, Any] = {}
        #: the placement in force (the policy's, then each update's)
        self.placement: dict[str, tuple[str, ...]] = {}
        self.cluster: ClusterState  # set up by _set_up
        #: the link events applied, the rows the summary needs, the feed's counters at the start
        self.events: list[dict] = []
        self.totals = TrialTotals()
        self.feed0: tuple[dict[str, int], dict[str, int]] = ({}, {})

    def run(self) -> None:
        """Set the trial up, run its requests, write its summary; marked completed."""
        plan, rates = self._set_up()
        self._run_requests(plan, rates)
        self._finish(plan)

    def _place(self) -> dict[str, tuple[str, ...]]:
        """The policy's placement on the trial's devices (``run.memory_budget_mb`` overrides
        the inventory's budgets)."""
        s = self.s
        budget = self.recipe.config["run"].get("memory_budget_mb")
        infos = [DeviceInfo(d.name, budget or d.memory_budget_mb, d.hw_class) for d in self.devices]
        links = self.t.device_links(self.names)
        profile = PlacementProfile(
            {n: x.down_kbit for n, x in links.items()},
            {n: x.up_kbit for n, x in links.items()},
            {n: ab for n, ab in s.profiler.profiles.items() if n in links},
            s.bytes_per_token,
            str(s.split),
        )
        return place_experts(self.policy, s.mf, infos, profile)

    def _enforce_links(self) -> list[dict[str, Any]]:
        """Every device's link at its rates, delay and loss in this trial; what tc reports (the
        shaping info to the manifest and the links rows' cells)."""
        rows, info = enforce_links(self.s.shaper, self.t, [d.name for d in self.s.inv.devices])
        self.manifest["shaping"] = info
        self.link_shaping = {
            "shaping": info["mode"],
            "bucket_bytes": info["bucket_bytes"],
            "bucket_slack_us": info["bucket_slack_us"],
            "offloads": info["offloads_summary"],
        }
        return rows

    def _set_up(self) -> tuple[EpochLinks, dict[str, dict[str, Any]]]:
        """Placement, profiling, links, the trial's manifest entry, its cluster state, link
        plan, selection hook and exchange predictor; (the link plan, device -> tc's rates)."""
        s, t, policy = self.s, self.t, self.policy
        # before placement and compute profiling: both depend on the power mode
        power_mode = s.power.apply(t.config["devices"]["power_mode"]) if s.power else None
        self.placement = self._place()
        s.loader.apply(self.placement, policy.load_options())
        s.bsm.backend = policy.wrap_backend(s.timed)
        params, latency_fit = s.profiler.profile(
            t.index, self.names, self.placement, s.bytes_per_token, s.progress
        )
        links = self._enforce_links()
        self.manifest["trials"].append(
            {
                "trial": t.index,
                "repeat": self.rep,
                "point": t.point,
                "policy": policy.describe(),
                "devices": self.names,
                "links_enforced": links,
                "power_mode": power_mode,
                "placement": {u: list(ds) for u, ds in self.placement.items()},
                "latency_model": latency_fit,
            }
        )
        s.recorder.save()
        self.cluster = cluster = trial_cluster(
            t,
            self.recipe.seed + self.rep,
            self.placement,
            links,
            self.names,
            s.profiler.profiles,
            s.bytes_per_token,
        )
        record_devices(cluster, dict(s.feed.view))
        plan = self._link_plan()
        s.bsm.policy = policy_hook(
            policy, cluster, plan, s.timed, lambda: self.request_index, lambda: s.feed.view
        )
        s.timed.predictor = ExchangePredictor(
            params, self.names, lambda: s.backend.placement, cluster
        )
        return plan, {r["device"]: r for r in links}

    def _link_plan(self) -> EpochLinks:
        """The trial's link epochs: its trace's or channel's rates, or the policy's."""
        s, t, cluster = self.s, self.t, self.cluster
        trace = s.traces[t.index]
        return EpochLinks(
            Epochs(cluster.epoch_scope),
            LinkRecorder(s.shaper, self.tables["links"], s.t0),
            cluster,
            self.names,
            {**self.key, **self.link_shaping},
            cluster.channel,
            cluster.bandwidth_hz,
            TraceReplay(trace, self.names, str(self.recipe.trace_path(t))) if trace else None,
        )

    def _between_requests(self, index: int, window: updates.UpdateWindow, rates: dict) -> None:
        """Before request ``index``: the link events due, and a policy update when due."""
        s = self.s
        self.events += updates.apply_events(
            s.shaper,
            self.t,
            index,
            self.cluster,
            rates,
            str(self.recipe.path),
            [d.name for d in s.inv.devices],
            s.t0,
        )
        if window.due(index):
            new = updates.run_update(
                self.policy,
                self.cluster,
                self.placement,
                window.take_stats(index),
                self.key,
                index,
                model=s.mf,
                apply_placement=s.loader.apply,
                pushed=s.loader.pushed,
                table=self.tables["migrations"],
                t0=s.t0,
            )
            if new is not None:
                self.placement = new

    def _run_requests(self, plan: EpochLinks, rates: dict[str, dict[str, Any]]) -> None:
        """Every request of the trial, its rows written as each ends."""
        s, t = self.s, self.t
        window = updates.UpdateWindow(int(t.config["run"].get("update_every") or 0))
        self.feed0 = dict(s.feed.bytes_received), dict(s.feed.messages)
        s.faults = faults = TrialFaults(
            t.config["faults"]["events"],
            self.names,
            str(self.recipe.path),
            s.fault_effects.effects(t, self.placement),
            lambda row: self.tables["faults"].write({**self.key, **row}),
        )
        for q in make_workload(t, s.mf, self.recipe.seed + self.rep):
            self._between_requests(q.index, window, rates)
            s.sampler.sample(t.index, rates)
            self.request_index = q.index
            at_start = faults.before_request(q.index)
            row, lrows, crows = self._request(q)
            faults.mark(at_start, row, crows)
            self.tables["layers"].write_many(lrows)
            self.tables["calls"].write_many(crows)
            self.tables["requests"].write(row)
            self.totals.add(row, lrows, crows)
            window.add(lrows, crows)
            s.requests_done += 1
            s.progress.request()

    def _request(self, q: Request) -> tuple[dict, list[dict], list[dict]]:
        """Run request ``q`` through the BS runtime; its (request row, layer rows, call rows)."""
        s = self.s
        bsm = s.bsm
        step_end: dict[int, float] = {}
        bsm.start_recording()
        bsm.pop_records()
        e_before, bs_before = energy_counters(s.backend), s.bs_meter.read().energy_j
        t0 = time.perf_counter()

        def on_step(step: int) -> None:
            step_end[step] = time.perf_counter()

        try:
            gen = bsm.generate_greedy(
                [list(q.prompt)], q.max_new_tokens, q.eos_token_id, q.pad_token_id, on_step=on_step
            )
            out = tuple(gen.tokens[0])
        finally:
            t_end = time.perf_counter()
            bs_after = s.bs_meter.read().energy_j
            records = bsm.pop_records()
            bsm.stop_recording()
        energy = request_energy(
            e_before,
            energy_counters(s.backend),
            {d: a.energy_source or "" for d, a in s.backend.agents.items()},
            bs_before,
            bs_after,
            s.bs_meter.energy_source,
        )
        step_start = {0: t0, **{k + 1: v for k, v in step_end.items()}}
        rkey = {**self.key, "request": q.index}
        lrows, crows, tot = rows_for_request(records, rkey, step_start, self.placement)
        ref = s.answer_key(q)
        row = request_row(q, rkey, out, ref, tot, t0, step_end.get(0, t_end), t_end, energy)
        return row, lrows, crows

    def _finish(self, plan: EpochLinks) -> None:
        """The trial's end in the manifest, its faults cleared, its summary row; completed."""
        s, names = self.s, self.names
        s.feed.poll(0)
        feed0 = self.feed0
        self.manifest["trials"][-1].update(
            events=self.events,
            placement_final={u: list(ds) for u, ds in self.placement.items()},
            memory=updates.memory_report(s.backend, names),
            policy_final=self.policy.describe(),
            signalling={
                d: {
                    "bytes": s.feed.bytes_received.get(d, 0) - feed0[0].get(d, 0),
                    "messages": s.feed.messages.get(d, 0) - feed0[1].get(d, 0),
                }
                for d in names
            },
        )
        s.faults.finish()
        s.timed.predictor = None
        self.manifest["trials"][-1]["link_epochs"] = plan.close()
        s.recorder.save()
        summ = {**self.key, **self.totals.summary()}
        self.tables["summary"].write(summ)
        s.summaries.append(summ)
        # every row of this trial repeat is on disk: a resumed run keeps them
        s.completed.add((self.t.index, self.rep))
        self.manifest.setdefault("completed", []).append([self.t.index, self.rep])
        s.recorder.save()


def enforce_links(shaper: Any, t: Trial, names: Sequence[str]) -> tuple[list[dict], dict]:
    """Every link of ``names`` (the inventory's devices, in order) at its rates, delay and loss
    in trial ``t`` (``links.device`` over the cell's, :meth:`~testbed.run.recipe.Trial.link_for`);
    (what tc reports, one row per device; how the links charge messages: mode, free bucket,
    offloads)."""
    links = t.device_links(list(names))
    if not shaper.is_installed():
        shaper.setup(
            [x.spec("down") for x in links.values()], [x.spec("up") for x in links.values()]
        )
    else:
        for name, x in links.items():
            shaper.change(name, x.spec("down"), "down")
            shaper.change(name, x.spec("up"), "up")
    return [r.to_dict() for r in shaper.show()], shaper.shaping_info()
