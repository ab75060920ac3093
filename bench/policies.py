"""Policy-solver benchmark: wall time per decision of the WDMoE policies (DESIGN.md, "Policy
solvers": median of many, instance size printed).

Instances: 8 experts on 8 devices (one each), top-2, Mixtral payload (8 KiB per token per
direction), compute profile a = 1 ms, b = 0.2 ms, 20 MHz; a decode decision (1 token) and a
prefill step (128 tokens). Each decision is a full ``select()``: torch -> numpy, channel epoch,
selection, bandwidth, torch selection out, stats record. Targets: 1 ms (decode), 20 ms
(prefill); the ratio printed is median / target (<= 1 meets it). Also: the min–max solver alone,
Newton vs the literal nested bisection, on the prefill loads.

Run: ``.venv/bin/python bench/policies.py [--repeats 300] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.routing import RoutingContext
from recipes.wdmoe import (
    WDMoE,
    WDMoEBandwidthOnly,
    WDMoEConference,
    WDMoESelectionOnly,
)
from testbed.net.channel import ChannelModel
from testbed.policy import ClusterState
from testbed.policy.bandwidth import min_max_bandwidth

EXPERTS, DEVICES, TOP_K = 8, 8, 2
TARGET_MS = {1: 1.0, 128: 20.0}


def _contexts(n_tokens: int, count: int) -> list[RoutingContext]:
    g = torch.Generator().manual_seed(n_tokens)
    out = []
    for i in range(count):
        logits = torch.randn(n_tokens, EXPERTS, generator=g) * 2
        out.append(RoutingContext(0, i, logits, torch.softmax(logits, -1), TOP_K, True))
    return out


def _median_ms(fn, args: list, repeats: int) -> float:
    for a in args[:5]:
        fn(a)  # warm-up
    times = []
    for i in range(repeats):
        a = args[i % len(args)]
        t0 = time.perf_counter()
        fn(a)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cluster = ClusterState(
        placement={f"L0.E{e}": (f"dev{e % DEVICES}",) for e in range(EXPERTS)},
        compute_profile={f"dev{k}": (1.0, 0.2) for k in range(DEVICES)},
        bytes_per_token=8192,
    )
    print(
        f"host: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch threads 1; "
        f"median of {args.repeats} decisions"
    )
    print(f"{'policy':<12}{'instance':<44}{'median_ms':>10}{'target_ms':>10}{'ratio':>8}")
    rows = []
    for cls in (WDMoE, WDMoEConference, WDMoESelectionOnly, WDMoEBandwidthOnly):
        for n in (1, 128):
            pol = cls()
            ctxs = _contexts(n, 64)
            med = _median_ms(lambda c, p=pol: p.select(c, cluster), ctxs, args.repeats)
            inst = f"{EXPERTS} experts x {DEVICES} devices x {n} token(s), top-{TOP_K}"
            ratio = med / TARGET_MS[n]
            rows.append(
                {
                    "policy": cls.name,
                    "tokens": n,
                    "experts": EXPERTS,
                    "devices": DEVICES,
                    "median_ms": med,
                    "target_ms": TARGET_MS[n],
                    "ratio": ratio,
                }
            )
            print(f"{cls.name:<12}{inst:<44}{med:>10.3f}{TARGET_MS[n]:>10.1f}{ratio:>8.3f}")
    ch = ChannelModel(DEVICES, seed=0)
    loads = np.full(DEVICES, 128 * TOP_K // DEVICES)
    sd, su = ch.snr_per_hz(0, "down"), ch.snr_per_hz(0, "up")
    solve = {
        m: _median_ms(
            lambda _, m=m: min_max_bandwidth(loads, 20e6, sd, su, 8192, 1.0, 0.2, method=m),
            [None],
            args.repeats if m == "newton" else max(10, args.repeats // 20),
        )
        for m in ("newton", "bisection")
    }
    print(
        f"min-max solver alone, {DEVICES} loaded devices x {loads[0]} rows: newton "
        f"{solve['newton']:.3f} ms, nested bisection {solve['bisection']:.3f} ms "
        f"(bisection / newton = {solve['bisection'] / solve['newton']:.0f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps({"decisions": rows, "solver_ms": solve}, indent=1))


if __name__ == "__main__":
    main()
