"""Reading a wheelhouse for one device (issue 20): the wheels that fit its Python and platform,
the agent's packages and what their metadata requires there, a missing one refused naming it
and the wheelhouse; which wheelhouse a provisioning takes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from testbed.errors import ConfigError, ProvisionError
from testbed.lab.inventory import parse_inventory
from testbed.lab.provision.wheels import (
    DepWheels,
    Target,
    active_wheelhouse,
    compatible_platforms,
    newest,
    pip_admits,
    pip_wheel,
    resolve_wheelhouse,
    select_wheels,
    using_wheelhouse,
    wheel_requires,
)

JP5 = Target((3, 8, 10), "aarch64", ("manylinux_2_31_aarch64", "linux_aarch64"), ("torch",))
X86 = Target((3, 11, 2), "x86_64", ("manylinux_2_36_x86_64",))


def wheel(folder: Path, filename: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal wheel: its name and a METADATA with ``requires``."""
    name, version = filename.split("-")[:2]
    p = folder / filename
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return p


@pytest.fixture
def house(tmp_path):
    wh = tmp_path / "wh"
    wh.mkdir()
    wheel(wh, "numpy-1.24.4-cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64.whl")
    wheel(wh, "numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    wheel(
        wh,
        "pyzmq-27.1.0-cp38-cp38-manylinux_2_28_aarch64.whl",
        ("cffi; implementation_name == 'pypy'",),
    )
    wheel(
        wh,
        "safetensors-0.5.3-cp38-abi3-manylinux_2_17_aarch64.whl",
        ("numpy>=1.21.6; extra == 'numpy'", "helper>=2; platform_machine == 'x86_64'"),
    )
    wheel(wh, "msgpack-1.1.1-cp38-cp38-manylinux_2_32_aarch64.whl")  # newer glibc than 2.31
    wheel(wh, "torch-2.4.1-cp38-cp38-manylinux_2_17_aarch64.whl", ("filelock",))
    wheel(wh, "pip-9.0.3-py2.py3-none-any.whl")
    wheel(wh, "pip-25.0.1-py3-none-any.whl")
    return wh


def test_compatible_platforms_take_every_manylinux_level_down_from_the_given_one():
    plats = compatible_platforms(["manylinux_2_31_aarch64", "linux_aarch64"])
    assert plats[:2] == ["manylinux_2_31_aarch64", "manylinux_2_30_aarch64"]
    assert {"manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"} < set(
        plats
    )
    assert "manylinux_2_32_aarch64" not in plats and plats[-1] == "linux_aarch64"
    legacy = compatible_platforms(["manylinux2014_x86_64"])
    assert legacy[:2] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert "manylinux2010_x86_64" in legacy and "manylinux1_x86_64" in legacy


def test_a_device_gets_the_wheels_of_its_python_and_platform_and_what_they_require(house):
    got = select_wheels(house, JP5, ["numpy", "pyzmq", "safetensors", "torch"])
    assert [p.name.split("-")[:2] for p in got] == [
        ["numpy", "1.24.4"],  # the cp38 aarch64 one, not the x86 one
        ["pyzmq", "27.1.0"],  # cffi only on pypy
        ["safetensors", "0.5.3"],  # helper only on x86_64, numpy only with the extra
    ]  # torch: reused (JP5.skip)
    assert wheel_requires(house / got[2].name) == [
        "numpy>=1.21.6; extra == 'numpy'",
        "helper>=2; platform_machine == 'x86_64'",
    ]
    assert newest(house.glob("pip-*.whl")).name == "pip-25.0.1-py3-none-any.whl"  # by version


@pytest.mark.parametrize(
    "target, packages, missing",
    [
        (JP5, ["numpy", "msgpack"], "msgpack"),  # built for glibc 2.32
        (Target(JP5.python, JP5.machine, JP5.platforms), ["torch"], "filelock (for torch)"),
        (JP5, ["numpy>=2"], "numpy>=2"),
        (X86, ["numpy", "pyzmq"], "pyzmq"),
    ],
)
def test_a_missing_wheel_is_refused_naming_it_and_the_wheelhouse(house, target, packages, missing):
    with pytest.raises(ProvisionError) as ei:
        select_wheels(house, target, packages)
    msg = str(ei.value)
    assert msg.startswith(f"wheelhouse {house}: no wheel of {missing} for {target.label} ("), msg
    assert "\n" not in msg


