"""The analytic twin: ``testbed simulate RECIPE [--devices N] [--calibrate RUN_DIR]``.

The twin replays a recipe's trials without agents, SSH or tc. The BS model runs in-process with
the experts computed locally (:class:`models.backend.LocalExpertBackend`), so routing, outputs
and accuracy are the model's own; the policies are the recipe's, loaded, placed and hooked in
exactly as the runner does it (:func:`testbed.policy.load_policy`,
:func:`testbed.run.decisions.place_experts`, :func:`testbed.run.cluster.trial_cluster`,
:func:`testbed.run.decisions.policy_hook`, :class:`testbed.run.epochs.EpochLinks`), over ``N``
devices (``dev1 .. devN``; 1000 and more are fine: a policy's placement over many devices leaves
most of them idle). What would take time on the testbed is charged to a virtual clock instead
(:mod:`testbed.run.twin_clock`):

* each MoE layer's expert exchange (``moe_ms``): the calibrated latency model's prediction for
  that layer's per-device loads (token-rows, experts) at the link rates the links would have
  then, each link's bucket as the previous messages left it
  (:func:`testbed.policy.latency_model.predict_layer_ms`, per-device terms from
  :func:`~testbed.policy.latency_model.layer_terms` for ``calls.csv``);
* the BS's time outside the exchange (``bs_ms``): the calibrated time of that layer of the
  model (attention, router) per phase, plus the policy's decision as it ran here (its
  ``select``'s wall time: the real cost of the real object, N devices included), plus a
  decision epoch's rate change (calibrated ``a + b * devices changed`` per source);
* after the last layer of every step, the calibrated tail (final norm, LM head, sampling).

Request and token latencies are sums over that clock, exactly as the runner's rows sum wall time
(:func:`testbed.results.rows.rows_for_request`, :func:`~testbed.results.rows.request_row`,
:func:`testbed.results.report.summary_row`). The results folder has the run's CSVs and columns; its
manifest says ``"mode": "simulated"`` (and the run id carries ``-sim``), which ``testbed
report`` shows. Energy is not modelled (empty cells); ``devices.csv`` and ``profile.csv`` stay
empty.

**Calibration**: :class:`testbed.run.calibration.Calibration`, from ``--calibrate RUN_DIR`` (a
measured run's results folder, :func:`testbed.run.calibration.calibrate_from_run`) or, without
it, :data:`testbed.run.calibration.DEFAULTS` (see that module).

Not simulated (recorded in the manifest's ``twin.not_simulated`` when a recipe asks for them):
faults, ``run.events``, ``run.update_every`` (``Policy.update`` and migrations), Jetson power
modes, a policy's ``load_options`` (quantised experts run at the stored precision here), the
agents' status feed (``ClusterState.devices`` is empty), expert failures and re-routing.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunFailed, one_line
from ..net.channel import read_trace
from ..policy.api import DeviceInfo, PlacementProfile
from ..policy.loading import load_policy
from ..results import schema as R
from ..results.rows import layer_total, request_row, rows_for_request
from . import session as X
from .calibration import calibrate_from_run, default_calibration
from .cluster import trial_cluster
from .decisions import check_model_and_policies, place_experts, policy_hook
from .edge_trial import edge_dir
from .epochs import EpochLinks, Epochs, TraceReplay
from .provenance import git_commit, model_entry, package_versions
from .recipe import Recipe, Trial, check_device_links
from .twin_clock import SimBackend, SimClock, SimLinkRecorder, TimedSelect
from .workload import Request, make_workload


def device_names(n: int) -> list[str]:
    """The twin's devices: ``dev1 .. devN`` (the local testbed's names)."""
    if n < 1:
        raise ConfigError(f"--devices: must be >= 1, not {n}")
    return [f"dev{i}" for i in range(1, n + 1)]


def not_simulated(trials: Sequence[Trial]) -> list[str]:
    """The recipe keys ``trials`` ask for that the twin does not simulate (sorted; the
    manifest's ``twin.not_simulated``)."""
    out = set()
    for t in trials:
        c = t.config
        if c["faults"]["events"]:
            out.add("faults.events")
        if c["run"].get("events"):
            out.add("run.events")
        if c["run"].get("update_every"):
            out.add("run.update_every")
        if c["devices"].get("power_mode") is not None:
            out.add("devices.power_mode")
    return sorted(out)


def open_tables(
    run_dir: Path, sweep: Iterable[str], stack: contextlib.ExitStack
) -> dict[str, R.CsvTable]:
    """The run's CSV tables in ``run_dir`` (name -> open table, closed with ``stack``), with a
    ``sweep.KEY`` column per swept key where the runner has them."""
    extra = [f"sweep.{k}" for k in sweep]
    return {
        name: stack.enter_context(R.CsvTable(run_dir / fname, cols, x, *grow))
        for name, fname, cols, x, *grow in (
            ("requests", R.REQUESTS, R.REQUEST_COLUMNS, extra),
            ("layers", R.LAYERS, R.LAYER_COLUMNS, extra, R.POLICY_PREFIX),
            ("calls", R.CALLS, R.CALL_COLUMNS, extra),
            ("devices", R.DEVICES, R.DEVICE_COLUMNS, ()),
            ("summary", R.SUMMARY, R.SUMMARY_COLUMNS, extra),
            ("profile", R.PROFILE, R.PROFILE_COLUMNS, ()),
            ("links", R.LINKS, R.LINK_COLUMNS, extra),
            ("faults", R.FAULTS, R.FAULT_COLUMNS, extra),
            ("migrations", R.MIGRATIONS, R.MIGRATION_COLUMNS, extra),
        )
    }


@dataclass
class WiredTrial:
    """One trial's repeat as :meth:`Simulator._wire` hooked it into the BS model: the recipe's
    policy seen through :class:`TimedSelect`, the devices, the experts' placement, the links'
    starting rates and epochs."""

    policy: TimedSelect
    names: list[str]
    placement: dict[str, Any]
    rates: list[dict[str, Any]]
    plan: EpochLinks


class SimModel:
    """The BS model of a twin run, its experts computed here (:meth:`load`), and its requests
    run on the twin's clock (:meth:`request`): the step's tail charged after each step, the
    rows summed as the runner sums them."""

    def __init__(self, split: Path, mf: Any, bsm: Any, wire: Any, bytes_per_token: int) -> None:
        self.split, self.mf, self.bsm = split, mf, bsm
        self.local = bsm.backend
        self.wire = wire
        self.bytes_per_token = bytes_per_token
        self.moe_pos = {lay: i for i, lay in enumerate(sorted(mf.moe_layers))}
        self.reference_model: Any = None

    @classmethod
    def load(cls, recipe: Recipe, trials: Sequence[Trial]) -> SimModel:
        """The recipe's model (checked with its trials' policies) as the BS runs it."""
        import torch

        from models.manifest import load_manifest
        from models.runtime import BaseStationModel

        from ..dataplane.profiling import bytes_per_token

        split = check_model_and_policies(recipe, trials)
        m = load_manifest(split)
        X.quiet_transformers()
        if recipe.config["run"].get("bs_threads"):
            torch.set_num_threads(int(recipe.config["run"]["bs_threads"]))
        bsm = BaseStationModel.from_split_dir(split, wire_dtype=recipe.wire_dtype)
        wire = bsm.controller.wire_dtype or next(bsm.model.parameters()).dtype
        return cls(split, m, bsm, wire, bytes_per_token(m.hidden_size, wire.itemsize))

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``model``: the runner's, with the dtype on the wire."""
        return {
            **model_entry(self.split, self.mf),
            "wire_dtype": str(self.wire).removeprefix("torch."),
        }

    def reference(self, q: Request) -> tuple[int, ...]:
        """``q``'s reference output: greedy, the model without the wire's dtype (loaded once)."""
        from models.runtime import BaseStationModel

        if self.reference_model is None:
            self.reference_model = BaseStationModel.from_split_dir(self.split)
        g = self.reference_model.generate_greedy(
            [list(q.prompt)], q.max_new_tokens, q.eos_token_id, q.pad_token_id
        )
        return tuple(g.tokens[0])

    def request(
        self,
        q: Request,
        key: Mapping[str, Any],
        placement: Mapping[str, Sequence[str]],
        clock: SimClock,
        tail_ms: float,
    ) -> tuple[dict, list[dict], list[dict]]:
        """Run request ``q`` on ``clock``: its ``requests.csv`` row, layer rows and call rows."""
        bsm = self.bsm
        step_end: dict[int, float] = {}
        bsm.start_recording()
        bsm.pop_records()
        t0 = clock.now

        def on_step(s: int) -> None:
            clock.advance_ms(tail_ms)
            step_end[s] = clock.now

        try:
            gen = bsm.generate_greedy(
                [list(q.prompt)], q.max_new_tokens, q.eos_token_id, q.pad_token_id, on_step=on_step
            )
            out = tuple(gen.tokens[0])
        finally:
            t_end = clock.now
            records = bsm.pop_records()
            bsm.stop_recording()
        step_start = {0: t0, **{s + 1: v for s, v in step_end.items()}}
        rkey = {**key, "request": q.index}
        lrows, crows, tot = rows_for_request(records, rkey, step_start, placement)
        ref = q.reference if q.reference is not None else self.reference(q)
        energy = {
            "energy_devices_j": None,
            "energy_bs_j": None,
            "energy_j": None,
            "energy_source": "simulated: not modelled",
        }
        row = request_row(q, rkey, out, ref, tot, t0, step_end.get(0, t_end), t_end, energy)
        return row, lrows, crows


class Simulator:
    """One twin run of a recipe (module doc). Use :func:`simulate_recipe`."""

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        devices: int | None = None,
        calibrate: Path | None = None,
        progress: X.Progress | None = None,
    ) -> None:
        self.recipe = recipe
        self.devices = devices
        self.calibrate = calibrate
        self.progress = progress or X.Progress()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.run_id = f"{recipe.name}-sim-{stamp}-{secrets.token_hex(2)}"
        self.out = out
        self.run_dir = out / self.run_id
        self.manifest: dict[str, Any] = {}
        self.summaries: list[dict[str, Any]] = []
        self.requests_done = 0
        self.clock = SimClock()
        self.decisions: dict[str, list[float]] = {}

    def _save(self) -> None:
        R.write_json_atomic(self.run_dir / R.MANIFEST, self.manifest)

    def run(self) -> X.RunResult:
        """Simulate every trial and repeat into a new run folder; its status like the runner's."""
        trials = self.recipe.trials()
        if edge_dir(self.recipe.model_spec()) is not None:
            raise ConfigError(
                f"{self.recipe.path}: model.path: whole-model experts (MoE²) run on the testbed "
                "(testbed run); the twin simulates MoE models only"
            )
        # as a run checks them: against every device the run has (a trial using fewer
        # devices leaves the others' settings unused)
        most = device_names(max(self._n_devices(t) for t in trials))
        check_device_links(trials, lambda t: most, str(self.recipe.path))
        self.cal = (
            calibrate_from_run(self.calibrate)
            if self.calibrate is not None
            else default_calibration()
        )
        try:
            self.run_dir.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            raise ConfigError(f"--out: {self.out}: cannot create the run folder: {e}") from None
        self.manifest = self._new_manifest(trials)
        self._save()
        status, err = "failed", None
        t_wall = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                self._run(trials, stack)
            status = "completed"
        except KeyboardInterrupt:
            status, err = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
            raise
        except BaseException as e:
            err = one_line(e)
            raise RunFailed(self.run_dir, e) from e
        finally:
            self.progress.close()
            self._finish(status, err, t_wall)
        return X.RunResult(
            self.run_dir, self.run_id, status, len(trials), self.requests_done, err, self.summaries
        )

    def _new_manifest(self, trials: Sequence[Trial]) -> dict[str, Any]:
        """The manifest as the run starts (``"mode": "simulated"``, the twin's calibration)."""
        return {
            "run_id": self.run_id,
            "mode": "simulated",
            "status": "running",
            "error": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ended": None,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "recipe": self.recipe.to_dict(),
            "trials": [],
            "completed": [],
            "local_testbed": False,
            "inventory": None,
            "model": None,
            "twin": {
                "devices": self.devices,
                "calibration": self.cal.to_dict(),
                "not_simulated": not_simulated(trials),
            },
        }

    def _finish(self, status: str, err: str | None, t_wall: float) -> None:
        """The manifest as the run ends: its status, the twin's wall time and decisions."""
        self.manifest["twin"].update(
            wall_s=time.perf_counter() - t_wall,
            decision_ms={
                p: {"n": len(v), "median": statistics.median(v), "max": max(v)}
                for p, v in self.decisions.items()
                if v
            },
        )
        self.manifest.update(
            status=status,
            error=err,
            ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            requests_done=self.requests_done,
        )
        self._save()

    def _run(self, trials: list[Trial], stack: contextlib.ExitStack) -> None:
        rec = self.recipe
        self._load_model(trials)
        self._save()
        self.tables = open_tables(self.run_dir, rec.sweep, stack)
        self.progress.start(len(trials), int(rec.config["workload"]["requests"]) * rec.repeats)
        for t in trials:
            self.progress.trial(t.index, f"{t.policy} {t.label}")
            for rep in range(rec.repeats):
                self._trial(t, rep)

    def _load_model(self, trials: list[Trial]) -> None:
        """The BS model (:class:`SimModel`), and what the manifest says of it, of the links'
        shaping (simulated) and (filled per trial) of the compute profiles."""
        self.model = SimModel.load(self.recipe, trials)
        self.manifest["model"] = self.model.manifest_entry()
        p = self.cal.params
        self.manifest["shaping"] = {
            "mode": p.shaping,
            "bucket_bytes": p.bucket_bytes,
            "bucket_slack_us": p.bucket_slack_us,
            "simulated": True,
        }
        self.link_shaping = {
            "shaping": p.shaping,
            "bucket_bytes": p.bucket_bytes,
            "bucket_slack_us": p.bucket_slack_us,
            "offloads": "simulated",
        }
        self.manifest["compute_profile"] = {}

    def _n_devices(self, t: Trial) -> int:
        if self.devices is not None:
            return int(self.devices)
        n = t.config["run"]["devices"]
        return int(n) if n else 3

    def _trial(self, t: Trial, rep: int) -> None:
        """Simulate repeat ``rep`` of trial ``t``: its policy wired in, its workload run, its
        summary and manifest entries written."""
        from ..results.report import summary_row

        rec = self.recipe
        inner = load_policy(
            rec.policy_spec(t.policy), t.config["policy"]["params"], f"{rec.path}: policy.params"
        )
        self.decisions.setdefault(inner.name, [])
        point = dict(t.point)
        key = {
            "run_id": self.run_id,
            "trial": t.index,
            "point": t.label,
            "policy": inner.name,
            "repeat": rep,
            **{f"sweep.{k}": v for k, v in point.items()},
        }
        w = self._wire(t, rep, inner, key)
        self.manifest["trials"].append(
            {
                "trial": t.index,
                "repeat": rep,
                "point": point,
                "policy": inner.describe(),
                "devices": len(w.names),
                "devices_used": len({ds[0] for ds in w.placement.values()}),
                "links_enforced": w.rates[:64],
                "placement": {u: list(ds) for u, ds in w.placement.items()},
            }
        )
        t_req, t_layer, t_calls = self._run_workload(t, rep, key, w.placement)
        self.decisions[inner.name].extend(w.policy.decisions_ms)
        self.manifest["trials"][-1].update(
            link_epochs=w.plan.close(), policy_final=inner.describe(), simulated_s=self.clock.now
        )
        summ = {**key, **summary_row(t_req, t_layer, t_calls)}
        self.tables["summary"].write(summ)
        self.summaries.append(summ)
        self.manifest["completed"].append([t.index, rep])
        self._save()

    def _wire(self, t: Trial, rep: int, inner: Any, key: Mapping[str, Any]) -> WiredTrial:
        """Hook the policy ``inner`` into the BS model for trial ``t``'s repeat ``rep`` as the
        runner does (placement, cluster, link epochs, the policy hook), its time charged to
        the clock: the BS's per layer, the decision's, the rate changes', the exchange's."""
        rec, cal, model = self.recipe, self.cal, self.model
        policy = TimedSelect(inner, self.clock)
        names = device_names(self._n_devices(t))
        budget = float(rec.config["run"].get("memory_budget_mb") or 1e6)
        infos = [DeviceInfo(n, budget, "netns") for n in names]
        links = t.device_links(names)
        profiles = cal.profiles(names)
        placement = place_experts(
            inner,
            model.mf,
            infos,
            PlacementProfile(
                {n: x.down_kbit for n, x in links.items()},
                {n: x.up_kbit for n, x in links.items()},
                profiles,
                model.bytes_per_token,
                str(model.split),
            ),
        )
        for n in names:
            if n not in self.manifest["compute_profile"]:
                a, b = profiles[n]
                self.manifest["compute_profile"][n] = {"a_ms": a, "b_ms": b, "simulated": True}
        rates = [
            {"device": n, "down_kbit": x.down_kbit, "up_kbit": x.up_kbit} for n, x in links.items()
        ]
        sim = SimBackend(model.local, self.clock, cal, model.bytes_per_token)
        sim.placement = placement
        model.bsm.backend = inner.wrap_backend(sim)
        cluster = trial_cluster(
            t, rec.seed + rep, placement, rates, names, profiles, model.bytes_per_token
        )
        sim.cluster = cluster
        trace_path = rec.trace_path(t)
        recorder = SimLinkRecorder(self.tables["links"], self.clock, cal.change_ms)
        sim.decision, sim.change = policy, recorder
        plan = EpochLinks(
            Epochs(cluster.epoch_scope),
            recorder,
            cluster,
            names,
            {**key, **self.link_shaping},
            cluster.channel,
            cluster.bandwidth_hz,
            TraceReplay(read_trace(trace_path), names, str(trace_path))
            if trace_path is not None
            else None,
        )
        hook = policy_hook(policy, cluster, plan, sim, lambda: self.request_index, dict)
        moe_pos, clock = model.moe_pos, self.clock

        def timed_hook(ctx: Any) -> Any:
            clock.advance_ms(cal.bs_ms(ctx.step, moe_pos.get(ctx.layer, 0)))
            return hook(ctx)

        model.bsm.policy = timed_hook
        return WiredTrial(policy, names, placement, rates, plan)

    def _run_workload(
        self, t: Trial, rep: int, key: Mapping[str, Any], placement: Mapping[str, Sequence[str]]
    ) -> tuple[list[dict], list[dict], list[dict]]:
        """Run the trial's workload, writing its rows; its requests', layer totals' and
        calls' rows for the summary."""
        reqs = make_workload(t, self.model.mf, self.recipe.seed + rep)
        t_req: list[dict] = []
        t_layer: list[dict] = []
        status_rows: dict[str, dict] = {}
        t_calls: list[dict] = []
        for q in reqs:
            self.request_index = q.index
            row, lrows, crows = self.model.request(q, key, placement, self.clock, self.cal.tail_ms)
            self.tables["layers"].write_many(lrows)
            self.tables["calls"].write_many(crows)
            self.tables["requests"].write(row)
            t_req.append(row)
            t_layer.append(layer_total(lrows))
            t_calls.extend(
                status_rows.setdefault(str(c["status"]), {"status": c["status"]}) for c in crows
            )
            self.requests_done += 1
            self.progress.request()
        return t_req, t_layer, t_calls


