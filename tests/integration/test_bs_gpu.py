"""The BS part on a CUDA device (issue 20, item 7): the tiny model's answers equal the CPU's,
in float32 and in bfloat16, with the run's host boundary (the policy and the experts see host
tensors, the rows in the wire dtype); the manifest's ``bs_compute`` names the GPU. Skipped
without CUDA ("no CUDA device")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import tinytask as tt
from models.backend import LayerResult, LayerWork, LocalExpertBackend
from models.routing import RoutingContext, Selection, TopKSelection
from models.runtime import BaseStationModel
from testbed.lab.modelstore import resolve_split
from testbed.run.provenance import bs_compute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
N = 64


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_split("tiny")


@pytest.fixture(scope="module")
def cpu_answers(tiny: Path) -> list[list[int]]:
    return _answers(BaseStationModel.from_split_dir(tiny))


def _answers(bs: BaseStationModel) -> list[list[int]]:
    exs = tt.generate("heldout", N, seed=0)
    g = bs.generate_greedy([e.prompt for e in exs], tt.MAX_LEN + 1, tt.EOS_ID, tt.PAD_ID)
    return g.tokens


class _HostSpy:
    """Top-k routing and CPU experts that check they are handed host tensors."""

    def __init__(self, experts: LocalExpertBackend):
        self.experts = experts
        self.devices: set[str] = set()
        self.row_dtypes: set[torch.dtype] = set()

    def __call__(self, ctx: RoutingContext) -> Selection:
        self.devices |= {ctx.router_logits.device.type, ctx.router_probs.device.type}
        return TopKSelection()(ctx)

    def run_layer(self, work: LayerWork) -> LayerResult:
        self.devices |= {x.device.type for x in work.inputs.values()}
        self.row_dtypes |= {x.dtype for x in work.inputs.values()}
        return self.experts.run_layer(work)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_bs_gives_the_cpu_answers_through_the_host_boundary(tiny, cpu_answers, dtype):
    spy = _HostSpy(LocalExpertBackend.from_split_dir(tiny))
    bs = BaseStationModel.from_split_dir(
        tiny,
        backend=spy,
        policy=spy,
        device="cuda",
        dtype=dtype,
        wire_dtype="float32",
        host_boundary=True,
    )
    assert bs.device.type == "cuda" and bs.host_boundary and bs.backend is spy
    got = _answers(bs)
    assert spy.devices == {"cpu"} and spy.row_dtypes == {torch.float32}
    assert got == cpu_answers
    exs = tt.generate("heldout", N, seed=0)
    assert sum(list(g) == list(e.target) for g, e in zip(got, exs)) == N
    info = bs_compute(bs)
    assert info["device"] == "cuda:0" and info["dtype"] == dtype
    assert info["gpu"] == torch.cuda.get_device_name(0) and info["router_dtype"] == "float32"


def test_cuda_bs_with_its_experts_on_the_gpu_gives_the_cpu_answers(tiny, cpu_answers):
    bs = BaseStationModel.from_split_dir(tiny, device="cuda")  # local experts there too
    assert _answers(bs) == cpu_answers
