"""WDMoE decisions and the channel's rates and min-max bandwidth, frozen: the outputs of many
random instances, recorded from the code before its speed-up (commit 758e4c7), must come back
the same -- the selection exactly, every bandwidth, rate, latency and WLR to 1e-9 relative.

The instances (:func:`policy_instances`, :func:`channel_instances`) cover the four policies,
1 to 128 tokens, top-1 to top-3, 4 to 16 experts on 1 to 8 devices, padding, ties, no cluster,
the runner's channel (more devices than the placement, in another order; its budget and epoch),
per-step epochs (idle shares), fixed links, and the channel's variants (paper parameters,
``cqi`` and ``shannon`` efficiencies, Rician and no fading, an SNR gap, ``power_split="none"``).

:meth:`WDMoE._decide_small` (decisions of fewer than 8 token slots, on lists) is checked
against the numpy path as well, to the last bit.

``tests/unit/wdmoe_frozen.json`` holds the recorded outputs; ``python
tests/unit/test_wdmoe_frozen.py --write`` records them again (only ever from the reference
code: put its tree first on ``PYTHONPATH``)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.routing import RoutingContext
from recipes.wdmoe import WDMoE, WDMoEBandwidthOnly, WDMoEConference, WDMoESelectionOnly
from testbed.net.channel import PAPER_PARAMS, ChannelModel
from testbed.policy import ClusterState

FROZEN = Path(__file__).with_name("wdmoe_frozen.json")
RTOL = 1e-9

POLICIES: list[tuple[type, dict[str, Any]]] = [
    (WDMoE, {}),
    (WDMoE, {"alpha": 0.5, "gamma": 1.0, "max_rounds": 3}),
    (WDMoE, {"alpha": 0.3, "theta_step": 0.1, "gamma": 0.0}),
    (WDMoE, {"gamma": 1.02, "bs_ms": 0.5, "renormalize": False, "bandwidth_mhz": 100.0}),
    (WDMoE, {"channel": PAPER_PARAMS}),
    (WDMoE, {"channel": {"se_model": "cqi"}, "alpha": 0.6, "gamma": 1.01}),
    (
        WDMoE,
        {"channel": {"se_model": "shannon", "fading": "rician", "snr_gap_db": 3.0}, "gamma": 1.01},
    ),
    (
        WDMoE,
        {
            "channel": {"fading": "none", "power_split": "none", "cell_radius_m": 500.0},
            "alpha": 0.7,
        },
    ),
    (WDMoEConference, {}),
    (WDMoEConference, {"variant": "share", "theta": 0.4, "allocation": "min-max"}),
    (WDMoEConference, {"theta": 0.7, "allocation": "min-max", "channel": {"se_model": "cqi"}}),
    (WDMoESelectionOnly, {}),
    (WDMoESelectionOnly, {"alpha": 0.5, "gamma": 1.0}),
    (WDMoEBandwidthOnly, {}),
    (WDMoEBandwidthOnly, {"channel": {"cqi_table": 2, "shadowing_db": 12.0}}),
]
TOKENS = (1, 1, 1, 2, 3, 7, 16, 32, 128)


def _ctx(
    rng: np.random.Generator,
    n: int,
    e: int,
    k: int,
    layer: int,
    step: int,
    padding: bool,
    ties: bool,
) -> RoutingContext:
    logits = rng.normal(size=(n, e)) * rng.choice([0.5, 2.0, 4.0])
    if ties:  # equal gate scores: the stable order decides
        logits[:, 1:3] = logits[:, :1]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    probs = torch.tensor(p, dtype=torch.float32)
    valid = None
    if padding:
        valid = torch.tensor(rng.random(n) < 0.8)
    return RoutingContext(layer, step, probs.log(), probs, k, bool(rng.random() < 0.8), valid)


def _cluster(
    rng: np.random.Generator, e: int, layer: int, n_dev: int, channel_kw: dict
) -> ClusterState | None:
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return None
    devs = [f"n{i}" for i in range(n_dev)]
    if kind == 1:  # one expert per device, round-robin
        placement = {f"L{layer}.E{x}": (devs[x % n_dev],) for x in range(e)}
    else:  # random placement (some devices hold several experts, replicas ignored)
        placement = {
            f"L{layer}.E{x}": tuple(
                str(d)
                for d in rng.choice(devs, size=min(n_dev, int(rng.integers(1, 3))), replace=False)
            )
            for x in range(e)
        }
    held = sorted({ds[0] for ds in placement.values()})
    prof = {
        d: (float(rng.uniform(0.2, 3.0)), float(rng.uniform(0.0, 0.5)))
        for d in held
        if rng.random() < 0.7
    }
    cl = ClusterState(
        placement=placement,
        compute_profile=prof,
        bytes_per_token=int(rng.choice([0, 256, 4096, 8192])),
    )
    if kind >= 3:  # the runner's channel: every trial device, shuffled; its budget and epoch
        extra = [f"x{i}" for i in range(int(rng.integers(0, 3)))]
        names = [str(d) for d in rng.permutation(devs + extra)]
        cl.channel = ChannelModel(names, int(rng.integers(0, 100)), **channel_kw)
        cl.bandwidth_hz = float(rng.choice([0.0, 5e6, 40e6]))
        cl.epoch = int(rng.integers(-1, 50))
    if kind == 4:
        cl.epoch_scope = str(rng.choice(["step", "request"]))
    if kind == 5:
        cl.links_fixed = True
        cl.rate_down_kbit = {d: float(rng.choice([0.0, 1e3, 2e4])) for d in held}
        cl.rate_up_kbit = {d: float(rng.uniform(5e2, 1e4)) for d in held}
    return cl


@functools.lru_cache(maxsize=1)
def policy_instances() -> list[dict[str, Any]]:
    """The policy instances: policy, parameters, and the (context, cluster) of each of its
    consecutive decisions (built from ``numpy.random.default_rng(instance number)``)."""
    out = []
    for i in range(100):
        rng = np.random.default_rng([7, i])
        cls, kw = POLICIES[i % len(POLICIES)]
        kw = {**kw, "seed": int(rng.integers(0, 1000))}
        e = int(rng.choice([4, 8, 8, 8, 16]))
        k = int(rng.choice([1, 2, 2, 2, 3]))
        n_dev = int(rng.choice([1, 2, 4, 8, 8]))
        layer = int(rng.integers(0, 3))
        channel_kw = dict(kw.get("channel", {}))
        cl = _cluster(rng, e, layer, n_dev, channel_kw)
        if cl is None:
            kw["default_devices"] = n_dev
        calls = []
        for step in range(3):
            n = int(rng.choice(TOKENS))
            calls.append(
                (
                    _ctx(
                        rng,
                        n,
                        e,
                        k,
                        layer,
                        step,
                        bool(rng.random() < 0.3),
                        bool(rng.random() < 0.2),
                    ),
                    cl,
                )
            )
        out.append({"cls": cls, "kw": kw, "calls": calls})
    # the benchmark's instance: 8 experts on 8 devices, top-2, decode and prefill
    bench = ClusterState(
        placement={f"L0.E{x}": (f"dev{x}",) for x in range(8)},
        compute_profile={f"dev{x}": (1.0, 0.2) for x in range(8)},
        bytes_per_token=8192,
    )
    for cls in (WDMoE, WDMoEConference, WDMoESelectionOnly, WDMoEBandwidthOnly):
        rng = np.random.default_rng([8, len(out)])
        calls = [
            (_ctx(rng, n, 8, 2, 0, s, False, False), bench)
            for s, n in enumerate((1, 1, 128, 1, 128))
        ]
        out.append({"cls": cls, "kw": {}, "calls": calls})
    return out


def channel_instances() -> list[dict[str, Any]]:
    """Direct :class:`ChannelModel` instances: parameters, a bandwidth split for the rates,
    and a min-max problem (bits each way, fixed ms, epoch, cell)."""
    variants = [
        {},
        PAPER_PARAMS,
        {"se_model": "cqi"},
        {"se_model": "shannon"},
        {"fading": "rician", "snr_gap_db": 2.0},
        {"power_split": "none"},
        {"fading": "none", "cell_radius_m": 1000.0, "min_distance_m": 500.0},
    ]
    out = []
    for i in range(40):
        rng = np.random.default_rng([9, i])
        n = int(rng.integers(1, 9))
        kw = variants[i % len(variants)]
        total = float(rng.choice([1e5, 2e6, 20e6, 100e6]))
        bw = rng.dirichlet(np.ones(n)) * total * (rng.random(n) < 0.8)
        rows = rng.integers(0, 200, n) * (rng.random(n) < 0.8)
        s = float(rng.choice([256, 8192]))
        out.append(
            {
                "kw": kw,
                "n": n,
                "seed": int(rng.integers(0, 100)),
                "epoch": int(rng.integers(0, 100)),
                "total": total,
                "bw": bw.tolist(),
                "bits_down": (8 * s * rows).tolist(),
                "bits_up": (8 * s * rows * rng.choice([0.0, 1.0, 0.5], n)).tolist(),
                "fixed": np.where(rows > 0, rng.uniform(0.0, 2.0, n) + 0.1 * rows, 0.0).tolist(),
            }
        )
    return out


def _digest(t: torch.Tensor) -> str:
    return (
        f"{t.dtype} {list(t.shape)} "
        + hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
    )


def _short(x: Any) -> Any:
    """``x`` with every float rounded to 12 significant digits (the file's precision; the
    comparison's is 1e-9)."""
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_short(v) for v in x]
    if isinstance(x, float) and math.isfinite(x):
        return float(f"{x:.12g}")
    return x


