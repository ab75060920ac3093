"""Device agent: serves routed MoE experts to the base station over ZeroMQ.

``python -m device_agent serve --bind tcp://HOST:PORT --workdir DIR``; the wire protocol and
error codes are in :mod:`device_agent.protocol`, the BS-side client is
``testbed.dataplane.backend``. This package never imports ``testbed``.
"""

from typing import Any

__all__ = ["PROTOCOL_VERSION", "ErrorCode"]


def __getattr__(name: str) -> Any:
    # lazily: importing a light submodule (security, energy) must not pull in torch
    if name in __all__:
        from device_agent import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
