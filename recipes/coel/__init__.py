"""CoEL: collaborative edge deployment of an MoE — perception, deployment, compression, updating.

The policy has four modules (issue 8). Parts marked [R] are *reconstructions*: the published
description leaves the exact rule open, so every constant is a constructor parameter and the
rule is the simplest one that matches the description.

1. **Perception** [V]. Agents publish their status only when a value moved by more than
   ``delta`` (:mod:`device_agent.hello`, ``serve --hello-s/--hello-delta``); the BS keeps the
   live view (:class:`testbed.dataplane.backend.StatusFeed`, which counts the signalling bytes) and
   the enforced link rates (``ClusterState.rate_*_kbit``). :func:`rates_moved` is the BS-side
   "moved by more than delta" test on link quality.
2. **Deployment** [V/R]. :func:`calibrate` runs the model in-process on calibration prompts
   (:class:`Prompts`; by default :func:`tiny_prompts`, the tiny task's ``calibration`` split,
   disjoint from the held-out test examples) and measures each expert's
   popularity (activations per token), importance (mean gate probability) and the same-layer
   co-activation of expert pairs. If the model, compressed to ``intra_min_bits``, fits one
   device's memory budget, every expert goes to the best device (*intra-device*
   collaboration). Otherwise :func:`place_inter` minimises the expected critical path
   :func:`critical_path_ms` — per MoE layer the max over devices of ``a + b * rows +
   transfer(rows)`` with rows weighted by popularity — under every device's memory budget
   (sizes at the smallest bit-width): greedy starts (experts by popularity, by size and by
   popularity per byte, each to the device whose layer time grows least), each improved by
   local search over single moves and pairwise swaps between devices (any two experts: tight
   budgets need them), the best kept; an affinity bonus ``coact_weight`` x co-activation keeps
   experts that fire together on one device [R].
   Hot experts get replicas (:func:`add_replicas`) with the memory left once every expert
   of the device is at full precision [R].
3. **Compression** [V/R]. ``score_e = lam * importance_e + (1 - lam) * popularity_e``
   (both normalised to sum 1); :func:`allocate_bits` is a greedy multiple-choice knapsack: every
   expert starts at the lowest bit-width, the upgrade with the largest ``score x error
   reduction / extra bytes`` is taken while it fits the budget (``error(b) = 2**-b``, 16 bits
   counted as exact) [R]. The agents load the shards quantized (``quant`` int8/int4, 16 bits =
   float16; :meth:`CoEL.load_options`). **Token pruning** [R] (:func:`prune_selection`): a
   token's top-1 expert fixes its *anchor* device; any other selected expert on another
   device is dropped when its gate margin (its router probability minus the best unselected
   expert's) is below ``tau`` — the token keeps the residual for it (weights are not
   renormalised unless ``renormalize_pruned``). **Token fusion** [R]
   (:class:`FusionBackend`, any policy may use it): rows sent to the same expert whose cosine
   similarity exceeds ``sigma`` are merged into one row (their mean) and the result is
   scattered back.
   Measured in-process on 64 held-out tiny-task examples (:func:`evaluate_tiny`; exact
   match): float32 / float16 / int8 / int4 experts 1.000 / 1.000 / 1.000 / 1.000; pruning
   (round-robin devices) tau 0.05 / 0.1 / 0.2 / 0.5: 1.000 / 0.984 / 0.938 / 0.844 (2682 /
   3379 / 4020 / 4264 slots dropped); fusion sigma 0.99 / 0.95 / 0.9 / 0.8: 1.000 / 1.000 /
   0.953 / 0.453 (rows sent 89% / 74% / 64% / 51%).
4. **Updating** [V/R]. :meth:`CoEL.update` re-runs deployment every ``redeploy_every``
   calls, when a link rate moved by more than ``delta`` since the last deployment, or when
   popularity drifted (total variation > ``drift``); :func:`plan_migration` then keeps only
   the moves that pay for their transfer: the critical-path saving over ``horizon_steps``
   forward steps must exceed the shard's transfer time over the destination's link [R].

The package, by module: :mod:`~recipes.coel.perception` (link rates, "moved by more than
delta"), :mod:`~recipes.coel.calibration` (expert statistics), :mod:`~recipes.coel.costmodel`
(device model, critical path, memory), :mod:`~recipes.coel.deployment` (placement, bits per
device, replicas) with :mod:`~recipes.coel.search` (its local search),
:mod:`~recipes.coel.compression` (memory model, bit allocation, pruning, fusion, their accuracy),
:mod:`~recipes.coel.updating` (re-deployment triggers, migration plan) and
:mod:`~recipes.coel.policy` (the :class:`CoEL` policy; entry point ``recipes.coel:CoEL``).
"""

from recipes.coel.calibration import (
    Calibration,
    Prompts,
    calibrate,
    calibrate_experts,
    calibration_from_selections,
    tiny_prompts,
)
from recipes.coel.compression import (
    BITS,
    FusionBackend,
    allocate_bits,
    bit_error,
    evaluate_tiny,
    expert_scores,
    fuse_rows,
    gate_margins,
    load_spec,
    prune_selection,
    quantized_bytes,
)
from recipes.coel.costmodel import (
    MB,
    DeviceModel,
    critical_path_ms,
    device_rows,
    layer_of,
    memory_used,
)
from recipes.coel.deployment import (
    add_replicas,
    allocate_placement,
    brute_force_place,
    deploy,
    device_models,
    place_inter,
    round_robin,
    verify_budgets,
)
from recipes.coel.perception import link_rates, rates_moved
from recipes.coel.policy import CoEL
from recipes.coel.search import LocalSearch
from recipes.coel.updating import (
    Move,
    migrate,
    observed_popularity,
    plan_migration,
    popularity_drift,
    redeploy_triggers,
)

__all__ = [
    "BITS",
    "MB",
    "Calibration",
    "CoEL",
    "DeviceModel",
    "FusionBackend",
    "LocalSearch",
    "Move",
    "Prompts",
    "add_replicas",
    "allocate_bits",
    "allocate_placement",
    "bit_error",
    "brute_force_place",
    "calibrate",
    "calibrate_experts",
    "calibration_from_selections",
    "critical_path_ms",
    "deploy",
    "device_models",
    "device_rows",
    "evaluate_tiny",
    "expert_scores",
    "fuse_rows",
    "gate_margins",
    "layer_of",
    "link_rates",
    "load_spec",
    "memory_used",
    "migrate",
    "observed_popularity",
    "place_inter",
    "plan_migration",
    "popularity_drift",
    "prune_selection",
    "quantized_bytes",
    "rates_moved",
    "redeploy_triggers",
    "round_robin",
    "tiny_prompts",
    "verify_budgets",
]
