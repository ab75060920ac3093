"""The ``testbed`` command line, one module per command group, every command a module-level
function. :mod:`.local`, :mod:`.inventory`, :mod:`.links`, :mod:`.policies`, :mod:`.model` and
:mod:`.agents` each hold their group's Typer (``testbed local up`` ...); the top-level commands
are :mod:`.agents`' ``provision``, :mod:`.run`'s ``run``, ``simulate`` and ``demo``, and
:mod:`.report`'s ``report``. :mod:`.app` mounts the groups and registers the top-level commands
on the one ``testbed`` app, and holds :func:`main` (errors to one line each and an exit code).
:mod:`.output` is what every command shares: ``--format`` (recorded once, by the option's
callback), the consoles, :func:`~.output.emit`, :func:`~.output.table` and
:func:`~.output.print_error`."""

from .app import app, main

__all__ = ["app", "main"]
