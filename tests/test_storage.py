from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from optuna_dashboard._serializer import serialize_frozen_trial
from sqlalchemy.engine import make_url

from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    StorageInvalid,
    StorageMissing,
    StorageUnavailable,
    artifact_store_for,
    default_artifact_location,
    make_storage,
    resolve_storage_url,
    retry_transient,
    storage_home,
    study_lock,
)
from nas3d.study import record_constraints

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    return x, 1.0 - x


def _run_study(storage: optuna.storages.BaseStorage, n_trials: int = 3) -> optuna.Study:
    # unnamed: Optuna picks a unique name, as tests share the session's PostgreSQL database
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    study.optimize(_objective, n_trials=n_trials)
    return study


# --- resolving storage strings ---------------------------------------------------------------------


def test_default_is_sqlite_under_nas3d_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAS3D_HOME", str(tmp_path / "home"))
    assert resolve_storage_url(None) == f"sqlite:///{tmp_path / 'home' / 'nas3d.db'}"
    assert resolve_storage_url("  ") == resolve_storage_url(None)
    assert not (tmp_path / "home").exists()  # resolving a string writes nothing; opening does


def test_default_home_is_storage_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAS3D_HOME")
    monkeypatch.chdir(tmp_path)
    assert storage_home() == tmp_path / "storage"
    assert resolve_storage_url(None) == f"sqlite:///{tmp_path / 'storage' / 'nas3d.db'}"


def test_env_var_used_only_without_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAS3D_STORAGE", "postgresql://u@db:5433/nas")
    assert resolve_storage_url(None) == "postgresql+psycopg://u@db:5433/nas"
    assert resolve_storage_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql+psycopg://u:pw@h/db"),
        ("postgres://u@h:5432/db", "postgresql+psycopg://u@h:5432/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ],
)
def test_urls_canonicalised(given: str, expected: str) -> None:
    assert resolve_storage_url(given) == expected


def test_journal_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_storage_url("journal:runs/j.log") == f"journal:{tmp_path / 'runs' / 'j.log'}"


