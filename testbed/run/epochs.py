"""Link rates that change during a trial: decision epochs, their sources, and ``links.csv``.

A trial's decisions are grouped into epochs (recipe ``policy.epoch``): ``layer`` (every MoE
layer of every forward step), ``step`` (default: one forward step, all its layers) or
``request``. Rates change only at an epoch's first decision, from one source:

* ``policy`` — the decision's ``rate_down_kbit``/``rate_up_kbit`` (each direction its own),
  or its ``bandwidth_kbit`` (both directions at that rate) where it gives no rate for one;
* ``trace`` — recipe ``links.trace``: the trace's k-th time block at the k-th epoch (cycling);
* ``channel`` — recipe ``links.bandwidth_mhz``: the equal split of the cell's bandwidth under
  the channel model, in that epoch's fading (what a policy that allocates the same budget
  would start from).

A policy's bandwidth overrides the trace or channel: once a policy has asked for bandwidth, the
trace/channel is no longer applied in that trial. Every epoch's change is one ``tc -batch``
(:meth:`testbed.net.shaper.TcShaper.set_rates`), timed, its rates read back from tc; one
``links.csv`` row per device, written when the epoch ends (so that it carries how long the
rates stayed: ``epoch_ms``; a crash loses the rows of the epoch in flight), with the epoch's
scope in force (``epoch_scope``). The change runs
in-line, before the layer's experts are called, so its time is part of the layer's ``bs_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..net.channel import ChannelModel, TraceRow
from . import cluster as C

#: tc cannot shape at 0: rates below this (a trace's outage) are asked at this rate
MIN_KBIT = 8.0


class Epochs:
    """Tells the first decision of every epoch; ``index`` counts epochs from 0 (-1 before)."""

    def __init__(self, scope: str):
        if scope not in ("layer", "step", "request"):
            raise ConfigError(f"policy.epoch: must be layer, step or request, not {scope!r}")
        self.scope = scope
        self.index = -1
        self._last: tuple[int, ...] | None = None

    def advance(self, request: int, step: int, layer: int) -> bool:
        """Note a decision; True when it starts a new epoch."""
        key = {"layer": (request, step, layer), "step": (request, step), "request": (request,)}[
            self.scope
        ]
        if self.scope != "layer" and key == self._last:
            return False
        self._last = key
        self.index += 1
        return True


def equal_split_kbit(
    channel: ChannelModel, bandwidth_hz: float, epoch: int, devices: Sequence[str]
) -> dict[str, tuple[float, float]]:
    """(down, up) kbit/s of each device with ``bandwidth_hz / len(devices)`` in ``epoch``, the
    channel's rates each way (the BS's power spread over the cell's ``bandwidth_hz`` down, the
    device's own power up)."""
    idx = [channel.index[d] for d in devices]
    b = bandwidth_hz / len(devices)
    down = channel.rates_bps(b, "down", epoch, total_hz=bandwidth_hz)[idx] / 1e3
    up = channel.rates_bps(b, "up", epoch, total_hz=bandwidth_hz)[idx] / 1e3
    return {d: (float(down[i]), float(up[i])) for i, d in enumerate(devices)}


class TraceReplay:
    """A channel trace as blocks of rates (one per distinct ``time_s``), for ``devices``.

    Devices of the trace that the trial does not use are ignored; a trial device missing from
    a block keeps its rate in that epoch.

    Raises
    ------
    ConfigError
        Naming ``where`` when no block mentions any of the trial's devices.
    """

    def __init__(self, rows: Sequence[TraceRow], devices: Sequence[str], where: str):
        blocks: dict[float, dict[str, tuple[float, float]]] = {}
        for r in rows:
            if r.device in devices:
                blocks.setdefault(r.time_s, {})[r.device] = (r.rate_down_kbit, r.rate_up_kbit)
        if not blocks:
            raise ConfigError(
                f"{where}: the trace has no rows for the trial's devices ({', '.join(devices)})"
            )
        self.blocks = [blocks[t] for t in sorted(blocks)]

    def rates(self, epoch: int) -> dict[str, tuple[float, float]]:
        """device -> (down, up) kbit/s of block ``epoch``; the trace repeats past its end."""
        return self.blocks[epoch % len(self.blocks)]


