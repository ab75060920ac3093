"""Runner hooks between requests: link events and policy updates (re-deployment, migrations).

Generic (any policy): the runner calls :func:`between_requests` before each request of a
trial. It

1. applies the recipe's link events due at this request (``[[run.events]]``: ``at_request``,
   ``device``, ``rate``, ``direction``) with an in-place ``tc class change`` and refreshes the
   cluster's enforced rates;
2. every ``run.update_every`` requests (not before the first), calls ``policy.update(cluster,
   stats)`` with the window's statistics (``requests``, ``expert_tokens`` uid -> rows sent,
   ``layer_tokens`` valid tokens summed over the layer rows, ``request``); a returned placement
   is checked like ``place()``'s, applied through the runner's ``_apply_placement`` (shards
   pushed by sha256, experts loaded/unloaded, the policy's ``load_options()`` honoured) and
   every migration — an expert gaining a device — is written to ``migrations.csv``: expert,
   from, to, bytes pushed, and the seconds the whole re-deployment took.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, PolicyFailed, one_line
from ..net.links import LinkSpec
from ..units import parse_rate_kbit


def due_events(events: Sequence[Mapping[str, Any]], request: int) -> list[Mapping[str, Any]]:
    """The events that fire just before ``request`` (``at_request == request``). Pure."""
    return [e for e in events if int(e["at_request"]) == request]


def apply_events(
    runner: Any,
    trial: Any,
    request: int,
    cluster: Any,
    rates: dict[str, dict[str, Any]],
    where: str,
) -> list[dict[str, Any]]:
    """Apply the events due at ``request``; returns what tc enforced after each one."""
    out: list[dict[str, Any]] = []
    events = trial.config["run"].get("events") or []
    names = {d.name for d in runner.inv.devices}
    delay, loss = trial.link_delay_loss()
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
        t0 = time.perf_counter()
        runner.shaper.change(dev, LinkSpec(kbit, delay, loss), direction)
        change_ms = (time.perf_counter() - t0) * 1e3
        state = {s.device: s.to_dict() for s in runner.shaper.show()}
        for r in state.values():
            rates[r["device"]] = r
            if r.get("down_kbit"):
                cluster.rate_down_kbit[r["device"]] = r["down_kbit"]
            if r.get("up_kbit"):
                cluster.rate_up_kbit[r["device"]] = r["up_kbit"]
        out.append(
            {
                "request": request,
                "device": dev,
                "rate_kbit": kbit,
                "direction": direction,
                "change_ms": change_ms,
                "enforced": state.get(dev),
                "time_s": time.monotonic() - runner.t0,
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
    runner: Any,
    policy: Any,
    cluster: Any,
    placement: Mapping[str, Sequence[str]],
    stats: Mapping[str, Any],
    key: Mapping[str, Any],
    request: int,
) -> dict[str, tuple[str, ...]] | None:
    """Call ``policy.update``; apply and record a new placement. Returns it (or None)."""
    try:
        new = policy.update(cluster, stats)
    except Exception as e:
        raise PolicyFailed(f"policy {policy.name}: update raised {one_line(e)}") from e
    if not new:
        return None
    names = set(cluster.rate_down_kbit) | {d for ds in placement.values() for d in ds}
    for u in runner.mf.uids():
        ds = new.get(u)
        if not ds or any(d not in names for d in ds):
            raise PolicyFailed(
                f"policy {policy.name}: update: expert {u} placed on "
                f"{list(ds) if ds else 'no device'}"
            )
    new = {u: tuple(ds) for u, ds in new.items()}
    pushed_before = {d: set(v) for d, v in runner.pushed.items()}
    t0 = time.perf_counter()
    runner._apply_placement(new, policy.load_options())
    seconds = time.perf_counter() - t0
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
                "bytes": 0 if was_there else int(runner.mf.experts[u].bytes),
                "seconds": seconds,
                "time_s": time.monotonic() - runner.t0,
            }
        )
    runner.tables["migrations"].write_many(rows)
    cluster.placement = dict(new)
    return new


def memory_report(runner: Any, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
    """device -> experts loaded, their weight bytes (the agent's own count) and quantizations,
    from one ``status`` request each."""
    out: dict[str, dict[str, Any]] = {}
    for d in devices:
        try:
            st = runner.backend.status(d, timeout_s=5.0)
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


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
