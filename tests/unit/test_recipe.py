"""Recipes (TOML → checked config + sweep grid) and the results writer."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.results import schema as R
from testbed.run.recipe import load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
[recipe]
name = "t"
seed = 3
repeats = 2
[model]
path = "tiny"
[policy]
name = "topk"
[policy.params]
placement = "random"
[links]
rate = "2mbit"
rate_up = "1mbit"
[workload]
requests = 4
[sweep]
"links.rate" = ["2mbit", "20mbit"]
"policy.name" = ["topk", "top1"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_good_recipe_grid_and_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    assert (r.name, r.seed, r.repeats) == ("t", 3, 2)
    ts = r.trials()
    assert [t.label for t in ts] == [
        "links.rate=2mbit policy.name=topk",
        "links.rate=2mbit policy.name=top1",
        "links.rate=20mbit policy.name=topk",
        "links.rate=20mbit policy.name=top1",
    ]
    assert ts[2].link_kbit() == (20000.0, 1000.0)  # rate_up stays fixed, rate is swept
    assert ts[1].policy == "top1" and ts[1].config["policy"]["params"] == {"placement": "random"}
    assert ts[0].config["run"]["timeout_s"] == 5.0  # default filled in
    assert ts[0].config["workload"]["task"] == "tiny"


def test_every_problem_named_with_file_and_key(tmp_path):
    p = _write(
        tmp_path,
        GOOD.replace('rate_up = "1mbit"', 'rate_up = "fast"\nburst = 3').replace(
            "requests = 4", 'requests = 0\ntask = "chess"'
        )
        + '"nope.x" = [1]\n"links.loss" = []\n',
    )
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    probs = ei.value.problems
    assert len(probs) == 6, probs
    assert all(x.startswith(str(p)) for x in probs)
    joined = "\n".join(probs)
    for needle in (
        "links.rate_up",
        "links.burst: unknown key",
        "workload.requests",
        "workload.task",
        "nope.x: unknown table",
        "sweep.links.loss: must be a non-empty list",
    ):
        assert needle in joined, needle


def test_unknown_table_bad_toml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"r.toml: trainer: unknown table"):
        load_recipe(_write(tmp_path, "[trainer]\nx = 1\n"))
    with pytest.raises(ConfigError, match=r"r.toml: not valid TOML"):
        load_recipe(_write(tmp_path, "[recipe\n"))
    with pytest.raises(ConfigError, match=r"no such recipe file"):
        load_recipe(tmp_path / "missing.toml")


def test_overrides(tmp_path):
    p = _write(tmp_path, GOOD)
    r = load_recipe(p, ["workload.requests=7", 'links.rate="5mbit"', 'sweep.policy.name=["top1"]'])
    ts = r.trials()
    assert len(ts) == 1 and ts[0].config["workload"]["requests"] == 7
    assert ts[0].link_kbit()[0] == 5000.0 and ts[0].policy == "top1"
    assert parse_override("links.rate=2mbit") == ("links.rate", "2mbit")
    assert parse_override("workload.requests=3") == ("workload.requests", 3)
    with pytest.raises(ConfigError, match=r"--set: workload.requests: must be an integer"):
        load_recipe(p, ["workload.requests=-1"])
    with pytest.raises(ConfigError, match=r"--set: 'oops': expected key=value"):
        load_recipe(p, ["oops"])


def test_packaged_compare_recipe_is_valid():
    r = load_recipe(ROOT / "recipes" / "compare.toml")
    pols = {t.policy for t in r.trials()}
    cells = {t.config["links"]["bandwidth_mhz"] for t in r.trials()}
    assert pols == {"topk", "top1", "wdmoe", "coel"} and len(cells) == 2
    assert r.model_spec() == "tiny-4096" and r.wire_dtype == "bfloat16"  # 8 KiB a token each way
    assert all(t.config["policy"]["epoch"] == "layer" for t in r.trials())
    # CoEL must spread and compress the experts (50.3 MB in float32 over 4 devices)
    assert 4 * r.config["run"]["memory_budget_mb"] < 50.3


def test_packaged_wdmoe_recipe_sweeps_bandwidth_devices_and_policies():
    r = load_recipe(ROOT / "recipes" / "wdmoe.toml")
    ts = r.trials()
    assert {t.policy for t in ts} == {
        "topk",
        "top1",
        "wdmoe",
        "wdmoe-conf",
        "wdmoe-sel",
        "wdmoe-bw",
    }
    # the paper's operating point: 10-100 MHz cells, 2-8 devices, 8 KiB tokens, per-layer epochs
    cells = {t.config["links"]["bandwidth_mhz"] for t in ts}
    assert len(cells) >= 2 and min(cells) >= 10.0 and max(cells) <= 100.0
    devs = {t.config["run"]["devices"] for t in ts}
    assert len(devs) >= 2 and min(devs) >= 2 and max(devs) <= 8
    assert r.model_spec() == "tiny-4096" and r.wire_dtype == "bfloat16"
    assert all(t.config["policy"]["epoch"] == "layer" for t in ts)


def test_epoch_trace_bandwidth_keys_checked_and_trace_resolved(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[policy]\nepoch = "token"\n[links]\nbandwidth_mhz = 0\n')
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert any("policy.epoch: must be one of step, layer, request" in m for m in e.value.problems)
    assert any("links.bandwidth_mhz: must be a number > 0" in m for m in e.value.problems)
    p.write_text('[links]\ntrace = "tr.csv"\n')
    r = load_recipe(p)
    assert r.trace_path(r.trials()[0]) == (tmp_path / "tr.csv").resolve()
    assert r.trials()[0].config["run"]["devices"] is None  # default: the whole inventory


def test_devices_power_mode_by_name_or_id_swept_and_checked(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[devices]\npower_mode = "MAXN"\n')
    assert load_recipe(p).trials()[0].config["devices"]["power_mode"] == "MAXN"
    assert (
        load_recipe(tmp_path / "r.toml", ["devices.power_mode=2"])
        .trials()[0]
        .config["devices"]["power_mode"]
        == 2
    )
    p.write_text('[sweep]\n"devices.power_mode" = ["MAXN", "MODE_15W", 3]\n')
    assert [t.config["devices"]["power_mode"] for t in load_recipe(p).trials()] == [
        "MAXN",
        "MODE_15W",
        3,
    ]
    p.write_text('[recipe]\nname = "x"\n')
    assert load_recipe(p).trials()[0].config["devices"]["power_mode"] is None  # left as it is
    p.write_text(
        '[devices]\npower_mode = -1\nfan = "max"\n[sweep]\n"devices.power_mode" = [true]\n'
    )
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    probs = e.value.problems
    assert len(probs) == 3 and all(x.startswith(str(p)) for x in probs), probs
    assert any(
        "devices.power_mode: must be an nvpmodel mode name" in x and "-1" in x for x in probs
    )
    assert any("devices.fan: unknown key (valid in [devices]: power_mode)" in x for x in probs)
    assert any("sweep: devices.power_mode: must be an nvpmodel mode name" in x for x in probs)


def test_csv_table_flushes_each_row_and_rejects_unknown_columns(tmp_path):
    path = tmp_path / "x.csv"
    t = R.CsvTable(path, R.CALL_COLUMNS, ["sweep.links.rate"])
    t.write(
        {
            "run_id": "r",
            "trial": 0,
            "expert": "L0.E1",
            "network_ms": 1.23456789,
            "compute_ms": None,
            "sweep.links.rate": "2mbit",
            "tokens": float("nan"),
        }
    )
    # readable before close: the row is on disk
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["expert"] == "L0.E1" and rows[0]["network_ms"] == "1.234568"
    assert rows[0]["compute_ms"] == "" and rows[0]["tokens"] == ""
    assert rows[0]["sweep.links.rate"] == "2mbit"
    with pytest.raises(ValueError):
        t.write({"no_such_column": 1})
    t.close()
    # re-opening appends without a second header
    with R.CsvTable(path, R.CALL_COLUMNS, ["sweep.links.rate"]) as t2:
        t2.write({"run_id": "r2"})
    assert [r["run_id"] for r in R.read_csv(path)] == ["r", "r2"]


def test_csv_table_write_many_with_shared_cells_writes_what_whole_rows_would(tmp_path):
    """A link epoch's rows share every cell but the device's: formatted once, same file."""
    common = {
        "run_id": "r",
        "trial": 3,
        "time_s": 1.23456789,
        "change_ms": float("nan"),
        "tc_slower": True,
        "epoch_scope": None,
    }
    rows = [
        {"device": f"dev{i}", "asked_down_kbit": 1000.0 / (i + 1), "enforced_up_kbit": i}
        for i in range(5)
    ]
    with R.CsvTable(tmp_path / "a.csv", R.LINK_COLUMNS, ["sweep.x"]) as a:
        a.write_many([{**common, **r} for r in rows])
    with R.CsvTable(tmp_path / "b.csv", R.LINK_COLUMNS, ["sweep.x"]) as b:
        b.write_many(rows, common)
        with pytest.raises(ValueError, match="no_such"):
            b.write_many([{"device": "x", "no_such": 1}], common)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    got = R.read_csv(tmp_path / "b.csv")
    assert [r["device"] for r in got] == [f"dev{i}" for i in range(5)]
    assert got[1]["asked_down_kbit"] == "500.0" and got[0]["time_s"] == "1.234568"
    assert got[0]["tc_slower"] == "1" and got[0]["change_ms"] == "" == got[0]["epoch_scope"]
