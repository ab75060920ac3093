"""WDMoE: expert selection by weight-to-latency ratio, with min–max bandwidth allocation.

Read this file as the model of a policy that allocates bandwidth. WDMoE (arXiv 2405.03131,
conference; arXiv 2411.06681, journal) runs attention and the gate at the base station and the
experts on devices behind a shared wireless channel; it trades gate weight against device latency.
What is from the papers and what is a reconstruction (POLICIES.md tags):

* [V] the architecture, the goal (low latency at kept accuracy), joint selection + bandwidth;
* [S] the weight-to-latency ratio (WLR) of an expert = its gate weight / latency of its device,
  a training-free threshold that turns top-2 into a dynamic top-k;
* [R] everything numeric below: the latency model (:mod:`testbed.policy.bandwidth`), the channel
  (:mod:`testbed.net.channel`), the journal's alternating procedure, the cosine pruning schedule,
  the WLR of a whole selection, and every default.

The policies here (entry points in ``pyproject.toml``):

``wdmoe`` (:class:`WDMoE`, journal [R])
    Alternate (at most ``max_rounds`` rounds): (1) X = top-K for every token; (2) min–max
    bandwidth for X; (3) for a threshold theta from ``alpha`` in steps of ``theta_step`` up to
    ``theta_max``: every token whose gate vector has cosine <= theta with the per-expert latency
    vector, and that still uses more than one expert, drops its lowest-weight expert; bandwidth
    and WLR are recomputed; the first theta whose WLR reaches ``gamma`` x the round's starting
    WLR is accepted and starts the next round. A round without such a theta ends the search.
``wdmoe-conf`` (:class:`WDMoEConference`, conference [S/R])
    Per token: (e1, e2) = top-2 by gate weight, ``w_i = g_ei / t_device(ei)``; drop e2 if
    ``w2/w1 < theta`` (``variant="share"``: ``w2/(w1+w2) < theta``); renormalise.
``wdmoe-sel`` (:class:`WDMoESelectionOnly`): the journal's selection with an equal bandwidth split.
``wdmoe-bw`` (:class:`WDMoEBandwidthOnly`): top-K selection with min–max bandwidth.

How a decision is computed, for one MoE layer and forward step (one :meth:`select` call = one
channel epoch: fresh fading from the policy's own :class:`~testbed.net.channel.ChannelModel`,
seeded by ``seed``):

* the device of expert ``e`` is the first device of ``cluster.placement["L{layer}.E{e}"]``;
* the device latency is ``t_k = N_k S / r_down(B_k) + a_k + b_k N_k + N_k S / r_up(B_k)`` with
  ``(a_k, b_k) = cluster.compute_profile[k]`` (``compute_a_ms``/``compute_b_ms`` where missing),
  ``S = cluster.bytes_per_token`` (``bytes_per_token`` where 0) and the predicted layer time is
  ``T_l = bs_ms + max_k t_k``; ``r_down``, ``r_up`` are the channel's rates per direction
  (:meth:`~testbed.net.channel.ChannelModel.rates_bps`: the BS's power shared in proportion to
  bandwidth on the downlink, the device's own power on the uplink, the spectral-efficiency
  cap), in a cell of the whole budget;
* min–max bandwidth is :func:`testbed.policy.bandwidth.min_max_bandwidth`'s problem solved at
  those rates (:meth:`~testbed.net.channel.ChannelModel.min_max_bandwidth`): the latency model's
  solver assumes the paper's ``B log2(1 + s/B)`` with a fixed power per device, while the
  split downlink's rate is linear in ``B`` and capped;
* the WLR of a selection [R] is the mean over (valid) tokens of the kept gate probability mass,
  divided by ``T_l`` (ms): capability per unit of latency;
* padding tokens (``ctx.token_valid`` False) get no expert: they would only load the links.

The rates and the min–max split of a decision come from one
:class:`~testbed.net.channel.CellEpoch` (the channel's numbers for these devices in this epoch, as
plain floats: the same results as ``rates_bps`` and ``min_max_bandwidth``, without numpy's
per-call cost on a handful of devices); the per-device quantities (loads, bandwidths, rates,
latencies) are lists, the per-token ones numpy arrays.

Under the runner (``testbed run``), the cluster state wins over the parameters: its channel
(``links.bandwidth_mhz``: ``cluster.channel``, ``cluster.bandwidth_hz``) and decision epoch
(``cluster.epoch``: the fading of that epoch), the profiled ``compute_profile`` and the model's
``bytes_per_token``. Rates change only at an epoch's first decision (``policy.epoch``); the
others see ``cluster.links_fixed`` and decide, and predict, at the rates tc enforces
(``cluster.rate_down_kbit``/``rate_up_kbit``), asking for no bandwidth.

The returned :class:`~testbed.policy.Decision` carries ``rate_down_kbit`` and ``rate_up_kbit``:
per device that gets bandwidth, its channel rate each way, which the runner enforces each on its
own direction (:meth:`testbed.run.epochs.EpochLinks.apply_policy`). Devices given no
bandwidth are left out. (The runner's ``predicted_ms`` is the calibrated model's, for every
policy; the prediction of this module's model is ``policy_predicted_ms`` in ``layers.csv``.)
"""

