"""CoEL's deployment: where each expert goes and at which bit-width.

Intra-device when the whole model, compressed to ``intra_min_bits``, fits one device; otherwise
:func:`place_inter` (greedy starts improved by :class:`~recipes.coel.search.LocalSearch`) under
every device's memory budget, the bits allocated per device, and replicas of hot experts in
the memory left (:func:`add_replicas`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from recipes.coel.compression import allocate_bits
from recipes.coel.costmodel import (
    MB,
    DeviceModel,
    critical_path_ms,
    layer_of,
    memory_used,
)
from recipes.coel.search import LocalSearch, Problem
from testbed.errors import ConfigError
from testbed.policy import ClusterView, DeviceInfo


def device_models(
    devices: Sequence[DeviceInfo],
    cluster: ClusterView | None,
    rate_kbit: float,
    a_ms: float,
    b_ms: float,
) -> list[DeviceModel]:
    """The devices as the cost model sees them: the cluster's link rates and compute profile,
    ``rate_kbit`` / ``a_ms`` / ``b_ms`` where it says nothing (or without a cluster)."""
    out = []
    for d in devices:
        down = up = rate_kbit
        a, b = a_ms, b_ms
        if cluster is not None:
            down = float(cluster.rate_down_kbit.get(d.name) or down)
            up = float(cluster.rate_up_kbit.get(d.name) or up)
            a, b = cluster.compute_profile.get(d.name, (a, b))
        out.append(DeviceModel(d.name, float(d.memory_budget_mb) * MB, down, up, a, b))
    return out


def deploy(
    uids: Sequence[str],
    devs: Sequence[DeviceModel],
    popularity: Mapping[str, float],
    score: Mapping[str, float],
    size_at: Any,
    *,
    bits: Sequence[int],
    intra_min_bits: int,
    tokens: float,
    bytes_per_row: int,
    coact: Mapping[tuple[str, str], float],
    coact_weight: float,
    replicate: bool,
    max_replicas: int,
    start: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, tuple[str, ...]], dict[tuple[str, str], int]]:
    """``(mode, placement, bits per (uid, device))``: ``"intra"`` on the device with the
    shortest critical path when every expert at ``intra_min_bits`` fits one device, else
    ``"inter"`` (:func:`place_inter` at the lowest bit-width from ``start``, the bits per
    device, replicas when every expert got the highest). ``size_at(uid, bits)`` gives bytes."""
    lo, hi = min(bits), max(bits)
    intra = sum(size_at(u, max(lo, intra_min_bits)) for u in uids)
    fits = [d for d in devs if d.budget_bytes >= intra]
    if fits:
        best = min(
            fits,
            key=lambda d: (
                critical_path_ms(
                    {u: (d.name,) for u in uids}, popularity, [d], tokens, bytes_per_row
                ),
                d.name,
            ),
        )
        got = allocate_bits(uids, score, size_at, best.budget_bytes, bits) or {}
        return (
            "intra",
            {u: (best.name,) for u in uids},
            {(u, best.name): b for u, b in got.items()},
        )
    assign = place_inter(
        uids,
        {u: size_at(u, lo) for u in uids},
        popularity,
        devs,
        tokens=tokens,
        bytes_per_row=bytes_per_row,
        coact=coact,
        coact_weight=coact_weight,
        start=start,
    )
    placement: dict[str, tuple[str, ...]] = {u: (d,) for u, d in assign.items()}
    bits_of: dict[tuple[str, str], int] = {}
    used: dict[str, float] = {}
    for d in devs:
        mine = sorted(u for u, x in assign.items() if x == d.name)
        got = allocate_bits(mine, score, size_at, d.budget_bytes, bits)
        assert got is not None  # place_inter kept every device within budget at `lo`
        for u, b in got.items():
            bits_of[(u, d.name)] = b
        used[d.name] = sum(size_at(u, b) for u, b in got.items())
    if replicate and all(b == hi for b in bits_of.values()):
        full = {u: size_at(u, hi) for u in uids}
        placement = add_replicas(
            placement,
            full,
            used,
            popularity,
            devs,
            tokens=tokens,
            bytes_per_row=bytes_per_row,
            max_replicas=max_replicas,
        )
        for u, ds in placement.items():
            for d in ds:
                bits_of.setdefault((u, d), hi)
    return "inter", placement, bits_of


def allocate_placement(
    placement: Mapping[str, Sequence[str]],
    devs: Sequence[DeviceModel],
    score: Mapping[str, float],
    size_at: Any,
    bits: Sequence[int],
) -> dict[tuple[str, str], int]:
    """Bit-widths per (uid, device) for ``placement`` (:func:`allocate_bits` per device; a
    replica counts as one more expert of its device); ``ConfigError`` naming a device whose
    experts exceed its budget even at the lowest bit-width."""
    out: dict[tuple[str, str], int] = {}
    for d in devs:
        mine = sorted(u for u, ds in placement.items() if d.name in ds)
        got = allocate_bits(mine, score, size_at, d.budget_bytes, bits)
        if got is None:
            raise ConfigError(
                f"placement: {d.name}: its experts exceed the memory budget "
                f"({d.budget_bytes:.0f} bytes) even at {min(bits)} bits"
            )
        out.update({(u, d.name): b for u, b in got.items()})
    return out


def _neighbours(coact: Mapping[tuple[str, str], float]) -> dict[str, list[tuple[str, float]]]:
    """uid -> ``(other uid, co-activation)`` for every co-activation pair (both directions)."""
    nbr: dict[str, list[tuple[str, float]]] = {}
    for (a, b), c in coact.items():
        if a != b:
            nbr.setdefault(a, []).append((b, c))
            nbr.setdefault(b, []).append((a, c))
    return nbr


def _objective(
    assign: Mapping[str, str],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    tokens: float,
    bytes_per_row: int,
    coact: Mapping[tuple[str, str], float],
    coact_weight: float,
) -> float:
    cost = critical_path_ms(
        {u: (d,) for u, d in assign.items()}, popularity, devices, tokens, bytes_per_row
    )
    if coact_weight:
        cost -= coact_weight * sum(
            c for (a, b), c in coact.items() if a in assign and assign.get(a) == assign.get(b)
        )
    return cost


def _greedy(order: Sequence[str], p: Problem) -> tuple[dict[str, str], str | None]:
    """Experts in ``order``, each to the feasible device whose layer time after the assignment
    (minus ``coact_weight`` x co-activation with the experts already there) is smallest; ties:
    more free memory, then name. ``(assignment, None)``, or ``(partial, error)`` naming the
    first expert that fits no device."""
    size, popularity, nbr, coact_weight = p.size, p.popularity, p.nbr, p.coact_weight
    free = {d.name: float(d.budget_bytes) for d in p.devices}
    rows: dict[tuple[int, str], float] = {}
    assign: dict[str, str] = {}
    for u in order:
        layer, r = layer_of(u), p.tokens * popularity.get(u, 0.0)
        best: tuple[Any, ...] | None = None
        for d in p.devices:
            if free[d.name] + 1e-9 < size[u]:
                continue
            t = d.layer_ms(rows.get((layer, d.name), 0.0) + r, p.bytes_per_row)
            aff = (
                sum(c for v, c in nbr.get(u, ()) if assign.get(v) == d.name)
                if coact_weight
                else 0.0
            )
            key = (round(t - coact_weight * aff, 9), -free[d.name], d.name)
            if best is None or key < best:
                best = key
        if best is None:
            return assign, (
                f"placement: expert {u} ({size[u]:.0f} bytes) fits no device's "
                f"memory budget (free: {', '.join(f'{k}={v:.0f}' for k, v in free.items())})"
            )
        dn = best[-1]
        assign[u] = dn
        free[dn] -= size[u]
        rows[(layer, dn)] = rows.get((layer, dn), 0.0) + r
    return assign, None


def place_inter(
    uids: Sequence[str],
    size: Mapping[str, float],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    *,
    tokens: float = 8.0,
    bytes_per_row: int = 256,
    coact: Mapping[tuple[str, str], float] | None = None,
    coact_weight: float = 0.0,
    start: Mapping[str, str] | None = None,
    max_rounds: int = 20,
) -> dict[str, str]:
    """Inter-device placement (one device per expert) minimising the expected critical path
    under every device's ``budget_bytes`` (``size``: uid -> bytes). Pure and deterministic.

    Several starting assignments: greedy in three orders (decreasing popularity, decreasing
    size, decreasing popularity per byte), each expert to the feasible device whose layer time
    after the assignment minus ``coact_weight`` x its co-activation with the experts already
    there is smallest (ties: more free memory, then name); ``start`` (e.g. the current
    placement) and round-robin, when feasible. From each, local search
    (:class:`~recipes.coel.search.LocalSearch`): single moves to another device and pairwise
    swaps of two experts on different devices (any layers: under tight memory budgets an expert
    only fits where another one leaves) that lower the objective (critical path -
    ``coact_weight`` x co-located co-activation), up to ``max_rounds`` passes. The best result
    wins (ties: the earlier start, popularity-greedy first) — so it is never worse than a
    feasible round-robin. Cost per pass:
    O(n x devices + n^2) incremental evaluations of O(devices) each (n experts).

    Raises
    ------
    ConfigError
        When some expert fits no device (and neither ``start`` nor round-robin is feasible).
    """
    coact = dict(coact or {})
    nbr = _neighbours(coact) if coact_weight else {}
    problem = Problem(size, popularity, devices, tokens, bytes_per_row, nbr, coact_weight)
    starts = _starting_assignments(uids, problem, start)
    best: tuple[float, dict[str, str]] | None = None
    seen: list[dict[str, str]] = []
    for a in starts:
        if a in seen:
            continue
        seen.append(a)
        search = LocalSearch(a, problem)
        search.run(max_rounds)
        v = _objective(
            search.assign, popularity, devices, tokens, bytes_per_row, coact, coact_weight
        )
        if best is None or v < best[0] - 1e-9:
            best = (v, search.assign)
    assert best is not None
    return best[1]


def _starting_assignments(
    uids: Sequence[str], p: Problem, start: Mapping[str, str] | None
) -> list[dict[str, str]]:
    """:func:`place_inter`'s starts: the feasible greedy assignments (by popularity, by size,
    by popularity per byte), then ``start`` and round-robin when feasible; ``ConfigError``
    when there is none."""
    size, popularity, devices = p.size, p.popularity, p.devices
    by_name = {d.name: d for d in devices}

    def pop(u: str) -> float:
        return popularity.get(u, 0.0)

    orders = (
        sorted(uids, key=lambda u: (-pop(u), -size[u], u)),
        sorted(uids, key=lambda u: (-size[u], -pop(u), u)),
        sorted(uids, key=lambda u: (-pop(u) / max(size[u], 1e-12), -size[u], u)),
    )
    starts: list[dict[str, str]] = []
    error: str | None = None
    for order in orders:
        a, err = _greedy(order, p)
        if err is None:
            starts.append(a)
        elif error is None:
            error = err

    def feasible(a: Mapping[str, str]) -> bool:
        used = memory_used({u: (d,) for u, d in a.items()}, size)
        return all(used.get(n, 0.0) <= by_name[n].budget_bytes + 1e-9 for n in by_name)

    for cand in (start, round_robin(uids, [d.name for d in devices])):
        if (
            cand is not None
            and set(cand) == set(uids)
            and all(d in by_name for d in cand.values())
            and feasible(cand)
        ):
            starts.append({u: cand[u] for u in uids})
    if not starts:
        raise ConfigError(error or "placement: no device")
    return starts


def brute_force_place(
    uids: Sequence[str],
    size: Mapping[str, float],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    *,
    tokens: float = 8.0,
    bytes_per_row: int = 256,
) -> tuple[float, dict[str, str]] | None:
    """The exact optimum of :func:`place_inter`'s problem (no co-activation term) by
    enumeration (``len(devices) ** len(uids)`` assignments): ``(cost, assignment)`` or None
    when nothing fits. For tests on small instances."""
    best: tuple[float, dict[str, str]] | None = None
    names = [d.name for d in devices]
    budget = {d.name: d.budget_bytes for d in devices}
    for combo in itertools.product(names, repeat=len(uids)):
        a = dict(zip(uids, combo))
        used = memory_used({u: (d,) for u, d in a.items()}, size)
        if any(used[n] > budget[n] + 1e-9 for n in used):
            continue
        c = critical_path_ms(
            {u: (d,) for u, d in a.items()}, popularity, devices, tokens, bytes_per_row
        )
        if best is None or c < best[0] - 1e-12:
            best = (c, a)
    return best


def add_replicas(
    placement: Mapping[str, Sequence[str]],
    size_full: Mapping[str, float],
    used: Mapping[str, float],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    *,
    tokens: float = 8.0,
    bytes_per_row: int = 256,
    max_replicas: int = 2,
) -> dict[str, tuple[str, ...]]:
    """Replicas of hot experts, at full precision (``size_full``), in memory left over
    (``used``: bytes per device already taken), while a replica lowers the expected critical
    path; at most ``max_replicas`` copies per expert. Pure."""
    out = {u: tuple(ds) for u, ds in placement.items()}
    left = {d.name: d.budget_bytes - used.get(d.name, 0.0) for d in devices}
    cur = critical_path_ms(out, popularity, devices, tokens, bytes_per_row)
    for u in sorted(out, key=lambda x: (-popularity.get(x, 0.0), x)):
        while len(out[u]) < max_replicas:
            best: tuple[float, str] | None = None
            for d in devices:
                if d.name in out[u] or left[d.name] + 1e-9 < size_full[u]:
                    continue
                trial = {**out, u: out[u] + (d.name,)}
                c = critical_path_ms(trial, popularity, devices, tokens, bytes_per_row)
                if c < cur - 1e-9 and (best is None or c < best[0]):
                    best = (c, d.name)
            if best is None:
                break
            cur = best[0]
            out[u] = out[u] + (best[1],)
            left[best[1]] -= size_full[u]
    return out


def round_robin(uids: Sequence[str], devices: Sequence[str]) -> dict[str, str]:
    """Expert k (in layer, expert order) on device k mod D (the baseline placement)."""
    ordered = sorted(uids, key=lambda u: (layer_of(u), int(u.split(".E", 1)[1])))
    return {u: devices[k % len(devices)] for k, u in enumerate(ordered)}


def _uniq(xs: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for x in xs:
        if x not in seen:
            seen.append(x)
    return seen


def verify_budgets(
    placement: Mapping[str, Sequence[str]],
    bits_of: Mapping[tuple[str, str], int],
    size_at: Any,
    budgets: Mapping[str, float],
) -> dict[str, float]:
    """device -> bytes used; raises ``ConfigError`` naming a device over its budget. Pure."""
    used: dict[str, float] = {}
    for u, ds in placement.items():
        for d in _uniq(ds):
            used[d] = used.get(d, 0.0) + size_at(u, bits_of[(u, d)])
    for d, v in used.items():
        if v > budgets[d] + 1e-6:
            raise ConfigError(f"placement: {d} holds {v:.0f} bytes > budget {budgets[d]:.0f}")
    return used
