"""The RDB and journal storages: heartbeat that survives a blip, one-line connection errors, retries."""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning, StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from nas3d.records import fail_and_requeue
from nas3d.storages._faults import (
    StorageInvalid,
    StorageMissing,
    StorageUnavailable,
    _first_line,
    _invalid_message,
    _is_invalid,
    _is_transient,
    _unavailable_message,
    retry_transient,
)
from nas3d.storages._spec import StorageSpec, resolve_storage

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

_logger = logging.getLogger("nas3d.storages")
T = TypeVar("T")

DEFAULT_HEARTBEAT_INTERVAL = 30


def grace_period_for(heartbeat_interval: int, grace_period: int | None = None) -> int:
    """Seconds without a beat before a trial is stale: ``grace_period``, else 4 beats."""
    # Optuna's default grace is 2 × interval. We allow 4 beats: failing a live trial costs its whole
    # training run and its retry duplicates it, so a database restart or a busy host must not do that.
    return grace_period or 4 * heartbeat_interval


DEFAULT_GRACE_PERIOD = grace_period_for(DEFAULT_HEARTBEAT_INTERVAL)
DEFAULT_MAX_RETRY = 2  # a trial that keeps killing its worker (e.g. host OOM) is not retried forever
SQLITE_BUSY_TIMEOUT_S = 60  # several workers on one host queue on SQLite's single writer lock
PG_CONNECT_TIMEOUT_S = 10  # a blackholed host fails in seconds, not after the TCP default of minutes
#: How long a worker's storage calls keep retrying through a database outage (seconds); overridden by
#: ``$NAS3D_STORAGE_RETRY_WINDOW``. Long enough for a PostgreSQL restart, failover or upgrade.
DEFAULT_RETRY_WINDOW_S = 600.0
RETRY_WINDOW_ENV = "NAS3D_STORAGE_RETRY_WINDOW"


PREPARE_THRESHOLD_PARAM = "prepare_threshold"


def pg_connect_args(url: URL) -> tuple[URL, dict[str, Any]]:
    """psycopg options for a PostgreSQL URL: ``(url without nas3d's own query parameter, kwargs)``.

    Server-side prepared statements are off (``prepare_threshold=None``) by default: PgBouncer in
    transaction mode (before 1.21) routes a client's next statement to another server connection,
    where psycopg's prepared statement does not exist (``DuplicatePreparedStatement "_pg3_0"`` or
    ``prepared statement does not exist``), and a URL cannot say whether a pooler is in between.
    On a direct connection ``bench/storage_load.py`` measured no throughput cost and 5-12 % more
    PostgreSQL CPU per trial (docs/hosts.md, "Running on a cluster"). ``?prepare_threshold=N`` in the URL
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


def make_storage(
    storage: str | StorageSpec | None = None,
    *,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
    must_exist: bool = False,
    retry_window: float = 0.0,
) -> BaseStorage:
    """An Optuna storage for a storage string or spec (see ``nas3d.storages``), ready to use.

    ``grace_period`` defaults to 4 × ``heartbeat_interval``. ``max_retry`` bounds how often a
    trial whose worker died is re-queued (None: no limit). ``must_exist``: for commands that only
    read (status, export, workers): a storage that holds no Optuna data yet is an error
    (``StorageMissing``), and nothing is created (no folder, no file, no tables). ``retry_window``
    (RDB only): for how many seconds each storage call retries, with backoff, through a transient
    database error (0: not at all; workers pass :func:`storage_retry_window`). Raises
    ``StorageUnavailable`` when the database cannot be reached and ``ValueError`` for an unsupported
    string.
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
            if _is_invalid(e):
                raise StorageInvalid(_invalid_message(spec, _first_line(e))) from e
            raise StorageUnavailable(_unavailable_message(sa_url, e)) from e
    else:
        sa_url, pg_args = pg_connect_args(sa_url)
        url = sa_url.render_as_string(hide_password=False)
        # pool_pre_ping: a pooled connection killed by a server restart is replaced on checkout
        # instead of failing the next storage call.
        connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **pg_args}
        engine_kwargs = {"pool_pre_ping": True, "connect_args": connect_args}

    with warnings.catch_warnings():
        # the heartbeat is marked experimental since Optuna 2.8; we rely on it knowingly, so the
        # warning would only be noise in every worker's log.
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            storage = _RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period_for(heartbeat_interval, grace_period),
            )
        except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as e:
            # The server may also go away after connecting, during the schema check (a StorageInternalError)
            if _is_transient(e):
                raise StorageUnavailable(_unavailable_message(sa_url, e.__cause__ or e)) from e
            if _is_invalid(e):  # it answered, but what it holds is not Optuna's schema
                raise StorageInvalid(_invalid_message(spec, _first_line(e))) from e
            raise
    storage.retry_window, storage.max_retry = float(retry_window), max_retry
    return storage


