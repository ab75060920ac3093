"""The typed policy API: the read-only cluster view, typed parameters, Selection.drop, what a
Decision adds to layers.csv (policy_predicted_ms, policy.* columns) and the CSV table that
grows those columns."""

from __future__ import annotations

import csv
from typing import Literal

import numpy as np
import pytest
import torch

from models.routing import RoutingContext, Selection
from testbed import ROOT
from testbed.errors import ConfigError, PolicyFailed
from testbed.policy import ClusterState, ClusterView, Decision, Policy
from testbed.results import schema as R
from testbed.results.rows import layer_row
from testbed.run.decisions import decision_notes


def test_view_is_read_only_and_follows_its_state():
    st = ClusterState(placement={"L0.E0": ("d1", "d2")}, rate_down_kbit={"d1": 100.0})
    view = ClusterView(st)
    assert view.device_of(0, 0) == "d1" and view.devices_of("L0.E0") == ("d1", "d2")
    assert view.device_of(0, 1) is None and view.layer_devices(0, 2) == ["d1", None]
    with pytest.raises(AttributeError, match="read-only"):
        view.step = 3
    with pytest.raises(TypeError):
        view.rate_down_kbit["d1"] = 5.0  # a mapping proxy
    with pytest.raises(TypeError):
        view.placement["L0.E1"] = ("d1",)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = view.nope
    st.rate_down_kbit["d1"] = 50.0  # the framework writes the state; the view shows it
    st.step, st.request = 4, 2
    assert view.rate_down_kbit["d1"] == 50.0 and (view.step, view.request) == (4, 2)


def test_static_view_rates_per_direction_and_device():
    v = ClusterView.static(["a", "b"], {"L1.E0": ["b"]}, {"a": 10.0, "b": 20.0}, 5.0)
    assert dict(v.rate_down_kbit) == {"a": 10.0, "b": 20.0}
    assert dict(v.rate_up_kbit) == {"a": 5.0, "b": 5.0}
    assert v.names == ("a", "b") and v.device_of(1, 0) == "b"
    same = ClusterView.static(["a"], bytes_per_token=8192)
    assert same.rate_up_kbit["a"] == same.rate_down_kbit["a"] == 20_000.0
    assert same.bytes_per_token == 8192 and same.epoch_scope == "layer"


class _Typed(Policy):
    name = "typed"

    def __init__(
        self,
        min_kbit: float = 500.0,
        keep: int = 1,
        verbose: bool = False,
        mode: Literal["a", "b"] = "a",
        layers: list[int] | None = None,
        **kw,
    ):
        super().__init__(**kw)
        self.min_kbit, self.keep, self.verbose, self.mode, self.layers = (
            min_kbit,
            keep,
            verbose,
            mode,
            layers,
        )

    def select(self, ctx, cluster):
        raise AssertionError("not called")


def test_typed_parameters_accept_what_fits():
    p = _Typed.from_params({"min_kbit": 300, "keep": 2, "mode": "b", "layers": [0, 1]})
    assert (p.min_kbit, p.keep, p.mode, p.layers) == (300, 2, "b", [0, 1])
    assert _Typed.from_params({"layers": None, "seed": 4, "placement": "random"}).seed == 4


@pytest.mark.parametrize(
    "params, msg",
    [
        ({"min_kbit": "fast"}, r"policy\.params\.min_kbit: expected float, got str 'fast'"),
        ({"keep": 1.5}, r"policy\.params\.keep: expected int, got float"),
        ({"keep": True}, r"policy\.params\.keep: expected int, got bool"),
        ({"verbose": 1}, r"policy\.params\.verbose: expected bool, got int"),
        ({"mode": "c"}, r"policy\.params\.mode: expected"),
        ({"layers": [0, "x"]}, r"policy\.params\.layers: expected"),
        ({"seed": "0"}, r"policy\.params\.seed: expected int"),
    ],
)
def test_typed_parameters_refuse_the_wrong_type_by_name(params, msg):
    with pytest.raises(ConfigError, match=msg):
        _Typed.from_params(params)


def test_selection_drop_empties_slots_and_keeps_each_tokens_weight():
    s = Selection(torch.tensor([[3, 1], [2, -1]]), torch.tensor([[0.6, 0.4], [1.0, 0.0]]))
    d = s.drop(torch.tensor([[False, True], [True, False]]))
    assert d.expert_ids.tolist() == [[3, -1], [-1, -1]]
    assert d.weights.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    raw = s.drop(torch.tensor([[True, False], [False, False]]), renormalize=False)
    assert raw.expert_ids.tolist() == [[-1, 1], [2, -1]]
    assert raw.weights[0].tolist() == pytest.approx([0.0, 0.4])


def _ctx():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    return RoutingContext(0, 0, logits, torch.softmax(logits, -1), 2, True)


def test_decision_notes_carry_prediction_and_stats():
    from recipes.baselines import TopK

    d = Decision(TopK().select(_ctx(), ClusterView.static(["a"])).selection)
    assert decision_notes(TopK(), d) == {}
    d = Decision(d.selection, predicted_ms=3, stats={"dropped": 2, "why": "slow", "x.y": 1.5})
    notes = decision_notes(TopK(), d)
    assert notes["policy_predicted_ms"] == 3.0
    assert notes["policy_stats"] == {"dropped": 2, "why": "slow", "x.y": 1.5}
    for bad in ({"a b": 1}, {"": 1}, {"ok": [1, 2]}):
        with pytest.raises(PolicyFailed, match="Decision.stats"):
            decision_notes(TopK(), Decision(d.selection, stats=bad))


