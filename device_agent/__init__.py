"""Device agent: serves routed MoE experts to the base station over ZeroMQ.

``python -m device_agent serve --bind tcp://HOST:PORT --workdir DIR``; the wire protocol and
error codes are in :mod:`device_agent.protocol`, the BS-side client is
``testbed.remote_backend``. This package never imports ``testbed``.
"""

from device_agent.protocol import PROTOCOL_VERSION, ErrorCode

__all__ = ["PROTOCOL_VERSION", "ErrorCode"]
