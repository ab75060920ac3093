"""Start, find and stop device agents through a device's runner (tests, benches, demos).

Agents are started with ``runner.spawn`` (for a testbed device: its SSH runner, the same path
provisioning uses for Jetsons), bind ``tcp://<device host>:*`` and report the port they got in
a ready file that is read back through the runner. They are stopped by PID only (SIGTERM,
then SIGKILL after a grace period), after checking that the PID still is the agent we started.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TestbedError
from .runner import Runner


@dataclass
class AgentProcess:
    """A started agent: where it listens and how to stop it."""

    device: str
    runner: Runner
    pid: int
    endpoint: str
    pub_endpoint: str | None
    workdir: str
    log_path: str
    ready_path: str


def start_agent(
    runner: Runner,
    *,
    device: str,
    host: str,
    workdir: str,
    python: str | None = None,
    pub: bool = True,
    threads: int | None = 1,
    tag: str = "agent",
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 60.0,
    status_period_s: float = 0.5,
) -> AgentProcess:
    """Spawn ``python -m device_agent serve`` via ``runner`` and wait for its ready file.

    Parameters
    ----------
    runner
        The device's runner (SSH for a testbed device, or a LocalRunner).
    device, host
        Device name (labels) and the address the agent binds (port chosen by the agent).
    workdir
        The agent's workdir; log, pid and ready files go there too.
    python
        Interpreter on the device (default: this one; namespace devices share the filesystem).
    tag
        Distinguishes the files of several agents sharing a workdir.

    Raises
    ------
    TestbedError
        If the agent does not write its ready file in time (its log tail is included).
    """
    log_path, pid_path = f"{workdir}/{tag}.log", f"{workdir}/{tag}.pid"
    ready = f"{workdir}/{tag}.ready.json"
    runner.run(["rm", "-f", ready], timeout_s=30)
    argv = serve_argv(
        python or sys.executable,
        host,
        workdir,
        ready,
        pub=pub,
        threads=threads,
        status_period_s=status_period_s,
    )
    pid = runner.spawn([*argv, *extra_args], log_path=log_path, pid_path=pid_path)
    started = AgentProcess(device, runner, pid, "", None, workdir, log_path, ready)
    info = _wait_ready(started, time.monotonic() + ready_timeout_s)
    started.endpoint, started.pub_endpoint = info["endpoint"], info.get("pub_endpoint")
    return started


def serve_argv(
    python: str,
    host: str,
    workdir: str,
    ready: str,
    *,
    pub: bool = True,
    threads: int | None = 1,
    status_period_s: float = 0.5,
) -> list[str]:
    """How an agent is started: ``python -m device_agent serve`` on ``host`` (any port). Pure."""
    argv = [
        python,
        "-m",
        "device_agent",
        "serve",
        "--bind",
        f"tcp://{host}:*",
        "--workdir",
        workdir,
        "--ready-file",
        ready,
        "--status-period-s",
        str(status_period_s),
    ]
    if pub:
        argv += ["--pub", f"tcp://{host}:*"]
    if threads:
        argv += ["--threads", str(threads)]
    return argv


def _wait_ready(a: AgentProcess, deadline: float) -> dict[str, Any]:
    """The ready file of the agent just spawned (its PID in it), read back through its runner;
    stops the agent and raises TestbedError if it exits or is not ready by ``deadline``."""
    delay_s = 0.1
    while True:
        res = a.runner.run(["cat", a.ready_path], timeout_s=30, check=False)
        if res.ok and res.stdout.strip():
            info = json.loads(res.stdout)
            if int(info["pid"]) == a.pid:
                return info
        alive = a.runner.run(["kill", "-0", str(a.pid)], timeout_s=30, check=False).ok
        if not alive or time.monotonic() > deadline:
            tail = a.runner.run(["tail", "-n", "20", a.log_path], timeout_s=30, check=False).stdout
            if alive:
                stop_agent(a)
            raise TestbedError(
                f"{a.device}: agent (pid {a.pid}) {'exited' if not alive else 'not ready'} "
                f"before writing {a.ready_path}; log tail:\n{tail}"
            )
        time.sleep(delay_s)
        delay_s = min(0.5, delay_s * 1.5)


def _is_our_agent(a: AgentProcess) -> bool:
    res = a.runner.run(["cat", f"/proc/{a.pid}/cmdline"], timeout_s=30, check=False)
    return res.ok and "device_agent" in res.stdout and a.ready_path in res.stdout


def stop_agent(a: AgentProcess, grace_s: float = 5.0) -> str:
    """Stop ``a`` by PID: SIGTERM, then SIGKILL after ``grace_s``.

    Returns ``"gone"`` (was not running), ``"terminated"`` or ``"killed"``.
    """
    if not _is_our_agent(a):
        return "gone"
    a.runner.run(["kill", "-TERM", str(a.pid)], timeout_s=30, check=False)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _is_our_agent(a):
            return "terminated"
        time.sleep(0.1)
    a.runner.run(["kill", "-KILL", str(a.pid)], timeout_s=30, check=False)
    return "killed"


def kill_agent(a: AgentProcess) -> None:
    """SIGKILL ``a`` at once (failure experiments)."""
    if _is_our_agent(a):
        a.runner.run(["kill", "-KILL", str(a.pid)], timeout_s=30, check=False)


def push_experts(
    runner: Runner, workdir: str, manifest: Any, uids: Iterable[str], subdir: str = "experts"
) -> dict[str, str]:
    """Copy the shards of ``uids`` from a split (``models.manifest.Manifest``) into
    ``workdir/subdir``; returns uid -> path relative to the workdir (what ``load`` takes)."""
    out: dict[str, str] = {}
    for u in uids:
        src = Path(manifest.expert_path(u))
        rel = f"{subdir}/{src.name}"
        runner.put(src, f"{workdir}/{rel}")
        out[u] = rel
    return out


def describe(a: AgentProcess) -> str:
    """One line naming the agent (for logs)."""
    return f"{a.device} pid {a.pid} {a.endpoint} (log {shlex.quote(a.log_path)})"
