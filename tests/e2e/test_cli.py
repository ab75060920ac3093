"""The `testbed` CLI end to end, in subprocesses, against real local testbeds."""

from __future__ import annotations

import json
import time

import typer.main

from testbed.cli import app
from tests.conftest import leftovers, needs_testbed, run_cli, run_main, unique_name


def _command_paths(cmd, prefix=()):
    yield prefix
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


def test_help_everywhere(monkeypatch, capsys):
    """Every command's help: the top level through the real entry point in a subprocess, the
    others through the same ``main`` in this process (a subprocess each cost a second of
    imports, 34 of them)."""
    top = run_cli("--help", timeout=60)
    assert top.returncode == 0 and "Usage:" in top.stdout, top.stderr
    paths = list(_command_paths(typer.main.get_command(app)))
    assert ("local", "up") in paths and ("links", "verify") in paths
    for path in paths:
        rc, out, err = run_main(monkeypatch, capsys, *path, "--help")
        assert rc == 0, (path, err)
        assert "Usage:" in out, path
        if path and len(path) > 1 or path == ("demo",):
            assert "--format" in out, path


def test_bad_flag_value_is_one_line_exit_2(tmp_path):
    res = run_cli("local", "up", "--rate", "fast", "--name", "zz")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: --rate:")


def test_unknown_command_option_or_none_is_a_usage_error_not_a_traceback():
    for args, says in (
        (("nosuch",), "No such command 'nosuch'"),
        (("run", "--nosuch"), "No such option: --nosuch"),
        ((), "Usage: "),
    ):
        res = run_cli(*args, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert says in res.stderr + res.stdout, args
        assert "Traceback" not in res.stderr, (args, res.stderr)


@needs_testbed
def test_json_everywhere_and_unreachable_hosts(state_dir, tmp_path):
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    name = unique_name("e")
    inv = tmp_path / "e.inventory.toml"
    try:
        up = run_cli(
            "local",
            "up",
            "--name",
            name,
            "--devices",
            "2",
            "--rate",
            "8mbit",
            "--inventory-out",
            str(inv),
            "--format",
            "json",
            env=env,
        )
        assert up.returncode == 0, up.stderr
        upj = json.loads(up.stdout)
        assert [d["name"] for d in upj["devices"]] == ["dev1", "dev2"]

        st = json.loads(
            run_cli("local", "status", "--name", name, "--format", "json", env=env).stdout
        )
        assert all(d["sshd_pid"] and d["down_kbit"] == 8000 for d in st["devices"])

        chk = run_cli("inventory", "check", str(inv), "--format", "json", env=env)
        assert chk.returncode == 0, chk.stderr
        assert all(h["ok"] and "Linux" in h["detail"] for h in json.loads(chk.stdout)["hosts"])

        # add a host that never answers (free address in the subnet) and one that refuses
        bad = tmp_path / "bad.inventory.toml"
        dev2 = inv.read_text().split("[[devices]]")[2]
        ghost_ip = upj["subnet"].rsplit(".", 1)[0] + ".250"
        ghost = dev2.replace('name = "dev2"', 'name = "ghost"').replace(
            upj["devices"][1]["host"], ghost_ip
        )
        closed = dev2.replace('name = "dev2"', 'name = "closed"').replace(
            "ssh_port = 22", "ssh_port = 2"
        )
        bad.write_text(inv.read_text() + "\n[[devices]]" + ghost + "\n[[devices]]" + closed)
        t0 = time.monotonic()
        res = run_cli("inventory", "check", str(bad), "--timeout", "2", "--format", "json", env=env)
        elapsed = time.monotonic() - t0
        assert res.returncode == 5, res.stderr
        hosts = {h["name"]: h for h in json.loads(res.stdout)["hosts"]}
        assert hosts["dev1"]["ok"] and hosts["dev2"]["ok"]
        assert not hosts["ghost"]["ok"] and "no answer within 2 s" in hosts["ghost"]["detail"]
        assert not hosts["closed"]["ok"] and "refused" in hosts["closed"]["detail"]
        assert hosts["ghost"]["seconds"] < 2 + 3
        assert elapsed < 30
        errs = res.stderr.strip().splitlines()
        assert any(e.startswith("error: ghost (") for e in errs)
        assert any(e.startswith("error: closed (") for e in errs)

        s = run_cli(
            "links",
            "set",
            str(inv),
            "dev2",
            "--rate",
            "3mbit",
            "--direction",
            "down",
            "--format",
            "json",
            env=env,
        )
        assert s.returncode == 0, s.stderr
        sj = json.loads(s.stdout)
        assert sj["enforced"]["down_kbit"] == 3000 and sj["enforced"]["up_kbit"] == 8000

        nodev = run_cli("links", "set", str(inv), "nosuch", "--rate", "3mbit", env=env)
        assert nodev.returncode == 2 and "no device named 'nosuch'" in nodev.stderr

        v = run_cli(
            "links",
            "verify",
            str(inv),
            "--device",
            "dev2",
            "--seconds",
            "2",
            "--format",
            "json",
            env=env,
        )
        assert v.returncode == 0, v.stderr
        rows = {r["direction"]: r for r in json.loads(v.stdout)}
        assert 0.85 <= rows["down"]["ratio"] <= 1.02, rows
        assert 0.85 <= rows["up"]["ratio"] <= 1.02, rows
        assert rows["down"]["configured_kbit"] == 3000

        show = json.loads(run_cli("links", "show", str(inv), "--format", "json", env=env).stdout)
        assert {r["device"]: r["down_kbit"] for r in show} == {"dev1": 8000, "dev2": 3000}
        clr = run_cli("links", "clear", str(inv), "--format", "json", env=env)
        assert clr.returncode == 0 and json.loads(clr.stdout)["cleared"]
        show = json.loads(run_cli("links", "show", str(inv), "--format", "json", env=env).stdout)
        assert all(r["down_kbit"] is None for r in show)
    finally:
        down = run_cli("local", "down", "--name", name, "--format", "json", env=env)
    assert down.returncode == 0 and json.loads(down.stdout)["was_present"]
    assert not any(leftovers(name).values())
