"""The calibrated latency model of one MoE layer (pure): what the testbed measures, predicted
(the paper's model, for WDMoE's optimisation, is :mod:`testbed.policy.bandwidth`'s).

The model (:class:`LayerCostParams`, :func:`predict_layer_ms`): what one layer's
expert exchange costs on the testbed -- the quantity ``layers.csv`` calls ``moe_ms`` (the BS's
``run_layer``, first request out to last reply in). Per device ``k`` that serves ``E_k`` experts
with ``N_k`` token-rows in one call::

    t_k = call_ms_k + call_per_kb_ms_k KiB_k + air(m_down, r_down) + dev_ms_k + air(m_up, r_up)
    dev_ms_k = device_call_ms_k + a_k E_k + b_k N_k
    m_dir = header_dir + header_dir_per_expert E_k + N_k S       (bytes of the message)
    layer = bs_ms + t_max + bs_per_device_ms sum_{k != max} t_k / t_max

The last term is what calls running at the same time cost each other (:func:`overlap_ms`): the
BS handles their replies one by one, and on a local testbed the devices and the BS share the
host's cores -- each further call adds ``bs_per_device_ms`` in proportion to how much of the
slowest call it overlaps (all start together: ``t_k / t_max``).

``air`` is the time the link's leaf needs to let the message's frames through
(:func:`airtime_ms`): the message split into TCP segments of ``mtu - 52`` bytes, each charged
with its TCP/IP (52 B: 20 IP + 32 TCP with timestamps) and Ethernet (14 B) headers, as tc counts
frames; a TBF leaf lets its bucket (one frame plus ``bucket_slack_us`` of the rate) through free
when full, so a message costs ``max(0, wire - bucket)``; netem charges every frame, the first
too; the HTB-only tree lets its class bucket through. A bucket still refilling after the previous
messages lets through only what it holds (``tokens_down``/``tokens_up``; :func:`bucket_after`,
:func:`bucket_refilled` follow it; a rate change fills it: the kernel's ``tbf_change``).
``call_ms`` is the fixed cost of a call
(zmq, TCP, Python on both ends: round trip - airtime - device time), ``bs_ms`` the BS's own time
in the exchange (serialise, send, poll, deserialise); both are fitted per trial from profiling
samples (:func:`fit_layer_costs`). ``decision_ms`` and ``rate_change_ms`` are the policy's
decision and a decision epoch's tc change, which run in-line before the exchange: on the
layer's critical path but outside ``moe_ms`` (:func:`predict_critical_ms` adds them).

Units: bandwidth in Hz, rates in bit/s (kbit/s where named so), payload in bytes, times in ms.
Arrays are indexed by device (the caller's device order); ``N_k = 0`` devices cost nothing and
get no bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

# == the calibrated model ==================================================================
#: TCP/IP headers of every segment: IPv4 20 + TCP 20 + the timestamp option 12 (Linux's default)
TCPIP_BYTES = 52
#: Ethernet header: tc charges the frame from the destination MAC on (no FCS, no preamble)
ETH_BYTES = 14
#: leaves the model knows (``TcShaper.shaping_info()["mode"]``); ``none``: no shaping (airtime 0)
SHAPING_MODES = ("tbf", "netem", "htb", "none")
#: HTB class bucket: 2 ms of the rate, at least this (``testbed.net.tc.burst_bytes``)
HTB_MIN_BUCKET = 3200
HTB_BUCKET_MS = 2.0

# What a ``forward`` call carries besides the hidden states, per direction (local testbed, CURVE
# on), from tc's byte and packet counters and a capture on the BS's interfaces
# (bench/layer_costs.py): the msgpack header, every frame's ZMTP header and CURVE's MESSAGE box
# (command header, nonce, MAC, flags) -- 153 B down and 242 B up for a call of one expert, 63 B
# and ~80 B more per further expert (its descriptor, its timing, its frame's box).
HEADER_DOWN_BYTES = 90.0
HEADER_DOWN_PER_EXPERT_BYTES = 63.0
HEADER_UP_BYTES = 162.0
HEADER_UP_PER_EXPERT_BYTES = 80.0
#: segments a message takes beyond ``ceil(bytes / mss)``: zmq writes the tensor bytes and the
#: rest (header, boxes) in separate writes, and with Nagle off each write ends in a short
#: segment (captured: 8 KiB + 153 B down = 5 x 1448 + 952 + 153, seven frames, not six)
EXTRA_SEGMENTS = 1
#: zmq's output batch: a message no longer than this goes out in one write
ZMQ_BATCH_BYTES = 8192


def wire_frames(
    message_bytes: float, mtu: int = 1500, extra_segments: int = EXTRA_SEGMENTS
) -> tuple[int, float]:
    """(frames, bytes on the wire) of one message over TCP: ``ceil(m / mss) + extra_segments``
    segments (at most ``mss = mtu - 52`` payload bytes each; :data:`EXTRA_SEGMENTS` short ones
    where zmq's writes end, for messages over one :data:`ZMQ_BATCH_BYTES` write), each with
    :data:`TCPIP_BYTES` + :data:`ETH_BYTES`."""
    m = max(0.0, float(message_bytes))
    if m == 0:
        return 0, 0.0
    mss = int(mtu) - TCPIP_BYTES
    n = math.ceil(m / mss) + (int(extra_segments) if m > ZMQ_BATCH_BYTES else 0)
    return n, m + n * (TCPIP_BYTES + ETH_BYTES)


def free_bytes(
    rate_kbit: float,
    shaping: str = "tbf",
    bucket_bytes: float = 1514.0,
    bucket_slack_us: float = 50.0,
) -> float:
    """Bytes a leaf lets through at once after an idle spell (its bucket when full).

    * ``tbf``: ``bucket_bytes + ceil(rate * bucket_slack_us)`` (as ``tc.tbf_burst_bytes``
      sets ``burst``: one frame plus the timer slack);
    * ``netem``: 0 (every frame, the first too, waits for its transmission time);
    * ``htb``: the HTB class's bucket, ``max(3200, 2 ms of the rate)`` unless ``bucket_bytes``
      says otherwise (``shaping_info`` reads it back from tc);
    * ``none``: infinite.
    """
    if shaping == "tbf":
        return float(bucket_bytes) + math.ceil(float(rate_kbit) * float(bucket_slack_us) / 8000.0)
    if shaping == "netem":
        return 0.0
    if shaping == "htb":
        return (
            float(bucket_bytes)
            if bucket_bytes
            else max(HTB_MIN_BUCKET, float(rate_kbit) * HTB_BUCKET_MS / 8.0)
        )
    if shaping == "none":
        return math.inf
    raise ValueError(f"shaping must be one of {', '.join(SHAPING_MODES)}, got {shaping!r}")


def airtime_ms(
    message_bytes: float,
    rate_kbit: float,
    shaping: str = "tbf",
    bucket_bytes: float = 1514.0,
    bucket_slack_us: float = 50.0,
    mtu: int = 1500,
    tokens_bytes: float | None = None,
) -> float:
    """Time (ms) from a message of ``message_bytes`` entering the leaf to its last frame
    leaving it, at ``rate_kbit`` (kbit/s, as tc counts: frames with their Ethernet header).

    A token bucket holding ``tau`` bytes sends frame ``j`` once ``sum_{i<=j} p_i - tau`` bytes
    of the rate have passed, so the last frame leaves after ``max(0, wire - tau) / rate``:
    ``tau`` = :func:`free_bytes` when the bucket is full (``tokens_bytes`` None), or what it
    holds (``tokens_bytes``, capped at full: a bucket still refilling after the previous
    message). netem charges every frame (``tau = 0``). 0 for an empty message; ``inf`` at rate 0.
    """
    _, wire = wire_frames(message_bytes, mtu)
    if wire == 0 or shaping == "none":
        return 0.0
    if not rate_kbit or rate_kbit <= 0:
        return math.inf
    tau = free_bytes(rate_kbit, shaping, bucket_bytes, bucket_slack_us)
    if tokens_bytes is not None:
        tau = min(tau, max(0.0, float(tokens_bytes)))
    return max(0.0, wire - tau) * 8.0 / float(rate_kbit)


@dataclass(frozen=True)
class DeviceCosts:
    """A device's fitted costs (ms), see :class:`LayerCostParams`.

    Attributes
    ----------
    call_ms:
        Fixed cost of one call besides airtime and the device's time: zmq, TCP and Python on
        both ends (round trip - modelled airtime - device time).
    call_per_kb_ms:
        Cost per KiB of the call's messages (both ways) that the airtime does not hide: the
        sender encrypts (CURVE) and hands a message over before its first frame leaves, the
        receiver decrypts and copies it after its last frame arrived.
    device_call_ms:
        The device's time per call besides its experts (receive, unpack, reply).
    compute_a_ms, compute_b_ms:
        An expert's compute: ``a + b n`` for ``n`` token-rows (experts of one call run one
        after another).
    """

    call_ms: float = 0.0
    device_call_ms: float = 0.0
    compute_a_ms: float = 0.0
    compute_b_ms: float = 0.0
    call_per_kb_ms: float = 0.0

    def fixed_ms(self, message_bytes: float) -> float:
        """The call's cost besides airtime and device time, for ``message_bytes`` both ways."""
        return self.call_ms + self.call_per_kb_ms * message_bytes / 1024.0

    def device_ms(self, experts: float, rows: float) -> float:
        """The device's time for a call of ``experts`` experts and ``rows`` token-rows."""
        return self.device_call_ms + self.compute_a_ms * experts + self.compute_b_ms * rows


