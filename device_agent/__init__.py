"""Device agent: serves routed MoE experts to the base station over ZeroMQ.

``python -m device_agent serve --bind tcp://HOST:PORT --workdir DIR``; the wire protocol and
error codes are in :mod:`device_agent.protocol`, the BS-side client is
``testbed.dataplane.backend``. This package never imports ``testbed``.

Python 3.8+: the device side (this package, the ``models`` modules it imports, the probes the
controller runs on a device) targets JetPack 5's Python 3.8, while the controller needs 3.10.
``tests/unit/test_device_side_py38.py`` checks it with vermin (``-t=3.8-``): no
``itertools.pairwise``, ``str.removeprefix``, ``match``, ``list[int]`` or ``X | Y`` outside
annotations, and ``from __future__ import annotations`` wherever annotations use them.
"""

from typing import Any

__all__ = ["PROTOCOL_VERSION", "ErrorCode"]


def __getattr__(name: str) -> Any:
    # lazily: importing a light submodule (security, energy) must not pull in torch
    if name in __all__:
        from device_agent import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
