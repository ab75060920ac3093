"""The CoEL policy: calibration and deployment at ``place``, compressed loading, pruning at
``select``, token fusion around the backend, re-deployment at ``update``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from models.routing import RoutingContext, TopKSelection
from recipes.coel.calibration import Calibration, calibrate_experts
from recipes.coel.compression import (
    BITS,
    FusionBackend,
    expert_scores,
    load_spec,
    prune_selection,
    quantized_bytes,
)
from recipes.coel.costmodel import DeviceModel
from recipes.coel.deployment import allocate_placement, deploy, device_models
from recipes.coel.perception import link_rates
from recipes.coel.updating import Move, migrate, observed_popularity, redeploy_triggers
from testbed.errors import ConfigError
from testbed.policy import (
    NO_PROFILE,
    ClusterView,
    Decision,
    DeviceInfo,
    ExpertInfo,
    Placement,
    PlacementProfile,
    Policy,
)


def _check_params(
    lam: float,
    bits: Sequence[int],
    tau: float,
    delta: float,
    drift: float,
    horizon_steps: float,
    redeploy_every: int,
    calib_requests: int,
    max_replicas: int,
) -> None:
    bad = sorted({int(b) for b in bits} - set(BITS))
    if bad or not bits:
        raise ConfigError(f"bits: must be a non-empty subset of {list(BITS)}, got {list(bits)}")
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"lam: must be in [0, 1], got {lam}")
    if tau < 0 or delta < 0 or drift < 0 or horizon_steps < 0 or redeploy_every < 0:
        raise ConfigError("tau, delta, drift, horizon_steps, redeploy_every: must be >= 0")
    if calib_requests < 1 or max_replicas < 1:
        raise ConfigError("calib_requests, max_replicas: must be >= 1")


def compressed_loads(
    bits_of: Mapping[tuple[str, str], int], current: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, dict[str, str]]]:
    """device -> uid -> the agent's load fields for the bit-width chosen for each expert copy
    that is deployed (``current``: uid -> its devices)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for (u, d), b in bits_of.items():
        if d in current.get(u, ()):
            out.setdefault(d, {})[u] = load_spec(b)
    return out


