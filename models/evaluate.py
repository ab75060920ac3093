"""Accuracy of a split model: the tiny task's held-out split and multiple-choice JSONL files.

Tiny task (:func:`eval_tiny`): greedy exact match of the whole target (batched prefill + KV-cache
decoding at the BS), teacher-forced next-token accuracy and perplexity over target tokens
(including EOS).

Multiple choice (:func:`eval_multiple_choice`) on a JSONL file, one question per line, either
text (needs a tokenizer in the split's ``bs/`` directory)::

    {"id": "arc-1", "context": "Question: ...\\nAnswer:", "choices": [" A", " B", " C"], "label": 2}

or token ids (no tokenizer needed)::

    {"id": "q1", "context_ids": [1, 5, 12], "choices_ids": [[20, 2], [21, 2]], "label": 0}

``label`` is the 0-based index of the correct choice (``"answer"`` is accepted as a synonym).
Each choice is scored by the sum of its tokens' log-probabilities after the context; ``acc``
takes the arg-max of that sum, ``acc_norm`` of the sum divided by the choice's token count.
Text choices are tokenized together with the context (``tok(context + choice)`` minus
``tok(context)``) when that prefix is stable, else separately.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import tinytask as tt
from models.errors import ModelError
from models.runtime import BaseStationModel


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question in token ids."""

    id: str
    context: list[int]
    choices: list[list[int]]
    label: int


def eval_tiny(
    bs: BaseStationModel, n_examples: int = 512, batch_size: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Held-out accuracy of the tiny task.

    Returns
    -------
    dict
        ``exact_match`` (greedy, whole target incl. EOS), ``next_token_acc``, ``perplexity``,
        ``n_examples``, ``n_tokens``.
    """
    exs = tt.generate("heldout", n_examples, seed=seed)
    correct_tok = n_tok = exact = 0
    nll = 0.0
    for b0 in range(0, len(exs), batch_size):
        batch = exs[b0 : b0 + batch_size]
        ids, mask = bs.left_pad([e.full for e in batch], tt.PAD_ID)
        logp = torch.log_softmax(bs.logits(ids, mask), dim=-1)
        T = ids.shape[1]
        for j, e in enumerate(batch):
            n = len(e.target)
            tgt = ids[j, T - n :]
            lp = logp[j, T - n - 1 : T - 1]
            nll -= float(lp.gather(-1, tgt.unsqueeze(-1)).sum())
            correct_tok += int((lp.argmax(-1) == tgt).sum())
            n_tok += n
        gen = bs.generate_greedy(
            [e.prompt for e in batch],
            max_new_tokens=tt.MAX_LEN + 1,
            eos_token_id=tt.EOS_ID,
            pad_token_id=tt.PAD_ID,
        )
        exact += sum(int(tuple(g) == e.target) for g, e in zip(gen.tokens, batch))
    return {
        "exact_match": exact / len(exs),
        "next_token_acc": correct_tok / n_tok,
        "perplexity": math.exp(nll / n_tok),
        "n_examples": len(exs),
        "n_tokens": n_tok,
    }


def _tokenize_pair(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    both = tokenizer(context + choice, add_special_tokens=True)["input_ids"]
    if both[: len(ctx)] == ctx and len(both) > len(ctx):
        return ctx, both[len(ctx) :]
    return ctx, tokenizer(choice, add_special_tokens=False)["input_ids"]


def load_mc_jsonl(
    path: str | os.PathLike[str], tokenizer: Any = None, limit: int | None = None
) -> list[MCItem]:
    """Read a multiple-choice JSONL file (format in the module docstring).

    Raises
    ------
    ModelError
        ``<file>:<line>`` and the problem, for unreadable JSON, missing keys, a bad label, or text
        items without a tokenizer.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ModelError(str(p), "file not found") from None
    items: list[MCItem] = []
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{ln}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ModelError(where, f"invalid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ModelError(where, "expected a JSON object")
        label = d.get("label", d.get("answer"))
        if "context_ids" in d:
            ctx = d["context_ids"]
            choices = d.get("choices_ids")
            if not (
                isinstance(ctx, list)
                and isinstance(choices, list)
                and choices
                and all(isinstance(c, list) and c for c in choices)
            ):
                raise ModelError(
                    where,
                    "context_ids must be a list and choices_ids a non-empty list "
                    "of non-empty lists",
                )
            ctx_ids, ch_ids = [int(x) for x in ctx], [[int(x) for x in c] for c in choices]
        elif "context" in d:
            if tokenizer is None:
                raise ModelError(
                    where, "text item but the model has no tokenizer; use context_ids/choices_ids"
                )
            choices = d.get("choices")
            if not (
                isinstance(choices, list)
                and choices
                and all(isinstance(c, str) and c for c in choices)
            ):
                raise ModelError(where, "choices must be a non-empty list of non-empty strings")
            pairs = [_tokenize_pair(tokenizer, str(d["context"]), c) for c in choices]
            ctx_ids, ch_ids = pairs[0][0], [b for _, b in pairs]
            if any(a != ctx_ids for a, _ in pairs) or any(not b for b in ch_ids):
                raise ModelError(where, "context/choice tokenization is inconsistent")
        else:
            raise ModelError(where, "needs 'context' + 'choices' or 'context_ids' + 'choices_ids'")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(ch_ids):
            raise ModelError(
                where, f"label {label!r} is not an index into the {len(ch_ids)} choices"
            )
        if not ctx_ids:
            raise ModelError(where, "empty context")
        items.append(MCItem(str(d.get("id", ln)), ctx_ids, ch_ids, int(label)))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ModelError(str(p), "no questions")
    return items


def eval_multiple_choice(
    bs: BaseStationModel, items: Sequence[MCItem], batch_size: int = 16, pad_token_id: int = 0
) -> dict[str, Any]:
    """Log-likelihood multiple-choice accuracy: ``acc``, ``acc_norm``, ``n``."""
    contexts = [it.context for it in items for _ in it.choices]
    conts = [c for it in items for c in it.choices]
    scores = bs.score_continuations(
        contexts, conts, batch_size=batch_size, pad_token_id=pad_token_id
    )
    acc = acc_norm = 0
    k = 0
    for it in items:
        s = scores[k : k + len(it.choices)]
        k += len(it.choices)
        acc += int(max(range(len(s)), key=lambda i: s[i].logprob) == it.label)
        acc_norm += int(
            max(range(len(s)), key=lambda i: s[i].logprob / s[i].num_tokens) == it.label
        )
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def load_tokenizer(bs: BaseStationModel) -> Any:
    """The split's tokenizer (``bs/tokenizer*.json`` etc.) or ``None`` when there is none."""
    d = bs.manifest.bs_config_path.parent
    if not any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def is_tiny_split(bs: BaseStationModel) -> bool:
    """True iff the split came from the tiny built-in model (``bs/tiny_task.json``)."""
    return (bs.manifest.bs_config_path.parent / "tiny_task.json").is_file()
