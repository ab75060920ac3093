"""Fixtures of the end-to-end tests: one local testbed that the tests whose recipes set their
own links share (the others make their own with ``tests.conftest``'s factories)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import leftovers, unique_name

#: the shared testbed's link rate, both ways, set again before each test that uses it
SHARED_KBIT = 1_000_000.0


@pytest.fixture(scope="package")
def shared_testbed_session(tmp_path_factory):
    """One 3-device local testbed (1 Gbit/s links) shared by the end-to-end tests whose recipes
    set their own links and that need nothing else of a fresh one: (env, inventory path). The
    first run provisions its agents; a later run finds them installed and running, as a lab's
    second run does. Taken down after the last end-to-end test (package scope: its idle agents
    must not load the host under the timing tests that follow), leaving nothing behind."""
    from testbed.lab import local

    d = tmp_path_factory.mktemp("shared")
    state = d / "state"
    state.mkdir()
    env = {"TESTBED_STATE_DIR": str(state)}
    name = unique_name("s")

    def with_state(fn, *args):
        old = os.environ.get("TESTBED_STATE_DIR")
        os.environ["TESTBED_STATE_DIR"] = str(state)
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop("TESTBED_STATE_DIR", None)
            else:
                os.environ["TESTBED_STATE_DIR"] = old

    try:
        res = with_state(local.up, name, 3, SHARED_KBIT, d / f"{name}.inventory.toml")
        yield env, Path(res["inventory"])
    finally:
        with_state(local.down, name)
    assert leftovers(name) == {"netns": [], "links": [], "processes": []}


@pytest.fixture
def shared_testbed(shared_testbed_session):
    """The shared testbed (:func:`shared_testbed_session`) with every link shaped afresh at
    :data:`SHARED_KBIT` both ways: what an earlier test set or cleared (a run restores the
    rates it found; `links clear` removes the shaping) does not slow this one's shard pushes
    or change its starting point."""
    from testbed.lab.inventory import load_inventory
    from testbed.lab.runner import LocalRunner
    from testbed.net.tc import LinkSpec
    from testbed.net.verify import shaper_for

    env, inv = shared_testbed_session
    lab = load_inventory(inv)
    links = [LinkSpec(SHARED_KBIT) for _ in lab.devices]
    shaper_for(lab, LocalRunner()).setup(links, links)
    return env, inv
