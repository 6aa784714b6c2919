"""Pictures of architectures: the cell DAG, one vertex per op, with the S×C×F macro settings, by Graphviz.

Drawn with the ``graphviz`` package, which renders through Graphviz's ``dot`` program (Debian package
``graphviz``). :func:`architecture_graph` is the graph handed to Graphviz, so what it holds (every op
vertex, every edge) is what the picture shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import graphviz

from nas3d.architecture import Architecture
from nas3d.util import atomic_write

__all__ = ["PICTURE_SUFFIX", "PictureUnavailable", "architecture_graph", "architecture_svg", "check_dot",
           "vertex_name", "write_picture"]

#: Pictures are SVG: text stays text (searchable, testable) and browsers show it in the artifact view.
PICTURE_SUFFIX = ".svg"


#: What is missing, and the fix, when Graphviz is not installed.
MISSING_DOT = "Graphviz's `dot` is not on the PATH; install Graphviz (Debian: apt-get install graphviz)"


class PictureUnavailable(RuntimeError):
    """Graphviz cannot draw here; ``str(exc)`` says why in one line (what is missing, or what dot said)."""


def check_dot() -> None:
    """Raise :class:`PictureUnavailable` when Graphviz's ``dot`` is not on the PATH (before anything is
    written that would need a picture beside it)."""
    if shutil.which("dot") is None:
        raise PictureUnavailable(MISSING_DOT)


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
    """The picture of ``arch`` as SVG bytes; :class:`PictureUnavailable` without ``dot`` or when it fails."""
    try:
        # quiet: what dot says goes into the one-line reason, not onto the user's terminal as well
        return architecture_graph(arch, title).pipe(format="svg", quiet=True)
    except graphviz.ExecutableNotFound:
        raise PictureUnavailable(MISSING_DOT) from None
    except graphviz.CalledProcessError as e:  # e.g. a Graphviz without its layout plugins (`dot -c` not run)
        said = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        reason = said[0] if said else f"exit status {e.returncode}"
        raise PictureUnavailable(f"Graphviz's `dot` failed: {reason}") from None


def write_picture(arch: Architecture, path: str | Path, title: str | None = None) -> Path:
    """Write the SVG picture of ``arch`` to ``path``, atomically (drawn first: a failure writes nothing)."""
    svg = architecture_svg(arch, title)
    return atomic_write(path, lambda file: file.write(svg))