class _Rec:
    """A layer record as the BS runtime gives it (only what layer_row reads)."""

    def __init__(self, info):
        self.info, self.step, self.phase, self.layer = info, 0, "prefill", 0
        self.token_valid = np.ones(1)
        self.expert_ids = np.array([[0, -1]])
        self.failed, self.rows_per_uid = (), {"L0.E0": 1}


def test_layer_row_turns_stats_into_policy_columns():
    row = layer_row({"run_id": "r"}, _Rec({"policy_stats": {"dropped": 2}}), [], 1.0, (0, 0))
    assert row["policy.dropped"] == 2
    assert not [k for k in layer_row({}, _Rec({}), [], 1.0, (0, 0)) if k.startswith("policy.")]


def test_csv_table_grows_policy_columns_and_keeps_them_on_resume(tmp_path):
    path = tmp_path / "layers.csv"
    with R.CsvTable(path, ("a", "b"), ("sweep.x",), R.POLICY_PREFIX) as t:
        t.write({"a": 1})
        t.write_many([{"a": 2, "policy.dropped": 3}, {"a": 3, "policy.why": "slow"}])
        with pytest.raises(ValueError, match="'c'"):
            t.write({"c": 1})  # a typo outside the prefix is still an error
    with R.CsvTable(path, ("a", "b"), ("sweep.x",), R.POLICY_PREFIX) as t:
        t.write({"a": 4, "policy.why": "again"})
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["a", "b", "sweep.x", "policy.dropped", "policy.why"]
    assert [(r["a"], r["policy.dropped"], r["policy.why"]) for r in rows] == [
        ("1", "", ""),
        ("2", "3", ""),
        ("3", "", "slow"),
        ("4", "", "again"),
    ]
    with R.CsvTable(tmp_path / "plain.csv", ("a",)) as t, pytest.raises(ValueError):
        t.write({"policy.x": 1})  # without the prefix nothing grows


def test_example_policy_drops_only_extra_experts_behind_a_slow_link():
    from recipes.examples.slowlink import SlowLink
    from testbed.policy import load_policy

    pol = load_policy(str(ROOT / "recipes/examples/slowlink.py") + ":SlowLink", {"min_kbit": 500})
    assert isinstance(pol, Policy) and pol.min_kbit == 500
    placement = {f"L0.E{e}": (f"d{e % 2}",) for e in range(4)}  # d0: experts 0, 2
    view = ClusterView.static(["d0", "d1"], placement, {"d0": 100.0, "d1": 10_000.0})
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [0.0, 3.0, 2.0, 1.0]])
    ctx = RoutingContext(0, 0, logits, torch.softmax(logits, -1), 2, True)
    d = SlowLink(min_kbit=500).select(ctx, view)
    # top-2: [0, 1], [2, 3], [1, 2]: only token 2's second expert (2, on slow d0) goes
    assert d.selection.expert_ids.tolist() == [[0, 1], [2, 3], [1, -1]]
    assert d.stats == {"dropped": 1}
    assert d.selection.weights[2].tolist() == pytest.approx([1.0, 0.0])
    fast = SlowLink(min_kbit=50).select(ctx, view)
    assert fast.stats == {"dropped": 0} and (fast.selection.expert_ids >= 0).all()


def test_review_fixes_view_hints_scalars_and_common_cells(tmp_path):
    # a subclass annotation that does not resolve (a TYPE_CHECKING-only name) leaves only that
    # parameter unchecked; the subclass's own `seed: float` wins over Policy's int
    from testbed.policy import load_policy_class

    (tmp_path / "b.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from testbed.policy import Policy\n"
        "if TYPE_CHECKING:\n    from pathlib import Path\n"
        "class B(Policy):\n"
        "    def __init__(self, seed: float = 0.5, p: Path | None = None, k: int = 1):\n"
        "        super().__init__(seed=0)\n"
        "        self.k = k\n"
        "    def select(self, ctx, cluster):\n        raise AssertionError\n"
    )
    ns = {"B": load_policy_class(f"{tmp_path / 'b.py'}:B")}
    assert ns["B"].from_params({"seed": 0.25, "p": "x"}).k == 1
    with pytest.raises(ConfigError, match="k: expected int"):
        ns["B"].from_params({"k": "two"})
    # the status view is read-only all the way down; the placement proxy is stable
    st = ClusterState(placement={"L0.E0": ("a",)}, devices={"a": {"mem": 1}})
    view = ClusterView(st)
    with pytest.raises(TypeError):
        view.devices["a"]["mem"] = 99
    assert view.placement is view.placement
    first = view.placement
    st.placement = {"L0.E0": ("b",)}  # an update's new placement: a new proxy
    assert view.placement is not first and view.device_of(0, 0) == "b"
    # numpy and torch scalars are taken as numbers
    from recipes.baselines import TopK

    sel = Selection(torch.tensor([[0]]), torch.tensor([[1.0]]))
    notes = decision_notes(TopK(), Decision(sel, stats={"n": np.int64(3), "t": torch.tensor(2)}))
    assert notes["policy_stats"] == {"n": 3, "t": 2}
    assert type(notes["policy_stats"]["t"]) is int
    # a new policy.* key among write_many's common cells grows the table too
    with R.CsvTable(tmp_path / "l.csv", ("a",), (), R.POLICY_PREFIX) as t:
        t.write_many([{"a": 1}], common={"policy.z": 5})
    assert (tmp_path / "l.csv").read_text().splitlines() == ["a,policy.z", "1,5"]
