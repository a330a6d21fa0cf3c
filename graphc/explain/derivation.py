"""The derivation of a graph's gradients, gathered for people to read.

Nothing here differentiates anything new. The local derivatives are the very
`LocalDerivative` records `graphc.derive.derive` made (the ones the C uses), each paired
with the backward kernel it became; the C shown is the text `codegen.emit.emit` produced,
found through the calls of `<name>_gradients`. What this module adds is bookkeeping for
the reader: which nodes lie between the loss and a param, each node's contributions
composed into one formula per input, and the chain of those formulas down to the param.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import sympy as sp

from graphc.derive import LOSS_MEAN, Derivation, LocalDerivative
from graphc.errors import GraphcError
from graphc.graph import Graph
from graphc.ir import ACC, BATCH, MAX, SUM, Kernel, Program, array, grad_name, index_symbols

from . import notation as nt
from .bounds import expansion_work, small

MAX_PATHS = 12        # paths listed per param; a net with many skips has exponentially many
SIMPLIFY_OPS = 60     # larger derivatives are shown as derived (simplify's time grows fast)
EXPAND_TERMS = 2000   # a reading that would expand to more terms (estimated) is not shown
BATCH_INDEX = sp.Symbol("b", integer=True, nonnegative=True)   # as graphc.ops names it


# ---------------------------------------------------------------- the C side

@dataclass(frozen=True)
class CFunction:
    """One static kernel function of the generated C, and how `<name>_gradients` calls it."""
    name: str                            # W1_grad
    text: str                            # the function, its comment first
    call: str                            # the call in <name>_gradients
    arguments: tuple[tuple[str, str, str], ...]   # (C parameter, buffer, pointer expression)
    parts: tuple[str, ...] = ()          # notes of the derived kernels fusion merged into it


def code_map(program: Program, cm, kind: str = "gradients") -> dict[int, CFunction]:
    """Kernel index in the derived (unfused) program -> the C function of module `cm` that
    computes it, from the module's own map: fusion's `origins` (which derived kernels each
    fused kernel computes) and `CModule.calls` (which function each fused kernel is)."""
    fused = cm.entries[kind].program
    if fused is None or fused.origins is None or len(cm.calls.get(kind, ())) != len(fused.kernels):
        return {}   # a prepared module keeps no program: show no C, never wrong C
    out = {}
    for call, origin in zip(cm.calls[kind], fused.origins):
        fn = CFunction(call.function, cm.functions[call.function], call.text, call.arguments,
                       tuple(program.kernels[i].note for i in origin))
        out.update(dict.fromkeys(origin, fn))
    return out


# ---------------------------------------------------------------- the derivation's parts

@dataclass(frozen=True)
class Step:
    """One term of the chain rule: the backward kernel

        δtarget[idx] (= | +=) δout[o] · (local derivative)     over the kernel's loops

    that `derive` emitted for one local derivative."""
    index: int                 # position in the gradients program
    kernel: Kernel             # the backward kernel
    local: LocalDerivative     # derive's record: formula kernel, read, derived, used
    simplified: sp.Expr        # the derivative after simplification (or its output form)
    sigmoid_form: sp.Expr | None   # the same written through σ, when that is exact

    @property
    def target(self) -> str:
        """The value (or node-internal temp) whose gradient this adds to."""
        return nt.value_name(self.kernel.out)


@dataclass(frozen=True)
class Combined:
    """A node's whole contribution to one input's gradient, its kernels composed."""
    target: str
    index: tuple
    expr: sp.Expr                    # as the kernels compute it, temps substituted
    reading: sp.Expr | None = None   # the textbook form, valid under `condition`
    condition: str | None = None
    where: tuple = ()                # (name, definition) pairs the forms use


@dataclass
class NodeView:
    name: str
    op: str
    forward: list[int]               # forward kernels (indices into the gradients program)
    steps: list[Step]
    combined: dict[str, Combined] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ChainLink:
    """δvalue written from its consumers' contributions (or ∂L/∂param for the param)."""
    value: str
    lhs: nt.Math
    rhs: nt.Math
    matrix: nt.Math | None
    reading: nt.Math | None = None
    condition: str | None = None
    where: tuple = ()


@dataclass
class ParamView:
    param: str
    on_path: list[str]               # values between the loss and the param, loss first
    paths: list[list[str]]           # each from the loss down to the param
    more_paths: int                  # paths not listed
    chain: list[ChainLink]
    final: list[Step]                # the steps that write the param's gradient