@dataclass(frozen=True)
class LayerCostParams:
    """Parameters of the calibrated layer model (module doc; :func:`predict_layer_ms`).

    Attributes
    ----------
    bytes_per_token:
        Payload per token-row per direction (expert width x wire dtype bytes).
    devices:
        :class:`DeviceCosts` per device, in the order of the arrays passed to
        :func:`predict_layer_ms` (``device_names`` names them; :meth:`for_devices` reorders).
        Devices beyond the tuple get ``default_device``.
    shaping, bucket_bytes, bucket_slack_us, mtu:
        The leaf that charges frames (``TcShaper.shaping_info()``: ``mode``, ``bucket_bytes``,
        ``bucket_slack_us``) and the interface MTU.
    header_down_bytes, header_down_per_expert_bytes, header_up_bytes,
    header_up_per_expert_bytes:
        Bytes a call carries besides the hidden states, per call and per expert, each way.
    bs_ms, bs_per_device_ms:
        The BS's own time in an exchange with one device, and what each further device called
        at the same time adds, in proportion to its overlap with the slowest call
        (:func:`overlap_ms`: replies handled one by one; on a local testbed the devices'
        contention for the host's cores).
    decision_ms, rate_change_ms:
        The policy's decision and an epoch's rate change (in-line before the exchange).
    """

    bytes_per_token: float
    devices: tuple[DeviceCosts, ...] = ()
    device_names: tuple[str, ...] = ()
    default_device: DeviceCosts = DeviceCosts()
    shaping: str = "tbf"
    bucket_bytes: float = 1514.0
    bucket_slack_us: float = 50.0
    mtu: int = 1500
    header_down_bytes: float = HEADER_DOWN_BYTES
    header_down_per_expert_bytes: float = HEADER_DOWN_PER_EXPERT_BYTES
    header_up_bytes: float = HEADER_UP_BYTES
    header_up_per_expert_bytes: float = HEADER_UP_PER_EXPERT_BYTES
    bs_ms: float = 0.0
    bs_per_device_ms: float = 0.0
    decision_ms: float = 0.0
    rate_change_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.shaping not in SHAPING_MODES:
            raise ValueError(
                f"shaping must be one of {', '.join(SHAPING_MODES)}, got {self.shaping!r}"
            )
        if self.device_names and self.devices and len(self.device_names) != len(self.devices):
            raise ValueError(
                "device_names and devices must have the same length (or no "
                "devices: every one gets default_device)"
            )

    def device(self, k: int) -> DeviceCosts:
        """Costs of device ``k`` in ``devices`` order; ``default_device`` past the end."""
        return self.devices[k] if k < len(self.devices) else self.default_device

    def for_devices(self, names: Sequence[str]) -> LayerCostParams:
        """The same parameters with ``devices`` in the order of ``names`` (unknown names get
        ``default_device``)."""
        by = dict(
            zip(self.device_names, self.devices or (self.default_device,) * len(self.device_names))
        )
        return replace(
            self,
            devices=tuple(by.get(n, self.default_device) for n in names),
            device_names=tuple(names),
        )

    def message_bytes(self, direction: str, experts: float, rows: float) -> float:
        """Bytes of one call's message ``direction`` (``down``/``up``) before TCP."""
        if direction == "down":
            h, he = self.header_down_bytes, self.header_down_per_expert_bytes
        elif direction == "up":
            h, he = self.header_up_bytes, self.header_up_per_expert_bytes
        else:
            raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
        return h + he * experts + self.bytes_per_token * rows

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the manifest's ``latency_model``)."""
        d = asdict(self)
        d["devices"] = (
            {n: asdict(c) for n, c in zip(self.device_names, self.devices)}
            if self.device_names
            else [asdict(c) for c in self.devices]
        )
        d.pop("device_names")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerCostParams:
        """Inverse of :meth:`to_dict`; ``devices`` may be a name -> costs mapping or a list, and
        unknown keys are dropped."""
        d = dict(d)
        devs = d.pop("devices", ())
        names: tuple[str, ...] = ()
        if isinstance(devs, Mapping):
            names, devs = tuple(devs), tuple(devs.values())
        d["default_device"] = DeviceCosts(**d.get("default_device", {}))
        return cls(
            devices=tuple(DeviceCosts(**c) for c in devs),
            device_names=names,
            **{
                k: v
                for k, v in d.items()
                if k in {f.name for f in fields(cls)} and k not in ("devices", "device_names")
            },
        )


