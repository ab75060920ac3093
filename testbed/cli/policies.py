"""``testbed policies list``: the registered policies."""

from __future__ import annotations

import typer
from rich.table import Table

from .output import Format, FormatOpt, emit

policies_app = typer.Typer(help="Policies: built-in and plug-in.", no_args_is_help=True)


@policies_app.command("list")
def policies_list(fmt: Format = FormatOpt) -> None:
    """List the registered policies (entry points) with their one-line docs."""
    from ..policy.loading import ENTRY_POINT_GROUP, available_policies

    rows = available_policies()
    t = Table(
        title=f"policies (entry-point group {ENTRY_POINT_GROUP}; also "
        "package.module:Class or path/file.py:Class)"
    )
    for c in ("name", "class", "what it does"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["target"], r["doc"])
    emit(fmt, rows, t)
