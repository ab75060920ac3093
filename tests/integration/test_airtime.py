"""Links charge messages their airtime (issue 15): on the local testbed, lone messages after an
idle second pay (delivery - 1-byte RTT) close to bytes*8/rate in both directions, sustained
goodput stays at the rate, and the offloads the shaper turns off come back on `links clear`
and `local down`."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest

from testbed.lab.inventory import load_inventory
from testbed.lab.local import Names
from testbed.lab.runner import LocalRunner
from testbed.net.tc import LinkSpec, parse_offloads
from testbed.net.verify import shaper_for, verify, verify_airtime
from tests.conftest import needs_testbed, run_cli

pytestmark = needs_testbed

#: (delivery - RTT) / airtime by size: every repeat pays at least the low end (the fidelity
#: claim: no lone message at line rate); the median of the repeats stays under the high end.
#: A single repeat may overshoot by SLACK: a 2-core CI host delays one delivery now and then
#: (seen: 1.101, 57.8 ms against 52.4 ms of airtime; and 1.439, 75.5 ms, while another test's
#: idle agents still ran), never below the airtime; a link that overcharges shows in the median.
BANDS = {8192: (0.80, None), 65536: (0.95, 1.10)}
SLACK = 0.5
GOODPUT_BAND = (0.85, 1.02)


def _features(dev: str, netns: str | None = None) -> dict:
    return parse_offloads(LocalRunner(netns=netns).run(["ethtool", "-k", dev]).stdout)


@pytest.mark.parametrize("rate_kbit", [2000.0, 10000.0])
def test_lone_messages_pay_their_airtime(make_testbed, rate_kbit):
    name, inv_path = make_testbed(devices=1, rate_kbit=rate_kbit)
    inv = load_inventory(inv_path)
    info, rows = verify_airtime(inv, sizes=tuple(BANDS), repeats=3, idle_s=1.0)
    assert info["mode"] in ("tbf", "netem") and info["offloads_summary"] == "off", info
    assert len(rows) == 2 * len(BANDS) * 3
    bad = []
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        assert r.configured_kbit == pytest.approx(rate_kbit) and r.shaping == info["mode"]
        groups.setdefault((r.direction, r.bytes), []).append(r.ratio)
        lo, hi = BANDS[r.bytes]
        if not (r.ratio >= lo and (hi is None or r.ratio <= hi + SLACK)):
            bad.append(
                f"{r.direction} {r.bytes} B repeat {r.repeat}: ratio {r.ratio:.3f} "
                f"(delivery {r.delivery_ms:.2f} ms, RTT {r.rtt_ms:.3f} ms, airtime "
                f"{r.airtime_ms:.2f} ms)"
            )
    for (direction, size), ratios in groups.items():
        hi = BANDS[size][1]
        if hi is not None and statistics.median(ratios) > hi:
            bad.append(f"{direction} {size} B: median ratio {statistics.median(ratios):.3f}")
    assert not bad, {
        "testbed": name,
        "rate_kbit": rate_kbit,
        "mode": info["mode"],
        "outside the band": bad,
    }


def test_sustained_goodput_stays_at_the_rate(make_testbed):
    name, inv_path = make_testbed(devices=1, rate_kbit=2000)
    inv = load_inventory(inv_path)
    shaper = shaper_for(inv, LocalRunner())
    handles = shaper.qdisc_handles()
    for rate in (2000.0, 8000.0, 50000.0):
        if rate != 2000.0:
            shaper.change("dev1", LinkSpec(rate), "both")  # in place: class and leaf
        rows = verify(inv, seconds=2.5)
        for g in rows:
            assert g.configured_kbit == pytest.approx(rate)
            ratio = g.measured_kbit / rate
            assert GOODPUT_BAND[0] <= ratio <= GOODPUT_BAND[1], (
                f"{g.direction}: {g.measured_kbit:.0f} kbit/s over {g.window_s:.2f} s = "
                f"{ratio:.1%} of {rate:g} kbit/s (testbed {name})"
            )
    assert shaper.qdisc_handles() == handles


def test_offloads_off_while_shaped_and_restored_on_clear_and_down(cli_testbed):
    env, name, inv = cli_testbed(devices=1)
    n = Names(name)
    tracked = ("tso", "gso", "gro")
    # both ends of the device's veth, the BS bridge and the ifb: nothing makes super-packets
    for dev, ns in ((n.veth(1), None), ("eth0", n.netns(1)), (n.bridge, None), (n.ifb, None)):
        f = _features(dev, ns)
        assert not any(f[k].on for k in tracked if k in f), (dev, f)
    shown = json.loads(
        run_cli(
            "links", "set", str(inv), "dev1", "--rate", "2mbit", "--format", "json", env=env
        ).stdout
    )
    restore = shown["shaping"]["offloads_restore"]
    assert shown["shaping"]["offloads_summary"] == "off" and shown["shaping"]["warning"] is None
    assert set(restore) >= {"tso", "gso"}, restore  # what the bridge had on before shaping
    # links clear: the bridge's offloads are on again, the ifb (and its record) gone
    res = run_cli("links", "clear", str(inv), env=env)
    assert res.returncode == 0, res.stderr
    f = _features(n.bridge)
    assert all(f[k].on for k in restore), f
    assert (
        subprocess.run(["ip", "link", "show", n.ifb], capture_output=True, check=False).returncode
        != 0
    )
    # shaped again (links set on a clear BS builds the tree): off again, and recorded
    res = run_cli("links", "set", str(inv), "dev1", "--rate", "10mbit", env=env)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    assert not any(_features(n.bridge)[k].on for k in restore)
    # local down puts the bridge's offloads back before it removes the bridge
    down = run_cli("local", "down", "--name", name, "--format", "json", env=env)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["removed"]["offloads_restored"] == restore
