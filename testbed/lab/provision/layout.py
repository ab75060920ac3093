"""Where things live in a device's workdir (the folder tree is described in the package's
docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Paths inside a device's (expanded) workdir."""

    workdir: str

    def _p(self, *parts: str) -> str:
        return "/".join([self.workdir.rstrip("/") or "/", *parts])

    @property
    def venv(self) -> str:
        """The agent's virtual environment (created ``--without-pip``)."""
        return self._p("venv")

    @property
    def venv_python(self) -> str:
        """The venv's python: what the agent runs with."""
        return self._p("venv", "bin", "python")

    @property
    def wheels(self) -> str:
        """The wheelhouse pushed by the controller."""
        return self._p("wheels")

    @property
    def experts(self) -> str:
        """The expert shards (with their ``.sha256.json`` cache)."""
        return self._p("experts")

    @property
    def installed(self) -> str:
        """``installed.json``: what is installed and its install key."""
        return self._p("installed.json")

    @property
    def pid(self) -> str:
        """The detached agent's pid file."""
        return self._p("agent.pid")

    @property
    def log(self) -> str:
        """The detached agent's output."""
        return self._p("agent.log")

    @property
    def ready(self) -> str:
        """Written by the agent once bound: endpoint, pub_endpoint, pid."""
        return self._p("agent.ready.json")

    @property
    def agent_state(self) -> str:
        """How the running agent was started (argv, install key)."""
        return self._p("agent.json")

    @property
    def curve(self) -> str:
        """The agent's CURVE keys: its secret key, the BS's public key (folder mode 0700)."""
        return self._p("curve")

    def site_packages(self, python: Sequence[int]) -> str:
        """The venv's site-packages for a python of version ``python`` (major, minor, ...)."""
        return self._p("venv", "lib", f"python{python[0]}.{python[1]}", "site-packages")
