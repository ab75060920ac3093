"""The device preflight's pure parts: the L4T release file, the JetPack version, the summary
recorded per device (its JSON shape), the refusal of a Jetson without CUDA and of a broken
torch<->numpy pair (the one line and its fix), the status table's cells; and the device-side
module on this python (its JSON, the workdir's release file read first)."""

from __future__ import annotations

import json

import pytest

from device_agent import preflight as device_preflight
from testbed.cli.agents import _preflight_cells
from testbed.lab.provision import (
    CUDA_FIX,
    INTEROP_FIX,
    MIN_PYTHON,
    jetpack_version,
    parse_nv_tegra_release,
    preflight_argv,
    preflight_refusal,
    preflight_summary,
)

JP5 = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
    "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)
JP6 = "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: x\n"


def raw(**kw) -> dict:
    """A preflight JSON as the device prints it: a Jetson with JetPack's CPU-only torch."""
    out = {
        "preflight": 1,
        "python": [3, 8, 10],
        "executable": "/home/nvidia/tb/venv/bin/python",
        "l4t": {
            "source": "/etc/nv_tegra_release",
            "text": JP5.splitlines()[0],
            "jetpack_deb": None,
        },
        "torch": {
            "version": "2.1.0+cpu",
            "cuda_build": None,
            "git_version": "abc",
            "cuda_available": False,
            "device_name": None,
            "error": None,
        },
        "numpy": {"version": "1.24.4", "error": None},
        "interop": {"ok": True, "error": None, "notes": []},
    }
    for k, v in kw.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and out.get(k) else v
    return out


@pytest.mark.parametrize(
    "text, want",
    [
        (JP5, "R35.4.1"),
        (JP6, "R36.3.0"),
        ("# R32 (release), REVISION: 7.4, GCID: 1, BOARD: t210ref", "R32.7.4"),
        ("", None),
        ("garbage\n", None),
    ],
)
def test_parse_nv_tegra_release(text, want):
    assert parse_nv_tegra_release(text) == want


@pytest.mark.parametrize(
    "l4t, deb, want",
    [
        ("R35.4.1", "5.1.2-b104", "5.1.2"),
        ("R36.3.0", "6.0+b106", "6.0"),
        ("R35.4.1", None, "5"),
        ("R36.4.0", None, "6"),
        ("R32.7.4", None, "4"),
        ("R99.1", None, None),
        (None, None, None),
    ],
)
def test_jetpack_version(l4t, deb, want):
    assert jetpack_version(l4t, deb) == want


def test_summary_shape_is_the_same_with_and_without_a_preflight():
    s = preflight_summary(raw())
    assert s == {
        "python": "3.8.10",
        "l4t": "R35.4.1",
        "jetpack": "5",
        "l4t_source": "/etc/nv_tegra_release",
        "torch": {
            "version": "2.1.0+cpu",
            "cuda_build": None,
            "cuda_available": False,
            "device_name": None,
            "git_version": "abc",
            "error": None,
        },
        "numpy": "1.24.4",
        "interop_ok": True,
        "interop_error": None,
        "interop_notes": [],
    }
    empty = preflight_summary(None)
    assert set(empty) == set(s) and set(empty["torch"]) == set(s["torch"])
    assert empty["l4t"] is None and empty["torch"]["version"] is None
    # a release file that says nothing parseable still marks a Jetson
    odd = preflight_summary(raw(l4t={"text": "who knows"}))
    assert odd["l4t"] == "unknown release" and odd["jetpack"] is None
    assert preflight_summary(raw(l4t=None))["l4t"] is None
    json.dumps(s)  # what the manifest and --format json carry


def test_cpu_only_torch_on_a_jetson_is_refused_naming_host_and_fix():
    line = preflight_refusal(preflight_summary(raw()), "10.0.0.5", allow_cpu=False)
    assert line == (
        "L4T R35.4.1 (JetPack 5) on 10.0.0.5 but torch 2.1.0+cpu has no CUDA (a CPU-only "
        f"build); {CUDA_FIX}"
    )
    assert 'reuse_packages = ["torch", "numpy"]' in line and "--allow-cpu" in line
    assert "\n" not in line
    assert preflight_refusal(preflight_summary(raw()), "10.0.0.5", allow_cpu=True) is None


