"""BS runtime: the base-station model built from a split directory.

:class:`BaseStationModel` loads ``bs/`` of a split directory into the family's ``transformers``
model class (built on the meta device, so no memory is spent on the routed experts), replaces
every sparse-MoE module by a :class:`~models.moe_block.SplitMoEBlock`, and offers

* :meth:`~BaseStationModel.forward` / :meth:`~BaseStationModel.logits`: one batched forward,
* :meth:`~BaseStationModel.generate_greedy`: batched (left-padded) prefill then greedy decoding
  with a KV cache (``transformers.DynamicCache``),
* :meth:`~BaseStationModel.score_continuations`: log-likelihood of continuations (multiple choice),
* per-layer per-step :class:`~models.moe_block.MoELayerRecord` collection
  (:meth:`~BaseStationModel.start_recording`, :meth:`~BaseStationModel.pop_records`).

The expert backend and the selection hook are attributes that may be swapped between calls.

Device and dtype (``device``/``dtype`` of :meth:`~BaseStationModel.from_split_dir`; a run's
``run.bs_device``/``run.bs_dtype``): the weights and the compute of the BS part (embeddings,
attention, norms, LM head) go there. In a half-precision BS (bfloat16/float16) every MoE block
still runs in float32 (its input cast up, its output cast back; the router weight, the lift
and a shared expert kept in float32): router logits, probabilities and top-k are float32, so
bfloat16 moves routing only through the hidden states. The rotary frequencies stay float32.
What crosses to the experts keeps its own dtype (``wire_dtype``). With ``host_boundary`` (a run
whose experts are on other hosts) an accelerator BS hands the selection hook and the expert
backend host (CPU) tensors, after ``torch.cuda.synchronize``: ZeroMQ sends host memory, the
testbed's policies read numpy, and a clock read after the hand-over counts the BS's queued GPU
work as BS time, not as the exchange's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.backend import ExpertBackend, LayerResult, LayerWork, LocalExpertBackend
from models.errors import ModelError
from models.families import FAMILIES
from models.kernels import torch_dtype
from models.manifest import Manifest, load_manifest
from models.moe_block import MoEController, MoELayerRecord, SplitMoEBlock
from models.routing import RoutingContext, Selection, SelectionHook

_BLOCK_ATTRS = ("block_sparse_moe", "mlp")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GenerationResult:
    """Output of :meth:`BaseStationModel.generate_greedy`.

    ``tokens[i]``: new token ids of prompt i (stopping after EOS, which is included);
    ``steps``: forward steps run (1 prefill + decode steps).
    """

    tokens: list[list[int]]
    steps: int


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: sum of log-probs (nats), token count, and whether
    every continuation token is the greedy argmax."""

    logprob: float
    num_tokens: int
    greedy: bool


def _find_moe_attr(layer: nn.Module) -> str | None:
    for attr in _BLOCK_ATTRS:
        mod = getattr(layer, attr, None)
        if mod is not None and hasattr(mod, "experts") and hasattr(mod, "gate"):
            return attr
    return None


def _fix_meta_buffers(model: nn.Module) -> None:
    """Recreate modules whose non-persistent buffers (rotary inv_freq) are still on meta."""
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)) and hasattr(mod, "config"):
            fresh = type(mod)(config=mod.config)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, fresh)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ModelError(
                name,
                "not initialised after loading the BS part (missing from bs/model.safetensors?)",
            )


