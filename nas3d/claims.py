"""Claiming a worker's next trial: under the study lock, decide what it will train, and do it ahead.

A claim, under the study lock: fail trials whose worker died (stale heartbeat; Optuna re-queues them)
and trials orphaned by a lost ``ask`` reply; count the budget (:mod:`nas3d.budget`); ``ask``; record
the worker on the trial (:data:`nas3d.records.WORKER`) and beat once; sample the architecture,
record its hash, and decide whether it is a duplicate of a trial that trained or is training it (then
it is recorded against that trial and PRUNED). Then the lock is released: no two workers can claim
one architecture. Outside it, the trial's costs are measured; over the study's constraints it is
PRUNED. Trials decided so, without training, are told here; the others go to the worker to train.

By default the next trial is claimed in the worker's claim process while the current one trains
("claim ahead", :class:`nas3d.claim_process.ClaimProcess`), so the device does not wait for the study
lock, the sampler and the storage between trials (``bench/storage_overhead.py`` measures what is
left); ``--no-claim-ahead`` claims in turn, in the worker itself (:class:`InlineClaims`). A trial
claimed ahead is RUNNING, with its heartbeat, until it trains; a stop signal fails it and queues it
again, as it does the interrupted trial.

The worker and its claim process (:mod:`nas3d.claim_process`) share one :class:`WorkerSettings`,
built once by the worker; each process loads the study once.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas3d import records
from nas3d.budget import budget_state, log_spent
from nas3d.data import DataShape
from nas3d.heartbeat import Heartbeat, StopFlag, WorkerEnded
from nas3d.objective import ClaimedArchitecture, TrialObjective
from nas3d.outcomes import interrupted, settle
from nas3d.storages import StorageUnavailable, make_storage, retry_transient, study_lock
from nas3d.study import load_study

__all__ = [
    "LATER",
    "Claim",
    "InlineClaims",
    "TrialSource",
    "WorkerSettings",
    "claim_source",
    "fail_left_behind",
    "fail_orphans",
    "still_ours",
    "with_retries",
]

logger = logging.getLogger(__name__)

#: From a claim made ahead: the budget looks spent only because trials are still running (this
#: worker's own among them), or so few trials are left that claiming one ahead could leave another
#: worker idle; claim again once the current trial is told.
LATER = "later"


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker and its claim process share, built once by the worker (picklable: the claim
    process gets it as it is)."""

    study_name: str
    storage_url: str
    worker_number: int  # this worker's number in the study: it seeds the sampler
    heartbeat_interval: int
    grace_period: int  # seconds without a beat before a trial is stale; also the orphans' age
    retry_window: float  # seconds each storage call rides out an outage
    max_free_streak: int
    shape: DataShape  # what a claim needs of the data: the claim process loads none
    # False: once the budget is spent, leave the running trials to their workers (a plan worker has
    # other work; it fails the stale ones itself) instead of waiting to retry one that goes stale
    wait_for_running: bool = True
    log_level: int = logging.INFO
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)  # the worker's (a claim process's stop flag watches it)

    @property
    def marker(self) -> dict[str, Any]:
        """What marks a trial as this worker's (:data:`nas3d.records.WORKER`)."""
        return {"worker": self.worker_number, "host": self.host, "pid": self.pid}

    def open_storage(self) -> Any:
        """This process's own connection to the study's storage."""
        return make_storage(self.storage_url, heartbeat_interval=self.heartbeat_interval,
                            grace_period=self.grace_period, retry_window=self.retry_window, must_exist=True)

    def lock(self) -> Any:
        """The study lock (a process's own: an advisory lock lives on its connection)."""
        return study_lock(self.storage_url, self.study_name)


