"""What nas3d records on a study and its trials: every attribute name it writes, in one place, and the
helpers for the records written in more than one module (a failure reason, a trial not trained, a retry).

Optuna stores the attributes; nas3d writes user attrs (shown by ``nas3d status --trial`` and the
dashboard) and a few system attrs (bookkeeping). No other module spells an attribute name out.
This module imports Optuna only when a helper runs: ``pareto`` and the core layers import it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "ARCH", "ARCH_HASH", "ARCH_JSON", "ARTIFACTS", "BEST_EPOCH", "CHECKPOINT_ARTIFACT",
    "CHECKPOINT_MISSING", "CONFIG",
    "CONSTRAINTS", "CURVE", "DECISIONS", "DEVICE", "DUPLICATE_OF", "DUPLICATE_VALUES",
    "EARLY_STOPPED", "EARLY_STOPPED_VALUES", "EPOCHS", "FAILED_TRIAL", "FAILURE_REASON",
    "FIXED_PARAMS", "FLOPS", "NOT_TRAINED", "ODE_HASH", "ODE_KIND", "ODE_PARAMS", "ODE_PREFIX",
    "ODE_REDRAWS", "ODE_SLOT", "ODE_STAGE", "ODE_VECTOR", "PARAMS", "PICTURE_ARTIFACT", "PROXIES",
    "PROXY_SECONDS", "RESULT_ATTRS", "RETRY_HISTORY", "THOP_MACS", "TRAIN_SECONDS", "VAL_ACC",
    "WARM_START", "WORKER", "WORKERS", "fail_and_requeue", "fail_with_reason", "failure_reason",
    "mark_not_trained", "retry_of",
    "BEST_FOLD", "CV_FOLDS", "FOLD_RACE", "FOLD_VAL_ACC", "FOLD_VAL_AUC", "VAL_AUC_CI", "VAL_AUC_SE",
    "JOB", "JOB_RESULT", "JOBS_QUEUED", "PLAN", "PLAN_OF", "RESUMED_FROM", "TEST_ACC", "TEST_AUC",
]

_logger = logging.getLogger(__name__)

# --- study user attrs ------------------------------------------------------------------------------

#: The study's configuration as created (``StudyConfig.to_dict()``); its presence marks a nas3d study.
CONFIG = "nas3d_config"
#: Where the study's checkpoints and pictures are stored (a folder or ``s3://bucket/prefix``).
ARTIFACTS = "nas3d_artifacts"
#: A cross-validated study's folds (``data.cv_folds`` > 1) as the first worker to train built them: a
#: hash of the pool's labels and each fold's val indices, which every later worker's folds must match.
CV_FOLDS = "nas3d_cv_folds"

# --- a reproduce plan (nas3d.plan): its plan study, its retrain studies and their jobs ------------

#: On the plan study: the plan as created (datasets, size, seeds, retrain epochs, selection rule,
#: baselines, synthetic stand-ins), read by every plan worker on any host.
PLAN = "nas3d_plan"
#: On a plan's search and retrain studies: ``{"plan": NAME, "dataset": FLAG}``.
PLAN_OF = "nas3d_plan_of"
#: On a retrain study, once its search finished: the searched models chosen and queued, by the
#: plan's rule (``{"models": [...], "note": ...}``); its presence means "queued, do not queue again".
JOBS_QUEUED = "nas3d_jobs_queued"
#: On a retrain job (a trial of a retrain study): ``{"model", "kind", "role", "trial", "seed"}``.
JOB = "nas3d_job"
#: On a finished job: the seed's result (nas3d.retrain.SeedResult's fields, the per-sample scores left out).
JOB_RESULT = "job_result"
TEST_AUC = "test_auc"  # on a completed job: its test AUC (also its first value) and ACC
TEST_ACC = "test_acc"
#: On a job: the epoch its training resumed after (0: it started from the beginning).
RESUMED_FROM = "resumed_from_epoch"

# --- study system attrs ----------------------------------------------------------------------------

#: How many worker numbers were handed out (the next worker gets this number).
WORKERS = "nas3d:workers"

# --- trial user attrs: the architecture --------------------------------------------------------------

ARCH = "arch"  # the architecture in short form (``Architecture.short_str()``)
ARCH_JSON = "arch_json"  # the architecture as JSON: what export and retrain rebuild it from
ARCH_HASH = "arch_hash"  # the canonical hash: equal architectures, equal hashes (deduplication)
PARAMS = "params"  # trainable parameters
THOP_MACS = "thop_macs"  # multiply-accumulates as thop counts them
FLOPS = "flops"  # FLOPs, recorded before training: the early stopper ranks by it
WARM_START = "warm_start"  # on a trial queued from a published architecture: ``seed:<dataset>``

# --- trial user attrs: the training and its result ---------------------------------------------------

DEVICE = "device"  # the device it trained on
VAL_ACC = "val_acc"  # validation accuracy of the best epoch (the AUC is the first objective)
TRAIN_SECONDS = "train_seconds"
EPOCHS = "epochs"  # epochs run
BEST_EPOCH = "best_epoch"  # the epoch whose weights were kept
CURVE = "learning_curve"  # ``{"epoch": [...], "val_auc": [...], ...}``: lists by key, one entry an epoch
DECISIONS = "early_stopping"  # the early stopper's decisions at each rung, as JSON
EARLY_STOPPED = "early_stopped"  # True: the early stopper or the fold race ended it (PRUNED, off the front)
EARLY_STOPPED_VALUES = "early_stopped_values"  # ``[val_auc, flops]`` where the early stopper ended it
PROXIES = "proxies"  # zero-cost proxy scores by name (None where not finite)
PROXY_SECONDS = "proxy_seconds"  # time spent computing them
CHECKPOINT_ARTIFACT = "checkpoint_artifact"  # artifact id of the trained weights
PICTURE_ARTIFACT = "picture_artifact"  # artifact id of the cell drawn as SVG
#: The 95 % BCa bootstrap interval ``[low, high]`` of the val AUC over the val samples, of the kept
#: epoch (``data.cv_folds = 1``; a cross-validated trial's interval comes from its folds).
VAL_AUC_CI = "val_auc_ci"
FOLD_VAL_AUC = "fold_val_auc"  # cross-validated: each fold's val AUC, in fold order (so far, if stopped)
FOLD_VAL_ACC = "fold_val_acc"  # the same for val ACC
VAL_AUC_SE = "val_auc_se"  # the standard error of the mean of fold_val_auc (None with one fold)
BEST_FOLD = "best_fold"  # the fold (0-based) whose model the checkpoint holds: the best val AUC
#: The fold race's decision after each fold (nas3d.racing): its bound and the trial that dominated it.
FOLD_RACE = "fold_race"
#: On a COMPLETE trial whose checkpoint the artifact store refused: why, one line (the store, the path
#: and the OS error). Its scores stand; its weights are only had by retraining its recorded
#: architecture (``nas3d retrain --study-name S --trial N``).
CHECKPOINT_MISSING = "checkpoint_missing"

#: What a duplicate copies from the trial that trained its architecture.
RESULT_ATTRS = (VAL_ACC, PARAMS, THOP_MACS, TRAIN_SECONDS, EPOCHS, BEST_EPOCH, DEVICE, VAL_AUC_CI,
                FOLD_VAL_AUC, FOLD_VAL_ACC, VAL_AUC_SE, BEST_FOLD)

# --- trial user attrs: a trial that ended without a result -------------------------------------------

#: Why the trial failed or was pruned, one line. Only unfinished business carries one: a retry does
#: not inherit it, and a completed trial never has one.
FAILURE_REASON = "failure_reason"
#: Why it was decided without training (it is free in the budget): ``duplicate``,
#: ``over_constraints``, ``error`` (failed before training) or ``lost`` (an orphan of a lost ask).
NOT_TRAINED = "not_trained"
DUPLICATE_OF = "duplicate_of"  # the number of the trial that trained the same architecture
DUPLICATE_VALUES = "duplicate_values"  # that trial's values, for samplers that learn from duplicates

# --- trial system attrs ----------------------------------------------------------------------------

#: The worker that runs the trial: ``{"worker": N, "host": ..., "pid": ...}``, set right after ``ask``.
WORKER = "nas3d:worker"
# Optuna's own, read by nas3d: the parameters of a queued trial (``enqueue_trial``), and a retry's
# original and predecessors (written by Optuna's ``RetryHeartbeatStaleTrialCallback``, which
# :func:`fail_and_requeue` calls).
FIXED_PARAMS = "fixed_params"
FAILED_TRIAL = "failed_trial"
RETRY_HISTORY = "retry_history"
#: Optuna's list of constraint values (feasible iff all <= 0), which samplers and the dashboard read.
CONSTRAINTS = "constraints"

#: The ODE sampler's system attrs (:mod:`nas3d.samplers.ode`): its proposal for a trial (the
#: population stage and slot, the kind of move, the vector, its parameters and architecture hash, how
#: often it was redrawn). Prefixed, as Optuna's GA samplers prefix theirs ("NSGAIISampler:").
ODE_PREFIX = "ode:"
ODE_STAGE, ODE_SLOT, ODE_KIND, ODE_VECTOR, ODE_PARAMS, ODE_HASH, ODE_REDRAWS = (
    ODE_PREFIX + k for k in ("stage", "slot", "kind", "vector", "params", "arch_hash", "redraws")
)


def failure_reason(trial: FrozenTrial, default: str | None = None) -> str | None:
    """The trial's recorded failure reason, or ``default``."""
    return trial.user_attrs.get(FAILURE_REASON, default)


