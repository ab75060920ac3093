"""The device-side wait for an agent's ready file (``start_agent``'s one remote command), run
by ``sh`` here as on a device: the file printed once it appears, exit 3 at once for a process
that is gone (a zombie included: a container's init may never reap the detached agent), exit 4
after its seconds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from testbed.lab.provision.agents import _WAIT_READY


def _wait(ready: Path, pid: int, seconds: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    res = subprocess.run(
        ["sh", "-c", _WAIT_READY, "wait-ready", str(ready), str(pid), f"{seconds:.1f}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return res.returncode, res.stdout, time.monotonic() - t0


def test_ready_file_printed_once_it_appears(tmp_path: Path) -> None:
    ready = tmp_path / "agent.ready.json"
    agent = subprocess.Popen(["sh", "-c", f"sleep 0.5; echo '{{\"pid\": 1}}' > {ready}; sleep 30"])
    try:
        rc, out, took = _wait(ready, agent.pid, 10)
    finally:
        agent.kill()
        agent.wait()
    assert rc == 0 and out.strip() == '{"pid": 1}' and 0.4 < took < 5


def test_a_process_gone_or_a_zombie_ends_the_wait_at_once(tmp_path: Path) -> None:
    ready = tmp_path / "agent.ready.json"
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped
    rc, _, took = _wait(ready, gone.pid, 10)
    assert rc == 3 and took < 5
    zombie = subprocess.Popen(["true"])
    time.sleep(0.3)  # exited, not reaped: kill -0 still succeeds on it
    try:
        rc, _, took = _wait(ready, zombie.pid, 10)
    finally:
        zombie.wait()
    assert rc == 3 and took < 5


def test_no_ready_file_within_the_seconds(tmp_path: Path) -> None:
    agent = subprocess.Popen(["sleep", "30"])
    try:
        rc, out, took = _wait(tmp_path / "agent.ready.json", agent.pid, 1)
    finally:
        agent.kill()
        agent.wait()
    assert rc == 4 and out == "" and 0.9 < took < 5