#: the record's scalar fields, in this order (``rounds`` and ``theta``: None for the conference)
STATS = (
    "layer",
    "step",
    "epoch",
    "tokens",
    "tokens_pruned",
    "experts_dropped",
    "predicted_ms",
    "predicted_topk_ms",
    "wlr",
    "wlr_topk",
    "rounds",
    "theta",
)


def _run_policy(inst: dict[str, Any]) -> list[dict[str, Any]]:
    """Per decision: digests of the selection's ids and weights (exact), per device ``[load,
    bandwidth_hz, rate_down_kbit, rate_up_kbit]`` (0 where absent) and the record's
    :data:`STATS`."""
    pol = inst["cls"](**inst["kw"])
    rec = []
    for ctx, cl in inst["calls"]:
        d = pol.select(ctx, cl)
        st = dict(pol.last_stats())
        assert d.bandwidth_kbit is None
        down, up = st.pop("rate_down_kbit"), st.pop("rate_up_kbit")
        loads, bw = st.pop("loads"), st.pop("bandwidth_hz")
        assert down == d.rate_down_kbit and up == d.rate_up_kbit
        assert set(down) == set(up) == set(bw)
        scalars = [st.pop(k, None) for k in STATS]
        assert not st, f"unrecorded stats {sorted(st)}"
        rec.append(
            {
                "ids": _digest(d.selection.expert_ids),
                "weights": _digest(d.selection.weights),
                "devices": {
                    x: [loads.get(x, 0), bw.get(x, 0.0), down.get(x, 0.0), up.get(x, 0.0)]
                    for x in sorted(set(loads) | set(bw))
                },
                "stats": scalars,
            }
        )
    return _short(rec)


