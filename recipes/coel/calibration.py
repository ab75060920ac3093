"""CoEL's calibration: the experts' popularity, importance and co-activation, measured by running
the model in-process on calibration prompts (:class:`Prompts`; by default the tiny task's
``calibration`` split, :func:`tiny_prompts`), or uniform without a model."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.routing import RoutingContext, Selection, TopKSelection
from testbed.policy import ExpertInfo


@dataclass
class Calibration:
    """What a calibration run measured.

    Attributes
    ----------
    popularity
        uid -> selections per token of its layer (sums to top-k over a layer's experts).
    importance
        uid -> mean router probability over the layer's tokens (sums to 1 per layer).
    coactivation
        ``(uid_a, uid_b)`` (sorted, same layer) -> fraction of tokens selecting both.
    tokens
        Valid tokens seen per layer.
    """

    popularity: dict[str, float] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)
    coactivation: dict[tuple[str, str], float] = field(default_factory=dict)
    tokens: int = 0


def calibration_from_selections(
    ids: Mapping[int, Sequence[Sequence[int]]],
    probs: Mapping[int, Sequence[Sequence[float]]] | None = None,
    num_experts: int | None = None,
) -> Calibration:
    """Popularity / importance / co-activation from per-layer token selections. Pure.

    Parameters
    ----------
    ids
        layer -> one list of selected expert indices per token (``-1`` ignored).
    probs
        layer -> one router-probability row per token (importance); ``None``: importance =
        popularity / top-k.
    num_experts
        Experts per layer (default: the largest id seen + 1).
    """
    cal = Calibration()
    for layer, rows in ids.items():
        n = len(rows)
        cal.tokens = max(cal.tokens, n)
        if n == 0:
            continue
        ne = num_experts or 1 + max((e for r in rows for e in r if e >= 0), default=0)
        cnt = [0] * ne
        pair: dict[tuple[int, int], int] = {}
        for r in rows:
            sel = sorted({int(e) for e in r if e >= 0})
            for e in sel:
                cnt[e] += 1
            for a, b in itertools.combinations(sel, 2):
                pair[(a, b)] = pair.get((a, b), 0) + 1
        k = max(1, max(len([e for e in r if e >= 0]) for r in rows))
        for e in range(ne):
            cal.popularity[f"L{layer}.E{e}"] = cnt[e] / n
        for (a, b), c in pair.items():
            cal.coactivation[(f"L{layer}.E{a}", f"L{layer}.E{b}")] = c / n
        pr = (probs or {}).get(layer)
        for e in range(ne):
            uid = f"L{layer}.E{e}"
            cal.importance[uid] = (
                sum(float(p[e]) for p in pr) / n if pr is not None else cal.popularity[uid] / k
            )
    return cal


@dataclass(frozen=True)
class Prompts:
    """Calibration prompts: token ids, how many tokens to generate after each, and the ids that
    end (``eos_id``) and pad (``pad_id``) a sequence for the model's greedy generation."""

    prompts: Sequence[Sequence[int]]
    new_tokens: Sequence[int]
    eos_id: int
    pad_id: int


def tiny_prompts(requests: int, seed: int) -> Prompts:
    """``requests`` prompts of the tiny task's ``calibration`` split (disjoint from its held-out
    test examples), each generating its target's length."""
    from models import tinytask as tt

    exs = tt.generate("calibration", requests, seed=seed)
    return Prompts(
        [list(e.prompt) for e in exs], [len(e.target) for e in exs], tt.EOS_ID, tt.PAD_ID
    )


def calibrate(
    model_path: str | Path,
    requests: int | Prompts = 64,
    seed: int = 0,
    batch: int = 16,
) -> Calibration:
    """Run the model in-process (local experts, the model's top-k) on calibration prompts and
    measure the expert statistics. ``requests`` is the :class:`Prompts` to run, or a number of
    :func:`tiny_prompts` (drawn with ``seed``).

    Routing records (:meth:`models.runtime.BaseStationModel.start_recording`) give the
    selections; a selection hook around the top-k keeps the router probabilities.
    """
    from models.runtime import BaseStationModel

    prompts = requests if isinstance(requests, Prompts) else tiny_prompts(requests, seed)
    bsm = BaseStationModel.from_split_dir(model_path)
    topk = TopKSelection()
    probs: dict[int, list[list[float]]] = {}

    def hook(ctx: RoutingContext) -> Selection:
        p = ctx.router_probs
        if ctx.token_valid is not None:
            p = p[ctx.token_valid.to(torch.bool)]
        probs.setdefault(ctx.layer, []).extend(p.tolist())
        return topk(ctx)

    bsm.policy = hook
    ids: dict[int, list[list[int]]] = {}
    bsm.start_recording()
    try:
        for i in range(0, len(prompts.prompts), batch):
            bsm.pop_records()
            bsm.generate_greedy(
                [list(q) for q in prompts.prompts[i : i + batch]],
                max(prompts.new_tokens[i : i + batch]),
                prompts.eos_id,
                prompts.pad_id,
            )
            for r in bsm.pop_records():
                valid = r.token_valid.astype(bool)
                ids.setdefault(r.layer, []).extend(r.expert_ids[valid].tolist())
    finally:
        bsm.stop_recording()
    return calibration_from_selections(ids, probs, bsm.manifest.num_experts)


def calibrate_experts(
    experts: Sequence[ExpertInfo], model_path: str | Path | None, requests: int, seed: int
) -> tuple[Calibration, tuple[int, int] | None]:
    """``(calibration, (hidden, intermediate))`` measured on the model at ``model_path``
    (:func:`calibrate`); without a model, uniform statistics (top-k assumed 2) and no dims."""
    if model_path:
        from models.manifest import load_manifest

        m = load_manifest(model_path)
        dims = (int(m.dims["hidden_size"]), int(m.dims["expert_intermediate_size"]))
        return calibrate(model_path, requests, seed), dims
    cal = Calibration(tokens=0)
    per_layer: dict[int, int] = {}
    for e in experts:
        per_layer[e.layer] = per_layer.get(e.layer, 0) + 1
    for e in experts:
        cal.popularity[e.uid] = 2.0 / per_layer[e.layer]
        cal.importance[e.uid] = 1.0 / per_layer[e.layer]
    return cal, None
