"""Graphviz text for a networkx graph, and its picture: shared by `explain` (the derivation's
graphs) and the notebook displays (a Graph's picture), without either importing the other.

DOT is written here (a few lines) rather than through pydot or pygraphviz, so that neither
is needed; Graphviz's `dot` program draws it when installed."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

from .errors import GraphcError

if TYPE_CHECKING:
    import networkx as nx

HIGHLIGHT = "#0b62c4"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(d: dict) -> str:
    return ", ".join(f"{k}={_quote(str(v))}" for k, v in d.items())


def to_dot(g: nx.DiGraph) -> str:
    lines = [f"digraph {_quote(g.graph.get('name', 'g'))} {{",
             f"  graph [rankdir={g.graph.get('rankdir', 'TB')}, fontname=\"DejaVu Sans\"];",
             '  node [fontname="DejaVu Sans", fontsize=11, style=rounded];',
             '  edge [fontname="DejaVu Sans", fontsize=9];']
    for n, d in g.nodes(data=True):
        lines.append(f"  {_quote(str(n))} [{_attrs(d)}];")
    for a, b, d in g.edges(data=True):
        lines.append(f"  {_quote(str(a))} -> {_quote(str(b))}" + (f" [{_attrs(d)}]" if d else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot: str, fmt: str = "svg") -> bytes | None:
    """`dot -T<fmt>` on the text; None when Graphviz is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    if fmt not in ("svg", "png", "pdf"):
        raise GraphcError(f"picture format must be svg, png or pdf, got {fmt!r}")
    done = subprocess.run([exe, f"-T{fmt}"], input=dot.encode("utf-8"), capture_output=True,
                          timeout=120)
    if done.returncode != 0:
        raise GraphcError(f"Graphviz's dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout
