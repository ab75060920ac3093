"""The device check: sent with ``python -c`` by :func:`..facts.read_facts`, never imported.

Runs on the device's python, so it stays valid down to Python 3.6 (an old python can still say
its version). argv: workdir, JSON ``{"reuse": [[dist, import name], ...]}``. Prints one JSON
object (parsed by :func:`..facts.parse_facts`).
"""

import json
import os
import platform
import sys

if __name__ == "__main__":
    wd = os.path.expanduser(sys.argv[1])
    spec = json.loads(sys.argv[2])
    out = {
        "system": platform.system(),
        "machine": platform.machine(),
        "python": list(sys.version_info[:3]),
        "implementation": platform.python_implementation(),
        "libc": list(platform.libc_ver()),
        "executable": sys.executable,
        "workdir": wd,
    }
    p = wd
    while not os.path.isdir(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    st = os.statvfs(p)
    out["free_bytes"] = st.f_bavail * st.f_frsize
    out["writable"] = os.access(p, os.W_OK)
    reuse = {}
    for dist, mod in spec["reuse"]:
        info = None
        try:
            import importlib.util

            s = importlib.util.find_spec(mod)
        except Exception:  # noqa: BLE001 - a package that fails to import is not reusable
            s = None
        if s is not None:
            if s.submodule_search_locations:
                d = os.path.dirname(os.path.abspath(next(iter(s.submodule_search_locations))))
            else:
                d = os.path.dirname(os.path.abspath(s.origin))
            try:
                from importlib import metadata

                ver = metadata.version(dist)
            except Exception:  # noqa: BLE001 - no version known (Python < 3.8, no metadata)
                ver = None
            info = {"path": d, "version": ver}
        reuse[dist] = info
    out["reuse"] = reuse

    def read(name):
        """The text of ``name`` in the workdir, or None if it cannot be read."""
        try:
            with open(os.path.join(wd, name)) as f:
                return f.read()
        except (OSError, ValueError):
            return None

    for key, name in (
        ("installed", "installed.json"),
        ("agent_state", "agent.json"),
        ("ready", "agent.ready.json"),
        ("pid", "agent.pid"),
    ):
        out[key] = read(name)
    out["venv_python"] = os.path.exists(os.path.join(wd, "venv", "bin", "python"))
    cmd = None
    try:
        pid = int((out["pid"] or "").split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except (ValueError, IndexError, OSError):
        pass
    out["cmdline"] = cmd
    print(json.dumps(out))
