"""Energy attribution at the BS: pure arithmetic on the counters the agents report.

Per expert call. An agent stamps every ``forward`` reply with its meter's cumulative joules at
the start and at the end of the compute window (``energy_j = [e0, e1]``, see
:class:`device_agent.server.AgentServer`). One reply can carry several experts;
:func:`split_call_energy` shares ``e1 - e0`` among them in proportion to each expert's own
compute time (``uid_ms``), equally where those are all zero or missing.

Per request. :func:`request_energy` takes each device's cumulative counter read just before
the request starts and just after it ends (the runner's ``ping`` exchange: the reply carries
the meter's :meth:`~device_agent.energy.Meter.read`), so each device's window encloses the
request, including idle time, network handling and the exchange itself. It adds the BS's own
meter delta over the request. A device missing at either end is left out of the sum and named
in ``energy_source`` (never a silent zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def call_energy_j(stamps: Any) -> float | None:
    """Joules of one forward reply from its ``energy_j = [e0, e1]`` (``None`` when absent or
    malformed; a negative difference, which a well-behaved agent never sends, is ``None``)."""
    if not isinstance(stamps, (list, tuple)) or len(stamps) != 2:
        return None
    e0, e1 = _finite(stamps[0]), _finite(stamps[1])
    if e0 is None or e1 is None or e1 < e0:
        return None
    return e1 - e0


def split_call_energy(
    energy_j: float, uids: Sequence[str], uid_ms: Mapping[str, Any]
) -> dict[str, float]:
    """Share one reply's joules among its experts by their compute time.

    Parameters
    ----------
    energy_j
        The reply's ``e1 - e0``.
    uids
        The experts the reply answered.
    uid_ms
        uid -> compute ms as the agent reported it (missing or non-numeric counts as 0).

    Returns
    -------
    uid -> joules; the values add up to ``energy_j``.
    """
    if not uids:
        return {}
    ms = {u: max(0.0, _finite(uid_ms.get(u)) or 0.0) for u in uids}
    total = math.fsum(ms.values())
    if total <= 0:
        return {u: energy_j / len(uids) for u in uids}
    return {u: energy_j * m / total for u, m in ms.items()}


def source_class(sources: Sequence[str]) -> str:
    """``measured`` / ``estimated`` when every label (``measured:...``, ``estimated:...``) says
    so, ``mixed`` otherwise; ``unavailable`` for none."""
    kinds = {s.split(":", 1)[0] for s in sources}
    if not kinds:
        return "unavailable"
    if kinds == {"measured"}:
        return "measured"
    if kinds == {"estimated"}:
        return "estimated"
    return "mixed"


def request_energy(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    device_sources: Mapping[str, str],
    bs_before: float | None,
    bs_after: float | None,
    bs_source: str | None,
) -> dict[str, Any]:
    """The energy columns of one request.

    Parameters
    ----------
    before, after
        device -> its cumulative joules read just before / just after the request (``None``
        or missing: not read).
    device_sources
        device -> its meter's label (``measured:nvml:gpu0``, ``estimated:cpu-time(5 W/core)``).
    bs_before, bs_after, bs_source
        The BS meter's cumulative joules at the request's ends and its label.

    Returns
    -------
    ``energy_devices_j`` (sum of the devices' deltas), ``energy_bs_j``, ``energy_j`` (their sum)
    and ``energy_source``: the class of every meter that counted (:func:`source_class`), with
    ``; missing dev2, ...`` when a device could not be read at one of the ends. A part that
    could not be computed at all is ``None``, and so is ``energy_j`` then.
    """
    devices = sorted(set(before) | set(after) | set(device_sources))
    dev_sum = 0.0
    counted: list[str] = []
    used_sources: list[str] = []
    missing: list[str] = []
    for d in devices:
        a, b = _finite(before.get(d)), _finite(after.get(d))
        if a is None or b is None or b < a:
            missing.append(d)
            continue
        dev_sum += b - a
        counted.append(d)
        used_sources.append(device_sources.get(d) or "unknown")
    e_dev = dev_sum if counted else None
    b0, b1 = _finite(bs_before), _finite(bs_after)
    e_bs = b1 - b0 if b0 is not None and b1 is not None and b1 >= b0 else None
    if e_bs is not None:
        used_sources.append(bs_source or "unknown")
    total = e_dev + e_bs if e_dev is not None and e_bs is not None else None
    src = source_class(used_sources)
    if e_dev is None:
        src += "; no device counter" if devices else "; no devices"
    elif missing:
        src += "; missing " + ", ".join(missing)
    if e_bs is None:
        src += "; no BS meter"
    return {"energy_devices_j": e_dev, "energy_bs_j": e_bs, "energy_j": total, "energy_source": src}
