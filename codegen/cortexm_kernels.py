"""Contractions for cores without SIMD (Cortex-M): rows of accumulators in registers,
operands read through pointers that walk the reduction, the reduction unrolled in the text.

A kernel `out[keep] = post(Σ_red a·b)` qualifies when its output index is distinct loop
symbols, every reduction loop has a constant extent, and its body is a product of two
reads, one of which may be a padded read `{x[idx] if inside; 0}`. Printed as plain loops, an
emulated Cortex-M4F spends 6 to 18 instructions per multiply-add on such kernels (index
arithmetic, two loads, a separate multiply and add, a branch per term, a padded read's
guard at every tap). Here:

- *rows*: outputs along one kept loop (the *row* loop) along which one factor is invariant
  are computed ROWS at a time, each in its own accumulator: the invariant factor (`x` of a
  dense layer along its outputs `o`) is loaded once for ROWS multiply-adds; and COLS such
  rows side by side along a loop where the other factor is invariant (a 1 x 1
  convolution's positions), that factor then loaded once for COLS;
- the innermost reduction loop is unrolled UNROLL times in the text (fully when it is that
  short), the factors read at constant offsets from pointers that advance once per turn, so
  GCC's -O2 (which unrolls nothing) prints loads with immediate offsets, one loop branch
  per UNROLL·ROWS·COLS multiply-adds (hot loops: 40 instructions for 16 multiply-adds
  in a dense layer, 61 for 32 in a 1 x 1 convolution);
- a padded read splits the loop points in two: where every tap of the window is inside
  (the interior, tested once per row of outputs) the read is unguarded; elsewhere each tap
  tests its guard as the plain loops do. No padded copy: RAM is the scarce resource.

Each output still sums its terms in the plain loops' order, one after the other; with
`fused` (a core whose FPU fuses, the Cortex-M4F's VFMA.F32) each term is added by `fmaf`,
one rounding per multiply-add instead of two, which C99 specifies exactly: the same result
on every conforming compiler and flag set. GCC does not contract `c += a*b` under
-std=c99 (and never into the M4's unfused VMLA.F32: it prints vmul + vadd). Without
`fused`, `c += a*b`. docs/design.md ("Cortex-M4F contractions") has the figures.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import sympy as sp

from graphc.ir import ACC, SUM, Kernel, data_dependent

ROWS = 4     # accumulators per row of outputs
COLS = 2     # rows side by side: ROWS·COLS accumulators, ROWS + COLS loads per term
UNROLL = 4   # terms of the innermost reduction loop per turn
FLAT = 16    # the innermost reduction loops are written out whole up to this many terms
STEP = "k"   # the counter of the unrolled loop (the IR's loops are b and i<n>)


@dataclass(frozen=True)
class Factor:
    read: sp.Indexed
    guard: sp.Basic   # sp.true for an unguarded read


@dataclass(frozen=True)
class Layout:
    outer: tuple[sp.Symbol, ...]    # kept loops around the rows, outermost first
    row: sp.Symbol | None           # the kept loop computed `rows` outputs at a time
    rows: int
    col: sp.Symbol | None           # a kept loop computed `cols` outputs at a time, along
    cols: int                       # which `other` is invariant (a 1 x 1 convolution's w)
    shared: Factor                  # the factor invariant along `row` (loaded once per term)
    other: Factor
    reduce: tuple[sp.Symbol, ...]   # reduction loops in the plain loops' order
    unroll: int                     # terms of the last reduction loop per turn
    flat: int                       # or: how many of the last reduction loops are written out


def _factor(e: sp.Expr) -> Factor | None:
    if isinstance(e, sp.Indexed):
        return Factor(e, sp.true)
    if isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].cond == sp.true \
            and e.args[1].expr == 0 and isinstance(e.args[0].expr, sp.Indexed):
        return Factor(e.args[0].expr, e.args[0].cond)
    return None


def layout(kern: Kernel, order: list[sp.Symbol], strides: list[dict]) -> Layout | None:
    """How to print `kern` (scheduled in `order`; `strides` as `emit._strides`: the output's,
    then each access's), or None when the plain loops are the ones to print."""
    if kern.mode != SUM or kern.also or kern.guard != sp.true:
        return None
    if not all(re.fullmatch(r"b|i\d+", str(s)) for s, _ in kern.loops):
        return None
    extent = dict(kern.loops)
    red = [s for s in order if s in kern.reduction_loops()]
    index = kern.out_index
    if not red or not all(isinstance(extent[s], int) for s in red) \
            or not all(isinstance(i, sp.Symbol) for i in index) or len(set(index)) != len(index):
        return None
    body = kern.body
    if not isinstance(body, sp.Mul) or len(body.args) != 2:
        return None
    factors = [_factor(f) for f in body.args]
    if None in factors or sum(f.guard != sp.true for f in factors) > 1 \
            or any(data_dependent(i) for f in factors for i in f.read.indices):
        return None
    by = dict(zip(kern.accesses(), strides[1:]))
    guarded = set().union(*(f.guard.free_symbols for f in factors))
    keep = [s for s in order if s not in red]
    # The row loop: a constant one outside the guard, along which one factor is invariant
    # and the other not; the longest (a dense layer's outputs, a convolution's channels).
    rows = [(s, f) for s in keep if isinstance(extent[s], int) and extent[s] > 1
            and s not in guarded
            for f in (0, 1) if by[factors[f].read][s] == 0 and by[factors[1 - f].read][s] != 0]
    row, shared = max(rows, key=lambda c: (extent[c[0]], -keep.index(c[0]))) if rows \
        else (None, 0)
    # The column loop: the same, with the roles of the factors swapped.
    a, b = factors[shared].read, factors[1 - shared].read
    cols = [s for s in keep if row is not None and s != row and isinstance(extent[s], int)
            and extent[s] > 1 and s not in guarded and by[b][s] == 0 and by[a][s] != 0]
    col = max(cols, key=lambda s: (extent[s], -keep.index(s))) if cols else None
    flat, terms = 0, 1   # the innermost loops that FLAT terms cover (a 3 x 3 window)
    while flat < len(red) and terms * extent[red[-1 - flat]] <= FLAT:
        flat, terms = flat + 1, terms * extent[red[-1 - flat]]
    return Layout(tuple(s for s in keep if s not in (row, col)), row,
                  min(ROWS, extent[row]) if row is not None else 1,
                  col, min(COLS, extent[col]) if col is not None else 1,
                  factors[shared], factors[1 - shared], tuple(red),
                  min(UNROLL, extent[red[-1]]), flat)


def _at_extreme(rel: sp.Basic, box: dict, worst: bool) -> sp.Basic:
    """`rel` with each loop of `box` (loop -> extent) at the end of its range where the
    relation is hardest to meet (`worst`) or easiest."""
    e = sp.expand(rel.lhs - rel.rhs)
    minimum = isinstance(rel, (sp.GreaterThan, sp.StrictGreaterThan)) == worst
    sub = {s: sp.Integer(0) if (e.coeff(s) > 0) == minimum else sp.Integer(box[s] - 1)
           for s in e.free_symbols & box.keys()}
    return rel.func(e.xreplace(sub), 0)


def interior(guard: sp.Basic, box: dict) -> sp.Basic:
    """Where `guard` holds for every value of the loops of `box` (a padded window's taps):
    each inequality at those loops' worst values."""
    return sp.And(*[r if r in (sp.true, sp.false) else _at_extreme(r, box, True)
                    for r in sp.And.make_args(guard)])


def simplified(guard: sp.Basic, box: dict) -> sp.Basic:
    """`guard` without the inequalities that hold everywhere in `box` (false if one holds
    nowhere): a term's guard at a constant tap, said only where it can fail."""
    kept = []
    for r in sp.And.make_args(guard):
        if r in (sp.true, sp.false):   # decided by the tap's constants alone
            if r == sp.false:
                return sp.false
            continue
        if _at_extreme(r, box, False) == sp.false:
            return sp.false
        if _at_extreme(r, box, True) != sp.true:
            kept.append(r)
    return sp.And(*kept)


class Writer:
    """Prints one kernel's body lines (inside the function's braces)."""

    def __init__(self, kern: Kernel, lay: Layout, out: sp.Indexed, printer, real: str,
                 cse, fused: bool):
        self.k, self.lay, self.out, self.p, self.real = kern, lay, out, printer, real
        self.cse = cse          # exprs -> (temps [(name, C)], finals [C])
        self.fused = fused
        self.fma = "fmaf" if real == "float" else "fma"
        self.extent = dict(kern.loops)
        # The constant loops' ranges, the unrolled loop's counter's among them.
        self.box = {s: e for s, e in kern.loops if isinstance(e, int)}
        if not lay.flat:
            self.box[sp.Symbol(STEP, integer=True, nonnegative=True)] = \
                self.extent[lay.reduce[-1]] // lay.unroll
        self.lines: list[str] = []

    def put(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def write(self) -> list[str]:
        lay, depth = self.lay, 1
        for s in lay.outer:
            n = "n" if not isinstance(self.extent[s], int) else str(self.extent[s])
            self.put(depth, f"for (size_t {s} = 0; {s} < {n}; ++{s}) {{")
            depth += 1
        guard = lay.shared.guard if lay.shared.guard != sp.true else lay.other.guard
        if guard == sp.true:
            self.row_loop(depth, padded=False)
        else:
            inside = simplified(interior(guard, {s: self.extent[s] for s in lay.reduce}),
                                self.box)
            if inside == sp.false:   # no output has its whole window inside
                self.row_loop(depth, padded=True)
            else:
                self.put(depth, "/* The whole window inside the input: no test per term. */")
                self.put(depth, f"if ({self.p.doprint(inside)}) {{")
                self.row_loop(depth + 1, padded=False)
                self.put(depth, "} else {")
                self.row_loop(depth + 1, padded=True)
                self.put(depth, "}")
        while depth > 1:
            depth -= 1
            self.put(depth, "}")
        return self.lines

    def row_loop(self, depth: int, padded: bool) -> None:
        lay = self.lay
        self.blocks(depth, lay.col, lay.cols, lambda d, cols: self.blocks(
            d, lay.row, lay.rows, lambda d2, rows: self.rows(rows, cols, d2, padded)))

    def blocks(self, depth: int, s: sp.Symbol | None, size: int, body) -> None:
        """Loop `s` by blocks of `size` (the last one shorter), `body(depth, count)` each."""
        if s is None:
            body(depth, 1)
            return
        extent = self.extent[s]
        whole = extent - extent % size
        if whole == size:
            self.put(depth, "{")
            self.put(depth + 1, f"const size_t {s} = 0;")
        else:
            self.put(depth, f"for (size_t {s} = 0; {s} < {whole}; {s} += {size}) {{")
        body(depth + 1, size)
        self.put(depth, "}")
        if extent % size:   # the last outputs, fewer than a block
            self.put(depth, "{")
            self.put(depth + 1, f"const size_t {s} = {whole};")
            body(depth + 1, extent % size)
            self.put(depth, "}")

    # ------------------------------------------------------------ one row of outputs
    def pointer(self, read: sp.Indexed, sub: dict) -> str:
        var, buf = self.p.arrays[str(read.base.label)]
        offset = sp.expand(buf.flat_offset([sp.sympify(i).xreplace(sub) for i in read.indices]))
        return var if offset == 0 else f"{var} + {self.p._print_offset(offset)}"

    def step(self, read: sp.Indexed, s: sp.Symbol) -> int:
        """How far `read` moves in its buffer when loop `s` advances by one."""
        buf = self.p.arrays[str(read.base.label)][1]
        flat = sp.expand(buf.flat_offset(read.indices))
        return int(flat.coeff(s))

    def rows(self, count: int, cols: int, depth: int, padded: bool) -> None:
        """`count` outputs along the row loop by `cols` along the column loop (from their
        current values): accumulators, the reduction, the stores."""
        lay, r = self.lay, self.real
        acc = [f"c{j}" for j in range(count * cols)]
        self.put(depth, f"{r} {', '.join(f'{c} = 0' for c in acc)};")
        d = depth
        looped = lay.reduce[:len(lay.reduce) - lay.flat]
        for s in looped[:-1] if lay.flat == 0 else looped:
            self.put(d, f"for (size_t {s} = 0; {s} < {self.extent[s]}; ++{s}) {{")
            d += 1
        # The loops written out: the last `flat` ones whole, or the last one by turns.
        inner = lay.reduce[-max(1, lay.flat):]
        origin = {s: sp.Integer(0) for s in inner}
        # Pointers to the first term (the guarded read, outside the interior, is indexed:
        # its address may lie outside its array, which a pointer must not).
        walk = [f for f in (lay.shared, lay.other) if not (padded and f.guard != sp.true)]
        for f in walk:
            self.put(d, f"const {r} *{self.name(f)} = {self.pointer(f.read, origin)};")
        if lay.flat:
            points = [dict(zip(inner, map(sp.Integer, p)))
                      for p in itertools.product(*(range(self.extent[s]) for s in inner))]
            self.terms(count, cols, points, origin, d, padded)
        else:
            last = inner[0]
            turns, rest = divmod(self.extent[last], lay.unroll)
            k = sp.Symbol(STEP, integer=True, nonnegative=True)
            # Each turn reads from pointers `q` at its first term: GCC walks them (one add
            # per turn); a pointer stepped past the last turn could leave its array (UB).
            def turn(start: sp.Expr, count_: int, d_: int) -> None:
                for f in walk:
                    at = self.p.doprint(start * self.step(f.read, last))
                    self.put(d_, f"const {r} *{self.name(f, 'q')} = {self.name(f)} + {at};")
                self.terms(count, cols, [{last: start + u} for u in range(count_)],
                           {last: start}, d_, padded, "q")
            self.put(d, f"for (size_t {STEP} = 0; {STEP} < {turns}; ++{STEP}) {{")
            turn(lay.unroll * k, lay.unroll, d + 1)
            self.put(d, "}")
            if rest:
                self.put(d, "{")
                turn(sp.Integer(turns * lay.unroll), rest, d + 1)
                self.put(d, "}")
        while d > depth:
            d -= 1
            self.put(d, "}")
        self.stores(count, cols, depth)

    def name(self, f: Factor, kind: str = "p") -> str:
        return f"{kind}0" if f is self.lay.shared else f"{kind}1"

    def terms(self, rows: int, cols: int, points: list[dict], origin: dict, d: int,
              padded: bool, kind: str = "p") -> None:
        """The terms at `points` (values of the written-out loops), each factor read at its
        offset from the pointer at `origin`, or guarded: the shared factor loaded once for
        a row of accumulators, the other once for a column (with one column, in place)."""
        lay, r = self.lay, self.real
        for u, point in enumerate(points):
            shared = [f"s{u}" if cols == 1 else f"s{u}_{i}" for i in range(cols)]
            for i, name in enumerate(shared):
                at = {**point, **self.at(0, i)}
                value = self.operand(lay.shared, at, origin, padded, kind)
                self.put(d, f"const {r} {name} = {value};")
            for j in range(rows):
                other = self.operand(lay.other, {**point, **self.at(j, 0)}, origin, padded, kind)
                if cols > 1:
                    self.put(d, f"const {r} w{u}_{j} = {other};")
                    other = f"w{u}_{j}"
                for i, name in enumerate(shared):
                    c = f"c{j * cols + i}"
                    self.put(d, f"{c} = {self.fma}({name}, {other}, {c});" if self.fused else
                             f"{c} += {name}*{other};")

    def at(self, j: int, i: int) -> dict:
        """The row and column loops at output (j, i) of the block."""
        lay = self.lay
        return {**({lay.row: lay.row + j} if lay.row is not None else {}),
                **({lay.col: lay.col + i} if lay.col is not None else {})}

    def operand(self, f: Factor, point: dict, origin: dict, padded: bool, kind: str) -> str:
        """One factor's value at a term: through its pointer, or (a padded read outside
        the interior) its guarded read at the loop point."""
        if not (padded and f.guard != sp.true):
            offset = sum(self.step(f.read, s) * (v - origin.get(s, s)) for s, v in point.items())
            return f"{self.name(f, kind)}[{int(sp.expand(offset))}]"
        read = self.p.doprint(f.read.xreplace(point))
        zero = "0.0F" if self.real == "float" else "0.0"
        guard = simplified(f.guard.xreplace(point), self.box)
        return zero if guard == sp.false else read if guard == sp.true else \
            f"({self.p.doprint(guard)} ? {read} : {zero})"

    def stores(self, rows: int, cols: int, depth: int) -> None:
        k = self.k
        at = [self.at(j, i) for j in range(rows) for i in range(cols)]
        acc = [f"c{j}" for j in range(rows * cols)]
        if k.post == ACC:
            for c, sub in zip(acc, at):
                self.put(depth, f"{self.p.doprint(self.out.xreplace(sub))} = {c};")
            return
        posts = [k.post.xreplace({**sub, ACC: sp.Symbol(c, real=True)}) for c, sub in zip(acc, at)]
        temps, finals = self.cse(posts)
        for name, value in temps:
            self.put(depth, f"const {self.real} {name} = {value};")
        for sub, value in zip(at, finals):
            self.put(depth, f"{self.p.doprint(self.out.xreplace(sub))} = {value};")
