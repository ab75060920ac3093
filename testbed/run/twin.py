"""The analytic twin: ``testbed simulate RECIPE [--devices N] [--calibrate RUN_DIR]``.

The twin replays a recipe's trials without agents, SSH or tc. The BS model runs in-process with
the experts computed locally (:class:`models.backend.LocalExpertBackend`), so routing, outputs
and accuracy are the model's own; the policies are the recipe's, loaded, placed and hooked in
exactly as the runner does it (:func:`testbed.policy.load_policy`,
:func:`testbed.run.session.place_experts`, :func:`testbed.run.session.trial_cluster`,
:func:`testbed.run.session.policy_hook`, :class:`testbed.run.epochs.EpochLinks`), over ``N``
devices (``dev1 .. devN``; 1000 and more are fine: a policy's placement over many devices leaves
most of them idle). What would take time on the testbed is charged to a virtual clock instead:

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
(:func:`testbed.run.session.rows_for_request`, :func:`~testbed.run.session.request_row`,
:func:`testbed.results.report.summary_row`). The results folder has the run's CSVs and columns; its
manifest says ``"mode": "simulated"`` (and the run id carries ``-sim``), which ``testbed
report`` shows. Energy is not modelled (empty cells); ``devices.csv`` and ``profile.csv`` stay
empty.

**Calibration** (``--calibrate RUN_DIR``, a measured run's results folder,
:func:`calibrate_from_run`):

* the exchange: :func:`testbed.policy.latency_model.fit_layer_costs` on the run's own expert calls
  (one sample per device call: rows, experts, round trip, device time, the link rates in force
  from ``links.csv`` or the trial's ``links_enforced``, the layer's ``moe_ms``), with the
  leaf's shaping from the manifest; the manifest's ``latency_model`` (the runner's own fit,
  :meth:`~testbed.policy.latency_model.LayerCostParams.to_dict`) is used instead where present;
* the compute profile policies see (``ClusterState.compute_profile``): the manifest's
  ``compute_profile``;
* the BS's time per (phase, layer): the median ``bs_ms`` of the run's layers less the rate
  change that started there (``links.csv``) and the decision (``decision_ms`` where recorded,
  else only layers of policies that predict nothing: a top-k is their decision);
* the tail per step: median over requests of ``(total_ms - sum of bs_ms + moe_ms) / steps``;
* the rate change: a line ``a + b * devices`` through ``links.csv``'s ``change_ms`` per source.

Devices the run did not have (the twin's beyond the run's count) get the median of the run's
devices. Without ``--calibrate`` the twin uses :data:`DEFAULTS`, fitted the same way on a
measured run of ``tiny-4096`` with bf16 on the wire over 4 namespace devices on a 2-core host
(see the README, "The analytic twin").

Not simulated (recorded in the manifest's ``twin.not_simulated`` when a recipe asks for them):
faults, ``run.events``, ``run.update_every`` (``Policy.update`` and migrations), Jetson power
modes, a policy's ``load_options`` (quantised experts run at the stored precision here), the
agents' status feed (``ClusterState.devices`` is empty), expert failures and re-routing.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import secrets
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, RunFailed, one_line
from ..net.channel import read_trace
from ..policy.api import DeviceInfo, load_policy
from ..policy.latency_model import (
    DeviceCosts,
    LayerCostParams,
    LinkBuckets,
    fit_compute_profile,
    fit_layer_costs,
    layer_ms_of,
)
from ..results import schema as R
from . import session as X
from .epochs import MIN_KBIT, EpochLinks, Epochs, LinkRecorder, TraceReplay
from .recipe import Recipe, Trial

#: The twin's calibration without ``--calibrate``: what :func:`calibrate_from_run` gave on a
#: measured run of ``recipes/wdmoe.toml`` (``tiny-4096`` with bf16 on the wire, 10 and 100 MHz
#: cells, 2 and 8 namespace devices, per-layer epochs, its six policies: 24 trials of 16
#: requests, the exchange from the runner's profiling fits) on a 2-core host, rounded; devices
#: as the median of that run's eight.
DEFAULTS: dict[str, Any] = {
    # the exchange, per call: fixed cost besides airtime (and per KiB of its messages), the
    # device's fixed time and a + b N compute per expert; the BS's time in the exchange (fixed
    # and per device called)
    "device": {
        "call_ms": 0.48,
        "call_per_kb_ms": 0.0022,
        "device_call_ms": 0.36,
        "compute_a_ms": 0.40,
        "compute_b_ms": 0.021,
    },
    "bs_ms": 0.47,
    "bs_per_device_ms": 0.67,
    # the leaf that charges frames (links.py: tbf with one frame + 50 us of the rate)
    "shaping": {"mode": "tbf", "bucket_bytes": 1514.0, "bucket_slack_us": 50.0},
    # what policies see as the compute profile c(N) = a + b N (profiling.py's fit)
    "compute_profile": (0.64, 0.018),
    # the BS's own time per MoE layer outside the exchange (attention, router; layer 0 also
    # the step's start), by phase; then per step after the last layer (norm, LM head)
    "bs_layer_ms": {"prefill": (3.7, 3.5, 3.6, 3.6), "decode": (2.5, 2.6, 2.5, 2.5)},
    "tail_ms": 1.3,
    # a decision epoch's rate change in-line (netlink batch, read-back, links.csv rows):
    # a + b * devices
    "rate_change": (1.7, 0.10),
}


# -- calibration --------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Everything the twin charges time with (module doc).

    Attributes
    ----------
    params:
        The exchange model (:class:`~testbed.policy.latency_model.LayerCostParams`) for the
        calibrated devices (``device_names``), ``default_device`` for the others.
    compute_profile, default_profile:
        ``(a_ms, b_ms)`` per calibrated device for ``ClusterState.compute_profile``; the rest
        get ``default_profile``.
    bs_layer_ms:
        phase (``prefill``/``decode``) -> the BS's time per MoE layer position outside the
        exchange (decision and rate change excluded); positions beyond the list take its last.
    tail_ms:
        Per forward step, after its last MoE layer.
    rate_change:
        Source (``channel``, ``policy``, ``trace``; ``""`` for any) -> ``(a_ms, b_ms)``: an
        epoch's change costs ``a + b * devices changed``.
    source:
        ``"defaults"`` or the results folder it came from.
    fit:
        Residuals and counts of the fit (the manifest's record).
    """

    params: LayerCostParams
    compute_profile: dict[str, tuple[float, float]]
    default_profile: tuple[float, float]
    bs_layer_ms: dict[str, tuple[float, ...]]
    tail_ms: float
    rate_change: dict[str, tuple[float, float]]
    source: str = "defaults"
    fit: dict[str, Any] = field(default_factory=dict)

    def profiles(self, names: Iterable[str]) -> dict[str, tuple[float, float]]:
        return {n: self.compute_profile.get(n, self.default_profile) for n in names}

    def bs_ms(self, step: int, layer_pos: int) -> float:
        xs = self.bs_layer_ms["prefill" if step == 0 else "decode"]
        return float(xs[min(layer_pos, len(xs) - 1)]) if xs else 0.0

    def change_ms(self, source: str, devices: int) -> float:
        a, b = self.rate_change.get(source) or self.rate_change.get("") or (0.0, 0.0)
        return float(a + b * devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "latency_model": self.params.to_dict(),
            "compute_profile": {
                d: {"a_ms": a, "b_ms": b} for d, (a, b) in self.compute_profile.items()
            },
            "default_profile": {"a_ms": self.default_profile[0], "b_ms": self.default_profile[1]},
            "bs_layer_ms": {k: list(v) for k, v in self.bs_layer_ms.items()},
            "tail_ms": self.tail_ms,
            "rate_change": {
                k or "any": {"a_ms": a, "b_ms": b} for k, (a, b) in self.rate_change.items()
            },
            "fit": self.fit,
        }


