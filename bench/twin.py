"""Analytic-twin benchmark: wall time of ``testbed simulate`` on a recipe at 4 and at 1000
devices (issue 16, item 4: a 1000-device twin of ``recipes/wdmoe.toml`` within 60 s on 2 cores).

Each run is the real CLI in a fresh process (``python -m testbed simulate RECIPE --devices N``:
interpreter start, imports, the model, every trial and request, the CSVs), one after the other,
4 devices first. Printed per run: wall seconds, the twin's own time from its manifest
(``twin.wall_s``: the trials alone), the files' size, and each policy's median decision time
(its ``select``, measured by the twin); then the 1000/4 ratio of the wall times and whether the
1000-device run met the target.

Run: ``.venv/bin/python bench/twin.py [--recipe recipes/wdmoe.toml] [--devices 4 1000]
[--calibrate RUN_DIR] [--target-s 60] [--keep DIR] [--json out.json]``.
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

ROOT = Path(__file__).resolve().parent.parent


def run_twin(recipe: Path, devices: int, out: Path, calibrate: Path | None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "testbed",
        "simulate",
        str(recipe),
        "--devices",
        str(devices),
        "--out",
        str(out),
        "--format",
        "json",
    ]
    if calibrate is not None:
        cmd += ["--calibrate", str(calibrate)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(
            f"testbed simulate --devices {devices} failed ({res.returncode}): "
            f"{res.stderr.strip()[-2000:]}"
        )
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    man = json.loads((run_dir / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())
    return {
        "devices": devices,
        "wall_s": wall,
        "twin_s": man["twin"]["wall_s"],
        "requests": man.get("requests_done"),
        "trials": len(man.get("trials", [])),
        "bytes": size,
        "links_csv_bytes": (run_dir / "links.csv").stat().st_size,
        "decision_ms": {p: v["median"] for p, v in man["twin"]["decision_ms"].items()},
        "run_dir": str(run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "wdmoe.toml")
    ap.add_argument("--devices", type=int, nargs="+", default=[4, 1000])
    ap.add_argument("--calibrate", type=Path, default=None)
    ap.add_argument("--target-s", type=float, default=60.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the results folders here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        f"(1 min) before the runs; recipe {args.recipe}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="twin-bench-") as tmp:
        out = args.keep or Path(tmp)
        for n in args.devices:
            r = run_twin(args.recipe, n, out, args.calibrate)
            rows.append(r)
            dec = ", ".join(f"{p} {ms:.3f}" for p, ms in r["decision_ms"].items())
            print(
                f"{n:>6} devices: {r['wall_s']:6.1f} s wall ({r['twin_s']:.1f} s in the "
                f"trials), {r['trials']} trials, {r['requests']} requests, "
                f"{r['bytes'] / 2**20:.1f} MiB written ({r['links_csv_bytes'] / 2**20:.1f} in "
                f"links.csv); median decision ms: {dec}"
            )
    base, big = rows[0], rows[-1]
    ratio = big["wall_s"] / base["wall_s"]
    ok = big["wall_s"] <= args.target_s
    print(
        f"{big['devices']} / {base['devices']} devices: {ratio:.2f}x wall time; "
        f"{big['devices']} devices in {big['wall_s']:.1f} s: "
        f"{'meets' if ok else 'MISSES'} the {args.target_s:g} s target"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"runs": rows, "ratio": ratio, "target_s": args.target_s, "meets_target": ok},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
