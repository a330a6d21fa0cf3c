"""The forward and backward graphs as networkx graphs; graphc.dot writes their DOT text and
draws them."""

from __future__ import annotations

import textwrap

import networkx as nx
import sympy as sp

from graphc.dot import HIGHLIGHT

from . import notation as nt

WRAP = 64   # characters per label line


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, WRAP, break_long_words=False, break_on_hyphens=False)
                     or [""])


def _on_path(expl) -> set[str]:
    return {v for pv in expl.params.values() for v in pv.on_path}


def forward_graph(expl) -> nx.DiGraph:
    """Values as nodes (labelled with name, op, shape and formula), an edge per use."""
    g = nx.DiGraph(name=f"{expl.graph.name}_forward", rankdir="BT")
    kernels = expl.derivation.gradients.kernels
    path = _on_path(expl)
    for v in expl.graph.values.values():
        if v.kind == "node":
            from .derivation import forward_kernels
            own = [kernels[i] for i in forward_kernels(kernels, v.name)]
            formulas = [nt.kernel_equation(k, (), expl.derivation.gradients.buffers).text for k in own]
            label = f"{v.name} = {v.op}({', '.join(v.inputs)})  {list(v.shape)}\n" + \
                "\n".join(_wrap(f) for f in formulas)
        else:
            label = f"{v.name}  ({v.kind})  {list(v.shape)}"
        attrs = {"label": label, "shape": "box" if v.kind == "node" else "ellipse"}
        if v.name in path:
            attrs.update(color=HIGHLIGHT, penwidth="2")
        g.add_node(v.name, **attrs)
    for v in expl.graph.values.values():
        for i in dict.fromkeys(v.inputs):
            g.add_edge(i, v.name, **({"color": HIGHLIGHT, "penwidth": "2"}
                                     if i in path and v.name in path else {}))
    return g


def backward_graph(expl) -> nx.DiGraph:
    """One node per gradient (δv = ∂L/∂v), labelled with the kernels computing it; an
    edge from each δ a kernel reads (or from L) to the δ it writes, labelled with the
    local derivative used."""
    from .derivation import local_partial, local_rhs
    from .numbers import split_seed
    g = nx.DiGraph(name=f"{expl.graph.name}_backward", rankdir="TB")
    path = _on_path(expl)
    params = expl.graph.params
    g.add_node("L", label=f"L = (1/n)·Σ_b {expl.graph.loss}[b]", shape="ellipse",
               color=HIGHLIGHT, penwidth="2")
    for s in expl.steps:
        target = s.kernel.out
        eq = nt.kernel_equation(s.kernel, params, expl.derivation.gradients.buffers).text
        if target in g:
            g.nodes[target]["label"] += "\n" + _wrap(eq)
        else:
            attrs = {"label": _wrap(eq), "shape": "box"}
            name = nt.value_name(target)
            if name in path or any(name.startswith(p + ".") for p in path):
                attrs.update(color=HIGHLIGHT, penwidth="2")
            g.add_node(target, **attrs)
        seed, _ = split_seed(s.kernel)
        reads = [a for a in sp.Mul.make_args(seed) if isinstance(a, sp.Indexed)]
        source = str(reads[0].base.label) if reads else "L"
        bufs = expl.derivation.gradients.buffers
        local = local_partial(s.local, bufs).text + " = " + nt.show(local_rhs(s.local, s.simplified, bufs)).text
        g.add_edge(source, target, label=_wrap(local),
                   **({"color": HIGHLIGHT} if g.nodes[target].get("color") else {}))
    return g
