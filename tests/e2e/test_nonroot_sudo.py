"""A run on the local testbed by a user who is not root and whose sudo rights are exactly the lines
``testbed init`` prints: root brings the testbed up (namespaces and sshd need it) and installs
those lines; the user writes the inventory with ``testbed init`` (host keys by ssh-keyscan),
then provisions and runs a small recipe through the CLI, shaping the BS's links through
``sudo -n tc -batch -`` and ``sudo -n tc -j -batch -``. The user cannot run a shell or
``ip netns exec`` as root. The user, its files and its sudoers file are removed whatever
happens.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testbed.lab.inventory import load_inventory, ssh_runner_for
from testbed.results import schema as R
from tests.conftest import ROOT, leftovers, needs_testbed, run_cli, unique_name

pytestmark = [needs_testbed, pytest.mark.root]

RECIPE = """
[recipe]
name = "nonroot"
seed = 1
[model]
path = "tiny"
[workload]
task = "tiny"
requests = 3
[run]
timeout_s = 5.0
[policy]
name = "topk"
[links]
rate = "300kbit"
"""


def _hidden_parent(path: str) -> tuple[Path, Path] | None:
    """(the first folder on the way to ``path``'s real file that others cannot enter, its child
    on that way), or None where others reach it (a pyenv Python under /root is not)."""
    real = Path(os.path.realpath(path))
    way = [*reversed(real.parents), real]
    for d, child in itertools.pairwise(way):
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d, child
    return None


def _as(user: str, home: Path, argv: list[str], timeout: float = 60, **kw):
    """``argv`` run as ``user`` (runuser), with a plain user's PATH (no sbin) and its own HOME
    and cache. Where this Python sits in a folder others cannot enter, the command runs in a
    private mount namespace (gone with it) that shows just that Python's folder to the user."""
    env = [
        f"HOME={home}",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        f"MOE_TESTBED_CACHE={home / 'cache'}",
        "PYTHONDONTWRITEBYTECODE=1",
    ]
    cmd = ["runuser", "-u", user, "--", "env", "-i", *env, *argv]
    hidden = _hidden_parent(sys.executable)
    if hidden is not None:
        mnt = home.parent / "python-mnt"
        mnt.mkdir(exist_ok=True)
        script = (
            'mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 tmpfs "$3" && mkdir "$1" '
            '&& mount --bind "$2" "$1" && shift 3 && exec "$@"'
        )
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
               str(hidden[1]), str(mnt), str(hidden[0]), *cmd]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False, **kw
    )


def _testbed(user: str, home: Path, *args: str, timeout: float = 60):
    return _as(user, home, [sys.executable, "-m", "testbed", *args], timeout=timeout)


def _add_user(user: str, udir: Path) -> Path:
    """A throwaway system user whose home and files live in ``udir`` (0700, theirs)."""
    home = udir / "home"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/bin/sh",
            "--user-group",
            user,
        ],
        check=True,
        capture_output=True,
    )
    home.mkdir()
    pw = pwd.getpwnam(user)
    for p in (udir, home):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(udir, 0o700)
    return home


def _init(user: str, home: Path, udir: Path, inv_root: Path):
    """``testbed init`` as the user, for the local testbed of ``inv_root``: (result, inventory)."""
    inv = load_inventory(inv_root)
    key = udir / "id_ed25519"
    shutil.copy(inv.devices[0].ssh_key or "", key)
    pw = pwd.getpwnam(user)
    os.chown(key, pw.pw_uid, pw.pw_gid)
    os.chmod(key, 0o600)
    d0 = inv.devices[0]
    res = _testbed(
        user, home, "init", str(udir / "lab.toml"), "--yes", "--format", "json",
        "--name", "nonroot", "--bs-interface", inv.bs.interface, "--bs-host", inv.bs.host,
        "--bs-ifb", inv.bs.ifb, "--device", ",".join(f"{d.name}={d.host}" for d in inv.devices),
        "--user", "root", "--key", str(key), "--workdir", str(udir / "work" / "{name}"),
        "--python", d0.python, "--hw-class", "netns", "--memory-mb", "2048",
        "--reuse", ",".join(d0.reuse_packages), "--sudoers-out", str(udir / "sudoers"),
    )  # fmt: skip
    return res, udir / "lab.toml"


