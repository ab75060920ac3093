"""ZeroMQ CURVE for the data plane: the agent accepts only the base station's key.

Every agent socket (the ROUTER that serves experts and the status PUB) is a CURVE server with
the agent's own keypair; a ZAP handler (pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`)
lets a client complete the handshake only when its public key is one of the files in the
agent's ``authorized/`` folder — the BS's. A client without CURVE fails the handshake with a
mechanism mismatch, one with another key is refused by ZAP (status 400); neither gets a single
message through, and all traffic of an accepted client is encrypted and authenticated.

Key files are ZeroMQ certificates (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both keys. A secret file readable by group or others is
refused, as ssh refuses a private key with open permissions.

On the device, the agent's ``--curve-dir DIR`` holds::

    DIR/agent.key_secret      the agent's keypair (mode 0600)
    DIR/authorized/*.key      public keys allowed to connect (the BS's)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

AGENT_SECRET = "agent.key_secret"
AUTHORIZED = "authorized"


class CurveKeyError(Exception):
    """A key file is missing, malformed or too open (message names the file)."""


def create_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` in ``directory`` (mode 0700); the secret file
    gets mode 0600. Returns (public file, secret file)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    pub, sec = zmq.auth.create_certificates(str(d), name)
    Path(sec).chmod(0o600)
    Path(pub).chmod(0o644)
    return Path(pub), Path(sec)


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CurveKeyError(f"{path}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CurveKeyError(
            f"{path}: permissions {stat.S_IMODE(mode):04o} are too open "
            "(the secret key must be readable by its owner only: chmod 600)"
        )


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key in a certificate file (``.key`` or ``.key_secret``)."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{path}: not a ZeroMQ certificate ({e})") from None
    return public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file that only its owner can read."""
    p = Path(path)
    _check_private(p)
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{p}: not a ZeroMQ certificate ({e})") from None
    if not secret:
        raise CurveKeyError(f"{p}: holds no secret key")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    """An agent's side: its keypair and the folder of authorized client keys."""

    public: bytes
    secret: bytes
    authorized_dir: Path

    @classmethod
    def from_dir(cls, curve_dir: str | os.PathLike[str]) -> ServerKeys:
        """Load ``agent.key_secret`` and check that ``authorized/`` holds at least one readable
        public key; raises :class:`CurveKeyError` naming the file otherwise.
        """
        d = Path(curve_dir)
        public, secret = load_secret(d / AGENT_SECRET)
        auth = d / AUTHORIZED
        if not auth.is_dir() or not any(auth.glob("*.key")):
            raise CurveKeyError(f"{auth}: no authorized public key (*.key)")
        for k in auth.glob("*.key"):
            load_public(k)  # fail now, naming the file, rather than refuse every client later
        return cls(public, secret, auth)


class CurveServer:
    """Makes sockets CURVE servers and runs the ZAP handler for one context."""

    def __init__(self, ctx: zmq.Context, keys: ServerKeys) -> None:
        self.keys = keys
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(keys.authorized_dir))

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server with the agent's keypair (before bind)."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def stop(self) -> None:
        """Stop the ZAP authenticator thread."""
        self.auth.stop()


@dataclass(frozen=True)
class CurveClient:
    """The BS's side: its keypair and each agent's public key (by device name)."""

    public: bytes
    secret: bytes
    server_keys: Mapping[str, bytes] = field(default_factory=dict)

    def secure(self, sock: zmq.Socket, device: str) -> None:
        """Make ``sock`` a CURVE client of ``device``'s agent.

        Raises
        ------
        CurveKeyError
            When no public key of ``device``'s agent is known.
        """
        server = self.server_keys.get(device)
        if server is None:
            raise CurveKeyError(f"{device}: no CURVE public key of its agent is known")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server
