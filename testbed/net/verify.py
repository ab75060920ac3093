"""``testbed links verify``: goodput per device and direction, counted by the receiver;
with ``--airtime``, what the link charges lone messages.

The probe (:mod:`testbed.net.netprobe`, standard library only) is pushed to the device's
workdir over SSH and run with the device's own Python; the BS end runs through the BS
runner. Devices are measured one at a time so a cell-wide limit does not skew the figures.
The receiving end listens on a fixed port (:func:`probe_port`: the device's ``probe_port`` for
the downlink, ``bs.probe_port`` for the uplink, 5557 by default) at the device's IPv4 address
(:attr:`~testbed.lab.inventory.Device.address`, the name resolved when the inventory loaded).
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, TestbedError
from ..lab.inventory import Device, Inventory, bs_runner_for, ssh_runner_for
from ..lab.runner import Result, Runner
from .shaper import TcShaper

PROBE_SRC = Path(__file__).with_name("netprobe.py")


@dataclass
class Goodput:
    """One device and direction's goodput as the receiver counted it, against its configured
    rate (kbit/s)."""

    device: str
    direction: str
    configured_kbit: float | None
    measured_kbit: float
    window_s: float
    bytes: int

    @property
    def ratio(self) -> float | None:
        """Measured over configured goodput (None where no rate is configured)."""
        return self.measured_kbit / self.configured_kbit if self.configured_kbit else None

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON, with :attr:`ratio` (4 decimals)."""
        d = asdict(self)
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return d