# ---------------------------------------------------------------- simplification for display

def _collapse_piecewise(expr: sp.Expr) -> sp.Expr:
    """Piecewise with branches SymPy proves equal -> that one expression (tried only when
    every branch is small: simplify's time grows fast with size)."""
    def one(*args):
        branches = [(sp.simplify(v) if small(v, SIMPLIFY_OPS) else v, c) for v, c in args]
        if all(small(v, SIMPLIFY_OPS) for v, _ in branches) \
                and all(sp.simplify(v - branches[0][0]) == 0 for v, _ in branches[1:]):
            return branches[0][0]
        return sp.Piecewise(*branches)
    return expr.replace(sp.Piecewise, one)


def _exp_written(expr: sp.Expr) -> sp.Expr:
    """expr with the functions formulas keep whole (graphc's own, such as sigmoid and
    softplus, whatever their class) written out through exp; SymPy's own stay."""
    def own(f) -> bool:
        return isinstance(f, sp.Function) and not type(f).__module__.startswith("sympy.") \
            and hasattr(f, "_eval_rewrite_as_exp")
    return expr.replace(own, lambda f: f.rewrite(sp.exp)) if expr.has(sp.Function) else expr


def simplified(rec: LocalDerivative) -> sp.Expr:
    """What a reader would write: the output form when the C uses it, else the shortest of
    the derivative, its factored form and SymPy's simplification."""
    if rec.output_form:
        return rec.used
    d = rec.derived
    options = [d, sp.factor_terms(d)]
    if d.has(sp.Piecewise):
        options.append(_collapse_piecewise(d))
    elif small(d, SIMPLIFY_OPS):
        options.append(sp.simplify(d))
    return min(options, key=lambda e: (sp.count_ops(e), options.index(e)))


class sigma(sp.Function):
    """σ(x) = 1/(1 + exp(-x)), for display only."""

    def _graphc_text(self, printer):
        return f"σ({printer._print(self.args[0])})"

    def _graphc_latex(self, printer):
        return r"\sigma\left(" + printer._print(self.args[0]) + r"\right)"


def sigmoid_form(expr: sp.Expr, read: sp.Indexed) -> sp.Expr | None:
    """`expr` written through σ(read), when exp(±read) are its only uses of the read:
    sigmoid' = σ(1 - σ) and bce_with_logits' = σ(z) - t come out this way."""
    if not small(expr, 4 * SIMPLIFY_OPS):
        return None
    expr = _exp_written(expr)
    if not expr.has(sp.exp(read)) and not expr.has(sp.exp(-read)):
        return None
    S = sp.Dummy("S")
    whole = _collapse_piecewise(expr)
    e = whole.subs({sp.exp(read): S / (1 - S), sp.exp(-read): (1 - S) / S})
    if e.has(read) or e.has(sp.Piecewise) or not small(e, SIMPLIFY_OPS):
        return None
    e = sp.factor(sp.simplify(e))
    if e.has(read) or sp.count_ops(e) > 12:
        return None
    back = e.subs(S, 1 / (1 + sp.exp(-read)))
    if not small(whole, SIMPLIFY_OPS) or sp.simplify(whole - back) != 0:
        return None
    return e.subs(S, sigma(read))


def local_partial(rec: LocalDerivative, buffers=None) -> nt.Math:
    """∂out[o]/∂x[idx] for the formula kernel's output element and the read."""
    k = rec.kernel
    swap = nt.tidy_map(k, buffers)
    out = array(k.out)[tuple(k.out_index)]
    return nt.partial(swap.get(out, out), swap.get(rec.wrt, rec.wrt))


def local_rhs(rec: LocalDerivative, expr: sp.Expr, buffers=None) -> sp.Expr:
    """A derivative of the summand, as the derivative of the output element: summed over
    the reduction loops the read does not index (the normaliser is in every term)."""
    k = rec.kernel
    expr = expr.xreplace(nt.tidy_map(k, buffers))
    if k.mode != SUM or k.post.has(rec.wrt):
        return expr
    ext = dict(k.loops)
    free = [r for r in k.reduction_loops() if r not in rec.wrt.free_symbols]
    return sp.Sum(expr, *[_limit(r, ext[r]) for r in free]) if free else expr


# ---------------------------------------------------------------- composing a node's kernels

