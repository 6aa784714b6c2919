"""Pictures of architectures: the cell DAG, one vertex per op, with the S×C×F macro settings, by Graphviz.

Drawn with the ``graphviz`` package, which renders through Graphviz's ``dot`` program (Debian package
``graphviz``). :func:`architecture_graph` is the graph handed to Graphviz, so what it holds (every op
vertex, every edge) is what the picture shows.
"""

from __future__ import annotations

from pathlib import Path

import graphviz

from nas3d.architecture import Architecture

__all__ = ["PICTURE_SUFFIX", "architecture_graph", "architecture_svg", "vertex_name", "write_picture"]

#: Pictures are SVG: text stays text (searchable, testable) and browsers show it in the artifact view.
PICTURE_SUFFIX = ".svg"


def vertex_name(vertex: int) -> str:
    """The Graphviz node id of cell vertex ``vertex`` (``v0`` is the input)."""
    return f"v{vertex}"


def macro_label(arch: Architecture) -> str:
    widths = " → ".join(map(str, arch.stack_widths()))
    return (f"S{arch.stacks}×C{arch.cells_per_stack}×F{arch.initial_filters}: {arch.stacks} stack(s) × "
            f"{arch.cells_per_stack} cell(s), channels {widths}")


def architecture_graph(arch: Architecture, title: str | None = None) -> graphviz.Digraph:
    """The cell of ``arch`` as a Graphviz digraph: ``in``, one box per op vertex labelled
    ``<vertex>: <op>``, ``out`` (which adds the cell input: a residual), every edge, and the macro
    settings (and ``title``) as the graph's label."""
    graph = graphviz.Digraph("cell", graph_attr={"rankdir": "TB", "labelloc": "t", "fontsize": "12",
                                                 "fontname": "Helvetica"},
                             node_attr={"fontname": "Helvetica", "fontsize": "11"})
    label = macro_label(arch)
    graph.attr(label=f"{title}\n{label}" if title else label)
    graph.node(vertex_name(0), "in", shape="oval", style="filled", fillcolor="#dde8f5")
    for vertex, op in enumerate(arch.ops, start=1):
        graph.node(vertex_name(vertex), f"{vertex}: {op}", shape="box", style="rounded,filled",
                   fillcolor="#fdf3d6")
    graph.node(vertex_name(arch.output_vertex), "out (+ in)", shape="oval", style="filled",
               fillcolor="#dde8f5")
    for a, b in arch.edges:
        graph.edge(vertex_name(a), vertex_name(b))
    return graph


def architecture_svg(arch: Architecture, title: str | None = None) -> bytes:
    """The picture of ``arch`` as SVG bytes. Raises ``graphviz.ExecutableNotFound`` without ``dot``."""
    return architecture_graph(arch, title).pipe(format="svg")


def write_picture(arch: Architecture, path: str | Path, title: str | None = None) -> Path:
    """Write the SVG picture of ``arch`` to ``path``."""
    path = Path(path)
    path.write_bytes(architecture_svg(arch, title))
    return path
