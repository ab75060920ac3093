"""CoEL's compression: the memory model of quantized experts, the mixed-precision bit allocation,
token pruning and token fusion, and what they cost the tiny model in accuracy
(:func:`evaluate_tiny`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from models.routing import RoutingContext, Selection, TopKSelection
from recipes.coel.calibration import Calibration
from testbed.errors import ConfigError

BITS = (16, 8, 4)


def quantized_bytes(hidden: int, inter: int, bits: int, group_size: int = 32) -> int:
    """Weight bytes of one SwiGLU expert (``w1``/``w3`` [I, H], ``w2`` [H, I]) at ``bits``.

    16: float16; 8: int8 + one float32 scale per output row; 4: two values per byte over the
    input padded to ``group_size`` + one float32 scale per row and group (as
    :func:`models.kernels.quantize_weight` stores them); 32: float32.
    """
    mats = ((inter, hidden), (inter, hidden), (hidden, inter))
    total = 0
    for out_f, in_f in mats:
        if bits in (32, 16):
            total += out_f * in_f * bits // 8
        elif bits == 8:
            total += out_f * in_f + 4 * out_f
        elif bits == 4:
            padded = in_f + (-in_f) % group_size
            total += out_f * ((padded + 1) // 2) + 4 * out_f * (padded // group_size)
        else:
            raise ConfigError(f"bits: unsupported bit-width {bits} (one of 32, 16, 8, 4)")
    return total


def load_spec(bits: int) -> dict[str, str]:
    """The agent ``load`` fields for ``bits`` (16 = float16 weights, 8/4 = int8/int4)."""
    return {16: {"dtype": "float16"}, 8: {"quant": "int8"}, 4: {"quant": "int4"}}.get(bits, {})


def expert_scores(cal: Calibration, lam: float) -> dict[str, float]:
    """``lam * importance + (1 - lam) * popularity``, each normalised to sum 1 over all
    experts. Pure."""

    def norm(d: Mapping[str, float]) -> dict[str, float]:
        s = sum(d.values())
        return {k: (v / s if s > 0 else 1.0 / max(1, len(d))) for k, v in d.items()}

    imp, pop = norm(cal.importance), norm(cal.popularity)
    return {
        u: lam * imp.get(u, 0.0) + (1 - lam) * pop.get(u, 0.0) for u in sorted(set(imp) | set(pop))
    }


def bit_error(bits: int) -> float:
    """Relative quantization error model [R]: ``2**-bits``, 0 from 16 bits up."""
    return 0.0 if bits >= 16 else 2.0**-bits


def allocate_bits(
    uids: Sequence[str],
    score: Mapping[str, float],
    size_at: Any,
    budget_bytes: float,
    choices: Sequence[int] = BITS,
) -> dict[str, int] | None:
    """Greedy multiple-choice knapsack: one bit-width per expert within ``budget_bytes``,
    maximising ``sum score_e * (error(lowest) - error(b_e))``. Pure.

    Every expert starts at the lowest bit-width; then the single-level upgrade with the best
    gain per extra byte that still fits is taken, until none fits. ``size_at(uid, bits)`` gives
    bytes. Returns None when even the lowest bit-widths exceed the budget.
    """
    levels = sorted({int(b) for b in choices})
    lvl = {u: 0 for u in uids}
    used = sum(size_at(u, levels[0]) for u in uids)
    if used > budget_bytes + 1e-9:
        return None
    while True:
        best: tuple[float, str] | None = None
        for u in uids:
            i = lvl[u]
            if i + 1 >= len(levels):
                continue
            extra = size_at(u, levels[i + 1]) - size_at(u, levels[i])
            if used + extra > budget_bytes + 1e-9:
                continue
            gain = score.get(u, 0.0) * (bit_error(levels[i]) - bit_error(levels[i + 1]))
            ratio = gain / max(extra, 1e-9)
            key = (-ratio, u)
            if best is None or key < (best[0], best[1]):
                best = (-ratio, u)
        if best is None:
            break
        u = best[1]
        used += size_at(u, levels[lvl[u] + 1]) - size_at(u, levels[lvl[u]])
        lvl[u] += 1
    return {u: levels[i] for u, i in lvl.items()}


def gate_margins(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per selected slot: its router probability minus the best unselected expert's
    ([N, K]; 0 for empty slots). Pure."""
    p = probs.to(torch.float32)
    valid = ids >= 0
    chosen = torch.zeros_like(p, dtype=torch.bool)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    chosen[rows[valid], ids[valid]] = True
    rest = p.masked_fill(chosen, float("-inf")).max(dim=1, keepdim=True).values.clamp(min=0.0)
    sel_p = torch.gather(p, 1, ids.clamp(min=0))
    return torch.where(valid, sel_p - rest, torch.zeros_like(sel_p))


