"""``testbed run``: run every trial of a recipe against the agents and write the results folder.

For each sweep point (trial) and repeat the runner

1. asks the policy for a placement, pushes the shards each device lacks (sha256-checked) and
   loads/unloads experts on the agents so that each holds exactly its share;
2. applies the trial's link profile with in-place ``tc class change`` on the BS and records
   what tc reports as enforced;
3. runs the workload request by request through the BS runtime (attention, router, policy at
   the BS; experts on the agents over ZeroMQ), timing every step;
4. writes one row per request, per MoE layer and step, per expert call, and telemetry samples
   from the agents' status feed — each row flushed as it is produced — then the trial's
   summary row.

Energy of a request (:func:`testbed.dataplane.energy_attr.request_energy`): just before the request and
just after it, the runner pings every agent that is up; each ping reply carries that agent's
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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import ROOT
from ..dataplane.energy_attr import request_energy
from ..dataplane.profiling import bytes_per_token, fit_profiles, profile_exchanges
from ..errors import ConfigError, PolicyFailed, RunFailed, TestbedError, one_line
from ..lab.inventory import bs_runner_for, load_inventory, ssh_runner_for
from ..lab.keys import client_keys
from ..lab.modelstore import resolve_split
from ..net.channel import ChannelModel, read_trace
from ..net.links import LinkSpec, TcShaper
from ..net.verify import shaper_for
from ..policy.api import ClusterState, DeviceInfo, ExpertInfo, Policy, load_policy
from ..results import schema as R
from .epochs import EpochLinks, Epochs, LinkRecorder, TraceReplay
from .faults import Effects, FaultInjector, check_devices, parse_faults
from .recipe import Recipe, Trial

#: the links' rate, both ways, while a trial's devices are profiled: fast enough that the calls'
#: fixed costs are not small differences of long airtimes, and like the rates runs see, since
#: what calls running together cost each other grows with the CPU work their transfers need per
#: millisecond (at 300 Mbit/s two 1-token calls together took 1.6 ms more than alone, in the
#: demo's 20-100 MHz cells about 0.5)
PROFILE_KBIT = 50_000.0
#: repeats of each profiled exchange (its median per call shape is fitted)
PROFILE_REPEATS = 5


# ---- provenance -------------------------------------------------------------------------------
def git_commit() -> str | None:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quiet_transformers() -> None:
    """transformers' deprecation chatter (per forward step) would drown the progress bar."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


# ---- workload -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    index: int
    task: str
    prompt: tuple[int, ...]
    reference: tuple[int, ...] | None  # expected output tokens (None: computed later)
    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int


def make_workload(trial: Trial, manifest: Any, seed: int) -> list[Request]:
    """The requests of one trial repeat (deterministic in ``seed``)."""
    wl = trial.config["workload"]
    n = int(wl["requests"])
    if wl["task"] == "tiny":
        from models import tinytask as tt

        if (
            not (Path(manifest.bs_config_path).parent / "tiny_task.json").is_file()
            and not (Path(manifest.root) / "tiny_task.json").is_file()
        ):
            raise ConfigError(
                f"workload.task: 'tiny' needs the built-in tiny model, not "
                f'{manifest.root} (use task = "synthetic")'
            )
        exs = tt.generate("heldout", n, seed=seed)
        return [
            Request(
                i, e.task, tuple(e.prompt), tuple(e.target), len(e.target), tt.EOS_ID, tt.PAD_ID
            )
            for i, e in enumerate(exs)
        ]
    rng = random.Random(seed)
    vocab = int(manifest.dims.get("vocab_size", 0)) or 32000
    T, out = int(wl["prompt_tokens"]), int(wl["output_tokens"])
    return [
        Request(
            i, "synthetic", tuple(rng.randrange(1, vocab) for _ in range(T)), None, out, None, 0
        )
        for i in range(n)
    ]


