"""What a run measures besides the requests: the BS's own energy meter, each device's
cumulative energy counter (read by a ping around each request) and the devices' status feed
sampled into ``devices.csv``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TestbedError


def open_bs_meter(devices: Sequence[Any], backend: Any) -> tuple[Any, dict[str, Any]]:
    """The BS's own meter (:func:`device_agent.energy.detect_meter`; the caller closes it) and
    the manifest's ``energy`` entry. When every device is a namespace on this host, only the
    CPU-time estimate of this process: a host-wide meter (RAPL) would count the agents' work
    too."""
    from device_agent.energy import MeterOptions, detect_meter

    only = ("estimated",) if all(d.hw_class == "netns" for d in devices) else None
    meter = detect_meter("/", MeterOptions(only=only))
    entry = {
        "bs": meter.describe(),
        "devices": {d: a.energy_source for d, a in backend.agents.items()},
        "request_window": "each device's cumulative counter read by a ping just before and "
        "just after the request; the BS meter over the request itself",
    }
    return meter, entry


def energy_counters(backend: Any) -> dict[str, float | None]:
    """device -> the cumulative joules of its meter now: one ``ping`` each (its reply
    carries the agent meter's reading; a few dozen bytes, unlike a status). Devices the
    backend holds down, or that do not answer within 0.5 s, are ``None``."""
    out: dict[str, float | None] = {}
    be = backend
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


class DeviceSampler:
    """Writes the devices' status feed to ``devices.csv`` at most every ``period_s``.

    Parameters
    ----------
    feed:
        The :class:`testbed.dataplane.backend.StatusFeed` (its ``view``: device -> status).
    table:
        The ``devices.csv`` table.
    run_id, t0:
        The run's id and its start on ``time.monotonic()`` (``time_s`` is relative to it).
    period_s:
        The recipe's ``run.telemetry_period_s``.
    """

    def __init__(self, feed: Any, table: Any, run_id: str, t0: float, period_s: float):
        self.feed, self.table = feed, table
        self.run_id, self.t0, self.period_s = run_id, t0, period_s
        self.last_sample = 0.0

    def sample(self, trial: int, rates: Mapping[str, Mapping]) -> None:
        """Poll the feed; when the period has passed, one row per device."""
        self.feed.poll(0)
        now = time.monotonic()
        if now - self.last_sample < self.period_s:
            return
        self.last_sample = now
        rows = [self._row(trial, now, dev, st, rates) for dev, st in sorted(self.feed.view.items())]
        if rows:
            self.table.write_many(rows)

    def _row(
        self, trial: int, now: float, dev: str, st: Mapping[str, Any], rates: Mapping[str, Mapping]
    ) -> dict[str, Any]:
        mem = st.get("memory") or {}
        load = st.get("load") or {}
        power = st.get("power_w")
        return {
            "run_id": self.run_id,
            "trial": trial,
            "time_s": now - self.t0,
            "device": dev,
            "power_w": power if isinstance(power, (int, float)) else None,
            "energy_j": st.get("energy_j"),
            "energy_source": st.get("energy_source") or ("measured" if power else "unavailable"),
            "memory_used_mb": (mem.get("rss_bytes") or 0) / 2**20 if mem.get("rss_bytes") else None,
            "memory_free_mb": (mem.get("available_bytes") or 0) / 2**20
            if mem.get("available_bytes")
            else None,
            "utilisation": load.get("loadavg_1m"),
            "experts_loaded": len(st.get("experts") or {}),
            "rate_down_kbit": rates.get(dev, {}).get("down_kbit"),
            "rate_up_kbit": rates.get(dev, {}).get("up_kbit"),
        }
