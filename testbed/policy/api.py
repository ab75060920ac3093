"""The policy plug-in interface: placement, per-step expert selection (+ bandwidth), updates.

A policy is a subclass of :class:`Policy`. The framework owns the loop (trials, requests,
recording, teardown); a policy fills three hooks:

* :meth:`Policy.place` — which device(s) hold each expert (replicas allowed, memory budgets
  respected). The default places experts round-robin (or seeded-random) over the devices.
* :meth:`Policy.select` — per MoE layer and forward step, which experts each token uses and
  with which weights, seeing the router's scores and the live cluster state; it may also
  return a bandwidth split over the devices. Abstract: every policy says how it selects.
* :meth:`Policy.update` — periodic re-deployment; ``None`` (the default) keeps the placement.

Parameters are constructor keyword arguments with defaults; a recipe's ``[policy.params]``
are passed through :meth:`Policy.from_params`, which rejects unknown keys by name.

A policy is named in a recipe or on the command line by

* an entry-point name in the group ``moe_edge_testbed.policies`` (the built-ins ``topk``,
  ``top1`` are registered so; a researcher's package can add its own),
* ``package.module:Class``, or
* ``path/to/file.py:Class``

(:mod:`.loading` finds and loads them; :mod:`.placement` has the default placements).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError
from .placement import PLACEMENTS

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
    """An expert as a policy sees it (``uid`` is ``L{layer}.E{expert}``)."""

    uid: str
    layer: int
    expert: int
    bytes: int


@dataclass
class ClusterState:
    """The live view a policy decides on.

    Attributes
    ----------
    placement:
        Current placement.
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
    epoch, epoch_scope:
        Index of the current decision epoch within the trial (-1: unknown) and what one epoch
        spans (recipe ``policy.epoch``: ``layer``, ``step`` or ``request``). Link rates change
        only at an epoch's first decision.
    links_fixed:
        True when this decision's ``bandwidth_kbit`` will not be enforced (not the epoch's first
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


@dataclass(frozen=True)
class Decision:
    """What :meth:`Policy.select` returns: a :class:`models.routing.Selection` and, when the
    policy allocates bandwidth, the link rates per device in kbit/s: ``rate_down_kbit`` and
    ``rate_up_kbit`` each way, or ``bandwidth_kbit`` for both directions at one rate (a
    direction given its own rate takes that one)."""

    selection: Any
    bandwidth_kbit: Mapping[str, float] | None = None
    rate_down_kbit: Mapping[str, float] | None = None
    rate_up_kbit: Mapping[str, float] | None = None


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
    #: the split model directory, set by the runner before :meth:`place` (e.g. for a
    #: calibration run of the model in-process); None outside a run
    model_path: str | None = None
    #: bytes of one token's hidden state on the wire, per direction (expert width × wire
    #: dtype), set by the runner with :attr:`model_path`; None outside a run
    bytes_per_token: int | None = None

    def __init__(self, placement: str = "round-robin", seed: int = 0):
        if placement not in PLACEMENTS:
            raise ConfigError(
                f"placement: unknown strategy {placement!r} (one of: {', '.join(PLACEMENTS)})"
            )
        self.placement = placement
        self.seed = seed

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str = "policy.params") -> Policy:
        """Instantiate with a recipe's parameters; unknown keys are errors naming the key."""
        allowed = _init_params(cls)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                [
                    f"{where}.{k}: unknown parameter of policy {cls.name or cls.__name__} "
                    f"(allowed: {', '.join(allowed) or 'none'})"
                    for k in unknown
                ]
            )
        try:
            return cls(**params)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def place(
        self,
        experts: Sequence[ExpertInfo],
        devices: Sequence[DeviceInfo],
        profile: Mapping[str, Any] | None = None,
    ) -> Placement:
        """Map every expert to a device. Default: :data:`PLACEMENTS` ``[self.placement]``."""
        return PLACEMENTS[self.placement](experts, devices, self.seed)

    @abstractmethod
    def select(self, ctx: Any, cluster: ClusterState | None = None) -> Decision:
        """Choose experts (and weights) per token for one MoE layer and step.

        ``ctx`` is a :class:`models.routing.RoutingContext` (router logits/probabilities
        [N, E], the model's top-k, layer, step)."""

    def update(self, cluster: ClusterState, stats: Mapping[str, Any]) -> Placement | None:
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

    def last_stats(self) -> Mapping[str, Any]:
        """What the policy says about its last decision; the runner writes ``predicted_ms``
        (the layer latency the policy's model predicts) into ``layers.csv``. Default: nothing."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Name and parameters, as recorded in a run's manifest."""
        return {
            "name": self.name,
            **{k: getattr(self, k) for k in _init_params(type(self)) if hasattr(self, k)},
        }


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
