"""The derivation with numbers in it: a worked example, and the fully expanded view.

`run` evaluates the gradients program kernel by kernel, exactly as written in index
notation (NumPy over each kernel's loop grid), which is what a student does by hand: every
forward value, local derivative and δ below comes from the very formulas shown. The result
is then checked against the compiled model (`graphc.compile(..., dtype="float64")`) and
the independent reference, so a number on the page is one the C agrees with.

`expand` writes the loss of a tiny net as one SymPy expression of its weights (one
example, symbolic inputs), differentiates it directly, and compares that with the chain
rule's result, the same kernels run on SymPy expressions instead of numbers. It is
bounded by what it writes out, measured as it is built (MAX_LOSS_OPS and the rest below):
past a bound the view is omitted with a one-line reason, and SymPy's proofs are tried on
bounded expressions within SYMBOLIC_BUDGET seconds, so that any small spec explains in
seconds.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import sympy as sp

from graphc.derive import LOSS_MEAN
from graphc.dropout import keep_mask
from graphc.functions import for_lambdify, numpy_namespace
from graphc.ir import (ACC, ACCUMULATE, ARGMAX, ASSIGN, BATCH, MAX, STEP, SUM, Kernel, Program,
                       array, grad_name)

from . import notation as nt
from .bounds import TreeOps, expansion_work, ops_within, rewritten_within, small

# Random inputs come from their own stream of `seed`, apart from the params' (drawn with
# `seed` itself, as graphc.compile draws them): from one stream, the first input would be
# a multiple of the first param (W1[i]/x[i] the same number for every i).
INPUT_STREAM = 1


def input_seed(seed: int, stream: int = INPUT_STREAM) -> int:
    """A seed for random inputs, independent of the params' stream of `seed`."""
    return int(np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1)[0])

MAX_EXPANDED_PARAMS = 64      # scalars; beyond this the expanded loss is too long to read
# The expanded view is bounded by the size of what it writes out, measured as it is built:
MAX_LOSS_OPS = 200            # operations of L; a longer L is too long to read (and to check)
MAX_VALUE_OPS = 1000          # of any one value on the way (a δ, a gradient element)
MAX_TOTAL_OPS = 100_000       # of all values of the program together (one example)
MAX_POINTS = 20_000           # values the program computes for one example
# SymPy's proof that direct − chain rule is 0, per element, is tried only when
SYMBOLIC_OPS = 1200           # the difference has at most this many operations,
MAX_REWRITE_OPS = 4000        # written through exp, it has at most this many operations,
MAX_EXPANSION = 4000          # expanding it writes at most this many terms (estimated),
MAX_CANCEL_OPS = 20_000       # and cancel gets at most this many operations;
SYMBOLIC_BUDGET = 6.0         # CPU seconds of proofs per explanation, then the numbers alone decide
PROOF_SIMPLIFY_OPS = 100      # what cancel leaves goes to simplify when it is this small


# ---------------------------------------------------------------- numeric kernels

# What lambdify evaluates formulas with: the defined functions (sigmoid, softplus, relu,
# leaky_relu) by name; NumPy has no erf.
NUMERIC = [{**numpy_namespace(), "erf": np.vectorize(math.erf, otypes=[float]),
            "dropout_keep": lambda key, step, element, threshold: keep_mask(
                int(key), int(step), element, int(threshold)).astype(np.float64)}, "numpy"]
# The worked numbers are the first train step's: dropout draws the masks of step 0.
STEP_SHOWN = 0


def _shape(buf, n: int) -> tuple:
    shape = ((n,) if buf.batched else ()) + tuple(buf.shape)
    return shape or (1,)


def _grid(k: Kernel, n: int, reduced: bool = False):
    """Index arrays of the kernel's loops (broadcastable), reduction loops of length 1."""
    red = set(k.reduction_loops()) if reduced else set()
    extents = [1 if s in red else (n if e == BATCH else int(e)) for s, e in k.loops]
    mesh = np.meshgrid(*[np.arange(e) for e in extents], indexing="ij", sparse=True) if extents else []
    return [s for s, _ in k.loops], mesh, tuple(extents)


