"""The PBC-NAS 3D search space: what may be sampled, and the one function that samples it.

Sampling is define-by-run and feasible by construction. A cell with ``m`` operation vertices is
drawn vertex by vertex: each operation vertex picks a non-empty set of earlier vertices as inputs,
from the sets that still leave room, within ``max_edges``, for the edges every later vertex and the
output need at least. Vertices that feed nothing feed the output while the budget allows, and the
remaining edges into the output are optional. Any feasible pruned cell is reachable this way (its
own input sets always fit the budget), and no sample is infeasible unless the space is, so no trial
is lost to the edge limit. A vertex left without a successor when the budget is spent is pruned, so
such a sample is a smaller architecture, which the study then deduplicates by hash.

Parameter names are stable and their choices fixed per name: where the budget narrows a vertex's
choices, the cap is part of the name (``cell/in5_max2``), so ``FixedTrial(trial.params)`` replays
any trial exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from nas3d.architecture import SEED_MAX_EDGES, Architecture, prune_cell
from nas3d.ops import OPS
from nas3d.util import unknown_option_message

MAX_OP_VERTICES = 5  # the seed's cell: 7 vertices = input + 5 operations + output


class SuggestsCategorical(Protocol):
    """The part of ``optuna.trial.Trial`` (or ``FixedTrial``) that sampling needs."""

    def suggest_categorical(self, name: str, choices: Sequence): ...


@dataclass(frozen=True)
class SearchSpace:
    """The choices a study samples from; the defaults are the seed study's space.

    A study file narrows or widens it (``[space]`` table). Every field is validated on construction.
    """

    ops: tuple[str, ...] = tuple(OPS)
    stacks: tuple[int, ...] = (1, 2)
    cells_per_stack: tuple[int, ...] = (1, 2)
    initial_filters: tuple[int, ...] = (8, 16, 32)
    max_edges: int = SEED_MAX_EDGES
    max_op_vertices: int = MAX_OP_VERTICES

    def __post_init__(self) -> None:
        for name in ("ops", "stacks", "cells_per_stack", "initial_filters"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"space.{name} must list at least one choice, but got []")
            if len(set(values)) != len(values):
                raise ValueError(f"space.{name} must not repeat a choice, but got {list(values)}")
        for op in self.ops:
            if op not in OPS:
                raise ValueError("space.ops: " + unknown_option_message("operation", op, list(OPS)))
        for name in ("stacks", "cells_per_stack", "initial_filters"):
            for value in getattr(self, name):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"space.{name} must hold positive integers, but got {value!r}")
        if not 1 <= self.max_op_vertices <= 7:
            raise ValueError(
                f"space.max_op_vertices must be in 1..7 (exact isomorphism checks grow as n!), "
                f"but got {self.max_op_vertices}"
            )
        if self.max_edges < 2:
            raise ValueError(
                f"space.max_edges must be >= 2 (input->op->output), but got {self.max_edges}"
            )

    def contains(self, arch: Architecture) -> bool:
        """Whether ``arch`` can be sampled from this space."""
        return (
            arch.stacks in self.stacks
            and arch.cells_per_stack in self.cells_per_stack
            and arch.initial_filters in self.initial_filters
            and len(arch.ops) <= self.max_op_vertices
            and len(arch.edges) <= self.max_edges
            and all(op in self.ops for op in arch.ops)
        )


@cache
def _input_sets(vertex: int, max_size: int) -> tuple[str, ...]:
    """Non-empty sets of earlier vertices, smallest first, written "0,2" (categorical choices)."""
    return tuple(
        ",".join(map(str, subset))
        for size in range(1, min(vertex, max_size) + 1)
        for subset in itertools.combinations(range(vertex), size)
    )


def sample_architecture(trial: SuggestsCategorical, space: SearchSpace = SearchSpace()) -> Architecture:
    """Sample one architecture from ``space`` through ``trial.suggest_categorical``.

    This is the only function that calls ``suggest_*``. It raises
    :class:`~nas3d.architecture.InfeasibleArchitecture` only for spaces too tight for any cell.
    """
    stacks = trial.suggest_categorical("stacks", space.stacks)
    cells = trial.suggest_categorical("cells_per_stack", space.cells_per_stack)
    filters = trial.suggest_categorical("initial_filters", space.initial_filters)
    # A cell of m operation vertices needs at least m + 1 edges (a chain).
    largest = min(space.max_op_vertices, space.max_edges - 1)
    num_ops = trial.suggest_categorical("cell/num_ops", tuple(range(1, largest + 1)))

    ops: list[str] = []
    edges: list[tuple[int, int]] = []
    has_successor: set[int] = set()
    for vertex in range(1, num_ops + 1):
        ops.append(trial.suggest_categorical(f"cell/op{vertex}", space.ops))
        # Every later operation vertex needs one input edge, and the output one edge.
        cap = min(vertex, space.max_edges - len(edges) - (num_ops - vertex) - 1)
        name = f"cell/in{vertex}" if cap == vertex else f"cell/in{vertex}_max{cap}"
        chosen = trial.suggest_categorical(name, _input_sets(vertex, cap))
        for source in map(int, chosen.split(",")):
            edges.append((source, vertex))
            has_successor.add(source)

    output = num_ops + 1
    # Leaves (the last vertex first, so the output is never cut off) must feed the output to stay.
    leaves = [v for v in range(num_ops, 0, -1) if v not in has_successor]
    for vertex in leaves:
        if len(edges) < space.max_edges:
            edges.append((vertex, output))
    for vertex in range(num_ops):  # optional extra edges into the output, input vertex included
        if vertex in leaves or len(edges) >= space.max_edges:
            continue
        if trial.suggest_categorical(f"cell/out{vertex}", (False, True)):
            edges.append((vertex, output))
    return prune_cell(
        ops,
        edges,
        stacks=stacks,
        cells_per_stack=cells,
        initial_filters=filters,
        max_edges=space.max_edges,
    )


class _Replay:
    """Answers the sampler's questions from a known architecture, recording the answers."""

    def __init__(self, arch: Architecture) -> None:
        self.arch = arch
        self.params: dict[str, object] = {}
        self.choices: dict[str, tuple[object, ...]] = {}  # the choices each parameter was offered

    def suggest_categorical(self, name: str, choices: Sequence):
        arch = self.arch
        if name.startswith("cell/op"):
            value: object = arch.ops[int(name[len("cell/op"):]) - 1]
        elif name.startswith("cell/in"):
            vertex = int(name[len("cell/in"):].split("_")[0])
            value = ",".join(map(str, arch.inputs_of(vertex)))
        elif name.startswith("cell/out"):
            value = int(name[len("cell/out"):]) in arch.inputs_of(arch.output_vertex)
        else:
            value = {"stacks": arch.stacks, "cells_per_stack": arch.cells_per_stack,
                     "initial_filters": arch.initial_filters, "cell/num_ops": len(arch.ops)}[name]
        if value not in choices:
            raise ValueError(
                f"architecture {arch.short_str()!r} is outside the search space: "
                f"{name}={value!r} is not among {list(choices)}"
            )
        self.params[name] = value
        self.choices[name] = tuple(choices)
        return value


def params_for(arch: Architecture, space: SearchSpace = SearchSpace()) -> dict[str, object]:
    """Trial parameters that make :func:`sample_architecture` return ``arch`` (e.g. to enqueue it).

    Raises ``ValueError`` naming the first choice that ``space`` does not offer.
    """
    return params_and_choices_for(arch, space)[0]


def params_and_choices_for(
    arch: Architecture, space: SearchSpace = SearchSpace()
) -> tuple[dict[str, object], dict[str, tuple[object, ...]]]:
    """:func:`params_for` and, per parameter, the choices the sampler offers it (what an Optuna
    ``CategoricalDistribution`` needs to record a finished trial of ``arch`` directly)."""
    replay = _Replay(arch)
    rebuilt = sample_architecture(replay, space)
    if rebuilt != arch:  # pragma: no cover - guards the sampler and this inverse staying in step
        raise AssertionError(f"params_for({arch}) rebuilt {rebuilt}")
    return replay.params, replay.choices
