"""How a worker's trial ends: told with its values or its state, failed with its reason, or interrupted
by a stop and queued again. Shared by the loop that trains (:mod:`nas3d.worker`) and the claims that
decide a trial without training it (:mod:`nas3d.claims`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from nas3d.records import fail_and_requeue
from nas3d.storages import StorageUnavailable
from nas3d.train import TrainingStopped

if TYPE_CHECKING:
    from nas3d.heartbeat import StopFlag

__all__ = ["interrupted", "settle", "tell"]

logger = logging.getLogger(__name__)

def settle(study: optuna.Study, trial: optuna.Trial, error: BaseException, stop: StopFlag) -> None:
    """Tell ``trial`` the outcome ``error`` stands for; re-raise what is not the trial's."""
    if isinstance(error, optuna.TrialPruned):
        tell(study, trial, state=TrialState.PRUNED)
    elif isinstance(error, TrainingStopped):
        interrupted(study, trial, stop.why(), trained=True)
    elif isinstance(error, StorageUnavailable) or not isinstance(error, Exception):
        raise error  # a lost database: the trial stays RUNNING, its heartbeat stops, another worker retries
    else:
        logger.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
        tell(study, trial, state=TrialState.FAIL)


def tell(study: optuna.Study, trial: optuna.Trial, **outcome: Any) -> None:
    # skip_if_finished: another worker may have failed it as stale meanwhile (then its retry counts)
    study.tell(trial, skip_if_finished=True, **outcome)


def interrupted(study: optuna.Study, trial: optuna.Trial, why: str, *, trained: bool) -> None:
    """Fail a trial a stop interrupted (during or before its training) and queue it again, unless it
    is finished already: ``launch`` fails and queues again the trials of a worker it killed."""
    when = "" if trained else " before its training began"
    fail_and_requeue(study, trial, f"interrupted{when}: {why}; re-queued")
