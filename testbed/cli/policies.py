"""``testbed policies list``: the registered policies."""

from __future__ import annotations

import typer

from .output import Format, FormatOpt, emit, table

policies_app = typer.Typer(help="Policies: built-in and plug-in.", no_args_is_help=True)


@policies_app.command("list")
def policies_list(fmt: Format = FormatOpt) -> None:
    """List the registered policies (entry points) with their one-line docs."""
    from ..policy.loading import ENTRY_POINT_GROUP, available_policies

    rows = available_policies()
    t = table(
        f"policies (entry-point group {ENTRY_POINT_GROUP}; also "
        "package.module:Class or path/file.py:Class)",
        ("name", "class", "what it does"),
        ((r["name"], r["target"], r["doc"]) for r in rows),
    )
    emit(fmt, rows, t)
