"""The device side stays on Python 3.8 (JetPack 5), checked statically with vermin.

The files checked are computed, not listed: every module of ``device_agent/`` and, following
their imports (module-level and lazy, function-level ones), every ``device_agent``/``models``
module they reach; plus the probes the controller reads as text and runs on a device
(``Path(__file__).with_name("x.py")`` under ``testbed/``). The controller (``testbed/``) keeps
its own minimum (3.10) and is not checked.

``vermin -t=3.8- --violations`` runs without ``--eval-annotations`` on files with ``from
__future__ import annotations`` (their annotations are strings, never evaluated: ``list[int]``
and ``X | None`` there are fine on 3.8) and with it on the others. Two things vermin does not
see are checked on the AST here: builtin generics subscripted at run time (``A = list[int]``)
and ``X | Y`` of types at run time (``isinstance(x, int | str)``; vermin's own ``union-types``
heuristic also flags annotations and bitwise ``|``).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the device side's packages; the controller package it must never import
DEVICE_PACKAGES = ("device_agent", "models")
CONTROLLER = "testbed"
#: files the controller reads as text and runs with the device's python (must be found below)
PROBES = (
    "testbed/lab/provision/facts_probe.py",
    "testbed/lab/provision/hash_probe.py",
    "testbed/net/netprobe.py",
)
#: vermin 1.9 has no ``__main__``: ``python -m vermin`` does not run; this is its entry point
VERMIN = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
VERMIN += ["-t=3.8-", "--violations", "--no-tips", "--no-config-file", "--format", "parsable"]
VERMIN += ["--no-make-paths-absolute", "-p=1"]  # one process: 0.4 s faster than two here
#: subscripted at run time, these need Python 3.9 (PEP 585)
GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}
#: names that are types when they stand in ``X | Y`` (a runtime union needs Python 3.10)
TYPE_NAMES = GENERICS | {"int", "float", "complex", "str", "bytes", "bool", "object"}
TYPE_NAMES |= {"bytearray", "memoryview"}


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an import in ``tree`` may load (``a.b.c`` -> a, a.b, a.b.c; for
    ``from a import b`` also a.b, which is a module or a name)."""
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join([*parts[:keep], *([base] if base else [])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            parts = name.split(".")
            yield from (".".join(parts[: i + 1]) for i in range(len(parts)))


def device_files(root: Path = ROOT) -> tuple[list[Path], list[str]]:
    """The device-side files under ``root`` (sorted) and the imports of the controller found
    on the way (``"file:line: imports testbed"``)."""
    todo = ["device_agent", *(f"device_agent.{p.stem}" for p in root.glob("device_agent/*.py"))]
    seen: dict[str, Path] = {}
    bad: list[str] = []
    while todo:
        mod = todo.pop()
        path = _module_file(mod, root)
        if mod in seen or path is None:
            continue
        seen[mod] = path
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name in _imported(tree, mod, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in DEVICE_PACKAGES:
                todo.append(name)
            elif top == CONTROLLER:
                bad.append(f"{path.relative_to(root)}: imports {name} (the controller, 3.10+)")
    probes = set()
    for src in root.glob(f"{CONTROLLER}/**/*.py"):
        for m in re.finditer(r'with_name\(\s*"(\w+\.py)"\s*\)', src.read_text(encoding="utf-8")):
            probes.add(src.with_name(m.group(1)))
    files = sorted({*seen.values(), *(p for p in probes if p.is_file())})
    return files, sorted(set(bad))


def _annotations(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (never evaluated under the future import)."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            args = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            roots += [x.annotation for x in args if x is not None and x.annotation is not None]
            roots += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {id(n) for r in roots for n in ast.walk(r)}


def _is_generic(node: ast.AST, abc_names: set[str]) -> bool:
    if not isinstance(node, ast.Subscript):
        return False
    v = node.value
    if isinstance(v, ast.Name):
        return v.id in GENERICS or v.id in abc_names
    # collections.abc.X[...], abc.X[...]
    return isinstance(v, ast.Attribute) and ast.unparse(v.value) in {"collections.abc", "abc"}


def _is_type(node: ast.AST, abc_names: set[str]) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    if isinstance(node, ast.Name) and node.id in TYPE_NAMES:
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type(node.left, abc_names) or _is_type(node.right, abc_names)
    return _is_generic(node, abc_names)


def runtime_typing(path: Path, label: str) -> list[str]:
    """``label:line: feature`` for builtin generics subscripted and ``X | Y`` of types, outside
    annotations (what vermin does not flag)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _annotations(tree)
    abc_names = {
        a.asname or a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "collections.abc"
        for a in n.names
    }
    out = []
    for node in ast.walk(tree):  # outer nodes first: a flagged node's parts are not repeated
        if id(node) in skip:
            continue
        if _is_generic(node, abc_names):
            need = "3.9"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            need = "3.10" if _is_type(node, abc_names) else ""
        else:
            need = ""
        if need:
            out.append(f"{label}:{node.lineno}: {ast.unparse(node)} at run time needs {need}")
            skip |= {id(n) for n in ast.walk(node)}
    return out


def _evaluates_annotations(path: Path) -> bool:
    """True unless annotations are strings (the future import) and nothing evaluates them."""
    src = path.read_text(encoding="utf-8")
    future = re.search(r"^from __future__ import .*\bannotations\b", src, re.MULTILINE) is not None
    return not future or "get_type_hints" in src or "__annotations__" in src


def _vermin(files: list[Path], eval_annotations: bool, root: Path) -> list[str]:
    if not files:
        return []
    flags = ["--eval-annotations"] if eval_annotations else []
    rel = [str(p.relative_to(root)) for p in files]
    res = subprocess.run(
        [*VERMIN, *flags, *rel], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode in (0, 1), f"vermin failed ({res.returncode}):\n{res.stderr}"
    out = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 5)
        if len(parts) != 6:  # not "file:line:col:py2:py3:feature": say it as vermin wrote it
            out.append(f"vermin: {line}")
        elif parts[5]:  # a feature (the lines without one are a file's or the run's verdict)
            out.append(f"{parts[0]}:{parts[1]}: {parts[5]} (needs {parts[4]})")
    assert out or res.returncode == 0, f"vermin failed the target but named nothing:\n{res}"
    return out


def violations(files: Iterable[Path], root: Path = ROOT) -> list[str]:
    """Every Python > 3.8 use in ``files`` (under ``root``): ``file:line: feature``."""
    files = list(files)
    evaluated = [p for p in files if _evaluates_annotations(p)]
    strings = [p for p in files if p not in evaluated]
    found = _vermin(strings, False, root) + _vermin(evaluated, True, root)
    for p in files:
        found += runtime_typing(p, str(p.relative_to(root)))
    return sorted(set(found))


def test_device_side_runs_on_python_3_8():
    files, controller_imports = device_files()
    rel = {str(p.relative_to(ROOT)) for p in files}
    # lazy imports are followed (experts.py loads the kernels inside a function, lm.py the LM)
    want = {"device_agent/energy.py", "models/kernels.py", "models/dense_lm.py", *PROBES}
    assert want <= rel, f"not found as device-side files: {sorted(want - rel)}"
    assert not controller_imports, "\n".join(controller_imports)
    found = violations(files)
    assert not found, "the device side must run on Python 3.8 (JetPack 5):\n" + "\n".join(found)


def test_the_check_flags_3_9_and_3_10_code(tmp_path):
    (tmp_path / "new.py").write_text(
        "from __future__ import annotations\n"
        "import itertools\n"
        "from collections.abc import Sequence\n"
        "PAIRS = list(itertools.pairwise([1, 2, 3]))\n"
        "Ints = list[int]\n"
        "MaybeInt = int | None\n"
        "ok = isinstance(1, (int, str)) and 3 | 4\n"
        "Seq = Sequence[int]\n"
        "def f(x: list[int], y: Sequence[int] | None = None) -> dict[str, int] | None:\n"
        "    z: tuple[int, ...] = (1,)\n"
        "    return None\n"
    )
    (tmp_path / "old.py").write_text("def g(x: list[int]) -> None:\n    return None\n")
    found = violations([tmp_path / "new.py", tmp_path / "old.py"], tmp_path)
    flagged = {(f.split(":")[0], int(f.split(":")[1])) for f in found}
    # under the future import the annotations (line 9, 10) are strings and do not count
    want = {("new.py", 4), ("new.py", 5), ("new.py", 6), ("new.py", 8), ("old.py", 1)}
    assert flagged == want, "\n".join(found)
    assert any("pairwise" in f for f in found), found
