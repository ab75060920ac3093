"""The ``testbed`` command line: :mod:`.app` (the typer app and :func:`main`), :mod:`.output`
(``--format``, consoles, :func:`~.output.emit`) and one module per command group."""

from .app import app, main

__all__ = ["app", "main"]
