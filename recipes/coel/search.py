"""Local search over one-device-per-expert assignments (:func:`recipes.coel.deployment.place_inter`
improves each of its starting assignments with it)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from recipes.coel.costmodel import DeviceModel, layer_of


@dataclass(frozen=True)
class Problem:
    """One inter-device placement problem as the greedy starts and the local search see it:
    expert sizes (bytes) and popularity, the devices, token-rows per step, bytes per row, and
    the co-activation bonus (each expert's neighbours and its weight ``coact_weight``)."""

    size: Mapping[str, float]
    popularity: Mapping[str, float]
    devices: Sequence[DeviceModel]
    tokens: float
    bytes_per_row: int
    nbr: Mapping[str, Sequence[tuple[str, float]]]
    coact_weight: float


class LocalSearch:
    """Local search over one-device-per-expert assignments with incremental evaluation.

    Keeps every (layer, device) cell's experts, expected rows and layer time, every layer's
    maximum (and a device attaining it), every device's memory and every expert's
    co-activation with the experts of each device, so that a move or a swap is scored in
    O(1) (O(devices) when it touches a layer's slowest device) instead of recomputing the
    whole critical path."""

    def __init__(self, assign: Mapping[str, str], problem: Problem) -> None:
        size, popularity, devices = problem.size, problem.popularity, problem.devices
        tokens, bytes_per_row, nbr = problem.tokens, problem.bytes_per_row, problem.nbr
        self.assign = dict(assign)
        self.size = size
        self.dev = {d.name: d for d in devices}
        self.names = [d.name for d in devices]
        self.budget = {d.name: float(d.budget_bytes) for d in devices}
        self.bpr = bytes_per_row
        self.rows = {u: tokens * popularity.get(u, 0.0) for u in self.assign}
        self.layer = {u: layer_of(u) for u in self.assign}
        self.used = dict.fromkeys(self.names, 0.0)
        self.cell: dict[tuple[int, str], set[str]] = {}
        for u, d in self.assign.items():
            self.used[d] += size[u]
            self.cell.setdefault((self.layer[u], d), set()).add(u)
        self.crow: dict[tuple[int, str], float] = {}
        self.cpos: dict[tuple[int, str], int] = {}
        self.time: dict[tuple[int, str], float] = {}
        for k in list(self.cell):
            self._refresh(k)
        self.layer_max: dict[int, tuple[float, str]] = {}
        for ly in {k[0] for k in self.cell}:
            self._refresh_layer(ly)
        # co-activation: uid -> [(other, c)], device -> sum of c over its experts, pair -> c
        self.w = problem.coact_weight
        self.nbr = {u: [(v, c) for v, c in nbr.get(u, ()) if v in self.assign] for u in self.assign}
        self.aff: dict[str, dict[str, float]] = {u: {} for u in self.assign}
        self.pair: dict[tuple[str, str], float] = {}
        for u, vs in self.nbr.items():
            for v, c in vs:
                dv = self.assign[v]
                self.aff[u][dv] = self.aff[u].get(dv, 0.0) + c
                if u < v:
                    self.pair[(u, v)] = self.pair.get((u, v), 0.0) + c

    def _refresh(self, k: tuple[int, str]) -> None:
        """Recompute cell ``k``'s rows and time from its experts (no drift from updates)."""
        members = self.cell.get(k, ())
        self.crow[k] = sum(self.rows[v] for v in members)
        self.cpos[k] = sum(self.rows[v] > 0 for v in members)
        self.time[k] = self.dev[k[1]].layer_ms(self.crow[k], self.bpr)

    def _refresh_layer(self, ly: int) -> None:
        self.layer_max[ly] = max((self.time.get((ly, n), 0.0), n) for n in self.names)

    def _time_delta(self, moves: Sequence[tuple[str, str, str]]) -> float:
        """Critical-path change of ``moves`` (uid, from, to)."""
        drow: dict[tuple[int, str], tuple[float, int]] = {}
        for u, s, d in moves:
            ly, r = self.layer[u], self.rows[u]
            p = int(r > 0)
            r0, p0 = drow.get((ly, s), (0.0, 0))
            drow[(ly, s)] = (r0 - r, p0 - p)
            r0, p0 = drow.get((ly, d), (0.0, 0))
            drow[(ly, d)] = (r0 + r, p0 + p)
        new_t: dict[tuple[int, str], float] = {}
        for k, (dr, dp) in drow.items():
            # exactly 0 rows when no expert with rows is left (an unused device), as in
            # critical_path_ms; otherwise positive whatever the rounding of the update
            rows = (
                max(self.crow.get(k, 0.0) + dr, sys.float_info.min)
                if self.cpos.get(k, 0) + dp > 0
                else 0.0
            )
            new_t[k] = self.dev[k[1]].layer_ms(rows, self.bpr)
        out = 0.0
        for ly in {k[0] for k in new_t}:
            old, arg = self.layer_max.get(ly, (0.0, ""))
            if (ly, arg) in new_t:  # the slowest device changes: look at all of them
                new = max(new_t.get((ly, n), self.time.get((ly, n), 0.0)) for n in self.names)
            else:  # it stays: only a changed device can overtake it
                new = max([old] + [t for k, t in new_t.items() if k[0] == ly])
            out += new - old
        return out

    def move_delta(self, u: str, d: str) -> float:
        """Objective change if ``u`` moved to device ``d``."""
        s = self.assign[u]
        out = self._time_delta([(u, s, d)])
        if self.w:
            a = self.aff[u]
            out -= self.w * (a.get(d, 0.0) - a.get(s, 0.0))
        return out

    def swap_gain(self, a: str, b: str) -> float:
        """Weighted co-activation gained if ``a`` and ``b`` exchanged devices."""
        if not self.w:
            return 0.0
        da, db = self.assign[a], self.assign[b]
        fa, fb = self.aff[a], self.aff[b]
        gain = fa.get(db, 0.0) - fa.get(da, 0.0) + fb.get(da, 0.0) - fb.get(db, 0.0)
        # a's gain counted b on db and b's counted a on da; after the swap they are apart
        gain -= 2.0 * self.pair.get((a, b) if a < b else (b, a), 0.0)
        return self.w * gain

    def swap_delta(self, a: str, b: str) -> float:
        """Objective change if ``a`` and ``b`` (on different devices) exchanged devices."""
        da, db = self.assign[a], self.assign[b]
        return self._time_delta([(a, da, db), (b, db, da)]) - self.swap_gain(a, b)

    def on_slowest(self, u: str) -> bool:
        """Whether ``u``'s device is the one attaining its layer's time (only moving such an
        expert away can shorten the critical path)."""
        return self.layer_max[self.layer[u]][1] == self.assign[u]

    def apply(self, moves: Mapping[str, str]) -> None:
        """Move every uid of ``moves`` to its device."""
        touched = set()
        for u, d in moves.items():
            ly, src = self.layer[u], self.assign[u]
            self.cell[(ly, src)].discard(u)
            self.cell.setdefault((ly, d), set()).add(u)
            self.used[src] -= self.size[u]
            self.used[d] += self.size[u]
            self.assign[u] = d
            for v, c in self.nbr[u]:
                self.aff[v][src] -= c
                self.aff[v][d] = self.aff[v].get(d, 0.0) + c
            touched |= {(ly, src), (ly, d)}
        for k in touched:
            self._refresh(k)
        for ly in {k[0] for k in touched}:
            self._refresh_layer(ly)

    def fits(self, dev: str, add: float) -> bool:
        """Whether device ``dev`` stays within its budget with ``add`` more bytes."""
        return self.used[dev] + add <= self.budget[dev] + 1e-9

    def run(self, max_rounds: int) -> None:
        """Per pass: for every expert the best improving move to another device, then every
        improving swap of two experts on different devices; until a pass changes nothing."""
        uids = sorted(self.assign)
        for _ in range(max_rounds):
            improved = False
            for u in uids:
                src, best = self.assign[u], (-1e-9, "")
                for d in self.names:
                    if d != src and self.fits(d, self.size[u]):
                        v = self.move_delta(u, d)
                        if v < best[0]:
                            best = (v, d)
                if best[1]:
                    self.apply({u: best[1]})
                    improved = True
            for i, a in enumerate(uids):
                for b in uids[i + 1 :]:
                    da, db = self.assign[a], self.assign[b]
                    if da == db:
                        continue
                    sa, sb = self.size[a], self.size[b]
                    if not (self.fits(da, sb - sa) and self.fits(db, sa - sb)):
                        continue
                    if (
                        not self.on_slowest(a)
                        and not self.on_slowest(b)
                        and self.swap_gain(a, b) <= 1e-9
                    ):
                        continue  # no layer gets faster and no co-activation is gained
                    if self.swap_delta(a, b) < -1e-9:
                        self.apply({a: db, b: da})
                        improved = True
            if not improved:
                break
