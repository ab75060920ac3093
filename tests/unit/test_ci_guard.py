"""The CI guard in tests/conftest.py: under TESTBED_REQUIRE_ALL=1 a skip for a reason CI's
machine should not have (no root, a missing tool) fails the run; a missing GPU or netem does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_testbed

ROOT = Path(__file__).resolve().parents[2]

SKIPS = """
import pytest

def test_gpu():
    pytest.skip("no NVIDIA GPU: NVML sees 0 devices")

def test_netem():
    pytest.skip("netem unavailable here (checked the refusal): Specified qdisc kind is unknown.")

@pytest.mark.skipif(True, reason="needs root: network namespaces, veth, tc and sshd")
def test_namespaces():
    pass
"""


def _pytest(tmp_path: Path, body: str, require: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_guarded.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "TESTBED_REQUIRE_ALL"}
    if require is not None:
        env["TESTBED_REQUIRE_ALL"] = require
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_guarded.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_testbed  # under the guard, a machine that cannot run them stops at the start
def test_namespace_skip_fails_the_ci_run(tmp_path):
    res = _pytest(tmp_path, SKIPS, "1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 test(s) skipped for a reason this machine should not have" in res.stdout
    assert "test_namespaces: needs root" in res.stdout
    assert "test_gpu" not in res.stdout.split("should not have:")[1]


@needs_testbed
def test_allowed_skips_pass_the_ci_run(tmp_path):
    body = SKIPS.split("@pytest.mark")[0]
    res = _pytest(tmp_path, body, "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 skipped" in res.stdout


def test_without_the_guard_skips_pass(tmp_path):
    res = _pytest(tmp_path, SKIPS, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 skipped" in res.stdout
