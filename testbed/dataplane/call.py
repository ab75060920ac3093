"""One MoE layer's expert calls on the device agents, from the first send to the last reply.

:meth:`RemoteExpertBackend.run_layer <testbed.dataplane.backend.RemoteExpertBackend.run_layer>`
makes a :class:`LayerCall` per layer and runs it:

1. :meth:`LayerCall.dispatch`: each expert's first device (:meth:`~LayerCall.pick`), one
   ``forward`` request per device (:mod:`.wire` encodes it), every request sent before any
   reply is awaited;
2. :meth:`LayerCall.wait`: the replies, on all the devices' sockets at once
   (:class:`~testbed.dataplane.inflight.InFlight` waits, looks after the connections and the
   deadlines; :meth:`~LayerCall.receive` takes each reply in);
3. a failed expert (:meth:`~LayerCall.fail`: unreachable, timed out, an error reply) is sent
   again to its next replica, or reported failed when it has none left;
4. :meth:`LayerCall.result`: the ``LayerResult``.

Every (expert, attempt) leaves one :class:`CallRecord`; ``LayerResult.info["calls"]`` holds
their :meth:`CallRecord.as_dict` rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from device_agent import protocol as P
from device_agent.protocol import ErrorCode, ProtocolError

from .inflight import TEND_MS, InFlight, Request
from .wire import ReplyTiming, decode_outputs, encode_inputs, energy_by_uid, retry_status

try:  # the models package is needed for the backend protocol types only
    from models.backend import LayerResult, LayerWork
except ImportError:  # pragma: no cover - models always ships with the BS
    LayerResult = LayerWork = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from .backend import RemoteExpertBackend
    from .connection import AgentLink


@dataclass(slots=True)
class CallRecord:
    """One (expert, attempt) of a layer: what went out, what came back, and the timings.

    :meth:`as_dict` is the row of ``LayerResult.info["calls"]``; a served call's row (status
    ``ok``) also has ``energy_j`` and ``energy_source``.
    """

    layer: int
    step: int
    uid: str
    device: str
    attempt: int
    tokens: int
    bytes_out: int = 0
    bytes_in: int = 0
    status: str = "ok"
    reason: str = ""
    req_id: int | None = None
    serialize_ms: float = 0.0
    rtt_ms: float | None = None
    network_ms: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    device_ms: float | None = None
    up_ms: float | None = None
    down_ms: float | None = None
    deserialize_ms: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The call's row: every field in order (the energy pair only for a served call)."""
        row = {
            "layer": self.layer,
            "step": self.step,
            "uid": self.uid,
            "device": self.device,
            "attempt": self.attempt,
            "tokens": self.tokens,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "status": self.status,
            "reason": self.reason,
            "req_id": self.req_id,
            "serialize_ms": self.serialize_ms,
            "rtt_ms": self.rtt_ms,
            "network_ms": self.network_ms,
            "queue_ms": self.queue_ms,
            "compute_ms": self.compute_ms,
            "device_ms": self.device_ms,
            "up_ms": self.up_ms,
            "down_ms": self.down_ms,
            "deserialize_ms": self.deserialize_ms,
        }
        if self.status == "ok":
            row["energy_j"] = self.energy_j
            row["energy_source"] = self.energy_source
        return row

    @classmethod
    def unserved(
        cls,
        layer: int,
        step: int,
        uid: str,
        tokens: int,
        req: Request | None,
        status: str,
        reason: str,
        timing: ReplyTiming | None = None,
        queue_ms: float | None = None,
    ) -> CallRecord:
        """The record of an attempt of ``req`` that served ``uid`` nothing (``req``: None when
        none was sent; ``timing``: the reply's, when one came)."""
        rec = cls(layer, step, uid, "", 0, tokens, status=status, reason=reason, queue_ms=queue_ms)
        if req is not None:
            rec.device, rec.attempt, rec.req_id = req.device, req.attempt, req.rid
            rec.bytes_out, rec.serialize_ms = req.bytes_out.get(uid, 0), req.serialize_ms
        if timing is not None:
            rec.rtt_ms, rec.network_ms, rec.device_ms = (
                timing.rtt_ms,
                timing.network_ms,
                timing.device_ms,
            )
            rec.up_ms, rec.down_ms = timing.up_ms, timing.down_ms
        return rec


