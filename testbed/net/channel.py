"""Wireless channel model of one cell, and channel traces (pure; numpy only).

The model, per device ``k`` and decision epoch (POLICIES.md, "Wireless channel", [R]; every
constant is a keyword of :class:`ChannelModel` and a recipe key ``links.channel.<name>``):

* position: uniform (by area) in the annulus ``min_distance_m <= d <= cell_radius_m`` around
  the base station (BS), fixed for the trial;
* large-scale gain ``G - PL(d) - L_pen - X`` dB with the log-distance path loss
  ``PL(d) = pathloss_db_at_1km + pathloss_slope_db * log10(d_km)``, a penetration loss, antenna
  gains ``G`` and log-normal shadowing ``X ~ N(0, shadowing_db^2)``, drawn once per device;
* small-scale gain ``|h|^2``: block fading drawn afresh every epoch, Rayleigh (``Exp(1)``) or
  Rician with K-factor ``rician_k_db`` (mean 1 either way), the same in both directions (TDD
  reciprocity);
* downlink: the BS's total power ``P_bs`` is split over the devices in proportion to their
  bandwidth, ``P_k = P_bs B_k / B_cell`` (a flat power spectral density over the cell's bandwidth
  ``B_cell``), so the SNR ``P_bs g_k / (N0_dev B_cell)`` does not depend on the split; with
  ``power_split = "none"`` every device gets all of ``P_bs`` (the paper's model);
* uplink: each device sends its own ``device_power_dbm`` over its own bandwidth, SNR
  ``P_dev g_k / (N0_bs B_k)``;
* noise ``N0 = noise_dbm_hz + NF`` per Hz, with the receiver's noise figure (the device's on the
  downlink, the BS's on the uplink);
* rate ``r_k = B_k * se(SNR_k)``, the spectral efficiency ``se`` per ``se_model``:
  ``"capped"`` (default) ``min(log2(1 + SNR/gap), top)``, where ``top`` is the efficiency of
  the highest CQI of the TS 38.214 CQI table ``cqi_table`` -- no link adaptation delivers more
  than its best modulation and code rate, however good the channel; ``"cqi"`` the efficiency of
  the highest CQI of that table that ``log2(1 + SNR/gap)`` reaches (0 below CQI 1: out of
  range), a link adaptation in steps; ``"shannon"`` ``log2(1 + SNR/gap)``, uncapped.

``"capped"`` is the default rather than ``"cqi"``: on the uplink the SNR falls as the bandwidth
grows, and the table's steps would make the rate drop at each step boundary as the bandwidth
grows; the cap keeps every rate increasing in its bandwidth (the min-max allocation relies on
that) while bounding the spectral efficiency as the table does.

Parameters, their defaults and where each comes from (TR 36.814 = 3GPP TR 36.814 V9.0.0,
Table A.2.1.1-2, the macro-cell "Case 1" system-simulation assumptions, 2 GHz carrier):

=========================  ============  ======================================================
key                        default       source / meaning
=========================  ============  ======================================================
``cell_radius_m``          200 m         a choice: devices within 200 m of the BS, inside the
                                         250 m disc that fits a hexagonal cell of TR 36.814's
                                         500 m inter-site distance
``min_distance_m``         35 m          TR 36.814: minimum distance between device and BS
``pathloss_db_at_1km``     128.1 dB      TR 36.814 macro path loss ``128.1 + 37.6 log10(R)``,
``pathloss_slope_db``      37.6 dB/dec   R in km (path-loss exponent 3.76)
``penetration_loss_db``    20 dB         TR 36.814: indoor devices
``antenna_gain_db``        0 dB          BS + device antenna gain less cable loss; 0 = omni
                                         antennas (TR 36.814 has 14 dBi sector antennas at the
                                         BS, which this isolated cell leaves out)
``shadowing_db``           8 dB          TR 36.814: log-normal shadowing standard deviation
``fading``                 rayleigh      ``rayleigh`` (no line of sight), ``rician``, ``none``
``rician_k_db``            9 dB          3GPP TR 38.901 Table 7.5-6: mean K-factor, UMa and
                                         UMi line of sight
``noise_dbm_hz``           -174 dBm/Hz   thermal noise density kT at 290 K (TR 36.814)
``bs_noise_figure_db``     5 dB          TR 36.814: BS (eNB) noise figure (uplink receiver)
``device_noise_figure_db`` 9 dB          TR 36.814: UE noise figure (downlink receiver)
``bs_power_dbm``           46 dBm        TR 36.814: total BS transmit power, 10 MHz carrier
``device_power_dbm``       23 dBm        device power class 3: 23 dBm (TS 38.101-1, TS 36.101;
                                         TR 36.814)
``power_split``            bandwidth     ``bandwidth`` (flat PSD) or ``none`` (full power each)
``se_model``               capped        ``capped``, ``cqi`` or ``shannon`` (above)
``cqi_table``              1             TS 38.214 Table 5.2.2.1-2 (1: up to 64QAM, top
                                         efficiency 5.5547 bit/s/Hz; the choice here: no
                                         256QAM, which not every device has on the uplink) or
                                         Table 5.2.2.1-3 (2: up to 256QAM, top 7.4063)
``snr_gap_db``             0 dB          SNR gap of the achievable rate, ``log2(1 + SNR/gap)``
                                         (0 dB: the Shannon bound up to the cap)
=========================  ============  ======================================================

The path loss can be any log-distance law: 3GPP TR 38.901 Table 7.4.1-1's optional UMi-Street
Canyon NLOS model ``32.4 + 20 log10(fc_GHz) + 31.9 log10(d_m)`` (shadowing 8.2 dB) is, at
3.5 GHz, ``pathloss_db_at_1km = 139.0`` and ``pathloss_slope_db = 31.9``. The testbed's earlier
model (POLICIES.md's reconstruction of the paper's: every device with the BS's full power, no
cap) is :data:`PAPER_PARAMS`.

Median SNRs with the defaults and 4 devices (equal split; 200 seeds x 25 epochs, printed by
``tests/unit/test_channel.py``): downlink 21 dB in a 20 MHz cell and 14 dB in a 100 MHz cell
(the power spread thinner), uplink 8 dB and 1 dB (a device's 23 dBm over 5 and 25 MHz); median
rates 28 and 117 Mbit/s down, 14 and 29 Mbit/s up. The earlier model gave 43/36 dB down and
36/29 dB up, 11-14 bit/s/Hz. There is no inter-cell interference: the SNRs are those of an
isolated cell.

Everything random is drawn from ``numpy.random.default_rng`` seeded by ``seed`` and the device
name (position, shadowing) or ``seed`` and the epoch (fading): ``gains(epoch)`` is random-access
and adding a device does not move the others. The model keeps the last epoch's gains and what
is derived from them (SNRs, efficiencies, rate forms); :class:`CellEpoch` (``cell_epoch``)
gives the rates and the min-max split of some devices in one epoch as plain floats, the same
numbers at less cost, for deciders that price many allocations per epoch.

A channel trace is a CSV ``time_s,device,rate_down_kbit,rate_up_kbit`` (one row per epoch and
device) written by :func:`write_trace` and read back, checked, by :func:`read_trace`.
"""

