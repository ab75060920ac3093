"""BS side of whole-model experts (MoE², arXiv 2501.09410): load a whole small LM on a device
agent and run it on a prompt.

Every call goes over a :class:`~testbed.dataplane.backend.RemoteExpertBackend`'s connection to
the device (:meth:`~testbed.dataplane.backend.RemoteExpertBackend.request`: the same DEALER,
the renewal of a dropped connection, the deadline, stale replies dropped by id).
:func:`load_model` / :func:`unload_model` are control requests (they raise
:class:`~testbed.errors.AgentError`); :func:`lm_request` never raises for the device's sake: a
timeout, an unreachable device or an error reply is an :class:`LMReply` whose ``status`` says
so (``timeout`` / ``unreachable`` / ``error:<code>``, as an expert call's row), and a timeout
puts the device in its back-off and renews its connection, as a timed-out expert call does.

The agent's side: the ``load_model``, ``unload_model`` and ``lm`` ops of
:mod:`device_agent.protocol`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from device_agent import protocol as P
from device_agent.protocol import ErrorCode, ProtocolError

from ..errors import AgentError
from .energy_attr import call_energy_j

if TYPE_CHECKING:
    import torch

    from .backend import RemoteExpertBackend

#: the ``lm`` op's modes
LM_MODES = ("next", "score", "generate")


@dataclass
class LMReply:
    """One ``lm`` call: its result, its timing and energy, and how it ended.

    ``result``: ``next`` -> float32 log-probabilities ``[V]`` (a tensor), ``score`` -> one
    float per option, ``generate`` -> the new token ids; ``None`` unless ``status`` is ``ok``.
    ``bytes_down`` is what went BS -> device (the request), ``bytes_up`` device -> BS (the
    reply: header and frames; 0 without a reply). ``network_ms`` = ``rtt_ms`` - the agent's own
    time (receipt -> reply); ``energy_j`` is the device meter's joules over the compute window
    (``None`` when the reply had no usable stamps), ``energy_source`` the agent's meter label
    as its status said at the backend's ``connect``.
    """

    device: str
    model: str
    mode: str
    status: str = "ok"
    detail: str = ""
    result: Any = None
    rtt_ms: float | None = None
    network_ms: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    energy_j: float | None = None
    energy_source: str | None = None

    @property
    def ok(self) -> bool:
        """True when the device served the call."""
        return self.status == "ok"


def load_model(
    backend: RemoteExpertBackend,
    device: str,
    model_id: str,
    path: str,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Load the model folder ``path`` (relative to the agent's workdir, e.g. what
    :func:`testbed.lab.provision.files.sync_models` returns) on ``device`` as ``model_id``;
    returns the agent's reply (``model``, ``vocab_size``, ``max_seq_len``, ``params``).

    Raises
    ------
    AgentError
        On a timeout or an error reply (its message names the agent's error).
    """
    h, _ = backend.request(device, "load_model", timeout_s=timeout_s, model=model_id, path=path)
    return {k: h.get(k) for k in ("model", "vocab_size", "max_seq_len", "params")}


def unload_model(backend: RemoteExpertBackend, device: str, model_ids: Sequence[str]) -> list[str]:
    """Unload models from ``device``; returns the ids it unloaded (unknown ones are skipped)."""
    h, _ = backend.request(device, "unload_model", models=list(model_ids))
    return list(h.get("unloaded") or [])


def lm_fields(
    model_id: str,
    mode: str,
    prompt: Sequence[int],
    options: Sequence[Sequence[int]] | None,
    max_new_tokens: int | None,
    eos_id: int | None,
) -> dict[str, Any]:
    """The ``lm`` request's fields (beyond ``v``, ``op``, ``id``; ``timeout_ms`` is added by
    :func:`lm_request`). Raises ValueError naming a mode or argument that does not fit."""
    if mode not in LM_MODES:
        raise ValueError(f"mode must be one of {list(LM_MODES)}, got {mode!r}")
    fields: dict[str, Any] = {"model": model_id, "mode": mode, "prompt": [int(t) for t in prompt]}
    if mode == "score":
        if options is None:
            raise ValueError("mode 'score' needs options")
        fields["options"] = [[int(t) for t in o] for o in options]
    elif mode == "generate":
        if max_new_tokens is None or eos_id is None:
            raise ValueError("mode 'generate' needs max_new_tokens and eos_id")
        fields["max_new_tokens"], fields["eos_id"] = int(max_new_tokens), int(eos_id)
    return fields


