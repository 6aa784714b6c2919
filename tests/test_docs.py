"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a missing anchor
or a page outside the nav fails it), the README stays short, and its own links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250


def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner is not a warning
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    warnings = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR"))]
    if done.returncode != 0 or warnings:
        pytest.fail(f"mkdocs build --strict failed (exit {done.returncode}):\n{output}", pytrace=False)
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES} may remain: move text to docs/")


def _slugs(markdown: str) -> set[str]:
    """Heading anchors as Python-Markdown's toc (what mkdocs checks) and GitHub make them."""
    slugs = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().replace("`", "")
        ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
        slugs.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_title).strip().lower()))
        slugs.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return slugs


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in _slugs(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {path or 'README.md'}")
    assert not broken, "README links that do not resolve:\n" + "\n".join(broken)


def test_ci_runs_the_readmes_test_command_then_the_newest_optuna() -> None:
    assert "make test " in README.read_text(encoding="utf-8")
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands
    # then the storage and sampler tests again, on the newest release pyproject.toml allows
    (allowed,) = re.findall(r'"(optuna[<>=][^"]*)"', (ROOT / "pyproject.toml").read_text())
    after = commands[commands.index("make test"):]
    assert any("--no-deps --target" in c and f'"{allowed}"' in c for c in after), allowed
    (rerun,) = [c for c in after if "-m pytest" in c]
    assert rerun.startswith("PYTHONPATH=")
    tests = re.findall(r"tests/\S+\.py", rerun)
    assert sorted(tests) == ["tests/test_samplers.py", "tests/test_storage.py"]
    assert all((ROOT / t).exists() for t in tests)
