"""The policy plug-in interface: placement, per-layer expert selection (+ bandwidth), updates.

A policy is a subclass of :class:`Policy`. The framework owns the loop (trials, requests,
recording, teardown); a policy fills up to three hooks, each with typed records in and out:

* :meth:`Policy.select` (required) — per MoE layer and forward step: which experts each token
  uses and with which weights. In: the router's output (:class:`models.routing.RoutingContext`)
  and a read-only :class:`ClusterView` (never ``None``). Out: a :class:`Decision` (the
  :class:`models.routing.Selection`, optionally link rates per device, the policy's own latency
  prediction and a free ``stats`` dict that lands in ``layers.csv`` as ``policy.<key>``
  columns).
* :meth:`Policy.place` — which device(s) hold each expert. In: the experts with their sizes,
  the devices with their memory budgets and a :class:`PlacementProfile` (the trial's planned
  link rates, compute profiles where measured, bytes per token, the model's folder). Out: a
  :data:`Placement`. Default: round-robin (or seeded-random) over the devices.
* :meth:`Policy.update` — periodic re-deployment every ``run.update_every`` requests; ``None``
  (the default) keeps the placement.

Parameters are typed constructor keyword arguments with defaults; a recipe's
``[policy.params]`` (and ``[policy.params.<name>]``, for one policy of a sweep) pass through
:meth:`Policy.from_params`, which rejects unknown keys and values of the wrong type by name.

Conventions a policy can rely on:

* **Expert uids** are ``L{layer}.E{expert}``; :meth:`ClusterView.device_of` maps
  ``(layer, expert)`` to the device serving it, so a policy need not parse uids.
* **Selections** are ``[N, K]`` tensors, ``-1`` marking an empty slot; the built-in
  :class:`models.routing.TopKSelection` fills each token's slots in descending router
  probability (slot 0 = the most probable expert); :meth:`models.routing.Selection.drop`
  empties slots. The framework does not depend on the order of slots.
* **Rates** seen in :meth:`select` are those in force on the links at that moment: a trace's
  or channel's rates for the epoch are applied before the epoch's first decision; the rates a
  policy itself asks for are applied right after that decision and seen by the next one.
* **Requests** are numbered from 0 (``at_request = k`` acts just before request k).

A policy is named in a recipe or on the command line by

* an entry-point name in the group ``moe_edge_testbed.policies`` (the built-ins ``topk``,
  ``top1``, ``wdmoe``, ``coel``; a researcher's package can add its own),
* ``package.module:Class``, or
* ``path/to/file.py:Class`` (relative: to the recipe's folder, then the working directory)

(:mod:`.loading` finds and loads them; :mod:`.placement` has the default placements).
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError
from .placement import PLACEMENTS

if TYPE_CHECKING:  # torch is imported only by the model code that builds these
    from models.routing import RoutingContext, Selection

Placement = dict[str, tuple[str, ...]]
"""Expert uid -> the devices holding it (first = primary, others = replicas)."""


@dataclass(frozen=True)
class DeviceInfo:
    """A device as a policy sees it (``memory_budget_mb``: the inventory's, or the recipe's
    ``run.memory_budget_mb``, which may be a fraction of a MB)."""

    name: str
    memory_budget_mb: float
    hw_class: str = "netns"


@dataclass(frozen=True)
class ExpertInfo:
    """An expert as a policy sees it (``uid`` is ``L{layer}.E{expert}``, ``bytes`` its shard's
    size as stored)."""

    uid: str
    layer: int
    expert: int
    bytes: int


@dataclass(frozen=True)
class PlacementProfile:
    """What :meth:`Policy.place` knows besides the experts and devices.

    Attributes
    ----------
    rate_down_kbit, rate_up_kbit:
        The trial's planned link rates per device (the recipe's ``[links]``, per device where
        it says so); empty outside a run unless given.
    compute_profile:
        Per-device expert compute model ``(a_ms, b_ms)`` (``c(N) = a + b N`` for N rows)
        where an earlier trial of the run profiled it; empty otherwise.
    bytes_per_token:
        Payload bytes of one token's hidden state per direction (0: unknown).
    model_path:
        The split model's folder (e.g. for a calibration run in-process); ``None`` offline.
    """

    rate_down_kbit: Mapping[str, float] = field(default_factory=dict)
    rate_up_kbit: Mapping[str, float] = field(default_factory=dict)
    compute_profile: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    bytes_per_token: int = 0
    model_path: str | None = None


NO_PROFILE = PlacementProfile()
"""The profile of a placement that knows nothing (a test's or an offline call's default)."""


@dataclass
class ClusterState:
    """The live record behind a trial's :class:`ClusterView`, written only by the framework
    (:mod:`testbed.run.cluster`); a policy reads it through the view.

    Attributes
    ----------
    placement:
        Current placement.
    names:
        The trial's devices, in inventory order.
    rate_down_kbit, rate_up_kbit:
        Enforced link rates per device (from tc).
    devices:
        Per-device status from the agents' feed (memory, load, power...), free-form.
    compute_profile:
        Per-device expert compute time model ``c(N) = a_ms + b_ms * N`` for N token-rows,
        as ``(a_ms, b_ms)``, fitted by the runner's profiling step on the real agents.
    bytes_per_token:
        Payload bytes per token per direction (hidden size x bytes per element).
    step:
        Forward-step index of the current decision (0 = prefill).
    request:
        Index of the request being run within the trial's repeat (from 0; -1: none).
    epoch, epoch_scope:
        Index of the current decision epoch within the trial (-1: unknown) and what one epoch
        spans (recipe ``policy.epoch``: ``layer``, ``step`` or ``request``). Link rates change
        only at an epoch's first decision.
    links_fixed:
        True when this decision's rates will not be enforced (not the epoch's first
        decision): the links stay at ``rate_down_kbit``/``rate_up_kbit``.
    channel, bandwidth_hz:
        The runner's :class:`testbed.net.channel.ChannelModel` over the trial's devices and the
        cell's total bandwidth (recipe ``links.bandwidth_mhz``); ``None``/0 when not set.
    """

    placement: Placement = field(default_factory=dict)
    rate_down_kbit: dict[str, float] = field(default_factory=dict)
    rate_up_kbit: dict[str, float] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    compute_profile: dict[str, tuple[float, float]] = field(default_factory=dict)
    bytes_per_token: int = 0
    step: int = -1
    epoch: int = -1
    epoch_scope: str = "layer"
    links_fixed: bool = False
    channel: Any = None
    bandwidth_hz: float = 0.0
    names: tuple[str, ...] = ()
    request: int = -1


class ClusterView:
    """The cluster as a policy sees it: read-only, current at each call, never ``None``.

    In a run it follows the trial's :class:`ClusterState`; tests and offline evaluation build a
    static one with :meth:`static`. Mappings are read-only views (``types.MappingProxyType``).
    Every :class:`ClusterState` attribute reads the same here, and :meth:`device_of` /
    :meth:`devices_of` / :meth:`layer_devices` give the expert -> device map.
    """

    __slots__ = ("_placement", "_s")

    def __init__(self, state: ClusterState):
        object.__setattr__(self, "_s", state)
        object.__setattr__(self, "_placement", None)

    @classmethod
    def static(
        cls,
        names: Sequence[str],
        placement: Mapping[str, Sequence[str]] | None = None,
        rate_kbit: float | Mapping[str, float] = 20_000.0,
        rate_up_kbit: float | Mapping[str, float] | None = None,
        **state: Any,
    ) -> ClusterView:
        """A view that does not change: devices ``names``, ``placement`` (uid -> devices), the
        downlink rate (one for all or per device), the uplink (default: as down), and any other
        :class:`ClusterState` field by keyword (e.g. ``compute_profile``, ``bytes_per_token``)."""

        def per_device(r: float | Mapping[str, float]) -> dict[str, float]:
            return {n: float(r if isinstance(r, (int, float)) else r[n]) for n in names}

        down = per_device(rate_kbit)
        up = down if rate_up_kbit is None else per_device(rate_up_kbit)
        return cls(
            ClusterState(
                placement={u: tuple(ds) for u, ds in (placement or {}).items()},
                rate_down_kbit=down,
                rate_up_kbit=dict(up),
                names=tuple(names),
                **state,
            )
        )

    # the expert -> device map -----------------------------------------------------------
    def devices_of(self, uid: str) -> tuple[str, ...]:
        """Every device holding expert ``uid`` (primary first); ``()`` when none."""
        return tuple(self._s.placement.get(uid, ()))

    def device_of(self, layer: int, expert: int) -> str | None:
        """The device serving expert ``expert`` of MoE layer ``layer`` (its primary)."""
        ds = self._s.placement.get(f"L{layer}.E{expert}")
        return ds[0] if ds else None

    def layer_devices(self, layer: int, num_experts: int) -> list[str | None]:
        """``[device_of(layer, e) for e in range(num_experts)]``."""
        return [self.device_of(layer, e) for e in range(num_experts)]

    # the record's fields, read-only -------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The trial's devices, in inventory order (index 0 first)."""
        return self._s.names or tuple(self._s.rate_down_kbit)

    @property
    def placement(self) -> Mapping[str, tuple[str, ...]]:
        """Expert uid -> devices holding it (primary first); the same object until the
        placement changes (a policy may cache what it derives from it by identity)."""
        d, cached = self._s.placement, self._placement
        if cached is None or cached[0] is not d:
            cached = (d, types.MappingProxyType(d))
            object.__setattr__(self, "_placement", cached)
        return cached[1]

    @property
    def rate_down_kbit(self) -> Mapping[str, float]:
        """Device -> BS-to-device rate in force now (kbit/s, as tc enforces it)."""
        return types.MappingProxyType(self._s.rate_down_kbit)

    @property
    def rate_up_kbit(self) -> Mapping[str, float]:
        """Device -> device-to-BS rate in force now (kbit/s)."""
        return types.MappingProxyType(self._s.rate_up_kbit)

    @property
    def devices(self) -> Mapping[str, Mapping[str, Any]]:
        """Device -> its latest status from the agents' feed (free-form; empty offline)."""
        return types.MappingProxyType(
            {d: types.MappingProxyType(v) for d, v in self._s.devices.items()}
        )

    @property
    def compute_profile(self) -> Mapping[str, tuple[float, float]]:
        """Device -> ``(a_ms, b_ms)`` of its expert compute time ``a + b N``."""
        return types.MappingProxyType(self._s.compute_profile)

    def __getattr__(self, name: str) -> Any:
        # the scalar fields (bytes_per_token, step, request, epoch, epoch_scope, links_fixed,
        # channel, bandwidth_hz) read through; anything else is an AttributeError
        if name in _SCALARS:
            return getattr(self._s, name)
        raise AttributeError(f"ClusterView has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ClusterView is read-only (setting {name!r})")

    def __repr__(self) -> str:
        return f"ClusterView({self._s!r})"


