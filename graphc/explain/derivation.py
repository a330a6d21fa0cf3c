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
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import sympy as sp

from graphc.derive import LOSS_MEAN, Derivation, LocalDerivative
from graphc.errors import GraphcError
from graphc.formula import formula_rewrites
from graphc.graph import Graph
from graphc.ir import (ACC, ACCUMULATE, ARGMAX, BATCH, MAX, SUM, Kernel, Program, array,
                       grad_name, index_symbols)

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
    words: tuple = ()                # the contribution said in words: str and nt.Math parts
    gathered: bool = False           # a scatter written as the equivalent gather


@dataclass
class NodeView:
    name: str
    op: str
    forward: list[int]               # forward kernels (indices into the gradients program)
    steps: list[Step]
    combined: dict[str, Combined] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rewrites: list = field(default_factory=list)   # functions.Rewrite: its formula's stable forms


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
    expr: sp.Expr | None = None      # the right-hand side, at the lhs's canonical index
    kernels: tuple = ()              # no composed form: the kernels' own equations instead
    words: tuple = ()                # str and nt.Math parts


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


def _flat_cases(expr: sp.Expr) -> sp.Expr:
    """{{v if c1; 0 otherwise} if c2; 0 otherwise} -> {v if c2 & c1; 0 otherwise}: a max
    pooling's derivative at a padded window, where the case of the read sits inside the
    case of the argmax."""
    def one(*args):
        if len(args) == 2 and args[1] == (0, True):
            return _cases(args[0].expr, args[0].cond)
        return sp.Piecewise(*args)
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
        options.append(_flat_cases(d))
    elif small(d, SIMPLIFY_OPS):
        options.append(sp.simplify(d))
    return min(options, key=lambda e: (sp.count_ops(e), len(e.atoms(sp.Piecewise)), options.index(e)))


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


def _fresh_name(taken: set) -> sp.Symbol:
    """j0, j1, ...: the first not in `taken` (which it joins)."""
    name = next(sym for c in itertools.count()
                for sym in [sp.Symbol(f"j{c}", integer=True, nonnegative=True)] if sym not in taken)
    taken.add(name)
    return name


def _summation_name(sym: sp.Symbol, taken: set) -> sp.Symbol:
    """A summation index's name: its own, unless another index uses it or it reads as an
    axis of the left-hand side (i0, i1, ... index the array written); then j0, j1, ..."""
    if sym in taken or re.fullmatch(r"i\d+", sym.name):
        return _fresh_name(taken)
    taken.add(sym)
    return sym


def compose(node: str, target_grad: str, steps: list[Step], buffers, taken=None) -> sp.Expr | None:
    """δtarget from this node's kernels alone, at the canonical index, with the gradients
    of the node's own temps (softmax's normalizer, say) substituted by their formulas.
    A kernel that writes at an affine index (a scatter: a convolution's or a pooling's
    input gradient) is turned into the equivalent gather (`gather`)."""
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
                or len(index) != len(idx) or k.guard != sp.true:
            term = gather(k, idx, _dims_of(buffers[target_grad]), taken)
            if term is None:
                return None
            total += term
            continue
        rename = dict(zip(index, idx))
        extra = [(s_, e) for s_, e in k.loops if s_ not in index]
        for s_, _ in extra:   # a summation index keeps its name unless another one uses it
            rename[s_] = _summation_name(s_, taken)
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


def _dims_of(buf) -> tuple:
    dims = ((BATCH,) if buf.batched else ()) + tuple(buf.shape)
    return dims or (1,)


# ---------------------------------------------------------------- scatter -> gather

MAX_DECIDE_POINTS = 200_000   # index points a condition is tried at to decide it


def decide(cond: sp.Basic, extents: dict) -> sp.Basic:
    """A condition on integer indices, each running over range(extent): true or false when
    it holds at every point of that box or at none (tried at every point), else itself."""
    if cond in (sp.true, sp.false) or cond.atoms(sp.Indexed):
        return cond
    syms = sorted(cond.free_symbols, key=str)
    if any(extents.get(s) in (None, BATCH) for s in syms):
        return cond
    sizes = [int(extents[s]) for s in syms]
    if math.prod(sizes) > MAX_DECIDE_POINTS:
        return cond
    if not syms:
        return sp.true if bool(cond) else sp.false
    import numpy as np
    f = sp.lambdify(syms, cond, [{"floor": np.floor, "Mod": np.mod}, "numpy"])
    grid = np.meshgrid(*[np.arange(e) for e in sizes], indexing="ij")
    with np.errstate(all="ignore"):
        held = np.broadcast_to(np.asarray(f(*grid), dtype=bool), grid[0].shape)
    return sp.true if held.all() else sp.false if not held.any() else cond


