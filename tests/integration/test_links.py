"""Link shaping measured on the receiving side, per direction, on the local testbed."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import pytest

from testbed.errors import Unsupported
from testbed.lab.inventory import bs_runner_for, load_inventory, ssh_runner_for
from testbed.lab.runner import LocalRunner
from testbed.net.tc import LinkSpec, parse_htb_classes
from testbed.net.verify import PROBE_SRC, measure, put_bs_probe, shaper_for, verify
from tests.conftest import needs_testbed

pytestmark = needs_testbed

BAND = (0.85, 1.02)


def _assert_band(rows, rate_kbit, config):
    for g in rows:
        assert g.configured_kbit == pytest.approx(rate_kbit)
        ratio = g.measured_kbit / rate_kbit
        assert BAND[0] <= ratio <= BAND[1], (
            f"{g.device} {g.direction}: measured {g.measured_kbit:.0f} kbit/s over "
            f"{g.window_s:.2f} s = {ratio:.1%} of {rate_kbit:g} kbit/s; config {config}"
        )


def test_8mbit_then_in_place_change_to_2mbit(make_testbed):
    name, inv_path = make_testbed(devices=2, rate_kbit=8000)
    inv = load_inventory(inv_path)
    rows = verify(inv, seconds=2.5, devices=["dev1"])
    assert {g.direction for g in rows} == {"down", "up"}
    _assert_band(rows, 8000, {"testbed": name, "rate": "8mbit", "device": "dev1"})

    shaper = shaper_for(inv, LocalRunner())
    handles_before = shaper.qdisc_handles()
    sent_before = {s.device: s for s in shaper.show()}["dev1"]
    shaper.change("dev1", LinkSpec(2000), "both")
    after = {s.device: s for s in shaper.show()}
    # in place: the same qdiscs (kind and handle), counters not reset, other device untouched
    assert shaper.qdisc_handles() == handles_before
    assert after["dev1"].down_sent_bytes >= sent_before.down_sent_bytes > 0
    assert after["dev1"].up_sent_bytes >= sent_before.up_sent_bytes > 0
    assert (after["dev1"].down_kbit, after["dev1"].up_kbit) == (2000, 2000)
    assert (after["dev2"].down_kbit, after["dev2"].up_kbit) == (8000, 8000)
    rows = verify(inv, seconds=2.5, devices=["dev1"])
    _assert_band(rows, 2000, {"testbed": name, "rate": "2mbit in place", "device": "dev1"})


def test_one_direction_only(make_testbed):
    _, inv_path = make_testbed(devices=1, rate_kbit=8000)
    inv = load_inventory(inv_path)
    shaper = shaper_for(inv, LocalRunner())
    shaper.change("dev1", LinkSpec(4000), "up")
    st = shaper.show()[0]
    assert (st.down_kbit, st.up_kbit) == (8000, 4000)


def test_delay_loss_use_netem_or_fail_with_kernel_message(make_testbed):
    _, inv_path = make_testbed(devices=1, rate_kbit=8000)
    inv = load_inventory(inv_path)
    shaper = shaper_for(inv, LocalRunner())
    before = shaper.show()[0]
    try:
        shaper.change("dev1", LinkSpec(4000, delay_ms=5), "both")
    except Unsupported as exc:
        # this kernel has no netem: refused with the kernel's own words, nothing changed
        assert "qdisc kind is unknown" in str(exc)
        after = shaper.show()[0]
        assert (after.down_kbit, after.up_kbit, after.down_leaf, after.up_leaf) == (
            before.down_kbit,
            before.up_kbit,
            before.down_leaf,
            before.up_leaf,
        )
        pytest.skip(f"netem unavailable here (checked the refusal): {exc}")
    after = shaper.show()[0]
    assert after.down_leaf.startswith("netem") and after.down_kbit == 4000


def test_clear_then_set_rebuilds_tree(make_testbed):
    _, inv_path = make_testbed(devices=2, rate_kbit=8000)
    inv = load_inventory(inv_path)
    shaper = shaper_for(inv, LocalRunner())
    shaper.clear()
    assert all(s.down_kbit is None and s.up_kbit is None for s in shaper.show())
    assert not shaper.is_installed()
    shaper.change("dev2", LinkSpec(3000), "down")
    st = {s.device: s for s in shaper.show()}
    assert st["dev2"].down_kbit == 3000 and st["dev2"].up_kbit == 1e7
    assert st["dev1"].down_kbit == 1e7


def _together(inv, direction: str, seconds: float) -> dict:
    """Every device's transfer in ``direction`` at the same time, each counted by its receiver
    as `links verify` counts it; device -> Goodput."""
    out: dict = {}
    errors: list[BaseException] = []
    with ExitStack() as stack:
        bs = stack.enter_context(bs_runner_for(inv))
        bs_probe = put_bs_probe(inv, bs)
        remotes = {}
        for dev in inv.devices:
            remotes[dev.name] = stack.enter_context(ssh_runner_for(inv, dev))
            remotes[dev.name].put(PROBE_SRC, f"{dev.workdir}/.testbed/netprobe.py")

        def one(dev) -> None:
            try:
                out[dev.name] = measure(
                    inv,
                    dev,
                    direction,
                    seconds,
                    bs,
                    remotes[dev.name],
                    bs_probe,
                    f"{dev.workdir}/.testbed/netprobe.py",
                    None,
                    port=0,  # at the same time: a port of its own (the BS end listens for each)
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(d,)) for d in inv.devices]
        for th in threads:
            th.start()
        for th in threads:
            th.join(seconds + 90)
    if errors:
        raise errors[0]
    return out


CELL_KBIT = 4000.0
DEVICE_KBIT = 50000.0


def test_cell_rate_caps_two_devices_together(make_testbed):
    """bs.cell_rate: two devices, each allowed 50 Mbit/s, sending at once under a 4 Mbit/s
    cell: together they get the cell's rate (each about half), in each direction."""
    name, inv_path = make_testbed(devices=2, rate_kbit=DEVICE_KBIT)
    inv_path.write_text(inv_path.read_text().replace("[bs]\n", '[bs]\ncell_rate = "4mbit"\n', 1))
    inv = load_inventory(inv_path)
    assert inv.bs.cell_rate_kbit == CELL_KBIT
    shaper = shaper_for(inv, LocalRunner())
    shaper.setup([LinkSpec(DEVICE_KBIT)] * 2, [LinkSpec(DEVICE_KBIT)] * 2)
    # tc: the cell class carries the cell's rate; each device keeps its own rate
    for dev in (inv.bs.interface, inv.bs.ifb):
        cls = {
            c.classid: c
            for c in parse_htb_classes(
                LocalRunner().run(["tc", "class", "show", "dev", dev]).stdout
            )
        }
        assert (cls["1:1"].rate_kbit, cls["1:1"].ceil_kbit) == (CELL_KBIT, CELL_KBIT), dev
    assert {(s.device, s.down_kbit, s.up_kbit) for s in shaper.show()} == {
        (d, DEVICE_KBIT, DEVICE_KBIT) for d in ("dev1", "dev2")
    }
    for direction in ("down", "up"):
        got = _together(inv, direction, seconds=5.0)
        total = sum(g.measured_kbit for g in got.values())
        config = {
            "testbed": name,
            "direction": direction,
            "measured": {d: round(g.measured_kbit) for d, g in got.items()},
        }
        assert set(got) == {"dev1", "dev2"}
        # the sum is the cell's rate (less TCP/IP overhead, as for one link) ...
        assert 0.85 * CELL_KBIT <= total <= 1.05 * CELL_KBIT, (total, config)
        # ... shared: each device well below its own 50 Mbit/s, neither starved
        assert all(0.25 * CELL_KBIT <= g.measured_kbit <= 0.75 * CELL_KBIT for g in got.values()), (
            config
        )
