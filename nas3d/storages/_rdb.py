"""The RDB and journal storages: heartbeat that survives a blip, one-line connection errors, retries."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning, StorageInternalError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

from nas3d.storages._spec import StorageSpec, resolve_storage

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

_logger = logging.getLogger("nas3d.storages")

DEFAULT_HEARTBEAT_INTERVAL = 30
# Optuna's default grace is 2 × interval. We allow 4 beats: failing a live trial costs its whole
# training run and its retry duplicates it, so a database restart or a busy host must not do that.
DEFAULT_GRACE_PERIOD = 4 * DEFAULT_HEARTBEAT_INTERVAL
DEFAULT_MAX_RETRY = 2  # a trial that keeps killing its worker (e.g. host OOM) is not retried forever
SQLITE_BUSY_TIMEOUT_S = 60  # several workers on one host queue on SQLite's single writer lock
PG_CONNECT_TIMEOUT_S = 10  # a blackholed host fails in seconds, not after the TCP default of minutes

PREPARE_THRESHOLD_PARAM = "prepare_threshold"


def pg_connect_args(url: URL) -> tuple[URL, dict[str, Any]]:
    """psycopg options for a PostgreSQL URL: ``(url without nas3d's own query parameter, kwargs)``.

    Server-side prepared statements are off (``prepare_threshold=None``) by default: PgBouncer in
    transaction mode (before 1.21) routes a client's next statement to another server connection,
    where psycopg's prepared statement does not exist (``DuplicatePreparedStatement "_pg3_0"`` or
    ``prepared statement does not exist``), and a URL cannot say whether a pooler is in between.
    On a direct connection ``bench/storage_load.py`` measured no throughput cost and 5-12 % more
    PostgreSQL CPU per trial (README, "Running on a cluster"). ``?prepare_threshold=N`` in the URL
    turns them back on for a direct connection.
    """
    value = url.query.get(PREPARE_THRESHOLD_PARAM)
    if value is None:
        return url, {"prepare_threshold": None}
    text = value if isinstance(value, str) else value[-1]
    try:
        threshold = None if text.lower() in ("", "none") else int(text)
    except ValueError:
        raise ValueError(
            f"?{PREPARE_THRESHOLD_PARAM}= must be an integer or 'none', but got {text!r}"
        ) from None
    return url.difference_update_query([PREPARE_THRESHOLD_PARAM]), {"prepare_threshold": threshold}


class StorageUnavailable(RuntimeError):
    """The storage's database cannot be reached; the message is one line with the fix."""


def make_storage(
    storage: str | StorageSpec | None = None,
    *,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
    must_exist: bool = False,
) -> BaseStorage:
    """An Optuna storage for a storage string or spec (see ``nas3d.storages``), ready to use.

    ``grace_period`` defaults to 4 × ``heartbeat_interval``. ``max_retry`` bounds how often a
    trial whose worker died is re-queued (None: no limit). ``must_exist``: for commands that only
    read (status, export, workers): a storage that holds no Optuna data yet is an error, and nothing
    is created (no folder, no file, no tables). Raises ``StorageUnavailable`` when the database
    cannot be reached or (``must_exist``) is not there, and ``ValueError`` for an unsupported string.
    """
    spec = resolve_storage(storage)
    url = spec.url
    if must_exist:
        _check_exists(spec)
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))

    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        try:
            if not must_exist:  # the file exists and is in WAL mode already: a reader changes nothing
                _prepare_sqlite(sa_url)
        except (OSError, sqlite3.Error) as e:
            raise StorageUnavailable(_unavailable_message(sa_url, e)) from e
    else:
        sa_url, pg_args = pg_connect_args(sa_url)
        url = sa_url.render_as_string(hide_password=False)
        # pool_pre_ping: a pooled connection killed by a server restart is replaced on checkout
        # instead of failing the next storage call.
        connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **pg_args}
        engine_kwargs = {"pool_pre_ping": True, "connect_args": connect_args}

    with warnings.catch_warnings():
        # heartbeat and the retry callback are marked experimental since Optuna 2.8; we rely on them
        # knowingly, so the warning would only be noise in every worker's log.
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            return _RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or 4 * heartbeat_interval,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
        except sqlalchemy.exc.OperationalError as e:
            raise StorageUnavailable(_unavailable_message(sa_url, e)) from e


