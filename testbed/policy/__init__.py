"""The policy plug-in API: :mod:`.api` (what a recipe's policy implements and what it is handed),
:mod:`.placement` (the default expert placements), :mod:`.loading` (how policies are found and
loaded); :mod:`.bandwidth` (the bandwidth helpers every bandwidth policy needs) and
:mod:`.latency_model` (the layer cost model). ``testbed.policy`` is the import path policies use.
"""

from .api import (
    NO_PROFILE,
    ClusterState,
    ClusterView,
    Decision,
    DeviceInfo,
    ExpertInfo,
    Placement,
    PlacementProfile,
    Policy,
    RequestContext,
    RequestDecision,
    RequestPolicy,
    RequestProfile,
)
from .loading import ENTRY_POINT_GROUP, available_policies, load_policy, load_policy_class
from .placement import PLACEMENTS, random_placement, round_robin_placement

__all__ = [
    "ENTRY_POINT_GROUP",
    "NO_PROFILE",
    "PLACEMENTS",
    "ClusterState",
    "ClusterView",
    "Decision",
    "DeviceInfo",
    "ExpertInfo",
    "Placement",
    "PlacementProfile",
    "Policy",
    "RequestContext",
    "RequestDecision",
    "RequestPolicy",
    "RequestProfile",
    "available_policies",
    "load_policy",
    "load_policy_class",
    "random_placement",
    "round_robin_placement",
]
