"""Racing across folds (``[racing] kind = "fold-race"``): stop a cross-validated trial between folds
once even an optimistic bound on its mean val AUC is dominated by the study's front.

After fold ``n`` of ``k`` (``n < k``, and ``n >= min_folds``) the trial's **optimistic bound** is
``mean + 2 * sd / sqrt(n)`` over its ``n`` fold scores, where ``sd`` is their sample standard
deviation floored at ``prior_sd``. The floor is the prior spread: with one fold there is no observed
spread at all, and two or three close folds would give a near-zero one, a bound no higher than the
mean. Its default, 0.05, is the spread of one architecture's AUC across training seeds measured on
AdrenalMNIST3D (three seeds: 0.880, 0.847, 0.784; docs/noise.md).

The trial is **dominated** when a fully trained, completed trial of the study (``nas3d.pareto.
fully_trained``) has no more FLOPs and a mean val AUC above the bound: then even its optimistic score
would not reach the front, and its remaining folds are not trained. It is recorded PRUNED with
``early_stopped`` (so it is off the front and out of the hypervolume, counted in the budget, and its
architecture is not trained again), its reason, its folds so far (``fold_val_auc``) and the race's
decisions (``fold_race``).

**Across workers and hosts** the front is read from the study storage at each decision, as the
MO-ASHA stopper (:mod:`nas3d.early_stopping`) reads its rungs: a trial completed by any worker counts
from the moment it is told.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nas3d import records
from nas3d.pareto import fully_trained
from nas3d.util import check_choice

__all__ = ["KINDS", "RaceDecision", "RacingConfig", "FoldRace", "dominating", "optimistic_bound"]

KINDS = ("none", "fold-race")
#: Standard errors above the mean that the optimistic bound sits.
BOUND_SE = 2.0


@dataclass(frozen=True)
class RacingConfig:
    """The ``[racing]`` table: ``kind = "fold-race"`` races a cross-validated study's trials across
    their folds (``data.cv_folds`` >= 2); ``"none"`` trains every fold."""

    kind: str = "none"
    prior_sd: float = 0.05  # the floor of a fold score's standard deviation (see the module docstring)
    min_folds: int = 1  # the first fold after which a trial may be stopped

    def __post_init__(self) -> None:
        check_choice("racing.kind", self.kind, KINDS)
        if not (math.isfinite(self.prior_sd) and self.prior_sd >= 0):
            raise ValueError(f"racing.prior_sd must be a finite number >= 0, but got {self.prior_sd!r}")
        if self.min_folds < 1:
            raise ValueError(f"racing.min_folds must be >= 1, but got {self.min_folds!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


def optimistic_bound(fold_aucs: Sequence[float], prior_sd: float) -> float:
    """``mean + 2 * max(sd, prior_sd) / sqrt(n)`` of the ``n`` fold scores so far."""
    values = np.asarray(fold_aucs, dtype=float)
    observed = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()) + BOUND_SE * max(observed, prior_sd) / math.sqrt(len(values))


def dominating(bound: float, flops: float, trials: Iterable[Any]) -> Any | None:
    """The fully trained, completed trial of ``trials`` with no more FLOPs than ``flops`` and a val AUC
    above ``bound`` (the best such by val AUC, then fewer FLOPs, then the lower number), or None."""
    better = [t for t in fully_trained(trials) if t.values[1] <= flops and t.values[0] > bound]
    return min(better, key=lambda t: (-t.values[0], t.values[1], t.number), default=None)


@dataclass(frozen=True)
class RaceDecision:
    """The race's decision after one fold, as recorded on the trial (``fold_race``)."""

    folds: int  # folds trained so far
    mean: float
    bound: float
    dominated_by: int | None  # the number of the trial that dominates the bound; None: go on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FoldRace:
    """The race for one live trial (an ``optuna.Trial``) of ``k`` folds at ``flops``."""

    def __init__(self, trial: Any, config: RacingConfig, k: int, flops: float) -> None:
        self.trial = trial
        self.config = config
        self.k = k
        self.flops = float(flops)
        self.decisions: list[RaceDecision] = []
        if records.FOLD_RACE in trial.user_attrs:  # a retry arrives with its failed attempt's decisions
            trial.set_user_attr(records.FOLD_RACE, [])

    def after_fold(self, fold_aucs: Sequence[float]) -> None:
        """Decide after the latest fold; raises ``optuna.TrialPruned`` (recorded) when it is dominated.
        Nothing is decided after the last fold or before ``min_folds``."""
        import optuna
        from optuna.trial import TrialState

        n = len(fold_aucs)
        if n >= self.k or n < self.config.min_folds:
            return
        bound = optimistic_bound(fold_aucs, self.config.prior_sd)
        completed = self.trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        winner = dominating(bound, self.flops, completed)
        mean = float(np.mean(fold_aucs))
        decision = RaceDecision(n, mean, bound, None if winner is None else winner.number)
        self.decisions.append(decision)
        self.trial.set_user_attr(records.FOLD_RACE, [d.to_json() for d in self.decisions])
        if winner is None:
            return
        self.trial.set_user_attr(records.EARLY_STOPPED, True)
        self.trial.set_user_attr(records.EARLY_STOPPED_VALUES, [mean, self.flops])
        reason = (f"stopped by the fold race after fold {n} of {self.k}: even its optimistic val AUC "
                  f"{bound:.4f} (mean {mean:.4f} + 2 SE) is below trial {winner.number}'s "
                  f"{winner.values[0]:.4f} at no more FLOPs ({winner.values[1] / 1e6:.3g} <= "
                  f"{self.flops / 1e6:.3g} MFLOPs)")
        records.fail_with_reason(self.trial, reason)
        raise optuna.TrialPruned(reason)
