"""Provisioning one device (check, install, shards, keys, agent) and every device at once."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.security import AGENT_SECRET, AUTHORIZED, CurveClient

from ...errors import ConfigError, ProvisionError
from ..inventory import Device, Inventory
from ..jetson import query_power
from ..keys import BS_NAME, client_keys, ensure_keys
from ..runner import Runner
from .agents import agent_argv, agent_is_ours, connect_endpoint, ping, start_agent, stop_pid
from .facts import (
    DeviceFacts,
    check_facts,
    preflight_refusal,
    preflight_summary,
    read_facts,
    read_preflight,
)
from .files import push_files, sync_shards
from .fleet import DeviceReport, each_device
from .layout import Layout
from .placement import place_experts, shards_per_device
from .wheels import (
    AGENT_PACKAGES,
    DepWheels,
    agent_source_key,
    install_key,
    pip_wheel,
    project_wheel,
    resolve_wheelhouse,
    sha256_file,
)

#: free space kept on top of what is pushed
HEADROOM_BYTES = 64 << 20
REUSE_PTH = "moe_testbed_reuse.pth"
#: ``--allow-cpu`` for the provision calls that do not say (see :func:`allowing_cpu`)
_ALLOW_CPU: ContextVar[bool] = ContextVar("allow_cpu", default=False)


@contextlib.contextmanager
def allowing_cpu(allow: bool = True) -> Iterator[None]:
    """Within it, :func:`provision` calls that do not pass ``allow_cpu`` take ``allow``: how
    ``testbed run --allow-cpu`` reaches the provisioning its session does."""
    token = _ALLOW_CPU.set(allow)
    try:
        yield
    finally:
        _ALLOW_CPU.reset(token)


class _Plan:
    """Controller-side inputs shared by every device of one provision call."""

    def __init__(
        self,
        inv: Inventory,
        split: Path | None,
        placement: str,
        seed: int,
        wheelhouse: Path | None,
        allow_cpu: bool = False,
    ):
        self.wheelhouse = wheelhouse
        #: a Jetson whose torch has no CUDA is provisioned all the same (``--allow-cpu``)
        self.allow_cpu = allow_cpu
        self.manifest: Any = None
        self.shards: dict[str, list[str]] = {d.name: [] for d in inv.devices}
        if split is not None:
            from models.errors import ModelError
            from models.manifest import load_manifest

            try:
                self.manifest = load_manifest(split)
            except ModelError as exc:
                raise ConfigError(f"--model: {exc}") from None
            self.shards = shards_per_device(
                place_experts(self.manifest, inv.devices, placement, seed),
                [d.name for d in inv.devices],
            )
        self.agent_key = agent_source_key()
        #: CURVE: the controller's key files (name -> (public, secret)) and the BS's client side
        self.keys: dict[str, tuple[Path, Path]] = {}
        self.curve: CurveClient | None = None
        if inv.security == "curve":
            self.keys = ensure_keys(inv)
            self.curve = client_keys(inv)
        self._project: tuple[Path, str] | None = None
        self._wheelhouse = wheelhouse
        self._pips: dict[tuple[int, int], Path] = {}
        self.deps = DepWheels(wheelhouse)
        self._sha: dict[Path, str] = {}
        self._lock = threading.Lock()

    def pip(self, facts: DeviceFacts) -> Path:
        """The pip wheel for the device's Python (the newest whose Requires-Python admits it:
        pip 25.1 and later no longer run on JetPack 5's 3.8), found once per Python."""
        py = (facts.python[0], facts.python[1])
        with self._lock:
            if py not in self._pips:
                self._pips[py] = pip_wheel(self._wheelhouse, py)
            return self._pips[py]

    def project(self) -> tuple[Path, str]:
        """The project wheel and its source hash, built (or found in the cache) on first use:
        only when some device needs an install."""
        with self._lock:
            if self._project is None:
                self._project = project_wheel()
            return self._project

    def sha(self, p: Path) -> str:
        with self._lock:
            if p not in self._sha:
                self._sha[p] = sha256_file(p)
            return self._sha[p]


