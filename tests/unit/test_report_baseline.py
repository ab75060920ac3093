"""The report's baseline (topk) for a policy however it is spelled in the recipe: matched by the
sweep values but the policy's, a short label for a file-path policy, and a warning on stderr
for a point without topk. On synthetic results folders written as a run writes them."""

from __future__ import annotations

import json

import pytest

from testbed.results import schema as R
from testbed.results.comparison import missing_baseline, versus_baseline
from testbed.results.report import build_report, point_label, render_table, short_policy
from tests.conftest import run_main

SPEC = "policies/researcher/slowlink.py:SlowLink500"  # as written in the recipe's sweep
SWEEP = ["sweep.links.rate", "sweep.policy.name"]
FACTOR = {"topk": 1.0, "slowlink": 0.5}  # slowlink is twice as fast per token


def _write(d, policies, rates=("2mbit", "20mbit"), repeats=2):
    """A results folder: policy column = the policy's ``name``, point and ``sweep.*`` columns
    as the recipe spelled ``policy.name`` (``policies`` maps spec -> name)."""
    d.mkdir(parents=True)
    R.write_json_atomic(d / R.MANIFEST, {"run_id": d.name, "status": "completed", "error": None})
    trial = 0
    with (
        R.CsvTable(d / R.REQUESTS, R.REQUEST_COLUMNS, SWEEP) as rq,
        R.CsvTable(d / R.LAYERS, R.LAYER_COLUMNS, SWEEP) as ly,
    ):
        for rate in rates:
            for spec, name in policies.items():
                for rep in range(repeats):
                    key = {
                        "run_id": d.name,
                        "trial": trial,
                        "point": f"links.rate={rate} policy.name={spec}",
                        "policy": name,
                        "repeat": rep,
                        "sweep.links.rate": rate,
                        "sweep.policy.name": spec,
                    }
                    slow = 10.0 if rate == "2mbit" else 1.0
                    for i in range(2):
                        total = (40.0 + 20.0 * rep) * slow * FACTOR[name]
                        rq.write(
                            {
                                **key,
                                "request": i,
                                "output_tokens": 4,
                                "total_ms": total,
                                "correct": int(name == "topk" or i == 0),
                                "status": "ok",
                            }
                        )
                        ly.write({**key, "request": i, "step": 0, "layer": 0, "moe_ms": 1.0})
                trial += 1
    return d


@pytest.fixture
def mixed(tmp_path):
    return _write(tmp_path / "r-mixed", {"topk": "topk", SPEC: "slowlink"})


def test_file_path_policy_is_compared_with_topk_at_its_point(mixed):
    rows = versus_baseline(build_report([mixed]).groups)
    assert [(r["policy"], r["point"]) for r in rows] == [
        ("slowlink", "links.rate=2mbit policy.name=SlowLink500"),
        ("slowlink", "links.rate=20mbit policy.name=SlowLink500"),
    ]
    for r, slow in zip(rows, (10.0, 1.0)):
        # both repeats pooled, for the policy as for topk: (40 + 60) / 2 / 4 tokens
        assert r["baseline_per_token_ms"] == pytest.approx(12.5 * slow)
        assert r["per_token_ms"] == pytest.approx(6.25 * slow)
        assert r["latency_change_pct"] == pytest.approx(-50.0)
        assert r["baseline_accuracy"] == 1.0 and r["accuracy_change"] == pytest.approx(-0.5)
    assert missing_baseline(build_report([mixed]).groups) == []


def test_short_labels_in_table_and_plot_titles(mixed):
    rep = build_report([mixed])
    labels = [g.label() for g in rep.groups]
    assert labels == [
        "topk | links.rate=2mbit",
        "slowlink | links.rate=2mbit policy.name=SlowLink500",
        "topk | links.rate=20mbit",
        "slowlink | links.rate=20mbit policy.name=SlowLink500",
    ]
    from rich.console import Console

    con = Console(record=True, width=200)
    render_table(rep, con)
    text = con.export_text()
    assert "SlowLink500" in text and "researcher/" not in text and "slowlink.py" not in text
    # the JSON rows keep the point as recorded
    assert rep.rows[1]["point"] == f"links.rate=2mbit policy.name={SPEC}"


def test_policy_spelling_forms():
    assert short_policy("topk") == "topk"
    assert short_policy("mypkg.policies:SlowLink") == "SlowLink"
    assert short_policy("/abs/dir/x.py:SlowLink") == "SlowLink"
    # the policy column says it: dropped from the point
    for spec in ("slowlink", "pkg.mod:SlowLink", "a/b/slowlink.py:SlowLink"):
        row = {"policy": "slowlink", "point": f"links.rate=2mbit policy.name={spec}"}
        assert point_label(row) == "links.rate=2mbit", spec
    row = {"policy": "", "point": "policy.name=a/b/slowlink.py:SlowLink"}
    assert point_label(row) == "policy.name=SlowLink"


def test_cli_json_filled_and_no_warning(mixed, tmp_path, monkeypatch, capsys):
    rc, out, err = run_main(
        monkeypatch, capsys, "report", str(mixed), "--out", str(tmp_path / "p"), "--format", "json"
    )
    assert rc == 0, err
    assert "warning" not in err
    vs = json.loads(out)["versus_topk"]
    assert len(vs) == 2 and all(r["latency_change_pct"] == pytest.approx(-50.0) for r in vs)


def test_cli_warns_once_per_point_without_topk(tmp_path, monkeypatch, capsys):
    d = _write(tmp_path / "r-alone", {SPEC: "slowlink"})
    rc, out, err = run_main(monkeypatch, capsys, "report", str(d), "--out", str(tmp_path / "p"))
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: report: run r-alone: no topk at point links.rate={rate} to compare "
        "SlowLink500 with: its 'vs topk' cells are empty"
        for rate in ("2mbit", "20mbit")
    ]
    assert "-50.0%" not in out  # and the cells are indeed empty