def _decided(expr: sp.Basic, extents: dict) -> sp.Basic:
    """`expr` with each comparison of indices alone decided where the box decides it."""
    rels = [r for r in expr.atoms(sp.Rel) if not r.atoms(sp.Indexed)]
    swap = {r: decide(r, extents) for r in rels}
    return expr.xreplace({r: v for r, v in swap.items() if v != r}) if swap else expr


def _pruned(cond: sp.Basic, extents: dict) -> sp.Basic:
    """A conjunction of index conditions without the ones the others imply over the box
    (i ≤ 1 and i ≥ 1 make (i + 1) mod 2 = 0 idle), each tried at every point."""
    if not isinstance(cond, sp.And):
        return cond
    parts = list(cond.args)
    for part in list(parts):
        rest = [p for p in parts if p is not part]
        if part.atoms(sp.Indexed) or not rest:
            continue
        if decide(sp.And(*rest, sp.Not(part)), extents) == sp.false:
            parts = rest
    return sp.And(*parts)


def _cases(body: sp.Expr, cond: sp.Basic) -> sp.Expr:
    """body where cond holds, 0 elsewhere, as one case: a factor {v if c; 0 otherwise}
    of the body joins its condition to cond (nested cases read badly)."""
    while True:
        factors = sp.Mul.make_args(body)
        inner = next((f for f in factors if isinstance(f, sp.Piecewise) and len(f.args) == 2
                      and f.args[1].cond == sp.true and f.args[1].expr == 0), None)
        if inner is None:
            break
        cond = sp.And(cond, inner.args[0].cond)
        body = sp.Mul(*[f for f in factors if f is not inner]) * inner.args[0].expr
    if cond == sp.false or body == 0:
        return sp.Integer(0)
    return body if cond == sp.true else sp.Piecewise((body, cond), (0, True))


def _unsplit(expr: sp.Basic) -> sp.Basic:
    """c·(u mod w) + c·w·⌊u/w⌋ -> c·u wherever both halves meet in a sum (a grouped
    convolution's output channel o, split into its group and its place in the group)."""
    def join(add):
        terms = list(add.args)
        for t in terms:
            c, m = t.as_coeff_Mul()
            if isinstance(m, sp.Mod):
                u, w = m.args
                partner = c * w * sp.floor(u / w)
                if partner in terms:
                    terms.remove(t)
                    terms.remove(partner)
                    return join(sp.Add(*terms, c * u)) if terms else c * u
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add), join)


def _affine_coefficient(e: sp.Expr, s: sp.Symbol):
    """The integer coefficient of s in e when e is affine in s, else None."""
    c = sp.diff(e, s)
    return int(c) if c.is_Integer else None


