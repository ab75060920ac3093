"""``testbed model ...``: split MoE checkpoints, build the tiny model, evaluate accuracy.

Commands (each takes ``--format json|table``; json prints one JSON object on stdout):

* ``split CHECKPOINT_DIR OUT_DIR``: BS part + one shard per expert + manifest.json.
* ``build-tiny OUT_DIR``: train the tiny built-in Mixtral (HF format) deterministically.
* ``train-edge-llms OUT_DIR [--k 5] [--seed 0]``: MoE²'s K whole-model experts (dense LMs of
  different sizes and training mixtures) and their gate, with a per-category accuracy table.
* ``widen MODEL OUT_DIR --hidden 4096``: the same trained model with W-wide experts and payloads
  (an orthonormal lift at the MoE boundary, :mod:`models.widen`).
* ``eval MODEL_DIR [--policy NAME_OR_SPEC[,..]] [--param [NAME.]KEY=VALUE ..] [--cluster FILE]
  [--mc FILE.jsonl] [--wire-dtype bf16]``: tiny-task held-out accuracy and/or multiple-choice
  accuracy, and bytes per token each way, per policy; MODEL_DIR is a split dir, an HF checkpoint
  (split to a temporary directory first) or a built-in name (``tiny``, ``tiny-4096``). A policy
  is a routing name (``topk``, ``top<n>``, ``random<n>``; these win over the entry points of the
  same name) or any testbed policy spec (entry-point name such as ``wdmoe``/``coel``,
  ``package.module:Class``, ``path/to/file.py:Class``), placed and asked per layer offline on a
  static cluster (:mod:`testbed.run.offline_eval`), its ``Decision.stats`` means as
  ``policy.<key>`` columns.

Bad input exits 2 with one line ``error: <file or key>: <problem>`` on stderr. Heavy imports
(torch, transformers) happen inside the commands so mounting this app costs nothing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer

from .output import Format, FormatOpt, cell, emit, print_error, records_table, table

app = typer.Typer(
    help="Split, build and evaluate MoE models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

#: model tables are printed 160 columns wide, whatever the terminal
WIDTH = 160


def _fail(message: str) -> NoReturn:
    """A model error: its one line (whitespace collapsed), exit 2."""
    print_error("ModelError", [" ".join(message.split())], 2)
    raise typer.Exit(2)


def _show(
    fmt: Format, data: dict[str, Any], title: str, rows: list[dict[str, Any]] | None = None
) -> None:
    """``data`` as JSON, or a table of ``rows`` (default: ``data``'s keys and values)."""
    rows = rows if rows is not None else [{"key": k, "value": v} for k, v in data.items()]
    emit(fmt, data, records_table(title, rows), width=WIDTH)


def _run(fn: Callable[[], Any]) -> Any:
    """``fn()``, its bad input (ModelError, OSError) turned into one error line and exit 2; a
    TestbedError (ConfigError, PolicyFailed) into its lines and its exit code."""
    from models.errors import ModelError
    from testbed.errors import ConfigError, TestbedError

    try:
        return fn()
    except ModelError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.filename or 'I/O'}: {e.strerror or e}")
    except TestbedError as e:
        print_error(
            type(e).__name__, e.problems if isinstance(e, ConfigError) else [str(e)], e.exit_code
        )
        raise typer.Exit(e.exit_code) from None


@app.command()
def split(
    checkpoint_dir: Path = typer.Argument(
        ..., help="HF checkpoint dir: config.json + *.safetensors."
    ),
    out_dir: Path = typer.Argument(..., help="Output split directory (empty or a previous split)."),
    fmt: Format = FormatOpt,
) -> None:
    """Split a MoE checkpoint into a BS part and one safetensors shard per expert uid."""

    def go() -> dict[str, Any]:
        from models.split import split_checkpoint

        t0 = time.perf_counter()
        m = split_checkpoint(checkpoint_dir, out_dir)
        return {
            "out_dir": str(out_dir),
            "family": m["family"],
            "dtype": m["dtype"],
            "top_k": m["top_k"],
            "moe_layers": len(m["moe_layers"]),
            "experts": len(m["experts"]),
            "bs_bytes": m["bs"]["bytes"],
            "expert_bytes": sum(e["bytes"] for e in m["experts"].values()),
            "largest_tensor_bytes": m["largest_tensor_bytes"],
            "wall_s": round(time.perf_counter() - t0, 3),
        }

    res = _run(go)
    _show(fmt, res, "model split")


