"""The provisioned agent on each device: how it is started, found, pinged and stopped (by PID,
after ``/proc/PID/cmdline`` shows that the PID is our agent)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from device_agent.security import CurveClient

from ...errors import CommandTimeout, ConfigError, ProvisionError, TestbedError
from ..inventory import Device, Inventory
from ..keys import client_keys
from ..runner import Runner
from .facts import DeviceFacts, json_or_none, preflight_summary, read_facts
from .files import remote_workdir, sync_models
from .fleet import DeviceReport, each_device, failed_report
from .layout import Layout

STATUS_PERIOD_S = 0.5
#: perception (CoEL's hello, device_agent.hello): the agent looks at its status every
#: STATUS_PERIOD_S and publishes it only when a value moved by more than HELLO_DELTA, or when
#: HELLO_KEEPALIVE_S (T_hello) passed without a message
HELLO_DELTA = 0.1
HELLO_KEEPALIVE_S = 2.0


def agent_is_ours(cmdline: Sequence[str] | None, lay: Layout) -> bool:
    """True if a process's argv is a device agent started with ``lay``'s ready file. Pure."""
    if not cmdline:
        return False
    return "device_agent" in cmdline and lay.ready in cmdline


def bind_address(host: str) -> str:
    """Address the agent binds: the device's IP, or all interfaces for a host name. Pure."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return "0.0.0.0"


def connect_endpoint(endpoint: str | None, host: str) -> str | None:
    """An endpoint the controller can connect to (a wildcard bind gets the device's host)."""
    if endpoint and endpoint.startswith("tcp://0.0.0.0:"):
        return f"tcp://{host}:{endpoint.rsplit(':', 1)[1]}"
    return endpoint


def agent_argv(device: Device, lay: Layout, curve: bool = True) -> list[str]:
    """How the agent is started on ``device`` (the venv's python); ``curve``: with its CURVE
    keys in ``lay.curve`` (:mod:`device_agent.security`). Pure."""
    addr = bind_address(device.host)
    port = str(device.agent_port) if device.agent_port else "*"
    argv = [
        lay.venv_python,
        "-m",
        "device_agent",
        "serve",
        "--bind",
        f"tcp://{addr}:{port}",
        "--workdir",
        lay.workdir,
        "--ready-file",
        lay.ready,
        "--pub",
        f"tcp://{addr}:{device.status_port or '*'}",
        "--hello-s",
        f"{STATUS_PERIOD_S:g}",
        "--hello-delta",
        f"{HELLO_DELTA:g}",
        "--hello-keepalive-s",
        f"{HELLO_KEEPALIVE_S:g}",
    ]
    if curve:
        argv += ["--curve-dir", lay.curve]
    if device.hw_class == "netns":
        # namespace devices share this host's cores: one compute thread each; and its meters: a
        # host-wide one (RAPL, a GPU) would count every device's and the BS's work, so each
        # agent estimates its own from its CPU time
        argv += ["--threads", "1", "--meter", "estimated"]
    return argv


def ping(
    endpoint: str, timeout_s: float, device: str = "a", curve: CurveClient | None = None
) -> float | None:
    """RTT in ms of one ZeroMQ ping, or None if no answer within ``timeout_s``."""
    from ...dataplane.backend import AgentError, RemoteExpertBackend

    with RemoteExpertBackend({device: endpoint}, timeout_s=timeout_s, curve=curve) as b:
        try:
            return float(b.ping(device, timeout_s=timeout_s)["rtt_ms"])
        except AgentError:
            return None


def _wait_ping(
    endpoint: str, timeout_s: float, device: str = "a", curve: CurveClient | None = None
) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        rtt = ping(endpoint, max(0.2, min(1.0, deadline - time.monotonic())), device, curve)
        if rtt is not None or time.monotonic() >= deadline:
            return rtt


def _cmdline(runner: Runner, pid: int) -> list[str]:
    res = runner.run(["cat", f"/proc/{pid}/cmdline"], timeout_s=30, check=False)
    return [a for a in res.stdout.split("\0") if a] if res.ok else []


