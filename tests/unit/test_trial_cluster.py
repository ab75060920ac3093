"""The cluster state a trial's policy decides on: a device that holds no expert (so the
profiling step made no profile of it) is in the trial, without a compute profile; a policy
placing nothing on a device once crashed the run here with ``KeyError: 'dev1'``."""

from __future__ import annotations

from pathlib import Path

from testbed.run.cluster import trial_cluster
from testbed.run.recipe import load_recipe


def test_a_device_without_a_profile_is_in_the_trial_without_one(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('[model]\npath = "tiny"\n[links]\nrate = "20mbit"\n')
    (t,) = load_recipe(p).trials()
    rates = [
        {"device": d, "down_kbit": 20000.0, "up_kbit": 20000.0} for d in ("dev1", "dev2", "dev3")
    ]
    st = trial_cluster(
        t,
        0,
        {"L0.E0": ("dev2",), "L0.E1": ("dev3",)},
        rates,
        ("dev1", "dev2", "dev3"),
        {"dev2": (0.5, 0.02), "dev3": (0.7, 0.03)},
        256,
    )
    assert st.names == ("dev1", "dev2", "dev3")
    assert st.compute_profile == {"dev2": (0.5, 0.02), "dev3": (0.7, 0.03)}
    assert st.rate_down_kbit["dev1"] == 20000.0
