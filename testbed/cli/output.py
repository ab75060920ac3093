"""What every command shares: the ``--format`` option, the consoles, :func:`emit` (JSON on
stdout, or a human rendering) and :func:`print_error` (the one-line errors, and their JSON).

``--format`` is handled here once: the option's callback records the chosen format in
:data:`state` as the command line is parsed, so that :func:`print_error` answers an error in
the format the command was asked for without each command passing it along."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class Format(str, Enum):
    """The ``--format`` choices: a human table, or one JSON document on stdout."""

    table = "table"
    json = "json"


#: the format of the command being run (set by ``--format``'s callback)
state: dict[str, Any] = {"format": Format.table}


def record_format(value: Format) -> Format:
    """``--format``'s callback: remember the chosen format for :func:`print_error`."""
    state["format"] = Format(value)
    return value


FormatOpt = typer.Option(
    Format.table, "--format", help="Output: table (human) or json.", callback=record_format
)
InvArg = typer.Argument(..., help="Inventory TOML file.", show_default=False)
NameOpt = typer.Option("tb", "--name", help="Testbed name (1-8 lowercase letters/digits).")


def emit(fmt: Format, data: Any, table: Table | str | None = None, *, width: int = 0) -> None:
    """JSON on stdout, or a human rendering (on a console ``width`` wide where given)."""
    if fmt == Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        (Console(width=width) if width else console).print(table)


def print_error(kind: str, lines: Sequence[str], exit_code: int) -> None:
    """An error's lines on stderr (``error: ...``), and with ``--format json`` first one JSON
    object ``{"error": {"type", "messages", "exit_code"}}`` on stdout."""
    if state["format"] == Format.json:
        error = {"type": kind, "messages": list(lines), "exit_code": exit_code}
        sys.stdout.write(json.dumps({"error": error}) + "\n")
    for line in lines:
        sys.stderr.write(f"error: {line}\n")


def cell(value: Any) -> str:
    """A table cell: floats to 4 decimals, None as '-'."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def table(title: str, columns: Iterable[str], rows: Iterable[Sequence[str]]) -> Table:
    """A rich table: ``title``, one column per name, one row per sequence of cells."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    return t


def records_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """A table of ``rows`` (dicts), one column per key of the first row."""
    cols = list(rows[0]) if rows else ["key", "value"]
    return table(title, cols, ([cell(r.get(c)) for c in cols] for r in rows))
