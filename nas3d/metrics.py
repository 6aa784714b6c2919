"""AUC and ACC exactly as ``medmnist.Evaluator`` computes them (``getAUC`` / ``getACC``).

Scores are what the seed study hands the evaluator: softmax probabilities ``(N, num_classes)``.
- binary-class: the score is the last column (the positive class); ACC thresholds it at 0.5.
- multi-class: AUC is the mean of the one-vs-rest AUCs over the score columns; ACC is argmax accuracy.

AUC comes from average ranks (the Mann-Whitney statistic, ties counted one half), which is the area
sklearn's ``roc_auc_score`` integrates, without building a ROC curve per class. As there, a class with
no positive or no negative sample has an undefined AUC (nan).

Beyond MedMNIST's two numbers: a binary model's decision threshold chosen on validation
(:func:`choose_threshold`) with its balanced accuracy, sensitivity and specificity, a BCa bootstrap
interval over the test samples (:func:`bootstrap_interval`, paired for two models), and the points of
a reliability diagram (docs/metrics.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nas3d.util import unknown_option_message

TASKS = ("binary-class", "multi-class")


def auc(labels: np.ndarray, scores: np.ndarray, task: str) -> float:
    """MedMNIST's AUC of ``scores`` (``(N, C)`` or ``(N,)``) against ``labels`` (``(N, 1)`` or ``(N,)``)."""
    y, s = _prepare(labels, scores, task)
    if task == "binary-class":
        return _binary_auc(y == 1, s)
    return float(np.mean([_binary_auc(y == k, s[:, k]) for k in range(s.shape[1])]))


def accuracy(labels: np.ndarray, scores: np.ndarray, task: str, threshold: float = 0.5) -> float:
    """MedMNIST's ACC: positive score above ``threshold`` (binary) or argmax (multi-class)."""
    y, s = _prepare(labels, scores, task)
    predicted = (s > threshold).astype(np.int64) if task == "binary-class" else np.argmax(s, axis=-1)
    return float(np.mean(predicted == y))


def evaluator_metrics(
    flag: str, split: str, size: int, root: str | Path, labels: np.ndarray, scores: np.ndarray
) -> tuple[float, float]:
    """``(AUC, ACC)`` from ``medmnist.Evaluator(flag, split, size, root)`` itself, which reads the labels
    from the real file; ``labels`` (ours, in the same order) must equal them, or the scores belong to
    other samples."""
    from medmnist import Evaluator

    evaluator = Evaluator(flag, split, size=size, root=str(root))
    if not np.array_equal(np.asarray(evaluator.labels).reshape(-1), np.asarray(labels).reshape(-1)):
        raise ValueError(f"{flag} {split} labels differ from medmnist.Evaluator's (file {root}); "
                         "the scores would be matched to the wrong samples")
    result = evaluator.evaluate(np.asarray(scores))
    return float(result.AUC), float(result.ACC)


