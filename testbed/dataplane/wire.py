"""A ``forward`` request and its reply on the wire, as the BS sends and reads them.

:func:`encode_inputs` turns a device's experts' input tensors into the request's descriptors
and zero-copy buffers; :func:`recv_reply` reads a whole reply frame by frame;
:func:`decode_outputs` checks the reply's descriptors against the request and views its
frames as tensors; :class:`ReplyTiming` splits the round trip by the agent's stamps;
:func:`energy_by_uid` shares the reply's metered joules among its experts and
:func:`retry_status` says why the experts a reply did not serve failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import zmq

from device_agent import protocol as P
from device_agent.protocol import ErrorCode, ProtocolError

from .energy_attr import call_energy_j, split_call_energy

if TYPE_CHECKING:
    from .connection import AgentLink
    from .inflight import Request

#: dtypes whose CPU tensors numpy views directly (bfloat16 goes through P.tensor_buffer)
_NP_VIEWABLE = frozenset((torch.float32, torch.float16))
_NO_ENERGY: dict[str, float] = {}  #: shared, never written: a reply without energy stamps


@dataclass(slots=True)
class ReplyTiming:
    """A reply's round trip split by the agent's stamps (``None``: the reply had none)."""

    rtt_ms: float
    device_ms: float | None = None
    network_ms: float | None = None
    up_ms: float | None = None
    down_ms: float | None = None

    @classmethod
    def of(cls, req: Request, h: dict[str, Any], t3_ns: int, a: AgentLink) -> ReplyTiming:
        """Send -> reply at the BS, the device's time (``t1_ns`` -> ``t2_ns``), and the one-way
        estimates when the agent's clock offset is known."""
        rtt_ms = (t3_ns - req.t0_ns) / 1e6
        t1, t2 = h.get("t1_ns"), h.get("t2_ns")
        if not (isinstance(t1, int) and isinstance(t2, int)):
            return cls(rtt_ms)
        device_ms = (t2 - t1) / 1e6
        if a.clock is None:
            return cls(rtt_ms, device_ms, rtt_ms - device_ms)
        off = a.clock.offset_ns
        up_ms = (t1 - off - req.t0_ns) / 1e6
        return cls(rtt_ms, device_ms, rtt_ms - device_ms, up_ms, (t3_ns - (t2 - off)) / 1e6)


def recv_reply(sock: zmq.Socket, flags: int) -> list[Any]:
    """One whole reply: [header bytes, data frames...] (a leading empty delimiter dropped).

    Frame by frame with ``Frame.more`` (recv_multipart asks the socket for ``RCVMORE`` per
    part, a Python-level call each). Raises ``zmq.Again`` when none came in time."""
    recv = sock.recv
    fr = recv(flags, copy=False)
    hb = fr.bytes
    if not hb and fr.more:  # a delimiter (replies to requests sent with one)
        fr = recv(0, copy=False)
        hb = fr.bytes
    body: list[Any] = [hb]
    while fr.more:
        fr = recv(0, copy=False)
        body.append(fr)
    return body


def encode_inputs(
    inputs: dict[str, Any], uids: list[str]
) -> tuple[list[list[Any]], list[Any], dict[str, int]]:
    """The experts' input tensors as a request's descriptors, buffers and bytes per uid."""
    descs, bufs, nbytes = [], [], {}
    for u in uids:
        x = inputs[u]
        shape = x.shape
        dt = x.dtype
        descs.append([u, P.dtype_name(dt), [shape[0], shape[1]]])
        if (
            dt in _NP_VIEWABLE
            and x.is_contiguous()
            and x.device.type == "cpu"
            and not x.requires_grad
        ):
            b = x.numpy()  # the hot path of P.tensor_buffer: a plain view, no memoryview cast
        else:
            b = P.tensor_buffer(x)
        bufs.append(b)
        nbytes[u] = b.nbytes
    return descs, bufs, nbytes


def decode_outputs(
    req: Request, h: dict[str, Any], body: list[Any], inputs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, int], list[tuple[str, str]]]:
    """A reply's output tensors by uid, their bytes, and (label, message) of what was wrong."""
    got: dict[str, Any] = {}
    bytes_in: dict[str, int] = {}
    descs = h.get("t") or []
    bad: list[tuple[str, str]] = []
    if not isinstance(descs, list) or len(descs) != len(body) - 1:
        bad = [(u, "reply frames do not match its header") for u in req.uids]
    elif descs == req.descs:  # every expert answered: exactly the tensors that were sent
        for i, (uid, dt, shape) in enumerate(descs):
            fr = body[i + 1]
            try:
                got[uid] = P.frame_tensor(fr.buffer, dt, (shape[0], shape[1]))
                bytes_in[uid] = len(fr)
            except ProtocolError as e:
                bad.append((uid, e.message))
    else:
        for i, desc in enumerate(descs):
            try:
                uid, dt, shape = P.check_descriptor(desc)
                x = inputs.get(uid)
                if (
                    uid not in req.uids
                    or x is None
                    or shape != tuple(x.shape)
                    or dt != P.dtype_name(x.dtype)
                ):
                    raise ProtocolError(ErrorCode.SHAPE_MISMATCH, f"unexpected output {desc!r}")
                fr = body[i + 1]
                got[uid] = P.frame_tensor(fr.buffer, dt, shape)
                bytes_in[uid] = len(fr)
            except ProtocolError as e:
                bad.append((str(desc)[:40], e.message))
    return got, bytes_in, bad


def energy_by_uid(
    h: dict[str, Any], got: dict[str, Any], uid_ms: dict[str, Any]
) -> dict[str, float]:
    """The device meter's joules over the reply's compute window, shared by the experts served
    (by compute time); empty when the reply has no energy stamps."""
    ej = h.get("energy_j")
    if not got or ej is None:
        return _NO_ENERGY
    # the usual reply (two floats, not decreasing) without a function call
    if (
        ej.__class__ is list
        and len(ej) == 2
        and ej[0].__class__ is float
        and ej[1].__class__ is float
        and ej[1] >= ej[0]
    ):
        e_call: float | None = ej[1] - ej[0]
    else:
        e_call = call_energy_j(ej)
    if e_call is None:
        return _NO_ENERGY
    return (
        dict.fromkeys(got, e_call)
        if len(got) == 1
        else split_call_energy(e_call, list(got), uid_ms)
    )


def retry_status(
    h: dict[str, Any], retry: list[str], bad: list[tuple[str, str]]
) -> tuple[str, str]:
    """Status and reason of the experts a reply did not serve (the agent's errors, else what
    was wrong with the reply)."""
    errs = h.get("errors") or {}
    first_err = next(iter(errs.values()), None) if errs else None
    reason = "; ".join(
        f"{u}: {errs[u][1]}"
        for u in retry
        if u in errs and isinstance(errs[u], list) and len(errs[u]) == 2
    ) or (bad[0][1] if bad else "missing from reply")
    status = f"error:{first_err[0]}" if isinstance(first_err, list) and first_err else "error"
    return status, reason[:200]