_SCALARS = frozenset(
    (
        "bytes_per_token",
        "step",
        "request",
        "epoch",
        "epoch_scope",
        "links_fixed",
        "channel",
        "bandwidth_hz",
    )
)


@dataclass(frozen=True)
class Decision:
    """What :meth:`Policy.select` returns.

    Attributes
    ----------
    selection:
        The experts and weights per token (:class:`models.routing.Selection`).
    bandwidth_kbit, rate_down_kbit, rate_up_kbit:
        Optional link rates per device (kbit/s), enforced at a decision epoch's start:
        ``rate_down_kbit``/``rate_up_kbit`` each way, or ``bandwidth_kbit`` for both (a
        direction given its own rate takes that one).
    predicted_ms:
        The policy's own prediction of this layer's expert exchange (``layers.csv``
        ``policy_predicted_ms``); ``None``: no prediction.
    stats:
        Anything the policy wants logged per layer (numbers or short strings): key ``k``
        becomes the column ``policy.k`` of ``layers.csv`` (added when first seen, empty in the
        rows of policies that do not give it).
    """

    selection: Selection
    bandwidth_kbit: Mapping[str, float] | None = None
    rate_down_kbit: Mapping[str, float] | None = None
    rate_up_kbit: Mapping[str, float] | None = None
    predicted_ms: float | None = None
    stats: Mapping[str, float | int | str] = field(default_factory=dict)


