"""Whole-model experts (MoE², arXiv 2501.09410): the ``load_model`` / ``unload_model`` ops that
hold whole small causal LMs (:mod:`models.dense_lm` folders pushed into the workdir), and the
``lm`` op that runs one of them on a prompt.

The ``lm`` op is timed and metered as ``forward`` is (:func:`device_agent.forward.start_compute`
/ :func:`~device_agent.forward.end_compute`: ``queue_ms``, ``compute_ms``, ``energy_j``, the
``timeout_ms`` expiry). Every header field is checked before use; a bad one gets an error reply
naming it, a model that raises gets ``INTERNAL``. Python 3.8 (the device side); no ``testbed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from device_agent import protocol as P
from device_agent.experts import resolve_in_workdir
from device_agent.forward import end_compute, request_timeout_ms, start_compute
from device_agent.protocol import ErrorCode, ProtocolError
from device_agent.status import Counters

#: the ops :class:`LMOp` serves (:meth:`LMOp.dispatch`)
LM_OPS = ("lm", "load_model", "unload_model")
#: the ``lm`` op's modes
LM_MODES = ("next", "score", "generate")
#: most options of one ``score`` request
MAX_OPTIONS = 1024
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class LoadedModel:
    """One whole model the agent holds."""

    model_id: str
    model: Any
    source: str
    vocab_size: int
    max_seq_len: int
    params: int
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    compute_ms: float = 0.0


def check_model_id(mid: Any) -> str:
    """A model id: 1-64 characters of letters, digits, ``.``, ``_``, ``-`` (``BAD_HEADER``
    naming the ``model`` field otherwise)."""
    if not isinstance(mid, str) or not _MODEL_ID.fullmatch(mid):
        raise ProtocolError(
            ErrorCode.BAD_HEADER,
            f"model must be an id of 1-64 letters, digits, '.', '_', '-', got {P.brief(mid)}",
        )
    return mid


def check_tokens(field: str, x: Any, vocab_size: int, empty: bool = False) -> list[int]:
    """``x`` as a list of token ids in ``[0, vocab_size)`` (``BAD_HEADER`` naming ``field``)."""
    if (
        not isinstance(x, list)
        or (not x and not empty)
        or not all(P.is_int(t) and 0 <= t < vocab_size for t in x)
    ):
        what = "a list" if empty else "a non-empty list"
        raise ProtocolError(
            ErrorCode.BAD_HEADER,
            f"lm: {field} must be {what} of token ids in [0, {vocab_size}), got {P.brief(x)}",
        )
    return list(x)


def _int_field(h: dict[str, Any], field: str, lo: int, hi: int) -> int:
    v = h.get(field)
    if not P.is_int(v) or not lo <= v <= hi:
        raise ProtocolError(
            ErrorCode.BAD_HEADER,
            f"lm: {field} must be an integer in [{lo}, {hi}], got {P.brief(v)}",
        )
    return int(v)


def check_too_long(field: str, n: int, m: LoadedModel) -> None:
    """``TOO_LARGE`` naming ``field`` when ``n`` tokens exceed the model's ``max_seq_len``."""
    if n > m.max_seq_len:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"lm: {field} of {n} tokens > {m.model_id}'s max_seq_len {m.max_seq_len}",
        )


