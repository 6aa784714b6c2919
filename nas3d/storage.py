"""Where studies live: storage strings → Optuna storages, artifact stores, transient-error retries.

Accepted storage strings (``--storage`` flag, else env ``NAS3D_STORAGE``, else the default):

- empty / None: SQLite file ``<home>/nas3d.db``; ``<home>`` is env ``NAS3D_HOME`` if set, else
  ``./storage`` relative to the current working directory (the repo's ``storage/`` folder when run
  from the repo root).
- ``sqlite:///path.db``: one host, a few workers. Crash recovery via heartbeat.
- ``postgresql://user@host:port/db`` (or ``postgresql+psycopg://``, ``postgres://``): several hosts.
  Rewritten to the psycopg 3 driver. Crash recovery via heartbeat.
- ``journal:path.log``: Optuna's JournalStorage on a file. Single host, no heartbeat: a worker killed
  mid-trial leaves a RUNNING trial behind for good.

Crash recovery (RDB only): the worker's heartbeat thread writes every ``heartbeat_interval`` seconds;
the next ``study.optimize`` on any worker fails trials silent for ``grace_period`` seconds and
re-queues them (``RetryHeartbeatStaleTrialCallback``). The heartbeat thread runs only inside
``Study.optimize``, not with ask/tell.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import sqlite3
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.exceptions import ExperimentalWarning, StorageInternalError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MAX_RETRY",
    "StorageUnavailable",
    "StudyLock",
    "artifact_store_for",
    "make_storage",
    "record_constraints",
    "redact_url",
    "resolve_storage_url",
    "retry_transient",
    "storage_home",
    "study_lock",
]

_logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 30
# Optuna's default grace is 2 × interval. We allow 4 beats: failing a live trial costs its whole
# training run and its retry duplicates it, so a database restart or a busy host must not do that.
DEFAULT_GRACE_PERIOD = 4 * DEFAULT_HEARTBEAT_INTERVAL
DEFAULT_MAX_RETRY = 2  # a trial that keeps killing its worker (e.g. host OOM) is not retried forever
SQLITE_BUSY_TIMEOUT_S = 60  # several workers on one host queue on SQLite's single writer lock
PG_CONNECT_TIMEOUT_S = 10  # a blackholed host fails in seconds, not after the TCP default of minutes

ACCEPTED_FORMS = (
    "'' (default SQLite under $NAS3D_HOME or ./storage), 'sqlite:///path.db', "
    "'postgresql://user@host:port/db', 'postgresql+psycopg://...', 'journal:path.log'"
)
_PG_PREFIXES = ("postgresql://", "postgres://", "postgresql+psycopg://")


class StorageUnavailable(RuntimeError):
    """The storage's database cannot be reached; the message is one line with the fix."""


def storage_home() -> Path:
    """The folder for the default database and artifacts: ``$NAS3D_HOME``, else ``./storage``."""
    return Path(os.environ.get("NAS3D_HOME") or "storage").expanduser().resolve()


def resolve_storage_url(explicit: str | None) -> str:
    """The canonical storage string for ``explicit``, else ``$NAS3D_STORAGE``, else the default.

    PostgreSQL URLs get the psycopg 3 driver; journal paths become absolute. The default SQLite
    folder is created. Raises ``ValueError`` for anything else.
    """
    value = (explicit or "").strip() or os.environ.get("NAS3D_STORAGE", "").strip()
    if not value:
        home = storage_home()
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'nas3d.db'}"
    if value.startswith("sqlite://"):
        return value
    if value.startswith(_PG_PREFIXES):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if value.startswith("journal:") and value[len("journal:") :].strip():
        return "journal:" + str(Path(value[len("journal:") :].strip()).expanduser().resolve())
    raise ValueError(f"unsupported storage {redact_url(value)!r}; accepted forms: {ACCEPTED_FORMS}")


