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
        return self._p("venv")

    @property
    def venv_python(self) -> str:
        return self._p("venv", "bin", "python")

    @property
    def wheels(self) -> str:
        return self._p("wheels")

    @property
    def experts(self) -> str:
        return self._p("experts")

    @property
    def installed(self) -> str:
        return self._p("installed.json")

    @property
    def pid(self) -> str:
        return self._p("agent.pid")

    @property
    def log(self) -> str:
        return self._p("agent.log")

    @property
    def ready(self) -> str:
        return self._p("agent.ready.json")

    @property
    def agent_state(self) -> str:
        return self._p("agent.json")

    @property
    def curve(self) -> str:
        return self._p("curve")

    def site_packages(self, python: Sequence[int]) -> str:
        return self._p("venv", "lib", f"python{python[0]}.{python[1]}", "site-packages")
