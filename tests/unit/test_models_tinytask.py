"""The tiny task generator: deterministic, disjoint splits, correct transformations.

Expected answers are written out here, not recomputed with :mod:`models.tinytask`: the tables
below are the ones the committed tiny model was trained on (``models/tiny/tiny_task.json``), the
worked examples were done by hand, and the held-out buckets were checked with ``sha256sum``."""

import hashlib

import pytest

from models import tinytask as tt

# output digit for each input digit 0..f; the ciphers' tables pinned as trained
TABLES = {
    "copy": list(range(16)),
    "reverse": list(range(16)),
    "add5": [(d + 5) % 16 for d in range(16)],
    "mul3": [(3 * d) % 16 for d in range(16)],
    "cipher_a": [15, 4, 0, 6, 11, 12, 5, 2, 10, 3, 9, 1, 7, 14, 8, 13],
    "cipher_b": [8, 6, 7, 4, 0, 2, 13, 14, 1, 5, 10, 15, 11, 9, 12, 3],
    "square": [(d * d + 1) % 16 for d in range(16)],
    "cipher_c": [4, 8, 14, 12, 11, 1, 9, 15, 6, 5, 2, 0, 13, 7, 3, 10],
}
REVERSED = {"reverse", "cipher_b"}
NAMES = list(TABLES)  # task token TASK_BASE_ID + i is NAMES[i]


def expected(task: int, digits: list[int]) -> list[int]:
    name = NAMES[task]
    src = digits[::-1] if name in REVERSED else digits
    return [TABLES[name][d] for d in src]


def test_vocabulary_layout() -> None:
    assert (tt.PAD_ID, tt.BOS_ID, tt.EOS_ID, tt.SEP_ID) == (0, 1, 2, 3)
    assert (tt.TASK_BASE_ID, tt.DIGIT_BASE_ID, tt.VOCAB_SIZE) == (4, 12, 28)
    assert [t.name for t in tt.TASKS] == NAMES
    assert tt.VOCAB[4:12] == tuple(f"<{n}>" for n in NAMES)
    assert tt.VOCAB[12:] == tuple("0123456789abcdef")


# input 0 7 a f, worked by hand for every task
@pytest.mark.parametrize(
    "task, want",
    [
        (0, [0, 7, 10, 15]),  # copy
        (1, [15, 10, 7, 0]),  # reverse
        (2, [5, 12, 15, 4]),  # add5: 15 + 5 = 20 = 4 mod 16
        (3, [0, 5, 14, 13]),  # mul3: 21, 30, 45 mod 16
        (4, [15, 2, 9, 13]),  # cipher_a[0], [7], [a], [f]
        (5, [3, 10, 14, 8]),  # cipher_b on f a 7 0
        (6, [1, 2, 5, 2]),  # square: 1, 50, 101, 226 mod 16
        (7, [4, 15, 2, 10]),  # cipher_c[0], [7], [a], [f]
    ],
)
def test_every_task_on_a_worked_example(task: int, want: list[int]) -> None:
    assert tt.apply_task(task, [0, 7, 10, 15]) == want
    assert expected(task, [0, 7, 10, 15]) == want  # the tables above agree with the hand work


def test_every_task_on_every_digit() -> None:
    digits = list(range(16))
    for task, spec in enumerate(tt.TASKS):
        assert tt.apply_task(task, digits) == expected(task, digits), spec.name
    # all tasks differ on a generic input, so the task token matters
    outs = {tuple(tt.apply_task(t, [1, 2, 3, 4, 5])) for t in range(len(tt.TASKS))}
    assert len(outs) == len(tt.TASKS)


def test_example_token_ids() -> None:
    ex = tt.make_example(2, [0, 7, 10, 15])  # add5
    assert ex.task == "add5"
    assert ex.prompt == (1, 6, 12, 19, 22, 27, 3)
    assert ex.target == (17, 24, 27, 16, 2)
    assert ex.full == ex.prompt + ex.target
    assert tt.decode(ex.full) == "<s> <add5> 0 7 a f | 5 c f 4 </s>"
    ex = tt.make_example(1, [1, 2, 3])  # reverse
    assert tt.decode(ex.full) == "<s> <reverse> 1 2 3 | 3 2 1 </s>"
    assert tt.decode([99]) == "?99"


def _bucket(task: int, digits: list[int]) -> int:
    """The held-out rule as the task card states it, written out independently."""
    h = hashlib.sha256(bytes([task, *digits])).digest()
    return int.from_bytes(h[:8], "little") % 10


def test_heldout_rule_on_hand_checked_pairs() -> None:
    # buckets from `printf '\x02\x03\x03\x03' | sha256sum`, first 8 bytes little-endian mod 10
    assert tt.is_heldout(2, [3, 3, 3])  # bucket 0 (big-endian would give 5)
    assert not tt.is_heldout(3, [3, 3, 3])  # bucket 7: the task is part of the key
    assert not tt.is_heldout(2, [0, 7, 10, 15])  # bucket 7
    assert not tt.is_heldout(0, [0, 0, 0, 0])  # bucket 9
    assert _bucket(2, [3, 3, 3]) == 0 and _bucket(3, [3, 3, 3]) == 7


def _pair(ex: tt.TinyExample) -> tuple[int, list[int]]:
    return ex.prompt[1] - 4, [i - 12 for i in ex.prompt[2:-1]]


def test_deterministic_and_disjoint() -> None:
    a = tt.generate("train", 300, seed=3)
    assert a == tt.generate("train", 300, seed=3)
    assert a != tt.generate("train", 300, seed=4)
    held = tt.generate("heldout", 300, seed=0)
    train = tt.generate("train", 5000, seed=0)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}
    # each split holds what the rule puts there, and well-formed examples
    assert all(_bucket(*_pair(ex)) == 0 for ex in held)
    assert all(_bucket(*_pair(ex)) != 0 for ex in train)
    for ex in held[:50] + train[:50]:
        task, digits = _pair(ex)
        assert 3 <= len(digits) <= 8 and ex.task == NAMES[task]
        assert list(ex.target) == [12 + d for d in expected(task, digits)] + [2]
    assert len({ex.task for ex in train}) == 8


def test_mc_items() -> None:
    items = tt.make_mc_items(20, seed=1)
    assert len(items) == 20
    assert [it["label"] for it in items] == [i % 4 for i in range(20)]
    for it in items:
        ch = it["choices_ids"]
        assert len(ch) == 4 and len({tuple(c) for c in ch}) == 4
        task, digits = _pair(tt.TinyExample("", tuple(it["context_ids"]), ()))
        assert _bucket(task, digits) == 0  # contexts are held-out inputs
        answers = {t: [12 + d for d in expected(t, digits)] + [2] for t in range(8)}
        assert ch[it["label"]] == answers[task]
        # the distractors: what other tasks would answer for the same input
        others = [c for i, c in enumerate(ch) if i != it["label"]]
        assert all(c in [answers[t] for t in range(8) if t != task] for c in others)
