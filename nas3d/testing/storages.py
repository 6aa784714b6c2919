"""Scratch storages for tests and benchmarks: throwaway PostgreSQL servers and databases, SQLite files.

The one copy of what ``tests/conftest.py`` and ``bench/_common.py`` both need (Optuna keeps the same
in ``optuna/testing/storages.py``). psycopg is imported only when a PostgreSQL helper runs, since it
comes with the ``postgres`` and ``test`` extras, not with nas3d itself.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from nas3d.testing.servers import free_port

#: The environment variable naming a PostgreSQL server (any database on it whose user may CREATE
#: DATABASE) for storage tests and benchmarks.
PG_ENV = "NAS3D_TEST_POSTGRES_URL"
#: The local trust-auth server that benchmarks use when ``PG_ENV`` is not set.
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")
CONNECT_TIMEOUT_S = 10
_PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started or reached; the message says why."""


def psycopg_url(url: str, what: str = PG_ENV) -> str:
    """``postgres://`` or ``postgresql[+driver]://`` → the SQLAlchemy URL for psycopg 3.

    ``ValueError`` naming ``what`` (the flag or variable the URL came from) for any other scheme.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith(("postgresql", "postgres")):
        raise ValueError(f"{what} must be a postgresql:// URL, but got {url!r}")
    return "postgresql+psycopg://" + rest


def libpq_url(url: str) -> str:
    """SQLAlchemy URL → the libpq URI that ``psycopg.connect`` takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: str) -> Any:  # psycopg.Connection; psycopg is an optional dependency
    """An autocommit psycopg connection to ``url`` (SQLAlchemy form), failing within 10 seconds."""
    import psycopg

    return psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


@contextmanager
def temporary_database(server_url: str, name_prefix: str) -> Iterator[str]:
    """A new, empty database ``<name_prefix><hex>`` on ``server_url``'s server; yields its URL and
    drops it on exit."""
    name = f"{name_prefix}{uuid.uuid4().hex[:12]}"
    with connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with connect(server_url) as conn:
            # FORCE: engines left open (pooled connections, killed workers) must not block the drop
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_storage(
    backend: str, workdir: Path, server_url: str | None = None, name_prefix: str = "nas3d_scratch_"
) -> Iterator[str]:
    """A fresh, empty storage URL: a SQLite file ``<name_prefix><hex>.db`` in ``workdir``, or a
    temporary PostgreSQL database on ``server_url``'s server (dropped, connections and all, on exit)."""
    if backend == "sqlite":
        yield f"sqlite:///{Path(workdir) / f'{name_prefix}{uuid.uuid4().hex[:12]}.db'}"
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if server_url is None:
        raise ValueError("a postgresql scratch storage needs the server's URL, but got server_url=None")
    with temporary_database(server_url, name_prefix) as url:
        yield url


@dataclass(frozen=True)
class ThrowawayServer:
    """A PostgreSQL server started for one session: its admin ``url`` and a ``restart`` function."""

    url: str
    restart: Callable[[], None]


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in _PG_BIN_DIRS if (Path(d) / name).exists()), None
    )
    if found is None:
        raise PostgresUnavailable(f"{name} not found on PATH")
    return found


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb in a temp dir, a free port, trust auth, fsync off) that
    its owner may stop and start, e.g. to simulate an outage; never the shared server.

    Raises :class:`PostgresUnavailable` when ``initdb``/``pg_ctl`` are missing or fail.
    """

    def __init__(self) -> None:
        initdb, self._pg_ctl = _tool("initdb"), _tool("pg_ctl")
        self._as_user: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="nas3d-pg-"))
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                pg_user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' OS user to run initdb"
                ) from None
            self._as_user = [_tool("runuser"), "-u", "postgres", "--"]
            os.chown(self.dir, pg_user.pw_uid, pg_user.pw_gid)
        self.data, self.port = self.dir / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off")
        # -l: without a log file the server inherits our stdout and pipes never reach EOF
        self._ctl = [self._pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w",
                     "-t", "30"]
        try:
            # fsync off: the data is thrown away, and durability would only slow every test down
            self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync")
            self.start()
        except PostgresUnavailable:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, *args: str) -> None:
        try:
            subprocess.run([*self._as_user, *args], check=True, capture_output=True, text=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
            raise PostgresUnavailable(f"{Path(args[0]).name} failed: {detail[-1] if detail else e}") from None

    def start(self) -> None:
        self._run(*self._ctl, "start")

    def stop(self) -> None:
        """Stop it the way a crash or failover looks to clients: connections cut at once."""
        self._run(*self._ctl, "-m", "immediate", "stop")

    def restart(self) -> None:
        self._run(*self._ctl, "-m", "fast", "restart")

    def remove(self) -> None:
        subprocess.run([*self._as_user, self._pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def throwaway_server() -> Iterator[ThrowawayServer]:
    """A :class:`PostgresCluster` for a session: its admin URL and restart, removed on exit."""
    cluster = PostgresCluster()
    try:
        yield ThrowawayServer(url=cluster.url, restart=cluster.restart)
    finally:
        cluster.remove()
