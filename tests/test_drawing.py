"""Architecture pictures: every op vertex and every edge of the cell, and the macro settings, in the SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nas3d.architecture import Architecture
from nas3d.drawing import PictureUnavailable, architecture_graph, architecture_svg, check_dot, vertex_name
from nas3d.seeds import seed_architectures

SVG = "{http://www.w3.org/2000/svg}"


def without_dot(folder: Path, monkeypatch: pytest.MonkeyPatch, *, broken: bool = False) -> None:
    """Make ``folder`` the whole PATH: no Graphviz at all, or (``broken``) a ``dot`` that fails as one
    installed without its layout plugins answers (seen while apt-get ran)."""
    folder.mkdir()
    if broken:
        dot = folder / "dot"
        dot.write_text('#!/bin/sh\necho \'There is no layout engine support for "dot"\' >&2\nexit 1\n')
        dot.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))


def parse(svg: bytes) -> tuple[dict[str, str], set[tuple[str, str]], list[str]]:
    """Nodes (id -> label), edges (from id, to id) and the graph label lines of a Graphviz SVG."""
    root = ET.fromstring(svg)
    nodes, edges = {}, set()
    for group in root.iter(f"{SVG}g"):
        title = group.findtext(f"{SVG}title")
        texts = [t.text for t in group.iter(f"{SVG}text")]
        if group.get("class") == "node":
            nodes[title] = " ".join(texts)
        elif group.get("class") == "edge":
            a, b = title.split("->")
            edges.add((a, b))
    graph = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "graph")
    labels = [t.text for t in graph.findall(f"{SVG}text")]
    return nodes, edges, labels


@pytest.mark.usefixtures("graphviz_dot")
@pytest.mark.parametrize("dataset", sorted(seed_architectures()))
def test_picture_shows_every_op_and_edge_and_the_macro_settings(dataset: str) -> None:
    arch = seed_architectures()[dataset]
    nodes, edges, labels = parse(architecture_svg(arch, title=dataset))
    assert nodes[vertex_name(0)] == "in" and nodes[vertex_name(arch.output_vertex)] == "out (+ in)"
    for vertex, op in enumerate(arch.ops, start=1):
        assert nodes[vertex_name(vertex)] == f"{vertex}: {op}"
    assert len(nodes) == arch.num_vertices
    assert edges == {(vertex_name(a), vertex_name(b)) for a, b in arch.edges}
    assert labels[0] == dataset
    assert labels[1].startswith(f"S{arch.stacks}×C{arch.cells_per_stack}×F{arch.initial_filters}:")


def test_the_graph_handed_to_graphviz_is_the_cell() -> None:
    arch = Architecture(("relu_conv3", "mish_conv5"), ((0, 1), (0, 2), (1, 2), (2, 3)), 2, 1, 16)
    source = architecture_graph(arch).source
    for a, b in arch.edges:
        assert f"\t{vertex_name(a)} -> {vertex_name(b)}\n" in source
    assert source.count(" -> ") == len(arch.edges)
    assert 'v1 [label="1: relu_conv3"' in source and 'v2 [label="2: mish_conv5"' in source
    assert "channels 16 → 32" in source


@pytest.mark.parametrize("broken", [False, True], ids=["missing", "failing"])
def test_without_a_working_dot_the_picture_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    arch = seed_architectures()["adrenalmnist3d"]
    without_dot(tmp_path / "bin", monkeypatch, broken=broken)
    if not broken:
        with pytest.raises(PictureUnavailable, match="^Graphviz's `dot` is not on the PATH; install"):
            check_dot()
    expected = ('failed: There is no layout engine support for "dot"$' if broken
                else "not on the PATH; install Graphviz .*graphviz\\)$")
    with pytest.raises(PictureUnavailable, match=expected) as raised:
        architecture_svg(arch)
    assert "\n" not in str(raised.value)
