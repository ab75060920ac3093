"""RemoteExpertBackend construction options (no agent needed)."""

from __future__ import annotations

import pytest
import zmq

from testbed.dataplane.backend import RemoteExpertBackend


def test_io_threads_default_and_explicit() -> None:
    with RemoteExpertBackend({}) as be:
        assert be.io_threads == 1
        assert be.ctx.get(zmq.IO_THREADS) == 1
    with RemoteExpertBackend({}, io_threads=3) as be:
        assert be.ctx.get(zmq.IO_THREADS) == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_io_threads_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match="io_threads must be a positive integer"):
        RemoteExpertBackend({}, io_threads=bad)  # type: ignore[arg-type]
