"""The study lock: one holder at a time across every worker and host of a study."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy.engine import make_url

from nas3d.storages._faults import StorageUnavailable, _unavailable_message
from nas3d.storages._rdb import PG_CONNECT_TIMEOUT_S, pg_connect_args
from nas3d.storages._spec import StorageSpec, resolve_storage, storage_home


class StudyLock:
    """A mutual-exclusion lock shared by every worker of one study, on any host that shares the storage.

    Workers hold it from the budget check through ``study.ask()`` so that N workers never start more
    than the budget. PostgreSQL: a transaction-scoped advisory lock (the server drops it if the
    worker dies; safe behind PgBouncer in transaction mode).
    SQLite/journal: a file lock beside the database (one host, as those storages are).
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


def study_lock(storage: str | StorageSpec | None, study_name: str) -> StudyLock:
    """The ``StudyLock`` of ``study_name`` in ``storage`` (a string is resolved as usual)."""
    spec = resolve_storage(storage)
    key = hashlib.blake2b(f"nas3d-study:{study_name}".encode(), digest_size=8).digest()
    if spec.kind == "postgresql":
        return _AdvisoryLock(spec.url, int.from_bytes(key, "big", signed=True))
    path = spec.file
    folder = path.parent if path else storage_home()
    return _FileLock(folder / f"{path.name if path else 'nas3d'}.{key.hex()}.lock")


class _FileLock(StudyLock):
    """``filelock.FileLock`` (an ``flock`` on Unix: dropped by the kernel if the worker dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Not thread-local: a worker may release from the thread that runs the trial.
        self._lock = FileLock(path, thread_local=False)

    def acquire(self) -> None:
        if self._lock.is_locked:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)


class _AdvisoryLock(StudyLock):
    """A transaction-scoped advisory lock, safe behind PgBouncer in transaction mode.

    A session lock (``pg_advisory_lock``) outlives the client behind a transaction pooler: it stays
    on the pooled server connection, and the next client routed there "holds" it too. Here the lock
    lives in a transaction opened on the lock's own connection and ended by ``release``; a pooler
    keeps one server connection for the client for exactly that time, and a dead worker's transaction
    is rolled back by the server (or dropped by PgBouncer with its client), freeing the lock.

    Waiting is polling (``pg_try_advisory_xact_lock`` with jittered backoff), not blocking: a blocked
    waiter would pin a pooled server connection, and as many waiters as the pool has connections
    would leave the holder none for its own queries, a deadlock until PgBouncer's query_wait_timeout.
    """

    POLL_MIN_S = 0.005
    # Each poll is a transaction on the database (and PgBouncer): many waiters polling often cost more
    # than the lock is worth (bench/storage_load.py at 64 workers). A waiter loses at most this much
    # per trial (2.5 % of a 20-s trial); while many wait, one of them takes the lock sooner.
    POLL_MAX_S = 0.5
    # A holder whose host vanished (no TCP close) would keep its transaction open, and the lock,
    # until the server's TCP keepalive gives up (two hours by default): the server ends the lock's
    # transaction once it has been idle this long instead. A live worker holds it for one ask.
    IDLE_TIMEOUT_S = 60

    def __init__(self, url: str, key: int) -> None:
        self._url, self._connect_args = pg_connect_args(make_url(url))
        self._key = key
        self._conn: Any = None  # psycopg.Connection, opened on first use
        self._held = False

    def acquire(self) -> None:
        if self._held:
            return
        delay = self.POLL_MIN_S
        while not self._try_acquire():
            time.sleep(delay * (0.5 + random.random()))
            delay = min(self.POLL_MAX_S, 2 * delay)
        self._held = True

    def _try_acquire(self) -> bool:
        import psycopg

        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    libpq = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
                    self._conn = psycopg.connect(
                        libpq, autocommit=False, connect_timeout=PG_CONNECT_TIMEOUT_S, **self._connect_args
                    )
                # Not autocommit: this SELECT opens the transaction that holds the lock until release;
                # set_config(..., true) is SET LOCAL: it ends with the transaction, pooler or not.
                (_, got) = self._conn.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', %s, true),"
                    " pg_try_advisory_xact_lock(%s)",
                    (f"{int(self.IDLE_TIMEOUT_S * 1000)}ms", self._key),
                ).fetchone()
                if not got:
                    self._conn.rollback()  # a pooler may hand the server connection to someone else
                return bool(got)
            except psycopg.OperationalError as e:
                self._close()
                if attempt == 2:  # the connection may have died idle (server restart): retried once
                    raise StorageUnavailable(_unavailable_message(self._url, e)) from e
        raise AssertionError("unreachable")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self._conn.rollback()  # ends the transaction, and with it the lock
        except Exception:
            self._close()  # a lost connection has dropped the lock already

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
