"""Expert kernels side by side: output error vs a float64 reference, weight bytes, latency.

Builds one random SwiGLU expert shard of the given size, loads it with every kernel variant of
:mod:`models.kernels` (CPU: torch fp32, the quantized kernels the device picks for int8 and
int4 and the original ones they replace, onnxruntime fp32 where it is installed; with a GPU
also torch fp32, bf16 and the CUDA int8/int4 kernels) and prints, per variant, the relative
RMS error of the output against float64 (at the largest row count), the weight bytes held and,
per row count, the median latency and its ratio to the fp32 variant of the same device (on
CUDA also to bf16). On CUDA the variants replay a CUDA graph per call of up to 128 rows, as
the agent does (``launch``); the ``eager`` ones launch each op. The variants are timed in
turns within each repetition, so that a busy host slows them alike. On CUDA it also prints
the time that reading the bf16 expert's weights takes at the GPU's memory bandwidth
(``--bandwidth-gbs``, else measured by a device-to-device copy) and bf16's ratio to it.

Needs torch and safetensors only (onnxruntime optional); runs from a copy of the repository:

    python bench/model_expert_kernels.py --hidden 4096 --inter 14336 --rows 1,8,128

Usage: .venv/bin/python bench/model_expert_kernels.py [--hidden 1024] [--inter 3584]
       [--rows 1,8,128] [--reps 30] [--threads 2] [--stat median|min] [--bandwidth-gbs GB/s]
       [--no-cpu] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.kernels import UNAVAILABLE, load_expert, output_error, reference_expert


def variants(threads: int, cpu: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, :func:`load_expert` keywords) of every variant this machine runs."""
    out: list[tuple[str, dict[str, Any]]] = []
    if cpu:
        out += [
            ("cpu fp32", {}),
            ("cpu int8", {"quant": "int8"}),
            ("cpu int4", {"quant": "int4"}),
            ("cpu int8 (old)", {"quant": "int8", "kernel": "int8-linear"}),
            ("cpu int4 (old)", {"quant": "int4", "kernel": "int4-dequant"}),
        ]
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
            out.append(("cpu onnx fp32", {"runtime": "onnx", "threads": threads}))
    if torch.cuda.is_available():
        out += [
            ("cuda fp32", {"device": "cuda", "dtype": "float32"}),
            ("cuda bf16", {"device": "cuda", "dtype": "bfloat16"}),
            ("cuda int8", {"device": "cuda", "quant": "int8"}),
            ("cuda int4", {"device": "cuda", "quant": "int4"}),
            ("cuda int8 (old)", {"device": "cuda", "quant": "int8", "kernel": "int8-linear"}),
            ("cuda bf16 eager", {"device": "cuda", "dtype": "bfloat16", "cuda_graphs": False}),
            ("cuda int8 eager", {"device": "cuda", "quant": "int8", "cuda_graphs": False}),
            ("cuda int4 eager", {"device": "cuda", "quant": "int4", "cuda_graphs": False}),
        ]
    return out


