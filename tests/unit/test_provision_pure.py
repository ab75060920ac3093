"""Pure parts of provisioning: device checks (parse + verdict), placement split, pip and agent
command builders, endpoints, inventory fields reuse_packages / agent_port."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import testbed.lab.provision as provision_pkg
from testbed import ROOT
from testbed.errors import ConfigError
from testbed.lab.inventory import Device, load_inventory, render_inventory
from testbed.lab.provision import (
    FACTS_PY,
    HASH_CACHE,
    HASH_PY,
    PROJECT_PACKAGES,
    DeviceFacts,
    Layout,
    agent_argv,
    agent_is_ours,
    check_facts,
    connect_endpoint,
    install_key,
    parse_facts,
    pip_download_argv,
    pip_platforms,
    place_experts,
    shards_per_device,
    source_files,
)

DEV = Device(
    name="orin1",
    host="192.168.50.11",
    ssh_user="nvidia",
    workdir="/home/nvidia/tb",
    python="/usr/bin/python3",
    hw_class="orin-nx",
    memory_budget_mb=8000,
    reuse_packages=("torch",),
)


def facts(**kw) -> DeviceFacts:
    base = {
        "system": "Linux",
        "machine": "aarch64",
        "python": (3, 10, 12),
        "implementation": "CPython",
        "libc": ("glibc", "2.35"),
        "executable": "/usr/bin/python3",
        "workdir": "/home/nvidia/tb",
        "free_bytes": 10 << 30,
        "writable": True,
        "reuse": {"torch": {"path": "/usr/lib/python3/dist-packages", "version": "2.3.0"}},
    }
    base.update(kw)
    return DeviceFacts(**base)


RAW = {
    "system": "Linux",
    "machine": "aarch64",
    "python": [3, 10, 12],
    "implementation": "CPython",
    "libc": ["glibc", "2.35"],
    "executable": "/usr/bin/python3",
    "workdir": "/home/nvidia/tb",
    "free_bytes": 123456789,
    "writable": True,
    "reuse": {"torch": {"path": "/usr/lib/python3/dist-packages", "version": "2.3.0"}},
    "installed": '{"key": "abc"}',
    "agent_state": None,
    "ready": "not json",
    "pid": "4242\n",
    "venv_python": True,
    "cmdline": ["/w/venv/bin/python", "-m", "device_agent"],
}


def test_parse_facts_reads_every_field_and_tolerates_noise_before_the_json():
    f = parse_facts("motd line\n" + json.dumps(RAW) + "\n")
    assert (f.system, f.machine, f.python, f.python_tag) == (
        "Linux",
        "aarch64",
        (3, 10, 12),
        "3.10",
    )
    assert f.free_bytes == 123456789 and f.writable and f.venv_python
    assert f.installed == {"key": "abc"} and f.ready is None and f.agent_state is None
    assert f.pid == 4242 and f.cmdline == ("/w/venv/bin/python", "-m", "device_agent")
    assert f.reuse["torch"]["version"] == "2.3.0"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Traceback (most recent call last):\n  boom",
        json.dumps({k: v for k, v in RAW.items() if k != "python"}),
    ],
)
def test_parse_facts_rejects_output_without_the_facts(text):
    with pytest.raises(ValueError):
        parse_facts(text)


def test_facts_script_runs_on_this_python_and_parses(tmp_path):
    wd = tmp_path / "not" / "yet"
    spec = {"reuse": [["numpy", "numpy"], ["pyzmq", "zmq"], ["nosuchpkg", "nosuchpkg"]]}
    out = subprocess.run(
        [sys.executable, "-c", FACTS_PY, str(wd), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    f = parse_facts(out)
    assert f.workdir == str(wd) and f.free_bytes > 0 and f.writable and f.pid is None
    assert f.python == tuple(sys.version_info[:3])
    import numpy

    assert Path(numpy.__file__).parent.parent == Path(f.reuse["numpy"]["path"])
    assert f.reuse["pyzmq"]["path"] and f.reuse["nosuchpkg"] is None
    assert not wd.exists()  # the check changes nothing


PROBES = Path(provision_pkg.__file__).parent


@pytest.mark.parametrize("probe", ["facts_probe.py", "hash_probe.py"])
def test_probes_parse_on_python_3_6_and_are_never_imported(probe):
    src = (PROBES / probe).read_text()
    ast.parse(src, probe, feature_version=(3, 6))  # the device's python may be that old
    assert 'if __name__ == "__main__":' in src
    for mod in PROBES.glob("*.py"):
        for node in ast.walk(ast.parse(mod.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(probe[:-3] in n for n in names), f"{mod.name} imports {probe}"


def test_hash_script_hashes_and_caches_by_size_and_mtime(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")

    def hashes(*names):
        argv = [sys.executable, "-c", HASH_PY, str(tmp_path), json.dumps(dict.fromkeys(names, ""))]
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)

    sha = hashlib.sha256(b"abc").hexdigest()
    assert hashes("a.bin", "missing") == {"a.bin": sha, "missing": None}
    cache = json.loads((tmp_path / HASH_CACHE).read_text())
    assert list(cache) == ["a.bin"] and cache["a.bin"][0] == 3 and cache["a.bin"][2] == sha
    # the cache is believed while size and mtime match
    st = (tmp_path / "a.bin").stat()
    cache["a.bin"][2] = "cached"
    (tmp_path / HASH_CACHE).write_text(json.dumps(cache))
    assert hashes("a.bin") == {"a.bin": "cached"}
    (tmp_path / "a.bin").write_bytes(b"abcd")
    os.utime(tmp_path / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert hashes("a.bin") == {"a.bin": hashlib.sha256(b"abcd").hexdigest()}


def test_project_wheel_sources_cover_every_package():
    files = {str(p) for p in source_files(ROOT)}
    for pkg in PROJECT_PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                assert str(init.relative_to(ROOT)) in files
    assert "testbed/lab/provision/facts_probe.py" in files
    assert "testbed/lab/provision/hash_probe.py" in files


@pytest.mark.parametrize(
    "change, need, expect",
    [
        ({}, 0, []),
        ({"machine": "arm64"}, 0, []),
        ({"system": "Darwin"}, 0, ["OS Darwin is not supported"]),
        ({"machine": "armv7l"}, 0, ["architecture armv7l is not supported"]),
        ({"python": (3, 7, 3)}, 0, ["python /usr/bin/python3 is 3.7.3, need >= 3.8"]),
        ({"python": (3, 8, 10)}, 0, []),
        ({"implementation": "PyPy"}, 0, ["is PyPy, need CPython"]),
        ({"writable": False}, 0, ["workdir /home/nvidia/tb is not writable by nvidia"]),
        (
            {"reuse": {"torch": None}},
            0,
            ["reuse_packages: torch not importable by /usr/bin/python3"],
        ),
        (
            {"free_bytes": 50_000_000},
            200_000_000,
            ["disk full: 50 MB free at /home/nvidia/tb, need 200 MB"],
        ),
        ({"free_bytes": 500_000_000}, 200_000_000, []),
    ],
)
def test_check_facts(change, need, expect):
    problems = check_facts(facts(**change), DEV, need)
    assert len(problems) == len(expect), problems
    for p, e in zip(problems, expect):
        assert e in p, (p, e)


def test_shards_per_device_inverts_a_placement_with_replicas():
    placement = {"L0.E1": ("b",), "L0.E0": ("a", "b"), "L1.E0": ("c",)}
    assert shards_per_device(placement, ["a", "b", "c", "d"]) == {
        "a": ["L0.E0"],
        "b": ["L0.E0", "L0.E1"],
        "c": ["L1.E0"],
        "d": [],
    }
    with pytest.raises(ConfigError, match="L1.E0 placed on unknown device 'c'"):
        shards_per_device(placement, ["a", "b"])


def _manifest(layers: int, experts: int):
    ex = {
        f"L{lay}.E{e}": SimpleNamespace(bytes=100) for lay in range(layers) for e in range(experts)
    }
    return SimpleNamespace(
        experts=ex,
        uids=lambda: sorted(ex, key=lambda u: (int(u[1:].split(".")[0]), int(u.split(".E")[1]))),
    )


def test_round_robin_placement_spreads_every_layer_over_all_devices():
    devs = [replace(DEV, name=f"d{i}") for i in range(3)]
    per = shards_per_device(place_experts(_manifest(2, 4), devs), [d.name for d in devs])
    assert per == {
        "d0": ["L0.E0", "L0.E3", "L1.E2"],
        "d1": ["L0.E1", "L1.E0", "L1.E3"],
        "d2": ["L0.E2", "L1.E1"],
    }
    rnd = place_experts(_manifest(2, 4), devs, "random", seed=3)
    assert rnd == place_experts(_manifest(2, 4), devs, "random", seed=3)
    assert set(rnd) == set(_manifest(2, 4).experts)
    with pytest.raises(ConfigError, match="unknown placement 'nope'"):
        place_experts(_manifest(1, 2), devs, "nope")


def test_pip_download_for_the_device_platform_and_python():
    assert pip_platforms(facts()) == [
        "manylinux_2_35_aarch64",
        "manylinux2014_aarch64",
        "linux_aarch64",
    ]
    assert pip_platforms(facts(machine="x86_64", libc=("", ""))) == [
        "manylinux2014_x86_64",
        "linux_x86_64",
    ]
    argv = pip_download_argv(facts(), ["numpy", "pyzmq"], "/c/deps", python="py")
    assert argv[:4] == ["py", "-m", "pip", "download"]
    assert "--only-binary=:all:" in argv and argv[argv.index("-d") + 1] == "/c/deps"
    assert argv[argv.index("--python-version") + 1] == "3.10"
    from testbed.lab.provision.wheels import compatible_platforms

    # every manylinux level up to the device's glibc (aarch64 torch is manylinux_2_28)
    plats = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert plats == compatible_platforms(pip_platforms(facts()))
    assert {"manylinux_2_35_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64"} <= set(
        plats
    )
    assert argv[-2:] == ["numpy", "pyzmq"]


def test_agent_argv_binds_the_device_address_and_is_recognised_as_ours():
    lay = Layout("/w")
    argv = agent_argv(replace(DEV, agent_port=0), lay)
    assert argv[:4] == ["/w/venv/bin/python", "-m", "device_agent", "serve"]
    assert argv[argv.index("--bind") + 1] == "tcp://192.168.50.11:*"
    assert argv[argv.index("--ready-file") + 1] == "/w/agent.ready.json"
    assert "--threads" not in argv and "--meter" not in argv  # a real device: auto-detected
    assert argv[argv.index("--curve-dir") + 1] == "/w/curve"  # CURVE unless told otherwise
    assert "--curve-dir" not in agent_argv(DEV, lay, curve=False)
    # perception: status published on a >10% move, at least every 2 s (CoEL's hello)
    assert (
        argv[argv.index("--hello-s") + 1] == "0.5"
        and argv[argv.index("--hello-delta") + 1] == "0.1"
    )
    assert argv[argv.index("--hello-keepalive-s") + 1] == "2"
    assert agent_is_ours(argv, lay) and not agent_is_ours(argv, Layout("/other"))
    assert not agent_is_ours(None, lay) and not agent_is_ours(["sleep", "/w/agent.ready.json"], lay)
    ns = agent_argv(replace(DEV, hw_class="netns", agent_port=5555), lay)
    assert ns[ns.index("--bind") + 1] == "tcp://192.168.50.11:5555"
    assert ns[ns.index("--threads") + 1] == "1" and ns[ns.index("--meter") + 1] == "estimated"
    named = agent_argv(replace(DEV, host="orin1.lab", agent_port=0), lay)
    assert named[named.index("--bind") + 1] == "tcp://0.0.0.0:*"
    assert connect_endpoint("tcp://0.0.0.0:4000", "orin1.lab") == "tcp://orin1.lab:4000"
    assert connect_endpoint("tcp://10.0.0.2:4000", "x") == "tcp://10.0.0.2:4000"
    assert connect_endpoint(None, "x") is None


def test_install_key_changes_with_sources_wheels_reuse_and_python():
    base = ("src1", ["pip-23.whl"], {"torch": {"path": "/a"}}, "/usr/bin/python3")
    k = install_key(*base)
    assert k == install_key(*base)
    for i, other in enumerate(("src2", ["pip-24.whl"], {"torch": {"path": "/b"}}, "/py")):
        args = list(base)
        args[i] = other
        assert install_key(*args) != k


def test_source_files_skip_caches(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "device_agent" / "__pycache__").mkdir(parents=True)
    (tmp_path / "device_agent" / "__init__.py").write_text("")
    (tmp_path / "device_agent" / "__pycache__" / "x.pyc").write_text("")
    (tmp_path / "device_agent" / ".hidden").write_text("")
    assert source_files(tmp_path, ("device_agent",)) == [
        Path("pyproject.toml"),
        Path("device_agent/__init__.py"),
    ]


INV = """
[testbed]
name = "lab"
[bs]
name = "bs"
host = "10.0.0.1"
interface = "eth1"
[[devices]]
name = "orin1"
host = "10.0.0.11"
ssh_user = "nvidia"
workdir = "/home/nvidia/tb"
python = "/usr/bin/python3"
hw_class = "orin-nx"
memory_budget_mb = 8000
{extra}
"""


def test_inventory_reuse_packages_and_agent_port_round_trip(tmp_path):
    p = tmp_path / "inv.toml"
    p.write_text(INV.format(extra='reuse_packages = ["torch", "numpy"]\nagent_port = 5555'))
    inv = load_inventory(p)
    d = inv.devices[0]
    assert d.reuse_packages == ("torch", "numpy") and d.agent_port == 5555
    again = tmp_path / "again.toml"
    again.write_text(
        render_inventory("lab", "", inv.bs, list(inv.devices)).replace('known_hosts = ""\n', "")
    )
    assert load_inventory(again).devices == inv.devices
    p.write_text(INV.format(extra=""))
    assert load_inventory(p).devices[0].reuse_packages == ()
    assert load_inventory(p).devices[0].agent_port == 5555  # fixed by default (firewalls)
    p.write_text(INV.format(extra="agent_port = 0"))
    assert load_inventory(p).devices[0].agent_port == 0  # any free port


@pytest.mark.parametrize(
    "extra, msg",
    [
        ('reuse_packages = "torch"', "devices[0].reuse_packages: must be a list of package names"),
        (
            'reuse_packages = ["torch", "bad name"]',
            "devices[0].reuse_packages[1]: not a package name",
        ),
        (
            'reuse_packages = ["torch", "Torch"]',
            "devices[0].reuse_packages[1]: 'Torch' listed twice",
        ),
        ("agent_port = 70000", "devices[0].agent_port: must be an integer port"),
        ("agent_port = true", "devices[0].agent_port: must be an integer port"),
    ],
)
def test_inventory_rejects_bad_new_fields_naming_file_and_field(tmp_path, extra, msg):
    p = tmp_path / "inv.toml"
    p.write_text(INV.format(extra=extra))
    with pytest.raises(ConfigError) as ei:
        load_inventory(p)
    assert any(str(p) in line and msg in line for line in ei.value.problems), ei.value.problems
