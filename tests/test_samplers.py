"""The study's TPE (Optuna's own, with nas3d's options) on nas3d's define-by-run space.

Also run by CI on the newest Optuna 5.x (``.ci/run``): what nas3d relies on of TPE's grouped,
multivariate, constant-liar sampling must hold on every release that pyproject.toml allows.
"""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from nas3d.config import StudySettings
from nas3d.samplers import TPE_OPTIONS, make_sampler
from nas3d.space import SearchSpace, sample_architecture
from nas3d.study import DIRECTIONS, record_constraints

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # group=True


def history(n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """Finished trials of the default space as a study leaves them: COMPLETE with values, PRUNED
    duplicates, and PRUNED constraint violators (positive constraint values)."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed))
    for number in range(n):
        trial = study.ask()
        arch = sample_architecture(trial, SearchSpace())
        violation = float(rng.uniform(-1, 1))
        record_constraints(trial, {"params": violation})
        if violation > 0:
            study.tell(trial, state=TrialState.PRUNED)
        elif number % 7 == 0:
            study.tell(trial, state=TrialState.PRUNED)  # a duplicate: no values
        else:
            flops = arch.initial_filters * len(arch.ops) * 1e8
            study.tell(trial, [float(rng.uniform(0.5, 1.0)), flops])
    return study.get_trials(deepcopy=False)


def propose(sampler: optuna.samplers.BaseSampler, trials: list, k: int) -> list[dict]:
    """Ask ``k`` trials, leaving one RUNNING while the next is sampled (constant liar sees it)."""
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
    study.add_trials(trials)
    proposals, running = [], None
    for i in range(k):
        trial = study.ask()
        sample_architecture(trial, SearchSpace())
        proposals.append(dict(trial.params))
        if running is not None:
            study.tell(running, [0.6 + i / 100, 1e9])
        running = trial
    return proposals


def study_tpe(seed: int) -> optuna.samplers.BaseSampler:
    return make_sampler(StudySettings(name="x", sampler="tpe", sampler_seed=seed))


@pytest.fixture(scope="module")
def trials() -> list[optuna.trial.FrozenTrial]:
    return history(80)


def test_the_study_tpe_is_optunas_with_nas3d_options_and_seed(trials: list) -> None:
    sampler = study_tpe(5)
    assert type(sampler) is optuna.samplers.TPESampler
    stock = optuna.samplers.TPESampler(**TPE_OPTIONS, seed=5)
    assert propose(sampler, trials, 4) == propose(stock, trials, 4)


def test_proposals_are_reproducible_architectures_of_the_space(trials: list) -> None:
    proposals = propose(study_tpe(5), trials, 6)
    assert propose(study_tpe(5), trials, 6) == proposals  # same seed and trials: same proposals
    assert len({tuple(sorted(p.items())) for p in proposals}) > 1  # really sampled, not a constant
    space = SearchSpace()
    for params in proposals:  # each proposal is a whole architecture that FixedTrial rebuilds
        assert space.contains(sample_architecture(FixedTrial(params), space))
