"""A run on the widened tiny model (`tiny-4096`) with bf16 on the wire: every expert call moves
8 KiB per token each way (a Mixtral-8x7B-sized hidden state), the agents take bf16 rows, and the
answers are the trained tiny model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.results import schema as R
from tests.conftest import needs_testbed, run_cli

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "wide"
seed = 1
[model]
path = "tiny-4096"
wire_dtype = "{wire}"
[links]
rate = "100mbit"
[workload]
task = "tiny"
requests = 3
[run]
devices = 2
bs_threads = 1
[sweep]
"policy.name" = ["topk"]
"""


def test_widened_run_moves_8_kib_per_token_each_way(shared_testbed, tmp_path: Path) -> None:
    env, inv_path = shared_testbed
    (tmp_path / "w.toml").write_text(RECIPE.format(wire="bf16"))
    res = run_cli(
        "run",
        str(tmp_path / "w.toml"),
        "--inventory",
        str(inv_path),
        "--out",
        str(tmp_path / "results"),
        "--format",
        "json",
        env=env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr
    run_dir = Path(json.loads(res.stdout)["run_dir"])

    man = json.loads((run_dir / R.MANIFEST).read_text())
    model = man["model"]
    assert model["wire_dtype"] == "bfloat16" and model["expert_hidden_size"] == 4096
    assert model["hidden_size"] == 64 and model["lift"]["hidden_size"] == 4096

    calls = R.read_csv(run_dir / R.CALLS)
    assert calls and all(c["status"] == "ok" for c in calls)
    for c in calls:  # 4096 x 2 bytes per token, both directions
        n = int(c["tokens"])
        assert int(c["bytes_down"]) == 8192 * n and int(c["bytes_up"]) == 8192 * n, c
    assert {int(c["tokens"]) for c in calls} != {1}  # prefill calls carry several tokens
    reqs = R.read_csv(run_dir / R.REQUESTS)
    assert len(reqs) == 3 and all(int(r["correct"]) == 1 for r in reqs)
    summ = R.read_csv(run_dir / R.SUMMARY)
    assert float(summ[0]["accuracy"]) == 1.0
    # the profiling requests were bf16 4096-wide too (the agents refuse another dtype or width)
    assert R.read_csv(run_dir / R.PROFILE)