def test_which_wheelhouse_a_provisioning_takes(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    data = {
        "testbed": {"wheelhouse": "c"},
        "bs": {"name": "bs", "host": "10.0.0.1", "interface": "eth0"},
        "devices": [
            {
                "name": "d",
                "host": "10.0.0.2",
                "ssh_user": "u",
                "workdir": "/w",
                "python": "/p",
                "hw_class": "orin-nx",
                "memory_budget_mb": 100,
            }
        ],
    }
    inv = parse_inventory(data, tmp_path / "inv.toml")
    assert resolve_wheelhouse(None, inv) == c  # the inventory's
    with using_wheelhouse(b):
        assert active_wheelhouse() == b and DepWheels(None).wheelhouse == b
        assert resolve_wheelhouse(None, inv) == b  # run/demo --wheelhouse
        assert resolve_wheelhouse(a, inv) == a  # provision --wheelhouse
    assert active_wheelhouse() is None and DepWheels(None).wheelhouse is None
    with pytest.raises(ConfigError, match="--wheelhouse: .*nowhere: no such directory"):
        resolve_wheelhouse(tmp_path / "nowhere", inv)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--platform", "manylinux2014_aarch64"], "--platform and --python-version: give both"),
        (["--skip", "tourch"], "--skip: 'tourch' is not one of the agent's packages"),
        (
            ["--platform", "manylinux2014_aarch64", "--python-version", "3.x"],
            "--python-version: expected 3.N",
        ),
        (["--platform", "win_amd64", "--python-version", "3.8"], "--platform: one architecture"),
    ],
)
def test_wheelhouse_build_refuses_bad_flags_before_writing(
    tmp_path, monkeypatch, capsys, args, msg
):
    from tests.conftest import run_main

    inv = tmp_path / "inv.toml"
    inv.write_text(
        '[bs]\nname = "bs"\nhost = "10.0.0.1"\ninterface = "eth0"\n[[devices]]\nname = "d"\n'
        'host = "10.0.0.2"\nssh_user = "u"\nworkdir = "/w"\npython = "/p"\n'
        'hw_class = "orin-nx"\nmemory_budget_mb = 100\n'
    )
    out = tmp_path / "out"
    code, _, err = run_main(monkeypatch, capsys, "wheelhouse", "build", str(inv), str(out), *args)
    assert code == 2 and err.startswith(f"error: {msg}"), err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _pip(folder: Path, version: str, requires: str | None) -> Path:
    p = folder / f"pip-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: pip\nVersion: {version}\n"
    meta += f"Requires-Python: {requires}\n" if requires else ""
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(f"pip-{version}.dist-info/METADATA", meta)
    return p


def test_the_pip_for_a_device_is_the_newest_that_runs_on_its_python(tmp_path):
    """pip 25.1 and later need Python 3.9: JetPack 5's 3.8 gets the newest pip that admits it;
    with a wheelhouse nothing is downloaded, so a wheelhouse without one for 3.8 is refused."""
    old = _pip(tmp_path, "25.0.1", ">=3.8")
    new = _pip(tmp_path, "25.3", ">=3.9")
    assert pip_admits(old, (3, 8)) and not pip_admits(new, (3, 8)) and pip_admits(new, (3, 11))
    assert pip_wheel(tmp_path, (3, 8)) == old
    assert pip_wheel(tmp_path, (3, 11)) == new
    only_new = tmp_path / "only-new"
    only_new.mkdir()
    _pip(only_new, "25.3", ">=3.9")
    _pip(only_new, "1.0", None)  # no Requires-Python: admitted
    assert pip_wheel(only_new, (3, 8)).name == "pip-1.0-py3-none-any.whl"
