"""The policy plug-in API (:mod:`.api`: what a recipe's policy implements, how policies are
found and loaded, expert placements) and :mod:`.latency_model` (the layer cost model and the
bandwidth helpers every bandwidth policy needs). ``testbed.policy`` is the import path policies use.
"""

from .api import (
    ENTRY_POINT_GROUP,
    PLACEMENTS,
    ClusterState,
    Decision,
    DeviceInfo,
    ExpertInfo,
    Placement,
    Policy,
    available_policies,
    load_policy,
    load_policy_class,
    random_placement,
    round_robin_placement,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLACEMENTS",
    "ClusterState",
    "Decision",
    "DeviceInfo",
    "ExpertInfo",
    "Placement",
    "Policy",
    "available_policies",
    "load_policy",
    "load_policy_class",
    "random_placement",
    "round_robin_placement",
]
