"""One operation on every device of an inventory at once; a device that fails becomes a report
row and never stops the others."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import CommandFailed, HostUnreachable, TestbedError
from ..inventory import Device, Inventory, ssh_runner_for
from ..runner import Runner


@dataclass
class DeviceReport:
    """What provisioning did on one device."""

    device: str
    ok: bool
    changed: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    error_type: str | None = None
    exit_code: int = 0
    pid: int | None = None
    endpoint: str | None = None
    shards: int = 0
    #: seconds per step (check, install, shards, agent)
    steps: dict[str, float] = field(default_factory=dict)
    #: Jetson power state (:func:`testbed.lab.jetson.query_power`): nvpmodel mode and modes,
    #: jetson_clocks; tools the device lacks are ``{"available": false}``
    power: dict[str, Any] = field(default_factory=dict)
    #: what the agent's venv computes with (:func:`.facts.preflight_summary`): python, L4T and
    #: JetPack, torch (version, CUDA build, CUDA available, device), numpy, the interop check
    preflight: dict[str, Any] = field(default_factory=dict)
    #: what the device was provisioned in spite of (a Jetson on its CPU under ``--allow-cpu``)
    warnings: list[str] = field(default_factory=list)
    #: the device check's platform: system, machine (``aarch64`` on a Jetson), python, libc
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the JSON report (every field)."""
        return asdict(self)


def failed_report(device: str, exc: BaseException, t0: float) -> DeviceReport:
    """The report row of a device whose work raised ``exc`` (a one-line error, its exit code)."""
    if isinstance(exc, HostUnreachable):
        msg = exc.reason
    elif isinstance(exc, CommandFailed):
        tail = (exc.stderr.strip() or exc.stdout.strip()).splitlines()[-1:] or [""]
        msg = (
            f"`{shlex.join(exc.argv[:3])} ...` exited {exc.returncode}: {tail[0]}"
            if exc.returncode is not None
            else str(exc)
        )
    else:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = exc.exit_code if isinstance(exc, TestbedError) else 1
    return DeviceReport(
        device,
        ok=False,
        error=msg,
        seconds=round(time.monotonic() - t0, 3),
        error_type=type(exc).__name__,
        exit_code=code,
    )


def each_device(
    inv: Inventory,
    work: Callable[[Runner, Device], DeviceReport | Any],
    connect_timeout_s: float,
    devices: Sequence[str] | None = None,
) -> list[Any]:
    """Run ``work(runner, device)`` on every device in parallel; exceptions become failed
    :class:`DeviceReport` rows (one device never stops the others)."""
    targets = [d for d in inv.devices if devices is None or d.name in devices]

    def one(d: Device) -> Any:
        t0 = time.monotonic()
        try:
            with ssh_runner_for(inv, d, connect_timeout_s=connect_timeout_s) as r:
                return work(r, d)
        except Exception as exc:  # noqa: BLE001 - recorded per device
            return failed_report(d.name, exc, t0)

    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(one, targets))
