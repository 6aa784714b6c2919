"""Cross-validated scores (data.cv_folds): the folds of a study's pool, their summary, the config keys,
and a search of the smoke study with three folds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from optuna.trial import TrialState

from nas3d import records
from nas3d.checkpoint import load_checkpoint
from nas3d.cli import main
from nas3d.config import ConfigError
from nas3d.cv import CrossValidation, fold_interval, standard_error
from nas3d.data import DeviceData, Split, load_splits
from nas3d.objective import TrialObjective
from nas3d.storages import make_storage
from nas3d.study import load_study
from tests.test_study import smoke_config

REPO = Path(__file__).resolve().parents[1]


def _data(n_train: int = 30, n_val: int = 12) -> DeviceData:
    def split(n: int, offset: int) -> Split:
        images = torch.arange(offset, offset + n, dtype=torch.uint8).view(n, 1, 1, 1, 1).expand(n, 1, 2, 2, 2)
        return Split(images.contiguous(), torch.arange(n) % 2, "binary-class")

    return DeviceData("toy", 2, 1, 2, split(n_train, 0), split(n_val, n_train), None)


def test_folds_pool_train_and_val_and_never_train_on_their_own_val_part() -> None:
    folds = CrossValidation.of(_data(), 3, seed=0)
    seen = []
    for i in range(3):
        fold = folds.fold(i)
        train_ids = set(fold.train.images[:, 0, 0, 0, 0].tolist())
        val_ids = set(fold.val.images[:, 0, 0, 0, 0].tolist())
        assert not train_ids & val_ids and len(train_ids | val_ids) == 42  # the pool: 30 train + 12 val
        assert fold.val.labels.tolist().count(0) == fold.val.labels.tolist().count(1) == 7  # stratified
        assert fold.test is None and fold.num_classes == 2
        seen += sorted(val_ids)
    assert sorted(seen) == list(range(42))


def test_the_fingerprint_names_the_folds() -> None:
    first = CrossValidation.of(_data(), 3, seed=0).fingerprint
    assert CrossValidation.of(_data(), 3, seed=0).fingerprint == first
    assert CrossValidation.of(_data(), 3, seed=1).fingerprint != first
    assert CrossValidation.of(_data(), 2, seed=0).fingerprint != first


def test_too_few_samples_of_a_class_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"data.cv_folds = 9: class .* fewer than the 9 folds"):
        CrossValidation.of(_data(6, 2), 9, seed=0)


def test_standard_error_and_interval() -> None:
    assert standard_error([0.8]) is None and fold_interval([0.8]) is None
    se = standard_error([0.7, 0.8, 0.9])
    assert se == pytest.approx(0.1 / math.sqrt(3))
    low, high = fold_interval([0.7, 0.8, 0.9])
    assert (low, high) == pytest.approx((0.8 - 2 * se, 0.8 + 2 * se))
    assert fold_interval([0.98, 1.0, 1.0])[1] == 1.0  # an AUC never exceeds 1


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.cv_folds": 0}, "data.cv_folds must be >= 1"),
    ({"data.cv_folds": 3, "data.record_full_val": True}, "data.record_full_val scores the whole val split"),
    ({"racing.kind": "fold-race"}, "set data.cv_folds >= 2"),
    ({"data.cv_folds": 3, "racing.kind": "wilcoxon"}, "racing.kind"),
    ({"data.cv_train_folds": 1}, "data.cv_train_folds must be 0 .all folds. or 1..data.cv_folds"),
    ({"data.cv_folds": 3, "data.cv_train_folds": 4}, "but got 4 of 3"),
    ({"data.cv_folds": 3, "data.cv_train_folds": 1, "racing.kind": "fold-race"}, "but it trains 1: set"),
])
def test_bad_cv_settings_are_one_line(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        smoke_config(tmp_path, **overrides)
    assert "\n" not in str(info.value)


def test_cv_folds_default_to_one_and_are_recorded(tmp_path: Path) -> None:
    config = smoke_config(tmp_path)
    assert config.data.cv_folds == 1 and config.racing.kind == "none"
    stored = smoke_config(tmp_path, **{"data.cv_folds": 3, "data.cv_seed": 7}).to_dict()
    assert (stored["data"]["cv_folds"], stored["data"]["cv_seed"]) == (3, 7)


def smoke_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                 n_trials: int, *settings: str) -> None:
    """``nas3d search`` of the smoke study in ``tmp_path`` with ``--set`` each of ``settings``."""
    monkeypatch.chdir(tmp_path)
    sets = [arg for setting in settings for arg in ("--set", setting)]
    smoke = str(REPO / "studies" / "smoke.toml")
    code = main(["search", "--study", smoke, "--data-root", str(tmp_path / "d"), "--n-trials", str(n_trials),
                 *sets, "--no-claim-ahead"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow  # three trials of three folds: about a minute on a loaded 2-core machine
def test_search_with_three_folds_records_them_on_every_trained_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    smoke_search(tmp_path, monkeypatch, capsys, 3, "data.cv_folds=3")
    study, config = load_study("smoke", make_storage(None))
    assert config.data.cv_folds == 3
    trained = [t for t in study.trials if records.NOT_TRAINED not in t.user_attrs]
    assert len(trained) == 3 and all(t.state == TrialState.COMPLETE for t in trained)
    for t in trained:
        folds = t.user_attrs[records.FOLD_VAL_AUC]
        assert len(folds) == 3 and t.values[0] == pytest.approx(np.mean(folds))
        assert t.user_attrs[records.VAL_AUC_SE] == pytest.approx(np.std(folds, ddof=1) / math.sqrt(3))
        assert t.user_attrs[records.BEST_FOLD] == int(np.argmax(folds))
        assert records.VAL_AUC_CI not in t.user_attrs  # the interval comes from the folds
    assert len(study.user_attrs[records.CV_FOLDS]) == 16  # the folds' fingerprint, for later workers
    # the exported checkpoint holds the best fold's model and says which
    best = max(trained, key=lambda t: t.values[0])
    out = tmp_path / "best.pt"
    assert main(["export", "--study-name", "smoke", "--trial", str(best.number), "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out)
    metadata = checkpoint.metadata
    assert checkpoint.best_fold == metadata["fold"]["best"] == best.user_attrs[records.BEST_FOLD]
    assert metadata["fold"]["val_auc"] == best.user_attrs[records.FOLD_VAL_AUC]
    assert metadata["metrics"]["val_auc"] == max(best.user_attrs[records.FOLD_VAL_AUC])
    # a worker whose folds differ from the recorded ones refuses to train, in one line
    study.set_user_attr(records.CV_FOLDS, "0123456789abcdef")
    data = load_splits(config.data, "cpu", for_search=True)
    with pytest.raises(ValueError, match="differ from the ones the study recorded") as info:
        TrialObjective(config, data, "cpu")._cross_validation(study)
    assert "\n" not in str(info.value)


@pytest.mark.slow  # two trials of one fold each
def test_a_hold_out_fold_trains_one_model_scored_with_a_bootstrap_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    smoke_search(tmp_path, monkeypatch, capsys, 2, "data.cv_folds=3", "data.cv_train_folds=1")
    study, config = load_study("smoke", make_storage(None))
    assert (config.data.cv_folds, config.data.trained_folds) == (3, 1)
    trained = [t for t in study.trials if records.NOT_TRAINED not in t.user_attrs]
    assert len(trained) == 2 and all(t.state == TrialState.COMPLETE for t in trained)
    data = load_splits(config.data, "cpu", for_search=True)
    pooled = len(data.train) + len(data.val)
    for t in trained:
        assert t.user_attrs[records.FOLD_VAL_AUC] == [t.values[0]]  # one fold trained of three
        assert t.user_attrs[records.VAL_AUC_SE] is None and t.user_attrs[records.BEST_FOLD] == 0
        low, high = t.user_attrs[records.VAL_AUC_CI]  # over fold 0's val part: a third of the pool
        assert low <= t.values[0] <= high
    folds = TrialObjective(config, data, "cpu")._cross_validation(study)
    assert len(folds.folds[0][1]) == pytest.approx(pooled / 3, abs=1)