def _run_channel(inst: dict[str, Any]) -> dict[str, Any]:
    ch = ChannelModel(inst["n"], inst["seed"], **inst["kw"])
    bw, ep, total = np.array(inst["bw"]), inst["epoch"], inst["total"]
    out: dict[str, Any] = {}
    for direction in ("down", "up"):
        out[f"rates_{direction}"] = ch.rates_bps(bw, direction, ep, total_hz=total).tolist()
        out[f"rates_{direction}_default_total"] = ch.rates_bps(bw, direction, ep).tolist()
        out[f"rates_{direction}_scalar"] = ch.rates_bps(
            total / inst["n"], direction, ep + 1
        ).tolist()
        out[f"rate_form_{direction}"] = [
            a.tolist() for a in ch.rate_form(direction, ep, total_hz=total)
        ]
    out["min_max"] = ch.min_max_bandwidth(
        np.array(inst["bits_down"]), np.array(inst["bits_up"]), np.array(inst["fixed"]), ep, total
    ).tolist()
    out["min_max_again"] = ch.min_max_bandwidth(
        np.array(inst["bits_down"]), np.array(inst["bits_up"]), 0.5, ep + 1, total
    ).tolist()
    return _short(out)


def record() -> dict[str, Any]:
    """Every instance's outputs (what the JSON file freezes)."""
    return {
        "policies": [_run_policy(p) for p in policy_instances()],
        "channel": [_run_channel(c) for c in channel_instances()],
    }


