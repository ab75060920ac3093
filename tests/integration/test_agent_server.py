"""The device agent as a real process on loopback: ops, every error code, fuzzing, queueing,
status feed, re-routing on the BS side, SIGTERM. No namespaces needed."""

from __future__ import annotations

import copy
import itertools
import random
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import save_file

from device_agent import protocol as P
from device_agent.protocol import ErrorCode
from models.backend import LayerWork
from models.kernels import load_expert
from testbed.dataplane.backend import AgentError, RemoteExpertBackend, StatusFeed
from testbed.lab.agents import AgentProcess, start_agent, stop_agent
from testbed.lab.runner import LocalRunner

HIDDEN, INTER = 32, 48
MAX_MSG = 1 << 20


def _write_shard(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            "w1": torch.randn(INTER, HIDDEN, generator=g) * 0.2,
            "w2": torch.randn(HIDDEN, INTER, generator=g) * 0.2,
            "w3": torch.randn(INTER, HIDDEN, generator=g) * 0.2,
        },
        str(path),
    )


def _start_in(wd: Path, name: str, extra: tuple[str, ...] = ()) -> AgentProcess:
    """An agent on loopback with workdir ``wd`` holding the shards of L0.E0 and L0.E1."""
    (wd / "experts").mkdir(parents=True)
    _write_shard(wd / "experts" / "L0.E0.safetensors", 0)
    _write_shard(wd / "experts" / "L0.E1.safetensors", 1)
    return start_agent(
        LocalRunner(),
        device=name,
        host="127.0.0.1",
        workdir=str(wd),
        extra_args=["--max-message-bytes", str(MAX_MSG), *extra],
    )


def _log_size(a: AgentProcess) -> int:
    return Path(a.log_path).stat().st_size


