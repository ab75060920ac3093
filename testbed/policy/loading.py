"""Finding and loading policies: by entry-point name (group :data:`ENTRY_POINT_GROUP`), by
``package.module:Class`` or by ``path/to/file.py:Class``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .api import Policy

ENTRY_POINT_GROUP = "moe_edge_testbed.policies"


def _registered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_policies() -> list[dict[str, str]]:
    """Registered policies with their one-line docs (``testbed policies list``)."""
    out = []
    for name, ep in sorted(_registered().items()):
        try:
            cls = ep.load()
            doc = (inspect.getdoc(cls) or "").strip().splitlines()[0:1]
            out.append({"name": name, "target": ep.value, "doc": doc[0] if doc else ""})
        except Exception as exc:  # noqa: BLE001 - a broken third-party plug-in must not hide the others
            out.append(
                {
                    "name": name,
                    "target": ep.value,
                    "doc": f"(cannot load: {type(exc).__name__}: {exc})",
                }
            )
    return out


def load_policy_class(spec: str) -> type[Policy]:
    """Resolve ``spec`` (entry-point name, ``pkg.mod:Class`` or ``file.py:Class``)."""
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"policy: {spec}: no such file {path}")
            mod_name = f"_testbed_policy_{abs(hash(str(path.resolve())))}"
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            assert mspec and mspec.loader
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            try:
                mspec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - a researcher's module may raise anything
                raise ConfigError(
                    f"policy: {spec}: importing {path} failed: {type(exc).__name__}: {exc}"
                ) from None
        else:
            try:
                module = importlib.import_module(target)
            except Exception as exc:  # noqa: BLE001 - a researcher's module may raise anything
                raise ConfigError(
                    f"policy: {spec}: cannot import {target}: {type(exc).__name__}: {exc}"
                ) from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise ConfigError(f"policy: {spec}: {target} has no attribute {attr!r}")
    else:
        reg = _registered()
        if spec not in reg:
            raise ConfigError(
                f"policy: unknown policy {spec!r} (valid: "
                f"{', '.join(sorted(reg)) or 'none registered'}; or "
                "package.module:Class, or path/to/file.py:Class)"
            )
        cls = reg[spec].load()
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ConfigError(f"policy: {spec}: is not a subclass of testbed.policy.Policy")
    if inspect.isabstract(cls):
        raise ConfigError(f"policy: {spec}: is abstract (implement select())")
    return cls


def load_policy(
    spec: str, params: Mapping[str, Any] | None = None, where: str = "policy.params"
) -> Policy:
    """Resolve and instantiate a policy."""
    return load_policy_class(spec).from_params(params or {}, where)
