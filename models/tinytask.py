"""The tiny built-in task: a mixture of digit-sequence transformations chosen by a task token.

The project trains its own tiny Mixtral on this task (:mod:`models.tinytrain`) so that the demo
and CI have a model with *real* accuracy and no weights need to be downloaded.

Sequence layout (token ids, see :data:`VOCAB`)::

    BOS TASK d_1 ... d_n SEP o_1 ... o_n EOS

The prompt is ``BOS TASK d_1 .. d_n SEP`` and the target is ``o_1 .. o_n EOS``. Every task maps
the input digits position by position through a task-specific table (some also reverse the
order), so each output token needs a (task, digit)-dependent non-linear lookup: the feed-forward
(expert) computation matters, and different tasks/digits are served by different experts.

The generator is a pure function of ``(seed, index)``; an example belongs to the held-out split
iff a hash of its *input* sequence falls in the held-out bucket, so train and held-out inputs
are disjoint by construction.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SEP_ID = 3
N_DIGITS = 16
"""Size of the digit alphabet (symbols ``0`` .. ``f``)."""

_PERM_SEED = 20240607


def _permutation(seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    p = list(range(N_DIGITS))
    rng.shuffle(p)
    return tuple(p)


@dataclass(frozen=True)
class TinyTaskSpec:
    """One transformation: output digit i = ``table[input digit j]`` with j = i or n-1-i."""

    name: str
    table: tuple[int, ...]
    reverse: bool


TASKS: tuple[TinyTaskSpec, ...] = (
    TinyTaskSpec("copy", tuple(range(N_DIGITS)), False),
    TinyTaskSpec("reverse", tuple(range(N_DIGITS)), True),
    TinyTaskSpec("add5", tuple((d + 5) % N_DIGITS for d in range(N_DIGITS)), False),
    TinyTaskSpec("mul3", tuple((3 * d) % N_DIGITS for d in range(N_DIGITS)), False),
    TinyTaskSpec("cipher_a", _permutation(_PERM_SEED), False),
    TinyTaskSpec("cipher_b", _permutation(_PERM_SEED + 1), True),
    TinyTaskSpec("square", tuple((d * d + 1) % N_DIGITS for d in range(N_DIGITS)), False),
    TinyTaskSpec("cipher_c", _permutation(_PERM_SEED + 2), False),
)
"""The task mixture; the task token of ``TASKS[i]`` is ``TASK_BASE_ID + i``."""

TASK_BASE_ID = 4
DIGIT_BASE_ID = TASK_BASE_ID + len(TASKS)
VOCAB_SIZE = DIGIT_BASE_ID + N_DIGITS
MIN_LEN = 3
MAX_LEN = 8
MAX_SEQ_LEN = 2 * MAX_LEN + 4
HELDOUT_BUCKETS = 10
"""An input is held out iff ``sha256(input) % HELDOUT_BUCKETS == 0`` (10 %)."""

VOCAB: tuple[str, ...] = (
    ("<pad>", "<s>", "</s>", "|")
    + tuple(f"<{t.name}>" for t in TASKS)
    + tuple(format(d, "x") for d in range(N_DIGITS))
)


@dataclass(frozen=True)
class TinyExample:
    """One example: ``prompt`` ids (ending in SEP) and ``target`` ids (ending in EOS)."""

    task: str
    prompt: tuple[int, ...]
    target: tuple[int, ...]

    @property
    def full(self) -> tuple[int, ...]:
        """Prompt followed by target."""
        return self.prompt + self.target


def apply_task(task_index: int, digits: Sequence[int]) -> list[int]:
    """Apply ``TASKS[task_index]`` to a digit list (values in ``[0, N_DIGITS)``)."""
    spec = TASKS[task_index]
    src = list(reversed(digits)) if spec.reverse else list(digits)
    return [spec.table[d] for d in src]


def is_heldout(task_index: int, digits: Sequence[int]) -> bool:
    """True iff the (task, input) pair belongs to the held-out split."""
    key = bytes([task_index, *digits])
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % HELDOUT_BUCKETS == 0


def make_example(task_index: int, digits: Sequence[int]) -> TinyExample:
    """Build the token ids of one example."""
    out = apply_task(task_index, digits)
    prompt = (BOS_ID, TASK_BASE_ID + task_index, *(DIGIT_BASE_ID + d for d in digits), SEP_ID)
    target = (*(DIGIT_BASE_ID + d for d in out), EOS_ID)
    return TinyExample(TASKS[task_index].name, prompt, target)


def generate(split: str, count: int, seed: int = 0) -> list[TinyExample]:
    """Deterministically generate ``count`` examples of ``split`` ("train", "heldout" or
    "calibration").

    Parameters
    ----------
    split
        ``"train"`` or ``"heldout"``; the two never share a (task, input) pair.
        ``"calibration"``: inputs from the non-held-out pool (never a held-out test example),
        drawn from their own stream (for statistics such as expert popularity).
    count
        Number of examples.
    seed
        Generator seed; the same ``(split, count, seed)`` always gives the same list.
    """
    if split not in ("train", "heldout", "calibration"):
        raise ValueError(f"split: must be 'train', 'heldout' or 'calibration', got {split!r}")
    want_heldout = split == "heldout"
    rng = random.Random(f"{seed}:{split}")
    out: list[TinyExample] = []
    while len(out) < count:
        t = rng.randrange(len(TASKS))
        n = rng.randint(MIN_LEN, MAX_LEN)
        digits = [rng.randrange(N_DIGITS) for _ in range(n)]
        if is_heldout(t, digits) == want_heldout:
            out.append(make_example(t, digits))
    return out


def iter_train_batches(batch_size: int, seed: int) -> Iterator[list[TinyExample]]:
    """Endless deterministic stream of training batches."""
    rng_seed = seed
    while True:
        yield generate("train", batch_size, seed=rng_seed)
        rng_seed += 1_000_003


def decode(ids: Sequence[int]) -> str:
    """Human-readable rendering of token ids."""
    return " ".join(VOCAB[i] if 0 <= i < VOCAB_SIZE else f"?{i}" for i in ids)


def task_card() -> dict[str, object]:
    """JSON-serialisable description of the task (written next to the tiny weights)."""
    return {
        "name": "moe-edge-tiny-task/1",
        "vocab": list(VOCAB),
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "sep_id": SEP_ID,
        "tasks": [{"name": t.name, "table": list(t.table), "reverse": t.reverse} for t in TASKS],
        "min_len": MIN_LEN,
        "max_len": MAX_LEN,
        "heldout": f"sha256(bytes([task_index, *digits])) % {HELDOUT_BUCKETS} == 0",
    }


def write_jsonl(path: Path, examples: Sequence[TinyExample]) -> None:
    """Write examples as JSONL ``{"task", "prompt_ids", "target_ids"}``."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(
                {"task": ex.task, "prompt_ids": list(ex.prompt), "target_ids": list(ex.target)}
            )
            + "\n"
            for ex in examples
        )


