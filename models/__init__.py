"""MoE model layer shared by the base station and the devices.

Importing this package (and :mod:`models.split`) does not import torch: the splitter runs on
any machine. Modules:

* :mod:`models.uids` -- expert uids ``L{layer}.E{expert}`` (``format_uid``, ``parse_uid``).
* :mod:`models.families` -- family adapters (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).
* :mod:`models.split` -- ``split_checkpoint``: HF checkpoint -> BS part + per-expert shards.
* :mod:`models.manifest` -- the split's ``manifest.json`` contract (``load_manifest``,
  ``verify_split``).
* :mod:`models.widen` -- ``widen_split``: the same trained model with W-wide experts and payloads
  (an orthonormal lift at the MoE boundary; ``testbed model widen``, the ``tiny-4096`` model).
* :mod:`models.safetensors_io` -- streaming safetensors reader/writer (no mmap, no torch).
* :mod:`models.kernels` -- device-side expert kernels: torch fp/int8/int4, onnxruntime.
* :mod:`models.routing` -- selection hooks (``RoutingContext`` -> ``Selection``), ``make_policy``.
* :mod:`models.backend` -- ``ExpertBackend`` protocol (``run_layer(LayerWork) -> LayerResult``),
  ``LocalExpertBackend``, ``FaultInjectingBackend``.
* :mod:`models.moe_block` -- ``SplitMoEBlock`` and per-layer per-step ``MoELayerRecord``.
* :mod:`models.runtime` -- ``BaseStationModel``: load a split dir, batched prefill, greedy
  decoding with KV cache, continuation scoring, records.
* :mod:`models.evaluate` -- tiny-task accuracy and multiple-choice JSONL accuracy.
* :mod:`models.tinytask`, :mod:`models.tinytrain` -- the tiny built-in task and model
  (committed weights in ``models/tiny/``).
* :mod:`models.testing` -- small random HF checkpoints for tests and benchmarks.
* :mod:`models.errors` -- ``ModelError(where, problem)``: one line naming the file or key.
"""