def layer_terms(
    loads: Sequence[float] | np.ndarray,
    down_kbit: Sequence[float] | np.ndarray,
    up_kbit: Sequence[float] | np.ndarray,
    params: LayerCostParams,
    *,
    experts: Sequence[float] | np.ndarray | None = None,
    tokens_down: Sequence[float | None] | None = None,
    tokens_up: Sequence[float | None] | None = None,
) -> dict[str, np.ndarray]:
    """The model's terms per device (ms, 0 for idle devices): ``air_down``, ``air_up``,
    ``device`` (the device's time), ``call`` (fixed per call) and ``total`` (their sum: the
    call's round trip), plus ``bytes_down``/``bytes_up`` (messages before TCP). Arguments as
    :func:`predict_layer_ms`."""
    n = np.asarray(loads, dtype=np.float64)
    d = len(n)
    e = (n > 0).astype(np.float64) if experts is None else np.asarray(experts, dtype=np.float64)
    down = np.broadcast_to(np.asarray(down_kbit, dtype=np.float64), (d,))
    up = np.broadcast_to(np.asarray(up_kbit, dtype=np.float64), (d,))
    out = {
        k: np.zeros(d)
        for k in ("air_down", "air_up", "device", "call", "total", "bytes_down", "bytes_up")
    }
    p = params
    for k in range(d):
        if n[k] <= 0 and e[k] <= 0:
            continue
        ek = max(e[k], 1.0)
        c = p.device(k)
        md, mu = p.message_bytes("down", ek, n[k]), p.message_bytes("up", ek, n[k])
        td = tokens_down[k] if tokens_down is not None else None
        tu = tokens_up[k] if tokens_up is not None else None
        out["bytes_down"][k], out["bytes_up"][k] = md, mu
        out["air_down"][k] = airtime_ms(
            md, down[k], p.shaping, p.bucket_bytes, p.bucket_slack_us, p.mtu, td
        )
        out["air_up"][k] = airtime_ms(
            mu, up[k], p.shaping, p.bucket_bytes, p.bucket_slack_us, p.mtu, tu
        )
        out["device"][k] = c.device_ms(ek, n[k])
        out["call"][k] = c.fixed_ms(md + mu)
    out["total"] = out["call"] + out["air_down"] + out["device"] + out["air_up"]
    return out


