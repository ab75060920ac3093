"""The report: summary_row on hand-made rows, and load + table + plots + the CLI on a synthetic
results folder written here (2 policies x 2 sweep points, columns as testbed.results has them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed.errors import ConfigError
from testbed.results import schema as R
from testbed.results.plots import PLOT_FILES, energy_bars, layer_split, write_plots
from testbed.results.report import build_report, load_runs, render_table
from testbed.results.summary import METRIC_COLUMNS, summary_row
from tests.conftest import ROOT, run_cli, run_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- summary_row ----------------------------------------------------------------------
def _req(total, **kw):
    row = {
        "total_ms": str(total),
        "ttft_ms": "",
        "tpot_ms": "",
        "output_tokens": "4",
        "correct": "1",
        "score": "1.0",
        "bytes_down": "100",
        "bytes_up": "60",
        "energy_j": "",
        "status": "ok",
    }
    row.update({k: str(v) for k, v in kw.items()})
    return row


def test_summary_row_columns_are_the_summary_metrics():
    assert tuple(summary_row([], [], [])) == METRIC_COLUMNS
    assert (
        R.KEY_COLUMNS + METRIC_COLUMNS + R.SUMMARY_BUDGET_COLUMNS == R.SUMMARY_COLUMNS
    )  # then the columns only runs with whole-model experts (MoE²) fill


def test_percentiles_linear_interpolation():
    reqs = [_req(t, ttft_ms=t / 10, tpot_ms=t / 100) for t in (4, 1, 100, 3, 2)]
    s = summary_row(reqs, [], [])
    # sorted 1 2 3 4 100: p50 = 3; p95 at rank 0.95*4 = 3.8 -> 4 + 0.8*(100-4) = 80.8
    assert s["latency_p50_ms"] == pytest.approx(3.0)
    assert s["latency_p95_ms"] == pytest.approx(80.8)
    assert s["ttft_p50_ms"] == pytest.approx(0.3)
    assert s["tpot_p50_ms"] == pytest.approx(0.03)
    # even count: midway between the two middle values
    assert summary_row([_req(10), _req(20)], [], [])["latency_p50_ms"] == pytest.approx(15.0)


def test_counts_accuracy_score_bytes_and_empty_energy():
    reqs = [
        _req(10, correct=1, score=1.0, status="ok"),
        _req(20, correct=0, score=0.5, status="degraded"),
        _req(30, correct=0, score=0.0, status="error", output_tokens=0, bytes_down=0, bytes_up=0),
        _req(40, correct=1, score=0.75, status="ok"),
    ]
    s = summary_row(reqs, [], [])
    assert (s["requests"], s["requests_ok"]) == (4, 2)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["score"] == pytest.approx(2.25 / 4)
    assert s["bytes_per_token"] == pytest.approx(3 * 160 / 12)
    assert s["energy_per_token_j"] == ""  # no meter: empty, not 0
    assert s["network_share"] == "" and s["tpot_p50_ms"] == ""


def test_energy_per_token_over_requests_with_a_known_energy():
    reqs = [
        _req(10, energy_j=2.0, output_tokens=4),
        _req(10, energy_j=1.0, output_tokens=6),
        _req(10, energy_j="", output_tokens=100),
    ]
    assert summary_row(reqs, [], [])["energy_per_token_j"] == pytest.approx(3.0 / 10)


def test_network_share_over_layers_with_both_values():
    layers = [
        {"critical_path_ms": "10", "critical_network_ms": "8", "critical_compute_ms": "2"},
        {"critical_path_ms": "30", "critical_network_ms": "2", "critical_compute_ms": "28"},
        {"critical_path_ms": "", "critical_network_ms": "", "critical_compute_ms": ""},
        {"critical_path_ms": "50", "critical_network_ms": ""},
    ]  # no network part: skipped
    assert summary_row([], layers, [])["network_share"] == pytest.approx(10 / 40)


def test_failed_and_rerouted_calls():
    calls = [
        {"status": s}
        for s in ("ok", "ok", "rerouted", "timeout", "error", "unreachable", "skipped")
    ]
    s = summary_row([], [], calls)
    assert (s["calls"], s["calls_failed"], s["calls_rerouted"]) == (7, 4, 1)


def test_native_values_as_the_runner_passes_them():
    reqs = [
        {
            "total_ms": 12.5,
            "ttft_ms": 5,
            "tpot_ms": 1.5,
            "output_tokens": 5,
            "correct": True,
            "score": 1,
            "bytes_down": 500,
            "bytes_up": 250,
            "energy_j": None,
            "status": "ok",
        },
        {
            "total_ms": float("nan"),
            "ttft_ms": None,
            "tpot_ms": None,
            "output_tokens": 0,
            "correct": False,
            "score": 0.0,
            "bytes_down": 0,
            "bytes_up": 0,
            "energy_j": 1.0,
            "status": "error",
        },
    ]
    layers = [{"critical_path_ms": 4.0, "critical_network_ms": 1.0}]
    s = summary_row(reqs, layers, [{"status": "ok"}])
    assert s["latency_p50_ms"] == 12.5 and s["requests_ok"] == 1 and s["accuracy"] == 0.5
    assert s["bytes_per_token"] == 150.0 and s["network_share"] == 0.25
    assert s["energy_per_token_j"] == ""  # energy known only for a request with no tokens


def test_empty_trial():
    s = summary_row([], [], [])
    assert s["requests"] == 0 and s["calls"] == 0
    assert all(
        s[k] == ""
        for k in (
            "latency_p50_ms",
            "accuracy",
            "bytes_per_token",
            "energy_per_token_j",
            "network_share",
        )
    )


# -- a synthetic results folder -------------------------------------------------------
SWEEP = ["sweep.links.rate", "sweep.policy.name"]
RATES = {"1mbit": 4.0, "100mbit": 1.0}  # latency factor
NET_MS = {"1mbit": 8.0, "100mbit": 2.0}  # of a 10 ms critical path per layer step
POLICIES = {"topk": 1.0, "top1": 0.75}  # latency factor
TOTALS = (10.0, 20.0, 30.0, 40.0)  # x factor: p50 25, p95 38.5


def _write_run(
    d,
    run_id="r1",
    status="completed",
    failed_call_in=("top1", "1mbit"),
    energy=True,
    requests_per_point=4,
):
    d.mkdir(parents=True)
    R.write_json_atomic(
        d / R.MANIFEST,
        {"run_id": run_id, "status": status, "error": "boom" if status == "failed" else None},
    )
    trial = 0
    with (
        R.CsvTable(d / R.REQUESTS, R.REQUEST_COLUMNS, SWEEP) as rq,
        R.CsvTable(d / R.LAYERS, R.LAYER_COLUMNS, SWEEP) as ly,
        R.CsvTable(d / R.CALLS, R.CALL_COLUMNS, SWEEP) as cl,
    ):
        for rate, factor in RATES.items():
            for pol, pf in POLICIES.items():
                key = {
                    "run_id": run_id,
                    "trial": trial,
                    "point": f"links.rate={rate} policy.name={pol}",
                    "policy": pol,
                    "repeat": 0,
                    "sweep.links.rate": rate,
                    "sweep.policy.name": pol,
                }
                trial += 1
                for i in range(requests_per_point):
                    correct = int(pol == "topk" or i % 2 == 0)  # topk 1.0, top1 0.5
                    total = TOTALS[i] * factor * pf
                    rq.write(
                        {
                            **key,
                            "request": i,
                            "task": "copy",
                            "prompt_tokens": 8,
                            "output_tokens": 5,
                            "ttft_ms": total / 5,
                            "tpot_ms": total / 10,
                            "total_ms": total,
                            "correct": correct,
                            "score": 0.5 + 0.5 * correct,
                            "experts_per_token": 2.0 if pol == "topk" else 1.0,
                            "bytes_down": 1000,
                            "bytes_up": 500,
                            "calls": 2,
                            "energy_devices_j": 1.5 if energy else None,
                            "energy_bs_j": 0.5 if energy else None,
                            "energy_j": 2.0 if energy else None,
                            "energy_source": "estimated" if energy else "unavailable",
                            "status": "ok",
                        }
                    )
                    for step in range(2):
                        for layer in range(2):
                            net = NET_MS[rate] + layer  # layer 1 is 1 ms slower on the network
                            ly.write(
                                {
                                    **key,
                                    "request": i,
                                    "step": step,
                                    "phase": "prefill" if step == 0 else "decode",
                                    "layer": layer,
                                    "tokens": 1,
                                    "critical_path_ms": 10.0 + layer,
                                    "critical_network_ms": net,
                                    "critical_compute_ms": 10.0 - NET_MS[rate],
                                }
                            )
                    for j in range(2):
                        st = "ok"
                        if (pol, rate) == failed_call_in and i == 0:
                            st = "timeout" if j == 0 else "rerouted"
                        cl.write(
                            {
                                **key,
                                "request": i,
                                "step": 0,
                                "layer": j,
                                "expert": f"L{j}.E0",
                                "device": "dev1",
                                "attempt": 0,
                                "tokens": 1,
                                "status": st,
                                "network_ms": 1.0,
                            }
                        )
    return d


@pytest.fixture
def run_dir(tmp_path):
    return _write_run(tmp_path / "results" / "r1")


def _by(rows, pol, rate):
    return next(
        r for r in rows if r["policy"] == pol and r["point"].startswith(f"links.rate={rate} ")
    )


def _check_rows(rows):
    assert len(rows) == 4
    assert [(r["policy"], r["point"].split()[0]) for r in rows] == [
        ("topk", "links.rate=1mbit"),
        ("top1", "links.rate=1mbit"),
        ("topk", "links.rate=100mbit"),
        ("top1", "links.rate=100mbit"),
    ]
    for rate, rf in RATES.items():
        for pol, pf in POLICIES.items():
            r = _by(rows, pol, rate)
            factor = rf * pf
            assert r["requests"] == 4 and r["requests_ok"] == 4
            assert r["latency_p50_ms"] == pytest.approx(25.0 * factor)
            assert r["latency_p95_ms"] == pytest.approx(38.5 * factor)
            assert r["ttft_p50_ms"] == pytest.approx(5.0 * factor)
            assert r["tpot_p50_ms"] == pytest.approx(2.5 * factor)
            assert r["accuracy"] == pytest.approx(1.0 if pol == "topk" else 0.5)
            assert r["energy_per_token_j"] == pytest.approx(0.4)
            assert r["bytes_per_token"] == pytest.approx(300.0)
            # per request: 2 steps x (net N + net N+1) / 2 steps x (10 + 11)
            assert r["network_share"] == pytest.approx((2 * NET_MS[rate] + 1) / 21)
            failed = (pol, rate) == ("top1", "1mbit")
            assert (r["calls"], r["calls_failed"], r["calls_rerouted"]) == (
                8,
                int(failed),
                int(failed),
            )


def test_load_and_table(run_dir):
    runs = load_runs([run_dir])
    assert len(runs) == 1 and runs[0].run_id == "r1" and not runs[0].failed
    assert (len(runs[0].requests), len(runs[0].layers), len(runs[0].calls)) == (16, 64, 32)
    rep = build_report([run_dir])
    _check_rows(rep.rows)
    assert rep.rows[0]["trials"] == [0] and rep.rows[0]["run_status"] == "completed"
    json.dumps(rep.rows)  # JSON-ready

    from rich.console import Console

    con = Console(record=True, width=200)
    render_table(rep, con)
    text = con.export_text()
    assert "links.rate=1mbit" in text and "top1" in text and "100.0" in text  # p50 of 4x
    assert "1/8" in text  # failed calls of top1 at 1mbit


def test_layer_split_means_per_layer(run_dir):
    rep = build_report([run_dir])
    g = next(
        g for g in rep.groups if (g.policy, g.point.split()[0]) == ("topk", "links.rate=1mbit")
    )
    assert layer_split(g.layers) == [(0, 8.0, 2.0), (1, 9.0, 2.0)]


def test_energy_bars_per_group_split_and_source(tmp_path, run_dir):
    bars = energy_bars(build_report([run_dir]))
    assert [(b.policy, b.label.split(" | ")[1]) for b in bars] == [
        ("topk", "links.rate=1mbit"),
        ("top1", "links.rate=1mbit"),
        ("topk", "links.rate=100mbit"),
        ("top1", "links.rate=100mbit"),
    ]
    for b in bars:  # 2.0 J = 1.5 devices + 0.5 BS per request of 5 output tokens
        assert b.per_token_j == pytest.approx(0.4)
        assert b.devices_per_token_j == pytest.approx(0.3) and b.bs_per_token_j == pytest.approx(
            0.1
        )
        assert b.source == "estimated"
    bad = _write_run(tmp_path / "results" / "r2", run_id="r2", energy=False, requests_per_point=1)
    none = energy_bars(build_report([bad]))
    assert all(b.per_token_j is None and b.source == "unavailable" for b in none)
    # the plot is drawn for either (a "no data" panel for the second)
    assert write_plots(build_report([bad]), tmp_path / "p")[-1].name == "energy_per_token.png"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return len(data), w, h


def test_plots_default_folder_and_out(run_dir, tmp_path):
    rep = build_report([run_dir])
    paths = write_plots(rep)
    assert paths == [run_dir / "plots" / n for n in PLOT_FILES]
    for p in paths:
        size, w, h = _png_size(p)
        assert size > 10_000 and w >= 400 and h >= 300, (p, size, w, h)
    other = write_plots(rep, tmp_path / "elsewhere" / "plots")
    assert [p.parent for p in other] == [tmp_path / "elsewhere" / "plots"] * len(PLOT_FILES)
    assert all(p.stat().st_size > 10_000 for p in other)


def test_failed_run_reported_with_its_rows_and_no_energy(tmp_path, run_dir):
    bad = _write_run(
        tmp_path / "results" / "r2",
        run_id="r2",
        status="failed",
        energy=False,
        requests_per_point=1,
    )
    rep = build_report([run_dir, bad])
    assert [r.status for r in rep.runs] == ["completed", "failed"] and rep.runs[1].failed
    assert rep.runs[1].error == "boom"
    rows2 = [r for r in rep.rows if r["run"] == "r2"]
    assert len(rows2) == 4 and all(r["run_failed"] and r["requests"] == 1 for r in rows2)
    assert all(r["energy_per_token_j"] is None for r in rows2)
    assert all(p.stat().st_size > 10_000 for p in write_plots(rep, tmp_path / "p"))

    from rich.console import Console

    con = Console(record=True, width=220)
    render_table(rep, con)
    text = con.export_text()
    assert "r2 (failed)" in text and "boom" in text


def test_missing_folder_or_requests_csv_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nope")):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'empty'}: .*requests\.csv"):
        load_runs([tmp_path / "empty"])


def test_report_never_imports_torch():
    code = (
        "import sys, testbed.results.report, testbed.cli; "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# -- the CLI --------------------------------------------------------------------------
def test_cli_json(run_dir, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "plots_here"
    rc, out, err = run_main(
        monkeypatch, capsys, "report", str(run_dir), "--out", str(out_dir), "--format", "json"
    )
    assert rc == 0, err
    data = json.loads(out)
    _check_rows(data["rows"])
    assert data["runs"][0]["run"] == "r1" and data["runs"][0]["status"] == "completed"
    assert data["plots"] == [str(out_dir / n) for n in PLOT_FILES]
    assert all(_png_size(out_dir / n)[0] > 10_000 for n in PLOT_FILES)


def test_cli_text(run_dir, monkeypatch, capsys):
    rc, out, err = run_main(monkeypatch, capsys, "report", str(run_dir))
    assert rc == 0, err
    assert "top1" in out and "p50 ms" in out
    assert f"plots: {run_dir / 'plots'}/" in out and "latency_cdf.png" in out


def test_cli_missing_folder_exit_2_one_line(run_dir, tmp_path):
    missing = tmp_path / "no-such-run"
    res = run_cli("report", str(run_dir), str(missing), timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip().splitlines() == [f"error: {missing}: no such results folder"]


def test_run_with_no_rows_and_no_manifest(tmp_path):
    d = tmp_path / "crashed"
    d.mkdir()
    R.CsvTable(d / R.REQUESTS, R.REQUEST_COLUMNS).close()  # header only, nothing else
    rep = build_report([d])
    assert rep.rows == [] and rep.runs[0].status == "unknown"
    assert rep.runs[0].run_id == "crashed" and "manifest" in rep.runs[0].error
    assert all(_png_size(p)[0] > 5_000 for p in write_plots(rep))
