"""Wireless channel model of one cell, and channel traces (pure; numpy only).

The model [R] (POLICIES.md, "Wireless channel"; every constant is a parameter):

* devices uniform in a disc of radius ``cell_radius_m`` around the base station (BS), at least
  ``min_distance_m`` away (the path-loss law is not meant for the near field);
* path loss ``PL(d) = pathloss_db_at_1km + pathloss_slope_db * log10(d_km)`` dB
  (3GPP urban macro: 128.1 + 37.6 log10 d_km);
* log-normal shadowing with ``shadowing_db`` standard deviation, drawn once per device (it follows
  the device's position, which does not change);
* Rayleigh block fading: ``|h|^2 ~ Exp(1)``, drawn afresh for every decision epoch and device,
  the same in both directions (TDD reciprocity);
* noise ``noise_dbm_hz + noise_figure_db`` per Hz; transmit power ``bs_power_dbm`` on the downlink,
  ``device_power_dbm`` on the uplink;
* Shannon rate ``r(B) = B log2(1 + P g / (N0 B))``: the noise grows with the allocated bandwidth,
  so the rate is concave in ``B`` and saturates at ``P g / (N0 ln 2)``.

Everything random is drawn from ``numpy.random.default_rng`` seeded by ``seed`` and the device
name (position, shadowing) or ``seed`` and the epoch (fading): ``gains(epoch)`` is random-access
and adding a device does not move the others.

A channel trace is a CSV ``time_s,device,rate_down_kbit,rate_up_kbit`` (one row per epoch and
device) written by :func:`write_trace` and read back, checked, by :func:`read_trace`.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

DIRECTIONS = ("down", "up")
TRACE_COLUMNS = ("time_s", "device", "rate_down_kbit", "rate_up_kbit")


def dbm_to_w(dbm: float) -> float:
    """Power in dBm -> watts."""
    return 10.0 ** ((dbm - 30.0) / 10.0)


def shannon_rate_bps(bandwidth_hz: np.ndarray | float, snr_hz: np.ndarray | float
                     ) -> np.ndarray | float:
    """``B log2(1 + s / B)`` in bit/s, where ``s = P g / N0`` (Hz) is the SNR per Hz of bandwidth.

    Zero bandwidth gives rate 0. Vectorised over numpy arrays (broadcasting).
    """
    b = np.asarray(bandwidth_hz, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = b * np.log2(1.0 + np.asarray(snr_hz, dtype=np.float64) / b)
    r = np.where(b > 0, r, 0.0)
    return float(r) if r.ndim == 0 else r


class ChannelModel:
    """Per-device channel gains of one cell, per decision epoch.

    Parameters
    ----------
    devices:
        Device names, or a count ``n`` (names ``dev0 .. dev{n-1}``).
    seed:
        Seed of every random draw.
    cell_radius_m, min_distance_m:
        Devices are uniform (by area) in the annulus ``min_distance_m <= d <= cell_radius_m``.
    pathloss_db_at_1km, pathloss_slope_db:
        ``PL = pathloss_db_at_1km + pathloss_slope_db * log10(d_km)`` dB.
    shadowing_db:
        Standard deviation of the log-normal shadowing (0 = none).
    fading:
        ``"rayleigh"`` (block fading, one draw per epoch) or ``"none"``.
    noise_dbm_hz, noise_figure_db:
        Thermal noise density and receiver noise figure.
    bs_power_dbm, device_power_dbm:
        Transmit power of the BS (downlink) and of a device (uplink).
    """

    def __init__(self, devices: int | Sequence[str], seed: int = 0, *,
                 cell_radius_m: float = 100.0, min_distance_m: float = 10.0,
                 pathloss_db_at_1km: float = 128.1, pathloss_slope_db: float = 37.6,
                 shadowing_db: float = 8.0, fading: str = "rayleigh",
                 noise_dbm_hz: float = -174.0, noise_figure_db: float = 9.0,
                 bs_power_dbm: float = 30.0, device_power_dbm: float = 23.0):
        names = [f"dev{i}" for i in range(devices)] if isinstance(devices, int) else list(devices)
        if not names:
            raise ConfigError("channel: no devices")
        if len(set(names)) != len(names):
            raise ConfigError(f"channel: duplicate device names in {names}")
        if not 0 < min_distance_m <= cell_radius_m:
            raise ConfigError(f"channel: need 0 < min_distance_m ({min_distance_m}) <= "
                              f"cell_radius_m ({cell_radius_m})")
        if shadowing_db < 0:
            raise ConfigError(f"channel: shadowing_db must be >= 0, got {shadowing_db}")
        if fading not in ("rayleigh", "none"):
            raise ConfigError(f"channel: fading must be 'rayleigh' or 'none', got {fading!r}")
        self.devices: tuple[str, ...] = tuple(names)
        self.index = {d: i for i, d in enumerate(self.devices)}
        self.seed = int(seed)
        self.fading = fading
        self.params = {"cell_radius_m": cell_radius_m, "min_distance_m": min_distance_m,
                       "pathloss_db_at_1km": pathloss_db_at_1km,
                       "pathloss_slope_db": pathloss_slope_db, "shadowing_db": shadowing_db,
                       "fading": fading, "noise_dbm_hz": noise_dbm_hz,
                       "noise_figure_db": noise_figure_db, "bs_power_dbm": bs_power_dbm,
                       "device_power_dbm": device_power_dbm}
        dist, shadow = [], []
        for name in self.devices:
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
            u, z = rng.random(), rng.standard_normal()
            # uniform by area in the annulus: r^2 uniform in [r_min^2, R^2]
            dist.append(math.sqrt(min_distance_m ** 2
                                  + u * (cell_radius_m ** 2 - min_distance_m ** 2)))
            shadow.append(shadowing_db * z)
        self.distance_m = np.array(dist)
        self.shadowing_db = np.array(shadow)
        self.pathloss_db = pathloss_db_at_1km + pathloss_slope_db * np.log10(self.distance_m / 1e3)
        self.large_scale_gain = 10.0 ** (-(self.pathloss_db + self.shadowing_db) / 10.0)
        self.noise_w_hz = dbm_to_w(noise_dbm_hz + noise_figure_db)
        self.power_w = {"down": dbm_to_w(bs_power_dbm), "up": dbm_to_w(device_power_dbm)}
        self._cache_epoch = -1
        self._cache_gain = self.large_scale_gain

    def fading_gain(self, epoch: int) -> np.ndarray:
        """``|h|^2`` per device for ``epoch`` (ones without fading)."""
        if self.fading == "none":
            return np.ones(len(self.devices))
        rng = np.random.default_rng([self.seed, 0x5EED, int(epoch)])
        return rng.exponential(1.0, len(self.devices))

    def gains(self, epoch: int = 0) -> np.ndarray:
        """Linear channel gain per device (path loss x shadowing x fading) in epoch ``epoch``."""
        if epoch != self._cache_epoch:
            self._cache_gain = self.large_scale_gain * self.fading_gain(epoch)
            self._cache_epoch = epoch
        return self._cache_gain

    def snr_per_hz(self, epoch: int = 0, direction: str = "down") -> np.ndarray:
        """``P g / N0`` per device (Hz): the SNR a 1 Hz channel would see."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
        return self.power_w[direction] * self.gains(epoch) / self.noise_w_hz

    def rates_bps(self, bandwidth_hz: np.ndarray | float, direction: str = "down",
                  epoch: int = 0) -> np.ndarray:
        """Shannon rate per device (bit/s) for the given bandwidth(s) (scalar or one per device)."""
        return np.asarray(shannon_rate_bps(bandwidth_hz, self.snr_per_hz(epoch, direction)))

    def rate_bps(self, device: str, bandwidth_hz: float, direction: str = "down",
                 epoch: int = 0) -> float:
        """Shannon rate (bit/s) of ``device`` with ``bandwidth_hz`` in ``direction``."""
        if device not in self.index:
            raise KeyError(f"channel: unknown device {device!r} (have: {', '.join(self.devices)})")
        s = self.snr_per_hz(epoch, direction)[self.index[device]]
        return float(shannon_rate_bps(bandwidth_hz, s))


