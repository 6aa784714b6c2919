"""A worker: one process, one device, trials of one study until the study's budget is spent.

Several workers (on one or many hosts) share a study through its storage, its study lock and its
artifact store (recorded in the study). Each trial goes:

1. Under the study lock: fail trials whose worker died (stale heartbeat; Optuna re-queues them) and
   trials orphaned by a lost ``ask`` reply; count the budget; ``ask``; record this worker on the
   trial and beat once; sample the architecture, record its hash, and decide whether it is a
   duplicate of a trial that trained or is training it (then it is recorded against that trial and
   PRUNED), or over the study's constraints (PRUNED). Then the lock is released: no two workers can
   claim one architecture.
2. Train (the heartbeat thread beats meanwhile), upload the checkpoint, ``tell``.

The budget counts trained architectures: a trial decided without training (duplicate, over the
constraints, failed before training, orphaned) is free, as is a failed trial that was queued again
(its retry counts). A study stops once ``max_free_streak`` trials in a row were free, so a sampler
that can only find known or over-cap architectures cannot run forever.

Faults: storage calls retry through a database outage for the retry window
(``$NAS3D_STORAGE_RETRY_WINDOW``, default 600 s); past it the worker exits with
:data:`EXIT_STORAGE`, which ``nas3d launch`` restarts. Anything raised inside a trial fails that trial
with its reason and the worker goes on. Only bad input found before the first trial raises (the CLI
exits 2). SIGINT/SIGTERM only set a flag; training checks it between batches, and the interrupted
trial is failed and queued again.
A trial the early stopper ended counts toward the budget: its architecture was trained (to a rung and
ranked there), only not to the end.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas3d.data import load_splits
from nas3d.pareto import EARLY_STOPPED_ATTR
from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageMissing,
    StorageUnavailable,
    check_artifact_store,
    make_storage,
    open_artifact_store,
    resolve_storage_url,
    retry_transient,
    storage_retry_window,
    study_artifact_location,
    study_lock,
)
from nas3d.study import NOT_TRAINED_ATTR, TrialObjective, allocate_worker_number, load_study
from nas3d.train import TrainingStopped
from nas3d.train import torch_device as check_device
from nas3d.util import EXIT_STORAGE

logger = logging.getLogger(__name__)

#: Trial system attr naming the worker that runs it: ``{"worker": N, "host": ..., "pid": ...}``.
WORKER_ATTR = "nas3d:worker"
#: How many trials in a row may be free (duplicates, over the constraints, ...) before a study stops.
DEFAULT_MAX_FREE_STREAK = 100


class WorkerStorageLost(SystemExit):
    """The database stayed unreachable past the retry window: the process exits :data:`EXIT_STORAGE`.

    A ``SystemExit`` so that ``python -m nas3d worker`` ends with that status (restartable), not
    with the usage-error status 2; library callers may catch it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_STORAGE)
        self.message = message
        # SystemExit prints nothing: say why in the log, in one line.
        logger.error("worker exits (status %d, to be restarted): %s", EXIT_STORAGE, message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class BudgetState:
    used: int  # trials that count against the budget: trained or training, and queued ones
    free: int  # trials decided without training (duplicates, over the constraints, ...)
    free_streak: int  # free trials after the last counted trial that has started
    duplicates: int
    waiting: int
    running: int
    stopped: int = 0  # trials the early stopper ended (counted in ``used``)

    def spent(self, budget: int, max_free_streak: int = DEFAULT_MAX_FREE_STREAK) -> bool:
        """No trial may start: the budget is used (queued trials count already and still run), or
        the last ``max_free_streak`` trials were all free."""
        return self.free_streak >= max_free_streak or (self.waiting == 0 and self.used >= budget)


def _is_free(trial: optuna.trial.FrozenTrial) -> bool:
    # duplicate_of alone: a study from before NOT_TRAINED_ATTR existed
    return NOT_TRAINED_ATTR in trial.user_attrs or "duplicate_of" in trial.user_attrs


def budget_state(study: optuna.Study) -> BudgetState:
    """Count the study's trials the way the budget does (see the module docstring)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    counted = [t for t in trials if t.number not in retried and not _is_free(t)]
    last = max((t.number for t in counted if t.state != TrialState.WAITING), default=-1)
    return BudgetState(
        used=len(counted),
        free=sum(_is_free(t) for t in trials),
        free_streak=sum(_is_free(t) for t in trials if t.number > last),
        duplicates=sum("duplicate_of" in t.user_attrs for t in trials),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        stopped=sum(bool(t.user_attrs.get(EARLY_STOPPED_ATTR)) for t in trials),
    )


class StopFlag:
    """SIGINT/SIGTERM set ``requested`` and nothing else: no exception lands inside a storage write
    or an upload. Training polls it between batches."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.requested is not None


class _Heartbeat:
    """Beats for one trial every ``interval`` seconds in a thread, as ``Study.optimize`` would
    (the worker runs ask/tell itself, to control retries and failures)."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)  # skips a beat on a transient error
            except Exception:
                logger.exception("heartbeat of trial id %d failed", self._trial_id)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_worker(
    study_name: str,
    storage: str | None = None,
    *,
    device: str = "cpu",
    worker_index: int = 0,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    progress: bool = False,
    retry_window: float | None = None,
    max_free_streak: int = DEFAULT_MAX_FREE_STREAK,
) -> int:
    """Run trials of ``study_name`` on ``device`` until its budget is spent; returns trials run here.

    The device and the storage are checked first. Raises ``ValueError`` / ``LookupError`` /
    ``FileNotFoundError`` / ``StorageMissing`` for bad input found before the first trial (a device
    that is not here, a storage that does not exist, an unknown study, an unreachable artifact store,
    missing data), each one line, before anything is written; and
    :class:`WorkerStorageLost` when the database is unreachable for longer than ``retry_window``
    seconds (default :func:`nas3d.storages.storage_retry_window`).
    """
    torch_device = check_device(device)
    window = storage_retry_window(retry_window)
    storage_url = resolve_storage_url(storage)
    try:
        optuna_storage = make_storage(
            storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            retry_window=window, must_exist=True,
        )
        load_study(study_name, optuna_storage)  # bad input first: unknown study, foreign study
        lock = study_lock(storage_url, study_name)
        _with_retries(lock.acquire, window)
        try:
            study, _ = load_study(study_name, optuna_storage)
            number = allocate_worker_number(study)
        finally:
            lock.release()
        study, config = load_study(study_name, optuna_storage, worker_number=number)
        location = study_artifact_location(optuna_storage, study_name)
    except StorageMissing:
        raise  # bad input: a restart cannot help (exit 2)
    except StorageUnavailable as e:
        raise WorkerStorageLost(str(e)) from e
    check_artifact_store(location)  # one line, before any training, if this host cannot reach it
    data = load_splits(config.data, torch_device, for_search=True)
    stop = StopFlag()
    stop.install()
    objective = TrialObjective(
        config, data, torch_device, open_artifact_store(location), progress=progress,
        on_claimed=lock.release, should_stop=stop,
    )
    grace = grace_period or 4 * heartbeat_interval
    beats = isinstance(optuna_storage, optuna.storages.RDBStorage)
    marker = {"worker": number, "host": socket.gethostname(), "pid": os.getpid()}
    logger.info("worker %d (number %d in study %r) on %s, artifacts in %s",
                worker_index, number, study_name, device, location)

    ran = 0
    try:
        _quiet_optuna_warnings()
        while not stop.requested:
            _with_retries(lock.acquire, window)
            try:
                # After an outage every live trial looks stale until its worker beats again: wait one
                # grace period before failing any.
                if beats and time.monotonic() - getattr(optuna_storage, "last_outage", -math.inf) > grace:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                fail_orphans(study, older_than=grace)
                state = budget_state(study)
                if state.spent(config.study.n_trials, max_free_streak):
                    if state.running == 0:
                        _log_end(study_name, state, config.study.n_trials, max_free_streak)
                        break
                    # Another worker's trial may still go stale and need a retry: wait for it.
                    lock.release()
                    time.sleep(min(5.0, heartbeat_interval))
                    continue
                trial = study.ask()
                if beats:  # first beat before the marker: a marked trial is always seen by staleness
                    optuna_storage.record_heartbeat_now(trial._trial_id)
                optuna_storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, marker)
            except BaseException:
                lock.release()
                raise
            try:
                heartbeat = _Heartbeat(optuna_storage, trial._trial_id, heartbeat_interval) if beats else None
                try:
                    run_trial(study, trial, objective, stop)
                finally:
                    if heartbeat is not None:
                        heartbeat.stop()
            finally:
                lock.release()  # the objective released it at the claim, unless it failed before
            ran += 1
    except StorageUnavailable as e:
        raise WorkerStorageLost(str(e)) from e
    if stop.requested:
        logger.info("worker stopped by %s after %d trials", stop.requested, ran)
    return ran


def _quiet_optuna_warnings() -> None:
    # The worker runs ask/tell with its own heartbeat thread (to retry and to own failures); Optuna
    # warns that heartbeats are meant for Study.optimize, which is what this module replaces.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")


def _log_end(study_name: str, state: BudgetState, budget: int, max_free_streak: int) -> None:
    if state.free_streak >= max_free_streak:
        logger.warning(
            "study %r stops early: the last %d trials were all duplicates of evaluated architectures or "
            "over the constraints (%d trained of %d); widen the space, relax [constraints], or use "
            "another sampler", study_name, state.free_streak, state.used, budget,
        )
    else:
        logger.info("study %r has used its budget of %d trained architectures", study_name, budget)


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: TrialObjective, stop: StopFlag) -> None:
    """Evaluate one asked trial and tell its outcome; failures stay the trial's.

    A trial interrupted by ``stop`` is failed and queued again; anything else raised fails the trial
    with its reason (set by the objective). Only :class:`StorageUnavailable` propagates.
    """
    try:
        values = objective(trial)
    except optuna.TrialPruned:
        _tell(study, trial, state=TrialState.PRUNED)
    except TrainingStopped:
        trial.set_user_attr("failure_reason", f"interrupted: the worker received {stop.requested}; re-queued")
        _tell(study, trial, state=TrialState.FAIL)
        requeue(study, study._storage.get_trial(trial._trial_id))
    except StorageUnavailable:
        raise  # the trial stays RUNNING; its heartbeat stops and another worker retries it
    except Exception as e:
        logger.warning("trial %d failed: %s: %s", trial.number, type(e).__name__, e)
        _tell(study, trial, state=TrialState.FAIL)
    else:
        _tell(study, trial, values=values)


def _tell(study: optuna.Study, trial: optuna.Trial, **outcome: Any) -> None:
    # skip_if_finished: another worker may have failed it as stale meanwhile (then its retry counts)
    study.tell(trial, skip_if_finished=True, **outcome)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial again with its parameters; the retry replaces it in the budget."""
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("failure_reason", NOT_TRAINED_ATTR)}
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


