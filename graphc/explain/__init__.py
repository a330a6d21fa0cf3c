"""`graphc.explain`: where a gradient comes from, step by step, from formula to C.

    e = graphc.explain(g, wrt="W1", at="random")
    print(e.text())                 # also .markdown(), .latex(), .html(); Jupyter shows it
    e.save("derivation.html")

For each param: the paths from the loss back to it; for every node on them, its formula in
index notation, the local derivatives SymPy derived from it (before and after
simplification) and the backward kernels they became, beside the C function computing
each; then the chain rule put together, in index and (where one exists) matrix notation.
With `at`, the same with numbers, checked against the compiled model's own gradients;
for tiny nets, the loss as one expression of the weights, differentiated directly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError, InputError
from graphc.ir import grad_name

FORMATS = ("text", "markdown", "latex", "html")
RANDOM_BATCH = 2   # examples in `at="random"`: enough to show the sum over the batch
# `at` not given: no worked example, unless wrt names an element to follow through one.
_UNSET = object()

class Explanation:
    """The derivation of a graph's gradients, for people. Build it with `graphc.explain`."""

    def __init__(self, graph, wrt, derivation, cmodule, steps, nodes, params, code, worked,
                 expanded, elements=None):
        self.graph, self.wrt, self.derivation, self.cmodule = graph, wrt, derivation, cmodule
        self.elements = elements or {}   # param -> the element asked for (NAME[i, j])
        self.steps = steps            # every backward kernel with its LocalDerivative
        self.nodes = nodes            # NodeView per node between the loss and the params
        self.params = params          # param -> ParamView
        self.code = code              # gradients-program kernel index -> CFunction
        self.worked = worked          # Worked | None
        self.expanded = expanded      # param -> Expanded (tiny nets)

    def __repr__(self) -> str:
        return f"<graphc.Explanation of ∂L/∂{{{', '.join(self.wrt)}}} in '{self.graph.name}'>"

    # ------------------------------------------------------------ formats
    def text(self) -> str:
        from .render import text
        return text(self)

    __str__ = text

    def markdown(self) -> str:
        from .render import markdown
        return markdown(self)

    def latex(self, standalone: bool = True) -> str:
        """A LaTeX document (amsmath; `pdflatex` builds it), or its body alone."""
        from .render import latex
        return latex(self, standalone)

    def html(self, standalone: bool = True) -> str:
        """One self-contained page: MathML formulas, inline SVG pictures, no network."""
        from .render import html
        return html(self, standalone)

    def render(self, format: str = "text") -> str:
        if format not in FORMATS:
            raise GraphcError(f"unknown format {format!r} (one of {', '.join(FORMATS)})")
        return getattr(self, format)()

    def save(self, path, format: str | None = None) -> Path:
        """Write one format to `path` atomically (by its suffix unless `format` is given)."""
        path = Path(path)
        if format is None:
            format = {".md": "markdown", ".tex": "latex", ".html": "html", ".htm": "html"}.get(
                path.suffix.lower(), "text")
        write_atomic(path, self.render(format))
        return path

    # Jupyter picks the richest of these it can show.
    def _repr_html_(self) -> str:
        return self.html(standalone=False)

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def _repr_latex_(self) -> str:
        from .render import latex_summary
        return latex_summary(self)

    # ------------------------------------------------------------ pictures
    def to_networkx(self, which: str = "backward"):
        """The forward graph (values, labelled with their formulas) or the backward graph
        (one node per gradient, labelled with the formula that computes it)."""
        from .graphs import backward_graph, forward_graph
        return {"forward": forward_graph, "backward": backward_graph}[which](self)

    def dot(self, which: str = "backward") -> str:
        from graphc.dot import to_dot
        return to_dot(self.to_networkx(which))

    def svg(self, which: str = "backward") -> str | None:
        """The picture as SVG when Graphviz's `dot` is installed, else None."""
        from graphc.dot import render_dot
        data = render_dot(self.dot(which), "svg")
        return data.decode("utf-8") if data is not None else None

    def render_graph(self, path, which: str = "backward") -> Path:
        """Write the picture to `path` (.svg, .png or .pdf) through Graphviz's `dot`."""
        from graphc.dot import render_dot
        path = Path(path)
        data = render_dot(self.dot(which), path.suffix.lstrip(".").lower() or "svg")
        if data is None:
            raise GraphcError("Graphviz's `dot` is not installed (Debian: apt-get install graphviz); "
                              "`.dot()` gives the graph as DOT text")
        write_atomic(path, data)
        return path


def write_atomic(path: Path, data: str | bytes) -> None:
    """The whole file or nothing."""
    from codegen.files import write_all
    write_all({Path(path): data})


def _resolve_at(graph, at, seed: int, batch: int) -> tuple[dict, dict]:
    """(inputs, params) from `at`: "random", an .npz path, or a dict of arrays. Params not
    given are drawn from their initializers with `seed`, as `graphc.compile` (and
    `graphc.reference`) draw them; not through a Reference, which is not free to build."""
    from graphc.init import start_params
    from graphc.verify import sample_inputs
    from .numbers import input_seed
    drawn = start_params(graph, seed)
    params = {k: np.asarray(v, np.float64) for k, v in drawn.items()}
    if isinstance(at, str) and at == "random":
        return sample_inputs(graph, batch, input_seed(seed)), params
    if isinstance(at, (str, os.PathLike)):
        from graphc.npz import MAX_NPZ_MEMBER_BYTES, NpzReader
        with NpzReader(at, "at") as z:   # damaged or renamed files: one InputError
            z.refuse_larger_than(MAX_NPZ_MEMBER_BYTES, "more than any model's params")
            at = z.read_all()
    if not isinstance(at, dict):
        raise GraphcError(f"at: expected 'random', an .npz path or a dict of arrays, got {type(at).__name__}")
    unknown = sorted(set(at) - set(graph.inputs) - set(graph.params))
    if unknown:
        raise InputError(f"at: {unknown[0]!r} is neither an input nor a param of '{graph.name}' "
                         f"(inputs: {', '.join(graph.inputs)}; params: {', '.join(graph.params)})")
    inputs = {k: np.asarray(v, dtype=np.float64) for k, v in at.items() if k in graph.inputs}
    params.update({k: np.asarray(v, dtype=np.float64) for k, v in at.items() if k in graph.params})
    return inputs, params