def _offsets(buf, index, syms, mesh, shape, env=None, buffers=None) -> np.ndarray:
    """Row-major flat offsets of buf[index] at every grid point, batch axis first: the C's
    addressing (reshape and concat write through an offset kept in their last index). An
    index read from data (an embedding's row: table[tokens[b, i], d]) takes its values
    from `env`."""
    flat = sp.expand(buf.flat_offset(index))
    reads = sorted(flat.atoms(sp.Indexed), key=sp.default_sort_key)
    if reads:
        holes = [sp.Dummy() for _ in reads]
        values = [_read(env, buffers, a, syms, mesh, shape) for a in reads]
        with np.errstate(invalid="ignore"):   # NaN where a read is outside: never selected
            value = sp.lambdify(holes + syms, flat.xreplace(dict(zip(reads, holes))),
                                "numpy")(*values, *mesh)
        value = np.nan_to_num(np.asarray(value, dtype=np.float64), nan=-1)
        return np.broadcast_to(value.astype(np.intp), shape)
    value = sp.lambdify(syms, flat, "numpy")(*mesh) if syms else int(flat)
    return np.broadcast_to(np.asarray(value, dtype=np.intp), shape)


def _read(env: dict, buffers, a: sp.Indexed, syms, mesh, shape) -> np.ndarray:
    """The values of read `a` at every grid point. A padded read takes its array outside
    where its guard is false: those points read NaN, which the guard's Piecewise never
    selects (NumPy's select does not compute with the branch it leaves), so a read the
    guard does not cover would show as NaN, never as a neighbour's value."""
    flat = env[str(a.base.label)].reshape(-1)
    where = _offsets(buffers[str(a.base.label)], a.indices, syms, mesh, shape, env, buffers)
    inside = (where >= 0) & (where < flat.size)
    if inside.all():
        return flat[where]
    return np.where(inside, flat[np.clip(where, 0, max(flat.size - 1, 0))], np.nan)


def guard_mask(k: Kernel, n: int, reduced: bool = False, env=None,
               buffers=None) -> np.ndarray | None:
    """Where a guarded kernel's statement runs, over its grid (None: everywhere). A guard
    on an index read from data (0 <= tokens[b, i] < V) is evaluated on `env`."""
    if k.guard == sp.true:
        return None
    if k.guard.atoms(sp.Indexed):
        inside = evaluate(sp.Piecewise((1, k.guard), (0, True)), k, env, buffers, n,
                          reduced=reduced)
        return inside == 1
    syms, mesh, shape = _grid(k, n, reduced)
    value = sp.lambdify(syms, k.guard, "numpy")(*_dense(mesh, shape))
    return np.broadcast_to(np.asarray(value, dtype=bool), shape)


def _dense(mesh, shape) -> list[np.ndarray]:
    """The loop indices over the whole grid: NumPy's logical_and.reduce, which lambdify
    writes for a condition's `&`, does not broadcast sparse index arrays."""
    return [np.broadcast_to(m, shape) for m in mesh]


