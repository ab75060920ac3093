"""Distributed forward across the local testbed: BS (this process) + 3 agents in 3 device
namespaces, started through their SSH runners, over the shaped veths.

Shows: logits equal to the single-process reference within 1e-5 (fp32) and identical greedy
tokens (random Mixtral checkpoint, and the tiny trained model when present); an agent killed
mid-generation is re-routed to replicas or recorded as failed while the others are unaffected.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.backend import LayerWork
from models.manifest import load_manifest
from models.runtime import BaseStationModel
from testbed.dataplane.backend import RemoteExpertBackend, round_robin_placement
from testbed.lab.agents import AgentProcess, kill_agent, push_experts, start_agent, stop_agent
from testbed.lab.inventory import load_inventory, ssh_runner_for
from tests.conftest import leftovers, needs_testbed, unique_name

pytestmark = [needs_testbed, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]
FAST_KBIT = 1_000_000
PROMPTS = [
    [1, 4, 12, 13, 14, 3],
    [1, 5, 22, 23],
    [1, 6, 15, 16, 17, 18, 19, 3],
]  # < 28: valid for the tiny model too


@pytest.fixture(scope="module")
def testbed3(tmp_path_factory) -> Iterator[Path]:
    """One 3-device local testbed at FAST_KBIT for this module's tests, which each start and
    stop their own agents on it: its inventory path. Taken down at the module's end, whatever
    happened, leaving nothing behind."""
    from testbed.lab import local

    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "state").mkdir()
    name = unique_name()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESTBED_STATE_DIR", str(tmp / "state"))
        try:
            yield Path(local.up(name, 3, FAST_KBIT, tmp / f"{name}.inventory.toml")["inventory"])
        finally:
            local.down(name)
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}


@pytest.fixture(scope="module")
def mixtral_split(tmp_path_factory) -> Path:
    """A random small Mixtral checkpoint, split by the models package."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from models.split import split_checkpoint

    d = tmp_path_factory.mktemp("mixtral")
    cfg = MixtralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(d / "ckpt", safe_serialization=True)
    split_checkpoint(d / "ckpt", d / "split")
    return d / "split"


def _tiny_split(tmp_root: Path) -> Path | None:
    """The tiny trained model's split directory, if the models engineer has committed one."""
    tiny = ROOT / "models" / "tiny"
    if not tiny.is_dir():
        return None
    for m in sorted(tiny.rglob("manifest.json")):
        return m.parent
    for c in sorted(tiny.rglob("config.json")):
        if list(c.parent.glob("*.safetensors")):
            from models.split import split_checkpoint

            split_checkpoint(c.parent, tmp_root / "tiny_split")
            return tmp_root / "tiny_split"
    return None


@contextlib.contextmanager
def cluster(inv_path: Path, split: Path, replicas: int = 1, timeout_s: float = 5.0):
    """Agents on every device of the testbed (via SSH), shards pushed and loaded; yields
    (backend, agents by device name). Every agent is stopped on exit, whatever happened."""
    inv = load_inventory(inv_path)
    m = load_manifest(split)
    names = [d.name for d in inv.devices]
    placement = round_robin_placement(m.uids(), names, replicas)
    agents: dict[str, AgentProcess] = {}
    backend = None
    try:
        for dev in inv.devices:
            r = ssh_runner_for(inv, dev)
            agents[dev.name] = start_agent(
                r, device=dev.name, host=dev.host, workdir=dev.workdir, tag=f"agent-{split.name}"
            )
        backend = RemoteExpertBackend(
            {n: a.endpoint for n, a in agents.items()},
            placement,
            timeout_s=timeout_s,
            down_backoff_s=30.0,
        )
        backend.connect()
        for dev in inv.devices:
            mine = [u for u, ds in placement.items() if dev.name in ds]
            rel = push_experts(agents[dev.name].runner, dev.workdir, m, mine)
            assert (
                backend.load_experts(dev.name, [{"uid": u, "path": p} for u, p in rel.items()])
                == mine
            )
        yield backend, agents
    finally:
        if backend is not None:
            backend.close()
        for a in agents.values():
            stop_agent(a)
            a.runner.close()


def _check_equal(split: Path, backend: RemoteExpertBackend) -> None:
    ref = BaseStationModel.from_split_dir(split)
    dist = BaseStationModel.from_split_dir(split, backend=backend)
    ids, mask = BaseStationModel.left_pad(PROMPTS, 0)
    dist.start_recording()
    lg_ref, lg_dist = ref.logits(ids, mask), dist.logits(ids, mask)
    err = float((lg_ref - lg_dist).abs().max())
    assert err <= 1e-5, f"{split.name}: max |logit diff| {err}"
    recs = dist.pop_records()
    assert recs and all(not r.failed for r in recs)
    calls = [c for r in recs for c in r.info["calls"]]
    assert {c["device"] for c in calls} == set(backend.agents) and all(
        c["status"] == "ok" for c in calls
    )
    assert all(c["network_ms"] > 0 and c["compute_ms"] > 0 for c in calls)
    g_ref = ref.generate_greedy(PROMPTS, 6)
    g_dist = dist.generate_greedy(PROMPTS, 6)
    assert g_ref.tokens == g_dist.tokens


