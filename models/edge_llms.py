"""Heterogeneous whole-model experts for MoE² (arXiv 2501.09410) on the tiny task.

In MoE² every expert is a whole small LLM on one edge device and a gate at the base station
weights the chosen LLMs per prompt. This module trains ``K`` (4..6, default 5)
:class:`models.dense_lm.DenseLM` models of different sizes on different *training mixtures*
over the 8 task families of :mod:`models.tinytask` (specialists with most of their data on 2..3
families, plus one small generalist), so that no single model is best on every category, then
the gate (:mod:`models.moe2_gate`), and writes::

    OUT/<name>/config.json, OUT/<name>/model.safetensors   one folder per expert
    OUT/gate.json, OUT/gate.safetensors                     the gate
    OUT/edge_llms.json                                      per-category accuracies

Accuracies, per category (task family):

- ``exact``: held-out exact match of greedy generation (:meth:`DenseLM.generate`) on
  ``eval.heldout_per_category`` held-out examples per family (``heldout_examples``);
- ``mc``: multiple-choice accuracy by option scoring (:meth:`DenseLM.option_logprobs`) on
  :func:`models.tinytask.make_mc_items` items (prompt + 4 options, the wrong ones being what other
  tasks give for the same digits);
- ``gate``: MC accuracy of the gate-combined experts (:func:`models.moe2_gate.combine_options`)
  with all K, with the top-1 and with the top-2 experts by gate weight.

Deterministic: fixed seeds, fixed thread count, deterministic data; for a given torch version
the weights are bit-identical run to run. BS side only (devices load the experts through
:mod:`models.dense_lm`), but in Python 3.8 syntax like the rest of ``models/``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from models import tinytask as tt
from models.dense_lm import DenseLM, DenseLMConfig, load_dense_lm, save_dense_lm
from models.errors import ModelError
from models.moe2_gate import accuracy_by_category, combined_choices, train_gate
from models.tinytrain import batch_tensors

CATEGORIES: tuple[str, ...] = tuple(t.name for t in tt.TASKS)
"""The 8 categories: the task families of :mod:`models.tinytask`, in task-token order."""

EDGE_DIR = Path(__file__).resolve().parent / "edge"
"""The committed expert set (``testbed model train-edge-llms models/edge``)."""

REPORT_FILE = "edge_llms.json"
HELDOUT_PER_CATEGORY = 100
MC_ITEMS = 800
EVAL_SEED = 11
THREADS = 1
MAX_NEW_TOKENS = tt.MAX_LEN + 1


def edge_llms_dir() -> Path:
    """The committed, pre-trained expert set (and gate) of the built-in name ``edge``."""
    return EDGE_DIR


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: architecture, training mixture and schedule.

    The mixture puts ``focus_mass`` of the training examples on the ``focus`` families (evenly)
    and spreads the rest evenly over the other families; no focus means uniform.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    focus: tuple[str, ...] = ()
    focus_mass: float = 0.96
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50

    def mixture(self) -> list[float]:
        """Sampling weight of each category (sums to 1)."""
        if not self.focus:
            return [1.0 / len(CATEGORIES)] * len(CATEGORIES)
        unknown = sorted(set(self.focus) - set(CATEGORIES))
        if unknown:
            raise ModelError(f"expert {self.name}", f"unknown task families {unknown}")
        rest = len(CATEGORIES) - len(self.focus)
        return [
            self.focus_mass / len(self.focus) if c in self.focus else (1.0 - self.focus_mass) / rest
            for c in CATEGORIES
        ]

    def config(self) -> DenseLMConfig:
        """The :class:`DenseLMConfig` (MLP 4x hidden, positions up to the task's longest)."""
        return DenseLMConfig(
            vocab_size=tt.VOCAB_SIZE,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=4 * self.hidden_size,
            max_seq_len=tt.MAX_SEQ_LEN,
        )


SPECS: tuple[ExpertSpec, ...] = (
    ExpertSpec("seq-m", 64, 2, 4, focus=("copy", "reverse", "cipher_b"), steps=1500),
    ExpertSpec("arith-m", 48, 2, 4, focus=("add5", "mul3", "square"), steps=1500),
    ExpertSpec("cipher-l", 96, 3, 4, focus=("cipher_a", "cipher_c", "cipher_b"), steps=1000),
    ExpertSpec("general-s", 32, 2, 2, steps=1500),
    ExpertSpec("mixed-m", 56, 2, 4, focus=("copy", "add5", "cipher_c"), steps=1500),
    ExpertSpec("wide-l", 96, 2, 4, focus=("reverse", "mul3", "cipher_a"), steps=1000),
)
"""The expert catalogue; ``K`` experts are its first ``K`` entries."""


def sample_batch(rng: random.Random, weights: Sequence[float], n: int) -> list[tt.TinyExample]:
    """``n`` training-split examples, task drawn with ``weights`` (held-out inputs rejected)."""
    tasks = list(range(len(tt.TASKS)))
    out: list[tt.TinyExample] = []
    while len(out) < n:
        t = rng.choices(tasks, weights=weights)[0]
        digits = [rng.randrange(tt.N_DIGITS) for _ in range(rng.randint(tt.MIN_LEN, tt.MAX_LEN))]
        if not tt.is_heldout(t, digits):
            out.append(tt.make_example(t, digits))
    return out


def lm_loss(model: DenseLM, examples: Sequence[tt.TinyExample]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (prompt and padding not scored)."""
    ids, _, labels = batch_tensors(examples)
    logits = model(ids)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def train_expert(
    spec: ExpertSpec,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    threads: int = THREADS,
) -> DenseLM:
    """Train one expert deterministically (torch seed and data stream from ``seed`` and name)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed * 1_000_003 + sum(spec.name.encode()))
        model = DenseLM(spec.config())
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98)
        )

        def lr_factor(s: int) -> float:
            warm = min(1.0, (s + 1) / spec.warmup_steps)
            return warm * 0.5 * (1 + math.cos(math.pi * s / spec.steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        rng = random.Random(f"edge:{seed}:{spec.name}")
        weights = spec.mixture()
        for s in range(spec.steps):
            loss = lm_loss(model, sample_batch(rng, weights, spec.batch_size))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if log is not None and (s % 200 == 0 or s == spec.steps - 1):
                log(f"  {spec.name} step {s} loss {float(loss.detach()):.4f}")
    finally:
        torch.set_num_threads(prev)
    return model.eval()


def heldout_examples(n_per_category: int, seed: int = EVAL_SEED) -> list[tt.TinyExample]:
    """The first ``n_per_category`` held-out examples of each category (deterministic)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    out: list[tt.TinyExample] = []
    for ex in tt.generate("heldout", 40 * n_per_category * len(CATEGORIES), seed=seed):
        if counts[ex.task] < n_per_category:
            counts[ex.task] += 1
            out.append(ex)
    if min(counts.values()) < n_per_category:
        raise ModelError("heldout", f"too few held-out examples for {n_per_category}")
    return out


def exact_match(model: DenseLM, examples: Sequence[tt.TinyExample]) -> dict[str, float]:
    """Per-category exact match of greedy generation (categories present in ``examples``)."""
    hits: dict[str, list[int]] = {}
    for ex in examples:
        got = model.generate(ex.prompt, MAX_NEW_TOKENS, tt.EOS_ID)
        hits.setdefault(ex.task, []).append(int(tuple(got) == ex.target))
    return {c: sum(h) / len(h) for c, h in hits.items()}


def mc_category(item: Mapping[str, Any]) -> str:
    """The category (task family) of a :func:`models.tinytask.make_mc_items` item."""
    return CATEGORIES[int(item["context_ids"][1]) - tt.TASK_BASE_ID]


def mc_logprobs(model: DenseLM, items: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Per item, the model's log-probability of each option (``option_logprobs``)."""
    return [model.option_logprobs(it["context_ids"], it["choices_ids"]) for it in items]


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def evaluate_experts(
    models: Sequence[DenseLM], heldout: Sequence[tt.TinyExample], items: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, float]], list[list[list[float]]]]:
    """Per expert, held-out exact match per category (and ``"mean"``); and the MC log-probs."""
    exact: list[dict[str, float]] = []
    lps: list[list[list[float]]] = []
    for m in models:
        acc = exact_match(m, heldout)
        acc = {c: acc[c] for c in CATEGORIES}
        acc["mean"] = sum(acc.values()) / len(CATEGORIES)
        exact.append(acc)
        lps.append(mc_logprobs(m, items))
    return exact, lps


