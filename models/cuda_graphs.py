"""CUDA graphs for a decode step's expert calls: launch the whole expert as one graph.

A decode step sends an expert a few rows; on a GPU its matrices are then read in tens of
microseconds, and launching its half-dozen kernels one by one from Python takes about as long
as running them (on the lent H200 a bf16 4096x14336 expert took 0.18 ms a call eagerly, where
reading its weights takes 0.09 ms). :class:`GraphedForward` captures the expert's forward once
per row bucket (1, 2, 4, ... :data:`MAX_ROWS`, the rows padded up to the bucket; all of them
when the expert is loaded, :meth:`GraphedForward.capture_all`) and replays it: one launch per
call. The graphs of one expert share a memory pool (its intermediate tensors, counted in no
``weight_bytes``). Rows are independent in an expert (each output row depends on its own input
row only), so the padding rows' contents never reach a returned row.

Only for CUDA; a forward that cannot be captured (an op that synchronises, say) is run eagerly
from then on and the reason kept in ``GraphedForward.error``.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

#: the largest row count run through a graph; more rows are run eagerly (their kernels then
#: take long enough that launching them costs little in comparison)
MAX_ROWS = 128


def bucket(rows: int) -> int:
    """The graph a call of ``rows`` rows replays: the least power of two >= ``rows``."""
    b = 1
    while b < rows:
        b *= 2
    return b


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture: cuBLAS keeps a workspace per
    stream it ran on, so a new stream per capture would leave one more workspace behind each
    time (seen on the H200 as memory still allocated after an expert was released)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Graph:
    """One captured forward: its static input and output and the graph that links them."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.graph, self.inp, self.out = graph, inp, out


class GraphedForward:
    """Replay ``fn`` (rows [n, hidden] on ``device`` in ``dtype`` -> rows) from CUDA graphs.

    ``__call__(x)`` takes rows on any device and in any dtype and returns them on ``x``'s
    device in ``x``'s dtype, as ``fn`` does; calls with more than :data:`MAX_ROWS` rows, or
    after a failed capture, run ``fn`` itself. The graphs of one expert share a memory pool;
    a lock serialises replays (their input and output buffers are shared).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        hidden: int,
        device: torch.device,
        dtype: torch.dtype,
        max_rows: int = MAX_ROWS,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.fn, self.hidden, self.device, self.dtype = fn, hidden, device, dtype
        self.max_rows = max_rows
        self.graphs: dict[int, _Graph] = {}
        #: why capturing failed (``None``: it did not); then every call runs eagerly
        self.error: str | None = None
        self._pool: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def _capture(self, rows: int) -> _Graph:
        """Warm ``fn`` up on a side stream (cuBLAS workspaces, Triton's autotuning) and capture
        it for ``rows`` rows."""
        with torch.cuda.device(self.device):
            inp = torch.zeros(rows, self.hidden, device=self.device, dtype=self.dtype)
            side = _capture_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(inp)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn(inp)
        return _Graph(graph, inp, out)

    def _graph(self, rows: int) -> _Graph | None:
        b = bucket(rows)
        g = self.graphs.get(b)
        if g is None and self.error is None:
            try:
                g = self.graphs[b] = self._capture(b)
            except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly
                self.error = f"{type(e).__name__}: {e}"[:300]
                self.graphs.clear()  # never replayed again: free them and their pool
                self._pool = None
                torch.cuda.synchronize(self.device)
        return g

    def capture_all(self) -> None:
        """Capture every bucket now (1, 2, 4, ... ``max_rows``), so that no timed call pays for
        a capture: the agent calls it when it loads the expert. Stops at a failed capture (then
        every call runs eagerly, ``error`` says why)."""
        with self._lock:
            rows = 1
            while rows <= self.max_rows and self.error is None:
                self._graph(rows)
                rows *= 2

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of rows ``x`` (any device and dtype), on ``x``'s device in its dtype."""
        n = int(x.shape[0])
        if 0 < n <= self.max_rows and self.error is None:
            with self._lock:
                g = self._graph(n)
                if g is not None:
                    g.inp[:n].copy_(x)
                    g.graph.replay()
                    y = g.out[:n]
                    out = y.to(device=x.device, dtype=x.dtype)
                    return out.clone() if out.data_ptr() == y.data_ptr() else out
        # eager: no rows, too many, or no graph (a capture failed)
        return self.fn(x.to(device=self.device, dtype=self.dtype)).to(x.device, x.dtype)

    @property
    def launch(self) -> str:
        """``cuda-graph`` while graphs serve (or are still to be captured), ``eager`` after a
        failed capture."""
        return "eager" if self.error is not None else "cuda-graph"
