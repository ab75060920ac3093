"""Calibration bench for the calibrated latency model (issue 16): what a forward call puts on
the wire, and how exchanges' times compare with the model at several rates.

On a local testbed (created here, or ``--inventory``) with agents serving ``--model`` (default
``tiny-4096`` with bf16 on the wire):

* ``bytes``: per call shape (experts x rows), the bytes and frames tc's device classes counted
  each way (ACKs of the other direction included), against the model's messages on the wire;
* ``timing``: exchanges through ``run_layer``
  (:func:`testbed.dataplane.profiling.profile_exchanges`) at each ``--rates`` (down/up kbit/s),
  with the model fitted at the first rate predicting the others: measured vs predicted layer
  time and round trips.

Run (root): ``.venv/bin/python bench/layer_costs.py [--devices 4] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from testbed.dataplane.backend import RemoteExpertBackend
from testbed.dataplane.profiling import profile_exchanges
from testbed.lab import local
from testbed.lab import provision as prov
from testbed.lab.inventory import bs_runner_for, load_inventory
from testbed.lab.keys import client_keys
from testbed.net.tc import LinkSpec, parse_htb_classes
from testbed.net.verify import shaper_for
from testbed.policy import latency_model as LM


def class_counters(shaper, dev: str) -> tuple[int, int]:
    """(bytes, packets) tc's class of device ``dev`` sent: on the BS interface (down) and the
    ifb (up)."""
    minor = f"1:{0x100 + shaper.index(dev):x}"
    out = []
    for iface in (shaper.iface, shaper.ifb):
        res = shaper.runner.run(["tc", "-s", "class", "show", "dev", iface], check=True)
        c = next(c for c in parse_htb_classes(res.stdout) if c.classid == minor)
        out.append((c.sent_bytes, c.sent_packets))
    return out


@contextlib.contextmanager
def cluster(args):
    from models.manifest import load_manifest
    from testbed.lab.modelstore import resolve_split

    name = None
    if args.inventory is None:
        name = args.name
        local.down(name)
        inv_path = Path(local.up(name, args.devices, 1_000_000.0)["inventory"])
    else:
        inv_path = Path(args.inventory)
    backend = None
    try:
        inv = load_inventory(inv_path)
        split = resolve_split(args.model)
        mf = load_manifest(split)
        bad = [r for r in prov.provision(inv, split) if not r.ok]
        if bad:
            raise SystemExit(f"provisioning failed: {bad}")
        eps = prov.agent_endpoints(inv)
        backend = RemoteExpertBackend(
            {d: e["endpoint"] for d, e in eps.items()}, {}, timeout_s=30.0, curve=client_keys(inv)
        )
        backend.connect()
        names = [d.name for d in inv.devices]
        placement = {u: [names[i % len(names)]] for i, u in enumerate(mf.uids())}
        from testbed.lab.inventory import ssh_runner_for

        for d in inv.devices:
            mine = [u for u, ds in placement.items() if ds[0] == d.name][:3]
            rel, _ = prov.sync_shards(ssh_runner_for(inv, d), d, mf, mine)
            backend.load_experts(
                d.name, [{"uid": u, "path": rel[u], "io_dtype": args.wire} for u in mine]
            )
        backend.placement = {u: ds for u, ds in placement.items()}
        shaper = shaper_for(inv, bs_runner_for(inv))
        if not shaper.is_installed():
            n = len(inv.devices)
            shaper.setup([LinkSpec(1e6)] * n, [LinkSpec(1e6)] * n)
        yield backend, shaper, mf, names, placement
    finally:
        if backend is not None:
            backend.close()
        if name is not None:
            local.down(name)


def wire_bytes(backend, shaper, mf, names, placement, dtype, width):
    from models.backend import LayerWork

    dev = names[0]
    mine = [u for u, ds in placement.items() if ds[0] == dev][:3]
    rows = []
    for e in (1, 2, 3):
        for n in (1, 2, 4, 8, 32):
            got = []
            for _ in range(3):
                time.sleep(0.05)
                (bd0, pd0), (bu0, pu0) = class_counters(shaper, dev)
                inputs = {u: torch.randn(n, width).to(dtype) for u in mine[:e]}
                res = backend.run_layer(LayerWork(-1, 0, inputs))
                assert not res.failed
                time.sleep(0.25)  # delayed ACKs go out
                (bd1, pd1), (bu1, pu1) = class_counters(shaper, dev)
                got.append((bd1 - bd0, pd1 - pd0, bu1 - bu0, pu1 - pu0))
            bd, pd, bu, pu = (min(g[i] for g in got) for i in range(4))
            payload = n * e * width * dtype.itemsize
            p = LM.LayerCostParams(width * dtype.itemsize)
            md = p.message_bytes("down", e, n * e)
            mu = p.message_bytes("up", e, n * e)
            rows.append(
                {
                    "experts": e,
                    "rows": n * e,
                    "payload": payload,
                    "down_bytes": bd,
                    "down_pkts": pd,
                    "up_bytes": bu,
                    "up_pkts": pu,
                    "model_down_wire": LM.wire_frames(md)[1],
                    "model_down_frames": LM.wire_frames(md)[0],
                    "model_up_wire": LM.wire_frames(mu)[1],
                    "model_up_frames": LM.wire_frames(mu)[0],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timing(backend, shaper, names, placement, dtype, width, rates, tokens):
    mine = {d: [u for u, ds in placement.items() if ds[0] == d][:2] for d in names}
    out = []
    for down, up in rates:
        shaper.set_rates({d: (down, up) for d in names})
        st = {s.device: s for s in shaper.show()}
        samples = profile_exchanges(
            backend, mine, width, dtype, tokens=tokens, repeats=3, gap_s=0.02
        )
        for s in samples:
            s["rate_down_kbit"] = st[s["device"]].down_kbit
            s["rate_up_kbit"] = st[s["device"]].up_kbit
        out.append({"down": down, "up": up, "samples": samples})
        print(f"rates {down}/{up}: {len(samples)} samples", flush=True)
    return out


def evaluate(timing_rows, bpt, base_kw):
    base = LM.LayerCostParams(bpt, **base_kw)
    fit, res = LM.fit_layer_costs(timing_rows[0]["samples"], base)
    print(json.dumps(fit.to_dict(), indent=1))
    print(json.dumps(res, indent=1))
    for tr in timing_rows:
        by: dict[int, list] = {}
        for s in tr["samples"]:
            by.setdefault(s["layer"], []).append(s)
        ratios = {}
        for calls in by.values():
            names = list(fit.device_names)
            loads, ex = np.zeros(len(names)), np.zeros(len(names))
            dn, upk = np.zeros(len(names)), np.zeros(len(names))
            for c in calls:
                k = names.index(c["device"])
                loads[k], ex[k] = c["rows"], c["experts"]
                dn[k], upk[k] = c["rate_down_kbit"], c["rate_up_kbit"]
            pred, _per = LM.predict_layer_ms(loads, dn, upk, fit, experts=ex)
            kind = (len(calls), calls[0]["experts"], calls[0]["tokens"])
            ratios.setdefault(kind, []).append(pred / calls[0]["layer_ms"])
        print(f"rates {tr['down']}/{tr['up']}:")
        for kind, rs in sorted(ratios.items()):
            print(
                f"  devices={kind[0]} experts={kind[1]} tokens={kind[2]}: "
                f"pred/meas median {statistics.median(rs):.2f} "
                f"[{min(rs):.2f}-{max(rs):.2f}]"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--inventory")
    ap.add_argument("--name", default="lcb")
    ap.add_argument("--model", default="tiny-4096")
    ap.add_argument("--wire", default="bfloat16")
    ap.add_argument("--what", default="bytes,timing")
    ap.add_argument("--rates", default="1000000/1000000,50000/20000,10000/3000")
    ap.add_argument("--tokens", default="1,2,4,8,16,32")
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = getattr(torch, args.wire)
    result = {}
    with cluster(args) as (backend, shaper, mf, names, placement):
        width = mf.hidden_size
        if "bytes" in args.what:
            result["bytes"] = wire_bytes(backend, shaper, mf, names, placement, dtype, width)
        if "timing" in args.what:
            rates = [tuple(float(x) for x in r.split("/")) for r in args.rates.split(",")]
            toks = [int(t) for t in args.tokens.split(",")]
            result["timing"] = timing(backend, shaper, names, placement, dtype, width, rates, toks)
            evaluate(result["timing"], width * dtype.itemsize, {})
    if args.json:
        Path(args.json).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
