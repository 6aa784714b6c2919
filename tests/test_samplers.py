"""nas3d.samplers: the shared-split TPE proposes exactly what Optuna's TPESampler proposes, with less work."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.samplers._tpe import sampler as tpe_module
from optuna.trial import TrialState

from nas3d.samplers import TPE_OPTIONS
from nas3d.samplers._tpe import SharedSplitTPESampler, shortcuts_available
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


@pytest.fixture(scope="module")
def trials() -> list[optuna.trial.FrozenTrial]:
    return history(80)


def test_proposes_exactly_what_optuna_tpe_proposes(trials: list) -> None:
    assert shortcuts_available(), f"Optuna {optuna.__version__}: update nas3d.samplers._tpe._TESTED_OPTUNA"
    stock = propose(optuna.samplers.TPESampler(**TPE_OPTIONS, seed=5), trials, 6)
    shared = propose(SharedSplitTPESampler(**TPE_OPTIONS, seed=5), trials, 6)
    assert shared == stock
    assert len({tuple(sorted(p.items())) for p in shared}) > 1  # really sampled, not a constant


def test_splits_once_per_trial_instead_of_once_per_group(
    trials: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_split = tpe_module._split_trials

    def counting_split(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return real_split(*args, **kwargs)

    monkeypatch.setattr(tpe_module, "_split_trials", counting_split)
    propose(optuna.samplers.TPESampler(**TPE_OPTIONS, seed=5), trials, 3)
    stock_calls, calls["n"] = calls["n"], 0
    propose(SharedSplitTPESampler(**TPE_OPTIONS, seed=5), trials, 3)
    assert stock_calls > 3 * 5  # one split per parameter group (many groups in the nas3d space)
    assert calls["n"] == 3


def test_groups_match_optuna_after_trials_arrive_out_of_order(trials: list) -> None:
    def sample_once(study: optuna.Study) -> None:  # the sampler reads the trials inside ask/suggest
        trial = study.ask()
        sample_architecture(trial, SearchSpace())
        study.tell(trial, state=TrialState.FAIL)  # failed trials take no part in the groups

    small = [t for t in trials if t.params["cell/num_ops"] <= 2]  # few params: few groups
    large = [t for t in trials if t.params["cell/num_ops"] > 2]
    groups = []
    samplers = (optuna.samplers.TPESampler(**TPE_OPTIONS, seed=1),
                SharedSplitTPESampler(**TPE_OPTIONS, seed=1))
    for sampler in samplers:
        study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
        study.add_trials(small)
        sample_once(study)  # the incremental decomposition has added these now
        before = len(sampler._search_space_group.search_spaces)
        study.add_trials(large[::-1])  # later numbers first, as parallel workers finish
        sample_once(study)
        groups.append(sampler._search_space_group.search_spaces)
    assert groups[0] == groups[1]
    assert len(groups[1]) > before  # the later trials brought new groups


def test_a_patch_release_is_another_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optuna, "__version__", "5.0.1")  # private code may change in a patch release
    assert not shortcuts_available()


def test_other_optuna_versions_get_plain_tpe(trials: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optuna, "__version__", "99.0.0")
    assert not shortcuts_available()
    sampler = SharedSplitTPESampler(**TPE_OPTIONS, seed=5)
    assert not sampler._shortcuts
    stock = propose(optuna.samplers.TPESampler(**TPE_OPTIONS, seed=5), trials, 2)
    assert propose(sampler, trials, 2) == stock
