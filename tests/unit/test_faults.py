"""Fault schedules: parsing (every bad entry named) and the injector's order of effects."""

from __future__ import annotations

import threading
import time

import pytest

from testbed.run.faults import Effects, FaultInjector, check_devices, parse_faults


def test_parse_defaults_and_ids():
    fs = parse_faults(
        [
            {"at_request": 2, "device": "dev2", "action": "kill"},
            {"at_s": 1.5, "device": "dev1", "action": "stop", "for_s": 2},
            {
                "at_request": 3,
                "device": "dev3",
                "action": "link",
                "rate": "1mbit",
                "for_requests": 2,
            },
            {"at_request": 5, "device": "dev2", "action": "restart"},
        ]
    )
    assert [f.id for f in fs] == ["f0-kill-dev2", "f1-stop-dev1", "f2-link-dev3", "f3-restart-dev2"]
    assert fs[1].at_s == 1.5 and fs[1].for_s == 2.0 and fs[1].at_request is None
    assert fs[2].rate_kbit == 1000.0 and fs[2].for_requests == 2
    assert parse_faults([{"at_request": 0, "device": "d", "action": "link"}])[0].rate_kbit == 8.0
    assert check_devices(fs, ["dev1", "dev2"], "r.toml") == [
        "r.toml: faults.events: f2-link-dev3: no device 'dev3' in this trial (devices: dev1, dev2)"
    ]


@pytest.mark.parametrize(
    "events, msg",
    [
        ({"at_request": 1}, "must be a list of tables"),
        ([3], "[0]: must be a table"),
        (
            [{"at_request": 1, "device": "d", "action": "melt"}],
            "[0].action: must be one of kill, stop",
        ),
        ([{"at_request": 1, "device": "", "action": "kill"}], "[0].device: must be a device name"),
        ([{"device": "d", "action": "kill"}], "[0]: give exactly one of at_request, at_s"),
        ([{"at_request": 1, "at_s": 1, "device": "d", "action": "kill"}], "exactly one of"),
        (
            [{"at_request": -1, "device": "d", "action": "kill"}],
            "[0].at_request: must be an integer >= 0",
        ),
        ([{"at_s": 1, "device": "d", "action": "restart"}], "[0]: restart takes at_request"),
        (
            [{"at_request": 1, "device": "d", "action": "kill", "for_s": 1}],
            "kill takes no duration",
        ),
        ([{"at_request": 1, "device": "d", "action": "stop", "rate": "1mbit"}], "stop takes for_s"),
        ([{"at_request": 1, "device": "d", "action": "link", "rate": "fast"}], "[0].rate:"),
        (
            [{"at_request": 1, "device": "d", "action": "link", "for_s": 0}],
            "[0].for_s: must be a number > 0",
        ),
        (
            [{"at_request": 1, "device": "d", "action": "kill", "when": 1}],
            "[0]: unknown key 'when'",
        ),
    ],
)
def test_parse_errors_name_the_entry(events, msg):
    with pytest.raises(ValueError) as e:
        parse_faults(events)
    assert msg in str(e.value)


class Log:
    def __init__(self) -> None:
        self.effects: list[tuple] = []
        self.rows: list[dict] = []
        self.fail_restart = False

    def fx(self) -> Effects:
        def signal(d, s):
            self.effects.append(("signal", d, s))
            return f"SIG{s}"

        def rate(d, k):
            self.effects.append(("rate", d, k))
            return "ok"

        def restart(d):
            self.effects.append(("restart", d))
            if self.fail_restart:
                raise RuntimeError("ssh down")
            return "restarted"

        return Effects(signal, rate, restart)


def test_injector_request_schedule_and_finish():
    log = Log()
    inj = FaultInjector(
        parse_faults(
            [
                {"at_request": 1, "device": "a", "action": "kill"},
                {"at_request": 2, "device": "b", "action": "link", "for_requests": 2},
                {"at_request": 3, "device": "c", "action": "stop", "until_request": 5},
                {"at_request": 4, "device": "a", "action": "restart"},
            ]
        ),
        log.fx(),
        log.rows.append,
    )
    inj.start()
    active = []
    for i in range(7):
        inj.before_request(i)
        active.append(inj.active())
    assert active == [
        "",
        "f0-kill-a",
        "f0-kill-a f1-link-b",
        "f0-kill-a f1-link-b f2-stop-c",
        "f2-stop-c",
        "",
        "",
    ]
    assert log.effects == [
        ("signal", "a", "KILL"),
        ("rate", "b", 8.0),
        ("signal", "c", "STOP"),
        ("rate", "b", None),
        ("restart", "a"),
        ("signal", "c", "CONT"),
    ]
    ev = [(r["fault"], r["event"], r["request"], r["ok"]) for r in log.rows]
    assert ev == [
        ("f0-kill-a", "injected", 1, 1),
        ("f1-link-b", "injected", 2, 1),
        ("f2-stop-c", "injected", 3, 1),
        ("f1-link-b", "cleared", 4, 1),
        ("f3-restart-a", "injected", 4, 1),
        ("f0-kill-a", "cleared", 4, 1),
        ("f2-stop-c", "cleared", 5, 1),
    ]
    assert inj.finish() == []


def test_injector_timer_fault_and_finish_clears_everything():
    log = Log()
    log.fail_restart = True
    inj = FaultInjector(
        parse_faults(
            [
                {"at_s": 0.05, "device": "a", "action": "stop", "for_s": 30},
                {"at_request": 0, "device": "b", "action": "kill"},
            ]
        ),
        log.fx(),
        log.rows.append,
    )
    inj.start()
    inj.before_request(0)
    deadline = time.monotonic() + 5
    while "f0-stop-a" not in inj.active() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inj.active() == "f0-stop-a f1-kill-b"
    assert inj.finish() == ["b"]  # the killed device is restarted
    assert inj.active() == ""
    assert ("signal", "a", "CONT") in log.effects and ("restart", "b") in log.effects
    failed = [r for r in log.rows if not r["ok"]]
    assert (
        len(failed) == 1
        and failed[0]["fault"] == "f1-kill-b"
        and failed[0]["event"] == "cleared"
        and "ssh down" in failed[0]["detail"]
    )
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
