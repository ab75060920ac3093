"""Errors raised by the :mod:`models` package.

Every error names *where* the problem is (a file path, a tensor key or a config key) and *what*
it is, so that a CLI can print exactly one line ``error: <where>: <problem>``.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A bad model input: checkpoint, split directory, shard, config key or argument.

    Parameters
    ----------
    where
        The file, tensor key or config key the problem is about.
    problem
        One-line description of the problem.
    """

    def __init__(self, where: str, problem: str) -> None:
        self.where = str(where)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")


class ExpertBackendError(RuntimeError):
    """The expert backend could not run a layer at all (as opposed to single experts failing)."""
