"""A worker: one process, one device, trials of one study until the study's budget is spent.

Several workers (on one or many hosts) share a study through its storage. The budget counts
architectures evaluated, and is exact: before each trial a worker takes the study's lock, fails
trials whose worker died (their heartbeat went stale; Optuna re-queues them), counts the trials that
use up budget, and asks for a trial only if one is left. A failed trial that was re-queued does not
count (its retry does), nor does a duplicate of an earlier architecture, which costs no training;
but a study stops once it holds as many duplicates as its budget, so a sampler that keeps proposing
known architectures cannot run forever. A trial the early stopper ended counts: its architecture was
evaluated (trained to a rung and ranked there), only not to the end.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from types import FrameType

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas3d.data import load_splits
from nas3d.pareto import EARLY_STOPPED_ATTR
from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    artifact_store_for,
    make_storage,
    resolve_storage_url,
    study_lock,
)
from nas3d.study import TrialObjective, load_study
from nas3d.train import TrainingFailure
from nas3d.train import torch_device as check_device

logger = logging.getLogger(__name__)


class WorkerInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived while a trial was training. Optuna marks that trial FAIL."""


@dataclass(frozen=True)
class BudgetState:
    used: int  # trials that count against the budget, RUNNING and WAITING included
    duplicates: int  # trials that reused an earlier trial's result
    waiting: int
    running: int
    stopped: int = 0  # trials the early stopper ended (counted in ``used``)

    def spent(self, budget: int) -> bool:
        """No trial may start: the budget is used (queued trials count already), or the duplicate
        allowance is."""
        return self.duplicates >= budget or (self.waiting == 0 and self.used >= budget)


def budget_state(study: optuna.Study) -> BudgetState:
    """Count the study's trials the way the budget does (see the module docstring)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    duplicates = sum("duplicate_of" in t.user_attrs for t in trials)
    return BudgetState(
        used=sum(t.number not in retried and "duplicate_of" not in t.user_attrs for t in trials),
        duplicates=duplicates,
        waiting=sum(t.state == TrialState.WAITING for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        stopped=sum(bool(t.user_attrs.get(EARLY_STOPPED_ATTR)) for t in trials),
    )


class _StopSignals:
    """Turns SIGINT/SIGTERM into a stop request; interrupts a trial only while it trains."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.in_trial = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        if self.in_trial:
            raise WorkerInterrupted(self.requested)


def run_worker(
    study_name: str,
    storage: str | None = None,
    *,
    device: str = "cpu",
    worker_index: int = 0,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    progress: bool = False,
) -> int:
    """Run trials of ``study_name`` on ``device`` until its budget is spent; returns trials run here.

    The device and the storage are checked first: a bad one is a one-line ``ValueError`` (or
    ``StorageUnavailable``) before anything is opened or written."""
    torch_device = check_device(device)
    storage_url = resolve_storage_url(storage)
    optuna_storage = make_storage(
        storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period, must_exist=True
    )
    study, config = load_study(study_name, optuna_storage, worker_index=worker_index)
    data = load_splits(config.data, torch_device, for_search=True)
    objective = TrialObjective(
        config, data, torch_device, artifact_store_for(storage_url), progress=progress
    )
    stop = _StopSignals()
    stop.install()
    lock = study_lock(storage_url, study_name)
    budget = config.study.n_trials
    heartbeat = optuna_storage if isinstance(optuna_storage, optuna.storages.RDBStorage) else None
    current: list[int] = []  # trial id of the trial in flight

    def run_one(trial: optuna.Trial) -> tuple[float, float]:
        lock.release()  # held from the budget check through study.ask()
        current.append(trial._trial_id)
        try:
            if stop.requested:
                raise WorkerInterrupted(stop.requested)
            stop.in_trial = True
            try:
                return objective(trial)
            finally:
                stop.in_trial = False
        except WorkerInterrupted as e:
            trial.set_user_attr("failure_reason", f"interrupted: the worker received {e}; re-queued")
            raise

    ran = 0
    while not stop.requested:
        lock.acquire()
        try:
            if heartbeat is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            state = budget_state(study)
            if state.spent(budget):
                if state.running == 0:
                    if state.duplicates >= budget:
                        logger.warning(
                            "study %r stops early: the sampler proposed %d duplicates of evaluated "
                            "architectures (as many as the budget); widen the space or use another sampler",
                            study_name, state.duplicates,
                        )
                    else:
                        logger.info("study %r has used its budget of %d trials", study_name, budget)
                    break
                # Another worker's trial may still go stale and need a retry: wait for it.
                lock.release()
                time.sleep(min(5.0, heartbeat_interval))
                continue
            current.clear()
            study.optimize(run_one, n_trials=1, catch=(TrainingFailure,))
            ran += 1
        except WorkerInterrupted:
            _requeue_interrupted(study, current)
            break
        finally:
            lock.release()
    if stop.requested:
        logger.info("worker stopped by %s after %d trials", stop.requested, ran)
    return ran


def _requeue_interrupted(study: optuna.Study, current: list[int]) -> None:
    """Queue again the trial a stop signal cut short, so the budget stays exact."""
    if not current:
        return
    trial = study._storage.get_trial(current[-1])
    if trial.state != TrialState.FAIL:
        return
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "failure_reason"}
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs={
                "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                "retry_history": history,
            },
        )
    )
    logger.info("trial %d was interrupted and queued again", trial.number)
