"""Compute profiling on the real agents: ``c_k(N) = a_k + b_k N`` per device.

Before a device serves its first trial, the runner times forward requests of one of its loaded
experts at several token counts (:data:`TOKENS`, :data:`REPEATS` times each, after one warm-up
request) and fits the line through the agent's own ``compute_ms`` by non-negative least squares
(:func:`testbed.policy.bandwidth.fit_compute_profile`). The samples go to ``profile.csv``,
the fit to the manifest's ``compute_profile`` and to ``ClusterState.compute_profile``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import TestbedError
from ..policy.bandwidth import fit_compute_profile

TOKENS = (1, 2, 4, 8, 16, 32)
REPEATS = 3


def bytes_per_token(hidden_size: int, element_bytes: int) -> int:
    """Payload of one token per direction: hidden size x bytes per element of the wire dtype."""
    if hidden_size < 1 or element_bytes < 1:
        raise ValueError(
            f"hidden_size ({hidden_size}) and element_bytes ({element_bytes}) must be >= 1"
        )
    return int(hidden_size) * int(element_bytes)


def fit_profiles(samples: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per device, the fit of ``compute_ms`` against ``tokens`` over its samples (pure).

    Returns device -> ``{"a_ms", "b_ms", "rmse_ms", "samples", "tokens"}`` (``tokens``: the
    distinct token counts timed). Samples without a ``compute_ms`` are skipped.
    """
    by_dev: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        ms = s.get("compute_ms")
        if ms is None or not math.isfinite(float(ms)):
            continue
        by_dev.setdefault(str(s["device"]), []).append((float(s["tokens"]), float(ms)))
    out: dict[str, dict[str, Any]] = {}
    for dev, pts in sorted(by_dev.items()):
        a, b = fit_compute_profile(pts)
        rmse = math.sqrt(sum((a + b * n - y) ** 2 for n, y in pts) / len(pts))
        out[dev] = {
            "a_ms": a,
            "b_ms": b,
            "rmse_ms": rmse,
            "samples": len(pts),
            "tokens": sorted({int(n) for n, _ in pts}),
        }
    return out


