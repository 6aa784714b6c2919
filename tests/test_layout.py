"""The never-rules of the layout, checked so that `make test` fails when a change breaks one.

- The model, training and data code never imports optuna; training never touches storage; no module
  imports back up the layers: the import-linter contracts in pyproject.toml (a static import graph,
  imports inside functions included), and the same rules once more at run time in a fresh interpreter.
- No import cycle anywhere in the package (an AST walk of every import, below), so that each module can
  be read, imported and tested after the ones it uses.
- A module over :data:`MAX_LINES` lines says why at its top, in a comment that starts with
  :data:`LONG_MARK`: a long module is a choice, not what happens to a file.
- Only the CLI prints: no ``print`` or ``sys.stdout`` in any other module's source, and a real search
  run through the library writes nothing to file descriptor 1.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

import nas3d

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(nas3d.__file__).resolve().parent

#: Modules that must never load optuna, not even indirectly (docs/layout.md: the model code never
#: imports optuna). nas3d.pareto imports optuna only inside its trial filter, so importing it must not.
NO_OPTUNA = (
    "nas3d.architecture", "nas3d.ops", "nas3d.model", "nas3d.registry", "nas3d.baselines",
    "nas3d.checkpoint", "nas3d.costs", "nas3d.data", "nas3d.train", "nas3d.metrics", "nas3d.space",
    "nas3d.seeds", "nas3d.util", "nas3d.pareto",
)
#: What training must never load: storage, studies, workers (and so no database driver).
TRAIN_FORBIDDEN = ("nas3d.storages", "nas3d.study", "nas3d.worker", "sqlalchemy", "optuna")
#: The modules allowed to write to standard output: the command line (nas3d.report returns the text).
PRINTERS = ("cli.py", "cli/")
PRINT_CALLS = ("print", "pprint")
#: A module longer than this says why, in a comment at its top that starts with LONG_MARK.
MAX_LINES = 450
LONG_MARK = "# Long module:"


def _env() -> dict[str, str]:
    # this checkout's nas3d, whatever an installed copy would resolve to
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_import_contracts_hold() -> None:
    # not a skip: a missing linter must not pass as "rules kept"
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is missing; it comes with the test extra: pip install -e '.[test]'")
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True, "
        "no_logo=True))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "layers" in result.stdout


# Imports the modules in order in one fresh interpreter and reports, per rule, the forbidden packages
# that the module's import loaded, whatever imported them on the way.
_PROBE = """
import importlib, json, pkgutil, sys
import nas3d
def loaded(prefixes):
    return {p for p in prefixes for m in list(sys.modules) if m == p or m.startswith(p + ".")}
found = []
for module, forbidden in json.loads(sys.argv[1]):
    before = loaded(forbidden)
    importlib.import_module(module)
    found.append([module, sorted(loaded(forbidden) - before)])
# then every other module, for what it writes to stdout on import (__main__ runs the CLI: left out)
for info in pkgutil.walk_packages(nas3d.__path__, "nas3d."):
    if info.name != "nas3d.__main__":
        importlib.import_module(info.name)
sys.stderr.write("PROBE " + json.dumps(found) + "\\n")
"""


@pytest.mark.slow
def test_core_modules_load_no_optuna_and_training_no_storage_in_a_fresh_interpreter() -> None:
    # training first, so that everything it loads is counted against it alone
    rules = [("nas3d.train", TRAIN_FORBIDDEN)] + [(m, ("optuna", "optuna_dashboard")) for m in NO_OPTUNA]
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(rules)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    probe = [line for line in result.stderr.splitlines() if line.startswith("PROBE ")]
    assert len(probe) == 1, result.stderr
    found = json.loads(probe[0][len("PROBE "):])
    assert [module for module, _ in found] == [module for module, _ in rules]
    assert [(module, hits) for module, hits in found if hits] == []
    assert result.stdout == "", f"importing nas3d's modules wrote to stdout: {result.stdout!r}"


Edge = tuple[str, str, str]  # importer, imported, where ("nas3d/x.py:12")


def _module_names(root: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import of one module of the package by another, read from the source of ``root``.

    All imports count: at module level, inside functions, under ``if TYPE_CHECKING:``. A function-level
    import only defers the cycle to run time (and is how the known cycles hid from a module-level look);
    a type-only one still means neither module can be read or type-checked without the other; and
    import-linter's graph counts both, so this check and the layer contracts judge the same graph.
    ``from pkg import name`` is an import of ``pkg.name`` where that is a module, else of ``pkg``. Not
    counted: the import of a package's ``__init__`` that Python makes before any of its submodules;
    that one is the interpreter's, not the author's, and counting it would make every package whose
    ``__init__`` re-exports its submodules (``nas3d.storages``) a cycle.
    """
    modules = _module_names(root, package)
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        where = f"{package}/{path.relative_to(root).as_posix()}"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package, up level - 1
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.append((name, target, f"{where}:{node.lineno}"))
    return edges


