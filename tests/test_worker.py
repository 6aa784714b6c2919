"""Workers as real processes on a real storage: exact budget, crash recovery, clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas3d.architecture import Architecture
from nas3d.space import params_for
from nas3d.storages import make_storage
from nas3d.study import NOT_TRAINED_ATTR, create_study
from nas3d.worker import budget_state, run_worker
from tests.test_study import smoke_config

pytestmark = pytest.mark.slow

HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "3"]


def start_worker(storage_url: str, name: str, index: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nas3d", "worker", "--study-name", name, "--storage", storage_url,
               "--worker-index", str(index), *HEARTBEAT]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def wait_for(predicate, timeout: float = 120, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use budget: all but failed trials that were queued again, and duplicates."""
    trials = study.get_trials()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.number not in retried and NOT_TRAINED_ATTR not in t.user_attrs]


def test_two_workers_finish_exactly_the_budget(storage_url: str, tmp_path: Path) -> None:
    config = smoke_config(tmp_path, **{"study.n_trials": 7, "study.name": "two-workers"})
    study = create_study(config, make_storage(storage_url))
    workers = [start_worker(storage_url, "two-workers", i) for i in range(2)]
    outputs = [finish(w) for w in workers]
    trials = study.get_trials()
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), outputs
    evaluated = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == 7 == budget_state(study).used


def long_trials_study(storage_url: str, tmp_path: Path, name: str) -> optuna.Study:
    """Two trials long enough that a signal lands mid-training, of two different architectures queued
    first, so that what is retried or trained does not depend on what the sampler would propose."""
    config = smoke_config(tmp_path, **{"study.n_trials": 2, "study.name": name,
                                       "train.max_epochs": 60, "train.patience": 60})
    study = create_study(config, make_storage(storage_url))
    for ops in (("relu_conv3",), ("mish_conv3",)):
        arch = Architecture(ops, ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
        study.enqueue_trial(params_for(arch, config.space))
    return study


def wait_until_training(study: optuna.Study) -> None:
    wait_for(lambda: any(t.state == TrialState.RUNNING and "arch_hash" in t.user_attrs
                         for t in study.get_trials(deepcopy=False)))


def test_killed_worker_trial_is_retried_and_budget_stays_exact(storage_url: str, tmp_path: Path) -> None:
    study = long_trials_study(storage_url, tmp_path, "crash")
    victim = start_worker(storage_url, "crash")
    wait_until_training(study)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)
    finish(start_worker(storage_url, "crash"))
    trials = study.get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    reason = trials[killed.number].user_attrs["failure_reason"]
    assert reason.startswith("stale heartbeat: no heartbeat for over 3 s")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert len(counted(study)) == 2
    assert all(t.state == TrialState.COMPLETE for t in counted(study))


def test_sigterm_leaves_no_running_trial_and_requeues_it(tmp_path: Path) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = long_trials_study(storage_url, tmp_path, "stop")
    worker = start_worker(storage_url, "stop")
    wait_until_training(study)
    worker.send_signal(signal.SIGTERM)
    output = finish(worker, timeout=60)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], output
    interrupted = trials[0]
    assert interrupted.state == TrialState.FAIL
    assert interrupted.user_attrs["failure_reason"].startswith("interrupted")
    [requeued] = [t for t in trials if t.system_attrs.get("failed_trial") == interrupted.number]
    assert requeued.state == TrialState.WAITING and requeued.params == interrupted.params
    assert "failure_reason" not in requeued.user_attrs
    # the re-queued trial replaces the interrupted one; the other is the second queued architecture
    assert budget_state(study).used == 2 and len(trials) == 3


def test_duplicates_are_free_and_a_streak_of_them_stops_the_study(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = smoke_config(tmp_path, **{"study.n_trials": 3, "study.name": "dups"})
    study = create_study(config, make_storage(storage_url))
    arch = Architecture(("relu_conv3",), ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
    for _ in range(4):
        study.enqueue_trial(params_for(arch, config.space))
    # one trained, then three duplicates in a row: free, but a streak of three ends the study
    assert run_worker("dups", storage_url, max_free_streak=3) == 4
    state = budget_state(study)
    assert (state.used, state.duplicates, state.free_streak, state.waiting) == (1, 3, 3, 0)
    assert [t.user_attrs.get("duplicate_of") for t in study.trials] == [None, 0, 0, 0]
    assert "the last 3 trials were all duplicates" in caplog.text