def _same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (
            f"{where}: keys {sorted(got)} != {sorted(want)}"
        )
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (
            f"{where}: length {len(got)} != {len(want)}"
        )
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (float, int)), f"{where}: {got!r} is not a number"
        if math.isfinite(want):
            assert math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-300), (
                f"{where}: {got!r} != {want!r}"
            )
        else:
            assert got == want or (math.isnan(got) and math.isnan(want)), (
                f"{where}: {got!r} != {want!r}"
            )
    else:
        assert (
            got == want
            and type(got) is type(want)
            or (isinstance(want, int) and isinstance(got, float) and got == want)
        ), f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def frozen() -> dict[str, Any]:
    return json.loads(FROZEN.read_text())


def test_instances_cover_the_cases(frozen: dict[str, Any]) -> None:
    """The frozen outputs exercise pruning rounds, dropped experts, idle shares and fixed
    links, not only top-K (else the comparison would prove little)."""
    calls = [c for p in frozen["policies"] for c in p]
    assert len(calls) == sum(len(p["calls"]) for p in policy_instances())
    stats = [dict(zip(STATS, c["stats"])) for c in calls]
    assert sum((s["rounds"] or 0) >= 1 for s in stats) >= 30
    assert sum((s["rounds"] or 0) >= 2 for s in stats) >= 3
    assert sum(s["experts_dropped"] > 0 for s in stats) >= 50
    bw = [[v[1] for v in c["devices"].values()] for c in calls]
    loads = [[v[0] for v in c["devices"].values()] for c in calls]
    assert sum(not any(b) for b in bw) >= 10  # fixed links
    assert sum(any(b and not n for b, n in zip(*bl)) for bl in zip(bw, loads)) >= 5  # idle shares


@pytest.mark.parametrize("i", range(len(policy_instances())))
def test_policy_decisions_are_the_frozen_ones(frozen: dict[str, Any], i: int) -> None:
    _same(_run_policy(policy_instances()[i]), frozen["policies"][i], f"policy[{i}]")


def test_channel_rates_and_min_max_are_the_frozen_ones(frozen: dict[str, Any]) -> None:
    for i, inst in enumerate(channel_instances()):
        _same(_run_channel(inst), frozen["channel"][i], f"channel[{i}]")


def test_small_decisions_on_lists_are_the_numpy_ones() -> None:
    """:meth:`WDMoE._decide_small` (fewer than 8 token slots) against the numpy path forced
    on the same decisions: every number the same, to the last bit."""

    def run(inst: dict[str, Any], small: int) -> list[Any]:
        pol = inst["cls"](**inst["kw"])
        pol._SMALL = small
        out = []
        for ctx, cl in inst["calls"]:
            d = pol.select(ctx, cl)
            out.append(
                (
                    d.selection.expert_ids.tolist(),
                    d.selection.weights.tolist(),
                    d.rate_down_kbit,
                    d.rate_up_kbit,
                    pol.last_stats(),
                )
            )
        return out

    small = [
        inst
        for inst in policy_instances()
        if issubclass(inst["cls"], WDMoE)
        and any(ctx.num_tokens * min(ctx.top_k, ctx.num_experts) < 8 for ctx, _ in inst["calls"])
    ]
    assert len(small) >= 40
    for inst in small:
        got, want = run(inst, WDMoE._SMALL), run(inst, 0)
        assert repr(got) == repr(want)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/unit/test_wdmoe_frozen.py --write")
    import recipes.wdmoe

    print(f"recording from {recipes.wdmoe.__file__}")
    rec = record()
    lines = [json.dumps(x, separators=(",", ":")) for x in rec["policies"] + rec["channel"]]
    n = len(rec["policies"])
    FROZEN.write_text(
        '{"policies": [\n'
        + ",\n".join(lines[:n])
        + '\n],\n"channel": [\n'
        + ",\n".join(lines[n:])
        + "\n]}\n"
    )
    print(f"wrote {FROZEN} ({FROZEN.stat().st_size} bytes)")