# ---- timing wrapper around the expert backend --------------------------------------------
class TimedBackend:
    """Delegates to ``inner`` and stamps each layer's enter/exit time (perf_counter seconds)
    into the result's ``info`` (``t_enter``, ``t_exit``), with ``pending`` (what the selection
    hook noted for this layer: the policy's own ``policy_predicted_ms``, ``decision_ms``,
    ``change_ms``, ``epoch_start``) merged in and cleared. With a ``predictor`` (an
    :class:`ExchangePredictor`), the exchange is first predicted from the rows actually handed
    over (``predicted_ms``, ``predicted_critical_ms``), before its clock starts."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.pending: dict[str, Any] = {}
        self.predictor: ExchangePredictor | None = None

    def run_layer(self, work: Any) -> Any:
        pred = self.predictor(work, self.pending) if self.predictor is not None else None
        t0 = time.perf_counter()
        res = self.inner.run_layer(work)
        res.info["t_enter"], res.info["t_exit"] = t0, time.perf_counter()
        if pred:
            res.info.update(pred)
            observe = getattr(self.predictor, "observe", None)
            if observe is not None:
                observe(res)
        if self.pending:
            self.pending.pop("epoch_start", None)
            self.pending.pop("links_changed", None)
            res.info.update(self.pending)
            self.pending = {}
        return res


#: layers.csv's columns with the predicted slowest device's terms (:func:`critical_terms`)
TERM_COLUMNS = ("predicted_air_ms", "predicted_device_ms", "predicted_call_ms")


def critical_terms(terms: Mapping[str, Any]) -> dict[str, float | None]:
    """The terms of the device with the largest predicted round trip (``terms`` as
    :func:`testbed.policy.latency_model.layer_terms` gives them): its airtime both ways, its device
    time and its fixed per-call cost; ``None`` each when no device is called."""
    tot = terms.get("total") if terms else None
    if tot is None or not len(tot) or not max(tot):
        return dict.fromkeys(TERM_COLUMNS)
    k = max(range(len(tot)), key=lambda i: tot[i])
    return {
        "predicted_air_ms": float(terms["air_down"][k] + terms["air_up"][k]),
        "predicted_device_ms": float(terms["device"][k]),
        "predicted_call_ms": float(terms["call"][k]),
    }


class ExchangePredictor:
    """The calibrated latency model's prediction of one layer's exchange, for every policy
    (:func:`testbed.policy.latency_model.predict_layer_ms`): from the rows the BS hands to the backend
    (after any wrapper such as CoEL's fusion) grouped by the device holding each expert
    (``placement()``, the backend's), the rates in force in ``cluster`` (down and up, as tc
    read them back) and the trial's fitted ``params``.

    Each link's bucket is followed from message to message (:meth:`observe`): a message that
    passed free spent part of it, one that was held back emptied it, and it refills at the
    link's rate until the next message (whose start is predicted: the request now, the reply
    after the request's airtime and the device's time) -- a slow link is still refilling when
    the next layer's message comes. A rate change fills the bucket of every link it changed
    (the kernel's ``tbf_change`` sets the tokens to the full bucket): at an epoch's start the
    links changed (``pending["links_changed"]``) start full. ``predicted_critical_ms`` adds the decision's and, at an
    epoch's start, the rate change's predicted time: the medians of this trial's earlier ones
    (the first: 0)."""

    def __init__(
        self,
        params: Any,
        names: Sequence[str],
        placement: Callable[[], Mapping[str, Sequence[str]]],
        cluster: ClusterState,
    ):
        self.params = params.for_devices(names)
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(names)}
        self.placement = placement
        self.cluster = cluster
        self.decisions: list[float] = []
        self.changes: list[float] = []
        from ..policy.latency_model import LinkBuckets

        #: each link's bucket, on the perf_counter clock
        self.buckets = LinkBuckets()
        self._last: dict[str, Any] | None = None

    def loads(self, work: Any) -> tuple[Any, Any]:
        """(token-rows, experts) per device of an exchange's ``work``."""
        import numpy as np

        rows, experts = np.zeros(len(self.names)), np.zeros(len(self.names))
        where = self.placement()
        for uid, x in work.inputs.items():
            ds = where.get(uid) or ()
            k = self.index.get(ds[0]) if ds else None
            if k is not None and int(x.shape[0]):
                rows[k] += int(x.shape[0])
                experts[k] += 1
        return rows, experts

    def __call__(self, work: Any, pending: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        from ..policy.latency_model import layer_ms_of

        now = time.perf_counter()
        self.buckets.refill(pending.get("links_changed") or ())
        rows, experts = self.loads(work)
        c = self.cluster
        down = np.array([c.rate_down_kbit.get(n) or 0.0 for n in self.names])
        up = np.array([c.rate_up_kbit.get(n) or 0.0 for n in self.names])
        terms, tok_d, tok_u = self.buckets.exchange_terms(
            self.names, rows, experts, down, up, self.params, now
        )
        layer_ms = layer_ms_of(terms, self.params)
        self._last = {"down": down, "up": up, "tok_d": tok_d, "tok_u": tok_u, "terms": terms}
        start = bool(pending.get("epoch_start"))
        crit = (
            layer_ms
            + (float(np.median(self.decisions)) if self.decisions else 0.0)
            + (float(np.median(self.changes)) if start and self.changes else 0.0)
        )
        dec, chg = pending.get("decision_ms"), pending.get("change_ms")
        if dec is not None:
            self.decisions.append(float(dec))
        if start and chg:
            self.changes.append(float(chg))
        return {"predicted_ms": layer_ms, "predicted_critical_ms": crit, **critical_terms(terms)}

    def observe(self, res: Any) -> None:
        """After the exchange: where each called device's buckets stand (the request left its
        leaf its airtime after the send; the reply, when it arrived)."""
        last, self._last = self._last, None
        t_enter = res.info.get("t_enter")
        if last is None or t_enter is None:
            return
        seen: set[str] = set()
        for call in res.info.get("calls", ()):
            dev = call.get("device")
            k = self.index.get(dev)
            if k is None or dev in seen or call.get("status") != "ok" or call.get("rtt_ms") is None:
                continue
            seen.add(dev)
            sent = t_enter + float(call.get("serialize_ms") or 0.0) / 1e3
            self.buckets.sent(
                dev,
                k,
                last["terms"],
                (last["tok_d"], last["tok_u"]),
                (last["down"][k], last["up"][k]),
                (sent + last["terms"]["air_down"][k] / 1e3, sent + float(call["rtt_ms"]) / 1e3),
                self.params,
            )


# ---- rows from records --------------------------------------------------------------------
_FAIL = ("timeout", "unreachable", "skipped", "error")


def _call_status(c: Mapping[str, Any], primary: str | None) -> tuple[str, str]:
    st = str(c.get("status", ""))
    if st == "ok":
        return ("rerouted" if primary is not None and c.get("device") != primary else "ok"), ""
    if st.startswith("error"):
        return "error", f"{st} {c.get('reason', '')}".strip()
    return st, str(c.get("reason", ""))


def rows_for_request(
    records: Sequence[Any],
    key: Mapping[str, Any],
    step_start: Mapping[int, float],
    placement: Mapping[str, Sequence[str]],
) -> tuple[list[dict], list[dict], dict]:
    """(layer rows, call rows, request totals) from one request's MoE layer records."""
    layer_rows: list[dict] = []
    call_rows: list[dict] = []
    tot = {
        "bytes_down": 0,
        "bytes_up": 0,
        "calls": 0,
        "calls_failed": 0,
        "calls_rerouted": 0,
        "expert_slots": 0,
        "token_layers": 0,
        "failed_experts": 0,
    }
    prev_exit: dict[int, float] = {}
    for r in records:
        info = r.info or {}
        valid = r.token_valid.astype(bool)
        sel = r.expert_ids[valid]
        failed = set(r.failed)
        n_sel = int((sel >= 0).sum())
        used = 0
        for row in sel:
            used += sum(1 for e in row if e >= 0 and f"L{r.layer}.E{int(e)}" not in failed)
        tot["expert_slots"] += used
        tot["token_layers"] += int(valid.sum())
        calls = info.get("calls", [])
        per_req: dict[Any, dict[str, Any]] = {}
        b_down = b_up = 0
        for c in calls:
            primary = (placement.get(c["uid"]) or [None])[0]
            status, detail = _call_status(c, primary)
            bd, bu = int(c.get("bytes_out") or 0), int(c.get("bytes_in") or 0)
            b_down += bd
            b_up += bu
            tot["calls"] += 1
            tot["calls_failed"] += status in _FAIL
            tot["calls_rerouted"] += status == "rerouted"
            call_rows.append(
                {
                    **key,
                    "step": r.step,
                    "layer": r.layer,
                    "expert": c["uid"],
                    "device": c.get("device", ""),
                    "attempt": c.get("attempt", 0),
                    "tokens": c.get("tokens"),
                    "status": status,
                    "detail": detail,
                    "serialize_ms": c.get("serialize_ms"),
                    "network_ms": c.get("network_ms"),
                    "queue_ms": c.get("queue_ms"),
                    "compute_ms": c.get("compute_ms"),
                    "rtt_ms": c.get("rtt_ms"),
                    "bytes_down": bd,
                    "bytes_up": bu,
                    "energy_j": c.get("energy_j"),
                    "energy_source": c.get("energy_source"),
                }
            )
            if c.get("status") == "ok" and c.get("rtt_ms") is not None:
                rid = (c.get("device"), c.get("req_id"))
                total = float(c.get("serialize_ms") or 0) + float(c["rtt_ms"])
                dev_ms = float(c.get("device_ms") or 0.0)
                per_req[rid] = {
                    "total": total,
                    "network": float(c.get("network_ms") or 0.0),
                    "compute": dev_ms,
                    "device": c.get("device"),
                }
        tot["bytes_down"] += b_down
        tot["bytes_up"] += b_up
        tot["failed_experts"] += len(failed)
        crit = max(per_req.values(), key=lambda d: d["total"], default=None)
        t_enter, t_exit = info.get("t_enter"), info.get("t_exit")
        start = prev_exit.get(r.step, step_start.get(r.step))
        bs_ms = (t_enter - start) * 1e3 if t_enter is not None and start is not None else None
        if t_exit is not None:
            prev_exit[r.step] = t_exit
        layer_rows.append(
            {
                **key,
                "step": r.step,
                "phase": r.phase,
                "layer": r.layer,
                "tokens": int(valid.sum()),
                "experts_selected": n_sel,
                "experts_used": len(r.rows_per_uid),
                "devices_used": len({c.get("device") for c in calls if c.get("status") == "ok"}),
                "moe_ms": (t_exit - t_enter) * 1e3
                if t_enter is not None and t_exit is not None
                else None,
                "bs_ms": bs_ms,
                "critical_path_ms": crit["total"] if crit else None,
                "critical_network_ms": crit["network"] if crit else None,
                "critical_compute_ms": crit["compute"] if crit else None,
                "critical_device": crit["device"] if crit else "",
                "predicted_ms": info.get("predicted_ms"),
                "policy_predicted_ms": info.get("policy_predicted_ms"),
                "decision_ms": info.get("decision_ms"),
                "change_ms": info.get("change_ms"),
                "predicted_critical_ms": info.get("predicted_critical_ms"),
                **{c: info.get(c) for c in TERM_COLUMNS},
                "bytes_down": b_down,
                "bytes_up": b_up,
                "failed_experts": " ".join(sorted(failed)),
                "rerouted_experts": " ".join(sorted(info.get("rerouted", {}))),
            }
        )
    return layer_rows, call_rows, tot


def layer_total(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """One request's layer rows as one row that :func:`testbed.results.report.summary_row` sums the
    same (the critical path and its network part, over the layers that have both)."""
    from ..results.report import critical_sums

    path, net, seen = critical_sums(rows)
    return {
        "critical_path_ms": path if seen else None,
        "critical_network_ms": net if seen else None,
    }


def request_row(
    q: Request,
    rkey: Mapping[str, Any],
    out: Sequence[int],
    ref: Sequence[int],
    tot: Mapping[str, Any],
    t0: float,
    ttft_end: float,
    t_end: float,
    energy: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``requests.csv`` row of request ``q`` (key ``rkey``) that produced ``out`` against
    the answer ``ref``, from :func:`rows_for_request`'s totals ``tot``, its start ``t0``, the end
    of its first step ``ttft_end`` and its end ``t_end`` (seconds on one clock), and its energy
    columns."""
    matched = sum(1 for a, b in zip(out, ref) if a == b)
    status = "degraded" if tot["failed_experts"] else "ok"
    n_out = len(out)
    ttft = (ttft_end - t0) * 1e3
    total = (t_end - t0) * 1e3
    return {
        **rkey,
        "task": q.task,
        "prompt_tokens": len(q.prompt),
        "output_tokens": n_out,
        "ttft_ms": ttft,
        "tpot_ms": (total - ttft) / (n_out - 1) if n_out > 1 else None,
        "total_ms": total,
        "correct": int(tuple(out) == tuple(ref)),
        "score": matched / max(1, len(ref)),
        "experts_per_token": tot["expert_slots"] / tot["token_layers"]
        if tot["token_layers"]
        else None,
        "bytes_down": tot["bytes_down"],
        "bytes_up": tot["bytes_up"],
        "calls": tot["calls"],
        "calls_failed": tot["calls_failed"],
        "calls_rerouted": tot["calls_rerouted"],
        **energy,
        "status": status,
        "error": "",
    }


# ---- pieces of a trial that the analytic twin (testbed.run.twin) shares -------------------------
def place_experts(
    policy: Policy,
    manifest: Any,
    devices: Sequence[DeviceInfo],
    model_path: str,
    bytes_per_token: int,
) -> dict[str, tuple[str, ...]]:
    """Ask ``policy`` to place every expert of ``manifest`` (a :class:`models.manifest.Manifest`)
    on ``devices``; checked: every expert on at least one of them.

    Raises
    ------
    PolicyFailed
        When ``place`` raises or leaves an expert unplaced or on an unknown device.
    """
    from models.uids import parse_uid

    experts = []
    for u in manifest.uids():
        layer, e = parse_uid(u)
        experts.append(ExpertInfo(u, layer, e, int(manifest.experts[u].bytes)))
    policy.model_path = model_path
    policy.bytes_per_token = bytes_per_token
    try:
        placement = policy.place(experts, devices)
    except Exception as e:
        raise PolicyFailed(f"policy {policy.name}: place raised {one_line(e)}") from e
    names = {d.name for d in devices}
    for u in manifest.uids():
        ds = placement.get(u)
        if not ds or any(d not in names for d in ds):
            raise PolicyFailed(
                f"policy {policy.name}: place: expert {u} placed on "
                f"{list(ds) if ds else 'no device'} (devices: {', '.join(sorted(names))})"
            )
    return {u: tuple(ds) for u, ds in placement.items()}


def trial_cluster(
    t: Trial,
    seed: int,
    placement: Mapping[str, Sequence[str]],
    rates: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    profiles: Mapping[str, tuple[float, float]],
    bytes_per_token: int,
) -> ClusterState:
    """The :class:`ClusterState` a trial's policy decides on: placement, the enforced ``rates``
    (rows with ``device``, ``down_kbit``, ``up_kbit``), the devices' compute profiles, bytes per
    token, the decision epoch's scope, and under ``links.bandwidth_mhz`` the channel of the
    trial's devices ``names`` seeded by ``seed`` (the recipe's seed + the repeat)."""
    st = ClusterState(placement=dict(placement))
    st.rate_down_kbit = {r["device"]: r["down_kbit"] for r in rates if r.get("down_kbit")}
    st.rate_up_kbit = {r["device"]: r["up_kbit"] for r in rates if r.get("up_kbit")}
    st.compute_profile = {n: profiles[n] for n in names}
    st.bytes_per_token = bytes_per_token
    st.epoch_scope = str(t.config["policy"]["epoch"])
    mhz = t.config["links"].get("bandwidth_mhz")
    if mhz:  # the channel of this trial point and repeat, shared by every policy
        st.channel = ChannelModel(names, seed, **(t.config["links"].get("channel") or {}))
        st.bandwidth_hz = mhz * 1e6
    return st


def policy_hook(
    policy: Policy,
    cluster: ClusterState,
    links: Any,
    timed: Any,
    request_index: Callable[[], int],
    devices_view: Callable[[], dict[str, dict[str, Any]]],
) -> Callable[[Any], Any]:
    """The BS runtime's selection hook for ``policy``: per MoE layer and step, start the link
    epoch (``links``: an :class:`~testbed.run.epochs.EpochLinks`), ask the policy, check its
    selection, and enforce the rates it asks for at an epoch's start (down and up each its
    own: ``Decision.rate_down_kbit``/``rate_up_kbit``, else ``bandwidth_kbit`` both ways).
    Notes in ``timed.pending`` (the timing backend's, e.g. :class:`TimedBackend`, which merges
    it into the layer's record): the policy's own ``policy_predicted_ms``, ``decision_ms``
    (the policy's ``select`` and the selection's check), ``change_ms`` (the epoch's rate
    changes: the trace's or channel's at its start, then the policy's; 0 mid-epoch) and
    ``epoch_start`` and ``links_changed`` (the devices whose rates were changed). ``request_index()``
    and ``devices_view()`` give the request being run and the devices' status view."""
    from models.errors import ModelError
    from models.routing import validate_selection

    def hook(ctx: Any) -> Any:
        cluster.devices = devices_view()
        cluster.step = ctx.step
        t0 = time.perf_counter()
        n0 = getattr(links, "changes", 0)
        start = links.begin(request_index(), ctx.step, ctx.layer)
        t1 = time.perf_counter()
        try:
            d = policy.select(ctx, cluster)
            sel = d.selection
        except Exception as e:
            raise PolicyFailed(f"policy {policy.name}: select raised {one_line(e)}") from e
        try:
            sel = validate_selection(sel, ctx.num_tokens, ctx.num_experts)
        except (ModelError, AttributeError) as e:
            raise PolicyFailed(
                f"policy {policy.name}: select returned a bad selection at layer {ctx.layer}: {e}"
            ) from e
        t2 = time.perf_counter()
        predicted = (policy.last_stats() or {}).get("predicted_ms")
        if predicted is not None:
            timed.pending["policy_predicted_ms"] = float(predicted)
        bw = getattr(d, "bandwidth_kbit", None)
        down, up = getattr(d, "rate_down_kbit", None), getattr(d, "rate_up_kbit", None)
        if (bw or down or up) and start:  # mid-epoch decisions keep the links
            links.apply_policy(bw or {}, down, up)
        t3 = time.perf_counter()
        timed.pending.update(
            decision_ms=(t2 - t1) * 1e3,
            change_ms=((t1 - t0) + (t3 - t2)) * 1e3 if start else 0.0,
            epoch_start=bool(start),
            links_changed=tuple(getattr(links, "last_changed", ()))
            if getattr(links, "changes", 0) > n0
            else (),
        )
        return sel

    return hook


def check_model_and_policies(rec: Recipe, trials: Sequence[Trial]) -> Path:
    """What a run (or the twin) checks before touching anything: the recipe's model resolves
    to a split folder (returned) and every trial's policy loads with its parameters."""
    split = resolve_split(rec.model_spec(), where=f"{rec.path}: model.path")
    for t in trials:
        load_policy(
            rec.policy_spec(t.policy),
            t.config["policy"]["params"],
            f"{rec.path}: policy.params",
        )
    return split


def model_entry(split: Path, m: Any) -> dict[str, Any]:
    """The manifest's ``model`` entry for the split folder ``split`` and its manifest ``m``."""
    return {
        "path": str(split),
        "family": m.family,
        "model_type": m.model_type,
        "manifest_sha256": _sha256(split / "manifest.json"),
        "moe_layers": list(m.moe_layers),
        "experts": len(m.uids()),
        "hidden_size": m.model_hidden_size,
        "expert_hidden_size": m.hidden_size,
        "lift": dict(m.lift_info) if m.lift_info else None,
    }


# ---- the run ------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    status: str
    trials: int
    requests: int
    error: str | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
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
    """What the runner reports while it works (the CLI draws a rich progress bar from it)."""

    def start(self, trials: int, requests_per_trial: int) -> None: ...
    def trial(self, index: int, label: str) -> None: ...
    def request(self) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class Runner:
    """One run of a recipe (see the module docstring). Use :func:`run_recipe`."""

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
        self.out = out
        self.progress = progress or Progress()
        self.local_name = local_name
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.run_id = f"{recipe.name}-{stamp}-{secrets.token_hex(2)}"
        self.run_dir = out / self.run_id
        if resume is not None:
            self.run_dir, self.out = resume, resume.parent
        self.t0 = time.monotonic()
        self.manifest: dict[str, Any] = {}
        self.requests_done = 0
        self.summaries: list[dict[str, Any]] = []

    # manifest ----------------------------------------------------------------------------
    def _save_manifest(self) -> None:
        R.write_json_atomic(self.run_dir / R.MANIFEST, self.manifest)

    def run(self) -> RunResult:
        trials = self.recipe.trials()
        if self.resume is not None:
            self._prepare_resume()
        else:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=False)
            except OSError as e:
                raise ConfigError(f"--out: {self.out}: cannot create the run folder: {e}") from None
            self.manifest = {
                "run_id": self.run_id,
                "status": "running",
                "error": None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ended": None,
                "git_commit": git_commit(),
                "versions": package_versions(),
                "host": host_info(),
                "recipe": self.recipe.to_dict(),
                "trials": [],
                "completed": [],
                "local_testbed": self.inventory_path is None,
                "inventory": None,
                "model": None,
                "links_before": None,
                "links_after": None,
                "clock_offsets": None,
            }
        self._save_manifest()
        status, err = "failed", None
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
            self.manifest.update(
                status=status,
                error=err,
                ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                requests_done=self.requests_done,
            )
            self._save_manifest()
        return RunResult(
            self.run_dir, self.run_id, status, len(trials), self.requests_done, err, self.summaries
        )

    def _prepare_resume(self) -> None:
        """Continue a run that stopped (controller crash, Ctrl-C, error): keep the rows of the
        trials (and repeats) it completed, drop the rest, run what is left."""
        self.manifest = read_manifest(self.run_dir)
        self.run_id = str(self.manifest["run_id"])
        self.completed = {(int(t), int(r)) for t, r in self.manifest.get("completed", [])}
        reps = self.recipe.repeats
        whole = {t for t, _ in self.completed if all((t, r) in self.completed for r in range(reps))}

        def keep(row: Mapping[str, str]) -> bool:
            if "trial" not in row:
                return True
            if "repeat" in row:
                return (int(row["trial"]), int(row["repeat"])) in self.completed
            return int(row["trial"]) in whole

        dropped = {p.name: R.prune_rows(p, keep) for p in sorted(self.run_dir.glob("*.csv"))}
        self.requests_done = len(R.read_csv(self.run_dir / R.REQUESTS))
        self.summaries = R.read_csv(self.run_dir / R.SUMMARY)
        self.manifest["trials"] = [
            t
            for t in self.manifest.get("trials", [])
            if (t["trial"], t["repeat"]) in self.completed
        ]
        self.manifest.setdefault("resumed", []).append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "status_before": self.manifest.get("status"),
                "error_before": self.manifest.get("error"),
                "completed": sorted(self.completed),
                "rows_dropped": dropped,
                "git_commit": git_commit(),
            }
        )
        self.manifest.update(status="running", error=None, ended=None)

    # main body ---------------------------------------------------------------------------
    def _run(self, trials: list[Trial], stack: contextlib.ExitStack) -> None:
        from models.manifest import load_manifest
        from models.runtime import BaseStationModel

        from ..dataplane.backend import RemoteExpertBackend, StatusFeed
        from ..lab import provision as prov

        rec = self.recipe
        # check what can be checked before touching anything: model and every trial's policy
        split = check_model_and_policies(rec, trials)
        self.traces = {t.index: self._trace(t) for t in trials}
        inv_path = self.inventory_path
        wanted = [t.config["run"]["devices"] for t in trials]
        if inv_path is None:
            inv_path = self._local_testbed(stack, max((int(n) for n in wanted if n), default=3))
        inv = load_inventory(inv_path)
        self.inv = inv
        too_many = sorted({int(n) for n in wanted if n and int(n) > len(inv.devices)})
        if too_many:
            raise ConfigError(
                f"{rec.path}: run.devices: {too_many[-1]} > the {len(inv.devices)} "
                f"devices of {inv_path}"
            )
        self.manifest["inventory"] = {"path": str(inv_path), **inv.to_dict()}
        m = load_manifest(split)
        self.split, self.mf = split, m
        self.manifest["model"] = model_entry(split, m)
        self._save_manifest()

        # Jetson power modes (devices.power_mode): every device checked before anything changes,
        # each one's own mode restored on the way out
        from ..lab.jetson import PowerModeControl

        self.power = PowerModeControl.open(
            {d.name: ssh_runner_for(inv, d) for d in inv.devices}
            if any(t.config["devices"]["power_mode"] is not None for t in trials)
            else {},
            [t.config["devices"]["power_mode"] for t in trials],
            f"{rec.path}: devices.power_mode",
        )
        if self.power is not None:
            self.manifest["power_modes_before"] = {
                d: i.get("nvpmodel") for d, i in self.power.infos.items()
            }
            stack.callback(lambda: self.manifest.update(power_modes_restored=self.power.restore()))

        # links: remember, restore on the way out
        bs = bs_runner_for(inv)
        stack.callback(bs.close)
        shaper = shaper_for(inv, bs)
        before = shaper.show()
        was_installed = shaper.is_installed()
        self.manifest["links_before"] = {
            "installed": was_installed,
            "links": [s.to_dict() for s in before],
        }
        self._save_manifest()
        stack.callback(self._restore_links, shaper, before, was_installed)
        self.shaper = shaper

        # agents
        self.progress.message("provisioning agents")
        reports = prov.provision(inv, split)
        bad = [r for r in reports if not r.ok]
        if bad:
            raise TestbedError("; ".join(f"{r.device}: {r.error}" for r in bad))
        self.manifest["devices"] = {r.device: {"power": r.power} for r in reports}
        eps = prov.agent_endpoints(inv)
        curve = client_keys(inv)  # None when the inventory says security = "none"
        self.manifest["security"] = inv.security
        backend = RemoteExpertBackend(
            {d: e["endpoint"] for d, e in eps.items()},
            {},
            timeout_s=float(rec.config["run"]["timeout_s"]),
            down_backoff_s=float(rec.config["run"]["down_backoff_s"]),
            curve=curve,
        )
        stack.callback(backend.close)
        clocks = backend.connect()
        self.manifest["clock_offsets"] = {
            d: {"offset_ms": c.offset_ns / 1e6, "rtt_ms": c.rtt_ms} for d, c in clocks.items()
        }
        self.backend = backend
        self._open_bs_meter(stack)
        self.loaded: dict[str, set[str]] = {d: set() for d in eps}
        self.pushed: dict[str, dict[str, str]] = {d: {} for d in eps}
        self.runners = {d.name: ssh_runner_for(inv, d) for d in inv.devices}
        for r in self.runners.values():
            stack.callback(r.close)
        pubs = {d: e["pub_endpoint"] for d, e in eps.items() if e.get("pub_endpoint")}
        feed = StatusFeed(pubs, curve=curve)
        stack.callback(feed.close)
        self.feed = feed
        self.injector: FaultInjector | None = None
        self.last_sample = 0.0

        quiet_transformers()
        if rec.config["run"].get("bs_threads"):
            import torch

            torch.set_num_threads(int(rec.config["run"]["bs_threads"]))
        self.timed = TimedBackend(backend)
        bsm = BaseStationModel.from_split_dir(split, backend=self.timed, wire_dtype=rec.wire_dtype)
        self.bsm = bsm
        # the dtype of the rows on the wire (model.wire_dtype, default the BS model's): the
        # agents load experts with it as io dtype, profiling and bytes_per_token use it
        self.wire_dtype = bsm.controller.wire_dtype or next(bsm.model.parameters()).dtype
        self.manifest["model"]["wire_dtype"] = str(self.wire_dtype).removeprefix("torch.")
        self.profiles: dict[str, tuple[float, float]] = {}
        self.manifest["compute_profile"] = {}
        self.profile_exchanges = 0
        self.bytes_per_token = bytes_per_token(m.hidden_size, self.wire_dtype.itemsize)
        self.reference_model: Any = None

        extra = [f"sweep.{k}" for k in rec.sweep]
        self.tables = {
            "requests": stack.enter_context(
                R.CsvTable(self.run_dir / R.REQUESTS, R.REQUEST_COLUMNS, extra)
            ),
            "layers": stack.enter_context(
                R.CsvTable(self.run_dir / R.LAYERS, R.LAYER_COLUMNS, extra)
            ),
            "calls": stack.enter_context(R.CsvTable(self.run_dir / R.CALLS, R.CALL_COLUMNS, extra)),
            "devices": stack.enter_context(R.CsvTable(self.run_dir / R.DEVICES, R.DEVICE_COLUMNS)),
            "summary": stack.enter_context(
                R.CsvTable(self.run_dir / R.SUMMARY, R.SUMMARY_COLUMNS, extra)
            ),
            "profile": stack.enter_context(R.CsvTable(self.run_dir / R.PROFILE, R.PROFILE_COLUMNS)),
            "links": stack.enter_context(R.CsvTable(self.run_dir / R.LINKS, R.LINK_COLUMNS, extra)),
            "faults": stack.enter_context(
                R.CsvTable(self.run_dir / R.FAULTS, R.FAULT_COLUMNS, extra)
            ),
            "migrations": stack.enter_context(
                R.CsvTable(self.run_dir / R.MIGRATIONS, R.MIGRATION_COLUMNS, extra)
            ),
        }
        # before the tables close: a stopped agent is resumed, a cut link restored, a killed
        # agent restarted, each recorded
        stack.callback(self._finish_faults)
        per_trial = int(rec.config["workload"]["requests"]) * rec.repeats
        self.progress.start(len(trials), per_trial)
        for t in trials:
            self.progress.trial(t.index, f"{t.policy} {t.label}")
            for rep in range(rec.repeats):
                if (t.index, rep) not in self.completed:
                    self._trial(t, rep)

    def _local_testbed(self, stack: contextlib.ExitStack, devices: int) -> Path:
        from ..lab import local

        name = self.local_name or f"run{os.getpid() % 100000}"
        self.progress.message(f"creating local testbed {name} with {devices} devices")
        stack.callback(local.down, name)
        info = local.up(name, devices, 1_000_000.0)
        return Path(info["inventory"])

    def _restore_links(self, shaper: TcShaper, before: Sequence[Any], was_installed: bool) -> None:
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
            self.manifest["links_after"] = {
                "installed": shaper.is_installed(),
                "links": [s.to_dict() for s in after],
            }

    # one trial ---------------------------------------------------------------------------
    def _trace(self, t: Trial) -> list[Any] | None:
        path = self.recipe.trace_path(t)
        return read_trace(path) if path is not None else None

    def _devices(self, t: Trial) -> list[Any]:
        """The trial's devices: the first ``run.devices`` of the inventory (default: all)."""
        n = t.config["run"]["devices"]
        return list(self.inv.devices[: int(n)] if n else self.inv.devices)

    def _profile(
        self, t: Trial, devices: Sequence[Any], placement: Mapping[str, Sequence[str]]
    ) -> Any:
        """Profile the trial's devices through the BS's exchange, links at
        :data:`PROFILE_KBIT` both ways (:func:`testbed.dataplane.profiling.profile_exchanges`: calls of
        1..32 tokens, of one and two of each device's experts, each device alone and all at
        once); the samples go to ``profile.csv``. Fits each device's compute profile (its
        alone, one-expert calls; the first trial's is the manifest's ``compute_profile``) and
        the calibrated latency model (:func:`testbed.policy.latency_model.fit_layer_costs`): returns
        its parameters, which the trial's manifest entry records with the residuals."""
        from ..policy.latency_model import LayerCostParams, fit_layer_costs

        names = [d.name for d in devices]
        sh = self.shaper
        if not sh.is_installed():
            n = len(self.inv.devices)
            sh.setup([LinkSpec(PROFILE_KBIT)] * n, [LinkSpec(PROFILE_KBIT)] * n)
        else:
            for d in names:
                for direction in ("down", "up"):
                    sh.change(d, LinkSpec(PROFILE_KBIT), direction)
        info = sh.shaping_info()
        rates = {s.device: s for s in sh.show()}
        mine = {
            n: [u for u, ds in sorted(placement.items()) if ds and ds[0] == n][:2] for n in names
        }
        mine = {n: us for n, us in mine.items() if us}
        self.progress.message(f"profiling {', '.join(mine)}")
        start = self.profile_exchanges
        samples = profile_exchanges(
            self.backend,
            mine,
            self.mf.hidden_size,
            self.wire_dtype,
            seed=self.recipe.seed,
            start_id=start,
            repeats=PROFILE_REPEATS,
        )
        self.profile_exchanges = start + len({s["layer"] for s in samples}) + 1
        for s in samples:
            s["rate_down_kbit"] = rates[s["device"]].down_kbit
            s["rate_up_kbit"] = rates[s["device"]].up_kbit
        self.tables["profile"].write_many(
            [
                {
                    "run_id": self.run_id,
                    "trial": t.index,
                    **{k: v for k, v in s.items() if k != "layer"},
                    "exchange": s["layer"],
                }
                for s in samples
            ]
        )
        single = [s for s in samples if s["experts"] == 1 and s["devices"] == 1]
        fits = fit_profiles(single)
        trial_profile = {}
        for d, fit in fits.items():
            uid = mine[d][0]
            self.manifest["compute_profile"].setdefault(d, {"expert": uid, "trial": t.index, **fit})
            self.profiles[d] = (fit["a_ms"], fit["b_ms"])
            trial_profile[d] = {"expert": uid, **fit}
        mode = info.get("mode") or "none"
        base = LayerCostParams(
            bytes_per_token=self.bytes_per_token,
            device_names=tuple(names),
            shaping=mode,
            bucket_bytes=float(info.get("bucket_bytes") or 0) if mode != "htb" else 0.0,
            bucket_slack_us=float(info.get("bucket_slack_us") or 0),
            mtu=int(info["bucket_bytes"]) - 14
            if mode == "tbf" and info.get("bucket_bytes")
            else 1500,
        )
        params, resid = fit_layer_costs(samples, base)
        self.latency_fit = {
            "params": params.to_dict(),
            "residuals": resid,
            "profile_kbit": PROFILE_KBIT,
            "samples": len(samples),
            "compute_profile": trial_profile,
        }
        self.manifest["latency_model"] = params.to_dict()
        return params

    def _place(
        self, policy: Policy, devices: Sequence[Any] | None = None
    ) -> dict[str, tuple[str, ...]]:
        budget = self.recipe.config["run"].get("memory_budget_mb")  # overrides the inventory's
        infos = [
            DeviceInfo(d.name, budget or d.memory_budget_mb, d.hw_class)
            for d in (self.inv.devices if devices is None else devices)
        ]
        return place_experts(policy, self.mf, infos, str(self.split), self.bytes_per_token)

    def _apply_placement(
        self,
        placement: Mapping[str, Sequence[str]],
        options: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    ) -> None:
        """Push, load and unload so each device holds its share; ``options``: device -> uid ->
        extra load fields (:meth:`Policy.load_options`); an expert whose fields changed is
        reloaded."""
        from ..lab import provision as prov

        opts_now = getattr(self, "load_opts", {})
        for dev in self.inv.devices:
            want = {u for u, ds in placement.items() if dev.name in ds}
            opts = dict((options or {}).get(dev.name, {}))
            reload = {
                u
                for u in want & self.loaded[dev.name]
                if dict(opts.get(u, {})) != dict(opts_now.get((dev.name, u), {}))
            }
            if reload:
                self.backend.unload_experts(dev.name, sorted(reload))
                self.loaded[dev.name] = self.loaded[dev.name] - reload
            have = self.loaded[dev.name]
            missing = sorted(want - self.pushed[dev.name].keys())
            if missing:
                rel, _ = prov.sync_shards(self.runners[dev.name], dev, self.mf, missing)
                self.pushed[dev.name].update(rel)
            drop = sorted(have - want)
            if drop:
                self.backend.unload_experts(dev.name, drop)
            add = sorted(want - have)
            if add:
                io = self.manifest["model"]["wire_dtype"]
                got = self.backend.load_experts(
                    dev.name,
                    [
                        {
                            "uid": u,
                            "path": self.pushed[dev.name][u],
                            "io_dtype": io,
                            **opts.get(u, {}),
                        }
                        for u in add
                    ],
                )
                if sorted(got) != add:
                    raise TestbedError(f"{dev.name}: agent loaded {len(got)} of {len(add)} experts")
            self.loaded[dev.name] = want
            opts_now.update({(dev.name, u): dict(opts.get(u, {})) for u in want})
        self.load_opts = opts_now
        self.backend.placement = {u: list(ds) for u, ds in placement.items()}

    def _apply_links(self, t: Trial) -> list[dict[str, Any]]:
        down, up = t.link_kbit()
        delay, loss = t.link_delay_loss()
        sh = self.shaper
        if not sh.is_installed():
            n = len(self.inv.devices)
            sh.setup([LinkSpec(down, delay, loss)] * n, [LinkSpec(up, delay, loss)] * n)
        else:
            for d in self.inv.devices:
                sh.change(d.name, LinkSpec(down, delay, loss), "down")
                sh.change(d.name, LinkSpec(up, delay, loss), "up")
        # how the links charge messages (mode, free bucket, offloads): manifest and links.csv
        info = sh.shaping_info()
        self.manifest["shaping"] = info
        self.link_shaping = {
            "shaping": info["mode"],
            "bucket_bytes": info["bucket_bytes"],
            "bucket_slack_us": info["bucket_slack_us"],
            "offloads": info["offloads_summary"],
        }
        return [s.to_dict() for s in sh.show()]

    def _hook(
        self, policy: Policy, cluster: ClusterState, links: EpochLinks
    ) -> Callable[[Any], Any]:
        return policy_hook(
            policy, cluster, links, self.timed, lambda: self.request_index, lambda: self.feed.view
        )

    # energy --------------------------------------------------------------------------------
    def _open_bs_meter(self, stack: contextlib.ExitStack) -> None:
        """The BS's own meter (:func:`device_agent.energy.detect_meter`, closed on exit). When
        every device is a namespace on this host, only the CPU-time estimate of this process:
        a host-wide meter (RAPL) would count the agents' work too."""
        from device_agent.energy import MeterOptions, detect_meter

        only = ("estimated",) if all(d.hw_class == "netns" for d in self.inv.devices) else None
        self.bs_meter = detect_meter("/", MeterOptions(only=only))
        stack.callback(self.bs_meter.close)
        self.manifest["energy"] = {
            "bs": self.bs_meter.describe(),
            "devices": {d: a.energy_source for d, a in self.backend.agents.items()},
            "request_window": "each device's cumulative counter read by a ping just before and "
            "just after the request; the BS meter over the request itself",
        }
        self._save_manifest()

    def _energy_counters(self) -> dict[str, float | None]:
        """device -> the cumulative joules of its meter now: one ``ping`` each (its reply
        carries the agent meter's reading; a few dozen bytes, unlike a status). Devices the
        backend holds down, or that do not answer within 0.5 s, are ``None``."""
        out: dict[str, float | None] = {}
        be = self.backend
        budget = min(0.5, be.timeout_s)
        for d in list(be.agents):  # a ping may renew a lost connection (reconnect)
            e = None
            if be.is_up(d):
                try:
                    h, _ = be.request(d, "ping", timeout_s=budget)
                    e = h.get("energy_j")
                except TestbedError:
                    e = None
            out[d] = float(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else None
        return out

    def _sample_devices(self, trial: int, rates: Mapping[str, Mapping]) -> None:
        self.feed.poll(0)
        now = time.monotonic()
        if now - self.last_sample < float(self.recipe.config["run"]["telemetry_period_s"]):
            return
        self.last_sample = now
        rows = []
        for dev, st in sorted(self.feed.view.items()):
            mem = st.get("memory") or {}
            load = st.get("load") or {}
            power = st.get("power_w")
            rows.append(
                {
                    "run_id": self.run_id,
                    "trial": trial,
                    "time_s": now - self.t0,
                    "device": dev,
                    "power_w": power if isinstance(power, (int, float)) else None,
                    "energy_j": st.get("energy_j"),
                    "energy_source": st.get("energy_source")
                    or ("measured" if power else "unavailable"),
                    "memory_used_mb": (mem.get("rss_bytes") or 0) / 2**20
                    if mem.get("rss_bytes")
                    else None,
                    "memory_free_mb": (mem.get("available_bytes") or 0) / 2**20
                    if mem.get("available_bytes")
                    else None,
                    "utilisation": load.get("loadavg_1m"),
                    "experts_loaded": len(st.get("experts") or {}),
                    "rate_down_kbit": rates.get(dev, {}).get("down_kbit"),
                    "rate_up_kbit": rates.get(dev, {}).get("up_kbit"),
                }
            )
        if rows:
            self.tables["devices"].write_many(rows)

    def _reference(self, req: Request) -> tuple[int, ...]:
        """Single-process top-k output of the same model (synthetic workload's answer key)."""
        from models.runtime import BaseStationModel

        if self.reference_model is None:
            self.reference_model = BaseStationModel.from_split_dir(self.split)
        g = self.reference_model.generate_greedy(
            [list(req.prompt)], req.max_new_tokens, req.eos_token_id, req.pad_token_id
        )
        return tuple(g.tokens[0])

    def _trial(self, t: Trial, rep: int) -> None:
        from ..results.report import summary_row

        rec = self.recipe
        policy = load_policy(
            rec.policy_spec(t.policy), t.config["policy"]["params"], f"{rec.path}: policy.params"
        )
        key = {
            "run_id": self.run_id,
            "trial": t.index,
            "point": t.label,
            "policy": policy.name,
            "repeat": rep,
            **{f"sweep.{k}": v for k, v in t.point.items()},
        }
        devices = self._devices(t)
        names = [d.name for d in devices]
        # before placement and compute profiling: both depend on the power mode
        power_mode = self.power.apply(t.config["devices"]["power_mode"]) if self.power else None
        placement = self._place(policy, devices)
        self._apply_placement(placement, policy.load_options())
        self.bsm.backend = policy.wrap_backend(self.timed)
        params = self._profile(t, devices, placement)
        links = self._apply_links(t)
        rates = {r["device"]: r for r in links}
        self.manifest["trials"].append(
            {
                "trial": t.index,
                "repeat": rep,
                "point": t.point,
                "policy": policy.describe(),
                "devices": names,
                "links_enforced": links,
                "power_mode": power_mode,
                "placement": {u: list(ds) for u, ds in placement.items()},
                "latency_model": self.latency_fit,
            }
        )
        self._save_manifest()
        cluster = trial_cluster(
            t, rec.seed + rep, placement, links, names, self.profiles, self.bytes_per_token
        )
        cluster.devices = dict(self.feed.view)
        trace = self.traces[t.index]
        plan = EpochLinks(
            Epochs(cluster.epoch_scope),
            LinkRecorder(self.shaper, self.tables["links"], self.t0),
            cluster,
            names,
            {**key, **self.link_shaping},
            cluster.channel,
            cluster.bandwidth_hz,
            TraceReplay(trace, names, str(self.recipe.trace_path(t))) if trace else None,
        )
        self.bsm.policy = self._hook(policy, cluster, plan)
        self.timed.predictor = ExchangePredictor(
            params, names, lambda: self.backend.placement, cluster
        )
        reqs = make_workload(t, self.mf, rec.seed + rep)
        # what the trial's summary needs, kept small (a long trial has ~10^5 call rows, all on
        # disk already): request rows, one layer total per request, one shared dict per call
        # status; and the full rows of the requests since the last update() (migration stats)
        t_req_rows: list[dict] = []
        t_layer_rows: list[dict] = []
        t_call_rows: list[dict] = []
        status_rows: dict[str, dict] = {}
        win_layers: list[dict] = []
        win_calls: list[dict] = []
        from . import updates as mig

        every = int(t.config["run"].get("update_every") or 0)
        feed0 = dict(self.feed.bytes_received), dict(self.feed.messages)
        events: list[dict] = []
        win = 0
        for q in reqs:
            events += mig.apply_events(self, t, q.index, cluster, rates, str(rec.path))
            if every and q.index and q.index % every == 0:
                lo = q.index - win  # the requests since the last update
                stats = mig.window_stats(
                    [c for c in win_calls if c["request"] >= lo],
                    [r for r in win_layers if r["request"] >= lo],
                    win,
                    q.index,
                )
                win_calls.clear()
                win_layers.clear()
                new = mig.run_update(self, policy, cluster, placement, stats, key, q.index)
                if new is not None:
                    placement = new
                win = 0
            self._sample_devices(t.index, rates)
            self.request_index = q.index
            faults_at_start = self._faults_before(t, key, names, placement, q.index)
            row, lrows, crows = self._request(q, key, placement)
            self._faults_mark(faults_at_start, row, crows)
            self.tables["layers"].write_many(lrows)
            self.tables["calls"].write_many(crows)
            self.tables["requests"].write(row)
            t_req_rows.append(row)
            t_layer_rows.append(layer_total(lrows))
            t_call_rows.extend(
                status_rows.setdefault(str(c["status"]), {"status": c["status"]}) for c in crows
            )
            if every:
                win_layers.extend(lrows)
                win_calls.extend(crows)
            self.requests_done += 1
            win = win + 1 if every else 0
            self.progress.request()
        self.feed.poll(0)
        self.manifest["trials"][-1].update(
            events=events,
            placement_final={u: list(ds) for u, ds in placement.items()},
            memory=mig.memory_report(self, names),
            policy_final=policy.describe(),
            signalling={
                d: {
                    "bytes": self.feed.bytes_received.get(d, 0) - feed0[0].get(d, 0),
                    "messages": self.feed.messages.get(d, 0) - feed0[1].get(d, 0),
                }
                for d in names
            },
        )
        self._finish_faults()
        self.timed.predictor = None
        self.manifest["trials"][-1]["link_epochs"] = plan.close()
        self._save_manifest()
        summ = {**key, **summary_row(t_req_rows, t_layer_rows, t_call_rows)}
        self.tables["summary"].write(summ)
        self.summaries.append(summ)
        # every row of this trial repeat is on disk: a resumed run keeps them
        self.completed.add((t.index, rep))
        self.manifest.setdefault("completed", []).append([t.index, rep])
        self._save_manifest()

    # faults (testbed.run.faults) -----------------------------------------------------------------
    def _faults_before(
        self,
        t: Trial,
        key: Mapping[str, Any],
        names: Sequence[str],
        placement: Mapping[str, Sequence[str]],
        index: int,
    ) -> set[str]:
        """Start the trial's fault injector at its first request; fire what is due; the ids
        active as the request starts."""
        events = t.config["faults"]["events"]
        if not events:
            return set()
        if self.injector is None:  # the trial's first request (finished at every trial's end)
            faults = parse_faults(events)
            bad = check_devices(faults, names, str(self.recipe.path))
            if bad:
                raise ConfigError(bad)
            table = self.tables["faults"]
            self.fault_placement = placement
            self.injector = FaultInjector(
                faults,
                Effects(
                    self._signal_agent,
                    lambda d, kbit: self._fault_rate(t, d, kbit),
                    self._restart_agent,
                ),
                lambda row: table.write({**key, **row}),
            )
            self.injector.start()
        self.injector.before_request(index)
        return set(self.injector.active().split())

    def _faults_mark(self, at_start: set[str], row: dict[str, Any], calls: list[dict]) -> None:
        """A request (and its calls) carries every fault active at its start or its end."""
        if self.injector is None:
            return
        ids = " ".join(sorted(at_start | set(self.injector.active().split())))
        row["faults"] = ids
        for c in calls:
            c["faults"] = ids

    def _finish_faults(self) -> None:
        inj, self.injector = self.injector, None
        if inj is not None:
            inj.finish()

    def _signal_agent(self, device: str, sig: str) -> str:
        from ..lab import provision as prov

        runner = self.runners[device]
        lay, facts = prov.agent_view(runner, self.inv.device(device))
        if facts.pid is None or not prov.agent_running(facts, lay):
            raise TestbedError(f"{device}: no agent of ours is running")
        runner.run(["kill", f"-{sig}", str(facts.pid)], timeout_s=30)
        return f"SIG{sig} to agent pid {facts.pid}"

    def _fault_rate(self, t: Trial, device: str, kbit: float | None) -> str:
        down, up = t.link_kbit() if kbit is None else (kbit, kbit)
        self.shaper.change(device, LinkSpec(down), "down")
        self.shaper.change(device, LinkSpec(up), "up")
        return f"link {down:g}/{up:g} kbit/s down/up" + (
            " (the trial's rate)" if kbit is None else ""
        )

    def _restart_agent(self, device: str) -> str:
        """Stop (if it still runs) and start ``device``'s agent through provisioning, reconnect
        the backend and load its experts again."""
        from ..lab import provision as prov

        runner = self.runners[device]
        lay, facts = prov.agent_view(runner, self.inv.device(device))
        if facts.pid is not None and prov.agent_running(facts, lay):
            prov.stop_pid(runner, lay, facts.pid)
        rep = prov.provision(self.inv, None, devices=[device])[0]
        if not rep.ok or not rep.endpoint:
            raise TestbedError(f"{device}: restart failed: {rep.error}")
        self.backend.remove_agent(device)
        self.backend.add_agent(device, rep.endpoint)
        self.loaded[device] = set()
        self._apply_placement(self.fault_placement)
        return f"agent pid {rep.pid} at {rep.endpoint}, {len(self.loaded[device])} experts loaded"

    def _request(
        self, q: Request, key: Mapping[str, Any], placement: Mapping[str, Sequence[str]]
    ) -> tuple[dict, list[dict], list[dict]]:
        bsm = self.bsm
        step_end: dict[int, float] = {}
        bsm.start_recording()
        bsm.pop_records()
        e_before, bs_before = self._energy_counters(), self.bs_meter.read().energy_j
        t0 = time.perf_counter()

        def on_step(s: int) -> None:
            step_end[s] = time.perf_counter()

        try:
            gen = bsm.generate_greedy(
                [list(q.prompt)], q.max_new_tokens, q.eos_token_id, q.pad_token_id, on_step=on_step
            )
            out = tuple(gen.tokens[0])
        finally:
            t_end = time.perf_counter()
            bs_after = self.bs_meter.read().energy_j
            records = bsm.pop_records()
            bsm.stop_recording()
        energy = request_energy(
            e_before,
            self._energy_counters(),
            {d: a.energy_source or "" for d, a in self.backend.agents.items()},
            bs_before,
            bs_after,
            self.bs_meter.energy_source,
        )
        step_start = {0: t0, **{s + 1: v for s, v in step_end.items()}}
        rkey = {**key, "request": q.index}
        lrows, crows, tot = rows_for_request(records, rkey, step_start, placement)
        ref = q.reference if q.reference is not None else self._reference(q)
        row = request_row(q, rkey, out, ref, tot, t0, step_end.get(0, t_end), t_end, energy)
        return row, lrows, crows


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
    return Runner(recipe, inventory, out, progress, local_name, resume).run()


def read_manifest(run_dir: Path) -> dict[str, Any]:
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
