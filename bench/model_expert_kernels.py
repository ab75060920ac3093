"""Expert kernels side by side: output error vs a float64 reference, weight bytes, latency.

Builds one random SwiGLU expert shard of the given size, loads it with every kernel variant of
:mod:`models.kernels` (torch fp32, torch bf16 where supported, torch int8, torch int4,
onnxruntime fp32; CUDA variants when a GPU is present) and prints, per variant, the relative RMS
and max-abs error of the output against float64, the weight bytes held, and the median latency
for a batch of rows.

Usage: .venv/bin/python bench/model_expert_kernels.py [--hidden 1024] [--inter 3584] [--rows 16]
       [--reps 20] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.kernels import load_expert, output_error, reference_expert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    std = a.hidden**-0.5
    w = {
        "w1": torch.randn(a.inter, a.hidden, generator=g) * std,
        "w2": torch.randn(a.hidden, a.inter, generator=g) * a.inter**-0.5,
        "w3": torch.randn(a.inter, a.hidden, generator=g) * std,
    }
    x = torch.randn(a.rows, a.hidden, generator=g)
    ref = reference_expert(w["w1"], w["w2"], w["w3"], x)
    variants: list[tuple[str, dict]] = [
        ("torch-fp32-cpu", {}),
        ("torch-int8-cpu", {"quant": "int8"}),
        ("torch-int4-cpu", {"quant": "int4"}),
        ("onnx-fp32-cpu", {"runtime": "onnx", "threads": a.threads}),
    ]
    if torch.cuda.is_available():
        variants += [
            ("torch-fp32-cuda", {"device": "cuda", "dtype": "float32"}),
            ("torch-bf16-cuda", {"device": "cuda", "dtype": "bfloat16"}),
            ("torch-int8-cuda", {"device": "cuda", "quant": "int8"}),
            ("torch-int4-cuda", {"device": "cuda", "quant": "int4"}),
        ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        shard = Path(d) / "L0.E0.safetensors"
        save_file(w, str(shard), metadata={"uid": "L0.E0"})
        for name, kw in variants:
            k = load_expert(shard, **kw)
            xin = x.cuda() if kw.get("device") == "cuda" else x
            k(xin)  # warm-up
            times = []
            for _ in range(a.reps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = k(xin)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            err = output_error(ref, y.cpu())
            rows.append(
                {
                    "kernel": name,
                    "rel_rms_error": err["rel_rms"],
                    "max_abs_error": err["max_abs"],
                    "weight_bytes": getattr(k, "weight_bytes", None),
                    "median_ms": 1e3 * statistics.median(times),
                }
            )
    if a.json:
        print(json.dumps({"hidden": a.hidden, "inter": a.inter, "rows": a.rows, "results": rows}))
        return
    print(f"expert {a.hidden}x{a.inter}, {a.rows} rows, {a.threads} CPU threads")
    print(f"{'kernel':18} {'rel_rms':>10} {'max_abs':>10} {'weight MiB':>11} {'median ms':>10}")
    for r in rows:
        wb = "-" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 2**20:.2f}"
        print(
            f"{r['kernel']:18} {r['rel_rms_error']:10.2e} {r['max_abs_error']:10.2e} {wb:>11} "
            f"{r['median_ms']:10.3f}"
        )


if __name__ == "__main__":
    main()
