"""MoE² subset-solver benchmark: wall time of the exact branch and bound
(``recipes.moe2.solver.solve_exact``) against brute force over all ``2^n - 1`` subsets, and how
many times each computes ``value`` (in practice a pass over a validation set, the dominant cost).

Instances (seeded): ``n`` experts (6, 8 and 10 by default), a validation set of ``--prompts``
prompts in 3 categories, each expert right on a prompt with a probability drawn per expert and
category; ``value(S)`` = fraction of prompts some expert of ``S`` gets right (a numpy pass over
the set; monotone). Costs by MoE²'s worst-case model: energies U(0.5, 3) J, delays U(20, 200)
ms per expert and category, top-2, 5 ms aggregation; budgets around a random expert (energy up
to the sum of the two largest, delay up to +180 ms), so that most instances are feasible and
the budgets bind. Per size: median over instances of each solver's time, their ratio
brute / exact (of the medians), mean value evaluations, and how many instances both solvers
answer identically (subset, value and cost; must be all).

Run: ``.venv/bin/python bench/moe2_solver.py [--instances 30] [--prompts 500] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.moe2 import SubsetProblem, moe2_problem, solve_brute_force, solve_exact

CATEGORIES, TOP_K, AGGREGATION_MS = 3, 2, 5.0


def instance(n: int, prompts: int, seed: int) -> SubsetProblem:
    """A seeded random MoE² instance of ``n`` experts (see the module docstring)."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    category = gen.integers(0, CATEGORIES, prompts)
    skill = gen.uniform(0.2, 0.8, (n, CATEGORIES))
    right = gen.random((n, prompts)) < skill[:, category]  # expert x prompt

    def value(s: frozenset[int]) -> float:
        return float(right[sorted(s)].any(axis=0).mean())

    energies = [rng.uniform(0.5, 3.0) for _ in range(n)]
    delays = [[rng.uniform(20.0, 200.0) for _ in range(CATEGORIES)] for _ in range(n)]
    r = rng.randrange(n)
    top = sum(sorted(energies, reverse=True)[:TOP_K])
    energy_budget = energies[r] + rng.uniform(0.0, 1.0) * (top - energies[r])
    delay_budget = [
        delays[r][c] + AGGREGATION_MS + rng.uniform(0.0, 180.0) for c in range(CATEGORIES)
    ]
    return moe2_problem(value, energies, delays, TOP_K, energy_budget, delay_budget, AGGREGATION_MS)


def _timed(solve, problem: SubsetProblem):
    t0 = time.perf_counter()
    result = solve(problem)
    return result, (time.perf_counter() - t0) * 1e3


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[6, 8, 10])
    ap.add_argument("--instances", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(
        f"host: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.instances} "
        f"instances per size, {args.prompts} validation prompts, top-{TOP_K}, "
        f"{CATEGORIES} categories"
    )
    head = ("n", "feasible", "exact_ms", "brute_ms", "brute/exact", "evals_exact", "evals_brute")
    print(f"{head[0]:>3}{head[1]:>10}" + "".join(f"{h:>13}" for h in head[2:]) + f"{'equal':>8}")
    rows = []
    for n in args.sizes:
        t_exact, t_brute, e_exact, e_brute, equal, feasible = [], [], [], [], 0, 0
        for i in range(args.instances):
            p = instance(n, args.prompts, args.seed * 100_003 + n * 1_000 + i)
            ex, ms_ex = _timed(solve_exact, p)
            bf, ms_bf = _timed(solve_brute_force, p)
            t_exact.append(ms_ex)
            t_brute.append(ms_bf)
            e_exact.append(ex.value_evals)
            e_brute.append(bf.value_evals)
            equal += ex == bf
            feasible += bf.feasible
        row = {
            "n": n,
            "instances": args.instances,
            "feasible": feasible,
            "exact_ms": statistics.median(t_exact),
            "brute_ms": statistics.median(t_brute),
            "evals_exact": statistics.mean(e_exact),
            "evals_brute": statistics.mean(e_brute),
            "equal": equal,
        }
        row["ratio"] = row["brute_ms"] / row["exact_ms"]
        rows.append(row)
        print(
            f"{n:>3}{feasible:>10}{row['exact_ms']:>13.2f}{row['brute_ms']:>13.2f}"
            f"{row['ratio']:>13.1f}{row['evals_exact']:>13.1f}{row['evals_brute']:>13.1f}"
            f"{equal:>5}/{args.instances}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
