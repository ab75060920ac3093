"""Segmentation and receive offloads (GSO/TSO/GRO, ...) on the BS, read and set with ``ethtool``.

They hand a qdisc super-packets of up to 64 KiB, so short messages would be charged in coarse
steps: set-up turns them off on the BS interface and the ifb (after recording the interface's in
our record on the ifb) and clear turns the interface's on again; a local testbed turns them off
on both ends of each veth. The names and the parser are :mod:`testbed.net.tc`'s
(:data:`~testbed.net.tc.OFFLOADS`, :func:`~testbed.net.tc.parse_offloads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import CommandFailed
from ..lab.runner import Runner, run_bs
from .tc import (
    Offload,
    ShapingConfig,
    build_offload_command,
    offloads_on,
    offloads_to_disable,
    parse_offloads,
    render_shaping_record,
)


def offload_state(runner: Runner, dev: str, sudo: bool = False) -> dict[str, Offload] | None:
    """``ethtool -k DEV``; None where ethtool is missing or refuses."""
    try:
        res = run_bs(runner, ["ethtool", "-k", dev], sudo, check=False)
    except CommandFailed:  # no ethtool at all
        return None
    return parse_offloads(res.stdout) if res.returncode == 0 else None


def set_offloads(runner: Runner, dev: str, names: Sequence[str], on: bool, sudo: bool) -> bool:
    """``ethtool -K`` the named offloads on or off; False where ethtool is missing."""
    try:
        run_bs(runner, build_offload_command(dev, names, on), sudo, check=False)
    except CommandFailed:
        return False
    return True


def turn_offloads_off(runner: Runner, dev: str, sudo: bool = False) -> dict[str, Any]:
    """Turn off the offloads of :data:`~testbed.net.tc.OFFLOADS` that are on on ``dev`` (e.g.
    both ends of a local testbed's veth). Returns ``{"turned_off": [...], "still_on": [...]}``,
    or ``{"error": ...}`` where ethtool is missing or refuses."""
    before = offload_state(runner, dev, sudo)
    if before is None:
        return {"error": f"ethtool -k {dev} failed (is ethtool installed?)"}
    names = offloads_to_disable(before)
    if names:
        run_bs(runner, build_offload_command(dev, names, False), sudo, check=False)
    after = offload_state(runner, dev, sudo) or {}
    return {
        "turned_off": [n for n in names if n in after and not after[n].on],
        "still_on": offloads_on(after),
    }


def record_and_turn_off(
    runner: Runner, iface: str, ifb: str, cfg: ShapingConfig, sudo: bool = False
) -> ShapingConfig:
    """Record ``cfg`` with the BS interface's offloads to restore (on the ifb, before anything
    changes), then turn off the offloads that make super-packets on the interface and the ifb.
    Where they cannot be changed the tree still goes in (``shaping_info`` says so). Returns
    the config as recorded."""
    state = offload_state(runner, iface, sudo)
    cfg = ShapingConfig(
        cfg.mode,
        cfg.bucket_bytes,
        cfg.netem,
        tuple(offloads_to_disable(state)) if state else (),
    )
    record = render_shaping_record(cfg, iface)
    run_bs(runner, ["ip", "link", "set", "dev", ifb, "alias", record], sudo)
    for dev in (iface, ifb):
        names = (
            list(cfg.restore)
            if dev == iface
            else offloads_to_disable(offload_state(runner, dev, sudo) or {})
        )
        if names:
            set_offloads(runner, dev, names, False, sudo)
    return cfg


def restore_offloads(
    runner: Runner, iface: str, cfg: ShapingConfig, sudo: bool = False
) -> list[str]:
    """Turn on again the offloads of ``iface`` that ``cfg`` (our record) says set-up turned
    off. Returns those now on."""
    if not cfg.restore or not set_offloads(runner, iface, cfg.restore, True, sudo):
        return []
    state = offload_state(runner, iface, sudo) or {}
    return [n for n in cfg.restore if n in state and state[n].on]
