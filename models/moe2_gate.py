"""The MoE² gate at the base station: prompt -> weights over K whole-model experts.

MoE² (arXiv 2501.09410) puts a whole small LLM on each edge device; the gate weights the chosen
LLMs per prompt and their outputs are combined with the gate weights renormalised over the
chosen ones (:func:`combine_options`).

The gate is small: the mean of learned token embeddings over the prompt (padding excluded),
then an MLP to K logits; :meth:`Gate.weights` is their softmax.

Training target (:func:`train_gate`), chosen and documented here: on prompts of the tiny task's
*train* split, each expert's log-likelihood ``ll_k`` of the correct answer (target tokens and
EOS, teacher forced) gives the soft target ``q = softmax(ll / temperature)`` over the experts,
and the gate minimises the cross-entropy ``-sum_k q_k log w_k``. With temperature 1, ``q`` is
the posterior that expert k produced the correct answer under a uniform prior, so the gate
learns to put its weight on the experts most likely to answer each kind of prompt; unlike a
multi-label correctness target it also ranks experts that are all right (or all wrong) by how
confident they are, which is what the option-probability combination uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import tinytask as tt
from models.dense_lm import DenseLM, load_dense_lm
from models.errors import ModelError
from models.tinytrain import batch_tensors

GATE_FORMAT = "moe-edge-moe2-gate/1"
"""The ``format`` value of ``gate.json``."""

GATE_JSON = "gate.json"
GATE_WEIGHTS = "gate.safetensors"


@dataclass(frozen=True)
class GateConfig:
    """Gate architecture: embedding width ``dim``, MLP width ``hidden``, ``num_experts`` out."""

    vocab_size: int
    num_experts: int
    dim: int = 32
    hidden: int = 64


@dataclass(frozen=True)
class GateTrainConfig:
    """Gate training: ``examples`` train-split prompts, full-batch AdamW for ``steps``."""

    examples: int = 2048
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    temperature: float = 1.0
    threads: int = 1


class Gate(nn.Module):
    """Prompt -> K expert logits (mean of token embeddings, then an MLP).

    ``experts`` names the experts in output order (the expert folders' names).
    """

    def __init__(self, config: GateConfig, experts: Sequence[str] = ()) -> None:
        super().__init__()
        self.config = config
        self.experts = list(experts)
        self.emb = nn.Embedding(config.vocab_size, config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, config.num_experts),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` of right-padded (``PAD_ID``) prompt ids ``[N, T]``."""
        mask = (ids != tt.PAD_ID).float()[..., None]
        pooled = (self.emb(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.mlp(pooled)

    @torch.no_grad()
    def weights(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Softmax gate weights ``[N, K]`` (float32, rows sum to 1) of ``N`` prompts."""
        return torch.softmax(self.forward(pad_prompts(prompts)).float(), dim=-1)


def pad_prompts(prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad prompts with ``PAD_ID`` into an int64 ``[N, T]`` tensor."""
    if len(prompts) == 0 or min(len(p) for p in prompts) == 0:
        raise ModelError("prompts", "need at least one prompt, none empty")
    ids = torch.full((len(prompts), max(len(p) for p in prompts)), tt.PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return ids


@torch.no_grad()
def target_loglik(model: DenseLM, examples: Sequence[tt.TinyExample]) -> torch.Tensor:
    """Per example, ``log p(target | prompt)`` under ``model`` (teacher forced), ``[N]``."""
    ids, _, labels = batch_tensors(examples)
    logp = torch.log_softmax(model(ids).float(), dim=-1)[:, :-1]
    lab = labels[:, 1:]
    picked = logp.gather(2, lab.clamp(min=0)[..., None])[..., 0]
    return (picked * (lab != -100)).sum(1)


def gate_targets(
    experts: Sequence[DenseLM], examples: Sequence[tt.TinyExample], temperature: float
) -> torch.Tensor:
    """Soft targets ``softmax(ll / temperature)`` over the experts, ``[N, K]``."""
    ll = torch.stack([target_loglik(m, examples) for m in experts], dim=1)
    return torch.softmax(ll / temperature, dim=1)


def train_gate(
    expert_folders: Sequence[Path],
    out: Path,
    seed: int = 0,
    train: GateTrainConfig = GateTrainConfig(),
) -> Gate:
    """Train the gate over the experts in ``expert_folders`` (see the module docstring).

    Saves ``out/gate.safetensors`` and ``out/gate.json`` (config, expert names, target);
    deterministic for a given ``seed``.
    """
    from safetensors.torch import save_file

    folders = [Path(f) for f in expert_folders]
    prev = torch.get_num_threads()
    torch.set_num_threads(train.threads)
    try:
        experts = [load_dense_lm(f) for f in folders]
        examples = tt.generate("train", train.examples, seed=seed + 4242)
        q = gate_targets(experts, examples, train.temperature)
        ids = pad_prompts([ex.prompt for ex in examples])
        torch.manual_seed(seed + 17)
        gate = Gate(GateConfig(tt.VOCAB_SIZE, len(folders)), [f.name for f in folders])
        opt = torch.optim.AdamW(gate.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        for _ in range(train.steps):
            loss = -(q * F.log_softmax(gate(ids), dim=-1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(prev)
    gate.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in gate.state_dict().items()}, str(out / GATE_WEIGHTS))
    doc = {
        "format": GATE_FORMAT,
        "config": asdict(gate.config),
        "experts": gate.experts,
        "target": "softmax over experts of log p(correct answer | prompt) / temperature; "
        "loss: cross-entropy to the gate's softmax",
        "train": dict(asdict(train), seed=seed, final_loss=float(loss.detach())),
    }
    (out / GATE_JSON).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return gate


def load_gate(folder: Path | str) -> Gate:
    """Load a gate saved by :func:`train_gate` (eval mode, float32, CPU)."""
    from safetensors.torch import load_file

    path = Path(folder) / GATE_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != GATE_FORMAT:
            raise ValueError(f"not a {GATE_FORMAT} file")
        gate = Gate(GateConfig(**doc["config"]), doc["experts"])
        gate.load_state_dict(load_file(str(Path(folder) / GATE_WEIGHTS)), strict=True)
    except Exception as e:  # OSError, JSON, config keys, safetensors, state-dict mismatch
        raise ModelError(str(path), " ".join(str(e).split())) from e
    return gate.eval()


def combine_options(
    gate_w: torch.Tensor, chosen: Sequence[int], option_logprobs: Mapping[int, Sequence[float]]
) -> int:
    """The option index picked by the chosen experts' gate-weighted vote.

    ``gate_w`` is one prompt's ``[K]`` gate weights; they are renormalised over ``chosen``
    (uniform if they sum to 0). Each chosen expert's option log-probs become a softmax over the
    options; the renormalised weighted sum of those is argmax-ed (ties -> lowest index).
    """
    if len(chosen) == 0:
        raise ModelError("chosen", "no expert chosen")
    w = gate_w.reshape(-1).double()[list(chosen)]
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(chosen))
    probs = torch.stack(
        [
            torch.softmax(torch.tensor(list(option_logprobs[k]), dtype=torch.float64), 0)
            for k in chosen
        ]
    )
    mix = (w[:, None] * probs).sum(0).tolist()
    return max(range(len(mix)), key=lambda i: (mix[i], -i))


def top_experts(gate_w: torch.Tensor, m: int) -> list[int]:
    """The ``m`` experts of largest weight in one prompt's ``[K]`` weights (ties -> lower index)."""
    w = gate_w.reshape(-1).tolist()
    return sorted(range(len(w)), key=lambda k: (-w[k], k))[:m]


def combined_choices(
    gate_w: torch.Tensor, expert_logprobs: Sequence[Sequence[Sequence[float]]], m: int | None
) -> list[int]:
    """Per item, :func:`combine_options` over the top-``m`` experts (all K if ``m`` is None).

    ``gate_w`` is ``[N, K]``; ``expert_logprobs[k][i]`` is expert k's option log-probs of item i.
    """
    K = gate_w.shape[1]
    out: list[int] = []
    for i in range(gate_w.shape[0]):
        chosen = list(range(K)) if m is None else top_experts(gate_w[i], m)
        out.append(combine_options(gate_w[i], chosen, {k: expert_logprobs[k][i] for k in chosen}))
    return out


def accuracy_by_category(
    categories: Sequence[str], predictions: Sequence[int], labels: Sequence[int]
) -> dict[str, float]:
    """Accuracy per category (in first-seen order) plus ``"mean"`` over the categories."""
    hits: dict[str, list[int]] = {}
    for c, p, y in zip(categories, predictions, labels):
        hits.setdefault(c, []).append(int(p == y))
    acc = {c: sum(h) / len(h) for c, h in hits.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc
