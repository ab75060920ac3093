"""``testbed links verify``: goodput per device and direction, counted by the receiver.

The probe (:mod:`testbed.netprobe`, standard library only) is pushed to the device's
workdir over SSH and run with the device's own Python; the BS end runs through the BS
runner. Devices are measured one at a time so a cell-wide limit does not skew the figures.
"""

from __future__ import annotations

import json
import random
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import TestbedError
from .inventory import Device, Inventory, bs_runner_for, ssh_runner_for
from .links import TcShaper
from .runner import Result, Runner

PROBE_SRC = Path(__file__).with_name("netprobe.py")


@dataclass
class Goodput:
    device: str
    direction: str
    configured_kbit: float | None
    measured_kbit: float
    window_s: float
    bytes: int

    @property
    def ratio(self) -> float | None:
        return self.measured_kbit / self.configured_kbit if self.configured_kbit else None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return d


def shaper_for(inv: Inventory, bs: Runner) -> TcShaper:
    return TcShaper(bs, inv.bs.interface, inv.bs.ifb, [d.host for d in inv.devices],
                    [d.name for d in inv.devices], inv.bs.cell_rate_kbit, inv.bs.sudo)


def _bs_probe(inv: Inventory, bs: Runner) -> tuple[str, str]:
    """(python, probe path) on the BS."""
    if inv.bs.local:
        return sys.executable, str(PROBE_SRC)
    path = "/tmp/moe-edge-testbed-netprobe.py"
    bs.put(PROBE_SRC, path)
    return "python3", path


def measure(inv: Inventory, dev: Device, direction: str, seconds: float,
            bs: Runner, remote: Runner, bs_probe: tuple[str, str], dev_probe: str,
            configured_kbit: float | None) -> Goodput:
    """One transfer of ``seconds`` in ``direction``; goodput as the receiver counted it."""
    port = random.randint(20000, 59999)
    if direction == "down":
        rx_runner, rx = remote, [dev.python, dev_probe, "recv", "--bind", dev.host]
        tx_runner, tx = bs, [*bs_probe, "send", "--to", dev.host]
    else:
        rx_runner, rx = bs, [*bs_probe, "recv", "--bind", inv.bs.host]
        tx_runner, tx = remote, [dev.python, dev_probe, "send", "--to", inv.bs.host]
    out: dict[str, object] = {}

    def receive() -> None:
        try:
            out["rx"] = rx_runner.run([*rx, "--port", str(port)], timeout_s=seconds + 40)
        except TestbedError as exc:
            out["err"] = exc

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    try:
        tx_runner.run([*tx, "--port", str(port), "--seconds", f"{seconds:g}"],
                      timeout_s=seconds + 40)
    finally:
        th.join(seconds + 45)
    if "err" in out:
        raise out["err"]  # type: ignore[misc]
    rx_res = out["rx"]
    assert isinstance(rx_res, Result)
    m = json.loads(rx_res.stdout.strip().splitlines()[-1])
    return Goodput(dev.name, direction, configured_kbit, float(m["goodput_kbit"]),
                   float(m["window_s"]), int(m["window_bytes"]))


def verify(inv: Inventory, seconds: float = 3.0, devices: list[str] | None = None,
           directions: tuple[str, ...] = ("down", "up")) -> list[Goodput]:
    """Measure every (selected) device in each direction, next to tc's configured rate."""
    targets = [inv.device(n) for n in devices] if devices else list(inv.devices)
    out: list[Goodput] = []
    with bs_runner_for(inv) as bs:
        shaper = shaper_for(inv, bs)
        configured = {s.device: s for s in shaper.show()}
        bs_probe = _bs_probe(inv, bs)
        for dev in targets:
            with ssh_runner_for(inv, dev) as remote:
                dev_probe = f"{dev.workdir}/.testbed/netprobe.py"
                remote.put(PROBE_SRC, dev_probe)
                for direction in directions:
                    st = configured.get(dev.name)
                    rate = getattr(st, f"{direction}_kbit") if st else None
                    out.append(measure(inv, dev, direction, seconds, bs, remote, bs_probe,
                                       dev_probe, rate))
    return out