def default_calibration(bytes_per_token: float = 0.0) -> Calibration:
    """:data:`DEFAULTS` as a :class:`Calibration`."""
    d = DEFAULTS
    sh = d["shaping"]
    params = LayerCostParams(
        bytes_per_token,
        default_device=DeviceCosts(**d["device"]),
        shaping=sh["mode"],
        bucket_bytes=sh["bucket_bytes"],
        bucket_slack_us=sh["bucket_slack_us"],
        bs_ms=d["bs_ms"],
        bs_per_device_ms=d["bs_per_device_ms"],
    )
    return Calibration(
        params,
        {},
        tuple(d["compute_profile"]),
        {k: tuple(v) for k, v in d["bs_layer_ms"].items()},
        d["tail_ms"],
        {"": tuple(d["rate_change"])},
    )


def _f(v: Any) -> float | None:
    return R.num(v) if isinstance(v, str) else (None if v is None else float(v))


def _tk(r: Mapping[str, Any]) -> tuple[str, str]:
    return str(r.get("trial", "")), str(r.get("repeat", ""))


def _pos(r: Mapping[str, Any]) -> tuple[int, int, int]:
    return int(r["request"]), int(r["step"]), int(r["layer"])


class RatesInForce:
    """The link rates in force at any (request, step, layer) of a measured run: the latest
    epoch of ``links.csv`` at or before it (a policy's change after the channel's in the same
    epoch wins: rows are in file order), else the trial's ``links_enforced`` (manifest)."""

    def __init__(self, links: Sequence[Mapping[str, Any]], trials: Sequence[Mapping[str, Any]]):
        self.epochs: dict[tuple[str, str], dict[tuple[int, int, int], dict]] = {}
        for r in links:
            down, up = _f(r.get("enforced_down_kbit")), _f(r.get("enforced_up_kbit"))
            if down is None or up is None:
                continue
            ep = self.epochs.setdefault(_tk(r), {}).setdefault(_pos(r), {})
            ep[str(r["device"])] = (down, up)
        self.keys = {t: sorted(v) for t, v in self.epochs.items()}
        self.fixed: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
        for t in trials:
            self.fixed[(str(t.get("trial")), str(t.get("repeat")))] = {
                str(x["device"]): (float(x["down_kbit"]), float(x["up_kbit"]))
                for x in t.get("links_enforced") or []
                if x.get("down_kbit") and x.get("up_kbit")
            }

        # the rates after each epoch: a device an epoch leaves out keeps its rate
        self.after: dict[tuple[str, str], list[dict[str, tuple[float, float]]]] = {}
        for t, keys in self.keys.items():
            acc = dict(self.fixed.get(t, {}))
            self.after[t] = []
            for k in keys:
                acc = {**acc, **self.epochs[t][k]}
                self.after[t].append(acc)

    def at(self, row: Mapping[str, Any], device: str) -> tuple[float, float] | None:
        t = _tk(row)
        keys = self.keys.get(t)
        i = bisect.bisect_right(keys, _pos(row)) if keys else 0
        rates = self.after[t][i - 1] if i else self.fixed.get(t, {})
        return rates.get(device)


