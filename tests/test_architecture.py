from __future__ import annotations

import random

import networkx as nx
import pytest
from networkx.algorithms.isomorphism import categorical_node_match

from nas3d.architecture import Architecture, InfeasibleArchitecture, prune_cell
from nas3d.ops import OPS

OP_NAMES = list(OPS)
MACRO = {"stacks": 1, "cells_per_stack": 2, "initial_filters": 16}


def make(ops, edges, **macro) -> Architecture:
    return prune_cell(ops, edges, **{**MACRO, **macro})


def test_input_to_output_only_is_infeasible() -> None:
    with pytest.raises(InfeasibleArchitecture, match="only 2 vertices remain"):
        make(["relu_conv3"], [(0, 2)])


def test_disconnected_is_infeasible() -> None:
    with pytest.raises(InfeasibleArchitecture, match="not connected"):
        make(["relu_conv3", "mish_conv3"], [(0, 1), (2, 3)])


def test_dangling_vertex_is_pruned_and_renumbered() -> None:
    # vertex 2 feeds nothing, vertex 3 has no input: both go, vertex 4 becomes vertex 2
    arch = make(["relu_conv3", "mish_conv5", "conv3_in_relu", "conv7_in_mish"],
                [(0, 1), (0, 2), (1, 4), (3, 5), (4, 5)])
    assert arch.ops == ("relu_conv3", "conv7_in_mish")
    assert arch.edges == ((0, 1), (1, 2), (2, 3))


def test_more_than_nine_edges_after_pruning_is_infeasible() -> None:
    ops = ["relu_conv3"] * 5
    dense = [(a, b) for b in range(1, 7) for a in range(b)]  # all 21 edges
    with pytest.raises(InfeasibleArchitecture, match="21 edges remain after pruning"):
        make(ops, dense)
    # the same cell is fine when a study widens the edge limit
    assert len(make(ops, dense, max_edges=21).edges) == 21


def test_edges_beyond_the_limit_may_be_pruned_away() -> None:
    # ten edges before pruning, but the dangling vertex 5 takes two with it
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (0, 2), (0, 3), (1, 4), (0, 5), (1, 5)]
    assert len(make(["relu_conv3"] * 5, edges).edges) == 8


def test_constructor_rejects_unpruned_or_malformed_cells() -> None:
    with pytest.raises(ValueError, match="not pruned"):
        Architecture(("relu_conv3", "relu_conv5"), ((0, 1), (1, 3)), 1, 1, 8)
    with pytest.raises(ValueError, match="0 <= from < to <= 2"):
        Architecture(("relu_conv3",), ((1, 0), (1, 2)), 1, 1, 8)
    with pytest.raises(ValueError, match="Did you mean 'mish_conv3'"):
        Architecture(("mish_conv_3",), ((0, 1), (1, 2)), 1, 1, 8)
    with pytest.raises(ValueError, match="stacks must be a positive integer"):
        Architecture(("relu_conv3",), ((0, 1), (1, 2)), 0, 1, 8)


def random_architecture(rng: random.Random) -> Architecture:
    while True:
        n = rng.randint(1, 5)
        edges = [(a, b) for b in range(1, n + 2) for a in range(b) if rng.random() < 0.4]
        try:
            return make([rng.choice(OP_NAMES) for _ in range(n)], edges,
                        stacks=rng.choice([1, 2]), cells_per_stack=rng.choice([1, 2]),
                        initial_filters=rng.choice([8, 16, 32]))
        except InfeasibleArchitecture:
            continue


def relabel(arch: Architecture, rng: random.Random) -> Architecture:
    """The same graph under a random topological renumbering of its operation vertices."""
    n = len(arch.ops)
    while True:
        order = list(range(1, n + 1))
        rng.shuffle(order)
        new = {old: new for new, old in enumerate(order, start=1)} | {0: 0, n + 1: n + 1}
        edges = [(new[a], new[b]) for a, b in arch.edges]
        if all(a < b for a, b in edges):
            ops = [None] * n
            for old, op in enumerate(arch.ops, start=1):
                ops[new[old] - 1] = op
            return Architecture(tuple(ops), tuple(edges), arch.stacks, arch.cells_per_stack,
                                arch.initial_filters)