class LinkRecorder:
    """Applies an epoch's rates (one tc batch) and writes its ``links.csv`` rows when the
    epoch ends.

    Parameters
    ----------
    shaper:
        A :class:`testbed.net.shaper.TcShaper` whose tree is installed.
    table:
        The ``links.csv`` :class:`testbed.results.CsvTable`.
    t0:
        ``time.monotonic()`` at the start of the run (``time_s`` is relative to it).
    """

    def __init__(self, shaper: Any, table: Any, t0: float):
        self.shaper = shaper
        self.table = table
        self.t0 = t0
        #: the epoch in flight: its rows per device, and the cells they share
        self._pending: list[dict[str, Any]] = []
        self._common: dict[str, Any] = {}
        self._since = 0.0
        self.change_ms: list[float] = []
        self.epoch_ms: list[float] = []

    def apply(
        self,
        rates: Mapping[str, tuple[float, float]],
        key: Mapping[str, Any],
        where: Mapping[str, Any],
    ) -> dict[str, tuple[float, float]]:
        """Enforce ``rates`` (device -> (down, up) kbit/s); returns what tc reports."""
        asked = {d: (max(MIN_KBIT, dn), max(MIN_KBIT, up)) for d, (dn, up) in rates.items()}
        start = time.monotonic()
        try:
            enforced = self.shaper.set_rates(asked)
            end = time.monotonic()
        finally:
            # the last epoch's rates stayed until this change began; its rows are written
            # (flushed and fsynced) only now, so that the write is no gap between two epochs
            self.end_epoch(start)
        self._begin(rates, enforced, key, where, start - self.t0, (end - start) * 1e3, end)
        return enforced

    def _now(self) -> float:
        """The clock epochs are timed on (``time.monotonic()`` here)."""
        return time.monotonic()

    def _begin(
        self,
        rates: Mapping[str, tuple[float, float]],
        enforced: Mapping[str, tuple[float, float]],
        key: Mapping[str, Any],
        where: Mapping[str, Any],
        time_s: float,
        change_ms: float,
        since: float,
    ) -> None:
        """Start the epoch whose change took ``change_ms`` and ended at ``since`` (on
        :meth:`_now`'s clock): its rows wait for :meth:`end_epoch`."""
        self.change_ms.append(change_ms)
        self._since = since
        self._common = {**key, **where, "time_s": time_s, "change_ms": change_ms}
        self._pending = [
            {
                "device": d,
                "asked_down_kbit": rates[d][0],
                "asked_up_kbit": rates[d][1],
                "enforced_down_kbit": enforced[d][0],
                "enforced_up_kbit": enforced[d][1],
            }
            for d in sorted(rates)
        ]

    def end_epoch(self, at: float | None = None) -> None:
        """Write the rows of the epoch in flight, which ended at ``at`` on :meth:`_now`'s
        clock (default: now; call at the trial's end too)."""
        if not self._pending:
            return
        ms = ((self._now() if at is None else at) - self._since) * 1e3
        self.epoch_ms.append(ms)
        self.table.write_many(
            self._pending,
            {**self._common, "epoch_ms": ms, "tc_slower": self._common["change_ms"] > ms},
        )
        self._pending = []

    def summary(self, scope: str) -> dict[str, Any]:
        """For the manifest: how long tc took per epoch against how long epochs lasted."""
        if not self.change_ms:
            return {"epoch": scope, "changes": 0}
        ch, ep = np.asarray(self.change_ms), np.asarray(self.epoch_ms[: len(self.change_ms)])
        slower = int((ch[: len(ep)] > ep).sum())
        out = {
            "epoch": scope,
            "changes": len(ch),
            "change_ms_p50": float(np.median(ch)),
            "change_ms_max": float(ch.max()),
            "epoch_ms_p50": float(np.median(ep)) if len(ep) else None,
            "epochs_shorter_than_change": slower,
        }
        if slower:
            out["note"] = (
                f"{slower} of {len(ep)} epochs ({scope}) lasted less than the tc change "
                "that started them: the links cannot follow decisions this often (the "
                "change runs in-line and adds to bs_ms); use a longer policy.epoch"
            )
        return out