def predict_layer_ms(
    loads: Sequence[float] | np.ndarray,
    down_kbit: Sequence[float] | np.ndarray,
    up_kbit: Sequence[float] | np.ndarray,
    params: LayerCostParams,
    *,
    experts: Sequence[float] | np.ndarray | None = None,
    tokens_down: Sequence[float | None] | None = None,
    tokens_up: Sequence[float | None] | None = None,
) -> tuple[float, np.ndarray]:
    """The calibrated model's time of one layer's expert exchange (what ``moe_ms`` measures).

    Parameters
    ----------
    loads:
        Token-rows per device (``N_k``; all experts of the device together).
    down_kbit, up_kbit:
        The enforced link rates per device, each direction its own (kbit/s, as tc reads them
        back; a scalar applies to every device).
    params:
        :class:`LayerCostParams`, its ``devices`` in the same order.
    experts:
        Experts per device in the call (``E_k``); default one per loaded device.
    tokens_down, tokens_up:
        Bytes the leaf's bucket holds when the message starts, per device (``None`` entries,
        or no list: full -- the link was idle long enough to refill it).

    Returns
    -------
    (layer_ms, per_device_ms):
        ``bs_ms + max_k t_k + overlap_ms(t, bs_per_device_ms)`` (0 when no device is
        called) and the devices' ``t_k`` (0 for idle devices).
    """
    t = layer_terms(
        loads,
        down_kbit,
        up_kbit,
        params,
        experts=experts,
        tokens_down=tokens_down,
        tokens_up=tokens_up,
    )
    return layer_ms_of(t, params), t["total"]