def exchange_samples(
    calls: Sequence[Mapping[str, Any]], layers: Sequence[Mapping[str, Any]], rates: RatesInForce
) -> list[dict[str, Any]]:
    """One sample per device call of a measured run for
    :func:`~testbed.policy.latency_model.fit_layer_costs` (pure): ``device``, ``experts``, ``rows``,
    ``rtt_ms``, ``device_ms`` (round trip less network time), ``rate_down_kbit``,
    ``rate_up_kbit`` (in force then), ``layer`` (an id of the exchange) and ``layer_ms`` (its
    ``moe_ms``). Calls that failed, were re-routed or lack timings are left out, and so are
    the exchanges they were part of."""
    moe = {(_tk(r), _pos(r)): _f(r.get("moe_ms")) for r in layers}
    groups: dict[tuple, dict[str, Any]] = {}
    bad: set[tuple] = set()
    for c in calls:
        lk = (_tk(c), _pos(c))
        rtt, net = _f(c.get("rtt_ms")), _f(c.get("network_ms"))
        if c.get("status") != "ok" or rtt is None or net is None:
            bad.add(lk)
            continue
        g = groups.setdefault(
            (lk, str(c["device"]), str(c.get("attempt", "0"))),
            {
                "device": str(c["device"]),
                "experts": 0,
                "rows": 0,
                "tokens": 0,
                "rtt_ms": rtt,
                "device_ms": rtt - net,
                "layer": lk,
                "layer_ms": moe.get(lk),
                "_row": c,
            },
        )
        g["experts"] += 1
        g["rows"] += int(float(c.get("tokens") or 0))
        g["tokens"] = g["rows"]
    out = []
    for (lk, dev, _), g in groups.items():
        r = rates.at(g.pop("_row"), dev)
        if lk in bad or r is None or g["layer_ms"] is None:
            continue
        g["rate_down_kbit"], g["rate_up_kbit"] = r
        out.append(g)
    return out


def bs_layer_times(
    layers: Sequence[Mapping[str, Any]], links: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[float, ...]]:
    """phase -> median BS time per MoE layer position outside the exchange, without the rate
    change that started at that layer (pure; see the module doc for the decision)."""
    change: dict[tuple, float] = {}
    seen: set[tuple] = set()
    for r in links:  # one change = one (trial, repeat, time_s): its rows share change_ms
        k = (_tk(r), str(r.get("time_s")))
        ms = _f(r.get("change_ms"))
        if k in seen or ms is None:
            continue
        seen.add(k)
        p = (_tk(r), _pos(r))
        change[p] = change.get(p, 0.0) + ms
    has_decision = any(r.get("decision_ms") not in (None, "") for r in layers)
    if any(r.get("change_ms") not in (None, "") for r in layers):
        change = {}  # the layer's own record of its rate change wins
    rows = (
        list(layers)
        if has_decision
        else [r for r in layers if r.get("predicted_ms") in (None, "")] or list(layers)
    )
    moe_layers = sorted({int(r["layer"]) for r in rows})
    pos = {lay: i for i, lay in enumerate(moe_layers)}
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        bs = _f(r.get("bs_ms"))
        if bs is None:
            continue
        bs -= change.get((_tk(r), _pos(r)), _f(r.get("change_ms")) or 0.0) + (
            _f(r.get("decision_ms")) or 0.0
        )
        phase = "prefill" if int(r["step"]) == 0 else "decode"
        by.setdefault((phase, pos[int(r["layer"])]), []).append(max(0.0, bs))
    out: dict[str, tuple[float, ...]] = {}
    for phase in ("prefill", "decode"):
        xs = [statistics.median(by[(phase, i)]) for i in range(len(moe_layers)) if (phase, i) in by]
        if xs:
            out[phase] = tuple(xs)
    if "prefill" not in out and "decode" in out:
        out["prefill"] = out["decode"]
    if "decode" not in out and "prefill" in out:
        out["decode"] = out["prefill"]
    return out


