"""MoE² (arXiv 2501.09410): whole small LLMs on edge devices as experts, a gate at the BS.

:mod:`recipes.moe2.solver` is the offline part: the exact choice of the expert subset under an
energy budget and per-category delay budgets (branch and bound on a monotone objective).
:mod:`recipes.moe2.selection` scores subsets by what the BS does with them (the gate's top-k
inside the subset, answers combined by renormalised gate weights) and has the baselines.
"""

from recipes.moe2.solver import (
    SubsetProblem,
    SubsetResult,
    check_monotone,
    moe2_cost,
    moe2_problem,
    solve_brute_force,
    solve_exact,
    tie_key,
    topk_energy,
    worst_delay_ms,
)

__all__ = [
    "SubsetProblem",
    "SubsetResult",
    "check_monotone",
    "moe2_cost",
    "moe2_problem",
    "solve_brute_force",
    "solve_exact",
    "tie_key",
    "topk_energy",
    "worst_delay_ms",
]