@dataclass
class Claim:
    """A trial claimed for training here: its architecture decided, its heartbeat running."""

    trial: optuna.Trial
    architecture: ClaimedArchitecture
    heartbeat: Heartbeat | None

    def stop_beating(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()


class TrialSource:
    """Claims this worker's next trial to train, under the study lock (see the module docstring).

    ``study``, ``storage`` and ``lock`` are this process's own. Trials decided without training
    (duplicates, over the constraints, failed before training) are told here and counted in ``decided``.
    """

    def __init__(self, settings: WorkerSettings, study: optuna.Study, storage: Any, lock: Any,
                 objective: TrialObjective | None, stop: StopFlag) -> None:
        self.settings, self.study, self.storage, self.lock = settings, study, storage, lock
        self.objective, self.stop = objective, stop
        self.beats = isinstance(storage, optuna.storages.RDBStorage)
        self.decided = 0

    def claim(self, *, wait: bool = True) -> Claim | str | None:
        """The next trial to train, claimed; None once the study is done or a stop was requested.

        With ``wait=False`` (a claim made while this worker's own trial trains) it returns
        :data:`LATER` instead of waiting for running trials that might still need a retry.
        """
        while not self.stop():
            with_retries(self.lock.acquire, self.settings.retry_window, self.storage)
            try:
                trial = self._ask_under_lock(wait=wait)
            except BaseException:
                self.lock.release()
                raise
            if not isinstance(trial, optuna.Trial):  # None: the study is done; LATER: spent for now
                self.lock.release()
                if trial is None or not wait:
                    return trial
                if not self.settings.wait_for_running:
                    return None
                # Another worker's trial may still go stale and need a retry: wait for it.
                time.sleep(min(5.0, self.settings.heartbeat_interval))
                continue
            heartbeat = self.beat_for(trial)
            try:
                try:
                    arch = self.objective.claim(trial)
                finally:
                    self.lock.release()  # the hash and the verdict are recorded: others may ask
                # Outside the lock: counting FLOPs takes ~0.1 s a trial (seconds for a process's first),
                # and every other worker's claim, and a pooled server connection, would wait for it.
                architecture = self.objective.cost(trial, arch)
            except BaseException as error:
                try:
                    settle(self.study, trial, error, self.stop)
                finally:
                    if heartbeat is not None:
                        heartbeat.stop()
                self.decided += 1
                continue
            return Claim(trial, architecture, heartbeat)
        return None

    def _ask_under_lock(self, *, wait: bool) -> optuna.Trial | str | None:
        study, storage, settings = self.study, self.storage, self.settings
        if self.beats:  # none for a grace period after an outage (see _RDBStorage.recovering)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        fail_orphans(study, older_than=settings.grace_period, recovering=getattr(storage, "recovering", None))
        state = budget_state(study)
        budget = self.objective.config.study.n_trials
        if state.spent(budget, settings.max_free_streak):
            if state.running == 0:
                log_spent(study.study_name, state, budget, settings.max_free_streak)
                return None
            logger.debug("nothing claimed: the budget is spent while %d trials run", state.running)
            return LATER
        if not wait and state.left(budget) <= state.workers:
            # Near the end, a trial claimed ahead would wait for this worker's current trial while
            # another worker may go idle: leave the last ones to whoever is free first.
            logger.debug("nothing claimed ahead: %d trials left for %d busy workers", state.left(budget),
                         state.workers)
            return LATER
        trial = study.ask()
        if self.beats:  # first beat before the marker: a marked trial is always seen by staleness
            storage.record_heartbeat_now(trial._trial_id)
        storage.set_trial_system_attr(trial._trial_id, records.WORKER, settings.marker)
        return trial

    def beat_for(self, trial: optuna.Trial) -> Heartbeat | None:
        """A heartbeat thread for ``trial`` where the storage has heartbeats."""
        if not self.beats:
            return None
        return Heartbeat(self.storage, trial._trial_id, self.settings.heartbeat_interval)

    def note_outage(self, age: float | None) -> None:
        """An outage the worker met ``age`` seconds ago counts here too (see :class:`ClaimProcess`)."""
        if age is not None:
            seen = getattr(self.storage, "last_outage", -math.inf)
            self.storage.last_outage = max(seen, time.monotonic() - age)

    def give_back(self, claim: Claim) -> None:
        """Fail a claimed trial this worker will not train (a stop came first) and queue it again."""
        try:
            interrupted(self.study, claim.trial, self.stop.why(), trained=False)
        finally:
            claim.stop_beating()


def claim_source(settings: WorkerSettings) -> TrialSource:
    """A claim process's source: its own storage, study (its sampler seeded by the worker's number)
    and lock; it stops claiming once its worker has ended."""
    storage = settings.open_storage()
    study, config = load_study(settings.study_name, storage, worker_number=settings.worker_number)
    objective = TrialObjective(config, settings.shape, "cpu")
    return TrialSource(settings, study, storage, settings.lock(), objective, WorkerEnded(settings.pid))


def still_ours(storage: Any, trial_id: int, marker: dict[str, Any]) -> bool:
    """Whether the trial is still RUNNING and marked as this worker's: one claimed ahead may have been
    failed as stale meanwhile (its claim process stopped or starved past the grace period)."""
    trial = storage.get_trial(trial_id)
    return trial.state == TrialState.RUNNING and trial.system_attrs.get(records.WORKER) == marker


def fail_left_behind(study: optuna.Study, marker: dict[str, Any], reason: str) -> int:
    """Fail and queue again the RUNNING trials marked ``marker``; returns how many. Call it when the
    worker holds no trial: they were claimed by a claim process that died before handing them over."""
    left = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.system_attrs.get(records.WORKER) == marker]
    return sum(records.fail_and_requeue(study, trial, reason) for trial in left)