class Policy(ABC):
    """Base class of every policy. Subclasses set ``name`` and implement :meth:`select`.

    Parameters
    ----------
    placement:
        Default placement strategy: ``round-robin`` or ``random`` (seeded).
    seed:
        Seed for every random choice the policy makes.
    """

    name: ClassVar[str] = ""

    def __init__(self, placement: str = "round-robin", seed: int = 0):
        if placement not in PLACEMENTS:
            raise ConfigError(
                f"placement: unknown strategy {placement!r} (one of: {', '.join(PLACEMENTS)})"
            )
        self.placement = placement
        self.seed = seed

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str = "policy.params") -> Policy:
        """Instantiate with a recipe's parameters; unknown keys and values whose type does not
        match the constructor's annotation are errors naming the key."""
        allowed = _init_params(cls)
        label = cls.name or cls.__name__
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                [
                    f"{where}.{k}: unknown parameter of policy {label} "
                    f"(allowed: {', '.join(allowed) or 'none'})"
                    for k in unknown
                ]
            )
        hints = _init_hints(cls)
        bad = [
            f"{where}.{k}: expected {_type_name(hints[k])}, got {type(v).__name__} {v!r} "
            f"(policy {label})"
            for k, v in params.items()
            if k in hints and not _matches(v, hints[k])
        ]
        if bad:
            raise ConfigError(bad)
        try:
            return cls(**params)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def place(
        self,
        experts: Sequence[ExpertInfo],
        devices: Sequence[DeviceInfo],
        profile: PlacementProfile = NO_PROFILE,
    ) -> Placement:
        """Map every expert to a device (a run always gives ``profile``). Default:
        :data:`PLACEMENTS` ``[self.placement]``."""
        return PLACEMENTS[self.placement](experts, devices, self.seed)

    @abstractmethod
    def select(self, ctx: RoutingContext, cluster: ClusterView) -> Decision:
        """Choose experts (and weights) per token for one MoE layer and step.

        ``ctx`` is a :class:`models.routing.RoutingContext` (router logits/probabilities
        [N, E], the model's top-k, layer, step); ``cluster`` the :class:`ClusterView`."""

    def update(self, cluster: ClusterView, stats: Mapping[str, Any]) -> Placement | None:
        """Return a new placement to migrate to, or ``None`` to keep the current one.

        The runner calls it every ``run.update_every`` requests (recipe; 0 = never) with the
        window's ``stats`` (see :mod:`testbed.run.updates`) and applies what it returns."""
        return None

    def load_options(self) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
        """device -> uid -> extra fields of the agent's ``load`` spec for that expert there
        (e.g. ``{"quant": "int4"}`` or ``{"dtype": "float16"}``), asked after every
        placement; a changed entry reloads the expert. Default: none (the shard as stored)."""
        return {}

    def wrap_backend(self, backend: Any) -> Any:
        """The expert backend the BS runtime uses for this policy's trial: ``backend`` itself
        (default) or a wrapper around it (e.g. :class:`recipes.coel.FusionBackend`)."""
        return backend

    def describe(self) -> dict[str, Any]:
        """Name and parameters, as recorded in a run's manifest."""
        return {
            "name": self.name,
            **{k: getattr(self, k) for k in _init_params(type(self)) if hasattr(self, k)},
        }


