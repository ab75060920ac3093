"""What each agent holds: the shards pushed to each device (sha256-checked) and the experts
loaded there, brought to a placement by pushing, loading and unloading."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TestbedError


class ExpertLoader:
    """Brings the agents to a placement (:meth:`apply`), remembering what each device holds.

    Parameters
    ----------
    devices:
        The inventory's devices (each with ``name``).
    backend:
        The :class:`testbed.dataplane.backend.RemoteExpertBackend` (loads, unloads, and its
        ``placement`` is set to the one applied).
    runners:
        device name -> its SSH runner (shards are pushed through it).
    manifest:
        The model's :class:`models.manifest.Manifest`.
    io_dtype:
        The wire dtype the agents load experts with (the manifest's ``model.wire_dtype``).
    """

    def __init__(
        self,
        devices: Sequence[Any],
        backend: Any,
        runners: Mapping[str, Any],
        manifest: Any,
        io_dtype: str,
    ):
        self.devices = list(devices)
        self.backend = backend
        self.runners = runners
        self.mf = manifest
        self.io_dtype = io_dtype
        #: device -> the experts it has loaded
        self.loaded: dict[str, set[str]] = {d: set() for d in backend.agents}
        #: device -> uid -> the shard's path there (pushed, sha256-checked)
        self.pushed: dict[str, dict[str, str]] = {d: {} for d in backend.agents}
        #: (device, uid) -> the extra load fields the expert was loaded with
        self.load_opts: dict[tuple[str, str], dict[str, Any]] = {}

    def forget(self, device: str) -> None:
        """``device``'s agent was restarted: it holds no expert now."""
        self.loaded[device] = set()

    def apply(
        self,
        placement: Mapping[str, Sequence[str]],
        options: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    ) -> None:
        """Push, load and unload so each device holds its share; ``options``: device -> uid ->
        extra load fields (:meth:`Policy.load_options`); an expert whose fields changed is
        reloaded."""
        for dev in self.devices:
            want = {u for u, ds in placement.items() if dev.name in ds}
            opts = dict((options or {}).get(dev.name, {}))
            self._unload_changed(dev.name, want, opts)
            have = self.loaded[dev.name]
            self._push(dev, want)
            drop = sorted(have - want)
            if drop:
                self.backend.unload_experts(dev.name, drop)
            self._load(dev.name, sorted(want - have), opts)
            self.loaded[dev.name] = want
            self.load_opts.update({(dev.name, u): dict(opts.get(u, {})) for u in want})
        self.backend.placement = {u: list(ds) for u, ds in placement.items()}

    def _unload_changed(
        self, device: str, want: set[str], opts: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Unload the wanted experts whose load fields changed (they are loaded again)."""
        reload = {
            u
            for u in want & self.loaded[device]
            if dict(opts.get(u, {})) != dict(self.load_opts.get((device, u), {}))
        }
        if reload:
            self.backend.unload_experts(device, sorted(reload))
            self.loaded[device] = self.loaded[device] - reload

    def _push(self, dev: Any, want: set[str]) -> None:
        """Push the shards of ``want`` that ``dev`` lacks."""
        from ..lab import provision as prov

        missing = sorted(want - self.pushed[dev.name].keys())
        if missing:
            rel, _ = prov.sync_shards(self.runners[dev.name], dev, self.mf, missing)
            self.pushed[dev.name].update(rel)

    def _load(self, device: str, add: list[str], opts: Mapping[str, Mapping[str, Any]]) -> None:
        """Load the experts ``add`` on ``device``, each with its extra load fields."""
        if not add:
            return
        got = self.backend.load_experts(
            device,
            [
                {
                    "uid": u,
                    "path": self.pushed[device][u],
                    "io_dtype": self.io_dtype,
                    **opts.get(u, {}),
                }
                for u in add
            ],
        )
        if sorted(got) != add:
            raise TestbedError(f"{device}: agent loaded {len(got)} of {len(add)} experts")
