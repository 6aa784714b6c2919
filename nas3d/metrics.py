"""AUC and ACC exactly as ``medmnist.Evaluator`` computes them (``getAUC`` / ``getACC``).

Scores are what the seed study hands the evaluator: softmax probabilities ``(N, num_classes)``.
- binary-class: the score is the last column (the positive class); ACC thresholds it at 0.5.
- multi-class: AUC is the mean of the one-vs-rest AUCs over the score columns; ACC is argmax accuracy.

AUC comes from average ranks (the Mann-Whitney statistic, ties counted one half), which is the area
sklearn's ``roc_auc_score`` integrates, without building a ROC curve per class. As there, a class with
no positive or no negative sample has an undefined AUC (nan).
"""

from __future__ import annotations

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
