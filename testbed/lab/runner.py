"""Run an argv, put a file, start a detached process — locally or over SSH.

One small protocol (``Runner``) with two implementations, so the same provisioning,
shaping and measuring code runs on this machine, inside a network namespace, or on a
Jetson over SSH.

SSH goes through fabric/paramiko with strict host-key checking: keys are read from a
``known_hosts`` file and an unknown key is rejected (fabric would accept it).
Remote commands are argv lists quoted with :func:`shlex.join` and wrapped in the remote
``timeout`` utility, so a command that runs past its timeout is stopped *on the remote
side* too, not just abandoned by the controller.
"""

from __future__ import annotations

import io
import os
import posixpath
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import CommandFailed, CommandTimeout, HostUnreachable

#: seconds the remote ``timeout`` waits after SIGTERM before SIGKILL
_KILL_AFTER_S = 2


@dataclass(frozen=True)
class Result:
    """What a finished command left behind."""

    host: str
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Whether the command exited 0."""
        return self.returncode == 0


@runtime_checkable
class Runner(Protocol):
    """Where commands run. ``host`` names it in messages."""

    host: str

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        sudo: bool = False,
        input: str | None = None,
    ) -> Result:
        """Run ``argv`` to completion (``input``: its standard input, else none); raise
        CommandFailed/CommandTimeout (if ``check``). ``sudo``: as root through ``sudo -n``
        where we are not root (``argv`` itself, no shell, so a sudoers line can name it)."""
        ...

    def put(
        self, local_path: str | os.PathLike[str], remote_path: str, *, mode: int = 0o644
    ) -> None:
        """Copy a local file to ``remote_path`` (parent directories are created)."""
        ...

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        pid_path: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start ``argv`` detached (own session, output to ``log_path``); return its PID,
        also written to ``pid_path``."""
        ...

    def close(self) -> None:
        """Release what the runner holds (an SSH connection); safe to call twice."""
        ...


def _check(result: Result, check: bool) -> Result:
    if check and result.returncode != 0:
        raise CommandFailed(
            result.host, result.argv, result.returncode, result.stdout, result.stderr
        )
    return result


