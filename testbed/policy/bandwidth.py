"""The paper's latency model of one MoE layer and the bandwidth helpers every bandwidth policy
needs (pure): per-device transfer and layer latency, device loads, the compute profile's fit and
WDMoE's min–max bandwidth split.

The model [R] (POLICIES.md, "Shared latency model"): device ``k`` serves ``N_k``
token-rows of the step; with bandwidth ``B_k`` its latency is::

    t_k = N_k S / r_down(B_k) + c_k(N_k) + N_k S / r_up(B_k),     c_k(N) = a_k + b_k N

with ``S`` bytes per token per direction, ``r(B) = B log2(1 + s/B)`` the Shannon rate (``s`` the
device's SNR per Hz in that direction, see :mod:`testbed.net.channel`) and ``c_k`` the profiled
compute time. The layer takes ``T_l = t_bs + max_{k: N_k > 0} t_k``. WDMoE optimises over it
(:func:`min_max_bandwidth`).

Units: bandwidth in Hz, rates in bit/s (kbit/s where named so), payload in bytes, times in ms.
Arrays are indexed by device (the caller's device order); ``N_k = 0`` devices cost nothing and
get no bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..net.channel import shannon_rate_bps

LN2 = math.log(2.0)


# -- the model -----------------------------------------------------------------------------
def transfer_ms(
    n_tokens: np.ndarray | float,
    bandwidth_hz: np.ndarray | float,
    snr_down_hz: np.ndarray | float,
    snr_up_hz: np.ndarray | float,
    bytes_per_token: float,
) -> np.ndarray:
    """Down + up transfer time (ms) of ``n_tokens`` tokens; ``inf`` where tokens meet no
    bandwidth, 0 where there are no tokens."""
    n = np.asarray(n_tokens, dtype=np.float64)
    bits = 8.0 * float(bytes_per_token) * n * 1e3
    rd = np.asarray(shannon_rate_bps(bandwidth_hz, snr_down_hz))
    ru = np.asarray(shannon_rate_bps(bandwidth_hz, snr_up_hz))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = bits / rd + bits / ru
    return np.where(n > 0, t, 0.0)


def device_latency_ms(
    n_tokens: np.ndarray | float,
    bandwidth_hz: np.ndarray | float,
    snr_down_hz: np.ndarray | float,
    snr_up_hz: np.ndarray | float,
    bytes_per_token: float,
    a_ms: np.ndarray | float,
    b_ms: np.ndarray | float,
) -> np.ndarray:
    """``t_k`` per device (ms): transfer down + compute ``a + b N`` + transfer up; 0 if idle."""
    n = np.asarray(n_tokens, dtype=np.float64)
    t = transfer_ms(n, bandwidth_hz, snr_down_hz, snr_up_hz, bytes_per_token)
    return np.where(n > 0, t + np.asarray(a_ms) + np.asarray(b_ms) * n, 0.0)


def layer_latency_ms(device_ms: np.ndarray, bs_ms: float = 0.0) -> float:
    """``T_l = t_bs + max_k t_k`` (idle devices have ``t_k = 0``)."""
    return float(bs_ms) + (float(np.max(device_ms)) if len(device_ms) else 0.0)


def device_loads(expert_ids: np.ndarray, expert_device: np.ndarray, n_devices: int) -> np.ndarray:
    """``N_k``: token-rows per device for a selection ``expert_ids`` [N, K] (-1 = empty slot),
    where expert ``e`` runs on device ``expert_device[e]``."""
    ids = np.asarray(expert_ids).ravel()
    ids = ids[ids >= 0]
    return np.bincount(np.asarray(expert_device)[ids], minlength=n_devices)[:n_devices]


def fit_compute_profile(samples: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``c(N) = a + b N`` through ``(N, ms)`` samples, with ``a, b >= 0``.

    The constrained optimum of a two-parameter non-negative least squares is the best feasible
    one among: the free fit, the fit with ``a = 0``, the fit with ``b = 0`` and ``(0, 0)``.

    Raises
    ------
    ValueError
        With no samples, or non-finite values.
    """
    arr = np.asarray(list(samples), dtype=np.float64).reshape(-1, 2)
    if not len(arr):
        raise ValueError("fit_compute_profile: no samples")
    if not np.all(np.isfinite(arr)):
        raise ValueError("fit_compute_profile: non-finite sample")
    n, y = arr[:, 0], arr[:, 1]
    cands = [(0.0, 0.0), (max(float(y.mean()), 0.0), 0.0)]
    nn = float(n @ n)
    if nn > 0:
        cands.append((0.0, max(float(n @ y) / nn, 0.0)))
    if np.ptp(n) > 0:
        b, a = np.polyfit(n, y, 1)
        if a >= 0 and b >= 0:
            cands.append((float(a), float(b)))
    return min(cands, key=lambda ab: float(np.sum((ab[0] + ab[1] * n - y) ** 2)))