def mc_report(
    names: Sequence[str],
    gate_w: torch.Tensor,
    lps: Sequence[Sequence[Sequence[float]]],
    items: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """MC accuracy per category: each expert's, and the gate-combined all-K, top-1, top-2."""
    cats = [mc_category(it) for it in items]
    labels = [int(it["label"]) for it in items]

    def ordered(acc: dict[str, float]) -> dict[str, float]:
        return {c: acc[c] for c in (*CATEGORIES, "mean")}

    experts = {
        n: ordered(accuracy_by_category(cats, [_argmax(x) for x in lps[k]], labels))
        for k, n in enumerate(names)
    }
    combined = {
        key: ordered(accuracy_by_category(cats, combined_choices(gate_w, lps, m), labels))
        for key, m in (("all", None), ("top1", 1), ("top2", 2))
    }
    mean_w = gate_w.mean(0).tolist()
    return {"experts": experts, "gate": combined, "gate_mean_weight": dict(zip(names, mean_w))}


def best_everywhere(acc: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The experts that are best or tied best on every category (``acc[name][category]``)."""
    return [
        n
        for n, a in acc.items()
        if all(a[c] >= max(b[c] for b in acc.values()) for c in CATEGORIES)
    ]


def check_heterogeneous(report: Mapping[str, Any]) -> None:
    """Raise :class:`ModelError` if one expert is best (or tied) on every category (exact)."""
    exact = {e["name"]: e["exact"] for e in report["experts"]}
    best = best_everywhere(exact)
    if best:
        raise ModelError("edge_llms", f"{best} best or tied best on every category")


def format_table(report: Mapping[str, Any]) -> str:
    """Per-category accuracy table: exact match and MC of each expert, gate-combined MC."""
    cols = [*CATEGORIES, "mean"]
    head = f"{'':22s}" + "".join(f"{c[:8]:>9s}" for c in cols)
    lines = ["held-out exact match (greedy generation)", head]
    for e in report["experts"]:
        lines.append(f"{e['name']:22s}" + "".join(f"{e['exact'][c]:9.3f}" for c in cols))
    lines += ["multiple-choice accuracy (option scoring)", head]
    mc = report["mc"]
    rows = [(n, a) for n, a in mc["experts"].items()]
    rows += [(f"gate {k}", a) for k, a in mc["gate"].items()]
    for n, a in rows:
        lines.append(f"{n:22s}" + "".join(f"{a[c]:9.3f}" for c in cols))
    return "\n".join(lines)


def train_edge_llms(
    out: Path | str, k: int = 5, seed: int = 0, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train ``k`` experts (``SPECS[:k]``) and the gate into ``out``; write the report.

    Returns the report written to ``out/edge_llms.json``; raises :class:`ModelError` if one
    expert is best or tied best on every category.
    """
    if not 4 <= k <= len(SPECS):
        raise ModelError("k", f"must be in 4..{len(SPECS)}, got {k}")
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # evaluation too: the report is a function of the seed
    try:
        return _train_and_report(Path(out), k, seed, log or (lambda s: None))
    finally:
        torch.set_num_threads(prev)


def _train_and_report(out: Path, k: int, seed: int, say: Callable[[str], None]) -> dict[str, Any]:
    heldout = heldout_examples(HELDOUT_PER_CATEGORY)
    items = tt.make_mc_items(MC_ITEMS, seed=EVAL_SEED)
    t_all = time.perf_counter()
    experts: list[dict[str, Any]] = []
    for spec in SPECS[:k]:
        t0 = time.perf_counter()
        model = train_expert(spec, seed, say)
        train_s = time.perf_counter() - t0
        exact, _ = evaluate_experts([model], heldout, [])
        entry = {"name": spec.name, "params": model.num_params(), "spec": asdict(spec)}
        entry.update(mixture=dict(zip(CATEGORIES, spec.mixture())), exact=exact[0])
        save_dense_lm(model, out / spec.name, dict(entry, seed=seed))
        say(f"{spec.name}: {entry['params']} params, {train_s:.0f}s, exact {exact[0]['mean']:.3f}")
        experts.append(dict(entry, train_s=round(train_s, 1)))
    folders = [out / e["name"] for e in experts]
    gate = train_gate(folders, out, seed=seed)
    models = [load_dense_lm(f) for f in folders]
    lps = [mc_logprobs(m, items) for m in models]
    gate_w = gate.weights([it["context_ids"] for it in items])
    report = {
        "format": "moe-edge-edge-llms/1",
        "seed": seed,
        "categories": list(CATEGORIES),
        "eval": {"heldout_per_category": HELDOUT_PER_CATEGORY, "heldout_seed": EVAL_SEED},
        "mc_eval": {"items": MC_ITEMS, "seed": EVAL_SEED, "function": "tinytask.make_mc_items"},
        "experts": experts,
        "mc": mc_report([e["name"] for e in experts], gate_w, lps, items),
        "wall_s": round(time.perf_counter() - t_all, 1),
        "torch": torch.__version__,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    try:
        check_heterogeneous(report)
    except ModelError:
        say(format_table(report))
        raise
    return report


def read_report(folder: Path | str | None = None) -> dict[str, Any]:
    """The ``edge_llms.json`` of ``folder`` (default: the committed set)."""
    path = Path(folder if folder is not None else EDGE_DIR) / REPORT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(str(path), f"cannot read: {e}") from e