def step_tail_ms(
    requests: Sequence[Mapping[str, Any]], layers: Sequence[Mapping[str, Any]]
) -> float | None:
    """Median over requests of (``total_ms`` - its layers' ``bs_ms + moe_ms``) / its steps
    (pure): the BS's time per step after the last MoE layer."""
    by: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in layers:
        by.setdefault((_tk(r), str(r["request"])), []).append(r)
    xs = []
    for q in requests:
        ls = by.get((_tk(q), str(q["request"])))
        total = _f(q.get("total_ms"))
        if not ls or total is None:
            continue
        s = sum((_f(r.get("bs_ms")) or 0.0) + (_f(r.get("moe_ms")) or 0.0) for r in ls)
        steps = len({r["step"] for r in ls})
        xs.append(max(0.0, (total - s) / steps))
    return statistics.median(xs) if xs else None


def rate_change_fit(
    links: Sequence[Mapping[str, Any]], layers: Sequence[Mapping[str, Any]] = ()
) -> dict[str, tuple[float, float]]:
    """Source -> ``(a, b)`` of ``change_ms = a + b * devices changed`` (non-negative least
    squares, :func:`~testbed.policy.latency_model.fit_compute_profile`), and ``""`` over all (pure).

    An epoch's time is the ``change_ms`` of the layer that started it where ``layers.csv``
    records it (the whole in-line change: tc, read-back, the last epoch's rows written), else
    ``links.csv``'s (the tc batch); its devices and source are ``links.csv``'s rows there."""
    epochs: dict[tuple, dict[str, Any]] = {}
    for r in links:
        k = (_tk(r), str(r.get("time_s")))
        e = epochs.setdefault(k, {"n": 0, "ms": _f(r.get("change_ms")), "src": r.get("source")})
        e["n"] += 1
    if any(r.get("change_ms") not in (None, "") for r in layers):
        at: dict[tuple, dict[str, Any]] = {}
        for r in links:  # every change that epoch (a channel's, then a policy's)
            e = at.setdefault((_tk(r), _pos(r)), {"n": 0, "src": ""})
            e["n"] += 1
            e["src"] = r.get("source")
        epochs = {}
        for r in layers:
            ms = _f(r.get("change_ms"))
            e = at.get((_tk(r), _pos(r)))
            if ms and e:
                epochs[(_tk(r), _pos(r))] = {"n": e["n"], "ms": ms, "src": e["src"]}
    pts: dict[str, list[tuple[float, float]]] = {"": []}
    for e in epochs.values():
        if e["ms"] is None:
            continue
        pts[""].append((e["n"], e["ms"]))
        pts.setdefault(str(e["src"] or ""), []).append((e["n"], e["ms"]))
    return {k: fit_compute_profile(v) for k, v in pts.items() if v}


def calibrate_from_run(run_dir: str | Path) -> Calibration:
    """The twin's calibration from a measured run's results folder (module doc).

    Raises
    ------
    ConfigError
        When ``run_dir`` is no results folder or holds nothing to calibrate from.
    """
    p = Path(run_dir)
    try:
        man = X.read_manifest(p)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--calibrate: {p}: no readable {R.MANIFEST} ({e})") from None
    if man.get("mode") == "simulated":
        raise ConfigError(f"--calibrate: {p}: a simulated run (calibrate from a measured one)")
    calls, layers, links, reqs = (
        R.read_csv(p / f) for f in (R.CALLS, R.LAYERS, R.LINKS, R.REQUESTS)
    )
    if not calls or not layers:
        raise ConfigError(f"--calibrate: {p}: no calls or layers to calibrate from")
    d = default_calibration()
    sh = man.get("shaping") or {}
    mode = sh.get("mode") if sh.get("mode") in ("tbf", "netem", "htb", "none") else "tbf"
    # bytes per token of the run (payload per row): what the fit's airtime is computed with
    per_row = [
        float(c["bytes_down"]) / float(c["tokens"])
        for c in calls
        if c.get("status") == "ok" and _f(c.get("tokens")) and _f(c.get("bytes_down"))
    ]
    base = replace(
        d.params,
        bytes_per_token=statistics.median(per_row) if per_row else 0.0,
        shaping=mode,
        bucket_bytes=float(sh.get("bucket_bytes") or 1514.0),
        bucket_slack_us=float(sh.get("bucket_slack_us") or 50.0),
    )
    fit: dict[str, Any] = {}
    fitted = [
        LayerCostParams.from_dict(t["latency_model"]["params"])
        for t in man.get("trials") or []
        if isinstance((t.get("latency_model") or {}).get("params"), Mapping)
    ]
    if not fitted and isinstance(man.get("latency_model"), Mapping):
        fitted = [LayerCostParams.from_dict(man["latency_model"])]
    if fitted:  # the runner's own fit (profiling exchanges): each trial's, combined
        params = combine_params(fitted)
        fit["latency_model"] = f"the run's profiling fit ({len(fitted)} trials)"
    else:
        samples = exchange_samples(calls, layers, RatesInForce(links, man.get("trials") or []))
        if not samples:
            raise ConfigError(f"--calibrate: {p}: no complete expert exchange to fit")
        params, resid = fit_layer_costs(samples, base)
        fit.update(latency_model=f"fit_layer_costs on {len(samples)} calls", residuals=resid)
    if params.devices:  # devices the run did not have: the median of those it had
        params = replace(params, default_device=median_costs(params.devices))
    prof = {
        str(k): (float(v["a_ms"]), float(v["b_ms"]))
        for k, v in (man.get("compute_profile") or {}).items()
    }
    default_prof = (
        (
            statistics.median(a for a, _ in prof.values()),
            statistics.median(b for _, b in prof.values()),
        )
        if prof
        else d.default_profile
    )
    bs = bs_layer_times(layers, links) or d.bs_layer_ms
    tail = step_tail_ms(reqs, layers)
    change = rate_change_fit(links, layers) or d.rate_change
    fit.update(
        samples=len(calls), layers=len(layers), requests=len(reqs), tail_from_run=tail is not None
    )
    return Calibration(
        params, prof, default_prof, bs, d.tail_ms if tail is None else tail, change, str(p), fit
    )


