"""The timing wrapper around the expert backend and the calibrated latency model's prediction
of each layer's exchange (:class:`ExchangePredictor`), both on the BS's ``perf_counter`` clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..policy.api import ClusterState
from ..results.rows import critical_terms


@dataclass
class LayerPrediction:
    """One exchange's prediction (:meth:`ExchangePredictor.predict`): its ``layers.csv``
    columns (``predicted_ms``, ``predicted_critical_ms`` and the slowest device's terms,
    :func:`~testbed.results.rows.critical_terms`), and the exchange's terms, tokens left in
    each link's bucket (down, up) and rates (down, up) that :meth:`ExchangePredictor.observe`
    follows the buckets with."""

    columns: dict[str, Any]
    terms: Mapping[str, Any]
    tokens: tuple[Any, Any]
    rates: tuple[Any, Any]


class TimedBackend:
    """Delegates to ``inner`` and stamps each layer's enter/exit time (perf_counter seconds)
    into the result's ``info`` (``t_enter``, ``t_exit``), with ``pending`` (what the selection
    hook noted for this layer: the policy's own ``policy_predicted_ms``, ``decision_ms``,
    ``change_ms``, ``epoch_start``) merged in and cleared. With a ``predictor`` (an
    :class:`ExchangePredictor`), the exchange is first predicted from the rows actually handed
    over (a :class:`LayerPrediction`: ``predicted_ms``, ``predicted_critical_ms``...), before
    its clock starts; its columns go into ``info`` and the predictor observes the result."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.pending: dict[str, Any] = {}
        self.predictor: ExchangePredictor | None = None

    def run_layer(self, work: Any) -> Any:
        """``inner.run_layer(work)``, its result's ``info`` stamped (class doc)."""
        predictor = self.predictor
        pred = predictor.predict(work, self.pending) if predictor is not None else None
        t0 = time.perf_counter()
        res = self.inner.run_layer(work)
        res.info["t_enter"], res.info["t_exit"] = t0, time.perf_counter()
        if predictor is not None and pred is not None:
            res.info.update(pred.columns)
            predictor.observe(pred, res)
        if self.pending:
            self.pending.pop("epoch_start", None)
            self.pending.pop("links_changed", None)
            res.info.update(self.pending)
            self.pending = {}
        return res


class ExchangePredictor:
    """The calibrated latency model's prediction of one layer's exchange, for every policy
    (:func:`testbed.policy.latency_model.predict_layer_ms`): from the rows the BS hands to the
    backend (after any wrapper such as CoEL's fusion) grouped by the device holding each expert
    (``placement()``, the backend's), the rates in force in ``cluster`` (down and up, as tc
    read them back) and the trial's fitted ``params``.

    Each link's bucket is followed from message to message (:meth:`observe`): a message that
    passed free spent part of it, one that was held back emptied it, and it refills at the
    link's rate until the next message (whose start is predicted: the request now, the reply
    after the request's airtime and the device's time) -- a slow link is still refilling when
    the next layer's message comes. A rate change fills the bucket of every link it changed
    (the kernel's ``tbf_change`` sets the tokens to the full bucket): at an epoch's start the
    links changed (``pending["links_changed"]``) start full. ``predicted_critical_ms`` adds the
    decision's and, at an epoch's start, the rate change's predicted time: the medians of this
    trial's earlier ones (the first: 0)."""

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

    def predict(self, work: Any, pending: Mapping[str, Any]) -> LayerPrediction:
        """The prediction of the exchange of ``work`` now, with the selection hook's notes
        ``pending`` (``links_changed``, ``epoch_start``, ``decision_ms``, ``change_ms``)."""
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
        return LayerPrediction(
            {"predicted_ms": layer_ms, "predicted_critical_ms": crit, **critical_terms(terms)},
            terms,
            (tok_d, tok_u),
            (down, up),
        )

    def observe(self, pred: LayerPrediction, res: Any) -> None:
        """After the exchange predicted as ``pred``: where each called device's buckets stand
        (the request left its leaf its airtime after the send; the reply, when it arrived)."""
        t_enter = res.info.get("t_enter")
        if t_enter is None:
            return
        terms, (down, up) = pred.terms, pred.rates
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
                terms,
                pred.tokens,
                (down[k], up[k]),
                (sent + terms["air_down"][k] / 1e3, sent + float(call["rtt_ms"]) / 1e3),
                self.params,
            )
