"""C99 emission: one static function per kernel, entry points, and a documenting header.

The text is a pure function of the IR it is given: kernels are named after what they
compute and their arguments after their buffers (codegen/cnames.py), user names appear
only as validated identifiers taken through a `Namer` (and behind `in_`/`out_` in the entry
points' arguments). The module carries the map from the IR to the text (`CModule.calls`).
Memory is the caller's: params, grads, inputs, outputs and a work arena whose size the
header states for any batch size.

Loop nests print as plain loops ordered by a stride cost, or, on targets with a SIMD width
(`codegen/targets.py`), contractions print as register-blocked tiles (`codegen/tiles.py`).
"""

from __future__ import annotations

import itertools
import math
import re
import textwrap
from dataclasses import replace

import numpy as np
import sympy as sp

from graphc.errors import SpecError
from graphc.ir import (ACC, ACCUMULATE, ARGMAX, ASSIGN, BATCH, DTYPES, GRAD, GRADS_BLOCK,
                       INPUT, INT32, LOSS_MEAN, MAX, OUTPUT, PARAM, PARAMS_BLOCK, REAL, STATE,
                       STEP_COUNT, SUM, UPDATE, Buffer, Interface, Kernel, Program, Store, grad_of,
                       param_layout, state_slot)

from .cmodule import CModule, Entry, KernelCall   # apart: unpickling one needs no emitter
from .cnames import Namer, buffer_word, kernel_word
from .cortexm_kernels import Writer as RowsWriter, layout as rows_layout
from .ctext import comment, doc, wrap
from .plan import MemoryPlan, round_up
from .printer import (HELPER_SUPPORT, HELPERS, GraphcPrinter, LiteralRangeError, c_array,
                      helper_source, prepare)
from .targets import Target, get_target
from .tiles import (MAX_PARALLEL_BATCH, BlockedWriter, coalesced, operands, tiling,
                    wants_helpers)

MAX_PERMUTED_LOOPS = 6
# A kernel's scalar arguments, in this order before its arrays.
SCALAR_PARAMETERS = {"n": "size_t n", "step": "uint32_t step"}
# An emitted kernel: its function's name, its buffer arguments, the scalars before them.
Emitted = tuple[str, list[str], tuple[str, ...]]
ENTRY_KINDS = ("forward", "evaluate", "gradients", "train_step", "predict")


# ---------------------------------------------------------------- loop order

def _strides(kern: Kernel, buffers: dict[str, Buffer]) -> list[dict[sp.Symbol, int]]:
    """For the written element and each read: the offset step of every loop index."""
    accesses = [(buffers[kern.out], kern.out_index)] + \
               [(buffers[str(a.base.label)], a.indices) for a in kern.accesses()]
    out = []
    for buf, index in accesses:
        flat = sp.expand(buf.flat_offset(index))
        # A term that reads an index array (an embedding's row) has no stride along the
        # loops: it counts as invariant (SymPy's derivative of t[b] by b is not a number).
        flat = flat.xreplace({a: sp.S.Zero for a in flat.atoms(sp.Indexed)})
        out.append(_linear_steps(flat, [s for s, _ in kern.loops]))
    return out


def _linear_steps(flat: sp.Expr, loops: list[sp.Symbol]) -> dict[sp.Symbol, int]:
    """The integer coefficient of each loop index in the expanded offset `flat` (what
    sympy.diff gives for an affine offset, at a fraction of its cost: this runs for every
    access of every kernel)."""
    steps = dict.fromkeys(loops, 0)
    for term, coeff in flat.as_coefficients_dict().items():
        if term in steps:
            steps[term] = int(coeff)
        elif term.free_symbols & steps.keys():
            raise AssertionError(f"offset {flat} is not affine in the loops {loops}")
    return steps


def _cost(order: list[sp.Symbol], strides: list[dict]) -> tuple:
    """Lexicographic, innermost loop first: unit strides beat large ones; 0 is free."""
    def penalty(step: int) -> int:
        return 0 if step == 0 else 1 if abs(step) == 1 else 3
    return tuple(sum(penalty(s[v]) for s in strides) for v in reversed(order))


def _best(loops: list[sp.Symbol], strides: list[dict], inner: list[sp.Symbol] = ()) -> list[sp.Symbol]:
    if len(loops) > MAX_PERMUTED_LOOPS:
        return list(loops)
    return list(min(itertools.permutations(loops),
                    key=lambda p: (_cost(list(p) + list(inner), strides), [v.name for v in p])))


def schedule(kern: Kernel, buffers: dict[str, Buffer],
             strides: list[dict[sp.Symbol, int]] | None = None) -> tuple[list[sp.Symbol], str]:
    """(loop order, strategy): 'direct', 'reduce' (accumulator in a register) or 'init'
    (zero the output, then accumulate in the best streaming order). `strides`: the kernel's
    `_strides`, when the caller has them."""
    strides = strides or _strides(kern, buffers)
    loops = [s for s, _ in kern.loops]
    if kern.mode in (ASSIGN, ACCUMULATE):
        return _best(loops, strides), "direct"
    red = kern.reduction_loops()
    keep = [s for s in loops if s not in red]
    # An argmax scans in the declared order: which of tied maxima is first depends on it.
    inner = red if kern.mode == ARGMAX else _best(red, strides)
    reduce_order = _best(keep, strides, inner) + inner
    if kern.mode == SUM and kern.post == ACC and red:
        direct = _best(loops, strides)
        if _cost(direct, strides) < _cost(reduce_order, strides):
            return direct, "init"
    return reduce_order, "reduce"


def hoist_invariant_calls(body: sp.Expr, loops) -> tuple[list[tuple[sp.Symbol, sp.Expr]],
                                                         sp.Expr]:
    """Function calls (log, exp, ...) in `body` that do not depend on `loops`, each with a
    temporary to compute it once before those loops (C compilers do not hoist libm calls
    that may set errno), and the body reading the temporaries. Outermost calls only, each
    once: a call inside a hoisted one is computed with it."""
    found: list[sp.Expr] = []
    stack = [body]
    while stack:
        e = stack.pop()
        if isinstance(e, sp.Piecewise):
            continue   # a call in a branch runs only when its condition holds
        if isinstance(e, sp.Function) and not e.free_symbols & set(loops):
            if e not in found:
                found.append(e)
            continue
        stack.extend(reversed(e.args))
    temps: list[tuple[sp.Symbol, sp.Expr]] = []
    for call in found:
        # An earlier temporary may be inside this call (u0 = tanh(p), then exp(u0)).
        call = call.xreplace(dict((c, u) for u, c in temps))
        if body.has(call):
            temps.append((sp.Symbol(f"u{len(temps)}", real=True), call))
            body = body.xreplace({call: temps[-1][0]})
    return temps, body


def without_unit_loops(kern: Kernel) -> Kernel:
    """The kernel with each loop of one iteration replaced by its index, 0 (a channel axis
    of size 1: `K1.grad[o, 0, p, q]`)."""
    unit = {s: sp.Integer(0) for s, e in kern.loops if e == 1}
    if not unit:
        return kern
    def at(index):
        return tuple(sp.sympify(i).xreplace(unit) for i in index)
    return replace(kern, out_index=at(kern.out_index),
                   loops=tuple((s, e) for s, e in kern.loops if s not in unit),
                   body=kern.body.xreplace(unit), post=kern.post.xreplace(unit),
                   guard=kern.guard.xreplace(unit),
                   also=tuple(Store(s.out, at(s.out_index), s.value.xreplace(unit))
                              for s in kern.also))