def evaluate(expr: sp.Expr, k: Kernel, env: dict, buffers, n: int, *, reduced: bool = False,
             acc=None) -> np.ndarray:
    """`expr` (over the kernel's reads and loop symbols) at every point of the kernel's grid."""
    syms, mesh, shape = _grid(k, n, reduced)
    reads = sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key)
    dummies = [sp.Dummy() for _ in reads]
    values = [_read(env, buffers, a, syms, mesh, shape) for a in reads]
    args = dummies + syms + [BATCH, ACC, STEP]
    f = sp.lambdify(args, for_lambdify(expr.xreplace(dict(zip(reads, dummies)))), NUMERIC)
    if expr.has(sp.Piecewise) or expr.atoms(sp.Rel):
        mesh = _dense(mesh, shape)
    with np.errstate(all="ignore"):   # Piecewise evaluates every branch
        out = f(*values, *mesh, n, acc if acc is not None else 0.0, STEP_SHOWN)
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
        if k.mode in (ASSIGN, ACCUMULATE):
            value = evaluate(k.body, k, env, buffers, n)
            where = _offsets(target, k.out_index, syms, mesh, shape, env, buffers)
            if k.mode == ASSIGN:
                out[where] = value
            else:   # a guarded scatter adds only where its target index lies inside
                runs = guard_mask(k, n, env=env, buffers=buffers)
                if runs is None:
                    np.add.at(out, where, value)
                else:
                    np.add.at(out, where[runs], value[runs])
            continue
        red = tuple(j for j, (s, _) in enumerate(k.loops) if s in k.reduction_loops())
        value = evaluate(k.body, k, env, buffers, n)
        if k.mode == ARGMAX:
            acc = argmax_position(value, red)
        elif k.mode == MAX:
            acc = value.max(axis=red, keepdims=True)
        else:
            acc = value.sum(axis=red, keepdims=True)
        if k.mode == SUM:
            acc = evaluate(k.post, k, env, buffers, n, reduced=True, acc=acc)
        syms, mesh, rshape = _grid(k, n, reduced=True)
        out[_offsets(target, k.out_index, syms, mesh, rshape)] = acc
    return env


def argmax_position(value: np.ndarray, red: tuple[int, ...]) -> np.ndarray:
    """The position (row-major over the reduction axes `red`, in their order) that the C's
    scan `if (v > acc || isnan(v)) { acc = v; at = position; }` from acc = -inf ends on:
    the first maximum, or the last NaN if there is one; 0 when every value is -inf. The
    result keeps the reduced axes, of length 1."""
    keep = [a for a in range(value.ndim) if a not in red]
    moved = np.transpose(value, keep + list(red))
    flat = moved.reshape(moved.shape[:len(keep)] + (-1,))
    nan = np.isnan(flat)
    last_nan = flat.shape[-1] - 1 - np.argmax(nan[..., ::-1], axis=-1)
    first_max = np.argmax(np.where(nan, -np.inf, flat), axis=-1)
    best = np.take_along_axis(flat, first_max[..., None], axis=-1)[..., 0]
    at = np.where(nan.any(axis=-1), last_nan, np.where(best > -np.inf, first_max, 0))
    shape = [1 if a in red else value.shape[a] for a in range(value.ndim)]
    # `at` is over the kept axes in order: put the reduced axes back as length 1.
    return at.astype(np.float64).reshape(shape)


# ---------------------------------------------------------------- the worked example

def fmt(x: float, digits: int = 6) -> str:
    return f"{x:.{digits}g}" if x != 0 else "0"


def _agrees(terms: list[tuple[str, ...]], total: str) -> bool:
    """Do the printed numbers, multiplied and added exactly, give the printed total to its
    last digit?"""
    exact = sum((math.prod((Fraction(x) for x in term), start=Fraction(1)) for term in terms), Fraction(0))
    return abs(exact - Fraction(total)) <= Fraction(10) ** Decimal(total).as_tuple().exponent / 2


def sum_of_products(terms: list[tuple[float, ...]], total: float) -> tuple[list[tuple[str, ...]], str]:
    """Σ_k Π term_k = total, printed: with the fewest significant digits, six at least, at
    which the printed numbers' own arithmetic gives the printed total to its last digit.
    Six alone can read as an error (0.203694 × 1 = 0.203695, where the 1 is 1.000003). At
    17 a float's digits are all shown, and what is left is the float arithmetic's own
    rounding: the total is then the printed numbers' exact arithmetic, rounded."""
    if not all(math.isfinite(x) for term in terms for x in term) or not math.isfinite(total):
        return [tuple(fmt(x) for x in term) for term in terms], fmt(total)
    for digits in range(6, 18):
        shown = [tuple(fmt(x, digits) for x in term) for term in terms]
        if _agrees(shown, fmt(total, digits)):
            return shown, fmt(total, digits)
    exact = sum((math.prod((Fraction(x) for x in term), start=Fraction(1)) for term in shown), Fraction(0))
    with localcontext() as c:
        c.prec = 17
        rounded = Decimal(exact.numerator) / Decimal(exact.denominator)
    return shown, fmt(rounded, 17) if exact else "0"


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
    zeros: dict = field(default_factory=dict)   # Step -> Zeros: the terms left out as 0


