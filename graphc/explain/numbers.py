"""The derivation with numbers in it: a worked example, and the fully expanded view.

`run` evaluates the gradients program kernel by kernel, exactly as written in index
notation (NumPy over each kernel's loop grid), which is what a student does by hand: every
forward value, local derivative and δ below comes from the very formulas shown. The result
is then checked against the compiled model (`graphc.compile(..., dtype="float64")`) and
the independent reference, so a number on the page is one the C agrees with.

`expand` writes the loss of a tiny net as one SymPy expression of its weights (one
example, symbolic inputs), differentiates it directly, and compares that with the chain
rule's result, the same kernels run on SymPy expressions instead of numbers.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from graphc.derive import LOSS_MEAN
from graphc.ir import ACC, BATCH, Kernel, Program

from . import notation as nt

MAX_EXPANDED_PARAMS = 64      # scalars; beyond this the expanded loss is too long to read
SYMBOLIC_BUDGET = 15.0        # seconds of symbolic checking for the expanded view, then numeric
SYMBOLIC_OPS = 3000           # a difference larger than this is checked numerically only
MAX_LOSS_OPS = 2000           # an expanded loss longer than this is not worth reading


# ---------------------------------------------------------------- numeric kernels

def _shape(buf, n: int) -> tuple:
    shape = ((n,) if buf.batched else ()) + tuple(buf.shape)
    return shape or (1,)


def _grid(k: Kernel, n: int, reduced: bool = False):
    """Index arrays of the kernel's loops (broadcastable), reduction loops of length 1."""
    red = set(k.reduction_loops()) if reduced else set()
    extents = [1 if s in red else (n if e == BATCH else int(e)) for s, e in k.loops]
    mesh = np.meshgrid(*[np.arange(e) for e in extents], indexing="ij", sparse=True) if extents else []
    return [s for s, _ in k.loops], mesh, tuple(extents)


def _offsets(buf, index, syms, mesh, shape) -> np.ndarray:
    """Row-major flat offsets of buf[index] at every grid point, batch axis first: the C's
    addressing (reshape and concat write through an offset kept in their last index)."""
    flat = sp.expand(buf.flat_offset(index))
    value = sp.lambdify(syms, flat, "numpy")(*mesh) if syms else int(flat)
    return np.broadcast_to(np.asarray(value, dtype=np.intp), shape)


def evaluate(expr: sp.Expr, k: Kernel, env: dict, buffers, n: int, *, reduced: bool = False,
             acc=None) -> np.ndarray:
    """`expr` (over the kernel's reads and loop symbols) at every point of the kernel's grid."""
    syms, mesh, shape = _grid(k, n, reduced)
    reads = sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key)
    dummies = [sp.Dummy() for _ in reads]
    values = [env[str(a.base.label)].reshape(-1)[_offsets(buffers[str(a.base.label)], a.indices,
                                                           syms, mesh, shape)] for a in reads]
    args = dummies + syms + [BATCH, ACC]
    f = sp.lambdify(args, expr.xreplace(dict(zip(reads, dummies))), "numpy")
    with np.errstate(all="ignore"):   # Piecewise evaluates every branch
        out = f(*values, *mesh, n, acc if acc is not None else 0.0)
    return np.broadcast_to(np.asarray(out, dtype=np.float64), shape)


def run(program: Program, env: dict, n: int) -> dict:
    """Every buffer of `program`, evaluated kernel by kernel from `env` (inputs, params)."""
    buffers = program.buffers
    env = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in env.items()}
    for name, buf in buffers.items():
        if name not in env:
            env[name] = np.zeros(_shape(buf, n))
    for k in program.kernels:
        syms, mesh, shape = _grid(k, n)
        out = env[k.out].reshape(-1)   # a view: writes land in env
        target = buffers[k.out]
        if k.mode in ("assign", "accumulate"):
            value = evaluate(k.body, k, env, buffers, n)
            where = _offsets(target, k.out_index, syms, mesh, shape)
            if k.mode == "assign":
                out[where] = value
            else:
                np.add.at(out, where, value)
            continue
        red = tuple(j for j, (s, _) in enumerate(k.loops) if s in k.reduction_loops())
        value = evaluate(k.body, k, env, buffers, n)
        acc = value.max(axis=red, keepdims=True) if k.mode == "max" else value.sum(axis=red, keepdims=True)
        if k.mode == "sum":
            acc = evaluate(k.post, k, env, buffers, n, reduced=True, acc=acc)
        syms, mesh, rshape = _grid(k, n, reduced=True)
        out[_offsets(target, k.out_index, syms, mesh, rshape)] = acc
    return env