def profile_device(
    backend: Any,
    device: str,
    uid: str,
    hidden_size: int,
    dtype: Any,
    tokens: Sequence[int] = TOKENS,
    repeats: int = REPEATS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time ``forward`` requests of expert ``uid`` on ``device`` (a
    :class:`~testbed.dataplane.backend.RemoteExpertBackend`) at each token count.

    Returns one sample per request: ``device``, ``expert``, ``tokens``, ``repeat``,
    ``compute_ms`` (the agent's), ``device_ms`` (agent receipt -> reply), ``rtt_ms``.
    """
    import torch

    from device_agent import protocol as P

    gen = torch.Generator().manual_seed(seed)
    name = P.dtype_name(dtype)
    out: list[dict[str, Any]] = []
    for rep, n in [(-1, tokens[0])] + [(r, n) for n in tokens for r in range(repeats)]:
        x = torch.randn(n, hidden_size, generator=gen).to(dtype)
        t0 = time.perf_counter()
        h, _ = backend.request(
            device, "forward", frames=[P.tensor_buffer(x)], t=[[uid, name, [n, hidden_size]]]
        )
        rtt = (time.perf_counter() - t0) * 1e3
        if h.get("errors"):
            raise TestbedError(f"{device}: profiling {uid}: {h['errors']}")
        if rep < 0:
            continue  # warm-up
        t1, t2 = h.get("t1_ns"), h.get("t2_ns")
        out.append(
            {
                "device": device,
                "expert": uid,
                "tokens": n,
                "repeat": rep,
                "compute_ms": float(h["compute_ms"]),
                "device_ms": (t2 - t1) / 1e6
                if isinstance(t1, int) and isinstance(t2, int)
                else None,
                "rtt_ms": rtt,
            }
        )
    return out


#: profiling through the BS's exchange: experts per call timed, and whether every device is
#: also timed at once (the devices share the host's cores on a local testbed)
LAYER_EXPERTS = (1, 2)
#: idle time before each profiled exchange: a run's layers are apart by the BS's own work, 1-3.5 ms
#: in the demo and wdmoe.toml (a 1-token tiny-model exchange took 1.3 ms after 5 ms idle, 0.9 in
#: the run)
GAP_S = 0.002
#: a profiled exchange that failed (a device's connection renewed, or in its back-off) is
#: tried again this many times, after its devices are up again (at most RETRY_WAIT_S each);
#: a device whose exchanges still fail (an agent killed) is left out of the rest of the
#: profiling, as one failing device never aborts a run (its calls are recorded as they fail)
RETRIES = 2
RETRY_WAIT_S = 5.0


def _wait_up(backend: Any, plan: Mapping[str, Any], budget_s: float) -> None:
    end = time.monotonic() + budget_s
    is_up = getattr(backend, "is_up", None)
    while is_up is not None and time.monotonic() < end and not all(is_up(d) for d in plan):
        time.sleep(0.05)


#: token counts at which devices are also profiled together (a decode step's few rows per
#: expert and a short prompt's)
TOGETHER_TOKENS = (1, 2, 4, 8)


def profile_exchanges(
    backend: Any,
    experts_by_device: Mapping[str, Sequence[str]],
    hidden_size: int,
    dtype: Any,
    tokens: Sequence[int] = TOKENS,
    repeats: int = REPEATS,
    experts: Sequence[int] = LAYER_EXPERTS,
    together: bool = True,
    gap_s: float = GAP_S,
    seed: int = 0,
    together_tokens: Sequence[int] = TOGETHER_TOKENS,
    start_id: int = 0,
) -> list[dict[str, Any]]:
    """Time expert exchanges through ``backend.run_layer`` -- the path a run's layers take,
    what ``layers.csv``'s ``moe_ms`` measures -- for the calibrated latency model
    (:func:`testbed.policy.latency_model.fit_layer_costs`).

    For each token count and repeat (one warm-up exchange first): each device alone with
    ``e`` of its experts for every ``e`` in ``experts`` (as many as it holds), and with
    ``together`` (at the ``together_tokens`` counts) neighbouring devices two at a time (with
    more than two devices) and every device at once, one expert each (:func:`exchange_plans`).
    ``backend.placement`` must map the uids to their devices.
    ``gap_s``: a pause before each exchange, as a run's layers have between them (the BS's own
    work): the agents and the BS wait idle for the next call, which costs more than calls back
    to back (measured here: 0.15-0.3 ms per call after 3-10 ms idle), and a shaped link's
    bucket refills.

    Returns one sample per call: ``device``, ``expert`` (the uids, space-separated),
    ``experts``, ``tokens`` (rows per expert), ``rows`` (the call's rows), ``repeat``,
    ``layer`` (exchange id, from ``start_id``), ``devices`` (called in that exchange),
    ``compute_ms`` (the agent's, all experts), ``device_ms`` (agent receipt -> reply),
    ``rtt_ms`` (send -> reply, at the BS), ``serialize_ms`` and ``layer_ms`` (the exchange's
    wall time).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    plans, shared = exchange_plans(experts_by_device, experts, together)
    out: list[dict[str, Any]] = []
    lost: set[str] = set()  # devices left out: their exchanges failed RETRIES + 1 times
    lid = start_id
    for rep, n in [(-1, tokens[0])] + [(r, n) for n in tokens for r in range(repeats)]:
        for plan in plans + (shared if n in together_tokens else []):
            if lost.intersection(plan):
                continue
            inputs = {
                u: torch.randn(n, hidden_size, generator=gen).to(dtype)
                for uids in plan.values()
                for u in uids
            }
            if gap_s:
                time.sleep(gap_s)
            res, layer_ms = timed_exchange(backend, lid, inputs, plan, lost)
            lid += 1
            if rep < 0 or res.failed:
                continue  # warm-up, or a device lost
            out += exchange_samples(
                res.info["calls"],
                {"tokens": n, "repeat": rep, "layer": lid - 1, "devices": len(plan)},
                layer_ms,
            )
    return out


def exchange_plans(
    experts_by_device: Mapping[str, Sequence[str]], experts: Sequence[int], together: bool
) -> tuple[list[dict[str, list[str]]], list[dict[str, list[str]]]]:
    """The exchanges :func:`profile_exchanges` times, as device -> uids: each device alone with
    ``e`` of its experts for every ``e`` in ``experts`` (as many as it holds); and, with
    ``together``, the plans with several devices (neighbours two at a time with more than two
    devices, then every device at once; one expert each)."""
    plans: list[dict[str, list[str]]] = []
    shared: list[dict[str, list[str]]] = []  # the plans with several devices
    for e in experts:
        for d, uids in experts_by_device.items():
            if len(uids) >= e:
                plans.append({d: list(uids[:e])})
    if together and len(experts_by_device) > 1:
        devs = [d for d, uids in experts_by_device.items() if uids]
        if len(devs) > 2:  # neighbours two at a time: the usual decode step's exchange
            shared += [
                {d: list(experts_by_device[d][:1]) for d in devs[i : i + 2]}
                for i in range(len(devs) - 1)
            ]
        shared.append({d: list(experts_by_device[d][:1]) for d in devs})
    return plans, shared


def timed_exchange(
    backend: Any, lid: int, inputs: dict[str, Any], plan: Mapping[str, Any], lost: set[str]
) -> tuple[Any, float]:
    """One exchange through ``backend.run_layer`` and its wall time in ms, tried again up to
    :data:`RETRIES` times after its devices are up again; the devices still failing after
    that are added to ``lost``."""
    from models.backend import LayerWork

    for attempt in range(RETRIES + 1):
        t0 = time.perf_counter()
        res = backend.run_layer(LayerWork(-1, lid, inputs))
        layer_ms = (time.perf_counter() - t0) * 1e3
        if not res.failed:
            break
        if attempt == RETRIES:
            lost.update(d for d, uids in plan.items() if any(u in res.failed for u in uids))
            break
        # a connection renewed after the last trial's slow links, or a device in its
        # back-off: wait until every device of the plan is up again, then retry
        _wait_up(backend, plan, RETRY_WAIT_S)
    return res, layer_ms


def exchange_samples(
    calls: Iterable[Mapping[str, Any]], exchange: Mapping[str, Any], layer_ms: float
) -> list[dict[str, Any]]:
    """One sample per request of an exchange from its call rows (``LayerResult.info["calls"]``):
    ``exchange``'s ``tokens``, ``repeat``, ``layer`` and ``devices``, the request's experts
    and rows, the agent's compute summed over them, the request's timings, ``layer_ms``."""
    rows: dict[Any, dict[str, Any]] = {}
    for c in calls:
        k = c.get("req_id")
        row = rows.setdefault(
            k,
            {
                "device": c["device"],
                "expert": [],
                "experts": 0,
                "tokens": exchange["tokens"],
                "rows": 0,
                "repeat": exchange["repeat"],
                "layer": exchange["layer"],
                "devices": exchange["devices"],
                "compute_ms": 0.0,
                "device_ms": c.get("device_ms"),
                "rtt_ms": c.get("rtt_ms"),
                "serialize_ms": c.get("serialize_ms"),
                "layer_ms": layer_ms,
            },
        )
        row["expert"].append(c["uid"])
        row["experts"] += 1
        row["rows"] += int(c["tokens"])
        row["compute_ms"] += float(c.get("compute_ms") or 0.0)
    for row in rows.values():
        row["expert"] = " ".join(row["expert"])
    return list(rows.values())
