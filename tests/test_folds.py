"""nas3d.folds: stratified, seeded k folds of a labelled pool."""

from __future__ import annotations

import numpy as np
import pytest

from nas3d.folds import stratified_folds


def labels_of(counts: dict[int, int], seed: int = 1) -> np.ndarray:
    """A shuffled label vector with ``counts[c]`` samples of class ``c``."""
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


def test_every_sample_is_in_exactly_one_val_part_and_never_in_its_own_train_part() -> None:
    labels = labels_of({0: 70, 1: 23, 2: 9})
    folds = stratified_folds(labels, 3, seed=0)
    assert len(folds) == 3
    val_parts = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(val_parts), np.arange(len(labels)))
    for train, val in folds:
        assert not set(train) & set(val)
        assert len(train) + len(val) == len(labels)


def test_each_val_part_keeps_the_class_shares() -> None:
    labels = labels_of({0: 90, 1: 30})
    for _, val in stratified_folds(labels, 3, seed=7):
        assert np.bincount(labels[val]).tolist() == [30, 10]
    uneven = labels_of({0: 10, 1: 5})
    folds = stratified_folds(uneven, 4, seed=0)
    counts = [np.bincount(uneven[val], minlength=2).tolist() for _, val in folds]
    assert all(c0 in (2, 3) and c1 in (1, 2) for c0, c1 in counts)  # as even as the counts allow
    assert sum(c1 for _, c1 in counts) == 5


def test_the_same_seed_gives_the_same_folds_and_another_seed_others() -> None:
    labels = labels_of({0: 40, 1: 20})
    first, again, other = (stratified_folds(labels, 3, seed) for seed in (0, 0, 1))
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_labels_may_be_a_column_as_medmnist_stores_them() -> None:
    labels = labels_of({0: 6, 1: 6})[:, None].astype(np.uint8)
    assert sorted(len(val) for _, val in stratified_folds(labels, 2, seed=0)) == [6, 6]


@pytest.mark.parametrize("k", [1, 0, -3, 2.0, True])
def test_fewer_than_two_folds_or_a_non_integer_count_is_refused(k) -> None:
    with pytest.raises(ValueError, match=r"number of folds must be an integer >= 2"):
        stratified_folds(labels_of({0: 10, 1: 10}), k, seed=0)


def test_a_class_with_fewer_samples_than_folds_is_refused_in_one_line() -> None:
    message = r"^class 1 has 2 samples, fewer than the 3 folds asked for: use at most 2 folds$"
    with pytest.raises(ValueError, match=message):
        stratified_folds(labels_of({0: 10, 1: 2}), 3, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        stratified_folds(np.array([], dtype=int), 2, seed=0)