def _meta_model(m: Manifest, fam: Any, attn_implementation: str) -> nn.Module:
    """The family's causal LM for the split's BS config, built on the meta device."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(m.bs_config_path.parent))
    config._attn_implementation = attn_implementation
    cls_ = getattr(transformers, fam.causal_lm_class)
    with torch.device("meta"):
        return cls_(config)


def _install_moe_blocks(model: nn.Module, m: Manifest, controller: MoEController) -> dict[int, str]:
    """Replace every MoE layer's sparse-MoE block by a :class:`SplitMoEBlock` (keeping its
    shared expert): layer -> the attribute that held it."""
    layers = model.model.layers
    moe_attr_by_layer: dict[int, str] = {}
    for li in m.moe_layers:
        attr = _find_moe_attr(layers[li])
        if attr is None:
            raise ModelError(
                f"{m.bs_config_path}",
                f"layer {li} of {type(model).__name__} has no sparse-MoE block",
            )
        orig = getattr(layers[li], attr)
        block = SplitMoEBlock(
            li,
            m.model_hidden_size,
            m.experts_per_layer[li],
            m.top_k,
            m.norm_topk_prob,
            controller,
            shared_expert=getattr(orig, "shared_expert", None),
            shared_expert_gate=getattr(orig, "shared_expert_gate", None),
        )
        setattr(layers[li], attr, block)
        moe_attr_by_layer[li] = attr
    return moe_attr_by_layer


def _load_bs_weights(
    model: nn.Module, m: Manifest, fam: Any, moe_attrs: dict[int, str]
) -> torch.dtype:
    """Load ``bs/model.safetensors`` into ``model`` (block keys renamed to the attributes of
    ``moe_attrs``; every tensor checked against the model's; tied embeddings); the stored
    dtype of its first tensor."""
    from safetensors.torch import load_file

    state = load_file(str(m.bs_path))
    renamed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        parts = k.split(".")
        if (
            len(parts) > 3
            and parts[0] == "model"
            and parts[1] == "layers"
            and parts[3] == fam.block_prefix
        ):
            attr = moe_attrs.get(int(parts[2]))
            if attr is not None:
                k = ".".join([*parts[:3], attr, *parts[4:]])
        renamed[k] = v
    expected = dict(model.state_dict(keep_vars=True))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in renamed.items():
        if k not in expected:
            raise ModelError(f"{m.bs_path}: {k}", f"unexpected tensor for {type(model).__name__}")
        if tuple(expected[k].shape) != tuple(v.shape):
            raise ModelError(
                f"{m.bs_path}: {k}",
                f"shape {list(v.shape)} != model's {list(expected[k].shape)}",
            )
    missing = [k for k in expected if k not in renamed and not (tied and k == "lm_head.weight")]
    if missing:
        raise ModelError(
            f"{m.bs_path}: {missing[0]}",
            f"missing from the BS part ({len(missing)} tensors missing)",
        )
    model.load_state_dict(renamed, strict=False, assign=True)
    if tied and "lm_head.weight" not in renamed:
        model.lm_head.weight = model.model.embed_tokens.weight
    _fix_meta_buffers(model)
    return next(iter(state.values())).dtype


def _load_lift(m: Manifest) -> torch.Tensor:
    """The lift Q [hidden, model hidden] of a widened split."""
    from safetensors.torch import load_file

    assert m.lift_path is not None
    lift = load_file(str(m.lift_path)).get(str((m.lift_info or {}).get("tensor", "lift")))
    want = (m.hidden_size, m.model_hidden_size)
    if lift is None or tuple(lift.shape) != want:
        raise ModelError(
            str(m.lift_path),
            f"lift tensor missing or not of shape {list(want)} (hidden, model hidden)",
        )
    return lift


def device_problem(device: str, dtype: torch.dtype | None = None) -> tuple[str, str] | None:
    """Why this host cannot run a BS part on ``device`` in ``dtype``: ``("device" or "dtype",
    message)``, or None when it can (a CUDA device exists, its index is in range, and it
    computes in bfloat16 when that is asked)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        why = f"{device!r} but torch.cuda.is_available() is False on this BS"
        return ("device", f"{why} (torch {torch.__version__})")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        return ("device", f"{device!r} but this BS has {n} CUDA device(s): cuda:0..cuda:{n - 1}")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(dev) < (8, 0):
        # bf16 compute from sm80 (Ampere, Orin's sm87); asked of *this* device, not the current
        name = torch.cuda.get_device_name(dev)
        return ("dtype", f"'bfloat16' but {name} ({device}) does not compute in bfloat16")
    return None


def _float32_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of a MoE block in a half-precision BS: its input in float32."""
    return (args[0].float(), *args[1:])


def _output_as(dtype: torch.dtype, module: nn.Module, args: Any, out: torch.Tensor) -> Any:
    """Forward hook of a MoE block in a half-precision BS: its output back in the BS dtype."""
    return out.to(dtype)


def _place(model: nn.Module, device: str, dtype: torch.dtype | None) -> torch.dtype:
    """Move ``model`` to ``device`` in ``dtype`` (None: as stored); its dtype after.

    A half-precision model keeps in float32 what routing and the rotary positions need: every
    :class:`SplitMoEBlock` (router weight, shared expert; its input cast up and its output cast
    back by hooks) and the float32 buffers outside the state dict (rotary ``inv_freq``)."""
    persistent = set(model.state_dict())
    keep = {
        n: b for n, b in model.named_buffers() if n not in persistent and b.dtype == torch.float32
    }
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    got = model.get_input_embeddings().weight.dtype
    if got not in _HALF:
        return got
    for name, b in keep.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, b.to(device))
    for mod in model.modules():
        if isinstance(mod, SplitMoEBlock):
            mod.float()
            mod.register_forward_pre_hook(_float32_input)
            mod.register_forward_hook(functools.partial(_output_as, got))
    return got


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostBackend:
    """The expert backend of an accelerator BS at the host boundary: the device's queued work
    is waited for, then each expert's rows (already in the wire dtype) are copied to host
    memory and handed to ``inner`` (a ZeroMQ backend sends host memory; a timing wrapper's
    clock then starts after the BS's own GPU work). The replies stay where ``inner`` made them
    (the MoE block moves them to the model's device)."""

    def __init__(self, inner: ExpertBackend, device: torch.device) -> None:
        self.inner = inner
        self.device = device

    def run_layer(self, work: LayerWork) -> LayerResult:
        """``inner.run_layer`` on host copies of ``work``'s rows."""
        _synchronize(self.device)
        rows = {u: x.to("cpu") for u, x in work.inputs.items()}
        return self.inner.run_layer(LayerWork(work.layer, work.step, rows))


class HostPolicy:
    """The selection hook of an accelerator BS at the host boundary: it sees host copies of the
    router's logits and float32 probabilities (the testbed's policies read numpy), after the
    device's queued work (so a decision's own clock does not count it); its selection goes
    back to the model's device."""

    def __init__(self, inner: SelectionHook, device: torch.device) -> None:
        self.inner = inner
        self.device = device

    def __call__(self, ctx: RoutingContext) -> Selection:
        """``inner(ctx)`` on host tensors; the selection's tensors moved to the device."""
        _synchronize(self.device)
        valid = ctx.token_valid.cpu() if ctx.token_valid is not None else None
        host = dataclasses.replace(
            ctx,
            router_logits=ctx.router_logits.cpu(),
            router_probs=ctx.router_probs.cpu(),
            token_valid=valid,
        )
        sel = self.inner(host)
        ids, w = getattr(sel, "expert_ids", None), getattr(sel, "weights", None)
        if isinstance(ids, torch.Tensor) and isinstance(w, torch.Tensor):
            return Selection(ids.to(self.device), w.to(self.device))
        return sel  # validate_selection names what is wrong with it


class BaseStationModel:
    """A family's causal LM whose routed experts run through an expert backend.

    Build it with :meth:`from_split_dir`. Attributes ``policy`` and ``backend`` may be replaced
    at any time; ``model`` is the underlying ``transformers`` model (eval mode, no grad). With
    ``host_boundary`` on a non-CPU device, the policy and backend set are wrapped in
    :class:`HostPolicy` / :class:`HostBackend` (the getters return them unwrapped).
    """

    def __init__(
        self,
        model: nn.Module,
        manifest: Manifest,
        controller: MoEController,
        host_boundary: bool = False,
    ) -> None:
        self.model = model
        self.manifest = manifest
        self.controller = controller
        self.config = model.config
        self.device = next(model.parameters()).device
        self.host_boundary = host_boundary and self.device.type != "cpu"
        if self.host_boundary:  # wrap what the controller holds
            self.backend, self.policy = controller.backend, controller.policy

    @property
    def dtype(self) -> torch.dtype:
        """The BS part's dtype (its embeddings'; a half-precision BS's MoE blocks: float32)."""
        return self.model.get_input_embeddings().weight.dtype

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_split_dir(
        cls,
        split_dir: str | os.PathLike[str],
        backend: ExpertBackend | None = None,
        policy: SelectionHook | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        expert_runtime: str = "torch",
        quant: str | None = None,
        wire_dtype: str | torch.dtype | None = None,
        host_boundary: bool = False,
    ) -> BaseStationModel:
        """Load the BS part of ``split_dir``.

        Parameters
        ----------
        split_dir
            Output of ``testbed model split``.
        backend
            Expert backend; default: :class:`LocalExpertBackend` over the split's experts
            (``expert_runtime``/``quant`` select the kernels; they compute as a device would:
            in float32 on the CPU, the stored dtype on CUDA, whatever a half ``dtype``).
        policy
            Selection hook; default: the family's top-k routing.
        device, dtype
            Where/in which dtype the BS part runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``; default
            dtype: stored; float32 on CPU for half-precision checkpoints). A half dtype keeps
            the MoE blocks (router, lift, shared expert) in float32 (module docstring).
        attn_implementation
            ``"sdpa"`` or ``"eager"``.
        wire_dtype
            dtype of the hidden-state rows handed to the expert backend (``float32``,
            ``bfloat16``/``bf16``, ``float16``/``fp16``); default: the BS model's dtype. The
            default local backend's experts then take and return rows in that dtype (computing
            in their own dtype), as a device agent with ``io_dtype`` does.
        host_boundary
            The backend's experts are on other hosts: on an accelerator, the policy and the
            backend see host tensors after a synchronize (:class:`HostPolicy`,
            :class:`HostBackend`). No effect on the CPU.

        A widened split (a ``lift`` entry in the manifest, :mod:`models.widen`) loads its lift
        Q into the controller: the MoE blocks send ``x Qᵀ`` and map the replies back with Q.
        Raises :class:`ModelError` (an unknown family or dtype, a BS part that does not fit the
        model, a device this host lacks: :func:`device_problem`).
        """
        m = load_manifest(split_dir)
        fam = FAMILIES.get(m.family)
        if fam is None:
            raise ModelError(f"{m.root / 'manifest.json'}: family", f"unknown family {m.family!r}")
        tdtype = torch_dtype(dtype)
        problem = device_problem(device, tdtype)
        if problem is not None:
            raise ModelError(*problem)
        model = _meta_model(m, fam, attn_implementation)
        controller = MoEController(backend=backend or LocalExpertBackend({}), policy=policy)
        moe_attrs = _install_moe_blocks(model, m, controller)
        stored = _load_bs_weights(model, m, fam, moe_attrs)
        if tdtype is None and torch.device(device).type == "cpu":
            tdtype = torch.float32 if stored in _HALF else None
        got = _place(model, device, tdtype)
        model.eval()
        model.requires_grad_(False)
        if m.lift_path is not None:
            lift_dtype = torch.float32 if got in _HALF else got
            controller.lift = _load_lift(m).to(device=device, dtype=lift_dtype)
        controller.wire_dtype = torch_dtype(wire_dtype) or got
        if backend is None:
            controller.backend = LocalExpertBackend.from_split_dir(
                m,
                runtime=expert_runtime,
                quant=quant,
                device=device,
                dtype=None if tdtype in _HALF else tdtype,
            )
        return cls(model, m, controller, host_boundary=host_boundary)

    # ---- policy / backend / records ------------------------------------------------------------
    @property
    def policy(self) -> SelectionHook:
        """The selection hook every MoE layer calls; settable between forwards."""
        p = self.controller.policy
        return p.inner if isinstance(p, HostPolicy) else p

    @policy.setter
    def policy(self, hook: SelectionHook) -> None:
        if self.host_boundary and not isinstance(hook, HostPolicy):
            hook = HostPolicy(hook, self.device)
        self.controller.policy = hook

    @property
    def backend(self) -> ExpertBackend:
        """The expert backend every MoE layer runs on; settable between forwards."""
        b = self.controller.backend
        return b.inner if isinstance(b, HostBackend) else b

    @backend.setter
    def backend(self, backend: ExpertBackend) -> None:
        if self.host_boundary and not isinstance(backend, HostBackend):
            backend = HostBackend(backend, self.device)
        self.controller.backend = backend

    def start_recording(self) -> None:
        """Collect a :class:`MoELayerRecord` per MoE layer per forward step from now on."""
        self.controller.recording = True

    def stop_recording(self) -> None:
        """Stop collecting records (those collected stay until :meth:`pop_records`)."""
        self.controller.recording = False

    def pop_records(self) -> list[MoELayerRecord]:
        """Return and clear the records collected so far."""
        out, self.controller.records = self.controller.records, []
        return out

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        step: int = -1,
        phase: str = "forward",
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass. Returns ``(logits [B, T, V] float32, cache)``.

        ``position_ids`` default: ``cumsum(attention_mask) - 1`` (left padding aware) offset by
        the cache length; ``step``/``phase`` label the records and the hooks' context.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        c = self.controller
        c.step, c.phase = step, phase
        c.positions = position_ids
        c.input_ids = input_ids
        c.valid = attention_mask[:, -T:].bool()
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
            )
        finally:
            c.step, c.phase, c.positions, c.valid, c.input_ids = -1, "forward", None, None, None
        return out.logits.float(), out.past_key_values

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] of a full forward without cache."""
        return self.forward(input_ids, attention_mask)[0]

    @staticmethod
    def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists to ``(input_ids, attention_mask)`` [B, T_max]."""
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ModelError("prompts", "need at least one prompt and no empty prompt")
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, T - len(s) :] = 1
        return ids, mask

    @torch.no_grad()
    def generate_greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Batched greedy decoding with a KV cache at the BS.

        ``on_step(step)`` is called right after each forward step's next tokens are known
        (step 0 = prefill; on CUDA after a synchronize), e.g. to time the first token and each
        decoded one.

        One prefill step over the left-padded prompts (step 0) then one step per new token;
        sequences that produced ``eos_token_id`` are fed masked padding (their output stops at
        EOS; their rows are marked invalid in the records) until all are done or
        ``max_new_tokens`` is reached.
        """
        from transformers import DynamicCache

        pad = (
            pad_token_id
            if pad_token_id is not None
            else (eos_token_id if eos_token_id is not None else 0)
        )
        ids, mask = self.left_pad(prompts, pad)
        cache = DynamicCache(config=self.model.config)
        logits, cache = self.forward(ids, mask, past_key_values=cache, step=0, phase="prefill")
        B = ids.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        next_tok = logits[:, -1].argmax(-1).cpu()
        if on_step is not None:
            _synchronize(self.device)  # the step's GPU work done before the caller's clock
            on_step(0)
        steps = 1
        for t in range(max_new_tokens):
            for i in range(B):
                if not done[i]:
                    out[i].append(int(next_tok[i]))
                    if eos_token_id is not None and int(next_tok[i]) == eos_token_id:
                        done[i] = True
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            feed = torch.where(done, torch.full_like(next_tok, pad), next_tok).unsqueeze(1)
            # finished rows are fed padding, masked out (not attended to, not valid in records)
            mask = torch.cat([mask, (~done).to(mask.dtype).unsqueeze(1)], dim=1)
            logits, cache = self.forward(
                feed, mask, past_key_values=cache, step=steps, phase="decode"
            )
            next_tok = logits[:, -1].argmax(-1).cpu()
            if on_step is not None:
                _synchronize(self.device)
                on_step(steps)
            steps += 1
        return GenerationResult(out, steps)

    @torch.no_grad()
    def score_continuations(
        self,
        contexts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        batch_size: int = 16,
        pad_token_id: int = 0,
    ) -> list[ContinuationScore]:
        """Log-likelihood of each ``continuations[i]`` after ``contexts[i]`` (teacher forcing)."""
        if len(contexts) != len(continuations):
            raise ModelError("continuations", "need exactly one continuation per context")
        scores: list[ContinuationScore] = []
        for b0 in range(0, len(contexts), batch_size):
            seqs = [
                list(c) + list(x)
                for c, x in zip(contexts[b0 : b0 + batch_size], continuations[b0 : b0 + batch_size])
            ]
            ids, mask = self.left_pad(seqs, pad_token_id)
            logp = torch.log_softmax(self.logits(ids, mask), dim=-1)
            ids = ids.to(logp.device)
            T = ids.shape[1]
            for j, cont in enumerate(continuations[b0 : b0 + batch_size]):
                n = len(cont)
                if n == 0:
                    raise ModelError("continuations", f"item {b0 + j}: empty continuation")
                tgt = ids[j, T - n :]
                lp = logp[j, T - n - 1 : T - 1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                greedy = bool((logp[j, T - n - 1 : T - 1].argmax(-1) == tgt).all())
                scores.append(ContinuationScore(float(lp.sum()), n, greedy))
        return scores


def records_to_rows(
    records: Sequence[MoELayerRecord], include_padding: bool = False
) -> list[dict[str, Any]]:
    """Flatten records to one dict per (step, layer, token) for the results CSVs."""
    rows: list[dict[str, Any]] = []
    for r in records:
        rows.extend(r.rows(include_padding))
    return rows


def load_split_model(split_dir: str | os.PathLike[str], **kwargs: Any) -> BaseStationModel:
    """Shorthand for :meth:`BaseStationModel.from_split_dir`."""
    return BaseStationModel.from_split_dir(Path(split_dir), **kwargs)
