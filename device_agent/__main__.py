"""``python -m device_agent serve --bind tcp://HOST:PORT --workdir DIR [...]``."""

from __future__ import annotations

import argparse
import logging
import sys

from device_agent.energy import METER_KINDS, MeterOptions, MeterUnavailable
from device_agent.memtune import keep_large_buffers
from device_agent.security import CurveKeyError
from device_agent.server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_ROWS,
    DEFAULT_MAX_TENSORS,
    AgentServer,
    install_signal_handlers,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line: the ``serve`` command and its options."""
    ap = argparse.ArgumentParser(
        prog="python -m device_agent", description="MoE expert device agent"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "serve", help="serve experts over ZeroMQ until SIGTERM or a shutdown request"
    )
    add_serving_options(s)
    add_meter_options(s)
    add_hello_options(s)
    add_limit_options(s)
    return ap


def add_serving_options(s: argparse.ArgumentParser) -> None:
    """``serve``'s endpoints, workdir, status period, message limit, device and threads."""
    s.add_argument(
        "--bind", required=True, help="ROUTER endpoint, e.g. tcp://10.0.0.2:5555 (':*' = any port)"
    )
    s.add_argument("--workdir", required=True, help="directory expert shard paths are relative to")
    s.add_argument(
        "--pub", default=None, help="status PUB endpoint (e.g. tcp://10.0.0.2:*); off by default"
    )
    s.add_argument(
        "--status-period-s", type=float, default=1.0, help="seconds between status messages"
    )
    s.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="larger requests get error 7 (too large)",
    )
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    s.add_argument("--threads", type=int, default=None, help="torch compute threads")
    s.add_argument("--ready-file", default=None, help="JSON written once bound (endpoints, pid)")


def add_meter_options(s: argparse.ArgumentParser) -> None:
    """``serve``'s energy meter options."""
    s.add_argument(
        "--meter",
        default="auto",
        choices=("auto", *METER_KINDS),
        help="energy meter: auto (the first that works, in this order: "
        f"{', '.join(METER_KINDS)}) or one kind (the agent exits if it does not work)",
    )
    s.add_argument(
        "--cpu-core-w",
        type=float,
        default=5.0,
        help="watts per busy core of the 'estimated' meter (CPU time x this)",
    )
    s.add_argument(
        "--nvml-gpus",
        default=None,
        help="NVML GPU indices the 'nvml' meter sums, e.g. 0 or 0,1 (default: all)",
    )


def add_hello_options(s: argparse.ArgumentParser) -> None:
    """``serve``'s hello gate (publish the status only when it moved)."""
    s.add_argument(
        "--hello-s",
        type=float,
        default=None,
        help="perception: look at the status every this many seconds (e.g. 2) and "
        "publish it only when a value moved by more than --hello-delta (replaces "
        "--status-period-s); off by default",
    )
    s.add_argument(
        "--hello-delta",
        type=float,
        default=0.1,
        help="relative change that makes a hello go out (default 0.1)",
    )
    s.add_argument(
        "--hello-keepalive-s",
        type=float,
        default=10.0,
        help="a hello goes out at least this often (0: only on a change)",
    )


def add_limit_options(s: argparse.ArgumentParser) -> None:
    """``serve``'s request limits, CURVE keys and log level."""
    s.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help="most token rows in one tensor (more: error 7, too large)",
    )
    s.add_argument(
        "--max-tensors",
        type=int,
        default=DEFAULT_MAX_TENSORS,
        help="most tensors (experts) in one forward request (more: error 7)",
    )
    s.add_argument(
        "--curve-dir",
        default=None,
        help="CURVE keys: DIR/agent.key_secret (mode 0600) and DIR/authorized/*.key "
        "(the clients allowed); without it the agent authenticates no one",
    )
    s.add_argument("--log-level", default="INFO")


def check_serve_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Exit with a usage error (``ap.error``) for a value out of its range."""
    if not a.cpu_core_w > 0:
        ap.error(f"--cpu-core-w must be positive, got {a.cpu_core_w}")
    for flag in ("max_rows", "max_tensors", "max_message_bytes"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.hello_s is not None and not a.hello_s > 0:
        ap.error(f"--hello-s must be positive, got {a.hello_s}")
    if a.hello_delta < 0 or a.hello_keepalive_s < 0:
        ap.error("--hello-delta and --hello-keepalive-s must be >= 0")


def meter_options(ap: argparse.ArgumentParser, a: argparse.Namespace) -> MeterOptions:
    """The energy meter's options from ``--meter``, ``--cpu-core-w`` and ``--nvml-gpus``."""
    try:
        gpus = None if a.nvml_gpus is None else [int(x) for x in a.nvml_gpus.split(",")]
    except ValueError:
        ap.error(f"--nvml-gpus must be comma-separated integers, got {a.nvml_gpus!r}")
    return MeterOptions(
        only=None if a.meter == "auto" else (a.meter,),
        cpu_core_w=a.cpu_core_w,
        rapl_poll_s=0.1,
        nvml_indices=gpus,
    )


def serve(a: argparse.Namespace, meter: MeterOptions) -> int:
    """Run the agent until it is stopped; the exit status (3: no such meter, 2: bad keys)."""
    keep_large_buffers()  # tensor frames of 1 MiB+ stay in the heap (see device_agent.memtune)
    try:
        server = AgentServer(
            a.bind,
            a.workdir,
            pub=a.pub,
            status_period_s=a.hello_s or a.status_period_s,
            max_message_bytes=a.max_message_bytes,
            device=a.device,
            threads=a.threads,
            ready_file=a.ready_file,
            meter=meter,
            curve_dir=a.curve_dir,
            max_rows=a.max_rows,
            max_tensors=a.max_tensors,
        )
    except MeterUnavailable as e:
        print(f"error: --meter {a.meter}: {e}", file=sys.stderr)
        return 3
    except CurveKeyError as e:
        print(f"error: --curve-dir: {e}", file=sys.stderr)
        return 2
    if a.hello_s is not None:
        from device_agent.hello import HelloGate

        server.hello = HelloGate(a.hello_delta, a.hello_keepalive_s)
    install_signal_handlers(server)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the agent; returns the exit status."""
    ap = build_parser()
    a = ap.parse_args(argv)
    check_serve_args(ap, a)
    logging.basicConfig(
        level=a.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return serve(a, meter_options(ap, a))


if __name__ == "__main__":
    sys.exit(main())
