"""What a run's faults (:mod:`testbed.run.faults`) do to the testbed: signal a device's agent
by PID over SSH, change its link's tc class, restart its agent through provisioning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TestbedError
from ..net.tc import LinkSpec
from .faults import Effects
from .loading import ExpertLoader
from .recipe import Trial


class AgentEffects:
    """The effects of one trial's faults (:meth:`effects`).

    Parameters
    ----------
    inventory:
        The run's :class:`testbed.lab.inventory.Inventory`.
    runners:
        device name -> its SSH runner.
    shaper:
        The BS's :class:`testbed.net.shaper.TcShaper`.
    backend:
        The expert backend (a restarted agent is reconnected).
    loader:
        The :class:`ExpertLoader` (a restarted agent gets its experts again).
    """

    def __init__(
        self,
        inventory: Any,
        runners: Mapping[str, Any],
        shaper: Any,
        backend: Any,
        loader: ExpertLoader,
    ) -> None:
        self.inv, self.runners, self.shaper = inventory, runners, shaper
        self.backend, self.loader = backend, loader

    def effects(self, t: Trial, placement: Mapping[str, Sequence[str]]) -> Effects:
        """The callbacks for trial ``t``'s faults: a link restored goes back to ``t``'s rate, a
        restarted agent loads its share of ``placement``."""
        return Effects(
            self.signal_agent,
            lambda d, kbit: self.set_rate(t, d, kbit),
            lambda d: self.restart_agent(d, placement),
        )

    def signal_agent(self, device: str, sig: str) -> str:
        """Send ``SIG<sig>`` to ``device``'s agent."""
        from ..lab import provision as prov

        runner = self.runners[device]
        lay, facts = prov.agent_view(runner, self.inv.device(device))
        if facts.pid is None or not prov.agent_running(facts, lay):
            raise TestbedError(f"{device}: no agent of ours is running")
        runner.run(["kill", f"-{sig}", str(facts.pid)], timeout_s=30)
        return f"SIG{sig} to agent pid {facts.pid}"

    def set_rate(self, t: Trial, device: str, kbit: float | None) -> str:
        """``device``'s link at ``kbit`` both ways (None: the device's own rates in trial ``t``,
        its ``links.device`` over the cell's), at its own delay and loss in ``t``."""
        own = t.link_for(device, [d.name for d in self.inv.devices].index(device))
        down, up = (own.down_kbit, own.up_kbit) if kbit is None else (kbit, kbit)
        self.shaper.change(device, LinkSpec(down, own.delay_ms, own.loss_pct), "down")
        self.shaper.change(device, LinkSpec(up, own.delay_ms, own.loss_pct), "up")
        return f"link {down:g}/{up:g} kbit/s down/up" + (
            " (the trial's rate)" if kbit is None else ""
        )

    def restart_agent(self, device: str, placement: Mapping[str, Sequence[str]]) -> str:
        """Stop (if it still runs) and start ``device``'s agent through provisioning, reconnect
        the backend and load its experts of ``placement`` again."""
        from ..lab import provision as prov

        runner = self.runners[device]
        lay, facts = prov.agent_view(runner, self.inv.device(device))
        if facts.pid is not None and prov.agent_running(facts, lay):
            prov.stop_pid(runner, lay, facts.pid)
        rep = prov.provision(self.inv, None, devices=[device])[0]
        if not rep.ok or not rep.endpoint:
            raise TestbedError(f"{device}: restart failed: {rep.error}")
        self.backend.remove_agent(device)
        self.backend.add_agent(device, rep.endpoint)
        self.loader.forget(device)
        self.loader.apply(placement)
        n = len(self.loader.loaded[device])
        return f"agent pid {rep.pid} at {rep.endpoint}, {n} experts loaded"