@dataclass(frozen=True)
class Zeros:
    """The terms of a long sum that are 0, left out of its listing: `seed` of them because
    their δ is 0 (a relu that was off, a window's element that was not its maximum), `local`
    because their local derivative is (a read in the padding)."""
    seed: int
    local: int
    padding: int = 0     # of `local`: the local derivative's case is 0 there (a padded read)

    @property
    def count(self) -> int:
        return self.seed + self.local


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


MAX_TERMS = 8        # a sum's terms listed in full up to this many
MAX_NONZERO = 128    # a longer sum lists its terms that are not 0, up to this many (a 3x3
                     # convolution's weight over 2 examples of 8x8: all of them)


def _element(buf, n: int, indices) -> tuple:
    """An element read at `indices` as a plain multi-index of its buffer."""
    flat = int(buf.flat_offset(tuple(sp.sympify(i) for i in indices)))
    return tuple(int(i) for i in np.unravel_index(flat, _shape(buf, n)))


def _normal(expr: sp.Expr, buffers, n: int) -> sp.Expr:
    return expr.xreplace({a: array(str(a.base.label))[_element(buffers[str(a.base.label)], n, a.indices)]
                          for a in expr.atoms(sp.Indexed)})


def _terms(k: Kernel, env: dict, buffers, n: int, element: tuple, seed_of):
    """The loop points of kernel k that write `element` of its output (where its guard
    lets it write), each as a term. A sum of more than MAX_TERMS lists only its terms that
    are not 0 (up to MAX_NONZERO), so that a convolution's long sums still add up as
    printed. Returns (terms, not listed and not 0, Zeros left out, the kernel's total)."""
    syms, mesh, shape = _grid(k, n)
    out = buffers[k.out]
    where = _offsets(out, k.out_index, syms, mesh, shape, env, buffers)
    hits = where == np.ravel_multi_index(element, _shape(out, n))
    runs = guard_mask(k, n, env=env, buffers=buffers)
    if runs is not None:
        hits = hits & runs
    points = np.argwhere(hits)
    seed, local = seed_of(k)
    seed_v = evaluate(seed, k, env, buffers, n)
    local_v = evaluate(local, k, env, buffers, n)
    at_points = [(tuple(p), float(seed_v[tuple(p)]), float(local_v[tuple(p)])) for p in points]
    total = float(sum(sv * lv for _, sv, lv in at_points))
    zeros = Zeros(0, 0)
    if len(at_points) > MAX_TERMS:
        flat = [p for p, sv, lv in at_points if sv != 0 and lv == 0]
        padding = sum(1 for p in flat[:500]
                      if local.xreplace({s: sp.Integer(int(i)) for s, i in zip(syms, p)}) == 0) \
            if local.has(sp.Piecewise) else 0
        zeros = Zeros(sum(1 for _, sv, _ in at_points if sv == 0), len(flat), padding)
        at_points = [t for t in at_points if t[1] != 0 and t[2] != 0]
        listed = at_points[:MAX_NONZERO]
    else:
        listed = at_points
    terms = []
    for p, sv, lv in listed:
        at = {s: sp.Integer(int(i)) for s, i in zip(syms, p)}
        s_at, l_at = _normal(seed.xreplace(at), buffers, n), _normal(local.xreplace(at), buffers, n)
        terms.append(Term(s_at * l_at, ((s_at, sv), (l_at, lv)), sv * lv, tuple(at.items())))
    return terms, len(at_points) - len(listed), zeros, total


