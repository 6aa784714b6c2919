"""Stratified k-fold splits of a labelled pool (train+val), seeded: the same seed gives the same folds.

Every sample lands in exactly one fold's val part, and each val part keeps the class shares of the
pool (scikit-learn's ``StratifiedKFold`` with shuffling). Used by ``bench/noise_table.py`` to score
architectures across folds; a study's cross-validated score reads the same function.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` pairs ``(train indices, val indices)`` into ``labels``, stratified by class and seeded.

    The val parts are disjoint and cover every sample once; a fold's train part is everything else.
    Raises a one-line ``ValueError`` when ``k < 2`` or a class has fewer than ``k`` samples (a val
    part would then miss that class, and its AUC would be undefined).
    """
    labels = np.asarray(labels).reshape(-1)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
        raise ValueError(f"the number of folds must be an integer >= 2, but got {k!r}")
    if len(labels) == 0:
        raise ValueError(f"cannot split no samples into {k} folds")
    values, counts = np.unique(labels, return_counts=True)
    if counts.min() < k:
        small = values[np.argmin(counts)].item()
        raise ValueError(f"class {small!r} has {counts.min()} samples, fewer than the {k} folds asked for: "
                         f"use at most {counts.min()} folds")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train.astype(np.int64), val.astype(np.int64))
            for train, val in splitter.split(np.zeros(len(labels)), labels)]
