"""The streaming safetensors writer/reader interoperates with the safetensors library."""

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file

from models.errors import ModelError
from models.safetensors_io import OutTensor, read_header, read_tensor_bytes, write_safetensors


def test_write_then_load_with_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.integers(0, 100, (7,)).astype(np.int8)
    c = rng.standard_normal((2, 2, 2)).astype(np.float16)
    src = tmp_path / "src.safetensors"
    np_save_file({"a": a, "b": b, "c": c}, str(src))
    infos, _ = read_header(src)
    assert {k: (v.dtype, v.shape) for k, v in infos.items()} == {
        "a": ("F32", (3, 5)),
        "b": ("I8", (7,)),
        "c": ("F16", (2, 2, 2)),
    }
    assert read_tensor_bytes(infos["a"]) == a.tobytes()
    out = tmp_path / "out.safetensors"
    # slice of 'a' (rows 1..2) from the middle of the source tensor + in-memory bytes
    w = write_safetensors(
        out,
        [
            OutTensor("a_rows", "F32", (2, 5), infos["a"], offset=5 * 4),
            OutTensor("b", "I8", (7,), infos["b"]),
            OutTensor("mem", "F32", (2,), data=np.array([1.5, -2], np.float32).tobytes()),
        ],
        metadata={"uid": "L0.E1"},
        chunk_bytes=8,
    )
    got = load_file(str(out))
    np.testing.assert_array_equal(got["a_rows"].numpy(), a[1:3])
    np.testing.assert_array_equal(got["b"].numpy(), b)
    np.testing.assert_array_equal(got["mem"].numpy(), [1.5, -2])
    assert w.nbytes == out.stat().st_size
    assert w.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert read_header(out)[1] == {"uid": "L0.E1"}
    assert not (tmp_path / "out.safetensors.tmp").exists()
    # header is 8-byte aligned
    (n,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert n % 8 == 0


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    np_save_file({"w": np.zeros((64, 64), np.float32)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ModelError, match=r"t\.safetensors: w: .*truncated"):
        read_header(p)


@pytest.mark.parametrize(
    "content", [b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"nope"]
)
def test_garbage_rejected(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(ModelError, match="bad.safetensors"):
        read_header(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nothere.safetensors: file not found"):
        read_header(tmp_path / "nothere.safetensors")


def test_bf16_bytes_copied_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    t = torch.randn(4, 6).to(torch.bfloat16)
    src = tmp_path / "s.safetensors"
    save_file({"x": t}, str(src))
    infos, _ = read_header(src)
    out = tmp_path / "o.safetensors"
    write_safetensors(out, [OutTensor("x", "BF16", (4, 6), infos["x"])])
    assert torch.equal(load_file(str(out))["x"], t)