# -- traces ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceRow:
    """One row of a channel trace: the rates of one device from ``time_s`` on."""

    time_s: float
    device: str
    rate_down_kbit: float
    rate_up_kbit: float


def _split(model: ChannelModel, bandwidth_hz: float | Mapping[str, float]) -> np.ndarray:
    if isinstance(bandwidth_hz, Mapping):
        unknown = sorted(set(bandwidth_hz) - set(model.devices))
        if unknown:
            raise ConfigError(f"channel trace: bandwidth for unknown devices {unknown}")
        return np.array([float(bandwidth_hz.get(d, 0.0)) for d in model.devices])
    return np.full(len(model.devices), float(bandwidth_hz) / len(model.devices))


def trace_rows(model: ChannelModel, epochs: int, bandwidth_hz: float | Mapping[str, float],
               epoch_s: float = 1.0, first_epoch: int = 0) -> list[TraceRow]:
    """Rates of every device for ``epochs`` epochs (pure; :func:`write_trace` writes them).

    ``bandwidth_hz``: the total bandwidth, split equally over the devices, or a bandwidth per
    device (devices missing from the mapping get none).
    """
    b = _split(model, bandwidth_hz)
    rows: list[TraceRow] = []
    for k in range(epochs):
        ep = first_epoch + k
        down = model.rates_bps(b, "down", ep) / 1e3
        up = model.rates_bps(b, "up", ep) / 1e3
        rows.extend(TraceRow(round(k * epoch_s, 9), d, float(down[i]), float(up[i]))
                    for i, d in enumerate(model.devices))
    return rows


