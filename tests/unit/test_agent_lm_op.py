"""Whole-model experts (MoE²) on the agent, in-process: the ``load_model`` / ``unload_model`` /
``lm`` ops through the server's own dispatch and reply path (no socket traffic: replies are
captured), every bad field refused with the protocol's error naming it, a raising model
reported ``INTERNAL``, queue expiry; the BS client's argument checks and its ``unreachable``
status; ``sync_models`` pushing a model folder once (sha256 reuse) with a local runner."""

from __future__ import annotations

import logging
import secrets
import sys
import time
from pathlib import Path

import pytest
import torch

import device_agent.server as server_mod
from device_agent import protocol as P
from device_agent.energy import MeterOptions
from device_agent.protocol import ErrorCode
from device_agent.server import AgentServer
from device_agent.transport import Request
from models.dense_lm import DenseLM, DenseLMConfig, load_dense_lm, save_dense_lm

CFG = DenseLMConfig(
    vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24, max_seq_len=20
)
V, MAXLEN = CFG.vocab_size, CFG.max_seq_len


def make_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny random DenseLM saved in ``folder`` (weights large enough for peaked outputs)."""
    torch.manual_seed(seed)
    m = DenseLM(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.4)
    save_dense_lm(m, folder)
    return folder


class Agent:
    """An AgentServer in this process on an inproc endpoint; :meth:`call` runs one request
    through :meth:`AgentServer.handle` and returns the reply it sent (header, frames)."""

    def __init__(self, workdir: Path, monkeypatch) -> None:
        self.sent: list[tuple[dict, list]] = []
        monkeypatch.setattr(
            server_mod, "send_reply", lambda sock, env, h, bufs: self.sent.append((h, bufs))
        )
        self.srv = AgentServer(
            f"inproc://lm-{secrets.token_hex(4)}",
            workdir,
            device="cpu",
            meter=MeterOptions(only=["estimated"]),
        )
        self.rid = 0

    def call(
        self, op: str, frames: tuple = (), waited_s: float = 0.0, **fields
    ) -> tuple[dict, list]:
        self.rid += 1
        hb = P.pack({"v": P.PROTOCOL_VERSION, "op": op, "id": self.rid, **fields})
        body = [hb, *frames]
        self.srv.handle(
            Request(
                [b"bs"],
                body,
                time.time_ns(),
                time.perf_counter() - waited_s,
                sum(len(b) for b in body),
            )
        )
        h, bufs = self.sent.pop()
        assert h["id"] == self.rid and "t1_ns" in h and "t2_ns" in h
        return h, bufs


@pytest.fixture
def agent(tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    make_lm(wd / "models" / "m1")
    a = Agent(wd, monkeypatch)
    h, _ = a.call("load_model", model="m1", path="models/m1")
    assert h["code"] == 0, h
    assert h["vocab_size"] == V and h["max_seq_len"] == MAXLEN and h["params"] > 0
    yield a
    a.srv.close()


def test_ops_are_listed():
    assert {"lm", "load_model", "unload_model"} <= set(P.OPS)
    for op in ("``lm``", "``load_model``", "``unload_model``"):
        assert op in P.__doc__


def _timed(h: dict) -> None:
    assert h["code"] == 0, h
    assert h["queue_ms"] >= 0 and h["compute_ms"] > 0
    e0, e1 = h["energy_j"]
    assert isinstance(e0, float) and e1 >= e0


def test_next_score_generate_equal_in_process(agent, tmp_path):
    ref = load_dense_lm(tmp_path / "wd" / "models" / "m1")
    prompt = [3, 7, 11, 2]
    h, bufs = agent.call("lm", model="m1", mode="next", prompt=prompt)
    _timed(h)
    assert h["result"] is None and h["t"] == [["m1", "float32", [1, V]]] and len(bufs) == 1
    got = P.frame_tensor(bytes(bufs[0]), "float32", (1, V))[0]
    assert torch.equal(got, ref.next_token_logprobs(prompt))

    opts = [[1], [4, 5], [], [9, 9, 9]]
    h, bufs = agent.call("lm", model="m1", mode="score", prompt=prompt, options=opts)
    _timed(h)
    assert bufs == [] and h["result"] == ref.option_logprobs(prompt, opts)
    assert h["result"][2] == 0.0 and all(isinstance(x, float) for x in h["result"])

    h, _ = agent.call("lm", model="m1", mode="generate", prompt=prompt, max_new_tokens=6, eos_id=-1)
    _timed(h)
    assert h["result"] == ref.generate(prompt, 6, -1) and len(h["result"]) == 6
    st = agent.srv.status()
    assert st["models"]["m1"]["calls"] == 3 and st["models"]["m1"]["tokens_out"] == 7
    assert st["load"]["lm_calls"] == 3 and st["models"]["m1"]["source"] == "models/m1"


def _lm(**kw) -> dict:
    base = {"model": "m1", "mode": "next", "prompt": [1, 2, 3]}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize(
    "fields, code, names",
    [
        (_lm(model="nope"), ErrorCode.UNKNOWN_EXPERT, "model nope"),
        (_lm(model=...), ErrorCode.BAD_HEADER, "model"),
        (_lm(model=5), ErrorCode.BAD_HEADER, "model"),
        (_lm(model=["m1"]), ErrorCode.BAD_HEADER, "model"),
        (_lm(mode="beam"), ErrorCode.BAD_HEADER, "mode"),
        (_lm(mode=...), ErrorCode.BAD_HEADER, "mode"),
        (_lm(mode=["next"]), ErrorCode.BAD_HEADER, "mode"),
        (_lm(prompt=...), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt="abc"), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[]), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[1.0, 2]), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[True]), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[V]), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[-1]), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[[1]]), ErrorCode.BAD_HEADER, "prompt"),
        (_lm(prompt=[1] * (MAXLEN + 1)), ErrorCode.TOO_LARGE, "prompt"),
        (_lm(mode="score"), ErrorCode.BAD_HEADER, "options"),
        (_lm(mode="score", options=[]), ErrorCode.BAD_HEADER, "options"),
        (_lm(mode="score", options=[1, 2]), ErrorCode.BAD_HEADER, "options[0]"),
        (_lm(mode="score", options=[[1], [2, "x"]]), ErrorCode.BAD_HEADER, "options[1]"),
        (_lm(mode="score", options=[[1] * MAXLEN]), ErrorCode.TOO_LARGE, "prompt + option"),
        (_lm(mode="score", options=[[1]] * 2000), ErrorCode.TOO_LARGE, "options"),
        (_lm(mode="generate", eos_id=0), ErrorCode.BAD_HEADER, "max_new_tokens"),
        (_lm(mode="generate", max_new_tokens=3), ErrorCode.BAD_HEADER, "eos_id"),
        (_lm(mode="generate", max_new_tokens=-1, eos_id=0), ErrorCode.BAD_HEADER, "max_new"),
        (_lm(mode="generate", max_new_tokens=True, eos_id=0), ErrorCode.BAD_HEADER, "max_new"),
        (_lm(mode="generate", max_new_tokens=2, eos_id=V), ErrorCode.BAD_HEADER, "eos_id"),
        (_lm(mode="generate", max_new_tokens=2, eos_id=1.5), ErrorCode.BAD_HEADER, "eos_id"),
        (_lm(timeout_ms="soon"), ErrorCode.BAD_HEADER, "timeout_ms"),
        (_lm(timeout_ms=float("nan")), ErrorCode.BAD_HEADER, "timeout_ms"),
    ],
)
def test_bad_lm_requests_get_errors_naming_the_field(agent, fields, code, names, caplog):
    errors0 = agent.srv.counters.errors
    with caplog.at_level(logging.ERROR, logger="device_agent"):
        h, bufs = agent.call("lm", **fields)
    assert h["code"] == code, h
    assert names in h["error"] and "\n" not in h["error"] and len(h["error"]) < 300
    assert bufs == [] and agent.srv.counters.errors == errors0 + 1
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    # the agent serves on
    h, _ = agent.call("lm", **_lm())
    assert h["code"] == 0


def test_lm_with_a_data_frame_is_refused(agent):
    h, _ = agent.call("lm", frames=(b"\x00" * 8,), **_lm())
    assert h["code"] == ErrorCode.BAD_FRAMES


def test_raising_model_is_internal_and_expiry(agent, caplog):
    class Broken:
        def next_token_logprobs(self, prompt):
            raise RuntimeError("boom")

    good = agent.srv.lm.store.models["m1"].model
    agent.srv.lm.store.models["m1"].model = Broken()
    with caplog.at_level(logging.ERROR, logger="device_agent"):
        h, _ = agent.call("lm", **_lm())
    assert h["code"] == ErrorCode.INTERNAL and h["error"] == "m1: RuntimeError: boom"
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    agent.srv.lm.store.models["m1"].model = good
    # a request that waited longer than its timeout_ms in the queue is dropped unserved
    h, _ = agent.call("lm", waited_s=0.5, timeout_ms=100, **_lm())
    assert h["code"] == ErrorCode.EXPIRED and "timeout 100 ms" in h["error"]
    h, _ = agent.call("lm", waited_s=0.05, timeout_ms=5000, **_lm())
    assert h["code"] == 0 and h["queue_ms"] >= 50


def test_load_and_unload_model(agent, tmp_path):
    wd = tmp_path / "wd"
    (wd / "models" / "junk").mkdir()
    (wd / "models" / "junk" / "config.json").write_text("{not json")
    (tmp_path / "outside").mkdir()
    for fields, code, names in [
        ({"model": "m2", "path": "../outside"}, ErrorCode.BAD_PATH, "path"),
        ({"model": "m2", "path": "/etc"}, ErrorCode.BAD_PATH, "path"),
        ({"model": "m2", "path": 3}, ErrorCode.BAD_PATH, "path"),
        ({"model": "m2", "path": "models/none"}, ErrorCode.LOAD_FAILED, "models/none"),
        ({"model": "m2", "path": "models/junk"}, ErrorCode.LOAD_FAILED, "ModelError"),
        ({"model": "a/b", "path": "models/m1"}, ErrorCode.BAD_HEADER, "model"),
        ({"model": "", "path": "models/m1"}, ErrorCode.BAD_HEADER, "model"),
        ({"path": "models/m1"}, ErrorCode.BAD_HEADER, "model"),
    ]:
        h, _ = agent.call("load_model", **fields)
        assert h["code"] == code and names in h["error"], (fields, h)
    assert set(agent.srv.status()["models"]) == {"m1"}
    h, _ = agent.call("load_model", model="m2", path="models/m1")
    assert h["code"] == 0 and set(agent.srv.status()["models"]) == {"m1", "m2"}
    h, _ = agent.call("unload_model", models=["m1", "zz", 4])
    assert h["code"] == 0 and h["unloaded"] == ["m1"]
    assert h["errors"]["zz"][0] == ErrorCode.UNKNOWN_EXPERT and h["errors"]["4"][0] == 1
    h, _ = agent.call("lm", **_lm())
    assert h["code"] == ErrorCode.UNKNOWN_EXPERT
    h, _ = agent.call("unload_model", models="m2")
    assert h["code"] == ErrorCode.BAD_HEADER and "models" in h["error"]
    assert set(agent.srv.status()["models"]) == {"m2"}


def test_client_arguments_and_unreachable():
    from testbed.dataplane.backend import RemoteExpertBackend
    from testbed.dataplane.lm_call import lm_fields, lm_request

    with pytest.raises(ValueError, match="mode"):
        lm_fields("m", "beam", [1], None, None, None)
    with pytest.raises(ValueError, match="options"):
        lm_fields("m", "score", [1], None, None, None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm_fields("m", "generate", [1], None, None, 2)
    assert lm_fields("m", "generate", [1], None, 3, 2) == {
        "model": "m",
        "mode": "generate",
        "prompt": [1],
        "max_new_tokens": 3,
        "eos_id": 2,
    }
    # nothing listens on port 1: the call ends unreachable (no exception), the device backs off
    with RemoteExpertBackend({"d": "tcp://127.0.0.1:1"}, timeout_s=0.3) as be:
        rep = lm_request(be, "d", "m", "next", [1, 2])
        assert rep.status == "unreachable" and not rep.ok and rep.result is None
        assert "not connected" in rep.detail and not be.is_up("d")
        rep = lm_request(be, "other", "m", "next", [1])
        assert rep.status == "unreachable" and "unknown device" in rep.detail


def test_sync_models_pushes_changed_files_only(tmp_path):
    from testbed.errors import ProvisionError
    from testbed.lab.inventory import Device
    from testbed.lab.provision import HASH_CACHE, sync_models
    from testbed.lab.runner import LocalRunner

    src = make_lm(tmp_path / "src" / "m1")
    wd = tmp_path / "dev"
    dev = Device("d1", "127.0.0.1", "root", str(wd), sys.executable, "netns", 1000)
    r = LocalRunner()
    rel, n = sync_models(r, dev, {"m1": src})
    assert rel == {"m1": "models/m1"} and n == 2
    for f in ("config.json", "model.safetensors"):
        assert (wd / "models" / "m1" / f).read_bytes() == (src / f).read_bytes()
    assert (wd / "models" / "m1" / HASH_CACHE).is_file()
    assert sync_models(r, dev, {"m1": src}) == (rel, 0)
    make_lm(src, seed=1)  # new weights, same config: only the weights go again
    assert sync_models(r, dev, {"m1": src}) == (rel, 1)
    assert (wd / "models" / "m1" / "model.safetensors").read_bytes() == (
        src / "model.safetensors"
    ).read_bytes()
    with pytest.raises(ProvisionError, match="model id"):
        sync_models(r, dev, {"../x": src})
    with pytest.raises(ProvisionError, match="not a folder"):
        sync_models(r, dev, {"m2": tmp_path / "none"})
