"""An architecture as data: a pruned cell DAG plus the macro settings, with JSON and a canonical hash.

Vertex 0 is the cell input, vertex ``len(ops) + 1`` the cell output, and vertices ``1..len(ops)`` are
operations. Edges go from a lower to a higher index. An :class:`Architecture` always holds a pruned,
feasible cell; :func:`prune_cell` turns any raw sample into one, or says why it cannot.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nas3d.ops import OPS
from nas3d.util import unknown_option_message

SEED_MAX_EDGES = 9  # NAS-Bench-101's limit, kept by the seed study
MIN_VERTICES = 3  # input, one operation, output

Edge = tuple[int, int]


class InfeasibleArchitecture(ValueError):
    """A sampled cell that prunes to nothing trainable; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Architecture:
    """A pruned cell (``ops``, ``edges``) repeated ``cells_per_stack`` times in each of ``stacks`` stacks.

    Construct from data with :meth:`from_dict`/:meth:`from_json`, or from a raw sample with
    :func:`prune_cell`. The constructor validates and rejects anything that is not already pruned.
    """

    ops: tuple[str, ...]
    edges: tuple[Edge, ...]
    stacks: int
    cells_per_stack: int
    initial_filters: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "edges", tuple(sorted({(int(a), int(b)) for a, b in self.edges})))
        for field_name in ("stacks", "cells_per_stack", "initial_filters"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field_name} must be a positive integer, but got {value!r}")
        if not self.ops:
            raise ValueError("a cell needs at least one operation vertex, but got ops=()")
        for op in self.ops:
            if op not in OPS:
                raise ValueError(unknown_option_message("operation", op, list(OPS)))
        output = self.output_vertex
        for a, b in self.edges:
            if not 0 <= a < b <= output:
                raise ValueError(
                    f"edge ({a}, {b}) must satisfy 0 <= from < to <= {output} (the output vertex)"
                )
        pruned_ops, pruned_edges = _prune(self.ops, self.edges)
        if len(pruned_ops) != len(self.ops):
            raise ValueError(
                f"cell is not pruned: some vertex is not on an input->output path in {self.edges}; "
                "build it with nas3d.architecture.prune_cell()"
            )

    # -- structure -----------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return len(self.ops) + 2

    @property
    def output_vertex(self) -> int:
        return len(self.ops) + 1

    def inputs_of(self, vertex: int) -> tuple[int, ...]:
        """The vertices whose outputs are summed into ``vertex``."""
        return tuple(a for a, b in self.edges if b == vertex)

    def stack_widths(self) -> tuple[int, ...]:
        """Channels of each stack: the initial filters, doubled at every new stack."""
        return tuple(self.initial_filters * 2**s for s in range(self.stacks))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "stacks": self.stacks,
            "cells_per_stack": self.cells_per_stack,
            "initial_filters": self.initial_filters,
            "ops": list(self.ops),
            "edges": [list(e) for e in self.edges],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        expected = {"stacks", "cells_per_stack", "initial_filters", "ops", "edges"}
        unknown = set(data) - expected
        missing = expected - set(data)
        if unknown or missing:
            raise ValueError(
                f"architecture keys must be {sorted(expected)}, but got unknown={sorted(unknown)} "
                f"missing={sorted(missing)}"
            )
        return cls(
            ops=tuple(data["ops"]),
            edges=tuple((a, b) for a, b in data["edges"]),
            stacks=data["stacks"],
            cells_per_stack=data["cells_per_stack"],
            initial_filters=data["initial_filters"],
        )

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        return cls.from_dict(json.loads(text))

    # -- identity ------------------------------------------------------------------------------
    def canonical(self) -> Architecture:
        """The same architecture with its operation vertices relabelled into a canonical order.

        Two cells that are the same labelled graph up to renumbering (isomorphic, with input and
        output fixed) have the same canonical form. Cells have at most a handful of operation
        vertices, so trying every topological numbering is exact and cheap (<= 5! orders).
        """
        n = len(self.ops)
        best: tuple[tuple[str, ...], tuple[Edge, ...]] | None = None
        for order in itertools.permutations(range(1, n + 1)):
            new_index = {old: new for new, old in enumerate(order, start=1)}
            new_index[0] = 0
            new_index[n + 1] = n + 1
            edges = tuple(sorted((new_index[a], new_index[b]) for a, b in self.edges))
            if any(a >= b for a, b in edges):
                continue  # not a topological numbering
            key = (tuple(self.ops[old - 1] for old in order), edges)
            if best is None or key < best:
                best = key
        assert best is not None  # the identity order is always topological
        return Architecture(best[0], best[1], self.stacks, self.cells_per_stack, self.initial_filters)

    def arch_hash(self) -> str:
        """A short hex digest equal for isomorphic cells with the same stacks/cells/filters."""
        return hashlib.sha256(self.canonical().to_json().encode()).hexdigest()[:16]

    def short_str(self) -> str:
        """E.g. ``S1C2F16 1=mish_conv3(0) 2=conv7_in_relu(0,1) out(2)``."""
        parts = [f"S{self.stacks}C{self.cells_per_stack}F{self.initial_filters}"]
        for v, op in enumerate(self.ops, start=1):
            parts.append(f"{v}={op}({','.join(map(str, self.inputs_of(v)))})")
        parts.append(f"out({','.join(map(str, self.inputs_of(self.output_vertex)))})")
        return " ".join(parts)

    def __str__(self) -> str:
        return self.short_str()


def _prune(ops: Sequence[str], edges: Iterable[Edge]) -> tuple[tuple[str, ...], tuple[Edge, ...]]:
    """Drop vertices that are not on an input->output path; renumber the rest in order."""
    output = len(ops) + 1
    edges = sorted(set(edges))
    reachable = {0}
    for a, b in edges:  # sorted by source, and sources precede targets: one pass suffices
        if a in reachable:
            reachable.add(b)
    reaches_output = {output}
    for a, b in reversed(edges):
        if b in reaches_output:
            reaches_output.add(a)
    keep = sorted(reachable & reaches_output)
    if output not in keep:
        return (), ()
    new_index = {old: new for new, old in enumerate(keep)}
    kept_edges = tuple((new_index[a], new_index[b]) for a, b in edges if a in new_index and b in new_index)
    return tuple(ops[v - 1] for v in keep[1:-1]), kept_edges


def prune_cell(
    ops: Sequence[str],
    edges: Iterable[Edge],
    *,
    stacks: int,
    cells_per_stack: int,
    initial_filters: int,
    max_edges: int = SEED_MAX_EDGES,
) -> Architecture:
    """Prune a raw cell as NAS-Bench-101 does and return it as an :class:`Architecture`.

    Raises :class:`InfeasibleArchitecture` when input and output are not connected, fewer than three
    vertices remain, or more than ``max_edges`` edges remain.
    """
    edges = tuple((int(a), int(b)) for a, b in edges)
    pruned_ops, pruned_edges = _prune(ops, edges)
    if not pruned_edges:
        raise InfeasibleArchitecture("input and output are not connected")
    if len(pruned_ops) + 2 < MIN_VERTICES:
        raise InfeasibleArchitecture(
            f"only {len(pruned_ops) + 2} vertices remain after pruning (at least {MIN_VERTICES} needed)"
        )
    if len(pruned_edges) > max_edges:
        raise InfeasibleArchitecture(
            f"{len(pruned_edges)} edges remain after pruning (at most {max_edges} allowed)"
        )
    return Architecture(pruned_ops, pruned_edges, stacks, cells_per_stack, initial_filters)
