"""Link shaping on the base station with Linux ``tc`` — both directions, per device.

All shaping happens on the BS host, so devices need no tc support at all:

* **downlink** (BS → device): an HTB qdisc on the BS interface's egress; one class per
  device under a parent class (the cell's total bandwidth), selected by a u32 filter on the
  device's destination address, and under each class a leaf that charges every packet.
* **uplink** (device → BS): the BS interface's ingress is redirected (``mirred``) to an
  ifb device that carries the same HTB tree, with u32 filters on the source address.

The leaf depends on the shaping mode (``bs.shaping`` in the inventory, default ``auto``):

* ``netem``: a netem leaf with ``rate`` (plus delay/loss when asked): every packet, the
  first of a burst included, waits for its own transmission time;
* ``tbf``: a TBF leaf whose bucket holds one frame (MTU + 14 bytes) plus
  :data:`.tc.TBF_SLACK_US` of the rate (for timer lateness): every packet but the first of a
  burst after an idle spell waits for its transmission time; delay/loss make the leaf a
  netem with ``rate`` (where the kernel has netem);
* ``htb``: the HTB class alone (pfifo leaf; netem without rate for delay/loss) — its bucket
  (:data:`.tc.BURST_MS` of the rate, at least :data:`.tc.MIN_BURST_BYTES`) lets short messages
  through almost free;
* ``auto``: ``netem`` where the kernel has it (probed on the ifb), else ``tbf``.

Where a leaf carries the rate, the HTB class only classifies and shares the cell
(:func:`.tc.class_ceil_kbit`); in htb mode it is the shaper. Segmentation
and receive offloads (GSO/TSO/GRO, ...) hand a qdisc super-packets of up to 64 KiB; they are
turned off on the BS interface and the ifb while shaping is installed, and the BS interface's
previous state is put back by :meth:`TcShaper.clear`. The mode, the bucket and the offloads
turned off are recorded in the ifb's alias (``ip link set ifb alias``), so any later process
(``links set``, ``links clear``, a run) reads them back from the kernel.

Changing a rate is in place: ``tc qdisc change`` of a rate-carrying leaf, or ``tc class
change`` of the class in htb mode (no qdisc re-created, no loss burst, counters keep running). A
decision epoch's changes (:meth:`TcShaper.set_rates`) go straight to the kernel over rtnetlink
(:mod:`testbed.net.netlink`) where the BS is this machine and we are root; elsewhere (a lab BS
over SSH), and for netem leaves, through one ``tc -batch`` process.

The command builders and parsers are pure (:mod:`testbed.net.tc`: they return argv lists and
read tc's answers); :class:`TcShaper` applies them through a :class:`~testbed.lab.runner.Runner`,
so the same code shapes the local testbed and a lab's BS over SSH (with sudo). It reads the BS
as its base :class:`~testbed.net.tcread.TcReader` does, and sends an epoch's rate changes the
ways :mod:`testbed.net.rates` gives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ..errors import CommandFailed, ConfigError, Unsupported
from ..lab.runner import LocalRunner, Runner
from . import netlink, offloads
from .rates import BATCH_ARGV, apply_netlink, batch_input, netlink_changes, read_batch
from .tc import (
    DEFAULT_MTU,
    DIRECTIONS,
    UNLIMITED_KBIT,
    Leaf,
    LinkSpec,
    ShapingConfig,
    build_class_change_command,
    build_clear_commands,
    build_ifb_commands,
    build_netem_probe_commands,
    build_shaping_commands,
    cell_share_kbit,
    class_minor,
    leaf_bucket_bytes,
    leaf_command,
    leaf_handle,
    leaf_kind,
    netem_error,
    netem_message,
    resolve_mode,
)
from .tcread import TcReader

#: one step of :meth:`TcShaper.change`: (interface, the leaf's tc command, the leaf it replaces)
LeafStep = tuple[str, list[str], Leaf | None]


class TcShaper(TcReader):
    """Applies shaping on the BS through a runner.

    Parameters
    ----------
    runner:
        Runs commands on the BS (``LocalRunner`` or ``SshRunner``).
    iface, ifb:
        BS interface toward the devices, and the ifb device for the uplink.
    addrs:
        Device addresses, in inventory order (class ``1:100+i`` is device ``i``).
    names:
        Device names (for messages and :meth:`show`).
    sudo:
        Changes through ``sudo -n`` (a lab BS's user with ``testbed init``'s sudoers lines;
        :func:`~testbed.lab.runner.run_bs`).
    shaping:
        One of :data:`.tc.SHAPING_MODES` (the inventory's ``bs.shaping``); used by
        :meth:`setup`. A tree already installed keeps the mode it was built in.
    """

    def __init__(
        self,
        runner: Runner,
        iface: str,
        ifb: str,
        addrs: Sequence[str],
        names: Sequence[str],
        cell_rate_kbit: float | None = None,
        sudo: bool = False,
        shaping: str = "auto",
    ):
        super().__init__(runner, iface, ifb, addrs, names, cell_rate_kbit, sudo, shaping)
        #: set_rates over rtnetlink where it can (False, or TESTBED_TC_NETLINK=0: tc CLI)
        self.netlink = os.environ.get("TESTBED_TC_NETLINK", "1") != "0"
        self._nl: netlink.TcNetlink | None = None

    # -- set-up and tear-down -----------------------------------------------------------------
    def setup(self, down: Sequence[LinkSpec], up: Sequence[LinkSpec]) -> None:
        """Shape every link from scratch: the ifb, the mode (netem probed on the ifb for
        ``auto``/``netem``), the record, offloads off, both trees. On any failure, the BS is
        left unshaped (never half-applied, offloads back) and the kernel's message is
        raised."""
        self.clear()
        try:
            cfg = self._install(down, up)
        except CommandFailed as exc:
            self.clear()
            if netem_error(exc.stderr):
                raise Unsupported(netem_message(self.runner.host, exc.stderr)) from None
            raise
        except BaseException:
            self.clear()
            raise
        self._cfg = cfg
        self._leaf_cache = None

    def _install(self, down: Sequence[LinkSpec], up: Sequence[LinkSpec]) -> ShapingConfig:
        """:meth:`setup`'s work on a clear BS; the caller clears again where it fails."""
        for argv in build_ifb_commands(self.ifb):
            self._run(argv)
        netem = None
        if self.shaping in ("auto", "netem"):
            netem, why = self._probe_netem()
            if self.shaping == "netem" and not netem:
                kernel = why.strip().splitlines()[-1] if why.strip() else "netem unavailable"
                raise Unsupported(
                    f'{self.runner.host}: bs.shaping = "netem" needs the netem qdisc and '
                    f'this kernel refused it: "{kernel}" — the BS is left unshaped '
                    '(shaping = "auto" or "tbf" charge every packet with a TBF leaf)'
                )
        mode = resolve_mode(self.shaping, netem)
        mtu, _ = self._link(self.iface)
        cfg = offloads.record_and_turn_off(
            self.runner,
            self.iface,
            self.ifb,
            ShapingConfig(mode, leaf_bucket_bytes(mtu or DEFAULT_MTU), netem),
            self.sudo,
        )
        for argv in build_shaping_commands(
            self.iface, self.ifb, self.addrs, down, up, self.cell_rate_kbit, mode, cfg.bucket_bytes
        ):
            self._run(argv)
        return cfg

    def clear(self) -> dict[str, list[str]]:
        """Remove all our shaping (idempotent); the BS interface's offloads that set-up turned
        off are turned on again. Returns ``{"offloads_restored": [...]}``."""
        restored = self.restore_offloads()
        for argv in build_clear_commands(self.iface, self.ifb):
            self._run(argv, check=False)
        self._cfg = None
        self._leaf_cache = None
        return {"offloads_restored": restored}

    def restore_offloads(self) -> list[str]:
        """Turn on again the BS interface's offloads our record says set-up turned off (the
        record stays: :meth:`clear` removes it with the ifb). Returns those now on."""
        cfg = self._record_config()
        return (
            []
            if cfg is None
            else offloads.restore_offloads(self.runner, self.iface, cfg, self.sudo)
        )

    def _probe_netem(self) -> tuple[bool, str]:
        add, delete = build_netem_probe_commands(self.ifb)
        res = self._run(add, check=False)
        if res.returncode == 0:
            self._run(delete, check=False)
            return True, ""
        if netem_error(res.stderr):
            return False, res.stderr
        raise CommandFailed(self.runner.host, add, res.returncode, res.stdout, res.stderr)

    # -- one link ---------------------------------------------------------------------------
    def change(self, device: str, spec: LinkSpec, direction: str = "both") -> None:
        """In-place change of one device's link (``down``, ``up`` or ``both``): the HTB
        class, and the leaf where it carries the rate or delay/loss come or go.

        If netem is needed and the kernel lacks it, nothing is changed and
        :class:`Unsupported` carries the kernel's own message.
        """
        if direction not in ("both", *DIRECTIONS):
            raise ConfigError(f"--direction: must be both, down or up, not {direction!r}")
        i = self.index(device)
        devs = {"down": [self.iface], "up": [self.ifb]}.get(direction, [self.iface, self.ifb])
        if not self.is_installed():
            full = LinkSpec(UNLIMITED_KBIT)
            n = len(self.addrs)
            self.setup(
                [spec if j == i and direction != "up" else full for j in range(n)],
                [spec if j == i and direction != "down" else full for j in range(n)],
            )
            return
        cfg = self._config()
        minor = class_minor(i)
        leaves = self._leaves()
        kind = leaf_kind(cfg.mode, spec)
        netem_rate = cfg.mode != "htb"
        carries_rate = kind == "tbf" or (kind == "netem" and netem_rate)
        # a pfifo leaf stays as it is; a leaf of the same kind changes in place (rate-carrying
        # ones with `change`, htb mode's netem with `replace` on its handle); a new kind is
        # grafted under the class
        steps: list[LeafStep] = []
        for d in devs:
            cur = leaves.get((d, minor))
            if cur is not None and cur.kind == kind == "pfifo":
                continue
            op = "change" if cur is not None and cur.kind == kind and carries_rate else "replace"
            steps.append(
                (d, leaf_command(op, d, minor, kind, spec, cfg.bucket_bytes, netem_rate), cur)
            )
        share = cell_share_kbit(self.cell_rate_kbit, len(self.addrs))
        # the class carries the rate in htb mode only (class_ceil_kbit)
        classes = (
            [build_class_change_command(d, i, spec, share) for d in devs]
            if cfg.mode == "htb"
            else []
        )
        self._switch_leaves(steps, minor, spec, cfg)
        for argv in classes:
            self._run(argv)
        for d in devs:
            leaves[(d, minor)] = Leaf(
                kind,
                f"{leaf_handle(minor, kind):x}:",
                spec.rate_kbit if carries_rate else None,
                spec.delay_ms,
                spec.loss_pct,
            )
        self._leaf_cache = leaves

    def _switch_leaves(
        self, steps: Sequence[LeafStep], minor: int, spec: LinkSpec, cfg: ShapingConfig
    ) -> None:
        """Run :meth:`change`'s leaf steps; where one fails, put back the leaves already
        switched (e.g. down worked, up refused) and raise the kernel's message."""
        done: list[tuple[str, Leaf | None]] = []
        try:
            for d, argv, cur in steps:
                self._run(argv)
                done.append((d, cur))
        except CommandFailed as exc:
            for d, cur in done:
                if cur is not None and cur.kind in ("pfifo", "tbf", "netem"):
                    self._run(
                        leaf_command(
                            "replace",
                            d,
                            minor,
                            cur.kind,
                            cur.spec(cur.rate_kbit or spec.rate_kbit),
                            cfg.bucket_bytes,
                            cur.rate_kbit is not None,
                        ),
                        check=False,
                    )
            self._leaf_cache = None
            if netem_error(exc.stderr):
                raise Unsupported(netem_message(self.runner.host, exc.stderr)) from None
            raise

    # -- a decision epoch's rates -------------------------------------------------------------
    def set_rates(self, rates: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Change the rate of several links at once and read back what the kernel enforces.

        ``rates`` maps a device to its (down, up) kbit/s. Every in-place ``tc qdisc change``
        of the rate-carrying leaves (TBF, netem with a rate: its delay/loss kept), or in htb
        mode every ``tc class change``, goes out at once, then classes and qdiscs of both
        interfaces are read back; pfifo leaves and htb mode's netem are not touched. Where the
        BS is this machine and we are root, the changes are rtnetlink messages in one send (tens
        to hundreds of microseconds, :mod:`testbed.net.netlink`) and the read-back is the
        kernel's dumps; otherwise (a BS over SSH or sudo, a netem leaf to change,
        ``self.netlink`` off) one ``tc -j -batch`` process does both (milliseconds). The tree
        must be installed (:meth:`is_installed`). Returns device -> (down, up) kbit/s as the
        kernel reports them (the class's rate, or the leaf's where lower).
        """
        commands = self._rate_commands(rates)
        minors = {dev: class_minor(self.index(dev)) for dev in rates}
        changes = self._netlink_changes(commands)
        if changes is not None:
            assert self._nl is not None
            out, cache = apply_netlink(
                self._nl, self.runner.host, (self.iface, self.ifb), changes, minors
            )
        else:
            res = self.runner.run(
                BATCH_ARGV,
                timeout_s=15,
                sudo=self.sudo,
                input=batch_input(commands, self.iface, self.ifb),
            )
            out, cache = read_batch(res, self.runner.host, self.iface, self.ifb, minors)
        self._leaf_cache = cache
        return out

    def _rate_commands(self, rates: Mapping[str, tuple[float, float]]) -> list[list[str]]:
        """The epoch's tc command lines: class changes in htb mode, else the rate-carrying
        leaves' changes (the leaves re-read where the cache is stale)."""
        cfg = self._config()
        leaves = self._leaf_cache if self._leaf_cache is not None else self._leaves()
        commands: list[list[str]] = []
        share = cell_share_kbit(self.cell_rate_kbit, len(self.addrs))
        for dev, (down, up) in rates.items():
            i = self.index(dev)
            minor = class_minor(i)
            for d, kbit in ((self.iface, down), (self.ifb, up)):
                if cfg.mode == "htb":  # elsewhere the leaf alone carries the rate
                    commands.append(build_class_change_command(d, i, LinkSpec(kbit), share))
                lf = leaves.get((d, minor))
                if cfg.mode != "htb" and (lf is None or lf.rate_kbit is None):
                    leaves = self._leaves()  # a stale cache, or no leaf to change at all
                    lf = leaves.get((d, minor))
                    if lf is None or lf.rate_kbit is None:
                        raise CommandFailed(
                            self.runner.host,
                            ["tc", "qdisc", "show", "dev", d],
                            1,
                            "",
                            f"no rate-carrying leaf under class "
                            f"1:{minor:x} of {dev} in {cfg.mode} mode",
                        )
                if lf is not None and lf.rate_kbit is not None and lf.kind in ("tbf", "netem"):
                    commands.append(
                        leaf_command(
                            "change", d, minor, lf.kind, lf.spec(kbit), cfg.bucket_bytes, True
                        )
                    )
        return commands

    def _netlink_client(self) -> netlink.TcNetlink | None:
        """The rtnetlink client, where the BS is this machine (or one of its network
        namespaces) and we are root; None elsewhere (the tc CLI then)."""
        if not self.netlink:
            return None
        if self._nl is None:
            if not isinstance(self.runner, LocalRunner) or os.geteuid() != 0:
                self.netlink = False
                return None
            try:
                self._nl = netlink.TcNetlink(self.runner.netns, host=self.runner.host)
            except OSError:
                self.netlink = False
                return None
        return self._nl

    def _netlink_changes(self, commands: Sequence[Sequence[str]]) -> list[netlink.Change] | None:
        """The epoch's tc command lines as netlink changes (the very values tc would send);
        None where netlink is not used or a line is beyond it (a netem leaf)."""
        return None if self._netlink_client() is None else netlink_changes(commands)
