"""MoE family adapters: how a family names its expert tensors and configures its routing.

A :class:`FamilyAdapter` is pure data plus a few pure functions of an HF ``config.json`` dict.
Adding a family that stores routed experts as ``<prefix>.experts.{e}.<proj>.weight`` with a
SwiGLU expert is a few lines here (and, for the BS runtime, its ``transformers`` class name).

Supported: ``mixtral`` (Mixtral / Mistral-MoE), ``qwen2_moe`` (Qwen1.5-MoE / Qwen2-MoE, shared
expert with a sigmoid gate kept at the BS), ``qwen3_moe`` and ``olmoe``.

Expert tensors in the split are family-neutral: ``w1`` (gate projection, [I, H]), ``w3`` (up
projection, [I, H]) and ``w2`` (down projection, [H, I]); expert(x) = w2(silu(w1 x) * w3 x).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.errors import ModelError

NEUTRAL_PROJS = ("w1", "w2", "w3")
_ALIASES = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}


def config_get(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``, falling back to its alias (transformers versions write
    ``num_experts`` or ``num_local_experts`` for the same thing)."""
    v = config.get(key)
    if v is None and key in _ALIASES:
        v = config.get(_ALIASES[key])
    return v


@dataclass(frozen=True)
class FamilyAdapter:
    """Key layout and routing defaults of one MoE family.

    Attributes
    ----------
    name
        Family name written to the manifest.
    model_types
        ``config.json`` ``model_type`` values handled.
    causal_lm_class
        ``transformers`` class name of the full model (used by the BS runtime).
    block_prefix
        On-disk module name of the MoE block inside a decoder layer
        (``model.layers.{l}.<block_prefix>``).
    proj_map
        On-disk projection name -> neutral name (``w1``/``w2``/``w3``).
    num_experts_key, intermediate_key, top_k_key
        ``config.json`` keys for the number of routed experts per layer, the routed expert's
        intermediate size and the number of experts per token.
    shared_expert_key
        Config key of the shared expert's intermediate size (``None``: no shared expert).
    norm_topk_default
        Renormalise the top-k probabilities when the config has no ``norm_topk_prob`` key.
    sparse_step_keys
        Whether ``decoder_sparse_step``/``mlp_only_layers`` decide which layers are MoE.
    """

    name: str
    model_types: tuple[str, ...]
    causal_lm_class: str
    block_prefix: str
    proj_map: Mapping[str, str]
    num_experts_key: str
    intermediate_key: str
    top_k_key: str = "num_experts_per_tok"
    shared_expert_key: str | None = None
    norm_topk_default: bool = True
    norm_topk_configurable: bool = False
    sparse_step_keys: bool = False
    activation_key: str = "hidden_act"
    _expert_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _fused_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        projs = "|".join(re.escape(p) for p in self.proj_map)
        object.__setattr__(
            self,
            "_expert_re",
            re.compile(
                rf"model\.layers\.(\d+)\.{re.escape(self.block_prefix)}\.experts\.(\d+)\."
                rf"({projs})\.weight"
            ),
        )
        # transformers>=5 in-memory layout (3D tensors), accepted too:
        # experts.gate_up_proj/down_proj
        object.__setattr__(
            self,
            "_fused_re",
            re.compile(
                rf"model\.layers\.(\d+)\.(?:{re.escape(self.block_prefix)}|mlp)\.experts\.(gate_up_proj|down_proj)"
            ),
        )

    # ---- key layout ------------------------------------------------------------------------
    def match_expert_key(self, key: str) -> tuple[int, int, str] | None:
        """``(layer, expert, neutral_proj)`` if ``key`` is a per-expert weight, else ``None``."""
        m = self._expert_re.fullmatch(key)
        if m is None:
            return None
        return int(m.group(1)), int(m.group(2)), self.proj_map[m.group(3)]

    def match_fused_key(self, key: str) -> tuple[int, str] | None:
        """``(layer, "gate_up_proj"|"down_proj")`` if ``key`` is a fused 3D expert tensor."""
        m = self._fused_re.fullmatch(key)
        return None if m is None else (int(m.group(1)), m.group(2))

    def expert_key(self, layer: int, expert: int, neutral_proj: str) -> str:
        """The on-disk key of one expert projection (inverse of :meth:`match_expert_key`)."""
        inv = {v: k for k, v in self.proj_map.items()}
        return (
            f"model.layers.{layer}.{self.block_prefix}.experts.{expert}.{inv[neutral_proj]}.weight"
        )

    def router_key(self, layer: int) -> str:
        """On-disk key of the router (gate) weight of MoE layer ``layer``."""
        return f"model.layers.{layer}.{self.block_prefix}.gate.weight"

    # ---- config ----------------------------------------------------------------------------
    def dims(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Validated dimensions from a ``config.json`` dict (raises :class:`ModelError`)."""
        out: dict[str, Any] = {}
        for name, key in (
            ("hidden_size", "hidden_size"),
            ("num_layers", "num_hidden_layers"),
            ("num_experts", self.num_experts_key),
            ("expert_intermediate_size", self.intermediate_key),
            ("top_k", self.top_k_key),
            ("vocab_size", "vocab_size"),
        ):
            v = config_get(config, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ModelError(f"config.json: {key}", f"expected a positive integer, got {v!r}")
            out[name] = v
        if out["top_k"] > out["num_experts"]:
            raise ModelError(
                f"config.json: {self.top_k_key}",
                f"top-k {out['top_k']} exceeds {self.num_experts_key}={out['num_experts']}",
            )
        if self.shared_expert_key is not None:
            v = config.get(self.shared_expert_key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ModelError(
                    f"config.json: {self.shared_expert_key}",
                    f"expected a non-negative integer, got {v!r}",
                )
            out["shared_expert_intermediate_size"] = v
        act = config.get(self.activation_key, "silu")
        if act not in ("silu", "swish"):
            raise ModelError(
                f"config.json: {self.activation_key}",
                f"expert activation {act!r} not supported (only silu/SwiGLU experts)",
            )
        return out

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Indices of the decoder layers whose MLP is a routed-MoE block."""
        n = int(config["num_hidden_layers"])
        if not self.sparse_step_keys:
            return list(range(n))
        step = config.get("decoder_sparse_step") or 1
        dense = set(config.get("mlp_only_layers") or [])
        return [i for i in range(n) if i not in dense and (i + 1) % int(step) == 0]

    def norm_topk_prob(self, config: Mapping[str, Any]) -> bool:
        """Whether the default routing renormalises the top-k probabilities to sum to 1."""
        if not self.norm_topk_configurable:
            return self.norm_topk_default
        return bool(config.get("norm_topk_prob", self.norm_topk_default))

    @property
    def has_shared_expert(self) -> bool:
        """Whether the family has a shared expert beside the routed ones (Qwen2-MoE)."""
        return self.shared_expert_key is not None


_QWEN_PROJS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

FAMILIES: dict[str, FamilyAdapter] = {
    f.name: f
    for f in (
        FamilyAdapter(
            "mixtral",
            ("mixtral",),
            "MixtralForCausalLM",
            "block_sparse_moe",
            {"w1": "w1", "w2": "w2", "w3": "w3"},
            "num_local_experts",
            "intermediate_size",
        ),
        FamilyAdapter(
            "qwen2_moe",
            ("qwen2_moe",),
            "Qwen2MoeForCausalLM",
            "mlp",
            _QWEN_PROJS,
            "num_experts",
            "moe_intermediate_size",
            shared_expert_key="shared_expert_intermediate_size",
            norm_topk_default=False,
            norm_topk_configurable=True,
            sparse_step_keys=True,
        ),
        FamilyAdapter(
            "qwen3_moe",
            ("qwen3_moe",),
            "Qwen3MoeForCausalLM",
            "mlp",
            _QWEN_PROJS,
            "num_experts",
            "moe_intermediate_size",
            norm_topk_default=False,
            norm_topk_configurable=True,
            sparse_step_keys=True,
        ),
        FamilyAdapter(
            "olmoe",
            ("olmoe",),
            "OlmoeForCausalLM",
            "mlp",
            _QWEN_PROJS,
            "num_experts",
            "intermediate_size",
            norm_topk_default=False,
            norm_topk_configurable=True,
        ),
    )
}
"""Registered families by name."""

_MOE_HINT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def family_for_config(config: Mapping[str, Any], where: str = "config.json") -> FamilyAdapter:
    """Pick the adapter for a ``config.json`` dict.

    Raises
    ------
    ModelError
        ``<where>: model_type`` for a dense (non-MoE) model or an unknown MoE family.
    """
    mt = config.get("model_type")
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            n = config_get(config, fam.num_experts_key)
            if not n:
                raise ModelError(
                    f"{where}: {fam.num_experts_key}",
                    f"is {n!r}: a dense (non-MoE) {mt} model has no routed experts to split",
                )
            return fam
    known = ", ".join(sorted(FAMILIES))
    if not any(config.get(k) for k in _MOE_HINT_KEYS):
        raise ModelError(
            f"{where}: model_type",
            f"{mt!r} is a dense (non-MoE) model (no routed experts); known MoE families: {known}",
        )
    raise ModelError(f"{where}: model_type", f"unknown MoE family {mt!r}; known: {known}")
