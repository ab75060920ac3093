"""Which device holds which expert shard (pure planning)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ...errors import ConfigError
from ..inventory import Device


def place_experts(
    manifest: Any, devices: Sequence[Device], placement: str = "round-robin", seed: int = 0
) -> dict[str, tuple[str, ...]]:
    """uid -> device names, with one of :data:`testbed.policy.PLACEMENTS`."""
    from models.uids import parse_uid

    from ...policy.api import DeviceInfo, ExpertInfo
    from ...policy.placement import PLACEMENTS

    if placement not in PLACEMENTS:
        raise ConfigError(
            f"--placement: unknown placement {placement!r} (one of: {', '.join(PLACEMENTS)})"
        )
    experts = []
    for u in manifest.uids():
        layer, e = parse_uid(u)
        experts.append(ExpertInfo(u, layer, e, int(manifest.experts[u].bytes)))
    infos = [DeviceInfo(d.name, d.memory_budget_mb, d.hw_class) for d in devices]
    return {u: tuple(ds) for u, ds in PLACEMENTS[placement](experts, infos, seed).items()}


def shards_per_device(
    placement: Mapping[str, Sequence[str]], devices: Iterable[str]
) -> dict[str, list[str]]:
    """Invert a placement: device -> sorted uids it holds (every device listed). Pure."""
    out: dict[str, list[str]] = {d: [] for d in devices}
    for uid, ds in placement.items():
        for d in ds:
            if d not in out:
                raise ConfigError(f"placement: expert {uid} placed on unknown device {d!r}")
            out[d].append(uid)
    for uids in out.values():
        uids.sort()
    return out