def stop_pid(runner: Runner, lay: Layout, pid: int, grace_s: float = 5.0) -> str:
    """Stop our agent ``pid``: SIGTERM, then SIGKILL after ``grace_s``; only after checking
    ``/proc/PID/cmdline`` shows our agent. Returns not running / terminated / killed."""
    if not agent_is_ours(_cmdline(runner, pid), lay):
        return "not running"
    runner.run(["kill", "-TERM", str(pid)], timeout_s=30, check=False)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not agent_is_ours(_cmdline(runner, pid), lay):
            return "terminated"
    if agent_is_ours(_cmdline(runner, pid), lay):
        runner.run(["kill", "-KILL", str(pid)], timeout_s=30, check=False)
        return "killed"
    return "terminated"


#: run on the device by :func:`start_agent` as ``sh -c _WAIT_READY wait-ready READY PID SECONDS``:
#: print the ready file once it is there (the agent writes it whole, then renames it), exit 3
#: as soon as the process is gone (a zombie, whose ``/proc/PID/cmdline`` is empty, counts as
#: gone: a container's init may never reap the detached agent), 4 after SECONDS. A ``sleep``
#: without fractions (some busybox builds) sleeps a whole second instead.
_WAIT_READY = (
    "end=$(( $(date +%s) + ${3%.*} + 1 )); "
    'alive() { kill -0 "$1" 2>/dev/null && '
    '[ -n "$(tr -d "\\000" < "/proc/$1/cmdline" 2>/dev/null)" ]; }; '
    "while :; do "
    'if [ -s "$1" ]; then cat "$1"; exit 0; fi; '
    'alive "$2" || { [ -s "$1" ] && cat "$1" && exit 0; exit 3; }; '
    '[ "$(date +%s)" -ge "$end" ] && exit 4; '
    "sleep 0.1 2>/dev/null || sleep 1; "
    "done"
)


def start_agent(
    runner: Runner,
    device: Device,
    lay: Layout,
    argv: Sequence[str],
    ready_timeout_s: float = 180.0,
    curve: CurveClient | None = None,
) -> dict[str, Any]:
    """Spawn the agent detached, wait for its ready file (with its PID) and a ping answer.
    Returns the ready file's content (endpoint made connectable). ``ready_timeout_s`` is long
    because importing torch is slow on a small device (an arm64 device of the local testbed,
    emulated by qemu-user, takes 35-45 s); an agent that exits is reported at once."""
    runner.run(["rm", "-f", lay.ready], timeout_s=30)
    pid = runner.spawn(list(argv), log_path=lay.log, pid_path=lay.pid, cwd=lay.workdir)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        # one command waits on the device (not one SSH round trip per look)
        wait_s = max(1.0, min(30.0, deadline - time.monotonic()))
        try:
            res = runner.run(
                ["sh", "-c", _WAIT_READY, "wait-ready", lay.ready, str(pid), f"{wait_s:.1f}"],
                timeout_s=wait_s + 10,
                check=False,
            )
        except CommandTimeout:
            res = None
        info = json_or_none(res.stdout) if res is not None and res.ok else None
        if info and int(info.get("pid", -1)) == pid:
            break
        alive = agent_is_ours(_cmdline(runner, pid), lay)
        if not alive or time.monotonic() > deadline:
            tail = runner.run(["tail", "-n", "5", lay.log], timeout_s=30, check=False).stdout
            if alive:
                stop_pid(runner, lay, pid)
            last = (tail.strip().splitlines() or ["(empty log)"])[-1]
            raise ProvisionError(
                f"agent (pid {pid}) {'exited' if not alive else 'not ready'} "
                f"before writing {lay.ready}: {last}"
            )
        time.sleep(0.1)
    info["endpoint"] = connect_endpoint(info.get("endpoint"), device.host)
    info["pub_endpoint"] = connect_endpoint(info.get("pub_endpoint"), device.host)
    if (
        _wait_ping(info["endpoint"], max(2.0, deadline - time.monotonic()), device.name, curve)
        is None
    ):
        stop_pid(runner, lay, pid)
        raise ProvisionError(f"agent (pid {pid}) does not answer a ping at {info['endpoint']}")
    return info