def _prepare(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise ValueError(unknown_option_message("task", task, TASKS))
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        if task != "binary-class":
            raise ValueError(f"multi-class scores must be (N, num_classes), but got shape {s.shape}")
    elif s.ndim == 2:
        if task == "binary-class":
            s = s[:, -1]
    else:
        raise ValueError(f"scores must be (N,) or (N, num_classes), but got shape {s.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"labels and scores must have the same length, but got {y.shape[0]} and {s.shape[0]}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain nan or inf")
    return y, s


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks are multiples of 1/2, so the rank sum is exact in float64 and the one division
    # below is the only rounding.
    rank_sum = _average_ranks(score)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts_group) - 1
    first = np.flatnonzero(starts_group)  # 0-based position where each tie group starts
    last = np.r_[first[1:], x.size] - 1  # ... and ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((first + last) / 2 + 1)[group]
    return ranks


# -- decision thresholds (binary tasks) ---------------------------------------------------------------

THRESHOLD_RULES = ("youden", "sensitivity:TARGET")


def parse_threshold_rule(rule: str) -> float | None:
    """``"youden"`` as None, ``"sensitivity:0.9"`` as its target 0.9; a one-line ``ValueError`` otherwise."""
    if rule == "youden":
        return None
    kind, _, target = str(rule).partition(":")
    try:
        value = float(target)
    except ValueError:
        value = math.nan
    if kind != "sensitivity" or not 0 < value <= 1:
        raise ValueError(f"train.threshold must be \"youden\" or \"sensitivity:T\" with 0 < T <= 1 "
                         f"(e.g. \"sensitivity:0.9\"), but got {rule!r}")
    return value


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
    """The decision threshold of a binary model chosen on (validation) ``scores``: a sample is positive
    when its score is above it, as in :func:`accuracy`.

    ``"youden"`` maximises balanced accuracy (Youden's J = sensitivity + specificity - 1), ties going to
    the threshold nearest 0.5; ``"sensitivity:T"`` takes the highest threshold whose sensitivity is at
    least T (so the best specificity there). Candidates lie midway between consecutive distinct scores,
    and just below the lowest and at the highest one.
    """
    target = parse_threshold_rule(rule)
    y, s = _prepare(labels, scores, "binary-class")
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("a threshold needs both classes among the validation labels")
    distinct = np.unique(s)
    candidates = np.r_[np.nextafter(distinct[0], -np.inf), (distinct[1:] + distinct[:-1]) / 2, distinct[-1]]
    sensitivity = ((s[None, :] > candidates[:, None]) & (y == 1)).sum(1) / (y == 1).sum()
    specificity = ((s[None, :] <= candidates[:, None]) & (y == 0)).sum(1) / (y == 0).sum()
    if target is not None:
        return float(candidates[sensitivity >= target - 1e-12].max())
    j = sensitivity + specificity
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def binary_rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Balanced accuracy, sensitivity and specificity of a binary model at ``threshold`` (nan where a
    class is absent)."""
    y, s = _prepare(labels, scores, "binary-class")
    predicted = s > threshold
    sensitivity = float(predicted[y == 1].mean()) if (y == 1).any() else math.nan
    specificity = float((~predicted[y == 0]).mean()) if (y == 0).any() else math.nan
    return {"balanced_accuracy": (sensitivity + specificity) / 2, "sensitivity": sensitivity,
            "specificity": specificity}


def predicted_classes(scores: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """The class each sample is assigned: positive score above ``threshold`` (binary), else argmax."""
    s = np.asarray(scores, dtype=np.float64)
    if task == "binary-class":
        return ((s[:, -1] if s.ndim == 2 else s) > threshold).astype(np.int64)
    return np.argmax(s, axis=-1)


def single_class(scores: np.ndarray, task: str, threshold: float = 0.5) -> int | None:
    """The one class a model predicts for every sample of ``scores``, or None when it predicts several."""
    classes = np.unique(predicted_classes(scores, task, threshold))
    return int(classes[0]) if len(classes) == 1 else None


# -- bootstrap intervals over the test volumes ----------------------------------------------------------

#: Resamples of the BCa bootstrap; the seed fixes the interval for given scores.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_interval(labels: np.ndarray, scores: Sequence[np.ndarray], task: str, metric: str = "auc", *,
                       other: Sequence[np.ndarray] | None = None, level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """A BCa bootstrap interval (``scipy.stats.bootstrap``) over the samples for ``metric`` ("auc" or
    "acc", ACC at 0.5) averaged over the models of ``scores`` (one score array per seed, all on the
    same samples). With ``other`` (another model's seeds on the same samples), the interval of the
    difference ``mean metric(scores) - mean metric(other)``, paired: both see the same resampled
    samples. ``(nan, nan)`` where the resamples leave the metric undefined or constant."""
    from scipy.stats import bootstrap

    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if metric not in ("auc", "acc"):
        raise ValueError(unknown_option_message("metric", metric, ("auc", "acc")))
    ours = [_prepare(y, s, task)[1] for s in scores]
    theirs = [_prepare(y, s, task)[1] for s in other or ()]

    def mean_metric(models: list[np.ndarray], index: np.ndarray) -> np.ndarray:
        return np.mean([_rows_metric(metric, task, y[index], s[index]) for s in models], axis=0)

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.atleast_2d(index.astype(np.int64))  # (resamples, samples)
        value = mean_metric(ours, index)
        value = value - mean_metric(theirs, index) if theirs else value
        return value if value.shape[0] > 1 else value[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate resample distribution: nan, reported as such
        result = bootstrap((np.arange(len(y)),), statistic, vectorized=True, n_resamples=resamples,
                           batch=250, confidence_level=level, method="BCa",
                           rng=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else (math.nan, math.nan)


def _rows_metric(metric: str, task: str, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``metric`` of each row of ``y`` ``(R, N)`` and ``s`` ``(R, N)`` or ``(R, N, C)`` at once (as
    :func:`auc` / :func:`accuracy` compute it for one row)."""
    if metric == "acc":
        predicted = (s > 0.5).astype(np.int64) if task == "binary-class" else np.argmax(s, axis=-1)
        return (predicted == y).mean(axis=-1)
    if task == "binary-class":
        return _binary_auc_rows(y == 1, s)
    return np.mean([_binary_auc_rows(y == k, s[..., k]) for k in range(s.shape[-1])], axis=0)


def _binary_auc_rows(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    n_pos = positive.sum(axis=-1)
    n_neg = positive.shape[-1] - n_pos
    rank_sum = np.where(positive, rankdata(score, axis=-1), 0.0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# -- calibration --------------------------------------------------------------------------------------


def reliability_bins(labels: np.ndarray, scores: np.ndarray,
                     bins: int = 10) -> list[tuple[float, float, int]]:
    """A reliability diagram's points for a binary model: per equal-width bin of the positive score that
    holds samples, ``(mean score, share of positives, count)``."""
    y, s = _prepare(labels, scores, "binary-class")
    which = np.minimum((s * bins).astype(np.int64), bins - 1)
    return [(float(s[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]
