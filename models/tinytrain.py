"""Train the tiny built-in Mixtral on :mod:`models.tinytask` and save it in HF format.

The result is an ordinary ``MixtralForCausalLM`` checkpoint (``config.json``,
``model.safetensors``) plus ``tiny_task.json`` (the task card) and a word-level
``tokenizer.json``, so it goes through exactly the same split path as a real checkpoint.

Deterministic: fixed seed, fixed thread count, data from the deterministic generator; for a
given torch version and thread count the weights are bit-identical run to run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models import tinytask as tt
from models.safetensors_io import sha256_file


@dataclass(frozen=True)
class TinyConfig:
    """Architecture and training hyper-parameters of the tiny model."""

    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 32
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    router_aux_loss_coef: float = 0.02
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class TinyTrainResult:
    """Summary of a training run (``train_s`` is wall time; everything else deterministic)."""

    out_dir: str
    steps: int
    final_loss: float
    train_s: float
    num_params: int
    weights_sha256: str
    weights_bytes: int


def mixtral_config(cfg: TinyConfig) -> Any:
    """The ``transformers.MixtralConfig`` of the tiny model."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=tt.VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=64,
        rope_theta=10000.0,
        output_router_logits=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        bos_token_id=tt.BOS_ID,
        eos_token_id=tt.EOS_ID,
        pad_token_id=tt.PAD_ID,
        tie_word_embeddings=False,
        sliding_window=None,
    )


def batch_tensors(
    examples: Sequence[tt.TinyExample],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels only on target tokens."""
    T = max(len(e.full) for e in examples)
    ids = torch.full((len(examples), T), tt.PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        f = e.full
        ids[i, : len(f)] = torch.tensor(f)
        mask[i, : len(f)] = 1
        labels[i, len(e.prompt) : len(f)] = torch.tensor(e.target)
    return ids, mask, labels


def write_tokenizer(out_dir: Path) -> None:
    """A word-level HF tokenizer over :data:`models.tinytask.VOCAB` (whitespace-separated)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(tt.VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<pad>",
                "model_max_length": tt.MAX_SEQ_LEN,
                "add_bos_token": False,
            },
            indent=1,
        )
        + "\n"
    )


def train_tiny(
    out_dir: str | os.PathLike[str],
    cfg: TinyConfig = TinyConfig(),
    log: Callable[[str], None] | None = None,
    log_every: int = 250,
) -> TinyTrainResult:
    """Train the tiny model and save it to ``out_dir`` (created).

    Parameters
    ----------
    out_dir
        Output HF checkpoint directory.
    cfg
        Hyper-parameters (the defaults produce the committed ``models/tiny``).
    log
        Progress callback (one line per ``log_every`` steps).
    """
    from transformers import MixtralForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        config = mixtral_config(cfg)
        config._attn_implementation = "sdpa"
        model = MixtralForCausalLM(config)
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
        )

        def lr_factor(s: int) -> float:
            return (
                min(1.0, (s + 1) / cfg.warmup_steps)
                * 0.5
                * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        batches = tt.iter_train_batches(cfg.batch_size, seed=cfg.seed + 1)
        t0 = time.perf_counter()
        loss_val = float("nan")
        for s in range(cfg.steps):
            ids, mask, labels = batch_tensors(next(batches))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
            if log is not None and (s % log_every == 0 or s == cfg.steps - 1):
                log(f"step {s} loss {loss_val:.4f} {time.perf_counter() - t0:.0f}s")
        train_s = time.perf_counter() - t0
        model.eval()
        model.config.output_router_logits = False
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        torch.set_num_threads(prev_threads)
    card = tt.task_card()
    card["train"] = asdict(cfg)
    (out / "tiny_task.json").write_text(json.dumps(card, indent=1) + "\n")
    write_tokenizer(out)
    w = out / "model.safetensors"
    return TinyTrainResult(
        str(out),
        cfg.steps,
        loss_val,
        train_s,
        sum(p.numel() for p in model.parameters()),
        sha256_file(w),
        w.stat().st_size,
    )


TINY_DIR = Path(__file__).resolve().parent / "tiny"
"""The committed tiny checkpoint (HF format) inside the package."""