def split_seed(k: Kernel) -> tuple[sp.Expr, sp.Expr]:
    """A backward kernel's body is seed·(local derivative), as `derive` built it: the seed
    is the δ of the kernel's output, or 1/n for the loss (L is the batch mean)."""
    def is_seed(f):
        return (isinstance(f, sp.Indexed) and nt.is_grad(str(f.base.label))) or \
            (f.has(BATCH) and not f.atoms(sp.Indexed))
    factors = sp.Mul.make_args(k.body)
    return (sp.Mul(*[f for f in factors if is_seed(f)]),
            sp.Mul(*[f for f in factors if not is_seed(f)]))


def trace(steps, param: str, env: dict, buffers, n: int, element: tuple | None = None) -> list[TraceLine]:
    """The chain rule at one element, from the param's gradient at `element` (by default
    its largest) up to the loss: each δ element's terms with their numbers, then the δ
    elements those terms read."""
    grad = env[grad_name(param)]
    if element is None:
        flat = int(np.argmax(np.abs(grad)))
    else:   # as the param's shape indexes it; a scalar's buffer is [1]
        shape = tuple(buffers[param].shape)
        flat = int(np.ravel_multi_index(element, shape)) if shape else 0
    element = tuple(int(i) for i in np.unravel_index(flat, grad.shape))
    todo, seen, lines = [(grad_name(param), element)], set(), []
    by_target = {}
    for s in steps:
        by_target.setdefault(s.kernel.out, []).append(s)
    while todo:
        buf, el = todo.pop(0)
        if buf in seen or buf not in by_target:
            continue
        seen.add(buf)
        terms, omitted, parts, zeros = [], {}, {}, {}
        for s in by_target[buf]:
            t, omitted[s], zeros[s], parts[s] = _terms(s.kernel, env, buffers, n, el, split_seed)
            terms += [(s, x) for x in t]
            # Follow the δ of the largest term (the first of equals): one chain up to the loss,
            # through the elements that matter (not a δ that is 0).
            for term in sorted(t, key=lambda x: -abs(x.value))[:1]:
                f = term.factors[0][0]
                if isinstance(f, sp.Indexed) and nt.is_grad(str(f.base.label)):
                    todo.append((str(f.base.label), tuple(int(i) for i in f.indices)))
        value = float(env[buf].reshape(-1)[np.ravel_multi_index(el, env[buf].shape)])
        lines.append(TraceLine(buf, el, tuple(terms), omitted, parts, value, zeros))
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
    loss: sp.Expr | None            # L for one example, inputs symbolic (None: not built)
    param: str
    checks: list[ElementCheck]
    points: int                     # random points of the numeric check
    seconds: float
    skipped: str | None = None      # why there are no checks
    shifts: tuple = ()              # stop-gradient shifts left as symbols


class TooLarge(Exception):
    """Written out, an expression of the expanded view grows past a bound."""

    def __init__(self, what: str, limit: int, unit: str = "operations"):
        super().__init__(f"written out, {what} grows past {limit} {unit}")
        self.what, self.limit, self.unit = what, limit, unit


class NotExpandable(Exception):
    """The program has a step no expression of symbolic inputs can write out."""


ARGMAX_REASON = ("max pooling sends the gradient to each window's first maximum, and which "
                 "element that is only numbers decide, not an expression of symbolic inputs "
                 "(the worked example shows it with numbers)")
INDEX_REASON = ("an index read from data (an embedding's row, a class index) picks which "
                "element is read, and only numbers decide that, not an expression of "
                "symbolic inputs (the worked example shows it with numbers)")


def _symbolic_env(program: Program) -> dict:
    """Flat object arrays, one example: inputs and params as their own elements, x[0, i]."""
    env = {}
    for name, buf in program.buffers.items():
        shape = _shape(buf, 1)
        arr = np.full(math.prod(shape), sp.Integer(0), dtype=object)
        if buf.role in ("input", "param"):
            for j in range(arr.size):
                arr[j] = array(name)[tuple(int(i) for i in np.unravel_index(j, shape))]
        env[name] = arr
    return env


