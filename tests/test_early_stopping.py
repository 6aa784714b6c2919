"""Learning curves and the MO-ASHA stopper: rungs, promotion, shared rung state, stopped trials."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nas3d import records
from nas3d.architecture import Architecture
from nas3d.budget import budget_state
from nas3d.config import ConfigError, StudyConfig, load_study_config
from nas3d.data import load_splits
from nas3d.early_stopping import (
    CURVE_KEYS,
    EarlyStoppingConfig,
    EpochMonitor,
    RungEntry,
    crowding_distances,
    decide,
    decisions,
    format_learning_curve,
    learning_curve,
    rung_entry,
    rung_epochs,
)
from nas3d.model import build_model
from nas3d.pareto import fully_trained, study_hypervolume
from nas3d.samplers import make_sampler
from nas3d.space import SearchSpace, params_for, sample_architecture
from nas3d.storages import make_storage
from nas3d.study import create_study, load_study
from nas3d.train import EpochRecord, TrainConfig, TrainResult, train_trial
from tests.test_study import make_objective, smoke_config

REPO = Path(__file__).resolve().parents[1]
MOASHA = {"early_stopping.kind": "moasha", "early_stopping.min_epochs": 1}  # smoke trials are short


# --- rungs and configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_epochs", "eta", "max_epochs", "expected"),
    [
        (1, 3, 50, (1, 3, 9, 27)),
        (2, 2, 16, (2, 4, 8)),  # 16 itself is no rung: the trial ends there anyway
        (1, 3, 27, (1, 3, 9)),
        (1, 2, 2, (1,)),
        (5, 3, 5, ()),
    ],
)
def test_rung_epochs(min_epochs: int, eta: int, max_epochs: int, expected: tuple[int, ...]) -> None:
    assert rung_epochs(min_epochs, eta, max_epochs) == expected


def test_rungs_need_a_stopper_and_valid_numbers() -> None:
    assert EarlyStoppingConfig().rungs(50) == ()  # kind "none"
    assert EarlyStoppingConfig(kind="moasha", eta=3, min_epochs=2).rungs(50) == (2, 6, 18)
    with pytest.raises(ValueError, match="eta must be >= 2"):
        EarlyStoppingConfig(kind="moasha", eta=1)
    with pytest.raises(ValueError, match="min_epochs must be >= 1"):
        EarlyStoppingConfig(min_epochs=0)
    with pytest.raises(ValueError, match="min_epochs >= 1, eta >= 2"):
        rung_epochs(1, 1, 10)


def test_early_stopping_table_is_validated(tmp_path: Path) -> None:
    def load(table: str) -> StudyConfig:
        path = tmp_path / "s.toml"
        path.write_text(f'[study]\nname = "s"\n[train]\nmax_epochs = 4\n[early_stopping]\n{table}\n')
        return load_study_config(path)

    config = load('kind = "moasha"\neta = 2\nmin_epochs = 1')
    assert config.early_stopping == EarlyStoppingConfig("moasha", 2, 1)
    assert config.early_stopping.rungs(config.train.max_epochs) == (1, 2)
    with pytest.raises(ConfigError, match=r"did you mean 'moasha'"):
        load('kind = "mosha"')
    with pytest.raises(ConfigError, match=r"unknown key 'etta' in \[early_stopping\]; did you mean 'eta'"):
        load("etta = 3")
    with pytest.raises(ConfigError, match=r"eta: expected int"):
        load("eta = 2.5")
    with pytest.raises(ConfigError, match=r"min_epochs \(4\) must be below train.max_epochs \(4\)"):
        load('kind = "moasha"\nmin_epochs = 4')
    assert load('kind = "none"\nmin_epochs = 9').early_stopping.rungs(4) == ()  # off: no rung needed


def test_every_study_file_says_which_stopper_it_uses() -> None:
    for path in sorted((REPO / "studies").glob("*.toml")):
        assert "[early_stopping]" in path.read_text() and "kind" in path.read_text(), path.name
        load_study_config(path)


def test_a_study_stored_before_early_stopping_still_loads_and_matches(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    config = smoke_config(tmp_path, **{"early_stopping.kind": "none"})
    study = create_study(config, storage)
    old = {k: v for k, v in config.to_dict().items() if k != "early_stopping"}
    study.set_user_attr(records.CONFIG, old)  # as a study created before the table existed stored it
    _, loaded = load_study(config.study.name, storage)
    assert loaded.early_stopping == EarlyStoppingConfig()  # read back as what it ran with: no stopper
    create_study(config, storage)  # the same file still matches
    with pytest.raises(ValueError, match="early_stopping.kind: stored 'none', asked 'moasha'"):
        create_study(config.with_overrides(MOASHA), storage)


# --- promotion ------------------------------------------------------------------------------------


def entries(*points: tuple[float, float]) -> list[RungEntry]:
    return [RungEntry(i, auc, flops) for i, (auc, flops) in enumerate(points)]


def verdict(candidate: int, points: list[RungEntry], eta: int) -> tuple[bool, int, int | None, float | None]:
    return decide(points[candidate], points[:candidate] + points[candidate + 1:], eta)


def test_too_few_trials_at_a_rung_continue() -> None:
    worst = entries((0.5, 1e9), (0.9, 1e6))  # trial 0 is dominated, but 2 < eta trials are at the rung
    assert verdict(0, worst, eta=3) == (True, 0, None, None)
    assert verdict(0, worst, eta=2) == (False, 1, 2, None)  # with eta 2 the top 1 of 2 goes on


def test_promotion_by_non_dominated_rank() -> None:
    # front 1: 1, 2, 4 (trade-offs); front 2: 0 (dominated by 1); 3: 5 (by 0); 4: 3 (by 5)
    points = entries((0.6, 1e7), (0.7, 1e6), (0.8, 1e8), (0.5, 1e9), (0.9, 1e9), (0.55, 2e7))
    # 6 trials, eta 3: the top 2 go on; front 1 has 3 members, so crowding decides inside it
    assert verdict(0, points, 3)[:3] == (False, 2, 2)
    assert verdict(5, points, 3)[:3] == (False, 2, 3)
    assert verdict(3, points, 3)[:3] == (False, 2, 4)
    # in front 1 the extremes (fewest FLOPs, best AUC) have infinite crowding; the middle one loses
    assert verdict(1, points, 3) == (True, 2, 1, math.inf)
    assert verdict(4, points, 3) == (True, 2, 1, math.inf)
    assert verdict(2, points, 3)[:3] == (False, 2, 1)
    # eta 2: the top 3 go on, front 1 exactly
    assert [verdict(i, points, 2)[0] for i in range(6)] == [False, True, True, False, True, False]


def test_a_trial_with_fewer_flops_is_not_dominated_by_a_better_auc() -> None:
    points = entries((0.6, 1e6), (0.95, 1e9), (0.9, 1e9))
    assert verdict(0, points, 3)[:3] == (True, 1, 1)  # front 1 = {0, 1}; only 1 place: both extremes
    assert verdict(2, points, 3)[:3] == (False, 1, 2)


def test_ties_never_depend_on_arrival_order() -> None:
    # two identical trials in front 1 and one place: both go on, whichever decides, in any order
    points = entries((0.8, 1e6), (0.8, 1e6), (0.6, 1e9))
    assert verdict(0, points, 3)[0] and verdict(1, points, 3)[0]
    assert verdict(1, points[::-1], 3)[0]
    # three identical points and one dominated one, eta 2: 2 places, all three tie and go on
    points = entries((0.7, 1e7), (0.7, 1e7), (0.7, 1e7), (0.6, 1e8))
    assert all(verdict(i, points, 2)[0] for i in range(3)) and not verdict(3, points, 2)[0]


def test_crowding_distance() -> None:
    front = np.array([[0.0, 1.0], [0.25, 0.5], [0.5, 0.25], [1.0, 0.0]])
    np.testing.assert_allclose(crowding_distances(front), [math.inf, 1.25, 1.25, math.inf])
    # identical rows share a distance, whatever their order
    twins = np.array([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    d = crowding_distances(twins)
    assert d[1] == d[2] == pytest.approx(2.0)


# --- the training callback ------------------------------------------------------------------------


def test_on_epoch_stops_training_and_composes_with_patience(tmp_path: Path) -> None:
    config = smoke_config(tmp_path)
    data = load_splits(config.data, "cpu", for_search=True)
    arch = Architecture(("relu_conv3",), ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
    seen: list[tuple[int, bool]] = []

    def stop_at_2(record: EpochRecord, last: bool) -> bool:
        seen.append((record.epoch, last))
        return record.epoch < 2

    result = train_trial(build_model(arch, 1, 2), data, TrainConfig(max_epochs=5, patience=5), "cpu",
                         on_epoch=stop_at_2)
    assert result.stopped_early and result.epochs_run == 2 and seen == [(1, False), (2, False)]
    seen.clear()
    # the run ends at max_epochs on its own: a "stop" on the last epoch is no early stop
    result = train_trial(build_model(arch, 1, 2), data, TrainConfig(max_epochs=2, patience=5), "cpu",
                         on_epoch=stop_at_2)
    assert not result.stopped_early and result.epochs_run == 2 and seen == [(1, False), (2, True)]


# --- recording, in a study ------------------------------------------------------------------------


def test_learning_curve_round_trips_through_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = smoke_config(tmp_path, **{"train.max_epochs": 3, "train.patience": 3})
    study, objective = make_objective(config, url)
    study.optimize(objective, n_trials=1)
    [trial] = optuna.load_study(study_name=config.study.name, storage=make_storage(url)).get_trials()
    curve = learning_curve(trial)
    assert curve["epoch"] == [1, 2, 3] == list(range(1, trial.user_attrs["epochs"] + 1))
    assert all(len(curve[k]) == 3 and all(math.isfinite(v) for v in curve[k]) for k in curve)
    assert max(curve["val_auc"]) == trial.values[0]  # the score is the best epoch's AUC
    assert curve["val_acc"][trial.user_attrs["best_epoch"] - 1] == trial.user_attrs["val_acc"]
    assert trial.user_attrs[records.FLOPS] == trial.values[1]
    assert records.DECISIONS not in trial.user_attrs  # no stopper, no decisions
    text = format_learning_curve(trial)
    assert f"trial {trial.number} (complete)" in text and len(text.splitlines()) == 3 + 3
    # Without a recorded curve: empty lists for the standard keys, none of the optional ones.
    assert learning_curve(optuna.trial.create_trial(state=TrialState.FAIL)) == {k: [] for k in CURVE_KEYS}
    assert set(curve) == {*CURVE_KEYS, "seconds"}  # seconds per epoch; no full-val scores asked for


def add_dominating_peer(study: optuna.Study, epochs: int = 3) -> int:
    """A trial that reached every rung with AUC 1.0 at 1 FLOP: it dominates whatever comes next."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.PRUNED,
        user_attrs={records.CURVE: {"epoch": list(range(1, epochs + 1)), "val_auc": [1.0] * epochs},
                    records.FLOPS: 1, records.EARLY_STOPPED: True},
    ))
    return len(study.trials) - 1