@dataclass(frozen=True)
class RequestContext:
    """One request as a request-level policy (:class:`RequestPolicy`) sees it.

    Attributes
    ----------
    index:
        The request's index within the trial's repeat (from 0).
    prompt:
        Its token ids.
    category:
        Its task category (index into :attr:`RequestProfile.categories`; -1: unknown).
    gate:
        The BS gate's weights over the whole-model experts (sum 1), in the order of
        :attr:`RequestProfile.experts`.
    """

    index: int
    prompt: tuple[int, ...]
    category: int
    gate: tuple[float, ...]


@dataclass(frozen=True)
class RequestDecision:
    """What :meth:`RequestPolicy.select_request` returns: the experts that serve the request
    (indices into :attr:`RequestProfile.experts`; empty: the request is refused), their
    combination weights (default: the gate's, renormalised over them) and free ``stats``
    (``requests.csv`` ``policy.<key>`` columns)."""

    experts: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    stats: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestProfile:
    """What :meth:`RequestPolicy.plan` knows, measured on the testbed before the requests.

    Attributes
    ----------
    experts:
        The whole-model experts' ids; ``devices[k]`` is the device serving expert ``k``.
    energy_j:
        Per-request energy of each expert on its device (J; measured, or estimated where the
        device has no meter: see the run's manifest).
    delay_ms:
        ``[K][C]``: each expert's delay on a prompt of each category (inference + transmission,
        as the BS measures the round trip).
    aggregation_ms:
        The BS's time to combine the answers.
    categories:
        The category names.
    gate, option_probs, answer, category:
        A validation set: the gate's weights ``[N, K]``, each expert's probabilities over each
        prompt's answer options ``[K, N, O]``, the right option ``[N]``, the category ``[N]``
        (numpy arrays).
    """

    experts: tuple[str, ...]
    devices: tuple[str, ...]
    energy_j: tuple[float, ...]
    delay_ms: tuple[tuple[float, ...], ...]
    aggregation_ms: float
    categories: tuple[str, ...]
    gate: Any = None
    option_probs: Any = None
    answer: Any = None
    category: Any = None


