"""The fold race ([racing] kind = "fold-race"): its bound, its dominance rule, and two workers on
PostgreSQL stopping dominated trials with a reason."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nas3d import records
from nas3d.budget import budget_state
from nas3d.front import pareto_points
from nas3d.racing import FoldRace, RacingConfig, dominating, optimistic_bound
from nas3d.storages import make_storage
from nas3d.study import create_study
from nas3d.testing.storages import scratch_storage
from tests.test_study import smoke_config
from tests.test_worker import finish, start_worker


def completed(number: int, auc: float, flops: float, **attrs: object) -> optuna.trial.FrozenTrial:
    trial = create_trial(values=[auc, flops], user_attrs=attrs)
    trial.number = number
    return trial


def test_the_bound_floors_the_spread_at_the_prior() -> None:
    assert optimistic_bound([0.7], prior_sd=0.05) == pytest.approx(0.8)
    assert optimistic_bound([0.7, 0.7], prior_sd=0.05) == pytest.approx(0.7 + 0.1 / math.sqrt(2))
    spread = optimistic_bound([0.6, 0.8], prior_sd=0.05)  # observed sd 0.141 > prior
    assert spread == pytest.approx(0.7 + 2 * 0.1414213562 / math.sqrt(2))
    assert optimistic_bound([0.6, 0.8], prior_sd=0.0) == spread


def test_only_a_fully_trained_trial_of_no_more_flops_and_a_higher_auc_dominates() -> None:
    trials = [completed(0, 0.90, 10.0), completed(1, 0.95, 50.0), completed(2, 0.99, 5.0, early_stopped=True),
              completed(3, 0.85, 1.0)]
    assert dominating(0.80, 10.0, trials).number == 0  # the best of 0 and 3 by val AUC
    assert dominating(0.80, 60.0, trials).number == 1
    assert dominating(0.86, 5.0, trials) is None  # 3 is below the bound; 2 was stopped early
    assert dominating(0.90, 10.0, trials) is None  # equal is not higher


def test_bad_racing_settings() -> None:
    with pytest.raises(ValueError, match="racing.prior_sd"):
        RacingConfig(kind="fold-race", prior_sd=-0.1)
    with pytest.raises(ValueError, match="racing.min_folds"):
        RacingConfig(kind="fold-race", min_folds=0)


def test_the_race_decides_between_folds_and_prunes_a_dominated_trial_with_its_reason() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(completed(0, 0.95, 100.0))
    trial = study.ask()
    race = FoldRace(trial, RacingConfig(kind="fold-race", min_folds=2), k=3, flops=200.0)
    race.after_fold([0.5])  # before min_folds
    race.after_fold([0.9, 0.95])  # bound 0.925 + 0.071 > 0.95: go on
    race.after_fold([0.5, 0.5, 0.5])  # after the last fold: nothing to save
    assert trial.user_attrs[records.FOLD_RACE] == [
        {"folds": 2, "mean": 0.925, "bound": pytest.approx(0.925 + 0.1 / math.sqrt(2)), "dominated_by": None}]
    with pytest.raises(optuna.TrialPruned, match=r"after fold 2 of 3: .* below trial 0's 0.9500"):
        race.after_fold([0.6, 0.65])
    assert trial.user_attrs[records.EARLY_STOPPED] is True
    assert trial.user_attrs[records.EARLY_STOPPED_VALUES] == [0.625, 200.0]
    assert "fold race" in records.failure_reason(study._storage.get_trial(trial._trial_id))


@pytest.fixture
def postgres_storage(postgres_server: str, tmp_path: Path) -> Iterator[str]:
    with scratch_storage("postgresql", tmp_path, postgres_server, name_prefix="nas3d_test_race_") as url:
        yield url


@pytest.mark.slow  # two worker processes
def test_two_workers_on_postgresql_race_dominated_trials_off_the_front(
    postgres_storage: str, tmp_path: Path
) -> None:
    # A barely trained model (a tiny learning rate, one epoch) against a perfect, cheap trial: every
    # trial's first fold is dominated unless it happens to score 1.0 as well.
    config = smoke_config(tmp_path, **{
        "study.name": "race", "study.n_trials": 5, "data.cv_folds": 3, "racing.kind": "fold-race",
        "racing.prior_sd": 0.0, "train.max_epochs": 1, "train.lr": 1e-7})
    study = create_study(config, make_storage(postgres_storage))
    study.add_trial(create_trial(values=[1.0, 1.0], params={"seeded": 0.0},
                                 distributions={"seeded": FloatDistribution(0.0, 1.0)},
                                 user_attrs={records.FOLD_VAL_AUC: [1.0, 1.0, 1.0], records.VAL_AUC_SE: 0.0}))
    workers = [start_worker(postgres_storage, "race", i) for i in range(2)]
    outputs = [finish(w) for w in workers]
    trials = study.get_trials()
    trained = [t for t in trials if records.NOT_TRAINED not in t.user_attrs and t.number > 0]
    raced = [t for t in trained if records.FOLD_RACE in t.user_attrs and t.state == TrialState.PRUNED]
    assert raced, outputs
    for t in trained:
        folds = t.user_attrs[records.FOLD_VAL_AUC]
        if t in raced:
            assert records.failure_reason(t).startswith("stopped by the fold race after fold 1 of 3")
            assert "below trial 0's 1.0000" in records.failure_reason(t)
            assert len(folds) == 1 and t.user_attrs[records.EARLY_STOPPED] is True
        else:  # only a trial whose first fold was perfect too goes on
            assert t.state == TrialState.COMPLETE and folds[0] == 1.0
    assert budget_state(study).used == 5
    front = [p.number for p in pareto_points(trials)]
    assert not set(front) & {t.number for t in raced}