def median_costs(costs: Sequence[DeviceCosts]) -> DeviceCosts:
    """Each field's median over ``costs`` (a device the calibration did not see)."""
    return DeviceCosts(
        **{
            f.name: statistics.median(getattr(c, f.name) for c in costs)
            for f in fields(DeviceCosts)
        }
    )


def combine_params(fitted: Sequence[LayerCostParams]) -> LayerCostParams:
    """One :class:`LayerCostParams` from several trials' fits (pure): per device the median of
    its fits' fields, the numeric scalars' medians, the rest (shaping, ...) the last fit's."""
    per: dict[str, list[DeviceCosts]] = {}
    for p in fitted:
        for name, c in zip(p.device_names, p.devices):
            per.setdefault(name, []).append(c)
    last = fitted[-1]
    skip = {"devices", "device_names", "default_device"}
    scal = {
        f.name: statistics.median(getattr(p, f.name) for p in fitted)
        for f in fields(LayerCostParams)
        if f.name not in skip
        and all(isinstance(getattr(p, f.name), (int, float)) for p in fitted)
        and not isinstance(getattr(last, f.name), bool)
    }
    scal = {k: type(getattr(last, k))(v) for k, v in scal.items()}
    names = tuple(sorted(per))
    return replace(
        last, **scal, device_names=names, devices=tuple(median_costs(per[n]) for n in names)
    )


