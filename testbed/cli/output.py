"""What every command shares: the ``--format`` option and its state, the consoles and
:func:`emit` (JSON on stdout, or a human rendering)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    json = "json"


state: dict[str, Any] = {"format": Format.table}
FormatOpt = typer.Option(Format.table, "--format", help="Output: table (human) or json.")
InvArg = typer.Argument(..., help="Inventory TOML file.", show_default=False)
NameOpt = typer.Option("tb", "--name", help="Testbed name (1-8 lowercase letters/digits).")


def set_format(fmt: Format) -> Format:
    state["format"] = fmt
    return fmt


def emit(fmt: Format, data: Any, table: Table | str | None = None) -> None:
    """JSON on stdout, or a human rendering."""
    if fmt == Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        console.print(table)