class LocalRunner:
    """Runs on this machine, optionally inside a network namespace (``ip netns exec``).

    Parameters
    ----------
    netns:
        Run every command inside this network namespace.
    host:
        Label used in messages (default ``local`` or ``netns:<name>``).
    """

    def __init__(self, netns: str | None = None, host: str | None = None):
        self.netns = netns
        self.host = host or (f"netns:{netns}" if netns else "local")

    def _wrap(self, argv: Sequence[str], sudo: bool) -> list[str]:
        full = list(argv)
        if self.netns:
            full = ["ip", "netns", "exec", self.netns, *full]
        if sudo and os.geteuid() != 0:
            full = ["sudo", "-n", *full]
        return full

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        sudo: bool = False,
        input: str | None = None,
    ) -> Result:
        """Run ``argv`` here (in :attr:`netns` if set) in its own process group, killed whole
        at ``timeout_s``, ``input`` on its standard input; raise CommandFailed/CommandTimeout
        (if ``check``)."""
        full = self._wrap(argv, sudo)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                full,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise CommandFailed(self.host, argv, 127, "", str(exc)) from None
        try:
            out, err = proc.communicate(input, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # the whole process group: a shell's children go too
            _kill_group(proc.pid)
            out, err = proc.communicate()
            raise CommandTimeout(self.host, argv, timeout_s, out, err) from None
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        return _check(
            Result(self.host, tuple(argv), proc.returncode, out, err, time.monotonic() - start),
            check,
        )

    def put(
        self, local_path: str | os.PathLike[str], remote_path: str, *, mode: int = 0o644
    ) -> None:
        """Copy ``local_path`` to ``remote_path`` on this machine (a ``.part`` file, then
        rename, so a reader never sees half a file)."""
        dest = Path(remote_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with open(local_path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        pid_path: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start ``argv`` in its own session, appending its output to ``log_path``; return
        its PID, also written to ``pid_path``."""
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(pid_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                self._wrap(argv, False),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=None if env is None else {**os.environ, **env},
                start_new_session=True,
            )
        Path(pid_path).write_text(f"{proc.pid}\n")
        return proc.pid

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remote_command(argv: Sequence[str], timeout_s: float, sudo: bool = False) -> str:
    """The one command line sent over SSH for ``argv``.

    The remote ``timeout`` utility stops the command (its whole process group, SIGTERM then
    SIGKILL) when ``timeout_s`` passes, so nothing keeps running on the device after the
    controller gave up on it. With ``sudo`` it wraps ``sudo -n ARGV``, so root runs ``argv``
    itself and a sudoers line naming that command allows it (``sudo timeout ...`` would need
    root for anything at all). The price: a user's ``timeout`` cannot signal a root process,
    and sudo ignores a signal sent from its own process group (it expects the command to get
    it too), so a root command that hangs outlives its timeout (sudo itself is killed at
    ``-k``). The root commands are tc batches on standard input (which end when it closes),
    ``ip link``, ``ethtool -K`` and ``nvpmodel``: short, and they do not wait on the network.
    """
    prefix = ["sudo", "-n"] if sudo else []
    wrapped = ["timeout", "-k", str(_KILL_AFTER_S), f"{timeout_s:g}", *prefix, *argv]
    return shlex.join(wrapped)


#: runs its arguments with the sbin folders on PATH (a shell as the user, never as root)
_SBIN_SH = ("sh", "-c", 'PATH="$PATH:/usr/sbin:/sbin"; exec "$0" "$@"')
#: ``ip link`` subcommands that change the kernel (the rest only read)
IP_LINK_CHANGES = ("add", "set", "del", "delete")


def needs_root(argv: Sequence[str]) -> bool:
    """Whether ``argv`` changes the kernel's network state: a tc command other than ``show``
    (``list``/``ls``), an ``ip link`` add/set/del, ``ethtool -K``. Reads of tc, ip and ethtool
    work as any user. Pure."""
    if not argv:
        return False
    words = [w for w in argv[1:] if not w.startswith("-")]
    if argv[0] == "tc":
        return len(words) < 2 or words[1] not in ("show", "list", "ls")
    if argv[0] == "ip":
        return words[:1] != ["link"] or len(words) < 2 or words[1] in IP_LINK_CHANGES
    if argv[0] == "ethtool":
        return "-k" not in argv[1:2]
    return True


def run_bs(
    runner: Runner, argv: Sequence[str], sudo: bool, check: bool = True, timeout_s: float = 15
) -> Result:
    """Run ``argv`` (tc, ip, ethtool) on the BS, as root through ``sudo -n`` where ``sudo``
    and the command changes something (:func:`needs_root`), so that root runs only what the
    sudoers lines of ``testbed init`` allow: reads (``tc ... show``, ``ip link show``,
    ``ethtool -k``) as the user, the sbin folders added to its PATH; a tc change as ``tc
    -batch -`` with the line on standard input (no shell); ``ip link add|set|del`` and
    ``ethtool -K`` themselves. The result (and a CommandFailed) names ``argv`` itself."""
    if not sudo:
        return runner.run(argv, timeout_s=timeout_s, check=check)
    if not needs_root(argv):  # a user's PATH may lack the sbin folders (Debian's does)
        res = runner.run([*_SBIN_SH, *argv], timeout_s=timeout_s, check=False)
        return _named(res, argv, check)
    if argv[0] != "tc":
        return runner.run(argv, timeout_s=timeout_s, check=check, sudo=True)
    res = runner.run(
        ["tc", "-batch", "-"],
        timeout_s=timeout_s,
        check=False,
        sudo=True,
        input=shlex.join(argv[1:]) + "\n",
    )
    return _named(res, argv, check)


def _named(res: Result, argv: Sequence[str], check: bool) -> Result:
    """``res`` as the result of ``argv`` (what the caller asked to run); CommandFailed if
    ``check`` and it failed."""
    res = Result(res.host, tuple(argv), res.returncode, res.stdout, res.stderr, res.elapsed_s)
    if check and not res.ok:
        raise CommandFailed(res.host, argv, res.returncode, res.stdout, res.stderr)
    return res


def spawn_script(
    argv: Sequence[str],
    log_path: str,
    pid_path: str,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """A POSIX-sh command line that starts ``argv`` detached from the SSH session.

    ``setsid -f`` gives it its own session (a plain ``cmd &`` keeps the SSH channel
    open); ``exec`` makes the PID in ``pid_path`` the process itself. The script then
    waits (<= 5 s) for the pid file and prints the PID.
    """
    env_part = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    inner = (
        f"echo $$ > {shlex.quote(pid_path)}; "
        + (f"cd {shlex.quote(cwd)} && " if cwd else "")
        + "exec "
        + (f"env {env_part} " if env_part else "")
        + f"{shlex.join(list(argv))} >> {shlex.quote(log_path)} 2>&1 < /dev/null"
    )
    dirs = sorted({os.path.dirname(log_path) or ".", os.path.dirname(pid_path) or "."})
    return (
        f"mkdir -p {' '.join(shlex.quote(d) for d in dirs)} && "
        f"rm -f {shlex.quote(pid_path)} && "
        f"setsid -f sh -c {shlex.quote(inner)} && "
        f"for i in $(seq 50); do [ -s {shlex.quote(pid_path)} ] && "
        f"exec cat {shlex.quote(pid_path)}; sleep 0.1; done; "
        f"echo 'no pid file {pid_path} after 5 s' >&2; exit 1"
    )


class SshRunner:
    """Runs on a remote host over SSH (fabric), verifying its host key.

    Parameters
    ----------
    host, port, user:
        Where to connect.
    key_path:
        Private key file; ``None`` uses the ssh-agent.
    known_hosts:
        File with the accepted host keys. A host whose key is not there is refused.
    connect_timeout_s:
        TCP connect + SSH handshake budget.
    name:
        Label used in messages (default ``user@host:port``).
    """

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        user: str | None = None,
        key_path: str | None = None,
        known_hosts: str | None = None,
        connect_timeout_s: float = 10.0,
        name: str | None = None,
    ):
        self.address = host
        self.port = port
        self.user = user
        self.key_path = key_path
        self.known_hosts = known_hosts
        self.connect_timeout_s = connect_timeout_s
        self.host = name or f"{user + '@' if user else ''}{host}:{port}"
        self._conn = None

    # -- connection -------------------------------------------------------------------
    def _connection(self):  # -> fabric.Connection
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        import fabric
        import paramiko

        config = fabric.Config(overrides={"load_ssh_configs": False})
        connect_kwargs: dict[str, object] = {
            "look_for_keys": False,
            "allow_agent": self.key_path is None,
            "banner_timeout": self.connect_timeout_s,
            "auth_timeout": self.connect_timeout_s,
        }
        if self.key_path:
            connect_kwargs["key_filename"] = [self.key_path]
        conn = fabric.Connection(
            self.address,
            user=self.user,
            port=self.port,
            config=config,
            connect_timeout=max(1, int(round(self.connect_timeout_s))),
            connect_kwargs=connect_kwargs,
        )
        # fabric installs AutoAddPolicy: replace it, and trust only our known_hosts file.
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        if self.known_hosts:
            try:
                conn.client.get_host_keys().load(self.known_hosts)
            except OSError as exc:
                raise HostUnreachable(
                    self.host, f"cannot read known_hosts {self.known_hosts}: {exc.strerror}"
                ) from None
        else:
            conn.client.load_system_host_keys()
        try:
            conn.open()
        except BaseException as exc:
            conn.close()
            if isinstance(exc, Exception):
                raise HostUnreachable(self.host, _describe_ssh_error(exc, self)) from None
            raise
        self._conn = conn
        return conn

    def connect(self) -> None:
        """Open the connection now (raises HostUnreachable with the reason)."""
        self._connection()

    def close(self) -> None:
        """Close the SSH connection; the next command opens a new one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> SshRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations -------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        sudo: bool = False,
        input: str | None = None,
    ) -> Result:
        """Run ``argv`` on the host under the remote ``timeout`` (:func:`remote_command`),
        ``input`` on its standard input; raise CommandFailed/CommandTimeout (if ``check``)."""
        return self._run_line(remote_command(argv, timeout_s, sudo), argv, timeout_s, check, input)

    def _run_line(
        self,
        line: str,
        argv: Sequence[str],
        timeout_s: float,
        check: bool,
        input: str | None = None,
    ) -> Result:
        from invoke.exceptions import CommandTimedOut

        conn = self._connection()
        start = time.monotonic()
        try:
            res = conn.run(
                line,
                hide=True,
                warn=True,
                in_stream=False if input is None else io.StringIO(input),
                timeout=timeout_s + _KILL_AFTER_S + 5,
            )
        except CommandTimedOut as exc:
            raise CommandTimeout(
                self.host, argv, timeout_s, exc.result.stdout, exc.result.stderr
            ) from None
        elapsed = time.monotonic() - start
        # 124: `timeout` fired (TERM worked); 137: it had to KILL
        if res.exited in (124, 137) and elapsed >= timeout_s:
            raise CommandTimeout(self.host, argv, timeout_s, res.stdout, res.stderr)
        return _check(
            Result(self.host, tuple(argv), res.exited, res.stdout, res.stderr, elapsed), check
        )

    def put(
        self, local_path: str | os.PathLike[str], remote_path: str, *, mode: int = 0o644
    ) -> None:
        """Copy ``local_path`` to ``remote_path`` over SFTP (parents created; a ``.part``
        file, then rename)."""
        conn = self._connection()
        sftp = conn.sftp()
        parent = posixpath.dirname(remote_path)
        if parent:
            _sftp_makedirs(sftp, parent)
        tmp = f"{remote_path}.part"
        sftp.put(os.fspath(local_path), tmp)
        sftp.chmod(tmp, mode)
        sftp.posix_rename(tmp, remote_path)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        pid_path: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start ``argv`` detached on the host (:func:`spawn_script`); return its PID."""
        line = spawn_script(argv, log_path, pid_path, cwd, env)
        res = self._run_line(
            f"timeout -k {_KILL_AFTER_S} 30 sh -c {shlex.quote(line)}", argv, 30, True
        )
        return int(res.stdout.strip().splitlines()[-1])


def _sftp_makedirs(sftp: Any, path: str) -> None:
    """``mkdir -p path`` over an open SFTP session (no remote shell started for it): the
    missing folders from the top down; one that another writer made meanwhile is fine."""
    missing: list[str] = []
    p = path.rstrip("/") or "/"
    while p not in ("", "/", "."):
        try:
            sftp.stat(p)
            break
        except OSError:
            missing.append(p)
            p = posixpath.dirname(p)
    for d in reversed(missing):
        try:
            sftp.mkdir(d)
        except OSError as exc:
            try:
                sftp.stat(d)  # made by another writer in between: fine
            except OSError:
                raise OSError(f"cannot create folder {d}: {exc}") from None


def _describe_ssh_error(exc: Exception, r: SshRunner) -> str:
    """One human line for why an SSH connection failed."""
    import paramiko

    if isinstance(exc, paramiko.BadHostKeyException):
        return (
            f"host key mismatch: the key offered is not the one in "
            f"{r.known_hosts or 'the system known_hosts'} (refusing)"
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed for user {r.user} with key {r.key_path or '(agent)'}"
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return (
            f"host key unknown: not in {r.known_hosts or 'the system known_hosts'} "
            "(refusing; add it to known_hosts)"
        )
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {r.connect_timeout_s:g} s (port {r.port})"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return f"connection refused on port {r.port}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused on port {r.port}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (port {r.port})"
    return f"{type(exc).__name__}: {exc}"