def prune_selection(
    sel: Selection,
    probs: torch.Tensor,
    device_of: Mapping[int, str],
    tau: float,
    renormalize: bool = False,
) -> tuple[Selection, int]:
    """Token pruning: drop slot j>0 of a token when its expert is on another device than the
    token's top-1 (anchor) expert and its gate margin (:func:`gate_margins`) is below ``tau``.
    ``device_of``: expert index (this layer) -> primary device. Returns the selection and the
    number of slots dropped. Pure."""
    ids = sel.expert_ids.clone()
    w = sel.weights.clone().to(torch.float32)
    if tau <= 0 or ids.numel() == 0:
        return Selection(ids, w), 0
    margin = gate_margins(probs, ids)
    names = sorted(set(device_of.values()))
    code = torch.full(
        (max(int(ids.max()) + 1, max(device_of, default=0) + 1),), -1, dtype=torch.long
    )
    for e, d in device_of.items():
        code[e] = names.index(d)
    dev = torch.where(ids >= 0, code[ids.clamp(min=0)], torch.full_like(ids, -2))
    anchor = dev[:, :1]
    drop = (ids >= 0) & (dev != anchor) & (margin < tau) & (ids[:, :1] >= 0)
    drop[:, 0] = False
    dropped = int(drop.sum())
    ids[drop] = -1
    w[drop] = 0.0
    if renormalize and dropped:
        s = w.sum(dim=1, keepdim=True)
        w = torch.where(s > 0, w / s.clamp(min=1e-30), w)
    return Selection(ids, w), dropped