class InlineClaims:
    """Claims made in this process when asked for, after the current trial (``--no-claim-ahead``)."""

    def __init__(self, source: TrialSource) -> None:
        self.source, self._wait = source, True

    @property
    def decided(self) -> int:
        return self.source.decided

    def request(self, *, wait: bool) -> None:
        self._wait = wait

    def result(self) -> Claim | str | None:
        return self.source.claim(wait=self._wait)

    def close(self) -> None:
        pass


def fail_orphans(
    study: optuna.Study, *, older_than: float, recovering: Callable[[], bool] | None = None
) -> int:
    """Fail RUNNING trials no worker claimed; call it holding the study lock. Returns how many.

    A worker marks its trial right after ``ask``, under the study lock. A RUNNING trial without the
    mark was created by an ``ask`` whose reply was lost (database outage) or whose worker died
    before marking it: no one will ever run or beat it. It is failed, free, and queued again (with
    the parameters of a queued trial it had popped). None while ``recovering()`` (the storage's,
    after an outage): a worker whose lock the outage dropped may still be marking its trial.
    """
    from nas3d import records

    storage = study._storage
    cutoff = time.time() - older_than
    failed = 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if recovering is not None and recovering():  # after the read: an outage may have happened during it
        return 0
    for trial in running:
        if records.WORKER in trial.system_attrs:
            continue
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if started > cutoff:  # a lock lost to a server restart could let its worker still be marking it
            continue
        try:
            records.mark_not_trained(storage, trial._trial_id, "lost")
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        reason = "orphaned: created by an ask whose worker never claimed it"
        if records.fail_and_requeue(study, trial, reason):
            failed += 1
            logger.warning("trial %d was orphaned by a lost ask; failed and queued again", trial.number)
    return failed


def with_retries(call: Any, window: float, storage: Any) -> None:
    """``call()`` (the study lock) retried through ``StorageUnavailable`` for ``window`` seconds.

    On an RDB storage through its own retry loop, so that an outage ridden out here is recorded as the
    storage's ``last_outage``: a claim process waiting for the lock through an outage makes no storage
    call that would notice it, and must not then fail live trials whose workers have not beaten since
    (see ``_RDBStorage.recovering``). The storage's window is ``window`` (both come from the worker).
    """
    ride_out = getattr(storage, "ride_out", None)
    if ride_out is not None:
        return ride_out("study lock", call)
    return retry_transient(call, window=window, what="study lock",
                           transient=lambda e: isinstance(e, StorageUnavailable))
