"""Layout rules, read from the AST of ``testbed/`` (nothing is imported from it):

- every exception class defined under ``testbed/`` lives in ``testbed/errors.py``;
- no import cycle among ``testbed`` modules, counting module-level and function-level imports
  (``from .x import``, ``from . import x``, ``from testbed.x import``, ``import testbed.x``;
  imports under ``if TYPE_CHECKING:`` never run and are not counted);
- at the top of ``testbed/`` only ``__init__``, ``__main__``, ``errors`` and ``units``; the rest
  lives in the sub-packages of ``RANKS``;
- imports run one way: a module imports only modules of a lower rank (``RANKS``), or modules of
  its own sub-package at its own rank (``cli → run → lab operations → dataplane → policy → net →
  lab hosts, results → errors, units``).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "testbed"

#: import cycles that exist today and are being removed; each entry is a cycle's set of modules
#: (a strongly connected component of the import graph), which must match exactly
ALLOWED_CYCLES: set[frozenset[str]] = set()  # none left: keep it so

#: the only modules at the top of testbed/ and its sub-packages
TOP_MODULES = {"__init__", "__main__", "errors", "units"}
SUBPACKAGES = {"cli", "dataplane", "lab", "net", "policy", "results", "run"}

#: module (or sub-package) -> rank; the longest matching prefix decides. The lab has two tiers:
#: the hosts and how to reach them (rank 1, used by net/) and the operations on them (rank 5,
#: which use net/, policy/ and dataplane/).
RANKS: dict[str, int] = {
    "testbed": 0,
    "testbed.errors": 0,
    "testbed.units": 0,
    "testbed.lab": 1,
    "testbed.results": 1,
    "testbed.net": 2,
    "testbed.policy": 3,
    "testbed.dataplane": 4,
    "testbed.lab.local": 5,
    "testbed.lab.provision": 5,
    "testbed.run": 6,
    "testbed.cli": 7,
    "testbed.__main__": 8,
}


# ---- modules and their imports -------------------------------------------------------------------
def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (sub-packages too)."""
    root = package_dir.parent
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node``, function bodies included, minus ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield sub
                yield from _runtime_nodes(sub)
            continue
        yield child
        yield from _runtime_nodes(child)


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module an ``from ... import`` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = _package_of(module, path).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(*package_dirs: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the given packages -> line of the first such import}.

    ``from P import a`` counts as an import of ``P.a`` when that is a module, else of ``P``.
    Self-imports are dropped.
    """
    files: dict[str, Path] = {}
    for package_dir in package_dirs:
        files.update(module_files(package_dir))
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for module, path in files.items():
        edges = graph[module]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                if t in files and t != module:
                    edges.setdefault(t, node.lineno)
    return graph


# ---- cycles -------------------------------------------------------------------------------------
def import_cycles(graph: Mapping[str, Mapping[str, object]]) -> list[frozenset[str]]:
    """The graph's cycles as strongly connected components (Tarjan) of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(frozenset(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=sorted)


def cycle_path(graph: Mapping[str, Mapping[str, int]], scc: frozenset[str]) -> str:
    """One concrete cycle inside ``scc``, each step with its import's line."""
    start = min(scc)
    # breadth-first from start back to start, inside the component
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w not in scc:
                continue
            if w == start:
                steps = [v]
                while steps[-1] != start:
                    steps.append(prev[steps[-1]])
                steps.reverse()
                steps.append(start)
                return (
                    " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(steps))
                    + f" -> {start}"
                )
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return ", ".join(sorted(scc))  # pragma: no cover - an SCC always has a cycle through start


def cycle_problems(
    graph: Mapping[str, Mapping[str, int]], allowed: set[frozenset[str]] | None = None
) -> list[str]:
    """One line per cycle that is not in ``allowed`` (default :data:`ALLOWED_CYCLES`)."""
    allowed = ALLOWED_CYCLES if allowed is None else allowed
    return [
        f"import cycle among {', '.join(sorted(scc))}: {cycle_path(graph, scc)}"
        for scc in import_cycles(graph)
        if scc not in allowed
    ]


# ---- exception classes --------------------------------------------------------------------------
def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return f"{head}.{expr.attr}" if head else None
    if isinstance(expr, ast.Subscript):  # Generic[T] and the like
        return _dotted(expr.value)
    return None


