"""nas3d through a real PgBouncer in transaction mode: the study lock, the storage, two workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from nas3d import records
from nas3d.budget import budget_state
from nas3d.storages import make_storage, study_lock
from nas3d.storages._rdb import pg_connect_args
from nas3d.study import create_study
from nas3d.testing.servers import ServerUnavailable, pgbouncer
from nas3d.testing.storages import temporary_database
from tests.conftest import requires_tool, unavailable
from tests.test_storage import _check_lock_excludes_other_workers
from tests.test_study import smoke_config
from tests.test_worker import finish, start_worker

# Two server connections for everything: one worker's lock transaction plus its own queries. Small on
# purpose: a lock that blocks inside the database while waiting would pin the second one and starve
# the holder (a deadlock until query_wait_timeout); a session lock would be "held" by both clients,
# since PgBouncer hands them the same server connection.
POOL_SIZE = 2


# Every test that uses it starts a real PgBouncer in front of PostgreSQL: marked slow (`make test`, not
# `make test-fast`).
@pytest.fixture
def bouncer_url(postgres_server: str) -> Iterator[str]:
    """A fresh database, reached through a PgBouncer in transaction mode started for this test."""
    requires_tool("pgbouncer", why="nas3d is tested through a PgBouncer in transaction mode "
                  "(Debian: apt-get install pgbouncer)")
    with temporary_database(postgres_server, "nas3d_test_pgb") as direct:
        try:
            # PgBouncer's own default wait (120 s): a real deadlock still fails, a busy CI machine whose
            # holder needs a few seconds for its claim (sampling, costs) does not.
            server = pgbouncer(direct, pool_mode="transaction", pool_size=POOL_SIZE, query_wait_timeout=120)
            url = server.__enter__()
        except ServerUnavailable as e:
            unavailable(f"PgBouncer: {e}")
        try:
            yield url
        finally:
            server.__exit__(None, None, None)


@pytest.mark.slow
def test_study_lock_excludes_a_second_holder_through_pgbouncer(bouncer_url: str) -> None:
    _check_lock_excludes_other_workers(bouncer_url)


@pytest.mark.slow
def test_storage_through_pgbouncer_survives_repeated_statements(bouncer_url: str) -> None:
    # psycopg prepares a statement on its 5th use; through PgBouncer 1.18 that fails on the next
    # server connection, unless nas3d turned preparing off.
    config = smoke_config(Path("/nonexistent"), **{"study.name": "repeat"})
    study = create_study(config, make_storage(bouncer_url))
    for _ in range(12):
        study.tell(study.ask(), state=TrialState.FAIL)
    assert len(study.get_trials()) == 12


@pytest.mark.slow
def test_two_workers_through_pgbouncer_finish_exactly_the_budget(bouncer_url: str, tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"study.n_trials": 4, "study.name": "pgb"})
    study = create_study(config, make_storage(bouncer_url))
    # A grace period of 30 s, not the kill tests' 3: on a loaded machine a heartbeat can lag 3 s, and a
    # trial failed as stale and queued again is recovery (test_worker's), not what this test is about.
    workers = [start_worker(bouncer_url, "pgb", i, "--grace-period", "30") for i in range(2)]
    outputs = [finish(w) for w in workers]
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], outputs
    failed = [(t.number, records.failure_reason(t)) for t in trials if t.state == TrialState.FAIL]
    assert not failed, (failed, outputs)
    assert budget_state(study).used == 4 == len([t for t in trials if "duplicate_of" not in t.user_attrs])


@pytest.mark.slow
def test_lock_of_a_vanished_holder_expires(bouncer_url: str) -> None:
    # A holder that stops talking without closing its connection (its host died) must not keep the
    # study lock for the hours a TCP keepalive takes: the server ends the idle transaction.
    stuck, other = study_lock(bouncer_url, "s"), study_lock(bouncer_url, "s")
    stuck.IDLE_TIMEOUT_S = 1
    stuck.acquire()
    started = time.monotonic()
    other.acquire()
    assert 0.8 < time.monotonic() - started < 10
    stuck.release()  # its connection was closed by the server: release copes, the next acquire reconnects
    other.release()
    with stuck:
        pass


def test_prepared_statements_off_unless_the_url_asks() -> None:
    url = make_url("postgresql+psycopg://u@h/db")
    assert pg_connect_args(url) == (url, {"prepare_threshold": None})
    stripped, args = pg_connect_args(make_url("postgresql+psycopg://u@h/db?prepare_threshold=5&sslmode=disable"))
    assert args == {"prepare_threshold": 5}
    assert dict(stripped.query) == {"sslmode": "disable"}
    with pytest.raises(ValueError, match="prepare_threshold= must be an integer or 'none', but got 'x'"):
        pg_connect_args(make_url("postgresql+psycopg://u@h/db?prepare_threshold=x"))


def test_study_lock_honours_the_prepare_threshold_parameter(postgres_url: str) -> None:
    # the lock strips nas3d's parameter too (libpq would reject an unknown one)
    with study_lock(postgres_url + "?prepare_threshold=5", "s"):
        pass
