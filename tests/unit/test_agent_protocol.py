"""Pure parts of the device-agent protocol: headers, tensor frames, paths, placement."""

from __future__ import annotations

import msgpack
import pytest
import torch

from device_agent import protocol as P
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.server import resolve_in_workdir
from testbed.dataplane.backend import round_robin_placement


def test_error_codes_are_unique_and_stable():
    assert len({int(c) for c in ErrorCode}) == len(ErrorCode)
    assert (
        ErrorCode.BAD_HEADER,
        ErrorCode.BAD_VERSION,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.UNKNOWN_EXPERT,
        ErrorCode.DTYPE_MISMATCH,
        ErrorCode.SHAPE_MISMATCH,
        ErrorCode.TOO_LARGE,
        ErrorCode.INTERNAL,
    ) == (1, 2, 3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", ErrorCode.BAD_HEADER),
        (b"\xc1", ErrorCode.BAD_HEADER),
        (msgpack.packb([1]), ErrorCode.BAD_HEADER),
        (msgpack.packb({"op": "ping"}), ErrorCode.BAD_HEADER),
        (msgpack.packb({"v": 1, "id": "x"}), ErrorCode.BAD_HEADER),
        (msgpack.packb({"v": 1, "id": True}), ErrorCode.BAD_HEADER),
        (msgpack.packb({"v": 2}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": True}), ErrorCode.BAD_VERSION),
        # v of the wrong type, 1.0 included (== 1 in Python, but not the integer the protocol names)
        (msgpack.packb({"v": 1.0}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": "1"}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": [1]}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": {"a": 1}}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": None}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": 1, "id": 1.0}), ErrorCode.BAD_HEADER),
        (msgpack.packb({"v": 1, "id": [1]}), ErrorCode.BAD_HEADER),
        (msgpack.packb({1: 2}), ErrorCode.BAD_HEADER),  # non-string map key
        (msgpack.packb({"v": 1, "x": msgpack.ExtType(5, b"ab")}), ErrorCode.BAD_HEADER),
        (bytes(P.MAX_HEADER_BYTES + 1), ErrorCode.BAD_HEADER),
    ],
)
def test_unpack_rejects(data, code):
    with pytest.raises(ProtocolError) as e:
        P.unpack(data)
    assert e.value.code == code


def test_header_roundtrip_and_reply():
    h = P.unpack(P.pack({"v": P.PROTOCOL_VERSION, "op": "ping", "id": 7, "b": b"\x00"}))
    assert h == {"v": 1, "op": "ping", "id": 7, "b": b"\x00"}
    r = P.reply_header(7, ErrorCode.UNKNOWN_OP, "nope")
    assert r["code"] == 3 and r["error"] == "nope" and r["id"] == 7
    assert P.reply_header("junk")["id"] is None and "error" not in P.reply_header(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_frames_roundtrip_bit_exact(dtype):
    x = torch.randn(5, 12).to(dtype)
    buf = P.tensor_buffer(x.t().contiguous().t())  # non-contiguous input is made contiguous
    y = P.frame_tensor(bytes(buf), P.dtype_name(dtype), (5, 12))
    assert y.dtype == dtype and torch.equal(y, x)
    assert P.frame_tensor(b"", "float32", (0, 12)).shape == (0, 12)
    with pytest.raises(ProtocolError) as e:
        P.frame_tensor(bytes(buf)[:-1], P.dtype_name(dtype), (5, 12))
    assert e.value.code == ErrorCode.BAD_FRAMES


@pytest.mark.parametrize(
    "desc, code",
    [
        ("x", ErrorCode.BAD_HEADER),
        (["L0.E0", "float32"], ErrorCode.BAD_HEADER),
        ([1, "float32", [1, 2]], ErrorCode.BAD_HEADER),
        (["L0.E0", "int64", [1, 2]], ErrorCode.DTYPE_MISMATCH),
        (["L0.E0", "float32", [1]], ErrorCode.SHAPE_MISMATCH),
        (["L0.E0", "float32", [-1, 2]], ErrorCode.SHAPE_MISMATCH),
        (["L0.E0", "float32", [True, 2]], ErrorCode.SHAPE_MISMATCH),
        (["L0.E0", "float32", [1 << 40, 2]], ErrorCode.SHAPE_MISMATCH),
        # unhashable uid/dtype (a dict lookup with one raises TypeError) and other wrong types
        (["L0.E0", ["float32"], [1, 2]], ErrorCode.BAD_HEADER),
        (["L0.E0", {"a": 1}, [1, 2]], ErrorCode.BAD_HEADER),
        ([["L0.E0"], "float32", [1, 2]], ErrorCode.BAD_HEADER),
        ([{"a": 1}, "float32", [1, 2]], ErrorCode.BAD_HEADER),
        (["L0.E0", b"float32", [1, 2]], ErrorCode.BAD_HEADER),
        (["L0.E0", None, [1, 2]], ErrorCode.BAD_HEADER),
        (["L0.E0", "float32", {"a": 1}], ErrorCode.SHAPE_MISMATCH),
        (["L0.E0", "float32", [1.0, 2]], ErrorCode.SHAPE_MISMATCH),
        (["L0.E0", "float32", [[1], 2]], ErrorCode.SHAPE_MISMATCH),
        ({"a": 1}, ErrorCode.BAD_HEADER),
    ],
)
def test_check_descriptor_rejects(desc, code):
    with pytest.raises(ProtocolError) as e:
        P.check_descriptor(desc)
    assert e.value.code == code


def test_resolve_in_workdir(tmp_path):
    wd = tmp_path / "wd"
    (wd / "experts").mkdir(parents=True)
    assert (
        resolve_in_workdir(wd, "experts/a.safetensors")
        == (wd / "experts" / "a.safetensors").resolve()
    )
    for bad in (
        "/etc/passwd",
        "../x",
        "experts/../../x",
        "",
        "~/x",
        "a\x00b",
        5,
        None,
        True,
        b"x",
        ["x"],
        {"x": 1},
    ):
        with pytest.raises(ProtocolError) as e:
            resolve_in_workdir(wd, bad)
        assert e.value.code == ErrorCode.BAD_PATH, bad
    (wd / "experts" / "out").symlink_to(tmp_path)
    with pytest.raises(ProtocolError):
        resolve_in_workdir(wd, "experts/out/x.safetensors")


def test_round_robin_placement():
    p = round_robin_placement(["a", "b", "c", "d"], ["d1", "d2", "d3"], replicas=2)
    assert p == {"a": ["d1", "d2"], "b": ["d2", "d3"], "c": ["d3", "d1"], "d": ["d1", "d2"]}
    with pytest.raises(ValueError):
        round_robin_placement(["a"], ["d1"], replicas=2)