def gather(k: Kernel, idx: tuple, dims: tuple, taken: set) -> sp.Expr | None:
    """What kernel k adds to out[idx] (a scatter-accumulate, out[f(loops)] += body), written
    as a formula of idx: the sum of body over the loop points whose target is idx.

    out_index[a] = idx[a] is solved axis by axis for one loop index each (one with a unit
    coefficient where there is one, else with a divisibility condition), preferring the
    indices of the δ the kernel reads (the positions of the forward output); the other
    loops are summed, where the solved ones stay inside their loops' ranges and the
    kernel's guard holds. A loop whose range condition admits exactly one value (a window
    of 2 with stride 2: j = ⌊h/2⌋) is solved too, so a pooling's gradient reads as a
    gather from one window. For a convolution's input gradient the result is the
    transposed convolution. None: the kernel is not a sum of its body (an assignment)."""
    if k.mode not in (ACCUMULATE, SUM) or (k.mode == SUM and k.post != ACC):
        return None
    fresh = {s: sp.Dummy(s.name, integer=True, nonnegative=True) for s, _ in k.loops}
    ext = {fresh[s]: e for s, e in k.loops}
    extents = dict(ext) | {i: d for i, d in zip(idx, dims) if isinstance(i, sp.Symbol)}
    body, guard = k.body.xreplace(fresh), k.guard.xreplace(fresh)
    seeds = {s for a in body.atoms(sp.Indexed) if nt.is_grad(str(a.base.label))
             for s in a.free_symbols if s in ext}
    sols: dict = {}
    conds: list = [guard]
    for e, t in zip(k.out_index, idx):
        e = sp.expand(sp.sympify(e).xreplace(fresh).xreplace(sols))
        cands = [s for s in sorted(e.free_symbols & set(ext), key=str) if s not in sols]
        coef = {s: _affine_coefficient(e, s) for s in cands}
        if any(c is None for c in coef.values()):
            return None
        cands = [s for s in cands if coef[s] != 0]
        if not cands:
            conds.append(sp.Eq(e, t))
            continue
        s = min(cands, key=lambda s: (abs(coef[s]) != 1, s not in seeds, abs(coef[s]), str(s)))
        a = coef[s]
        rest = sp.expand(e - a * s)
        if abs(a) != 1:
            conds.append(sp.Eq(sp.Mod(t - rest, abs(a)), 0))
        value = (t - rest) / a
        sols = {v: x.xreplace({s: value}) for v, x in sols.items()}
        sols[s] = value
    if any(ext[v] == BATCH and not (isinstance(x, sp.Symbol) and extents.get(x) == BATCH)
           for v, x in sols.items()):
        return None   # the batch index is solved only as itself
    ranges = {v: x for v, x in sols.items() if ext[v] != BATCH}
    free = [s for s in ext if s not in sols]
    # A range condition 0 <= c ± w·s <= w - 1 holds for exactly one s: s = ∓⌊c/w⌋.
    progress = True
    while progress:
        progress = False
        for v, x in list(ranges.items()):
            for s in free:
                a = _affine_coefficient(x, s)
                c = sp.expand(x - a * s) if a else None
                if a is None or abs(a) != int(ext[v]) or not c.is_integer:
                    continue
                w = abs(a)
                value = sp.floor(c / w) if a < 0 else -sp.floor(c / w)
                sols = {u: y.xreplace({s: value}) for u, y in sols.items()}
                sols[v], sols[s] = sp.Mod(c, w), value
                ranges = {u: y.xreplace({s: value}) for u, y in ranges.items() if u != v}
                ranges[s] = value
                body, conds = body.xreplace({s: value}), [c_.xreplace({s: value}) for c_ in conds]
                free.remove(s)
                progress = True
                break
            if progress:
                break
    conds += [sp.And(sp.Ge(x, 0), sp.Le(x, int(ext[v]) - 1)) for v, x in ranges.items()]
    body = body.xreplace(sols)
    cond = _pruned(_decided(sp.And(*[c_.xreplace(sols) for c_ in conds]), extents), extents)
    term = _unsplit(_cases(_decided(body, extents), cond))
    if term == 0:
        return term
    names = {s: _summation_name(sp.Symbol(s.name, integer=True, nonnegative=True), taken)
             if s.name == "b" else _fresh_name(taken) for s in free}
    term = term.xreplace(names)
    return sp.Sum(term, *[_limit(names[s], ext[s]) for s in free]) if free else term


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


def forward_kernels(kernels: list[Kernel], node: str) -> list[int]:
    """The node's forward kernels, and the argmax kernel derive runs after a max whose
    gradient it routes (max pooling's)."""
    return [i for i, k in enumerate(kernels) if k.node == node and (k.note == "forward" or k.mode == ARGMAX)]


def node_views(graph: Graph, d: Derivation, steps: list[Step], relevant: set[str]) -> list[NodeView]:
    kernels = d.gradients.kernels
    buffers = d.gradients.buffers
    views = []
    for name in reversed(list(graph.nodes)):
        if name not in relevant:
            continue
        v = graph.values[name]
        forward = forward_kernels(kernels, name)
        mine = [s for s in steps if s.kernel.node == name and
                (s.target in relevant or s.target.startswith(name + "."))]
        view = NodeView(name, v.op, forward, mine)
        if v.op == "elementwise":   # the formula as written, and the stable form it became
            view.rewrites = formula_rewrites(v.spec_attrs["expr"], v.inputs, node=name)
        for i in forward:
            if kernels[i].mode == MAX and not buffers[kernels[i].out].differentiable:
                view.notes.append(
                    f"{kernels[i].out} is a stop-gradient shift: it keeps exp from overflowing, and "
                    f"the node's value does not change with it, so it gets no derivative")
            if kernels[i].mode == ARGMAX:
                view.notes.append(argmax_note(kernels[i], v))
        for u in dict.fromkeys(v.inputs):
            if u not in relevant:
                continue
            expr = compose(name, grad_name(u), mine, buffers)
            if expr is None:
                continue
            idx = canonical(grad_name(u), buffers)
            scatter = any(s.kernel.out == grad_name(u) and not _plain_write(s.kernel, idx) for s in mine)
            reading = softmax_reading(name, v.op, expr, graph, kernels) or \
                padded_reading(expr, idx, _dims_of(buffers[grad_name(u)]), buffers) or (None, None, ())
            words = contribution_words(graph, name, u, reading[0] if reading[0] is not None else expr,
                                       idx, "padding" in (reading[1] or ""))
            view.combined[u] = Combined(u, idx, expr, *reading, words=words, gathered=scatter)
        views.append(view)
    return views


