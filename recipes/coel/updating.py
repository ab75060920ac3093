"""CoEL's updating: when to re-deploy (a link moved, popularity drifted, periodically) and which
moves of the new deployment pay for their transfer (:func:`plan_migration`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recipes.coel.costmodel import DeviceModel, critical_path_ms, memory_used
from recipes.coel.perception import rates_moved


def popularity_drift(old: Mapping[str, float], new: Mapping[str, float]) -> float:
    """Total variation distance between two popularity vectors (each normalised). Pure."""
    sa, sb = sum(old.values()) or 1.0, sum(new.values()) or 1.0
    keys = set(old) | set(new)
    return 0.5 * sum(abs(old.get(k, 0.0) / sa - new.get(k, 0.0) / sb) for k in keys)


@dataclass(frozen=True)
class Move:
    """One planned migration: ``uid`` from ``src`` to ``dst`` and why it pays."""

    uid: str
    src: tuple[str, ...]
    dst: tuple[str, ...]
    bytes: int
    transfer_ms: float
    saving_ms: float


def plan_migration(
    current: Mapping[str, Sequence[str]],
    target: Mapping[str, Sequence[str]],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    shard_bytes: Mapping[str, int],
    size: Mapping[str, float] | Any,
    *,
    tokens: float = 8.0,
    bytes_per_row: int = 256,
    horizon_steps: float = 100.0,
) -> tuple[dict[str, tuple[str, ...]], list[Move]]:
    """Which moves of ``target`` pay for themselves. Pure.

    Candidates are the experts whose device set differs; greedily the one with the largest
    net gain is applied while ``saving_ms * horizon_steps > transfer_ms``, where the saving is
    the drop of :func:`critical_path_ms` per forward step and the transfer is the shard's bytes
    over the slowest new destination's downlink (the controller pushes shards to devices). A
    move must keep every device within budget (``size``: uid or (uid, device) -> bytes).
    Returns the resulting placement and the moves in order.
    """
    by_name = {d.name: d for d in devices}
    cur = {u: tuple(ds) for u, ds in current.items()}
    moves: list[Move] = []
    cands = sorted(u for u in target if tuple(target[u]) != cur.get(u))

    def cost(p: Mapping[str, Sequence[str]]) -> float:
        return critical_path_ms(p, popularity, devices, tokens, bytes_per_row)

    def fits(p: Mapping[str, Sequence[str]]) -> bool:
        used = memory_used(p, size)
        return all(v <= by_name[d].budget_bytes + 1e-6 for d, v in used.items())

    base = cost(cur)
    while cands:
        best: tuple[float, Move] | None = None
        for u in cands:
            trial = {**cur, u: tuple(target[u])}
            if not fits(trial):
                continue
            new_dst = [d for d in target[u] if d not in cur.get(u, ())]
            t_ms = max((shard_bytes[u] * 8.0 / by_name[d].down_kbit for d in new_dst), default=0.0)
            saving = base - cost(trial)
            net = saving * horizon_steps - t_ms
            if net > 0 and (best is None or net > best[0]):
                best = (
                    net,
                    Move(
                        u,
                        cur.get(u, ()),
                        tuple(target[u]),
                        shard_bytes[u] if new_dst else 0,
                        t_ms,
                        saving,
                    ),
                )
        if best is None:
            break
        mv = best[1]
        cur[mv.uid] = mv.dst
        base -= mv.saving_ms
        moves.append(mv)
        cands.remove(mv.uid)
    return cur, moves


def observed_popularity(
    stats: Mapping[str, Any], popularity: Mapping[str, float], layers: int
) -> dict[str, float] | None:
    """Popularity (selections per token) from ``stats["expert_tokens"]`` (uid -> rows since
    the last update) over ``stats["layer_tokens"]`` (else half the rows: top-k 2), for the
    uids of ``popularity``; None when nothing was counted."""
    counts = {u: float(v) for u, v in (stats.get("expert_tokens") or {}).items()}
    if not counts or sum(counts.values()) <= 0:
        return None
    toks = float(stats.get("layer_tokens") or 0) / layers or sum(counts.values()) / layers / 2.0
    return {u: counts.get(u, 0.0) / toks for u in popularity}


def redeploy_triggers(
    deployed_rates: Mapping[str, float],
    rates: Mapping[str, float],
    popularity: Mapping[str, float],
    observed: Mapping[str, float] | None,
    *,
    delta: float,
    drift: float,
    periodic: bool,
) -> tuple[list[str], dict[str, float]]:
    """The reasons to re-deploy (none: stay) and the popularity to deploy with: the first view
    of the links (``deployed_rates`` empty), links moved by more than ``delta``, popularity
    drifted by more than ``drift`` (then the observed one is used), or a periodic call."""
    reasons = []
    if not deployed_rates:
        deployed_rates = rates
        reasons.append("first link view")
    moved = rates_moved(deployed_rates, rates, delta)
    if moved:
        reasons.append("links moved: " + ", ".join(moved))
    new_pop = dict(popularity)
    if observed is not None:
        d = popularity_drift(popularity, observed)
        if d > drift:
            reasons.append(f"popularity drift {d:.2f}")
            new_pop = dict(observed)
    if periodic:
        reasons.append("periodic")
    return reasons, new_pop


def migrate(
    current: Mapping[str, Sequence[str]],
    target: Mapping[str, Sequence[str]],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    shard_bytes: Mapping[str, int],
    size: Mapping[str, float] | Any,
    *,
    tokens: float,
    bytes_per_row: int,
    horizon_steps: float,
) -> tuple[dict[str, tuple[str, ...]], list[Move], dict[str, float]]:
    """:func:`plan_migration`'s placement and moves, and the expected critical path before and
    after them (``predicted_before_ms``, ``predicted_after_ms``)."""
    result, moves = plan_migration(
        current,
        target,
        popularity,
        devices,
        shard_bytes,
        size,
        tokens=tokens,
        bytes_per_row=bytes_per_row,
        horizon_steps=horizon_steps,
    )
    predicted = {
        "predicted_before_ms": critical_path_ms(
            current, popularity, devices, tokens, bytes_per_row
        ),
        "predicted_after_ms": critical_path_ms(result, popularity, devices, tokens, bytes_per_row),
    }
    return result, moves, predicted