class RequestPolicy(Policy):
    """A policy that decides once per request instead of per token and layer (MoE²: whole
    models as experts). :meth:`plan` is called once per trial with the measured
    :class:`RequestProfile`, :meth:`select_request` for every request. Placement
    (:meth:`place`) gets one :class:`ExpertInfo` per whole model (``uid`` its id, ``layer``
    -1, ``expert`` its index, ``bytes`` its size)."""

    def plan(self, profile: RequestProfile) -> None:
        """Prepare the trial's decisions from the profile (default: nothing)."""

    @abstractmethod
    def select_request(self, req: RequestContext, cluster: ClusterView) -> RequestDecision:
        """The experts (and weights) that serve request ``req``."""

    def select(self, ctx: RoutingContext, cluster: ClusterView) -> Decision:
        """Not used: a request-level policy runs only with whole-model experts."""
        raise ConfigError(
            f"policy {self.name or type(self).__name__}: decides per request (whole-model "
            "experts); it cannot route a MoE model's layers"
        )


def _init_params(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if (
                p.name != "self"
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in names
            ):
                names.append(p.name)
    return names


def _init_hints(cls: type) -> dict[str, Any]:
    """Parameter -> annotation over the constructors of ``cls``'s MRO (the subclass's wins,
    also over a parent's when its own does not resolve: then the parameter is unchecked)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        module = sys.modules.get(klass.__module__)
        ns = {**vars(module)} if module is not None else {}
        for name, p in inspect.signature(init).parameters.items():
            if name == "self" or p.annotation is inspect.Parameter.empty:
                continue
            out.pop(name, None)
            ann = p.annotation
            if isinstance(ann, str):
                try:
                    ann = eval(ann, ns)  # as typing.get_type_hints does
                except Exception:  # noqa: BLE001, S112 - e.g. a TYPE_CHECKING-only name
                    continue
            out[name] = ann
    return out


def _matches(value: Any, hint: Any) -> bool:
    """Whether a recipe value fits ``hint`` (TOML's types: bool, int, float, str, list,
    dict); an int passes as a float; annotations this does not understand pass."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    base = origin or hint
    if base in (list, tuple, Sequence, typing.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        ok = isinstance(value, (list, tuple))
        return ok and (len(args) != 1 or all(_matches(v, args[0]) for v in value))
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, Mapping)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