def test_hash_equal_for_relabelled_isomorphic_cells() -> None:
    # two parallel branches listed in either order
    a = make(["relu_conv3", "mish_conv5", "conv3_in_relu"], [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)])
    b = make(["mish_conv5", "relu_conv3", "conv3_in_relu"], [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)])
    assert a != b and a.arch_hash() == b.arch_hash()
    rng = random.Random(1)
    for _ in range(200):
        arch = random_architecture(rng)
        assert relabel(arch, rng).arch_hash() == arch.arch_hash()


def single_changes(arch: Architecture):
    for i in range(len(arch.ops)):
        other = next(op for op in OP_NAMES if op != arch.ops[i])
        yield arch.__class__(arch.ops[:i] + (other,) + arch.ops[i + 1:], arch.edges,
                             arch.stacks, arch.cells_per_stack, arch.initial_filters)
    out = arch.output_vertex
    for edge in [(a, b) for b in range(1, out + 1) for a in range(b)]:
        edges = set(arch.edges) ^ {edge}
        try:
            yield make(arch.ops, edges, stacks=arch.stacks, cells_per_stack=arch.cells_per_stack,
                       initial_filters=arch.initial_filters, max_edges=21)
        except InfeasibleArchitecture:
            pass
    for field, values in (("stacks", (1, 2, 3)), ("cells_per_stack", (1, 2, 3)),
                          ("initial_filters", (8, 16, 32))):
        for v in values:
            if v != getattr(arch, field):
                yield Architecture.from_dict(arch.to_dict() | {field: v})


def test_hash_differs_for_any_single_op_edge_or_macro_change() -> None:
    rng = random.Random(2)
    for _ in range(30):
        arch = random_architecture(rng)
        h = arch.arch_hash()
        for changed in single_changes(arch):
            if changed.canonical() != arch.canonical():
                assert changed.arch_hash() != h, (arch, changed)


def test_json_round_trip_and_short_string() -> None:
    rng = random.Random(3)
    for _ in range(100):
        arch = random_architecture(rng)
        assert Architecture.from_json(arch.to_json()) == arch
    arch = make(["mish_conv3", "conv7_in_relu"], [(0, 1), (0, 2), (1, 2), (2, 3)])
    assert arch.short_str() == "S1C2F16 1=mish_conv3(0) 2=conv7_in_relu(0,1) out(2)"


def test_from_dict_names_unknown_and_missing_keys() -> None:
    data = make(["relu_conv3"], [(0, 1), (1, 2)]).to_dict()
    data["filters"] = data.pop("initial_filters")
    with pytest.raises(ValueError, match=r"unknown=\['filters'\] missing=\['initial_filters'\]"):
        Architecture.from_dict(data)


# --- the canonical hash against an independent isomorphism check ------------------------------------


def labelled_graph(arch: Architecture) -> nx.DiGraph:
    """The cell as networkx sees it: input and output labelled as such, operation vertices by op."""
    graph = nx.DiGraph()
    labels = ["input", *arch.ops, "output"]
    graph.add_nodes_from((v, {"op": label}) for v, label in enumerate(labels))
    graph.add_edges_from(arch.edges)
    return graph


def same_architecture(a: Architecture, b: Architecture) -> bool:
    """Same macro settings and isomorphic labelled cells, decided by networkx (VF2), not by nas3d."""
    def macro(x: Architecture) -> tuple[int, int, int]:
        return x.stacks, x.cells_per_stack, x.initial_filters

    return macro(a) == macro(b) and nx.is_isomorphic(labelled_graph(a), labelled_graph(b),
                                      node_match=categorical_node_match("op", None))


