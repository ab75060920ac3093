"""Offline evaluation of a testbed policy (``testbed model eval --policy SPEC``): the policy is
driven as a run drives it, in-process and without agents or links.

:func:`offline_policy` takes a policy (from :func:`testbed.policy.load_policy`), asks it to place
every expert on the static cluster (:func:`~testbed.run.decisions.place_experts` with a
:class:`~testbed.policy.PlacementProfile` of the cluster's rates, compute profiles, bytes per
token and the split's folder) and gives a selection hook that calls ``policy.select(ctx, view)``
on a static :class:`~testbed.policy.ClusterView` (that placement, the cluster's rates, names and
bytes per token; only ``step`` follows the forward step, ``request`` stays -1), validates the
selection and tallies ``Decision.stats`` and ``predicted_ms``
(:func:`~testbed.run.decisions.decision_notes`). Rates a policy asks for are not enforced (there
are no links): the view keeps the cluster's. :class:`CountingBackend` counts the rows sent to the
experts and back; ``policy.wrap_backend`` wraps it, so e.g. CoEL's token fusion counts.
``load_options`` (e.g. CoEL's per-expert quantization) is not applied offline: the experts run as
stored (or with ``--quant``).

The static cluster (:func:`load_cluster`, a TOML or JSON file)::

    devices = ["dev1", "dev2", "dev3"]          # or a count: devices = 3 (dev1..dev3)
    rate_down_kbit = 20000                      # one number for all, or {dev1 = 20000, ...}
    rate_up_kbit = {dev1 = 20000, dev2 = 500, dev3 = 20000}   # default: as rate_down_kbit
    memory_budget_mb = 1024                     # one number or a table (default 1e6)
    bytes_per_token = 128                       # default: the model's (hidden x wire dtype)
    compute_profile = {dev1 = [0.5, 0.01]}      # device -> [a_ms, b_ms] (default: none)

Without a file: :data:`DEFAULT_DEVICES` devices ``dev1..dev3`` at :data:`DEFAULT_RATE_KBIT`
kbit/s both ways.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..dataplane.profiling import bytes_per_token
from ..errors import ConfigError
from ..policy.api import ClusterState, ClusterView, DeviceInfo, PlacementProfile, Policy
from .decisions import ask_select, decision_notes, place_experts

DEFAULT_DEVICES = 3
DEFAULT_RATE_KBIT = 20_000.0
DEFAULT_MEMORY_MB = 1e6
CLUSTER_KEYS = (
    "devices",
    "rate_down_kbit",
    "rate_up_kbit",
    "memory_budget_mb",
    "bytes_per_token",
    "compute_profile",
)


@dataclass(frozen=True)
class OfflineCluster:
    """The static cluster a policy is evaluated on (``bytes_per_token`` 0: the model's)."""

    names: tuple[str, ...]
    rate_down_kbit: dict[str, float]
    rate_up_kbit: dict[str, float]
    memory_budget_mb: dict[str, float]
    bytes_per_token: int = 0
    compute_profile: dict[str, tuple[float, float]] = field(default_factory=dict)


def default_cluster() -> OfflineCluster:
    """dev1..dev3 at 20000 kbit/s both ways, memory budgets of 1e6 MB."""
    return cluster_from_dict({}, "(default cluster)")


def load_cluster(path: Path) -> OfflineCluster:
    """The cluster of a TOML (or ``.json``) file; a bad file is a :class:`ConfigError` naming the
    file and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of cluster keys")
    return cluster_from_dict(data, str(path))


def cluster_from_dict(data: Mapping[str, Any], where: str) -> OfflineCluster:
    """:class:`OfflineCluster` of a parsed cluster file (keys :data:`CLUSTER_KEYS`)."""
    unknown = sorted(set(data) - set(CLUSTER_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}: unknown key (allowed: {', '.join(CLUSTER_KEYS)})"
        )
    names = _device_names(data.get("devices", DEFAULT_DEVICES), where)
    down = _per_device(
        data.get("rate_down_kbit", DEFAULT_RATE_KBIT), names, where, "rate_down_kbit"
    )
    up = _per_device(data.get("rate_up_kbit", down), names, where, "rate_up_kbit")
    mem = _per_device(
        data.get("memory_budget_mb", DEFAULT_MEMORY_MB), names, where, "memory_budget_mb"
    )
    bpt = data.get("bytes_per_token", 0)
    if not _is_number(bpt) or bpt < 0 or bpt != int(bpt):
        raise ConfigError(f"{where}: bytes_per_token: expected an integer >= 0, got {bpt!r}")
    profile = data.get("compute_profile", {})
    if not isinstance(profile, Mapping):
        raise ConfigError(f"{where}: compute_profile: expected a table device -> [a_ms, b_ms]")
    prof: dict[str, tuple[float, float]] = {}
    for dev, ab in profile.items():
        key = f"compute_profile.{dev}"
        if dev not in names:
            raise ConfigError(f"{where}: {key}: unknown device (devices: {', '.join(names)})")
        ok = isinstance(ab, (list, tuple)) and len(ab) == 2 and all(_is_number(x) for x in ab)
        if not ok or min(ab) < 0:
            raise ConfigError(f"{where}: {key}: expected [a_ms, b_ms] >= 0, got {ab!r}")
        prof[dev] = (float(ab[0]), float(ab[1]))
    return OfflineCluster(names, down, up, mem, int(bpt), prof)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _device_names(devices: Any, where: str) -> tuple[str, ...]:
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ConfigError(f"{where}: devices: expected a count >= 1, got {devices}")
        return tuple(f"dev{i}" for i in range(1, devices + 1))
    ok = isinstance(devices, list) and devices and all(isinstance(d, str) and d for d in devices)
    if not ok:
        raise ConfigError(f"{where}: devices: expected a list of names or a count, got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"{where}: devices: names repeat: {devices!r}")
    return tuple(devices)


def _per_device(value: Any, names: Iterable[str], where: str, key: str) -> dict[str, float]:
    """One positive number for all devices, or a table with one for each."""
    names = list(names)
    if isinstance(value, Mapping):
        extra = sorted(set(value) - set(names))
        if extra:
            raise ConfigError(
                f"{where}: {key}.{extra[0]}: unknown device (devices: {', '.join(names)})"
            )
        missing = [n for n in names if n not in value]
        if missing:
            raise ConfigError(f"{where}: {key}.{missing[0]}: missing (give every device a value)")
        out = {n: value[n] for n in names}
    else:
        out = {n: value for n in names}
    for n, v in out.items():
        if not _is_number(v) or v <= 0:
            label = key if not isinstance(value, Mapping) else f"{key}.{n}"
            raise ConfigError(f"{where}: {label}: expected a number > 0, got {v!r}")
    return {n: float(v) for n, v in out.items()}


def parse_param(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a TOML value (``5000``, ``"a"``, ``[16, 8]``, ``true``); a value
    that is not valid TOML is taken as a string (``mode=inter``)."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--param: expected KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


@dataclass
class Tally:
    """What one policy's evaluation counts: MoE calls and tokens (per forward of the first MoE
    layer), rows sent to the experts and back, ``Decision.stats`` sums per numeric key and the
    ``predicted_ms`` sum."""

    tokens: int = 0
    rows_down: int = 0
    rows_up: int = 0
    decisions: int = 0
    stats: dict[str, list[float]] = field(default_factory=dict)
    predicted: list[float] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        """``policy_predicted_ms`` and ``policy.<key>`` means (keys that were given)."""
        out: dict[str, float] = {}
        if self.predicted:
            out["policy_predicted_ms"] = sum(self.predicted) / len(self.predicted)
        for k, vs in self.stats.items():
            out[f"policy.{k}"] = sum(vs) / len(vs)
        return out


class CountingBackend:
    """An expert backend around ``inner`` that counts the rows of every layer's work sent to
    the experts (``tally.rows_down``) and the rows they return (``tally.rows_up``)."""

    def __init__(self, inner: Any, tally: Tally) -> None:
        self.inner = inner
        self.tally = tally

    def run_layer(self, work: Any) -> Any:
        """``inner.run_layer(work)``, counted."""
        res = self.inner.run_layer(work)
        self.tally.rows_down += sum(int(x.shape[0]) for x in work.inputs.values())
        self.tally.rows_up += sum(int(y.shape[0]) for y in res.outputs.values())
        return res


def counting_hook(hook: Callable[[Any], Any], first_layer: int, tally: Tally) -> Callable:
    """``hook`` (a selection hook) counting the tokens of each forward at ``first_layer``."""

    def counted(ctx: Any) -> Any:
        if ctx.layer == first_layer:
            tally.tokens += ctx.num_tokens
        return hook(ctx)

    return counted


def skips_load_options(policy: Policy) -> bool:
    """Whether ``policy`` overrides :meth:`Policy.load_options`, which is not applied offline."""
    return type(policy).load_options is not Policy.load_options


@dataclass
class OfflinePolicy:
    """A loaded, placed policy: its selection hook over the static view, and its tally."""

    policy: Policy
    state: ClusterState
    tally: Tally
    view: ClusterView = field(init=False)

    def __post_init__(self) -> None:
        self.view = ClusterView(self.state)  # static but for ``step``, which follows ctx

    def select(self, ctx: Any) -> Any:
        """``policy.select(ctx, view)``: the validated selection; stats and prediction tallied.

        Raises
        ------
        PolicyFailed
            When ``select`` raises or returns a bad selection or stats.
        """
        self.state.step = ctx.step
        d, sel = ask_select(self.policy, ctx, self.view)
        notes = decision_notes(self.policy, d)
        t = self.tally
        t.decisions += 1
        if "policy_predicted_ms" in notes:
            t.predicted.append(notes["policy_predicted_ms"])
        for k, v in (notes.get("policy_stats") or {}).items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                t.stats.setdefault(k, []).append(float(v))
        return sel


def offline_policy(
    policy: Policy,
    manifest: Any,
    cluster: OfflineCluster,
    bytes_per_token: int,
    model_path: str | None,
) -> OfflinePolicy:
    """Place ``manifest``'s experts on ``cluster`` with ``policy`` (loaded with
    :func:`testbed.policy.load_policy`; PolicyFailed when placement fails) and build the static
    state its view reads."""
    devices = [DeviceInfo(n, cluster.memory_budget_mb[n]) for n in cluster.names]
    profile = PlacementProfile(
        rate_down_kbit=dict(cluster.rate_down_kbit),
        rate_up_kbit=dict(cluster.rate_up_kbit),
        compute_profile=dict(cluster.compute_profile),
        bytes_per_token=bytes_per_token,
        model_path=model_path,
    )
    placement = place_experts(policy, manifest, devices, profile)
    state = ClusterState(
        placement=placement,
        rate_down_kbit=dict(cluster.rate_down_kbit),
        rate_up_kbit=dict(cluster.rate_up_kbit),
        compute_profile=dict(cluster.compute_profile),
        bytes_per_token=bytes_per_token,
        names=cluster.names,
    )
    return OfflinePolicy(policy, state, Tally())


def model_bytes_per_token(bs: Any) -> int:
    """A :class:`models.runtime.BaseStationModel`'s payload per token per direction: the
    experts' width x the wire dtype's bytes (the model's dtype when no wire dtype is set)."""
    dtype = bs.controller.wire_dtype or next(bs.model.parameters()).dtype
    return bytes_per_token(bs.manifest.hidden_size, dtype.itemsize)


@contextmanager
def evaluating(bs: Any, entry: Any) -> Iterator[Tally]:
    """``bs`` (a BaseStationModel) set up for one policy, ``entry`` an :class:`OfflinePolicy`
    or a routing hook (:func:`models.routing.make_policy`): yields the :class:`Tally` that
    counts tokens, rows and (a policy's) stats; the backend wrapped by the policy's
    ``wrap_backend``. The model's hook and backend are restored on exit."""
    backend, hook = bs.backend, bs.policy
    tally = entry.tally if isinstance(entry, OfflinePolicy) else Tally()
    counting = CountingBackend(backend, tally)
    first = min(bs.manifest.moe_layers)
    if isinstance(entry, OfflinePolicy):
        bs.backend = entry.policy.wrap_backend(counting)
        bs.policy = counting_hook(entry.select, first, tally)
    else:
        bs.backend = counting
        bs.policy = counting_hook(entry, first, tally)
    try:
        yield tally
    finally:
        bs.backend, bs.policy = backend, hook


def tally_columns(tally: Tally, bytes_per_token: int) -> dict[str, Any]:
    """A result row's columns from ``tally``: bytes per token each way (rows sent to / returned
    by the experts x ``bytes_per_token``, over the tokens through the model, padding included),
    then the policy's prediction and stats means."""
    n = max(tally.tokens, 1)
    return {
        "bytes_down_per_token": round(tally.rows_down * bytes_per_token / n, 1),
        "bytes_up_per_token": round(tally.rows_up * bytes_per_token / n, 1),
        **tally.means(),
    }