def fail_with_reason(trial: optuna.Trial, reason: str, *, not_trained: str | None = None) -> None:
    """Record why ``trial`` (still running) is failed or pruned, and, with ``not_trained``, that it
    is free (see :data:`NOT_TRAINED`). The caller then tells it."""
    if not_trained is not None:
        trial.set_user_attr(NOT_TRAINED, not_trained)
    trial.set_user_attr(FAILURE_REASON, reason)


def mark_not_trained(storage: Any, trial_id: int, kind: str) -> None:
    """Through the storage, for a trial this process does not run: it was decided without training."""
    storage.set_trial_user_attr(trial_id, NOT_TRAINED, kind)


def retry_of(trial: FrozenTrial) -> list[int]:
    """The numbers of the attempts before ``trial``, oldest first; empty unless it is a retry."""
    return list(trial.system_attrs.get(RETRY_HISTORY, ()))


def fail_and_requeue(
    study: optuna.Study,
    trial: optuna.Trial | FrozenTrial,
    reason: str,
    *,
    max_retry: int | None = None,
) -> bool:
    """Fail a RUNNING trial with ``reason`` and queue it again: the one recovery path of nas3d.

    The retry is made by Optuna's own ``RetryHeartbeatStaleTrialCallback`` (so its
    ``retried_trial_number`` and ``retry_history`` work on it) from the failed trial without its
    failure record: the trial keeps its reason, the retry starts with none, and no worker's mark.
    ``trial`` is this process's live trial (then told, so that its sampler hears of the end) or any
    frozen RUNNING trial (failed through the storage). ``max_retry`` bounds the attempts after the
    first (None: no bound). False, and nothing queued, if another process finished the trial first
    (it queued the retry) or the bound was reached.
    """
    import copy
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    try:  # before it is failed: a finished trial's attrs are read-only
        storage.set_trial_user_attr(trial._trial_id, FAILURE_REASON, reason)
        if isinstance(trial, optuna.Trial):
            study.tell(trial, state=TrialState.FAIL)
        else:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except (UpdateFinishedTrialError, ValueError):
        # Another process finished it meanwhile (ValueError: tell found it finished already).
        if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            raise
        return False
    failed = copy.deepcopy(storage.get_trial(trial._trial_id))
    for key in (FAILURE_REASON, NOT_TRAINED):
        failed.user_attrs.pop(key, None)
    failed.system_attrs.pop(WORKER, None)
    before = len(retry_of(failed))
    with warnings.catch_warnings():  # experimental since Optuna 2.8, relied on knowingly
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, failed)
    if max_retry is not None and before >= max_retry:
        _logger.warning("trial %d failed (%s); not queued again after %d retries", failed.number, reason,
                        before)
        return False
    _logger.info("trial %d failed (%s) and was queued again", failed.number, reason)
    return True
