"""The never-rules of the layout, checked so that `make test` fails when a change breaks one.

- The model, training and data code never imports optuna; training never touches storage; no module
  imports back up the layers: the import-linter contracts in pyproject.toml (a static import graph,
  imports inside functions included), and the same rules once more at run time in a fresh interpreter.
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
from pathlib import Path

import pytest

import nas3d

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(nas3d.__file__).resolve().parent

#: Modules that must never load optuna, not even indirectly (DESIGN §3, STYLE: the model code never
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
