"""What charges time to the analytic twin's virtual clock (:mod:`testbed.run.twin`): the clock
(:class:`SimClock`), the links' rate changes (:class:`SimLinkRecorder`), the expert exchange
(:class:`SimBackend`: the experts run here, their time is the calibrated latency model's) and the
policy's decisions (:class:`TimedSelect`: its ``select`` at its wall time here)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..policy.latency_model import LayerCostParams, LinkBuckets, layer_ms_of
from ..results import schema as R
from ..results.rows import critical_terms
from .calibration import Calibration
from .epochs import MIN_KBIT, LinkRecorder


class SimClock:
    """Seconds of simulated time (starts at 0)."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance_ms(self, ms: float) -> None:
        """Move the clock on by ``ms`` (never back)."""
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
        """Take ``rates`` as asked (at least ``MIN_KBIT``), charge the change to the clock and
        start the epoch's ``links.csv`` rows; the rates now in force."""
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
    :class:`testbed.run.prediction.TimedBackend` stamps them. Each link's bucket is followed from
    message to message on the twin's clock, as the runner's
    :class:`~testbed.run.prediction.ExchangePredictor` follows it on the wall clock: a message
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
        """Run ``work``'s experts here; charge their exchange to the clock (class doc)."""
        res = self.inner.run_layer(work)
        self.buckets.refill(self.pending.get("links_changed") or ())  # tbf_change fills them
        by_dev: dict[str, list[str]] = {}
        for uid in work.inputs:
            ds = self.placement.get(uid) or ("",)
            by_dev.setdefault(ds[0], []).append(uid)
        names = tuple(sorted(by_dev))
        rows = {u: int(x.shape[0]) for u, x in work.inputs.items()}
        params = self._params(names)
        moe_ms, terms = self._exchange(names, by_dev, rows, params)
        calls = self._call_rows(work, names, by_dev, rows, terms, params)
        t_enter = self.clock.now
        self.clock.advance_ms(moe_ms)
        res.info.update(
            calls=calls,
            served_by={u: d for d, us in by_dev.items() for u in us},
            rerouted={},
            t_enter=t_enter,
            t_exit=self.clock.now,
        )
        self._note_layer(res.info, moe_ms, terms)
        self.layers += 1
        return res

    def _exchange(
        self,
        names: tuple[str, ...],
        by_dev: Mapping[str, Sequence[str]],
        rows: Mapping[str, int],
        params: LayerCostParams,
    ) -> tuple[float, dict[str, Any]]:
        """The layer's exchange with the devices ``names`` from now on: its time (ms) and the
        latency model's per-device terms; each link's bucket left as its message leaves it."""
        if not names:
            return 0.0, {}
        loads = np.array([sum(rows[u] for u in by_dev[d]) for d in names], dtype=np.float64)
        ex = np.array([len(by_dev[d]) for d in names], dtype=np.float64)
        c = self.cluster
        down = np.array([c.rate_down_kbit.get(d, 0.0) for d in names], dtype=np.float64)
        up = np.array([c.rate_up_kbit.get(d, 0.0) for d in names], dtype=np.float64)
        now = self.clock.now
        terms, tok_d, tok_u = self.buckets.exchange_terms(names, loads, ex, down, up, params, now)
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
        return layer_ms_of(terms, params), terms

    def _call_rows(
        self,
        work: Any,
        names: tuple[str, ...],
        by_dev: Mapping[str, Sequence[str]],
        rows: Mapping[str, int],
        terms: Mapping[str, Any],
        params: LayerCostParams,
    ) -> list[dict[str, Any]]:
        """The call rows the remote backend would give: per device one call (``req_id``), its
        experts' rows with the exchange's round trip and device time."""
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
        return calls

    def _note_layer(self, info: dict[str, Any], moe_ms: float, terms: Mapping[str, Any]) -> None:
        """The layer's record besides its exchange: the hook's ``pending`` notes, the decision
        and rate change as charged to the clock, the calibrated model's prediction."""
        pend, self.pending = self.pending, {}
        start = bool(pend.pop("epoch_start", False))
        pend.pop("links_changed", None)
        info.update(pend)
        # the layer's decision and rate change as charged to the clock (the hook's own wall
        # times would be the twin's bookkeeping)
        if self.decision is not None:
            info["decision_ms"] = self.decision.take()
        if self.change is not None:
            info["change_ms"] = self.change.take()
        if "policy_predicted_ms" in R.LAYER_COLUMNS:  # predicted_ms: the calibrated model's
            info["predicted_ms"] = moe_ms
            info["predicted_critical_ms"] = (
                moe_ms
                + float(info.get("decision_ms") or 0)
                + (float(info.get("change_ms") or 0) if start else 0.0)
            )
            info.update(critical_terms(terms))


class TimedSelect:
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
        """The policy's ``select``; its wall time (ms) advances the clock and is kept."""
        t0 = time.perf_counter()
        d = self._policy.select(ctx, cluster)
        ms = (time.perf_counter() - t0) * 1e3
        self.decisions_ms.append(ms)
        self.charged_ms += ms
        self._clock.advance_ms(ms)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)