def fuse_rows(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge near-duplicate rows: row i joins the first earlier representative whose cosine
    similarity with it exceeds ``sigma``, else starts a new group. Returns ``(merged, index)``:
    ``merged[g]`` is the mean of group g's rows, ``index[i]`` the group of row i. Pure."""
    n = int(x.shape[0])
    if n <= 1 or sigma >= 1.0:
        return x, torch.arange(n)
    xf = x.to(torch.float32)
    unit = xf / xf.norm(dim=1, keepdim=True).clamp(min=1e-12)
    reps: list[int] = []
    index = torch.empty(n, dtype=torch.long)
    for i in range(n):
        g = -1
        if reps:
            cos = unit[reps] @ unit[i]
            j = int(torch.argmax(cos))
            if float(cos[j]) > sigma:
                g = j
        if g < 0:
            reps.append(i)
            g = len(reps) - 1
        index[i] = g
    sums = torch.zeros((len(reps), x.shape[1]), dtype=torch.float32)
    sums.index_add_(0, index, xf)
    counts = torch.bincount(index, minlength=len(reps)).to(torch.float32).unsqueeze(1)
    return (sums / counts).to(x.dtype).contiguous(), index


class FusionBackend:
    """Token fusion around any expert backend: per expert, rows with cosine similarity above
    ``sigma`` are merged (:func:`fuse_rows`), the merged rows go to ``inner`` and every
    original row gets its group's output back. ``info`` gains ``fusion_rows_in`` /
    ``fusion_rows_sent``; :attr:`rows_in` / :attr:`rows_sent` count over the backend's life."""

    def __init__(self, inner: Any, sigma: float) -> None:
        self.inner = inner
        self.sigma = float(sigma)
        self.rows_in = 0
        self.rows_sent = 0

    def __getattr__(self, name: str) -> Any:  # e.g. TimedBackend.pending
        return getattr(self.inner, name)

    def run_layer(self, work: Any) -> Any:
        """Fuse each expert's rows, run the merged rows on ``inner`` and give every original row
        its group's output; ``info`` gains ``fusion_rows_in`` / ``fusion_rows_sent``.
        """
        from models.backend import LayerResult, LayerWork

        merged: dict[str, torch.Tensor] = {}
        index: dict[str, torch.Tensor] = {}
        n_in = n_out = 0
        for uid, x in work.inputs.items():
            m, idx = fuse_rows(x, self.sigma)
            merged[uid], index[uid] = m, idx
            n_in += int(x.shape[0])
            n_out += int(m.shape[0])
        res = self.inner.run_layer(LayerWork(work.layer, work.step, merged))
        outs = {u: y.index_select(0, index[u]) for u, y in res.outputs.items() if u in index}
        self.rows_in += n_in
        self.rows_sent += n_out
        info = dict(res.info)
        info.update(fusion_rows_in=n_in, fusion_rows_sent=n_out)
        return LayerResult(outs, dict(res.failed), info)


def evaluate_tiny(
    model_path: str | Path,
    *,
    requests: int = 64,
    seed: int = 0,
    bits: int | Mapping[str, int] = 32,
    tau: float = 0.0,
    device_of: Mapping[str, str] | None = None,
    sigma: float = 1.0,
    batch: int = 16,
) -> dict[str, float]:
    """Accuracy of the tiny model in-process under CoEL's compression: experts at ``bits``
    (one width, or uid -> width; 32 = the stored float32), token pruning with ``tau`` given
    ``device_of`` (uid -> device), token fusion with ``sigma``. On the held-out split.

    Returns ``accuracy`` (exact match), ``score`` (token match), ``pruned_slots``,
    ``fusion_rows_in`` and ``fusion_rows_sent``.
    """
    from models import tinytask as tt
    from models.backend import LocalExpertBackend
    from models.kernels import load_expert
    from models.manifest import load_manifest
    from models.runtime import BaseStationModel

    m = load_manifest(model_path)

    def kernel(uid: str) -> Any:
        b = bits if isinstance(bits, int) else bits.get(uid, 32)
        spec = load_spec(b)
        return load_expert(
            m.expert_path(uid),
            quant=spec.get("quant"),  # type: ignore[arg-type]
            dtype=spec.get("dtype"),
            uid=uid,
        )

    local = LocalExpertBackend({u: kernel(u) for u in m.uids()})
    backend: Any = FusionBackend(local, sigma) if sigma < 1.0 else local
    bsm = BaseStationModel.from_split_dir(model_path, backend=backend)
    topk = TopKSelection()
    pruned = 0

    def hook(ctx: RoutingContext) -> Selection:
        nonlocal pruned
        sel = topk(ctx)
        if tau > 0 and device_of:
            dev = {e: device_of.get(f"L{ctx.layer}.E{e}", "") for e in range(ctx.num_experts)}
            sel, n = prune_selection(sel, ctx.router_probs, dev, tau)
            pruned += n
        return sel

    bsm.policy = hook
    exs = tt.generate("heldout", requests, seed=seed)
    correct = matched = total = 0
    for i in range(0, len(exs), batch):
        chunk = exs[i : i + batch]
        out = bsm.generate_greedy(
            [list(e.prompt) for e in chunk], max(len(e.target) for e in chunk), tt.EOS_ID, tt.PAD_ID
        )
        for e, o in zip(chunk, out.tokens):
            correct += int(tuple(o) == e.target)
            matched += sum(1 for a, b in zip(o, e.target) if a == b)
            total += len(e.target)
    fb = backend if isinstance(backend, FusionBackend) else None
    return {
        "accuracy": correct / len(exs),
        "score": matched / max(1, total),
        "pruned_slots": float(pruned),
        "fusion_rows_in": float(fb.rows_in if fb else 0),
        "fusion_rows_sent": float(fb.rows_sent if fb else 0),
    }
