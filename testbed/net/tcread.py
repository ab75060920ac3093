"""The BS's shaping as its kernel reports it, read through a runner: the tree's qdiscs, classes and
leaves, the interfaces' offloads and our record on the ifb (:class:`TcReader`, the base of
:class:`~testbed.net.shaper.TcShaper`, which changes what this reads).

Where the BS needs ``sudo`` (``bs.sudo``), each command goes through
:func:`~testbed.lab.runner.run_bs`, so that root runs only what the sudoers lines of ``testbed
init`` allow (:func:`testbed.lab.init.sudoers_lines`); reads run as the user.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..lab.runner import Result, Runner, run_bs
from .offloads import offload_state
from .tc import (
    DEFAULT_MTU,
    ROOT_CLASS,
    SHAPING_MODES,
    TBF_SLACK_US,
    Leaf,
    LinkState,
    Offload,
    ShapingConfig,
    class_minor,
    describe_leaf,
    enforced_kbit,
    infer_mode,
    leaf_bucket_bytes,
    leaves_by_class,
    offloads_on,
    parse_htb_classes,
    parse_link_show,
    parse_tc_size,
    shaping_config_of,
)


class TcReader:
    """Reads the shaping of one BS (parameters: :class:`~testbed.net.shaper.TcShaper`).

    It keeps what it learnt: the tree's config (``_cfg``: our record, else inferred from the
    leaves) and its leaves (``_leaf_cache``, for the next epoch's rate changes); whatever changes
    the tree keeps both up to date or drops them.
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
        if shaping not in SHAPING_MODES:
            raise ConfigError(
                f"bs.shaping: must be one of {', '.join(SHAPING_MODES)}, not {shaping!r}"
            )
        self.runner = runner
        self.iface = iface
        self.ifb = ifb
        self.addrs = list(addrs)
        self.names = list(names)
        self.cell_rate_kbit = cell_rate_kbit
        self.sudo = sudo
        self.shaping = shaping
        self._cfg: ShapingConfig | None = None
        self._leaf_cache: dict[tuple[str, int], Leaf] | None = None

    def _run(self, argv: list[str], check: bool = True) -> Result:
        """:func:`run_bs` of ``argv`` with this BS's ``sudo``."""
        return run_bs(self.runner, argv, self.sudo, check)

    def index(self, device: str) -> int:
        """The device's place in the inventory (its class is ``1:100+index``)."""
        try:
            return self.names.index(device)
        except ValueError:
            raise ConfigError(
                f"no device named {device!r} (have: {', '.join(self.names)})"
            ) from None

    def is_installed(self) -> bool:
        """Our tree is on the BS: the root HTB and the ingress on the interface, and the ifb."""
        qdiscs = self._qdiscs(self.iface)
        has_root = any(
            q.get("root") and q.get("kind") == "htb" and q.get("handle") == "1:" for q in qdiscs
        )
        has_ingress = any(q.get("kind") == "ingress" for q in qdiscs)
        ifb = self._run(["ip", "link", "show", self.ifb], check=False)
        return has_root and has_ingress and ifb.returncode == 0

    def _link(self, dev: str) -> tuple[int | None, str | None]:
        """(mtu, alias) of ``dev``; (None, None) where it does not exist."""
        res = self._run(["ip", "link", "show", "dev", dev], check=False)
        return parse_link_show(res.stdout) if res.returncode == 0 else (None, None)

    def _offload_state(self, dev: str) -> dict[str, Offload] | None:
        """``ethtool -k``; None where ethtool is missing or refuses."""
        return offload_state(self.runner, dev, self.sudo)

    def _record_config(self) -> ShapingConfig | None:
        """The config our record on the ifb holds; None without one."""
        return shaping_config_of(self._link(self.ifb)[1], self.iface)

    def _config(self) -> ShapingConfig:
        """The installed tree's config: our record, else inferred from its leaves."""
        if self._cfg is None:
            cfg = self._record_config()
            if cfg is None:
                mtu, _ = self._link(self.iface)
                cfg = ShapingConfig(
                    infer_mode(list(self._leaves().values())),
                    leaf_bucket_bytes(mtu or DEFAULT_MTU),
                    recorded=False,
                )
            self._cfg = cfg
        return self._cfg

    # -- what is enforced ---------------------------------------------------------------------
    def show(self) -> list[LinkState]:
        """Parse what tc reports now, per device and direction (the rate: the class's, or
        the leaf's where that is lower)."""
        states = [LinkState(n, a) for n, a in zip(self.names, self.addrs)]
        for d, direction in ((self.iface, "down"), (self.ifb, "up")):
            res = self._run(["tc", "-s", "class", "show", "dev", d], check=False)
            if res.returncode != 0:
                continue
            by_id = {c.classid: c for c in parse_htb_classes(res.stdout)}
            qdiscs = self._qdiscs(d)
            leaves = leaves_by_class(qdiscs)
            for i, st in enumerate(states):
                minor = class_minor(i)
                c = by_id.get(f"1:{minor:x}")
                if c is None:
                    continue
                setattr(st, f"{direction}_kbit", enforced_kbit(c.ceil_kbit, leaves.get(minor)))
                setattr(st, f"{direction}_sent_bytes", c.sent_bytes)
                st.handles[direction] = f"{d} {c.classid} leaf {c.leaf}"
            for qd in qdiscs:
                for i, st in enumerate(states):
                    if qd.get("parent") == f"1:{class_minor(i):x}":
                        setattr(st, f"{direction}_leaf", describe_leaf(qd))
        return states

    def shaping_info(self) -> dict[str, Any]:
        """How the links are shaped, for the run manifest, ``links.csv`` and ``links set``:
        the mode, the leaf, the bytes a link passes free after an idle spell (TBF: its
        one-frame bucket, plus ``bucket_slack_us`` of the rate; netem: 0; htb: the largest
        device class's bucket), the netem probe, the offloads per interface and a one-line
        ``warning`` where offloads are still on."""
        installed = self.is_installed()
        cfg = self._config() if installed else None
        info: dict[str, Any] = {
            "setting": self.shaping,
            "installed": installed,
            "mode": cfg.mode if cfg else None,
            "leaf": {"tbf": "tbf", "netem": "netem", "htb": "pfifo"}[cfg.mode] if cfg else None,
            "bucket_bytes": None,
            "bucket_slack_us": None,
            "netem": cfg.netem if cfg else None,
            "recorded": cfg.recorded if cfg else None,
            "offloads_restore": list(cfg.restore) if cfg else [],
            "offloads": {},
            "offloads_summary": None,
            "warning": None,
        }
        if cfg is not None:
            info["bucket_bytes"], info["bucket_slack_us"] = self._free_bytes(cfg)
        self._offloads_info(info, installed)
        return info

    def _free_bytes(self, cfg: ShapingConfig) -> tuple[int | None, int | None]:
        """(bucket_bytes, bucket_slack_us) of :meth:`shaping_info` for the tree's mode."""
        if cfg.mode == "tbf":
            return cfg.bucket_bytes, TBF_SLACK_US
        if cfg.mode == "netem":
            return 0, None
        res = self._run(["tc", "class", "show", "dev", self.iface], check=False)
        bursts = [
            parse_tc_size(c.burst)
            for c in parse_htb_classes(res.stdout)
            if c.parent == f"1:{ROOT_CLASS:x}"
        ]
        return (max(bursts) if bursts else None), None

    def _offloads_info(self, info: dict[str, Any], installed: bool) -> None:
        """Fill :meth:`shaping_info`'s ``offloads``, ``offloads_summary`` and ``warning``."""
        devs = (self.iface, self.ifb) if installed else (self.iface,)
        parts, unknown = [], False
        for d in devs:
            st = self._offload_state(d)
            if st is None:
                info["offloads"][d] = None
                unknown = True
                continue
            on = offloads_on(st)
            info["offloads"][d] = {"on": on, "off": [n for n, o in st.items() if not o.on]}
            if on:
                parts.append(f"{d} {','.join(on)}")
        info["offloads_summary"] = (
            "unknown" if unknown else ("on: " + "; ".join(parts) if parts else "off")
        )
        if installed and info["offloads_summary"] != "off":
            what = "ethtool is missing or refused" if unknown else f"still on: {'; '.join(parts)}"
            info["warning"] = (
                f"{self.runner.host}: segmentation/receive offloads on "
                f"{self.iface}/{self.ifb} could not be turned off ({what}): tc "
                "may see super-packets of up to 64 KiB, so short messages are "
                "charged in coarse steps"
            )

    # -- the tree's qdiscs --------------------------------------------------------------------
    def _leaves(self) -> dict[tuple[str, int], Leaf]:
        """(interface, class minor) -> leaf, read now (and cached for :meth:`set_rates`)."""
        out: dict[tuple[str, int], Leaf] = {}
        for d in (self.iface, self.ifb):
            out.update({(d, m): lf for m, lf in leaves_by_class(self._qdiscs(d)).items()})
        self._leaf_cache = dict(out)
        return out

    def qdisc_handles(self) -> list[tuple[str, str, str]]:
        """(device, kind, handle) of every qdisc on our two interfaces — for checking that
        an in-place change re-created nothing."""
        return [
            (d, q.get("kind", ""), q.get("handle", ""))
            for d in (self.iface, self.ifb)
            for q in self._qdiscs(d)
        ]

    def _qdiscs(self, dev: str) -> list[dict]:
        """``tc -j qdisc show dev DEV`` parsed; empty when the device does not exist."""
        res = self._run(["tc", "-j", "qdisc", "show", "dev", dev], check=False)
        return json.loads(res.stdout or "[]") if res.returncode == 0 else []
