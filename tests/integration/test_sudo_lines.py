"""Every command the shaper runs on a BS with ``bs.sudo`` is one ``testbed init``'s sudoers lines
allow (or a read that needs no root), and shaping through them works: a real tree in a
namespace, set up, changed, re-rated in one batch and cleared, every command recorded."""

from __future__ import annotations

import fnmatch
import subprocess

import pytest

from testbed.lab import init as I
from testbed.lab.runner import LocalRunner, needs_root
from testbed.net import tc
from testbed.net.shaper import TcShaper
from tests.conftest import needs_testbed, unique_name

pytestmark = [needs_testbed, pytest.mark.root]


class RecordingRunner(LocalRunner):
    """A LocalRunner (in a namespace) that records each command, whether it asked for sudo, and
    its standard input."""

    def __init__(self, netns: str):
        super().__init__(netns=netns, host="bs")
        self.calls: list[tuple[list[str], bool, str | None]] = []

    def run(self, argv, *, sudo=False, input=None, **kw):
        self.calls.append((list(argv), sudo, input))
        return super().run(argv, sudo=sudo, input=input, **kw)


def _allowed(argv: list[str]) -> bool:
    """Whether one of the BS's sudoers commands matches ``argv`` (sudoers' ``*`` matches any
    text, spaces included, as fnmatch's does)."""
    return any(
        argv[0] == tool and fnmatch.fnmatchcase(" ".join(argv[1:]), args)
        for tool, args in I.BS_COMMANDS
    )


def _ip(*argv: str, ns: str | None = None) -> None:
    pre = ["ip", "netns", "exec", ns] if ns else []
    subprocess.run([*pre, "ip", *argv], check=True, capture_output=True)


def test_every_sudo_command_of_the_shaper_fits_the_sudoers_lines():
    bs, peer = unique_name("sb"), unique_name("sp")
    try:
        _ip("netns", "add", bs)
        _ip("netns", "add", peer)
        _ip("link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", peer, ns=bs)
        _ip("link", "set", "v0", "up", ns=bs)
        runner = RecordingRunner(bs)
        addrs = ["10.9.0.11", "10.9.0.12"]
        sh = TcShaper(runner, "v0", "ifb0", addrs, ["dev1", "dev2"], sudo=True)
        sh.netlink = False  # as a user who is not root: the tc CLI
        sh.setup([tc.LinkSpec(8000)] * 2, [tc.LinkSpec(4000)] * 2)
        sh.change("dev1", tc.LinkSpec(2000), "down")
        assert sh.set_rates({"dev1": (1500.0, 700.0), "dev2": (900.0, 800.0)}) == {
            "dev1": (1500.0, 700.0),
            "dev2": (900.0, 800.0),
        }
        shown = {s.device: (s.down_kbit, s.up_kbit) for s in sh.show()}
        assert shown == {"dev1": (1500.0, 700.0), "dev2": (900.0, 800.0)}
        sh.clear()
        assert not sh.is_installed()
    finally:
        for ns in (bs, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    as_root = [(a, i) for a, s, i in runner.calls if s]
    as_user = [a for a, s, _ in runner.calls if not s]
    assert as_root and as_user
    # reads run as the user, through a shell that adds the sbin folders to its PATH
    assert all(a[:2] == ["sh", "-c"] and "/usr/sbin" in a[2] for a in as_user), as_user
    as_user = [a[3:] for a in as_user]
    bad = [a for a, _ in as_root if not _allowed(a)]
    assert bad == [], bad
    assert [a for a in as_user if needs_root(a)] == []
    # tc changes go as a batch on standard input, one per tc change
    batches = [i for a, i in as_root if a[0] == "tc"]
    assert batches and all(i and i.endswith("\n") for i in batches)
    assert any(a == ["tc", "-j", "-batch", "-"] for a, _ in as_root)
    assert {a[0] for a, _ in as_root} >= {"tc", "ip"}