class CoEL(Policy):
    """CoEL: calibrated popularity-aware placement, mixed-precision experts, token pruning and
    fusion, re-deployment when links or popularity change (see the package doc; [R] parts are
    reconstructions with every constant a parameter).

    Parameters
    ----------
    lam
        Weight of importance vs popularity in an expert's compression score.
    bits
        Bit-widths to choose from (subset of 16, 8, 4).
    intra_min_bits
        Intra-device deployment when every expert at this bit-width fits one device.
    tau
        Gate-margin pruning threshold (0: off). ``tau`` and ``sigma`` default to the largest
        values of the ``tests/unit/test_coel.py`` sweep that kept held-out accuracy at 1.0.
    renormalize_pruned
        Renormalise a token's remaining weights after pruning.
    sigma
        Fusion threshold on cosine similarity (>= 1: no fusion).
    coact_weight
        Affinity bonus (ms per unit co-activation) for co-located experts.
    replicate, max_replicas
        Replicas of hot experts in memory left at full precision.
    calib_requests, calib_seed
        Calibration prompts (tiny task's ``calibration`` split).
    plan_tokens, plan_rate_kbit, plan_a_ms, plan_b_ms
        Cost-model defaults while the cluster state has none (``place()`` sees no rates or profile).
    bytes_per_row
        Bytes of one token row per direction in the transfer model; default: what the run sends
        (``PlacementProfile.bytes_per_token`` at :meth:`place`: 8192 for a 4096-wide bf16
        model), 256 outside a run.
    delta
        Relative change of a link rate that triggers re-deployment.
    drift
        Popularity drift (total variation) that triggers re-deployment.
    redeploy_every
        Re-deploy on every n-th ``update`` call regardless (0: only on a trigger).
    horizon_steps
        Forward steps a migration's saving is counted over (vs its transfer time).
    compress
        Load each expert at its chosen bit-width (int8/int4 through the device's packed
        kernels, 16: float16). ``False``: the same placement and bit allocation, but every
        expert loaded at the run's full precision, to compare the kernels' latency alone
        (the devices then hold more than ``memory_budget_mb``: 4x as much for int8 experts).
    """

    name = "coel"

    def __init__(
        self,
        lam: float = 0.5,
        bits: Sequence[int] = BITS,
        intra_min_bits: int = 8,
        tau: float = 0.05,
        renormalize_pruned: bool = False,
        sigma: float = 0.95,
        coact_weight: float = 0.01,
        replicate: bool = True,
        max_replicas: int = 2,
        calib_requests: int = 32,
        calib_seed: int = 1,
        plan_tokens: float = 8.0,
        plan_rate_kbit: float = 20000.0,
        plan_a_ms: float = 0.5,
        plan_b_ms: float = 0.02,
        bytes_per_row: int | None = None,
        delta: float = 0.1,
        drift: float = 0.2,
        redeploy_every: int = 0,
        horizon_steps: float = 200.0,
        placement: str = "round-robin",
        seed: int = 0,
        compress: bool = True,
    ):
        super().__init__(placement, seed)
        self.compress = bool(compress)
        _check_params(
            lam,
            bits,
            tau,
            delta,
            drift,
            horizon_steps,
            redeploy_every,
            calib_requests,
            max_replicas,
        )
        self.lam, self.intra_min_bits = float(lam), int(intra_min_bits)
        self.bits = [int(b) for b in bits]
        self.tau, self.renormalize_pruned = float(tau), bool(renormalize_pruned)
        self.sigma, self.coact_weight = float(sigma), float(coact_weight)
        self.replicate, self.max_replicas = bool(replicate), int(max_replicas)
        self.calib_requests, self.calib_seed = int(calib_requests), int(calib_seed)
        self.plan_tokens, self.plan_rate_kbit = float(plan_tokens), float(plan_rate_kbit)
        self.plan_a_ms, self.plan_b_ms = float(plan_a_ms), float(plan_b_ms)
        self._bytes_per_row = None if bytes_per_row is None else int(bytes_per_row)
        self.run_bytes = 0  # the run's bytes per token, from place()'s profile
        self.delta, self.drift = float(delta), float(drift)
        self.redeploy_every, self.horizon_steps = int(redeploy_every), float(horizon_steps)
        self._select = TopKSelection()
        self.calibration: Calibration | None = None
        self.mode = ""
        self.experts: list[ExpertInfo] = []
        self.devices: list[DeviceInfo] = []
        self.dims: tuple[int, int] | None = None
        self.current: dict[str, tuple[str, ...]] = {}
        self.bits_of: dict[tuple[str, str], int] = {}
        self.deployed_rates: dict[str, float] = {}
        self.popularity: dict[str, float] = {}
        self.updates = 0
        self.pruned_slots = 0
        self.last_moves: list[Move] = []
        self.log: list[dict[str, Any]] = []

    @property
    def bytes_per_row(self) -> int:
        """The transfer model's bytes per token row: the parameter, else the run's."""
        return self._bytes_per_row or self.run_bytes or 256

    # sizes ------------------------------------------------------------------------------------
    def size_at(self, uid: str, bits: int) -> float:
        """Bytes of ``uid`` at ``bits`` (from model dims when known, else the float32 shard)."""
        if self.dims is not None:
            return float(quantized_bytes(self.dims[0], self.dims[1], bits))
        e = next(x for x in self.experts if x.uid == uid)
        return e.bytes * bits / 32.0

    def _device_models(self, cluster: ClusterView | None) -> list[DeviceModel]:
        return device_models(
            self.devices, cluster, self.plan_rate_kbit, self.plan_a_ms, self.plan_b_ms
        )

    def _scores(self, popularity: Mapping[str, float]) -> dict[str, float]:
        assert self.calibration is not None
        return expert_scores(Calibration(dict(popularity), self.calibration.importance), self.lam)

    # deployment -------------------------------------------------------------------------------
    def deploy(
        self,
        devs: Sequence[DeviceModel],
        popularity: Mapping[str, float],
        start: Mapping[str, str] | None = None,
    ) -> tuple[str, dict[str, tuple[str, ...]], dict[tuple[str, str], int]]:
        """(mode, placement, bits per (uid, device)) for the given device models."""
        assert self.calibration is not None
        return deploy(
            [e.uid for e in self.experts],
            devs,
            popularity,
            self._scores(popularity),
            self.size_at,
            bits=self.bits,
            intra_min_bits=self.intra_min_bits,
            tokens=self.plan_tokens,
            bytes_per_row=self.bytes_per_row,
            coact=self.calibration.coactivation,
            coact_weight=self.coact_weight,
            replicate=self.replicate,
            max_replicas=self.max_replicas,
            start=start,
        )

    def allocate(
        self, placement: Mapping[str, Sequence[str]], devs: Sequence[DeviceModel]
    ) -> dict[tuple[str, str], int]:
        """Bit-widths per (uid, device) for ``placement`` (:func:`allocate_bits` per device;
        a replica counts as one more expert of its device)."""
        scores = self._scores(self.popularity)
        return allocate_placement(placement, devs, scores, self.size_at, self.bits)

    def place(
        self,
        experts: Sequence[ExpertInfo],
        devices: Sequence[DeviceInfo],
        profile: PlacementProfile = NO_PROFILE,
    ) -> Placement:
        """Calibrate on the tiny task, then deploy (mode, placement, bits) for that popularity
        (the cost model at the ``plan_*`` rates and compute profile)."""
        self.experts, self.devices = list(experts), list(devices)
        self.run_bytes = profile.bytes_per_token
        self.calibration, dims = calibrate_experts(
            experts, profile.model_path, self.calib_requests, self.calib_seed
        )
        if dims is not None:
            self.dims = dims
        self.popularity = dict(self.calibration.popularity)
        devs = self._device_models(None)
        self.mode, placement, self.bits_of = self.deploy(devs, self.popularity)
        self.current = placement
        self.deployed_rates = {}
        self.log.append(
            {
                "event": "place",
                "mode": self.mode,
                "bits": self.bits_histogram(),
                "memory_bytes": self.memory_per_device(),
            }
        )
        return dict(placement)

    def bits_histogram(self) -> dict[int, int]:
        """bits -> number of (expert, device) copies at that bit-width, in bit order."""
        out: dict[int, int] = {}
        for b in self.bits_of.values():
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items()))

    def memory_per_device(self) -> dict[str, float]:
        """device -> planned weight bytes (at the assigned bit-widths)."""
        out: dict[str, float] = {}
        for (u, d), b in self.bits_of.items():
            if d in self.current.get(u, ()):
                out[d] = out.get(d, 0.0) + self.size_at(u, b)
        return out

    def load_options(self) -> dict[str, dict[str, dict[str, str]]]:
        """:func:`compressed_loads` of the deployment (none with ``compress=False``)."""
        return compressed_loads(self.bits_of, self.current) if self.compress else {}

    def wrap_backend(self, backend: Any) -> Any:
        """Token fusion around the runner's backend when ``sigma < 1``."""
        return FusionBackend(backend, self.sigma) if self.sigma < 1.0 else backend

    # selection --------------------------------------------------------------------------------
    def select(self, ctx: RoutingContext, cluster: ClusterView) -> Decision:
        """The model's top-k, pruned (:func:`prune_selection`) in inter mode when ``tau`` > 0;
        ``stats``: the (token, expert) slots pruned in this layer."""
        sel = self._select(ctx)
        if self.tau > 0 and self.mode == "inter":
            placement = cluster.placement or self.current
            dev = {
                e: (placement.get(f"L{ctx.layer}.E{e}") or ("",))[0] for e in range(ctx.num_experts)
            }
            sel, n = prune_selection(sel, ctx.router_probs, dev, self.tau, self.renormalize_pruned)
            self.pruned_slots += n
            return Decision(sel, stats={"slots_pruned": n})
        return Decision(sel)

    # updating ---------------------------------------------------------------------------------
    def update(self, cluster: ClusterView, stats: Mapping[str, Any]) -> Placement | None:
        """Re-deploy on a trigger (link rate moved > ``delta``, popularity drift > ``drift``,
        every ``redeploy_every`` calls) and return the placement after the moves that pay for
        their transfer; None when nothing moves. ``stats["expert_tokens"]`` (uid -> rows since
        the last call) updates popularity."""
        if self.calibration is None:
            return None
        self.updates += 1
        rates = link_rates(cluster)
        layers = max(1, len({e.layer for e in self.experts}))
        reasons, popularity = redeploy_triggers(
            self.deployed_rates,
            rates,
            self.popularity,
            observed_popularity(stats, self.popularity, layers),
            delta=self.delta,
            drift=self.drift,
            periodic=bool(self.redeploy_every and self.updates % self.redeploy_every == 0),
        )
        if not reasons:
            return None
        self.popularity = popularity
        self.deployed_rates = dict(rates)
        devs = self._device_models(cluster)
        cur = {u: tuple(ds) for u, ds in (cluster.placement or self.current).items()}
        mode, target, _ = self.deploy(
            devs, self.popularity, start={u: ds[0] for u, ds in cur.items() if ds}
        )
        shard = {e.uid: int(e.bytes) for e in self.experts}
        result, moves, predicted = migrate(
            cur,
            target,
            self.popularity,
            devs,
            shard,
            # feasibility at the lowest bit-width: the bits are re-allocated after the moves
            {u: self.size_at(u, min(self.bits)) for u in shard},
            tokens=self.plan_tokens,
            bytes_per_row=self.bytes_per_row,
            horizon_steps=self.horizon_steps,
        )
        self.last_moves = moves
        self.log.append({"event": "update", "reasons": reasons, "moves": len(moves), **predicted})
        if not moves:
            return None
        new_bits = self.allocate(result, devs)
        self.mode = mode if all(tuple(result[u]) == tuple(target[u]) for u in result) else "inter"
        self.current, self.bits_of = result, new_bits
        return dict(result)

    def describe(self) -> dict[str, Any]:
        """The base description plus mode, bit-width histogram, planned bytes per device and log."""
        d = super().describe()
        d.update(
            mode=self.mode,
            bits_histogram={str(k): v for k, v in self.bits_histogram().items()},
            memory_bytes=self.memory_per_device(),
            log=self.log,
        )
        return d