def run_symbolic(program: Program, max_ops: int | None = MAX_VALUE_OPS,
                 max_total: int | None = MAX_TOTAL_OPS,
                 max_loss_ops: int | None = MAX_LOSS_OPS) -> dict:
    """The program with one example and SymPy values: params W[i, j] and inputs x[0, i]
    as symbols. A stop-gradient shift (softmax's max) becomes a constant symbol m.

    Every value is measured as it is built (the operations of its tree, counted once per
    new node): past `max_ops` for one value, `max_total` for all of them together, or
    `max_loss_ops` for the loss (once it is complete), it raises TooLarge. A net whose
    expressions grow fast (each layer's derivative repeats the layer below in every term)
    stops early instead of being written out. None: no bound."""
    buffers = program.buffers
    if any(k.mode == ARGMAX for k in program.kernels):
        raise NotExpandable(ARGMAX_REASON)
    if any(b.dtype != "real" for b in buffers.values()):
        raise NotExpandable(INDEX_REASON)
    grid = [[range(1 if e == BATCH else int(e)) for _, e in k.loops] for k in program.kernels]
    points = sum(math.prod(len(r) for r in g) for g in grid)
    if max_total is not None and points > MAX_POINTS:
        raise TooLarge("one example", MAX_POINTS, "values")
    env = _symbolic_env(program)
    size = TreeOps()
    stored: dict[tuple[str, int], int] = {}
    total = 0

    def measured(value, buf: str, where: int | None = None):
        """value, once its size is within the bounds; `where`: it is stored there."""
        nonlocal total
        n = size(value)
        if max_ops is not None and n > max_ops:
            raise TooLarge(f"an element of {nt.text_name(buf)}", max_ops)
        if where is not None:
            total += n + 1 - stored.get((buf, where), 0)
            stored[buf, where] = n + 1
            if max_total is not None and total > max_total:
                raise TooLarge("the program (all its values together)", max_total)
        return value

    for k, ranges in zip(program.kernels, grid):
        syms, mesh, shape = _grid(k, 1)
        red = set(k.reduction_loops())
        loop_syms = set(syms) | {BATCH}

        def offsets(buf: str, index) -> np.ndarray:   # flat, at every point of the grid
            return _offsets(buffers[buf], index, syms, mesh, shape).reshape(-1)

        def template(expr):
            """expr with its reads as placeholders, and how to fill them in at a point: the
            values substituted last, into the small template, never walked through."""
            reads = sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key)
            holes = [sp.Dummy() for _ in reads]
            where_ = [(env[str(r.base.label)], offsets(str(r.base.label), r.indices)) for r in reads]
            expr = expr.xreplace(dict(zip(reads, holes)))
            free = bool(expr.free_symbols & loop_syms)

            def value(arr, o: int):
                # A padded read outside its array: its guard, false at this point, drops it.
                return arr[o] if 0 <= o < arr.size else sp.nan

            def at_point(j: int, at: dict, acc=None):
                # One xreplace: it walks the template only, not the values put into it.
                put = dict(at) if free else {}
                put.update((h, value(arr, o[j])) for h, (arr, o) in zip(holes, where_))
                if acc is not None:
                    put[ACC] = acc
                return expr.xreplace(put)
            return at_point

        out = env[k.out]
        out_at = offsets(k.out, k.out_index)
        body = template(k.body) if k.mode != MAX else None
        post = template(k.post) if k.mode == SUM else None
        acc: dict = {}
        runs = guard_mask(k, 1)
        runs = runs.reshape(-1) if runs is not None else None
        for j, point in enumerate(itertools.product(*ranges)):
            if runs is not None and not runs[j]:
                continue   # a guarded scatter: its target lies outside here
            at = dict(zip(syms, (sp.Integer(p) for p in point)))
            at[BATCH] = sp.Integer(1)
            where = int(out_at[j])
            if k.mode == MAX:
                name = f"{nt.text_name(k.out)}[{', '.join(map(str, np.unravel_index(where, _shape(buffers[k.out], 1))))}]"
                out[where] = sp.Symbol(name)
                continue
            value = body(j, at)
            if k.mode == ASSIGN:
                out[where] = measured(value, k.out, where)
            elif k.mode == ACCUMULATE:
                out[where] = measured(out[where] + value, k.out, where)
            else:   # sum: post(Σ body), post at the output's loop values
                if where not in acc:
                    acc[where] = ([], [-1], j, {s: v for s, v in at.items() if s not in red})
                terms, n, _, _ = acc[where]
                terms.append(value)   # added up once at the end: Add sorts its terms
                n[0] += size(value) + 1
                if max_ops is not None and n[0] > max_ops:
                    raise TooLarge(f"an element of {nt.text_name(k.out)}", max_ops)
        for where, (terms, _, j, at_out) in acc.items():
            out[where] = measured(post(j, at_out, sp.Add(*terms)), k.out, where)
        if k.out == LOSS_MEAN and max_loss_ops is not None \
                and ops_within(out[0], max_loss_ops) is None:
            raise TooLarge("the loss L", max_loss_ops)
    return env


