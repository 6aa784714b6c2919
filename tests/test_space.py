from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import FixedTrial

from nas3d.architecture import Architecture, InfeasibleArchitecture
from nas3d.seeds import seed_architectures
from nas3d.space import SearchSpace, params_for, sample_architecture
from tests.test_architecture import random_architecture


def random_study(seed: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


def test_fixed_trial_rebuilds_200_random_trials() -> None:
    study = random_study(0)
    for _ in range(200):
        trial = study.ask()
        arch = sample_architecture(trial)
        assert sample_architecture(FixedTrial(trial.params)) == arch
        study.tell(trial, 0.0)


def test_no_infeasible_sample_in_2000_random_samples() -> None:
    # The space is feasible by construction (nas3d.space), and the README says 0.0 %: not one may fail.
    study = random_study(1)
    infeasible: list[str] = []
    hashes = set()
    for _ in range(2000):
        trial = study.ask()
        try:
            hashes.add(sample_architecture(trial).arch_hash())
        except InfeasibleArchitecture as e:
            infeasible.append(f"trial {trial.number}: {e.reason}; params {trial.params}")
        study.tell(trial, 0.0)
    print(f"infeasible share: {len(infeasible) / 2000:.1%}; distinct architectures: {len(hashes)} of 2000")
    assert infeasible == []
    assert len(hashes) > 1500  # the sampler explores; duplicates stay a minority


def test_every_feasible_architecture_is_reachable() -> None:
    rng = random.Random(5)
    targets = [random_architecture(rng) for _ in range(300)] + list(seed_architectures().values())
    for arch in targets:
        if len(arch.edges) > 9:
            continue
        params = params_for(arch)
        assert sample_architecture(FixedTrial(params)) == arch
        # and under any other topological numbering of the same cell
        assert sample_architecture(FixedTrial(params_for(arch.canonical()))).arch_hash() == arch.arch_hash()


def test_parameter_choices_never_change_between_trials() -> None:
    study = random_study(2)
    seen: dict[str, optuna.distributions.BaseDistribution] = {}
    for _ in range(300):
        trial = study.ask()
        sample_architecture(trial)
        for name, dist in trial.distributions.items():
            assert seen.setdefault(name, dist) == dist, name
        study.tell(trial, 0.0)


def test_narrowed_space_is_respected_and_validated() -> None:
    space = SearchSpace(ops=("relu_conv3", "mish_conv3"), stacks=(1,), initial_filters=(8,),
                        max_edges=5, max_op_vertices=3)
    study = random_study(3)
    for _ in range(100):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        assert space.contains(arch) and len(arch.edges) <= 5
        study.tell(trial, 0.0)
    with pytest.raises(ValueError, match="outside the search space: initial_filters=32"):
        params_for(seed_architectures()["organmnist3d"], space)
    with pytest.raises(ValueError, match="Did you mean 'relu_conv3'"):
        SearchSpace(ops=("relu_conv_3",))
    with pytest.raises(ValueError, match=r"space.stacks must list at least one choice"):
        SearchSpace(stacks=())


def test_widened_space_reaches_larger_cells() -> None:
    space = SearchSpace(max_edges=14, max_op_vertices=6)
    study = random_study(4)
    largest = 0
    for _ in range(200):
        trial = study.ask()
        arch = sample_architecture(trial, space)
        largest = max(largest, len(arch.edges))
        study.tell(trial, 0.0)
    assert 9 < largest <= 14
    all_but_skip = tuple((a, b) for b in range(1, 6) for a in range(b) if (a, b) != (0, 5))
    dense = Architecture(("relu_conv3",) * 4, all_but_skip, 1, 1, 8)
    assert sample_architecture(FixedTrial(params_for(dense, space)), space) == dense