def exception_classes(package_dir: Path) -> list[tuple[Path, int, str]]:
    """(file, line, name) of every class under the package that derives from BaseException.

    A base is resolved through the module's own classes and imports: a class of the package
    is followed to its bases, a builtin or an outside name is imported and checked.
    """
    files = module_files(package_dir)
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in files.items()}
    aliases: dict[str, dict[str, str]] = {}
    classes: dict[str, dict[str, ast.ClassDef]] = {}
    for module, tree in trees.items():
        names: dict[str, str] = {}
        local: dict[str, ast.ClassDef] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        names[a.asname] = a.name
                    else:
                        head = a.name.split(".")[0]
                        names[head] = head
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, files[module], node)
                for a in node.names:
                    names[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.ClassDef):
                local.setdefault(node.name, node)
        aliases[module], classes[module] = names, local

    memo: dict[str, bool] = {}

    def resolve(module: str, name: str) -> str:
        """``name`` as seen in ``module`` -> a dotted path, package re-imports followed."""
        head, _, rest = name.partition(".")
        if head in classes[module]:
            return f"{module}.{name}"
        target = aliases[module].get(head, f"builtins.{head}")
        full = f"{target}.{rest}" if rest else target
        owner, _, attr = full.rpartition(".")
        if owner in files and attr not in classes[owner] and attr in aliases[owner]:
            return resolve(owner, attr)
        return full

    def is_exception(dotted: str) -> bool:
        if dotted in memo:
            return memo[dotted]
        memo[dotted] = False  # a cycle of bases is not an exception
        owner, _, attr = dotted.rpartition(".")
        if owner in files and attr in classes[owner]:
            result = any(
                is_exception(resolve(owner, d))
                for d in map(_dotted, classes[owner][attr].bases)
                if d
            )
        else:
            result = _outside_is_exception(dotted)
        memo[dotted] = result
        return result

    out = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                is_exception(resolve(module, d)) for d in map(_dotted, node.bases) if d
            ):
                out.append((files[module], node.lineno, node.name))
    return out


def _outside_is_exception(dotted: str) -> bool:
    module, _, attr = dotted.rpartition(".")
    if module == "builtins":
        obj = getattr(builtins, attr, None)
    else:
        try:
            obj = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            # not importable here: judge by the name, as a reader would
            return attr.endswith(("Error", "Exception"))
    return isinstance(obj, type) and issubclass(obj, BaseException)


# ---- the rules ----------------------------------------------------------------------------------
def test_every_exception_class_lives_in_errors_py():
    home = PACKAGE / "errors.py"
    found = exception_classes(PACKAGE)
    assert any(p == home and n == "TestbedError" for p, _, n in found)  # the walk sees them
    offenders = [
        f"{p.relative_to(ROOT)}:{line}: class {name}" for p, line, name in found if p != home
    ]
    assert not offenders, "exception classes outside testbed/errors.py:\n" + "\n".join(offenders)


def test_no_import_cycles_in_testbed():
    problems = cycle_problems(import_graph(PACKAGE))
    assert not problems, "\n".join(problems)


