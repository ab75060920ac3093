"""The report over repeats: per-repeat metrics, their mean and 95% Student-t interval (table,
JSON, plots), the 'vs topk' change paired by repeat or unpaired, tables that are never cut on a
narrow terminal or a pipe, and one error line for a bad folder. On synthetic results folders
written as a run writes them; the expected numbers are worked out here by hand."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from rich.console import Console

from testbed.results import schema as R
from testbed.results.comparison import table as versus_table
from testbed.results.comparison import versus_baseline
from testbed.results.plots import accuracy_latency_figure, energy_figure
from testbed.results.report import build_report, print_table, render_table
from testbed.results.summary import T_975, mean_ci, t_quantile
from tests.conftest import run_cli, run_main

SWEEP = ["sweep.links.rate", "sweep.policy.name"]
T2 = 4.303  # Student t, 0.975 quantile, 2 degrees of freedom (3 repeats)

# per repeat: both requests' total_ms (so p50 = it), 4 output tokens each
TOTAL = {"topk": (40.0, 44.0, 54.0), "slowlink": (20.0, 24.0, 25.0)}
# per repeat: the two requests' correct
CORRECT = {"topk": ((1, 1), (1, 1), (1, 1)), "slowlink": ((1, 0), (1, 1), (0, 1))}
ENERGY = {"topk": (2.0, 2.4, 2.8), "slowlink": (1.0, 1.0, 1.0)}  # joules per request


def _write(d, repeats=None):
    """One point (links.rate=2mbit), topk and slowlink, ``repeats[policy]`` repeats each."""
    repeats = repeats or {"topk": 3, "slowlink": 3}
    d.mkdir(parents=True)
    R.write_json_atomic(d / R.MANIFEST, {"run_id": d.name, "status": "completed", "error": None})
    with (
        R.CsvTable(d / R.REQUESTS, R.REQUEST_COLUMNS, SWEEP) as rq,
        R.CsvTable(d / R.LAYERS, R.LAYER_COLUMNS, SWEEP) as ly,
    ):
        for trial, pol in enumerate(("topk", "slowlink")):
            for rep in range(repeats[pol]):
                key = {
                    "run_id": d.name,
                    "trial": trial,
                    "point": f"links.rate=2mbit policy.name={pol}",
                    "policy": pol,
                    "repeat": rep,
                    "sweep.links.rate": "2mbit",
                    "sweep.policy.name": pol,
                }
                for i in range(2):
                    rq.write(
                        {
                            **key,
                            "request": i,
                            "output_tokens": 4,
                            "total_ms": TOTAL[pol][rep],
                            "correct": CORRECT[pol][rep][i],
                            "energy_j": ENERGY[pol][rep],
                            "energy_source": "measured",
                            "status": "ok",
                        }
                    )
                    ly.write({**key, "request": i, "step": 0, "layer": 0, "moe_ms": 1.0})
    return d


@pytest.fixture
def three(tmp_path):
    return _write(tmp_path / "r3")


def _half(xs):
    return T2 * statistics.stdev(xs) / math.sqrt(len(xs))


def test_t_quantiles():
    assert T_975[0] == pytest.approx(12.706) and T_975[29] == pytest.approx(2.042)
    assert t_quantile(2) == pytest.approx(T2, abs=1e-3)
    assert t_quantile(2.7) >= t_quantile(3)  # rounded down (or exact): never narrower
    assert mean_ci([5.0]) == (5.0, None, None) and mean_ci([]) == (None, None, None)


def test_rows_mean_and_ci_over_three_repeats(three):
    rows = {r["policy"]: r for r in build_report([three]).rows}
    topk = rows["topk"]
    assert topk["n_repeats"] == 3 and topk["requests"] == 6
    # p50 per repeat 40, 44, 54: mean 46 (the pooled p50 is 44), s = sqrt(52),
    # half-width 4.303 * 7.2111 / sqrt(3) = 17.915
    assert topk["latency_p50_ms"] == pytest.approx(46.0)
    assert topk["latency_p50_ms_ci_low"] == pytest.approx(46.0 - 17.915, abs=1e-3)
    assert topk["latency_p50_ms_ci_high"] == pytest.approx(46.0 + 17.915, abs=1e-3)
    # energy per token per repeat 0.5, 0.6, 0.7: s = 0.1, half-width 0.2484
    assert topk["energy_per_token_j"] == pytest.approx(0.6)
    assert topk["energy_per_token_j_ci_high"] - 0.6 == pytest.approx(0.2484, abs=1e-4)
    slow = rows["slowlink"]
    # accuracy per repeat 0.5, 1, 0.5: mean 2/3, s = 0.2887, half-width 0.7172
    assert slow["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert slow["accuracy_ci_low"] == pytest.approx(2 / 3 - 0.7172, abs=1e-4)
    assert slow["accuracy_ci_high"] == pytest.approx(2 / 3 + 0.7172, abs=1e-4)
    # no spread at all: an interval of zero width, not none
    assert slow["energy_per_token_j_ci_low"] == slow["energy_per_token_j_ci_high"] == 0.25


def test_table_shows_mean_plus_minus_half_width(three):
    con = Console(record=True, width=250)
    render_table(build_report([three]), con)
    text = con.export_text()
    assert "46.0 ±17.9" in text  # latency p50 of topk
    assert "0.667 ±0.717" in text  # accuracy of slowlink
    assert "95% CI" in text and text.count("n=1") == 1  # the footer, once


def test_one_repeat_no_ci(tmp_path):
    rep = build_report([_write(tmp_path / "r1", {"topk": 1, "slowlink": 1})])
    topk = next(r for r in rep.rows if r["policy"] == "topk")
    assert topk["n_repeats"] == 1 and topk["latency_p50_ms"] == 40.0
    assert topk["latency_p50_ms_ci_low"] is None and topk["accuracy_ci_high"] is None
    con = Console(record=True, width=250)
    render_table(rep, con)
    text = con.export_text()
    assert "±" not in text.split("x ±h")[0]  # no interval in any cell
    assert "n=1: one repeat, no CI" in text
    vs = versus_baseline(rep.groups)[0]
    assert vs["latency_change_pct"] == pytest.approx(-50.0)
    assert vs["latency_change_pct_ci_low"] is None and vs["ci_method"] is None


def test_versus_topk_paired_by_repeat(three):
    (vs,) = versus_baseline(build_report([three]).groups)
    assert vs["ci_method"] == "paired" and vs["n_repeats"] == vs["baseline_n_repeats"] == 3
    # per-token ms per repeat: topk 10, 11, 13.5; slowlink 5, 6, 6.25 -> change per repeat
    d = [100 * (5 - 10) / 10, 100 * (6 - 11) / 11, 100 * (6.25 - 13.5) / 13.5]
    assert vs["latency_change_pct"] == pytest.approx(sum(d) / 3)
    assert vs["latency_change_pct_ci_low"] == pytest.approx(sum(d) / 3 - _half(d), abs=1e-3)
    assert vs["latency_change_pct_ci_high"] == pytest.approx(sum(d) / 3 + _half(d), abs=1e-3)
    # accuracy change per repeat -0.5, 0, -0.5
    a = [-0.5, 0.0, -0.5]
    assert vs["accuracy_change"] == pytest.approx(-1 / 3)
    assert vs["accuracy_change_ci_high"] == pytest.approx(-1 / 3 + _half(a), abs=1e-4)
    assert vs["per_token_ms"] == pytest.approx(17.25 / 3)
    assert vs["baseline_per_token_ms"] == pytest.approx(34.5 / 3)
    assert vs["baseline_per_token_ms_ci_low"] == pytest.approx(11.5 - _half([10, 11, 13.5]))
    con = Console(record=True, width=250)
    con.print(versus_table([vs]))
    text = con.export_text()
    pct = f"{sum(d) / 3:+.1f}% ±{_half(d):.1f}%"
    assert pct in text and "paired by repeat" in text


def test_versus_topk_unpaired_when_repeats_differ(tmp_path):
    d = _write(tmp_path / "r23", {"topk": 2, "slowlink": 3})
    (vs,) = versus_baseline(build_report([d]).groups)
    assert vs["ci_method"] == "unpaired" and vs["baseline_n_repeats"] == 2
    # delta method: var(mx/my) ~ vx/my^2 + mx^2 vy/my^4; Welch-Satterthwaite df
    x, y = [5.0, 6.0, 6.25], [10.0, 11.0]
    mx, my = sum(x) / 3, sum(y) / 2
    vx = 1e4 * statistics.variance(x) / 3 / my**2
    vy = 1e4 * mx**2 * statistics.variance(y) / 2 / my**4
    df = (vx + vy) ** 2 / (vx**2 / 2 + vy**2 / 1)
    half = t_quantile(df) * math.sqrt(vx + vy)
    center = 100 * (mx - my) / my
    assert vs["latency_change_pct"] == pytest.approx(center)
    assert vs["latency_change_pct_ci_low"] == pytest.approx(center - half)
    assert vs["latency_change_pct_ci_high"] == pytest.approx(center + half)


def test_cli_json_fields(three, tmp_path, monkeypatch, capsys):
    rc, out, err = run_main(
        monkeypatch, capsys, "report", str(three), "--out", str(tmp_path / "p"), "--format", "json"
    )
    assert rc == 0, err
    data = json.loads(out)
    row = data["rows"][0]
    assert row["n_repeats"] == 3 and row["trials"] == [0]
    for m in ("latency_p50_ms", "accuracy", "energy_per_token_j", "tpot_p50_ms"):
        assert f"{m}_ci_low" in row and f"{m}_ci_high" in row
    assert row["latency_p50_ms_ci_low"] == pytest.approx(46.0 - 17.915, abs=1e-3)
    vs = data["versus_topk"][0]
    assert vs["ci_method"] == "paired" and vs["latency_change_pct_ci_low"] < -45
    for k in ("per_token_ms", "baseline_per_token_ms", "accuracy_change", "latency_change_pct"):
        assert k in vs and f"{k}_ci_low" in vs  # the old fields stay, the intervals are added


def _errorbars(fig):
    from matplotlib.container import ErrorbarContainer

    return [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_plots_error_bars_with_repeats_only(three, tmp_path):
    rep = build_report([three])
    bars = _errorbars(accuracy_latency_figure(rep))
    assert len(bars) == 2  # one per point
    data_line, _, (xcol, _) = bars[0].lines
    assert data_line is None  # no data line: the markers are the scatter's
    segs = xcol.get_segments()  # topk's latency bar: 46 +- 17.915
    assert segs[0][0][0] == pytest.approx(46.0 - 17.915, abs=1e-3)
    assert segs[0][1][0] == pytest.approx(46.0 + 17.915, abs=1e-3)
    energy = _errorbars(energy_figure(rep))
    assert len(energy) == 1
    ylo = energy[0].lines[2][0].get_segments()[0]  # topk first: 0.6 +- 0.2484
    assert (ylo[0][1], ylo[1][1]) == pytest.approx((0.6 - 0.2484, 0.6 + 0.2484), abs=1e-4)
    one = build_report([_write(tmp_path / "r1", {"topk": 1, "slowlink": 1})])
    assert _errorbars(accuracy_latency_figure(one)) == []
    assert _errorbars(energy_figure(one)) == []


def test_narrow_terminal_wraps_never_cuts(three):
    rep = build_report([three])
    con = Console(record=True, width=60, force_terminal=True, color_system=None)
    render_table(rep, con)
    con.print()
    print_table(con, versus_table(versus_baseline(rep.groups)))
    text = con.export_text()
    assert "…" not in text
    assert max(len(ln) for ln in text.splitlines()) <= 60
    words = text.split()
    for w in ("46.0", "±17.9", "0.667", "±0.717", "links.rate=2mbit", "0.6", "±0.248"):
        assert w in words, w  # whole, not folded
    assert "(1/" in text  # the wide table came in column groups


def test_narrow_columns_on_a_pipe_one_line_per_row(three, tmp_path):
    res = run_cli("report", str(three), "--out", str(tmp_path / "p"), env={"COLUMNS": "60"})
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout
    topk = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("topk"))
    assert "46.0 ±17.9" in topk and "1.000 ±0.000" in topk and "0.6 ±0.248" in topk


def test_errors_one_line_once(three, tmp_path, monkeypatch, capsys):
    rc, _, err = run_main(monkeypatch, capsys, "report", str(tmp_path / "nope"))
    assert rc == 2 and err.splitlines() == [f"error: {tmp_path / 'nope'}: no such results folder"]
    (three / R.SUMMARY).write_bytes(b"run_id,trial\n\xff\xfe\n")
    rc, _, err = run_main(monkeypatch, capsys, "report", str(three), "--out", str(tmp_path))
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {three}: cannot read")


def test_t_quantiles_past_the_table():
    """Past df 30 (Welch's df often is): the expansion, not the normal's 1.96."""
    for df, want in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t_quantile(df) == pytest.approx(want, abs=2e-4)
    assert t_quantile(30) > t_quantile(31) > t_quantile(1000) > 1.96
