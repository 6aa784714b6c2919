"""nas3d.metrics against medmnist's own getAUC / getACC on the same softmax scores."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

from nas3d.metrics import accuracy, auc


def _softmax_scores(rng: np.random.Generator, n: int, classes: int, decimals: int) -> np.ndarray:
    """Probabilities rounded to few decimals, so scores tie within and across classes."""
    logits = rng.normal(size=(n, classes))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return np.round(p, decimals).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_matches_medmnist_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (200, 1)).astype(np.uint8)
    positive = np.round(rng.random(200), 1)  # heavy ties, and some scores exactly at the 0.5 threshold
    positive[labels[:, 0] == 1] = np.minimum(positive[labels[:, 0] == 1] + 0.2, 1.0)
    scores = np.stack([1 - positive, positive], 1).astype(np.float32)
    assert (scores[:, 1] == np.float32(0.5)).any()
    assert auc(labels, scores, "binary-class") == pytest.approx(
        getAUC(labels, scores, "binary-class"), abs=1e-12
    )
    assert accuracy(labels, scores, "binary-class") == getACC(labels, scores, "binary-class")
    # a 1-D positive-class score is accepted too, as medmnist does
    assert auc(labels, scores[:, 1], "binary-class") == auc(labels, scores, "binary-class")


@pytest.mark.parametrize(("classes", "decimals"), [(3, 1), (11, 2), (5, 6)])
def test_multiclass_matches_medmnist_with_ties(classes: int, decimals: int) -> None:
    rng = np.random.default_rng(classes)
    labels = (np.arange(300) % classes).reshape(-1, 1)
    scores = _softmax_scores(rng, 300, classes, decimals)
    scores[np.arange(300), labels[:, 0]] += 0.05 * rng.random(300).astype(np.float32)  # some signal
    tied_argmax = (scores == scores.max(1, keepdims=True)).sum(1) > 1
    if decimals == 1:
        assert tied_argmax.any()  # argmax ties resolve to the first class, as np.argmax does
    assert auc(labels, scores, "multi-class") == pytest.approx(
        getAUC(labels, scores, "multi-class"), abs=1e-12
    )
    assert accuracy(labels, scores, "multi-class") == getACC(labels, scores, "multi-class")


def test_undefined_auc_is_nan_like_medmnist() -> None:
    labels = np.array([[0], [0], [1], [1]])  # class 2 never occurs
    scores = np.full((4, 3), 1 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's UndefinedMetricWarning
        assert np.isnan(getAUC(labels, scores, "multi-class"))
    assert np.isnan(auc(labels, scores, "multi-class"))


def test_rejects_bad_input() -> None:
    labels = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="Did you mean 'multi-class'"):
        auc(labels, np.zeros((3, 2)), "multiclass")
    with pytest.raises(ValueError, match="nan"):
        auc(labels, np.array([0.1, np.nan, 0.3]), "binary-class")
    with pytest.raises(ValueError, match="same length"):
        accuracy(labels, np.zeros((4, 2)), "multi-class")


REAL_ROOT = Path(os.environ.get("NAS3D_MEDMNIST_ROOT", "/work/shared/data"))


@pytest.mark.skipif(not (REAL_ROOT / "adrenalmnist3d.npz").is_file(),
                    reason=f"needs adrenalmnist3d.npz in {REAL_ROOT} (set NAS3D_MEDMNIST_ROOT)")
@pytest.mark.parametrize("split", ["val", "test"])
def test_equal_to_medmnist_evaluator_on_the_real_file(split: str) -> None:
    from medmnist import Evaluator

    from nas3d.data import DataConfig, load_splits
    from nas3d.metrics import evaluator_metrics

    config = DataConfig(dataset="adrenalmnist3d", size=28, root=str(REAL_ROOT), download=False)
    data = load_splits(config, "cpu", for_search=False)  # md5-checked, read by medmnist's dataset class
    labels = getattr(data, split).labels.numpy()
    evaluator = Evaluator("adrenalmnist3d", split, size=28, root=str(REAL_ROOT))
    rng = np.random.default_rng(0)
    positive = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, len(labels)), 0, 1)
    for scores in (positive, np.round(positive, 2)):  # distinct scores, and many ties
        probabilities = np.stack([1 - scores, scores], 1).astype(np.float32)
        expected = evaluator.evaluate(probabilities)
        assert auc(labels, probabilities, "binary-class") == pytest.approx(expected.AUC, abs=1e-12)
        assert accuracy(labels, probabilities, "binary-class") == expected.ACC
        ours = evaluator_metrics("adrenalmnist3d", split, 28, REAL_ROOT, labels, probabilities)
        assert ours == tuple(expected)
    with pytest.raises(ValueError, match="labels differ from medmnist.Evaluator's"):
        evaluator_metrics("adrenalmnist3d", split, 28, REAL_ROOT, labels[::-1], probabilities)


# -- thresholds, intervals, calibration -----------------------------------------------------------------


def test_youden_threshold_is_the_known_best_and_a_sensitivity_target_is_met() -> None:
    from nas3d.metrics import binary_rates, choose_threshold

    labels = np.array([0, 0, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])  # all below 0.5: ACC at 0.5 says "0"
    threshold = choose_threshold(labels, scores)  # sens 1, spec 4/5 below 0.25; sens 2/3, spec 1 above 0.3
    assert threshold == pytest.approx(0.225)
    assert binary_rates(labels, scores, threshold) == {"balanced_accuracy": 0.9, "sensitivity": 1.0,
                                                       "specificity": 0.8}
    assert choose_threshold(labels, scores, "sensitivity:0.6") == pytest.approx(0.325)
    assert choose_threshold(labels, np.c_[1 - scores, scores]) == pytest.approx(0.225)  # (N, 2) scores
    with pytest.raises(ValueError, match='train.threshold must be "youden" or "sensitivity:T"'):
        choose_threshold(labels, scores, "specificity:0.9")
    with pytest.raises(ValueError, match="needs both classes"):
        choose_threshold(np.zeros(3), scores[:3])


def test_single_class_is_found_at_a_threshold_and_by_argmax() -> None:
    from nas3d.metrics import single_class

    scores = np.array([[0.9, 0.1], [0.7, 0.3]])
    assert single_class(scores, "binary-class") == 0 and single_class(scores, "binary-class", 0.2) is None
    assert single_class(np.array([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]]), "multi-class") == 1


def test_bootstrap_interval_holds_the_estimate_and_pairs_two_models() -> None:
    from nas3d.metrics import bootstrap_interval

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 120)
    good = [np.clip(labels * 0.4 + rng.random(120) * 0.6, 0, 1) for _ in range(2)]
    noise = [rng.random(120)]
    for metric, measure in (("auc", auc), ("acc", accuracy)):
        estimate = np.mean([measure(labels, s, "binary-class") for s in good])
        low, high = bootstrap_interval(labels, good, "binary-class", metric)
        assert low < estimate < high and high - low < 0.3
    again = bootstrap_interval(labels, good, "binary-class")
    assert bootstrap_interval(labels, good, "binary-class") == again  # seeded: the same interval
    low, high = bootstrap_interval(labels, good, "binary-class", other=noise)  # clearly better: > 0
    assert 0 < low < high
    low, high = bootstrap_interval(labels, good[:1], "binary-class", other=good[1:])  # alike: 0 inside
    assert low < 0 < high
    assert bootstrap_interval(labels, good, "binary-class", other=good[::-1]) == pytest.approx(
        (np.nan, np.nan), nan_ok=True)  # a difference that is 0 on every resample has no interval
    scores = rng.dirichlet([1, 1, 1], 90)
    three = rng.integers(0, 3, 90)
    low, high = bootstrap_interval(three, [scores], "multi-class")
    assert low < auc(three, scores, "multi-class") < high


def test_reliability_bins_average_scores_and_outcomes_per_bin() -> None:
    from nas3d.metrics import reliability_bins

    bins = reliability_bins(np.array([0, 1, 1, 1]), np.array([0.05, 0.15, 0.92, 0.98]))
    assert bins == [(0.05, 0.0, 1), (0.15, 1.0, 1), (pytest.approx(0.95), 1.0, 2)]
