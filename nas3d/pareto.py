"""Comparing fronts: the one hypervolume every nas3d command, report and benchmark uses.

Defined in docs/metrics.md#hypervolume.

Objectives: validation AUC (maximised) and log10 FLOPs (minimised). The box runs from the reference
point (AUC 0.5, the FLOPs of the largest architecture of the seed space) to the ideal point (AUC 1.0,
the FLOPs of the smallest one), both at the study's input size, channels and classes. Points are
normalised into that box, so the hypervolume lies in [0, 1] and compares across studies of the same
input size; a point outside it (AUC <= 0.5, or more FLOPs than the largest seed architecture) adds
nothing.

Only fully trained, completed trials count: not duplicates, over-constraint or infeasible trials
(all PRUNED), nor trials an early stopper or the fold race (:mod:`nas3d.racing`) cut short (PRUNED
and marked ``early_stopped``; a raced trial's mean over its first folds is no score of all its folds).

The hypervolume itself is ``moocore.hypervolume`` (public, maintained reference implementation):
Optuna's own is private (``optuna._hypervolume``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import moocore
import numpy as np

from nas3d import records
from nas3d.architecture import Architecture
from nas3d.data import DataConfig
from nas3d.ops import op_kernel_size
from nas3d.space import SearchSpace

__all__ = [
    "AUC_IDEAL",
    "AUC_REFERENCE",
    "HypervolumeBox",
    "crowding_distances",
    "fully_trained",
    "hypervolume",
    "hypervolume_box",
    "largest_seed_architecture",
    "smallest_seed_architecture",
    "study_hypervolume",
]

AUC_REFERENCE = 0.5  # chance
AUC_IDEAL = 1.0


def _chain(ops: Sequence[str]) -> tuple[tuple[int, int], ...]:
    return tuple((v, v + 1) for v in range(len(ops) + 1))


SEED_SPACE = SearchSpace()


def largest_seed_architecture(space: SearchSpace = SEED_SPACE) -> Architecture:
    """The architecture of ``space`` with the most FLOPs.

    FLOPs count convolutions only (``nas3d.costs``), and the edges of a cell join vertices by sums,
    which are not counted: the most FLOPs come from the most operation vertices, each with the
    largest kernel, in the most stacks and cells at the widest start.
    """
    op = max(space.ops, key=op_kernel_size)
    ops = (op,) * space.max_op_vertices
    return Architecture(ops=ops, edges=_chain(ops), stacks=max(space.stacks),
                        cells_per_stack=max(space.cells_per_stack),
                        initial_filters=max(space.initial_filters))


def smallest_seed_architecture(space: SearchSpace = SEED_SPACE) -> Architecture:
    """The architecture of ``space`` with the fewest FLOPs: one vertex of the smallest kernel, the
    fewest stacks and cells, the narrowest start."""
    ops = (min(space.ops, key=op_kernel_size),)
    return Architecture(ops=ops, edges=_chain(ops), stacks=min(space.stacks),
                        cells_per_stack=min(space.cells_per_stack),
                        initial_filters=min(space.initial_filters))


@dataclass(frozen=True)
class HypervolumeBox:
    """The normalisation box: ``min_flops`` is the ideal (smallest seed architecture), ``max_flops``
    the reference (largest one)."""

    min_flops: int
    max_flops: int

    def normalise(self, val_auc: float, flops: float) -> tuple[float, float] | None:
        """``(1 - auc, log flops)`` scaled into [0, 1]² (both minimised), or None outside the box."""
        if not (math.isfinite(val_auc) and math.isfinite(flops)) or flops <= 0:
            return None
        auc_part = (AUC_IDEAL - val_auc) / (AUC_IDEAL - AUC_REFERENCE)
        span = math.log10(self.max_flops) - math.log10(self.min_flops)
        flops_part = (math.log10(flops) - math.log10(self.min_flops)) / span
        if not (auc_part < 1.0 and flops_part < 1.0):
            return None
        # An AUC above 1 cannot happen; FLOPs below the ideal only in a space wider than the seed's.
        return max(auc_part, 0.0), max(flops_part, 0.0)


@cache
def hypervolume_box(size: int, in_channels: int = 1, num_classes: int = 2) -> HypervolumeBox:
    """The box for a study whose inputs are ``size``³ with ``in_channels`` and ``num_classes``."""
    from nas3d.costs import measure_costs  # torch work, done once per shape

    def flops(arch: Architecture) -> int:
        return measure_costs(arch, in_channels, num_classes, size, with_thop=False).flops

    return HypervolumeBox(min_flops=flops(smallest_seed_architecture()),
                          max_flops=flops(largest_seed_architecture()))


def hypervolume(points: Iterable[tuple[float, float]], box: HypervolumeBox) -> float:
    """The normalised hypervolume in [0, 1] of ``(val_auc, flops)`` points inside ``box``."""
    inside = [p for p in (box.normalise(auc, flops) for auc, flops in points) if p is not None]
    if not inside:
        return 0.0
    return float(moocore.hypervolume(np.asarray(inside, dtype=float), ref=[1.0, 1.0]))


def fully_trained(trials: Iterable) -> list:
    """The trials whose values are fully trained results: COMPLETE and not stopped early (by MO-ASHA
    within a run or by the fold race between folds)."""
    from optuna.trial import TrialState

    return [
        t for t in trials
        if t.state == TrialState.COMPLETE and t.values is not None
        and not t.user_attrs.get(records.EARLY_STOPPED, False)
    ]


def study_hypervolume(trials: Iterable, data: DataConfig) -> float:
    """The hypervolume of the validation front of a study's ``trials`` (its fully trained ones),
    for a study trained on ``data``."""
    points = ((t.values[0], t.values[1]) for t in fully_trained(trials))
    return hypervolume(points, hypervolume_box(data.size, data.in_channels, data.num_classes))


def crowding_distances(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row of ``points`` (one front, objectives in columns).

    The extremes of each objective get infinity. Identical rows get the same distance (computed on
    the distinct points), so a tie never depends on the order of the rows. Written out here because
    neither Optuna (private ``_calc_crowding_distance``) nor moocore exposes it; the early stopper
    and the ODE sampler both rank with it.
    """
    unique, inverse = np.unique(points, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n, m = unique.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(len(points), math.inf)
    for j in range(m):
        order = np.argsort(unique[:, j], kind="stable")
        values = unique[order, j]
        span = values[-1] - values[0]
        distance[order[0]] = distance[order[-1]] = math.inf
        if span > 0:
            distance[order[1:-1]] += (values[2:] - values[:-2]) / span
    return distance[inverse]