def _install(
    runner: Runner,
    device: Device,
    facts: DeviceFacts,
    lay: Layout,
    plan: _Plan,
    wheels: Mapping[str, tuple[Path, str]],
    dep_names: Sequence[str],
    key: str,
    reuse_dirs: Sequence[str],
    changed: list[str],
) -> dict[str, Any]:
    """Install the agent in the venv (wheels, ``.pth`` of the reused packages, pip), run the
    preflight in it; write and return ``installed.json``'s state (with the preflight)."""
    project, source_hash = plan.project()
    pushed = push_files(runner, device.python, lay.wheels, wheels)
    if pushed:
        changed.append(f"pushed {len(pushed)} wheel{'s' * (len(pushed) != 1)}")
    old = facts.installed or {}
    if not facts.venv_python or old.get("python") != facts.executable:
        runner.run(
            [device.python, "-m", "venv", "--without-pip", "--clear", lay.venv], timeout_s=120
        )
        changed.append("created venv")
    sp = lay.site_packages(facts.python)
    pth = "".join(f"{d}\n" for d in reuse_dirs)
    with tempfile.NamedTemporaryFile("w", suffix=".pth", delete=False) as f:
        f.write(pth)
    try:
        runner.put(f.name, f"{sp}/{REUSE_PTH}")
    finally:
        os.unlink(f.name)
    pip = [
        lay.venv_python,
        f"{lay.wheels}/{plan.pip(facts).name}/pip",
        "install",
        "--no-index",
        "--disable-pip-version-check",
        "--no-input",
        "-q",
        "--no-warn-script-location",
        "--no-compile",  # the agent compiles what it imports, once; pip would compile all
    ]
    if dep_names:
        runner.run([*pip, "--find-links", lay.wheels, *dep_names], timeout_s=1800)
    runner.run(
        [*pip, "--no-deps", "--force-reinstall", f"{lay.wheels}/{project.name}"], timeout_s=600
    )
    state = {
        "key": key,
        "project": project.name,
        "agent_sources": plan.agent_key,
        "source_hash": source_hash,
        "python": facts.executable,
        "deps": sorted(dep_names),
        "wheels": sorted(wheels),
        "reuse": dict(zip(device.reuse_packages, reuse_dirs)),
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "preflight": read_preflight(runner, device, lay.workdir, lay.venv_python),
    }
    _put_text(runner, lay.installed, json.dumps(state, indent=1))
    changed.append(
        f"installed {project.name}" + (f" + {len(dep_names)} packages" if dep_names else "")
    )
    return state


def _push_keys(runner: Runner, device: Device, lay: Layout, plan: _Plan) -> bool:
    """The device's own CURVE secret key (mode 0600, folder 0700) and the BS's public key, where
    the device's copies differ; True if anything was pushed."""
    if plan.curve is None:
        return False
    _, secret = plan.keys[device.name]
    bs_public, _ = plan.keys[BS_NAME]
    pushed = push_files(
        runner, device.python, lay.curve, {AGENT_SECRET: (secret, plan.sha(secret))}, mode=0o600
    )
    pushed += push_files(
        runner,
        device.python,
        f"{lay.curve}/{AUTHORIZED}",
        {f"{BS_NAME}.key": (bs_public, plan.sha(bs_public))},
    )
    if pushed:
        runner.run(["chmod", "700", lay.curve], timeout_s=30)
    return bool(pushed)