class EpochLinks:
    """One trial's link changes: epochs, their source, the cluster state the policy sees.

    Parameters
    ----------
    epochs, recorder:
        The trial's :class:`Epochs` and :class:`LinkRecorder`.
    cluster:
        The :class:`testbed.policy.ClusterState` handed to the policy: its ``epoch``,
        ``links_fixed`` and enforced rates are kept up to date here.
    devices:
        The trial's device names.
    key:
        The trial's key columns (``run_id``, ``trial``, ...) for ``links.csv``.
    channel, bandwidth_hz, trace:
        The channel (with the cell's bandwidth) or the :class:`TraceReplay` that sets the rates
        of policies that allocate no bandwidth; ``None`` for neither (links stay as set).
    """

    def __init__(
        self,
        epochs: Epochs,
        recorder: LinkRecorder,
        cluster: Any,
        devices: Sequence[str],
        key: Mapping[str, Any],
        channel: ChannelModel | None = None,
        bandwidth_hz: float = 0.0,
        trace: TraceReplay | None = None,
    ):
        self.epochs, self.recorder, self.cluster = epochs, recorder, cluster
        self.devices, self.key = list(devices), dict(key)
        self.channel, self.bandwidth_hz, self.trace = channel, bandwidth_hz, trace
        self.policy_allocates = False
        self._where: dict[str, Any] = {}
        #: rate changes made so far, and the devices the latest one changed (a TBF leaf's
        #: bucket is full again after a change: the kernel's tbf_change refills it)
        self.changes = 0
        self.last_changed: tuple[str, ...] = ()

    def begin(self, request: int, step: int, layer: int) -> bool:
        """Before a decision: True when it starts an epoch (the trace or channel, if any, is
        then applied; the policy's bandwidth may follow through :meth:`apply_policy`)."""
        start = self.epochs.advance(request, step, layer)
        C.record_epoch(self.cluster, self.epochs.index, not start)
        if start:
            self._where = {
                "epoch": self.epochs.index,
                "epoch_scope": self.epochs.scope,
                "request": request,
                "step": step,
                "layer": layer,
            }
            if not self.policy_allocates and self.trace is not None:
                self._apply(self.trace.rates(self.epochs.index), "trace")
            elif not self.policy_allocates and self.channel is not None:
                self._apply(
                    equal_split_kbit(
                        self.channel, self.bandwidth_hz, self.epochs.index, self.devices
                    ),
                    "channel",
                )
        return start

    def apply_policy(
        self,
        bandwidth_kbit: Mapping[str, float] | None,
        down_kbit: Mapping[str, float] | None = None,
        up_kbit: Mapping[str, float] | None = None,
    ) -> None:
        """Enforce a decision's rates: per device ``down_kbit``/``up_kbit`` each way, a
        direction missing there at ``bandwidth_kbit`` (both directions at one rate)."""
        self.policy_allocates = True
        bw, dn, up = dict(bandwidth_kbit or {}), dict(down_kbit or {}), dict(up_kbit or {})
        rates = {}
        for d in sorted(set(bw) | set(dn) | set(up)):
            r_d, r_u = dn.get(d, bw.get(d)), up.get(d, bw.get(d))
            if r_d is None or r_u is None:
                raise ValueError(f"policy rates for {d}: down {r_d}, up {r_u} (both needed)")
            rates[d] = (float(r_d), float(r_u))
        self._apply(rates, "policy")

    def _apply(self, rates: Mapping[str, tuple[float, float]], source: str) -> None:
        enforced = self.recorder.apply(rates, self.key, {**self._where, "source": source})
        self.changes += 1
        self.last_changed = tuple(sorted(rates))
        C.record_enforced(self.cluster, enforced)

    def close(self) -> dict[str, Any]:
        """End the last epoch; the manifest's summary of the trial's link changes."""
        self.recorder.end_epoch()
        return self.recorder.summary(self.epochs.scope)
