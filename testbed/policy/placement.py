"""Default expert placements (pure): where :meth:`~testbed.policy.api.Policy.place` puts the
experts unless a policy overrides it (``Policy(placement=...)`` picks one of :data:`PLACEMENTS`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .api import DeviceInfo, ExpertInfo, Placement


def round_robin_placement(
    experts: Sequence[ExpertInfo], devices: Sequence[DeviceInfo], seed: int = 0
) -> Placement:
    """Expert ``k`` (in uid order) on device ``k mod D``: every layer spreads over all
    devices."""
    if not devices:
        raise ConfigError("placement: no devices to place experts on")
    ordered = sorted(experts, key=lambda e: (e.layer, e.expert))
    return {e.uid: (devices[k % len(devices)].name,) for k, e in enumerate(ordered)}


def random_placement(
    experts: Sequence[ExpertInfo], devices: Sequence[DeviceInfo], seed: int = 0
) -> Placement:
    """Each expert on a uniformly random device (seeded, so repeatable)."""
    if not devices:
        raise ConfigError("placement: no devices to place experts on")
    rng = random.Random(seed)
    ordered = sorted(experts, key=lambda e: (e.layer, e.expert))
    return {e.uid: (rng.choice(list(devices)).name,) for e in ordered}


PLACEMENTS = {"round-robin": round_robin_placement, "random": random_placement}