# ---------------------------------------------------------------- the worked example

def fmt(x: float) -> str:
    return f"{x:.6g}" if x != 0 else "0"


def array_text(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a), precision=4, suppress_small=False, threshold=60,
                           edgeitems=3, max_line_width=88, separator=", ")


@dataclass(frozen=True)
class Term:
    expr: sp.Expr            # the term with its indices filled in, e.g. δh1[0, 3]·x[0, 5]
    factors: tuple           # ((factor expr, value), ...): the δ, then the local derivative
    value: float
    point: tuple             # ((loop symbol, value), ...)


@dataclass(frozen=True)
class TraceLine:
    """One δ element worked out by hand: the terms of its kernels at that element."""
    buffer: str
    element: tuple
    terms: tuple             # (Step, Term), in kernel order then loop order
    omitted: dict            # Step -> terms not listed (a long sum)
    parts: dict              # Step -> that kernel's whole contribution
    value: float             # the δ element as the sweep computed it


@dataclass
class Worked:
    n: int
    inputs: dict
    params: dict
    env: dict                        # every buffer of the gradients program, by the formulas
    values: dict                     # forward values from graphc.reference (node level)
    grads_c: dict                    # model.gradients (the compiled C, float64)
    loss_c: float
    checks: list = field(default_factory=list)   # (what, max abs difference, ok)
    traces: dict = field(default_factory=dict)   # param -> [TraceLine]


MAX_TERMS = 8


def _element(buf, n: int, indices) -> tuple:
    """An element read at `indices` as a plain multi-index of its buffer."""
    flat = int(buf.flat_offset(tuple(sp.sympify(i) for i in indices)))
    return tuple(int(i) for i in np.unravel_index(flat, _shape(buf, n)))


def _normal(expr: sp.Expr, buffers, n: int) -> sp.Expr:
    return expr.xreplace({a: sp.IndexedBase(str(a.base.label))[_element(buffers[str(a.base.label)], n, a.indices)]
                          for a in expr.atoms(sp.Indexed)})


def _terms(k: Kernel, env: dict, buffers, n: int, element: tuple, seed_of) -> tuple[list[Term], int, float]:
    """The loop points of kernel k that write `element` of its output, each as a term."""
    syms, mesh, shape = _grid(k, n)
    out = buffers[k.out]
    where = _offsets(out, k.out_index, syms, mesh, shape)
    points = np.argwhere(where == np.ravel_multi_index(element, _shape(out, n)))
    seed, local = seed_of(k)
    seed_v = evaluate(seed, k, env, buffers, n)
    local_v = evaluate(local, k, env, buffers, n)
    terms = []
    for p in points[:MAX_TERMS]:
        at = {s: sp.Integer(int(i)) for s, i in zip(syms, p)}
        sv, lv = float(seed_v[tuple(p)]), float(local_v[tuple(p)])
        s_at, l_at = _normal(seed.xreplace(at), buffers, n), _normal(local.xreplace(at), buffers, n)
        terms.append(Term(s_at * l_at, ((s_at, sv), (l_at, lv)), sv * lv, tuple(at.items())))
    total = float(sum(seed_v[tuple(p)] * local_v[tuple(p)] for p in points))
    return terms, max(0, len(points) - MAX_TERMS), total