def test_a_stopped_trial_is_pruned_never_on_the_front_and_never_exported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config = smoke_config(tmp_path, **MOASHA, **{"early_stopping.eta": 2, "train.max_epochs": 3,
                                                 "train.patience": 3})
    study, objective = make_objective(config, url)
    peer = add_dominating_peer(study)
    arch = Architecture(("relu_conv3",), ((0, 1), (1, 2)), stacks=1, cells_per_stack=1, initial_filters=8)
    study.enqueue_trial(params_for(arch, config.space))
    study.optimize(objective, n_trials=1)
    stopped = study.trials[-1]
    assert stopped.state == TrialState.PRUNED and stopped.user_attrs[records.EARLY_STOPPED] is True
    assert stopped.user_attrs[records.FAILURE_REASON] == (
        "stopped early at epoch 1 (rung 0): not in the top 1 of 2 trials at that rung")
    assert stopped.user_attrs["epochs"] == 1 == len(learning_curve(stopped)["epoch"])
    auc, flops = stopped.user_attrs[records.EARLY_STOPPED_VALUES]
    assert auc == max(learning_curve(stopped)["val_auc"]) and flops == stopped.user_attrs[records.FLOPS]
    [decision] = decisions(stopped)
    assert (decision.proceed, decision.peers, decision.front) == (False, (peer,), 2)
    assert objective.epochs_trained == 1
    # not a result anywhere: no checkpoint, not on Optuna's front, not among the fully trained
    assert "checkpoint_artifact" not in stopped.user_attrs
    assert stopped.number not in {t.number for t in study.best_trials}
    assert stopped.number not in {t.number for t in fully_trained(study.trials)}
    assert study_hypervolume(study.trials, config.data) == 0.0
    assert budget_state(study).stopped == 2  # the peer was marked stopped too
    assert "stopped early at epoch 1" in format_learning_curve(stopped)

    out = tmp_path / "stopped.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "nas3d", "export", "--storage", url, "--study-name", config.study.name,
         "--trial", str(stopped.number), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and not out.exists()
    assert "stopped early at epoch 1" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def drive(trial: optuna.Trial, monitor: EpochMonitor, aucs: list[float]) -> tuple[float, float]:
    """Feed ``aucs`` (one per epoch) through ``monitor`` as train_trial would, then finish the trial as
    the objective does: PRUNED through ``monitor.stop`` when the stopper said so."""
    for epoch, auc in enumerate(aucs, start=1):
        if not monitor(EpochRecord(epoch, 0.5, 0.5, auc, 0.5), epoch == len(aucs)):
            monitor.stop(TrainResult(max(aucs[:epoch]), 0.5, 0.5, 1, epoch, 0.0, 1.0, (), True))
    return max(aucs), monitor.flops