def layer_ms_of(terms: Mapping[str, np.ndarray], params: LayerCostParams) -> float:
    """The layer's time from its :func:`layer_terms` (what :func:`predict_layer_ms` returns
    first): ``bs_ms + max_k t_k + overlap``, 0 when no device is called."""
    dev = terms["total"]
    if not np.count_nonzero(dev):
        return 0.0
    return float(params.bs_ms + dev.max() + overlap_ms(dev, params.bs_per_device_ms))


def overlap_ms(device_ms: Sequence[float] | np.ndarray, per_device_ms: float) -> float:
    """What calls running together add to the slowest one: ``per_device_ms`` for each other
    call, in proportion to the share of the slowest call it overlaps (they start together:
    ``t_k / t_max``)."""
    t = np.asarray(device_ms, dtype=np.float64).ravel()
    t = t[t > 0]
    if len(t) < 2:
        return 0.0
    return float(per_device_ms) * float((t.sum() - t.max()) / t.max())


def bucket_after(
    tokens_bytes: float | None, message_bytes: float, rate_kbit: float, params: LayerCostParams
) -> float:
    """Bytes a leaf's bucket holds right after a message of ``message_bytes`` left it, having
    started with ``tokens_bytes`` (``None``: full): what the bucket lets through free is
    spent; a message it had to hold back left it empty."""
    full = free_bytes(rate_kbit, params.shaping, params.bucket_bytes, params.bucket_slack_us)
    if not math.isfinite(full):
        return full
    tau = full if tokens_bytes is None else min(full, max(0.0, tokens_bytes))
    _, wire = wire_frames(message_bytes, params.mtu)
    return max(0.0, tau - wire)


def bucket_refilled(
    tokens_bytes: float, idle_ms: float, rate_kbit: float, params: LayerCostParams
) -> float | None:
    """What a bucket holding ``tokens_bytes`` holds after ``idle_ms`` without traffic at
    ``rate_kbit`` (``None`` once full again: :func:`airtime_ms`'s default)."""
    full = free_bytes(rate_kbit, params.shaping, params.bucket_bytes, params.bucket_slack_us)
    t = float(tokens_bytes) + max(0.0, float(idle_ms)) * float(rate_kbit) / 8.0
    return None if t >= full else t


