"""Helpers for nas3d's own tests and benchmarks, shipped with the package as ``optuna.testing`` is.

Nothing in nas3d imports this package, and it imports no test framework at module level: the pytest
fixtures in ``tests/conftest.py`` and the scripts in ``bench/`` are thin callers of it.
"""

from __future__ import annotations

from nas3d.testing.storages import (
    BACKENDS,
    DEFAULT_ADMIN_URL,
    PG_ENV,
    PostgresUnavailable,
    ThrowawayServer,
    connect,
    libpq_url,
    psycopg_url,
    scratch_storage,
    temporary_database,
    throwaway_server,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_ADMIN_URL",
    "PG_ENV",
    "PostgresUnavailable",
    "ThrowawayServer",
    "connect",
    "libpq_url",
    "psycopg_url",
    "scratch_storage",
    "temporary_database",
    "throwaway_server",
]