def split_seed(k: Kernel) -> tuple[sp.Expr, sp.Expr]:
    """A backward kernel's body is seed·(local derivative), as `derive` built it: the seed
    is the δ of the kernel's output, or 1/n for the loss (L is the batch mean)."""
    def is_seed(f):
        return (isinstance(f, sp.Indexed) and nt.is_grad(str(f.base.label))) or \
            (f.has(BATCH) and not f.atoms(sp.Indexed))
    factors = sp.Mul.make_args(k.body)
    return (sp.Mul(*[f for f in factors if is_seed(f)]),
            sp.Mul(*[f for f in factors if not is_seed(f)]))


def trace(steps, param: str, env: dict, buffers, n: int) -> list[TraceLine]:
    """The chain rule at one element, from the param's largest gradient up to the loss:
    each δ element's terms with their numbers, then the δ elements those terms read."""
    grad = env[f"{param}.grad"]
    element = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(grad))), grad.shape))
    todo, seen, lines = [(f"{param}.grad", element)], set(), []
    by_target = {}
    for s in steps:
        by_target.setdefault(s.kernel.out, []).append(s)
    while todo:
        buf, el = todo.pop(0)
        if buf in seen or buf not in by_target:
            continue
        seen.add(buf)
        terms, omitted, parts = [], {}, {}
        for s in by_target[buf]:
            t, omitted[s], parts[s] = _terms(s.kernel, env, buffers, n, el, split_seed)
            terms += [(s, x) for x in t]
            for term in t[:1]:   # follow the first term's δ: one chain up to the loss
                f = term.factors[0][0]
                if isinstance(f, sp.Indexed) and nt.is_grad(str(f.base.label)):
                    todo.append((str(f.base.label), tuple(int(i) for i in f.indices)))
        value = float(env[buf].reshape(-1)[np.ravel_multi_index(el, env[buf].shape)])
        lines.append(TraceLine(buf, el, tuple(terms), omitted, parts, value))
    return lines


# ---------------------------------------------------------------- the expanded view

@dataclass(frozen=True)
class ElementCheck:
    element: tuple
    direct: sp.Expr
    chain: sp.Expr
    symbolic: bool | None       # True: SymPy reduced the difference to 0; False: it did not;
                                # None: not tried (too large or out of time)
    max_numeric_diff: float     # at random points
    ok: bool


@dataclass
class Expanded:
    loss: sp.Expr                   # L for one example, inputs symbolic
    param: str
    checks: list[ElementCheck]
    points: int                     # random points of the numeric check
    seconds: float
    skipped: str | None = None      # why there are no checks
    shifts: tuple = ()              # stop-gradient shifts left as symbols


def _symbolic_env(program: Program) -> dict:
    """Flat object arrays, one example: inputs and params as their own elements, x[0, i]."""
    env = {}
    for name, buf in program.buffers.items():
        shape = _shape(buf, 1)
        arr = np.full(math.prod(shape), sp.Integer(0), dtype=object)
        if buf.role in ("input", "param"):
            for j in range(arr.size):
                arr[j] = sp.IndexedBase(name)[tuple(int(i) for i in np.unravel_index(j, shape))]
        env[name] = arr
    return env


def run_symbolic(program: Program) -> dict:
    """The program with one example and SymPy values: params W[i, j] and inputs x[0, i]
    as symbols. A stop-gradient shift (softmax's max) becomes a constant symbol m."""
    buffers = program.buffers
    env = _symbolic_env(program)

    def offset(buf: str, index, at) -> int:
        return int(buffers[buf].flat_offset(tuple(sp.sympify(i).xreplace(at) for i in index)))

    def fill(expr, at):
        e = expr.xreplace(at)
        return e.xreplace({a: env[str(a.base.label)][offset(str(a.base.label), a.indices, {})]
                           for a in e.atoms(sp.Indexed)})

    for k in program.kernels:
        syms = [s for s, _ in k.loops]
        red = set(k.reduction_loops())
        out = env[k.out]
        acc: dict = {}
        for point in itertools.product(*[range(1 if e == BATCH else int(e)) for _, e in k.loops]):
            at = dict(zip(syms, (sp.Integer(p) for p in point)))
            at[BATCH] = sp.Integer(1)
            where = offset(k.out, k.out_index, at)
            if k.mode == "max":
                name = f"{nt.text_name(k.out)}[{', '.join(map(str, np.unravel_index(where, _shape(buffers[k.out], 1))))}]"
                out[where] = sp.Symbol(name)
                continue
            value = fill(k.body, at)
            if k.mode == "assign":
                out[where] = value
            elif k.mode == "accumulate":
                out[where] = out[where] + value
            else:   # sum: post(Σ body), post at the output's loop values
                total, at_out = acc.get(where, (0, {s: v for s, v in at.items() if s not in red}))
                acc[where] = (total + value, at_out)
        for where, (total, at_out) in acc.items():
            out[where] = fill(k.post, at_out).xreplace({ACC: total})
    return env


