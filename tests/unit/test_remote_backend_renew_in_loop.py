"""A connection renewed while the controller loops over the devices (the flaky
``RuntimeError: dictionary keys changed during iteration`` of the fault test).

A call notices that its agent's connection dropped (the socket monitor, fed by ZeroMQ's I/O
thread, reports the disconnect) and renews it (:meth:`RemoteExpertBackend.reconnect`). When that
call runs inside a loop over ``backend.agents`` (the run's per-request energy pings, the
backend's own ``fetch_energy_sources`` / ``estimate_clock_offsets`` / ``connect``), the renewal
used to pop the device and add it back, so the loop failed whenever an agent had just been
killed. Here two in-process fake agents on loopback answer ``ping`` and ``status``; one drops
its connection (its ROUTER closed and bound again on the same port) before each loop.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from device_agent import protocol as P
from testbed.dataplane.backend import RemoteExpertBackend
from testbed.run.telemetry import energy_counters


class FakeAgent(threading.Thread):
    """A ROUTER answering ``ping`` and ``status``; :meth:`drop` closes it and binds a fresh one
    on the same port (every connection to it is dropped, the peers reconnect)."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True, name=f"fake-agent-{name}")
        self.name_ = name
        self.ctx = zmq.Context.instance()
        self.sock = self._bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.halt = threading.Event()
        self.drop_asked = threading.Event()
        self.dropped = threading.Event()

    def _bind(self, endpoint: str) -> zmq.Socket:
        deadline = time.monotonic() + 5
        while True:
            s = self.ctx.socket(zmq.ROUTER)
            s.setsockopt(zmq.LINGER, 0)
            try:
                s.bind(endpoint)
                return s
            except zmq.ZMQError:  # the old socket's port not released yet
                s.close(0)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def drop(self) -> None:
        self.dropped.clear()
        self.drop_asked.set()
        assert self.dropped.wait(5), "the fake agent did not rebind"

    def run(self) -> None:
        while not self.halt.is_set():
            if self.drop_asked.is_set():
                self.drop_asked.clear()
                self.sock.close(0)
                self.sock = self._bind(self.endpoint)
                self.dropped.set()
            if not self.sock.poll(20):
                continue
            ident, _, hb, *_ = self.sock.recv_multipart()
            h = P.unpack(hb)
            reply = {"v": P.PROTOCOL_VERSION, "id": h["id"], "code": 0, "t1_ns": time.time_ns()}
            if h["op"] == "status":
                reply["status"] = {"energy_source": f"measured:{self.name_}"}
            reply["energy_j"] = 1.5
            reply["t2_ns"] = time.time_ns()
            self.sock.send_multipart([ident, b"", P.pack(reply)])
        self.sock.close(0)


@pytest.fixture
def backend():
    agents = {n: FakeAgent(n) for n in ("a", "b", "c")}
    for a in agents.values():
        a.start()
    be = RemoteExpertBackend({n: a.endpoint for n, a in agents.items()}, timeout_s=2.0)
    try:
        be.connect(timeout_s=5.0, pings=1)
        yield be, agents
    finally:
        be.close()
        for a in agents.values():
            a.halt.set()
            a.join(5)


def _drop(be: RemoteExpertBackend, agent: FakeAgent, device: str) -> None:
    """Drop ``device``'s connection and wait until the backend's monitor has the notice."""
    agent.drop()
    assert be.agents[device].mon.poll(5000), "no disconnect reported"


@pytest.mark.parametrize("device", ["a", "b", "c"])
def test_loops_over_the_devices_survive_a_renewal_inside(backend, device):
    be, agents = backend
    order = list(be.agents)
    renewals = 0

    _drop(be, agents[device], device)
    sock = be.agents[device].sock
    assert be.fetch_energy_sources() == {n: f"measured:{n}" for n in order}
    renewals += 1
    assert be.reconnects == {device: renewals} and be.agents[device].sock is not sock
    assert be.agents[device].energy_source == f"measured:{device}"  # on the renewed agent

    _drop(be, agents[device], device)
    clocks = be.estimate_clock_offsets(pings=2)
    renewals += 1
    assert list(clocks) == order and be.reconnects == {device: renewals}
    assert all(be.agents[n].clock is clocks[n] for n in order)

    _drop(be, agents[device], device)
    # the per-request energy pings of a run
    assert energy_counters(be) == dict.fromkeys(order, 1.5)
    renewals += 1
    assert be.reconnects == {device: renewals}

    _drop(be, agents[device], device)
    be.connect(timeout_s=5.0, pings=1)
    renewals += 1
    assert be.reconnects == {device: renewals}

    # the device kept its place; the old sockets are forgotten; every agent still answers
    assert list(be.agents) == order
    assert set(be._by_sock) == {a.sock for a in be.agents.values()}
    assert all(be.ping(n)["rtt_ms"] >= 0 for n in order)
