"""The arm64 device's pure parts: apt mirror, L4T release file, recipe hash, binfmt flags, which
devices are arm64, the option checks, the sshd launch script."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.lab import arm64 as a64
from testbed.lab.local import Arm64Spec, check_arm64

DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822_and_one_line_sources():
    # the security stanza first: only the stanza whose Suites has the suite itself counts
    sec_first = "\n\n".join(reversed(DEB822.split("\n\n")))
    assert a64.mirror_from_sources([sec_first]) == "http://deb.debian.org/debian"
    one_line = (
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n"
    )
    assert a64.mirror_from_sources([one_line]) == "http://mirror.example/debian"
    assert a64.mirror_from_sources(["deb https://x/apt cloud-sdk-bookworm main\n"]) is None
    assert a64.mirror_from_sources([]) is None


def test_l4t_release_text_and_bad_release():
    text = a64.l4t_release_text("R35.4.1")
    assert text.splitlines()[0].startswith("# R35 (release), REVISION: 4.1, GCID: ")
    assert "EABI: aarch64" in text.splitlines()[0]
    assert a64.l4t_release_text("R36.4").startswith("# R36 (release), REVISION: 4, ")
    for bad in ("35.4.1", "R35", "jetpack6", "R35.4.1.2"):
        with pytest.raises(ConfigError, match="^--l4t: "):
            a64.l4t_release_text(bad)


def test_recipe_hash_names_the_root_and_changes_with_the_recipe():
    r = a64.recipe()
    h = a64.recipe_hash(r)
    assert len(h) == 12 and h == a64.recipe_hash(dict(reversed(list(r.items()))))
    assert a64.recipe_hash({**r, "system_wheels": ["torch==2.5.1"]}) != h
    assert a64.root_path(Path("/c")) == Path(f"/c/arm64-bookworm-{h}")


def test_binfmt_flags():
    entry = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n"
    assert a64.binfmt_flags(entry) == "POF"
    assert a64.binfmt_flags("enabled\ninterpreter /x\n") == ""


def test_which_devices_are_arm64_and_option_checks():
    spec = Arm64Spec(count=2)
    assert [i for i in range(1, 5) if spec.is_arm64(i, 4)] == [3, 4]
    assert not any(Arm64Spec().is_arm64(i, 3) for i in range(1, 4))
    check_arm64(3, 3, "R36.4.0")
    with pytest.raises(ConfigError, match="^--arm64: must be 0..2"):
        check_arm64(2, 3, None)
    with pytest.raises(ConfigError, match="^--l4t: only arm64 devices"):
        check_arm64(2, 0, "R35.4.1")
    with pytest.raises(ConfigError, match="^--l4t: "):
        check_arm64(2, 1, "35.4")


def test_sshd_argv_mounts_in_a_private_namespace_then_execs_the_roots_sshd():
    dev = Path("/s/tb/devices/dev2")
    dirs = a64.device_root_dirs(Path("/s/tb"), "dev2")
    argv = a64.sshd_argv(Path("/c/root"), dirs, dev, ["-D", "-f", f"{dev}/sshd_config"])
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "sh"]
    script = argv[-1]
    assert script.startswith("set -e; mount -t overlay overlay -o ")
    assert "lowerdir=/c/root,upperdir=/s/tb/roots/dev2/upper,workdir=/s/tb/roots/dev2/ovlwork" in (
        script
    )
    # the device folder appears at its own path inside the root; the sshd is the root's own
    assert f"mount --bind {dev} /s/tb/roots/dev2/merged{dev}" in script
    assert script.endswith(
        f"exec chroot /s/tb/roots/dev2/merged /usr/sbin/sshd -D -f {dev}/sshd_config"
    )