class LayerCall:
    """One MoE layer's expert calls (see the module doc): the state the layer's requests share
    (outputs, failures, call records, the devices each expert tried, the requests out) and the
    steps that change it."""

    def __init__(
        self,
        backend: RemoteExpertBackend,
        work: LayerWork,  # type: ignore[valid-type]
    ) -> None:
        self.t_start = time.perf_counter()
        self.backend = backend
        self.work = work
        self.inputs: dict[str, Any] = work.inputs
        self.outputs: dict[str, Any] = {}
        self.failed: dict[str, str] = {}  #: uid -> why it has no output
        self.records: list[CallRecord] = []
        self.served_by: dict[str, str] = {}
        self.tried: dict[str, set[str]] = {u: set() for u in work.inputs}
        self.out = InFlight(backend)
        self.pending = self.out.pending  #: request id -> the request, while it is out

    def run(self) -> LayerResult:  # type: ignore[valid-type]
        """Send every expert to its device, take in the replies (failures re-routed to
        replicas), and return the layer's result."""
        self.dispatch(self.first_groups(), 0)
        self.wait()
        return self.result()

    # ---- sending ---------------------------------------------------------------------------
    def pick(self, uid: str) -> str | None:
        """The first device holding ``uid`` that is connected, up and not tried yet."""
        be = self.backend
        agents, tried = be.agents, self.tried[uid]
        for d in be.placement.get(uid, ()):
            if d in agents and d not in tried and be.is_up(d):
                return d
        return None

    def first_groups(self) -> dict[str, list[str]]:
        """Device -> its experts of the first attempt; an expert with no device to try is
        failed at once (its call recorded ``skipped``)."""
        first: dict[str, list[str]] = {}
        placement = self.backend.placement
        work = self.work
        for u in self.inputs:
            d = self.pick(u)
            if d is None:
                holders = placement.get(u)
                reason = "not placed" if not holders else f"all holders down ({', '.join(holders)})"
                self.failed[u] = reason
                rec = CallRecord.unserved(
                    work.layer, work.step, u, self.tokens(u), None, "skipped", reason
                )
                rec.device = holders[0] if holders else ""
                self.records.append(rec)
            else:
                first.setdefault(d, []).append(u)
        return first

    def tokens(self, uid: str) -> int:
        """The rows of ``uid``'s input."""
        return int(self.inputs[uid].shape[0])

    def dispatch(self, groups: dict[str, list[str]], attempt: int) -> None:
        """One request per device of ``groups``: every request goes out first (serialise + send,
        device after device), the bookkeeping follows while they are on their way. A device
        that could not be sent to is put in its back-off and its experts fail over."""
        sent = [self.send(dev, uids) for dev, uids in groups.items()]
        be = self.backend
        deadline = time.monotonic() + be.timeout_s
        tried, pending = self.tried, self.pending
        for dev, uids, rid, t0_ns, ser_ms, nbytes, descs, err, sock, frames in sent:
            for u in uids:
                tried[u].add(dev)
            req = Request(
                rid, dev, list(uids), attempt, t0_ns, deadline, ser_ms, nbytes, descs, sock, frames
            )
            if err is not None:
                be.mark_down(dev)
                self.fail(req, list(uids), "unreachable", str(err) or "not connected")
                continue
            pending[rid] = req

    def send(self, dev: str, uids: list[str]) -> tuple[Any, ...]:
        """Serialise and send one ``forward`` request of ``uids`` to ``dev``; returns what
        :meth:`dispatch` makes its :class:`Request` of (``err``: the send's zmq error, if any)."""
        be = self.backend
        work = self.work
        perf = time.perf_counter
        t0 = perf()
        rid = next(be.request_ids)
        descs, bufs, nbytes = encode_inputs(self.inputs, uids)
        hb = P.pack(
            {
                "v": P.PROTOCOL_VERSION,
                "op": "forward",
                "id": rid,
                "layer": work.layer,
                "step": work.step,
                "t": descs,
                "timeout_ms": be.timeout_s * 1e3,
            }
        )
        ser_ms = (perf() - t0) * 1e3
        t0_ns = time.time_ns()
        sock, err = self.out.send(dev, hb, bufs)
        return (dev, uids, rid, t0_ns, ser_ms, nbytes, descs, err, sock, (hb, bufs))

    def fail(
        self,
        req: Request,
        uids: list[str],
        status: str,
        reason: str,
        timing: ReplyTiming | None = None,
        queue_ms: float | None = None,
    ) -> None:
        """Record the attempt of ``uids`` in ``req`` as failed and send each to its next device;
        one with none left is failed for the layer."""
        regroup: dict[str, list[str]] = {}
        layer, step, tokens, append = (
            self.work.layer,
            self.work.step,
            self.tokens,
            self.records.append,
        )
        for u in uids:
            append(
                CallRecord.unserved(
                    layer, step, u, tokens(u), req, status, reason, timing, queue_ms
                )
            )
            nd = self.pick(u)
            if nd is not None:
                regroup.setdefault(nd, []).append(u)
            else:
                self.failed[u] = f"{status} on {req.device}: {reason}"[:200]
        if regroup:
            self.dispatch(regroup, req.attempt + 1)

    # ---- waiting -----------------------------------------------------------------------------
    def wait(self) -> None:
        """Take in replies until no request is out, looking after the connections every
        :data:`~testbed.dataplane.inflight.TEND_MS` and failing the requests past their
        deadline."""
        out = self.out
        pending = self.pending
        receive, timed_out = self.receive, self.timed_out
        tend_at = time.monotonic() + TEND_MS / 1e3
        while pending:
            now = time.monotonic()
            if now >= tend_at:
                out.tend()
                now = time.monotonic()
                tend_at = now + TEND_MS / 1e3
            if len(pending) == 1:
                out.wait_one(now, receive)
            else:
                out.wait_many(now, receive)
            if pending:
                out.expire(timed_out)

    def timed_out(self, req: Request) -> None:
        """``req`` had no reply by its deadline (its connection renewed): its experts fail over."""
        self.fail(
            req,
            req.uids,
            "timeout",
            f"no reply within {self.backend.timeout_s:g} s (connection renewed)",
        )

    # ---- replies -----------------------------------------------------------------------------
    def receive(self, a: AgentLink, body: list[Any]) -> None:
        """Take in one reply from ``a``: a stale one is counted and dropped; an error reply
        fails its experts over; the experts it served are recorded, the rest fail over."""
        t3 = time.time_ns()
        be = self.backend
        try:
            h = P.unpack(body[0])
        except ProtocolError:
            be.stale_replies += 1
            return
        req = self.pending.get(h.get("id"))  # type: ignore[arg-type]
        if req is None or req.device != a.name:
            be.stale_replies += 1  # a reply to a request we gave up on
            return
        del self.pending[req.rid]
        timing = ReplyTiming.of(req, h, t3, a)
        code = h.get("code", ErrorCode.INTERNAL)
        if code != 0:
            self.fail(req, req.uids, f"error:{code}", str(h.get("error", ""))[:200], timing)
            return
        t_de = time.perf_counter()
        got, bytes_in, bad = decode_outputs(req, h, body, self.inputs)
        de_ms = (time.perf_counter() - t_de) * 1e3
        retry = self.accept(a, req, h, (got, bytes_in), timing, de_ms)
        if retry:
            status, reason = retry_status(h, retry, bad)
            self.fail(req, retry, status, reason, timing, h.get("queue_ms"))

    def accept(
        self,
        a: AgentLink,
        req: Request,
        h: dict[str, Any],
        decoded: tuple[dict[str, Any], dict[str, int]],
        timing: ReplyTiming,
        de_ms: float,
    ) -> list[str]:
        """Keep the outputs a reply served and record their calls (with their share of the
        call's energy); returns the request's uids it did not serve."""
        got, bytes_in = decoded
        uid_ms = h.get("uid_ms") or {}
        queue_ms = h.get("queue_ms")
        e_uid = energy_by_uid(h, got, uid_ms)
        e_src = a.energy_source
        name = a.name
        outputs, served_by, append = self.outputs, self.served_by, self.records.append
        layer, step, attempt, rid, ser_ms, bytes_out = (
            self.work.layer,
            self.work.step,
            req.attempt,
            req.rid,
            req.serialize_ms,
            req.bytes_out,
        )
        rtt_ms, network_ms, device_ms = timing.rtt_ms, timing.network_ms, timing.device_ms
        up_ms, down_ms = timing.up_ms, timing.down_ms
        retry: list[str] = []
        for u in req.uids:
            y = got.get(u)
            if y is None:
                retry.append(u)
                continue
            outputs[u] = y
            served_by[u] = name
            # positional, in field order: keywords cost ~1.4 us more per record
            append(
                CallRecord(
                    layer,
                    step,
                    u,
                    name,
                    attempt,
                    y.shape[0],
                    bytes_out.get(u, 0),
                    bytes_in[u],
                    "ok",
                    "",
                    rid,
                    ser_ms,
                    rtt_ms,
                    network_ms,
                    queue_ms,
                    uid_ms.get(u),
                    device_ms,
                    up_ms,
                    down_ms,
                    de_ms,
                    e_uid.get(u),
                    e_src,
                )
            )
        return retry

    def result(self) -> LayerResult:  # type: ignore[valid-type]
        """The layer's outputs, failures and ``info`` (wall time, call rows, who served whom,
        the experts served by a replica)."""
        placement = self.backend.placement
        served_by = self.served_by
        calls = [r.as_dict() for r in self.records]
        rerouted = {u: d for u, d in served_by.items() if placement.get(u, [d])[0] != d}
        return LayerResult(
            self.outputs,
            self.failed,
            {
                "wall_s": time.perf_counter() - self.t_start,
                "calls": calls,
                "served_by": served_by,
                "rerouted": rerouted,
            },
        )