def simulate_recipe(
    recipe: Recipe,
    devices: int | None = None,
    calibrate: Path | None = None,
    out: Path = Path("results"),
    progress: X.Progress | None = None,
) -> X.RunResult:
    """Run ``recipe`` through the analytic twin (module doc) over ``devices`` devices (default:
    each trial's ``run.devices``, else 3), calibrated from the measured run ``calibrate``
    (default: :data:`testbed.run.calibration.DEFAULTS`); returns the results folder and status like
    :func:`testbed.run.session.run_recipe`.

    Raises
    ------
    ConfigError
        A bad recipe, ``--devices`` or ``--calibrate``.
    RunFailed
        On any error during the run (the folder's manifest says ``failed`` and why).
    """
    if devices is not None:
        recipe = with_devices(recipe, devices)
    return Simulator(recipe, out, devices, calibrate, progress).run()


def with_devices(recipe: Recipe, devices: int) -> Recipe:
    """``recipe`` with ``run.devices = devices`` in every trial (a sweep over it dropped)."""
    device_names(devices)  # checks it
    return Recipe(
        recipe.path,
        {**recipe.config, "run": {**recipe.config["run"], "devices": int(devices)}},
        {k: v for k, v in recipe.sweep.items() if k != "run.devices"},
        tuple(k for k in recipe.zipped if k != "run.devices"),
    )


def per_policy_token_ms(run_dir: str | Path) -> dict[tuple[str, str], float]:
    """(policy, point) -> mean per-token latency (``total_ms / output_tokens`` over requests,
    :func:`testbed.results.comparison.per_token_ms`) of a results folder: what the twin is
    checked on against a measured run."""
    from ..results.comparison import per_token_ms

    by: dict[tuple[str, str], list[dict]] = {}
    for r in R.read_csv(Path(run_dir) / R.REQUESTS):
        by.setdefault((r["policy"], r["point"]), []).append(r)
    out = {}
    for k, rows in by.items():
        v = per_token_ms(rows)
        if v is not None and not math.isnan(v):
            out[k] = v
    return out