class ModelStore:
    """The whole models loaded on this agent (``models``: id -> :class:`LoadedModel`) and the
    ``load_model`` / ``unload_model`` ops that change them."""

    def __init__(self, workdir: Path, device: str, counters: Counters) -> None:
        self.workdir = workdir
        self.device = device
        self.counters = counters
        self.models: dict[str, LoadedModel] = {}

    def load(self, h: dict[str, Any]) -> dict[str, Any]:
        """The ``load_model`` op: ``{model, path}`` (a folder relative to the workdir, as
        :func:`models.dense_lm.save_dense_lm` writes it). Reply: ``model``, ``vocab_size``,
        ``max_seq_len``, ``params``. A model already held under that id is replaced."""
        mid = check_model_id(h.get("model"))
        path = resolve_in_workdir(self.workdir, h.get("path"))
        try:
            is_dir = path.is_dir()
        except OSError as e:  # e.g. a name too long for the file system
            raise ProtocolError(ErrorCode.BAD_PATH, f"path {P.brief(h['path'])}: {e}") from None
        if not is_dir:
            raise ProtocolError(
                ErrorCode.LOAD_FAILED, f"no model folder {P.brief(h['path'])} in the workdir"
            )
        from models.dense_lm import load_dense_lm

        try:
            model = load_dense_lm(path, device=self.device)
            cfg = model.config
            m = LoadedModel(
                mid,
                model,
                str(h["path"]),
                int(cfg.vocab_size),
                int(cfg.max_seq_len),
                int(sum(p.numel() for p in model.parameters())),
            )
        except Exception as e:  # noqa: BLE001 - a bad model folder must not take the agent down
            raise ProtocolError(ErrorCode.LOAD_FAILED, f"{type(e).__name__}: {e}") from None
        self.models[mid] = m
        return {
            "model": mid,
            "vocab_size": m.vocab_size,
            "max_seq_len": m.max_seq_len,
            "params": m.params,
        }

    def unload(self, h: dict[str, Any]) -> dict[str, Any]:
        """The ``unload_model`` op: ``models`` (a list of ids). Reply: ``unloaded``, ``errors``
        (id -> [code, message])."""
        ids = h.get("models")
        if not isinstance(ids, list):
            raise ProtocolError(ErrorCode.BAD_HEADER, "unload_model: 'models' must be a list")
        done, errors = [], {}
        for mid in ids:
            if not isinstance(mid, str):
                errors[P.brief(mid, 64)] = [int(ErrorCode.BAD_HEADER), "model must be a string"]
                self.counters.count_error(ErrorCode.BAD_HEADER)
            elif self.models.pop(mid, None) is not None:
                done.append(mid)
            else:
                errors[mid[:64]] = [int(ErrorCode.UNKNOWN_EXPERT), "model not loaded"]
                self.counters.count_error(ErrorCode.UNKNOWN_EXPERT)
        if done and self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"unloaded": done, "errors": errors}

    def get(self, mid: Any) -> LoadedModel:
        """The held model ``mid`` (``BAD_HEADER`` for a non-id, ``UNKNOWN_EXPERT`` for one not
        loaded)."""
        m = self.models.get(check_model_id(mid))
        if m is None:
            raise ProtocolError(ErrorCode.UNKNOWN_EXPERT, f"lm: model {mid} is not loaded here")
        return m

    def describe(self) -> dict[str, Any]:
        """The status's ``models`` section: id -> what it is and what it has done."""
        return {
            mid: {
                "source": m.source,
                "vocab_size": m.vocab_size,
                "max_seq_len": m.max_seq_len,
                "params": m.params,
                "calls": m.calls,
                "tokens_in": m.tokens_in,
                "tokens_out": m.tokens_out,
                "compute_ms": round(m.compute_ms, 3),
            }
            for mid, m in self.models.items()
        }


