"""Hello (perception) messages: publish the agent's status only when it moved.

Every ``hello_s`` the agent looks at a few numbers of its status (:func:`hello_values`:
memory, compute load, power, loaded experts) and publishes the status only when one of them
moved by more than ``delta`` (relative) since the last published one (:func:`moved`), or when
``keepalive_s`` passed without a message (:class:`HelloGate`). Link quality is not among them:
the links are shaped at the BS, which reads the enforced rates itself. Pure (no I/O; times are
passed in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def hello_values(status: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a status a hello decision looks at (missing ones are left out)."""
    out: dict[str, float] = {}
    mem = status.get("memory") or {}
    load = status.get("load") or {}
    for key, v in (
        ("rss_bytes", mem.get("rss_bytes")),
        ("available_bytes", mem.get("available_bytes")),
        ("cuda_allocated_bytes", mem.get("cuda_allocated_bytes")),
        ("loadavg_1m", load.get("loadavg_1m")),
        ("queue_len", load.get("queue_len")),
        ("power_w", status.get("power_w")),
    ):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    out["experts"] = float(len(status.get("experts") or {}))
    return out


def moved(previous: Mapping[str, float] | None, current: Mapping[str, float], delta: float) -> bool:
    """True when some value moved by more than ``delta`` relative to its previous value
    (``|cur - prev| > delta * |prev|``; from 0, any change), or the set of values changed,
    or there is no previous message."""
    if previous is None or set(previous) != set(current):
        return True
    for k, cur in current.items():
        prev = previous[k]
        if prev == 0.0:
            if cur != 0.0:
                return True
        elif abs(cur - prev) > delta * abs(prev):
            return True
    return False


class HelloGate:
    """Decides, per tick, whether the status goes out.

    Parameters
    ----------
    delta
        Relative change that triggers a message.
    keepalive_s
        A message goes out at least this often (0: never for keep-alive alone).
    """

    def __init__(self, delta: float = 0.1, keepalive_s: float = 10.0) -> None:
        if delta < 0 or keepalive_s < 0:
            raise ValueError("hello: delta and keepalive_s must be >= 0")
        self.delta = float(delta)
        self.keepalive_s = float(keepalive_s)
        self.last: dict[str, float] | None = None
        self.last_t: float | None = None
        self.sent = 0
        self.suppressed = 0

    def should_send(self, values: Mapping[str, float], now: float) -> bool:
        """True (and remember ``values`` as the last sent) when the status should go out."""
        due = (
            self.keepalive_s > 0
            and self.last_t is not None
            and now - self.last_t >= self.keepalive_s
        )
        if moved(self.last, values, self.delta) or due:
            self.last, self.last_t = dict(values), now
            self.sent += 1
            return True
        self.suppressed += 1
        return False