def copy_bandwidth_gbs() -> float:
    """The GPU's memory bandwidth, GB/s: bytes read + written by a 1 GiB device-to-device copy
    over its time (median of 20)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2**30 / statistics.median(times) / 1e9


def time_variants(
    kernels: dict[str, Any], inputs: dict[str, torch.Tensor], reps: int, stat: str = "median"
) -> dict[str, float]:
    """Median (or ``stat="min"``: least) ms of one call per variant, the variants timed in
    turns; on CUDA each sample is
    10 calls back to back between synchronisations (a decode step's launch overhead stays
    in, the host-device round trip does not)."""
    times: dict[str, list[float]] = {n: [] for n in kernels}
    for n, k in kernels.items():  # warm-up (on CUDA long enough for the clocks to rise)
        for _ in range(50 if inputs[n].is_cuda else 2):
            k(inputs[n])
    for _ in range(reps):
        for n, k in kernels.items():
            cuda = inputs[n].is_cuda
            inner = 10 if cuda else 1
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(inner):
                k(inputs[n])
            if cuda:
                torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) / inner)
    pick = min if stat == "min" else statistics.median
    return {n: 1e3 * pick(t) for n, t in times.items()}


def run(a: argparse.Namespace, rows_list: list[int]) -> dict[str, Any]:
    """Load every variant, time it at each row count; the results as one dict."""
    g = torch.Generator().manual_seed(0)
    w = {
        "w1": torch.randn(a.inter, a.hidden, generator=g) * a.hidden**-0.5,
        "w2": torch.randn(a.hidden, a.inter, generator=g) * a.inter**-0.5,
        "w3": torch.randn(a.inter, a.hidden, generator=g) * a.hidden**-0.5,
    }
    xs = {r: torch.randn(r, a.hidden, generator=g) for r in rows_list}
    res: dict[str, Any] = {"hidden": a.hidden, "inter": a.inter, "threads": a.threads}
    res["stat"] = a.stat
    with tempfile.TemporaryDirectory() as d:
        shard = Path(d) / "L0.E0.safetensors"
        save_file(w, str(shard), metadata={"uid": "L0.E0"})
        kernels = {n: load_expert(shard, **kw) for n, kw in variants(a.threads, not a.no_cpu)}
    dev = {n: ("cuda" if kw.get("device") == "cuda" else "cpu") for n, kw in variants(0, True)}
    ref = reference_expert(w["w1"], w["w2"], w["w3"], xs[max(rows_list)])
    table: dict[str, dict[str, Any]] = {}
    for n, k in kernels.items():
        y = k(xs[max(rows_list)].to(dev[n]))
        table[n] = {
            "kernel": getattr(k, "kernel", None),
            "launch": getattr(k, "launch", None),
            "rel_rms_error": output_error(ref, y.cpu())["rel_rms"],
            "weight_bytes": getattr(k, "weight_bytes", None),
            "ms": {},
        }
    for r in rows_list:
        ms = time_variants(kernels, {n: xs[r].to(dev[n]) for n in kernels}, a.reps, a.stat)
        for n, t in ms.items():
            table[n]["ms"][r] = t
    res["results"] = table
    res["unavailable"] = {d: dict(w) for d, w in UNAVAILABLE.items() if w}
    if torch.cuda.is_available():
        bw = a.bandwidth_gbs or copy_bandwidth_gbs()
        bf16_bytes = 3 * a.hidden * a.inter * 2
        res["gpu"] = {
            "name": torch.cuda.get_device_name(),
            "bandwidth_gbs": bw,
            "bandwidth_from": "argument" if a.bandwidth_gbs else "device-to-device copy",
            "bf16_weight_read_ms": bf16_bytes / (bw * 1e9) * 1e3,
        }
    return res


def ratio(table: dict[str, Any], name: str, base: str, r: int) -> str:
    """``name``'s time over ``base``'s at ``r`` rows, as ``0.42x`` (``-`` without ``base``)."""
    if base not in table:
        return "-"
    return f"{table[name]['ms'][r] / table[base]['ms'][r]:.2f}x"


def print_table(res: dict[str, Any], rows_list: list[int]) -> None:
    """The human-readable table of :func:`run`'s results."""
    t = res["results"]
    print(
        f"expert {res['hidden']}x{res['inter']}, {res['threads']} CPU threads, torch "
        f"{torch.__version__}; ms = {res['stat']} per call; ratios to fp32 (and bf16) of the device"
    )
    head = f"{'variant':16} {'kernel':17} {'launch':10} {'rel_rms':>8} {'MiB':>8}"
    for r in rows_list:
        head += f" | {f'{r} row ms':>11} {'/fp32':>6} {'/bf16':>6}"
    print(head)
    for n, v in t.items():
        dev = n.split()[0]
        wb = "-" if v["weight_bytes"] is None else f"{v['weight_bytes'] / 2**20:.2f}"
        line = f"{n:16} {v['kernel']!s:17} {v.get('launch')!s:10} {v['rel_rms_error']:8.2e} {wb:>8}"
        for r in rows_list:
            bf = ratio(t, n, f"{dev} bf16", r)
            line += f" | {v['ms'][r]:11.3f} {ratio(t, n, f'{dev} fp32', r):>6} {bf:>6}"
        print(line)
    for d, why in res["unavailable"].items():
        for n, w in why.items():
            print(f"{d}: kernel {n} left out (fallback used): {w}")
    gpu = res.get("gpu")
    if gpu:
        bound = gpu["bf16_weight_read_ms"]
        bf = t["cuda bf16"]["ms"][rows_list[0]]
        print(
            f"{gpu['name']}: {gpu['bandwidth_gbs']:.0f} GB/s ({gpu['bandwidth_from']}); "
            f"reading the bf16 weights takes {bound:.4f} ms; bf16 at {rows_list[0]} row(s): "
            f"{bf:.4f} ms = {bf / bound:.2f}x that bound"
        )


def main() -> None:
    """Parse the arguments, run, print (or ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--rows", default="1,8,128", help="comma-separated row counts")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--stat", choices=("median", "min"), default="median", help="min: for a busy host"
    )
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU variants")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        rows_list = [int(r) for r in a.rows.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rows: not a comma-separated list of integers: {a.rows!r}")
    if not rows_list or min(rows_list) < 1:
        ap.error("--rows: give row counts >= 1")
    torch.set_num_threads(a.threads)
    res = run(a, rows_list)
    if a.json:
        print(json.dumps(res))
    else:
        print_table(res, rows_list)


if __name__ == "__main__":
    main()
