"""Fault injection during a run: kill, stop/resume or restart an agent, or cut a link.

A recipe lists faults in its ``[faults]`` table::

    [faults]
    events = [
      { at_request = 4, device = "dev2", action = "kill" },                 # SIGKILL the agent
      { at_request = 6, device = "dev1", action = "stop", for_s = 1.5 },    # SIGSTOP, SIGCONT later
      { at_s = 3.0, device = "dev3", action = "link", rate = "8kbit", for_requests = 3 },
      { at_request = 10, device = "dev2", action = "restart" },             # start it again
    ]

``at_request`` (the request's index in the trial, before it starts) or ``at_s`` (seconds from
the trial's first request; fired from a timer thread, so it can land in the middle of a
request); every trial (and repeat) replays the list. ``stop`` is resumed after ``for_s``
seconds (default 1) or at ``until_request``; ``link`` drops both directions of the device's
link to ``rate`` (default ``8kbit``, a near-zero rate) for ``for_requests`` requests or
``for_s`` seconds, then restores the trial's rate; ``kill`` lasts until a later ``restart``
(or the trial's end, when the run restarts it for the next trial).

Each injection and each clearing is a row of ``faults.csv`` (:data:`testbed.results.FAULT_COLUMNS`)
with the time, the device, what was done and whether it worked; while a fault is active its id
is in the ``faults`` column of the requests and calls it overlaps, so the report can split
latency and accuracy into before / during / after, and the calls show how the policy reacted
(``timeout`` + drop-and-renormalise, ``rerouted`` to a replica, ``unreachable``).

The parsing is pure (:func:`parse_faults`, used by the recipe checker); :class:`FaultInjector`
does the effects through callbacks the run gives it (signal an agent by PID over SSH, change a
tc class, restart an agent: :class:`testbed.run.fault_effects.AgentEffects`), so it knows
nothing of SSH or tc itself; :class:`TrialFaults` is one trial's injector from its first
request to its end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..units import parse_rate_kbit

ACTIONS = ("kill", "stop", "link", "restart")
_KEYS = {"at_request", "at_s", "device", "action", "for_s", "for_requests", "until_request", "rate"}


@dataclass(frozen=True)
class Fault:
    """One scheduled fault (see the module docstring for the fields)."""

    id: str
    action: str
    device: str
    at_request: int | None = None
    at_s: float | None = None
    for_s: float | None = None
    for_requests: int | None = None
    until_request: int | None = None
    rate_kbit: float = 8.0


def _check_number(
    ev: Mapping[str, Any],
    key: str,
    where: str,
    *,
    integer: bool,
    least: float,
    strict: bool = False,
) -> None:
    """``ev[key]``, when present, is an int (or any number) >= ``least`` (> when ``strict``)."""
    v = ev.get(key)
    if v is None:
        return
    kinds = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or v < least or (strict and v == least):
        what = "an integer" if integer else "a number"
        raise ValueError(
            f"{where}.{key}: must be {what} {'>' if strict else '>='} {least:g}, got {v!r}"
        )


def parse_faults(value: Any) -> list[Fault]:
    """Check ``[faults].events``; raises ValueError naming the entry and key. Pure."""
    if not isinstance(value, list):
        raise ValueError(
            'must be a list of tables, e.g. [{ at_request = 3, device = "dev1", action = "kill" }]'
        )
    out: list[Fault] = []
    for i, ev in enumerate(value):
        where = f"[{i}]"
        if not isinstance(ev, dict):
            raise ValueError(f"{where}: must be a table")
        unknown = sorted(set(ev) - _KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(_KEYS))})"
            )
        action = ev.get("action")
        if action not in ACTIONS:
            raise ValueError(f"{where}.action: must be one of {', '.join(ACTIONS)}, got {action!r}")
        device = ev.get("device")
        if not isinstance(device, str) or not device:
            raise ValueError(f"{where}.device: must be a device name")
        at_r, at_s = ev.get("at_request"), ev.get("at_s")
        if (at_r is None) == (at_s is None):
            raise ValueError(f"{where}: give exactly one of at_request, at_s")
        _check_number(ev, "at_request", where, integer=True, least=0)
        _check_number(ev, "at_s", where, integer=False, least=0)
        _check_number(ev, "for_requests", where, integer=True, least=1)
        _check_number(ev, "until_request", where, integer=True, least=1)
        _check_number(ev, "for_s", where, integer=False, least=0, strict=True)
        for_s = ev.get("for_s")
        if action == "restart" and at_r is None:
            raise ValueError(
                f"{where}: restart takes at_request (it reconnects the BS to the new "
                "agent, which happens between requests)"
            )
        if action in ("kill", "restart") and any(
            k in ev for k in ("for_s", "for_requests", "until_request", "rate")
        ):
            raise ValueError(
                f"{where}: {action} takes no duration or rate (a kill lasts until a restart)"
            )
        if action == "stop" and ("for_requests" in ev or "rate" in ev):
            raise ValueError(f"{where}: stop takes for_s or until_request")
        if action == "link" and "until_request" in ev:
            raise ValueError(f"{where}: link takes for_s or for_requests")
        rate = 8.0
        if "rate" in ev:
            try:
                rate = parse_rate_kbit(ev["rate"])
            except Exception as e:  # noqa: BLE001 - re-raised with the key
                raise ValueError(f"{where}.rate: {e}") from None
        out.append(
            Fault(
                id=f"f{i}-{action}-{device}",
                action=action,
                device=device,
                at_request=at_r,
                at_s=None if at_s is None else float(at_s),
                for_s=None if for_s is None else float(for_s),
                for_requests=ev.get("for_requests"),
                until_request=ev.get("until_request"),
                rate_kbit=rate,
            )
        )
    return out


def check_devices(faults: Sequence[Fault], devices: Sequence[str], where: str) -> list[str]:
    """Problems (one line each) for faults naming devices the trial does not use. Pure."""
    return [
        f"{where}: faults.events: {f.id}: no device {f.device!r} in this trial "
        f"(devices: {', '.join(devices)})"
        for f in faults
        if f.device not in devices
    ]


@dataclass
class Effects:
    """What the injector does to the testbed; each returns a short detail string and raises on
    failure (recorded, never fatal)."""

    signal: Callable[[str, str], str]  # (device, "KILL" | "STOP" | "CONT")
    set_rate: Callable[[str, float | None], str]  # (device, kbit or None = the trial's rate)
    restart: Callable[[str], str]  # (device)


class FaultInjector:
    """Fires one trial's faults and records them.

    Parameters
    ----------
    faults
        The schedule (from :func:`parse_faults`).
    effects
        Callbacks doing the work.
    record
        Called with each ``faults.csv`` row (without the run/trial key columns).
    """

    def __init__(
        self, faults: Sequence[Fault], effects: Effects, record: Callable[[Mapping[str, Any]], None]
    ) -> None:
        self.faults = list(faults)
        self.fx = effects
        self.record = record
        self._lock = threading.Lock()
        self._active: dict[str, Fault] = {}
        self._timers: list[threading.Timer] = []
        self._ends_at_request: dict[str, int] = {}
        self.t0 = time.monotonic()
        self.request = -1

    # -- schedule ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the trial's clock and the timers of ``at_s`` faults."""
        self.t0 = time.monotonic()
        for f in self.faults:
            if f.at_s is not None:
                self._timer(f.at_s, self._inject, f)

    def _timer(self, delay_s: float, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Timer(max(0.0, delay_s), fn, args)
        t.daemon = True
        self._timers.append(t)
        t.start()

    def before_request(self, index: int) -> None:
        """Clear what ends here, then fire the ``at_request`` faults of request ``index``."""
        self.request = index
        for fid, end in list(self._ends_at_request.items()):
            if index >= end:
                del self._ends_at_request[fid]
                f = self._active.get(fid)
                if f is not None:
                    self._clear(f)
        for f in self.faults:
            if f.at_request == index:
                self._inject(f)

    def active(self) -> str:
        """Ids of the faults active now, space-separated ('' when none)."""
        with self._lock:
            return " ".join(sorted(self._active))

    # -- effects ----------------------------------------------------------------------------
    def _row(self, f: Fault, event: str, ok: bool, detail: str) -> None:
        self.record(
            {
                "time_s": round(time.monotonic() - self.t0, 4),
                "request": self.request,
                "fault": f.id,
                "device": f.device,
                "action": f.action,
                "event": event,
                "ok": int(ok),
                "detail": detail[:300],
            }
        )

    def _do(self, f: Fault, event: str, fn: Callable[[], str]) -> bool:
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 - a fault that cannot be applied is recorded
            self._row(f, event, False, f"{type(e).__name__}: {e}")
            return False
        self._row(f, event, True, detail)
        return True

    def _inject(self, f: Fault) -> None:
        if f.action == "kill":
            if self._do(f, "injected", lambda: self.fx.signal(f.device, "KILL")):
                with self._lock:
                    self._active[f.id] = f
        elif f.action == "restart":
            if self._do(f, "injected", lambda: self.fx.restart(f.device)):
                with self._lock:
                    for fid in [
                        k
                        for k, v in self._active.items()
                        if v.device == f.device and v.action == "kill"
                    ]:
                        self._row(self._active.pop(fid), "cleared", True, "restarted")
        elif f.action == "stop":
            if self._do(f, "injected", lambda: self.fx.signal(f.device, "STOP")):
                with self._lock:
                    self._active[f.id] = f
                if f.until_request is not None:
                    self._ends_at_request[f.id] = f.until_request
                else:
                    self._timer(f.for_s or 1.0, self._clear, f)
        else:  # link
            if self._do(f, "injected", lambda: self.fx.set_rate(f.device, f.rate_kbit)):
                with self._lock:
                    self._active[f.id] = f
                if f.for_requests is not None:
                    self._ends_at_request[f.id] = max(self.request, 0) + f.for_requests
                elif f.for_s is not None:
                    self._timer(f.for_s, self._clear, f)

    def _clear(self, f: Fault) -> None:
        with self._lock:
            if self._active.pop(f.id, None) is None:
                return
        if f.action == "stop":
            self._do(f, "cleared", lambda: self.fx.signal(f.device, "CONT"))
        elif f.action == "link":
            self._do(f, "cleared", lambda: self.fx.set_rate(f.device, None))
        elif f.action == "kill":
            self._do(f, "cleared", lambda: self.fx.restart(f.device))

    def finish(self) -> list[str]:
        """End of the trial: cancel timers, clear every active fault (resume, restore, restart
        what was killed). Returns the devices restarted."""
        for t in self._timers:
            t.cancel()
        for t in self._timers:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=30)
        self._timers.clear()
        restarted = []
        for f in list(self._active.values()):
            if f.action == "kill":
                restarted.append(f.device)
            self._clear(f)
        self._ends_at_request.clear()
        return restarted