def rank_of(module: str, ranks: Mapping[str, int] = RANKS) -> int:
    """The rank of the longest prefix of ``module`` in ``ranks``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ranks:
            return ranks[prefix]
    raise KeyError(module)


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def rank_problems(
    graph: Mapping[str, Mapping[str, int]], ranks: Mapping[str, int] = RANKS
) -> list[str]:
    """Imports that go up, or sideways into another sub-package of the same rank."""
    out = []
    for module, deps in sorted(graph.items()):
        mine = rank_of(module, ranks)
        for dep, line in sorted(deps.items()):
            theirs = rank_of(dep, ranks)
            if theirs < mine or (theirs == mine and _subpackage(dep) == _subpackage(module)):
                continue
            out.append(f"{module} (rank {mine}) imports {dep} (rank {theirs}) at line {line}")
    return out


OURS = ("testbed", "models", "device_agent", "recipes")

#: "file: module.name" of private names used across modules that are tolerated: none (keep it so)
ALLOWED_PRIVATE: set[str] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: Path = ROOT, packages: tuple[str, ...] = OURS) -> set[str]:
    """``"file: module.name"`` for every private name of one of our modules used from another:
    ``from m import _x`` and ``m._x`` where ``m`` names one of our modules."""
    out: set[str] = set()
    for package in packages:
        files = module_files(root / package)
        for module, path in files.items():
            tree = ast.parse(path.read_text())
            rel = path.relative_to(root).as_posix()
            aliases: dict[str, str] = {}  # local name -> our module it names
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    src = _absolute(module, path, node)
                    if src.split(".")[0] not in OURS:
                        continue
                    for a in node.names:
                        if _private(a.name):
                            out.add(f"{rel}: {src}.{a.name}")
                        elif f"{src}.{a.name}" in files or (
                            (root / src.replace(".", "/") / f"{a.name}.py").is_file()
                            or (root / src.replace(".", "/") / a.name / "__init__.py").is_file()
                        ):
                            aliases[a.asname or a.name] = f"{src}.{a.name}"
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] in OURS and a.asname:
                            aliases[a.asname] = a.name
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                    continue
                if isinstance(node.value, ast.Name) and node.value.id in aliases:
                    out.add(f"{rel}: {aliases[node.value.id]}.{node.attr}")
    return out


def test_no_private_names_across_modules():
    found = private_uses()
    new = sorted(found - ALLOWED_PRIVATE)
    assert not new, "private names used from another module:\n" + "\n".join(new)
    stale = sorted(ALLOWED_PRIVATE - found)
    assert not stale, "no longer used, delete from ALLOWED_PRIVATE:\n" + "\n".join(stale)


def test_private_use_finder(tmp_path):
    _write(
        tmp_path,
        {
            "testbed/__init__.py": "",
            "testbed/a.py": "def _x():\n    pass\ndef y():\n    pass\n",
            "testbed/b.py": "from .a import _x, y\nfrom . import a\nfrom . import a as A\n"
            "a._x()\nA._x()\na.y()\nobj._z()\n",
        },
    )
    assert private_uses(tmp_path, ("testbed",)) == {"testbed/b.py: testbed.a._x"}


#: what each top-level package may import of the others (``recipes`` only the names a policy
#: uses: ``testbed.policy``, ``testbed.errors``, ``testbed.units`` and the channel model)
PACKAGE_IMPORTS: dict[str, tuple[str, ...]] = {
    "models": (),
    "device_agent": ("models",),
    "testbed": ("models", "device_agent"),
    "recipes": (
        "models",
        "testbed.policy",
        "testbed.errors",
        "testbed.units",
        "testbed.net.channel",
    ),
}


def package_problems(graph: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Imports from one top-level package into another that ``PACKAGE_IMPORTS`` does not allow."""
    out = []
    for module, deps in sorted(graph.items()):
        top = module.split(".")[0]
        for dep, line in sorted(deps.items()):
            if dep.split(".")[0] == top:
                continue
            if not any(dep == a or dep.startswith(a + ".") for a in PACKAGE_IMPORTS[top]):
                out.append(f"{module} imports {dep} at line {line}")
    return out


def test_no_import_cycle_anywhere_and_packages_import_one_way():
    graph = import_graph(*(ROOT / p for p in PACKAGE_IMPORTS))
    assert graph["recipes.wdmoe"] and graph["device_agent.server"]  # the walk sees them
    assert "testbed.policy" in graph["recipes.baselines"]  # and edges between packages
    problems = cycle_problems(graph) + package_problems(graph)
    assert not problems, "\n".join(problems)


def test_package_rule_on_a_small_graph():
    graph = {
        "models.a": {"testbed.errors": 3},
        "recipes.r": {"testbed.policy.api": 1, "testbed.run.session": 2, "models.a": 4},
        "device_agent.s": {"models.a": 5},
    }
    assert package_problems(graph) == [
        "models.a imports testbed.errors at line 3",
        "recipes.r imports testbed.run.session at line 2",
    ]


def test_top_of_testbed_is_errors_and_units_and_the_subpackages():
    files = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert files == TOP_MODULES, f"modules at the top of testbed/: {sorted(files - TOP_MODULES)}"
    assert folders == SUBPACKAGES


def test_imports_run_one_way():
    graph = import_graph(PACKAGE)
    assert "testbed.run.session" in graph and graph["testbed.cli.run"]  # the walk sees them
    problems = rank_problems(graph)
    assert not problems, "\n".join(problems)


