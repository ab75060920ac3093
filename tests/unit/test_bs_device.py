"""The BS part on a device and in a dtype (issue 20, item 7): ``run.bs_device``/``run.bs_dtype``
parsed and checked against this host before anything is touched, the refusal of a sweep over
them, the manifest's ``bs_compute``, and a bfloat16 BS on the CPU: router and MoE blocks in
float32, the wire in its own dtype, the same answers as the float32 BS on the tiny task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import tinytask as tt
from models.backend import LayerResult, LayerWork
from models.moe_block import SplitMoEBlock
from models.routing import RoutingContext, Selection, TopKSelection
from models.runtime import BaseStationModel, HostBackend, HostPolicy, device_problem
from testbed.errors import ConfigError
from testbed.lab.modelstore import resolve_split
from testbed.run.provenance import bs_compute
from testbed.run.recipe import check_bs_compute, load_recipe

torch.set_num_threads(2)


def _recipe(tmp_path: Path, run: str = "", extra: str = "") -> Path:
    p = tmp_path / "r.toml"
    p.write_text(f'[recipe]\nname = "r"\n[run]\n{run}\n{extra}', encoding="utf-8")
    return p


def test_bs_keys_default_to_cpu_float32_and_accept_cuda_n_and_short_dtypes(tmp_path):
    r = load_recipe(_recipe(tmp_path))
    assert (r.bs_device, r.bs_dtype) == ("cpu", "float32")
    r = load_recipe(_recipe(tmp_path, 'bs_device = "cuda:1"\nbs_dtype = "bf16"'))
    assert (r.bs_device, r.bs_dtype) == ("cuda:1", "bfloat16")
    r = load_recipe(_recipe(tmp_path), ["run.bs_device=cuda", "run.bs_dtype=float16"])
    assert (r.bs_device, r.bs_dtype) == ("cuda", "float16")
    assert r.to_dict()["run"]["bs_dtype"] == "float16"  # the manifest's recipe has them


@pytest.mark.parametrize(
    "line, key, words",
    [
        ('bs_device = "gpu"', "run.bs_device", 'must be "cpu", "cuda" or "cuda:N"'),
        ('bs_device = "cuda:x"', "run.bs_device", "not 'cuda:x'"),
        ('bs_device = "cuda:"', "run.bs_device", "not 'cuda:'"),
        ("bs_device = 0", "run.bs_device", "not 0"),
        ('bs_dtype = "int8"', "run.bs_dtype", "must be one of float32, bfloat16, float16"),
    ],
)
def test_bad_bs_values_name_the_file_and_key(tmp_path, line, key, words):
    path = _recipe(tmp_path, line)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert f"{path}: {key}: " in str(e.value) and words in str(e.value)


def test_bs_keys_cannot_be_swept(tmp_path):
    path = _recipe(tmp_path, extra='[sweep]\n"run.bs_dtype" = ["float32", "bfloat16"]\n')
    with pytest.raises(ConfigError, match=r"sweep.run.bs_dtype: the BS model is loaded once"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"--set: sweep.run.bs_device: the BS model is loaded"):
        load_recipe(_recipe(tmp_path), ['sweep.run.bs_device=["cpu", "cuda"]'])


def test_a_cuda_device_this_host_lacks_is_refused_naming_the_recipe_and_key(tmp_path):
    check_bs_compute(load_recipe(_recipe(tmp_path)))  # cpu: nothing to check
    path = _recipe(tmp_path, 'bs_device = "cuda:99"')
    with pytest.raises(ConfigError) as e:
        check_bs_compute(load_recipe(path))
    msg = str(e.value)
    if torch.cuda.is_available():
        assert f"{path}: run.bs_device: 'cuda:99' but this BS has " in msg
    else:
        want = f"{path}: run.bs_device: 'cuda:99' but torch.cuda.is_available() is False on this BS"
        assert msg.startswith(want), msg
    assert device_problem("cpu", torch.bfloat16) is None


def test_a_run_refuses_a_missing_cuda_device_before_any_run_folder(tmp_path):
    from testbed.run.session import run_recipe

    dev = "cuda:99" if torch.cuda.is_available() else "cuda"  # a device this host lacks
    rec = tmp_path / "r.toml"
    rec.write_text('[recipe]\nname = "r"\n[workload]\nrequests = 1\n', encoding="utf-8")
    out = tmp_path / "results"
    recipe = load_recipe(rec, [f"run.bs_device={dev}"])
    with pytest.raises(ConfigError) as e:  # the inventory is never read: it does not exist
        run_recipe(recipe, tmp_path / "no-inventory.toml", out)
    why = "this BS has 1" if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    assert str(e.value).startswith(f"{rec}: run.bs_device: '{dev}' but {why}")
    assert "\n" not in str(e.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_split("tiny")


class _Spy:
    """A policy (the family's top-k) and a backend wrapper that note the dtypes they see."""

    def __init__(self, inner=None):
        self.inner = inner
        self.logit_dtypes: set[torch.dtype] = set()
        self.row_dtypes: set[torch.dtype] = set()

    def __call__(self, ctx: RoutingContext) -> Selection:
        self.logit_dtypes.add(ctx.router_logits.dtype)
        assert ctx.router_probs.dtype == torch.float32
        return TopKSelection()(ctx)

    def run_layer(self, work: LayerWork) -> LayerResult:
        self.row_dtypes |= {x.dtype for x in work.inputs.values()}
        return self.inner.run_layer(work)


def _answers(bs: BaseStationModel, n: int) -> list[list[int]]:
    exs = tt.generate("heldout", n, seed=0)
    g = bs.generate_greedy([e.prompt for e in exs], tt.MAX_LEN + 1, tt.EOS_ID, tt.PAD_ID)
    return g.tokens


def test_bfloat16_bs_on_the_cpu_routes_in_float32_and_answers_as_float32(tiny):
    ref = BaseStationModel.from_split_dir(tiny)
    bf = BaseStationModel.from_split_dir(tiny, dtype="bfloat16", wire_dtype="float32")
    spy = _Spy(bf.backend)
    bf.policy, bf.backend = spy, spy
    assert bf.dtype == torch.bfloat16 and ref.dtype == torch.float32
    blocks = [m for m in bf.model.modules() if isinstance(m, SplitMoEBlock)]
    assert blocks and all(b.gate.weight.dtype == torch.float32 for b in blocks)
    assert bf.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    inv = [b for n, b in bf.model.named_buffers() if n.endswith("inv_freq")]
    assert inv and all(b.dtype == torch.float32 for b in inv)
    n = 8
    got, want = _answers(bf, n), _answers(ref, n)
    assert spy.logit_dtypes == {torch.float32}  # router logits in float32, not bfloat16
    assert spy.row_dtypes == {torch.float32}  # the wire keeps its own dtype
    exs = tt.generate("heldout", n, seed=0)
    assert got == want  # measured: 256 of 256 held-out answers equal, exact match 1.0 both
    assert sum(list(g) == list(e.target) for g, e in zip(got, exs)) == n
    assert bs_compute(bf) == {
        "device": "cpu",
        "dtype": "bfloat16",
        "router_dtype": "float32",
        "torch_threads": torch.get_num_threads(),
    }
    # no wire dtype given: the rows go in the BS model's dtype (as documented)
    assert BaseStationModel.from_split_dir(tiny, dtype="bf16").controller.wire_dtype == (
        torch.bfloat16
    )


def test_host_boundary_is_a_no_op_on_the_cpu_and_its_wrappers_hand_over_host_tensors(tiny):
    bs = BaseStationModel.from_split_dir(tiny, host_boundary=True)
    assert not bs.host_boundary and not isinstance(bs.controller.backend, HostBackend)
    spy = _Spy(bs.backend)
    wrapped = HostBackend(spy, torch.device("cpu"))
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    res = wrapped.run_layer(LayerWork(0, 0, {"L0.E1": x}))
    assert spy.row_dtypes == {torch.bfloat16} and res.outputs["L0.E1"].shape == (2, 64)
    probs = torch.softmax(torch.randn(3, 8), -1)
    ctx = RoutingContext(0, 0, probs.log(), probs, 2, True, None)
    sel = HostPolicy(spy, torch.device("cpu"))(ctx)
    assert sel.expert_ids.shape == (3, 2) and spy.logit_dtypes == {torch.float32}


def test_bs_threads_default_to_one_on_the_local_testbed_only():
    """``run.bs_threads`` wins; else 1 where every device is a namespace of this host (their
    agents share its cores), else torch's default (None)."""
    from types import SimpleNamespace as NS

    from testbed.run.session import bs_threads

    local = NS(devices=[NS(hw_class="netns"), NS(hw_class="netns")])
    lab = NS(devices=[NS(hw_class="orin-agx"), NS(hw_class="netns")])
    assert bs_threads({"run": {}}, local) == 1
    assert bs_threads({"run": {"bs_threads": 4}}, local) == 4
    assert bs_threads({"run": {}}, lab) is None
    assert bs_threads({"run": {"bs_threads": 2}}, lab) == 2
    assert bs_threads({"run": {}}, None) is None
