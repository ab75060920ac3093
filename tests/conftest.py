"""Shared fixtures: real local testbeds (namespaces, sshd, tc), each with a unique name and
removed by the fixture that made it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _why_no_testbed() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, veth, tc and sshd"
    for tool in ("ip", "tc", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (bash scripts/setup.sh installs it)"
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        return "sshd not installed (bash scripts/setup.sh installs openssh-server)"
    return None


needs_testbed = pytest.mark.skipif(_why_no_testbed() is not None, reason=_why_no_testbed() or "")

# Under TESTBED_REQUIRE_ALL=1 (set by .ci/run) a skip is a failure unless its reason names
# something this kind of machine lacks by nature: a GPU, or a kernel without netem. A CI run
# that quietly skipped the namespace tests (no root, a missing tool) must not pass.
ALLOWED_SKIP_REASONS = (
    "no NVIDIA GPU",  # tests/integration/test_energy_gpu.py
    "no CUDA device",  # CUDA kernels
    "netem unavailable here",  # the kernel's own "qdisc kind is unknown"
    "this host has tegrastats",
)
_skips: list[tuple[str, str]] = []


def _require_all() -> bool:
    return os.environ.get("TESTBED_REQUIRE_ALL") == "1"


def pytest_sessionstart(session):
    why = _why_no_testbed()
    if _require_all() and why is not None:
        pytest.exit(
            f"TESTBED_REQUIRE_ALL=1 but the namespace tests cannot run: {why}", returncode=1
        )


def pytest_runtest_setup(item):
    """Each test starts with one torch thread in this process, whatever a test module set at
    import or an earlier test's in-process command left (``model eval`` sets its ``--threads``,
    default 2); a test may still set its own. The models run in-process here are tiny: a second
    thread only waits at every op's barrier for a core that agents, sshd and subprocesses
    share. Measured on this 2-core host under load: the tiny model's 48-example eval took 0.14 s
    of CPU with one thread, 3.6 s with two."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _skips.append((report.nodeid, reason))


def disallowed_skips(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (node, why)
        for node, why in skips
        if not any(why.startswith(ok) for ok in ALLOWED_SKIP_REASONS)
    ]


def pytest_sessionfinish(session, exitstatus):
    bad = disallowed_skips(_skips) if _require_all() else []
    if bad:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        head = (
            f"TESTBED_REQUIRE_ALL=1: {len(bad)} test(s) skipped for a reason this machine "
            "should not have:"
        )
        lines = [head] + [f"  {node}: {why}" for node, why in bad]
        if tr:
            tr.ensure_newline()
        for ln in lines:
            (tr.write_line(ln) if tr else print(ln))
        session.exitstatus = 1


def unique_name(prefix: str = "t") -> str:
    return prefix + secrets.token_hex(3)[: 8 - len(prefix)]


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """Each test's testbeds keep their state in its own temp folder."""
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("TESTBED_STATE_DIR", str(d))
    return d


@pytest.fixture
def cli_testbed(state_dir, tmp_path):
    """Factory for end-to-end tests: ``cli_testbed(devices=3, prefix="t")`` runs ``testbed
    local up`` through the CLI and returns (env, name, inventory path); after the test each one
    is taken down through ``testbed local down``, which must succeed and leave nothing behind."""
    made: list[tuple[dict, str]] = []

    def make(devices: int = 3, prefix: str = "t"):
        env = {"TESTBED_STATE_DIR": str(state_dir)}
        name = unique_name(prefix)
        inv = tmp_path / f"{name}.inventory.toml"
        made.append((env, name))
        up = run_cli(
            "local",
            "up",
            "--devices",
            str(devices),
            "--name",
            name,
            "--inventory-out",
            str(inv),
            env=env,
            timeout=120,
        )
        assert up.returncode == 0, up.stderr
        return env, name, inv

    yield make
    for env, name in made:
        down = run_cli("local", "down", "--name", name, env=env, timeout=120)
        assert down.returncode == 0, down.stderr
        assert leftovers(name) == {"netns": [], "links": [], "processes": []}


@pytest.fixture
def make_testbed(state_dir, tmp_path):
    """Factory: ``make_testbed(devices=3, rate_kbit=8000)`` → (name, inventory path).
    Every testbed made is torn down after the test, whatever happened."""
    from testbed.lab import local

    made: list[str] = []

    def make(devices: int = 3, rate_kbit: float = 8000.0, name: str | None = None):
        name = name or unique_name()
        made.append(name)
        res = local.up(name, devices, rate_kbit, tmp_path / f"{name}.inventory.toml")
        return name, Path(res["inventory"])

    yield make
    for name in made:
        local.down(name)


def run_cli(
    *args: str, timeout: float = 120, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run the real ``testbed`` CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
        **kw,
    )


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real ``testbed`` CLI's ``main`` in this process: (exit code, stdout, stderr)."""
    from testbed.cli import main

    monkeypatch.setattr(sys, "argv", ["testbed", *args])
    with pytest.raises(SystemExit) as exc:
        main()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def leftovers(name: str) -> dict[str, list[str]]:
    """Kernel objects and processes of testbed ``name`` that still exist."""
    from testbed.lab.local import Names

    n = Names(name)
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    out = {
        "netns": [x.split()[0] for x in ns.splitlines() if x and n.is_our_netns(x.split()[0])],
        "links": [
            ln.split(": ")[1].split("@")[0]
            for ln in links.splitlines()
            if n.is_our_link(ln.split(": ")[1].split("@")[0])
        ],
        "processes": [],
    }
    marker = f"/{name}/devices/"
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    out["processes"].append(p.name)
            except OSError:
                pass
    return out
