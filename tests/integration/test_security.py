"""CURVE on the agent's sockets, as real processes on loopback: only the BS's key gets in.

A client without CURVE fails the handshake (mechanism mismatch), one with another key is refused
by the agent's ZAP handler (status 400) — each seen through the client socket's own monitor
events, with no reply; the authorized client is served before and after, and its forward is
exact. The status feed is closed to the same clients. A secret key that others can read is
refused at start with a one-line error naming the file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from device_agent import protocol as P
from device_agent.security import AGENT_SECRET, AUTHORIZED, CurveClient, create_keypair
from models.backend import LayerWork
from testbed.dataplane.backend import RemoteExpertBackend, StatusFeed
from testbed.lab.agents import start_agent, stop_agent
from testbed.lab.runner import LocalRunner


@pytest.fixture
def curve_agent(tmp_path):
    """An agent started with --curve-dir; yields (agent, BS client keys, agent public key)."""
    cdir = tmp_path / "wd" / "curve"
    _, sec = create_keypair(tmp_path / "agentkeys", "agent")
    cdir.mkdir(parents=True)
    (cdir / AGENT_SECRET).write_bytes(sec.read_bytes())
    (cdir / AGENT_SECRET).chmod(0o600)
    bs_pub, bs_sec = create_keypair(tmp_path / "bskeys", "bs")
    (cdir / AUTHORIZED).mkdir()
    (cdir / AUTHORIZED / "bs.key").write_bytes(bs_pub.read_bytes())
    agent_pub, _ = zmq.auth.load_certificate(str(sec))
    pub, secret = zmq.auth.load_certificate(str(bs_sec))
    a = start_agent(
        LocalRunner(),
        device="d1",
        host="127.0.0.1",
        workdir=str(tmp_path / "wd"),
        extra_args=["--curve-dir", str(cdir)],
    )
    try:
        yield a, CurveClient(pub, secret, {"d1": agent_pub}), agent_pub
    finally:
        stop_agent(a)


def _handshake(
    endpoint: str, keys: tuple[bytes, bytes] | None, server_key: bytes, kind: int = zmq.DEALER
) -> tuple[bool, list[tuple[int, int]]]:
    """Connect, send a ping (DEALER) or wait for status (SUB); (got anything, monitor events)."""
    ctx = zmq.Context()
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey = keys
        s.curve_serverkey = server_key
    mon = s.get_monitor_socket()
    try:
        s.connect(endpoint)
        if kind == zmq.SUB:
            s.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            s.send(P.pack({"v": P.PROTOCOL_VERSION, "op": "ping", "id": 1}))
        got = bool(s.poll(1500))
        events = []
        while mon.poll(200):
            m = recv_monitor_message(mon)
            events.append((int(m["event"]), int(m["value"])))
        return got, events
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)
        ctx.term()


def test_only_the_bs_key_is_served(curve_agent):
    a, bs, agent_pub = curve_agent
    x = torch.randn(3, 16)
    with RemoteExpertBackend({"d1": a.endpoint}, {"L0.E0": ["d1"]}, timeout_s=5.0, curve=bs) as be:
        assert be.ping("d1")["rtt_ms"] > 0
        be.load_experts(
            "d1", [{"uid": "L0.E0", "builtin": "identity", "hidden": 16, "io_dtype": "float32"}]
        )

        # no CURVE at all: the handshake fails on the mechanism, nothing is answered
        got, ev = _handshake(a.endpoint, None, agent_pub)
        assert not got
        assert (
            int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL),
            int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH),
        ) in ev, ev
        assert all(e != int(zmq.EVENT_HANDSHAKE_SUCCEEDED) for e, _ in ev), ev

        # CURVE with a key the agent does not know: ZAP refuses it with status 400
        got, ev = _handshake(a.endpoint, zmq.curve_keypair(), agent_pub)
        assert not got
        assert (int(zmq.EVENT_HANDSHAKE_FAILED_AUTH), 400) in ev, ev

        # the BS's own key, through a raw socket: handshake succeeds and the ping is answered
        got, ev = _handshake(a.endpoint, (bs.public, bs.secret), agent_pub)
        assert got and (int(zmq.EVENT_HANDSHAKE_SUCCEEDED), 0) in ev, ev

        # and the backend still gets exact results after the refused clients
        res = be.run_layer(LayerWork(0, -1, {"L0.E0": x}))
        assert not res.failed and torch.equal(res.outputs["L0.E0"], x)

    # the status feed refuses strangers the same way and serves the BS
    got, ev = _handshake(a.pub_endpoint, zmq.curve_keypair(), agent_pub, zmq.SUB)
    assert not got and (int(zmq.EVENT_HANDSHAKE_FAILED_AUTH), 400) in ev, ev
    feed = StatusFeed({"d1": a.pub_endpoint}, curve=bs)
    try:
        for _ in range(20):
            feed.poll(0.25)
            if "d1" in feed.view:
                break
        assert "d1" in feed.view and feed.bytes_received["d1"] > 0
    finally:
        feed.close()

    # secrets never reach the agent's log or ready file (its public key may)
    text = Path(a.log_path).read_text() + Path(a.ready_path).read_text()
    assert bs.secret.decode() not in text
    assert agent_pub.decode() in Path(a.ready_path).read_text()


def test_open_secret_key_and_missing_authorized_keys_are_refused(tmp_path):
    cdir = tmp_path / "curve"
    _, sec = create_keypair(tmp_path / "k", "agent")
    cdir.mkdir()
    (cdir / AGENT_SECRET).write_bytes(sec.read_bytes())
    (cdir / AGENT_SECRET).chmod(0o644)

    def serve() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "device_agent",
                "serve",
                "--bind",
                "tcp://127.0.0.1:*",
                "--workdir",
                str(tmp_path / "wd"),
                "--curve-dir",
                str(cdir),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    res = serve()
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        (
            f"error: --curve-dir: {cdir / AGENT_SECRET}: permissions 0644 are too open "
            "(the secret key must be readable by its owner only: chmod 600)"
        )
    ]
    (cdir / AGENT_SECRET).chmod(0o600)
    res = serve()
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --curve-dir: {cdir / AUTHORIZED}: no authorized public key (*.key)"
    ]


def test_batch_and_tensor_bounds_and_path_confinement(tmp_path):
    """Bounds from the command line: too many tensors or rows, a message over the byte limit,
    paths out of the workdir (absolute, '..', a symlink out) — each refused with its code; the
    agent then still serves an exact forward."""
    from device_agent.protocol import ErrorCode

    wd = tmp_path / "wd"
    (wd / "experts").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (wd / "experts" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    a = start_agent(
        LocalRunner(),
        device="d1",
        host="127.0.0.1",
        workdir=str(wd),
        extra_args=["--max-rows", "8", "--max-tensors", "2", "--max-message-bytes", "65536"],
    )
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(a.endpoint)
    rid = iter(range(1, 1000))

    def ask(h: dict, frames: list[bytes] = ()) -> dict:
        s.send_multipart([P.pack({"v": P.PROTOCOL_VERSION, "id": next(rid), **h}), *frames])
        assert s.poll(10_000), "no reply"
        return P.unpack(s.recv_multipart()[0])

    try:
        for u in ("L0.E0", "L0.E1", "L0.E2"):
            r = ask(
                {
                    "op": "load",
                    "experts": [
                        {"uid": u, "builtin": "identity", "hidden": 4, "io_dtype": "float32"}
                    ],
                }
            )
            assert r["code"] == 0, r

        def fwd(rows: int, uids: list[str]) -> dict:
            x = torch.zeros(rows, 4).numpy().tobytes()
            return ask(
                {
                    "op": "forward",
                    "layer": 0,
                    "step": 0,
                    "t": [[u, "float32", [rows, 4]] for u in uids],
                },
                [x] * len(uids),
            )

        assert fwd(8, ["L0.E0", "L0.E1"])["code"] == 0
        r = fwd(9, ["L0.E0"])  # per tensor: the reply names the expert and the code
        assert r["code"] == 0 and r["t"] == [], r
        assert (
            r["errors"]["L0.E0"][0] == ErrorCode.TOO_LARGE
            and "9 rows > limit 8" in r["errors"]["L0.E0"][1]
        ), r
        r = fwd(1, ["L0.E0", "L0.E1", "L0.E2"])
        assert r["code"] == ErrorCode.TOO_LARGE and "3 tensors" in r["error"], r
        big = ask(
            {"op": "forward", "layer": 0, "step": 0, "t": [["L0.E0", "float32", [8, 4]]]},
            [b"\0" * 70_000],
        )
        assert big["code"] == ErrorCode.TOO_LARGE, big
        for path in ("/etc/passwd", "../outside.safetensors", "experts/link.safetensors"):
            r = ask({"op": "load", "experts": [{"uid": "L1.E0", "path": path}]})
            assert r["loaded"] == [] and r["errors"]["L1.E0"][0] == ErrorCode.BAD_PATH, (path, r)
        x = torch.arange(8.0).reshape(2, 4)
        s.send_multipart(
            [
                P.pack(
                    {
                        "v": P.PROTOCOL_VERSION,
                        "id": 999,
                        "op": "forward",
                        "layer": 0,
                        "step": 0,
                        "t": [["L0.E1", "float32", [2, 4]]],
                    }
                ),
                x.numpy().tobytes(),
            ]
        )
        assert s.poll(10_000)
        h, out = s.recv_multipart()
        assert P.unpack(h)["code"] == 0 and out == x.numpy().tobytes()
    finally:
        s.close(0)
        ctx.term()
        stop_agent(a)