def _sudo_refused(user: str, home: Path, ns: str) -> None:
    """The narrowing: no shell, no ``ip netns exec``, no tc outside the batch form."""
    for argv in (
        ["sudo", "-n", "sh", "-c", "true"],
        ["sudo", "-n", "ip", "netns", "exec", ns, "true"],
        ["sudo", "-n", "tc", "qdisc", "show"],
        ["sudo", "-n", "ip", "addr", "flush", "dev", "lo"],
    ):
        res = _as(user, home, argv)
        assert res.returncode != 0, (argv, res.stdout, res.stderr)
    ok = _as(user, home, ["sudo", "-n", "tc", "-batch", "-"], input="qdisc show dev lo\n")
    assert ok.returncode == 0 and "qdisc" in ok.stdout, ok.stderr


def _stdin_over_ssh(inv_root: Path) -> None:
    """Over SSH, a command's standard input arrives whole and ends (fabric's in_stream), also
    under ``timeout ... sudo -n``."""
    inv = load_inventory(inv_root)
    with ssh_runner_for(inv, inv.devices[0]) as r:
        assert r.run(["cat"], input="a\nb\n").stdout == "a\nb\n"
        res = r.run(["tc", "-batch", "-"], sudo=True, input="qdisc show dev eth0\n")
        assert "qdisc" in res.stdout and res.argv == ("tc", "-batch", "-")


def test_run_as_user_with_init_sudoers_lines(state_dir, tmp_path):
    env = {"TESTBED_STATE_DIR": str(state_dir)}
    name, user = unique_name("s"), unique_name("tbu")
    inv_root = tmp_path / f"{name}.inventory.toml"
    udir = Path(tempfile.mkdtemp(prefix=f"{user}-", dir="/tmp"))
    sudoers = Path("/etc/sudoers.d") / f"moe-testbed-{user}"
    up = run_cli("local", "up", "--devices", "2", "--name", name, "--rate", "1gbit",
                 "--inventory-out", str(inv_root), env=env)  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        _stdin_over_ssh(inv_root)
        home = _add_user(user, udir)
        res, lab = _init(user, home, udir, inv_root)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        text = (udir / "sudoers").read_text()
        assert text == out["sudoers"] and len(out["keys"]) >= 2
        assert all(k["added"] and k["fingerprint"].startswith("SHA256:") for k in out["keys"])
        rules = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        tc = shutil.which("tc", path="/usr/sbin:/sbin")
        assert rules == [
            f"{user} ALL=(root) NOPASSWD: {tc} -batch -, {tc} -j -batch -, "
            + ", ".join(rules[0].split(", ")[2:])
        ] and ("ip link set *" in rules[0] and "ethtool -K *" in rules[0]), rules
        chk = subprocess.run(
            ["visudo", "-cf", str(udir / "sudoers")], check=False, capture_output=True
        )
        assert chk.returncode == 0, chk.stderr
        shutil.copy(udir / "sudoers", sudoers)
        os.chmod(sudoers, 0o440)

        _sudo_refused(user, home, f"tb-{name}-d1")
        (udir / "r.toml").write_text(RECIPE)
        run = _testbed(user, home, "run", str(udir / "r.toml"), "--inventory", str(lab),
                       "--out", str(udir / "results"), "--format", "json", timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout)
        run_dir = Path(summary["run_dir"])
        man = json.loads((run_dir / R.MANIFEST).read_text())
        assert summary["status"] == man["status"] == "completed", man.get("error")
        # the kernel's read-back during the trial: both links at the recipe's rate, both ways
        enforced = man["trials"][0]["links_enforced"]
        assert {(e["down_kbit"], e["up_kbit"]) for e in enforced} == {(300.0, 300.0)}, enforced
        assert len(R.read_csv(run_dir / R.REQUESTS)) == 3
        assert man["links_after"]["links"]
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", user], capture_output=True, check=False)
        shutil.rmtree(udir, ignore_errors=True)
        down = run_cli("local", "down", "--name", name, env=env)
        assert down.returncode == 0, down.stderr
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}
    assert not sudoers.exists() and not udir.exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
