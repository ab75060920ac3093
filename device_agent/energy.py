"""Energy meters for the device agent: cumulative joules and instantaneous watts.

:func:`detect_meter` tries, in this order, and returns the first that works:

1. ``ina3221-hwmon`` / ``ina3221-iio`` — the Jetson's INA3221 rail monitors in sysfs.
   JetPack 5/6 use the hwmon driver, ``/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmonN/``
   with ``in{N}_label``, ``in{N}_input`` (bus voltage, mV) and ``curr{N}_input`` (mA) and no
   power file, so P = V·I. ``hwmonN`` changes from boot to boot: rails are matched by label;
   ``NC`` (not connected) channels and the summation channel (``in7``, "sum of shunt
   voltages", and ``curr4``) are skipped. JetPack 4 used the IIO ``ina3221x`` driver
   (``iio:deviceN/rail_name_{N}``, ``in_power{N}_input`` in mW).
   Orin NX / Orin Nano have a module-total rail, ``VDD_IN`` (beside ``VDD_CPU_GPU_CV`` and
   ``VDD_SOC``, which are parts of it): it alone is the reported number. AGX Orin has no total
   rail (``VDD_GPU_SOC``, ``VDD_CPU_CV``, ``VIN_SYS_5V0``, ``VDDQ_VDD2_1V8AO``): the reported
   number is the sum of every connected rail. :attr:`Meter.rails` says which rails were used.
2. ``tegrastats`` — the same rails parsed from ``tegrastats --interval 100`` output, where the
   sysfs files are not readable.
3. ``nvml`` — NVIDIA NVML through nvidia-ml-py (imported lazily): the GPU's total-energy
   counter (mJ) where it has one, else ``nvml-power`` (power sampling). NVML does not exist
   on Jetson boards up to JetPack 6.
4. ``rapl`` — Linux powercap ``energy_uj`` of the package zones, unwrapped at
   ``max_energy_range_uj``. Root-only to read on kernels since 5.10 (the PLATYPUS fix).
5. ``estimated:cpu-time`` — this process's CPU time × a configurable power per busy core.
   Not a measurement: :attr:`Meter.estimated` is true and results say ``estimated``.

Power-only meters (INA3221, tegrastats, NVML without the counter) are sampled by a
:class:`PowerSampler` thread at 20 Hz (10 Hz at least) and integrated with the trapezoid rule;
their :meth:`Meter.read` also takes a fresh sample, so a window's ends are exact in time.

Why no library: Zeus would add pandas and scikit-learn to a device install that is meant to
stay at numpy, pyzmq, safetensors and torch, and picks Jetson rails by name heuristics that we
want written down and tested here; jetson-stats is AGPL-3.0 (this project is Apache-2.0) and
reads through its own root systemd service, which provisioning would then have to install and
keep running. The sources themselves are a few sysfs files, one text format and one NVML call,
so the agent reads them directly; nvidia-ml-py (BSD, pure ctypes) is the only optional
dependency, imported only when the NVML meter is tried.

Times are ``time.monotonic_ns()`` (immune to clock steps); use :func:`energy_between` on two
readings of the same meter for a window's joules. :meth:`Meter.read` asks the source (a sysfs
read, an NVML call); :meth:`Meter.now_j` does not (the latest sample's joules, extended at its
power; the CPU-time estimate reads the process clock), which is what the agent stamps on every
forward reply. :attr:`Meter.energy_source` is the label results carry
(``measured:nvml:gpu0``, ``estimated:cpu-time(5 W/core)``).
``python -m device_agent.energy --seconds 2`` prints the chosen meter and its readings as JSON
lines.

This module uses the standard library only and never imports ``testbed``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

#: the kinds :func:`detect_meter` tries, in order
METER_KINDS = ("ina3221", "tegrastats", "nvml", "rapl", "estimated")

#: rails that carry the whole module's input power (Orin NX/Nano, older Nano, Thor), in order
#: of preference; where one exists it alone is reported, since the other rails are parts of it
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")

#: the slowest sampling a power-only meter may use (10 Hz)
MAX_SAMPLE_PERIOD_S = 0.1

_INA_I2C_DRIVER = "sys/bus/i2c/drivers/ina3221"
_INA_IIO_DRIVER = "sys/bus/i2c/drivers/ina3221x"
_POWERCAP = "sys/class/powercap"


class MeterUnavailable(Exception):
    """A meter cannot be used on this host; the message says why (shown in ``skipped``)."""


@dataclass(frozen=True)
class Reading:
    """One reading of a meter.

    Attributes
    ----------
    t_ns
        ``time.monotonic_ns()`` when the reading was taken.
    energy_j
        Joules since the meter was opened (cumulative, never decreasing).
    power_w
        Instantaneous power in watts, or ``None`` where the meter has none (the CPU-time
        estimate, an energy counter without a power query).
    """

    t_ns: int
    energy_j: float
    power_w: float | None


def energy_between(a: Reading, b: Reading) -> float:
    """Joules used between two readings of the same meter (``a`` taken first).

    Raises
    ------
    ValueError
        If ``b`` was taken before ``a``, or its energy is lower (readings of different meters).
    """
    if b.t_ns < a.t_ns:
        raise ValueError(f"reading b (t_ns={b.t_ns}) was taken before reading a (t_ns={a.t_ns})")
    if b.energy_j < a.energy_j:
        raise ValueError(
            f"energy went down from {a.energy_j} J to {b.energy_j} J: readings of different meters?"
        )
    return b.energy_j - a.energy_j


# ---- pure functions -----------------------------------------------------------------------


def trapezoid(
    samples: Iterable[tuple[int, float]], t0_ns: int | None = None, t1_ns: int | None = None
) -> float:
    """Joules from ``(t_ns, power_w)`` samples by the trapezoid rule.

    Samples must be in time order. With ``t0_ns``/``t1_ns`` only that window is counted, the
    power at its ends interpolated linearly between the neighbouring samples (the window must
    lie within the samples' span). Fewer than two samples give 0.
    """
    pts = list(samples)
    for (ta, _), (tb, _) in zip(pts, pts[1:]):  # itertools.pairwise needs Python 3.10
        if tb < ta:
            raise ValueError(f"samples out of time order: {tb} after {ta}")
    if t0_ns is not None or t1_ns is not None:
        if len(pts) < 2:
            raise ValueError("a window needs at least two samples around it")
        lo = pts[0][0] if t0_ns is None else t0_ns
        hi = pts[-1][0] if t1_ns is None else t1_ns
        if lo < pts[0][0] or hi > pts[-1][0] or hi < lo:
            raise ValueError(
                f"window [{lo}, {hi}] ns is not within the samples' span "
                f"[{pts[0][0]}, {pts[-1][0]}] ns"
            )
        inner = [(t, p) for t, p in pts if lo < t < hi]
        pts = [(lo, _interpolate(pts, lo)), *inner, (hi, _interpolate(pts, hi))]
    total = 0.0
    for (ta, pa), (tb, pb) in zip(pts, pts[1:]):
        total += (pa + pb) * 0.5 * (tb - ta) / 1e9
    return total


def _interpolate(pts: Sequence[tuple[int, float]], t: int) -> float:
    for (ta, pa), (tb, pb) in zip(pts, pts[1:]):
        if ta <= t <= tb:
            return pa if tb == ta else pa + (pb - pa) * (t - ta) / (tb - ta)
    raise ValueError(f"t={t} ns is outside the samples")


def rapl_delta(prev_uj: int, cur_uj: int, max_range_uj: int) -> int:
    """Microjoules between two readings of a RAPL ``energy_uj`` counter.

    The counter wraps to 0 after ``max_energy_range_uj``; a reading lower than the previous
    one means it wrapped once (reads are taken often enough that it cannot wrap twice). The
    modulus is ``max_range_uj`` itself: the kernel's off-by-one (range vs range + 1) is 1 µJ.
    """
    if max_range_uj <= 0:
        raise ValueError(f"max_energy_range_uj must be positive, got {max_range_uj}")
    if not (0 <= prev_uj <= max_range_uj and 0 <= cur_uj <= max_range_uj):
        raise ValueError(f"counter readings {prev_uj}, {cur_uj} outside [0, {max_range_uj}]")
    return cur_uj - prev_uj if cur_uj >= prev_uj else cur_uj + max_range_uj - prev_uj


_TEGRA_RAIL = re.compile(
    r"(?<!\S)([A-Z][A-Z0-9_]*)\s+(\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?"
    r"(?:/(\d+(?:\.\d+)?)(?:mW)?)?(?=\s|$)"
)
#: fields of a tegrastats line that look like ``NAME a/b`` but are not power rails
_TEGRA_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})


def parse_tegrastats(line: str) -> dict[str, tuple[float | None, float]]:
    """Power rails of one tegrastats line: ``{rail: (instant mW or None, average mW)}``.

    JetPack 5/6 print ``VDD_IN 3860mW/3921mW`` (instant, average since tegrastats started);
    JetPack 4 printed the same pair without units on some boards. JetPack 7 prints three values,
    ``VDD_GPU 1200mW/1100mW/2400mW``: the first is the instant, the second the average since
    tegrastats started (not an instant), the third (the peak) is dropped. A value pair that is
    not followed by whitespace or the line's end (``RAM 2452/7620MB``) is not a rail.
    """
    out: dict[str, tuple[float | None, float]] = {}
    for m in _TEGRA_RAIL.finditer(line):
        name = m.group(1)
        if name in _TEGRA_NOT_RAILS:
            continue
        out[name] = (float(m.group(2)), float(m.group(3)))
    return out


# ---- INA3221 sysfs trees -------------------------------------------------------------------


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: where to read it and how.

    ``kind`` is ``"hwmon"`` (``voltage_path`` in mV × ``current_path`` in mA) or ``"iio"``
    (``power_path`` in mW).
    """

    name: str
    kind: str
    chip: str
    voltage_path: Path | None = None
    current_path: Path | None = None
    power_path: Path | None = None

    def read_w(self) -> float:
        """The rail's power now, in watts (raises ``OSError``/``ValueError`` if unreadable)."""
        if self.kind == "hwmon":
            assert self.voltage_path is not None and self.current_path is not None
            mv = int(self.voltage_path.read_text().strip())
            ma = int(self.current_path.read_text().strip())
            return mv * ma / 1e6
        assert self.power_path is not None
        return int(self.power_path.read_text().strip()) / 1e3


def _skip_label(label: str) -> bool:
    low = label.strip().lower()
    return not low or low == "nc" or low.startswith("sum")


def find_ina3221_hwmon(root: str | os.PathLike[str] = "/") -> list[Rail]:
    """The connected INA3221 rails of the hwmon driver (JetPack 5/6) under ``root``.

    Looks in ``sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`` and takes every ``in{N}_label``
    that is not ``NC`` or the summation channel and has ``in{N}_input`` and ``curr{N}_input``
    beside it. Sorted by chip, then channel number.
    """
    rails: list[Rail] = []
    base = Path(root) / _INA_I2C_DRIVER
    for chip_dir in sorted(base.glob("*-*")):
        for hw in sorted(chip_dir.glob("hwmon/hwmon*")):
            chans: list[tuple[int, Rail]] = []
            for lab in hw.glob("in*_label"):
                m = re.fullmatch(r"in(\d+)_label", lab.name)
                if not m:
                    continue
                n = int(m.group(1))
                try:
                    label = lab.read_text().strip()
                except OSError:
                    continue
                volt, curr = hw / f"in{n}_input", hw / f"curr{n}_input"
                if _skip_label(label) or not volt.exists() or not curr.exists():
                    continue
                chans.append(
                    (n, Rail(label, "hwmon", chip_dir.name, voltage_path=volt, current_path=curr))
                )
            rails.extend(r for _, r in sorted(chans, key=lambda c: c[0]))
    return rails


def find_ina3221_iio(root: str | os.PathLike[str] = "/") -> list[Rail]:
    """The connected INA3221 rails of the IIO ``ina3221x`` driver (JetPack 4) under ``root``.

    Looks in ``sys/bus/i2c/drivers/ina3221x/*/iio:device*/`` for ``rail_name_{N}`` with
    ``in_power{N}_input`` (mW) beside it; ``NC`` and sum channels are skipped.
    """
    rails: list[Rail] = []
    base = Path(root) / _INA_IIO_DRIVER
    for chip_dir in sorted(base.glob("*-*")):
        for dev in sorted(chip_dir.glob("iio:device*")):
            chans: list[tuple[int, Rail]] = []
            for nm in dev.glob("rail_name_*"):
                m = re.fullmatch(r"rail_name_(\d+)", nm.name)
                if not m:
                    continue
                n = int(m.group(1))
                try:
                    label = nm.read_text().strip()
                except OSError:
                    continue
                pw = dev / f"in_power{n}_input"
                if _skip_label(label) or not pw.exists():
                    continue
                chans.append((n, Rail(label, "iio", chip_dir.name, power_path=pw)))
            rails.extend(r for _, r in sorted(chans, key=lambda c: c[0]))
    return rails


def choose_rails(names: Sequence[str]) -> list[str]:
    """The rails whose sum is the reported power: a module-total rail alone where there is one
    (:data:`TOTAL_RAILS`), else every rail (AGX Orin: no total rail, so the sum of the parts)."""
    for total in TOTAL_RAILS:
        if total in names:
            return [total]
    return list(dict.fromkeys(names))


def _rails_source(prefix: str, used: Sequence[str]) -> str:
    return f"{prefix}:{'+'.join(used)}"


# ---- RAPL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaplZone:
    """A powercap package zone: its ``name``, ``energy_uj`` file and wrap range."""

    name: str
    energy_path: Path
    max_range_uj: int


def find_rapl_zones(root: str | os.PathLike[str] = "/") -> list[RaplZone]:
    """Top-level RAPL package zones under ``root`` (``sys/class/powercap/intel-rapl:N``).

    Sub-zones (``intel-rapl:0:0`` core, dram, ...) are parts of their package and are left out
    so nothing is counted twice; so is ``psys`` (the platform, which contains the packages).
    Raises :class:`MeterUnavailable` saying why when none can be read.
    """
    base = Path(root) / _POWERCAP
    zones: list[RaplZone] = []
    why: list[str] = []
    for z in sorted(base.glob("*")):
        if not re.fullmatch(r"[a-z_-]*rapl:\d+", z.name):
            continue
        try:
            name = (z / "name").read_text().strip()
        except OSError as e:
            why.append(f"{z.name}/name: {e}")
            continue
        if not name.startswith("package"):
            continue
        try:
            int((z / "energy_uj").read_text().strip())
            max_range = int((z / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError) as e:
            why.append(f"{z.name}: {type(e).__name__}: {e}")
            continue
        zones.append(RaplZone(name, z / "energy_uj", max_range))
    if not zones:
        detail = "; ".join(why) if why else f"no package zones in {base}"
        raise MeterUnavailable(f"no readable RAPL zone ({detail})")
    return zones


# ---- the sampler --------------------------------------------------------------------------


class PowerSampler:
    """Integrates power samples into cumulative joules (trapezoid rule).

    Samples come from ``read_power_w`` (called by :meth:`sample`, and by a background thread
    every ``period_s`` once :meth:`start`-ed) or from outside with :meth:`add` (tegrastats
    lines). A failed read is counted in ``errors`` and skipped: the next good sample is joined
    to the last good one. Thread-safe; :meth:`stop` ends the thread within one period.
    """

    def __init__(
        self,
        read_power_w: Callable[[], float] | None,
        period_s: float = 0.05,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not 0 < period_s <= MAX_SAMPLE_PERIOD_S:
            raise ValueError(
                f"period_s must be in (0, {MAX_SAMPLE_PERIOD_S}] (>= 10 Hz), got {period_s}"
            )
        self._read = read_power_w
        self.period_s = float(period_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[int, float] | None = None
        self._energy_j = 0.0
        #: the last sample's reading, replaced whole (one attribute read needs no lock)
        self.latest = Reading(0, 0.0, None)
        self.samples = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, t_ns: int, power_w: float) -> Reading:
        """Integrate one sample taken at ``t_ns``; samples older than the last are dropped."""
        with self._lock:
            if self._last is not None:
                t0, p0 = self._last
                if t_ns < t0:
                    return Reading(t0, self._energy_j, p0)
                self._energy_j += (p0 + power_w) * 0.5 * (t_ns - t0) / 1e9
            self._last = (t_ns, power_w)
            self.samples += 1
            r = self.latest = Reading(t_ns, self._energy_j, power_w)
            return r

    def sample(self) -> Reading:
        """Read the power now and integrate it; on a failed read, the last reading."""
        if self._read is None:
            return self.reading()
        try:
            p = float(self._read())
            if not math.isfinite(p):
                raise ValueError(f"power {p} is not finite")
        except Exception as e:  # noqa: BLE001 - any source error: skip the sample, keep sampling
            self.count_error(f"{type(e).__name__}: {e}")
            return self.reading()
        return self.add(self._clock(), p)

    def count_error(self, why: str) -> None:
        """Record a sample that could not be taken."""
        with self._lock:
            self.errors += 1
            self.last_error = why

    def reading(self) -> Reading:
        """The last sample's reading (time 0, 0 J, no power before the first one)."""
        with self._lock:
            if self._last is None:
                return Reading(0, 0.0, None)
            return Reading(self._last[0], self._energy_j, self._last[1])

    def start(self) -> PowerSampler:
        """Take a first sample and start the background thread (no-op if running)."""
        if self._thread is None and self._read is not None:
            self.sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        period_ns = int(self.period_s * 1e9)
        nxt = time.monotonic_ns() + period_ns
        while not self._stop.wait(max(0.0, (nxt - time.monotonic_ns()) / 1e9)):
            self.sample()
            nxt += period_ns
            now = time.monotonic_ns()
            if nxt < now:  # fell behind (a slow read): skip the missed slots, do not burst
                nxt = now + period_ns

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and wait for it (idempotent)."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout_s)

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()


# ---- meters -------------------------------------------------------------------------------

#: :meth:`Meter.now_j` holds a sample's power for at most this long (a stalled source must not
#: make energy grow without bound)
MAX_EXTRAPOLATION_S = 1.0


def extrapolate_j(r: Reading, now_ns: int, max_s: float = MAX_EXTRAPOLATION_S) -> float:
    """Joules at ``now_ns`` from reading ``r``: its energy plus its power held for the time
    since (at most ``max_s``; none before ``r`` or without a power)."""
    if r.power_w is None or now_ns <= r.t_ns:
        return r.energy_j
    return r.energy_j + r.power_w * min((now_ns - r.t_ns) / 1e9, max_s)


_M = TypeVar("_M", bound="Meter")


class Meter:
    """An energy meter: :meth:`read` gives cumulative joules since it was opened.

    Attributes
    ----------
    source
        What is measured, e.g. ``"ina3221-hwmon:VDD_IN"``, ``"nvml"``, ``"rapl:package-0"``,
        ``"estimated:cpu-time"``.
    rails
        The rails / devices / zones whose sum is reported.
    estimated
        True for a model rather than a measurement (results record ``energy_source``).
    skipped
        Filled by :func:`detect_meter`: why each meter tried before this one was not used.
    """

    source: str = ""
    rails: list[str]
    estimated: bool = False

    def __init__(self) -> None:
        self.rails = []
        self.skipped: dict[str, str] = {}

    def read(self) -> Reading:
        """Cumulative joules since the meter was opened, asked of the source now (per meter)."""
        raise NotImplementedError

    def latest(self) -> Reading:
        """The most recent reading without asking the source where the meter keeps one (a
        sampler or poller thread: INA3221, tegrastats, NVML, RAPL), at most a sampling period
        old; a fresh :meth:`read` for the others (the CPU-time estimate)."""
        return self.read()

    def now_j(self) -> float:
        """Cumulative joules now, without touching the source (no file, process or driver
        call): cheap enough for the agent's per-call path. Sampled meters extend their latest
        sample at its power (:func:`extrapolate_j`); the CPU-time estimate reads the process
        clock. Never ahead of the source by more than :data:`MAX_EXTRAPOLATION_S` of power;
        two calls may differ from a later :meth:`read` by the difference between the held
        and the true power over that stretch, so compare ``now_j`` with ``now_j`` and
        ``read`` with ``read``."""
        return self.read().energy_j

    @property
    def energy_source(self) -> str:
        """What results record: ``measured:`` or ``estimated:``, the kind and the rails that
        make it up, e.g. ``measured:ina3221-hwmon:VDD_IN``, ``measured:nvml:gpu0``,
        ``estimated:cpu-time(5 W/core)``."""
        src = (
            self.source
            if ":" in self.source or not self.rails
            else f"{self.source}:{'+'.join(self.rails)}"
        )
        return f"{'estimated' if self.estimated else 'measured'}:{src}"

    def close(self) -> None:
        """Release threads, processes and handles (idempotent)."""

    def describe(self) -> dict[str, Any]:
        """The meter as a JSON-ready map (for the agent's status and run manifests)."""
        return {
            "source": self.source,
            "rails": list(self.rails),
            "energy_source": "estimated" if self.estimated else "measured",
            "label": self.energy_source,
            "skipped": dict(self.skipped),
        }

    def __enter__(self: _M) -> _M:  # noqa: PYI019 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SampledMeter(Meter):
    """A power-only source sampled by a :class:`PowerSampler` thread; :meth:`read` samples
    once more so the reading is at the moment of the call."""

    def __init__(
        self,
        source: str,
        rails: Sequence[str],
        read_power_w: Callable[[], float],
        period_s: float = 0.05,
    ) -> None:
        super().__init__()
        self.source = source
        self.rails = list(rails)
        read_power_w()  # fail here, in detection, rather than in the thread
        self.sampler = PowerSampler(read_power_w, period_s).start()

    def read(self) -> Reading:
        """Take a sample now and return the reading it gives."""
        return self.sampler.sample()

    def latest(self) -> Reading:
        """The background thread's latest sample, at most ``period_s`` old."""
        return self.sampler.latest

    def now_j(self) -> float:
        """The latest sample's joules extended at its power (:func:`extrapolate_j`)."""
        return extrapolate_j(self.sampler.latest, time.monotonic_ns())

    def close(self) -> None:
        """Stop the sampler thread."""
        self.sampler.stop()


def _ina_meter(rails: list[Rail], prefix: str, period_s: float) -> SampledMeter:
    by_name: dict[str, Rail] = {}
    for r in rails:
        by_name.setdefault(r.name, r)
    used = choose_rails(list(by_name))
    chosen = [by_name[n] for n in used]

    def read_w() -> float:
        return sum(r.read_w() for r in chosen)

    return SampledMeter(_rails_source(prefix, used), used, read_w, period_s)


class TegrastatsMeter(Meter):
    """Power from a running ``tegrastats --interval N`` process, one line per sample.

    The instant value of each chosen rail is summed and integrated; a line that lacks one of
    the chosen rails is skipped and counted in ``sampler.errors``.
    """

    def __init__(
        self, argv: Sequence[str], period_s: float = 0.1, first_line_timeout_s: float = 3.0
    ) -> None:
        super().__init__()
        interval_ms = max(1, round(period_s * 1000))
        self.sampler = PowerSampler(None, period_s)
        self._used: list[str] | None = None
        self._ready = threading.Event()
        try:
            self.proc: subprocess.Popen[str] = subprocess.Popen(
                [*argv, "--interval", str(interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as e:
            raise MeterUnavailable(f"cannot start {argv[0]}: {e}") from None
        assert self.proc.stdout is not None
        self._thread = threading.Thread(
            target=self._pump, args=(self.proc.stdout,), name="tegrastats-reader", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(first_line_timeout_s):
            self.close()
            raise MeterUnavailable(f"{argv[0]} printed no power rails in {first_line_timeout_s} s")
        assert self._used is not None
        self.rails = list(self._used)
        self.source = _rails_source("tegrastats", self._used)

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            t_ns = time.monotonic_ns()
            rails = parse_tegrastats(line)
            if not rails:
                continue
            if self._used is None:
                self._used = choose_rails(list(rails))
                self._ready.set()
            inst = [rails[n][0] for n in self._used if n in rails]
            if len(inst) != len(self._used) or any(v is None for v in inst):
                self.sampler.count_error(f"line without an instant value of {self._used}")
                continue
            self.sampler.add(t_ns, sum(v for v in inst if v is not None) / 1e3)

    def read(self) -> Reading:
        """The last parsed line's reading; tegrastats cannot be asked for a fresh one."""
        return self.sampler.reading()

    def latest(self) -> Reading:
        """The last parsed line's reading."""
        return self.sampler.latest

    def now_j(self) -> float:
        """The last line's joules extended at its power (:func:`extrapolate_j`)."""
        return extrapolate_j(self.sampler.latest, time.monotonic_ns())

    def close(self) -> None:
        """Terminate tegrastats (kill it after 2 s) and join the reader thread."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(2.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class NvmlMeter(Meter):
    """NVML through nvidia-ml-py: the total-energy counter (mJ) of each GPU, summed; where a GPU
    lacks the counter, power sampling of all of them (source ``nvml-power``).

    With the counter, a background thread reads it every ``period_s`` too, so that
    :meth:`now_j` has a recent reading to extend without a driver call."""

    def __init__(self, indices: Sequence[int] | None = None, period_s: float = 0.05) -> None:
        super().__init__()
        self._latest = Reading(0, 0.0, None)
        self._poll_stop = threading.Event()
        self._poll: threading.Thread | None = None
        try:
            import pynvml  # nvidia-ml-py
        except ImportError as e:
            raise MeterUnavailable(f"nvidia-ml-py not installed ({e})") from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:  # LibraryNotFound, DriverNotLoaded, ...
            raise MeterUnavailable(f"NVML: {type(e).__name__}: {e}") from None
        self._inited = True
        self.sampler: PowerSampler | None = None
        self._e0_mj: list[int] | None = None
        try:
            n = pynvml.nvmlDeviceGetCount()
            idx = list(range(n)) if indices is None else list(indices)
            if not idx or any(not 0 <= i < n for i in idx):
                raise MeterUnavailable(f"NVML sees {n} GPU(s); asked for {idx}")
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
            self.rails = [f"gpu{i}" for i in idx]
            try:
                self._e0_mj = [
                    int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles
                ]
                self.source = "nvml"
                self.read()
                self._poll = threading.Thread(
                    target=self._poll_counter, args=(period_s,), name="nvml-poll", daemon=True
                )
                self._poll.start()
            except pynvml.NVMLError:  # NotSupported on GPUs older than Volta
                self._e0_mj = None
                self._power_w()
                self.source = "nvml-power"
                self.sampler = PowerSampler(self._power_w, period_s).start()
        except MeterUnavailable:
            self.close()
            raise
        except pynvml.NVMLError as e:
            self.close()
            raise MeterUnavailable(f"NVML: {type(e).__name__}: {e}") from None

    def _power_w(self) -> float:
        return sum(self._nv.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3

    def _poll_counter(self, period_s: float) -> None:
        while not self._poll_stop.wait(period_s):
            with contextlib.suppress(self._nv.NVMLError):
                self.read()

    def read(self) -> Reading:
        """Read the energy counters now (or take a power sample without them).

        With the counters it also reads the power, best effort (``power_w`` None on failure), and
        keeps the newest reading for :meth:`latest`.
        """
        if self.sampler is not None:
            return self.sampler.sample()
        assert self._e0_mj is not None
        mj = [int(self._nv.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]
        t_ns = time.monotonic_ns()
        try:
            p: float | None = self._power_w()
        except self._nv.NVMLError:
            p = None
        r = Reading(t_ns, sum(m - m0 for m, m0 in zip(mj, self._e0_mj)) / 1e3, p)
        if r.t_ns >= self._latest.t_ns:  # the poll thread and a caller may race
            self._latest = r
        return r

    def latest(self) -> Reading:
        """The poll thread's or sampler's latest reading, at most ``period_s`` old."""
        return self.sampler.latest if self.sampler is not None else self._latest

    def now_j(self) -> float:
        """The latest reading's joules extended at its power (:func:`extrapolate_j`)."""
        return extrapolate_j(self.latest(), time.monotonic_ns())

    def close(self) -> None:
        """Stop the poll or sampler thread and shut NVML down (idempotent)."""
        self._poll_stop.set()
        if self._poll is not None:
            self._poll.join(2.0)
            self._poll = None
        if self.sampler is not None:
            self.sampler.stop()
        if getattr(self, "_inited", False):
            self._inited = False
            with contextlib.suppress(self._nv.NVMLError):
                self._nv.nvmlShutdown()


class RaplMeter(Meter):
    """RAPL package counters, unwrapped with :func:`rapl_delta`. A background thread reads them
    every ``poll_s`` so at most one wrap happens between two reads."""

    def __init__(self, zones: Sequence[RaplZone], poll_s: float = 1.0) -> None:
        super().__init__()
        self.zones = list(zones)
        self.rails = [z.name for z in self.zones]
        self.source = _rails_source("rapl", self.rails)
        self._lock = threading.Lock()
        self._prev = [self._raw(z) for z in self.zones]
        self._uj = 0
        self._last: tuple[int, int] | None = None  # (t_ns, uj) of the previous read
        self._latest = Reading(time.monotonic_ns(), 0.0, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._poll, args=(poll_s,), name="rapl-poll", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _raw(z: RaplZone) -> int:
        return int(z.energy_path.read_text().strip())

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.read()
            except (OSError, ValueError):
                pass

    def read(self) -> Reading:
        """Read every zone's counter, add the unwrapped deltas and return the total.

        ``power_w`` is the average since the previous read (None on the first).
        """
        with self._lock:
            cur = [self._raw(z) for z in self.zones]
            t_ns = time.monotonic_ns()
            self._uj += sum(
                rapl_delta(p, c, z.max_range_uj) for p, c, z in zip(self._prev, cur, self.zones)
            )
            self._prev = cur
            p_w = None
            if self._last is not None and t_ns > self._last[0]:
                p_w = (self._uj - self._last[1]) / 1e6 / ((t_ns - self._last[0]) / 1e9)
            self._last = (t_ns, self._uj)
            r = self._latest = Reading(t_ns, self._uj / 1e6, p_w)
            return r

    def latest(self) -> Reading:
        """The last read's reading (the poll thread's, at most ``poll_s`` old)."""
        return self._latest

    def now_j(self) -> float:
        """The last read's joules extended at its power (:func:`extrapolate_j`)."""
        return extrapolate_j(self._latest, time.monotonic_ns())

    def close(self) -> None:
        """Stop the poll thread."""
        self._stop.set()
        self._thread.join(2.0)


class CpuTimeEstimate(Meter):
    """Not a measurement: this process's CPU time (all threads, user + system) × ``core_w``
    watts per busy core. ``power_w`` is the average since the previous read."""

    source = "estimated:cpu-time"
    estimated = True

    def __init__(
        self, core_w: float = 5.0, cpu_time_s: Callable[[], float] = time.process_time
    ) -> None:
        super().__init__()
        if not core_w > 0:
            raise ValueError(f"cpu_core_w must be positive, got {core_w}")
        self.core_w = float(core_w)
        self._cpu = cpu_time_s
        self._lock = threading.Lock()
        self._c0 = cpu_time_s()
        self._last: tuple[int, float] | None = None

    def read(self) -> Reading:
        """CPU seconds since opening × ``core_w``; ``power_w`` averaged since the previous read."""
        with self._lock:
            t_ns = time.monotonic_ns()
            e = (self._cpu() - self._c0) * self.core_w
            p = None
            if self._last is not None and t_ns > self._last[0]:
                p = (e - self._last[1]) / ((t_ns - self._last[0]) / 1e9)
            self._last = (t_ns, e)
            return Reading(t_ns, e, p)

    def now_j(self) -> float:
        """CPU seconds since opening × ``core_w``, without updating the power average."""
        return (self._cpu() - self._c0) * self.core_w

    @property
    def energy_source(self) -> str:
        """``estimated:cpu-time(<core_w> W/core)``."""
        return f"{self.source}({self.core_w:g} W/core)"

    def describe(self) -> dict[str, Any]:
        """The base description plus ``cpu_core_w``."""
        d = super().describe()
        d["cpu_core_w"] = self.core_w
        return d


# ---- detection ----------------------------------------------------------------------------


@dataclass
class MeterOptions:
    """Settings for :func:`detect_meter`.

    Attributes
    ----------
    only
        Try only these kinds (of :data:`METER_KINDS`), still in the standard order.
    sample_period_s
        Sampling period of power-only meters (at most 0.1 s).
    cpu_core_w
        Watts per busy core for the ``estimated`` fallback.
    nvml_indices
        NVML GPU indices to sum (``None``: all GPUs NVML sees).
    tegrastats_argv
        The tegrastats command (``--interval MS`` is appended).
    rapl_poll_s
        How often RAPL counters are read in the background to catch wrap-arounds.
    """

    only: Sequence[str] | None = None
    sample_period_s: float = 0.05
    cpu_core_w: float = 5.0
    nvml_indices: Sequence[int] | None = None
    tegrastats_argv: Sequence[str] = ("tegrastats",)
    rapl_poll_s: float = 1.0

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> MeterOptions:
        """Build from a plain map (a config file's table); unknown keys are rejected."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(m) - names)
        if bad:
            raise ValueError(f"unknown energy meter option(s) {bad}; known: {sorted(names)}")
        return cls(**dict(m))


def _try_ina3221(root: Path, opts: MeterOptions) -> Meter:
    why = []
    for finder, prefix in (
        (find_ina3221_hwmon, "ina3221-hwmon"),
        (find_ina3221_iio, "ina3221-iio"),
    ):
        rails = finder(root)
        if not rails:
            continue
        try:
            return _ina_meter(rails, prefix, opts.sample_period_s)
        except (OSError, ValueError) as e:
            why.append(f"{prefix}: {type(e).__name__}: {e}")
    if why:
        raise MeterUnavailable("; ".join(why))
    raise MeterUnavailable(
        f"no INA3221 rails under {root / _INA_I2C_DRIVER} or {root / _INA_IIO_DRIVER}"
    )


def _try_tegrastats(root: Path, opts: MeterOptions) -> Meter:
    argv = list(opts.tegrastats_argv)
    if not argv:
        raise MeterUnavailable("empty tegrastats command")
    if shutil.which(argv[0]) is None:
        raise MeterUnavailable(f"{argv[0]} not found on PATH")
    return TegrastatsMeter(argv, period_s=max(opts.sample_period_s, 0.1))


def _try_nvml(root: Path, opts: MeterOptions) -> Meter:
    return NvmlMeter(opts.nvml_indices, opts.sample_period_s)


def _try_rapl(root: Path, opts: MeterOptions) -> Meter:
    return RaplMeter(find_rapl_zones(root), opts.rapl_poll_s)


def _try_estimated(root: Path, opts: MeterOptions) -> Meter:
    return CpuTimeEstimate(opts.cpu_core_w)


_TRY: dict[str, Callable[[Path, MeterOptions], Meter]] = {
    "ina3221": _try_ina3221,
    "tegrastats": _try_tegrastats,
    "nvml": _try_nvml,
    "rapl": _try_rapl,
    "estimated": _try_estimated,
}


def detect_meter(
    root: str | os.PathLike[str] = "/", options: MeterOptions | Mapping[str, Any] | None = None
) -> Meter:
    """Open the first meter that works, in the order of :data:`METER_KINDS`.

    ``root`` is where the sysfs tree is looked for (tests point it at fixture trees). The
    returned meter's ``skipped`` says why each earlier kind was not used. Call ``close()``
    (or use it as a context manager) when done.

    Raises
    ------
    MeterUnavailable
        If none of the kinds allowed by ``options.only`` works (the message lists each reason).
    ValueError
        For unknown kinds in ``only`` or unknown option keys.
    """
    opts = (
        options if isinstance(options, MeterOptions) else MeterOptions.from_mapping(options or {})
    )
    kinds = METER_KINDS if opts.only is None else tuple(opts.only)
    unknown = sorted(set(kinds) - set(METER_KINDS))
    if unknown:
        raise ValueError(f"unknown meter kind(s) {unknown}; known: {list(METER_KINDS)}")
    skipped: dict[str, str] = {}
    for kind in METER_KINDS:
        if kind not in kinds:
            continue
        try:
            meter = _TRY[kind](Path(root), opts)
        except MeterUnavailable as e:
            skipped[kind] = str(e)
            continue
        meter.skipped = skipped
        return meter
    raise MeterUnavailable(
        "no energy meter works here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
    )


# ---- command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m device_agent.energy [--seconds 2] [--every-s 0.5] [--meter KIND]``: print the
    chosen meter, then readings, then the window's total, one JSON object a line."""
    ap = argparse.ArgumentParser(
        prog="python -m device_agent.energy",
        description="detect this host's energy meter and print readings",
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="how long to read")
    ap.add_argument("--every-s", type=float, default=0.5, help="seconds between printed readings")
    ap.add_argument(
        "--meter",
        action="append",
        choices=METER_KINDS,
        default=None,
        help="try only this kind (repeatable); default: all, in order",
    )
    ap.add_argument("--root", default="/", help="where the sysfs tree is (default /)")
    ap.add_argument(
        "--cpu-core-w", type=float, default=5.0, help="watts per busy core for the estimate"
    )
    a = ap.parse_args(argv)
    try:
        meter = detect_meter(a.root, MeterOptions(only=a.meter, cpu_core_w=a.cpu_core_w))
    except MeterUnavailable as e:
        print(json.dumps({"error": str(e)}), file=sys.stderr)
        return 3
    with meter:
        print(json.dumps({"meter": meter.describe()}), flush=True)
        first = meter.read()
        end = first.t_ns + int(a.seconds * 1e9)
        last = first
        while last.t_ns < end:
            time.sleep(max(0.0, min(a.every_s, (end - last.t_ns) / 1e9)))
            last = meter.read()
            print(json.dumps(dataclasses.asdict(last)), flush=True)
        dt_s = (last.t_ns - first.t_ns) / 1e9
        e_j = energy_between(first, last)
        print(
            json.dumps(
                {
                    "source": meter.source,
                    "seconds": round(dt_s, 4),
                    "energy_j": e_j,
                    "mean_power_w": e_j / dt_s if dt_s > 0 else None,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