class _RDBStorage(RDBStorage):
    """RDBStorage whose heartbeat survives a transient database error.

    Optuna's heartbeat thread dies on the first exception, after which the live trial looks dead
    and another worker fails and re-runs it. Skipping one beat is harmless: the grace period
    covers several.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as e:
            if not _is_transient(e):
                raise
            _logger.warning("heartbeat of trial id %d skipped: %s", trial_id, _first_line(e))


_FIX_STORAGE = ("check --storage / $NAS3D_STORAGE, or create a study there first with `nas3d create-study` "
                "(reading a storage never creates one)")


def _check_exists(spec: StorageSpec) -> None:
    """Raise ``StorageUnavailable`` unless ``spec`` holds Optuna's data; creates nothing, even tables."""
    path = spec.file
    if path is not None:
        if not path.is_file():
            where = "no such file" if path.parent.is_dir() else f"no folder {path.parent}"
            raise StorageUnavailable(f"no {spec.kind} storage at {path} ({where}); {_FIX_STORAGE}")
        if spec.kind == "journal":
            return
    # Optuna's schema starts with the table "studies"; a database without it was never used by Optuna,
    # and RDBStorage would create its tables there.
    try:
        engine = sqlalchemy.create_engine(spec.url, connect_args=_connect_args(spec))
        try:
            with engine.connect() as conn:
                has_studies = sqlalchemy.inspect(conn).has_table("studies")
        finally:
            engine.dispose()
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise StorageUnavailable(_unavailable_message(make_url(spec.url), e)) from e
    if not has_studies:
        raise StorageUnavailable(f"{spec} holds no Optuna studies (no 'studies' table); {_FIX_STORAGE}")


def _connect_args(spec: StorageSpec) -> dict[str, Any]:
    if spec.kind == "sqlite":  # the file exists (checked above): connecting creates nothing
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return {"connect_timeout": PG_CONNECT_TIMEOUT_S}


def _prepare_sqlite(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # WAL lets the dashboard read while workers write; the mode is stored in the file, set once.
    with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def _unavailable_message(url: URL, error: Exception) -> str:
    if url.get_backend_name() == "sqlite":
        return f"cannot open SQLite database {url.database!r}: {_first_line(error)}"
    host, port, reason = url.host or "localhost", url.port or 5432, _first_line(error)
    if f'database "{url.database}" does not exist' in reason:
        fix = f"create it (createdb -h {host} -p {port} {url.database}) or fix --storage / NAS3D_STORAGE"
    else:
        fix = "check that the server is running and --storage / NAS3D_STORAGE is right"
    return f"cannot connect to PostgreSQL at {host}:{port} (database {url.database!r}): {reason}; {fix}"


def _first_line(error: BaseException) -> str:
    # Optuna wraps SQLAlchemy's error, which appends SQL and a docs link: the driver's first line
    # is the useful part.
    if isinstance(error, StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


T = TypeVar("T")


def _is_transient(error: BaseException) -> bool:
    """A lost connection or a locked/busy database: worth another try."""
    if isinstance(error, StorageUnavailable):
        return True
    if isinstance(error, StorageInternalError):  # RDBStorage wraps SQLAlchemy errors in sessions
        error = error.__cause__ or error
    return isinstance(error, sqlalchemy.exc.OperationalError) or (
        isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated
    )


def retry_transient(
    call: Callable[[], T],
    *,
    attempts: int = 6,
    base_delay: float = 1.0,
    max_delay: float = 30.0,
    what: str = "storage call",
) -> T:
    """Run ``call``, retrying with exponential backoff while the database is briefly unreachable.

    Optuna retries only trial creation (deadlocks); ``pool_pre_ping`` only replaces stale pooled
    connections. This covers the rest — a server down for seconds. Use it for calls that are safe
    to repeat: ``make_storage``, ``load_study``, ``create_study(load_if_exists=True)``, reads,
    ``study.tell(..., skip_if_finished=True)``, or one ``study.optimize(n_trials=1)`` of a worker
    loop (a trial left RUNNING by a failed write is later failed by the heartbeat and re-queued).
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt == attempts or not _is_transient(e):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            _logger.warning(
                "%s failed (%s); retry %d/%d in %.1f s", what, _first_line(e), attempt, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")

