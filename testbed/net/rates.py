"""A decision epoch's rate changes on their way to the kernel, and what it enforces after them.

:meth:`~testbed.net.shaper.TcShaper.set_rates` plans the epoch's ``tc`` command lines, then sends
them one of two ways, each followed by a read-back of both interfaces' classes and leaves:

* over rtnetlink (:func:`apply_netlink`), where the BS is this machine and we are root: one
  send, the acks, the kernel's dumps (tens to hundreds of microseconds);
* through one ``tc -j -batch -`` process, its lines on standard input (:func:`batch_input`,
  read by :func:`read_batch`; with ``bs.sudo``, ``sudo -n tc -j -batch -``: no shell, so a
  sudoers line naming that command allows it) elsewhere — a BS over SSH or sudo, or a netem
  leaf to change (milliseconds).

Both return device -> (down, up) kbit/s as the kernel reports them (:func:`~testbed.net.tc.
enforced_kbit`) and the leaves they saw, for the next epoch's plan.
"""

from __future__ import annotations

import errno
import shlex
from collections.abc import Mapping, Sequence

from ..errors import CommandFailed
from ..lab.runner import Result
from . import netlink
from .tc import Leaf, enforced_kbit, leaves_by_class, parse_htb_classes, split_batch_listing

#: (interface, class minor) -> the leaf under that class
LeafCache = dict[tuple[str, int], Leaf]
#: device -> (down, up) kbit/s the kernel enforces
Enforced = dict[str, tuple[float, float]]


def under_root(handle: int, parent: int) -> bool:
    """A qdisc whose parent is a class of our root HTB (``1:N``): a device class's leaf."""
    return parent >> 16 == 1 and parent & 0xFFFF != 0


def of_root(handle: int, parent: int) -> bool:
    """A class of our root HTB (``1:N``)."""
    return handle >> 16 == 1


def leaf_from_netlink(q: netlink.TcObject) -> Leaf | None:
    """A leaf from the kernel's qdisc dump, as :func:`~testbed.net.tc.parse_leaf` reads it from
    ``tc -j``; None for kinds whose options are not decoded here (netem)."""
    handle = netlink.format_handle(q.handle)
    if q.kind == "tbf":
        burst = q.burst
        return Leaf("tbf", handle, q.rate_kbit, burst_bytes=None if burst is None else int(burst))
    if q.kind == "netem":
        return None
    return Leaf(q.kind, handle)


def netlink_changes(commands: Sequence[Sequence[str]]) -> list[netlink.Change] | None:
    """The tc command lines as netlink changes (the very values tc would send); None where a
    line is beyond netlink (a netem leaf)."""
    try:
        return [netlink.change_from_tc_argv(argv) for argv in commands]
    except netlink.NotExpressible:
        return None


# -- through tc -batch ----------------------------------------------------------------------------
#: the argv that reads :func:`batch_input` on its standard input
BATCH_ARGV = ("tc", "-j", "-batch", "-")


def batch_input(commands: Sequence[Sequence[str]], iface: str, ifb: str) -> str:
    """The standard input of one ``tc -j -batch -`` (:data:`BATCH_ARGV`): the changes, then the
    listings of both interfaces (under ``-j`` the class listings stay text and each qdisc
    listing is one JSON line)."""
    lines = [shlex.join(argv[1:]) for argv in commands]
    lines += [
        f"class show dev {iface}",
        f"qdisc show dev {iface}",
        f"class show dev {ifb}",
        f"qdisc show dev {ifb}",
    ]
    return "\n".join(lines) + "\n"


def read_batch(
    res: Result, host: str, iface: str, ifb: str, minors: Mapping[str, int]
) -> tuple[Enforced, LeafCache]:
    """What :func:`batch_input`'s run says is enforced for each device of ``minors`` (device
    -> class minor), and the leaves it listed."""
    parts = split_batch_listing(res.stdout)
    if len(parts) != 2:
        raise CommandFailed(
            host,
            BATCH_ARGV,
            res.returncode,
            res.stdout,
            "tc's listings of both interfaces not found",
        )
    by_dir = []
    cache: LeafCache = {}
    for d, (text, qdiscs) in zip((iface, ifb), parts):
        lv = leaves_by_class(qdiscs)
        cache.update({(d, m): lf for m, lf in lv.items()})
        by_dir.append(({c.classid: c.ceil_kbit for c in parse_htb_classes(text)}, lv))
    out: Enforced = {}
    for dev, minor in minors.items():
        cid = f"1:{minor:x}"
        got = []
        for classes, lv in by_dir:
            if cid not in classes:
                raise CommandFailed(
                    host,
                    BATCH_ARGV,
                    res.returncode,
                    res.stdout,
                    f"class {cid} of {dev} missing from tc's listing",
                )
            got.append(enforced_kbit(classes[cid], lv.get(minor)))
        out[dev] = (got[0], got[1])
    return out, cache


# -- over rtnetlink -------------------------------------------------------------------------------
def apply_netlink(
    nl: netlink.TcNetlink,
    host: str,
    devs: tuple[str, str],
    changes: Sequence[netlink.Change],
    minors: Mapping[str, int],
) -> tuple[Enforced, LeafCache | None]:
    """The changes in one send, the acks, then class dumps of both interfaces ``devs``
    (down, up) and one qdisc dump, read like tc's listings. The leaves come back as None where
    one is only read fully by tc (netem): re-read next time."""
    nl.forget_interfaces()  # a re-made ifb has a new index
    nl.change(changes)
    qdiscs = nl.qdiscs_of(devs, stats=False, where=under_root)
    by_dir = []
    cache: LeafCache | None = {}
    for d in devs:
        lv: dict[int, Leaf] = {}
        for q in qdiscs[d]:
            lf = leaf_from_netlink(q)
            if lf is None:
                cache = None
            else:
                lv[q.parent & 0xFFFF] = lf
        if cache is not None:
            cache.update({(d, m): lf for m, lf in lv.items()})
        classes = {
            c.handle: c.ceil_kbit
            for c in nl.classes(d, stats=False, where=of_root)
            if c.kind == "htb"
        }
        by_dir.append((classes, lv))
    return _enforced_netlink(host, devs, by_dir, minors), cache


def _enforced_netlink(
    host: str,
    devs: tuple[str, str],
    by_dir: Sequence[tuple[Mapping[int, float], Mapping[int, Leaf]]],
    minors: Mapping[str, int],
) -> Enforced:
    """Device -> (down, up) kbit/s from the dumps (class handle -> ceil, minor -> leaf)."""
    out: Enforced = {}
    for dev, minor in minors.items():
        got = []
        for d, (classes, lv) in zip(devs, by_dir):
            kbit = classes.get(netlink.parse_handle(f"1:{minor:x}"))
            if kbit is None:
                raise netlink.TcNetlinkError(
                    host,
                    [
                        (
                            f"{d} class htb 1:{minor:x} of {dev}",
                            errno.ENOENT,
                            "missing from the kernel's listing",
                        )
                    ],
                )
            got.append(enforced_kbit(kbit, lv.get(minor)))
        out[dev] = (got[0], got[1])
    return out
