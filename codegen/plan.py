"""Memory planning and elementwise fusion over a kernel program.

`fuse` removes intermediate buffers the C never needs to store:
- a kernel that repeats an earlier one's computation is dropped for the earlier result;
- a pure map read by exactly one kernel, once per loop point, is inlined into its reader;
- a map that is the only reader of a reduction's result becomes that reduction's epilogue
  (bias + activation computed where the dot product is stored).

`plan` then lays out every buffer that is neither the caller's (inputs, params, outputs,
gradients) nor dead: each gets an arena offset such that buffers alive at the same time
never overlap. Batched buffers live in a region whose offsets are per-example and scale
with the batch size, so one plan serves every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from graphc.ir import (ACCUMULATE, ASSIGN, BATCH, EXTERNAL, LOSS, SUM, TEMP, Buffer, Kernel,
                       Program, Store, tree_size)

ALIGN = 16  # elements: 64-byte alignment for float32, 128 for float64 (cache lines, SIMD)
# Fusion stops when a kernel's expression would pass this many nodes (counted as a tree):
# past it, storing the value is cheaper than recomputing it, and SymPy's walks stay fast.
MAX_FUSED_SIZE = 600


class _Users:
    """Which kernels write and read each buffer, indexed once per program state: fusion
    asks for every kernel, and scanning the program each time made it quadratic
    (MobileNetV1's gradients: 2.4 s of 7)."""

    def __init__(self, prog: Program):
        self.writers: dict[str, list[int]] = {}
        self.readers: dict[str, list[int]] = {}
        for k, kern in enumerate(prog.kernels):
            for name in kern.writes():
                self.writers.setdefault(name, []).append(k)
            for name in kern.reads():
                self.readers.setdefault(name, []).append(k)


def _is_plain_map(kern: Kernel, buf: Buffer) -> bool:
    syms = tuple(s for s, _ in kern.loops)
    dims = ((BATCH,) if buf.batched else ()) + buf.shape
    return (kern.mode == ASSIGN and kern.out_index == syms
            and tuple(e for _, e in kern.loops) == dims)


def _sole_reader(prog: Program, p: int, users: _Users) -> int | None:
    """The one kernel reading kernel p's output, if p alone writes that internal buffer."""
    out = prog.kernels[p].out
    if prog.buffers[out].role in EXTERNAL + (LOSS,) or len(users.writers.get(out, ())) != 1:
        return None
    readers = users.readers.get(out, ())
    return readers[0] if len(readers) == 1 else None


def _is_scalar(kern: Kernel) -> bool:
    return not kern.loops and not kern.also and kern.mode == ASSIGN


def _try_inline(prog: Program, p: int, users: _Users) -> bool:
    """Inline map kernel p into its only reader (a scalar into a scalar: the optimizer's
    per-step numbers)."""
    P = prog.kernels[p]
    c = _sole_reader(prog, p, users)
    if c is None or P.also:
        return False
    C = prog.kernels[c]
    scalar = _is_scalar(P) and _is_scalar(C)
    # In an update, a formula stays as the optimizer declares it (torch's order of
    # operations): inlined, SymPy would distribute lr over `g + weight_decay*p`.
    if not scalar and (prog.in_place or not _is_plain_map(P, prog.buffers[P.out])):
        return False
    reads = [a for a in C.accesses() if str(a.base.label) == P.out]
    if len(reads) != 1:
        return False
    (a,) = reads
    in_post = C.post.has(a)
    loops = {s for s, _ in C.loops} - (set(C.reduction_loops()) if in_post else set())
    if not scalar and (set(a.indices) != loops or len(set(a.indices)) != len(a.indices)):
        return False  # the reader would recompute the map for other loop points
    if any(set(prog.kernels[k].writes()) & set(P.reads()) for k in range(p + 1, c)):
        return False
    value = P.body.xreplace(dict(zip((s for s, _ in P.loops), a.indices)))
    body, post = C.body.xreplace({a: value}), C.post.xreplace({a: value})
    if tree_size(body, MAX_FUSED_SIZE) + tree_size(post, MAX_FUSED_SIZE) > MAX_FUSED_SIZE:
        return False   # `h * sigmoid(h)` nodes in a chain would double the body at each one
    prog.kernels[c] = replace(C, body=body, post=post, note=f"{C.note}, {P.node} inlined")
    prog.origins[c] = tuple(sorted(prog.origins[c] + prog.origins[p]))
    del prog.kernels[p], prog.origins[p]
    return True


def _try_epilogue(prog: Program, p: int, users: _Users) -> bool:
    """Fold the only reader of reduction p (a map over p's output) into p's `post`."""
    P = prog.kernels[p]
    c = _sole_reader(prog, p, users)
    if c is None or P.mode != SUM:
        return False
    C = prog.kernels[c]
    out_loops = [(s, e) for s, e in P.loops if s not in P.reduction_loops()]
    # The reader must visit exactly the reduction's output points: same count and extents
    # (a concat's slice `a.grad = c.grad[:, :5]` reads only part of an 8-wide c.grad).
    if C.mode != ASSIGN or not _is_plain_map(C, prog.buffers[C.out]) \
            or [e for _, e in C.loops] != [e for _, e in out_loops] \
            or len(users.writers.get(C.out, ())) != 1:
        return False
    out_loops = [s for s, _ in out_loops]
    if any(set(prog.kernels[k].writes()) & set(C.reads()) for k in range(p + 1, c)):
        return False
    # Rename the reader's loops to the reduction's output loops, then check the read.
    to_p = dict(zip((s for s, _ in C.loops), out_loops))
    body = C.body.xreplace(to_p)
    mine = P.out_index
    if any(str(a.base.label) == P.out and tuple(a.indices) != mine
           for a in body.atoms(sp.Indexed)):
        return False
    if any(not sp.Tuple(*a.indices).free_symbols <= set(out_loops)
           for a in body.atoms(sp.Indexed) if str(a.base.label) != P.out):
        return False
    out_index = tuple(sp.sympify(i).xreplace(to_p) for i in C.out_index)
    post = body.xreplace({prog.buffers[P.out].base[mine]: P.post})
    if tree_size(post, MAX_FUSED_SIZE) > MAX_FUSED_SIZE:
        return False
    prog.kernels[p] = Kernel(C.out, out_index, P.loops, P.body, SUM, post, C.node,
                             f"{P.node} with {C.node} as epilogue")
    prog.origins[p] = tuple(sorted(prog.origins[p] + prog.origins[c]))
    del prog.kernels[c], prog.origins[c]
    return True


def _drop_repeats(prog: Program) -> None:
    """A kernel that computes what an earlier one already stored (a softmax output and the
    cross-entropy loss on the same logits both take their max and sum of exponentials) is
    dropped, and its readers read the earlier buffer. Only when neither output is the
    caller's and every buffer both read is written once, so both saw the same values."""
    writers: dict[str, int] = {}
    for kern in prog.kernels:
        for w in kern.writes():
            writers[w] = writers.get(w, 0) + 1
    stored: dict[tuple, int] = {}   # what a kernel computes -> its position in `kept`
    renamed: dict[sp.IndexedBase, sp.IndexedBase] = {}
    kept, origins = [], []
    for kern, origin in zip(prog.kernels, prog.origins):
        if renamed:
            kern = replace(kern, body=kern.body.xreplace(renamed),
                           post=kern.post.xreplace(renamed))
        buf = prog.buffers[kern.out]
        once = buf.role not in EXTERNAL + (LOSS,) and writers[kern.out] == 1 and not kern.also \
            and kern.mode != ACCUMULATE and all(writers.get(r, 0) <= 1 for r in kern.reads())
        what = (kern.out_index, kern.loops, kern.body, kern.mode, kern.post, buf.shape,
                buf.batched)
        if once and what in stored:
            first = stored[what]
            renamed[buf.base] = prog.buffers[kept[first].out].base
            origins[first] += origin
            continue
        if once:
            stored[what] = len(kept)
        kept.append(kern)
        origins.append(origin)
    prog.kernels, prog.origins = kept, origins


def _try_siblings(prog: Program, p: int) -> bool:
    """In an in-place program (the optimizer step), run kernel p + 1 in kernel p's loop:
    both assignments over the same loops, so that an optimizer touches each param once per
    step (Adam's exp_avg, exp_avg_sq and param). The stores run in their kernels' order at
    each loop point, so the fused loop computes what the two loops did as long as each
    kernel reads what the other writes only at the index written: the same loop point,
    where p's store comes first, as before."""
    if not prog.in_place or p + 1 >= len(prog.kernels):
        return False
    P, C = prog.kernels[p], prog.kernels[p + 1]
    if P.mode != ASSIGN or C.mode != ASSIGN or [e for _, e in P.loops] != [e for _, e in C.loops]:
        return False
    rename = dict(zip((s for s, _ in C.loops), (s for s, _ in P.loops)))
    stores = [Store(s.out, tuple(sp.sympify(i).xreplace(rename) for i in s.out_index),
                    s.value.xreplace(rename)) for s in C.stores()]
    mine = {(s.out, tuple(s.out_index)) for s in P.stores()}
    theirs = {(s.out, tuple(s.out_index)) for s in stores}
    if {o for o, _ in mine} & {o for o, _ in theirs}:
        return False   # two kernels writing one buffer: their order across points matters
    for reader, written in ((P.accesses(), theirs),
                            ([a for s in stores for a in s.value.atoms(sp.Indexed)], mine)):
        for a in reader:
            name = str(a.base.label)
            if name in {o for o, _ in written} and (name, tuple(a.indices)) not in written:
                return False
    *before, last = stores
    prog.kernels[p] = replace(P, out=last.out, out_index=last.out_index, body=last.value,
                              also=tuple(P.stores() + before))
    prog.origins[p] = tuple(sorted(prog.origins[p] + prog.origins[p + 1]))
    del prog.kernels[p + 1], prog.origins[p + 1]
    return True


def _keep_local(prog: Program) -> None:
    """A store to a temporary that only its own kernel reads (the decayed gradient d of an
    optimizer step, fused with its readers) becomes a variable of the loop body."""
    for k, kern in enumerate(prog.kernels):
        if not kern.also:
            continue
        others = {b for j, o in enumerate(prog.kernels) if j != k for b in o.reads() + o.writes()}
        stores, named = [], {}
        every = kern.stores()
        for at, s in enumerate(every):
            value = s.value.xreplace(named)
            if at < len(every) - 1 and prog.buffers[s.out].role == TEMP \
                    and s.out not in others \
                    and sum(t.out == s.out for t in every) == 1:
                name = sp.Symbol(s.out.strip("_"), real=True)
                named[prog.buffers[s.out].base[s.out_index]] = name
                stores.append(Store(str(name), (), value, local=True))
            else:
                stores.append(replace(s, value=value))
        *before, last = stores   # the last store is the caller's or read elsewhere
        prog.kernels[k] = replace(kern, body=last.value, also=tuple(before))


def fuse(prog: Program) -> Program:
    out = Program(dict(prog.buffers), list(prog.kernels), [(k,) for k in range(len(prog.kernels))],
                  prog.in_place)
    _drop_repeats(out)
    k, users = 0, _Users(out)
    while k < len(out.kernels):
        if _try_inline(out, k, users) or _try_epilogue(out, k, users):
            k, users = 0, _Users(out)  # a merge can enable another anywhere before it
        else:
            k += 1
    k = 0   # then loops over the same points, once no store is left to inline
    while k < len(out.kernels):
        if not _try_siblings(out, k):
            k += 1
    _keep_local(out)
    used = {w for k in out.kernels for w in k.writes()} | {r for k in out.kernels for r in k.reads()}
    out.buffers = {n: b for n, b in out.buffers.items() if n in used or b.role in EXTERNAL}
    out.check()
    return out


@dataclass(frozen=True)
class Placement:
    batched: bool
    offset: int   # elements; per example when batched
    size: int     # elements; per example when batched
    first: int    # kernel index of the first write
    last: int     # kernel index of the last use


@dataclass(frozen=True)
class MemoryPlan:
    places: dict[str, Placement]
    fixed: int          # elements of the unbatched region
    per_example: int    # elements per example of the batched region
    fixed_no_reuse: int
    per_example_no_reuse: int

    def elements(self, n: int) -> int:
        return self.fixed + self.per_example * n

    def pointer_offset(self, name: str) -> tuple[int, int]:
        """(constant, per-example) parts of the buffer's offset in the work arena."""
        p = self.places[name]
        return (self.fixed, p.offset) if p.batched else (p.offset, 0)

    def no_reuse(self, n: int) -> int:
        return self.fixed_no_reuse + self.per_example_no_reuse * n

    def live_peak(self, n: int) -> int:
        """Elements live at once at the busiest kernel: the lower bound of any arena for
        this program order (the plan adds alignment and first-fit gaps on top)."""
        if not self.places:
            return 0
        end = max(p.last for p in self.places.values())
        return max(sum(p.size * (n if p.batched else 1) for p in self.places.values()
                       if p.first <= k <= p.last) for k in range(end + 1))


def round_up(x: int, align: int) -> int:
    return -(-x // align) * align


def plan(prog: Program, align: int = ALIGN) -> MemoryPlan:
    """Arena offsets by first fit over liveness intervals, each buffer starting at a
    multiple of `align` elements (per example in the batched region, so a per-example
    scalar takes `align` elements per example: targets without caches use 1)."""
    live: dict[str, list[int]] = {}
    for k, kern in enumerate(prog.kernels):
        for name in kern.writes() + kern.reads():
            if prog.buffers[name].role not in EXTERNAL:
                span = live.setdefault(name, [k, k])
                span[1] = k
    for name, b in prog.buffers.items():
        if b.role == LOSS and name in live:
            live[name][1] = len(prog.kernels)  # read by the entry point's return, after all kernels
    places: dict[str, Placement] = {}
    totals = {True: 0, False: 0}
    no_reuse = {True: 0, False: 0}
    size = {n: max(1, prog.buffers[n].size) for n in live}
    # First fit in two orders, keeping the smaller arena (the first on a tie): by first use
    # (big buffers first among those born at one kernel), and largest first (by first use
    # among equals). First use alone left MobileNetV1's forward arena 33 % above the
    # liveness bound, and the digits CNN's train step 8 %; either order meets it there.
    orders = (lambda n: (live[n][0], -size[n], n), lambda n: (-size[n], live[n][0], n))
    for batched in (False, True):
        names = [n for n in live if prog.buffers[n].batched == batched]
        best = min((_first_fit(sorted(names, key=key), size, live, align) for key in orders),
                   key=lambda fit: fit[1])
        for name, offset in best[0].items():
            places[name] = Placement(batched, offset, size[name], *live[name])
        totals[batched] = best[1]
        no_reuse[batched] = sum(round_up(size[n], align) for n in names)
    return MemoryPlan(places, totals[False], totals[True], no_reuse[False], no_reuse[True])


def _first_fit(names: list[str], size: dict[str, int], live: dict[str, list[int]],
               align: int) -> tuple[dict[str, int], int]:
    """Offsets placing each buffer in `names` order at the lowest offset (a multiple of
    `align`) clear of every placed buffer live at the same time; and the arena's size."""
    placed: list[tuple[int, int, int, int]] = []   # offset, size, first, last
    offsets: dict[str, int] = {}
    total = 0
    for name in names:
        (first, last), n = live[name], size[name]
        clashes = sorted((o, o + round_up(s, align)) for o, s, f, l in placed
                         if not (l < first or last < f))
        offset = 0
        for lo, hi in clashes:
            if offset + n <= lo:
                break
            offset = max(offset, hi)
        placed.append((offset, n, first, last))
        offsets[name] = offset
        total = max(total, round_up(offset + n, align))
    return offsets, total
