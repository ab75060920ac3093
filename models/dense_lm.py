"""A small dense causal decoder-only LM in pure torch: one whole "expert" LLM of MoE².

In MoE² (arXiv 2501.09410) every expert is a complete small LLM running on one edge device, so
this module runs on the devices too: it needs only torch and safetensors and keeps Python 3.8
syntax. The architecture is deliberately plain: token embeddings plus learned absolute
positions, ``num_layers`` pre-norm blocks (LayerNorm, causal multi-head self-attention through
``scaled_dot_product_attention``, GELU MLP), a final LayerNorm and an untied output head.

A saved model is a folder with ``config.json`` (``{"format", "config", "meta"}``) and
``model.safetensors`` (float32 tensors, names as in :meth:`DenseLM.state_dict`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelError

FORMAT = "moe-edge-dense-lm/1"
"""The ``format`` value of a saved model's ``config.json``."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class DenseLMConfig:
    """Architecture of a :class:`DenseLM` (``hidden_size`` divisible by ``num_heads``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_seq_len: int

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if int(getattr(self, key)) < 1:
                raise ModelError(key, f"must be >= 1, got {getattr(self, key)!r}")
        if self.intermediate_size < 1 or self.max_seq_len < 1:
            raise ModelError("config", "intermediate_size and max_seq_len must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ModelError(
                "hidden_size", f"{self.hidden_size} is not divisible by {self.num_heads} heads"
            )


class _Block(nn.Module):
    """One pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: DenseLMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.ln1 = nn.LayerNorm(cfg.hidden_size)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln2 = nn.LayerNorm(cfg.hidden_size)
        self.fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(H, dim=-1)
        shape = (B, T, self.num_heads, H // self.num_heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, H))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class DenseLM(nn.Module):
    """A small dense causal LM (see the module docstring for the architecture).

    Right padding is harmless everywhere: attention is causal, so a position never sees the
    padding after it.
    """

    def __init__(self, config: DenseLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(config.max_seq_len, config.hidden_size)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of int64 token ids ``[B, T]`` (T at most ``max_seq_len``)."""
        if ids.dim() != 2:
            raise ModelError("ids", f"expected [B, T], got shape {tuple(ids.shape)}")
        T = ids.shape[1]
        if T > self.config.max_seq_len:
            raise ModelError("ids", f"length {T} > max_seq_len {self.config.max_seq_len}")
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def next_token_logprobs(self, prompt: Sequence[int]) -> torch.Tensor:
        """Float32 log-probabilities ``[V]`` of the token after ``prompt`` (non-empty)."""
        if len(prompt) == 0:
            raise ModelError("prompt", "is empty")
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self._device())
        return torch.log_softmax(self.forward(ids)[0, -1].float(), dim=-1)

    @torch.no_grad()
    def option_logprobs(
        self, prompt: Sequence[int], options: Sequence[Sequence[int]]
    ) -> list[float]:
        """Per option, ``sum_j log p(option[j] | prompt, option[:j])``, all in one forward.

        The sequences ``prompt + option`` are right-padded into one batch; an empty option
        scores 0.
        """
        if len(prompt) == 0:
            raise ModelError("prompt", "is empty")
        if len(options) == 0:
            return []
        P = len(prompt)
        T = P + max(len(o) for o in options)
        ids = torch.zeros((len(options), T), dtype=torch.long)
        for i, opt in enumerate(options):
            ids[i, : P + len(opt)] = torch.tensor(list(prompt) + list(opt), dtype=torch.long)
        logp = torch.log_softmax(self.forward(ids.to(self._device())).float(), dim=-1).cpu()
        out: list[float] = []
        for i, opt in enumerate(options):
            n = len(opt)
            if n == 0:
                out.append(0.0)
                continue
            rows = logp[i, P - 1 : P - 1 + n]
            picked = rows.gather(1, torch.tensor(list(opt), dtype=torch.long)[:, None])
            out.append(float(picked.sum()))
        return out

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy continuation of ``prompt``: the new tokens, ending with ``eos_id`` if it came.

        Stops after ``eos_id``, after ``max_new_tokens`` tokens, or when the sequence reaches
        ``max_seq_len``.
        """
        seq = list(prompt)
        new: list[int] = []
        while len(new) < max_new_tokens and len(seq) < self.config.max_seq_len:
            nxt = int(torch.argmax(self.next_token_logprobs(seq)))
            seq.append(nxt)
            new.append(nxt)
            if nxt == eos_id:
                break
        return new


def save_dense_lm(
    model: DenseLM, folder: Path | str, meta: Mapping[str, Any] | None = None
) -> None:
    """Write ``folder/config.json`` (format, config, meta) and ``folder/model.safetensors``."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    doc: dict[str, Any] = {
        "format": FORMAT,
        "config": asdict(model.config),
        "meta": dict(meta or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def read_dense_lm_config(folder: Path | str) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved model (``format``, ``config``, ``meta``)."""
    path = Path(folder) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(str(path), f"cannot read: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(str(path), f"not a {FORMAT} config")
    return doc


def load_dense_lm(folder: Path | str, device: str = "cpu") -> DenseLM:
    """Load a model written by :func:`save_dense_lm`, in eval mode, float32, on ``device``."""
    from safetensors.torch import load_file

    doc = read_dense_lm_config(folder)
    try:
        cfg = DenseLMConfig(**doc["config"])
    except (TypeError, KeyError) as e:
        raise ModelError(str(Path(folder) / CONFIG_FILE), f"bad config: {e}") from e
    model = DenseLM(cfg)
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError too
        raise ModelError(str(path), f"cannot read: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(str(path), " ".join(str(e).split())) from e
    return model.to(device=device, dtype=torch.float32).eval()
