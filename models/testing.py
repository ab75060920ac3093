"""Small random HF checkpoints for tests and benchmarks (no download needed).

:func:`make_random_checkpoint` builds a ``transformers`` model of a supported family from a
small config, initialises it with a seed and saves it with ``save_pretrained`` (safetensors,
optionally sharded), exactly as a real checkpoint is laid out on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "intermediate_size": 48},
    "qwen2_moe": {
        "num_experts": 4,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "intermediate_size": 48,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_experts": 4,
        "moe_intermediate_size": 24,
        "intermediate_size": 48,
        "norm_topk_prob": True,
    },
    "olmoe": {"num_experts": 4, "intermediate_size": 24, "norm_topk_prob": False},
}
_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}


def random_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised ``transformers`` causal LM of ``family`` (eval mode, float32).

    Defaults: vocab 128, hidden 32, 2 layers, 4 heads (2 KV heads), 4 experts top-2, and
    ``initializer_range=0.15`` so that experts change the logits substantially.
    """
    import transformers

    cfg_name, model_name = _CLASSES[family]
    kw: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.15,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if family != "llama":
        kw["num_experts_per_tok"] = 2
    else:
        kw["intermediate_size"] = 48
    kw.update(_DEFAULTS.get(family, {}))
    kw.update(overrides)
    config = getattr(transformers, cfg_name)(**kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return model.eval()


def make_random_checkpoint(
    family: str,
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> tuple[Any, Path]:
    """Save :func:`random_model` to ``out_dir``; returns ``(model, out_dir)``.

    ``max_shard_size`` (e.g. ``"20KB"``) makes ``save_pretrained`` write several safetensors
    files plus ``model.safetensors.index.json``.
    """
    model = random_model(family, seed=seed, **overrides)
    out = Path(out_dir)
    kw: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kw)
    return model, out