class LinkBuckets:
    """Each link's bucket followed from message to message, on a clock in seconds (the
    runner's wall clock or the twin's virtual one): what a message left in it and when
    (:func:`bucket_after`), refilled at the link's rate since (:func:`bucket_refilled`), full
    again after a rate change (the kernel's ``tbf_change``) or when never used."""

    def __init__(self) -> None:
        #: (device, direction) -> (clock s when its last message left the leaf, bytes left)
        self.seen: dict[tuple[str, str], tuple[float, float]] = {}

    def tokens(
        self,
        device: str,
        direction: str,
        at: float,
        rate: float,
        params: LayerCostParams,
        later_ms: float = 0.0,
    ) -> float | None:
        """What the bucket holds ``later_ms`` after ``at`` (``None``: full)."""
        seen = self.seen.get((device, direction))
        if seen is None or not rate:
            return None
        t, tok = seen
        return bucket_refilled(tok, (at - t) * 1e3 + later_ms, rate, params)

    def refill(self, devices: Iterable[str]) -> None:
        """A rate change filled these devices' buckets."""
        for d in devices:
            self.seen.pop((d, "down"), None)
            self.seen.pop((d, "up"), None)

    def exchange_terms(
        self,
        names: Sequence[str],
        loads: np.ndarray,
        experts: np.ndarray,
        down: np.ndarray,
        up: np.ndarray,
        params: LayerCostParams,
        at: float,
    ) -> tuple[dict[str, np.ndarray], list[float | None], list[float | None]]:
        """:func:`layer_terms` of an exchange starting at ``at`` with each link's bucket as
        it stands then (the request) and when the reply starts (after the request's airtime
        and the device's time): ``(terms, tokens_down, tokens_up)``."""
        tok_d = [self.tokens(n, "down", at, down[k], params) for k, n in enumerate(names)]
        first = layer_terms(loads, down, up, params, experts=experts, tokens_down=tok_d)
        tok_u = [
            self.tokens(n, "up", at, up[k], params, first["air_down"][k] + first["device"][k])
            for k, n in enumerate(names)
        ]
        terms = layer_terms(
            loads, down, up, params, experts=experts, tokens_down=tok_d, tokens_up=tok_u
        )
        return terms, tok_d, tok_u

    def sent(
        self,
        device: str,
        k: int,
        terms: Mapping[str, np.ndarray],
        tokens: tuple[list[float | None], list[float | None]],
        rates: tuple[float, float],
        left_at: tuple[float, float],
        params: LayerCostParams,
    ) -> None:
        """Device ``k`` (index into ``terms``) exchanged messages: the request left its leaf
        at ``left_at[0]``, the reply at ``left_at[1]`` (clock s), starting from ``tokens``
        (down, up lists) at ``rates`` (down, up kbit/s)."""
        for i, direction in enumerate(("down", "up")):
            self.seen[(device, direction)] = (
                left_at[i],
                bucket_after(tokens[i][k], terms[f"bytes_{direction}"][k], rates[i], params),
            )


def predict_critical_ms(layer_ms: float, params: LayerCostParams, epoch_start: bool) -> float:
    """A layer's exchange plus what runs in-line before it: the policy's decision, and the
    rate change when the decision starts an epoch (``moe_ms`` leaves both out; ``layers.csv``
    has them as ``decision_ms`` and ``change_ms``)."""
    return float(layer_ms) + params.decision_ms + (params.rate_change_ms if epoch_start else 0.0)


# -- fitting the calibrated model from profiling samples -------------------------------------
def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares ``x @ c ~ y`` with ``c >= 0`` for a few columns: the best feasible
    unconstrained fit over every subset of free columns (the others 0)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m = x.shape[1]
    best, best_err = np.zeros(m), float(y @ y)
    for mask in range(1, 1 << m):
        cols = [j for j in range(m) if mask >> j & 1]
        sub = x[:, cols]
        if np.linalg.matrix_rank(sub) < len(cols):
            continue
        c, *_ = np.linalg.lstsq(sub, y, rcond=None)
        if np.any(c < 0):
            continue
        err = float(np.sum((sub @ c - y) ** 2))
        if err < best_err - 1e-15:
            best_err = err
            best = np.zeros(m)
            best[cols] = c
    return best


def _stats(res: Sequence[float]) -> dict[str, float | int]:
    a = np.asarray(res, dtype=np.float64)
    if not len(a):
        return {"n": 0}
    return {
        "n": len(a),
        "rmse_ms": float(np.sqrt(np.mean(a * a))),
        "median_ms": float(np.median(a)),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "max_abs_ms": float(np.max(np.abs(a))),
    }


