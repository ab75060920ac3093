"""``testbed wheelhouse build``: the wheels an offline lab provisions from."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ..errors import ConfigError, TestbedError
from ..lab.inventory import Inventory, load_inventory
from .output import Format, FormatOpt, InvArg, emit, err_console, table

wheelhouse_app = typer.Typer(
    help="Wheelhouses: the agents' wheels for each device's platform and Python, so that "
    "provisioning never downloads (offline labs).",
    no_args_is_help=True,
)

_PYVER_RE = re.compile(r"3\.(\d{1,2})")
_MACHINE_RE = re.compile(r".*_(x86_64|aarch64)")


def _targets_from_devices(inv: Inventory, names: list[str] | None, skip: list[str], timeout: float):
    """One target per device, from its facts read over SSH (its reused packages skipped)."""
    from ..lab.provision import read_facts
    from ..lab.provision.fleet import DeviceReport, each_device
    from ..lab.provision.wheels import Target

    def one(r, d):
        t = Target.of(read_facts(r, d))
        return d.name, Target(t.python, t.machine, t.platforms, (*t.skip, *skip))

    rows = each_device(inv, one, timeout, names)
    bad = [r for r in rows if isinstance(r, DeviceReport)]
    if bad:
        raise TestbedError(
            "; ".join(f"{r.device}: {r.error}" for r in bad)
            + " (a lab not reachable yet: give --platform and --python-version)"
        )
    return dict(rows)


def _target_from_flags(
    inv: Inventory, names: list[str] | None, platforms: list[str], python: str, skip: list[str]
):
    """The target of ``--platform``/``--python-version`` (no SSH); the packages every selected
    device reuses are skipped too."""
    from ..lab.provision.wheels import Target

    if not _PYVER_RE.fullmatch(python):
        raise ConfigError(f"--python-version: expected 3.N (e.g. 3.8), got {python!r}")
    machines = {m[1] for m in map(_MACHINE_RE.fullmatch, platforms) if m}
    if len(machines) != 1 or not all(_MACHINE_RE.fullmatch(p) for p in platforms):
        raise ConfigError(
            f"--platform: one architecture (x86_64 or aarch64) in every platform, "
            f"e.g. manylinux2014_aarch64; got {', '.join(platforms)}"
        )
    devs = [inv.device(n) for n in names] if names else list(inv.devices)
    common = set.intersection(*(set(d.reuse_packages) for d in devs)) if devs else set()
    names_shown = ",".join(d.name for d in devs)
    target = Target(
        (3, int(python.split(".")[1])),
        machines.pop(),
        tuple(platforms),
        (*sorted(common), *skip),
    )
    return {names_shown: target}


def build_cmd(
    inventory: Path = InvArg,
    out: Path = typer.Argument(
        ...,
        help="The wheelhouse folder (created; wheels already there are kept).",
        show_default=False,
    ),
    devices: list[str] = typer.Option(
        [], "--device", "-d", help="Only this device (repeat for more; default: every device)."
    ),
    platforms: list[str] = typer.Option(
        [],
        "--platform",
        help="Build for this pip platform instead of asking the devices over SSH (repeat for "
        "more), e.g. manylinux2014_aarch64 or manylinux_2_31_aarch64 (JetPack 5: glibc 2.31).",
    ),
    python: str | None = typer.Option(
        None, "--python-version", help="With --platform: the devices' Python, e.g. 3.8."
    ),
    skip: list[str] = typer.Option(
        [],
        "--skip",
        help="A package the devices bring themselves (repeat; e.g. torch with JetPack's torch). "
        "A device's reuse_packages are skipped anyway.",
    ),
    timeout: float = typer.Option(10.0, "--timeout", help="Per-device SSH connect timeout, s."),
    fmt: Format = FormatOpt,
) -> None:
    """Download the agent's wheels (and what they require) for each device's platform and
    Python into OUT, one flat folder that `provision`, `run` and `demo --wheelhouse OUT` (or
    the inventory's testbed.wheelhouse) install from without downloading."""
    from ..lab.provision.wheels import AGENT_PACKAGES, build_wheelhouse

    inv = load_inventory(inventory)
    for n in devices:
        inv.device(n)
    lower = {p.lower() for p in AGENT_PACKAGES}
    for s in skip:
        if s.lower() not in lower:
            raise ConfigError(
                f"--skip: {s!r} is not one of the agent's packages ({', '.join(AGENT_PACKAGES)})"
            )
    if bool(platforms) != bool(python):
        raise ConfigError("--platform and --python-version: give both, or neither (ask devices)")
    if platforms:
        targets = _target_from_flags(inv, devices or None, platforms, str(python), skip)
    else:
        if fmt == Format.table:
            err_console.print("asking the devices for their platform and Python over SSH")
        targets = _targets_from_devices(inv, devices or None, skip, timeout)
    if fmt == Format.table:
        err_console.print(f"downloading into {out} for {len(set(targets.values()))} target(s)")
    res = build_wheelhouse(list(targets.values()), out)
    res["devices"] = {name: t.label for name, t in targets.items()}
    emit(
        fmt,
        res,
        table(
            f"wheelhouse {res['wheelhouse']}: {res['files']} wheels, {res['mb']} MB "
            f"({len(res['written'])} written now)",
            ("file", "MB"),
            [(w["file"], f"{w['mb']:.2f}") for w in res["written"]],
        ),
    )


wheelhouse_app.command("build")(build_cmd)
