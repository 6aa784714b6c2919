"""What a database error means: an outage to ride out (retried with backoff, then exit 75) or bad
input (one line, exit 2 at once); the messages that say which, and the one retry loop of nas3d."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from nas3d.storages._spec import StorageSpec

_logger = logging.getLogger("nas3d.storages")

_MAX_RETRY_DELAY_S = 10.0  # backoff cap: a recovered database is noticed within seconds


class StorageUnavailable(RuntimeError):
    """The storage's database cannot be reached; the message is one line with the fix."""


class StorageMissing(StorageUnavailable):
    """A storage that should exist does not (no file, or no Optuna tables): bad input, not an outage."""


class StorageInvalid(StorageMissing):
    """The database answers but is not a valid Optuna storage (not a database, a damaged file, another
    program's tables): bad input, not an outage; no restart can help."""


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


def _is_transient(error: BaseException | None) -> bool:
    """A lost connection or a locked/busy database: worth another try."""
    if isinstance(error, StorageUnavailable):
        return True
    # RDBStorage wraps SQLAlchemy errors in sessions (StorageInternalError from the error). And when a
    # connection dies inside Optuna's _get_trials, Optuna catches the OperationalError and tries a
    # slower query in the same, now invalid, transaction: PendingRollbackError, raised while handling
    # the lost connection (seen in the 20 s outage test). Each is transient if what it wraps is.
    for _ in range(4):
        if isinstance(error, sqlalchemy.exc.OperationalError) or (
            isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated
        ):
            return True
        if not isinstance(error, (StorageInternalError, sqlalchemy.exc.PendingRollbackError)):
            return False
        error = error.__cause__ or error.__context__
    return False


def retry_transient(
    call: Callable[[], T],
    *,
    window: float,
    what: str = "storage call",
    transient: Callable[[BaseException], bool] | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``call``, retrying with exponential backoff (capped at 10 s) for ``window`` seconds while
    the database is unreachable; then a one-line ``StorageUnavailable``. The one retry loop of nas3d:
    every storage call of a worker, its heartbeat and its study lock go through it.

    Optuna retries only trial creation (deadlocks) and ``pool_pre_ping`` only replaces stale pooled
    connections; this covers a server that is down for seconds or minutes. ``transient`` says which
    errors are worth another try (default: lost connections, locked or busy databases); ``on_retry``
    sees each of them. Use it for calls that are safe to repeat.
    """
    transient = transient or _is_transient
    deadline, attempt = time.monotonic() + window, 0
    while True:
        try:
            return call()
        except Exception as e:
            if not transient(e):
                raise
            if on_retry is not None:
                on_retry(e)
            attempt += 1
            now = time.monotonic()
            delay = min(_MAX_RETRY_DELAY_S, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
            if now + delay > deadline:
                raise StorageUnavailable(
                    f"the database stayed unreachable for {window:.0f} s ({what}: {_first_line(e)}); "
                    "check that it is running"
                ) from e
            _logger.warning("%s failed (%s); retry %d in %.1f s (giving up after %.0f s more)",
                            what, _first_line(e), attempt, delay, deadline - now)
            time.sleep(delay)


def _invalid_message(spec: StorageSpec, problem: str, *, schema: bool = False) -> str:
    if schema:  # it is a database, but its tables are not those of this Optuna
        why = (f"another program's tables, or those of an Optuna older than {optuna.__version__} "
               "(then `optuna storage upgrade`)")
    else:
        why = "a damaged database, or no database at all; restore it from a backup"
    return f"{spec} is not a valid Optuna storage ({problem}): {why}, or fix --storage / $NAS3D_STORAGE"


def _is_invalid(error: BaseException) -> bool:
    """The database answered with an error about what it holds (not a database, damaged, an unknown
    table or column): no retry or restart can help."""
    for _ in range(4):
        if isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
            return True
        if isinstance(error, sqlalchemy.exc.DatabaseError) and not isinstance(
            error, sqlalchemy.exc.OperationalError
        ):
            return True
        if not isinstance(error, StorageInternalError):
            return False
        error = error.__cause__ or error.__context__
    return False
