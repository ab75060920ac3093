"""``python -m testbed``: the same Typer app as the ``testbed`` command."""

from .cli import main

main()