def _plain_write(k: Kernel, idx: tuple) -> bool:
    """Does k write every element of its target once per point of its loops not summed,
    through plain loop indices (what `compose` substitutes directly)?"""
    index = tuple(k.out_index)
    return all(isinstance(i, sp.Symbol) for i in index) and len(set(index)) == len(index) \
        and len(index) == len(idx) and k.guard == sp.true


def argmax_note(k: Kernel, v) -> str:
    at = nt.show(k.reduction_position()).text
    src = v.inputs[0]
    return (f"{k.out} records, for each window, where its maximum is: the position {at} "
            f"(row-major within the window) of the window's first maximum (a NaN counts as "
            f"a maximum, as in torch). The gradient goes to the window's first maximum, as "
            f"torch does: δ{src} gets δ{v.name} at that one element of the window and nothing "
            f"at the others, which do not change the maximum")


def _extents(expr: sp.Expr, idx: tuple, dims: tuple) -> dict:
    """Index symbol -> extent: the canonical index's from the array's dims, each summation
    index's from its Σ."""
    ext = {i: d for i, d in zip(idx, dims) if isinstance(i, sp.Symbol)}
    for total in expr.atoms(sp.Sum):
        for sym, low, high in total.limits:
            ext[sym] = BATCH if high == BATCH - 1 else int(high - low + 1)
    return ext


def padded_reading(expr: sp.Expr, idx: tuple, dims: tuple, buffers):
    """The formula with each {r·rest if (r's index lies inside its array); 0 otherwise}
    written r·rest: a padded read taken as 0 outside its array, as the forward pass took
    it (a convolution's weight gradient reads this way). Returns (reading, condition,
    where), or None when there is no such case."""
    ext = _extents(expr, idx, dims)
    padded: list[str] = []

    def inside(r: sp.Indexed) -> sp.Basic | None:
        """The condition that r's index lies inside its array, one comparison per axis."""
        name = str(r.base.label)
        if name not in buffers or \
                any(ext.get(s_) is None for i in r.indices for s_ in sp.sympify(i).free_symbols):
            return None
        return sp.And(*[sp.And(sp.Ge(i, 0), sp.Lt(i, d)) for i, d in zip(r.indices, _dims_of(buffers[name]))
                        if d != BATCH and not sp.sympify(i).is_number])

    def strip(pw: sp.Piecewise):
        if len(pw.args) != 2 or pw.args[1] != (0, True):
            return pw
        value, cond = pw.args[0]
        for r in sp.Mul.make_args(value):
            if isinstance(r, sp.Indexed):
                g = inside(r)
                if g is not None and g != sp.true and \
                        (g == cond or decide(sp.Xor(g, cond), ext) == sp.false):
                    padded.append(str(r.base.label))
                    return value
        return pw
    reading = expr.replace(lambda e: isinstance(e, sp.Piecewise), strip)
    if not padded:
        return None
    values = [nt.text_name(a) for a in dict.fromkeys(padded) if not nt.is_grad(a)]
    grads = [nt.text_name(a) for a in dict.fromkeys(padded) if nt.is_grad(a)]
    said = []
    if values:
        said.append(f"a read outside {', '.join(values)} (in its zero padding) counts as 0, as "
                    f"the forward pass reads it")
    if grads:
        said.append(f"{', '.join(grads)} counts as 0 outside its array (as if padded with zeros)")
    return reading, " and ".join(said) + "; the C tests the index instead", ()


CONV_OPS = ("conv1d", "conv2d")
SPATIAL = {1: ("t",), 2: ("h", "w")}          # output positions, per spatial rank
TAPS = {1: ("k",), 2: ("p", "q")}             # kernel taps


