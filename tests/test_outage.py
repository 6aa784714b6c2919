"""Database outages: workers on a throwaway PostgreSQL cluster that the test stops for 20 s and then
60 s lose nothing: the exact budget, nothing RUNNING, no trained result lost. CI runs this test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from nas3d import records
from nas3d.budget import budget_state
from nas3d.storages import make_storage
from nas3d.study import create_study
from nas3d.testing.storages import PostgresCluster
from tests.test_study import smoke_config
from tests.test_worker import wait_for

pytestmark = pytest.mark.slow

BUDGET = 4


def test_workers_ride_out_20_s_and_60_s_database_outages(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = postgres_cluster.url
    # Trials of a few seconds: each outage starts while trials train, and they end (and tell) while the
    # database is down. Two trials per worker: one before each outage.
    config = smoke_config(tmp_path, **{"study.n_trials": BUDGET, "study.name": "outage",
                                       "train.max_epochs": 10, "train.patience": 10})
    study = create_study(config, make_storage(url))

    # Launched while the database is down: the workers exit for storage reasons and launch restarts them.
    postgres_cluster.stop()
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "nas3d", "launch", "--study-name", "outage", "--storage", url, "--cpu",
             "--workers", "2", "--heartbeat-interval", "2", "--grace-period", "16"],
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "lost the database; starting it again" in log.read_text(), timeout=300)
        postgres_cluster.start()

        seen = -1
        for outage in (20, 60):
            # Down while a trial that started after the previous outage trains.
            wait_for(lambda seen=seen: any(
                t.number > seen and t.state == TrialState.RUNNING and "device" in t.user_attrs
                for t in study.get_trials(deepcopy=False)), timeout=300)
            assert_no_training_lost(study.get_trials())  # the previous outage lost nothing either
            seen = max(t.number for t in study.get_trials(deepcopy=False))
            postgres_cluster.stop()
            time.sleep(outage)
            postgres_cluster.start()
        launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    output = log.read_text()
    print(output[-6000:])  # shown with -s, and by pytest on failure
    assert launcher.returncode == 0, output[-5000:]
    assert "retry" in output  # the outages were met, not missed
    assert "exited with code" not in output  # no worker crashed (storage exits say "lost the database")

    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], output[-5000:]
    trained = [t for t in trials if records.NOT_TRAINED not in t.user_attrs]
    assert [t.state for t in trained] == [TrialState.COMPLETE] * BUDGET, output[-5000:]
    assert budget_state(study).used == BUDGET
    assert_no_training_lost(trials)


def assert_no_training_lost(trials: list) -> None:
    """The only failures allowed are trials an ask created but never handed to its worker."""
    failed = [(t.number, records.failure_reason(t)) for t in trials if t.state == TrialState.FAIL
              and t.user_attrs.get(records.NOT_TRAINED) != "lost"]
    assert not failed