def fit_layer_costs(
    samples: Iterable[Mapping[str, Any]], base: LayerCostParams
) -> tuple[LayerCostParams, dict[str, Any]]:
    """Fit the per-device costs and the BS's time from profiling samples (pure).

    Each sample is one call timed through the BS's exchange (``run_layer``) with keys
    ``device``, ``rows`` (the call's token-rows; default ``tokens``), ``experts`` (default 1),
    ``rtt_ms`` (the call's round trip from its send), ``device_ms`` (agent receipt to reply),
    ``rate_down_kbit``, ``rate_up_kbit`` (enforced while it ran) and optionally ``layer`` (an
    id shared by the calls of one exchange), ``devices`` (how many devices that exchange
    called) and ``layer_ms`` (its wall time). Per device, robust to the odd slow sample (other
    work on the host): samples are grouped by (experts, rows) and each group's median taken,

    * ``device_call_ms, compute_a_ms, compute_b_ms``: non-negative least squares of the
      groups' median ``device_ms`` on ``1, E, N`` (``device_call_ms`` = 0 when every call had
      one expert: it cannot be told from ``a``);
    * ``call_per_kb_ms``: the slope of a non-negative least squares line through the groups'
      median ``rtt - airtime_down - airtime_up - device_ms`` (airtime as ``base`` models it)
      against the KiB of the messages, and ``call_ms`` the median over every sample of what
      is left -- from exchanges that called this device alone where there are any;

    then, with ``y = layer_ms - max_k t_k`` (the modelled round trips), ``bs_ms`` the median
    ``y`` of exchanges that called one device (at least 0), and ``bs_per_device_ms`` the
    least-squares slope (at least 0), over the medians per number of devices called, of
    ``y - bs_ms`` against the overlap ``sum_{k != max} t_k / t_max``.

    Returns the parameters (``base`` with those replaced) and the residuals of every sample:
    per device the round trip's (``rtt_ms`` - model) and the device time's, and the
    exchange's (``layer_ms`` - model), each as n, rmse, median, p10, p90, max |.| (ms).
    """
    rows = [dict(s) for s in samples]
    names = list(base.device_names) or sorted({str(r["device"]) for r in rows})
    costs: dict[str, DeviceCosts] = {}
    resid: dict[str, Any] = {"devices": {}}
    for name in names:
        rs = [
            r
            for r in rows
            if str(r["device"]) == name
            and r.get("rtt_ms") is not None
            and r.get("device_ms") is not None
        ]
        if not rs:
            costs[name] = base.for_devices([name]).devices[0]
            continue
        costs[name] = _fit_device(rs, base)
        resid["devices"][name] = _device_residuals(rs, costs[name], base)
    p = replace(base, devices=tuple(costs[n] for n in names), device_names=tuple(names))
    arrivals, walls = _exchanges(rows, p)
    if walls:
        bs0, h, resid["layer"] = _fit_bs_time(arrivals, walls)
        p = replace(p, bs_ms=bs0, bs_per_device_ms=h)
    return p, resid


def _experts_rows(r: Mapping[str, Any]) -> tuple[float, float]:
    """A sample's experts (default 1) and token-rows (default its ``tokens``)."""
    return float(r.get("experts") or 1), float(r.get("rows", r["tokens"]))