def _worked(graph, d, steps, wrt, at, seed, batch, elements):
    import graphc
    from graphc.derive import LOSS_MEAN
    from graphc.reference import Reference

    from .numbers import Worked, _shape, run, trace
    inputs, params = _resolve_at(graph, at, seed, batch)
    model = graphc.compile(graph, dtype="float64", seed=seed)
    model.set_params(params)     # checks every shape
    loss_c, grads_c = model.gradients(**inputs)   # checks the inputs
    ref = Reference(graph, "float64")
    ref.set_params(params)
    values = ref.training_values(**inputs)   # what the gradients program computes
    n = len(next(iter(inputs.values())))
    prog = d.gradients
    env0 = {k: np.asarray(v, np.float64).reshape(_shape(prog.buffers[k], n))
            for k, v in {**inputs, **params}.items() if k in prog.buffers}
    env = run(prog, env0, n)
    w = Worked(n, inputs, params, env, values, grads_c, loss_c)

    def diff(a, b):
        a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
        return float(np.max(np.abs(a - b))) if a.size else 0.0

    # Forward values: the formulas against the independent NumPy reference.
    fwd = max(diff(env[v], values[v]) for v in graph.ancestors([graph.loss]) if v in env)
    w.checks.append(("forward values (formulas) vs graphc.reference", fwd, fwd <= 1e-9))
    err = abs(float(env[LOSS_MEAN][0]) - loss_c)
    w.checks.append(("loss L (formulas) vs the compiled C", err, err <= 1e-9 * max(1, abs(loss_c))))
    for p in graph.trainable_params:
        e = diff(env[grad_name(p)], grads_c[p])
        scale = max(1.0, float(np.max(np.abs(grads_c[p]))) if grads_c[p].size else 1.0)
        w.checks.append((f"∂L/∂{p} (chain rule, step by step) vs model.gradients (C)", e, e <= 1e-9 * scale))
    for p in wrt:
        w.traces[p] = trace(steps, p, env, prog.buffers, n, elements.get(p))
    return w


def explain(graph, wrt=None, *, at=_UNSET, dtype: str = "float32", expand: bool | None = None,
            seed: int = 0, batch: int = RANDOM_BATCH) -> Explanation:
    """The derivation of ∂L/∂`wrt` (a param name, a list of them, or every param).

    graph:  a Graph, a spec dict or a spec path.
    wrt:    a param (W1), or one element of it (W1[0, 3]) whose chain rule the worked
            example follows to the loss; by default the largest element is followed.
    at:     numbers for a worked example: "random" (`batch` examples drawn like
            `graphc check` draws them, params from their initializers with `seed`), an
            .npz path or a dict of input arrays (and optionally params), or None. Needs a C
            compiler: the numbers are checked against the compiled model (float64). Not
            given: None, or "random" when wrt names an element.
    dtype:  of the C shown beside each step ("float32", what `graphc compile` writes).
    expand: the loss as one SymPy expression of the weights, differentiated directly;
            by default for nets of at most 64 parameter scalars. Written out, an L that
            grows past a few hundred operations is omitted (with a one-line note).
    """
    from graphc.pipeline import to_c
    from codegen.targets import get_target
    from graphc.derive import derive
    from graphc.model import as_graph, check_dtype

    from .derivation import between, code_map, node_views, pair_steps, param_view, select
    from .numbers import expand_all, expandable
    source = graph if isinstance(graph, (str, os.PathLike)) else None
    graph = as_graph(graph)
    try:
        chosen, elements = select(graph, wrt)
        if at is _UNSET:
            at = "random" if elements else None
        elif at is None and elements:
            raise GraphcError(f"wrt: {', '.join(f'{p}{list(i)}' for p, i in elements.items())} names "
                              f"an element to follow through the worked example, but at=None "
                              f"(--at none) asks for none")
    except GraphcError as e:
        if source is None:
            raise
        raise GraphcError(f"{source}: {e}") from None
    d = derive(graph)
    # The C beside each step is the plain-loop form (as Cortex-M targets print it): the
    # register-blocked tiles of the c99 and host targets compute the same sums, but
    # their text reads as tiles, not as the formula (codegen/tiles.py).
    plain = dataclasses.replace(get_target("c99"), vector_bytes=0)
    cm = to_c(graph, check_dtype(dtype), plain, derivation=d)
    code = code_map(d.gradients, cm)
    steps = pair_steps(d)
    relevant = set().union(*[between(graph, p) for p in chosen])
    nodes = node_views(graph, d, steps, relevant)
    by_name = {v.name: v for v in nodes}
    params = {p: param_view(graph, d, p, by_name) for p in chosen}
    shown = [s for v in nodes for s in v.steps]
    worked = _worked(graph, d, shown, chosen, at, seed, batch, elements) if at is not None else None
    if expand is None:
        expand = expandable(graph)
    # Bounded: an L that grows past a few hundred operations is left out, with a note.
    expanded = expand_all(d.gradients, graph, [p for p in chosen if params[p].paths],
                          seed) if expand else {}
    return Explanation(graph, chosen, d, cm, steps, nodes, params, code, worked, expanded, elements)


__all__ = ["Explanation", "explain"]