def test_rank_rule_on_a_small_graph():
    ranks = {"testbed": 0, "testbed.lab": 1, "testbed.net": 2, "testbed.lab.local": 5}
    graph = {
        "testbed.net.links": {"testbed.lab.runner": 3},  # down: fine
        "testbed.lab.local": {"testbed.net.links": 4, "testbed.lab.runner": 5},  # down, own package
        "testbed.lab.runner": {"testbed.net.links": 6},  # up: refused
        "testbed.lab.inventory": {"testbed.lab.runner": 7},  # same rank, same package
    }
    assert rank_problems(graph, ranks) == [
        "testbed.lab.runner (rank 1) imports testbed.net.links (rank 2) at line 6"
    ]
    assert rank_of("testbed.lab.local.x", ranks) == 5 and rank_of("testbed.errors", ranks) == 0


# ---- the checks themselves, on synthetic code ---------------------------------------------------
def _write(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "testbed"


def test_cycle_finder_on_small_graphs():
    g = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}, "e": {}}
    assert import_cycles(g) == [frozenset("abc")]
    assert cycle_path(g, frozenset("abc")) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
    assert import_cycles({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) == []
    two = {"a": {"b": 1}, "b": {"a": 1}, "x": {"y": 1}, "y": {"x": 1, "a": 1}}
    assert import_cycles(two) == [frozenset("ab"), frozenset("xy")]


def test_function_level_cycle_is_found_and_named(tmp_path):
    # today's experiment <-> migration before errors.py took PolicyFailed: both imports
    # inside functions
    pkg = _write(
        tmp_path,
        {
            "testbed/__init__.py": "",
            "testbed/errors.py": "class TestbedError(Exception):\n    pass\n",
            "testbed/experiment.py": (
                "from .errors import TestbedError\n\n"
                "class PolicyFailed(TestbedError):\n    pass\n\n"
                "def trial():\n    from .migration import run_update\n"
            ),
            "testbed/migration.py": (
                "def run_update():\n    from .experiment import PolicyFailed\n"
            ),
        },
    )
    graph = import_graph(pkg)
    assert graph["testbed.experiment"] == {"testbed.errors": 1, "testbed.migration": 7}
    problems = cycle_problems(graph)
    assert problems == [
        (
            "import cycle among testbed.experiment, testbed.migration: testbed.experiment"
            " (line 7) -> testbed.migration (line 2) -> testbed.experiment"
        )
    ]
    found = [(p.name, line, n) for p, line, n in exception_classes(pkg)]
    assert found == [("errors.py", 1, "TestbedError"), ("experiment.py", 3, "PolicyFailed")]


def test_import_forms_and_allowlist(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "testbed/__init__.py": "",
            "testbed/a.py": "import testbed.b\nfrom testbed import c as C\n",
            "testbed/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from .a import x\n",
            "testbed/c.py": "def f():\n    from testbed.sub.d import y\n",
            "testbed/sub/__init__.py": "from .d import y\n",
            "testbed/sub/d.py": "from .. import a\nfrom . import e\n",
            "testbed/sub/e.py": "import os\nclass Boom(OSError):\n    pass\n"
            "class Later(Boom):\n    pass\nclass Plain:\n    pass\n",
            # an allowlisted cycle (the cli one, as it was)
            "testbed/cli.py": "from .cli_agents import register\nfrom .cli_run import r\n"
            "from .cli_report import q\n",
            "testbed/cli_agents.py": "from .cli import _fmt\n",
            "testbed/cli_run.py": "from .cli import _fmt\n",
            "testbed/cli_report.py": "from .cli import _fmt\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["testbed.a"] == {"testbed.b": 1, "testbed.c": 2}
    assert graph["testbed.b"] == {}  # TYPE_CHECKING only
    assert graph["testbed.sub"] == {"testbed.sub.d": 1}
    assert graph["testbed.sub.d"] == {"testbed.a": 1, "testbed.sub.e": 2}
    assert [sorted(s) for s in import_cycles(graph)] == [
        ["testbed.a", "testbed.c", "testbed.sub.d"],
        ["testbed.cli", "testbed.cli_agents", "testbed.cli_report", "testbed.cli_run"],
    ]
    cli = frozenset({"testbed.cli", "testbed.cli_agents", "testbed.cli_run", "testbed.cli_report"})
    assert len(cycle_problems(graph)) == 2  # nothing is allowed any more
    (problem,) = cycle_problems(graph, {cli})  # the cli cycle allowed, the other not
    assert problem.startswith("import cycle among testbed.a, testbed.c, testbed.sub.d: ")
    names = sorted(n for _, _, n in exception_classes(pkg))
    assert names == ["Boom", "Later"]