def test_distributed_logits_and_generation_equal_reference(testbed3, mixtral_split, tmp_path):
    inv_path = testbed3
    splits = [mixtral_split]
    tiny = _tiny_split(tmp_path)
    if tiny is not None:
        splits.append(tiny)
    for split in splits:
        with cluster(inv_path, split) as (backend, agents):
            clocks = backend.estimate_clock_offsets(5)
            # namespaces share this machine's clock: the NTP-style estimate must find ~0
            assert all(abs(c.offset_ns) < 2e6 and 0 < c.rtt_ms < 50 for c in clocks.values()), (
                clocks
            )
            # the agents are really inside the namespaces, on the device addresses
            inv = load_inventory(inv_path)
            assert {a.endpoint.split(":")[1].strip("/") for a in agents.values()} == {
                d.host for d in inv.devices
            }
            _check_equal(split, backend)


class KillAfter:
    """Wraps a backend; SIGKILLs one agent once ``after_calls`` layer calls have been made."""

    def __init__(self, inner: RemoteExpertBackend, victim: AgentProcess, after_calls: int) -> None:
        self.inner, self.victim, self.after_calls = inner, victim, after_calls
        self.calls = 0
        self.killed_at: int | None = None

    def run_layer(self, work: LayerWork):
        if self.calls == self.after_calls:
            kill_agent(self.victim)
            self.killed_at = self.calls
        self.calls += 1
        return self.inner.run_layer(work)


def _calls(recs) -> list[dict]:
    return [dict(c, call_index=i) for i, r in enumerate(recs) for c in r.info["calls"]]


def test_agent_killed_mid_generation(testbed3, mixtral_split):
    inv_path = testbed3
    ref = BaseStationModel.from_split_dir(mixtral_split)
    want = ref.generate_greedy(PROMPTS, 8).tokens
    with cluster(inv_path, mixtral_split, replicas=2, timeout_s=1.0) as (backend, agents):
        n_layers = len(ref.manifest.moe_layers)
        # 1) every expert has a replica: dev2 dies after prefill + 2 decode steps -> re-routed,
        #    the tokens are exactly the reference's
        wrap = KillAfter(backend, agents["dev2"], after_calls=3 * n_layers)
        dist = BaseStationModel.from_split_dir(mixtral_split, backend=wrap)
        dist.start_recording()
        got = dist.generate_greedy(PROMPTS, 8).tokens
        assert wrap.killed_at is not None and got == want
        recs = dist.pop_records()
        assert all(not r.failed for r in recs)
        calls = _calls(recs)
        before = [c for c in calls if c["call_index"] < wrap.killed_at]
        after = [c for c in calls if c["call_index"] >= wrap.killed_at]
        assert all(c["status"] == "ok" for c in before)
        assert any(
            c["status"] in ("timeout", "unreachable", "skipped") and c["device"] == "dev2"
            for c in after
        )
        rerouted = {u for r in recs[wrap.killed_at :] for u in r.info["rerouted"]}
        placed_on_dev2 = {u for u, ds in backend.placement.items() if ds[0] == "dev2"}
        assert rerouted and rerouted <= placed_on_dev2
        assert not any(c["status"] == "ok" and c["device"] == "dev2" for c in after)

        # 2) no replicas, dev3 killed mid-generation: its experts fail (dropped and
        #    renormalised), generation still finishes, dev1's calls are unaffected
        # (each expert is loaded on two devices, so one of dev1/dev3 holds it; no fallback)
        backend.placement = {
            u: [d for d in ds if d != "dev2"][:1] for u, ds in backend.placement.items()
        }
        wrap = KillAfter(backend, agents["dev3"], after_calls=2 * n_layers)
        dist.backend = wrap
        res = dist.generate_greedy(PROMPTS, 8)
        assert [len(t) for t in res.tokens] == [8, 8, 8]
        recs = dist.pop_records()
        calls = _calls(recs)
        on_dev3 = {u for u, ds in backend.placement.items() if ds == ["dev3"]}
        failed_after = {u for r in recs[wrap.killed_at :] for u in r.failed}
        assert failed_after and failed_after <= on_dev3
        assert all(not r.failed for r in recs[: wrap.killed_at])
        assert all(c["status"] == "ok" for c in calls if c["device"] == "dev1")
        assert all(c["status"] == "ok" for c in calls if c["call_index"] < wrap.killed_at)
        _check_plain_rows(calls)
        lost = [c for c in calls if c["status"] != "ok"]
        assert lost and all(c["device"] == "dev3" and c["reason"] for c in lost)


PLAIN = (str, int, float, bool, type(None))
#: what the runner reads from each row to write calls.csv (testbed/run/session.py)
ROW_KEYS = {
    "layer",
    "step",
    "uid",
    "device",
    "attempt",
    "tokens",
    "status",
    "reason",
    "req_id",
    "serialize_ms",
    "network_ms",
    "queue_ms",
    "compute_ms",
    "rtt_ms",
    "device_ms",
    "bytes_out",
    "bytes_in",
}


def _check_plain_rows(calls: list[dict]) -> None:
    """Rows are plain data, ready for calls.csv and JSON: every field the runner reads, each a
    built-in scalar (no tensor, torch.Size or numpy value), unchanged by a JSON round trip."""
    for c in calls:
        assert ROW_KEYS <= set(c), (sorted(ROW_KEYS - set(c)), c)
        bad = {k: type(v).__name__ for k, v in c.items() if type(v) not in PLAIN}
        assert not bad, (bad, c)
        assert isinstance(c["tokens"], int) and c["tokens"] > 0, c
        if c["status"] == "ok":
            assert {"energy_j", "energy_source"} <= set(c), c
            assert all(isinstance(c[k], float) for k in ("rtt_ms", "network_ms", "compute_ms")), c
    assert json.loads(json.dumps(calls)) == calls