def agent_view(runner: Runner, device: Device) -> tuple[Layout, DeviceFacts]:
    """The device's workdir layout and facts (one device check)."""
    facts = read_facts(runner, device)
    return Layout(facts.workdir), facts


def agent_running(facts: DeviceFacts, lay: Layout) -> bool:
    """True if the device's pid file names a process that is our agent."""
    return facts.pid is not None and agent_is_ours(facts.cmdline, lay)


def agent_endpoints(inv: Inventory, connect_timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """device -> ``{"endpoint", "pub_endpoint", "pid"}`` of its running agent, read from the
    ready files over SSH.

    Raises
    ------
    TestbedError
        Naming every device whose agent is not running (or that could not be reached).
    """

    def one(r: Runner, d: Device) -> Any:
        lay, facts = agent_view(r, d)
        ready = facts.ready or {}
        if not agent_running(facts, lay) or ready.get("pid") != facts.pid:
            return failed_report(
                d.name,
                ProvisionError("no agent running (run `testbed provision`)"),
                time.monotonic(),
            )
        return (
            d.name,
            {
                "endpoint": connect_endpoint(ready.get("endpoint"), d.host),
                "pub_endpoint": connect_endpoint(ready.get("pub_endpoint"), d.host),
                "pid": facts.pid,
            },
        )

    rows = each_device(inv, one, connect_timeout_s)
    bad = [r for r in rows if isinstance(r, DeviceReport)]
    if bad:
        raise TestbedError("; ".join(f"{r.device}: {r.error}" for r in bad))
    return dict(rows)


def agents_status(
    inv: Inventory, connect_timeout_s: float = 10.0, ping_timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """Per device: ``state`` (running / not answering / stopped / unreachable), pid, endpoint,
    ping RTT, loaded experts, installed project wheel, and what the agent's venv computes with
    (the install's preflight, :func:`.facts.preflight_summary`: ``python``, ``l4t``,
    ``jetpack``, ``torch`` {version, cuda_build, cuda_available, device_name, ...}, ``numpy``,
    ``interop_ok``; None where no install recorded one)."""
    try:
        curve = client_keys(inv)
    except ConfigError:  # never provisioned: no agent can be answering
        curve = None

    def one(r: Runner, d: Device) -> dict[str, Any]:
        lay, facts = agent_view(r, d)
        ready = facts.ready or {}
        row: dict[str, Any] = {
            "device": d.name,
            "ok": True,
            "state": "stopped",
            "pid": None,
            "endpoint": None,
            "rtt_ms": None,
            "experts": None,
            "installed": (facts.installed or {}).get("project"),
            "error": None,
            **preflight_summary((facts.installed or {}).get("preflight")),
        }
        row["python"] = row["python"] or ".".join(map(str, facts.python))
        if agent_running(facts, lay):
            row["pid"] = facts.pid
            row["endpoint"] = connect_endpoint(ready.get("endpoint"), d.host)
            row["state"] = "not answering"
            if row["endpoint"] and ready.get("pid") == facts.pid:
                from ...dataplane.backend import AgentError, RemoteExpertBackend

                with RemoteExpertBackend(
                    {d.name: row["endpoint"]}, timeout_s=ping_timeout_s, curve=curve
                ) as b:
                    try:
                        row["rtt_ms"] = round(float(b.ping(d.name)["rtt_ms"]), 3)
                        row["experts"] = len(b.status(d.name).get("experts", {}))
                        row["state"] = "running"
                    except AgentError:
                        pass
        return row

    rows = each_device(inv, one, connect_timeout_s)
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "state": "unreachable" if r.error_type == "HostUnreachable" else "error",
            "pid": None,
            "endpoint": None,
            "rtt_ms": None,
            "experts": None,
            "installed": None,
            "error": r.error,
            "exit_code": r.exit_code,
            **preflight_summary(None),
        }
        for r in rows
    ]


