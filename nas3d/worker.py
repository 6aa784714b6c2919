"""A worker: one process, one device, trials of one study until the study's budget is spent.

Several workers (on one or many hosts) share a study through its storage, its study lock and its
artifact store (recorded in the study). The worker loop, here: claim a trial (:mod:`nas3d.claims`:
under the study lock, the budget counted by :mod:`nas3d.budget`, duplicates and over-constraint
trials decided there without training), train it while its heartbeat beats (:mod:`nas3d.heartbeat`),
upload the checkpoint, ``tell`` (:mod:`nas3d.outcomes`), and log one line (:func:`progress_line`: val AUC,
FLOPs, seconds, trials left; ``nas3d launch`` and ``search`` pass each worker's stderr on to the user). By
default the next trial is claimed in the worker's claim process while the current one trains;
``--no-claim-ahead`` claims in turn.

Faults: storage calls retry through a database outage for the retry window
(``$NAS3D_STORAGE_RETRY_WINDOW``, default 600 s); past it the worker exits with
:data:`EXIT_STORAGE`, which ``nas3d launch`` restarts. Anything raised inside a trial fails that trial
with its reason and the worker goes on. Only bad input found before the first trial raises (the CLI
exits 2). SIGINT/SIGTERM only set a flag; training checks it between batches, and the interrupted
trial is failed and queued again. A claim process that dies is replaced (:mod:`nas3d.claim_process`).
A checkpoint the artifact store refuses leaves its trial complete (``checkpoint_missing``); after
:data:`MAX_STORE_FAILURES` in a row the worker exits :data:`EXIT_ARTIFACTS` (not restarted).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from nas3d import records
from nas3d.budget import DEFAULT_MAX_FREE_STREAK, budget_state
from nas3d.claim_process import ClaimProcess
from nas3d.claims import LATER, Claim, InlineClaims, TrialSource, WorkerSettings, with_retries
from nas3d.data import load_splits
from nas3d.heartbeat import StopFlag, quiet_optuna_warnings
from nas3d.objective import TrialObjective
from nas3d.outcomes import interrupted, settle, tell
from nas3d.samplers import make_sampler
from nas3d.storages import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageMissing,
    StorageUnavailable,
    check_artifact_store,
    grace_period_for,
    make_storage,
    open_artifact_store,
    resolve_storage_url,
    storage_retry_window,
    study_artifact_location,
    study_lock,
)
from nas3d.study import allocate_worker_number, load_study
from nas3d.train import TrainingStopped
from nas3d.train import torch_device as check_device
from nas3d.util import EXIT_ARTIFACTS, EXIT_STORAGE

__all__ = ["MAX_STORE_FAILURES", "ArtifactStoreFailing", "WorkerStorageLost", "progress_line", "run_trial",
           "run_worker"]

logger = logging.getLogger(__name__)

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


#: Checkpoints in a row the artifact store may refuse before the worker stops: each such trial keeps
#: its scores (``checkpoint_missing``), but a store that stays read-only or full would have every
#: later training lose its weights.
MAX_STORE_FAILURES = 3


class ArtifactStoreFailing(SystemExit):
    """The study's artifact store refused :data:`MAX_STORE_FAILURES` checkpoints in a row: the process
    exits :data:`EXIT_ARTIFACTS`, which ``nas3d launch`` does not restart (the store needs fixing)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_ARTIFACTS)
        self.message = message
        logger.error("worker exits (status %d, not restarted): %s", EXIT_ARTIFACTS, message)

    def __str__(self) -> str:
        return self.message


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
    claim_ahead: bool = True,
    wait_for_running: bool = True,
    stop: StopFlag | None = None,
) -> int:
    """Run trials of ``study_name`` on ``device`` until its budget is spent; returns trials run here.

    ``claim_ahead``: claim the next trial (sample, deduplicate, measure its costs) in a child process
    while the current one trains, so the device does not wait for the storage and the sampler between
    trials. The sampler then proposes it without the current trial's result, as it would with one
    more worker (TPE's constant liar covers running trials). ``wait_for_running`` False: return once
    the budget is all claimed, not when the last running trial has ended (a plan worker, which has
    other work). ``stop``: the caller's stop flag (installed here), so that it sees a signal too.

    The device and the storage are checked first. Raises ``ValueError`` / ``LookupError`` /
    ``FileNotFoundError`` / ``StorageMissing`` for bad input found before the first trial (a device
    that is not here, a storage that does not exist, an unknown study, an unreachable artifact store,
    missing data), each one line, before anything is written; and
    :class:`WorkerStorageLost` when the database is unreachable for longer than ``retry_window``
    seconds (default :func:`nas3d.storages.storage_retry_window`).

    The claim process is started by ``multiprocessing`` (spawn), which imports the main module of a
    script anew: a script that calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    torch_device = check_device(device)
    window = storage_retry_window(retry_window)
    storage_url = resolve_storage_url(storage)
    grace = grace_period_for(heartbeat_interval, grace_period)
    try:
        optuna_storage = make_storage(
            storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace,
            retry_window=window, must_exist=True,
        )
        study, config = load_study(study_name, optuna_storage, check_data=True)  # bad input first
        lock = study_lock(storage_url, study_name)
        with_retries(lock.acquire, window, optuna_storage)
        try:
            number = allocate_worker_number(study)
        finally:
            lock.release()
        # Loaded before this worker had its number (bad input first): its own sampler is seeded now.
        study.sampler = make_sampler(config.study, space=config.space, ode=config.ode, worker_number=number)
        location = study_artifact_location(optuna_storage, study_name)
    except StorageMissing:
        raise  # bad input: a restart cannot help (exit 2)
    except StorageUnavailable as e:
        raise WorkerStorageLost(str(e)) from e
    check_artifact_store(location)  # one line, before any training, if this host cannot reach it
    data = load_splits(config.data, torch_device, for_search=True)
    settings = WorkerSettings(
        study_name=study_name, storage_url=storage_url, worker_number=number,
        heartbeat_interval=heartbeat_interval, grace_period=grace, retry_window=window,
        max_free_streak=max_free_streak, shape=data.shape, wait_for_running=wait_for_running,
        log_level=logging.getLogger("nas3d").getEffectiveLevel(),
    )
    stop = stop or StopFlag()
    stop.install()
    objective = TrialObjective(config, data, torch_device, open_artifact_store(location), progress=progress,
                               should_stop=stop)
    source = TrialSource(settings, study, optuna_storage, lock, objective, stop)
    logger.info("worker %d (number %d in study %r) on %s, artifacts in %s",
                worker_index, number, study_name, device, location)

    claims = ClaimProcess(source) if claim_ahead else InlineClaims(source)
    finished = 0  # trials trained and told here (not those interrupted, nor those discarded)
    try:
        quiet_optuna_warnings()
        claims.request(wait=True)
        claim = claims.result()
        while isinstance(claim, Claim):
            asked = not stop.requested
            if asked:
                claims.request(wait=False)  # claimed ahead while this trial trains (in turn: after it)
            try:
                train = functools.partial(objective.train, claim.trial, claim.architecture)
                started = time.monotonic()
                ended = run_trial(study, claim.trial, train, stop)
                finished += ended
                if ended:
                    logger.info("%s", progress_line(study, claim.trial._trial_id, config.study.n_trials,
                                                    seconds=time.monotonic() - started))
            finally:
                claim.stop_beating()
            claim = claims.result() if asked else None
            if objective.store_failures_in_row >= MAX_STORE_FAILURES:
                _stop_for_store(study, claim, objective.store_failure)
            if isinstance(claim, Claim) and stop.requested:
                source.give_back(claim)
                claim = None
            elif claim == LATER and not stop.requested:
                claims.request(wait=True)
                claim = claims.result()
    except StorageUnavailable as e:
        raise WorkerStorageLost(str(e)) from e
    finally:
        claims.close()
    ran = finished + claims.decided
    if stop.requested:
        logger.info("worker stopped by %s after %d trials", stop.requested, ran)
    return ran


def progress_line(study: optuna.Study, trial_id: int, budget: int, *, seconds: float | None = None) -> str:
    """What a search says as each trial ends here: its number, val AUC, FLOPs, seconds (or why it
    failed), and how many trials of the budget are still to finish (in any worker).

    ``seconds``: the time this worker spent on it. Left out, the trial's start to its end, which with
    claim-ahead also counts the wait between its claim and the end of the trial before it."""
    trial = study._storage.get_trial(trial_id)
    start, end = trial.datetime_start, trial.datetime_complete
    if seconds is None and start and end:
        seconds = (end - start).total_seconds()
    took = f"{seconds:.0f} s" if seconds is not None else "? s"
    counted = budget_state(study)
    left = max(0, budget - (counted.used - counted.running - counted.waiting))
    if trial.values is not None:
        auc, flops = trial.values
        how = "stopped early, " if trial.user_attrs.get(records.EARLY_STOPPED) else ""
        said = f"{how}val AUC {auc:.4f}, {flops / 1e6:,.1f} MFLOPs, {took}"
    elif trial.user_attrs.get(records.EARLY_STOPPED):
        auc, flops = trial.user_attrs.get(records.EARLY_STOPPED_VALUES) or (float("nan"), float("nan"))
        said = f"stopped early, val AUC {auc:.4f}, {flops / 1e6:,.1f} MFLOPs, {took}"
    else:
        said = f"{trial.state.name.lower()} after {took}: {records.failure_reason(trial, 'no reason')}"
    return f"trial {trial.number}: {said}; {left} of {budget} trials left"


def _stop_for_store(study: optuna.Study, claim: Claim | object, failure: str | None) -> None:
    """Give back the trial claimed ahead (queued again: no one trained it) and raise
    :class:`ArtifactStoreFailing` naming the store, the path and the OS error."""
    if isinstance(claim, Claim):
        try:
            interrupted(study, claim.trial, "its worker stopped: the artifact store refuses checkpoints",
                        trained=False)
        finally:
            claim.stop_beating()
    raise ArtifactStoreFailing(
        f"{MAX_STORE_FAILURES} checkpoints in a row were not stored (those trials keep their scores, "
        f"marked checkpoint_missing); the last: {failure}; make the store writable with space left, then "
        "start the workers again"
    )


def run_trial(
    study: optuna.Study, trial: optuna.Trial, evaluate: Callable[[], Any], stop: StopFlag
) -> bool:
    """Evaluate one asked trial (``evaluate()`` returns its values) and tell its outcome; failures
    stay the trial's. Returns whether the trial ended here.

    A trial interrupted by ``stop`` is failed and queued again; anything else raised fails the trial
    with its reason (set by the objective). A trial another worker finished meanwhile (this worker
    was silent past the grace period: stopped, or starved) keeps that outcome, and this result is
    discarded. Only :class:`StorageUnavailable` propagates.
    """
    try:
        values = evaluate()
    except UpdateFinishedTrialError:
        logger.warning("trial %d was already finished by another worker (stale heartbeat: this worker "
                       "was silent past the grace period); the result of this run is discarded", trial.number)
        return False
    except BaseException as error:
        settle(study, trial, error, stop)
        return not isinstance(error, TrainingStopped)
    tell(study, trial, values=values)
    return True