# -- the virtual clock, links and expert exchange ----------------------------------------------
class SimClock:
    """Seconds of simulated time (starts at 0)."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance_ms(self, ms: float) -> None:
        self.now += max(0.0, float(ms)) / 1e3


class SimLinkRecorder(LinkRecorder):
    """:class:`~testbed.run.epochs.LinkRecorder` on the twin's clock: an epoch's rates are
    taken as asked (tc's read-back rounding aside), the change costs the calibrated time, and
    ``links.csv`` gets the same rows (``time_s``, ``change_ms``, ``epoch_ms`` in simulated
    time)."""

    def __init__(self, table: Any, clock: SimClock, cost: Callable[[str, int], float]):
        super().__init__(None, table, 0.0)
        self.clock = clock
        self.cost = cost
        self.charged_ms = 0.0  # changes charged since the last take()

    def take(self) -> float:
        """The change time charged since the last call (the layer's ``change_ms``)."""
        ms, self.charged_ms = self.charged_ms, 0.0
        return ms

    def apply(
        self,
        rates: Mapping[str, tuple[float, float]],
        key: Mapping[str, Any],
        where: Mapping[str, Any],
    ) -> dict[str, tuple[float, float]]:
        asked = {d: (max(MIN_KBIT, dn), max(MIN_KBIT, up)) for d, (dn, up) in rates.items()}
        start = self.clock.now
        ms = self.cost(str(where.get("source", "")), len(asked))
        self.end_epoch(start)
        self.clock.advance_ms(ms)
        self.charged_ms += ms
        self._begin(rates, asked, key, where, start, ms, self.clock.now)
        return asked

    def _now(self) -> float:
        return self.clock.now


class SimBackend:
    """The twin's expert backend: the experts run here (``inner``, a
    :class:`~models.backend.LocalExpertBackend`), their time is the latency model's.

    Per layer: the work's experts grouped by their primary device (``placement``), each
    device one call with its experts' rows, at the rates ``cluster`` holds for it; the
    result's ``info`` has the call rows the remote backend would give (``calls``), and
    ``t_enter``/``t_exit`` on the twin's clock with ``pending`` merged in, as
    :class:`testbed.run.session.TimedBackend` stamps them. Each link's bucket is followed from
    message to message on the twin's clock, as the runner's
    :class:`~testbed.run.session.ExchangePredictor` follows it on the wall clock: a message
    starts with what the bucket refilled since the last one left
    (:class:`~testbed.policy.latency_model.LinkBuckets`, the runner's too)."""

    def __init__(
        self, inner: Any, clock: SimClock, calibration: Calibration, bytes_per_token: int
    ) -> None:
        self.inner = inner
        self.clock = clock
        self.cal = calibration
        self.params = replace(calibration.params, bytes_per_token=float(bytes_per_token))
        self.bytes_per_token = int(bytes_per_token)
        self.placement: Mapping[str, Sequence[str]] = {}
        self.cluster: Any = None
        self.pending: dict[str, Any] = {}
        self._for: dict[tuple[str, ...], LayerCostParams] = {}
        self.layers = 0
        #: what charged the layer's decision and rate change (``take()`` -> ms), if any
        self.decision: Any = None
        self.change: Any = None
        #: each link's bucket, on the twin's clock
        self.buckets = LinkBuckets()

    def _params(self, names: tuple[str, ...]) -> LayerCostParams:
        p = self._for.get(names)
        if p is None:
            if len(self._for) > 4096:
                self._for.clear()
            p = self._for[names] = self.params.for_devices(names)
        return p

    def run_layer(self, work: Any) -> Any:
        res = self.inner.run_layer(work)
        self.buckets.refill(self.pending.get("links_changed") or ())  # tbf_change fills them
        by_dev: dict[str, list[str]] = {}
        for uid in work.inputs:
            ds = self.placement.get(uid) or ("",)
            by_dev.setdefault(ds[0], []).append(uid)
        names = tuple(sorted(by_dev))
        rows = {u: int(x.shape[0]) for u, x in work.inputs.items()}
        loads = np.array([sum(rows[u] for u in by_dev[d]) for d in names], dtype=np.float64)
        ex = np.array([len(by_dev[d]) for d in names], dtype=np.float64)
        c = self.cluster
        down = np.array([c.rate_down_kbit.get(d, 0.0) for d in names], dtype=np.float64)
        up = np.array([c.rate_up_kbit.get(d, 0.0) for d in names], dtype=np.float64)
        params = self._params(names)
        now = self.clock.now
        if names:
            terms, tok_d, tok_u = self.buckets.exchange_terms(
                names, loads, ex, down, up, params, now
            )
            moe_ms = layer_ms_of(terms, params)
        else:
            moe_ms, terms = 0.0, {}
        for k, d in enumerate(names):  # where each link's bucket stands after its message
            self.buckets.sent(
                d,
                k,
                terms,
                (tok_d, tok_u),
                (down[k], up[k]),
                (now + terms["air_down"][k] / 1e3, now + terms["total"][k] / 1e3),
                params,
            )
        calls = []
        for k, d in enumerate(names):
            dc = params.device(k)
            rtt = float(terms["total"][k])
            dev_ms = float(terms["device"][k])
            for u in by_dev[d]:
                n = rows[u]
                calls.append(
                    {
                        "layer": work.layer,
                        "step": work.step,
                        "uid": u,
                        "device": d,
                        "attempt": 0,
                        "tokens": n,
                        "bytes_out": n * self.bytes_per_token,
                        "bytes_in": n * self.bytes_per_token,
                        "status": "ok",
                        "reason": "",
                        "req_id": k,
                        "serialize_ms": 0.0,
                        "rtt_ms": rtt,
                        "network_ms": rtt - dev_ms,
                        "queue_ms": 0.0,
                        "compute_ms": dc.compute_a_ms + dc.compute_b_ms * n,
                        "device_ms": dev_ms,
                        "energy_j": None,
                        "energy_source": None,
                    }
                )
        t_enter = self.clock.now
        self.clock.advance_ms(moe_ms)
        res.info.update(
            calls=calls,
            served_by={u: d for d, us in by_dev.items() for u in us},
            rerouted={},
            t_enter=t_enter,
            t_exit=self.clock.now,
        )
        pend, self.pending = self.pending, {}
        start = bool(pend.pop("epoch_start", False))
        pend.pop("links_changed", None)
        res.info.update(pend)
        # the layer's decision and rate change as charged to the clock (the hook's own wall
        # times would be the twin's bookkeeping)
        if self.decision is not None:
            res.info["decision_ms"] = self.decision.take()
        if self.change is not None:
            res.info["change_ms"] = self.change.take()
        if "policy_predicted_ms" in R.LAYER_COLUMNS:  # predicted_ms: the calibrated model's
            res.info["predicted_ms"] = moe_ms
            res.info["predicted_critical_ms"] = (
                moe_ms
                + float(res.info.get("decision_ms") or 0)
                + (float(res.info.get("change_ms") or 0) if start else 0.0)
            )
            res.info.update(X.critical_terms(terms))
        self.layers += 1
        return res


class _TimedSelect:
    """A policy seen through the runner's hook, its ``select`` charged to the twin's clock at
    its wall time here (everything else passes through)."""

    def __init__(self, policy: Any, clock: SimClock):
        self._policy = policy
        self._clock = clock
        self.decisions_ms: list[float] = []
        self.charged_ms = 0.0

    def take(self) -> float:
        """The decision time charged since the last call (the layer's ``decision_ms``)."""
        ms, self.charged_ms = self.charged_ms, 0.0
        return ms

    def select(self, ctx: Any, cluster: Any = None) -> Any:
        t0 = time.perf_counter()
        d = self._policy.select(ctx, cluster)
        ms = (time.perf_counter() - t0) * 1e3
        self.decisions_ms.append(ms)
        self.charged_ms += ms
        self._clock.advance_ms(ms)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


# -- the simulation ------------------------------------------------------------------------------
def device_names(n: int) -> list[str]:
    """The twin's devices: ``dev1 .. devN`` (the local testbed's names)."""
    if n < 1:
        raise ConfigError(f"--devices: must be >= 1, not {n}")
    return [f"dev{i}" for i in range(1, n + 1)]


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
        trials = self.recipe.trials()
        cal = (
            calibrate_from_run(self.calibrate)
            if self.calibrate is not None
            else default_calibration()
        )
        self.cal = cal
        try:
            self.run_dir.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            raise ConfigError(f"--out: {self.out}: cannot create the run folder: {e}") from None
        self.manifest = {
            "run_id": self.run_id,
            "mode": "simulated",
            "status": "running",
            "error": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ended": None,
            "git_commit": X.git_commit(),
            "versions": X.package_versions(),
            "recipe": self.recipe.to_dict(),
            "trials": [],
            "completed": [],
            "local_testbed": False,
            "inventory": None,
            "model": None,
            "twin": {
                "devices": self.devices,
                "calibration": cal.to_dict(),
                "not_simulated": self._not_simulated(trials),
            },
        }
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
        return X.RunResult(
            self.run_dir, self.run_id, status, len(trials), self.requests_done, err, self.summaries
        )

    def _not_simulated(self, trials: Sequence[Trial]) -> list[str]:
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

    def _run(self, trials: list[Trial], stack: contextlib.ExitStack) -> None:
        import torch

        from models.manifest import load_manifest
        from models.runtime import BaseStationModel

        from ..dataplane.profiling import bytes_per_token

        rec = self.recipe
        split = X.check_model_and_policies(rec, trials)
        m = load_manifest(split)
        self.split, self.mf = split, m
        X.quiet_transformers()
        if rec.config["run"].get("bs_threads"):
            torch.set_num_threads(int(rec.config["run"]["bs_threads"]))
        bsm = BaseStationModel.from_split_dir(split, wire_dtype=rec.wire_dtype)
        self.bsm = bsm
        self.local = bsm.backend
        wire = bsm.controller.wire_dtype or next(bsm.model.parameters()).dtype
        self.bytes_per_token = bytes_per_token(m.hidden_size, wire.itemsize)
        self.manifest["model"] = {
            **X.model_entry(split, m),
            "wire_dtype": str(wire).removeprefix("torch."),
        }
        self.moe_pos = {lay: i for i, lay in enumerate(sorted(m.moe_layers))}
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
        self._save()
        extra = [f"sweep.{k}" for k in rec.sweep]
        self.tables = {
            name: stack.enter_context(R.CsvTable(self.run_dir / fname, cols, x))
            for name, fname, cols, x in (
                ("requests", R.REQUESTS, R.REQUEST_COLUMNS, extra),
                ("layers", R.LAYERS, R.LAYER_COLUMNS, extra),
                ("calls", R.CALLS, R.CALL_COLUMNS, extra),
                ("devices", R.DEVICES, R.DEVICE_COLUMNS, ()),
                ("summary", R.SUMMARY, R.SUMMARY_COLUMNS, extra),
                ("profile", R.PROFILE, R.PROFILE_COLUMNS, ()),
                ("links", R.LINKS, R.LINK_COLUMNS, extra),
                ("faults", R.FAULTS, R.FAULT_COLUMNS, extra),
                ("migrations", R.MIGRATIONS, R.MIGRATION_COLUMNS, extra),
            )
        }
        self.progress.start(len(trials), int(rec.config["workload"]["requests"]) * rec.repeats)
        self.reference_model: Any = None
        for t in trials:
            self.progress.trial(t.index, f"{t.policy} {t.label}")
            for rep in range(rec.repeats):
                self._trial(t, rep)

    def _n_devices(self, t: Trial) -> int:
        if self.devices is not None:
            return int(self.devices)
        n = t.config["run"]["devices"]
        return int(n) if n else 3

    def _trial(self, t: Trial, rep: int) -> None:
        from ..results.report import summary_row

        rec, cal = self.recipe, self.cal
        inner = load_policy(
            rec.policy_spec(t.policy), t.config["policy"]["params"], f"{rec.path}: policy.params"
        )
        policy = _TimedSelect(inner, self.clock)
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
        names = device_names(self._n_devices(t))
        budget = float(rec.config["run"].get("memory_budget_mb") or 1e6)
        infos = [DeviceInfo(n, budget, "netns") for n in names]
        placement = X.place_experts(inner, self.mf, infos, str(self.split), self.bytes_per_token)
        profiles = cal.profiles(names)
        for n in names:
            if n not in self.manifest["compute_profile"]:
                a, b = profiles[n]
                self.manifest["compute_profile"][n] = {"a_ms": a, "b_ms": b, "simulated": True}
        down, up = t.link_kbit()
        rates = [{"device": n, "down_kbit": down, "up_kbit": up} for n in names]
        sim = SimBackend(self.local, self.clock, cal, self.bytes_per_token)
        sim.placement = placement
        self.bsm.backend = inner.wrap_backend(sim)
        cluster = X.trial_cluster(
            t, rec.seed + rep, placement, rates, names, profiles, self.bytes_per_token
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
        hook = X.policy_hook(policy, cluster, plan, sim, lambda: self.request_index, dict)
        moe_pos, clock = self.moe_pos, self.clock

        def timed_hook(ctx: Any) -> Any:
            clock.advance_ms(cal.bs_ms(ctx.step, moe_pos.get(ctx.layer, 0)))
            return hook(ctx)

        self.bsm.policy = timed_hook
        self.manifest["trials"].append(
            {
                "trial": t.index,
                "repeat": rep,
                "point": point,
                "policy": inner.describe(),
                "devices": len(names),
                "devices_used": len({ds[0] for ds in placement.values()}),
                "links_enforced": rates[:64],
                "placement": {u: list(ds) for u, ds in placement.items()},
            }
        )
        reqs = X.make_workload(t, self.mf, rec.seed + rep)
        t_req: list[dict] = []
        t_layer: list[dict] = []
        status_rows: dict[str, dict] = {}
        t_calls: list[dict] = []
        for q in reqs:
            self.request_index = q.index
            row, lrows, crows = self._request(q, key, placement)
            self.tables["layers"].write_many(lrows)
            self.tables["calls"].write_many(crows)
            self.tables["requests"].write(row)
            t_req.append(row)
            t_layer.append(X.layer_total(lrows))
            t_calls.extend(
                status_rows.setdefault(str(c["status"]), {"status": c["status"]}) for c in crows
            )
            self.requests_done += 1
            self.progress.request()
        self.decisions[inner.name].extend(policy.decisions_ms)
        self.manifest["trials"][-1].update(
            link_epochs=plan.close(), policy_final=inner.describe(), simulated_s=self.clock.now
        )
        summ = {**key, **summary_row(t_req, t_layer, t_calls)}
        self.tables["summary"].write(summ)
        self.summaries.append(summ)
        self.manifest["completed"].append([t.index, rep])
        self._save()

    def _reference(self, q: X.Request) -> tuple[int, ...]:
        from models.runtime import BaseStationModel

        if self.reference_model is None:
            self.reference_model = BaseStationModel.from_split_dir(self.split)
        g = self.reference_model.generate_greedy(
            [list(q.prompt)], q.max_new_tokens, q.eos_token_id, q.pad_token_id
        )
        return tuple(g.tokens[0])

    def _request(
        self, q: X.Request, key: Mapping[str, Any], placement: Mapping[str, Sequence[str]]
    ) -> tuple[dict, list[dict], list[dict]]:
        bsm, clock, cal = self.bsm, self.clock, self.cal
        step_end: dict[int, float] = {}
        bsm.start_recording()
        bsm.pop_records()
        t0 = clock.now

        def on_step(s: int) -> None:
            clock.advance_ms(cal.tail_ms)
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
        lrows, crows, tot = X.rows_for_request(records, rkey, step_start, placement)
        ref = q.reference if q.reference is not None else self._reference(q)
        energy = {
            "energy_devices_j": None,
            "energy_bs_j": None,
            "energy_j": None,
            "energy_source": "simulated: not modelled",
        }
        row = X.request_row(q, rkey, out, ref, tot, t0, step_end.get(0, t_end), t_end, energy)
        return row, lrows, crows


def simulate_recipe(
    recipe: Recipe,
    devices: int | None = None,
    calibrate: Path | None = None,
    out: Path = Path("results"),
    progress: X.Progress | None = None,
) -> X.RunResult:
    """Run ``recipe`` through the analytic twin (module doc) over ``devices`` devices (default:
    each trial's ``run.devices``, else 3), calibrated from the measured run ``calibrate``
    (default: :data:`DEFAULTS`); returns the results folder and status like
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
    )


def per_policy_token_ms(run_dir: str | Path) -> dict[tuple[str, str], float]:
    """(policy, point) -> mean per-token latency (``total_ms / output_tokens`` over requests,
    :func:`testbed.results.comparison.per_token_ms`) of a results folder: what the twin is checked on
    against a measured run."""
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
