"""Peak memory of `testbed model split` on a ~1 GB random Mixtral checkpoint.

Creates the checkpoint with transformers in a temporary directory (several safetensors files;
in a separate process, so that this small parent does not inflate its children's peak RSS),
runs the split in a child process, reads that child's peak RSS (``os.wait4`` rusage
``ru_maxrss``) and prints it next to the bound the issue sets: BS-part bytes + 2 x the largest
tensor. Also prints the peak RSS of a child that only imports the splitter (interpreter
baseline).

Usage: .venv/bin/python bench/model_split_memory.py [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_peak_rss_bytes(code: str) -> tuple[int, float, int, str]:
    """Run ``python -c code`` in a child.

    Returns (peak RSS bytes, wall seconds, exit status, stdout).
    """
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_maxrss * 1024, time.perf_counter() - t0, p.returncode, out


def make_checkpoint(d: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from models.testing import random_model

    torch.set_num_threads(2)
    model = random_model(
        "mixtral",
        seed=0,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        initializer_range=0.02,
    )
    model.save_pretrained(str(d), safe_serialization=True, max_shard_size="200MB")
    del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    ap.add_argument("--make-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoint is not None:  # child mode: keeps torch out of the measuring parent
        make_checkpoint(args.make_checkpoint)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="split-mem-"))
    ckpt, out = work / "ckpt", work / "split"
    if not (ckpt / "config.json").is_file():
        # In a separate process: a child's ru_maxrss starts from its parent's RSS at fork/exec,
        # so the measuring parent must stay small (no torch, no model in memory).
        subprocess.run([sys.executable, __file__, "--make-checkpoint", str(ckpt)], check=True)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    base_rss, _, _, _ = child_peak_rss_bytes("import models.split")
    code = (
        "from models.split import split_checkpoint; "
        f"split_checkpoint({str(ckpt)!r}, {str(out)!r}); "
        "import re; print('VmHWM_kB', "
        "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    peak, wall_s, rc, child_out = child_peak_rss_bytes(code)
    hwm = (
        int(child_out.split("VmHWM_kB")[-1].split()[0]) * 1024
    )  # the child's own view, cross-check
    if rc != 0:
        sys.exit(f"split child failed with exit status {rc}")
    man = json.loads((out / "manifest.json").read_text())
    bs_bytes = man["bs"]["bytes"]
    largest = man["largest_tensor_bytes"]
    bound = bs_bytes + 2 * largest
    res = {
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_files": len(list(ckpt.glob("*.safetensors"))),
        "experts": len(man["experts"]),
        "bs_part_bytes": bs_bytes,
        "largest_tensor_bytes": largest,
        "bound_bytes": bound,
        "split_peak_rss_bytes": peak,
        "interpreter_baseline_rss_bytes": base_rss,
        "split_vmhwm_bytes": hwm,
        "peak_over_bound": round(peak / bound, 4),
        "split_wall_s": round(wall_s, 2),
    }
    if args.json:
        print(json.dumps(res))
    else:
        mib = 1024 * 1024
        print(
            f"checkpoint            {ckpt_bytes / mib:9.1f} MiB in "
            f"{res['checkpoint_files']} files, {res['experts']} experts"
        )
        print(f"BS part               {bs_bytes / mib:9.1f} MiB")
        print(f"largest tensor        {largest / mib:9.1f} MiB")
        print(f"bound BS + 2*largest  {bound / mib:9.1f} MiB")
        print(
            f"split peak RSS        {peak / mib:9.1f} MiB  (ratio to bound {peak / bound:.3f}; "
            f"bare interpreter+import {base_rss / mib:.1f} MiB)"
        )
        print(f"split wall time       {wall_s:9.2f} s")
    if args.keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if peak > bound:
        sys.exit(1)


if __name__ == "__main__":
    main()