from __future__ import annotations

import bisect
import collections
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.routing import RoutingContext, Selection
from testbed.errors import ConfigError
from testbed.net.channel import CellEpoch, ChannelModel
from testbed.policy import ClusterView, Decision, Policy

_NO_PLACEMENT: dict[str, tuple[str, ...]] = {}
_CHANNEL_KEYS = tuple(
    p
    for p in inspect.signature(ChannelModel.__init__).parameters
    if p not in ("self", "devices", "seed")
)


@dataclass
class _Step:
    """Everything one decision needs (built once per :meth:`_WDMoEBase.select`): the tokens'
    arrays in numpy, the devices' values as lists (a handful of devices: plain floats cost
    less than numpy's calls), and what is computed more than once (the equal split's rates);
    with the latency model on them: device loads, ``t_k`` at given rates, bandwidth splits,
    WLR and the rates a decision enforces."""

    probs: np.ndarray  # [N, E] router probabilities (float64)
    valid: np.ndarray  # [N] bool
    ids: np.ndarray  # [N, K] top-K expert ids, by descending probability
    gate: np.ndarray  # [N, K] their probabilities
    slot_dev: np.ndarray  # [N, K] device index of each top-K slot
    expert_dev: np.ndarray  # [E] device index of each expert
    devices: tuple[str, ...]
    a_ms: list[float]  # [D]
    b_ms: list[float]
    bytes_per_token: float
    total_hz: float
    n_valid: int
    fixed_bps: tuple[list[float], list[float]] | None = None  # [D] down, up: links not ours
    idle_share: bool = False  # the allocation covers a whole epoch of several layers
    cell: CellEpoch | None = None  # the devices' channel in this epoch (None: links fixed)
    equal_bps: tuple[list[float], list[float]] | None = None  # rates at B_total / D, once made

    def loads(self, keep: np.ndarray) -> list[int]:
        """Token-rows per device of the kept slots."""
        return np.bincount(self.slot_dev[keep], minlength=len(self.devices)).tolist()

    def min_max(self, want: list[float] | list[int]) -> list[float]:
        """Min–max bandwidth for the token-rows ``want`` at the channel's rates
        (:meth:`testbed.net.channel.ChannelModel.min_max_bandwidth`, through
        :meth:`testbed.net.channel.CellEpoch.min_max`)."""
        assert self.cell is not None
        bits = [8.0 * self.bytes_per_token * w for w in want]
        fixed = [a + b * w for a, b, w in zip(self.a_ms, self.b_ms, want)]
        return self.cell.min_max(bits, bits, fixed)

    def equal_rates(self) -> tuple[list[float], list[float]]:
        """The channel's (down, up) rates (bit/s) of the equal split ``B_total / D``, in the
        cell of ``self.total_hz`` (made once per decision)."""
        if self.equal_bps is None:
            assert self.cell is not None
            self.equal_bps = self.cell.rates(
                [self.total_hz / len(self.devices)] * len(self.devices)
            )
        return self.equal_bps

    def fixed_ms(self, loads: list[int]) -> list[float]:
        """``t_k`` at the enforced rates ``self.fixed_bps``."""
        assert self.fixed_bps is not None
        return self.ms_at(loads, *self.fixed_bps)

    def ms_at(self, loads: list[int], down: list[float], up: list[float]) -> list[float]:
        """``t_k`` (ms) at the rates ``down``, ``up`` (bit/s): the latency model at given
        rates (``inf`` where tokens meet no rate, 0 where there are no tokens)."""
        s8 = 8.0 * self.bytes_per_token
        out = []
        for n, r_d, r_u, a, b in zip(loads, down, up, self.a_ms, self.b_ms):
            if n > 0:
                bits = s8 * n
                out.append(
                    1e3
                    * (
                        (bits / r_d if r_d != 0 else math.inf)
                        + (bits / r_u if r_u != 0 else math.inf)
                    )
                    + a
                    + b * n
                )
            else:
                out.append(0.0)
        return out

    def unit_ms(self, alloc: _Alloc) -> list[float]:
        """Latency of one token on each device under ``alloc`` (an equal share where it has
        no bandwidth; the enforced rates when the links are fixed)."""
        ones = [1] * len(self.devices)
        if self.fixed_bps is not None:
            return self.fixed_ms(ones)
        # a device's rates depend on its own bandwidth alone: those of the allocation where it
        # gives some, of the equal split elsewhere
        assert alloc.down_bps is not None and alloc.up_bps is not None
        eq_down, eq_up = self.equal_rates()
        on = [b > 0 for b in alloc.bandwidth_hz]
        down = [r if o else e for o, r, e in zip(on, alloc.down_bps, eq_down)]
        up = [r if o else e for o, r, e in zip(on, alloc.up_bps, eq_up)]
        return self.ms_at(ones, down, up)

    def wlr(self, keep: np.ndarray, layer_ms: float) -> float:
        """Mean kept gate mass per valid token, per ms of predicted layer time [R]."""
        if self.n_valid == 0 or layer_ms <= 0:
            return 0.0
        return float((self.gate * keep).sum()) / self.n_valid / layer_ms

    def link_rates(self, alloc: _Alloc) -> dict[str, tuple[float, float, float]]:
        """Per device with bandwidth: (harmonic-mean kbit/s, down kbit/s, up kbit/s) (the
        harmonic mean: the one rate both ways giving the same down + up time)."""
        if alloc.down_bps is None or alloc.up_bps is None:
            return {}
        out = {}
        for d, b, r_d, r_u in zip(self.devices, alloc.bandwidth_hz, alloc.down_bps, alloc.up_bps):
            if b > 0:
                down, up = r_d / 1e3, r_u / 1e3
                both = 2.0 / (1.0 / down + 1.0 / up) if down > 0 and up > 0 else 0.0
                out[d] = (both, down, up)
        return out


