"""The BS-side MoE block: router here, experts through a backend, combine here.

:class:`SplitMoEBlock` replaces a family's sparse-MoE module inside a ``transformers`` model
(:mod:`models.runtime` does the replacement). Per forward step it

1. computes router logits ``x @ gate.weight.T`` and float32 softmax probabilities,
2. asks the controller's selection hook (:mod:`models.routing`) for expert ids/weights,
3. gathers each chosen expert's token rows and calls ``backend.run_layer`` once for the layer,
4. drops failed experts (renormalising the remaining weights of each token to the token's
   original weight total; tokens left with no expert get zero routed output),
5. sums weighted outputs (plus the shared expert with its sigmoid gate for Qwen2-MoE),
6. appends a :class:`MoELayerRecord` to the controller's records when recording.

Two controller settings change what crosses the MoE boundary, not the model:

* ``lift`` (a widened split, :mod:`models.widen`): Q [W, H] with QᵀQ = I; rows go out as
  ``x Qᵀ`` (W wide) and the weighted sum of the experts' W-wide outputs comes back as ``y Q``;
* ``wire_dtype``: the dtype of the rows handed to the backend (e.g. bfloat16: half the bytes on
  the wire); the experts' outputs are cast back to the model's dtype before they are combined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backend import ExpertBackend, LayerWork
from models.errors import ModelError
from models.routing import RoutingContext, SelectionHook, TopKSelection, validate_selection
from models.uids import format_uid, parse_uid


@dataclass
class MoELayerRecord:
    """What happened in one MoE layer at one forward step (one row per token via
    :meth:`rows`).

    Attributes
    ----------
    step, phase, layer
        Forward-step index (0 = prefill), ``"prefill"``/``"decode"``/``"forward"``, layer.
    expert_ids, weights
        [N, K] int32 ids (-1 = none) and float32 combine weights as selected by the policy
        (before failure handling).
    seq_index, position, token_valid
        [N] batch row, absolute position and non-padding flag of every token.
    token_ids
        [N] input token id at that position (-1 when unknown, e.g. a bare module call).
    failed
        uid -> reason for the experts the backend reported failed at this step.
    dropped_tokens
        Tokens of this step that lost all their experts (zero routed output).
    rows_per_uid
        uid -> rows sent to that expert.
    info
        The backend's ``LayerResult.info``.
    """

    step: int
    phase: str
    layer: int
    expert_ids: np.ndarray
    weights: np.ndarray
    seq_index: np.ndarray
    position: np.ndarray
    token_valid: np.ndarray
    failed: dict[str, str]
    dropped_tokens: int
    rows_per_uid: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    token_ids: np.ndarray | None = None

    def rows(self, include_padding: bool = False) -> list[dict[str, Any]]:
        """One dict per token: step, phase, layer, seq, pos, token, experts ("L0.E3;L0.E5"),
        weights, failed (the token's experts that failed)."""
        out = []
        for i in range(self.expert_ids.shape[0]):
            if not include_padding and not self.token_valid[i]:
                continue
            ids = [int(e) for e in self.expert_ids[i] if e >= 0]
            ws = [float(w) for e, w in zip(self.expert_ids[i], self.weights[i]) if e >= 0]
            out.append(
                {
                    "step": self.step,
                    "phase": self.phase,
                    "layer": self.layer,
                    "seq": int(self.seq_index[i]),
                    "pos": int(self.position[i]),
                    "token": int(self.token_ids[i]) if self.token_ids is not None else -1,
                    "experts": ";".join(format_uid(self.layer, e) for e in ids),
                    "weights": ";".join(f"{w:.6g}" for w in ws),
                    "failed": ";".join(
                        format_uid(self.layer, e)
                        for e in ids
                        if format_uid(self.layer, e) in self.failed
                    ),
                }
            )
        return out


class MoEController:
    """Shared state of all split MoE blocks of one model: policy, backend, step info, records.

    The runtime sets ``step``/``phase``/``positions``/``valid`` before each forward; any code
    can swap ``policy`` or ``backend`` between forwards.
    """

    def __init__(self, backend: ExpertBackend, policy: SelectionHook | None = None) -> None:
        self.backend = backend
        self.policy: SelectionHook = policy or TopKSelection()
        self.step = -1
        self.phase = "forward"
        self.positions: torch.Tensor | None = None  # [B, T] absolute positions
        self.input_ids: torch.Tensor | None = None  # [B, T] token ids of this step
        self.valid: torch.Tensor | None = None  # [B, T] non-padding
        self.recording = False
        self.records: list[MoELayerRecord] = []
        self.failures_total = 0
        self.lift: torch.Tensor | None = None  # [W, H] orthonormal columns (widened split)
        self.wire_dtype: torch.dtype | None = None  # rows to the backend in this dtype


class Router(nn.Module):
    """Holds the router weight [E, H] (state-dict key ``gate.weight``, as on disk)."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))


class SplitMoEBlock(nn.Module):
    """Drop-in replacement of a family's sparse MoE block (see module docstring).

    Parameters
    ----------
    layer
        Decoder-layer index.
    hidden_size, num_experts, top_k, norm_topk_prob
        From the manifest.
    controller
        Shared :class:`MoEController`.
    shared_expert, shared_expert_gate
        Qwen2-MoE's shared expert MLP and its [1, H] gate (kept at the BS), or ``None``.
    """

    def __init__(
        self,
        layer: int,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        controller: MoEController,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = Router(num_experts, hidden_size)
        if shared_expert is not None:
            self.shared_expert = shared_expert
            self.shared_expert_gate = shared_expert_gate
        self._controller = controller  # plain attribute: not a submodule, not in the state dict

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MoE layer through the controller: gate, ``policy`` selection, one ``run_layer`` on
        the ``backend`` with every selected expert's rows, weighted combination (plus the shared
        expert, if any); ``hidden_states`` [..., H] -> the same shape.

        Experts the backend reports failed (or that return nothing) lose their slots and the token's
        remaining weights are rescaled to its total; a record is kept when recording.
        """
        c = self._controller
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        n = x.shape[0]
        logits = F.linear(x, self.gate.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        valid = c.valid.reshape(-1) if c.valid is not None and c.valid.numel() == n else None
        ctx = RoutingContext(
            self.layer, c.step, logits, probs, self.top_k, self.norm_topk_prob, valid
        )
        sel = validate_selection(
            c.policy(ctx), n, self.num_experts, where=f"policy at layer {self.layer}"
        )
        ids, w = sel.expert_ids, sel.weights
        xe = self._wire_rows(x)
        inputs, rows = self._gather(xe, ids, w)
        result = c.backend.run_layer(LayerWork(self.layer, c.step, inputs))
        failed = {u: r for u, r in result.failed.items() if u in inputs}
        for uid in inputs:
            if uid not in result.outputs and uid not in failed:
                failed[uid] = "no output"
        dropped = 0
        if failed:
            c.failures_total += len(failed)
            rows, dropped = self._without_failed(ids, w, rows, failed)
        out = self._combine(x, rows, result.outputs, int(xe.shape[1]))
        if getattr(self, "shared_expert", None) is not None:
            shared = self.shared_expert(x)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared

        if c.recording:
            self._record(
                c,
                ids,
                w,
                failed,
                dropped,
                {u: int(t.shape[0]) for u, t in inputs.items()},
                result.info,
                n,
                valid,
            )
        return out.reshape(shape)

    def _wire_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows as sent to the experts: lifted (``x Qᵀ``) in a widened split, in the wire
        dtype when one is set."""
        c = self._controller
        xe = x if c.lift is None else F.linear(x, c.lift.to(device=x.device, dtype=x.dtype))
        if c.wire_dtype is not None:
            xe = xe.to(c.wire_dtype)
        return xe

    def _gather(
        self, xe: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per selected expert: its input rows, and (token index, weight) per row."""
        inputs: dict[str, torch.Tensor] = {}
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in torch.unique(ids[ids >= 0]).tolist():
            hit = ids == e
            tok = hit.any(dim=-1).nonzero().squeeze(1)
            uid = format_uid(self.layer, int(e))
            inputs[uid] = xe.index_select(0, tok)
            rows[uid] = (tok, (w * hit).sum(dim=-1).index_select(0, tok))
        return inputs, rows

    @staticmethod
    def _without_failed(
        ids: torch.Tensor,
        w: torch.Tensor,
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]],
        failed: dict[str, str],
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
        """The rows of the experts that answered, each token's weights rescaled to the total
        it had; and the number of tokens left with no expert at all."""
        bad = torch.zeros_like(ids, dtype=torch.bool)
        for uid in failed:
            bad |= ids == parse_uid(uid).expert
        total = w.sum(dim=-1)
        remain = (w * ~bad).sum(dim=-1)
        scale = torch.where(remain > 0, total / remain.clamp(min=1e-30), torch.zeros_like(total))
        had = (ids >= 0).any(dim=-1)
        still = ((ids >= 0) & ~bad).any(dim=-1)
        dropped = int((had & ~still).sum())
        kept = {
            u: (tok, wt * scale.index_select(0, tok))
            for u, (tok, wt) in rows.items()
            if u not in failed
        }
        return kept, dropped

    def _combine(
        self,
        x: torch.Tensor,
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]],
        outputs: Mapping[str, torch.Tensor],
        width: int,
    ) -> torch.Tensor:
        """The weighted sum of the experts' outputs per token, back in the model's basis
        (rows ``y Q``) in a widened split."""
        out = x.new_zeros((x.shape[0], width))
        for uid, (tok, wt) in rows.items():
            y = outputs[uid]
            if tuple(y.shape) != (tok.shape[0], width):
                raise ModelError(
                    uid,
                    f"backend returned shape {list(y.shape)} for {tok.shape[0]} rows "
                    f"at layer {self.layer}",
                )
            y = y.to(device=x.device, dtype=x.dtype)
            out.index_add_(0, tok, (y * wt.unsqueeze(1)).to(x.dtype))
        lift = self._controller.lift
        if lift is not None:
            out = out @ lift.to(device=x.device, dtype=x.dtype)
        return out

    def _record(
        self,
        c: MoEController,
        ids: torch.Tensor,
        w: torch.Tensor,
        failed: dict[str, str],
        dropped: int,
        rows_per_uid: dict[str, int],
        info: dict[str, Any],
        n: int,
        valid: torch.Tensor | None,
    ) -> None:
        if c.positions is not None and c.positions.numel() == n:
            b, t = c.positions.shape
            seq = np.repeat(np.arange(b), t)
            pos = c.positions.reshape(-1).cpu().numpy()
        else:
            seq = np.zeros(n, dtype=np.int64)
            pos = np.arange(n)
        if c.input_ids is not None and c.input_ids.numel() == n:
            tok = c.input_ids.reshape(-1).cpu().numpy()
        else:
            tok = np.full(n, -1, dtype=np.int64)
        c.records.append(
            MoELayerRecord(
                step=c.step,
                phase=c.phase,
                layer=self.layer,
                expert_ids=ids.to(torch.int32).cpu().numpy(),
                weights=w.cpu().numpy(),
                seq_index=seq,
                position=pos,
                token_valid=(valid.cpu().numpy() if valid is not None else np.ones(n, dtype=bool)),
                failed=dict(failed),
                dropped_tokens=dropped,
                rows_per_uid=rows_per_uid,
                info=dict(info),
                token_ids=tok,
            )
        )