def canonical(buffer_name: str, buffers) -> tuple:
    """The index shown for a whole buffer: b for the batch, then i0, i1, ..."""
    b = buffers[buffer_name]
    per = index_symbols(len(b.shape))
    idx = ((BATCH_INDEX,) if b.batched else ()) + tuple(per)
    return idx or (sp.Integer(0),)


def _limit(sym, extent):
    return nt.extent_limit(sym, extent)


def compose(node: str, target_grad: str, steps: list[Step], buffers, taken=None) -> sp.Expr | None:
    """δtarget from this node's kernels alone, at the canonical index, with the gradients
    of the node's own temps (softmax's normalizer, say) substituted by their formulas."""
    idx = canonical(target_grad, buffers)
    taken = taken if taken is not None else set()
    taken.update(i for i in idx if isinstance(i, sp.Symbol))
    total = sp.Integer(0)
    mine = [s for s in steps if s.kernel.out == target_grad]
    if not mine:
        return None
    for s in mine:
        k = s.kernel
        index = tuple(k.out_index)
        if not all(isinstance(i, sp.Symbol) for i in index) or len(set(index)) != len(index) \
                or len(index) != len(idx):
            return None   # broadcast or offset writes: the kernel form is the clearer one
        rename = dict(zip(index, idx))
        extra = [(s_, e) for s_, e in k.loops if s_ not in index]
        for s_, _ in extra:   # a summation index keeps its name unless another one uses it
            if s_ in taken:
                rename[s_] = next(sp.Symbol(f"j{c}", integer=True, nonnegative=True)
                                  for c in itertools.count()
                                  if sp.Symbol(f"j{c}", integer=True, nonnegative=True) not in taken)
            taken.add(rename.get(s_, s_))
        body = k.post.xreplace({ACC: k.body}) if k.mode == SUM and not extra else k.body
        body = body.xreplace(rename)
        if extra:
            term = sp.Sum(body, *[_limit(rename.get(s_, s_), e) for s_, e in extra])
            total += k.post.xreplace({ACC: term}) if k.mode == SUM else term
        else:
            total += body
    # Substitute the node's temps' gradients (never a value's: those are the chain's links).
    for read in sorted(total.atoms(sp.Indexed), key=sp.default_sort_key):
        name = str(read.base.label)
        if nt.is_grad(name) and nt.value_name(name).startswith(node + "."):
            inner = compose(node, name, steps, buffers, taken)
            if inner is None:
                return None
            inner = inner.xreplace(dict(zip(canonical(name, buffers), read.indices)))
            total = total.xreplace({read: inner})
    return total


def softmax_reading(node: str, op: str, expr: sp.Expr, graph: Graph, kernels: list[Kernel]):
    """For nodes built on max-shifted softmax: exp(x - m)/s is the softmax p, and for the
    cross-entropy the target sums to 1 over the classes. Returns (reading, condition, where)."""
    by_out = {k.out: k for k in kernels if k.node == node}
    m, s = f"{node}.max", f"{node}.sumexp"
    if m not in by_out or s not in by_out:
        return None
    x = str(next(a for a in by_out[s].accesses() if str(a.base.label) != m).base.label)
    taken = set(graph.values)
    p_name = node if op == "softmax" else next(c for c in ("p", "prob", "p_" + node) if c not in taken)
    P, S = array(p_name), array(s)

    def is_shifted(arg):
        parts = sp.Add.make_args(arg)
        xs = [a for a in parts if isinstance(a, sp.Indexed) and str(a.base.label) == x]
        ms = [-a for a in parts if isinstance(-a, sp.Indexed) and str((-a).base.label) == m]
        return (xs[0], ms[0]) if len(parts) == 2 and xs and ms else None

    def to_p(e):
        if isinstance(e, sp.exp) and is_shifted(e.args[0]):
            xi, mi = is_shifted(e.args[0])
            return P[xi.indices] * S[mi.indices]
        return None
    reading = expr.replace(lambda e: to_p(e) is not None, to_p)
    if reading == expr or expansion_work(reading, EXPAND_TERMS) is None:
        return None
    reading = sp.factor_terms(sp.expand(reading))
    reading = sp.factor_terms(reading)
    where = () if op == "softmax" else \
        ((p_name, f"softmax({x}) = exp({x} - {m})/{s}",
          r"\mathrm{softmax}(" + nt.latex_name(x) + r") = e^{" + nt.latex_name(x) + " - "
          + nt.latex_name(m) + "}/" + nt.latex_name(s)),)
    condition = None
    if op == "softmax_cross_entropy":
        target = graph.values[node].inputs[1]
        total = [e for e in reading.atoms(sp.Sum)
                 if isinstance(e.function, sp.Indexed) and str(e.function.base.label) == target]
        if total:
            reading = sp.factor_terms(reading.xreplace({t: sp.Integer(1) for t in total}))
            condition = ("the target sums to 1 over the classes (one-hot or probabilities); "
                         "the C computes the general form")
    return reading, condition, where