def import_cycles(edges: list[Edge]) -> Iterator[list[Edge]]:
    """Import cycles, as their edges: in each strongly connected group of modules (Tarjan's algorithm),
    the shortest cycle through each of its modules, each cycle once."""
    graph: dict[str, dict[str, str]] = {}
    for importer, imported, where in edges:
        graph.setdefault(importer, {}).setdefault(imported, where)
        graph.setdefault(imported, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    seen: set[frozenset[tuple[str, str]]] = set()
    for group in sorted(groups):
        members = set(group)
        for start in group:  # the shortest cycle through each module of the group, each cycle once
            paths = {start: [start]}
            queue = [start]
            while queue:  # breadth first, inside the group, back to start
                node = queue.pop(0)
                for nxt in sorted(graph[node]):
                    if nxt == start:
                        cycle = [*paths[node], start]
                        key = frozenset(pairwise(cycle))
                        if key not in seen:
                            seen.add(key)
                            yield [(a, b, graph[a][b]) for a, b in pairwise(cycle)]
                        queue = []
                        break
                    if nxt in members and nxt not in paths:
                        paths[nxt] = [*paths[node], nxt]
                        queue.append(nxt)


def _describe(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0][0], *(f"{b} ({where})" for _, b, where in cycle)])


def test_the_cycle_check_sees_function_level_type_only_and_relative_imports(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.sub import leaf\n",  # re-exports: no cycle with its submodules
        "a.py": "from pkg.b import x\n",
        "b.py": "def f():\n    from pkg import a\n",  # function level: a <-> b
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\n",  # relative, two levels: c <-> sub.d
        "sub/leaf.py": "import os\nimport pkg.sub\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    cycles = [_describe(c) for c in import_cycles(import_edges(root, "pkg"))]
    assert cycles == [
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:2)",
        "pkg.c -> pkg.sub.d (pkg/c.py:3) -> pkg.c (pkg/sub/d.py:1)",
    ]


def test_no_import_cycle_in_the_package() -> None:
    edges = import_edges(PACKAGE, "nas3d")
    assert len({importer for importer, _, _ in edges}) >= 20, edges  # the package, not an empty folder
    cycles = [_describe(c) for c in import_cycles(edges)]
    assert cycles == [], "import cycles in nas3d (each: who imports whom, where):\n" + "\n".join(cycles)


def test_a_long_module_says_why_at_its_top() -> None:
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not lines[0].startswith(LONG_MARK):
            unexplained.append(f"nas3d/{path.relative_to(PACKAGE).as_posix()}: {len(lines)} lines")
    assert unexplained == [], (
        f"modules over {MAX_LINES} lines: split them, or say why in a first line '{LONG_MARK} ...':\n"
        + "\n".join(unexplained)
    )


def writes_to_stdout(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` for each ``print``/``pprint`` call and each use of ``sys.stdout`` in ``tree``."""
    # `import sys as s` too
    sys_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names if a.name == "sys"} | {"sys"}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PRINT_CALLS:
            hits.append((node.lineno, f"{node.func.id}()"))
        elif (
            isinstance(node, ast.Attribute) and node.attr in ("stdout", "__stdout__")
            and isinstance(node.value, ast.Name) and node.value.id in sys_names
        ):
            hits.append((node.lineno, f"sys.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module in ("sys", "pprint", "builtins"):
            for alias in node.names:
                if alias.name in ("stdout", "__stdout__", "pprint", "print"):
                    hits.append((node.lineno, f"from {node.module} import {alias.name}"))
    return sorted(hits)


def test_the_stdout_check_sees_every_form() -> None:
    source = (
        "import sys\nfrom sys import stdout\nprint('x')\nsys.stdout.write('y')\n"
        "tqdm(range(3), file=sys.__stdout__)\nlogger.info('fine')\nsys.stderr.write('fine')\n"
        "import sys as _s\n_s.stdout.flush()\n"
    )
    assert writes_to_stdout(ast.parse(source)) == [
        (2, "from sys import stdout"), (3, "print()"), (4, "sys.stdout"), (5, "sys.__stdout__"),
        (9, "sys.stdout"),
    ]


def test_only_the_cli_prints() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    checked = 0
    offences = []
    for path in sources:
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in PRINTERS or relative.startswith(tuple(p for p in PRINTERS if p.endswith("/"))):
            continue
        checked += 1
        for line, what in writes_to_stdout(ast.parse(path.read_text(), filename=str(path))):
            offences.append(f"nas3d/{relative}:{line}: {what}")
    assert checked >= 20, sources  # the package itself, not an empty folder
    assert offences == [], (
        "only the CLI writes to stdout; library code returns values and logs to the 'nas3d' loggers:\n"
        + "\n".join(offences)
    )


@pytest.mark.slow
def test_a_search_through_the_library_writes_nothing_to_stdout(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from nas3d.storages import make_storage
    from nas3d.study import create_study
    from nas3d.worker import run_worker
    from tests.test_study import smoke_config

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = smoke_config(tmp_path, **{"study.n_trials": 2, "study.name": "quiet"})
    create_study(config, make_storage(url))
    capfd.readouterr()
    # data written, models built and costed, trained, evaluated, recorded; progress bars on
    assert run_worker("quiet", url, progress=True) == 2
    captured = capfd.readouterr()
    assert captured.out == "", captured.out
