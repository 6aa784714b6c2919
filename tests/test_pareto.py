"""The one hypervolume (docs/metrics.md#hypervolume): hand-computed values, the box, which trials count."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from nas3d import records
from nas3d.costs import measure_costs
from nas3d.data import DataConfig
from nas3d.pareto import (
    HypervolumeBox,
    hypervolume,
    hypervolume_box,
    largest_seed_architecture,
    smallest_seed_architecture,
    study_hypervolume,
)
from nas3d.seeds import seed_architectures
from nas3d.space import SearchSpace, sample_architecture

BOX = HypervolumeBox(min_flops=10**6, max_flops=10**8)  # two decades of FLOPs


def test_one_point_is_the_rectangle_to_the_reference() -> None:
    # AUC 0.75 is half way from chance to 1; 1e7 FLOPs half way (in log10) from 1e6 to 1e8.
    assert hypervolume([(0.75, 1e7)], BOX) == pytest.approx(0.25)
    assert hypervolume([(1.0, 1e6)], BOX) == pytest.approx(1.0)


def test_two_points_count_their_union_once() -> None:
    # normalised (0.5, 0.5) and (0.2, 0.75): 0.5*0.5 + 0.8*0.25 - overlap 0.5*0.25
    value = hypervolume([(0.75, 1e7), (0.9, 10**7.5)], BOX)
    assert value == pytest.approx(0.5 * 0.5 + 0.8 * 0.25 - 0.5 * 0.25)


def test_dominated_and_outside_points_add_nothing() -> None:
    base = hypervolume([(0.75, 1e7)], BOX)
    assert hypervolume([(0.75, 1e7), (0.7, 2e7)], BOX) == pytest.approx(base)  # dominated
    for outside in [(0.5, 1e6), (0.4, 1e6), (0.99, 1e8), (0.99, 1e9), (math.nan, 1e7), (0.9, math.inf)]:
        assert hypervolume([(0.75, 1e7), outside], BOX) == pytest.approx(base)
    assert hypervolume([], BOX) == 0.0


def test_box_spans_the_seed_space_at_the_input_size() -> None:
    box = hypervolume_box(28, 1, 2)
    seed_flops = [measure_costs(a, 1, 2, 28, with_thop=False).flops for a in seed_architectures().values()]
    assert box.min_flops < min(seed_flops) and max(seed_flops) < box.max_flops
    space = SearchSpace()
    for seed in range(40):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        arch = sample_architecture(study.ask(), space)
        flops = measure_costs(arch, 1, 2, 28, with_thop=False).flops
        assert box.min_flops <= flops <= box.max_flops
    assert largest_seed_architecture().stacks == 2 and len(largest_seed_architecture().ops) == 5
    assert len(smallest_seed_architecture().ops) == 1
    assert hypervolume_box(64, 1, 2).max_flops > box.max_flops  # the box follows the input size


def test_only_fully_trained_completed_trials_count() -> None:
    data = DataConfig(dataset="synthetic", size=12)
    box = hypervolume_box(12, 1, 2)
    good = (0.9, float(box.min_flops * 2))

    def trial(state: TrialState, **attrs: object) -> optuna.trial.FrozenTrial:
        values = list(good) if state == TrialState.COMPLETE else None
        return create_trial(state=state, values=values, user_attrs=attrs)

    counted = study_hypervolume([trial(TrialState.COMPLETE)], data)
    assert counted == pytest.approx(hypervolume([good], box)) and counted > 0
    assert study_hypervolume([trial(TrialState.COMPLETE, **{records.EARLY_STOPPED: True})], data) == 0.0
    assert study_hypervolume([trial(TrialState.PRUNED, duplicate_of=0)], data) == 0.0
    assert study_hypervolume([trial(TrialState.FAIL)], data) == 0.0