INV_N = sp.Symbol("inv_n", positive=True)


def divide_by_batch_once(kern: Kernel) -> tuple[Kernel, bool]:
    """The kernel with every 1/n^k written (inv_n)^k, and whether it reads inv_n."""
    def swap(e):
        return e.replace(lambda a: a.is_Pow and a.base == BATCH and a.exp.is_negative,
                         lambda a: INV_N ** -a.exp)
    body, post = swap(kern.body), swap(kern.post)
    also = tuple(replace(s, value=swap(s.value)) for s in kern.also)
    if body == kern.body and post == kern.post and also == kern.also:
        return kern, False
    return replace(kern, body=body, post=post, also=also), True


def common_subexpressions(exprs, printer, names=None) -> tuple[list[tuple[str, str]],
                                                               list[str]]:
    """Printed temporaries and final expressions after `cse`; `names` (default t0, t1, ...)
    is shared by the calls whose temporaries meet in one C scope.

    Powers are expanded per printed expression, after `cse`: the expansion builds
    unevaluated products (x*x), and `cse` re-evaluating those has merged a coefficient
    into them (2·x·exp(-x·x) became x**2·exp(-x·x))."""
    names = sp.numbered_symbols("t") if names is None else names
    # A comparison of loop indices (a padded read's guard) stays whole: `cse` would take
    # `2*i3 + i5` out of it into a temporary of the real type.
    exprs = list(exprs)
    whole = {c: sp.Dummy() for e in exprs for c in e.atoms(sp.core.relational.Relational)
             if c.lhs.is_integer and c.rhs.is_integer}
    # So do reads at an index read from data (table[tokens[b, i], d]) and the index reads
    # themselves: a temporary would be of the real type, and taking such a read out of the
    # guarded branch it sits in would read before its guard is tested.
    whole.update({a: sp.Dummy() for e in exprs for a in e.atoms(sp.Indexed)
                  if a.is_integer or any(i.has(sp.Indexed) for i in a.indices)})
    # So do calls of integers only (dropout's mask): their index arithmetic is size_t.
    whole.update({f: sp.Dummy() for e in exprs for f in e.atoms(sp.Function)
                  if f.args and all(a.is_integer for a in f.args)})
    back = {d: c for c, d in whole.items()}
    temps, final = sp.cse([e.xreplace(whole) for e in exprs], symbols=names, order="canonical")
    return ([(str(t), printer.doprint(prepare(v.xreplace(back)))) for t, v in temps],
            [printer.doprint(prepare(e.xreplace(back))) for e in final])


def structure(kern: Kernel, args: list[str], buffers: dict[str, Buffer]) -> tuple:
    """What a kernel's printed text (its body and parameters) depends on, with its buffers
    named by position in `args` (the a0, a1, ... it prints them as): two kernels of one
    structure, such as a layer repeated under other names, print the same text.

    Printing orders terms, accesses and subexpressions by comparing names, so the key also
    holds how the buffers' names compare with each other (and, as `x[` in a printed read,
    with the kernel's other symbols): a kernel whose names sort otherwise is a new key, never
    a wrong hit. The expressions are walked into tuples rather than rebuilt by xreplace,
    which costs SymPy an assumptions query per new element (more than the hits saved)."""
    position = {b: k for k, b in enumerate(args)}
    symbols: set[str] = set()

    def walk(e):
        if isinstance(e, sp.Indexed):
            label = str(e.base.label)
            return ("[]", position[label] if label in position else label,
                    tuple(sorted(e.base.assumptions0.items())),
                    tuple(walk(a) for a in e.base.args[1:]), tuple(walk(i) for i in e.indices))
        if not e.args:   # a symbol, a number, true: compared by value and type
            if isinstance(e, sp.Symbol):
                symbols.add(e.name)
            return type(e), e
        return e.func, tuple(walk(a) for a in e.args)

    def where(out):
        return position[out] if out in position else out

    stores = tuple((where(s.out), s.local, tuple(walk(sp.sympify(i)) for i in s.out_index),
                    walk(s.value)) for s in kern.stores())
    shape = (stores, kern.loops, kern.mode, walk(kern.post), walk(sp.sympify(kern.guard)),
             kern.node == UPDATE)
    words = list(args) + [b + "[" for b in args] + sorted(symbols)
    order = tuple(sorted(range(len(words)), key=words.__getitem__))
    buffers_seen = tuple((buffers[b].shape, buffers[b].batched, buffers[b].role,
                          buffers[b].differentiable, buffers[b].dtype) for b in args)
    return shape, order, buffers_seen


# ---------------------------------------------------------------- the emitter

def box_pieces(body: sp.Expr, order: list, extent: dict):
    """(read, fill, {loop: (low, high)}) for a body that reads inside a box of its loops'
    values and is a fill elsewhere (a padded copy: `{x[h - 1, w - 1] if 1 <= h < 33 and
    1 <= w < 33; 0}`), else None. Each bound is a constant on one loop of fixed extent."""
    if not isinstance(body, sp.Piecewise) or len(body.args) != 2 or body.args[1].cond != sp.true:
        return None
    (read, inside), (fill, _) = body.args
    box: dict = {}
    for rel in (inside.args if isinstance(inside, sp.And) else (inside,)):
        if not isinstance(rel, (sp.GreaterThan, sp.StrictGreaterThan, sp.LessThan,
                                sp.StrictLessThan)):
            return None
        s, bound = rel.lhs, rel.rhs
        if not (s in order and isinstance(extent.get(s), int) and bound.is_Integer):
            return None
        low, high = box.get(s, (0, extent[s]))
        bound = int(bound)
        if isinstance(rel, sp.GreaterThan):
            low = max(low, bound)
        elif isinstance(rel, sp.StrictGreaterThan):
            low = max(low, bound + 1)
        elif isinstance(rel, sp.LessThan):
            high = min(high, bound + 1)
        else:
            high = min(high, bound)
        box[s] = (low, high)
    # within the loops' ranges, and empty rather than reversed
    box = {s: (min(max(low, 0), extent[s]), min(max(low, high, 0), extent[s]))
           for s, (low, high) in box.items()}
    return read, fill, box


# An output a plain kernel writes (a map's, a copy's, a pooling window's, a scatter's add)
# moves data that a tile's multiply-add keeps in registers: it counts as this many of them
# against the target's `parallel_work`.
PLAIN_OUTPUT_WORK = 16
_BATCH_LOOP = re.compile(r"    for \(size_t (\w+) = 0; \1 < n; \+\+\1\) \{")