@pytest.mark.parametrize("bad", ["mysql://u@h/db", "redis://h", "storage/nas3d.db", "journal:"])
def test_unsupported_storage_is_one_line_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage") as info:
        resolve_storage_url(bad)
    message = str(info.value)
    assert "\n" not in message and "sqlite:///" in message and "journal:" in message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("sqlite://nas3d.db", "three slashes"),
        ("sqlite://", "three slashes"),
        ("sqlite:///:memory:", "three slashes"),
        ("postgresql://u:secret@h:54x32/db", "is not a PostgreSQL URL"),
        ("postgresql://u@h:5432", "has no database name"),
        ("postgresql://u@:5432/db", "has no host"),
        ("postgresql://u@h:70000/db", "outside 1-65535"),
    ],
)
def test_malformed_urls_are_one_line_value_errors(bad: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected) as info:
        resolve_storage_url(bad)
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_must_exist_creates_nothing_where_there_is_no_storage(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "typo" / "nas3d.db"
    url = f"sqlite:///{missing}" if kind == "sqlite" else f"journal:{missing}"
    with pytest.raises(StorageUnavailable, match=f"no {kind} storage at .*no folder"):
        make_storage(url, must_exist=True)
    assert list(tmp_path.iterdir()) == []


def test_must_exist_refuses_a_database_optuna_never_used(storage_url: str) -> None:
    # An empty PostgreSQL database (or SQLite file) stays empty: no Optuna tables are created in it.
    if storage_url.startswith("sqlite"):
        Path(storage_url.removeprefix("sqlite:///")).touch()
    with pytest.raises(StorageUnavailable, match="holds no Optuna studies"):
        make_storage(storage_url, must_exist=True)
    engine = sqlalchemy.create_engine(storage_url)
    with engine.connect() as conn:
        assert sqlalchemy.inspect(conn).get_table_names() == []
    engine.dispose()
    _run_study(make_storage(storage_url), n_trials=1)  # once written, a reader opens it
    assert optuna.get_all_study_names(make_storage(storage_url, must_exist=True))


# --- a database that answers but is not Optuna's: bad input (exit 2), never an outage (exit 75) ---------


def _optuna_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"
    storage = make_storage(url)
    _run_study(storage, n_trials=30)
    storage.engine.dispose()
    return url


def test_a_damaged_sqlite_file_is_invalid_not_unavailable(tmp_path: Path) -> None:
    url = _optuna_sqlite(tmp_path / "x.db")
    with open(tmp_path / "x.db", "r+b") as f:
        f.truncate(8192)  # as `truncate -s 8192 x.db`
    with pytest.raises(StorageInvalid, match=r"Optuna storage \(database disk image is malformed"):
        make_storage(url, must_exist=True)
    (tmp_path / "noise.db").write_bytes(bytes(range(256)) * 8)
    for must_exist in (True, False):  # a reader, and a command that would create a study there
        with pytest.raises(StorageInvalid, match="file is not a database") as info:
            make_storage(f"sqlite:///{tmp_path / 'noise.db'}", must_exist=must_exist)
        assert "\n" not in str(info.value)


def test_another_programs_tables_are_invalid_and_left_alone(storage_url: str) -> None:
    engine = sqlalchemy.create_engine(storage_url)
    with engine.begin() as conn:  # another program's table, named like Optuna's first one
        conn.execute(sqlalchemy.text("CREATE TABLE studies (id INTEGER PRIMARY KEY, title TEXT)"))
    with pytest.raises(StorageInvalid, match="not a valid Optuna storage \\(no table 'version_info', .*"
                       "another program's tables"):
        make_storage(storage_url, must_exist=True)
    with engine.connect() as conn:
        assert sqlalchemy.inspect(conn).get_table_names() == ["studies"]  # nothing created
    engine.dispose()


def test_an_optuna_schema_missing_a_table_or_column_is_invalid(storage_url: str) -> None:
    _run_study(make_storage(storage_url), n_trials=1)
    engine = sqlalchemy.create_engine(storage_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP TABLE trial_heartbeats"))
    with pytest.raises(StorageInvalid, match="no table 'trial_heartbeats'"):
        make_storage(storage_url, must_exist=True)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE trial_heartbeats (trial_heartbeat_id INTEGER)"))
    with pytest.raises(StorageInvalid, match="table 'trial_heartbeats' has no column 'trial_id', "):
        make_storage(storage_url, must_exist=True)
    engine.dispose()


def test_an_unreachable_server_stays_an_outage() -> None:
    with pytest.raises(StorageUnavailable) as info:
        make_storage("postgresql://postgres@127.0.0.1:1/nas3d", must_exist=True)
    assert not isinstance(info.value, StorageMissing)  # StorageInvalid is a StorageMissing


def test_a_worker_on_a_damaged_database_exits_2_at_once_and_on_a_lost_one_75(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nas3d.cli import main
    from nas3d.util import EXIT_STORAGE, EXIT_USAGE

    monkeypatch.setenv("NAS3D_STORAGE_RETRY_WINDOW", "0")
    url = _optuna_sqlite(tmp_path / "x.db")
    with open(tmp_path / "x.db", "r+b") as f:
        f.truncate(8192)
    assert main(["worker", "--storage", url, "--study-name", "s", "--device", "cpu"]) == EXIT_USAGE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("nas3d: error: ") and "is not a valid Optuna storage" in line
    lost = "postgresql://postgres@127.0.0.1:1/nas3d"
    with pytest.raises(SystemExit) as info:
        main(["worker", "--storage", lost, "--study-name", "s", "--device", "cpu"])
    assert info.value.code == EXIT_STORAGE


def test_password_not_echoed_in_error() -> None:
    with pytest.raises(ValueError) as info:
        resolve_storage_url("mysql://u:secret@h/db")
    assert "secret" not in str(info.value)


# --- building storages -------------------------------------------------------------------------------


def test_rdb_storage_with_heartbeat(storage_url: str) -> None:
    storage = make_storage(storage_url)
    assert isinstance(storage, RDBStorage)
    assert storage.get_heartbeat_interval() == DEFAULT_HEARTBEAT_INTERVAL
    assert storage.grace_period == 4 * DEFAULT_HEARTBEAT_INTERVAL
    # stale trials are failed and re-queued by nas3d.records.fail_and_requeue, not by a callback
    assert storage.max_retry == DEFAULT_MAX_RETRY and storage.get_heartbeat_stale_trial_callback() is None
    study = _run_study(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    # a second worker process would see the same study
    again = optuna.load_study(study_name=study.study_name, storage=make_storage(storage_url))
    assert len(again.trials) == 3


def test_default_storage_creates_database_under_home(tmp_path: Path) -> None:
    _run_study(make_storage(None), n_trials=1)
    assert (tmp_path / "nas3d-home" / "nas3d.db").is_file()  # NAS3D_HOME set by conftest


def test_sqlite_parent_folder_created(tmp_path: Path) -> None:
    make_storage(f"sqlite:///{tmp_path / 'a' / 'b' / 'x.db'}")
    assert (tmp_path / "a" / "b" / "x.db").is_file()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::optuna.exceptions.ExperimentalWarning")
def test_stale_trial_is_failed_and_requeued(storage_url: str) -> None:
    storage = make_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    # a worker that died mid-trial: RUNNING with one heartbeat, then silence (backdated, not slept)
    dead = study.ask()
    dead.suggest_float("x", 0.0, 1.0)
    storage.record_heartbeat(dead._trial_id)
    with storage.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t"), {"t": datetime(2000, 1, 1)}
        )
    study.optimize(_objective, n_trials=1)
    states = {t.number: t.state for t in study.trials}
    assert states[0] == TrialState.FAIL
    retried = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].params == dead.params
    # the retry completed: it carries no failure reason; its predecessor keeps its own
    assert retried[0].state == TrialState.COMPLETE and "failure_reason" not in retried[0].user_attrs
    assert study.trials[0].user_attrs["failure_reason"].startswith("stale heartbeat")


def test_journal_storage(tmp_path: Path) -> None:
    storage = make_storage(f"journal:{tmp_path / 'j' / 'nas3d.log'}")
    assert isinstance(storage, JournalStorage)
    assert len(_run_study(storage).trials) == 3


def test_unreachable_postgres_is_one_line_error() -> None:
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        make_storage("postgresql://postgres:secret@127.0.0.1:1/nas3d")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and "127.0.0.1:1" in message and "NAS3D_STORAGE" in message
    assert "secret" not in message


def test_missing_postgres_database_is_storage_unavailable(postgres_url: str) -> None:
    url = make_url(postgres_url).set(database="nas3d_no_such_db").render_as_string(hide_password=False)
    with pytest.raises(StorageUnavailable, match="nas3d_no_such_db.*does not exist"):
        make_storage(url)


def test_connection_survives_backend_restart(postgres_url: str) -> None:
    storage = make_storage(postgres_url)
    study = _run_study(storage, n_trials=1)
    lock = study_lock(postgres_url, study.study_name)
    with lock:  # leaves an idle connection behind, to be killed below
        pass
    libpq = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed is not None and killed[0] >= 1  # the storage's pooled connection was among them
    study.optimize(_objective, n_trials=1)  # pool_pre_ping replaces the dead connection
    assert len(study.trials) == 2
    with lock:  # reconnects
        pass


def test_storage_survives_server_restart(postgres_url: str, restart_postgres: Callable[[], None]) -> None:
    study = _run_study(make_storage(postgres_url), n_trials=1)
    restart_postgres()
    study.optimize(_objective, n_trials=1)
    assert len(study.trials) == 2


def test_heartbeat_survives_transient_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'x.db'}")

    def broken(self: RDBStorage, trial_id: int) -> None:
        raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))

    monkeypatch.setattr(RDBStorage, "record_heartbeat", broken)
    storage.record_heartbeat(1)  # logged, not raised: the heartbeat thread keeps running


