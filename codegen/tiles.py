"""Register-blocked contractions: the loop nest of a `sum` or `accumulate` kernel as tiles
of accumulators a C compiler keeps in vector registers.

A kernel `out[keep] (=|+=) post(Σ_red body)` qualifies when its output index is distinct
loop symbols, its body is arithmetic (no calls a compiler cannot vectorize), and one loop
can be the *lane* axis, along which every read is unit-stride or invariant:

- a kept loop along which the output is unit-stride (`dx[b,i] = Σ_o δ[b,o]·W[o,i]`,
  lanes over `i`): each lane is its own output element, as in a GEMM micro-kernel;
- else a reduction loop (`y[b,o] = Σ_i x[b,i]·W[o,i]`, lanes over `i`): each output sums
  its lanes at the end, in a fixed halving order.

Up to two other kept loops are tiled, so every read invariant along a tiled loop is loaded
once per tile instead of once per output. Each accumulator is a small local array
(`float c3[16]`) updated in one loop over the lanes: the compiler vectorizes that loop
and, the array's address being fixed, keeps it in a register across the reduction. Tails
(extents that are not a multiple of a tile, the runtime batch) run the same code with a
tile of 1 or fewer lanes.

When the body is a product of two reads (dense layers and both of their gradients,
matmul, convolutions and theirs), a tile is summed by a shared `static` helper
(`dot8x2_16`, `tile8x32`, `tile16x8_nx3x3` for a 3 x 3 convolution's channels and taps):
its text depends only on the tile's shape (a convolution's taps are constants of it, its
channels and strides arguments), so a module holds a few of them however many kernels
call them, and the C compiler's time grows with the number of layers, not with their
width. Small modules keep the tiles of a batch-1 call inline, where a call costs more
than the tile.

The C is plain C99. The summation order differs from the scalar loop's (lanes are summed
apart, then together) but is fixed by the text: the same on every run and thread count.
A target whose vectors fuse (host with FMA) adds each product with `fmaf`, one rounding as
C99 specifies it, in helpers and inline tiles alike; the accumulator budget is the
target's (8 where x86 has 16 vector registers, else 16).
For the host target a big kernel's first loop is an orphaned `omp for` (static schedule,
whole tiles per thread) and its tails an `omp single`, behind `#ifdef _OPENMP`, and the
kernel runs them in a parallel region when the batch makes it big enough. Each thread
computes whole output elements, so threads change no result. docs/design.md ("Fast
kernels") has the figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import sympy as sp

from graphc.ir import ACC, ACCUMULATE, BATCH, SUM, Kernel, data_dependent

from .ctext import comment
from .printer import prepare

LANE = "l"  # the lane index inside a tile


@dataclass(frozen=True)
class Tiling:
    lane: sp.Symbol                            # the vectorized loop
    reduce_lanes: bool                         # lanes over a reduction loop (summed at the end)
    lanes: int                                 # lanes per accumulator array
    chunks: int                                # arrays per output along a kept lane axis
    tiles: tuple[sp.Symbol, ...]               # tiled kept loops, outermost first
    budget: int                                # accumulator arrays per tile
    outer: tuple[sp.Symbol, ...]               # kept loops run one by one, outside the tiles
    inner: tuple[sp.Symbol, ...]               # reduction loops inside a tile (not the lane)
    serial: bool = False                       # no OpenMP: its first loop's values share outputs


def arithmetic(expr: sp.Expr) -> bool:
    """Only + - * / and comparisons: what a compiler vectorizes without a vector libm."""
    return not any(isinstance(f, sp.Function) and not isinstance(f, sp.Piecewise)
                   for f in sp.preorder_traversal(expr))


def _guarded(kern: Kernel) -> bool:
    """Whether a read or the write happens only where a condition on the loop indices
    holds (padding), or at an index read from data (an embedding's row, whose guard is on
    that index): the tiles load their operands unconditionally, at strided addresses."""
    loops = {s for s, _ in kern.loops}
    return kern.guard != sp.true or any(
        c.free_symbols & loops for p in kern.body.atoms(sp.Piecewise) for _, c in p.args) \
        or any(data_dependent(i) for a in kern.accesses() for i in a.indices)


def _alone(index) -> set[sp.Symbol]:
    """Loops that are a whole axis of the written index and appear in no other axis: each
    of their values writes its own outputs."""
    counts: dict[sp.Symbol, int] = {}
    for i in index:
        for s in sp.sympify(i).free_symbols:
            counts[s] = counts.get(s, 0) + 1
    return {i for i in index if isinstance(i, sp.Symbol) and counts[i] == 1}


def coalesced(kern: Kernel, strides: list[dict[sp.Symbol, int]]) -> Kernel:
    """The kernel with each pair of loops (h, w) that every access steps through as one
    (the step along h is w's extent times the step along w: a 1 x 1 convolution's rows of
    an unpadded map) run as the one loop w over h·w, h read as 0: a 25 x 5 map fills
    vectors along 125 elements, not 5. Both loops kept, or both summed; they appear only
    in the indices. The indices then leave their axis (w up to h·w) but the flat offsets,
    all the C prints, are the same."""
    if kern.mode not in (SUM, ACCUMULATE) or _guarded(kern):
        return kern
    extent = dict(kern.loops)
    red = set(kern.reduction_loops())
    plain = [kern.body, kern.post]
    loose = set().union(*[e.xreplace({a: sp.S.Zero for a in e.atoms(sp.Indexed)})
                          .free_symbols for e in map(sp.sympify, plain)])
    names = [s for s, _ in kern.loops]
    for h, w in zip(names, names[1:]):
        if not (isinstance(extent[h], int) and isinstance(extent[w], int)) \
                or (h in red) != (w in red) or {h, w} & loose:
            continue
        if all(st[h] == extent[w] * st[w] for st in strides) and any(st[w] for st in strides):
            zero = {h: sp.S.Zero}
            return replace(kern, loops=tuple((s, extent[h] * extent[w] if s == w else e)
                                             for s, e in kern.loops if s != h),
                           out_index=tuple(sp.sympify(i).xreplace(zero) for i in kern.out_index),
                           body=kern.body.xreplace(zero), post=kern.post.xreplace(zero))
    return kern


def tiling(kern: Kernel, strides: list[dict[sp.Symbol, int]], vector_bytes: int,
           itemsize: int, accumulators: int = 16) -> Tiling | None:
    """How to block `kern`, or None when the scalar schedule is the one to print.
    `strides` are `emit._strides` (the output first, then each read)."""
    if vector_bytes <= 0 or kern.mode not in (SUM, ACCUMULATE):
        return None
    red = kern.reduction_loops()
    index = kern.out_index
    if not red or any(data_dependent(i) for i in index):
        return None
    alone = _alone(index)
    symbols = [i for i in index if not sp.sympify(i).is_Integer]
    if kern.mode == SUM and any(i not in alone for i in symbols):
        return None
    # A scatter (`dx[b, c, h + p, w + q] += ...`, a padded copy's convolution gradient):
    # loops that share an axis of the written index run one by one, outside the tile,
    # except one as the lanes; the tiles are loops that write outputs of their own.
    if not arithmetic(kern.body) or _guarded(kern):
        return None
    # The names printed here (c0, s, l, i0_t, b_j, t0 ...) cannot meet the IR's loop names.
    if not all(re.fullmatch(r"b|i\d+", str(s)) for s, _ in kern.loops):
        return None
    extent = dict(kern.loops)
    keep = [s for s, _ in kern.loops if s not in red]
    out, reads = strides[0], strides[1:]
    vec = max(1, vector_bytes // itemsize)

    def lane_ok(s):
        return isinstance(extent[s], int) and all(r[s] in (0, 1) for r in reads) \
            and any(r[s] == 1 for r in reads)

    kept = [s for s in keep if out[s] == 1 and lane_ok(s) and extent[s] > 1]
    summed = [s for s in red if lane_ok(s) and extent[s] > 1]
    # The longest: most lanes filled (a scatter's w before its tap q).
    kept_lane = max(kept, key=lambda s: (extent[s], -kept.index(s))) if kept else None
    summed_lane = max(summed, key=lambda s: (extent[s], -red.index(s))) if summed else None
    # A sum over several loops (a convolution's weight gradient, Σ over b, h, w) whose kept
    # unit-stride loop is shorter than a vector (the tap q of a 3x3 kernel) fills its lanes
    # along the sum instead (w).
    several = len(red) > 1 and summed_lane is not None and kept_lane is not None and \
        1 << (min(vec, extent[summed_lane]).bit_length() - 1) > min(vec, extent[kept_lane])
    if kept_lane is not None and not several:
        lane, reduce_lanes = kept_lane, False
    elif summed_lane is not None:
        lane, reduce_lanes = summed_lane, True
    else:
        return None
    lanes = min(vec, extent[lane])
    if reduce_lanes:   # a power of two, for the pairwise sum at the end
        lanes = 1 << (lanes.bit_length() - 1)
        # The sum's length: the lane loop's, times the other loops summed in the tile.
        length = sp.Mul(*[extent[s] for s in red])
        if not length.has(BATCH) and int(length) < MIN_SUMMED_VECTORS * vec:
            return None   # the final pairwise sum would cost more than the lanes save
    chunks = 1 if reduce_lanes else max(1, min(2, extent[lane] // lanes))
    # Tile the kept loops along which some read is invariant (it is then loaded once per
    # tile); most reuse first, a vector saved (a read along the lanes) before a scalar.
    others = [s for s in keep if s != lane]

    def reuse(s):
        return sum(1 + (r[lane] != 0) for r in reads if r[s] == 0 and any(r[t] for t in red))
    # Between equals, a loop of fixed extent before the batch: a depthwise convolution's
    # tile then spans output rows, as many at batch 1 as at batch 64.
    tiled = sorted((s for s in others if reuse(s) and extent[s] != 1 and s in alone),
                   key=lambda s: (-reuse(s), extent[s] == BATCH, others.index(s))
                   )[:2 if reduce_lanes else 1]
    tiled.sort(key=others.index)
    inner = tuple(s for s in red if s != lane)
    # Loops outside the tiles, those with outputs of their own first: the first is the one
    # OpenMP shares out, and threads must not write the same outputs.
    outer = sorted((s for s in others if s not in tiled), key=lambda s: s not in alone)
    serial = bool(outer) and outer[0] not in alone
    return Tiling(lane, reduce_lanes, lanes, chunks, tuple(tiled), max(1, accumulators // chunks),
                  tuple(outer), inner, serial)


def split_invariant(expr: sp.Expr, variant: set, temps: dict) -> sp.Expr:
    """`expr` with each largest part that depends on none of `variant` (a batch norm's
    `g[o]/sqrt(v[o] + eps)` in an epilogue of `acc`, per lane) replaced by a temporary:
    `temps` maps each part to its symbol (u0, u1 ...), shared by equal parts. An Add or a
    Mul gives its invariant terms as one part; a lone read or number stays; a Piecewise
    is left whole (a branch computes only where its condition holds)."""
    if not expr.free_symbols & variant:
        if expr.is_Atom or isinstance(expr, sp.Indexed) or (-expr).is_Atom \
                or isinstance(-expr, sp.Indexed) or expr.is_integer:
            return expr   # as cheap to read as a temporary, or an index (not a real)
        if expr not in temps:
            temps[expr] = sp.Symbol(f"u{len(temps)}", real=True)
        return temps[expr]
    if isinstance(expr, sp.Piecewise) or expr.is_Atom or isinstance(expr, sp.Indexed):
        return expr
    if isinstance(expr, (sp.Add, sp.Mul)):
        fixed = [a for a in expr.args if not a.free_symbols & variant]
        moving = [split_invariant(a, variant, temps) for a in expr.args
                  if a.free_symbols & variant]
        part = split_invariant(expr.func(*fixed), variant, temps) if fixed else None
        return expr.func(*moving, *([part] if part is not None else []), evaluate=False)
    return expr.func(*[split_invariant(a, variant, temps) for a in expr.args])


def _times(k: int, stride: str) -> str:
    """`k·stride + ` as C text for an index sum (nothing for k = 0)."""
    return "" if k == 0 else f"{stride} + " if k == 1 else f"{k}*{stride} + "


def _index(*parts: str) -> str:
    """A C index sum of the non-empty parts ("0" for none)."""
    return " + ".join(p for p in parts if p) or "0"


def _halving(names: list[str], lanes: int) -> list[str]:
    """Each array's lanes summed pairwise into lane 0, all arrays in one loop per level
    (c[l] += c[l + 8], then 4, 2, 1): a fixed order. A transposing tree (two arrays
    packed into one per level) measured the same."""
    out, width = [], lanes
    while width > 1:
        width //= 2
        adds = " ".join(f"{c}[{'0' if width == 1 else 'l'}] += "
                        f"{c}[{'1' if width == 1 else f'l + {width}'}];" for c in names)
        out.append(adds if width == 1 else f"for (size_t l = 0; l < {width}; ++l) {{ {adds} }}")
    return out


def operands(kern: Kernel, t: Tiling, strides: list[dict]):
    """((a, b), strides by access) when the body is a product of two reads that a shared
    helper can sum (dot: rows of `a` along the first tiled loop, of `b` along the second;
    tile: `a` broadcast along the lanes, `b` a row along them). The other reduction loops
    (a convolution's channels and taps) are the helper's too, their extents and strides
    its arguments: one helper per tile shape serves every layer."""
    body = kern.body
    if not isinstance(body, sp.Mul) or len(body.args) != 2 \
            or not all(isinstance(f, sp.Indexed) for f in body.args):
        return None
    by = dict(zip(kern.accesses(), strides[1:]))
    if any(step < 0 for st in [strides[0], *by.values()] for step in st.values()):
        return None   # the helpers take strides as size_t
    for a, b in (body.args, body.args[::-1]):
        sa, sb = by[a], by[b]
        if t.reduce_lanes:
            ok = sa[t.lane] == sb[t.lane] == 1 \
                and (len(t.tiles) < 1 or sb[t.tiles[0]] == 0) \
                and (len(t.tiles) < 2 or sa[t.tiles[1]] == 0)
        else:
            # With several sums, the rows of `b` may move along the tile instead of `a`'s
            # (a depthwise convolution tiled over the batch: the weight is shared).
            ok = len(t.inner) >= 1 and sa[t.lane] == 0 and sb[t.lane] == 1 \
                and (all(sb[m] == 0 for m in t.tiles)
                     or len(t.inner) > 1 and all(sa[m] == 0 for m in t.tiles))
        if ok:
            return (a, b), by
    return None


# Lanes split a reduction only when it is at least this many vectors long: shorter, the
# pairwise sum of the lanes at the end costs more than the lanes save (a 10-class sum).
MIN_SUMMED_VECTORS = 4
MAX_TILE = 8  # outputs along a tiled loop that has another tiled loop inside
# Fewer independent sums than this in a tile and fma's latency, not the adds, bounds it
# (a depthwise convolution's 1 x 16 tile at batch 1 ran 1.3x slower fused on Zen 1).
FUSED_MIN_ACCUMULATORS = 4
MAX_UNROLLED = 8  # a helper's reduction loop this short is a constant of its text (taps)
MAX_PARALLEL_BATCH = 1024  # no OpenMP for a kernel that needs a larger batch to be big
HELPER_WORK = 8192  # multiply-adds per example of a module's biggest kernel for helpers


def _shape_name(inner: tuple) -> str:
    """`nx3x3` for the loops (n0, 3, 3) of a helper (codegen names: `tile16x8_nx3x3`)."""
    return "x".join("n" if e is None else str(e) for e in inner)


def wants_helpers(programs) -> bool:
    """Does any kernel of these programs reach HELPER_WORK multiply-adds per example?"""
    return any(int(sp.Mul(*[e for _, e in k.loops]).subs(BATCH, 1)) >= HELPER_WORK
               for prog in programs for k in prog.kernels)


class BlockedWriter:
    """Prints one blocked kernel's body lines (inside the function's braces)."""

    def __init__(self, kern: Kernel, tiling_: Tiling, out: sp.Indexed, printer, real: str, cse,
                 parallel_work: int = 0, helpers: dict[str, str] | None = None,
                 strides: list[dict] | None = None, use_helpers: bool = False,
                 fused: bool = False):
        self.k, self.t, self.out, self.p, self.real = kern, tiling_, out, printer, real
        self.extent = dict(kern.loops)
        self.operands = operands(kern, tiling_, strides) if strides else None
        self.use_helpers = use_helpers
        # Products added by fma (one rounding) wherever a tile accumulates one, inline and
        # in helpers alike (a row's result must not depend on which of them summed it);
        # not in a kernel whose tiles at batch 1 keep too few sums apart to hide an fma's
        # latency (5 cycles on Zen 1, an add's 3).
        self.fma = ("fmaf" if real == "float" else "fma") \
            if fused and self.batch1_accumulators() >= FUSED_MIN_ACCUMULATORS else None
        self.cse = cse                # exprs -> (temps [(name, C)], finals [C])
        self.parallel_work = parallel_work
        self.lines: list[str] = []
        self.common = bool(sp.cse([kern.body, kern.post])[0])
        self.helpers = helpers if helpers is not None else {}
        # Products of two reads can call shared helpers (the C compiler's time grows with
        # the text); see `leaf` for which tiles do.
        self.out_strides = strides[0] if strides else {}

    def tile_size(self, s, budget: int, inner_tiles: bool) -> int:
        """Outputs along tiled loop `s` per tile: at most MAX_TILE when another tiled loop
        is inside it (the rest of the budget is that one's), else all the budget."""
        e = self.extent[s]
        cap = MAX_TILE if inner_tiles else budget
        return min(cap, budget, e if isinstance(e, int) else cap)

    def tail_budget(self, budget: int, size: int) -> int:
        """The budget of the levels inside a tail row of a loop tiled by `size`: all of it
        inline (at batch 1 a dense layer computes 16 outputs at a time); with helpers, the
        main tile's inner size, so that one helper serves the tails of every kernel."""
        return budget // size if self.operands is not None and self.use_helpers else budget

    def batch1_accumulators(self) -> int:
        """Accumulator arrays of the tile a batch-1 call runs: `nest`'s sizes, a batch
        loop taking its tail row."""
        t = self.t
        budget = t.budget
        count = 1 if t.reduce_lanes or self.extent[t.lane] < t.lanes * t.chunks else t.chunks
        for j, s in enumerate(t.tiles):
            size = self.tile_size(s, budget, j < len(t.tiles) - 1)
            if isinstance(self.extent[s], int):
                count, budget = count * size, budget // size
            else:
                budget = self.tail_budget(budget, size)
        return count

    # ------------------------------------------------------------ helpers
    def add(self, acc: str, x: str, y: str) -> str:
        """`acc += x*y` as C: fused by fma where the target says so."""
        return f"{acc} = {self.fma}({x}, {y}, {acc});" if self.fma else f"{acc} += {x}*{y};"

    def put(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def ext(self, s) -> str:
        return "n" if self.extent[s] == BATCH else str(self.extent[s])

    def statements(self, exprs, depth: int) -> list[str]:
        if not self.common:   # nothing to share: print directly
            return [self.product(e) for e in exprs]
        temps, finals = self.cse(exprs)
        for name, value in temps:
            self.put(depth, f"const {self.real} {name} = {value};")
        return finals

    def product(self, e: sp.Expr) -> str:
        """A product of reads as C, fast (SymPy's Mul printing sorts factors by their
        printed text); anything else through the printer."""
        if isinstance(e, sp.Mul) and all(isinstance(f, sp.Indexed) for f in e.args):
            return "*".join(self.p._print_Indexed(f) for f in e.args)
        return self.p.doprint(prepare(e))

    def loop(self, depth: int, head: str, body) -> None:
        """`for (head) { body(depth + 1) }`. The kernel's first loop at the top of the
        function is the one OpenMP shares out (see `write`)."""
        if depth == 1 and self.rest is None:
            if self.team_from is not None:
                self.lines += ["#ifdef _OPENMP", "#pragma omp for schedule(static) nowait",
                               "#endif"]
        self.put(depth, f"for ({head}) {{")
        body(depth + 1)
        self.put(depth, "}")
        if depth == 1 and self.rest is None:
            self.rest = len(self.lines)

    def shares_out(self, depth: int) -> bool:
        """Whether a loop at `depth` would be the one OpenMP shares out (kept a loop)."""
        return depth == 1 and self.rest is None and self.team_from is not None

    def parallel_from(self) -> int | None:
        """The smallest batch n at which the kernel runs in a parallel region: None, never;
        0, always. A parallel region costs a team start (~1 µs), so only kernels of
        `parallel_work` multiply-adds."""
        if not self.parallel_work or self.t.serial:
            return None
        work = sp.Mul(*[e for _, e in self.k.loops])   # multiply-adds, in n
        if not work.has(BATCH):
            return 0 if int(work) >= self.parallel_work else None
        per = int(work / BATCH)
        if per * MAX_PARALLEL_BATCH < self.parallel_work:
            return None
        # Where the loop shared out (the first) is the batch's, in steps of 1 or of a tile,
        # a team needs more than one step of examples to give two threads work (a whole
        # step to one, the tail after it, in the `omp single`, to another); with fewer the
        # others wake only to wait at the barrier (ResNet-8's forward at batch 1 on 2
        # threads of a Zen 5 VM: 612 µs, against 199 on one).
        t, fewest = self.t, 1
        if t.outer and self.extent[t.outer[0]] == BATCH:
            fewest = 2
        elif not t.outer and t.reduce_lanes and t.tiles and self.extent[t.tiles[0]] == BATCH:
            fewest = self.tile_size(t.tiles[0], t.budget, len(t.tiles) > 1) + 1
        return max(fewest, -(-self.parallel_work // per))

    # ------------------------------------------------------------ loops
    def write(self) -> tuple[list[str], int | None]:
        """The function body's lines, and the smallest n at which a parallel region runs
        around it (`parallel_from`: None, never; 0, always). For OpenMP the first top-level
        loop is an orphaned `omp for` (whole tiles to each thread, in a fixed static
        partition) and what follows it (the tails) an `omp single`; outside a parallel
        region both run on the calling thread, so the same function serves both."""
        self.team_from = self.parallel_from()
        self.rest: int | None = None
        levels = list(self.t.tiles)
        if not self.t.reduce_lanes:
            # Lane chunks outermost: the panel read along them stays in cache across tiles.
            levels.insert(0, self.t.lane)
        # The epilogue's parts that read only outer loops' indices, computed at the top of
        # the innermost loop they read (before the loops if they read none).
        hoisted = {part: (name, part.free_symbols & set(self.t.outer))
                   for part, name in self.outer_invariants().items()}

        def declare(depth, here):
            for part, (name, reads) in hoisted.items():
                if here(reads):
                    self.put(depth, f"const {self.real} {name} = {self.p.doprint(prepare(part))};")

        def outer(loops, depth, bound):
            if not loops:
                self.nest(levels, {}, depth, self.t.budget)
                return
            s = loops[0]

            def body(d):
                declare(d, lambda reads: s in reads and reads <= bound | {s})
                outer(loops[1:], d, bound | {s})
            self.loop(depth, f"size_t {s} = 0; {s} < {self.ext(s)}; ++{s}", body)
        declare(1, lambda reads: not reads)
        outer(list(self.t.outer), 1, set())
        if self.team_from is None or self.rest is None:
            return self.lines, None
        rest = self.lines[self.rest:]
        if rest:
            self.lines[self.rest:] = ["#ifdef _OPENMP", "#pragma omp single nowait", "#endif",
                                      "    {"] + [line if line.startswith("#") else "    " + line
                                                  for line in rest] + ["    }"]
        return self.lines, self.team_from

    def nest(self, levels, at: dict, depth: int, budget: int) -> None:
        """Loops over the tiled levels, each as whole tiles and then a tail; `at` maps each
        level's loop to (first index, count)."""
        if not levels:
            self.leaf(at, depth)
            return
        s, rest = levels[0], levels[1:]
        e = self.extent[s]
        base = sp.Symbol(f"{s}_t", integer=True, nonnegative=True)
        if s == self.t.lane:   # kept lanes: chunks of lanes·chunks, then one shorter chunk
            width = self.t.lanes * self.t.chunks
            full, rem = divmod(e, width)
            if full == 1 and not self.shares_out(depth):   # one chunk: no loop
                self.put(depth, "{")
                self.nest(rest, {**at, s: (sp.Integer(0), width)}, depth + 1, budget)
                self.put(depth, "}")
            elif full:
                self.loop(depth, f"size_t {base} = 0; {base} < {full * width}; {base} += {width}",
                          lambda d: self.nest(rest, {**at, s: (base, width)}, d, budget))
            if rem:
                # A short last chunk whose last vector is more than half full but not
                # whole (29 of DS-CNN's 125 positions: 16 + 8 + 4 + 1 lanes) spills and
                # runs partly scalar: 7x slower per output than a whole chunk on Zen 5.
                # Where the kernel sets its outputs (=) and this thread owns the whole row,
                # the last chunk is a whole one ending at the extent's end instead: it
                # writes the chunk before it's last width - rem outputs again, bit for bit
                # (each lane sums the same terms in the same order).
                shifted = full and rem % self.t.lanes > self.t.lanes // 2 \
                    and self.k.mode == SUM and not self.shares_out(depth)
                last = (sp.Integer(e - width), width) if shifted \
                    else (sp.Integer(full * width), rem)
                self.put(depth, "{")
                self.nest(rest, {**at, s: last}, depth + 1, budget)
                self.put(depth, "}")
            return
        # An outer tiled loop takes at most MAX_TILE and leaves the rest of the budget to
        # the inner one; the innermost takes all that is left.
        size = self.tile_size(s, budget, any(lv != self.t.lane for lv in rest))
        start = "0"
        if size > 1:
            if isinstance(e, int):
                start = str(e // size * size)
            else:
                start = f"n / {size} * {size}"
            if isinstance(e, int) and e // size == 1 and not self.shares_out(depth):
                self.put(depth, "{")   # one tile: no loop
                self.nest(rest, {**at, s: (sp.Integer(0), size)}, depth + 1, budget // size)
                self.put(depth, "}")
            else:
                self.loop(depth, f"size_t {base} = 0; {base} < {start}; {base} += {size}",
                          lambda d: self.nest(rest, {**at, s: (base, size)}, d,
                                              budget // size))
            if isinstance(e, int) and e % size == 0:
                return
        tail_budget = self.tail_budget(budget, size)
        if isinstance(e, int) and e - int(start) == 1 and not self.shares_out(depth):
            self.put(depth, "{")   # one row left (3 taps in tiles of 2): no loop
            self.nest(rest, {**at, s: (sp.Integer(int(start)), 1)}, depth + 1, tail_budget)
            self.put(depth, "}")
            return
        self.loop(depth, f"size_t {s} = {start}; {s} < {self.ext(s)}; ++{s}",
                  lambda d: self.nest(rest, {**at, s: (s, 1)}, d, tail_budget))

    # ------------------------------------------------------------ one tile
    def leaf(self, at: dict, depth: int) -> None:
        """Whole tiles call a helper, unless they sum over the batch (a weight gradient at
        batch 1 is one product per output: a call would cost more than the tile); so do
        tails in a module of big kernels. In small modules the rest stays inline."""
        whole = bool(self.t.tiles) and at[self.t.tiles[0]][1] > 1 and \
            all(self.extent[s] != BATCH for s in self.t.inner + (self.t.lane,))
        if self.operands is not None and (self.use_helpers or whole):
            self.helper_leaf(at, depth)
        else:
            self.inline_leaf(at, depth)

    # ------------------------------------------------------------ one tile, by a helper
    def pointer(self, access: sp.Indexed, sub: dict) -> str:
        """The C address of `access` with `sub` applied (other loop symbols stay)."""
        var, buf = self.p.arrays[str(access.base.label)]
        offset = sp.expand(buf.flat_offset([sp.sympify(i).xreplace(sub) for i in access.indices]))
        return var if offset == 0 else f"{var} + {self.p._print_offset(offset)}"

    def helper_leaf(self, at: dict, depth: int) -> None:
        """A call to a shared helper that sums the tile (its text depends only on the tile's
        shape), then the kernel's own stores or epilogue."""
        t, k, r = self.t, self.k, self.real
        (a, b), strides = self.operands
        first = {s_: at[s_][0] for s_ in t.tiles}
        op = "+=" if k.mode == ACCUMULATE else "="
        if t.reduce_lanes:
            counts = [at[s_][1] for s_ in t.tiles] + [1] * (2 - len(t.tiles))
            start = {**first, **dict.fromkeys(t.inner, sp.Integer(0)), t.lane: sp.Integer(0)}
            sa = strides[a][t.tiles[0]] if t.tiles else 0
            sb = strides[b][t.tiles[1]] if len(t.tiles) > 1 else 0
            full, rem = divmod(self.extent[t.lane], t.lanes)
            name = self.helper_dot(counts[0], counts[1], t.lanes, rem, self.inner_shape(),
                                   full * t.lanes)
            self.put(depth, f"{r} s[{counts[0] * counts[1]}];")
            length = f", {full * t.lanes}" if not t.inner else ""
            self.put(depth, f"{name}({self.pointer(a, start)}, {sa}, {self.pointer(b, start)}, "
                            f"{sb}{length}, {self.inner_arguments(a, b)}s);")
            d, flat, sub = depth, sp.Integer(0), {}
            for s_ in t.tiles:
                base, count = at[s_]
                if count == 1:
                    sub[s_] = base
                    continue
                j = sp.Symbol(f"{s_}_j", integer=True, nonnegative=True)
                self.put(d, f"for (size_t {j} = 0; {j} < {count}; ++{j}) {{")
                d += 1
                flat, sub[s_] = flat * count + j, base + j
            self.store(sub, f"s[{self.p.doprint(flat)}]", op, d, scoped=False)
        else:
            red = t.inner[0]
            base, width = at[t.lane]
            m = t.tiles[0] if t.tiles else None
            tm = at[m][1] if m is not None else 1
            start = {**first, **dict.fromkeys(t.inner, sp.Integer(0)), t.lane: base}
            am = strides[a][m] if m is not None else 0
            om = self.out_strides[m] if m is not None else 0
            rows = m is not None and strides[b][m] != 0   # b's rows move along the tile
            name = self.helper_tile(tm, width, k.mode == ACCUMULATE, self.inner_shape(), rows)
            if rows:
                am = strides[b][m]
            if len(t.inner) == 1:
                self.put(depth, f"{name}({self.pointer(a, start)}, {am}, {strides[a][red]}, "
                                f"{self.pointer(b, start)}, {strides[b][red]}, {self.ext(red)}, "
                                f"{self.pointer(self.out, start)}, {om});")
            else:
                self.put(depth, f"{name}({self.pointer(a, start)}, {am}, "
                                f"{self.pointer(b, start)}, {self.inner_arguments(a, b)}"
                                f"{self.pointer(self.out, start)}, {om});")
            if k.post == ACC:
                return
            # The epilogue (bias, activation, relu') over the tile just written, in place.
            l = sp.Symbol(LANE, integer=True, nonnegative=True)
            d, sub = depth, {t.lane: base + l}
            if m is not None and tm > 1:
                j = sp.Symbol(f"{m}_j", integer=True, nonnegative=True)
                self.put(d, f"for (size_t {j} = 0; {j} < {tm}; ++{j}) {{")
                d += 1
                sub[m] = first[m] + j
            elif m is not None:   # one row: the last one of an extent 1 past whole tiles
                sub[m] = first[m]
            (post,) = self.invariants([sub], d)
            self.put(d, f"for (size_t {l} = 0; {l} < {width}; ++{l}) {{")
            d += 1
            self.store(sub, self.p.doprint(self.out.xreplace(sub)), "=", d, scoped=False,
                       post=post)
        while d > depth:
            d -= 1
            self.put(d, "}")

    def inner_shape(self) -> tuple[int | None, ...]:
        """The extents of the reduction loops a helper runs besides the lanes, outermost
        first: None for one the helper takes as an argument (the first, a convolution's
        channels or a batch; any long one), the number for a short one (a kernel's taps),
        which the helper's loop then has as a constant that the C compiler unrolls (with
        all of them arguments, ResNet-8's forward pass ran 10 % slower)."""
        return tuple(None if j == 0 or not isinstance(self.extent[s], int)
                     or self.extent[s] > MAX_UNROLLED else self.extent[s]
                     for j, s in enumerate(self.t.inner))

    def inner_arguments(self, a: sp.Indexed, b: sp.Indexed) -> str:
        """`[extent, ]a's stride, b's stride, ` of each reduction loop a helper runs
        besides the lanes, outermost first (the extent if `inner_shape` leaves it open)."""
        (_, by) = self.operands
        return "".join((f"{self.ext(s)}, " if e is None else "") + f"{by[a][s]}, {by[b][s]}, "
                       for s, e in zip(self.t.inner, self.inner_shape()))

    def helper_dot(self, t1: int, t2: int, lanes: int, rem: int, inner: tuple = (),
                   length: int = 0) -> str:
        """`dot<t1>x<t2>_<lanes>[_<rem>][_fma]`: t1·t2 dot products of rows of `a` with rows of
        `b`, `len` (a multiple of `lanes`) plus `rem` elements long. With loops around
        them (`..._<length>_<inner shape>`, e.g. `_nx3`), the rows are `length` + `rem`
        long (a convolution's row of taps: unrolled, as the inline tile was)."""
        name = f"dot{t1}x{t2}_{lanes}" + (f"_{rem}" if rem else "") + \
            (f"_{length}_{_shape_name(inner)}" if inner else "") + ("_fma" if self.fma else "")
        if name in self.helpers:
            return name
        if inner:
            return self.helper_dot_inner(name, t1, t2, lanes, rem, inner, length)
        r, cs = self.real, [f"c{j}" for j in range(t1 * t2)]

        def terms(op: str, at: str) -> list[str]:
            pairs = [(f"{cs[j * t2 + k]}[l]", f"a[{_times(j, 'sa')}{at}l]",
                      f"b[{_times(k, 'sb')}{at}l]") for j in range(t1) for k in range(t2)]
            return [f"{c} = {x}*{y};" if op == "=" else self.add(c, x, y) for c, x, y in pairs]
        tail = f" + {rem}" if rem else ""
        lines = [comment(f"s[j*{t2} + k] = Σ_{{r < len{tail}}} a[j*sa + r]·b[k*sb + r] for "
                          f"j < {t1}, k < {t2}; {lanes} partial sums each (len a multiple of "
                          f"{lanes}, at least {lanes}), added pairwise"),
                 f"static void {name}(const {r} *restrict a, size_t sa, const {r} *restrict b, "
                 f"size_t sb, size_t len, {r} *restrict s)", "{",
                 *(["    (void)sa;"] if t1 == 1 else []), *(["    (void)sb;"] if t2 == 1 else []),
                 f"    {r} {', '.join(f'{c}[{lanes}]' for c in cs)};",
                 f"    for (size_t l = 0; l < {lanes}; ++l) {{", *("        " + x for x in terms("=", "")),
                 "    }", f"    for (size_t r = {lanes}; r < len; r += {lanes}) {{",
                 f"        for (size_t l = 0; l < {lanes}; ++l) {{",
                 *("            " + x for x in terms("+=", "r + ")), "        }", "    }"]
        if rem:
            lines += [f"    for (size_t l = 0; l < {rem}; ++l) {{",
                      *("        " + x for x in terms("+=", "len + ")), "    }"]
        lines += ["    " + x for x in _halving(cs, lanes)]
        lines += [f"    {' '.join(f's[{j}] = {c}[0];' for j, c in enumerate(cs))}", "}"]
        self.helpers[name] = "\n".join(lines)
        return name

    def helper_tile(self, tm: int, width: int, add: bool, inner: tuple = (None,),
                    rows: bool = False) -> str:
        """`tile<tm>x<width>[_<inner shape>][_rows][_add][_fma]`: a tm × width block of outputs,
        each row a sum of broadcast `a` times a row of `b` (the GEMM micro-kernel's shape),
        over one reduction loop or several nested ones (`_nx3x3`: a convolution's); with
        `rows`, `a` is shared by the tile's rows and `b`'s rows move along it (`am` is then
        b's stride between rows)."""
        name = f"tile{tm}x{width}" + (f"_{_shape_name(inner)}" if len(inner) > 1 else "") + \
            ("_rows" if rows else "") + ("_add" if add else "") + ("_fma" if self.fma else "")
        if name in self.helpers:
            return name
        if len(inner) > 1:
            return self.helper_tile_inner(name, tm, width, add, inner, rows)
        r = self.real
        chunks = 2 if width == 2 * self.t.lanes else 1
        lanes = width // chunks
        acc = [(m, q) for m in range(tm) for q in range(chunks)]
        cs = [f"c{j}" for j in range(len(acc))]

        def terms(op: str, at_a: str, at_b: str) -> list[str]:
            pairs = [(f"{c}[l]", f"a[{_index(_times(m, 'am')[:-3], at_a)}]",
                      f"b[{at_b}{_times(q, str(lanes))}l]") for c, (m, q) in zip(cs, acc)]
            return [f"{c} = {x}*{y};" if op == "=" else self.add(c, x, y) for c, x, y in pairs]
        store = "+=" if add else "="
        lines = [comment(f"out[m*om + l] {store} Σ_{{r<len}} a[m*am + r*ar]·b[r*br + l] for "
                          f"m < {tm}, l < {width} (len >= 1)"),
                 f"static void {name}(const {r} *restrict a, size_t am, size_t ar, "
                 f"const {r} *restrict b, size_t br, size_t len, {r} *restrict out, size_t om)",
                 "{", *(["    (void)am;", "    (void)om;"] if tm == 1 else []),
                 f"    {r} {', '.join(f'{c}[{lanes}]' for c in cs)};",
                 f"    for (size_t l = 0; l < {lanes}; ++l) {{",
                 *("        " + x for x in terms("=", "", "")),
                 "    }", "    for (size_t r = 1; r < len; ++r) {",
                 f"        for (size_t l = 0; l < {lanes}; ++l) {{",
                 *("            " + x for x in terms("+=", "r*ar", "r*br + ")), "        }", "    }",
                 f"    for (size_t l = 0; l < {lanes}; ++l) {{",
                 *(f"        out[{_times(m, 'om')}{_times(q, str(lanes))}l] {store} {c}[l];"
                   for c, (m, q) in zip(cs, acc)), "    }", "}"]
        self.helpers[name] = "\n".join(lines)
        return name

    @staticmethod
    def _inner_parameters(inner: tuple) -> str:
        return "".join((f"size_t n{j}, " if e is None else "") + f"size_t sa{j}, size_t sb{j}, "
                       for j, e in enumerate(inner))

    @staticmethod
    def _inner_loops(inner: tuple, body: list[str]) -> list[str]:
        """Nested loops (r0 < n0, r1 < 3, ...) of the shape `inner` around `body`, which
        reads the offsets `oa` and `ob` they reach in `a` and `b`."""
        lines = []
        for j, e in enumerate(inner):
            lines.append("    " * (j + 1) + f"for (size_t r{j} = 0; r{j} < {e or f'n{j}'}; ++r{j}) {{")
        pad, count = "    " * (len(inner) + 1), range(len(inner))
        lines += [pad + "const size_t oa = " + " + ".join(f"r{j}*sa{j}" for j in count) + ";",
                  pad + "const size_t ob = " + " + ".join(f"r{j}*sb{j}" for j in count) + ";"]
        lines += [pad + x for x in body]
        lines += ["    " * (j + 1) + "}" for j in reversed(count)]
        return lines

    def helper_dot_inner(self, name: str, t1: int, t2: int, lanes: int, rem: int,
                         inner: tuple, length: int) -> str:
        """helper_dot's sums over `inner` more loops, in the order of the inline tile:
        accumulators zeroed, then per point of those loops the lane chunks, then `rem`."""
        r, cs = self.real, [f"c{j}" for j in range(t1 * t2)]

        def terms(at: str, lane: str = "l") -> list[str]:
            """c[lane] += a[... + at]*b[... + at] for every accumulator."""
            return [self.add(f"{cs[j * t2 + k]}[{lane}]", f"a[{_times(j, 'sa')}oa + {at}]",
                             f"b[{_times(k, 'sb')}ob + {at}]")
                    for j in range(t1) for k in range(t2)]
        loops = ", ".join(f"r{j} < {e or f'n{j}'}" for j, e in enumerate(inner))
        # No loop of one trip: one chunk of lanes (a 4-wide row in 4 lanes), one last tap.
        lane_loop = f"for (size_t l = 0; l < {lanes}; ++l) {{"
        body = [lane_loop, *("    " + x for x in terms("l")), "}"] if length == lanes else \
            [f"for (size_t r = 0; r < {length}; r += {lanes}) {{", "    " + lane_loop,
             *("        " + x for x in terms("r + l")), "    }", "}"]
        if rem == 1:
            body += terms(f"{length}", "0")
        elif rem:
            body += [f"for (size_t l = 0; l < {rem}; ++l) {{",
                     *("    " + x for x in terms(f"{length} + l")), "}"]
        lines = [comment(f"s[j*{t2} + k] = Σ_{{{loops}}} Σ_{{r < {length + rem}}} a[j*sa + oa + r]·"
                         f"b[k*sb + ob + r] for j < {t1}, k < {t2}, oa = Σ r_i·sa_i and "
                         f"ob = Σ r_i·sb_i; {lanes} partial sums each, added pairwise"),
                 f"static void {name}(const {r} *restrict a, size_t sa, const {r} *restrict b, "
                 f"size_t sb, "
                 + self._inner_parameters(inner)
                 + f"{r} *restrict s)", "{",
                 *(["    (void)sa;"] if t1 == 1 else []), *(["    (void)sb;"] if t2 == 1 else []),
                 f"    {r} {', '.join(f'{c}[{lanes}]' for c in cs)};",
                 f"    for (size_t l = 0; l < {lanes}; ++l) {{ "
                 f"{' '.join(f'{c}[l] = 0;' for c in cs)} }}",
                 *self._inner_loops(inner, body)]
        lines += ["    " + x for x in _halving(cs, lanes)]
        lines += [f"    {' '.join(f's[{j}] = {c}[0];' for j, c in enumerate(cs))}", "}"]
        self.helpers[name] = "\n".join(lines)
        return name

    def helper_tile_inner(self, name: str, tm: int, width: int, add: bool, inner: tuple,
                          rows: bool = False) -> str:
        """helper_tile's block summed over `inner` nested loops, in the order of the inline
        tile: accumulators zeroed, then one lane loop per point of those loops."""
        r = self.real
        chunks = 2 if width == 2 * self.t.lanes else 1
        lanes = width // chunks
        acc = [(m, q) for m in range(tm) for q in range(chunks)]
        cs = [f"c{j}" for j in range(len(acc))]
        store = "+=" if add else "="
        loops = ", ".join(f"r{j} < {e or f'n{j}'}" for j, e in enumerate(inner))
        at_a, at_b = ("", "am") if rows else ("am", "")
        body = [f"for (size_t l = 0; l < {lanes}; ++l) {{",
                *("    " + self.add(f"{c}[l]", f"a[{_times(m, at_a) if at_a else ''}oa]",
                                   f"b[{_times(m, at_b) if at_b else ''}ob + "
                                   f"{_times(q, str(lanes))}l]") for c, (m, q) in zip(cs, acc)),
                "}"]
        sums = "a[oa]·b[m*am + ob + l]" if rows else "a[m*am + oa]·b[ob + l]"
        lines = [comment(f"out[m*om + l] {store} Σ_{{{loops}}} {sums} for "
                         f"m < {tm}, l < {width}, oa = Σ r_i·sa_i and ob = Σ r_i·sb_i"),
                 f"static void {name}(const {r} *restrict a, size_t am, const {r} *restrict b, "
                 + self._inner_parameters(inner)
                 + f"{r} *restrict out, size_t om)", "{",
                 *(["    (void)am;", "    (void)om;"] if tm == 1 else []),
                 f"    {r} {', '.join(f'{c}[{lanes}]' for c in cs)};",
                 f"    for (size_t l = 0; l < {lanes}; ++l) {{ "
                 f"{' '.join(f'{c}[l] = 0;' for c in cs)} }}",
                 *self._inner_loops(inner, body),
                 f"    for (size_t l = 0; l < {lanes}; ++l) {{",
                 *(f"        out[{_times(m, 'om')}{_times(q, str(lanes))}l] {store} {c}[l];"
                   for c, (m, q) in zip(cs, acc)), "    }", "}"]
        self.helpers[name] = "\n".join(lines)
        return name

    # ------------------------------------------------------------ one tile, inline
    def inline_leaf(self, at: dict, depth: int) -> None:
        t, k, r = self.t, self.k, self.real
        l = sp.Symbol(LANE, integer=True, nonnegative=True)
        points = [{}]
        for s in t.tiles:
            first, count = at[s]
            points = [{**p, s: first + j} for p in points for j in range(count)]
        if t.reduce_lanes:
            lanes, chunks = t.lanes, 1
        else:
            first, width = at[t.lane]
            lanes, chunks = ((t.lanes, t.chunks) if width == t.lanes * t.chunks else (width, 1))
        accs = [(p, c) for p in points for c in range(chunks)]
        names = [f"c{j}" for j in range(len(accs))]
        self.put(depth, f"{r} {', '.join(f'{c}[{lanes}]' for c in names)};")

        def lane_loop(count: int, sub: dict, lane_at, d: int, op: str = "+=") -> None:
            exprs = [k.body.xreplace({**p, **sub, t.lane: lane_at(c)}) for p, c in accs]
            self.put(d, f"for (size_t {l} = 0; {l} < {count}; ++{l}) {{")
            if self.fma and op == "+=" and all(isinstance(e, sp.Mul) for e in exprs):
                # x·y with y the last factor: fma(x, y, c), as the helpers print it
                factors = [f for e in exprs for f in (sp.Mul(*e.args[:-1]), e.args[-1])]
                values = self.statements(factors, d + 1)
                for j, name in enumerate(names):
                    self.put(d + 1, self.add(f"{name}[{l}]", values[2 * j], values[2 * j + 1]))
            else:
                for name, value in zip(names, self.statements(exprs, d + 1)):
                    self.put(d + 1, f"{name}[{l}] {op} {value};")
            self.put(d, "}")

        # The first term of the sum initializes the accumulators (no zeroing, one add
        # less: at batch 1 a weight gradient is a single product). When the sum has two
        # loops besides the lanes, they are zeroed instead.
        peel = len(t.inner) == (0 if t.reduce_lanes else 1)
        if not peel:
            self.put(depth, f"for (size_t {l} = 0; {l} < {lanes}; ++{l}) "
                            f"{{ {' '.join(f'{c}[{l}] = 0;' for c in names)} }}")
        d = depth
        if t.reduce_lanes:
            for s in t.inner:
                self.put(d, f"for (size_t {s} = 0; {s} < {self.ext(s)}; ++{s}) {{")
                d += 1
            full, rem = divmod(self.extent[t.lane], lanes)
            base = sp.Symbol(f"{t.lane}_t", integer=True, nonnegative=True)
            lane_loop(lanes, {}, lambda c: l, d, "=" if peel else "+=")
            if full == 2:
                lane_loop(lanes, {}, lambda c: lanes + l, d)
            elif full > 2:
                self.put(d, f"for (size_t {base} = {lanes}; {base} < {full * lanes}; "
                            f"{base} += {lanes}) {{")
                lane_loop(lanes, {}, lambda c: base + l, d + 1)
                self.put(d, "}")
            if rem:
                lane_loop(rem, {}, lambda c: full * lanes + l, d)
        else:
            first, _ = at[t.lane]

            def lane_at(c):
                return first + c * lanes + l
            if peel:
                (s,) = t.inner
                lane_loop(lanes, {s: sp.Integer(0)}, lane_at, d, "=")
                if self.extent[s] in (1, 2):   # one more term at most: no loop
                    for j in range(1, self.extent[s]):
                        lane_loop(lanes, {s: sp.Integer(j)}, lane_at, d)
                else:
                    self.put(d, f"for (size_t {s} = 1; {s} < {self.ext(s)}; ++{s}) {{")
                    lane_loop(lanes, {}, lane_at, d + 1)
                    self.put(d, "}")
            else:
                for s in t.inner:
                    self.put(d, f"for (size_t {s} = 0; {s} < {self.ext(s)}; ++{s}) {{")
                    d += 1
                lane_loop(lanes, {}, lane_at, d)
        while d > depth:
            d -= 1
            self.put(d, "}")
        op = "+=" if k.mode == ACCUMULATE else "="
        if t.reduce_lanes:
            for line in _halving(names, lanes):
                self.put(depth, line)
            if len(names) == 1:
                self.store(points[0], "c0[0]", op, depth, scoped=False)
                return
            # The sums in one array, stored by a loop over the tile.
            self.put(depth, f"const {r} s[{len(names)}] = {{{', '.join(c + '[0]' for c in names)}}};")
            d, flat, sub = depth, sp.Integer(0), {}
            for s in t.tiles:
                first, count = at[s]
                if count == 1:
                    sub[s] = first
                    continue
                j = sp.Symbol(f"{s}_j", integer=True, nonnegative=True)
                self.put(d, f"for (size_t {j} = 0; {j} < {count}; ++{j}) {{")
                d += 1
                flat, sub[s] = flat * count + j, first + j
            self.store(sub, f"s[{self.p.doprint(flat)}]", op, d, scoped=False)
            while d > depth:
                d -= 1
                self.put(d, "}")
        else:
            # One loop for all stores: GCC fully unrolls a short loop per accumulator before
            # vectorizing, and then leaves an epilogue with a condition (relu') scalar.
            first, _ = at[t.lane]
            points = [{**p, t.lane: first + c * lanes + l} for p, c in accs]
            posts = self.invariants(points, depth)
            self.put(depth, f"for (size_t {l} = 0; {l} < {lanes}; ++{l}) {{")
            for name, point, post in zip(names, points, posts):
                self.store(point, f"{name}[{l}]", op, depth + 1, scoped=len(names) > 1,
                           post=post)
            self.put(depth, "}")

    def outer_invariants(self) -> dict[sp.Expr, sp.Symbol]:
        """The epilogue's parts that read no index but those of the `outer` loops, each
        named (h0, h1 ...) for `write` to compute once where those loops have set them, and
        `self.post` the epilogue that reads the names. A depthwise convolution runs its
        channels outermost: its batch norm's g[c]/sqrtf(v[c] + eps) is then computed once
        per channel, not once per tile (at batch 1 that was half of DS-CNN's depthwise
        kernels' own time)."""
        self.post = self.k.post
        if self.post == ACC or not self.t.outer:
            return {}
        variant = {ACC, sp.Symbol(LANE, integer=True, nonnegative=True)} \
            | (set(self.extent) - set(self.t.outer))
        temps: dict[sp.Expr, sp.Symbol] = {}
        post = split_invariant(self.post, variant, temps)
        named = {part: sp.Symbol(f"h{k}", real=True) for k, part in enumerate(temps)}
        self.post = post.xreplace({u: named[part] for part, u in temps.items()})
        return named

    def invariants(self, points: list[dict], depth: int) -> list[sp.Expr]:
        """The epilogue at each of `points` (loop values, the lane index among them), its
        parts that do not vary along the lanes computed once here, before the lane loop
        (the C compiler does not hoist sqrtf out of it, nor a division)."""
        posts = [self.post.xreplace(at) for at in points]
        if all(p == ACC for p in posts):
            return posts
        temps: dict[sp.Expr, sp.Symbol] = {}
        variant = {ACC, sp.Symbol(LANE, integer=True, nonnegative=True)}
        posts = [split_invariant(p, variant, temps) for p in posts]
        for part, name in temps.items():
            self.put(depth, f"const {self.real} {name} = {self.p.doprint(prepare(part))};")
        return posts

    def store(self, at: dict, acc: str, op: str, depth: int, scoped: bool = True,
              post: sp.Expr | None = None) -> None:
        """out[at] op post(acc); `scoped` when other stores share the block (each declares
        its own `acc`, the name `post` reads). `post`: the epilogue at `at` already (its
        invariant parts hoisted by `invariants`)."""
        post = self.post.xreplace(at) if post is None else post
        target = self.p.doprint(self.out.xreplace(at))
        if post == ACC:
            self.put(depth, f"{target} {op} {acc};")
            return
        if scoped:
            self.put(depth, "{")
        d = depth + scoped
        self.put(d, f"const {self.real} acc = {acc};")
        (value,) = self.statements([post], d)
        self.put(d, f"{target} {op} {value};")
        if scoped:
            self.put(depth, "}")
