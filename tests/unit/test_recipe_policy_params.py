"""Per-policy parameter tables: ``[policy.params.<name>]`` applies only to that policy's trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.policy.loading import load_policy
from testbed.run.decisions import check_model_and_policies
from testbed.run.recipe import load_recipe, recipe_from_dict
from testbed.run.twin import with_devices

ROOT = Path(__file__).resolve().parents[2]

SWEEP = """
[recipe]
name = "pp"
[policy]
name = "topk"
[policy.params]
placement = "random"
[policy.params.wdmoe-sel]
alpha = 0.6
placement = "round-robin"
[sweep]
"policy.name" = ["topk", "wdmoe-sel"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_sub_table_goes_to_its_policy_only_and_wins(tmp_path):
    rec = load_recipe(_write(tmp_path, SWEEP))
    topk, wd = rec.trials()
    assert topk.config["policy"]["params"] == {"placement": "random"}
    # per-policy keys are added and win over the plain keys of the same name
    assert wd.config["policy"]["params"] == {"placement": "round-robin", "alpha": 0.6}
    # what each trial's policy is built with (run, decisions, simulate use these params)
    for t in (topk, wd):
        load_policy(rec.policy_spec(t.policy), t.config["policy"]["params"], "x")
    p = load_policy(rec.policy_spec(wd.policy), wd.config["policy"]["params"], "x")
    assert (p.alpha, p.placement) == (0.6, "round-robin")
    assert p.describe()["alpha"] == 0.6  # what the trial records in the manifest
    check_model_and_policies(rec, rec.trials())  # what a run and simulate check first
    # the manifest's recipe keeps the tables as written
    assert rec.to_dict()["policy"]["params"]["wdmoe-sel"] == {
        "alpha": 0.6,
        "placement": "round-robin",
    }


def test_file_path_policy_keyed_as_written(tmp_path):
    text = f"""
[policy]
name = "topk"
[policy.params."{ROOT}/recipes/wdmoe.py:WDMoESelectionOnly"]
alpha = 0.7
[sweep]
"policy.name" = ["topk", "{ROOT}/recipes/wdmoe.py:WDMoESelectionOnly"]
"""
    rec = load_recipe(_write(tmp_path, text))
    topk, wd = rec.trials()
    assert topk.config["policy"]["params"] == {}
    assert wd.config["policy"]["params"] == {"alpha": 0.7}


def test_sub_table_of_a_policy_no_trial_runs_is_an_error(tmp_path):
    text = SWEEP.replace('["topk", "wdmoe-sel"]', '["topk", "top1"]')
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, text))
    line = (
        f"{tmp_path / 'r.toml'}: policy.params.wdmoe-sel: a table for a policy that no trial "
        "runs (policy.name and its sweep: top1, topk)"
    )
    assert str(e.value).splitlines() == [line]
    text = '[policy]\nname = "topk"\n[policy.params."x/y.py:Slow"]\nmin_kbit = 5\n'
    with pytest.raises(ConfigError, match=r'policy\.params\."x/y\.py:Slow": a table for a'):
        load_recipe(_write(tmp_path, text))


def test_sweep_of_a_per_policy_key_and_set(tmp_path):
    text = SWEEP + '"policy.params.wdmoe-sel.alpha" = [0.5, 0.9]\n'
    ts = load_recipe(_write(tmp_path, text)).trials()
    assert [t.config["policy"]["params"] for t in ts] == [
        {"placement": "random"},
        {"placement": "random"},
        {"placement": "round-robin", "alpha": 0.5},
        {"placement": "round-robin", "alpha": 0.9},
    ]
    rec = load_recipe(_write(tmp_path, SWEEP), ["policy.params.wdmoe-sel.alpha=0.4"])
    assert rec.trials()[1].config["policy"]["params"]["alpha"] == 0.4
    with pytest.raises(ConfigError, match=r"sweep: top1, topk"):
        load_recipe(
            _write(tmp_path, SWEEP.replace('"wdmoe-sel"]', '"top1"]')),
            ["sweep.policy.params.wdmoe-sel.alpha=[0.5]"],
        )