def _group_medians(
    rs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples grouped by (experts, rows), in order: experts, rows and each group's median
    ``value``."""
    by: dict[tuple[float, float], list[float]] = {}
    for r in rs:
        by.setdefault(_experts_rows(r), []).append(value(r))
    keys = sorted(by)
    return (
        np.array([k[0] for k in keys]),
        np.array([k[1] for k in keys]),
        np.array([float(np.median(by[k])) for k in keys]),
    )


def _airtime_both_ms(r: Mapping[str, Any], base: LayerCostParams) -> float:
    """A sample's airtime down and up at the rates it ran with, as ``base`` models it."""
    e, n = _experts_rows(r)
    return airtime_ms(
        base.message_bytes("down", e, n),
        r["rate_down_kbit"],
        base.shaping,
        base.bucket_bytes,
        base.bucket_slack_us,
        base.mtu,
    ) + airtime_ms(
        base.message_bytes("up", e, n),
        r["rate_up_kbit"],
        base.shaping,
        base.bucket_bytes,
        base.bucket_slack_us,
        base.mtu,
    )


def _message_kib(e: np.ndarray, n: np.ndarray, base: LayerCostParams) -> np.ndarray:
    """KiB of a call's two messages, per (experts, rows)."""
    return np.array(
        [
            (base.message_bytes("down", a, b) + base.message_bytes("up", a, b)) / 1024.0
            for a, b in zip(e, n)
        ]
    )


def _fit_device(rs: Sequence[Mapping[str, Any]], base: LayerCostParams) -> DeviceCosts:
    """One device's costs from its samples (:func:`fit_layer_costs`): the device time's terms,
    then the call's fixed part and its slope per KiB."""
    e, n, dms = _group_medians(rs, lambda r: float(r["device_ms"]))
    cols = [np.ones(len(e)), e, n]
    if np.ptp(e) == 0:  # one expert per call throughout: a and the call's part merge
        cols[0] = np.zeros(len(e))
    c0, ca, cb = nnls(np.column_stack(cols), dms)
    dev = DeviceCosts(0.0, float(c0), float(ca), float(cb))
    alone = [r for r in rs if int(r.get("devices") or 1) == 1] or rs

    def fixed_of(r: Mapping[str, Any]) -> float:
        return float(r["rtt_ms"]) - _airtime_both_ms(r, base) - float(r["device_ms"])

    e, n, fixed = _group_medians(alone, fixed_of)
    x = np.column_stack([np.ones(len(e)), _message_kib(e, n, base)])
    k1 = float(nnls(x, fixed)[1]) if len(e) > 1 else 0.0
    # the fixed part: the median over every sample (not the line's intercept through a few
    # medians, which one disturbed group moves)
    k0 = max(
        0.0,
        float(
            np.median(
                [
                    fixed_of(r)
                    - k1
                    * _message_kib(
                        np.array([float(r.get("experts") or 1)]),
                        np.array([float(r.get("rows", r["tokens"]))]),
                        base,
                    )[0]
                    for r in alone
                ]
            )
        ),
    )
    return replace(dev, call_ms=k0, call_per_kb_ms=k1)


def _device_residuals(
    rs: Sequence[Mapping[str, Any]], c: DeviceCosts, base: LayerCostParams
) -> dict[str, dict[str, float | int]]:
    """The round trip's and the device time's residuals of one device's samples (:func:`_stats`)."""
    ea = np.array([float(r.get("experts") or 1) for r in rs])
    na = np.array([float(r.get("rows", r["tokens"])) for r in rs])
    model_dev = np.array([c.device_ms(a, b) for a, b in zip(ea, na)])
    model_rtt = (
        np.array(
            [
                _airtime_both_ms(r, base) + c.fixed_ms(1024.0 * k)
                for r, k in zip(rs, _message_kib(ea, na, base))
            ]
        )
        + model_dev
    )
    return {
        "rtt": _stats(np.array([float(r["rtt_ms"]) for r in rs]) - model_rtt),
        "device": _stats(np.array([float(r["device_ms"]) for r in rs]) - model_dev),
    }


def _exchanges(
    rows: Sequence[Mapping[str, Any]], p: LayerCostParams
) -> tuple[list[np.ndarray], list[float]]:
    """Per exchange (the samples sharing a ``layer`` with a ``layer_ms``): the modelled round
    trips of the devices it called (``p`` without the BS's time) and its wall time."""
    names = list(p.device_names)
    by_layer: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("layer") is not None and r.get("layer_ms") is not None:
            by_layer.setdefault(r["layer"], []).append(r)
    idx = {nm: i for i, nm in enumerate(names)}
    bare = replace(p, bs_ms=0.0, bs_per_device_ms=0.0)
    arrivals, walls = [], []
    for calls in by_layer.values():
        loads, ex = np.zeros(len(names)), np.zeros(len(names))
        down, up = np.ones(len(names)), np.ones(len(names))
        for r in calls:
            k = idx[str(r["device"])]
            loads[k] += float(r.get("rows", r["tokens"]))
            ex[k] += float(r.get("experts") or 1)
            down[k], up[k] = float(r["rate_down_kbit"]), float(r["rate_up_kbit"])
        _, dev_ms = predict_layer_ms(loads, down, up, bare, experts=ex)
        arrivals.append(dev_ms[dev_ms > 0])
        walls.append(float(calls[0]["layer_ms"]))
    return arrivals, walls


def _fit_bs_time(
    arrivals: Sequence[np.ndarray], walls: Sequence[float]
) -> tuple[float, float, dict[str, float | int]]:
    """(``bs_ms``, ``bs_per_device_ms``, the exchanges' residuals) from :func:`_exchanges`:
    each exchange's wall time beyond its slowest modelled call, against the overlap."""
    y = np.asarray(walls) - np.array([a.max() for a in arrivals])
    x = np.array([(a.sum() - a.max()) / a.max() for a in arrivals])
    d = np.array([len(a) for a in arrivals])
    one = d == 1
    bs0 = max(0.0, float(np.median(y[one]))) if one.any() else 0.0
    more = sorted(set(d[~one].tolist()))
    if more:  # per number of devices called, medians of the excess and of the overlap
        xm = np.array([float(np.median(x[d == v])) for v in more])
        ym = np.array([float(np.median(y[d == v])) for v in more]) - bs0
        h = max(0.0, float(xm @ ym) / float(xm @ xm)) if float(xm @ xm) > 0 else 0.0
    else:
        h = 0.0
    return bs0, h, _stats(y - bs0 - h * x)