def _assert_clean_log(a: AgentProcess, since: int = 0) -> None:
    """The agent logged no internal error (after byte ``since`` of its log): every bad input
    was refused by a check, not by an exception caught in the server's last-resort handler
    (which logs a traceback)."""
    with open(a.log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    for mark in ("internal error", "Traceback"):
        i = text.find(mark)
        assert i < 0, f"agent log has {mark!r}:\n{text[max(0, i - 200) : i + 1500]}"


@pytest.fixture
def agents(tmp_path):
    """Factory starting agents on loopback (own workdir each, a shard in it); all stopped after."""
    started: list[AgentProcess] = []

    def start(name: str = "a1", extra: tuple[str, ...] = ()) -> AgentProcess:
        a = _start_in(tmp_path / name, name, extra)
        started.append(a)
        return a

    yield start
    for a in started:
        stop_agent(a)


class RawClient:
    """A bare DEALER speaking the wire protocol by hand (to send bad messages too)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(endpoint)

    def send(self, frames: list) -> None:
        self.s.send_multipart([b"", *frames], copy=False)

    def recv(self, timeout_s: float = 5.0) -> tuple[dict, list[zmq.Frame]]:
        assert self.s.poll(int(timeout_s * 1e3)), "no reply from the agent"
        msg = self.s.recv_multipart(copy=False)
        assert len(msg[0]) == 0
        return msgpack.unpackb(msg[1].bytes, raw=False), msg[2:]

    def call(self, header: dict, frames: list = ()) -> tuple[dict, list[zmq.Frame]]:
        self.send([msgpack.packb(header), *frames])
        return self.recv()

    def close(self) -> None:
        self.s.close(0)
        self.ctx.term()


def _hdr(op: str, rid: int = 1, **kw) -> dict:
    return {"v": P.PROTOCOL_VERSION, "op": op, "id": rid, **kw}


def _load_both(c: RawClient) -> None:
    h, _ = c.call(
        _hdr(
            "load",
            experts=[
                {"uid": "L0.E0", "path": "experts/L0.E0.safetensors"},
                {"uid": "L0.E1", "path": "experts/L0.E1.safetensors"},
                {"uid": "L0.E2", "builtin": "identity", "hidden": HIDDEN, "io_dtype": "float16"},
            ],
        )
    )
    assert h["code"] == 0 and h["loaded"] == ["L0.E0", "L0.E1", "L0.E2"], h


def _check_forward(c: RawClient, a: AgentProcess, rid: int = 77) -> None:
    x0, x1 = torch.randn(5, HIDDEN), torch.randn(3, HIDDEN)
    h, frames = c.call(
        _hdr(
            "forward", rid, t=[["L0.E0", "float32", [5, HIDDEN]], ["L0.E1", "float32", [3, HIDDEN]]]
        ),
        [P.tensor_buffer(x0), P.tensor_buffer(x1)],
    )
    assert h["code"] == 0 and h["id"] == rid and h["errors"] == {}
    assert [d[0] for d in h["t"]] == ["L0.E0", "L0.E1"]
    wd = Path(a.workdir) / "experts"
    for (uid, dt, shape), fr, x in zip(h["t"], frames, (x0, x1)):
        ref = load_expert(wd / f"{uid}.safetensors")(x)
        got = P.frame_tensor(fr.buffer, dt, tuple(shape))
        # same kernel code; only the thread count (agent: 1) may change fp32 summation order
        assert (got - ref).abs().max() < 1e-5, uid
    assert h["queue_ms"] >= 0 and h["compute_ms"] > 0 and h["t2_ns"] >= h["t1_ns"]


def test_ops_and_exact_forward(agents):
    a = agents()
    c = RawClient(a.endpoint)
    try:
        h, _ = c.call(_hdr("ping", 5))
        assert h["code"] == 0 and h["id"] == 5 and abs(h["t1_ns"] - time.time_ns()) < 5e9
        _load_both(c)
        _check_forward(c, a)
        x = torch.randn(4, HIDDEN).half()
        h, fr = c.call(
            _hdr("forward", 8, t=[["L0.E2", "float16", [4, HIDDEN]]]), [P.tensor_buffer(x)]
        )
        assert h["code"] == 0 and torch.equal(
            P.frame_tensor(fr[0].buffer, "float16", (4, HIDDEN)), x
        )
        h, _ = c.call(_hdr("status", 9))
        st = h["status"]
        assert set(st["experts"]) == {"L0.E0", "L0.E1", "L0.E2"}
        assert st["experts"]["L0.E0"]["calls"] == 1 and st["experts"]["L0.E0"]["rows"] == 5
        assert st["memory"]["rss_bytes"] > 0 and st["memory"]["available_bytes"] > 0
        assert st["agent"]["pid"] == a.pid and st["load"]["forward_calls"] == 2
        assert abs(st["clock_ns"] - time.time_ns()) < 5e9
        h, _ = c.call(_hdr("unload", 10, uids=["L0.E1", "L9.E9"]))
        assert h["unloaded"] == ["L0.E1"] and h["errors"]["L9.E9"][0] == ErrorCode.UNKNOWN_EXPERT
        h, _ = c.call(
            _hdr("forward", 11, t=[["L0.E1", "float32", [1, HIDDEN]]]), [bytes(4 * HIDDEN)]
        )
        assert h["errors"]["L0.E1"][0] == ErrorCode.UNKNOWN_EXPERT and h["t"] == []
    finally:
        c.close()


def test_every_error_code_and_agent_keeps_serving(agents, tmp_path):
    a = agents()
    c = RawClient(a.endpoint)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    try:
        _load_both(c)
        row = bytes(4 * HIDDEN)

        def code(frames: list) -> int:
            c.send(frames)
            return c.recv()[0]["code"]

        def fwd_err(desc: list, frame: bytes) -> int:
            h, _ = c.call(_hdr("forward", t=[desc]), [frame])
            assert h["code"] == 0 and h["t"] == []
            return next(iter(h["errors"].values()))[0]

        assert code([b"\xc1not msgpack"]) == ErrorCode.BAD_HEADER
        assert code([msgpack.packb([1, 2, 3])]) == ErrorCode.BAD_HEADER
        assert code([msgpack.packb({"op": "ping", "id": 1})]) == ErrorCode.BAD_HEADER
        assert code([msgpack.packb({"v": 99, "op": "ping", "id": 1})]) == ErrorCode.BAD_VERSION
        assert code([msgpack.packb(_hdr("launch"))]) == ErrorCode.UNKNOWN_OP
        assert code([msgpack.packb(_hdr("ping")), b"extra"]) == ErrorCode.BAD_FRAMES
        assert (
            code([msgpack.packb(_hdr("forward", t=[["L0.E0", "float32", [1, HIDDEN]]]))])
            == ErrorCode.BAD_FRAMES
        )
        assert code([msgpack.packb(_hdr("ping")), bytes(MAX_MSG + 10)]) == ErrorCode.TOO_LARGE
        assert code([msgpack.packb(_hdr("forward", t=[], timeout_ms=-1.0))]) == ErrorCode.EXPIRED
        assert fwd_err(["L3.E3", "float32", [1, HIDDEN]], row) == ErrorCode.UNKNOWN_EXPERT
        assert fwd_err(["L0.E0", "float16", [2, HIDDEN]], row) == ErrorCode.DTYPE_MISMATCH
        assert fwd_err(["L0.E0", "int8", [1, HIDDEN]], row) == ErrorCode.DTYPE_MISMATCH
        assert fwd_err(["L0.E0", "float32", [HIDDEN, 1]], row) == ErrorCode.SHAPE_MISMATCH
        assert fwd_err(["L0.E0", "float32", [1, HIDDEN, 1]], row) == ErrorCode.SHAPE_MISMATCH
        assert fwd_err(["L0.E0", "float32"], row) == ErrorCode.BAD_HEADER
        assert fwd_err(["L0.E0", "float32", [2, HIDDEN]], row) == ErrorCode.BAD_FRAMES
        for path, want in (
            ("/etc/passwd", ErrorCode.BAD_PATH),
            ("../outside.safetensors", ErrorCode.BAD_PATH),
            ("experts/../../outside.safetensors", ErrorCode.BAD_PATH),
            ("experts/missing.safetensors", ErrorCode.LOAD_FAILED),
            ("experts/" + "x" * 300, ErrorCode.BAD_PATH),
        ):  # a name too long for the OS
            h, _ = c.call(_hdr("load", experts=[{"uid": "L1.E0", "path": path}]))
            assert h["code"] == 0 and h["loaded"] == [] and h["errors"]["L1.E0"][0] == want, path
        (Path(a.workdir) / "experts" / "link.safetensors").symlink_to(
            tmp_path / "outside.safetensors"
        )
        h, _ = c.call(_hdr("load", experts=[{"uid": "L1.E0", "path": "experts/link.safetensors"}]))
        assert h["errors"]["L1.E0"][0] == ErrorCode.BAD_PATH
        (Path(a.workdir) / "experts" / "junk.safetensors").write_bytes(b"\0" * 64)
        h, _ = c.call(_hdr("load", experts=[{"uid": "L1.E0", "path": "experts/junk.safetensors"}]))
        assert h["errors"]["L1.E0"][0] == ErrorCode.LOAD_FAILED
        _check_forward(c, a)
        h, _ = c.call(_hdr("status"))
        assert h["status"]["load"]["errors"] == 23
    finally:
        c.close()


def _random_obj(rng: random.Random, depth: int = 0):
    kinds = ["int", "str", "bytes", "float", "none", "bool"] + (
        ["list", "map"] if depth < 3 else []
    )
    k = rng.choice(kinds)
    if k == "int":
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
    if k == "str":  # (a well-formed uid, but none that is loaded: a random unload changes nothing)
        return rng.choice(
            [
                "",
                "L7.E7",
                "float32",
                "forward",
                "\u2603" * rng.randint(0, 5),
                "x" * rng.randint(0, 300),
            ]
        )
    if k == "bytes":
        return rng.randbytes(rng.randint(0, 64))
    if k == "float":
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e308])
    if k == "none":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "list":
        return [_random_obj(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["v", "op", "id", "t", "experts", "uids", "timeout_ms", "zz"]): _random_obj(
            rng, depth + 1
        )
        for _ in range(rng.randint(0, 5))
    }


#: what a mutated header field becomes: every msgpack type, edge numbers, strings (none of them
#: "shutdown" or the uid of an expert the fuzz test relies on)
_FUZZ_VALUES = (
    None,
    True,
    False,
    0,
    -1,
    7,
    2**31,
    2**64 - 1,
    -(2**63),
    1.0,
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    "",
    "x" * 300,
    "\u2603",
    "float16",
    "float64",
    "L01.E0",
    "L7.E7",
    "identity",
    b"",
    b"\x00\xff",
    [],
    [1, "x"],
    [[None]],
    ["L7.E7"],
    {},
    {"a": 1},
    {"uid": 1},
)


def _valid_requests() -> list[tuple[dict, list[bytes]]]:
    """Well-formed load, unload and forward requests (fresh objects: the fuzz mutates them).
    None of them touches L0.E0/E1/E2, which the test checks after the fuzz."""
    return [
        (
            _hdr(
                "forward",
                3,
                t=[["L0.E0", "float32", [2, HIDDEN]], ["L0.E2", "float16", [1, HIDDEN]]],
                timeout_ms=5000,
            ),
            [bytes(8 * HIDDEN), bytes(2 * HIDDEN)],
        ),
        (
            _hdr(
                "load",
                4,
                experts=[
                    {
                        "uid": "L0.E3",
                        "builtin": "identity",
                        "hidden": HIDDEN,
                        "io_dtype": "float16",
                    },
                    {
                        "uid": "L0.E4",
                        "path": "experts/L0.E1.safetensors",
                        "runtime": "torch",
                        "quant": None,
                        "dtype": "float32",
                        "io_dtype": "float32",
                    },
                ],
            ),
            [],
        ),
        (_hdr("unload", 5, uids=["L0.E3", "L7.E7"]), []),
    ]


def _slots(obj, out: list) -> list:
    """Every (container, key) of a header, nested ones included."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        out.append((obj, k))
        if isinstance(v, (dict, list)):
            _slots(v, out)
    return out


def _mutate_fields(rng: random.Random) -> list[bytes]:
    """A valid load/unload/forward request with 1-3 header fields (top-level or nested: a
    spec's dtype, a descriptor's shape...) given a value of another type, or dropped; its
    frames kept valid most of the time, so the request reaches the deep checks."""
    h, frames = rng.choice(_valid_requests())
    for _ in range(rng.randint(1, 3)):
        obj, k = rng.choice(_slots(h, []))
        if isinstance(obj, dict) and rng.random() < 0.1:
            del obj[k]
        else:
            obj[k] = copy.deepcopy(rng.choice(_FUZZ_VALUES))
    if rng.random() < 0.1:
        frames = frames[:-1] if frames and rng.random() < 0.5 else [*frames, rng.randbytes(8)]
    return [msgpack.packb(h), *frames]


def _fuzz_message(rng: random.Random) -> list[bytes]:
    """A random or mutated request (never over the agent's message limit)."""
    good_fwd = [
        msgpack.packb(_hdr("forward", t=[["L0.E0", "float32", [2, HIDDEN]]])),
        bytes(8 * HIDDEN),
    ]
    r = rng.random()
    if r < 0.4:  # valid requests with header fields of the wrong type
        return _mutate_fields(rng)
    if r < 0.6:  # pure garbage frames
        return [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
    if r < 0.8:  # random msgpack structures, often with plausible fields
        h = _random_obj(rng)
        if isinstance(h, dict) and rng.random() < 0.7:
            h["v"] = P.PROTOCOL_VERSION
            h.setdefault("op", rng.choice(list(P.OPS[:-1]) + ["bogus"]))  # never "shutdown"
            if h["op"] == "shutdown":
                h["op"] = "ping"
        return [msgpack.packb(h)] + [
            rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(0, 3))
        ]
    # mutate a valid forward: flip bytes in the header, truncate it, change/add/drop frames
    frames = list(good_fwd)
    hb = bytearray(frames[0])
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.5 and hb:
            hb[rng.randrange(len(hb))] = rng.randrange(256)
        elif op < 0.7 and hb:
            del hb[rng.randrange(len(hb)) :]
        elif op < 0.85:
            frames[1] = rng.randbytes(rng.choice([0, 1, 8 * HIDDEN - 1, 8 * HIDDEN + 4]))
        else:
            frames.append(rng.randbytes(rng.randint(0, 64)))
    frames[0] = bytes(hb)
    if b"shutdown" in frames[0]:
        frames[0] = b"\xc1"
    return frames


def test_fuzz_thousands_of_messages_then_correct_forward(agents):
    """3000 malformed requests: one reply each, never INTERNAL (for the request or any uid in
    it) and nothing in the agent's log from its last-resort handler: bad input is refused by
    the checks, with the code that names what is wrong."""
    a = agents()
    c = RawClient(a.endpoint)
    rng = random.Random(1234)
    n_msgs, batch = 3000, 100
    codes: dict[int, int] = {}
    uid_codes: dict[int, int] = {}
    try:
        _load_both(c)
        for _ in range(n_msgs // batch):
            for _ in range(batch):
                c.send(_fuzz_message(rng))
            for _ in range(batch):  # exactly one reply per message, each with a known code
                h, _ = c.recv()
                assert isinstance(h["code"], int) and h["code"] in set(ErrorCode), h
                assert h["code"] != ErrorCode.INTERNAL, h
                codes[h["code"]] = codes.get(h["code"], 0) + 1
                for code, _msg in (
                    h.get("errors") or {}
                ).values():  # per-uid codes (load, unload, forward)
                    assert code != ErrorCode.INTERNAL, h
                    uid_codes[code] = uid_codes.get(code, 0) + 1
        assert c.s.poll(200) == 0, "more replies than messages"
        assert codes.get(ErrorCode.BAD_HEADER, 0) > 100 and len(codes) >= 4, codes
        # the field mutations reached the per-uid checks of load, unload and forward
        assert {
            ErrorCode.BAD_HEADER,
            ErrorCode.DTYPE_MISMATCH,
            ErrorCode.SHAPE_MISMATCH,
            ErrorCode.BAD_PATH,
            ErrorCode.UNKNOWN_EXPERT,
            ErrorCode.BAD_FRAMES,
        } <= set(uid_codes), uid_codes
        _check_forward(c, a, rid=4242)
        h, _ = c.call(_hdr("status"))
        assert h["status"]["agent"]["pid"] == a.pid and h["status"]["load"]["requests"] >= n_msgs
        assert str(int(ErrorCode.INTERNAL)) not in h["status"]["load"]["errors_by_code"], h[
            "status"
        ]["load"]
    finally:
        c.close()
    _assert_clean_log(a)


# ---- every header field with a value of the wrong type: the exact bad-input code ----------

#: one value of each msgpack type (and a few edge values) a header field can wrongly carry
_WRONG = {
    "nil": None,
    "bool": True,
    "int": 7,
    "huge": 2**64 - 1,
    "float": 1.5,
    "nan": float("nan"),
    "str": "x",
    "bin": b"x",
    "list": [1, "x"],
    "map": {"a": 1},
}
_ROW = bytes(4 * HIDDEN)  # one float32 row of L0.E0


def _fwd(**kw) -> tuple[dict, list[bytes]]:
    return _hdr("forward", 21, **kw), [_ROW]


def _load(spec: dict) -> tuple[dict, list[bytes]]:
    return _hdr("load", 22, experts=[spec]), []


_FILE_SPEC = {"uid": "L0.E5", "path": "experts/L0.E0.safetensors"}
_BUILTIN_SPEC = {"uid": "L0.E5", "builtin": "identity", "hidden": HIDDEN}

#: field -> (request with that field set to v, types the field may have, where the code is:
#: "reply" (the request is refused) or "uid" (the only entry of the reply's per-uid errors), code)
_FIELDS = {
    "id": (lambda v: (_hdr("ping", v), []), {"nil", "int", "huge"}, "reply", ErrorCode.BAD_HEADER),
    "op": (
        lambda v: ({"v": P.PROTOCOL_VERSION, "op": v, "id": 20}, []),
        {"str"},
        "reply",
        ErrorCode.BAD_HEADER,
    ),
    "t": (lambda v: _fwd(t=v), {"list"}, "reply", ErrorCode.BAD_HEADER),
    "timeout_ms": (
        lambda v: _fwd(t=[["L0.E0", "float32", [1, HIDDEN]]], timeout_ms=v),
        {"nil", "int", "huge", "float"},
        "reply",
        ErrorCode.BAD_HEADER,
    ),
    "t[0]": (lambda v: _fwd(t=[v]), {"list"}, "uid", ErrorCode.BAD_HEADER),
    "t[0].uid": (
        lambda v: _fwd(t=[[v, "float32", [1, HIDDEN]]]),
        {"str"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "t[0].dtype": (
        lambda v: _fwd(t=[["L0.E0", v, [1, HIDDEN]]]),
        {"str"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "t[0].shape": (
        lambda v: _fwd(t=[["L0.E0", "float32", v]]),
        set(),
        "uid",
        ErrorCode.SHAPE_MISMATCH,
    ),
    "t[0].rows": (
        lambda v: _fwd(t=[["L0.E0", "float32", [v, HIDDEN]]]),
        {"int"},
        "uid",
        ErrorCode.SHAPE_MISMATCH,
    ),
    "experts": (
        lambda v: (_hdr("load", 22, experts=v), []),
        {"list"},
        "reply",
        ErrorCode.BAD_HEADER,
    ),
    "experts[0]": (lambda v: _load(v), {"map"}, "uid", ErrorCode.BAD_HEADER),
    "uid": (lambda v: _load({**_BUILTIN_SPEC, "uid": v}), {"str"}, "uid", ErrorCode.BAD_HEADER),
    "io_dtype(builtin)": (
        lambda v: _load({**_BUILTIN_SPEC, "io_dtype": v}),
        {"str"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "io_dtype": (
        lambda v: _load({**_FILE_SPEC, "io_dtype": v}),
        {"str"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "dtype": (
        lambda v: _load({**_FILE_SPEC, "dtype": v}),
        {"str", "nil"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "runtime": (
        lambda v: _load({**_FILE_SPEC, "runtime": v}),
        {"str"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "quant": (
        lambda v: _load({**_FILE_SPEC, "quant": v}),
        {"str", "nil"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "path": (lambda v: _load({**_FILE_SPEC, "path": v}), {"str"}, "uid", ErrorCode.BAD_PATH),
    "hidden": (
        lambda v: _load({**_BUILTIN_SPEC, "hidden": v}),
        {"int"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "builtin": (
        lambda v: _load({**_BUILTIN_SPEC, "builtin": v}),
        {"str"},
        "uid",
        ErrorCode.BAD_HEADER,
    ),
    "uids": (lambda v: (_hdr("unload", 23, uids=v), []), {"list"}, "reply", ErrorCode.BAD_HEADER),
    "uids[0]": (lambda v: (_hdr("unload", 23, uids=[v]), []), {"str"}, "uid", ErrorCode.BAD_HEADER),
}
_WRONG_TYPE_CASES = [
    pytest.param(f, kind, id=f"{f}={kind}")
    for f, (_, ok, _, _) in _FIELDS.items()
    for kind in _WRONG
    if kind not in ok
]


@pytest.fixture(scope="module")
def typed_agent(tmp_path_factory):
    """One agent (L0.E0/E1/E2 loaded) and a raw client for all the wrong-type cases."""
    a = _start_in(tmp_path_factory.mktemp("typed"), "typed")
    c = RawClient(a.endpoint)
    try:
        _load_both(c)
        yield a, c
    finally:
        c.close()
        stop_agent(a)


@pytest.mark.parametrize("field, kind", _WRONG_TYPE_CASES)
def test_header_field_of_the_wrong_type_gets_the_bad_input_code(typed_agent, field, kind):
    a, c = typed_agent
    build, _, where, want = _FIELDS[field]
    header, frames = build(_WRONG[kind])
    log_at = _log_size(a)
    h, out = c.call(header, frames)
    if where == "reply":
        assert (h["code"], out) == (want, []), h
    else:  # the request is served; the one expert / uid in it is refused
        assert h["code"] == ErrorCode.OK and [e[0] for e in h["errors"].values()] == [want], h
        assert h.get("loaded", []) == [] and h.get("unloaded", []) == [] and h.get("t", []) == [], h
    _assert_clean_log(a, log_at)
    # nothing loaded or unloaded by the refused request
    h, _ = c.call(_hdr("status", 24))
    assert set(h["status"]["experts"]) == {"L0.E0", "L0.E1", "L0.E2"}, h["status"]["experts"]


def test_queue_time_and_sigterm_clean_shutdown(agents):
    a = agents()
    c = RawClient(a.endpoint)
    try:
        h, _ = c.call(_hdr("load", experts=[{"uid": "L0.E0", "path": "experts/L0.E0.safetensors"}]))
        assert h["loaded"] == ["L0.E0"]
        x = torch.randn(8000, HIDDEN)  # ~1 MB (the limit) and a few ms of compute per request
        for rid in range(1, 7):
            c.send(
                [
                    msgpack.packb(_hdr("forward", rid, t=[["L0.E0", "float32", list(x.shape)]])),
                    P.tensor_buffer(x),
                ]
            )
        replies = sorted((c.recv()[0] for _ in range(6)), key=lambda h: h["id"])
        assert all(h["code"] == 0 for h in replies)
        # a request taken in while an earlier one computed waits for it: its queue time covers at
        # least that compute (which requests are taken in together depends on when their bytes
        # arrive, so not which one; replies sorted by id = the agent's FIFO order)
        assert any(
            r["queue_ms"] >= 0.9 * prev["compute_ms"] for prev, r in itertools.pairwise(replies)
        ), [(h["queue_ms"], h["compute_ms"]) for h in replies]
    finally:
        c.close()
    assert stop_agent(a) == "terminated"
    assert "shut down cleanly" in Path(a.log_path).read_text()
    assert not Path(a.ready_path).exists()


def test_status_feed_and_backend_reroute_and_unreachable(agents):
    a1, a2 = agents("a1"), agents("a2")
    # L0.E0 on a1 (which will not have it loaded) with a replica on a2; L0.E1 only on a dead port
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as s:
        port = s.bind_to_random_port("tcp://127.0.0.1")
    be = RemoteExpertBackend(
        {"a1": a1.endpoint, "a2": a2.endpoint, "dead": f"tcp://127.0.0.1:{port}"},
        {"L0.E0": ["a1", "a2"], "L0.E1": ["dead"]},
        timeout_s=2.0,
    )
    feed = StatusFeed({"a1": a1.pub_endpoint, "a2": a2.pub_endpoint})
    try:
        with pytest.raises(AgentError):
            be.ping("dead", timeout_s=0.3)
        be.remove_agent("dead")  # connect() only for the live ones
        clocks = be.connect()
        assert set(clocks) == {"a1", "a2"} and all(
            abs(c.offset_ns) < 5e6 and c.rtt_ms > 0 for c in clocks.values()
        )
        be.add_agent("dead", f"tcp://127.0.0.1:{port}")
        assert be.load_experts("a2", [{"uid": "L0.E0", "path": "experts/L0.E0.safetensors"}]) == [
            "L0.E0"
        ]
        x0, x1 = torch.randn(4, HIDDEN), torch.randn(2, HIDDEN)
        t0 = time.monotonic()
        res = be.run_layer(LayerWork(0, 3, {"L0.E0": x0, "L0.E1": x1}))
        assert time.monotonic() - t0 < 1.0  # nothing waited for a timeout
        ref = load_expert(Path(a2.workdir) / "experts" / "L0.E0.safetensors")(x0)
        assert (res.outputs["L0.E0"] - ref).abs().max() < 1e-5
        assert res.info["served_by"] == {"L0.E0": "a2"} and res.info["rerouted"] == {"L0.E0": "a2"}
        assert set(res.failed) == {"L0.E1"} and "unreachable" in res.failed["L0.E1"]
        rows = {(r["uid"], r["device"]): r for r in res.info["calls"]}
        assert rows[("L0.E0", "a1")]["status"] == f"error:{int(ErrorCode.UNKNOWN_EXPERT)}"
        ok = rows[("L0.E0", "a2")]
        assert (
            ok["status"] == "ok"
            and ok["attempt"] == 1
            and ok["bytes_out"] == ok["bytes_in"] == x0.numel() * 4
        )
        assert ok["network_ms"] > 0 and ok["compute_ms"] > 0 and ok["queue_ms"] >= 0
        assert abs(ok["rtt_ms"] - ok["network_ms"] - ok["device_ms"]) < 1e-6
        assert rows[("L0.E1", "dead")]["status"] == "unreachable"
        # the dead device is now in back-off: skipped without trying
        res2 = be.run_layer(LayerWork(0, 4, {"L0.E1": x1}))
        assert res2.info["calls"][0]["status"] == "skipped" and "L0.E1" in res2.failed
        deadline = time.monotonic() + 5
        while set(feed.view) != {"a1", "a2"} and time.monotonic() < deadline:
            feed.poll(0.5)
        assert set(feed.view) == {"a1", "a2"}
        while "L0.E0" not in feed.view["a2"]["experts"] and time.monotonic() < deadline:
            feed.poll(0.5)
        assert feed.view["a2"]["experts"]["L0.E0"]["calls"] >= 1 and feed.age_s("a2") < 2
    finally:
        feed.close()
        be.close()


def test_energy_in_status_ping_forward_and_backend_rows(agents, tmp_path):
    a = agents("a1", ("--meter", "estimated", "--cpu-core-w", "10"))
    label = "estimated:cpu-time(10 W/core)"
    be = RemoteExpertBackend({"a1": a.endpoint}, {"L0.E0": ["a1"], "L0.E1": ["a1"]}, timeout_s=5.0)
    feed = StatusFeed({"a1": a.pub_endpoint})
    try:
        be.connect()
        assert be.agents["a1"].energy_source == label
        st = be.status("a1")
        assert st["energy_source"] == label and st["energy_meter"]["energy_source"] == "estimated"
        # only the estimate was asked for (--meter estimated): no other kind was tried, so none
        # was skipped (an agent that ignored --meter and fell through auto-detection to the
        # estimate would list the kinds it tried here)
        assert st["energy_meter"]["skipped"] == {}, st["energy_meter"]
        p0 = be.request("a1", "ping")[0]["energy_j"]
        be.load_experts(
            "a1", [{"uid": u, "path": f"experts/{u}.safetensors"} for u in ("L0.E0", "L0.E1")]
        )
        # enough rows that the compute window takes measurable CPU time
        x0, x1 = torch.randn(6000, HIDDEN), torch.randn(1500, HIDDEN)  # < MAX_MSG
        res = be.run_layer(LayerWork(0, 0, {"L0.E0": x0, "L0.E1": x1}))
        rows = {r["uid"]: r for r in res.info["calls"]}
        assert all(r["status"] == "ok" and r["energy_source"] == label for r in rows.values())
        e0, e1 = rows["L0.E0"]["energy_j"], rows["L0.E1"]["energy_j"]
        assert e0 > 0 and e1 > 0
        # shared by compute time, as the agent reported it
        ms0, ms1 = rows["L0.E0"]["compute_ms"], rows["L0.E1"]["compute_ms"]
        assert e0 / (e0 + e1) == pytest.approx(ms0 / (ms0 + ms1), rel=1e-6)
        # the compute window's CPU time x 10 W cannot exceed 10 W x its wall time (one thread)
        assert e0 + e1 <= 10.0 * rows["L0.E0"]["device_ms"] / 1e3 * 1.05 + 1e-3
        p1 = be.request("a1", "ping")[0]["energy_j"]
        assert p1 - p0 >= e0 + e1 > 0  # the ping window encloses the call
        # the counter in the feed catches up with the ping's (a message already on its way
        # when the ping was read may carry an older reading)
        deadline = time.monotonic() + 5
        fs: dict = {}
        while time.monotonic() < deadline:
            feed.poll(0.5)
            fs = feed.view.get("a1") or {}
            if fs.get("power_w") and fs.get("energy_j", 0.0) >= p1 - 1e-9:
                break
        assert fs["energy_source"] == label and fs["energy_j"] >= p1 - 1e-9 and fs["power_w"] > 0
    finally:
        feed.close()
        be.close()


def test_asked_for_meter_missing_one_line_error(tmp_path):
    import subprocess
    import sys

    from device_agent.energy import MeterUnavailable, detect_meter

    try:
        detect_meter("/", {"only": ["tegrastats"]}).close()
        pytest.skip("this host has tegrastats: the meter asked for exists")
    except MeterUnavailable:
        pass
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_agent",
            "serve",
            "--bind",
            "tcp://127.0.0.1:*",
            "--workdir",
            str(tmp_path),
            "--meter",
            "tegrastats",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3
    lines = res.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: --meter tegrastats: ")
        and "tegrastats not found on PATH" in lines[0]
    ), lines


def test_timeout_renews_the_connection_and_the_agent_serves_after(agents):
    """A stopped agent (SIGSTOP): the call times out, the backend replaces its connection (Lazy
    Pirate) keeping the clock estimate; resumed (SIGCONT), the agent answers on the new one and
    the old request's late reply never surfaces."""
    import os
    import signal

    a = agents()
    be = RemoteExpertBackend(
        {"a1": a.endpoint}, {"L0.E2": ["a1"]}, timeout_s=0.5, down_backoff_s=0.0
    )
    try:
        be.connect()
        be.load_experts(
            "a1", [{"uid": "L0.E2", "builtin": "identity", "hidden": HIDDEN, "io_dtype": "float16"}]
        )
        clock, sock = be.agents["a1"].clock, be.agents["a1"].sock
        x = torch.randn(4, HIDDEN).half()
        os.kill(a.pid, signal.SIGSTOP)
        try:
            res = be.run_layer(LayerWork(0, 0, {"L0.E2": x}))
        finally:
            os.kill(a.pid, signal.SIGCONT)
        assert "L0.E2" in res.failed and res.info["calls"][0]["status"] == "timeout"
        assert "connection renewed" in res.info["calls"][0]["reason"]
        assert be.reconnects == {"a1": 1} and be.agents["a1"].sock is not sock
        assert be.agents["a1"].clock is clock
        res = be.run_layer(LayerWork(0, 1, {"L0.E2": x}))
        assert not res.failed and torch.equal(res.outputs["L0.E2"], x)
        assert be.stale_replies == 0  # the stopped request's reply went to the closed socket
    finally:
        be.close()