# -- min–max bandwidth ---------------------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    """Result of :func:`min_max_bandwidth`.

    Attributes
    ----------
    bandwidth_hz:
        ``B_k`` per device (0 for idle devices); ``sum <= total``.
    latency_ms:
        ``max_k t_k`` with that bandwidth (without ``t_bs``).
    device_ms:
        ``t_k`` per device (0 for idle devices).
    iterations:
        Outer iterations the solver took.
    """

    bandwidth_hz: np.ndarray
    latency_ms: float
    device_ms: np.ndarray
    iterations: int


def _rate_and_slope(b: float, s: float) -> tuple[float, float]:
    """``r(B)`` and ``r'(B)`` for SNR per Hz ``s``."""
    x = s / b
    lg = math.log1p(x) / LN2
    return b * lg, lg - x / ((1.0 + x) * LN2)


def _xfer_and_slope(b: float, sd: float, su: float, kbits: float) -> tuple[float, float]:
    """Transfer time ``f(B) = kbits (1/r_d + 1/r_u)`` (ms) and ``f'(B)``."""
    rd, dd = _rate_and_slope(b, sd)
    ru, du = _rate_and_slope(b, su)
    return kbits * (1.0 / rd + 1.0 / ru), -kbits * (dd / (rd * rd) + du / (ru * ru))


def _least_bandwidth(
    tau: float, sd: float, su: float, kbits: float, b0: float, rtol: float
) -> tuple[float, float]:
    """Least ``B`` with transfer time ``f(B) <= tau``, and ``f'(B)`` there (``inf`` if even
    infinite bandwidth is too slow: ``f(B) > kbits ln2 (1/s_d + 1/s_u)`` for every ``B``).

    Newton on ``h = 1/f`` (concave, increasing in ``B``): its tangent lies above it, so a step
    from any point lands left of the root and from there the iterates climb monotonically.
    ``b0`` is a warm start."""
    if tau <= kbits * LN2 * (1.0 / sd + 1.0 / su) * (1.0 + 1e-12):
        return math.inf, 0.0
    target = 1.0 / tau
    b = b0
    f, df = _xfer_and_slope(b, sd, su, kbits)
    for _ in range(200):
        # h = 1/f, h' = -f'/f^2; Newton step on h(B) = target
        step = (target - 1.0 / f) * f * f / -df
        nb = b + step
        if nb <= 0.0:
            nb = 0.5 * b
        done = abs(nb - b) <= rtol * nb
        b = nb
        f, df = _xfer_and_slope(b, sd, su, kbits)
        if done and f <= tau * (1.0 + rtol):
            break
    return b, df


def _solve_newton(
    loads: np.ndarray,
    total_hz: float,
    sd: np.ndarray,
    su: np.ndarray,
    bytes_per_token: float,
    a_ms: np.ndarray,
    b_ms: np.ndarray,
    rtol: float,
) -> tuple[np.ndarray, int]:
    idx = [int(i) for i in np.flatnonzero(loads > 0)]
    kb = [8.0 * bytes_per_token * float(loads[i]) * 1e3 for i in idx]
    c = [float(a_ms[i]) + float(b_ms[i]) * float(loads[i]) for i in idx]
    s_d = [float(sd[i]) for i in idx]
    s_u = [float(su[i]) for i in idx]
    m = len(idx)
    eq = total_hz / m
    # the equal split is feasible: T0 = its max latency lies right of the optimum; with
    # infinite bandwidth every device still needs c + f(inf): a lower bound
    hi = max(c[j] + _xfer_and_slope(eq, s_d[j], s_u[j], kb[j])[0] for j in range(m))
    lo = max(c[j] + kb[j] * LN2 * (1.0 / s_d[j] + 1.0 / s_u[j]) for j in range(m))
    t = hi
    bw = [eq] * m
    best = list(bw)
    it = 0
    for it in range(1, 201):
        new = list(bw)
        slope = 0.0
        for j in range(m):
            new[j], df = _least_bandwidth(t - c[j], s_d[j], s_u[j], kb[j], bw[j], rtol)
            if new[j] == math.inf:
                break
            slope += 1.0 / df  # dB_j/dT = 1 / f_j'(B_j) < 0
        else:
            bw = new
            phi = sum(bw) - total_hz
            if phi <= 0.0:
                hi, best = t, list(bw)
            else:
                lo = t
            if abs(phi) <= rtol * total_hz:
                break
            # Newton on the convex decreasing phi(T): one step from the right lands left of
            # T*, from there the steps climb monotonically (bracket [lo, hi] as safeguard)
            nt = t - phi / slope
            if not lo < nt < hi:
                nt = 0.5 * (lo + hi)
            if abs(nt - t) <= rtol * t:
                break
            t = nt
            continue
        lo = t  # some device cannot reach T at all
        t = 0.5 * (lo + hi)
    if sum(bw) > total_hz:  # landed a hair left of T*: shrink to the budget
        scale = total_hz / sum(bw)
        bw = [x * scale for x in bw] if scale > 1.0 - 1e-6 else best
    out = np.zeros(len(loads))
    out[idx] = bw
    return out, it