def agents_stop(
    inv: Inventory, connect_timeout_s: float = 10.0, grace_s: float = 5.0
) -> list[dict[str, Any]]:
    """Stop every device's agent by PID (SIGTERM, then SIGKILL after ``grace_s``), after
    checking the PID is our agent. Per device: ``result`` (terminated / killed / not running)."""

    def one(r: Runner, d: Device) -> dict[str, Any]:
        lay, facts = agent_view(r, d)
        result, pid = "not running", None
        if agent_running(facts, lay) and facts.pid is not None:
            pid = facts.pid
            result = stop_pid(r, lay, pid, grace_s)
        if facts.pid is not None or facts.ready or facts.agent_state:
            r.run(["rm", "-f", lay.pid, lay.ready, lay.agent_state], timeout_s=30)
        return {"device": d.name, "ok": True, "result": result, "pid": pid, "error": None}

    rows = each_device(inv, one, connect_timeout_s)
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "result": "failed",
            "pid": None,
            "error": r.error,
            "exit_code": r.exit_code,
        }
        for r in rows
    ]


def agents_logs(
    inv: Inventory, lines: int = 50, connect_timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """The last ``lines`` lines of each device's agent log."""
    if lines < 1:
        raise ConfigError(f"--lines: must be >= 1, got {lines}")

    def one(r: Runner, d: Device) -> dict[str, Any]:
        lay = Layout(remote_workdir(r, d))
        res = r.run(["tail", "-n", str(lines), lay.log], timeout_s=30, check=False)
        if not res.ok:
            return {
                "device": d.name,
                "ok": True,
                "lines": [],
                "log": lay.log,
                "error": None,
                "note": "no log yet",
            }
        return {
            "device": d.name,
            "ok": True,
            "lines": res.stdout.splitlines(),
            "log": lay.log,
            "error": None,
        }

    rows = each_device(inv, one, connect_timeout_s)
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "lines": [],
            "log": None,
            "error": r.error,
            "exit_code": r.exit_code,
        }
        for r in rows
    ]


def agents_push_models(
    inv: Inventory,
    models: Mapping[str, Mapping[str, str | Path]],
    connect_timeout_s: float = 10.0,
) -> list[dict[str, Any]]:
    """Push whole-model folders (MoE²) to the devices: ``{device: {model id: local folder}}``
    into each device's ``{workdir}/models/<id>/`` (:func:`.files.sync_models`: only the files
    whose sha256 differs are copied). Devices not named are not touched.

    Returns one row per device named, in inventory order: ``device``, ``ok``, ``models`` (id ->
    folder relative to the workdir, what the agent's ``load_model`` takes, e.g. through
    :func:`testbed.dataplane.lm_call.load_model`), ``pushed`` (files copied), ``error`` (and
    ``exit_code`` when it failed; one device failing never stops the others).

    Raises
    ------
    ConfigError
        A device name the inventory does not have (before any device is touched).
    """
    unknown = sorted(set(models) - {d.name for d in inv.devices})
    if unknown:
        raise ConfigError(f"models for unknown devices: {', '.join(unknown)}")

    def one(r: Runner, d: Device) -> dict[str, Any]:
        folders = {mid: Path(p) for mid, p in models[d.name].items()}
        rel, n = sync_models(r, d, folders)
        return {"device": d.name, "ok": True, "models": rel, "pushed": n, "error": None}

    rows = each_device(inv, one, connect_timeout_s, list(models))
    return [
        r
        if isinstance(r, dict)
        else {
            "device": r.device,
            "ok": False,
            "models": {},
            "pushed": 0,
            "error": r.error,
            "exit_code": r.exit_code,
        }
        for r in rows
    ]