@dataclass
class Airtime:
    """One lone message: delivery time minus the 1-byte round trip, against its airtime
    (``bytes * 8 / rate``)."""

    device: str
    direction: str
    configured_kbit: float | None
    bytes: int
    repeat: int
    rtt_ms: float
    delivery_ms: float
    shaping: str | None = None
    pings_ms: tuple[float, ...] = ()  # every ping-pong before the message (rtt: the fastest)

    @property
    def charged_ms(self) -> float:
        """What the link charged the message: delivery time minus the round trip, in ms."""
        return self.delivery_ms - self.rtt_ms

    @property
    def airtime_ms(self) -> float | None:
        """The message's time at the configured rate, ``bytes * 8 / kbit`` ms (None: no rate)."""
        return self.bytes * 8 / self.configured_kbit if self.configured_kbit else None

    @property
    def ratio(self) -> float | None:
        """Charged time over airtime (1.0: the link charged exactly the configured rate)."""
        a = self.airtime_ms
        return self.charged_ms / a if a else None

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON, with the derived times and :attr:`ratio` (4 decimals)."""
        d = asdict(self)
        d["charged_ms"] = round(self.charged_ms, 4)
        d["airtime_ms"] = None if self.airtime_ms is None else round(self.airtime_ms, 4)
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return d


#: lone message sizes of ``links verify --airtime``: about one frame, 8 KiB, 64 KiB
AIRTIME_SIZES = (1536, 8192, 65536)


def summarize_airtime(rows: list[Airtime]) -> list[dict[str, object]]:
    """Per device, direction and size: the ratios of every repeat, their min/median/max."""
    groups: dict[tuple[str, str, int], list[Airtime]] = {}
    for r in rows:
        groups.setdefault((r.device, r.direction, r.bytes), []).append(r)
    out = []
    for (dev, direction, size), rs in groups.items():
        ratios = sorted(r.ratio for r in rs if r.ratio is not None)
        out.append(
            {
                "device": dev,
                "direction": direction,
                "bytes": size,
                "configured_kbit": rs[0].configured_kbit,
                "shaping": rs[0].shaping,
                "repeats": len(rs),
                "ratios": [round(x, 4) for x in ratios],
                "ratio_min": round(ratios[0], 4) if ratios else None,
                "ratio_median": round(ratios[len(ratios) // 2], 4) if ratios else None,
                "ratio_max": round(ratios[-1], 4) if ratios else None,
                "rtt_ms_median": sorted(r.rtt_ms for r in rs)[len(rs) // 2],
            }
        )
    return out


def shaper_for(inv: Inventory, bs: Runner) -> TcShaper:
    """The :class:`TcShaper` of the inventory's BS (its interfaces, devices, cell rate, mode).

    Raises
    ------
    ConfigError
        Two devices at one address: the tc filters tell devices apart by address, so the
        second one's class would see no traffic while its rate read back as enforced.
    """
    seen: dict[str, str] = {}
    for d in inv.devices:
        if d.address in seen:
            raise ConfigError(
                f"{inv.path}: devices {seen[d.address]!r} and {d.name!r} share the address "
                f"{d.address}: the BS's tc filters tell devices apart by address"
            )
        seen[d.address] = d.name
    return TcShaper(
        bs,
        inv.bs.interface,
        inv.bs.ifb,
        [d.address for d in inv.devices],
        [d.name for d in inv.devices],
        inv.bs.cell_rate_kbit,
        inv.bs.sudo,
        inv.bs.shaping,
    )


def probe_port(inv: Inventory, dev: Device, direction: str) -> int:
    """The port the probe's receiving end listens on: the device's ``probe_port`` for the
    downlink, the BS's for the uplink; a random one in 20000-59999 where that is 0. Pure but
    for the random port."""
    port = dev.probe_port if direction == "down" else inv.bs.probe_port
    return port or _random_port()


def _random_port() -> int:
    return random.randint(20000, 59999)


def put_bs_probe(inv: Inventory, bs: Runner) -> tuple[str, str]:
    """The probe on the BS (copied there unless the BS is this machine): (python, its path)."""
    if inv.bs.local:
        return sys.executable, str(PROBE_SRC)
    path = "/tmp/moe-edge-testbed-netprobe.py"
    bs.put(PROBE_SRC, path)
    return "python3", path


def _server_and_client(
    srv_runner: Runner, srv: list[str], cli_runner: Runner, cli: list[str], timeout_s: float
) -> tuple[Result | None, Result]:
    """Run the probe's server side in a thread and its client side here (the server gets 10 s
    more, and is waited for 15 s more); the server's error, if any, is raised; its result is
    None if it has not finished by then."""
    out: dict[str, object] = {}

    def serve() -> None:
        try:
            out["srv"] = srv_runner.run(srv, timeout_s=timeout_s + 10)
        except TestbedError as exc:
            out["err"] = exc

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        cli_res = cli_runner.run(cli, timeout_s=timeout_s)
    finally:
        th.join(timeout_s + 15)
    if "err" in out:
        raise out["err"]  # type: ignore[misc]
    srv_res = out.get("srv")
    return (srv_res if isinstance(srv_res, Result) else None), cli_res


def measure(
    inv: Inventory,
    dev: Device,
    direction: str,
    seconds: float,
    bs: Runner,
    remote: Runner,
    bs_probe: tuple[str, str],
    dev_probe: str,
    configured_kbit: float | None,
    port: int | None = None,
) -> Goodput:
    """One transfer of ``seconds`` in ``direction``; goodput as the receiver counted it. The
    receiver listens on ``port``: default :func:`probe_port` (the inventory's, one transfer at a
    time), 0 = a random one (transfers measured at the same time, each needs its own)."""
    port = probe_port(inv, dev, direction) if port is None else port or _random_port()
    if direction == "down":
        rx_runner, rx = remote, [dev.python, dev_probe, "recv", "--bind", dev.address]
        tx_runner, tx = bs, [*bs_probe, "send", "--to", dev.address]
    else:
        rx_runner, rx = bs, [*bs_probe, "recv", "--bind", inv.bs.host]
        tx_runner, tx = remote, [dev.python, dev_probe, "send", "--to", inv.bs.host]
    rx_res, _ = _server_and_client(
        rx_runner,
        [*rx, "--port", str(port)],
        tx_runner,
        [*tx, "--port", str(port), "--seconds", f"{seconds:g}"],
        seconds + 40,
    )
    if rx_res is None:
        raise TestbedError(f"{dev.name}: the goodput probe's receiver ({direction}) did not finish")
    m = json.loads(rx_res.stdout.strip().splitlines()[-1])
    return Goodput(
        dev.name,
        direction,
        configured_kbit,
        float(m["goodput_kbit"]),
        float(m["window_s"]),
        int(m["window_bytes"]),
    )


def measure_airtime(
    inv: Inventory,
    dev: Device,
    direction: str,
    sizes: tuple[int, ...],
    repeats: int,
    idle_s: float,
    bs: Runner,
    remote: Runner,
    bs_probe: tuple[str, str],
    dev_probe: str,
    configured_kbit: float | None,
    shaping: str | None = None,
) -> list[Airtime]:
    """Lone messages in ``direction``, timed by their sender (the BS for ``down``)."""
    port = probe_port(inv, dev, direction)
    if direction == "down":
        srv_runner, srv = remote, [dev.python, dev_probe, "echo", "--bind", dev.address]
        tx_runner, tx = bs, [*bs_probe, "airtime", "--to", dev.address]
    else:
        srv_runner, srv = bs, [*bs_probe, "echo", "--bind", inv.bs.host]
        tx_runner, tx = remote, [dev.python, dev_probe, "airtime", "--to", inv.bs.host]
    budget = (
        repeats * len(sizes) * (idle_s + 5 + max(sizes) * 8 / (configured_kbit or 1e3) / 1e3) + 30
    )
    _, res = _server_and_client(
        srv_runner,
        [*srv, "--port", str(port)],
        tx_runner,
        [
            *tx,
            "--port",
            str(port),
            "--sizes",
            ",".join(map(str, sizes)),
            "--repeats",
            str(repeats),
            "--idle",
            f"{idle_s:g}",
        ],
        budget,
    )
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return [
        Airtime(
            dev.name,
            direction,
            configured_kbit,
            int(r["bytes"]),
            int(r["repeat"]),
            float(r["rtt_ms"]),
            float(r["delivery_ms"]),
            shaping,
            tuple(float(x) for x in r.get("pings_ms", ())),
        )
        for r in m["messages"]
    ]


def verify(
    inv: Inventory,
    seconds: float = 3.0,
    devices: list[str] | None = None,
    directions: tuple[str, ...] = ("down", "up"),
) -> list[Goodput]:
    """Measure every (selected) device in each direction, next to tc's configured rate."""
    out: list[Goodput] = []
    with bs_runner_for(inv) as bs:
        shaper = shaper_for(inv, bs)
        for dev, direction, rate, remote, bs_probe, dev_probe in _probes(
            inv, bs, shaper, devices, directions
        ):
            out.append(measure(inv, dev, direction, seconds, bs, remote, bs_probe, dev_probe, rate))
    return out


