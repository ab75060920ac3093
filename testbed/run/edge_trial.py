"""Runs with whole-model experts (MoE², arXiv 2501.09410): each expert a whole small LM held by
a device, the gate at the BS, a request-level policy (:class:`testbed.policy.RequestPolicy`).

A recipe selects them with ``model.path = "edge"`` (the project's trained set,
:func:`models.edge_llms.edge_llms_dir`) or a folder holding an ``edge_llms.json``. Requests are
the tiny task's multiple-choice items (:func:`models.tinytask.make_mc_items`): a prompt and
four answers, one right. One repeat of a trial (:class:`EdgeTrialRun`):

1. the policy places the experts (one :class:`~testbed.policy.ExpertInfo` per model, ``layer``
   -1); each is pushed to its device (sha256 reuse) and loaded there;
2. the links are set as the recipe says (per device where it says so);
3. **profile** (once per placement and link settings, shared by the trials that have them):
   for every expert, a few untimed warm-up calls, then :data:`PROFILE_PER_CATEGORY`
   items of each category scored on its device, the categories in turn, each while a partner
   expert on another device (where there is one) serves the same item (as a top-2 request
   runs): the 90th percentile of a category's round trips is its delay there, that of all its
   calls' device joules (over every category) its energy per request (a conservative profile:
   the plan's budgets hold for most requests, not only for the average one); the BS's own
   time (gate and combination) is ``aggregation_ms``;
4. the policy plans (:meth:`~testbed.policy.RequestPolicy.plan`) from that profile and a
   validation set the BS scores in-process (the gate's weights and every expert's answer
   probabilities on :data:`VALIDATION_ITEMS` items; the same for every trial);
5. every request: the gate's weights, the policy's choice, the chosen experts' ``score`` calls
   in parallel, their option probabilities combined by the (renormalised) weights, right or
   wrong; its delay (gate to combined answer, wall time at the BS) and energy (the chosen
   devices' meters over their calls) checked against the policy's ``energy_budget_j`` and
   ``delay_budget_ms`` when it has them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PolicyFailed, TestbedError, one_line
from ..policy.api import (
    ClusterView,
    DeviceInfo,
    ExpertInfo,
    PlacementProfile,
    RequestContext,
    RequestPolicy,
    RequestProfile,
)
from ..policy.loading import load_policy
from ..policy.placement import PLACEMENTS
from ..results.summary import summary_row
from .recipe import Recipe, Trial
from .trial import enforce_links

#: ``model.path`` of the project's whole-model expert set
EDGE_MODEL = "edge"
#: items per (expert, category) the profile scores on the devices
PROFILE_PER_CATEGORY = 4
#: untimed calls per expert before its profile (one item of each of the first categories)
PROFILE_WARMUP = 4
#: items of the validation set a policy plans on (scored in-process at the BS)
VALIDATION_ITEMS = 160
VALIDATION_SEED = 101
#: the requests' items are drawn with this seed + the recipe's
REQUEST_SEED = 202


def edge_dir(spec: str) -> Path | None:
    """The whole-model expert set ``spec`` names (``"edge"``: the project's; else a folder
    with ``edge_llms.json``), or None when it names none (a MoE model)."""
    from models.edge_llms import REPORT_FILE, edge_llms_dir

    if spec == EDGE_MODEL:
        return edge_llms_dir()
    p = Path(spec)
    return p if (p / REPORT_FILE).is_file() else None


def mc_items(count: int, seed: int, exclude: Sequence[Sequence[int]] = ()) -> list[dict]:
    """``count`` multiple-choice items (``context_ids``, ``choices_ids``, ``label``,
    ``category``), none whose prompt is in ``exclude``."""
    from models import tinytask as tt

    seen = {tuple(p) for p in exclude}
    out = []
    for it in tt.make_mc_items(count + len(seen), seed=seed):
        if tuple(it["context_ids"]) in seen:
            continue
        out.append({**it, "category": int(it["context_ids"][1]) - tt.TASK_BASE_ID})
        if len(out) == count:
            break
    return out


def p90(xs: Sequence[float]) -> float:
    """The 90th percentile of ``xs`` (linear interpolation; 0 for none): the profile's
    conservative figure, so that most requests of a plan meet the budgets it was made for."""
    if not xs:
        return 0.0
    v = sorted(xs)
    pos = 0.9 * (len(v) - 1)
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def softmax(xs: Sequence[float]) -> list[float]:
    """Probabilities from log-probabilities (numerically safe)."""
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


class EdgeModels:
    """The whole-model expert set at the BS: names, folders, the gate, the models in-process
    (for the validation set), the categories."""

    def __init__(self, folder: Path):
        from models.dense_lm import load_dense_lm
        from models.edge_llms import read_report
        from models.moe2_gate import load_gate

        self.folder = folder
        report = read_report(folder)
        self.names = [str(e["name"]) for e in report["experts"]]
        self.folders = [folder / n for n in self.names]
        self.categories = [str(c) for c in report["categories"]]
        self.gate = load_gate(folder)
        self.models = [load_dense_lm(f) for f in self.folders]
        self.bytes = [
            sum(p.stat().st_size for p in f.iterdir() if p.is_file()) for f in self.folders
        ]

    def gate_weights(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """The gate's weights over the experts, per prompt."""
        import torch

        with torch.inference_mode():
            return self.gate.weights(list(prompts)).tolist()

    def validation(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The validation set of a :class:`~testbed.policy.RequestProfile`: gate weights
        ``[N, K]``, each expert's option probabilities ``[K, N, O]``, answers, categories."""
        import numpy as np
        import torch

        gate = np.array(self.gate_weights([it["context_ids"] for it in items]))
        with torch.inference_mode():
            probs = np.array(
                [
                    [
                        softmax(m.option_logprobs(it["context_ids"], it["choices_ids"]))
                        for it in items
                    ]
                    for m in self.models
                ]
            )
        return {
            "gate": gate,
            "option_probs": probs,
            "answer": np.array([int(it["label"]) for it in items]),
            "category": np.array([int(it["category"]) for it in items]),
        }


@dataclass
class Call:
    """One ``score`` call of a request: the expert, its device, and the reply."""

    expert: int
    device: str
    reply: Any


def budgets_of(policy: Any) -> tuple[float | None, Any]:
    """The policy's (``energy_budget_j``, ``delay_budget_ms``), None where it has none."""
    return getattr(policy, "energy_budget_j", None), getattr(policy, "delay_budget_ms", None)


def within_budget(value: float | None, budget: float | None) -> bool:
    """A measured value against its budget (unknown value or no budget: within)."""
    return value is None or budget is None or value <= budget + 1e-9


class EdgeTrialRun:
    """Repeat ``rep`` of trial ``t`` with whole-model experts in the set-up session ``s`` (an
    :class:`~testbed.run.session.EdgeSession`: its agents, links, recorder, the expert set
    ``s.edge`` and validation set ``s.validation``). :meth:`run` runs it."""

    def __init__(self, s: Any, t: Trial, rep: int):
        self.s, self.t, self.rep = s, t, rep
        self.recipe: Recipe = s.recipe
        self.tables = s.recorder.tables
        pol = load_policy(
            self.recipe.policy_spec(t.policy),
            t.config["policy"]["params"],
            f"{self.recipe.path}: policy.params",
        )
        if not isinstance(pol, RequestPolicy):
            raise ConfigError(
                f"{self.recipe.path}: policy.name: {t.policy} decides per layer; whole-model "
                "experts (model.path = edge) need a request-level policy (e.g. moe2)"
            )
        self.policy: RequestPolicy = pol
        self.key = {
            "run_id": s.run_id,
            "trial": t.index,
            "point": t.label,
            "policy": pol.name,
            "repeat": rep,
            **{f"sweep.{k}": v for k, v in t.point.items()},
        }
        n = t.config["run"]["devices"]
        self.names = [d.name for d in (s.inv.devices[: int(n)] if n else s.inv.devices)]
        self.device_of: list[str] = []
        self.rows: list[dict] = []
        self.calls: list[dict] = []

    def run(self) -> None:
        """Set the trial up, run its requests, write its summary; marked completed."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.names))) as pool:
            self._run(pool)
        self._finish()

    def _run(self, pool: Any) -> None:
        profile, links = self._set_up(pool)
        try:
            self.policy.plan(profile)
        except Exception as e:
            raise PolicyFailed(f"policy {self.policy.name}: plan raised {one_line(e)}") from e
        entry = manifest_entry(self.t, self.rep, self.policy, self.names, profile, links)
        self.s.manifest["trials"].append(entry)
        self.s.recorder.save()
        rates = {r["device"]: r for r in links if r["device"] in self.names}
        view = ClusterView.static(
            self.names,
            {n: (d,) for n, d in zip(self.s.edge.names, self.device_of)},
            {n: float(rates[n]["down_kbit"]) for n in self.names},
            {n: float(rates[n]["up_kbit"]) for n in self.names},
        )
        items = mc_items(
            int(self.t.config["workload"]["requests"]),
            self.recipe.seed + REQUEST_SEED + self.rep,
            self.s.validation_prompts,
        )
        sample = {r["device"]: r for r in links}
        for i, it in enumerate(items):
            self.s.sampler.sample(self.t.index, sample)
            self._request(i, it, view, pool)
            self.s.requests_done += 1
            self.s.progress.request()

    # set-up --------------------------------------------------------------------------------
    def _set_up(self, pool: Any) -> tuple[RequestProfile, list[dict[str, Any]]]:
        """Placement, models pushed and loaded, links, profile."""
        s, edge = self.s, self.s.edge
        budget = self.recipe.config["run"].get("memory_budget_mb")
        devs = [d for d in s.inv.devices if d.name in self.names]
        infos = [DeviceInfo(d.name, budget or d.memory_budget_mb, d.hw_class) for d in devs]
        experts = [ExpertInfo(n, -1, k, b) for k, (n, b) in enumerate(zip(edge.names, edge.bytes))]
        links = self.t.device_links(self.names)
        try:
            placement = self.policy.place(
                experts,
                infos,
                PlacementProfile(
                    {n: x.down_kbit for n, x in links.items()},
                    {n: x.up_kbit for n, x in links.items()},
                    {},
                    0,
                    str(edge.folder),
                ),
            )
        except Exception as e:
            raise PolicyFailed(f"policy {self.policy.name}: place raised {one_line(e)}") from e
        if placement is None or any(not placement.get(n) for n in edge.names):
            placement = PLACEMENTS["round-robin"](experts, infos, 0)
        self.device_of = [placement[n][0] for n in edge.names]
        s.load_models(dict(zip(edge.names, self.device_of)))
        rows, info = enforce_links(s.shaper, self.t, [d.name for d in s.inv.devices])
        s.manifest["shaping"] = info
        # one profile per placement and link settings, shared by the trials that have them: the
        # policies and budgets of a sweep are then planned on the same measured numbers
        key = (
            tuple(self.device_of),
            tuple((n, x.down_kbit, x.up_kbit, x.delay_ms, x.loss_pct) for n, x in links.items()),
        )
        if key not in s.profiles:
            s.profiles[key] = self._profile(pool)
        return s.profiles[key], rows

    def _profile(self, pool: Any) -> RequestProfile:
        """Per expert: the 90th percentile of its round trips per category and of its device
        joules over all its calls (:data:`PROFILE_PER_CATEGORY` scored items per category), each
        timed call made while a partner expert on another device, where there is one, serves
        the same item (as a top-2 request runs them: the devices share the host's cores); the
        BS's aggregation time."""
        s, edge = self.s, self.s.edge
        cats = len(edge.categories)
        per_cat: dict[int, list[dict]] = {c: [] for c in range(cats)}
        for it in s.profile_items:
            if len(per_cat[it["category"]]) < PROFILE_PER_CATEGORY:
                per_cat[it["category"]].append(it)
        rtts: list[list[list[float]]] = [[[] for _ in range(cats)] for _ in edge.names]
        energy = []
        for k, name in enumerate(edge.names):
            joules: list[float] = []
            dev = self.device_of[k]
            partner = next(
                (
                    j
                    for j in range(1, len(edge.names))
                    if self.device_of[(k + j) % len(edge.names)] != dev
                ),
                None,
            )
            # warm-up calls first (untimed): a link's burst allowance (its bucket) and a cold
            # model must not make the first category look cheap; then the categories in turn
            warm = [(c, per_cat[c][0]) for c in range(min(cats, PROFILE_WARMUP)) if per_cat[c]]
            for r in range(-1, PROFILE_PER_CATEGORY):
                for c, it in warm if r < 0 else profile_round(per_cat, r):
                    if partner is not None:
                        p = (k + partner) % len(edge.names)
                        busy = pool.submit(s.score, self.device_of[p], edge.names[p], it)
                    rep = s.score(dev, name, it)
                    other = busy.result() if partner is not None else rep
                    for x in (rep, other):
                        if not x.ok:
                            raise TestbedError(
                                f"{x.device}: profiling {x.model} failed: {x.status} {x.detail}"
                            )
                    if r >= 0:
                        rtts[k][c].append(float(rep.rtt_ms))
                        if rep.energy_j is not None:
                            joules.append(float(rep.energy_j))
            if not joules:
                raise TestbedError(
                    f"{dev}: no energy readings from {name}'s calls: the energy budgets need "
                    "the agent's meter (or its CPU-time estimate)"
                )
            energy.append(p90(joules))
        delay = [[p90(x) for x in row] for row in rtts]
        v = s.validation
        return RequestProfile(
            tuple(edge.names),
            tuple(self.device_of),
            tuple(energy),
            tuple(tuple(r) for r in delay),
            s.aggregation_ms,
            tuple(edge.categories),
            v["gate"],
            v["option_probs"],
            v["answer"],
            v["category"],
        )

    # requests ------------------------------------------------------------------------------
    def _request(self, i: int, it: Mapping[str, Any], view: ClusterView, pool: Any) -> None:
        """One request: gate, decision, the chosen experts' calls in parallel, combination."""
        edge = self.s.edge
        t0 = time.perf_counter()
        gate = edge.gate_weights([it["context_ids"]])[0]
        req = RequestContext(i, tuple(it["context_ids"]), int(it["category"]), tuple(gate))
        try:
            d = self.policy.select_request(req, view)
        except Exception as e:
            name = self.policy.name
            raise PolicyFailed(f"policy {name}: select_request raised {one_line(e)}") from e
        chosen = [int(k) for k in d.experts]
        bad_w = d.weights is not None and len(d.weights) != len(chosen)
        if any(not 0 <= k < len(edge.names) for k in chosen) or len(set(chosen)) < len(chosen):
            raise PolicyFailed(
                f"policy {self.policy.name}: select_request chose {chosen}: each of "
                f"0..{len(edge.names) - 1} at most once"
            )
        if bad_w:
            raise PolicyFailed(
                f"policy {self.policy.name}: select_request gave {len(d.weights)} weights "
                f"for {len(chosen)} experts"
            )
        calls = self._calls(chosen, it, pool)
        w = list(d.weights) if d.weights is not None else [gate[k] for k in chosen]
        answer = combine_answers(calls, dict(zip(chosen, w)))
        t1 = time.perf_counter()
        self._record(i, it, d, calls, answer, (t1 - t0) * 1e3)

    def _calls(self, chosen: Sequence[int], it: Mapping[str, Any], pool: Any) -> list[Call]:
        """The chosen experts' ``score`` calls: the devices in parallel, one thread each, the
        experts of one device one after the other (its connection is one socket, and its
        agent serves one call at a time anyway); in ``chosen``'s order."""
        s, names = self.s, self.s.edge.names
        by_dev: dict[str, list[int]] = {}
        for k in chosen:
            by_dev.setdefault(self.device_of[k], []).append(k)

        def on(dev: str, ks: list[int]) -> list[Call]:
            return [Call(k, dev, s.score(dev, names[k], it)) for k in ks]

        futs = [pool.submit(on, dev, ks) for dev, ks in by_dev.items()]
        done = {c.expert: c for f in futs for c in f.result()}
        return [done[k] for k in chosen]

    def _record(
        self,
        i: int,
        it: Mapping[str, Any],
        d: Any,
        calls: list[Call],
        answer: int | None,
        ms: float,
    ) -> None:
        """The request's row, its calls' rows (written now) and its budget check."""
        rkey = {**self.key, "request": i}
        # a failed call's joules are unknown, so is then the request's: not known to be within
        # its energy budget, it counts as over it; a refused request used none and is over too
        joules = [c.reply.energy_j for c in calls]
        energy = sum(joules) if calls and None not in joules else None
        e_budget, d_budget = budgets_of(self.policy)
        cat = int(it["category"])
        per_cat = (
            d_budget
            if d_budget is None or isinstance(d_budget, (int, float))
            else list(d_budget)[cat]
        )
        failed = sum(1 for c in calls if not c.reply.ok)
        status = "refused" if not calls else ("ok" if not failed else "degraded")
        if calls and failed == len(calls):
            status = "error"
        row = {
            **rkey,
            "task": self.s.edge.categories[cat],
            "prompt_tokens": len(it["context_ids"]),
            "output_tokens": 1,
            "ttft_ms": ms,
            "total_ms": ms,
            "correct": int(answer == int(it["label"])),
            "score": float(answer == int(it["label"])),
            "experts_per_token": len(calls),
            "bytes_down": sum(c.reply.bytes_down for c in calls),
            "bytes_up": sum(c.reply.bytes_up for c in calls),
            "calls": len(calls),
            "calls_failed": failed,
            "calls_rerouted": 0,
            "energy_devices_j": energy,
            "energy_source": ",".join(sorted({str(c.reply.energy_source or "") for c in calls})),
            "status": status,
            "error": "; ".join(f"{c.device}: {c.reply.status}" for c in calls if not c.reply.ok),
            "faults": "",
            "energy_budget_j": e_budget,
            "delay_budget_ms": per_cat,
            "over_budget": int(
                not calls
                or (e_budget is not None and energy is None)
                or not within_budget(energy, e_budget)
                or not within_budget(ms, None if per_cat is None else float(per_cat))
            ),
            **{f"policy.{k}": v for k, v in d.stats.items()},
        }
        crows = [
            call_row(rkey, c, self.s.edge.names[c.expert], len(it["context_ids"])) for c in calls
        ]
        self.tables["calls"].write_many(crows)
        self.tables["requests"].write(row)
        self.rows.append(row)
        self.calls.extend(crows)

    def _finish(self) -> None:
        """The trial's summary row (with its budgets and violations); marked completed."""
        s = self.s
        row = {**self.key, **summary_row(self.rows, [], self.calls)}
        e_budget, d_budget = budgets_of(self.policy)
        joules = [r["energy_devices_j"] for r in self.rows if r["energy_devices_j"] is not None]
        row.update(
            energy_per_request_j=statistics.fmean(joules) if joules else None,
            energy_budget_j=e_budget,
            delay_budget_ms=d_budget if isinstance(d_budget, (int, float)) else None,
            budget_violations=sum(int(r["over_budget"]) for r in self.rows),
        )
        self.tables["summary"].write(row)
        s.summaries.append(row)
        s.completed.add((self.t.index, self.rep))
        s.manifest["completed"].append([self.t.index, self.rep])
        s.recorder.save()


def combine_answers(calls: Sequence[Call], weights: Mapping[int, float]) -> int | None:
    """The option the answered calls' probabilities, weighted by their experts' ``weights``
    renormalised over them (equal when those sum to 0), make most likely; None when no call
    answered."""
    ok = [c for c in calls if c.reply.ok and c.reply.result]
    if not ok:
        return None
    w = [max(0.0, float(weights.get(c.expert, 0.0))) for c in ok]
    total = sum(w)
    w = [x / total for x in w] if total > 0 else [1.0 / len(ok)] * len(ok)
    probs = [softmax(c.reply.result) for c in ok]
    mix = [sum(wi * p[o] for wi, p in zip(w, probs)) for o in range(len(probs[0]))]
    return max(range(len(mix)), key=lambda o: (mix[o], -o))


def call_row(rkey: Mapping[str, Any], c: Call, name: str, tokens: int) -> dict[str, Any]:
    """The ``calls.csv`` row of one whole-model call (``layer`` -1, ``expert`` the model)."""
    r = c.reply
    return {
        **rkey,
        "step": 0,
        "layer": -1,
        "expert": name,
        "device": c.device,
        "attempt": 0,
        "tokens": tokens,
        "status": r.status,
        "detail": r.detail,
        "network_ms": r.network_ms,
        "queue_ms": r.queue_ms,
        "compute_ms": r.compute_ms,
        "rtt_ms": r.rtt_ms,
        "bytes_down": r.bytes_down,
        "bytes_up": r.bytes_up,
        "energy_j": r.energy_j,
        "energy_source": r.energy_source,
        "faults": "",
    }


def profile_round(per_cat: Mapping[int, list[dict]], r: int) -> list[tuple[int, dict]]:
    """Round ``r`` of the profile: the ``r``-th item of every category that has one."""
    return [(c, items[r]) for c, items in per_cat.items() if r < len(items)]


def manifest_entry(
    t: Trial,
    rep: int,
    policy: Any,
    names: Sequence[str],
    profile: RequestProfile,
    links: list[dict],
) -> dict[str, Any]:
    """The manifest's ``trials[]`` entry of a repeat with whole-model experts: the policy (and
    its plan), devices, links as tc enforced them, placement and the profile measured."""
    return {
        "trial": t.index,
        "repeat": rep,
        "point": t.point,
        "policy": policy.describe(),
        "devices": list(names),
        "links_enforced": links,
        "placement": {n: [d] for n, d in zip(profile.experts, profile.devices)},
        "edge_profile": {
            "energy_j": dict(zip(profile.experts, profile.energy_j)),
            "delay_ms": {
                n: dict(zip(profile.categories, row))
                for n, row in zip(profile.experts, profile.delay_ms)
            },
            "aggregation_ms": profile.aggregation_ms,
        },
    }