class LMOp:
    """The whole-model ops: holds the :class:`ModelStore` (``store``: models loaded from
    ``workdir`` onto ``device``) and runs ``lm`` requests on its models; ``now_j`` is the
    meter's :meth:`~device_agent.energy.Meter.now_j` (as
    :class:`~device_agent.forward.ForwardOp`'s)."""

    def __init__(
        self, workdir: Path, device: str, counters: Counters, now_j: Callable[[], float]
    ) -> None:
        self.store = ModelStore(workdir, device, counters)
        self.counters = counters
        self.now_j = now_j

    def dispatch(
        self, op: str, h: dict[str, Any], recv_perf: float
    ) -> tuple[dict[str, Any], list[Any]]:
        """Run one of :data:`LM_OPS`: the reply's fields and frames."""
        if op == "lm":
            return self(h, recv_perf)
        if op == "load_model":
            return self.store.load(h), []
        return self.store.unload(h), []

    def check(self, h: dict[str, Any]) -> tuple[LoadedModel, str, list[int], dict[str, Any]]:
        """The request's model, mode, prompt and mode arguments (``options`` for score,
        ``max_new_tokens`` and ``eos_id`` for generate), every field checked."""
        m = self.store.get(h.get("model"))
        mode = h.get("mode")
        if not isinstance(mode, str) or mode not in LM_MODES:
            raise ProtocolError(
                ErrorCode.BAD_HEADER,
                f"lm: mode must be one of {list(LM_MODES)}, got {P.brief(mode)}",
            )
        prompt = check_tokens("prompt", h.get("prompt"), m.vocab_size)
        check_too_long("prompt", len(prompt), m)
        args: dict[str, Any] = {}
        if mode == "score":
            opts = h.get("options")
            if not isinstance(opts, list) or not opts:
                raise ProtocolError(
                    ErrorCode.BAD_HEADER,
                    f"lm: options must be a non-empty list of token lists, got {P.brief(opts)}",
                )
            if len(opts) > MAX_OPTIONS:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"lm: {len(opts)} options > limit {MAX_OPTIONS}"
                )
            args["options"] = [
                check_tokens(f"options[{i}]", o, m.vocab_size, empty=True)
                for i, o in enumerate(opts)
            ]
            longest = max(len(o) for o in args["options"])
            check_too_long("prompt + option", len(prompt) + longest, m)
        elif mode == "generate":
            args["max_new_tokens"] = _int_field(h, "max_new_tokens", 0, m.max_seq_len)
            args["eos_id"] = _int_field(h, "eos_id", -1, m.vocab_size - 1)
        return m, mode, prompt, args

    def run(
        self, m: LoadedModel, mode: str, prompt: list[int], args: dict[str, Any]
    ) -> tuple[Any, list[Any], int]:
        """Run the model: (the reply's ``result``, its frames, tokens produced). ``next``
        answers with one float32 frame ``[1, V]`` (``result`` None), ``score`` with a list of
        floats, ``generate`` with a list of ints."""
        model = m.model
        try:
            if mode == "next":
                lp = model.next_token_logprobs(prompt).detach().to("cpu", torch.float32)
                return None, [P.tensor_buffer(lp.reshape(1, -1))], 1
            if mode == "score":
                res = [float(x) for x in model.option_logprobs(prompt, args["options"])]
                return res, [], 0
            res = [int(x) for x in model.generate(prompt, args["max_new_tokens"], args["eos_id"])]
            return res, [], len(res)
        except Exception as err:  # noqa: BLE001 - a faulty model is reported, the agent serves on
            raise ProtocolError(
                ErrorCode.INTERNAL, f"{m.model_id}: {type(err).__name__}: {err}"
            ) from None

    def __call__(self, h: dict[str, Any], recv_perf: float) -> tuple[dict[str, Any], list[Any]]:
        """One ``lm`` request (received at ``recv_perf``): the reply's fields and frames."""
        timeout_ms = request_timeout_ms(h, "lm")
        m, mode, prompt, args = self.check(h)
        start, e_start, queue_ms = start_compute(recv_perf, timeout_ms, self.now_j)
        result, bufs, produced = self.run(m, mode, prompt, args)
        window = end_compute(start, e_start, queue_ms, self.now_j)
        m.calls += 1
        m.tokens_in += len(prompt)
        m.tokens_out += produced
        m.compute_ms += window["compute_ms"]
        self.counters.lm_calls += 1
        fields: dict[str, Any] = {"model": m.model_id, "mode": mode, "result": result}
        if bufs:
            fields["t"] = [[m.model_id, "float32", [1, len(bufs[0]) // 4]]]
        fields.update(window)
        return fields, bufs
