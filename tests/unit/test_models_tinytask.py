"""The tiny task generator: deterministic, disjoint splits, correct transformations."""

from models import tinytask as tt


def test_deterministic_and_disjoint() -> None:
    a = tt.generate("train", 300, seed=3)
    assert a == tt.generate("train", 300, seed=3)
    assert a != tt.generate("train", 300, seed=4)
    held = tt.generate("heldout", 300, seed=0)
    train_inputs = {ex.prompt for ex in tt.generate("train", 5000, seed=0)}
    assert not train_inputs & {ex.prompt for ex in held}
    assert all(
        tt.is_heldout(
            ex.prompt[1] - tt.TASK_BASE_ID, [i - tt.DIGIT_BASE_ID for i in ex.prompt[2:-1]]
        )
        for ex in held
    )


def test_layout_and_transformations() -> None:
    ex = tt.make_example(1, [1, 2, 3])  # reverse
    assert ex.prompt == (
        tt.BOS_ID,
        tt.TASK_BASE_ID + 1,
        *(tt.DIGIT_BASE_ID + d for d in (1, 2, 3)),
        tt.SEP_ID,
    )
    assert ex.target == (*(tt.DIGIT_BASE_ID + d for d in (3, 2, 1)), tt.EOS_ID)
    assert tt.apply_task(2, [0, 11, 15]) == [5, 0, 4]  # add5 mod 16
    assert tt.decode(ex.full) == "<s> <reverse> 1 2 3 | 3 2 1 </s>"
    assert len(tt.VOCAB) == tt.VOCAB_SIZE and max(ex.full) < tt.VOCAB_SIZE
    # all tasks differ on a generic input, so the task token matters
    outs = {tuple(tt.apply_task(t, [1, 2, 3, 4, 5])) for t in range(len(tt.TASKS))}
    assert len(outs) == len(tt.TASKS)


def test_mc_items() -> None:
    items = tt.make_mc_items(20, seed=1)
    assert len(items) == 20
    for it in items:
        ch = it["choices_ids"]
        assert len(ch) == 4 and len({tuple(c) for c in ch}) == 4
        correct = ch[it["label"]]
        p = it["context_ids"]
        ex = tt.make_example(p[1] - tt.TASK_BASE_ID, [i - tt.DIGIT_BASE_ID for i in p[2:-1]])
        assert tuple(correct) == ex.target
