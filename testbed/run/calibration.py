"""The analytic twin's calibration: what :mod:`testbed.run.twin` charges time with.

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
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..policy.bandwidth import fit_compute_profile
from ..policy.latency_model import DeviceCosts, LayerCostParams, fit_layer_costs
from ..results import schema as R
from .resume import read_manifest

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


# -- from a measured run -------------------------------------------------------------------
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
        """Each device of ``names`` -> its compute profile ``(a_ms, b_ms)``."""
        return {n: self.compute_profile.get(n, self.default_profile) for n in names}

    def bs_ms(self, step: int, layer_pos: int) -> float:
        """The BS's time at MoE layer position ``layer_pos`` of step ``step`` (0: prefill)."""
        xs = self.bs_layer_ms["prefill" if step == 0 else "decode"]
        return float(xs[min(layer_pos, len(xs) - 1)]) if xs else 0.0

    def change_ms(self, source: str, devices: int) -> float:
        """An epoch's rate change from ``source`` over ``devices`` devices."""
        a, b = self.rate_change.get(source) or self.rate_change.get("") or (0.0, 0.0)
        return float(a + b * devices)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record (``twin.calibration``)."""
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
        """(down, up) kbit/s of ``device``'s link at ``row``'s (trial, repeat, request, step,
        layer); ``None`` when no epoch nor the manifest gives it."""
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
    squares, :func:`~testbed.policy.bandwidth.fit_compute_profile`), and ``""`` over all (pure).

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
        man = read_manifest(p)
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
    params, fit = exchange_params(p, man, calls, layers, links, d.params)
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


def exchange_params(
    run_dir: Path,
    man: Mapping[str, Any],
    calls: Sequence[Mapping[str, Any]],
    layers: Sequence[Mapping[str, Any]],
    links: Sequence[Mapping[str, Any]],
    defaults: LayerCostParams,
) -> tuple[LayerCostParams, dict[str, Any]]:
    """The exchange model of a measured run (its manifest ``man`` and rows) and the fit's
    record: the runner's own fits where the manifest has them (each trial's, combined), else
    :func:`~testbed.policy.latency_model.fit_layer_costs` on its calls from ``defaults`` with
    the run's shaping; devices the run did not have get the median of those it had.

    Raises
    ------
    ConfigError
        When there is neither a fit nor a complete expert exchange to fit.
    """
    sh = man.get("shaping") or {}
    mode = sh.get("mode") if sh.get("mode") in ("tbf", "netem", "htb", "none") else "tbf"
    # bytes per token of the run (payload per row): what the fit's airtime is computed with
    per_row = [
        float(c["bytes_down"]) / float(c["tokens"])
        for c in calls
        if c.get("status") == "ok" and _f(c.get("tokens")) and _f(c.get("bytes_down"))
    ]
    base = replace(
        defaults,
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
            raise ConfigError(f"--calibrate: {run_dir}: no complete expert exchange to fit")
        params, resid = fit_layer_costs(samples, base)
        fit.update(latency_model=f"fit_layer_costs on {len(samples)} calls", residuals=resid)
    if params.devices:  # devices the run did not have: the median of those it had
        params = replace(params, default_device=median_costs(params.devices))
    return params, fit


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
