"""Whole-model experts (MoE²) for real: a tiny random DenseLM pushed over SSH into a local
testbed device's workdir (``agents_push_models``: a second push copies nothing), an agent
started in the device's namespace loads it, and its ``next`` / ``score`` / ``generate`` answers
over the shaped link EQUAL the same model run here; every timing field is filled; a timeout and
an error reply come back as statuses, and the agent serves on."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from models.dense_lm import load_dense_lm
from testbed.dataplane.backend import RemoteExpertBackend
from testbed.dataplane.lm_call import LMReply, lm_request, load_model, unload_model
from testbed.lab.agents import start_agent, stop_agent
from testbed.lab.inventory import load_inventory, ssh_runner_for
from testbed.lab.provision import HASH_CACHE, agents_push_models
from tests.conftest import needs_testbed
from tests.unit.test_agent_lm_op import CFG, make_lm

pytestmark = [needs_testbed, pytest.mark.root]

FAST_KBIT = 1_000_000
PROMPT = [3, 7, 11, 2, 5]
OPTIONS = [[1], [4, 5], [9, 9, 9], [0, 2]]


@contextlib.contextmanager
def one_thread():
    """Run the reference as the agent does (``start_agent``'s default: one torch thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _filled(rep: LMReply) -> None:
    assert rep.ok, (rep.status, rep.detail)
    assert rep.compute_ms is not None and rep.compute_ms > 0
    assert rep.queue_ms is not None and rep.queue_ms >= 0
    assert rep.rtt_ms is not None and rep.rtt_ms > rep.compute_ms
    assert rep.network_ms is not None and rep.network_ms > 0
    assert rep.bytes_down > 0 and rep.bytes_up > 0
    assert rep.energy_j is not None and rep.energy_j >= 0
    assert isinstance(rep.energy_source, str) and rep.energy_source


def _owned_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def test_whole_model_pushed_loaded_and_equal_to_in_process(make_testbed, tmp_path):
    _, inv_path = make_testbed(devices=1, rate_kbit=FAST_KBIT)
    inv = load_inventory(inv_path)
    dev = inv.devices[0]
    src = make_lm(tmp_path / "lm" / "m1")

    rows = agents_push_models(inv, {dev.name: {"m1": src}})
    assert [(r["device"], r["ok"], r["pushed"]) for r in rows] == [(dev.name, True, 2)], rows
    rel = rows[0]["models"]["m1"]
    assert rel == "models/m1"
    held = Path(dev.workdir) / rel
    before = _owned_files(held)
    assert set(before) == {"config.json", "model.safetensors", HASH_CACHE}
    # a second push of the same model copies nothing (sha256 reuse)
    again = agents_push_models(inv, {dev.name: {"m1": src}})
    assert again[0]["ok"] and again[0]["pushed"] == 0 and again[0]["models"] == {"m1": rel}
    assert _owned_files(held) == before

    runner = ssh_runner_for(inv, dev)
    agent = None
    backend = None
    try:
        agent = start_agent(
            runner, device=dev.name, host=dev.host, workdir=dev.workdir, tag="agent-lm"
        )
        backend = RemoteExpertBackend({dev.name: agent.endpoint}, timeout_s=10.0)
        backend.connect()
        info = load_model(backend, dev.name, "m1", rel)
        assert info["vocab_size"] == CFG.vocab_size and info["max_seq_len"] == CFG.max_seq_len
        _check_calls(backend, dev.name, src)
        assert unload_model(backend, dev.name, ["m1"]) == ["m1"]
        rep = lm_request(backend, dev.name, "m1", "next", PROMPT)
        assert rep.status == "error:4" and rep.result is None
    finally:
        if backend is not None:
            backend.close()
        if agent is not None:
            stop_agent(agent)
        runner.close()


def _check_calls(backend: RemoteExpertBackend, name: str, src: Path) -> None:
    """next / score / generate on the agent equal the same model here; timeout and error
    statuses; the status lists the model."""
    ref = load_dense_lm(src)
    with one_thread():
        want_next = ref.next_token_logprobs(PROMPT)
        want_score = ref.option_logprobs(PROMPT, OPTIONS)
        want_gen = ref.generate(PROMPT, 8, -1)

    nxt = lm_request(backend, name, "m1", "next", PROMPT)
    _filled(nxt)
    assert nxt.result.dtype == torch.float32 and torch.equal(nxt.result, want_next)
    assert nxt.bytes_up > 4 * CFG.vocab_size
    score = lm_request(backend, name, "m1", "score", PROMPT, options=OPTIONS)
    _filled(score)
    assert score.result == want_score
    gen = lm_request(backend, name, "m1", "generate", PROMPT, max_new_tokens=8, eos_id=-1)
    _filled(gen)
    assert gen.result == want_gen and len(gen.result) == 8
    print(
        f"\nlm over the testbed link: next rtt {nxt.rtt_ms:.2f} ms (compute {nxt.compute_ms:.2f},"
        f" network {nxt.network_ms:.2f}, queue {nxt.queue_ms:.3f}, {nxt.bytes_up} B up);"
        f" generate 8 tokens rtt {gen.rtt_ms:.2f} ms (compute {gen.compute_ms:.2f});"
        f" energy {gen.energy_j:.4f} J ({gen.energy_source})"
    )

    # an error reply is a status, not an exception
    bad = lm_request(backend, name, "nope", "next", PROMPT)
    assert bad.status == "error:4" and "not loaded" in bad.detail and bad.rtt_ms is not None
    # no reply by the deadline: a timeout; the connection is renewed and the next call served
    slow = lm_request(
        backend, name, "m1", "generate", PROMPT, max_new_tokens=15, eos_id=-1, timeout_s=0.001
    )
    assert slow.status == "timeout" and slow.result is None, (slow.status, slow.detail)
    assert backend.reconnects.get(name) == 1
    again = lm_request(backend, name, "m1", "score", PROMPT, options=OPTIONS)
    _filled(again)
    assert again.result == want_score
    st = backend.status(name)
    assert st["models"]["m1"]["calls"] >= 4 and st["load"]["lm_calls"] >= 4
