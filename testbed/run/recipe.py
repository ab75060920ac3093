"""Experiment recipes (TOML): model, policy + parameters, link profile, workload, repeats, seed,
and a sweep grid over any of these.

::

    [recipe]
    name = "compare"            # names the run folder
    description = "top-k vs top-1 at two link rates"
    seed = 0
    repeats = 1                 # every sweep point is run this many times

    [model]
    path = "tiny"               # "tiny", "tiny-4096" (the tiny model widened to 4096: experts and
                                # payloads of Mixtral-8x7B's width, the tiny model's accuracy),
                                # "tiny-1024x3584" (also its experts' intermediate size, zero-
                                # padded: they compute as much as 1024x3584 experts do),
                                # a split directory or an HF checkpoint (relative to this file)
    wire_dtype = "bf16"         # optional: hidden states on the wire (and the agents' io dtype)
                                # fp32, bf16 or fp16; default: fp32 (whatever run.bs_dtype)

    [policy]
    name = "topk"               # entry-point name, package.module:Class or path/file.py:Class
    epoch = "step"              # decision epoch: link rates (a policy's bandwidth, a channel
                                # or a trace) change once per forward "step", per "layer" (every
                                # MoE layer of every step) or per "request"; the decisions
                                # inside an epoch see ClusterView.links_fixed = True
    [policy.params]             # the policy's constructor parameters, for every policy swept
    placement = "round-robin"
    [policy.params.wdmoe]       # optional: only for trials whose policy.name is "wdmoe" (as
    alpha = 0.7                 # written, quoted for a path: [policy.params."x/p.py:Cls"]); its
                                # keys win over the plain ones; a table for a policy no trial
                                # runs is an error; swept as "policy.params.wdmoe.alpha"

    [links]                     # applied to every device's link (both directions unless split)
    rate = "20mbit"             # or rate_down / rate_up
    delay = "0ms"               # needs netem on the BS kernel (refused with the kernel's message)
    loss = "0%"
    [links.device.dev2]         # optional: one device's own link, by inventory name ...
    rate_down = "2mbit"         # keys: rate, rate_down, rate_up, delay, loss (units as above);
    [links.device.0]            # ... or by index, counted from 0 over the inventory's order (a
    rate = "500kbit"            # trial's devices are its first run.devices: same indices); a
    delay = "5ms"               # key of digits only is an index. Down (up) is the device's
                                # rate_down (rate_up), else its rate, else the cell's rate_down
                                # (rate_up), else the cell's rate; delay and loss: the device's,
                                # else the cell's. A name not in the inventory, an index out of
                                # range, or a device named both ways is an error before the run
                                # starts; swept and --set as "links.device.<name or index>.<key>".
                                # With bandwidth_mhz or trace these rates are the starting rates
                                # only (the channel's or trace's replace them at every epoch);
                                # the device's delay and loss stay
    bandwidth_mhz = 20.0        # optional: the cell's total bandwidth under the channel model
                                # (testbed.net.channel, seeded by recipe.seed, devices by name;
                                # wireless papers use 10-100 MHz): each epoch a policy that
                                # allocates bandwidth splits it (ClusterView.channel/
                                # bandwidth_hz), any other policy gets the equal split's rates
                                # each way (same fading) - equal link budget
    trace = "trace.csv"         # optional: a channel trace (testbed links trace; relative to
                                # this file) replayed on the links, its k-th time block at the
                                # k-th decision epoch (cycling), for policies that allocate no
                                # bandwidth; time_s only orders the blocks
    [links.channel]             # optional: the channel model's constants (testbed.net.channel's
    bs_power_dbm = 46.0         # docstring lists every key, its default and its source; e.g.
    device_power_dbm = 23.0     # shadowing_db, fading, se_model, cqi_table, power_split), the
    se_model = "capped"         # rest at their defaults; all recorded in the manifest; swept
                                # as "links.channel.<key>"

    [workload]
    task = "tiny"               # "tiny": the built-in model's held-out task (answers known);
                                # "synthetic": random prompts, scored against the model's own
                                # single-process top-k output
    requests = 20               # per trial and repeat
    prompt_tokens = 16          # synthetic only (tiny prompts come from the task)
    output_tokens = 8           # synthetic: tokens generated; tiny: up to the answer's length

    [run]
    timeout_s = 5.0             # per expert call
    down_backoff_s = 30.0       # after a timeout, a device's calls are skipped (re-routed or
                                # dropped at once) for this long before it is tried again
    devices = 3                 # devices a trial uses: the first N of the inventory (placement
                                # over those only); default: all of it, or 3 when `testbed run`
                                # creates the local testbed (sized for the largest N swept);
                                # up to 100000 (`testbed simulate` runs 1000+ devices)
    telemetry_period_s = 0.5    # agent status feed period (devices.csv)
    bs_threads = 1              # optional: torch threads of the BS runtime (default: 1 on the
                                # local namespace testbed, whose agents share the BS's cores:
                                # idle worker threads spinning against them cost ms per op;
                                # torch's own default in a lab)
    bs_device = "cpu"           # where the BS part (embeddings, attention, norms, router) runs:
                                # "cpu", "cuda" or "cuda:N" (refused before anything is touched
                                # when this host has no such CUDA device); set, not swept
    bs_dtype = "float32"        # its weights and compute: float32, bfloat16 or float16 (router
                                # and MoE combine stay float32; the wire keeps model.wire_dtype);
                                # set, not swept; both recorded in the manifest's "bs_compute"
    memory_budget_mb = 0.09     # optional: every device's memory budget for the policy (MB,
                                # fractions allowed), instead of the inventory's
    update_every = 5            # optional: call policy.update() every N requests (0: never);
                                # a placement it returns is applied, moves in migrations.csv
    [[run.events]]              # optional: a link change just before request `at_request`
    at_request = 10             # (of every trial and repeat)
    device = "dev2"
    rate = "1mbit"
    direction = "both"          # down, up or both

    [devices]
    power_mode = "MAXN"         # optional: Jetson nvpmodel mode for the trial, by name (as
                                # `nvpmodel -p --verbose` lists it on each device; ids differ
                                # per module) or by id; set over SSH with `sudo -n nvpmodel -m
                                # ID` before a trial that changes it, every device restored to
                                # its own mode when the run ends (errors and Ctrl-C included);
                                # a device without nvpmodel or without that mode fails the run
                                # with one line naming it, before anything is changed

    [faults]                    # optional fault injection, replayed in every trial and repeat
    events = [                  # (testbed.run.faults: every action, key and default)
      { at_request = 4, device = "dev2", action = "kill" },
      { at_s = 2.0, device = "dev1", action = "stop", for_s = 1.5 },
      { at_request = 6, device = "dev3", action = "link", rate = "8kbit", for_requests = 2 },
      { at_request = 9, device = "dev2", action = "restart" },
    ]

    [sweep]                     # cartesian grid; keys are dotted paths of the tables above
    "links.rate" = ["2mbit", "20mbit"]
    "policy.name" = ["topk", "top1"]
    [sweep.zip]                 # optional: keys that vary together, one axis of the grid
    "workload.requests" = [8, 16]   # (equal-length lists; i-th values together), crossed
    "run.timeout_s" = [2.0, 4.0]    # with the keys above

Every problem (unknown table or key, wrong type, bad unit, empty sweep list) is collected and
raised as one :class:`~testbed.errors.ConfigError`, each naming the file and the key.
``--set key=value`` overrides go through the same checks.
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError
from ..net.channel import CHANNEL_DEFAULTS, check_channel_params
from ..net.tc import LinkSpec
from ..units import parse_percent, parse_rate_kbit, parse_time_ms
from .faults import parse_faults

TASKS = ("tiny", "synthetic")


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, not {v!r}")
    return v


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise ValueError(f"must be an integer {rng}, not {v!r}")
        return v

    return check


def _float(lo: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > lo:
            raise ValueError(f"must be a number > {lo:g}, not {v!r}")
        return float(v)

    return check


def _rate(v: Any) -> float:
    if not isinstance(v, str):
        raise ValueError(f'must be a rate string such as "20mbit", not {v!r}')
    return parse_rate_kbit(v)


def _time(v: Any) -> float:
    if not isinstance(v, str):
        raise ValueError(f'must be a time string such as "5ms", not {v!r}')
    return parse_time_ms(v)


def _pct(v: Any) -> float:
    if not isinstance(v, str):
        raise ValueError(f'must be a percentage string such as "0.5%", not {v!r}')
    return parse_percent(v)


def _task(v: Any) -> str:
    if v not in TASKS:
        raise ValueError(f"must be one of {', '.join(TASKS)}, not {v!r}")
    return v


#: wire dtypes a recipe may name -> the agents' dtype names
WIRE_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def _wire_dtype(v: Any) -> str:
    if v not in WIRE_DTYPES:
        raise ValueError(f"must be one of fp32, bf16, fp16, not {v!r}")
    return v


BS_DTYPES = dict(WIRE_DTYPES)
"""``run.bs_dtype`` values -> torch's names (the same names as the wire's)."""

#: keys read once per run (the BS model is loaded once): set, never swept
RUN_WIDE_KEYS = ("run.bs_device", "run.bs_dtype")


def _bs_device(v: Any) -> str:
    ok = isinstance(v, str) and (
        v in ("cpu", "cuda") or (v.startswith("cuda:") and v[5:].isascii() and v[5:].isdigit())
    )
    if not ok:
        raise ValueError(f'must be "cpu", "cuda" or "cuda:N", not {v!r}')
    return v


def _bs_dtype(v: Any) -> str:
    if v not in BS_DTYPES:
        raise ValueError(
            f"must be one of float32, bfloat16, float16 (or fp32, bf16, fp16), not {v!r}"
        )
    return v


EPOCHS = ("step", "layer", "request")


def _epoch(v: Any) -> str:
    if v not in EPOCHS:
        raise ValueError(f"must be one of {', '.join(EPOCHS)}, not {v!r}")
    return v


def _power_mode(v: Any) -> str | int:
    if isinstance(v, bool) or not (
        isinstance(v, int) and v >= 0 or isinstance(v, str) and v.strip()
    ):
        raise ValueError(f'must be an nvpmodel mode name (e.g. "MAXN") or id >= 0, not {v!r}')
    return v.strip() if isinstance(v, str) else v


EVENT_KEYS = ("at_request", "device", "rate", "direction")


def _direction(v: Any) -> str:
    if v not in ("down", "up", "both"):
        raise ValueError(f"must be down, up or both, not {v!r}")
    return v


def _events(v: Any) -> list[dict[str, Any]]:
    is_list = isinstance(v, list)
    if not is_list:
        raise ValueError("must be an array of tables ([[run.events]])")
    for i, ev in enumerate(v):
        is_table = isinstance(ev, dict)
        if not is_table:
            raise ValueError(f"[{i}]: must be a table")
        unknown = sorted(set(ev) - set(EVENT_KEYS))
        if unknown:
            raise ValueError(f"[{i}].{unknown[0]}: unknown key (valid: {', '.join(EVENT_KEYS)})")
        for k in ("at_request", "device", "rate"):
            if k not in ev:
                raise ValueError(f"[{i}].{k}: missing")
        checks = (
            ("at_request", _int(0)),
            ("device", _str),
            ("rate", _rate),
            ("direction", _direction),
        )
        for k, check in checks:
            try:
                check(ev.get(k, "both"))
            except (ValueError, ConfigError) as e:
                raise ValueError(f"[{i}].{k}: {e}") from None
    return v


def _params(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("must be a table")
    return v


#: the keys a ``[links.device.<name or index>]`` table may set
DEVICE_LINK_KEYS = ("rate", "rate_down", "rate_up", "delay", "loss")


def _device_ref(key: str) -> int | str:
    """A ``links.device`` key: an index (digits only, from 0 in the inventory's order) or a
    device name."""
    return int(key) if key.isascii() and key.isdigit() else key


def _device_link_problems(parts: Sequence[str], value: Any) -> list[tuple[str, str]]:
    """(dotted key, message) for every problem of ``links.device[.<dev>[.<key>]] = value``
    (``parts``: the dotted key's parts). The devices themselves are checked against the run's
    in :func:`device_links_problems`."""
    if len(parts) == 2:
        if not isinstance(value, dict):
            return [("links.device", "must be a table of [links.device.<name or index>] tables")]
        return [p for dev, tab in value.items() for p in _device_link_problems([*parts, dev], tab)]
    shown = f"links.device.{_toml_key(parts[2])}"
    if not parts[2]:
        return [(shown, "a device name or index must not be empty")]
    if len(parts) == 3:
        if not isinstance(value, dict):
            return [(shown, f"must be a table of link keys ({', '.join(DEVICE_LINK_KEYS)})")]
        return [p for k, v in value.items() for p in _device_link_problems([*parts, k], v)]
    key = ".".join(parts[3:])
    if len(parts) > 4 or key not in DEVICE_LINK_KEYS:
        return [
            (f"{shown}.{key}", f"unknown key (valid per device: {', '.join(DEVICE_LINK_KEYS)})")
        ]
    try:
        SCHEMA["links"][key][0](value)
    except (ValueError, ConfigError) as e:
        return [(f"{shown}.{key}", str(e))]
    return []


def _listed(names: Sequence[str], most: int = 8) -> str:
    """``names`` joined by commas, the middle elided past ``most``."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[: most - 1])}, ..., {names[-1]} ({len(names)} devices)"


def device_links_problems(table: Mapping[str, Any], names: Sequence[str], where: str) -> list[str]:
    """Every key of a ``links.device`` ``table`` that names no device of ``names`` (the run's
    devices in the inventory's order; an index counts from 0 over them), or names a device
    another key names too; each message names ``where`` (the recipe) and the key."""
    out: list[str] = []
    seen: dict[str, str] = {}  # device -> the key that named it
    for key in table:
        ref, shown = _device_ref(key), f"links.device.{_toml_key(key)}"
        if isinstance(ref, int) and ref >= len(names):
            out.append(
                f"{where}: {shown}: no device at index {ref} (indices count from 0: "
                f"0..{len(names) - 1} = {_listed(names)})"
            )
            continue
        if isinstance(ref, str) and ref not in names:
            out.append(f"{where}: {shown}: no device {ref!r} (devices: {_listed(names)})")
            continue
        name = names[ref] if isinstance(ref, int) else ref
        if name in seen:
            out.append(
                f"{where}: {seen[name]} and {shown}: both name device {name} (index "
                f"{list(names).index(name)}); keep one"
            )
        seen[name] = shown
    return out


def check_device_links(
    trials: Iterable[Trial], names_of: Callable[[Trial], Sequence[str]], where: str
) -> None:
    """Every trial's ``links.device`` against its run's devices ``names_of(trial)``.

    Raises
    ------
    ConfigError
        Naming ``where`` and every bad key (once, however many trials have it).
    """
    problems: list[str] = []
    for t in trials:
        table = t.config["links"].get("device") or {}
        for line in device_links_problems(table, names_of(t), where) if table else []:
            if line not in problems:
                problems.append(line)
    if problems:
        raise ConfigError(problems)


def _with_channel_defaults(links: dict[str, Any]) -> None:
    """Fill ``links.channel``'s missing keys with the model's defaults (so that the manifest
    records the whole channel)."""
    ch = links.get("channel")
    if isinstance(ch, dict):
        links["channel"] = {**CHANNEL_DEFAULTS, **ch}


SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "recipe": {
        "name": (_str, "recipe"),
        "description": (lambda v: str(v), ""),
        "seed": (_int(0), 0),
        "repeats": (_int(1, 1000), 1),
    },
    "model": {"path": (_str, "tiny"), "wire_dtype": (_wire_dtype, None)},
    "policy": {"name": (_str, "topk"), "params": (_params, {}), "epoch": (_epoch, "step")},
    "links": {
        "rate": (_rate, "20mbit"),
        "rate_down": (_rate, None),
        "rate_up": (_rate, None),
        "delay": (_time, "0ms"),
        "loss": (_pct, "0%"),
        "bandwidth_mhz": (_float(0), None),
        "trace": (_str, None),
        "channel": (_params, dict(CHANNEL_DEFAULTS)),
        "device": (_params, {}),
    },
    "workload": {
        "task": (_task, "tiny"),
        "requests": (_int(1, 100000), 20),
        "prompt_tokens": (_int(1, 100000), 16),
        "output_tokens": (_int(1, 100000), 8),
    },
    "run": {
        "timeout_s": (_float(0), 5.0),
        "devices": (_int(1, 100000), None),
        "telemetry_period_s": (_float(0), 0.5),
        "bs_threads": (_int(1, 1024), None),
        "memory_budget_mb": (_float(0), None),
        "update_every": (_int(0), 0),
        "events": (_events, []),
        "down_backoff_s": (_float(0), 30.0),
        "bs_device": (_bs_device, "cpu"),
        "bs_dtype": (_bs_dtype, "float32"),
    },
    "devices": {"power_mode": (_power_mode, None)},
    "faults": {"events": (parse_faults, [])},
}
"""table -> key -> (validator, default). Validators raise ValueError with the message.
``links.channel`` (a table of :class:`testbed.net.channel.ChannelModel` parameters) is checked
key by key in :func:`_check_value`, and its keys against each other at every sweep point;
``links.device`` (a table of per-device tables) key by key there too, and its devices against
the run's by :func:`check_device_links`."""


@dataclass(frozen=True)
class LinkSettings:
    """One device's link as a trial sets it: kbit/s each way, delay in ms, loss in percent."""

    down_kbit: float
    up_kbit: float
    delay_ms: float
    loss_pct: float

    def spec(self, direction: str) -> LinkSpec:
        """The tc spec of direction ``down`` or ``up``."""
        rate = self.down_kbit if direction == "down" else self.up_kbit
        return LinkSpec(rate, self.delay_ms, self.loss_pct)


@dataclass(frozen=True)
class Trial:
    """One sweep point: its index, the swept values, and the full resolved config."""

    index: int
    point: dict[str, Any]
    config: dict[str, dict[str, Any]]

    @property
    def label(self) -> str:
        """The swept values as ``key=value`` words (``-`` when nothing is swept)."""
        return " ".join(f"{k}={v}" for k, v in self.point.items()) or "-"

    @property
    def policy(self) -> str:
        """``policy.name`` at this point, as written (a built-in or ``path/file.py:Class``)."""
        return str(self.config["policy"]["name"])

    def link_kbit(self) -> tuple[float, float]:
        """The cell-wide (down, up) rate in kbit/s (no ``links.device`` override: a device's
        own is :meth:`link_for`'s)."""
        cell = self.link_for("", -1)
        return cell.down_kbit, cell.up_kbit

    def link_delay_loss(self) -> tuple[float, float]:
        """The cell-wide (``links.delay`` in ms, ``links.loss`` in percent 0..100)."""
        cell = self.link_for("", -1)
        return cell.delay_ms, cell.loss_pct

    def link_for(self, name: str, index: int) -> LinkSettings:
        """Device ``name``'s link (``index``: its place in the inventory, from 0): its
        ``[links.device.<name or index>]`` keys over the cell's. Down: the device's
        ``rate_down``, its ``rate``, the cell's ``rate_down``, the cell's ``rate`` (the first
        set); up likewise with ``rate_up``; delay and loss: the device's, else the cell's.

        Raises
        ------
        ConfigError
            When two keys name the device (by name and by index).
        """
        ln = self.config["links"]
        own = [
            (k, v) for k, v in (ln.get("device") or {}).items() if _device_ref(k) in (name, index)
        ]
        if len(own) > 1:
            keys = " and ".join(f"links.device.{_toml_key(k)}" for k, _ in own)
            raise ConfigError(f"{keys}: both name device {name} (index {index}); keep one")
        dev: Mapping[str, Any] = own[0][1] if own else {}

        def rate(way: str) -> float:
            asked = (dev.get(way), dev.get("rate"), ln.get(way), ln["rate"])
            return _rate(next(v for v in asked if v))

        return LinkSettings(
            rate("rate_down"),
            rate("rate_up"),
            _time(dev.get("delay", ln["delay"])),
            _pct(dev.get("loss", ln["loss"])),
        )

    def device_links(self, names: Sequence[str]) -> dict[str, LinkSettings]:
        """:meth:`link_for` of every device of ``names`` (the inventory's order), by name."""
        return {n: self.link_for(n, i) for i, n in enumerate(names)}


@dataclass
class Recipe:
    """A checked recipe. ``config`` holds every table with defaults filled in (raw values, so
    it can be written back to the manifest as the user wrote them)."""

    path: Path
    config: dict[str, dict[str, Any]]
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    zipped: tuple[str, ...] = ()
    """The keys of ``sweep`` from ``[sweep.zip]``: one axis of the grid, their i-th values
    together."""

    @property
    def name(self) -> str:
        """``recipe.name``."""
        return str(self.config["recipe"]["name"])

    @property
    def seed(self) -> int:
        """``recipe.seed``, from which the run's random choices (workload, placement, channel) are
        seeded."""
        return int(self.config["recipe"]["seed"])

    @property
    def repeats(self) -> int:
        """``recipe.repeats``: how many times each trial runs."""
        return int(self.config["recipe"]["repeats"])

    def trace_path(self, trial: Trial) -> Path | None:
        """The trial's ``links.trace``, resolved against the recipe's folder (None: no trace)."""
        p = trial.config["links"].get("trace")
        if not p:
            return None
        q = Path(str(p)).expanduser()
        return q if q.is_absolute() else (self.path.parent / q).resolve()

    def model_spec(self) -> str:
        """A built-in name (``"tiny"``, ``"tiny-4096"``) or a path resolved against the recipe's
        folder."""
        from ..lab.modelstore import is_short_name

        p = str(self.config["model"]["path"])
        if is_short_name(p) or p == "edge":  # "edge": whole-model experts (run.edge_trial)
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (self.path.parent / q).resolve())

    @property
    def wire_dtype(self) -> str | None:
        """The agents' name of ``model.wire_dtype`` (``float32``/``bfloat16``/``float16``) or
        ``None`` (not set: a run sends float32, whatever ``run.bs_dtype``)."""
        v = self.config["model"].get("wire_dtype")
        return WIRE_DTYPES[v] if v is not None else None

    @property
    def bs_device(self) -> str:
        """``run.bs_device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
        return str(self.config["run"]["bs_device"])

    @property
    def bs_dtype(self) -> str:
        """torch's name of ``run.bs_dtype`` (``float32``/``bfloat16``/``float16``)."""
        return BS_DTYPES[self.config["run"]["bs_dtype"]]

    def policy_spec(self, name: str) -> str:
        """A ``path/file.py:Class`` policy is resolved against the recipe's folder."""
        if ".py:" in name and not Path(name.split(":", 1)[0]).is_absolute():
            file, cls = name.rsplit(":", 1)
            cand = (self.path.parent / file).resolve()
            if cand.is_file():
                return f"{cand}:{cls}"
        return name

    def policy_names(self) -> list[str]:
        """Every trial's ``policy.name`` as written: the ``policy.name`` sweep, else the one."""
        return [str(v) for v in self.sweep.get("policy.name", [self.config["policy"]["name"]])]

    def trials(self) -> list[Trial]:
        """One :class:`Trial` per point of the sweep's cross product, ``[sweep.zip]`` one axis
        of it (the last axis varies fastest; one trial when nothing is swept), channel defaults
        filled in and ``policy.params`` resolved for the trial's policy."""
        policies = self.policy_names()
        out = []
        for i, combo in enumerate(itertools.product(*self._axes())):
            point = dict(kv for group in combo for kv in group)
            cfg = copy.deepcopy(self.config)
            for k, v in point.items():
                _set_path(cfg, k, v)
            _with_channel_defaults(cfg["links"])
            pol = cfg["policy"]
            pol["params"] = resolve_policy_params(pol["params"], str(pol["name"]), policies)
            out.append(Trial(i, point, cfg))
        return out

    def _axes(self) -> list[list[list[tuple[str, Any]]]]:
        """The grid's axes in sweep order, each a list of its points' (key, value) pairs: one
        per plain sweep key, one for all of ``zipped`` (where its first key is)."""
        axes: list[list[list[tuple[str, Any]]]] = []
        for k in self.sweep:
            if k not in self.zipped:
                axes.append([[(k, v)] for v in self.sweep[k]])
            elif k == self.zipped[0]:
                n = min(len(self.sweep[z]) for z in self.zipped)
                axes.append([[(z, self.sweep[z][j]) for z in self.zipped] for j in range(n)])
        return axes

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``recipe``: the path, every table as resolved, and the sweep."""
        sweep: dict[str, Any] = {}
        for k, v in self.sweep.items():
            if k not in self.zipped:
                sweep[k] = v
            elif k == self.zipped[0]:
                sweep["zip"] = {z: self.sweep[z] for z in self.zipped}
        return {"path": str(self.path), **copy.deepcopy(self.config), "sweep": sweep}


def check_bs_compute(recipe: Recipe) -> None:
    """``run.bs_device``/``run.bs_dtype`` against this host (the BS): a CUDA device that torch
    sees, an index in range, bfloat16 where the GPU computes in it (torch is imported only for
    a device other than the CPU).

    Raises
    ------
    ConfigError
        Naming the recipe and the key, e.g. ``run.bs_device: 'cuda' but
        torch.cuda.is_available() is False on this BS``.
    """
    if recipe.bs_device == "cpu":
        return
    import torch

    from models.runtime import device_problem

    problem = device_problem(recipe.bs_device, getattr(torch, recipe.bs_dtype))
    if problem is not None:
        key, msg = problem
        raise ConfigError(f"{recipe.path}: run.bs_{key}: {msg}")


def resolve_policy_params(
    params: Mapping[str, Any], policy: str, policies: Iterable[str]
) -> dict[str, Any]:
    """The parameters ``policy`` (``policy.name`` as written) gets from a ``[policy.params]``
    table whose per-policy sub-tables are keyed by ``policies`` (every trial's ``policy.name``):
    the other keys (a table-valued one, such as WDMoE's ``channel``, included), then the keys of
    its own sub-table ``[policy.params.<policy>]``, which win over those of the same name."""
    names = set(policies)
    common = {k: v for k, v in params.items() if not (k in names and isinstance(v, dict))}
    own = params.get(policy)
    return {**common, **own} if isinstance(own, dict) else common


def _names_a_policy(key: str) -> bool:
    """``key`` is a policy spec: ``module:Class``, ``path/file.py:Class`` or a registered name."""
    from importlib.metadata import entry_points

    from ..policy.loading import ENTRY_POINT_GROUP

    return ":" in key or any(ep.name == key for ep in entry_points(group=ENTRY_POINT_GROUP))


def _toml_key(name: str) -> str:
    bare = name.replace("-", "").replace("_", "").isalnum()
    return name if bare else '"' + name.replace('"', '\\"') + '"'


def _policy_table_problems(recipe: Recipe, where: str) -> list[str]:
    """A ``[policy.params.<name>]`` sub-table (written or swept) keyed by a policy spec that is
    the ``policy.name`` of no trial."""
    names = set(recipe.policy_names())
    tables: list[Any] = [recipe.config["policy"]["params"]]
    tables += recipe.sweep.get("policy.params", [])
    named = {
        k for tab in tables if isinstance(tab, dict) for k, v in tab.items() if isinstance(v, dict)
    }
    for key, values in recipe.sweep.items():
        parts = key.split(".")
        per_policy = len(parts) >= 4 or any(isinstance(v, dict) for v in values)
        if parts[:2] == ["policy", "params"] and len(parts) >= 3 and per_policy:
            named.add(parts[2])
    valid = ", ".join(sorted(names))
    return [
        f"{where}: policy.params.{_toml_key(n)}: a table for a policy that no trial runs "
        f"(policy.name and its sweep: {valid})"
        for n in sorted(named - names)
        if _names_a_policy(n)
    ]


def _set_path(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _check_value(where: str, dotted: str, value: Any, problems: list[str]) -> None:
    parts = dotted.split(".")
    table = SCHEMA.get(parts[0])
    if table is None:
        problems.append(
            f"{where}: {dotted}: unknown table {parts[0]!r} (valid: {', '.join(SCHEMA)})"
        )
        return
    if len(parts) >= 3 and parts[0] == "policy" and parts[1] == "params":
        return  # checked by the policy itself (unknown parameters are named there)
    if len(parts) >= 2 and parts[:2] == ["links", "device"]:
        found = _device_link_problems(parts, value)
        problems.extend(f"{where}: {k}: {m}" for k, m in found)
        return
    if len(parts) >= 2 and parts[:2] == ["links", "channel"]:
        if len(parts) == 2 and isinstance(value, dict):  # a table: every bad key named
            found = check_channel_params(value, complete=False)
        elif len(parts) == 2:
            found = [("", "must be a table of channel parameters (testbed.net.channel)")]
        elif len(parts) == 3:
            found = check_channel_params({parts[2]: value}, complete=False)
        else:
            found = [(".".join(parts[2:]), "unknown channel parameter")]
        problems.extend(f"{where}: links.channel{'.' if k else ''}{k}: {m}" for k, m in found)
        return
    if len(parts) != 2 or parts[1] not in table:
        problems.append(
            f"{where}: {dotted}: unknown key (valid in [{parts[0]}]: {', '.join(table)})"
        )
        return
    if parts[0] == "policy" and parts[1] == "params":
        if not isinstance(value, dict):
            problems.append(f"{where}: {dotted}: must be a table")
        return
    check = table[parts[1]][0]
    try:
        check(value)
    except (ValueError, ConfigError) as e:
        msg = str(e)
        if isinstance(e, ConfigError) and ": " in msg:
            msg = msg.split(": ", 1)[1]
        problems.append(f"{where}: {dotted}: {msg}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``; the value is read as a TOML value when it parses as one
    (numbers, booleans, quoted strings, arrays), else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set: {text!r}: expected key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ConfigError(f"--set: {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and check a recipe; ``overrides`` are ``key=value`` strings (``--set``).

    Raises
    ------
    ConfigError
        With every problem found, each naming the file (or ``--set``) and the key.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return recipe_from_dict(raw, p, overrides)


def _parse_sweep(
    where: str, body: Any, sweep: dict[str, list[Any]], problems: list[str]
) -> list[str]:
    """Check ``[sweep]`` into ``sweep`` (every key, the zipped ones included); returns the keys
    of ``[sweep.zip]``, whose lists must all be as long as each other."""
    if not isinstance(body, dict):
        problems.append(f"{where}: sweep: must be a table of key = [values]")
        return []
    zipped: list[str] = []
    for key, values in body.items():
        if key == "zip" and isinstance(values, dict):
            lengths = {len(v) for v in values.values() if isinstance(v, list)}
            if len(lengths) > 1:
                problems.append(
                    f"{where}: sweep.zip: its lists must be equally long (got "
                    + ", ".join(f"{k}: {len(v)}" for k, v in values.items() if isinstance(v, list))
                    + ")"
                )
            for zk, zv in values.items():
                if zk in body:
                    problems.append(f"{where}: sweep.zip.{zk}: also swept outside [sweep.zip]")
                elif _sweep_key(where, f"zip.{zk}", zk, zv, problems):
                    sweep[zk] = zv
                    zipped.append(zk)
        elif _sweep_key(where, key, key, values, problems):
            sweep[key] = values
    return zipped


_RUN_WIDE = "the BS model is loaded once per run: set it, do not sweep it"


def _sweep_key(where: str, shown: str, key: str, values: Any, problems: list[str]) -> bool:
    """Check one swept ``key`` (named ``sweep.<shown>`` in messages); True when it is good."""
    if not isinstance(values, list) or not values:
        problems.append(f"{where}: sweep.{shown}: must be a non-empty list of values")
        return False
    if key.startswith("sweep"):
        problems.append(f"{where}: sweep.{shown}: cannot sweep the sweep")
        return False
    if key in RUN_WIDE_KEYS:
        problems.append(f"{where}: sweep.{shown}: {_RUN_WIDE}")
        return False
    before = len(problems)
    for v in values:
        _check_value(f"{where}: sweep", key, v, problems)
    return len(problems) == before


def recipe_from_dict(raw: Mapping[str, Any], path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """Check ``raw`` (a parsed recipe; ``path`` names it in the messages and resolves its
    relative paths) and the ``--set`` ``overrides``, as :func:`load_recipe` does."""
    where = str(path)
    problems: list[str] = []
    config: dict[str, dict[str, Any]] = {
        t: {k: copy.deepcopy(d) for k, (_, d) in keys.items()} for t, keys in SCHEMA.items()
    }
    sweep: dict[str, list[Any]] = {}
    zipped: list[str] = []
    for table, body in raw.items():
        if table == "sweep":
            zipped = _parse_sweep(where, body, sweep, problems)
            continue
        if table not in SCHEMA:
            problems.append(f"{where}: {table}: unknown table (valid: {', '.join(SCHEMA)}, sweep)")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where}: {table}: must be a table")
            continue
        for key, value in body.items():
            _check_value(where, f"{table}.{key}", value, problems)
            if key in SCHEMA[table]:
                config[table][key] = value
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if key.startswith("sweep."):
            sk = key[len("sweep.") :]
            vals = value if isinstance(value, list) else [value]
            if sk in RUN_WIDE_KEYS:
                problems.append(f"--set: {key}: {_RUN_WIDE}")
                continue
            for v in vals:
                _check_value("--set", sk, v, problems)
            sweep[sk] = vals
            zipped = [k for k in zipped if k != sk]  # crossed, no longer zipped
            continue
        before = len(problems)
        _check_value("--set", key, value, problems)
        if len(problems) == before:
            _set_path(config, key, value)
            sweep.pop(key, None)  # a fixed value replaces a sweep over the same key
            zipped = [k for k in zipped if k != key]
    _with_channel_defaults(config["links"])
    recipe = Recipe(path, config, sweep, tuple(zipped))
    if not problems:  # the channel's keys against each other, at every sweep point
        problems.extend(_policy_table_problems(recipe, where))
        for trial in recipe.trials():
            for key, msg in check_channel_params(trial.config["links"]["channel"]):
                at = f" (sweep point {trial.label})" if trial.point else ""
                line = f"{where}: links.channel.{key}: {msg}{at}"
                if line not in problems:
                    problems.append(line)
    if problems:
        raise ConfigError(problems)
    return recipe