def storage_retry_window(explicit: float | None = None) -> float:
    """A worker's storage retry window in seconds: ``explicit``, else ``$NAS3D_STORAGE_RETRY_WINDOW``,
    else :data:`DEFAULT_RETRY_WINDOW_S`."""
    if explicit is not None:
        value: object = explicit
    else:
        value = os.environ.get(RETRY_WINDOW_ENV, "").strip() or DEFAULT_RETRY_WINDOW_S
    try:
        window = float(value)  # type: ignore[arg-type]
    except ValueError:
        window = math.nan
    if not window >= 0:
        raise ValueError(f"{RETRY_WINDOW_ENV} must be a number of seconds >= 0, but got {value!r}")
    return window


class _RDBStorage(RDBStorage):
    """RDBStorage that rides out a database outage.

    * Every storage call (ask, tell, attrs, reads) retries transient errors with backoff for
      ``retry_window`` seconds (0 by default: commands fail fast; workers set a window). Optuna itself
      retries only trial creation on deadlocks, and its ``tell`` crashes on a lost connection
      (``UnboundLocalError: updated_state``, optuna 5.0).
    * A heartbeat is skipped, not retried, on a transient error: the beat thread tries again next
      interval, and the grace period covers several. (Optuna's heartbeat thread dies on the first
      exception, after which the live trial looks dead.)
    * ``last_outage`` is the ``time.monotonic()`` of the last transient error this process saw (its
      study lock's too: the worker records those here). Within a grace period of it no trial is
      stale: after an outage every live trial's last beat is old until its worker beats again.
    * A stale trial is failed with a reason and queued again (``max_retry`` times at most) by
      :func:`nas3d.records.fail_and_requeue`, the one recovery path, when Optuna's
      ``fail_stale_trials`` asks for the stale trials: the retry does not inherit the reason.
    """

    retry_window: float = 0.0
    max_retry: int | None = DEFAULT_MAX_RETRY
    last_outage: float = -math.inf
    _retrying = threading.local()  # set while a retried call runs: nested storage calls do not retry

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            RDBStorage.record_heartbeat(self, trial_id)
        except Exception as e:
            if not _is_transient(e):
                raise
            self.last_outage = time.monotonic()
            self._beat_skipped = True
            _logger.warning("heartbeat of trial id %d skipped: %s", trial_id, _first_line(e))
        else:
            if getattr(self, "_beat_skipped", False):  # recovered (see ride_out)
                self.last_outage, self._beat_skipped = time.monotonic(), False

    def record_heartbeat_now(self, trial_id: int) -> None:
        """A heartbeat retried like any other call (a worker's first beat for a trial must land)."""
        self.ride_out("record_heartbeat", lambda: RDBStorage.record_heartbeat(self, trial_id))

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        failed_once = False

        def call() -> bool:
            nonlocal failed_once
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retry after a lost reply: the first attempt may have committed. Finishing a trial
                # twice in the same state is then not an error.
                if failed_once and state.is_finished() and self.get_trial(trial_id).state == state:
                    return True
                raise
            except Exception as e:
                failed_once = failed_once or _is_transient(e)
                raise

        return self.ride_out("set_trial_state_values", call)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = self.ride_out(
            "_get_stale_trial_ids", lambda: RDBStorage._get_stale_trial_ids(self, study_id)
        )
        if self.recovering():  # checked after the read: an outage may have happened during it
            return []
        reason = (
            f"stale heartbeat: no heartbeat for over {self.grace_period} s (its worker was killed, hung, "
            "or lost the database)"
        )
        if stale:
            study = optuna.Study(study_name=self.get_study_name_from_id(study_id), storage=self)
            for trial_id in stale:  # one that finished meanwhile was not stale after all: skipped
                fail_and_requeue(study, self.get_trial(trial_id), reason, max_retry=self.max_retry)
        return []  # failed and queued again here: nothing left for Optuna's fail_stale_trials to fail

    def recovering(self) -> bool:
        """Whether this process saw an outage less than a grace period ago (see ``last_outage``)."""
        return time.monotonic() - self.last_outage <= self.grace_period

    def ride_out(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` retried through transient errors for ``retry_window`` seconds, each outage recorded
        in ``last_outage``. Every storage call goes through it; a worker's study lock too."""
        if self.retry_window <= 0 or getattr(self._retrying, "active", False):
            return call()
        self._retrying.active = True
        failed = False

        def note_outage(_error: BaseException) -> None:
            nonlocal failed
            failed, self.last_outage = True, time.monotonic()

        try:
            result = retry_transient(call, window=self.retry_window, what=f"storage {what}",
                                     on_retry=note_outage)
            if failed:  # recovered: other workers' trials need a beat or two to look alive
                self.last_outage = time.monotonic()
            return result
        finally:
            self._retrying.active = False


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: _RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self.ride_out(name, lambda: method(self, *args, **kwargs))

    return wrapper


# Every storage call a worker makes, reads included: a worker that cannot read the study cannot go on
# either. The private ones are what Optuna's _CachedStorage (which wraps every RDBStorage a Study
# uses) calls on it instead of the public ones. create_new_trial is not idempotent (a retry after a
# lost reply can leave an orphan RUNNING trial); the worker fails such orphans under the study lock
# (nas3d.claims.fail_orphans).
RETRIED_METHODS = (
    "_create_new_trial", "_get_trials", "_get_best_trial_id", "_set_trial_param",
    "create_new_trial", "set_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "get_trial_param", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial",
    "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
)
#: What _RDBStorage overrides and calls on RDBStorage by name besides those.
OVERRIDDEN_METHODS = ("record_heartbeat", "set_trial_state_values", "_get_stale_trial_ids")


def check_wrapped_methods(cls: type, names: Iterable[str]) -> None:
    """Raise a one-line ``ImportError`` naming each of ``names`` that ``cls`` lacks.

    The wrappers and overrides name Optuna's methods, private ones included: an Optuna that renamed
    one would skip the retry or the override without a word, so importing nas3d fails instead.
    """
    missing = [name for name in names if not callable(getattr(cls, name, None))]
    if missing:
        methods = ", ".join(f"{cls.__name__}.{name}" for name in missing)
        raise ImportError(
            f"nas3d.storages wraps {methods}, which optuna {optuna.__version__} does not have; install "
            "an Optuna nas3d supports: pip install 'optuna>=5.0,<6'"
        )


check_wrapped_methods(RDBStorage, (*RETRIED_METHODS, *OVERRIDDEN_METHODS))
for _name in RETRIED_METHODS:
    setattr(_RDBStorage, _name, _retried(_name))


_FIX_STORAGE = ("check --storage / $NAS3D_STORAGE, or create a study there first with `nas3d create-study` "
                "(reading a storage never creates one)")


def _check_exists(spec: StorageSpec) -> None:
    """Raise ``StorageUnavailable`` unless ``spec`` holds Optuna's data; creates nothing, even tables."""
    path = spec.file
    if path is not None:
        if not path.is_file():
            where = "no such file" if path.parent.is_dir() else f"no folder {path.parent}"
            raise StorageMissing(f"no {spec.kind} storage at {path} ({where}); {_FIX_STORAGE}")
        if spec.kind == "journal":
            return
    # Optuna's schema starts with the table "studies"; a database without it was never used by Optuna,
    # and RDBStorage would create its tables there. One with it must hold all of Optuna's schema:
    # RDBStorage would otherwise add its missing tables to another program's database.
    try:
        engine = sqlalchemy.create_engine(spec.url, connect_args=_connect_args(spec))
        try:
            with engine.connect() as conn:
                inspector = sqlalchemy.inspect(conn)
                has_studies = inspector.has_table("studies")
                problem = _schema_problem(inspector) if has_studies else None
        finally:
            engine.dispose()
    except sqlalchemy.exc.SQLAlchemyError as e:
        # Only a connection that failed is an outage worth riding out; a database that answered with
        # an error (not a database, damaged, no such database) is bad input.
        if _is_transient(e) and "does not exist" not in _first_line(e):
            raise StorageUnavailable(_unavailable_message(make_url(spec.url), e)) from e
        if isinstance(e, sqlalchemy.exc.OperationalError):  # PostgreSQL: no such database
            raise StorageMissing(_unavailable_message(make_url(spec.url), e)) from e
        raise StorageInvalid(_invalid_message(spec, _first_line(e))) from e
    if not has_studies:
        raise StorageMissing(f"{spec} holds no Optuna studies (no 'studies' table); {_FIX_STORAGE}")
    if problem:
        raise StorageInvalid(_invalid_message(spec, problem, schema=True))


def _schema_problem(inspector: sqlalchemy.engine.Inspector) -> str | None:
    """What of the installed Optuna's schema the database lacks (a table, a column), or None."""
    from optuna.storages._rdb.models import BaseModel

    tables = set(inspector.get_table_names())
    wanted = BaseModel.metadata.sorted_tables
    missing = [t.name for t in wanted if t.name not in tables]
    if missing:
        return f"no table {', '.join(repr(name) for name in missing)}"
    for table in wanted:
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        absent = [c.name for c in table.columns if c.name not in columns]
        if absent:
            return f"table {table.name!r} has no column {', '.join(repr(name) for name in absent)}"
    return None


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