def test_sampler_keeps_proposing_distinct_architectures_after_many_stops(tmp_path: Path) -> None:
    """The study's real TPE sampler, fed stopped trials exactly as the objective records them, proposes
    about as many distinct architectures as the same sampler (same seed) in a study without stops.

    Training is replaced by a fixed curve per architecture (a made-up function of its hash): what is
    under test is what the sampler does with the stops, and 2 x 60 trainings would take minutes.
    """
    space = SearchSpace(ops=("conv3_in_relu", "relu_conv3", "mish_conv3"), stacks=(1,), cells_per_stack=(1,),
                        initial_filters=(4, 8))

    def search(kind: str) -> tuple[optuna.Study, list[str]]:
        config = smoke_config(tmp_path, **{"early_stopping.kind": kind, "early_stopping.eta": 3,
                                           "early_stopping.min_epochs": 1, "train.max_epochs": 4})
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(config.study))
        seen: list[str] = []

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            arch = sample_architecture(trial, space)
            seen.append(arch.arch_hash())
            final = 0.55 + 0.4 * np.random.default_rng(int(arch.arch_hash()[:8], 16)).random()
            aucs = [0.5 + (final - 0.5) * e / 4 for e in range(1, 5)]
            flops = 1e6 * arch.initial_filters * len(arch.ops)
            return drive(trial, EpochMonitor(trial, config.early_stopping, 4, flops), aucs)

        study.optimize(objective, n_trials=60)
        return study, seen

    study, with_stops = search("moasha")
    stopped = [t for t in study.trials if t.user_attrs.get(records.EARLY_STOPPED)]
    assert all(t.state == TrialState.PRUNED for t in stopped)
    assert len(stopped) >= 30, f"only {len(stopped)} stops: the test needs many"
    _, without = search("none")
    # TPE repeats itself in a small space either way; stops must not make it collapse onto fewer
    assert len(set(with_stops)) >= len(set(without)) - 6, (len(set(with_stops)), len(set(without)))
    assert len(set(with_stops[30:])) >= 15  # and it still explores in the second half


