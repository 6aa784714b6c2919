"""The one recovery path, ``nas3d.records.fail_and_requeue``, on SQLite and PostgreSQL: the failed
trial keeps its reason, its retry is Optuna's (``retried_trial_number``, ``retry_history``) and starts
clean, and a trial another process finished first is not queued twice."""

from __future__ import annotations

import os
import socket
import warnings

import optuna
import pytest
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from nas3d import records
from nas3d.launch import requeue_killed
from nas3d.storages import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                      "ignore:Heartbeat of storage:UserWarning")


def _study(storage_url: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    return optuna.create_study(storage=make_storage(storage_url), study_name="s", sampler=sampler,
                               directions=["maximize", "minimize"])


def _running(study: optuna.Study, **system_attrs: object) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr(records.ARCH, "a")
    records.fail_with_reason(trial, "an earlier attempt's reason", not_trained="error")
    for key, value in system_attrs.items():
        study._storage.set_trial_system_attr(trial._trial_id, key, value)
    return trial


def _history(trial: optuna.trial.FrozenTrial) -> tuple[int | None, list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return (RetryHeartbeatStaleTrialCallback.retried_trial_number(trial),
                RetryHeartbeatStaleTrialCallback.retry_history(trial))


def test_the_failed_trial_keeps_its_reason_and_its_retry_starts_clean(storage_url: str) -> None:
    study = _study(storage_url)
    trial = _running(study, **{records.WORKER: {"worker": 0, "host": "h", "pid": 1}, "kept": 7})
    frozen = study._storage.get_trial(trial._trial_id)
    assert records.fail_and_requeue(study, frozen, "killed: test") is True
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs[records.FAILURE_REASON] == "killed: test"
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert retry.user_attrs == {records.ARCH: "a"}  # neither the reason nor the not-trained mark
    assert records.WORKER not in retry.system_attrs and retry.system_attrs["kept"] == 7
    assert _history(retry) == (0, [0]) and records.retry_of(retry) == [0]


def test_a_trial_finished_elsewhere_is_not_queued_again(storage_url: str) -> None:
    study = _study(storage_url)
    trial = _running(study)
    frozen = study._storage.get_trial(trial._trial_id)
    assert records.fail_and_requeue(study, frozen, "first") is True
    assert records.fail_and_requeue(study, frozen, "second") is False  # another process got there first
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    assert study.get_trials()[0].user_attrs[records.FAILURE_REASON] == "first"


def test_retries_chain_and_stop_at_max_retry(storage_url: str) -> None:
    study = _study(storage_url)
    assert records.fail_and_requeue(study, _running(study), "attempt 0", max_retry=2)
    first_retry = study.ask()  # pops the retry
    assert first_retry.number == 1 and first_retry.params == study.trials[0].params
    assert records.fail_and_requeue(study, first_retry, "attempt 1", max_retry=2)
    second_retry = study.ask()
    assert _history(study.trials[2]) == (0, [0, 1])
    assert records.fail_and_requeue(study, second_retry, "attempt 2", max_retry=2) is False  # bound reached
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 3
    assert [t.user_attrs[records.FAILURE_REASON] for t in study.trials] == [f"attempt {i}" for i in range(3)]


def test_a_live_trial_is_told_so_its_sampler_hears_of_the_end(storage_url: str) -> None:
    class Recording(optuna.samplers.RandomSampler):
        def __init__(self) -> None:
            super().__init__(seed=0)
            self.ended: list[tuple[int, TrialState]] = []

        def after_trial(self, study, trial, state, values):  # type: ignore[no-untyped-def]
            self.ended.append((trial.number, state))

    sampler = Recording()
    study = _study(storage_url, sampler)
    assert records.fail_and_requeue(study, _running(study), "interrupted: test; re-queued")
    assert sampler.ended == [(0, TrialState.FAIL)]
    assert study.trials[1].state == TrialState.WAITING


def test_a_completed_retry_carries_no_failure_reason(storage_url: str) -> None:
    study = _study(storage_url)
    records.fail_and_requeue(study, _running(study), "stale heartbeat: test")
    retry = study.ask()
    study.tell(retry, [0.9, 1.0])
    first, done = study.get_trials()
    assert done.state == TrialState.COMPLETE and records.FAILURE_REASON not in done.user_attrs
    assert first.user_attrs[records.FAILURE_REASON] == "stale heartbeat: test"


def test_launch_fails_and_requeues_the_trials_of_workers_it_killed(storage_url: str) -> None:
    study = _study(storage_url)
    mine = _running(study, **{records.WORKER: {"worker": 0, "host": socket.gethostname(), "pid": 4242}})
    _running(study, **{records.WORKER: {"worker": 1, "host": "elsewhere", "pid": 4242}})
    _running(study, **{records.WORKER: {"worker": 2, "host": socket.gethostname(), "pid": os.getpid()}})
    assert requeue_killed("s", storage_url, [4242]) == 1
    trials = study.get_trials()
    assert trials[mine.number].state == TrialState.FAIL
    assert trials[mine.number].user_attrs[records.FAILURE_REASON].startswith("killed")
    assert [t.state for t in trials[1:3]] == [TrialState.RUNNING] * 2
    assert records.retry_of(trials[3]) == [mine.number] and trials[3].state == TrialState.WAITING


def test_status_of_a_retry_shows_its_history_and_no_inherited_reason(storage_url: str) -> None:
    from nas3d.report import trial_report

    study = _study(storage_url)
    records.fail_and_requeue(study, _running(study), "stale heartbeat: no heartbeat for over 120 s")
    retry = study.ask()
    study.tell(retry, [0.9, 1.0])
    text = trial_report(study._storage, "s", retry.number)
    assert "complete" in text.splitlines()[0] and "reason:" not in text
    history = text.splitlines().index("  retry history:")
    assert text.splitlines()[history + 1] == "    trial 0 fail: stale heartbeat: no heartbeat for over 120 s"
    assert "retry history" not in trial_report(study._storage, "s", 0)


def test_an_orphan_retried_under_ode_gets_a_proposal_of_its_own() -> None:
    from nas3d.samplers.ode import ODESampler
    from nas3d.space import sample_architecture
    from nas3d.study import DIRECTIONS

    study = optuna.create_study(directions=list(DIRECTIONS), sampler=ODESampler(population=4, seed=0))
    # an ask whose reply was lost: the trial exists, RUNNING, but the sampler never saw it
    orphan_id = study._storage.create_new_trial(study._study_id)
    records.mark_not_trained(study._storage, orphan_id, "lost")
    assert records.fail_and_requeue(study, study._storage.get_trial(orphan_id), "orphaned: test")
    retry = study.ask()  # pops the retry, which has neither parameters nor a proposal to inherit
    assert records.retry_of(study._storage.get_trial(retry._trial_id)) == [0]
    proposal = study._storage.get_trial(retry._trial_id).system_attrs
    assert records.ODE_STAGE in proposal and records.ODE_PARAMS in proposal  # claimed afresh
    sample_architecture(retry)
    assert retry.params == proposal[records.ODE_PARAMS]