def test_table_valued_parameter_not_named_after_a_policy_stays_common(tmp_path):
    text = '[policy]\nname = "wdmoe"\n[policy.params.channel]\nbs_power_dbm = 40.0\n'
    t = load_recipe(_write(tmp_path, text)).trials()[0]
    assert t.config["policy"]["params"] == {"channel": {"bs_power_dbm": 40.0}}


ZIP = """
[policy]
name = "topk"
[sweep]
"links.rate" = ["2mbit", "20mbit"]
[sweep.zip]
"policy.name" = ["topk", "wdmoe-sel"]
"workload.requests" = [4, 8]
[policy.params.wdmoe-sel]
alpha = 0.6
"""


def test_zipped_sweep_is_one_axis_crossed_with_the_others(tmp_path):
    rec = load_recipe(_write(tmp_path, ZIP))
    ts = rec.trials()
    assert [t.label for t in ts] == [
        "links.rate=2mbit policy.name=topk workload.requests=4",
        "links.rate=2mbit policy.name=wdmoe-sel workload.requests=8",
        "links.rate=20mbit policy.name=topk workload.requests=4",
        "links.rate=20mbit policy.name=wdmoe-sel workload.requests=8",
    ]
    assert [t.config["workload"]["requests"] for t in ts] == [4, 8, 4, 8]
    assert [t.config["policy"]["params"] for t in ts[:2]] == [{}, {"alpha": 0.6}]
    assert list(rec.sweep) == ["links.rate", "policy.name", "workload.requests"]  # CSV columns
    # the manifest's recipe writes it back as written, and reads back to the same trials
    back = rec.to_dict()["sweep"]
    assert back == {
        "links.rate": ["2mbit", "20mbit"],
        "zip": {"policy.name": ["topk", "wdmoe-sel"], "workload.requests": [4, 8]},
    }
    again = recipe_from_dict({"sweep": back, "policy": {"params": {"wdmoe-sel": {}}}}, tmp_path)
    assert [t.label for t in again.trials()] == [t.label for t in ts]
    # --set sweep.K of a zipped key crosses it; a fixed --set drops it from the zip
    crossed = load_recipe(tmp_path / "r.toml", ["sweep.workload.requests=[1, 2]"]).trials()
    assert len(crossed) == 8
    fixed = load_recipe(tmp_path / "r.toml", ["workload.requests=3"]).trials()
    assert [t.label for t in fixed][:2] == [
        "links.rate=2mbit policy.name=topk",
        "links.rate=2mbit policy.name=wdmoe-sel",
    ]


def test_zipped_sweep_errors(tmp_path):
    text = ZIP.replace("[4, 8]", "[4, 8, 16]")
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, text))
    line = (
        f"{tmp_path / 'r.toml'}: sweep.zip: its lists must be equally long "
        "(got policy.name: 2, workload.requests: 3)"
    )
    assert str(e.value).splitlines() == [line]
    text = ZIP.replace('"workload.requests" = [4, 8]', '"links.rate" = ["1mbit", "2mbit"]')
    with pytest.raises(ConfigError, match=r"sweep\.zip\.links\.rate: also swept outside"):
        load_recipe(_write(tmp_path, text))
    text = ZIP.replace("[4, 8]", '[4, "x"]')
    with pytest.raises(ConfigError, match=r"r\.toml: sweep: workload\.requests: "):
        load_recipe(_write(tmp_path, text))


def test_simulate_devices_override_keeps_the_zip(tmp_path):
    rec = with_devices(load_recipe(_write(tmp_path, ZIP)), 4)
    ts = rec.trials()
    assert [t.config["workload"]["requests"] for t in ts] == [4, 8, 4, 8]
    assert {t.config["run"]["devices"] for t in ts} == {4}
