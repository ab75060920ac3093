"""The controller's CURVE keys for one testbed (see :mod:`device_agent.security`).

``provision`` calls :func:`ensure_keys`: the BS's keypair and one keypair per device are made
once, in the inventory's key folder (``testbed.keys_dir``, default ``<inventory stem>.keys``
beside it; the local testbed keeps it in its state folder), mode 0700, secret files 0600.
Each device then receives only its own secret key and the BS's *public* key; the BS keeps every
device's public key to check that it talks to the agent it started. No key is ever printed,
logged or written to a manifest: only the folder's path is.
"""

from __future__ import annotations

from pathlib import Path

from device_agent.security import (
    CurveClient,
    CurveKeyError,
    create_keypair,
    load_public,
    load_secret,
)

from ..errors import ConfigError
from .inventory import Inventory

BS_NAME = "bs"


def _pair(folder: Path, name: str) -> tuple[Path, Path]:
    pub, sec = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not (pub.is_file() and sec.is_file()):
        pub, sec = create_keypair(folder, name)
    return pub, sec


def ensure_keys(inv: Inventory) -> dict[str, tuple[Path, Path]]:
    """Make the keypairs that are missing; name -> (public file, secret file), ``"bs"``
    included. Raises ConfigError naming the folder when it cannot be written."""
    folder = inv.curve_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        out = {BS_NAME: _pair(folder, BS_NAME)}
        for d in inv.devices:
            if d.name == BS_NAME:
                raise ConfigError(
                    f"{inv.path}: devices: the name {BS_NAME!r} is the base "
                    "station's key name; rename the device"
                )
            out[d.name] = _pair(folder, d.name)
    except OSError as e:
        raise ConfigError(f"{inv.path}: testbed.keys_dir: {folder}: {e.strerror or e}") from None
    return out


def client_keys(inv: Inventory) -> CurveClient | None:
    """The BS's side for :class:`~testbed.dataplane.backend.RemoteExpertBackend` (None when the
    inventory says ``security = "none"``).

    Raises
    ------
    ConfigError
        When a key file is missing or unreadable (run ``testbed provision`` first).
    """
    if inv.security == "none":
        return None
    folder = inv.curve_dir()
    try:
        public, secret = load_secret(folder / f"{BS_NAME}.key_secret")
        servers = {d.name: load_public(folder / f"{d.name}.key") for d in inv.devices}
    except CurveKeyError as e:
        raise ConfigError(f"{inv.path}: CURVE keys: {e} (run `testbed provision` first)") from None
    return CurveClient(public, secret, servers)