@pytest.mark.parametrize(
    "change, allow_cpu, want",
    [
        ({"l4t": None}, False, None),  # a CPU torch off a Jetson: fine
        (
            {"torch": {"version": "2.1.0", "cuda_build": "11.4", "cuda_available": True}},
            False,
            None,
        ),
        (
            {"torch": {"version": "2.1.0", "cuda_build": "11.4", "cuda_available": False}},
            False,
            "but torch 2.1.0 (built for CUDA 11.4) finds no CUDA device; check that the ssh user",
        ),
        (
            {"torch": {"version": None, "error": "ModuleNotFoundError: No module named 'torch'"}},
            False,
            "but torch does not import in the agent's venv (ModuleNotFoundError",
        ),
        (
            {"interop": {"ok": False, "error": "RuntimeError: Numpy is not available"}},
            True,
            (
                "torch 2.1.0+cpu and numpy 1.24.4 on h cannot exchange arrays (torch.from_numpy: "
                f"RuntimeError: Numpy is not available); {INTEROP_FIX}"
            ),
        ),
        (
            {
                "l4t": None,
                "interop": {
                    "ok": False,
                    "error": "RuntimeError: Numpy is not available",
                    "notes": ["A module that was compiled using NumPy 1.x cannot be run in"],
                },
            },
            False,
            (
                "(torch.from_numpy: RuntimeError: Numpy is not available; torch was built "
                "against another NumPy major); use the numpy that torch was built against"
            ),
        ),
    ],
)
def test_refusal_cases(change, allow_cpu, want):
    line = preflight_refusal(preflight_summary(raw(**change)), "h", allow_cpu)
    if want is None:
        assert line is None
    else:
        assert line is not None and want in line, line


def test_min_python_is_jetpack5s():
    assert MIN_PYTHON == (3, 8)


def test_preflight_argv_runs_the_venv_python_in_the_workdir():
    argv = preflight_argv("/w d/venv/bin/python", "/w d")
    assert argv[:2] == ["sh", "-c"] and argv[-2:] == ["/w d", "/w d/venv/bin/python"]
    assert "-m device_agent.preflight" in argv[2]


@pytest.mark.parametrize(
    "change, cells",
    [
        ({}, ("2.1.0+cpu", "no: CPU-only build", "R35.4.1 (JetPack 5)")),
        (
            {
                "l4t": {"jetpack_deb": "5.1.2-b104"},
                "torch": {"cuda_build": "11.4", "cuda_available": True, "device_name": "Orin"},
            },
            ("2.1.0+cpu", "Orin", "R35.4.1 (JetPack 5.1.2)"),
        ),
        (
            {"l4t": None, "torch": {"cuda_build": "12.1"}},
            ("2.1.0+cpu", "no (CUDA 12.1 build)", "-"),
        ),
    ],
)
def test_status_cells(change, cells):
    assert _preflight_cells(preflight_summary(raw(**change))) == cells


def test_device_preflight_reads_the_workdirs_release_file_first(tmp_path, capsys):
    (tmp_path / device_preflight.WORKDIR_RELEASE).write_text(JP6)
    assert device_preflight.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    got = json.loads(out)
    import numpy
    import torch

    assert got["l4t"]["source"] == str(tmp_path / "nv_tegra_release")
    assert preflight_summary(got)["l4t"] == "R36.3.0"
    assert got["torch"]["version"] == torch.__version__
    assert got["torch"]["cuda_build"] == torch.version.cuda
    assert got["torch"]["cuda_available"] == torch.cuda.is_available()
    assert got["numpy"] == {"version": numpy.__version__, "error": None}
    assert got["interop"]["ok"] is True


def test_device_preflight_without_a_release_file_and_without_torch(tmp_path):
    got = device_preflight.preflight(str(tmp_path))
    import os

    if not os.path.exists(device_preflight.NV_TEGRA_RELEASE):
        assert got["l4t"] is None
    assert device_preflight.interop(False, True) == {"ok": None, "error": None}
