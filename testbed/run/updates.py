"""Runner hooks between requests: link events and policy updates (re-deployment, migrations).

Generic (any policy): before each request of a trial the run (:mod:`testbed.run.trial`)

1. applies the recipe's link events due at this request (``[[run.events]]``: ``at_request``,
   ``device``, ``rate``, ``direction``) with an in-place ``tc class change`` and refreshes the
   cluster's enforced rates;
2. every ``run.update_every`` requests (not before the first), calls ``policy.update(cluster,
   stats)`` with the window's statistics (``requests``, ``expert_tokens`` uid -> rows sent,
   ``layer_tokens`` valid tokens summed over the layer rows, ``request``); a returned placement
   is checked like ``place()``'s, applied through the placement-applying callable it is given
   (:meth:`testbed.run.loading.ExpertLoader.apply`: shards pushed by sha256, experts
   loaded/unloaded, the policy's ``load_options()`` honoured) and
   every migration — an expert gaining a device — is written to ``migrations.csv``: expert,
   from, to, bytes pushed, and the seconds the whole re-deployment took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, PolicyFailed, one_line
from ..net.tc import LinkSpec
from ..policy.api import ClusterView
from ..units import parse_rate_kbit
from . import cluster as C


def due_events(events: Sequence[Mapping[str, Any]], request: int) -> list[Mapping[str, Any]]:
    """The events that fire just before ``request`` (``at_request == request``). Pure."""
    return [e for e in events if int(e["at_request"]) == request]


def apply_events(
    shaper: Any,
    trial: Any,
    request: int,
    cluster: Any,
    rates: dict[str, dict[str, Any]],
    where: str,
    devices: Sequence[str],
    t0: float,
) -> list[dict[str, Any]]:
    """Apply ``trial``'s link events due at ``request`` through ``shaper`` (the inventory's
    ``devices``; ``where``: the recipe for errors); ``rates`` (device -> tc's row) and
    ``cluster`` follow what tc enforced after each one, which is returned (``time_s`` from
    ``t0`` on ``time.monotonic()``)."""
    out: list[dict[str, Any]] = []
    events = trial.config["run"].get("events") or []
    names = list(devices)
    for i, ev in enumerate(events):
        if int(ev["at_request"]) != request:
            continue
        dev = str(ev["device"])
        if dev not in names:
            raise ConfigError(
                f"{where}: run.events[{i}].device: no device {dev!r} "
                f"(devices: {', '.join(sorted(names))})"
            )
        kbit = parse_rate_kbit(str(ev["rate"]))
        direction = str(ev.get("direction", "both"))
        own = trial.link_for(dev, names.index(dev))  # the device's own delay and loss stay
        t_change = time.perf_counter()
        shaper.change(dev, LinkSpec(kbit, own.delay_ms, own.loss_pct), direction)
        change_ms = (time.perf_counter() - t_change) * 1e3
        state = {s.device: s.to_dict() for s in shaper.show()}
        rates.update(state)
        C.record_rate_rows(cluster, state.values())
        out.append(
            {
                "request": request,
                "device": dev,
                "rate_kbit": kbit,
                "direction": direction,
                "change_ms": change_ms,
                "enforced": state.get(dev),
                "time_s": time.monotonic() - t0,
            }
        )
    return out


def window_stats(
    call_rows: Sequence[Mapping[str, Any]],
    layer_rows: Sequence[Mapping[str, Any]],
    requests: int,
    request: int,
) -> dict[str, Any]:
    """What ``policy.update`` gets about the requests since its last call. Pure."""
    tokens: dict[str, int] = {}
    for c in call_rows:
        if c.get("status") in ("ok", "rerouted") and c.get("tokens"):
            tokens[str(c["expert"])] = tokens.get(str(c["expert"]), 0) + int(c["tokens"])
    return {
        "requests": requests,
        "request": request,
        "expert_tokens": tokens,
        "layer_tokens": sum(int(r.get("tokens") or 0) for r in layer_rows),
    }


def migrations(
    old: Mapping[str, Sequence[str]], new: Mapping[str, Sequence[str]]
) -> list[tuple[str, str, str]]:
    """(expert, from, to) for every device an expert gains; ``from`` is its old primary
    (several old devices joined by ``+``). Pure."""
    out = []
    for u in sorted(new):
        src = list(old.get(u, ()))
        for d in new[u]:
            if d not in src:
                out.append((u, "+".join(src), d))
    return out


def run_update(
    policy: Any,
    cluster: Any,
    placement: Mapping[str, Sequence[str]],
    stats: Mapping[str, Any],
    key: Mapping[str, Any],
    request: int,
    *,
    model: Any,
    apply_placement: Callable[[Mapping[str, Sequence[str]], Any], None],
    pushed: Mapping[str, Any],
    table: Any,
    t0: float,
) -> dict[str, tuple[str, ...]] | None:
    """Call ``policy.update``; apply and record a new placement. Returns it (or None).

    ``model`` is the :class:`models.manifest.Manifest` (every expert must be placed; its shard
    bytes); ``apply_placement(placement, load_options)`` brings the agents to it; ``pushed``
    (device -> the shards there, before) tells a migration that moved bytes from one that did
    not; each migration is a row of ``table`` (``migrations.csv``; ``time_s`` from ``t0`` on
    ``time.monotonic()``).
    """
    try:
        new = policy.update(ClusterView(cluster), stats)
    except Exception as e:
        raise PolicyFailed(f"policy {policy.name}: update raised {one_line(e)}") from e
    if not new:
        return None
    names = set(cluster.rate_down_kbit) | {d for ds in placement.values() for d in ds}
    for u in model.uids():
        ds = new.get(u)
        if not ds or any(d not in names for d in ds):
            raise PolicyFailed(
                f"policy {policy.name}: update: expert {u} placed on "
                f"{list(ds) if ds else 'no device'}"
            )
    new = {u: tuple(ds) for u, ds in new.items()}
    pushed_before = {d: set(v) for d, v in pushed.items()}
    t_apply = time.perf_counter()
    apply_placement(new, policy.load_options())
    seconds = time.perf_counter() - t_apply
    rows = []
    for u, src, dst in migrations(placement, new):
        was_there = u in pushed_before.get(dst, set())
        rows.append(
            {
                **key,
                "request": request,
                "expert": u,
                "from_device": src,
                "to_device": dst,
                "bytes": 0 if was_there else int(model.experts[u].bytes),
                "seconds": seconds,
                "time_s": time.monotonic() - t0,
            }
        )
    table.write_many(rows)
    C.record_placement(cluster, new)
    return new


def memory_report(backend: Any, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
    """device -> experts loaded, their weight bytes (the agent's own count) and quantizations,
    from one ``status`` request each to ``backend``."""
    out: dict[str, dict[str, Any]] = {}
    for d in devices:
        try:
            st = backend.status(d, timeout_s=5.0)
        except Exception as e:  # noqa: BLE001 — recorded, not fatal
            out[d] = {"error": _short(e)}
            continue
        ex = st.get("experts") or {}
        kinds: dict[str, int] = {}
        for e in ex.values():
            k = str(e.get("quant") or "float")
            kinds[k] = kinds.get(k, 0) + 1
        out[d] = {
            "experts": len(ex),
            "weight_bytes": sum(int(e.get("weight_bytes") or 0) for e in ex.values()),
            "quant": kinds,
        }
    return out


class UpdateWindow:
    """The requests since the last ``policy.update`` (every ``every`` requests; 0: never):
    their call and layer rows, from which :func:`window_stats` is made."""

    def __init__(self, every: int):
        self.every = every
        self.requests = 0
        self.calls: list[dict] = []
        self.layers: list[dict] = []

    def due(self, request: int) -> bool:
        """Whether ``policy.update`` is called before ``request`` (not before the first)."""
        return bool(self.every and request and request % self.every == 0)

    def take_stats(self, request: int) -> dict[str, Any]:
        """The window's :func:`window_stats` before ``request``; the window starts again."""
        lo = request - self.requests  # the requests since the last update
        stats = window_stats(
            [c for c in self.calls if c["request"] >= lo],
            [r for r in self.layers if r["request"] >= lo],
            self.requests,
            request,
        )
        self.calls.clear()
        self.layers.clear()
        self.requests = 0
        return stats

    def add(self, layer_rows: Sequence[dict], call_rows: Sequence[dict]) -> None:
        """A request's rows (kept only when updates are due at all)."""
        if self.every:
            self.layers.extend(layer_rows)
            self.calls.extend(call_rows)
            self.requests += 1


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
