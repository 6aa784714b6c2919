"""Cross-validated scores (``data.cv_folds = k``): a study's folds on the device, and what a trial's
fold scores say (their mean, standard error and interval).

The pool is what a search loads (:func:`nas3d.data.load_splits` with ``for_search``): the train share
and the val share, together. :func:`nas3d.folds.stratified_folds` splits it into ``k`` stratified folds
by ``data.cv_seed``; fold ``i`` trains on the other folds and is scored on its own val part, which
never trains it. The folds depend only on the data, ``k`` and the seed, so every worker on every host
builds the same ones; :attr:`CrossValidation.fingerprint` lets them check that they did.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nas3d.data import DeviceData, Split
from nas3d.folds import stratified_folds

__all__ = ["INTERVAL_SE", "CrossValidation", "fold_interval", "standard_error"]

#: A cross-validated score's interval is its mean ± this many standard errors: the same bound the fold
#: race (nas3d.racing) stops trials by, so a member shown apart from another is one the race separates.
INTERVAL_SE = 2.0


@dataclass(frozen=True)
class CrossValidation:
    """The ``k`` folds of a pool on one device; :meth:`fold` is fold ``i`` as :class:`DeviceData`."""

    data: DeviceData  # the pool's source: its name, shape and task
    pool: Split
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train indices, val indices) into the pool
    seed: int

    @classmethod
    def of(cls, data: DeviceData, k: int, seed: int) -> CrossValidation:
        """The folds of ``data``'s train and val splits pooled; a one-line ``ValueError`` when a class
        has fewer samples than folds."""
        if data.train.images.dtype != data.val.images.dtype:
            raise ValueError(f"cannot pool a train split of {data.train.images.dtype} with a val split of "
                             f"{data.val.images.dtype}")
        pool = Split(torch.cat([data.train.images, data.val.images]),
                     torch.cat([data.train.labels, data.val.labels]), data.train.task)
        try:
            folds = stratified_folds(pool.labels.cpu().numpy(), k, seed)
        except ValueError as e:
            raise ValueError(f"data.cv_folds = {k}: {e} (of the search's train and val shares, pooled)") \
                from None
        return cls(data, pool, tuple(folds), seed)

    @property
    def k(self) -> int:
        return len(self.folds)

    @property
    def fingerprint(self) -> str:
        """A hash of the pool's labels and each fold's val indices: equal folds, equal fingerprints."""
        digest = hashlib.sha256(f"{self.k}:{len(self.pool)}:".encode())
        digest.update(self.pool.labels.cpu().numpy().astype(np.int64).tobytes())
        for _, val in self.folds:
            digest.update(np.sort(val).astype(np.int64).tobytes())
        return digest.hexdigest()[:16]

    def fold(self, i: int) -> DeviceData:
        """Fold ``i``: trains on the other folds' samples, is scored on its own val part."""
        train, val = self.folds[i]
        device = self.pool.labels.device

        def take(index: np.ndarray) -> Split:
            at = torch.from_numpy(index).to(device)
            return Split(self.pool.images[at], self.pool.labels[at], self.pool.task)

        return DeviceData(name=self.data.name, num_classes=self.data.num_classes,
                          in_channels=self.data.in_channels, size=self.data.size,
                          train=take(train), val=take(val), test=None)


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); None for
    fewer than two values, whose spread is unknown."""
    if len(values) < 2:
        return None
    return float(np.std(np.asarray(values, dtype=float), ddof=1) / math.sqrt(len(values)))


def fold_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """``mean ± INTERVAL_SE`` standard errors of the fold scores ``values``, clipped to [0, 1] (where an
    AUC lies); None for fewer than two."""
    se = standard_error(values)
    if se is None:
        return None
    mean = float(np.mean(values))
    return max(mean - INTERVAL_SE * se, 0.0), min(mean + INTERVAL_SE * se, 1.0)
