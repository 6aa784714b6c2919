"""The study's TPE sampler: Optuna's group-decomposed multivariate TPE, with its per-trial work shared.

nas3d's define-by-run cell splits the search space into many parameter groups (about 18 for the
default space: the cap-in-name input choices and the optional output edges each form their own).
Optuna's ``TPESampler(group=True)`` fits one pair of Parzen estimators per group, which is the point
of it, but it also repeats two things that do not depend on the group:

* the below/above split of every finished trial (non-dominated sorting plus a constraint check per
  trial), once per group, so about 18 times per trial;
* the group decomposition itself, which re-reads every finished trial's distributions at each trial.

:class:`SharedSplitTPESampler` splits once per trial and decomposes incrementally. Both are exact:
for the same seed and the same trials it proposes the same parameters as ``TPESampler`` (tested in
``tests/test_samplers.py``). It relies on private parts of Optuna's TPE that Optuna 5.0.0 has; for any
other Optuna version it behaves exactly as ``TPESampler`` does. Measured effect:
``bench/storage_overhead.py`` (docs/performance.md, "Storage and sampler overhead").
"""

from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

try:  # private: present in the Optuna releases listed in _TESTED_OPTUNA
    from optuna.samplers._tpe import sampler as _tpe
    from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace
except ImportError:  # pragma: no cover - another Optuna layout: fall back to plain TPESampler
    _tpe = None
    _GroupDecomposedSearchSpace = None

#: Optuna releases (exact versions: a patch release may change private code too) whose TPE internals
#: the shortcuts were checked against; pyproject.toml pins optuna to them.
_TESTED_OPTUNA = ("5.0.0",)


def shortcuts_available() -> bool:
    """Whether this Optuna is one the shortcuts were checked against (else: plain TPESampler)."""
    return _tpe is not None and optuna.__version__ in _TESTED_OPTUNA


class _IncrementalGroupDecomposition(_GroupDecomposedSearchSpace or object):  # type: ignore[misc]
    """Adds each finished trial's distributions once, instead of every trial's at every trial.

    Adding a trial's distributions a second time leaves the groups (and their order) unchanged, so
    skipping trials already added gives the same groups as Optuna's full pass.
    """

    def __init__(self) -> None:
        super().__init__(include_pruned=True)
        self._added: set[int] = set()

    def calculate(self, study: Study, use_cache: bool = False) -> Any:
        if self._study_id is None:
            self._study_id = study._study_id
        elif self._study_id != study._study_id:
            raise ValueError("a nas3d sampler serves one study; make a new sampler for another")
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=use_cache):
            if trial._trial_id not in self._added:
                self._search_space.add_distributions(trial.distributions)
                self._added.add(trial._trial_id)
        return copy.deepcopy(self._search_space)


class SharedSplitTPESampler(TPESampler):
    """``TPESampler`` that splits the trials into below/above once per trial, not once per group.

    Takes ``TPESampler``'s arguments. The shortcuts apply to ``group=True`` (multivariate) sampling;
    independent sampling is Optuna's own.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shortcuts = shortcuts_available() and self._group
        self._split: tuple[list[FrozenTrial], list[FrozenTrial]] | None = None
        self._sampling_relative = False
        if self._shortcuts:
            self._group_decomposed_search_space = _IncrementalGroupDecomposition()

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._shortcuts:
            return super().sample_relative(study, trial, search_space)
        # One split for all of this trial's groups, made at the first group that needs it.
        self._split, self._sampling_relative = None, True
        try:
            return super().sample_relative(study, trial, search_space)
        finally:
            self._split, self._sampling_relative = None, False

    def _sample(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._sampling_relative:
            return super()._sample(study, trial, search_space)
        if self._split is None:
            self._split = self._split_trials(study, trial)
        below, above = self._split
        # From here on as TPESampler._sample does it, on the shared split.
        mpe_below = self._build_parzen_estimator(study, search_space, below, handle_below=True)
        mpe_above = self._build_parzen_estimator(study, search_space, above, handle_below=False)
        samples = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, mpe_below, mpe_above))
        return {name: dist.to_external_repr(best[name]) for name, dist in search_space.items()}

    def _split_trials(self, study: Study, trial: FrozenTrial) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """The below/above split TPESampler._sample makes, with the same trials and gamma."""
        states = [TrialState.COMPLETE, TrialState.PRUNED]
        if self._constant_liar:
            states.append(TrialState.RUNNING)
        trials = study._get_trials(deepcopy=False, states=states, use_cache=not self._constant_liar)
        if self._constant_liar:
            trials = [t for t in trials if t.number != trial.number]
        if self._gamma is None:
            multi = len(study.directions) > 1
            self._gamma = _tpe.default_gamma_multiobjective if multi else _tpe.default_gamma
        finished = sum(t.state != TrialState.RUNNING for t in trials)
        return _tpe._split_trials(study, trials, self._gamma(finished))
