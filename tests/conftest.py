"""Shared fixtures: an isolated NAS3D_HOME, and real PostgreSQL databases for storage tests.

PostgreSQL comes from ``$NAS3D_TEST_POSTGRES_URL`` (any database on a server where that user may
CREATE DATABASE), else from a throwaway server started with initdb/pg_ctl for this session. With
neither, PostgreSQL tests are skipped — unless ``CI=true`` or the variable is set, where a missing
server is a failure, so a broken CI database cannot pass as "skipped".

External programs (Graphviz's ``dot``, Chromium and chromedriver, Slurm, PgBouncer) follow the same
rule through :func:`requires_tool`: a fresh machine without them skips the tests that need them, with
the reason; under ``CI=true`` (``.ci/run`` installs them all) a missing one is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy.engine import make_url

from nas3d.testing import servers
from nas3d.testing.storages import (
    PG_ENV,
    PostgresCluster,
    PostgresUnavailable,
    connect,
    psycopg_url,
    scratch_storage,
    temporary_database,
    throwaway_server,
)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests out of the repo's storage/ and away from the developer's NAS3D_STORAGE."""
    monkeypatch.setenv("NAS3D_HOME", str(tmp_path / "nas3d-home"))
    monkeypatch.delenv("NAS3D_STORAGE", raising=False)
    monkeypatch.delenv("NAS3D_ARTIFACTS", raising=False)


def under_ci() -> bool:
    """``CI=true``: everything the suite needs must be there, and what is missing fails its tests."""
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``; under ``CI=true`` fail it instead."""
    if under_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


#: ``why`` of the programs several test files need.
GRAPHVIZ_WHY = "Graphviz draws the architecture pictures (Debian: apt-get install graphviz)"
CHROMIUM_WHY = ("the dashboard and report pages are loaded in headless Chromium "
                "(Debian: apt-get install chromium chromium-driver)")

#: Where Debian installs daemons (slurmctld, munged, pgbouncer): not on an ordinary user's PATH.
_SYSTEM_BIN = (Path("/usr/sbin"), Path("/sbin"))


def find_tool(program: str) -> str | None:
    """The path of ``program`` on the PATH or in the system binary folders; None if absent."""
    found = shutil.which(program)
    if found is None:
        found = next((str(d / program) for d in _SYSTEM_BIN if (d / program).is_file()), None)
    return found


def requires_tool(*programs: str, why: str) -> None:
    """Skip the calling test (or fixture) unless every one of ``programs`` is installed; under
    ``CI=true`` fail it instead. ``why`` says what needs them and how to install them."""
    missing = [p for p in programs if find_tool(p) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: {why}")


def tool_available(program: str, *, why: str) -> bool:
    """Whether ``program`` is installed, for a test that checks less without it; under ``CI=true`` its
    absence fails the test instead."""
    if find_tool(program) is not None:
        return True
    if under_ci():
        pytest.fail(f"{program} not installed: {why}", pytrace=False)
    return False


@pytest.fixture
def graphviz_dot() -> str:
    """Graphviz's ``dot``, for tests that draw pictures (skipped without it, failed under ``CI=true``)."""
    requires_tool("dot", why=GRAPHVIZ_WHY)
    return find_tool("dot")


def _unavailable(reason: str) -> None:
    if os.environ.get(PG_ENV):  # a named server that does not answer is never "skipped"
        pytest.fail(reason, pytrace=False)
    unavailable(reason)


@pytest.fixture(scope="session")
def _postgres() -> Iterator[tuple[str, Callable[[], None] | None]]:
    env = os.environ.get(PG_ENV)
    if env:
        url = psycopg_url(env)
        try:
            connect(url).close()
        except Exception as e:
            where = make_url(url).render_as_string(hide_password=True)
            pytest.fail(f"{PG_ENV}={where}: cannot connect: {str(e).strip().splitlines()[0]}", pytrace=False)
        yield url, None
        return
    try:
        server = throwaway_server()
        started = server.__enter__()
    except PostgresUnavailable as e:
        _unavailable(f"no PostgreSQL for storage tests ({e}); set {PG_ENV}=postgresql://user@host:port/db")
        return
    # A SIGTERM (CI timeout, `timeout pytest`) would skip teardown and leave the server running;
    # as KeyboardInterrupt, pytest still tears fixtures down.
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield started.url, started.restart
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        server.__exit__(None, None, None)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def postgres_server(_postgres: tuple[str, Callable[[], None] | None]) -> str:
    """Admin URL of a reachable PostgreSQL server (see the module docstring)."""
    return _postgres[0]


@pytest.fixture
def restart_postgres(_postgres: tuple[str, Callable[[], None] | None]) -> Callable[[], None]:
    """Restarts the session's PostgreSQL server; only for the throwaway server, never a shared one."""
    if _postgres[1] is None:
        pytest.skip(f"restarts only the throwaway server, and {PG_ENV} names an external one")
    return _postgres[1]


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database for this test session: ``postgresql+psycopg://...``; dropped at the end."""
    with temporary_database(postgres_server, "nas3d_test_") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty storage URL per test, for tests parametrised over storage backends."""
    # the server fixture only for PostgreSQL: a SQLite-only run never starts one
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    with scratch_storage(request.param, tmp_path, server, name_prefix="nas3d_test_t_") as url:
        yield url


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, which the test may stop and start (outage tests)."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as e:
        _unavailable(f"cannot start a throwaway PostgreSQL cluster for this test ({e})")
        return
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3 store (SeaweedFS) for this session; yields the AWS environment that reaches it."""
    try:
        with servers.s3_server() as env:
            yield env
    except servers.ServerUnavailable as e:
        _unavailable(str(e))


@pytest.fixture
def s3_bucket(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's S3 store, with this process's AWS environment pointing there."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = f"nas3d-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