def _probes(
    inv: Inventory,
    bs: Runner,
    shaper: TcShaper,
    devices: list[str] | None,
    directions: tuple[str, ...],
) -> Iterator[tuple[Device, str, float | None, Runner, str, str]]:
    """Each (selected) device and direction with the probe in place on both ends: ``(device,
    direction, tc's configured rate, the device's runner, BS probe, device probe)``; one SSH
    connection per device, open while its directions are measured."""
    targets = [inv.device(n) for n in devices] if devices else list(inv.devices)
    configured = {s.device: s for s in shaper.show()}
    bs_probe = put_bs_probe(inv, bs)
    for dev in targets:
        with ssh_runner_for(inv, dev) as remote:
            dev_probe = f"{dev.workdir}/.testbed/netprobe.py"
            remote.put(PROBE_SRC, dev_probe)
            for direction in directions:
                st = configured.get(dev.name)
                rate = getattr(st, f"{direction}_kbit") if st else None
                yield dev, direction, rate, remote, bs_probe, dev_probe


def verify_airtime(
    inv: Inventory,
    sizes: tuple[int, ...] = AIRTIME_SIZES,
    repeats: int = 3,
    idle_s: float = 1.0,
    devices: list[str] | None = None,
    directions: tuple[str, ...] = ("down", "up"),
) -> tuple[dict[str, object], list[Airtime]]:
    """Lone messages of each size per (selected) device and direction, ``repeats`` rounds,
    each after ``idle_s`` of silence; with the shaper's :meth:`~TcShaper.shaping_info`."""
    out: list[Airtime] = []
    with bs_runner_for(inv) as bs:
        shaper = shaper_for(inv, bs)
        info = shaper.shaping_info()
        for dev, direction, rate, remote, bs_probe, dev_probe in _probes(
            inv, bs, shaper, devices, directions
        ):
            out += measure_airtime(
                inv,
                dev,
                direction,
                tuple(sizes),
                repeats,
                idle_s,
                bs,
                remote,
                bs_probe,
                dev_probe,
                rate,
                info.get("mode"),
            )  # type: ignore[arg-type]
    return info, out


def airtime_record(inv: Inventory, **kw: object) -> dict[str, object]:
    """:func:`verify_airtime` as plain data for a run's manifest (``links_airtime``): the
    shaping, the per-size summary and every message. Runs do not call it on their own
    (they do not verify links today); a runner that wants the figures calls it after the
    links are set."""
    info, rows = verify_airtime(inv, **kw)  # type: ignore[arg-type]
    return {
        "shaping": info,
        "summary": summarize_airtime(rows),
        "messages": [r.to_dict() for r in rows],
    }