def _letters(wanted, graph: Graph, taken: set) -> list[sp.Symbol]:
    """Index symbols named as a textbook names them, primed where a value of the graph (or
    another index) already has the name."""
    out = []
    for w in wanted:
        while w in graph.values or w in taken:
            w += "'"
        taken.add(w)
        out.append(sp.Symbol(w, integer=True, nonnegative=True))
    return out


def _ordered_affine(e: sp.Expr, order: list) -> nt.Math:
    """An affine index printed with the symbols of `order` first, in that order, then the
    rest and the constant: h + p - 1 (the output position, the tap, the padding)."""
    e = sp.expand(e)
    if not e.is_Add or any(sp.diff(e, s_).free_symbols for s_ in e.free_symbols):
        return nt.show(e)
    syms = [s_ for s_ in order if e.has(s_)] + sorted(e.free_symbols - set(order), key=str)
    text, tex = [], []
    for s_ in syms + [None]:
        c = e.coeff(s_) if s_ is not None else e.subs({x: 0 for x in e.free_symbols})
        if c == 0:
            continue
        sign = "-" if c < 0 else "+"
        c = abs(c)
        if s_ is None:
            t = x_ = str(c)
        else:
            name = nt.show(s_)
            t = name.text if c == 1 else f"{c}·{name.text}"
            x_ = name.latex if c == 1 else rf"{c} \cdot {name.latex}"
        text += [sign, t]
        tex += [sign, x_]
    lead = lambda parts: ("-" if parts[0] == "-" else "") + " ".join(parts[1:])   # noqa: E731
    return nt.Math(lead(text), lead(tex))


def _correlation(expr: sp.Expr, x: str, sums: list, taps: list) -> nt.Math:
    """Σ_{b, h, w} x[...]·δy[...] as a textbook writes it: the input first, each of its
    positions as output position, tap, padding (what `show` sorts otherwise)."""
    if not isinstance(expr, sp.Sum) or not expr.function.is_Mul:
        return nt.show(expr)
    reads = [f for f in expr.function.args if isinstance(f, sp.Indexed)]
    inp = [r for r in reads if str(r.base.label) == x]
    if len(reads) != len(expr.function.args) or len(inp) != 1:
        return nt.show(expr)
    rest = [r for r in reads if r is not inp[0]]
    order = [s_ for s_ in sums if s_ != BATCH_INDEX] + list(taps)
    idx = [_ordered_affine(i, order) for i in inp[0].indices]
    read = nt.Math(f"{nt.text_name(x)}[{', '.join(m.text for m in idx)}]",
                   f"{nt.latex_name(x)}[{', '.join(m.latex for m in idx)}]")
    ids = [nt.show(lim[0]) for lim in expr.limits]
    total = nt.Math("Σ_{" + ", ".join(m.text for m in ids) + "} ",
                    r"\sum_{" + ", ".join(m.latex for m in ids) + "} ")
    return nt.join([total + read] + [nt.show(r) for r in rest], nt.Math("·", r" \cdot "))


