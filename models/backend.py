"""Expert backends: who runs the routed experts of one MoE layer.

The split MoE block calls ``backend.run_layer(work)`` ONCE per MoE layer per forward step with
ALL of that layer's work (:class:`LayerWork`: for every expert uid the hidden-state rows routed
to it) and gets back every expert's output rows (:class:`LayerResult`). A backend may report
experts as failed (``LayerResult.failed``: uid -> reason, e.g. ``"timeout"``); the block then
drops those experts for those tokens, renormalises the remaining weights and records it. Any
uid missing from ``outputs`` and ``failed`` is treated as failed (``"no output"``).

:class:`LocalExpertBackend` runs experts in-process (kernels from :mod:`models.kernels`); the
ZeroMQ backend of the device agent implements the same :class:`ExpertBackend` protocol.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from models.errors import ModelError
from models.kernels import ExpertKernel, load_expert
from models.manifest import Manifest, load_manifest
from models.uids import parse_uid


@dataclass(frozen=True)
class LayerWork:
    """All expert work of one MoE layer at one forward step.

    Attributes
    ----------
    layer
        Decoder-layer index.
    step
        Forward-step index (0 = prefill); -1 outside a runtime run.
    inputs
        uid -> [n_uid, hidden] rows (contiguous, model dtype) that expert must process; each
        row is one token routed to that expert.
    """

    layer: int
    step: int
    inputs: Mapping[str, torch.Tensor]

    @property
    def num_rows(self) -> int:
        """Total rows over all experts (the layer's expert-token pairs)."""
        return sum(int(x.shape[0]) for x in self.inputs.values())


@dataclass
class LayerResult:
    """Outputs of one :class:`LayerWork`.

    Attributes
    ----------
    outputs
        uid -> [n_uid, hidden] expert outputs, same rows/order as the inputs.
    failed
        uid -> reason for experts that produced no output (timeout, device error...).
    info
        Free-form backend measurements (e.g. ``{"wall_s": ...}``), copied into the records.
    """

    outputs: dict[str, torch.Tensor]
    failed: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ExpertBackend(Protocol):
    """Runs all routed experts of one MoE layer for one forward step."""

    def run_layer(self, work: LayerWork) -> LayerResult:
        """Each input's expert outputs, and a reason for each expert that gave none."""


class LocalExpertBackend:
    """In-process backend: a uid -> :class:`~models.kernels.ExpertKernel` table.

    Parameters
    ----------
    kernels
        Loaded kernels by uid, or a loader ``uid -> kernel`` called on first use (lazy).
    uids
        With a loader: the uids it can serve (others are reported failed, ``"unknown expert"``).
    """

    def __init__(
        self,
        kernels: Mapping[str, ExpertKernel] | Callable[[str], ExpertKernel],
        uids: Iterable[str] | None = None,
    ) -> None:
        if callable(kernels) and not isinstance(kernels, Mapping):
            self._loader: Callable[[str], ExpertKernel] | None = kernels
            self._kernels: dict[str, ExpertKernel] = {}
            self._known = set(uids) if uids is not None else None
        else:
            self._loader = None
            self._kernels = dict(kernels)
            self._known = set(self._kernels)

    @classmethod
    def from_split_dir(
        cls,
        split_dir: str | os.PathLike[str] | Manifest,
        *,
        runtime: str = "torch",
        quant: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        lazy: bool = False,
        uids: Iterable[str] | None = None,
    ) -> LocalExpertBackend:
        """Kernels for the experts of a split directory (all, or ``uids``), see
        :func:`models.kernels.load_expert` for ``runtime``/``quant``/``device``/``dtype``."""
        m = split_dir if isinstance(split_dir, Manifest) else load_manifest(split_dir)
        wanted = list(uids) if uids is not None else m.uids()
        for u in wanted:
            m.expert_path(u)  # raises for unknown uids

        def load(uid: str) -> ExpertKernel:
            return load_expert(
                m.expert_path(uid),
                runtime=runtime,
                quant=quant,  # type: ignore[arg-type]
                device=device,
                dtype=dtype,
                uid=uid,
            )

        if lazy:
            return cls(load, uids=wanted)
        return cls({u: load(u) for u in wanted})

    @property
    def uids(self) -> set[str]:
        """Uids served: those of the given kernels, or a loader's ``uids`` (else those loaded)."""
        return set(self._known) if self._known is not None else set(self._kernels)

    def kernel(self, uid: str) -> ExpertKernel:
        """The kernel of ``uid`` (loading it if lazy)."""
        k = self._kernels.get(uid)
        if k is None:
            if self._loader is None or (self._known is not None and uid not in self._known):
                raise KeyError(uid)
            k = self._kernels[uid] = self._loader(uid)
        return k

    def run_layer(self, work: LayerWork) -> LayerResult:
        """Run each input on its kernel in turn; unknown uids are failed (``"unknown expert"``).

        ``info`` has ``wall_s``, the loop's wall time. Raises :class:`ModelError` for a uid of
        another layer.
        """
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}
        for uid, x in work.inputs.items():
            if parse_uid(uid).layer != work.layer:
                raise ModelError(uid, f"expert of another layer in work for layer {work.layer}")
            try:
                k = self.kernel(uid)
            except KeyError:
                failed[uid] = "unknown expert"
                continue
            out[uid] = k(x)
        return LayerResult(out, failed, {"wall_s": time.perf_counter() - t0})


class FaultInjectingBackend:
    """Wraps a backend and reports chosen experts as failed (for failure experiments/tests).

    Parameters
    ----------
    inner
        The backend that does the real work.
    fail
        A set of uids that always fail, or a predicate ``(uid, layer, step) -> bool``.
    reason
        The failure reason reported.
    """

    def __init__(
        self,
        inner: ExpertBackend,
        fail: Iterable[str] | Callable[[str, int, int], bool],
        reason: str = "injected failure",
    ) -> None:
        self.inner = inner
        if callable(fail):
            self._pred = fail
        else:
            s = set(fail)
            self._pred = lambda uid, layer, step: uid in s
        self.reason = reason

    def run_layer(self, work: LayerWork) -> LayerResult:
        """Drop the inputs of the chosen experts, run the rest on ``inner`` and report the
        dropped ones failed with ``reason``.
        """
        keep = {u: x for u, x in work.inputs.items() if not self._pred(u, work.layer, work.step)}
        res = self.inner.run_layer(LayerWork(work.layer, work.step, keep))
        failed = dict(res.failed)
        for u in work.inputs:
            if u not in keep:
                failed[u] = self.reason
        return LayerResult(res.outputs, failed, res.info)