# --- retries ----------------------------------------------------------------------------------------


def test_retry_transient_retries_operational_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            cause = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("connection refused"))
            raise optuna.exceptions.StorageInternalError("commit failed") from cause
        return "ok"

    assert retry_transient(flaky, window=60) == "ok" and len(calls) == 3


def test_a_transaction_a_lost_connection_invalidated_is_transient() -> None:
    """Optuna's _get_trials catches a lost connection and retries a slower query in the same session:
    the PendingRollbackError that follows (wrapped in StorageInternalError) is the outage too."""
    from nas3d.storages._faults import _is_transient

    def optuna_get_trials(first_error: Exception) -> None:
        try:
            try:
                raise first_error
            except Exception:  # as Optuna does: log it and fall back to a slower query, chained implicitly
                message = "Can't reconnect until invalid transaction is rolled back"
                raise sqlalchemy.exc.PendingRollbackError(message, None, None)  # noqa: B904
        except sqlalchemy.exc.PendingRollbackError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit") from e

    lost = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
    bad_row = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    for first_error, transient in ((lost, True), (bad_row, False)):
        with pytest.raises(optuna.exceptions.StorageInternalError) as caught:
            optuna_get_trials(first_error)
        assert _is_transient(caught.value) is transient


def test_a_server_lost_during_the_schema_check_is_unavailable_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker starting as the server goes down can lose it after connecting, inside Optuna's schema
    check (seen in the outage test): that is an outage (exit 75, restarted), not a crash (exit 1)."""
    from optuna.storages._rdb.storage import _VersionManager

    def server_gone(self: _VersionManager) -> None:
        lost = sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit") from lost

    monkeypatch.setattr(_VersionManager, "check_table_schema_compatibility", server_gone)
    with pytest.raises(StorageUnavailable, match="server closed the connection"):
        make_storage(f"sqlite:///{tmp_path / 'x.db'}")


def test_retry_transient_gives_up_after_its_window_and_passes_other_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]  # simulated time: sleeping advances it
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    calls = []

    def down() -> None:
        calls.append(clock[0])
        raise StorageUnavailable("cannot connect")

    with pytest.raises(StorageUnavailable, match="stayed unreachable for 60 s"):
        retry_transient(down, window=60)
    assert len(calls) >= 5 and calls[-1] <= 60  # backed off, never past the window
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert all(gap <= 10 for gap in gaps) and gaps[0] < gaps[-1]  # exponential, capped at 10 s

    def bug() -> None:
        calls.append(clock[0])
        raise KeyError("x")

    before = len(calls)
    with pytest.raises(KeyError):
        retry_transient(bug, window=60)
    assert len(calls) == before + 1  # not a storage error: no retry


# --- artifacts and constraints ---------------------------------------------------------------------


def test_default_artifact_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_artifact_location(None) == str(tmp_path / "nas3d-home" / "artifacts")
    beside = default_artifact_location(f"sqlite:///{tmp_path / 'db' / 'x.db'}")
    assert beside == str(tmp_path / "db" / "artifacts")
    assert default_artifact_location("postgresql://u@h/db") == str(tmp_path / "nas3d-home" / "artifacts")
    assert artifact_store_for(None, path=tmp_path / "art")._base_path == tmp_path / "art"
    monkeypatch.setenv("NAS3D_ARTIFACTS", str(tmp_path / "env-art"))
    assert default_artifact_location("postgresql://u@h/db") == str(tmp_path / "env-art")
    assert artifact_store_for(None)._base_path == tmp_path / "env-art"
    assert (tmp_path / "env-art").is_dir()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask() outside optimize
def test_artifact_upload_roundtrip(tmp_path: Path) -> None:
    storage = make_storage(None)
    store = artifact_store_for(None)
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    trial = study.ask()
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    artifact_id = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(src), study_or_trial=trial
    )
    with store.open_reader(artifact_id) as f:
        assert f.read() == b"weights"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask() outside optimize
def test_constraints_seen_by_sampler_study_and_dashboard(storage_url: str) -> None:
    study = optuna.create_study(storage=make_storage(storage_url), directions=["maximize", "minimize"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0.0, 1.0)
        record_constraints(trial, {"flops": 0.5 if trial.number == 0 else -0.5, "params": -1.0})
        return x, 1.0 - x

    study.optimize(objective, n_trials=3)
    first = study.trials[0]
    assert first.constraints == {"0": 0.5, "1": -1.0}  # what samplers and best_trials read
    assert first not in study.best_trials  # infeasible: never on the Pareto front
    assert serialize_frozen_trial(study._study_id, first, {})["constraints"] == [0.5, -1.0]
    with pytest.raises(ValueError, match="NaN"):
        record_constraints(study.ask(), {"flops": float("nan")})


# --- the study lock -------------------------------------------------------------------------------


def _check_lock_excludes_other_workers(url: str) -> None:
    first, second = study_lock(url, "s"), study_lock(url, "s")
    order: list[str] = []
    first.acquire()
    waiter = threading.Thread(target=lambda: (second.acquire(), order.append("second")))
    waiter.start()
    time.sleep(0.2)
    order.append("first released")
    first.release()
    first.release()  # idempotent: the worker releases in run_one and again in finally
    waiter.join(timeout=5)
    assert order == ["first released", "second"]
    second.release()
    with study_lock(url, "other"), first:  # other studies do not contend
        pass


def test_study_lock_excludes_other_workers(storage_url: str) -> None:
    _check_lock_excludes_other_workers(storage_url)


def test_study_lock_on_journal(tmp_path: Path) -> None:
    _check_lock_excludes_other_workers(f"journal:{tmp_path / 'j.log'}")


def test_a_wrapped_rdb_method_missing_from_optuna_fails_the_import_naming_it() -> None:
    from nas3d.storages._rdb import OVERRIDDEN_METHODS, RETRIED_METHODS, check_wrapped_methods

    names = (*RETRIED_METHODS, *OVERRIDDEN_METHODS)
    check_wrapped_methods(RDBStorage, names)  # the installed Optuna has them all
    assert len(RETRIED_METHODS) == 27
    lacking = type("RDBStorage", (), {n: lambda self: None for n in names if n != "_get_trials"})
    with pytest.raises(ImportError) as info:
        check_wrapped_methods(lacking, names)
    assert str(info.value) == (
        f"nas3d.storages wraps RDBStorage._get_trials, which optuna {optuna.__version__} does not have; "
        "install an Optuna nas3d supports: pip install 'optuna>=5.0,<6'"
    )
    # a renamed method is not callable under its old name either
    renamed = type("RDBStorage", (lacking,), {"_get_stale_trial_ids": None})
    with pytest.raises(ImportError, match=r"RDBStorage\._get_trials, RDBStorage\._get_stale_trial_ids, "):
        check_wrapped_methods(renamed, names)
    # and importing nas3d.storages runs the check, on an Optuna whose RDBStorage lost a method
    script = "from optuna.storages import RDBStorage; del RDBStorage._get_trials; import nas3d.storages"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"ImportError: {info.value}"
