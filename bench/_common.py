"""Helpers shared by the benchmarks in ``bench/``: study configs, scratch storages, timers, tables.

Not a benchmark itself. The scripts import it as ``_common`` (they run as files, so ``bench/`` is on
``sys.path``) before anything from ``nas3d``: importing it puts the repository first on ``sys.path``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
# Run as files, the scripts have bench/ first on sys.path, not the repo: put the checkout first so
# `nas3d` is this tree's package whatever the environment's install resolves it to (an editable
# install made before nas3d/__init__.py existed serves it as a namespace package, without __version__).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nas3d.architecture import Architecture  # noqa: E402
from nas3d.config import StudyConfig, load_study_config  # noqa: E402
from nas3d.storages import redact_url as redact  # noqa: E402, F401 (re-exported for the scripts)
from nas3d.testing.storages import BACKENDS, DEFAULT_ADMIN_URL, PG_ENV, psycopg_url  # noqa: E402
from nas3d.testing.storages import scratch_storage as _scratch_storage  # noqa: E402

SMOKE = REPO / "studies" / "smoke.toml"

T = TypeVar("T")


def default_pg_admin_url() -> str:
    """``$NAS3D_TEST_POSTGRES_URL``, else the local trust-auth server."""
    return os.environ.get(PG_ENV) or DEFAULT_ADMIN_URL


def smoke_config(**overrides: object) -> StudyConfig:
    """``studies/smoke.toml`` with ``{"table.key": value}`` overrides (as ``--set`` would apply)."""
    config = load_study_config(SMOKE)
    return config.with_overrides(overrides, source="benchmark") if overrides else config


def parse_list(text: str, kind: Callable[[str], T], what: str) -> list[T]:
    """``"a,b"`` → ``[kind("a"), kind("b")]``; ``ValueError`` naming ``what`` for an empty list."""
    items = [kind(part.strip()) for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError(f"{what} must list at least one value, but got {text!r}")
    return items


def parse_backends(text: str) -> list[str]:
    backends = parse_list(text, str, "--backends")
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"--backends: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backends


@contextmanager
def scratch_storage(backend: str, workdir: Path, pg_admin_url: str, tag: str = "") -> Iterator[str]:
    """A fresh, empty storage URL: a SQLite file in ``workdir``, or a new PostgreSQL database
    ``nas3d_bench_<tag><hex>`` on the server of ``pg_admin_url`` (dropped, connections and all, on exit)."""
    server = psycopg_url(pg_admin_url, "--postgres-url") if backend == "postgresql" else None
    with _scratch_storage(backend, workdir, server, name_prefix=f"nas3d_bench_{tag}") as url:
        yield url


class PhaseTimer:
    """Seconds spent per named phase, summed over calls; reset with ``take()`` per measured unit."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` unchanged in behaviour, its time added to phase ``name`` (nested phases both count)."""

        def timed(*args: Any, **kwargs: Any) -> T:
            with self.phase(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def take(self) -> dict[str, float]:
        """The phases measured since the last ``take()``, and a fresh start."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def spread(rows: Sequence[dict], count: int) -> list[dict]:
    """``count`` rows of an architecture table evenly over its rows sorted by FLOPs, its cheapest and
    dearest included (all of them when it holds no more)."""
    rows = sorted(rows, key=lambda r: (r["flops"], r.get("arch_hash", "")))
    if count >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / (count - 1))] for i in range(count)] if count > 1 else rows[:1]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain, right-aligned text table (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


#: The CPU profile's best architecture (its timed search on AdrenalMNIST3D, 237 MFLOPs at 28³): a row of
#: the truth table and of the recipe table.
CPU_BEST = Architecture(ops=("mish_conv3", "conv3_in_relu", "conv3_in_mish"),
                        edges=((0, 1), (0, 2), (1, 3), (2, 3), (3, 4)),
                        stacks=1, cells_per_stack=1, initial_filters=8)


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads (a one-line ``ValueError`` below 1; None leaves them)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, but got {threads}")
    import torch
    torch.set_num_threads(threads)


def load_table(path: Path, expected_format: str, expected: dict) -> dict | None:
    """A resumable bench table at ``path`` when it was made by ``expected``'s protocol; None when there
    is none. A one-line ``ValueError`` when it was made by another (its rows would not be comparable)."""
    import json
    if not path.exists():
        return None
    document = json.loads(path.read_text())
    if document.get("format") != expected_format or document.get("protocol") != expected:
        theirs = document.get("protocol") or {}
        differ = sorted(k for k in set(expected) | set(theirs) if expected.get(k) != theirs.get(k))
        raise ValueError(f"{path} was made with another protocol (differs in: "
                         f"{', '.join(differ) or 'format'}); pass another --out, or delete it to start again")
    return document


def write_table(path: Path, document: dict) -> None:
    """Write a bench table atomically (a killed build leaves the previous complete file)."""
    import json

    from nas3d.util import atomic_write
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: file.write(text.encode()))