def make_mc_items(count: int, seed: int = 0, num_choices: int = 4) -> list[dict[str, object]]:
    """Multiple-choice items from held-out examples (token-id form of the MC JSONL format).

    The context is the prompt; the choices are the correct target and the targets that
    ``num_choices - 1`` *other* tasks would give for the same input digits (distinct from the
    correct one); ``label`` is the index of the correct choice (rotated deterministically).
    """
    rng = random.Random(f"mc:{seed}")
    items: list[dict[str, object]] = []
    for ex in generate("heldout", count * 3, seed=seed + 7):
        if len(items) == count:
            break
        t = ex.prompt[1] - TASK_BASE_ID
        digits = [i - DIGIT_BASE_ID for i in ex.prompt[2:-1]]
        others = [o for o in range(len(TASKS)) if o != t]
        rng.shuffle(others)
        choices = [list(ex.target)]
        for o in others:
            cand = list(make_example(o, digits).target)
            if cand not in choices:
                choices.append(cand)
            if len(choices) == num_choices:
                break
        if len(choices) < num_choices:
            continue
        label = len(items) % num_choices
        choices[0], choices[label] = choices[label], choices[0]
        items.append(
            {
                "id": f"tiny-{len(items)}",
                "context_ids": list(ex.prompt),
                "choices_ids": choices,
                "label": label,
            }
        )
    return items