def examples_shared(kern: Kernel, lines: list[str], out: Buffer, parallel_work: int) -> int | None:
    """For a kernel printed as plain loops (`lines`, its body so far): the smallest batch
    n from which OpenMP shares out its loop over the examples, after marking that loop so
    (None: never). Only where that loop is the body's one loop, outermost, and each example
    writes its own slice of the output: the batch index first in the output's index and
    nowhere else in it (a bias gradient's sum over the batch is not shared). Each output is
    still computed whole by one thread, so the thread count changes no bit. In LeNet-5's
    train step at batch 64 the zeroing, max pooling and scatters of the convolutions'
    gradients, left on one thread, were a fifth of the time on two."""
    if not parallel_work or kern.also or kern.guard != sp.true or not out.batched:
        return None
    body = [k for k, line in enumerate(lines[3:], 3) if re.match(r"    \S", line)]
    heads = [k for k in body if lines[k].startswith("    for ")]
    if len(heads) != 1 or body[-1] != heads[0] + _closing(lines[heads[0]:]) \
            or any(not lines[k].startswith("    const ") for k in body if k < heads[0]):
        return None
    loop = _BATCH_LOOP.fullmatch(lines[heads[0]])
    b = next((s for s, e in kern.loops if e == BATCH and loop and str(s) == loop[1]), None)
    if b is None or kern.out_index[0] != b \
            or any(b in sp.sympify(e).free_symbols for e in kern.out_index[1:]):
        return None
    # per example: each output written (a move of data) and each iteration (a reduction's
    # multiply-add or comparison, in registers)
    reduced = set(kern.reduction_loops())
    per = math.prod(int(e) for s, e in kern.loops if e != BATCH and s not in reduced) * \
        PLAIN_OUTPUT_WORK + (math.prod(int(e) for _, e in kern.loops if e != BATCH)
                                if reduced else 0)
    if per * MAX_PARALLEL_BATCH < parallel_work:
        return None
    lines[heads[0]:heads[0]] = ["#ifdef _OPENMP", "#pragma omp for schedule(static) nowait",
                                "#endif"]
    return max(2, -(-parallel_work // per))   # a team gives two threads an example each


def _closing(lines: list[str]) -> int:
    """Lines from a loop's head (lines[0], at depth 1) to its closing brace."""
    return next(k for k, line in enumerate(lines) if line == "    }")


class Emitter:
    """Collects the file's sections and joins them in one fixed order."""

    def __init__(self, name: str, dtype: str, target: Target | None = None):
        self.name, self.dtype, self.real = name, dtype, DTYPES[dtype].c_type
        self.target = target or get_target("c99")
        self.macro = name.upper()
        self.kernels: list[str] = []
        self.entries: list[str] = []
        self.prototypes: list[tuple[str, str]] = []  # (doc, prototype)
        self.constants: list[str] = []
        self.tables: list[str] = []     # static const data (baked params)
        self.helpers: dict[str, str] = {}  # shared tile sums (codegen/tiles.py), by name
        self.use_helpers = False           # set by emit() for modules with big kernels
        self.params_size = 0               # set by emit()
        self.functions: dict[str, str] = {}           # kernel function -> its text
        self.parameters: dict[str, list[str]] = {}    # kernel function -> its array parameters
        self.calls: dict[str, tuple[KernelCall, ...]] = {}   # entry kind -> its kernel calls
        self.team_from: dict[str, int] = {}   # kernel function -> the n its parallel region needs
        # kernel function -> its loop nest's iterations per call: (fixed, per example)
        self.iterations: dict[str, tuple[int, int]] = {}
        self.predicts = False                 # a predict entry (baked params) was written
        # File-scope names: entry points, helpers, kernels as they are named.
        self.names = Namer([f"{name}_{kind}" for kind in ENTRY_KINDS] + list(HELPERS)
                           + [f for support in HELPER_SUPPORT.values() for f in support]
                           + [f"{name}_init_state", "trained_params"])
        self._emitted: dict[str, str] = {}
        self._printed: dict[tuple, Emitted] = {}
        # structure() -> (function, scalars): a kernel that differs from one printed only
        # in its buffers' names is not printed again (this module's kernels only).
        self._structures: dict[tuple, tuple[str, tuple[str, ...]]] = {}
        self._printers: list[GraphcPrinter] = []
        self.constant_fields: dict[str, str] = {}   # node -> the spec field its constants are in
        self.input_dtypes: dict[str, str] = {}      # int32 inputs (the rest are real)
        self.takes_step = False                     # the gradients entry draws dropout masks

    def ctype(self, dtype: str) -> str:
        """The C element type of a buffer or input: the model's real, or int32_t."""
        return "int32_t" if dtype == INT32 else self.real

    def input_type(self, name: str) -> str:
        return self.ctype(self.input_dtypes.get(name, REAL))

    # -------------------------------------------------------- kernels
    def kernel(self, kern: Kernel, buffers: dict[str, Buffer]) -> Emitted:
        """Emit one static kernel function; returns its name, its buffer arguments and
        the scalars it takes before them (n, step: SCALAR_PARAMETERS)."""
        try:
            return self._kernel(kern, buffers)
        except LiteralRangeError as e:
            raise SpecError(f"{e}: compile with dtype float64, or change the constant",
                            node=kern.node, field=self.constant_fields.get(kern.node)) from None

    def printer(self, arrays: dict) -> GraphcPrinter:
        p = GraphcPrinter(self.dtype, arrays)
        self._printers.append(p)
        return p

    def _kernel(self, kern: Kernel, buffers: dict[str, Buffer]) -> Emitted:
        # Reads are counted after loops of one iteration are gone: (h[i1] - h[0])² over
        # i1 < 1 reads nothing, and an argument never read warns (-Wunused-parameter).
        printed = without_unit_loops(kern)
        outs = printed.writes()
        # An update in place reads what it writes (Program.check: at the index it writes):
        # that buffer is one argument, written through.
        reads = [b for b in printed.reads() if b not in outs]
        args = outs + reads
        # Entries share kernels (forward, evaluate and gradients run the same forward
        # kernels): print each once, as printing blocked kernels is most of emit's time.
        memo = (kern, tuple(buffers[b] for b in args))
        if memo in self._printed:
            return self._printed[memo]
        shape_key = structure(kern, args, buffers)
        if shape_key in self._structures:
            fname, scalars = self._structures[shape_key]
            self._printed[memo] = (fname, args, scalars)
            return fname, args, scalars
        cvar = {b: f"a{k}" for k, b in enumerate(args)}
        printer = self.printer({b: (cvar[b], buffers[b]) for b in args})
        kern = printed
        vector = self.target.vector_bytes and not kern.also
        strides = _strides(kern, buffers) if vector else []

        def tiles(kern, strides):
            tiled = tiling(kern, strides, self.target.vector_bytes,
                           np.dtype(self.dtype).itemsize, self.target.accumulators)
            if tiled is not None and self.use_helpers and len(tiled.inner) < 2 \
                    and operands(kern, tiled, strides) is None:
                # A module of helpers: the rest in plain loops, quick to compile; but a sum
                # over several loops (a convolution's channels and taps), which no helper
                # takes, is the work itself.
                return None
            return tiled
        tiled = tiles(kern, strides) if vector else None
        declared = kern   # what the comment shows: the loops as the IR has them
        merged = coalesced(kern, strides) if vector else kern
        if merged is not kern:   # rows of a map as one loop, when the tiles take it
            merged_strides = _strides(merged, buffers)
            merged_tiled = tiles(merged, merged_strides)
            if merged_tiled is not None:
                kern, strides, tiled = merged, merged_strides, merged_tiled
        strides = strides or _strides(kern, buffers)   # computed once for what follows
        if kern.also:   # fused updates: one pass over the params, in the declared order
            order, strategy = [s for s, _ in kern.loops], "stores"
        else:
            order, strategy = schedule(kern, buffers, strides) if tiled is None else ([], "tiles")
        # No SIMD: rows of accumulators, the reduction unrolled (codegen/cortexm_kernels.py)
        rows = rows_layout(kern, order, strides) \
            if self.target.unrolled and strategy in ("reduce", "init") else None
        extent = dict(kern.loops)
        uses_n = kern.uses_batch()
        # The scalars a kernel takes before its arrays: the batch size, the train step's count.
        scalars = ("n",) * uses_n + ("step",) * kern.uses_step()
        # 1/n (a batch mean's factor) once per call, not a division per element.
        kern, inverse_n = divide_by_batch_once(kern)
        fname = "KERNEL"   # a placeholder: the name is chosen below, once the text is new
        params = [SCALAR_PARAMETERS[s] for s in scalars] + \
            [f"{self.real} *restrict {cvar[b]}" for b in outs] + \
            [f"const {self.ctype(buffers[b].dtype)} *restrict {cvar[b]}" for b in reads]
        # The comment (lines[0]) is written only for a text not emitted before: printing the
        # kernel's formula costs as much as a small kernel's C.
        lines = ["", f"static void {fname}({', '.join(params)})", "{"]
        if inverse_n:
            lines.append(f"    const {self.real} {INV_N} = 1 / ({self.real})n;")
        target = f"{cvar[kern.out]}[{printer.index(buffers[kern.out].flat_offset(kern.out_index))}]"
        r = self.real

        def open_loops(syms, depth):
            for s in syms:
                ext = "n" if extent[s] == BATCH else str(extent[s])
                lines.append("    " * depth + f"for (size_t {s} = 0; {s} < {ext}; ++{s}) {{")
                depth += 1
            return depth

        def close_loops(count, depth):
            for _ in range(count):
                depth -= 1
                lines.append("    " * depth + "}")
            return depth

        names = sp.numbered_symbols("t")   # one sequence: a reduction over no loops
        # puts its body's temporaries and its epilogue's in the same scope

        def statements(exprs, depth):
            temps, final = common_subexpressions(exprs, printer, names)
            lines.extend("    " * depth + f"const {r} {t} = {v};" for t, v in temps)
            return final

        depth = 1
        parallel = None
        if tiled is not None:
            out = buffers[kern.out].base[kern.out_index]
            body, parallel = BlockedWriter(kern, tiled, out, printer, r,
                                           lambda exprs: common_subexpressions(exprs, printer),
                                           self.target.parallel_work, self.helpers,
                                           strides, self.use_helpers,
                                           self.target.fused).write()
            lines += body
        elif rows is not None:
            lines += RowsWriter(kern, rows, buffers[kern.out].base[kern.out_index], printer, r,
                                lambda exprs: common_subexpressions(exprs, printer),
                                self.dtype in self.target.fpu_dtypes).write()
        elif strategy == "direct" and (pieces := box_pieces(kern.body, order, extent)):
            # A padded copy: each bounded loop runs its fill, inside and fill ranges apart
            # (no test per element; the inside is a plain copy the compiler vectorizes).
            read, fill, box = pieces
            op = "+=" if kern.mode == ACCUMULATE else "="
            written = buffers[kern.out].flat_offset(kern.out_index)

            def ranges(loops, depth, inside, fixed):
                if not loops:
                    (value,) = statements([(read if inside else fill).xreplace(fixed)], depth)
                    at = printer.index(sp.expand(written.xreplace(fixed)))
                    lines.append("    " * depth + f"{cvar[kern.out]}[{at}] {op} {value};")
                    return
                s_, rest = loops[0], loops[1:]
                if s_ not in box or not inside:
                    depth = open_loops([s_], depth)
                    ranges(rest, depth, inside, fixed)
                    close_loops(1, depth)
                    return
                low, high = box[s_]
                for start, stop, within in ((0, low, False), (low, high, True),
                                            (high, extent[s_], False)):
                    if stop - start == 1:   # one row of the border: no loop
                        lines.append("    " * depth + "{")
                        ranges(rest, depth + 1, within, {**fixed, s_: sp.Integer(start)})
                        lines.append("    " * depth + "}")
                    elif start < stop:
                        lines.append("    " * depth + f"for (size_t {s_} = {start}; "
                                     f"{s_} < {stop}; ++{s_}) {{")
                        ranges(rest, depth + 1, within, fixed)
                        lines.append("    " * depth + "}")
            ranges(order, depth, True, {})
        elif strategy == "direct":
            guarded = kern.guard != sp.true
            if guarded:
                # Tested once its loops are open, outside the ones it does not depend on;
                # the statement's reads too may rely on it, so all of it is inside.
                tested = [s for s in order if s in kern.guard.free_symbols]
                depth = open_loops(tested, depth)
                lines.append("    " * depth + f"if ({printer.doprint(kern.guard)}) {{")
                depth = open_loops([s for s in order if s not in tested], depth + 1)
            else:
                depth = open_loops(order, depth)
            (value,) = statements([kern.body], depth)
            op = "+=" if kern.mode == ACCUMULATE else "="
            lines.append("    " * depth + f"{target} {op} {value};")
            depth = close_loops(len(order) + guarded, depth)
        elif strategy == "stores":
            depth = open_loops(order, depth)
            for store in kern.stores():   # in order: a later one may read an earlier's
                (value,) = statements([store.value], depth)
                if store.local:
                    lines.append("    " * depth + f"const {r} {store.out} = {value};")
                    continue
                at = printer.index(buffers[store.out].flat_offset(store.out_index))
                lines.append("    " * depth + f"{cvar[store.out]}[{at}] = {value};")
            depth = close_loops(len(order), depth)
        elif strategy == "init":
            keep = [s for s in order if s not in kern.reduction_loops()]
            depth = open_loops(keep, depth)
            lines.append("    " * depth + f"{target} = 0;")
            depth = close_loops(len(keep), depth)
            depth = open_loops(order, depth)
            (value,) = statements([kern.body], depth)
            lines.append("    " * depth + f"{target} += {value};")
            depth = close_loops(len(order), depth)
        else:  # reduce: an accumulator per output element
            red = kern.reduction_loops()
            outer = [s for s in order if s not in red]
            depth = open_loops(outer, depth)
            start = printer.doprint(-sp.oo) if kern.mode in (MAX, ARGMAX) else "0"
            lines.append("    " * depth + f"{r} acc = {start};")
            if kern.mode == ARGMAX:
                lines.append("    " * depth + "size_t at = 0;")
            hoisted, body = hoist_invariant_calls(kern.body, red)
            for u, call in hoisted:
                lines.append("    " * depth + f"const {r} {u} = {printer.doprint(prepare(call))};")
            # A padded read stays a term (`(inside ? x : 0)*W`), not a skipped one: 0·W is
            # NaN for a NaN weight, as in torch.
            depth = open_loops([s for s in order if s in red], depth)
            (value,) = statements([body], depth)
            pad = "    " * depth
            if kern.mode in (MAX, ARGMAX):
                # As torch's max pooling: v wins where it is greater or NaN (the last NaN),
                # so that NaN propagates. Written as selects, which GCC makes branch-free:
                # as `if (v > acc || isnan(v))` the branch went wrong on half the windows of
                # relu'd data (LeNet-5's first max pool at batch 64 on Zen 5: 870 -> 144 µs,
                # its argmax 871 -> 272 µs).
                lines.append(pad + f"const {r} v = {value};")
                if kern.mode == ARGMAX:
                    position = printer.doprint(kern.reduction_position())
                    lines += [pad + f"at = v > acc ? {position} : at;",
                              pad + f"at = isnan(v) ? {position} : at;"]
                lines += [pad + "acc = v > acc ? v : acc;", pad + "acc = isnan(v) ? v : acc;"]
            else:
                lines.append(pad + f"acc += {value};")
            depth = close_loops(len(red), depth)
            if kern.mode == ARGMAX:   # a window position: exact in float up to 2^24
                lines.append("    " * depth + f"{target} = ({r})at;")
            else:
                (value,) = statements([kern.post], depth)
                lines.append("    " * depth + f"{target} = {value};")
            depth = close_loops(len(outer), depth)
        part = "_tiles"
        if tiled is None and rows is None:
            parallel = examples_shared(kern, lines, buffers[kern.out], self.target.parallel_work)
            part = "_examples"
        lines.append("}")
        # The same kernel text (forward and gradients share the forward part) is emitted once.
        key = "\n".join([", ".join(params), str(parallel)] + lines[2:])
        if parallel is not None:
            # The loops become `<name>_tiles` (`_examples`); `<name>` runs them in a parallel
            # region when the kernel is big (OpenMP builds only) and on the calling thread
            # otherwise.
            lines[1] = lines[1].replace(f"void {fname}(", f"void {fname}{part}(")
            call = f"{fname}{part}({', '.join(list(scalars) + [cvar[b] for b in args])});"
            lines += ["", f"static void {fname}({', '.join(params)})", "{", "#ifdef _OPENMP"]
            if parallel:
                lines += [f"    if (n >= {parallel}) {{", "#pragma omp parallel", f"        {call}",
                          "        return;", "    }", "#endif"]
            else:
                lines += ["#pragma omp parallel", "#endif"]
            lines += [f"    {call}", "}"]
        if key in self._emitted:
            fname = self._emitted[key]
        else:
            word = kern.note if kern.node == UPDATE else kernel_word(kern.out)
            fname = self.names.take(word, numbered=True)
            if parallel is not None:
                self.names.taken.add(f"{fname}{part}")
                self.team_from[fname] = parallel
            count = math.prod(int(e) for e in extent.values() if e != BATCH)
            self.iterations[fname] = (0, count) if BATCH in extent.values() else (count, 0)
            self._emitted[key] = fname
            shown = declared.pretty()
            if kern.node == UPDATE:   # graphc's own buffers, as the header names them
                shown = re.sub(r"\b__(?=\w)", "", shown)
            lines[0] = comment(f"{kern.node}: {kern.note}: {shown}")
            text, self.parameters[fname] = self._readable("\n".join(lines), fname, args)
            text = wrap(text)
            self.kernels.append(text)
            self.functions[fname] = text
        self._printed[memo] = (fname, args, scalars)
        self._structures[shape_key] = (fname, scalars)
        return fname, args, scalars

    def _readable(self, text: str, fname: str, args: list[str]) -> tuple[str, list[str]]:
        """The kernel's text with its name and its arguments named after their buffers
        (printed as `a0`, `a1`... so that identical kernels are found as identical text),
        and those argument names."""
        head, body = text.split("\n", 1)   # the comment names buffers as the spec does
        words = set(re.findall(r"\b[A-Za-z_]\w*\b", body)) - {f"a{k}" for k in range(len(args))}
        locals_ = Namer(words | self.names.taken)
        word = {f"a{k}": locals_.take(buffer_word(b), "array") for k, b in enumerate(args)}
        word["KERNEL"] = fname
        body = re.sub(r"\b(a\d+\b|KERNEL(?=\b|_tiles\b|_examples\b))", lambda m: word[m[1]], body)
        text = head + "\n" + body
        return text, [word[f"a{k}"] for k in range(len(args))]

    # -------------------------------------------------------- entry points
    def calls_of(self, kind: str, prog: Program, pointer, used: set[str]) -> list[str]:
        """An entry body's lines calling each kernel of `prog` in order, each array given
        as `pointer(buffer)`; records the calls (the module's map, `CModule.calls`) and the
        scalar arguments used."""
        lines, calls = [], []
        for index, kern in enumerate(prog.kernels):
            fname, bufs, scalars = self.kernel(kern, prog.buffers)
            used.update(scalars)
            pointers = [pointer(b) for b in bufs]
            text = f"{fname}({', '.join(list(scalars) + pointers)})"
            lines.append(f"    {text};")
            calls.append(KernelCall(index, fname, text,
                                    tuple(zip(self.parameters[fname], bufs, pointers))))
        self.calls[kind] = tuple(calls)
        return lines

    def entry(self, e: Entry, param_offsets: dict[str, int], doc: str) -> None:
        prog, mem = e.program, e.memory
        real = self.real
        args = [(f"const {real} *", "params")]
        if e.kind == "gradients":
            args.append((f"{real} *", "grads"))
        args += [(f"{real} *", "work"), ("size_t ", "n")]
        args += [("uint32_t ", "step")] if e.takes_step else []
        args += [(f"const {self.input_type(i)} *", f"in_{i}") for i in e.inputs]
        args += [(f"{real} *", f"out_{o}") for o in e.outputs]
        ret = real if e.loss_buffer else "void"
        proto = f"{ret} {e.c_name}({', '.join(t + a for t, a in args)})"
        self.prototypes.append((doc, proto))
        used: set[str] = set()

        def pointer(name: str) -> str:
            """The C expression for a buffer's first element; records the arguments it uses."""
            b = prog.buffers[name]
            if b.role in (INPUT, OUTPUT):
                arg = f"{'in' if b.role == INPUT else 'out'}_{name}"
                used.add(arg)
                return arg
            if b.role in (PARAM, GRAD):
                base = "params" if b.role == PARAM else "grads"
                param = grad_of(name) or name
                used.add(base)
                # The header's macro, so that a reader sees which param it is.
                return f"{base} + {self.macro}_PARAM_{param}_OFFSET"
            fixed, per = mem.pointer_offset(name)
            used.update(["work"] + (["n"] if per else []))
            scaled = "n" if per == 1 else f"{per} * n"
            return "work" + (f" + {fixed}" if fixed else "") + (f" + {scaled}" if per else "")

        body = []
        if any(kern.uses_batch() for kern in prog.kernels):
            # An empty batch reads no example (the tiles peel a first term off each batch
            # sum) and divides by no zero: nothing is written but the loss's 0 and zero
            # gradients.
            used.add("n")
            body.append("    if (n == 0) {")
            if e.kind == "gradients" and self.params_size:
                body.append(f"        for (size_t i = 0; i < {self.macro}_PARAMS_SIZE; ++i) {{")
                body += ["            grads[i] = 0;", "        }"]
                used.add("grads")
            body += ["        return 0;" if e.loss_buffer else "        return;", "    }"]
        body += self.calls_of(e.kind, prog, pointer, used)
        if e.loss_buffer:  # an unbatched one-element arena buffer
            used.add("work")
            body.append(f"    return work[{mem.pointer_offset(e.loss_buffer)[0]}];")
        # -Wextra warns about unused parameters; the signature stays uniform across models.
        unused = [f"    (void){a};" for _, a in args if a not in used]
        self.entries.append("\n".join([proto, "{"] + unused + body + ["}"]))

    # -------------------------------------------------------- training and baked params
    def train_step(self, e: Entry, gradients: Entry, update: Program, memory: MemoryPlan,
                   doc: str) -> None:
        """The gradients entry on the batch, then the update program's kernels: params and
        state in place, the gradients read where the gradients entry left them (the front
        of work), the update's temporaries in the gradients' arena after them."""
        r, M = self.real, self.macro
        ins = [f"const {self.input_type(i)} *in_{i}" for i in e.inputs]
        proto = f"{r} {e.c_name}({', '.join([f'{r} *params', f'{r} *state', f'{r} *work', 'size_t n'] + ins)})"
        self.prototypes.append((doc, proto))
        call = ", ".join(["params", "work", f"work + {e.work_before}", "n"] +
                         ["step"] * gradients.takes_step + [f"in_{i}" for i in gradients.inputs])
        body = [proto, "{",
            "    if (n == 0) {   /* no examples: no step, params and state unchanged */",
            "        return 0;", "    }"]
        if gradients.takes_step:
            # This step's dropout masks: the count of steps taken (whole numbers, exact in
            # the state up to 2^24 steps in float); a count the state cannot hold is 0,
            # never an undefined conversion.
            limit = "4294967296.0" + ("F" if self.dtype == "float32" else "")   # 2^32
            body += [f"    const {r} count = state[{M}_STATE_{STEP_COUNT}_OFFSET];",
                     f"    const uint32_t step = count >= 0 && count < {limit} ? "
                     "(uint32_t)count : 0;"]
        body.append(f"    const {r} loss = {gradients.c_name}({call});")
        # One non-finite loss or gradient would make every param NaN in one update: the
        # step is refused instead. A value is NaN or inf exactly when its exponent bits are
        # all ones; tested on the bits (through a union, as C99 allows), the pass is integer
        # work: it vectorizes, and needs no soft-float call on a core without an FPU (for
        # the MLP's 2410 gradients: 0.25 us on the host, where x - x == 0 took 0.6 us and a
        # float sum 3.3 us; 17k instructions on a Cortex-M0, where x - x == 0 took 150k).
        body += ["    int nonfinite = !(loss - loss == 0);"]
        if self.params_size:
            bits, ones = ("uint32_t", "UINT32_C(0x7f800000)") if self.dtype == "float32" \
                else ("uint64_t", "UINT64_C(0x7ff0000000000000)")
            body += [f"    for (size_t i = 0; i < {M}_PARAMS_SIZE; ++i) {{",
                     f"        union {{ {r} value; {bits} bits; }} g;",
                     "        g.value = work[i];",
                     f"        nonfinite |= (g.bits & {ones}) == {ones};", "    }"]
        body += ["    if (nonfinite) {   /* params, state and step count unchanged */",
                 "        return NAN;", "    }"]

        def pointer(name: str) -> str:
            b = update.buffers[name]
            if name == PARAMS_BLOCK:
                return "params"
            if name == GRADS_BLOCK:
                return "work"
            if b.role == STATE:
                return f"state + {M}_STATE_{state_slot(name)}_OFFSET"
            return f"work + {e.work_before + memory.pointer_offset(name)[0]}"

        body += self.calls_of(e.kind, update, pointer, set())
        body += ["    return loss;", "}"]
        self.entries.append("\n".join(body))

    def init_state(self, offsets: dict[str, int], sizes: dict[str, int],
                   start: dict[str, float], doc: str) -> None:
        """`<name>_init_state`: a fresh optimizer state, zeros but for `start` (slot ->
        the value each of its elements starts at), written through the header's offsets."""
        r, M = self.real, self.macro
        proto = f"void {self.name}_init_state({r} *state)"
        self.prototypes.append((doc, proto))
        printer = self.printer({})
        body = [proto, "{", f"    for (size_t i = 0; i < {M}_STATE_SIZE; ++i) {{",
                "        state[i] = 0;", "    }"]
        for slot, value in start.items():
            try:
                text = printer.doprint(sp.Float(value))
            except LiteralRangeError as e:
                raise SpecError(f"{e}: compile with dtype float64, or change the value",
                                node=UPDATE, field=slot) from None
            at = f"{M}_STATE_{slot}_OFFSET"
            if sizes[slot] == 1:
                body.append(f"    state[{at}] = {text};")
            else:
                body += [f"    for (size_t i = 0; i < {sizes[slot]}; ++i) {{",
                         f"        state[{at} + i] = {text};", "    }"]
        self.entries.append("\n".join(body + ["}"]))

    def predict(self, e: Entry, forward: Entry, params, doc: str) -> None:
        r = self.real
        self.predicts = True
        self.tables.append(c_array("trained_params", params, self.dtype))
        args = [f"{r} *work", "size_t n"] + [f"const {self.input_type(i)} *in_{i}"
                                             for i in e.inputs] + \
            [f"{r} *out_{o}" for o in e.outputs]
        proto = f"void {e.c_name}({', '.join(args)})"
        self.prototypes.append((doc, proto))
        call = ", ".join(["trained_params", "work", "n"] + [f"in_{i}" for i in e.inputs] +
                         [f"out_{o}" for o in e.outputs])
        self.entries.append("\n".join([proto, "{", f"    {forward.c_name}({call});", "}"]))

    # -------------------------------------------------------- the files
    def parallel_from(self) -> dict[str, int]:
        """Entry kind -> the smallest batch n at which one of its kernels runs in a parallel
        region (kinds that never do are absent); a train step runs the gradients' kernels,
        predict the forward's (it calls the forward with the baked params)."""
        found = {}
        for kind, calls in self.calls.items():
            runs = [c.function for c in calls + (self.calls.get("gradients", ())
                                                 if kind == "train_step" else ())]
            starts = [self.team_from[f] for f in runs if f in self.team_from]
            if starts:
                found[kind] = min(starts)
        if self.predicts and "forward" in found:
            found["predict"] = found["forward"]
        return found

    def work(self) -> dict[str, tuple[int, int]]:
        """Entry kind -> the iterations of its kernels' loop nests in one call, (fixed,
        per example): a train step's are the gradients' and the update's, predict's the
        forward's."""
        found = {}
        for kind, calls in self.calls.items():
            runs = [c.function for c in calls + (self.calls.get("gradients", ())
                                                 if kind == "train_step" else ())]
            found[kind] = tuple(sum(self.iterations[f][k] for f in runs) for k in (0, 1))
        if self.predicts and "forward" in found:
            found["predict"] = found["forward"]
        return found

    def source(self) -> str:
        parts = [comment(f"{self.name}.c: generated by graphc; do not edit."),
                 "#include <math.h>", "#include <stddef.h>", "#include <stdint.h>",
                 f'#include "{self.name}.h"', ""]
        parts += [t + "\n" for t in self.tables]
        used = set().union(*(p.helpers_used for p in self._printers))
        parts += [helper_source(h, self.dtype) + "\n" for h in sorted(used)]
        parts += [h + "\n" for h in self.helpers.values()]
        parts += [k + "\n" for k in self.kernels]
        parts += [e + "\n" for e in self.entries]
        return wrap("\n".join(parts))

    def header(self, note: str = "") -> str:
        guard = f"GRAPHC_{self.name}_H"
        out = [comment(f"{self.name}.h: generated by graphc; do not edit.")]
        out += [doc(textwrap.wrap(note, 88, break_on_hyphens=False))] if note else []
        out += [f"#ifndef {guard}", f"#define {guard}", "", "#include <stddef.h>"]
        # int32_t inputs, a uint32_t step
        out += ["#include <stdint.h>"] if self.input_dtypes or self.takes_step else []
        out += [""]
        out += self.constants + [""]
        # C linkage for C++ callers (firmware is often C++): the names stay unmangled.
        out += ["#ifdef __cplusplus", 'extern "C" {', "#endif", ""]
        out += [f"{doc}\n{proto};\n" for doc, proto in self.prototypes]
        out += ["#ifdef __cplusplus", "}", "#endif", ""]
        out += [f"#endif {comment(guard)}", ""]
        return wrap("\n".join(out))

    def cdef(self) -> str:
        return "\n".join(f"{proto};" for _, proto in self.prototypes)


def emit(face: Interface, programs: dict[str, tuple[Program, MemoryPlan]],
         update: tuple[Program, MemoryPlan] | None = None, dtype: str = "float32", params=None,
         target="c99", max_batch: int | None = None,
         running: dict[str, float] | None = None) -> CModule:
    """The C source, header and cffi declarations of a model.

    `programs` holds each entry point's fused program and memory plan ("forward", and for
    training "evaluate" and "gradients"); `update`, the fused and planned program that
    `train_step` runs after the gradients (the optimizer's step over the trainable params,
    the front of the params block, then the running statistics); `running`, the running
    statistics (param -> momentum), which the header names.
    With `params` (the flat param block), the C is for inference: the params are baked in
    as a `static const` table (flash on a microcontroller) read by `<name>_predict`.
    `target` (codegen/targets.py) decides how contractions are printed (register-blocked
    tiles for its SIMD width, OpenMP on the host) and the header's note. `max_batch` adds
    `<NAME>_MAX_BATCH`, for static arrays sized by the header's `_WORK_SIZE(n)` macros."""
    tgt = get_target(target)
    note = tgt.header_note(dtype)

    name = face.name
    em = Emitter(name, dtype, tgt)
    em.constant_fields.update(face.constant_fields)
    em.input_dtypes.update(face.input_dtypes)
    M = em.macro
    offsets, params_size = param_layout(face.params)
    trainable_size = sum(max(1, math.prod(face.params[p])) for p in face.trainable)
    untrained = [p for p in face.params if p not in face.trainable]
    entries: dict[str, Entry] = {}
    outputs = tuple(face.outputs)

    fwd, fwd_memory = programs["forward"]
    fwd_inputs = face.reads["forward"]
    entries["forward"] = Entry("forward", f"{name}_forward", fwd, fwd_memory, fwd_inputs,
                               outputs)
    if params is not None:
        entries["predict"] = Entry("predict", f"{name}_predict", fwd, fwd_memory, fwd_inputs,
                                   outputs)
    if "evaluate" in programs:
        entries["evaluate"] = Entry("evaluate", f"{name}_evaluate", *programs["evaluate"],
                                    face.reads["evaluate"], outputs, LOSS_MEAN)
    if "gradients" in programs:
        program = programs["gradients"][0]
        entries["gradients"] = Entry("gradients", f"{name}_gradients", *programs["gradients"],
                                     face.reads["gradients"], (), LOSS_MEAN,
                                     takes_step=any(k.uses_step() for k in program.kernels))
    em.params_size = params_size
    em.takes_step = "gradients" in entries and entries["gradients"].takes_step
    em.use_helpers = wants_helpers(e.program for e in entries.values())
    rule = update if "gradients" in programs else None
    state_offsets: dict[str, int] = {}
    state_sizes: dict[str, int] = {}
    state_size = 0
    if rule:
        g = entries["gradients"]
        entries["train_step"] = Entry("train_step", f"{name}_train_step", g.program, g.memory,
                                      g.inputs, (), LOSS_MEAN,
                                      # the gradients' arena keeps the target's alignment
                                      work_before=round_up(params_size, tgt.align),
                                      update_work=rule[1].fixed)
        for b in rule[0].buffers.values():   # the step count first, then the slots
            if b.role == STATE:
                state_offsets[state_slot(b.name)] = state_size
                state_sizes[state_slot(b.name)] = b.size
                state_size += b.size
    running = dict(running or {}) if rule else {}

    c = em.constants
    c.append(comment(f"Sizes are counts of {em.real} elements. Params and their gradients share one layout."))
    c.append(f"#define {M}_PARAMS_SIZE {params_size}")
    if untrained:
        c.append(comment(f"The optimizer trains params [0, {M}_TRAINABLE_SIZE); after them "
                         "come the params declared trainable: false."))
        c.append(f"#define {M}_TRAINABLE_SIZE {trainable_size}")
    for p, shape in face.params.items():
        kind = "" if p in face.trainable else \
            "; a running statistic" if p in running else "; not trained"
        shown = comment(f"shape {list(shape)}{kind}")
        c.append(f"#define {M}_PARAM_{p}_OFFSET {offsets[p]} {shown}")
        c.append(f"#define {M}_PARAM_{p}_SIZE {max(1, math.prod(shape))}")
    for i, shape in face.inputs.items():
        what = ", int32_t indices" if face.input_dtypes.get(i) == INT32 else ""
        c.append(f"#define {M}_INPUT_{i}_SIZE {max(1, math.prod(shape))} "
                 f"{comment('per example, shape ' + str(list(shape)) + what)}")
    for o, shape in face.outputs.items():
        c.append(f"#define {M}_OUTPUT_{o}_SIZE {max(1, math.prod(shape))} "
                 f"{comment('per example, shape ' + str(list(shape)))}")
    if rule:
        layout = ", ".join(("step count" if k == "step" else k) for k in state_offsets)
        prose = (f"Optimizer state, {face.optimizer['name']}: {layout}. The step count, then "
                 "the hyperparameters, one element each, which every train step reads (write "
                 "one between steps to change it: a learning-rate schedule), then the slots, "
                 "each one number or one element per trainable param element. "
                 f"{name}_init_state writes a fresh state.")
        c.append(doc(textwrap.wrap(prose, 92, break_on_hyphens=False)
                     + [f"  {k}: {what}" for k, what in face.hyperparameters.items()]))
        c.append(f"#define {M}_STATE_SIZE {state_size}")

        def start(slot: str) -> str:   # as the state's type holds it
            value = face.state_start.get(slot, 0.0)
            return str(np.float32(value)) if dtype == "float32" else repr(value)
        for k, at in state_offsets.items():
            shown = "" if k == STEP_COUNT else f" {comment('starts at ' + start(k))}"
            c.append(f"#define {M}_STATE_{k}_OFFSET {at}{shown}")
    for kind, e in entries.items():
        c.append(f"#define {M}_{kind.upper()}_WORK_SIZE(n) ((size_t){e.work_fixed()} + "
                 f"(size_t){e.memory.per_example} * (size_t)(n))")
    cm_work = CModule(name, dtype, "", "", "", entries, offsets, params_size,
                      trainable_size=trainable_size)
    c.append(comment("Enough for every entry point above."))
    c.append(f"#define {M}_WORK_SIZE(n) ((size_t){cm_work.work_fixed()} + "
             f"(size_t){cm_work.work_per_example()} * (size_t)(n))")
    if max_batch is not None:
        c.append(comment(f"The batch static memory is planned for: e.g. static {em.real} "
                         f"work[{M}_WORK_SIZE({M}_MAX_BATCH)];"))
        c.append(f"#define {M}_MAX_BATCH {max_batch}")

    def elements(i: str) -> str:   # what an input's elements are, for the header
        bound = face.index_bounds.get(i)
        return "elements" if i not in face.input_dtypes else \
            f"int32_t indices, 0 to {bound - 1}" if bound else "int32_t elements"

    f = entries["forward"]
    em.entry(f, offsets, doc([
        f"{f.c_name}: the outputs for a batch of n examples.",
        f"  params: {M}_PARAMS_SIZE elements (layout: {M}_PARAM_*_OFFSET)",
        f"  work:   at least {M}_FORWARD_WORK_SIZE(n) elements, caller-owned scratch",
        *[f"  in_{i}: n x {M}_INPUT_{i}_SIZE {elements(i)}, row-major, example after example"
          for i in f.inputs],
        *(["  An int32_t index outside its range reads as 0 (every read is checked);",
           "  graphc's Python side refuses such inputs before calling."]
          if any(i in face.input_dtypes for i in f.inputs) else []),
        *[f"  out_{o}: n x {M}_OUTPUT_{o}_SIZE elements, written" for o in f.outputs],
        "Arrays must not overlap. No allocation, no global state: reentrant.",
        "n may be 0: then nothing is read or written.",
        # The plan puts work buffers at multiples of `align` elements from work's start:
        # from a 64-byte aligned base, whole cache lines and vectors.
        *(["Any alignment works; arrays aligned to 64 bytes (aligned_alloc) run fastest."]
          if tgt.align > 1 else [])]))
    if "predict" in entries:
        e = entries["predict"]
        flat = np.asarray(params, dtype=np.float64)
        em.predict(e, f, flat, doc([
            f"{e.c_name}: {f.c_name} with the trained params baked into this file",
            "  (a static const table: read-only data, flash on a microcontroller).",
            f"  work:   at least {M}_PREDICT_WORK_SIZE(n) elements, caller-owned scratch",
            *[f"  in_{i}: n x {M}_INPUT_{i}_SIZE {elements(i)}" for i in e.inputs],
            *[f"  out_{o}: n x {M}_OUTPUT_{o}_SIZE elements, written" for o in e.outputs]]))
    if "evaluate" in entries:
        e = entries["evaluate"]
        em.entry(e, offsets, doc([
            f"{e.c_name}: the outputs and the batch-mean loss '{face.loss}' in one forward pass.",
            f"  params: {M}_PARAMS_SIZE elements",
            f"  work:   at least {M}_EVALUATE_WORK_SIZE(n) elements, caller-owned scratch",
            *[f"  in_{i}: n x {M}_INPUT_{i}_SIZE {elements(i)}" for i in e.inputs],
            *[f"  out_{o}: n x {M}_OUTPUT_{o}_SIZE elements, written" for o in e.outputs],
            "Returns the mean over the batch of the per-example loss (0 when n is 0: no input",
            "is read then). Arrays must not overlap."]))
    if "gradients" in entries:
        g = entries["gradients"]
        em.entry(g, offsets, doc([
            f"{g.c_name}: the batch-mean loss '{face.loss}', and its gradient in grads.",
            f"  params: {M}_PARAMS_SIZE elements; grads: {M}_PARAMS_SIZE elements, overwritten",
            f"  work:   at least {M}_GRADIENTS_WORK_SIZE(n) elements, caller-owned scratch",
            *(["  step:   which dropout masks to draw (a pure function of it, the node and the",
                "          element); train_step passes its count of steps taken"]
              if g.takes_step else []),
            *[f"  in_{i}: n x {M}_INPUT_{i}_SIZE {elements(i)}" for i in g.inputs],
            *([f"Batch norm runs in training mode (the batch's statistics). From "
               f"{M}_TRAINABLE_SIZE on,",
               "grads holds no gradient: a running statistic's slot gets the batch's value "
               "(the mean,",
               "or the unbiased variance; with one value per channel, the running variance "
               "itself),",
               "a frozen param's slot 0."] if untrained else []),
            "Returns the mean over the batch of the per-example loss. When n is 0: returns 0,",
            "grads all 0, no input read. Arrays must not overlap."]))
    if rule:
        e = entries["train_step"]
        em.init_state(state_offsets, state_sizes, face.state_start, doc([
            f"{name}_init_state: a fresh optimizer state for {e.c_name}:",
            "  step count 0, each hyperparameter the value it was compiled with, every slot",
            f"  its start ({M}_STATE_*_OFFSET). Call it before the first step. To restart",
            "  training and keep hyperparameters changed since, save them and write them back",
            "  after it.",
            f"  state: {M}_STATE_SIZE elements, written"]))
        shape = ", ".join(f"{k}={v!r}" for k, v in face.optimizer_fixed.items())
        clip = "; the gradients first scaled to a global 2-norm of at most " \
            "clip_grad_norm" if "clip_grad_norm" in face.hyperparameters else ""
        em.train_step(e, entries["gradients"], *rule, doc([
            f"{e.c_name}: one {face.optimizer['name']} step ({shape + '; ' if shape else ''}"
            "hyperparameters read from state) on a batch of n examples:",
            f"  the loss and gradients ({entries['gradients'].c_name}), then params updated "
            f"in place{clip}.",
            *([f"  The optimizer updates params [0, {M}_TRAINABLE_SIZE); the running "
               "statistics move",
               "  towards the batch's as torch's: p = (1 - momentum)*p + momentum*batch value."]
              if untrained else []),
            f"  params: {M}_PARAMS_SIZE elements, read and updated",
            f"  state:  {M}_STATE_SIZE elements of optimizer state, from {name}_init_state,",
            "          read and updated",
            f"  work:   at least {M}_TRAIN_STEP_WORK_SIZE(n) elements; the gradients are left",
            f"          in its first {M}_PARAMS_SIZE elements",
            *[f"  in_{i}: n x {M}_INPUT_{i}_SIZE {elements(i)}" for i in e.inputs],
            "Returns the batch-mean loss before the update. When n is 0: returns 0 and changes",
            "nothing (no step is counted). When the loss or any gradient is NaN or infinite:",
            "returns NaN and changes nothing either (no update, no step counted; the gradients",
            "are left in work), so that one bad batch cannot make every param NaN.",
            "Arrays must not overlap."]))
    return CModule(name, dtype, em.source(), em.header(note), em.cdef(), entries, offsets,
                   params_size, dict(face.inputs), dict(face.outputs),
                   dict(face.optimizer) if rule else None, state_size, state_offsets,
                   params is not None, tgt.name, max_batch, em.functions, em.calls,
                   trainable_size, running, dict(face.input_dtypes),
                   state_sizes, dict(face.hyperparameters) if rule else {},
                   dict(face.state_start) if rule else {}, face.element_slots if rule else (),
                   em.parallel_from(), em.work())