@app.command("build-tiny")
def build_tiny(
    out_dir: Path = typer.Argument(..., help="Output HF checkpoint directory."),
    steps: int = typer.Option(3000, "--steps", min=1, help="Training steps."),
    seed: int = typer.Option(0, "--seed", help="Seed (weights are a function of it)."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads (part of determinism)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines on stderr."),
    fmt: Format = FormatOpt,
) -> None:
    """Train the tiny built-in Mixtral on the project's own task and save it in HF format."""

    def go() -> dict[str, Any]:
        from dataclasses import asdict, replace

        from models.tinytrain import TinyConfig, train_tiny

        if out_dir.exists() and not out_dir.is_dir():
            from models.errors import ModelError

            raise ModelError(str(out_dir), "exists and is not a directory")
        cfg = replace(TinyConfig(), steps=steps, seed=seed, threads=threads)
        log = None if quiet else (lambda s: sys.stderr.write(s + "\n"))
        return asdict(train_tiny(out_dir, cfg, log=log))

    res = _run(go)
    _show(fmt, res, "model build-tiny")


@app.command("train-edge-llms")
def train_edge_llms_cmd(
    out_dir: Path = typer.Argument(..., help="Output folder: one folder per expert, the gate."),
    k: int = typer.Option(5, "--k", min=4, max=6, help="Number of whole-model experts (4..6)."),
    seed: int = typer.Option(0, "--seed", help="Seed (weights are a function of it)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines on stderr."),
    fmt: Format = FormatOpt,
) -> None:
    """Train MoE²'s K heterogeneous whole-model experts (dense LMs) and the gate on the tiny task;
    print per-category accuracy (the committed set is models/edge/, models.edge_llms)."""

    def go() -> dict[str, Any]:
        from models.edge_llms import train_edge_llms

        log = None if quiet else (lambda s: sys.stderr.write(s + "\n"))
        return train_edge_llms(out_dir, k=k, seed=seed, log=log)

    res = _run(go)
    from models.edge_llms import format_table

    emit(fmt, res, format_table(res), width=WIDTH)


@app.command()
def widen(
    model: str = typer.Argument(
        ..., help="Split dir, HF checkpoint dir or built-in name (tiny) to widen."
    ),
    out_dir: Path = typer.Argument(..., help="Output split directory (empty or a previous split)."),
    hidden: int = typer.Option(4096, "--hidden", min=1, help="Experts' (and the wire's) width."),
    seed: int = typer.Option(0, "--seed", help="Seed of the orthonormal lift."),
    intermediate: int | None = typer.Option(
        None,
        "--intermediate",
        min=1,
        help="Experts' intermediate size, zero-padded (default: as trained).",
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="Stored expert dtype: float32, bfloat16 or float16 (default: as stored).",
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Re-express a trained model's experts in a wider basis: same routing and outputs, experts
    and payloads of a HIDDEN-wide model."""

    def go() -> dict[str, Any]:
        from models.errors import ModelError
        from models.widen import widen_split
        from testbed.errors import ConfigError
        from testbed.lab.modelstore import resolve_split

        t0 = time.perf_counter()
        try:
            src = resolve_split(model, where="MODEL")
        except ConfigError as e:
            raise ModelError(*str(e).partition(": ")[::2]) from None
        m = widen_split(
            src, out_dir, hidden=hidden, seed=seed, intermediate=intermediate, dtype=dtype
        )
        e0 = next(iter(m["experts"].values()))
        return {
            "out_dir": str(out_dir),
            "source": str(src),
            "hidden_size": m["dims"]["hidden_size"],
            "model_hidden_size": m["lift"]["model_hidden_size"],
            "intermediate_size": m["dims"]["expert_intermediate_size"],
            "seed": seed,
            "experts": len(m["experts"]),
            "expert_shapes": e0["shapes"],
            "dtype": m["dtype"],
            "expert_bytes": sum(e["bytes"] for e in m["experts"].values()),
            "wall_s": round(time.perf_counter() - t0, 3),
        }

    res = _run(go)
    _show(fmt, res, "model widen")


POLICY_HELP = (
    "Policies, comma list: a routing name (topk, top<n>, random<n>; these names win over the "
    "entry points topk/top1) or a testbed policy: entry-point name (wdmoe, coel, ...), "
    "package.module:Class or path/to/file.py:Class (relative to the working directory)."
)
PARAM_HELP = (
    "A policy parameter KEY=VALUE (VALUE a TOML value; a bare word is a string), repeatable: "
    "given to every non-routing policy of --policy (a key one of them does not take is an "
    "error); NAME.KEY=VALUE gives it to the policy written NAME in --policy only."
)
CLUSTER_HELP = (
    "Static cluster (TOML, or .json) the policies place experts on and decide over: devices "
    "(names or a count), rate_down_kbit, rate_up_kbit (one number or a table by device), "
    "memory_budget_mb, bytes_per_token (default: the model's), compute_profile (device -> "
    "two numbers a_ms, b_ms). Default: 3 devices dev1..dev3 at 20000 kbit/s both ways."
)


@app.command("eval")
def eval_cmd(
    model_dir: Path = typer.Argument(
        ..., help="Split dir (manifest.json), HF checkpoint dir or built-in name (tiny, tiny-4096)."
    ),
    policy: str = typer.Option("topk", "--policy", help=POLICY_HELP),
    param: list[str] | None = typer.Option(None, "--param", help=PARAM_HELP),
    cluster: Path | None = typer.Option(None, "--cluster", help=CLUSTER_HELP),
    mc: Path | None = typer.Option(
        None, "--mc", help="Multiple-choice JSONL file (see models.evaluate)."
    ),
    n: int = typer.Option(
        512, "--n", min=1, help="Held-out tiny-task examples / max MC questions."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out sample and random policies."),
    expert_runtime: str = typer.Option("torch", "--expert-runtime", help="torch or onnx."),
    quant: str | None = typer.Option(None, "--quant", help="int8 or int4 expert weights."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads."),
    wire_dtype: str | None = typer.Option(
        None,
        "--wire-dtype",
        help="Hidden states to/from the experts in fp32, bf16 or fp16 "
        "(default: the model's dtype), as on a testbed's wire.",
    ),
    fmt: Format = FormatOpt,
) -> None:
    """Accuracy on the tiny task's held-out split and/or a multiple-choice JSONL file, and bytes
    per token each way (rows sent to / returned by the experts x bytes_per_token, per token
    through the model), per policy. A testbed policy is driven as a run drives it, offline:
    place() on the static cluster, select() per MoE layer on a static ClusterView, its
    wrap_backend() around the expert backend; the rates it asks for and its load_options()
    (e.g. CoEL's quantization) are not applied. Its Decision.stats means are policy.<key>
    columns, its mean prediction policy_predicted_ms."""

    def go() -> dict[str, Any]:
        import torch

        from testbed.run.offline_eval import default_cluster, load_cluster

        torch.set_num_threads(threads)
        policies = _eval_policies(policy, param or [], seed)
        where = load_cluster(cluster) if cluster is not None else default_cluster()
        _check_eval_options(quant, expert_runtime, wire_dtype)
        builtin = _builtin_or_dir(model_dir)
        with tempfile.TemporaryDirectory(prefix="moe-split-") as tmp:
            split_dir = _eval_split_dir(model_dir, builtin, Path(tmp))
            from models.runtime import BaseStationModel

            bs = BaseStationModel.from_split_dir(
                split_dir, expert_runtime=expert_runtime, quant=quant, wire_dtype=wire_dtype
            )
            setup = _EvalSetup(bs, model_dir, split_dir, where, policies)
            results = _evaluate(setup, mc, n, batch_size, seed)
        return _eval_summary(bs, model_dir, expert_runtime, quant, results)

    res = _run(go)
    title = f"model eval {res['model_dir']} ({res['family']}, top-k {res['top_k']})"
    _show_eval(fmt, res, title)


def _show_eval(fmt: Format, res: dict[str, Any], title: str) -> None:
    """``model eval``'s result as JSON, or its table plus, when a policy gave a prediction or
    stats, a second table of their means (``policy_predicted_ms``, ``policy.<key>``)."""
    rows = res["results"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    extra = [k for k in keys if k == "policy_predicted_ms" or k.startswith("policy.")]
    main = [k for k in keys if k not in extra and k != "wall_s"] + ["wall_s"]

    def show(c: str, v: Any) -> str:
        return f"{v:.1f}" if c.startswith("bytes_") and isinstance(v, float) else cell(v)

    def tab(name: str, cols: list[str]) -> Any:
        heads = [c.replace("_per_token", "/tok").replace("bytes_", "bytes ") for c in cols]
        t = table(name, heads, ([show(c, r.get(c)) for c in cols] for r in rows))
        for c in t.columns:  # a long policy spec folds, never ends in '…'
            c.overflow = "fold"
        return t

    emit(fmt, res, tab(title, main), width=WIDTH)
    if extra and fmt != Format.json:
        emit(
            fmt,
            res,
            tab("policy decisions: mean per MoE layer call", ["policy", *extra]),
            width=WIDTH,
        )


def _eval_policies(policy: str, params: list[str], seed: int) -> dict[str, Any]:
    """``--policy``'s comma list as name -> routing hook (a name :func:`make_policy` knows) or
    loaded :class:`testbed.policy.Policy` (with its ``--param`` values)."""
    from models.errors import ModelError
    from models.routing import make_policy
    from testbed.errors import ConfigError
    from testbed.policy import load_policy

    names = [p.strip() for p in policy.split(",") if p.strip()]
    if not names:
        raise ModelError("--policy", "empty policy list")
    routing: dict[str, Any] = {}
    for name in names:
        try:
            routing[name] = make_policy(name, seed=seed)
        except ModelError:
            pass
    per = _policy_params(params, names, set(routing))
    out: dict[str, Any] = {}
    for name in names:
        if name in routing:
            out[name] = routing[name]
            continue
        try:
            out[name] = load_policy(name, per[name], "--param")
        except ConfigError as e:
            if ":" in name or not e.problems[0].startswith("policy: unknown policy"):
                raise
            raise ConfigError(
                f"--policy: {name!r} is not a routing name (topk, top<n>, random<n>); "
                + e.problems[0]
            ) from None
    return out


def _policy_params(
    items: list[str], names: list[str], routing: set[str]
) -> dict[str, dict[str, Any]]:
    """``--param`` values per non-routing policy name: ``KEY=VALUE`` for each, ``NAME.KEY=VALUE``
    for the policy written ``NAME`` only (ConfigError for a NAME not in ``names`` or a routing
    name, or a plain KEY with no policy to take it)."""
    from testbed.errors import ConfigError
    from testbed.run.offline_eval import parse_param

    plugins = [n for n in names if n not in routing]
    out: dict[str, dict[str, Any]] = {n: {} for n in plugins}
    for item in items:
        key, value = parse_param(item)
        target, dot, leaf = key.rpartition(".")
        if not dot:
            if not plugins:
                raise ConfigError(
                    f"--param {key}: no policy takes parameters (routing names take none)"
                )
            for n in plugins:
                out[n][key] = value
        elif target in routing:
            raise ConfigError(f"--param {key}: {target} is a routing name and takes no parameters")
        elif target in out:
            out[target][leaf] = value
        else:
            raise ConfigError(
                f"--param {key}: {target!r} is not one of --policy ({', '.join(names)})"
            )
    return out


def _check_eval_options(quant: str | None, expert_runtime: str, wire_dtype: str | None) -> None:
    """``--quant``, ``--expert-runtime`` and ``--wire-dtype``: known values, else ModelError."""
    from models.errors import ModelError

    if quant not in (None, "int8", "int4"):
        raise ModelError("--quant", f"unknown quantization {quant!r}; use int8 or int4")
    if expert_runtime not in ("torch", "onnx"):
        raise ModelError(
            "--expert-runtime", f"unknown expert runtime {expert_runtime!r}; use torch or onnx"
        )
    if wire_dtype not in (None, "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"):
        raise ModelError(
            "--wire-dtype", f"unknown wire dtype {wire_dtype!r}; use fp32, bf16 or fp16"
        )


def _builtin_or_dir(model_dir: Path) -> bool:
    """Whether MODEL_DIR is a built-in name; ModelError when it is neither that nor a folder."""
    from models.errors import ModelError
    from testbed.lab.modelstore import is_short_name

    builtin = not model_dir.is_dir() and is_short_name(str(model_dir))
    if not model_dir.is_dir() and not builtin:
        raise ModelError(str(model_dir), "not a directory")
    return builtin


def _eval_split_dir(model_dir: Path, builtin: bool, tmp: Path) -> Path:
    """The split to evaluate: a built-in's (built on first use), MODEL_DIR itself, or an HF
    checkpoint split into ``tmp``."""
    from models.errors import ModelError
    from models.split import split_checkpoint
    from testbed.errors import ConfigError
    from testbed.lab.modelstore import resolve_split

    if builtin:
        try:
            return resolve_split(str(model_dir), where="MODEL_DIR")
        except ConfigError as e:
            raise ModelError(*str(e).partition(": ")[::2]) from None
    if not (model_dir / "manifest.json").is_file():
        split_checkpoint(model_dir, tmp)
        return tmp
    return model_dir


@dataclass
class _EvalSetup:
    """What ``model eval`` evaluates: the model, where it came from, the static cluster and
    the policies (name -> routing hook or loaded Policy)."""

    bs: Any
    model_dir: Path
    split_dir: Path
    cluster: Any
    policies: dict[str, Any]


def _evaluate(
    setup: _EvalSetup, mc: Path | None, n: int, batch_size: int, seed: int
) -> list[dict[str, Any]]:
    """One row per policy: tiny-task accuracy (the tiny model) and/or multiple-choice accuracy
    (``mc``), bytes per token each way, the policy's stats means, with its wall time."""
    from models.errors import ModelError
    from models.evaluate import (
        eval_multiple_choice,
        eval_tiny,
        is_tiny_split,
        load_mc_jsonl,
        load_tokenizer,
    )
    from testbed.policy import Policy
    from testbed.run import offline_eval as oe

    bs = setup.bs
    tiny = is_tiny_split(bs)
    if not tiny and mc is None:
        raise ModelError(
            str(setup.model_dir), "not the tiny model (no tiny_task.json): pass --mc FILE.jsonl"
        )
    items = None
    if mc is not None:
        items = load_mc_jsonl(mc, tokenizer=load_tokenizer(bs), limit=n)
    pad = bs.config.pad_token_id if bs.config.pad_token_id is not None else 0
    bpt = setup.cluster.bytes_per_token or oe.model_bytes_per_token(bs)
    results = []
    for name, entry in setup.policies.items():
        if isinstance(entry, Policy):
            if oe.skips_load_options(entry):
                sys.stderr.write(
                    f"note: {name}: load_options() (e.g. quantization) is not applied offline; "
                    "the experts run as stored\n"
                )
            entry = oe.offline_policy(entry, bs.manifest, setup.cluster, bpt, str(setup.split_dir))
        row: dict[str, Any] = {"policy": name}
        t0 = time.perf_counter()
        with oe.evaluating(bs, entry) as tally:
            if tiny:
                row.update(eval_tiny(bs, n_examples=n, batch_size=batch_size, seed=seed))
            if items is not None:
                r = eval_multiple_choice(
                    bs, items, batch_size=max(1, batch_size // 4), pad_token_id=pad
                )
                row.update({"mc_acc": r["acc"], "mc_acc_norm": r["acc_norm"], "mc_n": r["n"]})
        row.update(oe.tally_columns(tally, bpt))
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        results.append(row)
    return results


def _eval_summary(
    bs: Any, model_dir: Path, expert_runtime: str, quant: str | None, results: list
) -> dict[str, Any]:
    """``model eval``'s result: the model, how its experts ran, one row per policy."""
    return {
        "model_dir": str(model_dir),
        "family": bs.manifest.family,
        "top_k": bs.manifest.top_k,
        "expert_runtime": expert_runtime,
        "quant": quant,
        "hidden_size": bs.manifest.model_hidden_size,
        "expert_hidden_size": bs.manifest.hidden_size,
        "wire_dtype": str(
            bs.controller.wire_dtype or next(bs.model.parameters()).dtype
        ).removeprefix("torch."),
        "results": results,
    }
