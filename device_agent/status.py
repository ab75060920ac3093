"""The agent's status: its request counters and the live-state report (``status`` replies and
the PUB feed).

See :meth:`StatusReport.build` for the fields. Python 3.8 (the device side); no ``testbed``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from device_agent import protocol as P
from device_agent.energy import Meter, Reading
from device_agent.protocol import ErrorCode


@dataclass
class Counters:
    """What the agent has served since it started (the status's ``load`` section)."""

    requests: int = 0
    errors: int = 0
    forward_calls: int = 0
    rows: int = 0
    lm_calls: int = 0  #: ``lm`` requests served (whole models)
    by_code: dict[int, int] = field(default_factory=dict)

    def count_error(self, code: ErrorCode) -> None:
        """Count one error reply (a whole request's, or one entry's inside a request)."""
        self.errors += 1
        self.by_code[int(code)] = self.by_code.get(int(code), 0) + 1


def meminfo() -> dict[str, int]:
    """``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo`` in bytes (empty where unreadable)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def rss_bytes() -> int | None:
    """This process's resident set size in bytes (``None`` where unreadable)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_section(device: str) -> dict[str, Any]:
    """The status's ``memory`` section: RSS, the host's memory and, on CUDA, the GPU's."""
    mem = meminfo()
    memory: dict[str, Any] = {
        "rss_bytes": rss_bytes(),
        "total_bytes": mem.get("MemTotal"),
        "available_bytes": mem.get("MemAvailable"),
    }
    if device.startswith("cuda"):
        free_b, total_b = torch.cuda.mem_get_info()
        memory.update(
            cuda_allocated_bytes=torch.cuda.memory_allocated(),
            cuda_free_bytes=free_b,
            cuda_total_bytes=total_b,
        )
    return memory


def load_section(counters: Counters, queue_len: int) -> dict[str, Any]:
    """The status's ``load`` section: the host's load average, the queue and the counters."""
    c = counters
    return {
        "loadavg_1m": os.getloadavg()[0],
        "queue_len": queue_len,
        "requests": c.requests,
        "errors": c.errors,
        "forward_calls": c.forward_calls,
        "rows": c.rows,
        "lm_calls": c.lm_calls,
        "errors_by_code": {str(k): v for k, v in c.by_code.items()},
    }


class StatusReport:
    """Builds the agent's status from its parts; keeps the reference reading of the average
    power (see :meth:`energy`).

    ``first`` is the meter's first reading (taken when the agent started); ``endpoint``,
    ``device``, ``started_ns`` and ``max_message_bytes`` are the agent's fixed facts."""

    def __init__(
        self,
        meter: Meter,
        first: Reading,
        status_period_s: float,
        *,
        endpoint: str,
        device: str,
        started_ns: int,
        max_message_bytes: int,
        models: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.meter = meter
        self.status_period_s = status_period_s
        self.endpoint = endpoint
        self.device = device
        self.started_ns = started_ns
        self.max_message_bytes = max_message_bytes
        #: the whole models' description (:meth:`device_agent.lm.ModelStore.describe`)
        self.models = models
        #: (t_ns, energy_j) the status's average power is taken from (see :meth:`energy`)
        self._power_ref = (first.t_ns, first.energy_j)

    def energy(self) -> dict[str, Any]:
        """``energy_j``, ``power_w``, ``energy_source`` for the status.

        From :meth:`Meter.latest` (no driver or file access where the meter samples in the
        background: an NVML energy query took 4 ms on a virtualised H200, too long for the
        serving loop every status period). ``power_w`` is the meter's own instant value where
        it has one; for the CPU-time estimate (and a meter without a power figure) it is the
        average since a reference reading renewed once it is older than the status period, so
        that back-to-back status reads do not report the power of the status code itself."""
        r = self.meter.latest()
        p = r.power_w
        if p is None or self.meter.estimated:
            t0, e0 = self._power_ref
            p = (r.energy_j - e0) / ((r.t_ns - t0) / 1e9) if r.t_ns > t0 else None
            if r.t_ns - t0 >= self.status_period_s * 1e9:
                self._power_ref = (r.t_ns, r.energy_j)
        return {"energy_j": r.energy_j, "power_w": p, "energy_source": self.meter.energy_source}

    def build(self, experts: dict[str, Any], counters: Counters, queue_len: int) -> dict[str, Any]:
        """The status, in this order: ``agent`` (pid, hostname, endpoint, protocol, device,
        threads, started_ns, uptime_s, max_message_bytes), ``experts`` (as given: see
        :meth:`device_agent.experts.ExpertStore.describe`), ``models`` (the whole models: the
        ``models`` callable given, see :meth:`device_agent.lm.ModelStore.describe`), ``memory``
        (:func:`memory_section`),
        ``load`` (:func:`load_section`), ``energy_j``, ``power_w``, ``energy_source``
        (:meth:`energy`), ``energy_meter`` (the meter's description), ``clock_ns``."""
        memory = memory_section(self.device)
        return {
            "agent": {
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "endpoint": self.endpoint,
                "protocol": P.PROTOCOL_VERSION,
                "device": self.device,
                "threads": torch.get_num_threads(),
                "started_ns": self.started_ns,
                "uptime_s": (time.time_ns() - self.started_ns) / 1e9,
                "max_message_bytes": self.max_message_bytes,
            },
            "experts": experts,
            "models": self.models() if self.models is not None else {},
            "memory": memory,
            "load": load_section(counters, queue_len),
            **self.energy(),
            "energy_meter": self.meter.describe(),
            "clock_ns": time.time_ns(),
        }