def write_trace(path: str | Path, model: ChannelModel, epochs: int,
                bandwidth_hz: float | Mapping[str, float], epoch_s: float = 1.0,
                first_epoch: int = 0) -> list[TraceRow]:
    """Write a channel trace CSV (``time_s,device,rate_down_kbit,rate_up_kbit``) and return
    its rows. See :func:`trace_rows` for the arguments."""
    rows = trace_rows(model, epochs, bandwidth_hz, epoch_s, first_epoch)
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRACE_COLUMNS)
        for r in rows:
            w.writerow([f"{r.time_s:.9g}", r.device, f"{r.rate_down_kbit:.6f}",
                        f"{r.rate_up_kbit:.6f}"])
    return rows


def read_trace(path: str | Path) -> list[TraceRow]:
    """Read and check a channel trace CSV.

    Raises
    ------
    ConfigError
        One line naming ``file:line:column`` for a missing file, a bad header, a wrong field
        count, a non-numeric, negative or non-finite value, an empty device name, time going
        backwards, or a device listed twice at one time.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read channel trace: {exc.strerror or exc}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}:1: empty channel trace (expected header "
                          f"{','.join(TRACE_COLUMNS)})")
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if tuple(header) != TRACE_COLUMNS:
        col = next((i for i, (a, b) in enumerate(zip(header, TRACE_COLUMNS)) if a != b),
                   min(len(header), len(TRACE_COLUMNS)))
        raise ConfigError(f"{path}:1:{col + 1}: bad header {','.join(header)!r} "
                          f"(expected {','.join(TRACE_COLUMNS)})")
    rows: list[TraceRow] = []
    last_t: float | None = None
    seen: set[str] = set()
    for lineno, fields in enumerate(csv.reader(lines[1:]), start=2):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(TRACE_COLUMNS):
            raise ConfigError(f"{path}:{lineno}: expected {len(TRACE_COLUMNS)} fields "
                              f"({','.join(TRACE_COLUMNS)}), got {len(fields)}")
        vals: list[float] = []
        for col, name in ((1, "time_s"), (3, "rate_down_kbit"), (4, "rate_up_kbit")):
            raw = fields[col - 1].strip()
            try:
                v = float(raw)
            except ValueError:
                raise ConfigError(f"{path}:{lineno}:{col}: {name}: {raw!r} is not a number") \
                    from None
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{path}:{lineno}:{col}: {name}: {raw!r} must be a finite "
                                  "number >= 0")
            vals.append(v)
        device = fields[1].strip()
        if not device:
            raise ConfigError(f"{path}:{lineno}:2: device: empty name")
        t = vals[0]
        if last_t is not None and t < last_t:
            raise ConfigError(f"{path}:{lineno}:1: time_s: {t:g} goes back in time "
                              f"(previous row {last_t:g})")
        if t != last_t:
            seen = set()
        if device in seen:
            raise ConfigError(f"{path}:{lineno}:2: device: {device!r} listed twice at "
                              f"time_s {t:g}")
        seen.add(device)
        last_t = t
        rows.append(TraceRow(t, device, vals[1], vals[2]))
    return rows