@dataclass(frozen=True)
class _Alloc:
    """A bandwidth allocation, the device latencies and ``T_l`` under it, and the channel's
    rates at its bandwidths (``None`` when the links are fixed); lists over the devices."""

    loads: list[int]  # the token-rows it is for
    bandwidth_hz: list[float]
    device_ms: list[float]
    layer_ms: float  # T_l, bs_ms included
    down_bps: list[float] | None = None
    up_bps: list[float] | None = None


def _max(xs: list[float]) -> float:
    """``max(xs)``, ``nan`` if any is (as numpy's)."""
    return math.nan if any(map(math.isnan, xs)) else max(xs)


class _WDMoEBase(Policy):
    """Shared machinery of the WDMoE variants: channel, latency model, bookkeeping.

    Parameters
    ----------
    bandwidth_mhz:
        Total bandwidth of the cell shared by all devices (MHz).
    bs_ms:
        ``t_bs``: the BS's own time per layer, added to the predicted ``T_l``.
    compute_a_ms, compute_b_ms:
        Compute profile ``c(N) = a + b N`` for devices missing from ``cluster.compute_profile``.
    bytes_per_token:
        Payload per token per direction when ``cluster.bytes_per_token`` is 0
        (Mixtral: 4096 x 2 B).
    renormalize:
        Renormalise the kept weights of a token to sum 1; ``None`` = the family's default
        (``ctx.norm_topk_prob``, Mixtral: yes), as the model's own top-k does.
    default_devices:
        Without a placement (no cluster), expert ``e`` is taken to sit on ``dev{e mod n}``.
    channel:
        Keyword arguments of :class:`testbed.net.channel.ChannelModel` (``cell_radius_m``,
        ``shadowing_db``, ``bs_power_dbm``, ...); its defaults are POLICIES.md's.
    history:
        How many per-decision stats records :attr:`stats` keeps.
    placement, seed:
        As :class:`testbed.policy.Policy`; ``seed`` also seeds the channel.
    """

    allocation = "equal"  # or "min-max": class attribute of a variant, not a parameter
    prune = False

    def __init__(
        self,
        bandwidth_mhz: float = 20.0,
        bs_ms: float = 0.0,
        compute_a_ms: float = 1.0,
        compute_b_ms: float = 0.2,
        bytes_per_token: int = 8192,
        renormalize: bool | None = None,
        default_devices: int = 8,
        channel: Mapping[str, Any] | None = None,
        history: int = 1000,
        placement: str = "round-robin",
        seed: int = 0,
    ):
        super().__init__(placement, seed)
        if not bandwidth_mhz > 0:
            raise ConfigError(f"bandwidth_mhz: must be > 0, got {bandwidth_mhz}")
        if compute_a_ms < 0 or compute_b_ms < 0:
            raise ConfigError("compute_a_ms, compute_b_ms: must be >= 0")
        if bytes_per_token <= 0 or default_devices < 1 or history < 1:
            raise ConfigError("bytes_per_token, default_devices, history: must be >= 1")
        channel = dict(channel or {})
        unknown = sorted(set(channel) - set(_CHANNEL_KEYS))
        if unknown:
            raise ConfigError(
                [
                    f"channel.{k}: unknown channel parameter (allowed: {', '.join(_CHANNEL_KEYS)})"
                    for k in unknown
                ]
            )
        ChannelModel(1, seed, **channel)  # reject bad values now, not at the first step
        self.bandwidth_mhz = float(bandwidth_mhz)
        self.bs_ms = float(bs_ms)
        self.compute_a_ms = float(compute_a_ms)
        self.compute_b_ms = float(compute_b_ms)
        self.bytes_per_token = int(bytes_per_token)
        self.renormalize = renormalize
        self.default_devices = int(default_devices)
        self.channel = channel
        self.history = int(history)
        self.stats: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.history)
        self.epoch = 0
        self._channel_model: ChannelModel | None = None
        self._map_key: Any = None
        self._map: dict[tuple[int, int], tuple[tuple[str, ...], np.ndarray]] = {}
        self._index_key: tuple[ChannelModel, tuple[str, ...]] | None = None
        self._index: list[int] = []

    # -- hooks -----------------------------------------------------------------------------
    def select(self, ctx: RoutingContext, cluster: ClusterView | None = None) -> Decision:
        st = self._prepare(ctx, cluster)
        keep, alloc, extra = self._decide(st)
        sel = self._selection(ctx, st, keep)
        rates = st.link_rates(alloc)
        self._record(ctx, st, keep, alloc, rates, extra)
        self.epoch += 1
        rec = self.stats[-1]
        return Decision(
            sel,
            rate_down_kbit={d: r[1] for d, r in rates.items()},
            rate_up_kbit={d: r[2] for d, r in rates.items()},
            predicted_ms=float(alloc.layer_ms),
            stats={k: rec[k] for k in ("experts_dropped", "tokens_pruned", "wlr") if k in rec},
        )

    def last_stats(self) -> dict[str, Any]:
        """The last decision's record: ``layer``, ``step``, ``epoch``, ``tokens``,
        ``tokens_pruned`` (valid tokens left with fewer than K experts), ``experts_dropped``,
        ``wlr``, ``wlr_topk``, ``predicted_ms`` (T_l), ``predicted_topk_ms``, ``loads``,
        ``bandwidth_hz``, ``rate_down_kbit``, ``rate_up_kbit`` (per device), and the variant's
        own fields (``rounds``, ``theta``). Empty before the first decision."""
        return self.stats[-1] if self.stats else {}

    def _decide(self, st: _Step) -> tuple[np.ndarray, _Alloc, dict[str, Any]]:
        raise NotImplementedError

    # -- building blocks (usable by subclasses) --------------------------------------------
    def _prepare(self, ctx: RoutingContext, cluster: ClusterView | None) -> _Step:
        rp = ctx.router_probs.detach()
        if rp.dtype == torch.float32 and rp.device.type == "cpu":
            probs = rp.numpy().astype(np.float64)  # exact, as torch's own conversion
        else:
            probs = rp.to("cpu", torch.float64).numpy()
        n, e = probs.shape
        k = min(ctx.top_k, e)
        if ctx.token_valid is None:
            valid, n_valid = np.ones(n, dtype=bool), n
        else:
            valid = ctx.token_valid.detach().to("cpu").numpy().astype(bool)
            n_valid = int(valid.sum())
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        gate = probs[np.arange(n)[:, None], ids]
        devices, expert_dev = self._expert_devices(cluster, ctx.layer, e)
        ch = self._channel_for(devices)
        epoch = self.epoch
        total_hz = self.bandwidth_mhz * 1e6
        fixed, idle_share = None, False
        if cluster is not None:  # the runner's channel, budget and epoch win over the params
            if cluster.channel is not None:
                ch = cluster.channel
            if cluster.epoch >= 0:
                epoch = cluster.epoch
            total_hz = float(cluster.bandwidth_hz or total_hz)
            idle_share = cluster.epoch_scope != "layer"
            if cluster.links_fixed:  # mid-epoch: predict with the rates tc enforces now
                fixed = tuple(
                    [float(1e3 * (r.get(d) or 0.0)) for d in devices]
                    for r in (cluster.rate_down_kbit, cluster.rate_up_kbit)
                )
        prof = cluster.compute_profile if cluster is not None else {}
        default = (self.compute_a_ms, self.compute_b_ms)
        ab = [prof.get(d, default) for d in devices]
        s = (cluster.bytes_per_token if cluster is not None else 0) or self.bytes_per_token
        index = self._index_in(ch, devices)
        cell = None if fixed is not None else ch.cell_epoch(epoch, total_hz, index)
        return _Step(
            probs,
            valid,
            ids,
            gate,
            expert_dev[ids],
            expert_dev,
            devices,
            [float(x[0]) for x in ab],
            [float(x[1]) for x in ab],
            float(s),
            total_hz,
            n_valid,
            fixed,
            idle_share,
            cell,
        )

    def _index_in(self, ch: ChannelModel, devices: tuple[str, ...]) -> list[int]:
        """The devices' indices in ``ch`` (kept for the last channel and devices)."""
        key = self._index_key
        if key is None or key[0] is not ch or key[1] != devices:
            self._index_key, self._index = (ch, devices), [ch.index[d] for d in devices]
        return self._index

    def _expert_devices(
        self, cluster: ClusterView | None, layer: int, n_experts: int
    ) -> tuple[tuple[str, ...], np.ndarray]:
        placement = cluster.placement if cluster is not None else _NO_PLACEMENT
        if self._map_key is not placement:
            self._map_key, self._map = placement, {}
        hit = self._map.get((layer, n_experts))
        if hit is not None:
            return hit
        if placement:
            devices = tuple(sorted({ds[0] for ds in placement.values() if ds}))
        else:
            devices = tuple(f"dev{i}" for i in range(self.default_devices))
        index = {d: i for i, d in enumerate(devices)}
        where = []
        for ex in range(n_experts):
            ds = placement.get(f"L{layer}.E{ex}")
            where.append(index[ds[0]] if ds else ex % len(devices))
        hit = (devices, np.array(where, dtype=np.int64))
        self._map[(layer, n_experts)] = hit
        return hit

    def _channel_for(self, devices: tuple[str, ...]) -> ChannelModel:
        if self._channel_model is None or self._channel_model.devices != devices:
            self._channel_model = ChannelModel(devices, self.seed, **self.channel)
        return self._channel_model

    def _allocate(self, st: _Step, loads: list[int], how: str | None = None) -> _Alloc:
        """Bandwidth for fixed loads: ``"equal"`` (B_total / D to every device) or
        ``"min-max"`` (:meth:`_Step.min_max`).

        When the links are fixed (mid-epoch) nothing is allocated: the device latencies are
        those at the enforced rates. When the allocation covers an epoch of several layers, it
        is made for this layer's loads plus one more layer's worth of token-rows spread as the
        placement spreads the experts [R]: the later layers of the epoch are not known yet,
        and a device idle now must keep a share of the budget for them."""
        if st.fixed_bps is not None:
            dev = st.fixed_ms(loads)
            return _Alloc(loads, [0.0] * len(st.devices), dev, self.bs_ms + _max(dev))
        assert st.cell is not None
        if (how or self.allocation) == "min-max":
            want: list[float] | list[int] = loads
            if st.idle_share:
                held = np.bincount(st.expert_dev, minlength=len(st.devices)).tolist()
                rows, n_exp = st.n_valid * st.ids.shape[1], len(st.expert_dev)
                want = [n + rows * h / n_exp for n, h in zip(loads, held)]
            bw = st.min_max(want)
            down, up = st.cell.rates(bw)
        else:
            bw = [st.total_hz / len(st.devices)] * len(st.devices)
            down, up = st.equal_rates()
        dev = st.ms_at(loads, down, up)
        return _Alloc(loads, bw, dev, self.bs_ms + _max(dev), down, up)

    def _selection(self, ctx: RoutingContext, st: _Step, keep: np.ndarray) -> Selection:
        ids = np.where(keep, st.ids, -1)
        w = np.where(keep, st.gate, 0.0)
        renorm = ctx.norm_topk_prob if self.renormalize is None else self.renormalize
        if renorm:
            tot = w.sum(axis=1, keepdims=True)
            some = tot > 0
            w = w / tot if some.all() else np.divide(w, tot, out=np.zeros_like(w), where=some)
        dev = ctx.router_probs.device
        return Selection(
            torch.from_numpy(ids).to(dev), torch.from_numpy(w.astype(np.float32)).to(dev)
        )

    def _record(
        self,
        ctx: RoutingContext,
        st: _Step,
        keep: np.ndarray,
        alloc: _Alloc,
        rates: Mapping[str, tuple[float, float, float]],
        extra: Mapping[str, Any],
    ) -> None:
        """Append the decision's record to :attr:`stats` (:meth:`last_stats`); ``alloc`` is
        the allocation for ``keep``."""
        k = st.ids.shape[1]
        kept = keep.sum(axis=1)
        loads = alloc.loads  # the allocation is the selection's
        self.stats.append(
            {
                "layer": ctx.layer,
                "step": ctx.step,
                "epoch": self.epoch,
                "tokens": st.n_valid,
                "tokens_pruned": int(((kept < k) & st.valid).sum()),
                "experts_dropped": int(st.n_valid * k - kept.sum()),
                "predicted_ms": alloc.layer_ms,
                "loads": {d: n for d, n in zip(st.devices, loads) if n},
                "bandwidth_hz": {d: b for d, b in zip(st.devices, alloc.bandwidth_hz) if b > 0},
                "rate_down_kbit": {d: r[1] for d, r in rates.items()},
                "rate_up_kbit": {d: r[2] for d, r in rates.items()},
                **extra,
            }
        )