def _put_text(runner: Runner, remote: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(text)
    try:
        runner.put(f.name, remote)
    finally:
        os.unlink(f.name)


@dataclass
class _Wanted:
    """What one device should have, from its facts and the plan (see :func:`_wanted`)."""

    lay: Layout
    #: the directories the reused packages are imported from (the venv's ``.pth`` lists them)
    reuse_dirs: list[str]
    #: the agent's dependencies to install (:data:`AGENT_PACKAGES` minus the reused ones)
    dep_names: list[str]
    #: :func:`install_key` of the install wanted
    key: str
    #: the install on the device is not this one (or there is no venv)
    install: bool
    #: wheel name -> (local path, sha256) to push, when installing
    wheels: dict[str, tuple[Path, str]] = field(default_factory=dict)


def _wanted(device: Device, facts: DeviceFacts, plan: _Plan) -> _Wanted:
    """Compare the device's facts with what is wanted; raises ProvisionError if the device cannot
    take it (wrong OS/Python, missing reused packages, not enough disk for what is pushed)."""
    problems = check_facts(facts, device)
    if problems:
        raise ProvisionError("; ".join(problems))
    reuse_dirs: list[str] = []
    for p in device.reuse_packages:
        d = str((facts.reuse[p] or {})["path"])
        if d not in reuse_dirs:
            reuse_dirs.append(d)
    dep_names = [
        p for p in AGENT_PACKAGES if p.lower() not in {r.lower() for r in device.reuse_packages}
    ]
    deps = plan.deps.get(facts, dep_names)
    key = install_key(
        plan.agent_key,
        sorted(p.name for p in [plan.pip(facts), *deps]),
        dict(zip(device.reuse_packages, (facts.reuse[p] for p in device.reuse_packages))),
        facts.executable,
    )
    install = (facts.installed or {}).get("key") != key or not facts.venv_python
    want = _Wanted(Layout(facts.workdir), reuse_dirs, dep_names, key, install)
    need = HEADROOM_BYTES
    if install:
        wheels = [plan.project()[0], plan.pip(facts), *deps]
        want.wheels = {p.name: (p, plan.sha(p)) for p in wheels}
        need += sum(p.stat().st_size for p, _ in want.wheels.values())
    if plan.manifest is not None:
        need += sum(plan.manifest.experts[u].bytes for u in plan.shards[device.name])
    problems = check_facts(facts, device, need)
    if problems:
        raise ProvisionError("; ".join(problems))
    return want


def _preflight(
    runner: Runner,
    device: Device,
    lay: Layout,
    installed: dict[str, Any],
    fresh: bool,
    allow_cpu: bool,
) -> dict[str, Any]:
    """The install's preflight summary (:func:`.facts.preflight_summary`). The one recorded in
    ``installed.json`` serves while it passes; one that refuses (or none, or not ``fresh`` from
    this install) is run again first (a driver or package fixed since) and recorded. Raises
    ProvisionError with the refusal's one line (nothing else changed: no agent started)."""
    raw = installed.get("preflight")
    summary = preflight_summary(raw) if raw else None
    if not fresh and (summary is None or preflight_refusal(summary, device.host, allow_cpu)):
        again = read_preflight(runner, device, lay.workdir, lay.venv_python)
        if again != raw:
            installed["preflight"] = again
            _put_text(runner, lay.installed, json.dumps(installed, indent=1))
        summary = preflight_summary(again)
    assert summary is not None  # a fresh install always records one
    why = preflight_refusal(summary, device.host, allow_cpu)
    if why:
        raise ProvisionError(why)
    return summary


def _ensure_agent(
    runner: Runner,
    device: Device,
    facts: DeviceFacts,
    plan: _Plan,
    want: _Wanted,
    keys_pushed: bool,
    rep: DeviceReport,
) -> None:
    """Keep the running agent if it is the one wanted and answers a ping; else stop it (by PID,
    if ours) and start one. Sets ``rep.pid`` and ``rep.endpoint``."""
    lay = want.lay
    argv = agent_argv(device, lay, curve=plan.curve is not None)
    st = facts.agent_state or {}
    running = facts.pid is not None and agent_is_ours(facts.cmdline, lay)
    ready = facts.ready or {}
    endpoint = connect_endpoint(ready.get("endpoint"), device.host)
    keep = (
        running
        and not want.install
        and not keys_pushed
        and st.get("argv") == argv
        and st.get("key") == want.key
        and st.get("pid") == facts.pid
        and ready.get("pid") == facts.pid
        and endpoint is not None
        and ping(endpoint, 3.0, device.name, plan.curve) is not None
    )
    if keep:
        rep.pid, rep.endpoint = facts.pid, endpoint
        return
    if running and facts.pid is not None:
        how = stop_pid(runner, lay, facts.pid)
        rep.changed.append(f"stopped agent pid {facts.pid} ({how})")
    info = start_agent(runner, device, lay, argv, curve=plan.curve)
    rep.pid, rep.endpoint = int(info["pid"]), info["endpoint"]
    _put_text(runner, lay.agent_state, json.dumps({"pid": rep.pid, "argv": argv, "key": want.key}))
    rep.changed.append(f"started agent pid {rep.pid} at {rep.endpoint}")


def provision_device(runner: Runner, device: Device, plan: _Plan) -> DeviceReport:
    """Check, install, push shards, (re)start the agent on one device. Raises on failure."""
    t0 = time.monotonic()
    rep = DeviceReport(device.name, ok=False)

    def step(name: str) -> None:
        nonlocal t0
        now = time.monotonic()
        rep.steps[name] = round(now - t0, 3)
        t0 = now

    t_start = t0
    facts = read_facts(runner, device)
    rep.facts = {
        "system": facts.system,
        "machine": facts.machine,
        "python": ".".join(map(str, facts.python)),
        "libc": " ".join(facts.libc),
    }
    want = _wanted(device, facts, plan)
    lay, changed = want.lay, rep.changed
    rep.power = query_power(runner)
    step("check")
    installed = dict(facts.installed or {})
    if want.install:
        installed = _install(
            runner,
            device,
            facts,
            lay,
            plan,
            want.wheels,
            want.dep_names,
            want.key,
            want.reuse_dirs,
            changed,
        )
        step("install")
    rep.preflight = _preflight(runner, device, lay, installed, want.install, plan.allow_cpu)
    cpu = preflight_refusal(rep.preflight, device.host, allow_cpu=False)
    if cpu:
        rep.warnings.append(f"allowed by --allow-cpu: {cpu.split('; ')[0]}")
    if plan.manifest is not None and plan.shards[device.name]:
        _, n = sync_shards(
            runner, device, plan.manifest, plan.shards[device.name], workdir=lay.workdir
        )
        rep.shards = len(plan.shards[device.name])
        if n:
            changed.append(f"pushed {n} of {rep.shards} shards")
        step("shards")
    keys_pushed = _push_keys(runner, device, lay, plan)
    if keys_pushed:
        changed.append("pushed CURVE keys")
        step("keys")
    _ensure_agent(runner, device, facts, plan, want, keys_pushed, rep)
    step("agent")
    rep.ok = True
    rep.seconds = round(time.monotonic() - t_start, 3)
    return rep


def provision(
    inv: Inventory,
    model_dir: str | os.PathLike[str] | None = None,
    placement: str = "round-robin",
    *,
    seed: int = 0,
    wheelhouse: str | os.PathLike[str] | None = None,
    connect_timeout_s: float = 10.0,
    devices: Sequence[str] | None = None,
    allow_cpu: bool | None = None,
) -> list[DeviceReport]:
    """Install and start the agent on every device and push the placed expert shards.

    Parameters
    ----------
    inv
        The inventory.
    model_dir
        A split directory, ``"tiny"`` or a checkpoint (see
        :func:`testbed.lab.modelstore.resolve_split`); ``None`` pushes no shards.
    placement
        ``round-robin`` or ``random`` (seeded with ``seed``): which device gets which shard.
    wheelhouse
        A folder of wheels to install the agent's dependencies from (offline), instead of
        ``pip download``.
    connect_timeout_s
        SSH connect budget per device.
    devices
        Only these devices (default: all); the others are not touched.
    allow_cpu
        Provision a Jetson (L4T detected by the preflight) whose torch has no CUDA all the
        same; default: what :func:`allowing_cpu` says (False outside it). Without it such a
        device fails with one line naming the fix. Torch and numpy that cannot exchange arrays
        fail whatever this says.

    Returns
    -------
    One :class:`DeviceReport` per device, in inventory order; ``changed`` is empty when nothing
    had to be done; ``preflight`` says what the agent's venv computes with.

    Raises
    ------
    ConfigError
        Bad model directory, placement or wheelhouse (before any device is touched).
    """
    from ...policy.placement import PLACEMENTS

    if placement not in PLACEMENTS:
        raise ConfigError(
            f"--placement: unknown placement {placement!r} (one of: {', '.join(PLACEMENTS)})"
        )
    split = None
    if model_dir is not None:
        from ..modelstore import resolve_split

        split = resolve_split(model_dir, where="--model")
    wh = resolve_wheelhouse(wheelhouse, inv)
    cpu = _ALLOW_CPU.get() if allow_cpu is None else allow_cpu
    plan = _Plan(inv, split, placement, seed, wh, cpu)
    return each_device(inv, lambda r, d: provision_device(r, d, plan), connect_timeout_s, devices)
