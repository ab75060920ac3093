"""sha256 of files in a device's folder: sent with ``python -c`` by :func:`..files.remote_hashes`,
never imported.

argv: directory, JSON ``{file name: expected sha256 or ""}``. Prints ``{name: sha256 or null}``.
Hashes a file only when its size or mtime differ from the cache file's (``.sha256.json``)
entry; rewrites the cache only when an entry changed.
"""

import hashlib
import json
import os
import sys

if __name__ == "__main__":
    d = sys.argv[1]
    want = json.loads(sys.argv[2])
    cpath = os.path.join(d, ".sha256.json")
    try:
        with open(cpath) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    new = dict(cache)
    out = {}
    for name in want:
        p = os.path.join(d, name)
        try:
            st = os.stat(p)
        except OSError:
            out[name] = None
            new.pop(name, None)
            continue
        c = cache.get(name)
        if c and c[0] == st.st_size and c[1] == st.st_mtime_ns:
            out[name] = c[2]
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
        new[name] = [st.st_size, st.st_mtime_ns, out[name]]
    if new != cache:
        os.makedirs(d, exist_ok=True)
        with open(cpath + ".part", "w") as f:
            json.dump(new, f)
        os.replace(cpath + ".part", cpath)
    print(json.dumps(out))