def expand(program: Program, graph, param: str, seed: int = 0, points: int = 5) -> Expanded:
    """L of one example as one expression, ∂L/∂param by `sympy.diff` directly, compared
    with the chain rule (the backward kernels run on the same expressions)."""
    from graphc.verify import sample_inputs   # inputs from the domains the checks use
    start = time.perf_counter()
    env = run_symbolic(program)
    loss = env[LOSS_MEAN][0]
    if sp.count_ops(loss) > MAX_LOSS_OPS:
        return Expanded(loss, param, [], points, time.perf_counter() - start, skipped=(
            f"written out, L has {sp.count_ops(loss)} operations (more than {MAX_LOSS_OPS}): "
            "too long to read, and to differentiate quickly"))
    grads = env[f"{param}.grad"]
    shape = _shape(program.buffers[param], 1)
    atoms = sorted(loss.atoms(sp.Indexed), key=sp.default_sort_key)
    shifts = sorted((c for c in loss.atoms(sp.Symbol) if str(c) not in program.buffers), key=str)
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(points):
        inputs = sample_inputs(graph, 1, seed + p)
        row = [float(inputs[str(a.base.label)][tuple(int(i) for i in a.indices)])
               if str(a.base.label) in inputs else 0.5 * float(rng.standard_normal()) for a in atoms]
        # A stop-gradient shift: any value gives the same L and the same gradient.
        samples.append(row + [float(rng.standard_normal()) for _ in shifts])
    checks = []
    base = sp.IndexedBase(param)
    for j in range(grads.size):
        idx = tuple(int(i) for i in np.unravel_index(j, shape))
        direct = sp.diff(loss, base[idx])
        chain = grads[j]
        f = sp.lambdify(atoms + shifts, [direct, chain], "math", cse=True)
        values = np.array([f(*row) for row in samples], dtype=np.float64)
        numeric = float(np.max(np.abs(values[:, 0] - values[:, 1])))
        scale = max(1.0, float(np.max(np.abs(values[:, 1]))))
        diff = direct - chain
        symbolic = None
        if time.perf_counter() - start < SYMBOLIC_BUDGET and sp.count_ops(diff) <= SYMBOLIC_OPS:
            symbolic = is_zero(diff)
        # Not reduced to 0 is not a proof of a difference: the numbers decide then.
        ok = symbolic is True or numeric <= 1e-9 * scale
        checks.append(ElementCheck(idx, direct, chain, symbolic, numeric, bool(ok)))
    return Expanded(loss, param, checks, points, time.perf_counter() - start, shifts=tuple(shifts))


def is_zero(e: sp.Expr) -> bool:
    """Whether SymPy proves e == 0. Written through exp (tanh, cosh... rewritten, exp of a
    sum split into a product), a net's derivative is a rational function of exponentials,
    which `cancel` decides; `simplify` (slow) only gets what is left, when it is small."""
    r = sp.cancel(sp.together(sp.expand(e.rewrite(sp.exp), power_exp=True)))
    return r == 0 or (sp.count_ops(r) <= 200 and sp.simplify(r) == 0)


def expandable(graph) -> bool:
    return sum(math.prod(v.shape) for v in graph.params.values()) <= MAX_EXPANDED_PARAMS