def _least_bandwidth_bisect(
    tau: np.ndarray, sd: np.ndarray, su: np.ndarray, kbits: np.ndarray, hi: float, iters: int
) -> np.ndarray:
    lo_b = np.full(len(tau), hi * 1e-15)
    hi_b = np.full(len(tau), float(hi))
    ok_hi = kbits * (1 / shannon_rate_bps(hi_b, sd) + 1 / shannon_rate_bps(hi_b, su)) <= tau
    for _ in range(iters):
        mid = 0.5 * (lo_b + hi_b)
        f = kbits * (1 / shannon_rate_bps(mid, sd) + 1 / shannon_rate_bps(mid, su))
        good = f <= tau
        hi_b = np.where(good, mid, hi_b)
        lo_b = np.where(good, lo_b, mid)
    return np.where(ok_hi, hi_b, np.inf)


def _solve_bisection(
    loads: np.ndarray,
    total_hz: float,
    sd: np.ndarray,
    su: np.ndarray,
    bytes_per_token: float,
    a_ms: np.ndarray,
    b_ms: np.ndarray,
    rtol: float,
) -> tuple[np.ndarray, int]:
    on = loads > 0
    n = loads[on].astype(np.float64)
    kb = 8.0 * bytes_per_token * n * 1e3
    c = a_ms[on] + b_ms[on] * n
    s_d, s_u = sd[on], su[on]
    eq = total_hz / len(n)
    t_hi = float(np.max(c + transfer_ms(n, eq, s_d, s_u, bytes_per_token)))
    t_lo = float(np.max(c + kb * LN2 * (1 / s_d + 1 / s_u)))  # latency with infinite bandwidth
    inner = max(30, math.ceil(math.log2(1.0 / rtol)) + 10)
    bw = np.full(len(n), eq)
    it = 0
    while t_hi - t_lo > rtol * t_hi and it < 200:
        it += 1
        t = 0.5 * (t_lo + t_hi)
        b = _least_bandwidth_bisect(t - c, s_d, s_u, kb, total_hz, inner)
        if float(np.sum(b)) <= total_hz:
            t_hi, bw = t, b
        else:
            t_lo = t
    out = np.zeros(len(loads))
    out[on] = bw
    return out, it


def min_max_bandwidth(
    loads: Sequence[float] | np.ndarray,
    total_hz: float,
    snr_down_hz: np.ndarray,
    snr_up_hz: np.ndarray,
    bytes_per_token: float,
    a_ms: np.ndarray | float,
    b_ms: np.ndarray | float,
    *,
    method: str = "newton",
    rtol: float = 1e-9,
) -> Allocation:
    """Split ``total_hz`` over the loaded devices to minimise ``max_k t_k`` for fixed loads.

    Each ``t_k(B)`` falls and is convex in ``B``, so the optimum equalises the latencies of all
    loaded devices: the smallest ``T`` with ``sum_k B_k(T) <= total_hz``, where ``B_k(T)`` is
    the least bandwidth giving ``t_k <= T``. ``method``:

    * ``"bisection"``: literally that — bisection on ``T``, each ``B_k(T)`` by an inner
      bisection (the reference reading of POLICIES.md);
    * ``"newton"`` (default; ~90x faster in bench/policies.py): the same fixed point by
      monotone Newton steps — on ``T`` from the feasible equal split downwards
      (``sum_k B_k(T)`` is convex, decreasing), and for each ``B_k(T)`` on the concave
      ``1/f_k`` from the left, warm-started.

    Idle devices (``loads == 0``) get no bandwidth. ``rtol`` is the relative tolerance on ``T``
    and on the bandwidth sum.
    """
    loads = np.asarray(loads, dtype=np.float64)
    d = len(loads)
    sd = np.broadcast_to(np.asarray(snr_down_hz, dtype=np.float64), (d,))
    su = np.broadcast_to(np.asarray(snr_up_hz, dtype=np.float64), (d,))
    a = np.broadcast_to(np.asarray(a_ms, dtype=np.float64), (d,))
    b = np.broadcast_to(np.asarray(b_ms, dtype=np.float64), (d,))
    if not total_hz > 0:
        raise ValueError(f"min_max_bandwidth: total_hz must be > 0, got {total_hz}")
    if not np.any(loads > 0):
        return Allocation(np.zeros(d), 0.0, np.zeros(d), 0)
    if method == "newton":
        bw, it = _solve_newton(loads, float(total_hz), sd, su, float(bytes_per_token), a, b, rtol)
    elif method == "bisection":
        bw, it = _solve_bisection(
            loads, float(total_hz), sd, su, float(bytes_per_token), a, b, rtol
        )
    else:
        raise ValueError(
            f"min_max_bandwidth: method must be 'newton' or 'bisection', got {method!r}"
        )
    dev = device_latency_ms(loads, bw, sd, su, bytes_per_token, a, b)
    return Allocation(bw, float(np.max(dev)), dev, it)
