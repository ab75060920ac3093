"""One error hierarchy for the controller.

Library code raises these; the CLI (``testbed.cli.main``) is the only place that turns
them into a one-line message on stderr and an exit code. Every exception class of
``testbed/`` lives here (tests/unit/test_errors_layout.py checks it); the modules that raise
them import them from here and re-export them under their old names.

Exit codes: 1 any other error (:class:`TestbedError`, :class:`AgentError`; :class:`RunFailed`
takes its cause's), 2 :class:`ConfigError`, 3 :class:`CommandFailed`, :class:`TcNetlinkError`,
:class:`ProvisionError`, 4 :class:`CommandTimeout`, 5 :class:`HostUnreachable`, 6
:class:`NeedsRoot`, 7 :class:`Unsupported`, 8 :class:`PolicyFailed`; the CLI exits 130 when
interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Sequence
from pathlib import Path


class TestbedError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    __test__ = False  # not a pytest test class, despite the name
    exit_code = 1


class ConfigError(TestbedError):
    """Bad input: an inventory, recipe or CLI value. Exit code 2.

    Holds one or more problems, each already naming its file and field.
    """

    exit_code = 2

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class CommandFailed(TestbedError):
    """A command (local or remote) exited non-zero. Exit code 3."""

    exit_code = 3

    def __init__(
        self,
        host: str,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str = "",
        stderr: str = "",
    ):
        self.host = host
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr.strip() or stdout.strip()).splitlines()[-1:] or [""]
        super().__init__(
            f"{host}: `{' '.join(self.argv)}` exited {returncode}: {tail[0]}".rstrip(": ")
        )


class CommandTimeout(CommandFailed):
    """A command ran past its timeout and was stopped (on the remote side too). Exit code 4."""

    exit_code = 4

    def __init__(
        self, host: str, argv: Sequence[str], timeout_s: float, stdout: str = "", stderr: str = ""
    ):
        super().__init__(host, argv, None, stdout, stderr)
        self.timeout_s = timeout_s
        self.args = (
            f"{host}: `{' '.join(self.argv)}` timed out after {timeout_s:g} s and was stopped",
        )

    def __str__(self) -> str:
        return str(self.args[0])


class HostUnreachable(TestbedError):
    """SSH could not connect or authenticate (or the host key was wrong). Exit code 5."""

    exit_code = 5

    def __init__(self, host: str, reason: str):
        self.host = host
        self.reason = reason
        super().__init__(f"{host}: {reason}")


class NeedsRoot(TestbedError):
    """The operation needs root (namespaces, tc). Exit code 6."""

    exit_code = 6


class Unsupported(TestbedError):
    """The kernel or host lacks a feature (e.g. netem). Carries the kernel's own message.

    Exit code 7.
    """

    exit_code = 7


class TcNetlinkError(TestbedError):
    """The kernel refused one or more messages of a batch (or the socket failed).

    ``failures`` holds (what, errno, kernel message) per refused message; ``what`` names
    the interface, object and handle. Exit code 3 (like a failed ``tc``).
    """

    exit_code = 3

    def __init__(self, host: str, failures: Sequence[tuple[str, int, str]]):
        self.host = host
        self.failures = list(failures)
        parts = [
            f"{what} -> {_errno_text(err)}" + (f" ({msg})" if msg else "")
            for what, err, msg in self.failures
        ]
        super().__init__(f"{host}: tc over netlink failed: " + "; ".join(parts))


def _errno_text(err: int) -> str:
    name = errno_mod.errorcode.get(err, f"errno {err}")
    return f"{name} {os.strerror(err)}"


class ProvisionError(TestbedError):
    """A device check or an install step failed (the message names the device). Exit 3."""

    exit_code = 3


class AgentError(TestbedError):
    """A control request to an agent failed (timeout, or an error reply)."""

    def __init__(self, device: str, message: str, code: int | None = None) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device
        self.code = code


class NotExpressible(ValueError):
    """tc words :mod:`testbed.net.netlink` does not translate (the caller keeps the ``tc`` CLI for
    them)."""


class PolicyFailed(TestbedError):
    """A policy raised or returned something invalid. Exit code 8."""

    exit_code = 8


class RunFailed(TestbedError):
    """A run stopped on an error; the manifest in ``run_dir`` says why."""

    def __init__(self, run_dir: Path, cause: BaseException):
        self.run_dir = run_dir
        self.cause = cause
        self.exit_code = getattr(cause, "exit_code", 1)
        super().__init__(f"{one_line(cause)} (run folder: {run_dir})")


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its message with whitespace collapsed (its class name when empty),
    prefixed by the class name unless it is a :class:`TestbedError`."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if isinstance(exc, TestbedError) else f"{type(exc).__name__}: {msg}"