from __future__ import annotations

import bisect
import csv
import inspect
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

DIRECTIONS = ("down", "up")
TRACE_COLUMNS = ("time_s", "device", "rate_down_kbit", "rate_up_kbit")
FADINGS = ("rayleigh", "rician", "none")
POWER_SPLITS = ("bandwidth", "none")
SE_MODELS = ("capped", "cqi", "shannon")

#: 3GPP TS 38.214 4-bit CQI tables, CQI 1..15 as (modulation order Q_m, code rate x 1024,
#: efficiency bit/s/Hz as the table lists it); CQI 0 is "out of range".
#: 1: Table 5.2.2.1-2 (QPSK to 64QAM); 2: Table 5.2.2.1-3 (QPSK to 256QAM).
CQI_TABLES: dict[int, tuple[tuple[int, int, float], ...]] = {
    1: (
        (2, 78, 0.1523),
        (2, 120, 0.2344),
        (2, 193, 0.3770),
        (2, 308, 0.6016),
        (2, 449, 0.8770),
        (2, 602, 1.1758),
        (4, 378, 1.4766),
        (4, 490, 1.9141),
        (4, 616, 2.4063),
        (6, 466, 2.7305),
        (6, 567, 3.3223),
        (6, 666, 3.9023),
        (6, 772, 4.5234),
        (6, 873, 5.1152),
        (6, 948, 5.5547),
    ),
    2: (
        (2, 78, 0.1523),
        (2, 193, 0.3770),
        (2, 449, 0.8770),
        (4, 378, 1.4766),
        (4, 490, 1.9141),
        (4, 616, 2.4063),
        (6, 466, 2.7305),
        (6, 567, 3.3223),
        (6, 666, 3.9023),
        (6, 772, 4.5234),
        (6, 873, 5.1152),
        (8, 711, 5.5547),
        (8, 797, 6.2266),
        (8, 885, 6.9141),
        (8, 948, 7.4063),
    ),
}
_CQI_EFF = {t: np.array([e for _, _, e in rows]) for t, rows in CQI_TABLES.items()}
_CQI_LISTS = {t: a.tolist() for t, a in _CQI_EFF.items()}
_log2 = np.log2

#: The testbed's earlier channel (POLICIES.md's defaults): a 100 m cell from 10 m, the macro
#: path loss without penetration loss, 30 dBm at the BS given whole to every device, one 9 dB
#: noise figure, pure Shannon rates.
PAPER_PARAMS: dict[str, Any] = {
    "cell_radius_m": 100.0,
    "min_distance_m": 10.0,
    "penetration_loss_db": 0.0,
    "bs_noise_figure_db": 9.0,
    "device_noise_figure_db": 9.0,
    "bs_power_dbm": 30.0,
    "power_split": "none",
    "se_model": "shannon",
}


def dbm_to_w(dbm: float) -> float:
    """Power in dBm -> watts."""
    return 10.0 ** ((dbm - 30.0) / 10.0)


def shannon_rate_bps(
    bandwidth_hz: np.ndarray | float, snr_hz: np.ndarray | float
) -> np.ndarray | float:
    """``B log2(1 + s / B)`` in bit/s, where ``s = P g / N0`` (Hz) is the SNR per Hz of bandwidth.

    The rate of a transmitter that puts a fixed power on whatever bandwidth it gets, without
    a cap: the paper's model (:class:`ChannelModel` with :data:`PAPER_PARAMS`). Zero bandwidth
    gives rate 0. Vectorised over numpy arrays (broadcasting).
    """
    b = np.asarray(bandwidth_hz, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = b * np.log2(1.0 + np.asarray(snr_hz, dtype=np.float64) / b)
    r = np.where(b > 0, r, 0.0)
    return float(r) if r.ndim == 0 else r


def spectral_efficiency(
    snr: np.ndarray | float, se_model: str = "capped", cqi_table: int = 1, snr_gap_db: float = 0.0
) -> np.ndarray:
    """Spectral efficiency (bit/s/Hz) at linear SNR ``snr``, per ``se_model`` (module doc):
    ``log2(1 + snr/gap)``, capped at the top of CQI table ``cqi_table`` (``"capped"``),
    rounded down to the table's efficiencies (``"cqi"``) or neither (``"shannon"``)."""
    x = np.log2(1.0 + np.asarray(snr, dtype=np.float64) / 10.0 ** (snr_gap_db / 10.0))
    if se_model == "shannon":
        return x
    eff = _CQI_EFF[cqi_table]
    if se_model == "capped":
        return np.minimum(x, eff[-1])
    if se_model == "cqi":
        i = np.searchsorted(eff, x, side="right")  # entries the link reaches
        return np.where(i > 0, eff[np.maximum(i - 1, 0)], 0.0)
    raise ValueError(f"se_model must be one of {', '.join(SE_MODELS)}, got {se_model!r}")


# -- parameters ----------------------------------------------------------------------------
def _number(lo: float | None = None, unit: str = "") -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"must be a finite number{unit}, not {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo:g}{unit}, not {v!r}")

    return check