class WDMoE(_WDMoEBase):
    """WDMoE (journal) [R]: alternate top-K, min–max bandwidth and cosine-threshold pruning.

    Parameters
    ----------
    alpha, theta_step, theta_max:
        Cosine thresholds tried in a round: ``alpha, alpha + theta_step, ... <= theta_max``.
    gamma:
        A threshold is accepted once the WLR reaches ``gamma`` x the round's starting WLR
        (round 1 starts from top-K).
    max_rounds:
        Most rounds of the alternation (each round may drop one more expert per token).

    The per-expert latency vector of the cosine test is [R]: latency of one token on the
    expert's device at the device's current bandwidth (an equal share where it has none).
    Tokens never drop below one expert. Other parameters: see :class:`_WDMoEBase` (module doc).
    """

    name = "wdmoe"
    allocation = "min-max"
    prune = True

    def __init__(
        self,
        alpha: float = 0.8,
        theta_step: float = 0.05,
        theta_max: float = 1.0,
        gamma: float = 1.05,
        max_rounds: int = 3,
        **kw: Any,
    ):
        super().__init__(**kw)
        if not (theta_step > 0 and alpha <= theta_max):
            raise ConfigError(
                f"alpha ({alpha}) <= theta_max ({theta_max}) and theta_step "
                f"({theta_step}) > 0 required"
            )
        if max_rounds < 0:
            raise ConfigError(f"max_rounds: must be >= 0, got {max_rounds}")
        self.alpha = float(alpha)
        self.theta_step = float(theta_step)
        self.theta_max = float(theta_max)
        self.gamma = float(gamma)
        self.max_rounds = int(max_rounds)
        n = int(np.floor((self.theta_max - self.alpha) / self.theta_step + 1e-9)) + 1
        self._thetas = self.alpha + self.theta_step * np.arange(n)
        self._bounds = self._thetas + 1e-12  # a token is pruned at theta if cos <= this

    def _decide(self, st: _Step) -> tuple[np.ndarray, _Alloc, dict[str, Any]]:
        n, k = st.ids.shape
        if n * k < self._SMALL:
            return self._decide_small(st)
        keep = np.repeat(st.valid[:, None], k, axis=1)
        cache: dict[tuple[int, ...], _Alloc] = {}

        def alloc_for(kp: np.ndarray) -> _Alloc:
            loads = st.loads(kp)
            key = tuple(loads)
            if key not in cache:
                cache[key] = self._allocate(st, loads)
            return cache[key]

        alloc = alloc_for(keep)
        wlr = wlr0 = st.wlr(keep, alloc.layer_ms)
        t0 = alloc.layer_ms
        rounds, thetas = 0, []
        if self.prune and n and st.n_valid:
            norm_p = np.sqrt((st.probs * st.probs).sum(axis=1))  # np.linalg.norm's, per row
            rows = np.arange(n)
            n_theta = len(self._thetas)
            for _ in range(self.max_rounds):
                count = keep.sum(axis=1)
                can = count > 1
                if not can.any():
                    break
                # per-expert latency of one token at the device's current bandwidth
                t_exp = np.array(st.unit_ms(alloc))[st.expert_dev]
                norm_t = math.sqrt(float(t_exp.dot(t_exp)))  # np.linalg.norm's
                cos = (st.probs @ t_exp) / (norm_p * norm_t + 1e-300)
                # the thresholds grow, so a token is pruned from the first one its cosine
                # reaches on: the distinct non-empty sets to try come at those first indices
                first = np.searchsorted(self._bounds, cos, side="left")
                firsts = first[can]
                accepted = None
                for j in sorted(set(firsts[firsts < n_theta].tolist())):
                    prune = can & (first <= j)
                    theta = self._thetas[j]
                    kp = keep.copy()
                    kp[rows[prune], count[prune] - 1] = False
                    al = alloc_for(kp)
                    w = st.wlr(kp, al.layer_ms)
                    if w >= self.gamma * wlr:
                        accepted = (kp, al, w, float(theta))
                        break
                if accepted is None:
                    break
                keep, alloc, wlr, theta_acc = accepted
                thetas.append(theta_acc)
                rounds += 1
        return (
            keep,
            alloc,
            {
                "wlr": wlr,
                "wlr_topk": wlr0,
                "predicted_topk_ms": t0,
                "rounds": rounds,
                "theta": thetas,
            },
        )

    #: below this many token slots (N x K) :meth:`_decide` keeps its books on lists
    #: (:meth:`_decide_small`): numpy's per-call cost dominates there
    _SMALL = 8

    def _decide_small(self, st: _Step) -> tuple[np.ndarray, _Alloc, dict[str, Any]]:
        """:meth:`_decide` for fewer than 8 token slots, on lists: the same steps and numbers
        (numpy sums fewer than 8 terms in order, as the loops here do; the cosines are
        numpy's)."""
        n, k = st.ids.shape
        gate, slots = st.gate.tolist(), st.slot_dev.tolist()
        keep = [[v] * k for v in st.valid.tolist()]
        n_dev = len(st.devices)
        cache: dict[tuple[int, ...], _Alloc] = {}

        def alloc_for(kp: list[list[bool]]) -> _Alloc:
            loads = [0] * n_dev
            for row, kept in zip(slots, kp):
                for d, kk in zip(row, kept):
                    if kk:
                        loads[d] += 1
            key = tuple(loads)
            if key not in cache:
                cache[key] = self._allocate(st, loads)
            return cache[key]

        def wlr_of(kp: list[list[bool]], layer_ms: float) -> float:
            if st.n_valid == 0 or layer_ms <= 0:
                return 0.0
            mass = 0.0
            for row, kept in zip(gate, kp):
                for g, kk in zip(row, kept):
                    mass += g * kk
            return mass / st.n_valid / layer_ms

        alloc = alloc_for(keep)
        wlr = wlr0 = wlr_of(keep, alloc.layer_ms)
        t0 = alloc.layer_ms
        rounds, thetas = 0, []
        if self.prune and n and st.n_valid:
            norm_p = np.sqrt((st.probs * st.probs).sum(axis=1))
            bounds, n_theta = self._bounds.tolist(), len(self._thetas)
            for _ in range(self.max_rounds):
                count = [sum(kept) for kept in keep]
                can = [c > 1 for c in count]
                if not any(can):
                    break
                t_exp = np.array(st.unit_ms(alloc))[st.expert_dev]
                norm_t = math.sqrt(float(t_exp.dot(t_exp)))
                cos = ((st.probs @ t_exp) / (norm_p * norm_t + 1e-300)).tolist()
                # np.searchsorted(bounds, cos, "left"), where nan sorts last
                first = [n_theta if math.isnan(c) else bisect.bisect_left(bounds, c) for c in cos]
                accepted = None
                for j in sorted({f for f, c in zip(first, can) if c and f < n_theta}):
                    kp = [list(kept) for kept in keep]
                    for i in range(n):
                        if can[i] and first[i] <= j:
                            kp[i][count[i] - 1] = False
                    al = alloc_for(kp)
                    w = wlr_of(kp, al.layer_ms)
                    if w >= self.gamma * wlr:
                        accepted = (kp, al, w, float(self._thetas[j]))
                        break
                if accepted is None:
                    break
                keep, alloc, wlr, theta_acc = accepted
                thetas.append(theta_acc)
                rounds += 1
        return (
            np.array(keep, dtype=bool).reshape(n, k),
            alloc,
            {
                "wlr": wlr,
                "wlr_topk": wlr0,
                "predicted_topk_ms": t0,
                "rounds": rounds,
                "theta": thetas,
            },
        )