def moved_edge(arch: Architecture, rng: random.Random) -> Architecture | None:
    """The same ops with one edge moved to a free slot, keeping every vertex on an input->output path
    (None when no move does)."""
    out = arch.output_vertex
    free = [(a, b) for b in range(1, out + 1) for a in range(b) if (a, b) not in arch.edges]
    for _ in range(20 if free else 0):
        edges = set(arch.edges) - {rng.choice(arch.edges)} | {rng.choice(free)}
        try:
            return Architecture(arch.ops, tuple(edges), arch.stacks, arch.cells_per_stack,
                                arch.initial_filters)
        except ValueError:  # a vertex lost its only input or output: no longer the same ops
            continue
    return None


def swapped_ops(arch: Architecture, rng: random.Random) -> Architecture | None:
    """The same graph with the ops of two vertices exchanged (None when there is nothing to swap)."""
    if len(set(arch.ops)) < 2:
        return None
    i, j = rng.sample(range(len(arch.ops)), 2)
    while arch.ops[i] == arch.ops[j]:
        i, j = rng.sample(range(len(arch.ops)), 2)
    ops = list(arch.ops)
    ops[i], ops[j] = ops[j], ops[i]
    return Architecture(tuple(ops), arch.edges, arch.stacks, arch.cells_per_stack, arch.initial_filters)


def small_random_architecture(rng: random.Random) -> Architecture:
    """From a tiny space (two ops, up to three vertices, one macro), so independent draws often coincide."""
    while True:
        n = rng.randint(1, 3)
        edges = [(a, b) for b in range(1, n + 2) for a in range(b) if rng.random() < 0.5]
        try:
            return make([rng.choice(OP_NAMES[:2]) for _ in range(n)], edges, max_edges=21)
        except InfeasibleArchitecture:
            continue


def test_equal_hash_iff_isomorphic_on_random_pairs() -> None:
    rng = random.Random(6)
    pairs: dict[str, list[tuple[Architecture, Architecture]]] = {
        "relabelled": [], "edge moved": [], "ops swapped": [], "macro changed": [], "independent": []
    }
    def add(kind: str, a: Architecture, b: Architecture | None) -> None:
        if b is not None and len(pairs[kind]) < 300:
            pairs[kind].append((a, b))

    while min(len(p) for p in pairs.values()) < 300:
        arch = random_architecture(rng)
        renumbered = relabel(arch, rng)
        add("relabelled", arch, renumbered if renumbered != arch else None)  # a copy proves nothing
        # the close calls, renumbered too, so that equal labels cannot stand in for equal graphs
        for kind, other in (("edge moved", moved_edge(arch, rng)), ("ops swapped", swapped_ops(arch, rng))):
            add(kind, arch, other and relabel(other, rng))
        field = rng.choice(["stacks", "cells_per_stack", "initial_filters"])
        changed = Architecture.from_dict(arch.to_dict() | {field: 2 * getattr(arch, field)})
        add("macro changed", arch, relabel(changed, rng))
        add("independent", small_random_architecture(rng), small_random_architecture(rng))

    verdicts: dict[str, list[bool]] = {}
    for kind, kind_pairs in pairs.items():
        verdicts[kind] = []
        for a, b in kind_pairs:
            isomorphic = same_architecture(a, b)
            assert (a.arch_hash() == b.arch_hash()) == isomorphic, (kind, isomorphic, a, b)
            assert (a.canonical() == b.canonical()) == isomorphic, (kind, isomorphic, a, b)
            verdicts[kind].append(isomorphic)
    # both directions are exercised, and the close calls are mostly, not always, different graphs
    assert all(verdicts["relabelled"]) and not any(verdicts["macro changed"])
    for kind in ("edge moved", "ops swapped", "independent"):
        assert verdicts[kind].count(False) >= 100, (kind, verdicts[kind].count(False))
    assert verdicts["independent"].count(True) >= 20, verdicts["independent"].count(True)
