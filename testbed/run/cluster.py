"""The :class:`~testbed.policy.ClusterState` a trial's policy decides on, and every change made
to it during the trial: the one place that writes it (rates as tc enforced them, placement,
the decision epoch, the step being decided and the devices' status view)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..net.channel import ChannelModel
from ..policy.api import ClusterState
from .recipe import Trial


def trial_cluster(
    t: Trial,
    seed: int,
    placement: Mapping[str, Sequence[str]],
    rates: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    profiles: Mapping[str, tuple[float, float]],
    bytes_per_token: int,
) -> ClusterState:
    """The :class:`ClusterState` a trial's policy decides on: placement, the enforced ``rates``
    (rows with ``device``, ``down_kbit``, ``up_kbit``), the devices' compute profiles, bytes per
    token, the decision epoch's scope, and under ``links.bandwidth_mhz`` the channel of the
    trial's devices ``names`` seeded by ``seed`` (the recipe's seed + the repeat)."""
    st = ClusterState(placement=dict(placement), names=tuple(names))
    record_rate_rows(st, rates)
    # a device that holds no expert (a policy may leave one empty) has no profile of its own
    # unless an earlier trial made one; policies fall back to their defaults for it
    st.compute_profile = {n: profiles[n] for n in names if n in profiles}
    st.bytes_per_token = bytes_per_token
    st.epoch_scope = str(t.config["policy"]["epoch"])
    mhz = t.config["links"].get("bandwidth_mhz")
    if mhz:  # the channel of this trial point and repeat, shared by every policy
        st.channel = ChannelModel(names, seed, **(t.config["links"].get("channel") or {}))
        st.bandwidth_hz = mhz * 1e6
    return st


def record_rate_rows(cluster: ClusterState, rows: Iterable[Mapping[str, Any]]) -> None:
    """The rates tc reports (rows with ``device``, ``down_kbit``, ``up_kbit``; a direction
    without a rate is left as it was)."""
    for r in rows:
        if r.get("down_kbit"):
            cluster.rate_down_kbit[r["device"]] = r["down_kbit"]
        if r.get("up_kbit"):
            cluster.rate_up_kbit[r["device"]] = r["up_kbit"]


def record_enforced(cluster: ClusterState, enforced: Mapping[str, tuple[float, float]]) -> None:
    """The rates an epoch's change enforced: device -> (down, up) kbit/s."""
    for d, (down, up) in enforced.items():
        cluster.rate_down_kbit[d], cluster.rate_up_kbit[d] = down, up


def record_placement(cluster: ClusterState, placement: Mapping[str, Sequence[str]]) -> None:
    """A new placement (after an update's re-deployment)."""
    cluster.placement = dict(placement)


def record_epoch(cluster: ClusterState, epoch: int, links_fixed: bool) -> None:
    """The decision epoch in force; ``links_fixed`` when the decision does not start it."""
    cluster.epoch, cluster.links_fixed = epoch, links_fixed


def record_devices(cluster: ClusterState, devices: dict[str, dict[str, Any]]) -> None:
    """The devices' latest status view (the agents' status feed)."""
    cluster.devices = devices


def record_step(cluster: ClusterState, step: int, request: int | None = None) -> None:
    """The generation step being decided (and the request it belongs to, when given)."""
    cluster.step = step
    if request is not None:
        cluster.request = request
