"""Recipe keys of the channel model (``[links.channel]``): defaults filled in and recorded, a
partial table merged, sweeps and ``--set`` per key, every bad key named on one line, keys checked
against each other at every sweep point, and the table building the runner's channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.net.channel import CHANNEL_DEFAULTS, ChannelModel
from testbed.run.recipe import load_recipe

BASE = '[recipe]\nname = "ch"\n[links]\nbandwidth_mhz = 20.0\n'


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(BASE + body)
    return p


def test_defaults_filled_in_and_a_partial_table_merged(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, ""))
    assert r.trials()[0].config["links"]["channel"] == CHANNEL_DEFAULTS
    r = load_recipe(_write(tmp_path, '[links.channel]\nbs_power_dbm = 43\nfading = "rician"\n'))
    ch = r.trials()[0].config["links"]["channel"]
    assert ch == {**CHANNEL_DEFAULTS, "bs_power_dbm": 43, "fading": "rician"}
    assert r.to_dict()["links"]["channel"] == ch  # the manifest records all of it
    model = ChannelModel(["dev1", "dev2"], r.seed, **ch)  # as the runner builds it
    assert model.params == ch and model.power_w["down"] == pytest.approx(10**1.3)


def test_sweep_and_set_per_key(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        '[sweep]\n"links.channel.shadowing_db" = [4.0, 8.0]\n'
        '"links.bandwidth_mhz" = [20.0, 100.0]\n',
    )
    ts = load_recipe(p).trials()
    assert len(ts) == 4
    assert [t.config["links"]["channel"]["shadowing_db"] for t in ts] == [4.0, 4.0, 8.0, 8.0]
    assert all(set(t.config["links"]["channel"]) == set(CHANNEL_DEFAULTS) for t in ts)
    assert ts[0].label == "links.channel.shadowing_db=4.0 links.bandwidth_mhz=20.0"
    r = load_recipe(p, ["links.channel.shadowing_db=6", "links.channel.se_model=shannon"])
    assert {t.config["links"]["channel"]["shadowing_db"] for t in r.trials()} == {6}
    assert r.trials()[0].config["links"]["channel"]["se_model"] == "shannon"


@pytest.mark.parametrize(
    "body, overrides, message",
    [
        (
            '[links.channel]\nbs_power_dbm = "46dBm"\n',
            [],
            "links.channel.bs_power_dbm: must be a finite number (dBm), not '46dBm'",
        ),
        ("[links.channel]\nradius = 5\n", [], "links.channel.radius: unknown channel parameter"),
        (
            '[links.channel]\nfading = "nakagami"\n',
            [],
            "links.channel.fading: must be one of rayleigh, rician, none, not 'nakagami'",
        ),
        ("[links.channel]\ncqi_table = 3\n", [], "links.channel.cqi_table: must be one of 1, 2"),
        ('[links.channel]\nse_model = "mcs"\n', [], "links.channel.se_model: must be one of"),
        ("[links.channel]\nshadowing_db = -2\n", [], "links.channel.shadowing_db: must be >= 0"),
        (
            "[links.channel]\nmin_distance_m = 300.0\n",
            [],
            "links.channel.min_distance_m: must be <= cell_radius_m (200), not 300.0",
        ),
        (
            '[sweep]\n"links.channel.cell_radius_m" = [200.0, 30.0]\n',
            [],
            (
                "links.channel.min_distance_m: must be <= cell_radius_m (30), not 35.0 "
                "(sweep point links.channel.cell_radius_m=30.0)"
            ),
        ),
        (
            '[sweep]\n"links.channel.snr_gap_db" = [0.0, -1.0]\n',
            [],
            "sweep: links.channel.snr_gap_db: must be >= 0",
        ),
        (
            "",
            ["links.channel.power_split=even"],
            "--set: links.channel.power_split: must be one of bandwidth, none",
        ),
        ("", ["links.channel.a.b=1"], "--set: links.channel.a.b: unknown channel parameter"),
        ("", ["links.channel=5"], "--set: links.channel: must be a table of channel parameters"),
    ],
)
def test_bad_channel_keys_named_on_one_line(
    tmp_path: Path, body: str, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as ei:
        load_recipe(_write(tmp_path, body), overrides)
    problems = ei.value.problems
    assert len(problems) == 1 and message in problems[0] and "\n" not in problems[0], problems
    where = "--set" if overrides else str(tmp_path / "r.toml")
    assert problems[0].startswith(where)