def fail_orphans(study: optuna.Study, *, older_than: float) -> int:
    """Fail RUNNING trials no worker claimed; call it holding the study lock. Returns how many.

    A worker marks its trial right after ``ask``, under the study lock. A RUNNING trial without the
    mark was created by an ``ask`` whose reply was lost (database outage) or whose worker died
    before marking it: no one will ever run or beat it. If it had popped a queued trial, that one
    is queued again.
    """
    storage = study._storage
    cutoff = time.time() - older_than
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR in trial.system_attrs:
            continue
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if started > cutoff:  # a lock lost to a server restart could let its worker still be marking it
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, NOT_TRAINED_ATTR, "lost")
            storage.set_trial_user_attr(
                trial._trial_id, "failure_reason", "orphaned: created by an ask whose worker never claimed it"
            )
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        failed += 1
        fixed = trial.system_attrs.get("fixed_params")
        if fixed:
            kept = {k: v for k, v in trial.user_attrs.items()
                    if k not in (NOT_TRAINED_ATTR, "failure_reason")}
            study.enqueue_trial(fixed, user_attrs=kept)
        logger.warning("trial %d was orphaned by a lost ask; failed%s", trial.number,
                       " and its queued parameters queued again" if fixed else "")
    return failed


def _with_retries(call: Any, window: float) -> None:
    """``call()`` (the study lock) retried through ``StorageUnavailable`` for ``window`` seconds."""
    return retry_transient(call, window=window, what="study lock",
                           transient=lambda e: isinstance(e, StorageUnavailable))
