"""The ``testbed`` command line.

Library code raises :class:`~testbed.errors.TestbedError`; :func:`main` is the one place
that turns errors into a one-line message per problem on stderr and an exit code. Every
command takes ``--format json`` for machine-readable output on stdout.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import typer

from ..errors import ConfigError, TestbedError
from .agents import agents_app, provision_cmd
from .init import init_cmd
from .inventory import inventory_app
from .links import links_app
from .local import local_app
from .output import print_error
from .policies import policies_app
from .report import report_cmd
from .run import demo_cmd, run_cmd, simulate_cmd
from .wheelhouse import wheelhouse_app

app = typer.Typer(
    help="moe-edge-testbed: distributed MoE inference on a wireless edge "
    "testbed (BS + devices, tc-shaped links, ZeroMQ).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# the commands, then the groups: `testbed --help` lists them in this order
app.command("init")(init_cmd)
app.command("provision")(provision_cmd)
app.command("run")(run_cmd)
app.command("simulate")(simulate_cmd)
app.command("demo")(demo_cmd)
app.command("report")(report_cmd)
app.add_typer(local_app, name="local")
app.add_typer(inventory_app, name="inventory")
app.add_typer(links_app, name="links")
app.add_typer(policies_app, name="policies")
app.add_typer(wheelhouse_app, name="wheelhouse")


def _mount_model_cli() -> None:
    try:
        from .model import app as model_app
    except ImportError:  # the model layer is optional at import time (torch)
        return
    app.add_typer(model_app, name="model", help="Split, build and evaluate MoE models.")


_mount_model_cli()
app.add_typer(agents_app, name="agents")


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: run the app, turn errors into one line each and an exit code."""
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit's code here
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except TestbedError as exc:
        lines = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        print_error(type(exc).__name__, lines, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        click_error, abort = _click_exceptions()
        if isinstance(exc, click_error):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.stderr.write("aborted\n")
            sys.exit(130)
        raise


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, abort classes) of click and of the copy of click that typer
    bundles (``typer._click``, whose errors are what typer's parser raises)."""
    import importlib

    errors: list[type] = []
    aborts: list[type] = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        errors.append(mod.ClickException)
        if hasattr(mod, "Abort"):
            aborts.append(mod.Abort)
    return tuple(errors), tuple(aborts)