def expand_all(program: Program, graph, params, seed: int = 0, points: int = 5) -> dict[str, Expanded]:
    """For each of `params`: L of one example as one expression, ∂L/∂param by
    `sympy.diff` directly, compared with the chain rule (the backward kernels run on the
    same expressions). Bounded: written out, L past MAX_LOSS_OPS operations (or any value
    on the way past MAX_VALUE_OPS) and every param gets `skipped` instead; SymPy's proofs
    share SYMBOLIC_BUDGET seconds, then the numbers alone decide."""
    from graphc.verify import sample_inputs   # inputs from the domains the checks use
    start = time.perf_counter()
    params = list(params)

    def skip(reason: str, loss=None) -> dict[str, Expanded]:
        return {p: Expanded(loss, p, [], points, time.perf_counter() - start, skipped=reason)
                for p in params}
    if not params:
        return {}
    try:
        env = run_symbolic(program)
    except (TooLarge, NotExpandable) as e:
        return skip(str(e))
    loss = env[LOSS_MEAN][0]
    atoms = sorted(loss.atoms(sp.Indexed), key=sp.default_sort_key)
    shifts = sorted((c for c in loss.atoms(sp.Symbol) if str(c) not in program.buffers), key=str)
    rng = np.random.default_rng(seed)   # the params' values; inputs have their own streams
    samples = []
    for p in range(points):
        inputs = sample_inputs(graph, 1, input_seed(seed, 1 + p))
        row = [float(inputs[str(a.base.label)][tuple(int(i) for i in a.indices)])
               if str(a.base.label) in inputs else 0.5 * float(rng.standard_normal()) for a in atoms]
        # A stop-gradient shift: any value gives the same L and the same gradient.
        samples.append(row + [float(rng.standard_normal()) for _ in shifts])
    # CPU seconds spent in SymPy's proofs, all params together: the process's own time, so
    # that a machine busy with other work does not cut the proofs short.
    proving = 0.0
    out = {}
    for param in params:
        t0 = time.perf_counter()
        grads = env[grad_name(param)]
        shape = _shape(program.buffers[param], 1)
        elements = [tuple(int(i) for i in np.unravel_index(j, shape)) for j in range(grads.size)]
        direct = [sp.diff(loss, w) for w in env[param]]   # the param's own elements, W[i, j]
        chain = list(grads)
        # One function for every element: cse shares what direct and chain have in common.
        f = sp.lambdify(atoms + shifts, [for_lambdify(e) for e in direct + chain], NUMERIC, cse=True)
        with np.errstate(all="ignore"):
            values = np.array([f(*row) for row in samples], dtype=np.float64).reshape(points, 2, -1)
        checks = []
        for j, idx in enumerate(elements):
            numeric = float(np.max(np.abs(values[:, 0, j] - values[:, 1, j])))
            scale = max(1.0, float(np.max(np.abs(values[:, 1, j]))))
            symbolic = None
            if proving < SYMBOLIC_BUDGET:
                t = time.process_time()
                symbolic = is_zero(direct[j] - chain[j])
                proving += time.process_time() - t
            # Not reduced to 0 is not a proof of a difference: the numbers decide then.
            ok = symbolic is True or numeric <= 1e-9 * scale
            checks.append(ElementCheck(idx, direct[j], chain[j], symbolic, numeric, bool(ok)))
        out[param] = Expanded(loss, param, checks, points, time.perf_counter() - t0,
                              shifts=tuple(shifts))
    return out


