"""One error hierarchy for the controller.

Library code raises these; the CLI (``testbed.cli.main``) is the only place that turns
them into a one-line message on stderr and an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence


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
