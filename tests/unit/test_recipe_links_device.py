"""Per-device link settings in recipes (``[links.device.<name or index>]``, issue 18 item 2):
parsing, precedence over the cell-wide keys, name and zero-based index resolution, errors
naming the file and the key, sweeps and ``--set``, the manifest's round trip, the run's check
before anything exists, and the twin's per-device rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.results import schema as R
from testbed.run.recipe import (
    LinkSettings,
    check_device_links,
    device_links_problems,
    load_recipe,
    recipe_from_dict,
)
from testbed.run.session import run_recipe

NAMES = ["dev1", "dev2", "dev3"]

BASE = """
[recipe]
name = "pd"
[links]
rate = "20mbit"
rate_up = "10mbit"
delay = "1ms"
loss = "0.5%"
"""


def _load(tmp_path: Path, text: str, sets: tuple[str, ...] = ()):
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    return load_recipe(p, sets)


def test_device_tables_parse_and_win_over_the_cell_keys(tmp_path):
    r = _load(
        tmp_path,
        BASE
        + '[links.device.dev2]\nrate_down = "2mbit"\nloss = "0%"\n'
        + '[links.device.2]\nrate = "500kbit"\ndelay = "0ms"\n',
    )
    assert r.config["links"]["device"] == {
        "dev2": {"rate_down": "2mbit", "loss": "0%"},
        "2": {"rate": "500kbit", "delay": "0ms"},
    }
    (t,) = r.trials()
    got = t.device_links(NAMES)
    assert list(got) == NAMES
    assert got["dev1"] == LinkSettings(20000.0, 10000.0, 1.0, 0.5)  # the cell's
    # dev2: its own rate_down and loss; up and delay the cell's
    assert got["dev2"] == LinkSettings(2000.0, 10000.0, 1.0, 0.0)
    # dev3 (index 2): its own rate both ways (over the cell's rate_up) and delay
    assert got["dev3"] == LinkSettings(500.0, 500.0, 0.0, 0.5)
    assert t.link_kbit() == (20000.0, 10000.0) and t.link_delay_loss() == (1.0, 0.5)


def test_rate_precedence_device_way_device_rate_cell_way_cell_rate(tmp_path):
    text = BASE.replace('rate_up = "10mbit"', 'rate_up = "10mbit"\nrate_down = "15mbit"')
    r = _load(
        tmp_path,
        text
        + '[links.device.dev1]\nrate = "3mbit"\nrate_up = "1mbit"\n'
        + '[links.device.dev2]\nrate = "4mbit"\n',
    )
    (t,) = r.trials()
    assert (t.link_for("dev1", 0).down_kbit, t.link_for("dev1", 0).up_kbit) == (3000.0, 1000.0)
    assert (t.link_for("dev2", 1).down_kbit, t.link_for("dev2", 1).up_kbit) == (4000.0, 4000.0)
    assert (t.link_for("dev3", 2).down_kbit, t.link_for("dev3", 2).up_kbit) == (15000.0, 10000.0)
    assert t.link_for("dev1", 0).spec("up").rate_kbit == 1000.0
    assert t.link_for("dev1", 0).spec("down").delay_ms == 1.0


def test_index_counts_from_zero_over_the_devices_order(tmp_path):
    r = _load(tmp_path, BASE + '[links.device.0]\nrate = "1mbit"\n[links.device.1]\nrate="2mbit"\n')
    (t,) = r.trials()
    got = t.device_links(["b", "a", "c"])  # the inventory's order, not the names' order
    assert [got[n].down_kbit for n in ("b", "a", "c")] == [1000.0, 2000.0, 20000.0]


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ('[links.device.dev2]\nrtae = "1mbit"\n', "links.device.dev2.rtae", "unknown key"),
        ('[links.device.dev2]\nrate = "fast"\n', "links.device.dev2.rate", "not a rate"),
        ("[links.device.dev2]\ndelay = 5\n", "links.device.dev2.delay", "time string"),
        ('[links.device.0]\nloss = "x"\n', "links.device.0.loss", "percent"),
        ("[links]\ndevice = 3\n", "links.device", "must be a table"),
        ('[links.device]\ndev2 = "1mbit"\n', "links.device.dev2", "must be a table"),
    ],
)
def test_bad_keys_and_values_are_named_with_the_file(tmp_path, extra, key, message):
    text = BASE + extra if not extra.startswith("[links]") else extra
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text)
    assert f"recipe.toml: {key}: " in str(ei.value) and message in str(ei.value), str(ei.value)


def test_devices_not_of_the_run_and_named_twice_are_errors_naming_the_keys():
    where = "recipe.toml"
    assert device_links_problems({"dev9": {}}, NAMES, where) == [
        "recipe.toml: links.device.dev9: no device 'dev9' (devices: dev1, dev2, dev3)"
    ]
    (idx,) = device_links_problems({"3": {}}, NAMES, where)
    assert idx.startswith("recipe.toml: links.device.3: no device at index 3") and "0..2" in idx
    assert device_links_problems({"2": {}, "dev1": {}}, NAMES, where) == []
    (both,) = device_links_problems({"dev2": {}, "1": {}}, NAMES, where)
    assert "links.device.dev2 and links.device.1" in both and "device dev2" in both


def test_the_check_covers_every_trial_and_link_for_refuses_a_device_named_twice(tmp_path):
    r = _load(tmp_path, BASE + '[sweep]\n"links.device.dev4.rate" = ["1mbit", "2mbit"]\n')
    with pytest.raises(ConfigError) as ei:
        check_device_links(r.trials(), lambda t: NAMES, str(r.path))
    assert str(ei.value).count("links.device.dev4: no device 'dev4'") == 1  # once, not per trial
    check_device_links(r.trials(), lambda t: [*NAMES, "dev4"], str(r.path))
    twice = _load(
        tmp_path, BASE + '[links.device.dev1]\nrate="1mbit"\n', ("links.device.0.rate=2mbit",)
    )
    with pytest.raises(ConfigError, match="links.device.dev1 and links.device.0"):
        twice.trials()[0].link_for("dev1", 0)


def test_sweep_and_set_per_device_keys(tmp_path):
    r = _load(
        tmp_path,
        BASE + '[sweep]\n"links.device.dev2.rate" = ["1mbit", "4mbit"]\n',
        ("links.device.0.delay=7ms", 'sweep.links.device.2.rate_up=["100kbit", "200kbit"]'),
    )
    ts = r.trials()
    assert [t.label for t in ts] == [
        "links.device.dev2.rate=1mbit links.device.2.rate_up=100kbit",
        "links.device.dev2.rate=1mbit links.device.2.rate_up=200kbit",
        "links.device.dev2.rate=4mbit links.device.2.rate_up=100kbit",
        "links.device.dev2.rate=4mbit links.device.2.rate_up=200kbit",
    ]
    rates = [[(x.down_kbit, x.up_kbit) for x in t.device_links(NAMES).values()] for t in ts]
    assert rates[3] == [(20000.0, 10000.0), (4000.0, 4000.0), (20000.0, 200.0)]
    assert rates[0][1] == (1000.0, 1000.0) and rates[1][2] == (20000.0, 200.0)
    assert all(t.link_for("dev1", 0).delay_ms == 7.0 for t in ts)
    assert all(t.link_for("dev2", 1).delay_ms == 1.0 for t in ts)
    # --set of a swept key fixes it
    fixed = _load(
        tmp_path,
        BASE + '[sweep]\n"links.device.dev2.rate" = ["1mbit", "4mbit"]\n',
        ("links.device.dev2.rate=3mbit",),
    )
    assert len(fixed.trials()) == 1 and fixed.trials()[0].link_for("dev2", 1).down_kbit == 3000.0
    with pytest.raises(ConfigError, match="--set: links.device.1.lost: unknown key"):
        _load(tmp_path, BASE, ("links.device.1.lost=1%",))
    with pytest.raises(ConfigError, match="links.device.1.rate: not a rate"):
        _load(tmp_path, BASE + '[sweep]\n"links.device.1.rate" = ["1mbit", "x"]\n')


def test_the_manifests_recipe_reads_the_same_trials_back(tmp_path):
    r = _load(
        tmp_path,
        BASE
        + '[links.device.1]\nrate = "2mbit"\n[sweep]\n"links.device.dev3.loss" = ["1%", "2%"]\n',
    )
    # what resume does with the manifest's recipe (JSON and back, None values dropped)
    rd = json.loads(json.dumps(r.to_dict()))
    path = Path(rd.pop("path"))
    raw = {
        t: ({k: v for k, v in b.items() if v is not None} if t != "sweep" else b)
        for t, b in rd.items()
    }
    again = recipe_from_dict(raw, path)
    assert [t.device_links(NAMES) for t in again.trials()] == [
        t.device_links(NAMES) for t in r.trials()
    ]
    assert again.trials()[1].link_for("dev3", 2).loss_pct == 2.0
    assert again.trials()[0].link_for("dev2", 1).down_kbit == 2000.0


def test_a_run_naming_a_missing_device_is_refused_before_anything_exists(tmp_path):
    """No inventory: the local testbed the run would create has dev1..dev3; dev9 is refused
    before the testbed or the run folder exist."""
    p = tmp_path / "recipe.toml"
    p.write_text(
        BASE
        + '[model]\npath = "tiny"\n[workload]\nrequests = 1\n[links.device.dev9]\nrate="1mbit"\n'
    )
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as ei:
        run_recipe(load_recipe(p), None, out)
    assert str(ei.value) == (
        f"{p}: links.device.dev9: no device 'dev9' (devices: dev1, dev2, dev3)"
    )
    assert not out.exists()


def test_the_twin_uses_each_devices_own_rates(tmp_path):
    from testbed.run.twin import simulate_recipe

    text = (
        '[recipe]\nname = "tw"\n[model]\npath = "tiny"\n[links]\nrate = "20mbit"\n'
        '[links.device.1]\nrate = "2mbit"\n[workload]\ntask = "tiny"\nrequests = 1\n'
        "[run]\ndevices = 2\n"
    )
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    res = simulate_recipe(load_recipe(p), out=tmp_path / "out")
    man = json.loads((res.run_dir / R.MANIFEST).read_text())
    assert man["trials"][0]["links_enforced"] == [
        {"device": "dev1", "down_kbit": 20000.0, "up_kbit": 20000.0},
        {"device": "dev2", "down_kbit": 2000.0, "up_kbit": 2000.0},
    ]
    p.write_text(text.replace("[links.device.1]", "[links.device.2]"))
    with pytest.raises(ConfigError, match=r"links.device.2: no device at index 2"):
        simulate_recipe(load_recipe(p), out=tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