def _positive(unit: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        _number(None, unit)(v)
        if not v > 0:
            raise ValueError(f"must be > 0{unit}, not {v!r}")

    return check


def _choice(options: Sequence[Any]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or v not in options:
            raise ValueError(f"must be one of {', '.join(map(str, options))}, not {v!r}")

    return check


_CHECKS: dict[str, Callable[[Any], None]] = {
    "cell_radius_m": _positive(" (m)"),
    "min_distance_m": _positive(" (m)"),
    "pathloss_db_at_1km": _number(None, " (dB)"),
    "pathloss_slope_db": _positive(" (dB/decade)"),
    "penetration_loss_db": _number(0, " (dB)"),
    "antenna_gain_db": _number(None, " (dB)"),
    "shadowing_db": _number(0, " (dB)"),
    "fading": _choice(FADINGS),
    "rician_k_db": _number(None, " (dB)"),
    "noise_dbm_hz": _number(None, " (dBm/Hz)"),
    "bs_noise_figure_db": _number(0, " (dB)"),
    "device_noise_figure_db": _number(0, " (dB)"),
    "bs_power_dbm": _number(None, " (dBm)"),
    "device_power_dbm": _number(None, " (dBm)"),
    "power_split": _choice(POWER_SPLITS),
    "se_model": _choice(SE_MODELS),
    "cqi_table": _choice(tuple(CQI_TABLES)),
    "snr_gap_db": _number(0, " (dB)"),
}


def check_channel_params(params: Mapping[str, Any], complete: bool = True) -> list[tuple[str, str]]:
    """``(key, problem)`` for each unknown key and bad value among :class:`ChannelModel`'s
    keyword arguments ``params`` (empty: all good). ``complete``: ``params`` is the whole set
    (missing keys take their defaults), so that keys are also checked against each other
    (``min_distance_m <= cell_radius_m``)."""
    problems = []
    for key, value in params.items():
        check = _CHECKS.get(key)
        if check is None:
            problems.append((key, f"unknown channel parameter (valid: {', '.join(_CHECKS)})"))
            continue
        try:
            check(value)
        except ValueError as e:
            problems.append((key, str(e)))
    if complete and not problems:
        full = {**CHANNEL_DEFAULTS, **params}
        if full["min_distance_m"] > full["cell_radius_m"]:
            msg = (
                f"must be <= cell_radius_m ({full['cell_radius_m']:g}), "
                f"not {full['min_distance_m']!r}"
            )
            problems.append(("min_distance_m", msg))
    return problems


class CellGains:
    """The cell's constants (checked) and each device's channel gain per decision epoch:
    placement, path loss, penetration loss, shadowing and fading, with a per-epoch cache of what
    derives from them. :class:`ChannelModel` turns them into SNRs, rates and bandwidth splits
    (its docstring lists the parameters).
    """

    def __init__(
        self,
        devices: int | Sequence[str],
        seed: int = 0,
        *,
        cell_radius_m: float = 200.0,
        min_distance_m: float = 35.0,
        pathloss_db_at_1km: float = 128.1,
        pathloss_slope_db: float = 37.6,
        penetration_loss_db: float = 20.0,
        antenna_gain_db: float = 0.0,
        shadowing_db: float = 8.0,
        fading: str = "rayleigh",
        rician_k_db: float = 9.0,
        noise_dbm_hz: float = -174.0,
        bs_noise_figure_db: float = 5.0,
        device_noise_figure_db: float = 9.0,
        bs_power_dbm: float = 46.0,
        device_power_dbm: float = 23.0,
        power_split: str = "bandwidth",
        se_model: str = "capped",
        cqi_table: int = 1,
        snr_gap_db: float = 0.0,
    ):
        names = [f"dev{i}" for i in range(devices)] if isinstance(devices, int) else list(devices)
        if not names:
            raise ConfigError("channel: no devices")
        if len(set(names)) != len(names):
            raise ConfigError(f"channel: duplicate device names in {names}")
        params = {k: v for k, v in locals().items() if k in _CHECKS}
        problems = check_channel_params(params)
        if problems:
            raise ConfigError([f"channel.{k}: {m}" for k, m in problems])
        self.devices: tuple[str, ...] = tuple(names)
        self.index = {d: i for i, d in enumerate(self.devices)}
        self.seed = int(seed)
        self.fading = fading
        self.params = params
        dist, shadow = [], []
        for name in self.devices:
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
            u, z = rng.random(), rng.standard_normal()
            # uniform by area in the annulus: r^2 uniform in [r_min^2, R^2]
            dist.append(math.sqrt(min_distance_m**2 + u * (cell_radius_m**2 - min_distance_m**2)))
            shadow.append(shadowing_db * z)
        self.distance_m = np.array(dist)
        self.shadowing_db = np.array(shadow)
        self.pathloss_db = pathloss_db_at_1km + pathloss_slope_db * np.log10(self.distance_m / 1e3)
        self.large_scale_gain = 10.0 ** (
            (antenna_gain_db - penetration_loss_db - self.pathloss_db - self.shadowing_db) / 10.0
        )
        #: noise per Hz at the receiver of each direction (W/Hz)
        self.noise_w_hz = {
            "down": dbm_to_w(noise_dbm_hz + device_noise_figure_db),
            "up": dbm_to_w(noise_dbm_hz + bs_noise_figure_db),
        }
        #: the transmitter's whole power in each direction (W): the BS's, one device's
        self.power_w = {"down": dbm_to_w(bs_power_dbm), "up": dbm_to_w(device_power_dbm)}
        self.power_split = power_split
        self.se_model, self.cqi_table, self.snr_gap_db = se_model, int(cqi_table), snr_gap_db
        self._k_lin = 10.0 ** (rician_k_db / 10.0)
        # spectral_efficiency's constants, for _se_scalar
        self._gap, self._top = 10.0 ** (snr_gap_db / 10.0), _CQI_LISTS[self.cqi_table][-1]
        self._cache_epoch = -1
        self._cache_gain = self.large_scale_gain
        # what is derived from the gains of epoch ``_cache_epoch`` (SNRs, efficiencies, rate
        # forms), by key; emptied when the epoch changes
        self._memo: dict[tuple[Any, ...], Any] = {}

    # -- gains -----------------------------------------------------------------------------
    def fading_gain(self, epoch: int) -> np.ndarray:
        """``|h|^2`` per device for ``epoch`` (mean 1; ones without fading)."""
        n = len(self.devices)
        if self.fading == "none":
            return np.ones(n)
        rng = np.random.default_rng([self.seed, 0x5EED, int(epoch)])
        if self.fading == "rayleigh":
            return rng.exponential(1.0, n)
        # Rician: a fixed line-of-sight part of power K/(K+1) plus a CN(0, 1/(K+1)) scatter
        k = self._k_lin
        z = rng.standard_normal((n, 2)) / math.sqrt(2.0)
        re = math.sqrt(k / (k + 1.0)) + z[:, 0] / math.sqrt(k + 1.0)
        im = z[:, 1] / math.sqrt(k + 1.0)
        return re * re + im * im

    def gains(self, epoch: int = 0) -> np.ndarray:
        """Linear channel gain per device in epoch ``epoch``: antenna gains, path loss,
        penetration loss, shadowing and fading."""
        if epoch != self._cache_epoch:
            self._cache_gain = self.large_scale_gain * self.fading_gain(epoch)
            self._cache_epoch = epoch
            self._memo = {}
        return self._cache_gain

    def _derived(self, epoch: int, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """``make()``, computed once per epoch and ``key`` (kept until the epoch changes; not
        to be modified by the caller)."""
        if epoch != self._cache_epoch:
            self.gains(epoch)
        memo = self._memo
        value = memo.get(key)
        if value is None:
            if len(memo) > 64:  # many cells' budgets in one epoch: start over
                memo.clear()
            memo[key] = value = make()
        return value

    def _snr_hz(self, epoch: int, direction: str) -> np.ndarray:
        """:meth:`snr_per_hz` of ``epoch``, shared (per-epoch cache): read only."""
        return self._derived(
            epoch,
            ("snr", direction),
            lambda: self.power_w[direction] * self.gains(epoch) / self.noise_w_hz[direction],
        )


class ChannelModel(CellGains):
    """Per-device channel gains and rates of one cell, per decision epoch (module doc).

    Parameters
    ----------
    devices:
        Device names, or a count ``n`` (names ``dev0 .. dev{n-1}``).
    seed:
        Seed of every random draw.
    cell_radius_m, min_distance_m, pathloss_db_at_1km, pathloss_slope_db, penetration_loss_db,
    antenna_gain_db, shadowing_db, fading, rician_k_db, noise_dbm_hz, bs_noise_figure_db,
    device_noise_figure_db, bs_power_dbm, device_power_dbm, power_split, se_model, cqi_table,
    snr_gap_db:
        The model's constants: the table in the module docstring (defaults and sources).

    Raises
    ------
    ConfigError
        One line per bad parameter, naming it (``channel.<key>: ...``).
    """

    def _se_split(self, epoch: int, total_hz: float) -> np.ndarray:
        """Spectral efficiency of each device on the split downlink of a cell of ``total_hz``
        (> 0) in ``epoch``: the same whatever its bandwidth (per-epoch cache: read only)."""
        return self._derived(
            epoch,
            ("se-split", total_hz),
            lambda: self.spectral_efficiency(self._snr_hz(epoch, "down") / total_hz),
        )

    # -- power, SNR, rate ------------------------------------------------------------------
    @staticmethod
    def _check_direction(direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")

    def _bandwidths(
        self, bandwidth_hz: np.ndarray | float, total_hz: float | None
    ) -> tuple[np.ndarray, float]:
        n = len(self.devices)
        b = np.asarray(bandwidth_hz, dtype=np.float64)
        if b.ndim == 0:
            b = np.full(n, float(b))
        elif b.shape != (n,):
            raise ValueError(f"bandwidth_hz: one per device ({n}) or a scalar, got shape {b.shape}")
        # default: the bandwidths given are the whole cell
        return b, float(b.sum()) if total_hz is None else float(total_hz)

    def _snr(self, b: np.ndarray, total_hz: float, direction: str, epoch: int) -> np.ndarray:
        s_hz = self._snr_hz(epoch, direction)
        if direction == "down" and self.power_split == "bandwidth":
            return np.where(b > 0, s_hz / total_hz, 0.0) if total_hz > 0 else np.zeros(len(b))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, s_hz / b, 0.0)

    def tx_power_w(
        self,
        bandwidth_hz: np.ndarray | float,
        direction: str = "down",
        *,
        total_hz: float | None = None,
    ) -> np.ndarray:
        """Transmit power (W) per device in ``direction`` for its bandwidth ``bandwidth_hz``
        (scalar: every device; or one per device), 0 without bandwidth.

        Downlink: the BS's power ``P`` in proportion to the device's share of the cell's
        ``total_hz`` (``P B_k / total_hz``: the shares add up to ``P`` when the bandwidths add
        up to the cell's) or, with ``power_split = "none"``, ``P`` to each. Uplink: the device's
        own power. ``total_hz``: the cell's bandwidth (default: the sum of the bandwidths, a
        scalar counting once per device)."""
        self._check_direction(direction)
        b, total = self._bandwidths(bandwidth_hz, total_hz)
        p = self.power_w[direction]
        if direction == "down" and self.power_split == "bandwidth":
            return p * b / total if total > 0 else np.zeros(len(b))
        return np.where(b > 0, p, 0.0)

    def snr(
        self,
        bandwidth_hz: np.ndarray | float,
        direction: str = "down",
        epoch: int = 0,
        *,
        total_hz: float | None = None,
    ) -> np.ndarray:
        """Linear SNR per device over its bandwidth: ``P_k g_k / (N0 B_k)`` (0 without
        bandwidth). Downlink with the power split: ``P g_k / (N0 total_hz)`` whatever ``B_k``.
        Arguments as :meth:`tx_power_w`."""
        self._check_direction(direction)
        b, total = self._bandwidths(bandwidth_hz, total_hz)
        return self._snr(b, total, direction, epoch)

    def spectral_efficiency(self, snr: np.ndarray | float) -> np.ndarray:
        """bit/s/Hz at linear SNR ``snr`` under this model's ``se_model``, ``cqi_table`` and
        ``snr_gap_db`` (:func:`spectral_efficiency`)."""
        return spectral_efficiency(snr, self.se_model, self.cqi_table, self.snr_gap_db)

    def _se_scalar(self, snr: float) -> float:
        """:meth:`spectral_efficiency` of one SNR (a float): the same operations, as floats
        but for numpy's ``log2`` (whose result on a scalar is its result on an array)."""
        x = float(_log2(1.0 + snr / self._gap))
        if self.se_model == "capped":
            return min(x, self._top)  # as np.minimum, nan included
        if self.se_model == "shannon":
            return x
        eff = _CQI_LISTS[self.cqi_table]
        i = bisect.bisect_right(eff, x)  # entries the link reaches
        return eff[i - 1] if i > 0 else 0.0

    def rates_bps(
        self,
        bandwidth_hz: np.ndarray | float,
        direction: str = "down",
        epoch: int = 0,
        *,
        total_hz: float | None = None,
    ) -> np.ndarray:
        """Rate per device (bit/s): ``B_k se(SNR_k)`` in ``direction`` and ``epoch``, for the
        bandwidth(s) ``bandwidth_hz`` (scalar: every device; or one per device) in a cell of
        ``total_hz`` (default: the sum of the bandwidths; it sets the downlink's power shares).
        """
        self._check_direction(direction)
        b, total = self._bandwidths(bandwidth_hz, total_hz)
        if direction == "down" and self.power_split == "bandwidth":
            if total > 0:  # the SNR (and so the efficiency) is the cell's
                return np.where(b > 0, b * self._se_split(epoch, total), 0.0)
            se = self.spectral_efficiency(self._snr(b, total, direction, epoch))
        else:
            return self._tied_rates(self._snr_hz(epoch, direction), b)
        return np.where(b > 0, b * se, 0.0)

    def _tied_rates(self, s_hz: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Rates (bit/s) at bandwidths ``b`` of transmitters whose power goes whole onto their
        bandwidth, ``s_hz`` their :meth:`snr_per_hz`: SNR ``s / B``; 0 without bandwidth."""
        se = self.spectral_efficiency(s_hz / np.where(b > 0, b, math.inf))
        return np.where(b > 0, b * se, 0.0)

    def rate_bps(
        self,
        device: str,
        bandwidth_hz: float,
        direction: str = "down",
        epoch: int = 0,
        *,
        total_hz: float | None = None,
    ) -> float:
        """Rate (bit/s) of ``device`` with ``bandwidth_hz`` in ``direction``; ``total_hz``:
        the cell's bandwidth (default: ``bandwidth_hz`` for every device, an equal split)."""
        if device not in self.index:
            raise KeyError(f"channel: unknown device {device!r} (have: {', '.join(self.devices)})")
        r = self.rates_bps(bandwidth_hz, direction, epoch, total_hz=total_hz)
        return float(r[self.index[device]])

    def snr_per_hz(self, epoch: int = 0, direction: str = "down") -> np.ndarray:
        """``P g / N0`` per device (Hz) with the whole power of the direction's transmitter
        (the BS's on the downlink): the SNR a 1 Hz channel would see if it got all of it.

        This is the ``s`` of the paper's rate ``B log2(1 + s/B)``; it is this model's rate only
        for ``power_split = "none"`` (or the uplink) with ``se_model = "shannon"`` and no gap.
        :meth:`rate_form` gives this model's rate in closed form."""
        self._check_direction(direction)
        return self._snr_hz(epoch, direction).copy()

    def rate_form(
        self, direction: str = "down", epoch: int = 0, *, total_hz: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(x, cap)`` per device such that its rate with bandwidth ``B`` in a cell of
        ``total_hz`` is ``B min(log2(1 + x/B), cap)`` (bit/s).

        Where the transmitter's power goes whole onto ``B`` (uplink; downlink without the
        power split) ``x = P g / (N0 gap)`` (Hz) and ``cap`` is the CQI table's top (``inf``
        under ``"shannon"``); the split downlink's SNR does not depend on ``B``: ``x = inf`` and
        ``cap`` is its spectral efficiency. Exact for ``se_model`` ``"capped"`` and
        ``"shannon"`` and for the split downlink; under ``"cqi"`` the power-tied rate is its
        upper envelope (the table's steps are not in this form)."""
        self._check_direction(direction)
        x, cap = self._rate_form(direction, epoch, total_hz)
        return x.copy(), cap.copy()

    def _rate_form(
        self, direction: str, epoch: int, total_hz: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rate_form`, shared (per-epoch cache): read only."""
        return self._derived(
            epoch,
            ("form", direction, total_hz),
            lambda: self._make_rate_form(direction, epoch, total_hz),
        )

    def _make_rate_form(
        self, direction: str, epoch: int, total_hz: float
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.devices)
        if direction == "down" and self.power_split == "bandwidth":
            if total_hz > 0 and total_hz / n > 0:
                se = self._se_split(epoch, total_hz)
            else:
                se = self.spectral_efficiency(
                    self.snr(total_hz / n, "down", epoch, total_hz=total_hz)
                )
            return np.full(n, math.inf), np.asarray(se, dtype=np.float64)
        x = self._snr_hz(epoch, direction) / 10.0 ** (self.snr_gap_db / 10.0)
        cap = math.inf if self.se_model == "shannon" else float(_CQI_EFF[self.cqi_table][-1])
        return x, np.full(n, cap)

    def min_max_bandwidth(
        self,
        bits_down: np.ndarray,
        bits_up: np.ndarray,
        fixed_ms: np.ndarray | float,
        epoch: int,
        total_hz: float,
        *,
        rtol: float = 1e-9,
    ) -> np.ndarray:
        """Split ``total_hz`` over the devices to minimise ``max_k t_k`` where
        ``t_k = fixed_ms_k + bits_down_k / r_down(B_k) + bits_up_k / r_up(B_k)`` (ms), at this
        channel's rates in ``epoch`` (:meth:`rate_form`; the BS's power spread over
        ``total_hz``). Arrays are per device of the model; devices with no bits get none.

        The latency model's min-max (:func:`testbed.policy.bandwidth.min_max_bandwidth`) for
        this channel's rates rather than the paper's ``B log2(1 + s/B)``: every rate here is
        concave in ``B``, so each ``t_k`` falls and is convex, and the optimum equalises the
        loaded devices: the least ``T`` with ``sum_k B_k(T) <= total_hz``, ``B_k(T)`` the least
        bandwidth with ``t_k <= T``. ``B_k(T)`` by Newton on the concave ``1 / transfer``
        (from the left, warm-started), ``T`` by Newton on the convex, falling
        ``sum_k B_k(T)`` with a bisection bracket. ``rtol``: relative tolerance on ``T`` and on
        the bandwidth sum."""
        n = len(self.devices)
        kd = (1e3 * _per_device(bits_down, n)).tolist()
        ku = (1e3 * _per_device(bits_up, n)).tolist()
        fixed = _per_device(fixed_ms, n).tolist()
        if not total_hz > 0:
            raise ValueError(f"min_max_bandwidth: total_hz must be > 0, got {total_hz}")
        out = np.zeros(n)
        idx = [i for i in range(n) if kd[i] > 0 or ku[i] > 0]
        if not idx:
            return out
        xd, cd, xu, cu = self._form_lists(epoch, total_hz)
        dev = [_transfer(kd[i], xd[i], cd[i], ku[i], xu[i], cu[i]) for i in idx]
        out[idx] = _min_max_solve(dev, [fixed[i] for i in idx], total_hz, rtol)
        return out

    def _form_lists(self, epoch: int, total_hz: float) -> tuple[list[float], ...]:
        """``(xd, cd, xu, cu)``: :meth:`rate_form` both ways as lists (per-epoch cache)."""
        return self._derived(
            epoch,
            ("form-lists", total_hz),
            lambda: tuple(
                a.tolist() for d in DIRECTIONS for a in self._rate_form(d, epoch, total_hz)
            ),
        )

    def cell_epoch(
        self, epoch: int, total_hz: float, index: Sequence[int] | None = None
    ) -> CellEpoch:
        """The devices ``index`` (indices into :attr:`devices`; default: all) in ``epoch`` and
        a cell of ``total_hz``, for pricing many allocations (:class:`CellEpoch`)."""
        return CellEpoch(
            self, epoch, total_hz, range(len(self.devices)) if index is None else index
        )


class CellEpoch:
    """Some devices of a :class:`ChannelModel` in one epoch and a cell of ``total_hz``, in
    plain floats: for a decider that prices many allocations in one epoch (the WDMoE
    policies), without numpy's per-call cost on a handful of devices.

    :meth:`rates` is :meth:`ChannelModel.rates_bps` both ways and :meth:`min_max` is
    :meth:`ChannelModel.min_max_bandwidth`, for these devices, with the same floating-point
    operations in the same order: the same results.

    Parameters
    ----------
    model:
        The channel.
    epoch:
        The decision epoch (its fading).
    total_hz:
        The cell's bandwidth (the BS's power is spread over it).
    index:
        The devices, as indices into ``model.devices``, in any order: the lists that the
        methods take and return follow it.
    """

    def __init__(self, model: ChannelModel, epoch: int, total_hz: float, index: Sequence[int]):
        self.model, self.epoch, self.total_hz = model, epoch, total_hz
        self.index = list(index)
        # the common case, in floats here; else the model's own methods
        self._plain = total_hz > 0 and total_hz / len(model.devices) > 0
        self._links: tuple[list[float], ...] | None = None

    def _floats(self) -> tuple[list[float], ...]:
        """The devices' ``(xd, cd, xu, cu)`` (:meth:`ChannelModel.rate_form`) and SNRs per Hz
        ``(s_down, s_up)`` (:meth:`ChannelModel.snr_per_hz`), made once: the model's formulas,
        element by element."""
        if self._links is None:
            m = self.model
            g = m.gains(self.epoch).tolist()
            gain = [g[i] for i in self.index]
            snr = [[m.power_w[d] * x / m.noise_w_hz[d] for x in gain] for d in DIRECTIONS]
            gap = 10.0 ** (m.snr_gap_db / 10.0)
            cap = math.inf if m.se_model == "shannon" else float(_CQI_EFF[m.cqi_table][-1])
            form = []
            for d, s_hz in zip(DIRECTIONS, snr):
                if d == "down" and m.power_split == "bandwidth":  # the split downlink
                    form += [
                        [math.inf] * len(s_hz),
                        [m._se_scalar(s / self.total_hz) for s in s_hz],
                    ]
                else:
                    form += [[s / gap for s in s_hz], [cap] * len(s_hz)]
            self._links = (*form, *snr)
        return self._links

    def rates(self, bandwidth_hz: Sequence[float]) -> tuple[list[float], list[float]]:
        """``(down, up)`` rates (bit/s) of the devices at ``bandwidth_hz`` (one per device):
        :meth:`ChannelModel.rates_bps` of each direction (the spectral efficiency one device
        at a time: numpy's ``log2`` of a scalar is its ``log2`` of an array's element)."""
        m = self.model
        if not self._plain:
            full = np.zeros(len(m.devices))
            full[self.index] = bandwidth_hz
            return tuple(
                m.rates_bps(full, d, self.epoch, total_hz=self.total_hz)[self.index].tolist()
                for d in DIRECTIONS
            )  # type: ignore[return-value]
        _, se_split, _, _, *snr = self._floats()
        out = []
        for d, s_hz in zip(DIRECTIONS, snr):
            if d == "down" and m.power_split == "bandwidth":  # the cell's SNR and efficiency
                out.append([b * se if b > 0 else 0.0 for b, se in zip(bandwidth_hz, se_split)])
            else:  # SNR s / B_k
                se_of = m._se_scalar
                out.append([b * se_of(s / b) if b > 0 else 0.0 for b, s in zip(bandwidth_hz, s_hz)])
        return out[0], out[1]

    def min_max(
        self,
        bits_down: Sequence[float],
        bits_up: Sequence[float],
        fixed_ms: Sequence[float],
        rtol: float = 1e-9,
    ) -> list[float]:
        """:meth:`ChannelModel.min_max_bandwidth` for these devices (the others carry
        nothing): the bandwidth of each (Hz) minimising the largest
        ``fixed_ms + bits_down / r_down + bits_up / r_up``; 0 for a device with no bits."""
        if not self._plain:
            m, full = self.model, []
            for a in (bits_down, bits_up, fixed_ms):
                full.append(np.zeros(len(m.devices)))
                full[-1][self.index] = a
            return m.min_max_bandwidth(*full, self.epoch, self.total_hz, rtol=rtol)[
                self.index
            ].tolist()
        xd, cd, xu, cu, _, _ = self._floats()
        dev, c, at = [], [], []
        # the solver meets the loaded devices in the model's order (its sums run in it)
        for j in sorted(range(len(self.index)), key=self.index.__getitem__):
            k_d, k_u = 1e3 * bits_down[j], 1e3 * bits_up[j]
            if k_d > 0 or k_u > 0:
                dev.append(_transfer(k_d, xd[j], cd[j], k_u, xu[j], cu[j]))
                c.append(float(fixed_ms[j]))
                at.append(j)
        out = [0.0] * len(self.index)
        if dev:
            for j, b in zip(at, _min_max_solve(dev, c, self.total_hz, rtol)):
                out[j] = b
        return out


LN2 = math.log(2.0)


def _per_device(x: np.ndarray | float, n: int) -> np.ndarray:
    """``x`` as a float64 array of ``n`` (a scalar repeated; broadcast as numpy does)."""
    a = np.asarray(x, dtype=np.float64)
    if a.shape == (n,):
        return a
    return np.full(n, float(a)) if a.ndim == 0 else np.broadcast_to(a, (n,))


# One device's transfer time ``f(B) = kd / r_d(B) + ku / r_u(B)`` (ms; ``k`` in bit x 1000),
# ``r(B) = B min(log2(1 + x/B), cap)`` each way (:meth:`ChannelModel.rate_form`), is given to
# the functions below as the tuple ``(kd, xd, cd, ku, xu, cu, floor)`` (:func:`_transfer`).
# Plain floats and inlined rates: the solver runs in the policies' decisions.


def _transfer(
    kd: float, xd: float, cd: float, ku: float, xu: float, cu: float
) -> tuple[float, ...]:
    """The transfer tuple, with ``floor`` the time as ``B -> inf``: ``k ln2 / x`` each way
    (0 for a rate that grows without bound; ``inf`` for one that stays 0)."""
    floor = 0.0
    for k, x, cap in ((kd, xd, cd), (ku, xu, cu)):
        if k > 0:
            floor += math.inf if cap <= 0.0 or x <= 0.0 else k * LN2 / x
    return (kd, xd, cd, ku, xu, cu, floor)


def _rate_slope(b: float, x: float, c: float) -> tuple[float, float]:
    """One direction's rate ``r(b) = b min(log2(1 + x / b), c)`` and ``r'(b)``."""
    if x == math.inf:
        return c * b, c
    q = x / b
    lg = math.log1p(q) / LN2
    if lg >= c:
        return c * b, c
    return b * lg, lg - q / ((1.0 + q) * LN2)


def _transfer_ms(
    b: float, kd: float, xd: float, cd: float, ku: float, xu: float, cu: float
) -> tuple[float, float]:
    """``f(b)`` and ``f'(b)`` (``(inf, -inf)`` where a needed rate is 0)."""
    f = df = 0.0
    for k, x, c in ((kd, xd, cd), (ku, xu, cu)):
        if k > 0:
            r, dr = _rate_slope(b, x, c)
            if r <= 0.0:
                return math.inf, -math.inf
            f += k / r
            df -= k * dr / (r * r)
    return f, df


def _least_bandwidth(
    tau: float,
    b: float,
    rtol: float,
    kd: float,
    xd: float,
    cd: float,
    ku: float,
    xu: float,
    cu: float,
    floor: float,
) -> tuple[float, float]:
    """Least ``B`` with ``f(B) <= tau`` and ``f'`` there (``inf`` when no bandwidth is
    enough), from ``b``. Newton on the concave ``h = 1 / f``: from any point its tangent
    lies above it, so the steps land left of the root and then climb. (:func:`_transfer_ms`
    inlined: the same operations, without a call per step.)"""
    if tau <= floor * (1.0 + 1e-12):
        return math.inf, 0.0
    inf, log1p = math.inf, math.log1p
    target = 1.0 / tau
    stop = tau * (1.0 + rtol)
    done = False
    steps = 0
    while True:
        # f, df = _transfer_ms(b, kd, xd, cd, ku, xu, cu)
        f = df = 0.0
        if kd > 0:
            if xd == inf:
                r, dr = cd * b, cd
            else:
                q = xd / b
                lg = log1p(q) / LN2
                if lg >= cd:
                    r, dr = cd * b, cd
                else:
                    r, dr = b * lg, lg - q / ((1.0 + q) * LN2)
            if r <= 0.0:
                f = inf
            else:
                f += kd / r
                df -= kd * dr / (r * r)
        if ku > 0 and f != inf:
            if xu == inf:
                r, dr = cu * b, cu
            else:
                q = xu / b
                lg = log1p(q) / LN2
                if lg >= cu:
                    r, dr = cu * b, cu
                else:
                    r, dr = b * lg, lg - q / ((1.0 + q) * LN2)
            if r <= 0.0:
                f = inf
            else:
                f += ku / r
                df -= ku * dr / (r * r)
        if f == inf:
            df = -inf
        if (done and f <= stop) or steps == 200:
            return b, df
        steps += 1
        if f == inf:  # no rate at all here: try wider
            b *= 2.0
            done = False
            continue
        nb = b + (target - 1.0 / f) * f * f / -df
        if nb <= 0.0:
            nb = 0.5 * b
        done = abs(nb - b) <= rtol * nb
        b = nb


def _min_max_solve(
    dev: list[tuple[float, ...]], c: list[float], total_hz: float, rtol: float
) -> list[float]:
    """The bandwidths of :meth:`ChannelModel.min_max_bandwidth` for the loaded devices
    ``dev`` (transfer tuples, above) with fixed times ``c`` (ms): the least ``T`` with
    ``sum_k B_k(T) <= total_hz`` by Newton on ``T`` inside a bisection bracket."""
    eq = total_hz / len(dev)
    # the equal split is feasible (T right of the optimum); no bandwidth is fast enough
    # to beat T_lo (every device's transfer time as B -> inf)
    hi = max(cj + _transfer_ms(eq, *d[:6])[0] for cj, d in zip(c, dev))
    lo = max(cj + d[6] for cj, d in zip(c, dev))
    if lo == math.inf:  # a device no bandwidth gets through: nothing to optimise
        return [eq] * len(dev)
    t, bw = hi, [eq] * len(dev)
    best = list(bw)
    for _ in range(200):
        new, slope = [], 0.0
        for cj, d, b0 in zip(c, dev, bw):
            b, df = _least_bandwidth(t - cj, b0, rtol, *d)
            if b == math.inf:
                break
            new.append(b)
            slope += 1.0 / df  # dB/dT = 1 / t'(B) < 0
        else:
            bw = new
            phi = sum(bw) - total_hz
            if phi <= 0.0:
                hi, best = t, list(bw)
            else:
                lo = t
            if abs(phi) <= rtol * total_hz:
                break
            nt = t - phi / slope
            if not lo < nt < hi:
                nt = 0.5 * (lo + hi)
            if abs(nt - t) <= rtol * t:
                break
            t = nt
            continue
        lo = t  # some device cannot reach T at all
        t = 0.5 * (lo + hi)
    if sum(bw) > total_hz:  # a hair left of T*: shrink to the budget
        scale = total_hz / sum(bw)
        bw = [b * scale for b in bw] if scale > 1.0 - 1e-6 else best
    return bw


#: every :class:`ChannelModel` parameter with its default (the recipe's ``links.channel``)
CHANNEL_DEFAULTS: dict[str, Any] = {
    k: p.default
    for k, p in inspect.signature(ChannelModel.__init__).parameters.items()
    if k in _CHECKS
}


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


def trace_rows(
    model: ChannelModel,
    epochs: int,
    bandwidth_hz: float | Mapping[str, float],
    epoch_s: float = 1.0,
    first_epoch: int = 0,
    total_hz: float | None = None,
) -> list[TraceRow]:
    """Rates of every device for ``epochs`` epochs (pure; :func:`write_trace` writes them).

    ``bandwidth_hz``: the total bandwidth, split equally over the devices, or a bandwidth per
    device (devices missing from the mapping get none). ``total_hz``: the cell's bandwidth,
    over which the BS spreads its power (default: ``bandwidth_hz``, or the mapping's sum).
    """
    b = _split(model, bandwidth_hz)
    total = float(b.sum()) if total_hz is None else float(total_hz)
    rows: list[TraceRow] = []
    for k in range(epochs):
        ep = first_epoch + k
        down = model.rates_bps(b, "down", ep, total_hz=total) / 1e3
        up = model.rates_bps(b, "up", ep, total_hz=total) / 1e3
        rows.extend(
            TraceRow(round(k * epoch_s, 9), d, float(down[i]), float(up[i]))
            for i, d in enumerate(model.devices)
        )
    return rows


def write_trace(
    path: str | Path,
    model: ChannelModel,
    epochs: int,
    bandwidth_hz: float | Mapping[str, float],
    epoch_s: float = 1.0,
    first_epoch: int = 0,
    total_hz: float | None = None,
) -> list[TraceRow]:
    """Write a channel trace CSV (``time_s,device,rate_down_kbit,rate_up_kbit``) and return
    its rows. See :func:`trace_rows` for the arguments."""
    rows = trace_rows(model, epochs, bandwidth_hz, epoch_s, first_epoch, total_hz)
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRACE_COLUMNS)
        for r in rows:
            w.writerow(
                [f"{r.time_s:.9g}", r.device, f"{r.rate_down_kbit:.6f}", f"{r.rate_up_kbit:.6f}"]
            )
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
        raise ConfigError(
            f"{path}:1: empty channel trace (expected header {','.join(TRACE_COLUMNS)})"
        )
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if tuple(header) != TRACE_COLUMNS:
        col = next(
            (i for i, (a, b) in enumerate(zip(header, TRACE_COLUMNS)) if a != b),
            min(len(header), len(TRACE_COLUMNS)),
        )
        raise ConfigError(
            f"{path}:1:{col + 1}: bad header {','.join(header)!r} "
            f"(expected {','.join(TRACE_COLUMNS)})"
        )
    rows: list[TraceRow] = []
    last_t: float | None = None
    seen: set[str] = set()
    for lineno, fields in enumerate(csv.reader(lines[1:]), start=2):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(TRACE_COLUMNS):
            raise ConfigError(
                f"{path}:{lineno}: expected {len(TRACE_COLUMNS)} fields "
                f"({','.join(TRACE_COLUMNS)}), got {len(fields)}"
            )
        vals: list[float] = []
        for col, name in ((1, "time_s"), (3, "rate_down_kbit"), (4, "rate_up_kbit")):
            raw = fields[col - 1].strip()
            try:
                v = float(raw)
            except ValueError:
                raise ConfigError(
                    f"{path}:{lineno}:{col}: {name}: {raw!r} is not a number"
                ) from None
            if not math.isfinite(v) or v < 0:
                raise ConfigError(
                    f"{path}:{lineno}:{col}: {name}: {raw!r} must be a finite number >= 0"
                )
            vals.append(v)
        device = fields[1].strip()
        if not device:
            raise ConfigError(f"{path}:{lineno}:2: device: empty name")
        t = vals[0]
        if last_t is not None and t < last_t:
            raise ConfigError(
                f"{path}:{lineno}:1: time_s: {t:g} goes back in time (previous row {last_t:g})"
            )
        if t != last_t:
            seen = set()
        if device in seen:
            raise ConfigError(f"{path}:{lineno}:2: device: {device!r} listed twice at time_s {t:g}")
        seen.add(device)
        last_t = t
        rows.append(TraceRow(t, device, vals[1], vals[2]))
    return rows
