"""The study's budget: which trials count against ``n_trials``, which are free, and when a study is done.

The budget counts results that exist: trained architectures (complete, or stopped early at a rung)
and those training or queued. A trial decided without training (duplicate, over the constraints,
failed before training, orphaned) is free, as is a failed trial: one queued again (its retry
counts), and one whose training failed (no result; the free streak below bounds a study where every
training fails). A trained trial whose checkpoint the artifact store refused is complete
(``checkpoint_missing``) and counts: its scores exist. A study whose budget is used can be given a
larger one (``create-study --n-trials N``, :func:`nas3d.study.create_study`).

A study stops once ``max_free_streak`` trials in a row were free, so a sampler
that can only find known or over-cap architectures cannot run forever. A trial the early stopper
ended counts: its architecture was trained (to a rung and ranked there), only not to the end.

Workers count the budget under the study lock before each ``ask`` (:mod:`nas3d.claims`); ``nas3d
launch`` queues again the trials of workers it killed, as a worker does its interrupted trial, with
:func:`nas3d.records.fail_and_requeue`; ``nas3d status`` shows what :func:`budget_state` counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from nas3d import records

__all__ = [
    "DEFAULT_MAX_FREE_STREAK",
    "BudgetState",
    "budget_state",
    "log_spent",
]

logger = logging.getLogger(__name__)

#: How many trials in a row may be free (duplicates, over the constraints, ...) before a study stops.
DEFAULT_MAX_FREE_STREAK = 100


@dataclass(frozen=True)
class BudgetState:
    used: int  # trials that count against the budget: trained or training, and queued ones
    free: int  # trials without a result: decided without training (duplicates, ...) or failed
    free_streak: int  # free trials after the last counted trial that has started
    duplicates: int
    waiting: int
    running: int
    stopped: int = 0  # trials the early stopper ended (counted in ``used``)
    workers: int = 0  # distinct workers with a RUNNING trial

    def left(self, budget: int) -> int:
        """Trials that may still start: the unused budget and the queued trials."""
        return max(0, budget - self.used) + self.waiting

    def spent(self, budget: int, max_free_streak: int = DEFAULT_MAX_FREE_STREAK) -> bool:
        """No trial may start: the budget is used (queued trials count already and still run), or
        the last ``max_free_streak`` trials were all free."""
        return self.free_streak >= max_free_streak or (self.waiting == 0 and self.used >= budget)


def _is_free(trial: optuna.trial.FrozenTrial) -> bool:
    # DUPLICATE_OF alone: a study from before NOT_TRAINED existed. FAIL: no result to count.
    return (trial.state == TrialState.FAIL or records.NOT_TRAINED in trial.user_attrs
            or records.DUPLICATE_OF in trial.user_attrs)


def budget_state(study: optuna.Study) -> BudgetState:
    """Count the study's trials the way the budget does (see this module's docstring)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in records.retry_of(t)}
    counted = [t for t in trials if t.number not in retried and not _is_free(t)]
    # A failed trial that was queued again is neither: its retry stands for it.
    free = [t for t in trials if _is_free(t) and not (t.state == TrialState.FAIL and t.number in retried)]
    last = max((t.number for t in counted if t.state != TrialState.WAITING), default=-1)
    return BudgetState(
        used=len(counted),
        free=len(free),
        free_streak=sum(t.number > last for t in free),
        duplicates=sum(records.DUPLICATE_OF in t.user_attrs for t in trials),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        stopped=sum(bool(t.user_attrs.get(records.EARLY_STOPPED)) for t in trials),
        workers=len({(t.system_attrs.get(records.WORKER) or {}).get("worker") for t in trials
                     if t.state == TrialState.RUNNING}),
    )


def log_spent(study_name: str, state: BudgetState, budget: int, max_free_streak: int) -> None:
    if state.free_streak >= max_free_streak:
        logger.warning(
            "study %r stops early: the last %d trials were all duplicates of evaluated architectures, "
            "over the constraints or failed (%d trained of %d); widen the space, relax [constraints], "
            "use another sampler, or see why they failed (nas3d status --trial N)", study_name,
            state.free_streak, state.used, budget,
        )
    else:
        logger.info("study %r has used its budget of %d trained architectures", study_name, budget)
