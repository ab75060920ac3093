"""A trial's requests: the built-in tiny task's held-out examples or synthetic prompts, and the
answer key a synthetic request is scored against (the same model's single-process output)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .recipe import Trial


@dataclass(frozen=True)
class Request:
    """One request of a trial's workload."""

    index: int
    task: str
    prompt: tuple[int, ...]
    reference: tuple[int, ...] | None  # expected output tokens (None: computed later)
    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int


def make_workload(trial: Trial, manifest: Any, seed: int) -> list[Request]:
    """The requests of one trial repeat (deterministic in ``seed``)."""
    wl = trial.config["workload"]
    n = int(wl["requests"])
    if wl["task"] == "tiny":
        from models import tinytask as tt

        if (
            not (Path(manifest.bs_config_path).parent / "tiny_task.json").is_file()
            and not (Path(manifest.root) / "tiny_task.json").is_file()
        ):
            raise ConfigError(
                f"workload.task: 'tiny' needs the built-in tiny model, not "
                f'{manifest.root} (use task = "synthetic")'
            )
        exs = tt.generate("heldout", n, seed=seed)
        return [
            Request(
                i, e.task, tuple(e.prompt), tuple(e.target), len(e.target), tt.EOS_ID, tt.PAD_ID
            )
            for i, e in enumerate(exs)
        ]
    rng = random.Random(seed)
    vocab = int(manifest.dims.get("vocab_size", 0)) or 32000
    T, out = int(wl["prompt_tokens"]), int(wl["output_tokens"])
    return [
        Request(
            i, "synthetic", tuple(rng.randrange(1, vocab) for _ in range(T)), None, out, None, 0
        )
        for i in range(n)
    ]


class AnswerKey:
    """The expected output of a request: its own reference, else the single-process top-k
    output of the same model (the split folder ``split``, loaded at the first such request) with
    its BS part on the run's ``device`` in its ``dtype`` (``run.bs_device``/``run.bs_dtype``;
    its experts in-process compute as a device would), so that a synthetic request scores what
    distribution changed, not the BS's precision."""

    def __init__(self, split: Path, device: str = "cpu", dtype: str | None = None):
        self.split = split
        self.device = device
        self.dtype = dtype
        self.model: Any = None

    def __call__(self, req: Request) -> tuple[int, ...]:
        """The token ids ``req``'s output must equal to count as correct."""
        if req.reference is not None:
            return req.reference
        from models.runtime import BaseStationModel

        if self.model is None:
            self.model = BaseStationModel.from_split_dir(
                self.split, device=self.device, dtype=self.dtype
            )
        g = self.model.generate_greedy(
            [list(req.prompt)], req.max_new_tokens, req.eos_token_id, req.pad_token_id
        )
        return tuple(g.tokens[0])