def lm_request(
    backend: RemoteExpertBackend,
    device: str,
    model_id: str,
    mode: str,
    prompt: Sequence[int],
    *,
    options: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int | None = None,
    eos_id: int | None = None,
    timeout_s: float | None = None,
) -> LMReply:
    """Run ``model_id`` on ``device`` (see the ``lm`` op): ``next`` (the next token's
    log-probabilities), ``score`` (``options``' log-probabilities after the prompt) or
    ``generate`` (greedy, ``max_new_tokens``, ``eos_id``). ``timeout_s``: the deadline from
    the send (default the backend's ``timeout_s``); the agent drops the request unserved
    (``error:9``, expired) once it has waited that long in its queue.

    Never raises for the device's sake (see the module doc); ValueError for a bad argument."""
    fields = lm_fields(model_id, mode, prompt, options, max_new_tokens, eos_id)
    budget_s = backend.timeout_s if timeout_s is None else float(timeout_s)
    fields["timeout_ms"] = budget_s * 1e3
    rep = LMReply(device, model_id, mode)
    link = backend.agents.get(device)
    if link is None:
        rep.status, rep.detail = "unreachable", f"unknown device (have {sorted(backend.agents)})"
        return rep
    rep.energy_source = link.energy_source
    t0 = time.time_ns()
    try:
        h, frames = backend.request(device, "lm", timeout_s=budget_s, check=False, **fields)
    except AgentError as e:
        # request() raises only before a reply: no connection, or no reply by the deadline
        rep.bytes_down = _request_bytes(None, fields)
        if "not connected" in str(e):
            rep.status, rep.detail = "unreachable", str(e)[:200]
            backend.mark_down(device)
        else:
            rep.status, rep.detail = "timeout", str(e)[:200]
            backend.mark_down(device)
            backend.reconnect(device)  # as a timed-out expert call: a fresh connection
        return rep
    t3 = time.time_ns()
    _take_reply(rep, h, frames, (t3 - t0) / 1e6)
    rep.bytes_down = _request_bytes(h.get("id"), fields)
    return rep


def _request_bytes(rid: Any, fields: dict[str, Any]) -> int:
    """The request header's size as :meth:`RemoteExpertBackend.request` packs it (exact with
    the reply's id; without a reply the id's own size may differ by a few bytes)."""
    return len(P.pack({"v": P.PROTOCOL_VERSION, "op": "lm", "id": rid or 0, **fields}))


def _take_reply(rep: LMReply, h: dict[str, Any], frames: list[Any], rtt_ms: float) -> None:
    """Fill ``rep`` from the agent's reply ``h`` and data ``frames`` received ``rtt_ms`` after
    the send: timing, energy, bytes, and the result or the error."""
    rep.rtt_ms = rtt_ms
    t1, t2 = h.get("t1_ns"), h.get("t2_ns")
    if P.is_int(t1) and P.is_int(t2):
        rep.network_ms = rtt_ms - (t2 - t1) / 1e6
    q, c = h.get("queue_ms"), h.get("compute_ms")
    rep.queue_ms = float(q) if isinstance(q, (int, float)) and not isinstance(q, bool) else None
    rep.compute_ms = float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None
    rep.energy_j = call_energy_j(h.get("energy_j"))
    rep.bytes_up = len(P.pack(h)) + sum(len(f) for f in frames)
    code = h.get("code", ErrorCode.INTERNAL)
    if code != 0:
        rep.status, rep.detail = f"error:{code}", str(h.get("error", ""))[:200]
        return
    try:
        rep.result = _result(rep.mode, h, frames)
    except ProtocolError as e:
        rep.status, rep.detail = "error", f"bad reply: {e.message}"[:200]


def _result(mode: str, h: dict[str, Any], frames: list[Any]) -> Any:
    """The result of a served ``lm`` reply (ProtocolError when it does not fit the mode)."""
    if mode == "next":
        descs = h.get("t")
        if not isinstance(descs, list) or len(descs) != 1 or len(frames) != 1:
            raise ProtocolError(ErrorCode.BAD_FRAMES, "next: want one [1, V] float32 frame")
        _, dt, shape = P.check_descriptor(descs[0])
        if dt != "float32" or shape[0] != 1:
            raise ProtocolError(ErrorCode.SHAPE_MISMATCH, f"next: got {dt}{list(shape)}")
        x: torch.Tensor = P.frame_tensor(frames[0].buffer, dt, shape)
        return x.reshape(-1).clone()  # owns its memory (the frame is ZeroMQ's)
    res = h.get("result")
    kind = float if mode == "score" else int
    if not isinstance(res, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in res
    ):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{mode}: result is not a list of numbers")
    return [kind(v) for v in res]