class WDMoESelectionOnly(WDMoE):
    """WDMoE ablation [R]: the journal's pruning, bandwidth split equally over the devices."""

    name = "wdmoe-sel"
    allocation = "equal"
    prune = True


class WDMoEBandwidthOnly(WDMoE):
    """WDMoE ablation [R]: the model's top-K selection, min–max bandwidth allocation."""

    name = "wdmoe-bw"
    allocation = "min-max"
    prune = False


class WDMoEConference(_WDMoEBase):
    """WDMoE (conference) [S/R]: per token, drop the 2nd expert when its weight-to-latency
    ratio is too small against the 1st's.

    ``w_i = g_ei / t_device(ei)``, with ``t_device`` the device latency under the top-K loads
    of the step and the bandwidth of ``allocation``. ``variant="ratio"``: drop e2 if
    ``w2/w1 < theta``; ``variant="share"`` (variant B): drop e2 if ``w2/(w1+w2) < theta``.
    With K > 2 every slot j >= 2 is tested against slot 1 the same way [R]. The kept weights
    are renormalised (as the family's top-k is). After the selection, bandwidth is allocated
    again for the final loads.

    Parameters
    ----------
    theta:
        The threshold.
    variant:
        ``"ratio"`` or ``"share"``.
    allocation:
        ``"equal"`` (default: the conference rule alone) or ``"min-max"``.
    """

    name = "wdmoe-conf"

    def __init__(
        self, theta: float = 0.5, variant: str = "ratio", allocation: str = "equal", **kw: Any
    ):
        super().__init__(**kw)
        if variant not in ("ratio", "share"):
            raise ConfigError(f"variant: must be 'ratio' or 'share', got {variant!r}")
        if allocation not in ("equal", "min-max"):
            raise ConfigError(f"allocation: must be 'equal' or 'min-max', got {allocation!r}")
        self.theta = float(theta)
        self.variant = variant
        self.allocation = allocation

    def _decide(self, st: _Step) -> tuple[np.ndarray, _Alloc, dict[str, Any]]:
        n, k = st.ids.shape
        keep = np.repeat(st.valid[:, None], k, axis=1)
        alloc0 = self._allocate(st, st.loads(keep))
        wlr0 = st.wlr(keep, alloc0.layer_ms)
        if k > 1 and n:
            with np.errstate(divide="ignore", invalid="ignore"):  # padding rows: 0/0
                w = st.gate / np.array(alloc0.device_ms)[st.slot_dev]
                w1, wj = w[:, :1], w[:, 1:]
                score = wj / w1 if self.variant == "ratio" else wj / (w1 + wj)
            keep[:, 1:] &= ~(score < self.theta)
            alloc = self._allocate(st, st.loads(keep))
        else:
            alloc = alloc0
        return (
            keep,
            alloc,
            {
                "wlr": st.wlr(keep, alloc.layer_ms),
                "wlr_topk": wlr0,
                "predicted_topk_ms": alloc0.layer_ms,
            },
        )