# ---------------------------------------------------------------- the whole explanation's core

def pair_steps(d: Derivation) -> list[Step]:
    """The backward kernels of `d.gradients`, each with derive's record it came from.

    `derive` appends a record and then its kernel, with a zeroing kernel first when the
    target needs one, so the two lists match in order once zeroing kernels are skipped."""
    kernels = d.gradients.kernels
    start = next(i for i, k in enumerate(kernels) if k.out == LOSS_MEAN) + 1
    backward = [(i, k) for i, k in enumerate(kernels[start:], start) if not k.note.startswith("zero ")]
    if len(backward) != len(d.local):
        raise AssertionError(f"{len(backward)} backward kernels but {len(d.local)} local derivatives")
    steps = []
    for (i, k), rec in zip(backward, d.local):
        assert k.node == rec.node and k.out == grad_name(str(rec.wrt.base.label)), (k, rec)
        steps.append(Step(i, k, rec, simplified(rec), sigmoid_form(rec.derived, rec.wrt)))
    return steps


def between(graph: Graph, param: str) -> list[str]:
    """Values that depend on `param` and that the loss depends on, loss first."""
    consumers = defaultdict(list)
    for v in graph.values.values():
        for i in v.inputs:
            consumers[i].append(v.name)
    down, todo = set(), [param]
    while todo:
        v = todo.pop()
        if v not in down:
            down.add(v)
            todo.extend(consumers[v])
    keep = down & graph.ancestors([graph.loss])
    return [v for v in reversed(list(graph.values)) if v in keep]


def paths(graph: Graph, param: str) -> tuple[list[list[str]], int]:
    g = nx.DiGraph()
    g.add_nodes_from(graph.values)
    for v in graph.values.values():
        for i in v.inputs:
            g.add_edge(i, v.name)
    found = []
    more = 0
    for p in nx.all_simple_paths(g, param, graph.loss):
        if len(found) < MAX_PATHS:
            found.append(list(reversed(p)))
        else:
            more += 1
            if more > 10_000:
                break
    return found, more


def node_views(graph: Graph, d: Derivation, steps: list[Step], relevant: set[str]) -> list[NodeView]:
    kernels = d.gradients.kernels
    buffers = d.gradients.buffers
    views = []
    for name in reversed(list(graph.nodes)):
        if name not in relevant:
            continue
        v = graph.values[name]
        forward = [i for i, k in enumerate(kernels) if k.node == name and k.note == "forward"]
        mine = [s for s in steps if s.kernel.node == name and
                (s.target in relevant or s.target.startswith(name + "."))]
        view = NodeView(name, v.op, forward, mine)
        for i in forward:
            if kernels[i].mode == MAX:
                view.notes.append(
                    f"{kernels[i].out} is a stop-gradient shift: it keeps exp from overflowing, and "
                    f"the node's value does not change with it, so it gets no derivative")
        for u in dict.fromkeys(v.inputs):
            if u not in relevant:
                continue
            expr = compose(name, grad_name(u), mine, buffers)
            if expr is None:
                continue
            reading = softmax_reading(name, v.op, expr, graph, kernels)
            if reading:
                view.combined[u] = Combined(u, canonical(grad_name(u), buffers), expr, *reading)
            else:
                view.combined[u] = Combined(u, canonical(grad_name(u), buffers), expr)
        views.append(view)
    return views


