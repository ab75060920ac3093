"""CoEL's cost model: a device's expected layer time, the critical path of a placement, memory.

Pure functions of a placement (uid -> devices), the experts' popularity and the devices'
:class:`DeviceModel`; :mod:`recipes.coel.deployment` minimises :func:`critical_path_ms`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MB = 1 << 20


@dataclass(frozen=True)
class DeviceModel:
    """A device as the deployment cost model sees it.

    ``a_ms + b_ms * rows`` compute per layer call, ``rows * bytes_per_row * 8 / rate`` transfer
    each way (kbit/s = bit/ms), ``budget_bytes`` of expert weights."""

    name: str
    budget_bytes: float
    down_kbit: float = 20000.0
    up_kbit: float = 20000.0
    a_ms: float = 0.5
    b_ms: float = 0.02

    def layer_ms(self, rows: float, bytes_per_row: int) -> float:
        """Expected time of one layer call carrying ``rows`` token-rows (0 when unused)."""
        if rows <= 0:
            return 0.0
        bits = rows * bytes_per_row * 8.0
        return self.a_ms + self.b_ms * rows + bits / self.down_kbit + bits / self.up_kbit


def layer_of(uid: str) -> int:
    """The layer of an expert uid (``"L3.E5"`` -> 3)."""
    return int(uid.split(".", 1)[0][1:])


def device_rows(
    placement: Mapping[str, Sequence[str]], popularity: Mapping[str, float], tokens: float
) -> dict[tuple[int, str], float]:
    """(layer, device) -> expected rows per forward step (a replica takes an equal share)."""
    rows: dict[tuple[int, str], float] = {}
    for uid, ds in placement.items():
        if not ds:
            continue
        share = tokens * popularity.get(uid, 0.0) / len(ds)
        for d in ds:
            key = (layer_of(uid), d)
            rows[key] = rows.get(key, 0.0) + share
    return rows


def critical_path_ms(
    placement: Mapping[str, Sequence[str]],
    popularity: Mapping[str, float],
    devices: Sequence[DeviceModel],
    tokens: float = 8.0,
    bytes_per_row: int = 256,
) -> float:
    """Expected critical path of one forward step: sum over MoE layers of the max over devices
    of that device's layer time (:meth:`DeviceModel.layer_ms`). Pure."""
    by_name = {d.name: d for d in devices}
    per_layer: dict[int, float] = {}
    for (layer, d), r in device_rows(placement, popularity, tokens).items():
        t = by_name[d].layer_ms(r, bytes_per_row)
        per_layer[layer] = max(per_layer.get(layer, 0.0), t)
    return sum(per_layer.values())


def memory_used(
    placement: Mapping[str, Sequence[str]],
    size: Mapping[str, float] | Any,
) -> dict[str, float]:
    """device -> bytes held; ``size`` maps uid -> bytes or ``(uid, device)`` -> bytes."""
    out: dict[str, float] = {}
    for uid, ds in placement.items():
        for d in ds:
            b = size[(uid, d)] if (uid, d) in size else size[uid]
            out[d] = out.get(d, 0.0) + b
    return out