def expand(program: Program, graph, param: str, seed: int = 0, points: int = 5) -> Expanded:
    """`expand_all` for one param."""
    return expand_all(program, graph, [param], seed, points)[param]


def _plain(e: sp.Expr) -> sp.Expr:
    """e with its array elements free of assumptions: what holds for every complex value
    holds for the real ones, and `cancel` treats plain symbols more uniformly."""
    return e.xreplace({a: sp.IndexedBase(str(a.base.label))[a.indices] for a in e.atoms(sp.Indexed)})


def _atomized(e: sp.Expr) -> sp.Expr:
    """e with the argument of every one-argument function made a fresh symbol, inner ones
    first, the same argument the same symbol (and its negation the negated symbol). Direct
    and chain-rule derivatives apply the same functions to the same arguments; what tells
    them apart is identities of the functions themselves (σ(-u) = 1 - σ(u), tanh' = 1 -
    tanh²), which hold whatever u is. A substitution keeps a zero zero, so a zero here is
    a proof; it is much cheaper than cancelling the arguments' exponentials as well."""
    names: dict[sp.Expr, sp.Expr] = {}

    def one(z):
        (u,) = z.args
        if u.is_Atom:
            return z
        if u not in names and -u in names:
            return z.func(-names[-u])
        return z.func(names.setdefault(u, sp.Dummy()))
    return e.replace(lambda z: isinstance(z, sp.Function) and len(z.args) == 1
                     and isinstance(z.args[0], sp.Expr), one)


def _cancels(e: sp.Expr) -> sp.Expr | None:
    """e written through exp (tanh, cosh... rewritten, exp of a sum split into a product):
    a rational function of exponentials, which `cancel` brings to lowest terms. None when
    written through exp it grows past MAX_REWRITE_OPS operations, or expanding it would
    write more than MAX_EXPANSION terms (estimated)."""
    r = rewritten_within(e, sp.exp, MAX_REWRITE_OPS)
    if r is None or expansion_work(r, MAX_EXPANSION) is None:
        return None
    r = sp.expand(r, power_exp=True)
    if ops_within(r, MAX_CANCEL_OPS) is None:
        return None
    return sp.cancel(sp.together(r))


def is_zero(e: sp.Expr) -> bool | None:
    """Whether SymPy proves e == 0; None: e is too large to try. Cheapest first: e with
    function arguments as symbols (`_atomized`), then e as it is; `simplify` (slow) only
    gets what is left, when it is small. Each step is tried on a bounded expression."""
    if ops_within(e, SYMBOLIC_OPS) is None:
        return None
    if e == 0:
        return True
    left = None
    # Assumptions are dropped once the arguments are symbols: rebuilding tanh(tanh(x)) with
    # a plain x has SymPy ask whether each argument is real, which grows with the nesting.
    for form in (_plain(_atomized(e)), e):
        r = _cancels(form)
        if r is None:
            continue
        if r == 0:
            return True
        left = r
    if left is None:
        return None
    return bool(small(left, PROOF_SIMPLIFY_OPS) and sp.simplify(left) == 0)


def expandable(graph) -> bool:
    return sum(math.prod(v.shape) for v in graph.params.values()) <= MAX_EXPANDED_PARAMS