def param_view(graph: Graph, d: Derivation, param: str, nodes: dict[str, NodeView]) -> ParamView:
    buffers = d.gradients.buffers
    order = between(graph, param)
    found, more = paths(graph, param)
    # L = (1/n)·Σ_b loss[b], so every example's loss gets 1/n: the seed of the sweep.
    chain = [ChainLink(graph.loss, nt.element(grad_name(graph.loss), canonical(graph.loss, buffers)),
                       nt.show(1 / BATCH), None)]
    final = []
    for v in order[1:]:
        users = [nodes[c] for c in order if c in nodes and v in graph.values[c].inputs]
        contributions = [u.combined.get(v) for u in users]
        own = [s for u in users for s in u.steps if s.kernel.out == grad_name(v)]
        if v == param:
            final = own
        lhs = nt.grad_of_param(v, canonical(grad_name(v), buffers)) if v == param else \
            nt.element(grad_name(v), canonical(grad_name(v), buffers))
        if any(c is None for c in contributions):   # no composed form: show the kernels
            rhs = nt.join([nt.kernel_rhs(s.kernel, buffers) for s in own], nt.Math(" + ", " + "))
            chain.append(ChainLink(v, lhs, rhs, None))
            continue
        expr = sp.Add(*[c.expr for c in contributions])
        matrix = None
        if len(own) == 1:
            matrix = nt.matrix_rhs(own[0].kernel, buffers, graph.params)
        reading = contributions[0].reading if len(contributions) == 1 else None
        if matrix is None:
            matrix = nt.elementwise(reading if reading is not None else expr, canonical(grad_name(v), buffers),
                                    buffers if reading is None else None, grad_name(v))
        first = contributions[0]
        chain.append(ChainLink(v, lhs, nt.show(expr), matrix,
                               nt.show(reading) if reading is not None else None,
                               first.condition if reading is not None else None,
                               first.where if reading is not None else ()))
    return ParamView(param, order, found, more, chain, final)


_WRT = re.compile(r"\s*([^\s\[\]]+)\s*(?:\[([^\[\]]*)\])?\s*")


def select(graph: Graph, wrt) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The params `wrt` names, and the elements it names to follow: a param name, NAME[i, j]
    for one element of it, a list of these, or None for every param."""
    if graph.loss is None:
        raise GraphcError(f"graph '{graph.name}' has no loss, so there is no gradient to explain")
    if not graph.params:
        raise GraphcError(f"graph '{graph.name}' has no params, so there is no gradient to explain")
    asked = list(graph.params) if wrt is None else [wrt] if isinstance(wrt, str) else list(wrt)
    chosen, elements = [], {}
    for item in asked:
        name, element = _param_element(graph, item)
        if element is not None:
            if elements.get(name, element) != element:
                raise GraphcError(f"wrt: one element of {name} is followed, but {name} is named twice "
                                  f"({_element_text(name, elements[name])} and {_element_text(name, element)})")
            elements[name] = element
        if name not in chosen:
            chosen.append(name)
    return chosen, elements


def _element_text(name: str, element) -> str:
    return f"{name}[{', '.join(map(str, element))}]"


def _param_element(graph: Graph, item) -> tuple[str, tuple[int, ...] | None]:
    """NAME -> (NAME, None); NAME[i, j, ...] -> (NAME, (i, j, ...)), checked against its shape."""
    m = _WRT.fullmatch(item) if isinstance(item, str) else None
    if m is None:
        raise GraphcError(f"wrt: expected a param name, or one element of it such as W1[0, 0], "
                          f"got {item!r}")
    name, index = m.group(1), m.group(2)
    if name not in graph.params:
        raise GraphcError(f"wrt: unknown param {name!r} (this model's params: "
                          f"{', '.join(graph.params)})")
    if index is None:
        return name, None
    shape = tuple(graph.params[name].shape)
    about = f"{name} has shape {list(shape)}"
    parts = [t.strip() for t in index.split(",")] if index.strip() else []
    if not all(re.fullmatch(r"[+-]?\d+", t) for t in parts):
        raise GraphcError(f"wrt: {item.strip()!r}: an element's indices are integers ({about})")
    element = tuple(int(t) for t in parts)
    if len(element) != len(shape):
        raise GraphcError(f"wrt: {item.strip()!r} gives {len(element)} "
                          f"ind{'ex' if len(element) == 1 else 'ices'}, but {about}, so an element "
                          f"takes {len(shape)}")
    if not all(0 <= i < d for i, d in zip(element, shape)):
        raise GraphcError(f"wrt: {item.strip()!r} is out of range: {about}, so its elements run from "
                          f"{_element_text(name, [0] * len(shape))} to "
                          f"{_element_text(name, [d - 1 for d in shape])}")
    return name, element
