"""The BS part's time per token on each device and dtype (``run.bs_device``/``run.bs_dtype``).

Loads the BS part of a model (embeddings, attention, norms, router, the lift of a widened
split, the LM head) and times one decode step through all its layers with the experts replaced
by a stand-in that answers zeros at once (a bench of the BS, not of the experts): a prompt of
``--context`` random tokens is prefilled (untimed), then ``--steps`` decode steps are timed one
by one (each ends when its next tokens are on the host, as in a run), ``--reps`` times after one
untimed warm-up; printed: the median ms per token, its p10-p90, and the ratio to cpu/float32
measured in the same run.

Rows: cpu/float32, cpu/bfloat16 and, with CUDA, cuda/float32 and cuda/bfloat16, each ``run``
(as a testbed run does it: at every MoE layer the device is synchronized and the rows copied to
the host for ZeroMQ, the replies copied back; on the CPU that is nothing) and, on CUDA, also
``on-device`` (the stand-in answers on the GPU: no host crossing, the BS part alone).

Models: ``--model DIR`` (a split folder, or an HF checkpoint split into a temp folder; default
the committed tiny model ``models/tiny``); ``--widen W`` widens it first, into a temp folder, as
``testbed model widen`` does (``tiny-4096``: its experts and rows on the wire 4096 wide, its
attention still the tiny model's 64); ``--mixtral-layers L`` instead builds a random BS of
Mixtral-8x7B's attention shape (hidden 4096, 32 heads, 8 KV heads, vocab 32000) with L layers,
for a BS of a real model's size (its weights random: timing only).

Imports only ``models.*`` (torch, numpy, safetensors, transformers): it runs from a copy of the
repository on a host without pyzmq or the namespace testbed.

Usage: python bench/bs_device.py [--model DIR] [--widen 4096] [--mixtral-layers 4]
       [--batch 1] [--context 16] [--steps 32] [--reps 5] [--threads N] [--wire fp32] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.backend import LayerResult, LayerWork
from models.runtime import BaseStationModel


class ZeroExperts:
    """The experts' stand-in: every expert answers zeros of its rows' shape, dtype and device."""

    def run_layer(self, work: LayerWork) -> LayerResult:
        """Zeros for every input."""
        return LayerResult({u: torch.zeros_like(x) for u, x in work.inputs.items()})


def prepare_split(a: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The split folder to bench (built under ``tmp`` when needed) and its description."""
    from models.split import split_checkpoint

    if a.mixtral_layers:
        from models.testing import make_random_checkpoint

        make_random_checkpoint(
            "mixtral",
            tmp / "ckpt",
            seed=0,
            hidden_size=4096,
            num_hidden_layers=a.mixtral_layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            intermediate_size=16,
            num_local_experts=8,
            max_position_embeddings=4096,
            initializer_range=0.02,
        )
        split_checkpoint(tmp / "ckpt", tmp / "split")
        return tmp / "split", f"random Mixtral-8x7B-shaped BS, {a.mixtral_layers} layers"
    src = Path(a.model)
    if (src / "manifest.json").is_file():
        split, what = src, str(src)
    else:
        split_checkpoint(src, tmp / "split")
        split, what = tmp / "split", f"{src} (split here)"
    if a.widen:
        from models.widen import widen_split

        widen_split(split, tmp / "wide", hidden=a.widen, seed=0)
        return tmp / "wide", f"{what} widened to {a.widen}"
    return split, what


def decode_times(bs: BaseStationModel, a: argparse.Namespace, seed: int) -> list[float]:
    """Seconds of each of ``a.steps`` decode steps after a prefill of ``a.context`` tokens."""
    from transformers import DynamicCache

    vocab = int(bs.model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (a.batch, a.context), generator=g)
    mask = torch.ones_like(ids)
    cache = DynamicCache(config=bs.model.config)
    logits, cache = bs.forward(ids, mask, past_key_values=cache, step=0, phase="prefill")
    tok = logits[:, -1].argmax(-1).cpu()
    out = []
    for s in range(a.steps):
        mask = torch.cat([mask, torch.ones((a.batch, 1), dtype=mask.dtype)], dim=1)
        t0 = time.perf_counter()
        logits, cache = bs.forward(
            tok.unsqueeze(1), mask, past_key_values=cache, step=s + 1, phase="decode"
        )
        tok = logits[:, -1].argmax(-1).cpu()  # the next tokens on the host: the step is done
        if bs.device.type == "cuda":
            torch.cuda.synchronize(bs.device)
        out.append(time.perf_counter() - t0)
    return out


def bench_one(split: Path, device: str, dtype: str, mode: str, a: argparse.Namespace) -> dict:
    """One row: the median (p10, p90) ms per decode step of the BS part on ``device``."""
    bs = BaseStationModel.from_split_dir(
        split,
        backend=ZeroExperts(),
        device=device,
        dtype=dtype,
        wire_dtype=a.wire,
        host_boundary=mode == "run",
    )
    decode_times(bs, a, seed=0)  # warm-up: allocator, kernels, cuBLAS handles
    times: list[float] = []
    for r in range(a.reps):
        times += decode_times(bs, a, seed=r + 1)
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    row = {
        "device": device,
        "dtype": dtype,
        "mode": mode,
        "ms_per_token": statistics.median(ms),
        "p10_ms": q[0],
        "p90_ms": q[-1],
        "steps": len(ms),
    }
    if device.startswith("cuda"):
        row["gpu"] = torch.cuda.get_device_name(torch.device(device))
    del bs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def plan(cuda: bool) -> list[tuple[str, str, str]]:
    """The (device, dtype, mode) rows, cpu/float32 first (every ratio's reference)."""
    rows = [("cpu", "float32", "run"), ("cpu", "bfloat16", "run")]
    if cuda:
        for dt in ("float32", "bfloat16"):
            rows += [("cuda", dt, "run"), ("cuda", dt, "on-device")]
    return rows


def main() -> None:
    """Parse the options, bench every row, print the table (or ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny"))
    ap.add_argument("--widen", type=int, default=0, help="widen the model's experts to W")
    ap.add_argument("--mixtral-layers", type=int, default=0, help="random Mixtral-size BS")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    ap.add_argument("--wire", default="float32", help="rows' dtype to the experts")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
    import transformers

    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bs-device-") as tmp:
        split, what = prepare_split(a, Path(tmp))
        rows = [bench_one(split, d, dt, m, a) for d, dt, m in plan(cuda)]
    ref = rows[0]["ms_per_token"]
    for r in rows:
        r["ratio_to_cpu_float32"] = r["ms_per_token"] / ref
    info: dict[str, Any] = {
        "model": what,
        "batch": a.batch,
        "context": a.context,
        "wire": a.wire,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "rows": rows,
    }
    if a.json:
        print(json.dumps(info, indent=1))
        return
    print(
        f"{what}: one decode step, batch {a.batch}, context {a.context}, wire {a.wire}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'device':8} {'dtype':9} {'mode':10} {'ms/token':>9} {'p10-p90':>15} {'x cpu/f32':>9}")
    for r in rows:
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        print(
            f"{r['device']:8} {r['dtype']:9} {r['mode']:10} {r['ms_per_token']:9.3f} "
            f"{spread:>15} {r['ratio_to_cpu_float32']:9.2f}"
            + (f"  {r['gpu']}" if "gpu" in r else "")
        )


if __name__ == "__main__":
    main()