def contribution_words(graph: Graph, node: str, u: str, expr: sp.Expr, idx: tuple,
                       padded: bool = False) -> tuple:
    """What a node's contribution to δu means, in words, for the ops whose gradient has a
    name: a convolution's weight gradient (the correlation of its input with δ), its
    input gradient (the transposed convolution), pooling's routing. Parts: str and Math."""
    v = graph.values[node]
    x = v.inputs[0]
    dy = nt.Math(f"δ{node}", nt.latex_name(grad_name(node)))
    if v.op in CONV_OPS and len(v.inputs) > 1 and u == v.inputs[1]:
        rank = int(v.op[4])
        taken = {"b"}
        named = _letters(("o", "c") + TAPS[rank], graph, taken)
        totals = list(expr.atoms(sp.Sum))
        if len(totals) != 1 or expr != totals[0]:
            return ()
        inner = [sym for sym, _, _ in totals[0].limits if sym != BATCH_INDEX]
        if len(inner) != rank:
            return ()
        spatial = _letters(SPATIAL[rank], graph, taken)
        swap = dict(zip(idx, named)) | dict(zip(inner, spatial))
        expr = expr.xreplace(swap)
        if graph.values[u].shape[1] == 1:   # one input channel (per group): its loop was dropped
            expr = expr.replace(lambda r: isinstance(r, sp.Indexed) and str(r.base.label) == x
                                and len(r.indices) > 1 and r.indices[1] == 0,
                                lambda r: r.base[(r.indices[0], named[1]) + tuple(r.indices[2:])])
        said = _correlation(expr, x, [BATCH_INDEX] + spatial, named[2:])
        lhs = nt.grad_of_param(u, named) if u in graph.params else nt.element(grad_name(u), named)
        w = nt.show(array(u)[tuple(named)])
        pos = nt.Math(", ".join(nt.show(s_).text for s_ in spatial),
                      ", ".join(nt.show(s_).latex for s_ in spatial))
        taps = nt.Math(", ".join(nt.show(s_).text for s_ in named[2:]),
                       ", ".join(nt.show(s_).latex for s_ in named[2:]))
        return ("In words: ", lhs + nt.EQ + said, ": the gradient of a convolution's weight is the "
                "correlation of its input ", nt.Math(x, nt.latex_name(x)), " with ", dy,
                ", the gradient at its output. In the forward pass the weight ", w,
                " multiplied the input at tap (", taps, ") of every window; its gradient adds up "
                "those same inputs, each times the δ of the output its window made, over every "
                "output position (", pos, ") and every example b (a term whose input lies in "
                "the padding is 0).")
    if v.op in CONV_OPS and u == x:
        weight = v.inputs[1]
        return (nt.Math(f"δ{u}", nt.latex_name(grad_name(u))), " is the transposed convolution of ",
                dy, " with ", nt.Math(weight, nt.latex_name(weight)), ": every element of ",
                nt.Math(u, nt.latex_name(u)), " was read by the windows of several outputs, and "
                "its δ adds up, over those outputs, their δ times the weight that multiplied "
                "it (the conditions keep the outputs whose window reached it).")
    if v.op.startswith("max_pool") and u == x:
        return ("The gradient goes to the window's first maximum, as torch does: ",
                nt.Math(f"δ{u}", nt.latex_name(grad_name(u))), " gets ", dy,
                " of the window that holds the element when the element is where that window's "
                f"maximum was found ({node}.argmax), and 0 otherwise.")
    if v.op.startswith("avg_pool") and u == x:
        return (nt.Math(f"δ{u}", nt.latex_name(grad_name(u))), " gets, from every window that "
                "contains the element, that window's ", dy, " divided by the number of "
                "elements the window averaged.")
    return ()


def param_view(graph: Graph, d: Derivation, param: str, nodes: dict[str, NodeView]) -> ParamView:
    buffers = d.gradients.buffers
    order = between(graph, param)
    found, more = paths(graph, param)
    # L = (1/n)·Σ_b loss[b], so every example's loss gets 1/n: the seed of the sweep.
    chain = [ChainLink(graph.loss, nt.element(grad_name(graph.loss), canonical(graph.loss, buffers)),
                       nt.show(1 / BATCH), None, expr=1 / BATCH)]
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
            eqs = tuple(nt.kernel_equation(s.kernel, graph.params, buffers) for s in own)
            chain.append(ChainLink(v, lhs, nt.join([nt.kernel_rhs(s.kernel, buffers) for s in own],
                                                   nt.Math(" + ", " + ")), None, kernels=eqs))
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
        words = tuple(part for c in contributions if c.words for part in (c.words if len(contributions) == 1
                                                                          else (*c.words, " ")))
        chain.append(ChainLink(v, lhs, nt.show(expr), matrix,
                               nt.show(reading) if reading is not None else None,
                               first.condition if reading is not None else None,
                               first.where if reading is not None else (), expr=expr,
                               words=words))
    return ParamView(param, order, found, more, chain, final)


_WRT = re.compile(r"\s*([^\s\[\]]+)\s*(?:\[([^\[\]]*)\])?\s*")


def select(graph: Graph, wrt) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The params `wrt` names, and the elements it names to follow: a param name, NAME[i, j]
    for one element of it, a list of these, or None for every param."""
    if graph.loss is None:
        raise GraphcError(f"graph '{graph.name}' has no loss, so there is no gradient to explain")
    if not graph.trainable_params:
        raise GraphcError(f"graph '{graph.name}' has no {'trainable ' if graph.params else ''}"
                          "params, so there is no gradient to explain")
    asked = list(graph.trainable_params) if wrt is None else [wrt] if isinstance(wrt, str) \
        else list(wrt)
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
    if not graph.params[name].trainable:
        raise GraphcError(f"wrt: param {name!r} is declared trainable: false: it has no "
                          f"gradient (the trained params: {', '.join(graph.trainable_params)})")
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