# --- two workers, one PostgreSQL ------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_rung_state_through_postgresql(postgres_url: str, tmp_path: Path) -> None:
    name = f"moasha-{os.getpid()}-{tmp_path.name}"[-60:]
    config = smoke_config(tmp_path, **MOASHA, **{
        "study.name": name, "study.n_trials": 10, "early_stopping.eta": 2,
        "train.max_epochs": 4, "train.patience": 4, "data.synthetic_samples": 48,
    })
    study = create_study(config, make_storage(postgres_url))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-m", "nas3d", "worker", "--study-name", name, "--storage",
                          postgres_url, "--worker-index", str(i)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
    rungs = config.early_stopping.rungs(config.train.max_epochs)
    trials = [t for t in study.get_trials() if learning_curve(t)["epoch"]]
    assert budget_state(study).used == 10 and len(trials) >= 2
    by_number = {t.number: t for t in trials}
    for t in trials:
        reached = len(learning_curve(t)["epoch"])
        made = decisions(t)
        # exactly one decision at every rung the trial reached, none twice, none missing
        assert [d.epoch for d in made] == [r for r in rungs if r <= reached], t.number
        assert all(d.proceed for d in made[:-1])
        if t.user_attrs.get(records.EARLY_STOPPED):
            assert not made[-1].proceed and made[-1].epoch == reached and t.state == TrialState.PRUNED
        else:
            assert t.state == TrialState.COMPLETE and reached == config.train.max_epochs
        for d in made:
            # every peer had reached the rung, and the decision follows from the stored rung values
            peers = [rung_entry(by_number[p], d.epoch) for p in d.peers]
            assert None not in peers
            mine = rung_entry(t, d.epoch)
            assert mine is not None and mine.val_auc == d.val_auc
            assert decide(mine, peers, config.early_stopping.eta)[0] == d.proceed
    # no lost rung value: of any two trials at a rung, at least the later one saw the earlier
    for r in rungs:
        at = [t for t in trials if len(learning_curve(t)["epoch"]) >= r]
        peers_of = {t.number: set(next(d.peers for d in decisions(t) if d.epoch == r)) for t in at}
        for a in at:
            for b in at:
                if a.number < b.number:
                    seen = a.number in peers_of[b.number] or b.number in peers_of[a.number]
                    assert seen, (r, a.number, b.number)
