"""CoEL's perception on the BS side: the enforced link rates and whether one moved by more than
``delta`` (the agents' side, publishing their status only on such a move, is
:mod:`device_agent.hello`)."""

from __future__ import annotations

from collections.abc import Mapping

from testbed.policy import ClusterView


def link_rates(cluster: ClusterView) -> dict[str, float]:
    """``"<device>:down"`` / ``"<device>:up"`` -> the enforced rate (kbit/s)."""
    return {
        **{f"{d}:down": v for d, v in cluster.rate_down_kbit.items()},
        **{f"{d}:up": v for d, v in cluster.rate_up_kbit.items()},
    }


def rates_moved(old: Mapping[str, float], new: Mapping[str, float], delta: float) -> list[str]:
    """Devices whose rate moved by more than ``delta`` (relative) — or appeared/vanished. Pure."""
    out = []
    for d in sorted(set(old) | set(new)):
        a, b = old.get(d), new.get(d)
        if a is None or b is None or abs(b - a) > delta * max(abs(a), 1e-12):
            out.append(d)
    return out
