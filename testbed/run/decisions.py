"""How a run (and the analytic twin) asks its policy: the placement of every expert, checked,
and the BS runtime's selection hook that asks for each layer's selection and enforces the
rates the policy asks for."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import PolicyFailed, one_line
from ..lab.modelstore import resolve_split
from ..policy.api import (
    ClusterState,
    ClusterView,
    DeviceInfo,
    ExpertInfo,
    PlacementProfile,
    Policy,
)
from ..policy.loading import load_policy
from . import cluster as C
from .recipe import Recipe, Trial


def check_model_and_policies(rec: Recipe, trials: Sequence[Trial]) -> Path:
    """What a run (or the twin) checks before touching anything: the recipe's model resolves
    to a split folder (returned) and every trial's policy loads with its parameters."""
    split = resolve_split(rec.model_spec(), where=f"{rec.path}: model.path")
    for t in trials:
        load_policy(
            rec.policy_spec(t.policy),
            t.config["policy"]["params"],
            f"{rec.path}: policy.params",
        )
    return split


def place_experts(
    policy: Policy,
    manifest: Any,
    devices: Sequence[DeviceInfo],
    profile: PlacementProfile,
) -> dict[str, tuple[str, ...]]:
    """Ask ``policy`` to place every expert of ``manifest`` (a :class:`models.manifest.Manifest`)
    on ``devices``, knowing ``profile``; checked: every expert on at least one of them.

    Raises
    ------
    PolicyFailed
        When ``place`` raises or leaves an expert unplaced or on an unknown device.
    """
    from models.uids import parse_uid

    experts = []
    for u in manifest.uids():
        layer, e = parse_uid(u)
        experts.append(ExpertInfo(u, layer, e, int(manifest.experts[u].bytes)))
    try:
        placement = policy.place(experts, devices, profile)
    except Exception as e:
        raise PolicyFailed(f"policy {policy.name}: place raised {one_line(e)}") from e
    names = {d.name for d in devices}
    for u in manifest.uids():
        ds = placement.get(u)
        if not ds or any(d not in names for d in ds):
            raise PolicyFailed(
                f"policy {policy.name}: place: expert {u} placed on "
                f"{list(ds) if ds else 'no device'} (devices: {', '.join(sorted(names))})"
            )
    return {u: tuple(ds) for u, ds in placement.items()}


def policy_hook(
    policy: Policy,
    cluster: ClusterState,
    links: Any,
    timed: Any,
    request_index: Callable[[], int],
    devices_view: Callable[[], dict[str, dict[str, Any]]],
) -> Callable[[Any], Any]:
    """The BS runtime's selection hook for ``policy``: per MoE layer and step, start the link
    epoch (``links``: an :class:`~testbed.run.epochs.EpochLinks`), ask the policy, check its
    selection, and enforce the rates it asks for at an epoch's start (down and up each its
    own: ``Decision.rate_down_kbit``/``rate_up_kbit``, else ``bandwidth_kbit`` both ways).
    Notes in ``timed.pending`` (the timing backend's, e.g.
    :class:`~testbed.run.prediction.TimedBackend`, which merges it into the layer's record):
    the policy's own ``policy_predicted_ms`` and ``policy_stats`` (:func:`decision_notes`),
    ``decision_ms`` (the policy's ``select`` and the
    selection's check), ``change_ms`` (the epoch's rate changes: the trace's or channel's at
    its start, then the policy's; 0 mid-epoch) and ``epoch_start`` and ``links_changed`` (the
    devices whose rates were changed). ``request_index()`` and ``devices_view()`` give the
    request being run and the devices' status view."""

    view = ClusterView(cluster)

    def hook(ctx: Any) -> Any:
        C.record_devices(cluster, devices_view())
        C.record_step(cluster, ctx.step, request_index())
        t0 = time.perf_counter()
        n0 = getattr(links, "changes", 0)
        start = links.begin(request_index(), ctx.step, ctx.layer)
        t1 = time.perf_counter()
        d, sel = ask_select(policy, ctx, view)
        t2 = time.perf_counter()
        timed.pending.update(decision_notes(policy, d))
        bw = getattr(d, "bandwidth_kbit", None)
        down, up = getattr(d, "rate_down_kbit", None), getattr(d, "rate_up_kbit", None)
        if (bw or down or up) and start:  # mid-epoch decisions keep the links
            links.apply_policy(bw or {}, down, up)
        t3 = time.perf_counter()
        timed.pending.update(
            decision_ms=(t2 - t1) * 1e3,
            change_ms=((t1 - t0) + (t3 - t2)) * 1e3 if start else 0.0,
            epoch_start=bool(start),
            links_changed=tuple(getattr(links, "last_changed", ()))
            if getattr(links, "changes", 0) > n0
            else (),
        )
        return sel

    return hook


def decision_notes(policy: Policy, d: Any) -> dict[str, Any]:
    """What a :class:`~testbed.policy.Decision` adds to its layer's record: the policy's
    ``predicted_ms`` (as ``policy_predicted_ms``) and its ``stats`` (as ``policy_stats``, the
    ``policy.<key>`` columns of ``layers.csv``).

    Raises
    ------
    PolicyFailed
        When a stats key is not a non-empty string of letters, digits, ``_`` and ``.``, or a
        value is not a number (numpy and torch scalars are taken), a string, a bool or None.
    """
    out: dict[str, Any] = {}
    predicted = getattr(d, "predicted_ms", None)
    if predicted is not None:
        out["policy_predicted_ms"] = float(predicted)
    stats = getattr(d, "stats", None)
    if stats:
        out["policy_stats"] = clean = {}
        for k, v in stats.items():
            if not (isinstance(k, str) and k and k.replace("_", "a").replace(".", "a").isalnum()):
                raise PolicyFailed(f"policy {policy.name}: Decision.stats: bad key {k!r}")
            if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
                v = v.item()  # a numpy or torch scalar (e.g. mask.sum())
            if v is not None and not isinstance(v, (int, float, str)):
                raise PolicyFailed(
                    f"policy {policy.name}: Decision.stats[{k!r}]: {type(v).__name__} is not "
                    "a number or a string"
                )
            clean[k] = v
    return out


def ask_select(policy: Policy, ctx: Any, view: ClusterView) -> tuple[Any, Any]:
    """``policy.select(ctx, view)`` and its selection, checked (ids in range, shapes);
    (the :class:`~testbed.policy.Decision`, the checked selection).

    Raises
    ------
    PolicyFailed
        When ``select`` raises or returns a bad selection.
    """
    from models.errors import ModelError
    from models.routing import validate_selection

    name = policy.name or type(policy).__name__
    try:
        d = policy.select(ctx, view)
        sel = d.selection
    except Exception as e:
        raise PolicyFailed(f"policy {name}: select raised {one_line(e)}") from e
    try:
        sel = validate_selection(sel, ctx.num_tokens, ctx.num_experts)
    except (ModelError, AttributeError) as e:
        raise PolicyFailed(
            f"policy {name}: select returned a bad selection at layer {ctx.layer}: {e}"
        ) from e
    return d, sel