class TrialFaults:
    """One trial's ``[faults]``: its injector, started at the trial's first request
    (:meth:`before_request`), the ids a request carries (:meth:`mark`), and the end
    (:meth:`finish`: every fault still active is cleared).

    Parameters
    ----------
    events:
        The trial's ``faults.events`` (none: nothing is done).
    devices, where:
        The trial's device names, and the recipe's path for errors.
    effects:
        What the faults do to the testbed.
    record:
        Called with each ``faults.csv`` row (without the run/trial key columns).
    """

    def __init__(
        self,
        events: Sequence[Mapping[str, Any]],
        devices: Sequence[str],
        where: str,
        effects: Effects,
        record: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self.events, self.devices, self.where = events, list(devices), where
        self.effects, self.record = effects, record
        self.injector: FaultInjector | None = None

    def before_request(self, index: int) -> set[str]:
        """Start the injector at the first request; fire what is due; the ids active as the
        request starts.

        Raises
        ------
        ConfigError
            When a fault names a device the trial does not have.
        """
        if not self.events:
            return set()
        if self.injector is None:
            faults = parse_faults(self.events)
            bad = check_devices(faults, self.devices, self.where)
            if bad:
                raise ConfigError(bad)
            self.injector = FaultInjector(faults, self.effects, self.record)
            self.injector.start()
        self.injector.before_request(index)
        return set(self.injector.active().split())

    def mark(self, at_start: set[str], row: dict[str, Any], calls: list[dict]) -> None:
        """A request (and its calls) carries every fault active at its start or its end."""
        if self.injector is None:
            return
        ids = " ".join(sorted(at_start | set(self.injector.active().split())))
        row["faults"] = ids
        for c in calls:
            c["faults"] = ids

    def finish(self) -> None:
        """Clear every fault still active (once; later calls do nothing)."""
        inj, self.injector = self.injector, None
        if inj is not None:
            inj.finish()