def make_storage(
    storage: str | None = None,
    *,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
) -> BaseStorage:
    """An Optuna storage for a storage string (see the module docstring), ready to use.

    ``grace_period`` defaults to 4 × ``heartbeat_interval``. ``max_retry`` bounds how often a
    trial whose worker died is re-queued (None: no limit). Raises ``StorageUnavailable`` when the
    database cannot be reached and ``ValueError`` for an unsupported string.
    """
    url = resolve_storage_url(storage)
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))

    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        try:
            _prepare_sqlite(sa_url)
        except (OSError, sqlite3.Error) as e:
            raise StorageUnavailable(_unavailable_message(sa_url, e)) from e
    else:
        # pool_pre_ping: a pooled connection killed by a server restart is replaced on checkout
        # instead of failing the next storage call.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S}}

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


def redact_url(value: str) -> str:
    try:
        return make_url(value).render_as_string(hide_password=True)
    except Exception:
        return value


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


def artifact_store_for(
    storage_url: str | None = None, path: str | os.PathLike[str] | None = None
) -> FileSystemArtifactStore:
    """The artifact store (checkpoints, configs) that goes with a storage.

    ``path``, else ``$NAS3D_ARTIFACTS``, else ``artifacts/`` beside a SQLite or journal file,
    else ``<home>/artifacts`` (PostgreSQL: point it at a folder every host shares). Created if missing.
    """
    chosen = path or os.environ.get("NAS3D_ARTIFACTS")
    if chosen:
        base = Path(chosen).expanduser().resolve()
    else:
        base = _storage_file(resolve_storage_url(storage_url))
        base = (base.parent if base else storage_home()) / "artifacts"
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base)


def _storage_file(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
        return Path(sa_url.database).expanduser().resolve()
    return None


def record_constraints(trial: optuna.trial.Trial, values: Mapping[str, float]) -> None:
    """Record constraint values (feasible iff all <= 0) where both samplers and the dashboard see them.

    Optuna 5 samplers read ``trial.constraints``, which merges the legacy list under system attr
    ``"constraints"`` with the per-name ``"constraints:<name>"`` keys of ``Trial.set_constraint``;
    optuna-dashboard 0.21 shows only the legacy list. So we write the list alone (in ``values``
    order; writing both formats would count every constraint twice). Call once per trial, before
    the objective returns.
    """
    vals = [float(v) for v in values.values()]
    if any(v != v for v in vals):
        raise ValueError(f"constraint values must not be NaN, got {dict(values)}")
    # No public setter for system attrs exists in Optuna 5; this is what Optuna itself does
    # for samplers' constraints_func (optuna.samplers._base._process_constraints_after_trial).
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", vals)


class StudyLock:
    """A mutual-exclusion lock shared by every worker of one study, on any host that shares the storage.

    Workers hold it from the budget check through ``study.ask()`` so that N workers never start more
    than the budget. PostgreSQL: a session advisory lock (the server drops it if the worker dies).
    SQLite/journal: ``flock`` on a file beside the database (one host, as those storages are).
    ``release`` is a no-op when the lock is not held; the lock is also a context manager.
    """

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def study_lock(storage_url: str | None, study_name: str) -> StudyLock:
    """The ``StudyLock`` of ``study_name`` in the storage ``storage_url`` (resolved as usual)."""
    url = resolve_storage_url(storage_url)
    key = hashlib.blake2b(f"nas3d-study:{study_name}".encode(), digest_size=8).digest()
    if url.startswith("postgresql"):
        return _AdvisoryLock(url, int.from_bytes(key, "big", signed=True))
    path = _storage_file(url)
    folder = path.parent if path else storage_home()
    return _FileLock(folder / f"{path.name if path else 'nas3d'}.{key.hex()}.lock")


class _FileLock(StudyLock):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock


class _AdvisoryLock(StudyLock):
    def __init__(self, url: str, key: int) -> None:
        self._url = make_url(url)
        self._key = key
        self._conn: Any = None  # psycopg.Connection, opened on first use
        self._held = False

    def acquire(self) -> None:
        import psycopg

        if self._held:
            return
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    libpq = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
                    self._conn = psycopg.connect(libpq, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S)
                self._conn.execute("SELECT pg_advisory_lock(%s)", (self._key,))
                self._held = True
                return
            except psycopg.OperationalError as e:
                self._close()
                if attempt == 2:  # the connection may have died idle (server restart): retried once
                    raise StorageUnavailable(_unavailable_message(self._url, e)) from e

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        except Exception:
            self._close()  # a lost session has dropped the lock already

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
