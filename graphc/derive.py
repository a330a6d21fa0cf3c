"""Reverse-mode chain rule at tensor level, every local derivative from `sympy.diff`.

`lower` turns each graph node into kernels in index notation (`graphc.ops`). `derive` then
walks the loss's kernels once, in reverse. For a kernel

    out[o] = post(Σ_r body(..., x[idx], ...))

and each distinct read x[idx] of a value that needs a gradient, it emits the
scatter-accumulate kernel

    dx[idx] += dout[o] · ∂post/∂acc · ∂body/∂x[idx]        (over the kernel's loops)

which covers maps, broadcasting (the loop revisits dx[idx]), contractions, reductions and
movement alike. The partial derivative is taken with respect to the read exactly as it
appears (each distinct read becomes a plain symbol first), so no KroneckerDelta arises, and
its size does not depend on any dimension: compile time is flat in layer width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .errors import SpecError
from .functions import expand_definitions
from .graph import Graph
from .ir import (ACC, ACCUMULATE, ARGMAX, ASSIGN, BATCH, GRAD, INPUT, INT32, LOSS, LOSS_MEAN,
                 MAX, OUTPUT, PARAM, REAL, SUM, TEMP, Buffer, Interface, Kernel, Program,
                 grad_name, param_layout, range_guard, tree_size)
from .ops import OPS, Lowering, Statistic
from .optim import HYPERPARAMETER_DOC, lower_update, structure, update_rule

# A local derivative larger than this (as a tree) is refused: printing, cse and the C
# compiler all grow with it, and a 1 KiB formula must not take minutes to compile.
MAX_DERIVED_SIZE = 20000


@dataclass(frozen=True)
class LocalDerivative:
    """One derived partial, kept for `explain` and for tests."""
    node: str
    kernel: Kernel
    wrt: sp.Indexed           # the read differentiated against
    derived: sp.Expr          # sympy.diff's result, kinks pinned
    used: sp.Expr             # what the backward kernel uses (maybe the output form)
    output_form: bool         # True when `used` is written through the kernel's output


@dataclass
class Lowered:
    buffers: dict[str, Buffer]
    kernels: list[Kernel]                    # every node's forward kernels, topological
    by_node: dict[str, list[int]] = field(default_factory=dict)
    training: bool = False
    statistics: list[Statistic] = field(default_factory=list)   # training: running statistics


def lower(graph: Graph, training: bool = False) -> Lowered:
    """Every node's kernels, for the forward and evaluation programs (`training` False:
    batch_norm normalizes by its running statistics) or for the gradients program
    (`training` True: by the batch's, which it keeps as `statistics` for the train step)."""
    buffers: dict[str, Buffer] = {}
    for v in graph.values.values():
        role = {"input": INPUT, "param": PARAM}.get(v.kind, TEMP)
        buffers[v.name] = Buffer(v.name, v.shape, v.batched, role,
                                 dtype=INT32 if v.dtype == INT32 else REAL)
    kernels: list[Kernel] = []
    by_node: dict[str, list[int]] = {}
    statistics: list[Statistic] = []

    def new_buffer(b: Buffer) -> Buffer:
        assert b.name not in buffers, b.name
        buffers[b.name] = b
        return b

    for v in graph.nodes.values():
        start = len(kernels)
        L = Lowering(v.name, [buffers[i] for i in v.inputs], buffers[v.name], v.attrs,
                     new_buffer, kernels, training=training, statistics=statistics)
        OPS[v.op].lower(L)
        by_node[v.name] = list(range(start, len(kernels)))
    return Lowered(buffers, kernels, by_node, training, statistics)


def has_modes(graph: Graph) -> bool:
    """Whether some node lowers differently for training (batch_norm)."""
    return any(OPS[v.op].modes for v in graph.nodes.values())


def _kernels_for(graph: Graph, low: Lowered, targets) -> list[Kernel]:
    needed = graph.ancestors(targets)
    return [low.kernels[k] for n in graph.nodes if n in needed for k in low.by_node[n]]


def forward_program(graph: Graph, low: Lowered | None = None) -> Program:
    """Kernels computing the graph's outputs, which are written to caller buffers."""
    low = low or lower(graph)
    assert not low.training, "the forward program is the evaluation mode's"
    kernels = _kernels_for(graph, low, graph.outputs)
    buffers = _used_buffers(low.buffers, kernels)
    for o in graph.outputs:
        buffers[o] = _with_role(buffers[o], OUTPUT)
    prog = Program(buffers, kernels)
    prog.check()
    return prog


def _with_role(b: Buffer, role: str) -> Buffer:
    return Buffer(b.name, b.shape, b.batched, role, b.differentiable, b.dtype)


def _used_buffers(all_buffers: dict[str, Buffer], kernels: list[Kernel]) -> dict[str, Buffer]:
    names = set()
    for k in kernels:
        names.add(k.out)
        names.update(k.reads())
    return {n: b for n, b in all_buffers.items() if n in names}


# ---------------------------------------------------------------- local derivatives

def _pin_kinks(expr: sp.Expr) -> sp.Expr:
    """Derivatives of kinks as PyTorch takes them, with no delta. Heaviside comes from max
    and min (relu is a Piecewise): 1/2 at a tie, as torch.maximum splits the gradient.
    Every value is real: `re` and `im`, which diff of |u| leaves where SymPy cannot prove u
    real (abs(atan(1/(softplus(p) + 0.5)))), are u and 0."""
    half = sp.Rational(1, 2)
    return expr.replace(sp.Heaviside, lambda a, *rest: sp.Piecewise((1, a > 0), (0, a < 0),
                                                                     (half, True))) \
               .replace(sp.sign, lambda a: sp.Piecewise((1, a > 0), (-1, a < 0), (0, True))) \
               .replace(sp.DiracDelta, lambda *a: sp.Integer(0)) \
               .replace(sp.re, lambda a: a).replace(sp.im, lambda a: sp.Integer(0))



def _has_calls(expr: sp.Expr) -> bool:
    return any(isinstance(e, sp.Function) or (isinstance(e, sp.Pow) and not e.exp.is_Integer)
               for e in sp.preorder_traversal(expr))


def output_form(y: sp.Expr, d: sp.Expr, a: sp.Symbol) -> sp.Expr | None:
    """g with d == g(y) as a polynomial of degree <= 2 in y, if SymPy proves it.

    This is how sigmoid' = y(1-y), tanh' = 1-y², exp' = y are found from the formula alone:
    fit g at a few points, then `simplify(d - g(y)) == 0` must hold symbolically."""
    if not _has_calls(d) or y.has(sp.Piecewise) or sp.count_ops(d) > 60 \
            or a not in d.free_symbols:
        return None   # (a constant derivative, log(10**20)/46, needs no output form)
    Y = sp.Symbol("Y")
    points = [-0.7, 0.2, 0.9, 1.6, -1.3]
    y, d = expand_definitions(y), expand_definitions(d)   # plain math for lambdify and proof
    try:
        fy = sp.lambdify(a, y, "math")
        fd = sp.lambdify(a, d, "math")
        ys = np.array([float(fy(p)) for p in points])
        ds = np.array([float(fd(p)) for p in points])
    except (ValueError, OverflowError, ZeroDivisionError, TypeError):
        return None
    V = np.vander(ys[:3], 3, increasing=True)
    if abs(np.linalg.det(V)) < 1e-9:
        return None
    coef = np.linalg.solve(V, ds[:3])
    fit = np.polyval(coef[::-1], ys[3:])
    if not np.allclose(fit, ds[3:], rtol=1e-9, atol=1e-12):
        return None
    c = [sp.nsimplify(float(x), rational=True, tolerance=1e-12) for x in coef]
    g = sp.expand(c[0] + c[1] * Y + c[2] * Y ** 2)
    if sp.simplify(d - g.subs(Y, y)) != 0:
        return None
    return g


@dataclass
class _Sweep:
    buffers: dict[str, Buffer]
    kernels: list[Kernel] = field(default_factory=list)
    initialized: set = field(default_factory=set)
    local: list[LocalDerivative] = field(default_factory=list)

    def grad(self, name: str) -> Buffer:
        g = grad_name(name)
        if g not in self.buffers:
            src = self.buffers[name]
            self.buffers[g] = Buffer(g, src.shape, src.batched,
                                     GRAD if src.role == PARAM else TEMP)
        return self.buffers[g]

    def zero(self, target: Buffer, node: str) -> None:
        idx = [sp.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(len(target.strides()))]
        dims = ([BATCH] if target.batched else []) + list(target.shape) or [1]
        self.kernels.append(Kernel(target.name, tuple(idx), tuple(zip(idx, dims)), sp.Integer(0),
                                   ASSIGN, ACC, node, f"zero {target.name}"))

    def contribute(self, target: Buffer, index: tuple, loops: tuple, body: sp.Expr,
                   node: str, note: str) -> None:
        # A padded read's scatter leaves the target where the read was padding: it runs
        # only where the read's condition holds, which the derivative already carries.
        dims = ([BATCH] if target.batched else []) + list(target.shape)
        guard = range_guard(index, dims, dict(loops))
        if guard != sp.true:
            body = body.replace(lambda e: isinstance(e, sp.Piecewise) and len(e.args) == 2
                                and e.args[0].cond == guard and e.args[1] == (0, True),
                                lambda e: e.args[0].expr)
        if target.name not in self.initialized:
            self.initialized.add(target.name)
            extent = dict(loops)
            # Does the kernel visit every element of the target through plain loop indices?
            # Then it can define the target (a map or a reduction) instead of zero + add.
            if (guard == sp.true and len(index) == len(dims) and len(set(index)) == len(index)
                    and all(i in extent and extent[i] == d for i, d in zip(index, dims))):
                mode = ASSIGN if len(loops) == len(index) else SUM
                self.kernels.append(Kernel(target.name, index, loops, body, mode, ACC, node, note))
                return
            self.zero(target, node)
        self.kernels.append(Kernel(target.name, index, loops, body, ACCUMULATE, ACC, node, note,
                                   guard))


@dataclass
class Derivation:
    """What the C is generated from: the programs, the optimizer's update and the graph's
    interface (codegen reads nothing else of the graph)."""
    forward: Program
    gradients: Program
    local: list[LocalDerivative]
    evaluation: Program | None = None   # outputs and the batch-mean loss, one forward pass
    interface: Interface | None = None
    # The train step after the gradients: the optimizer's update and the running
    # statistics' (graphc/optim.py); None without a loss or an optimizer.
    update: Program | None = None
    # Running statistics the gradients program writes the batch's value of (into their
    # gradient slots), each with its momentum: the update blends them into the params.
    running: dict[str, float] = field(default_factory=dict)


def interface(graph: Graph) -> Interface:
    """The graph's names and shapes as the entry points see them."""
    def reads(targets) -> tuple[str, ...]:
        needed = graph.ancestors(targets)
        return tuple(i for i in graph.inputs if i in needed)
    entries = {"forward": reads(graph.outputs)}
    if graph.loss is not None:
        entries.update(evaluate=reads([*graph.outputs, graph.loss]), gradients=reads([graph.loss]))
    # Where a kernel's constants come from, for an error about one of them.
    fields = {node: "expr" if v.op == "elementwise" else next(
        (a for a, value in v.attrs.items() if isinstance(value, float)), None)
        for node, v in graph.nodes.items()}
    rule = update_rule(graph.optimizer) if graph.optimizer else None
    return Interface(graph.name, layout_order(graph),
                     {i: v.shape for i, v in graph.inputs.items()},
                     {o: graph.values[o].shape for o in graph.outputs}, graph.loss, entries,
                     dict(graph.optimizer) if graph.optimizer else None, fields,
                     tuple(graph.trainable_params),
                     {i: v.dtype for i, v in graph.inputs.items() if v.dtype == INT32},
                     {i: b.bound for i, b in graph.index_bounds().items()},
                     {s: HYPERPARAMETER_DOC[s] for s in rule.hyper} if rule else {},
                     {s: v for s, v in rule.initial.items() if v} if rule else {},
                     {k: v for k, v in structure(graph.optimizer).items() if k != "name"}
                     if rule else {}, tuple(rule.slots) if rule else ())


def layout_order(graph: Graph) -> dict[str, tuple[int, ...]]:
    """The params as the flat params block holds them: the trainable ones first, in
    declaration order (so the optimizer's state covers one range), then the others."""
    ordered = [p for p, v in graph.params.items() if v.trainable] + \
        [p for p, v in graph.params.items() if not v.trainable]
    return {p: graph.params[p].shape for p in ordered}


def _batch_mean(graph: Graph, buffers: dict[str, Buffer]) -> Kernel:
    b = sp.Symbol("b", integer=True, nonnegative=True)
    buffers[LOSS_MEAN] = Buffer(LOSS_MEAN, (), False, LOSS)
    return Kernel(LOSS_MEAN, (sp.Integer(0),), ((b, BATCH),),
                  buffers[graph.loss].base[b], SUM, ACC / BATCH, graph.loss, "batch mean")


def evaluation_program(graph: Graph, low: Lowered) -> Program:
    """The outputs and the batch-mean loss from one forward pass (validation, metrics)."""
    kernels = _kernels_for(graph, low, list(graph.outputs) + [graph.loss])
    buffers = dict(_used_buffers(low.buffers, kernels))
    kernels.append(_batch_mean(graph, buffers))
    for o in graph.outputs:
        buffers[o] = _with_role(buffers[o], OUTPUT)
    prog = Program(buffers, kernels)
    prog.check()
    return prog


def derive(graph: Graph) -> Derivation:
    low = lower(graph)
    fwd = forward_program(graph, low)
    if graph.loss is None:
        return Derivation(fwd, Program({}, []), [], interface=interface(graph))

    # The gradients (and the train step) see the training mode's kernels.
    train = lower(graph, training=True) if has_modes(graph) else low
    kernels = _kernels_for(graph, train, [graph.loss])
    buffers = dict(_used_buffers(train.buffers, kernels))
    for p, v in graph.params.items():
        buffers.setdefault(p, train.buffers[p])
    mean = _batch_mean(graph, buffers)

    # Which buffers need a gradient: they depend on a trainable param and the loss depends
    # on them.
    depends = {n: buf.role == PARAM and graph.params[n].trainable for n, buf in buffers.items()}
    for k in kernels:
        if buffers[k.out].differentiable and any(depends[r] for r in k.reads()):
            depends[k.out] = True
    reaches = {n: False for n in buffers}
    reaches[graph.loss] = True
    for k in reversed(kernels):
        if reaches[k.out]:
            for r in k.reads():
                reaches[r] = True
    active = {n for n in buffers if depends[n] and reaches[n]}
    # Integers are inputs (indices), never computed from a param: no gradient reaches them.
    assert all(buffers[n].dtype == REAL for n in active), active

    sweep = _Sweep(buffers)
    argmax_after: dict[int, Kernel] = {}
    for position, k in reversed(list(enumerate(kernels))):
        if k.out not in active:
            continue
        assert k.guard == sp.true, f"{k.node}: a forward kernel with a guard"
        reads = k.accesses()
        dummies = {a: sp.Symbol(f"_a{j}", real=True) for j, a in enumerate(reads)}
        body = k.body.xreplace(dummies)
        post = k.post.xreplace(dummies)
        dpost = sp.diff(post, ACC)
        assert not dpost.has(ACC), f"{k.node}: post must be affine in the reduced value"
        out_ref = buffers[k.out].base[k.out_index]
        seed = sp.Integer(1) / BATCH if k.out == graph.loss else sweep.grad(k.out).base[k.out_index]
        out_loops = tuple((s, e) for s, e in k.loops if s not in k.reduction_loops())
        chosen = None   # a max: where its argmax kernel (run after it) found the maximum
        if k.mode == MAX:
            arg = buffers[k.out]
            arg = buffers[f"{k.out}.argmax"] = Buffer(f"{k.out}.argmax", arg.shape, arg.batched,
                                                      TEMP, differentiable=False)
            argmax_after[position] = Kernel(arg.name, k.out_index, k.loops, k.body, ARGMAX,
                                            ACC, k.node, f"where {k.out} is taken")
            chosen = sp.Eq(k.reduction_position(), arg.base[k.out_index])
        for a in reads:
            src = str(a.base.label)
            if src not in active:
                continue
            in_post = post.has(dummies[a])
            derived = _pin_kinks(sp.diff(post if in_post else body, dummies[a]))
            if not in_post:
                derived = derived * dpost
            if chosen is not None:   # max_r f(r) changes with f(r*) alone, r* its argmax
                derived = sp.Piecewise((derived, chosen), (0, True))
            if derived == 0:
                continue
            if tree_size(derived, MAX_DERIVED_SIZE) > MAX_DERIVED_SIZE:
                raise SpecError(
                    f"the derivative with respect to {src} grows past {MAX_DERIVED_SIZE} "
                    "terms (a product of many factors that each hold it, say); split the "
                    "formula over several nodes", node=k.node,
                    field="expr" if graph.values[k.node].op == "elementwise" else None)
            used, through_output = derived, False
            if k.mode == ASSIGN and len(reads) == 1:
                g = output_form(body, derived, dummies[a])
                if g is not None:
                    used, through_output = g.subs(sp.Symbol("Y"), out_ref), True
            used_back = used.xreplace({d: r for r, d in dummies.items()})
            sweep.local.append(LocalDerivative(k.node, k, a, derived.xreplace(
                {d: r for r, d in dummies.items()}), used_back, through_output))
            sweep.contribute(sweep.grad(src), tuple(a.indices), out_loops if in_post else k.loops,
                             seed * used_back, k.node, f"d{k.out}/d{src}")
    # The batch's values of the running statistics the loss's nodes keep, in their params'
    # gradient slots (a batch_norm the loss does not depend on updates nothing).
    needed = graph.ancestors([graph.loss])
    statistics = [s for s in train.statistics if s.kernel.node in needed]
    for s in statistics:
        sweep.initialized.add(sweep.grad(s.param).name)
    for p in graph.params:
        g = sweep.grad(p)
        if g.name not in sweep.initialized:  # the loss does not depend on this param
            sweep.initialized.add(g.name)
            sweep.zero(g, p)

    forward_part = []
    for position, k in enumerate(kernels):
        forward_part += [k] + ([argmax_after[position]] if position in argmax_after else [])
    grad_kernels = forward_part + [s.kernel for s in statistics] + [mean] + sweep.kernels
    prog = Program(_used_buffers(sweep.buffers, grad_kernels) | {
        grad_name(p): sweep.buffers[grad_name(p)] for p in graph.params}, grad_kernels)
    prog.check()
    face = interface(graph)
    running = {s.param: s.momentum for s in statistics}
    update = None
    if graph.optimizer:
        offsets, _ = param_layout(face.params)
        layout = {p: (offsets[p], max(1, int(np.prod(shape)))) for p, shape in face.params.items()}
        update = lower_update(update_rule(graph.optimizer), layout,
                              sum(layout[p][1] for p in face.trainable), running)
    return Derivation(fwd, prog, sweep.local, evaluation_program(graph, low), face, update,
                      running)
