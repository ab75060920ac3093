"""The agent's NVML meter against an independent figure: nvidia-smi's power.draw sampled by its
own process during the same window and integrated over time. Needs an NVIDIA GPU with NVML,
CUDA through torch, and nvidia-smi; skips naming what is missing (CI has no GPU).

The second test does the same through the agent: a real ``python -m device_agent serve``
process on CUDA with ``--meter nvml``, forward calls from a client, the agent's cumulative
``energy_j`` read by ``status`` at the window's ends.

Window: 3 s idle, 10 s of load (bf16 matrix products / forward calls), 3 s idle. The idle tail
is there because power.draw is a 1-second average on Ampere and newer GPUs: the whole load bump
lies inside the window for both figures, so the average's lag cannot move joules across its
ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from datetime import datetime
from typing import Any

import pytest

from device_agent.energy import PowerSampler, detect_meter, energy_between, trapezoid

LEAD_S, LOAD_S, TAIL_S = 3.0, 10.0, 3.0
# Largest relative difference allowed from nvidia-smi's joules. Measured on an H200: the meter
# read directly 1.0009 to 1.0103 (5 runs), its power sampled at 20 Hz 0.9985 to 1.0067 (4 runs),
# the agent 0.9951 to 1.0007 (4 runs; README: within 0.5%). About 3-4x the worst seen: a meter
# counting 4% high fails both tests (checked by mutation on an H200), the old 10% passed it.
METER_TOLERANCE = 0.03
AGENT_TOLERANCE = 0.02


def _require_gpu() -> tuple[Any, Any]:
    """(pynvml, torch) or a skip that quotes the actual error."""
    try:
        import pynvml
    except ImportError as e:
        pytest.skip(f"no NVIDIA GPU: nvidia-ml-py not installed ({e})")
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA GPU: {type(e).__name__}: {e}")
    if n < 1:
        pytest.skip("no NVIDIA GPU: NVML sees 0 devices")
    try:
        import torch
    except ImportError as e:
        pytest.skip(f"no NVIDIA GPU: torch not installed ({e})")
    if not torch.cuda.is_available():
        pytest.skip("no NVIDIA GPU: torch.cuda.is_available() is False")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU: nvidia-smi not on PATH (needed for the independent figure)")
    return pynvml, torch


class SmiSampler:
    """``nvidia-smi --query-gpu=timestamp,power.draw -lms 100`` in its own process; each line's
    own timestamp (wall clock) is mapped onto ``time.monotonic_ns()``."""

    def __init__(self, index: int = 0, period_ms: int = 100) -> None:
        self.samples: list[tuple[int, float]] = []
        self.bad_lines: list[str] = []
        self._offset_ns = time.time_ns() - time.monotonic_ns()
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "-i",
                str(index),
                "--query-gpu=timestamp,power.draw",
                "--format=csv,noheader,nounits",
                "-lms",
                str(period_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ts, watts = (x.strip() for x in line.split(","))
                wall = datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((int(wall * 1e9) - self._offset_ns, float(watts)))
            except ValueError:
                self.bad_lines.append(line.strip())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._t.join(5)


def test_nvml_meter_matches_nvidia_smi_power_integral():
    pynvml, torch = _require_gpu()
    meter = detect_meter(options={"only": ["nvml"], "nvml_indices": [0]})
    smi = SmiSampler(0)
    # a second, power-only figure from the same NVML source: exercises PowerSampler on hardware
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    gpu = pynvml.nvmlDeviceGetName(h)
    sampled = PowerSampler(lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1e3, 0.05).start()
    try:
        assert meter.source in ("nvml", "nvml-power"), meter.describe()
        assert meter.rails == ["gpu0"]
        time.sleep(1.0)  # nvidia-smi's first lines
        a, sa = meter.read(), sampled.sample()
        time.sleep(LEAD_S - 1.0)
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        end = time.monotonic() + LOAD_S
        products = 0
        while time.monotonic() < end:
            for _ in range(20):
                z = x @ y
            torch.cuda.synchronize()
            products += 20
        del x, y, z
        torch.cuda.empty_cache()
        time.sleep(TAIL_S)
        b, sb = meter.read(), sampled.sample()
        time.sleep(0.5)  # nvidia-smi samples past the window's end
    finally:
        smi.stop()
        sampled.stop()
        meter.close()
        pynvml.nvmlShutdown()
    meter_j = energy_between(a, b)
    sampled_j = energy_between(sa, sb)
    pts = sorted(smi.samples)
    assert len(pts) >= 10 * (LEAD_S + LOAD_S + TAIL_S) * 0.5, (len(pts), smi.bad_lines[:5])
    smi_j = trapezoid(pts, a.t_ns, b.t_ns)
    window_s = (b.t_ns - a.t_ns) / 1e9
    ratio = meter_j / smi_j
    report = {
        "meter_source": meter.source,
        "meter_j": round(meter_j, 2),
        "nvidia_smi_power_draw_j": round(smi_j, 2),
        "ratio": round(ratio, 4),
        "nvml_power_sampled_20hz_j": round(sampled_j, 2),
        "window_s": round(window_s, 3),
        "smi_samples": len(pts),
        "sampler_samples": sampled.samples,
        "sampler_errors": sampled.errors,
        "bf16_8192_products": products,
        "gpu": gpu.decode() if isinstance(gpu, bytes) else str(gpu),
    }
    print("ENERGY-CHECK " + json.dumps(report))
    if os.environ.get("ENERGY_GPU_REPORT"):
        with open(os.environ["ENERGY_GPU_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    # the load must have shown up at all, or agreement would be trivial
    assert meter_j / window_s > 1.2 * (pts[0][1] if pts else 0.0), report
    assert abs(ratio - 1) <= METER_TOLERANCE, report
    assert abs(sampled_j / smi_j - 1) <= METER_TOLERANCE, report


AGENT_HIDDEN, AGENT_INTER, AGENT_TOKENS = 4096, 14336, 4096


def test_agent_nvml_energy_over_forward_calls_matches_nvidia_smi(tmp_path):
    """A real ``python -m device_agent serve --device cuda --meter nvml`` runs one expert
    (4096 x 14336, stored fp16, computed in fp32 so that the GPU, not the loopback copy of the
    activations, is the bottleneck) for LOAD_S of forward calls from a RemoteExpertBackend; the
    agent's cumulative energy read by ``status`` before and after must agree within 2% with
    nvidia-smi's power.draw integrated over the same window (the status exchanges' midpoints)."""
    _, torch = _require_gpu()
    from safetensors.torch import save_file

    from models.backend import LayerWork
    from testbed.dataplane.backend import RemoteExpertBackend
    from testbed.lab.agents import start_agent, stop_agent
    from testbed.lab.runner import LocalRunner

    wd = tmp_path / "gpu-agent"
    (wd / "experts").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    h, f = AGENT_HIDDEN, AGENT_INTER
    save_file(
        {
            "w1": (torch.randn(f, h, generator=g) * h**-0.5).half(),
            "w2": (torch.randn(h, f, generator=g) * f**-0.5).half(),
            "w3": (torch.randn(f, h, generator=g) * h**-0.5).half(),
        },
        str(wd / "experts" / "L0.E0.safetensors"),
    )
    agent = start_agent(
        LocalRunner(),
        device="gpu",
        host="127.0.0.1",
        workdir=str(wd),
        pub=False,
        extra_args=["--device", "cuda", "--meter", "nvml", "--nvml-gpus", "0"],
    )
    be = RemoteExpertBackend({"gpu": agent.endpoint}, {"L0.E0": ["gpu"]}, timeout_s=60.0)
    smi = None
    try:
        be.connect()
        assert be.agents["gpu"].energy_source in ("measured:nvml:gpu0", "measured:nvml-power:gpu0")
        be.load_experts(
            "gpu",
            [
                {
                    "uid": "L0.E0",
                    "path": "experts/L0.E0.safetensors",
                    "dtype": "float32",
                    "io_dtype": "float16",
                }
            ],
        )
        x = torch.randn(AGENT_TOKENS, h).half()
        work = LayerWork(0, 0, {"L0.E0": x})
        assert not be.run_layer(work).failed  # warm-up: CUDA context, kernels
        smi = SmiSampler(0)
        time.sleep(1.0)  # nvidia-smi's first lines

        def status_energy() -> tuple[int, float]:
            t0 = time.monotonic_ns()
            st = be.status("gpu")
            return (t0 + time.monotonic_ns()) // 2, float(st["energy_j"])

        def ping_energy() -> float:  # what the runner reads at a request's ends (Meter.read)
            return float(be.request("gpu", "ping")[0]["energy_j"])

        pa = ping_energy()
        ta, ea = status_energy()
        time.sleep(LEAD_S - 1.0)
        calls: list[dict[str, Any]] = []
        end = time.monotonic() + LOAD_S
        while time.monotonic() < end:
            res = be.run_layer(work)
            assert not res.failed, res.failed
            calls += res.info["calls"]
        time.sleep(TAIL_S)
        tb, eb = status_energy()
        pb = ping_energy()
        time.sleep(0.5)  # nvidia-smi samples past the window's end
    finally:
        if smi is not None:
            smi.stop()
        be.close()
        stop_agent(agent)
    agent_j = eb - ea
    pts = sorted(smi.samples)
    assert len(pts) >= 10 * (LEAD_S + LOAD_S + TAIL_S) * 0.5, (len(pts), smi.bad_lines[:5])
    smi_j = trapezoid(pts, ta, tb)
    window_s = (tb - ta) / 1e9
    calls_j = sum(c["energy_j"] for c in calls)
    compute_s = sum(c["compute_ms"] for c in calls) / 1e3
    ratio = agent_j / smi_j
    ping_j = pb - pa
    report = {
        "agent_energy_source": calls[0]["energy_source"],
        "agent_status_j": round(agent_j, 2),
        "agent_ping_j": round(ping_j, 2),
        "nvidia_smi_power_draw_j": round(smi_j, 2),
        "ratio": round(ratio, 4),
        "window_s": round(window_s, 3),
        "forward_calls": len(calls),
        "calls_energy_j": round(calls_j, 2),
        "calls_compute_s": round(compute_s, 3),
        "idle_w_first_smi_sample": pts[0][1],
        "mean_w": round(agent_j / window_s, 1),
    }
    print("AGENT-ENERGY-CHECK " + json.dumps(report))
    if os.environ.get("ENERGY_GPU_AGENT_REPORT"):
        with open(os.environ["ENERGY_GPU_AGENT_REPORT"], "w") as fh:
            json.dump(report, fh, indent=1)
    assert len(calls) >= 20 and all(c["status"] == "ok" for c in calls), report
    # the load showed up (or agreement would be trivial), the compute windows hold part of it
    assert agent_j / window_s > 1.2 * pts[0][1], report
    assert 0 < calls_j < agent_j, report
    assert abs(ratio - 1) <= AGENT_TOLERANCE, report
    # the ping window encloses the status one by two loopback exchanges
    assert agent_j <= ping_j <= agent_j * 1.02 + 2.0, report
