"""The kernel IR: what the ops lower to, what `derive` differentiates and `codegen` prints.

A `Program` is a list of `Kernel`s over named `Buffer`s. A kernel is one loop nest in index
notation:

    out[out_index] (= | ⊕=) post(REDUCE_{reduction loops} body)

where `body` and `post` are SymPy expressions whose array reads are `Indexed` accesses with
affine indices in the loop variables, or at an index read from an int32 array (an
embedding's `table[tokens[b, i], d]`), always under a guard that keeps it inside. Modes:

- ``assign``:     out[out_index] = body, once per loop point (maps, copies, movement);
- ``sum``:        out[out_index] = post(Σ_r body), loops not in out_index are reduced;
- ``max``:        out[out_index] = max_r body (a stable shift, never differentiated, or max
                  pooling, whose gradient goes through an ``argmax``);
- ``accumulate``: out[out_index] += body (the backward pass's scatter-accumulate);
- ``argmax``:     out[out_index] = the position (`Kernel.reduction_position`) where a ``max``
                  kernel's body first reaches its maximum, NaN counting as one (torch's max
                  pooling); derive adds it to route a max's gradient.

Every op, forward or backward, is one of these, so the derivation engine and the C emitter
each handle five cases, not one per op.

The train step's update (graphc/optim.py) is a program too, `in_place`: its ``assign``
kernels read and write the params, the state and their own output at the index they write.
Fusion runs such kernels over the same loops as one (`Kernel.also`: several stores per
loop point, in order).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable

import sympy as sp

from .dtypes import DTYPES, DType  # noqa: F401  (part of the IR contract)

BATCH = sp.Symbol("n", integer=True, positive=True)  # the runtime batch size
# The train step's count in a training program: which masks dropout draws (graphc/dropout.py).
# A kernel that reads it takes it as an argument, as it takes n.
STEP = sp.Symbol("step", integer=True, nonnegative=True)
ACC = sp.Symbol("acc", real=True)                    # the reduced value inside `post`
ASSIGN, SUM, MAX, ACCUMULATE, ARGMAX = MODES = ("assign", "sum", "max", "accumulate", "argmax")

# Buffer roles. The caller owns inputs, params, outputs, gradients and the optimizer's
# state (EXTERNAL); the work arena holds the rest: temporaries, and the batch-mean loss an
# entry point returns.
INPUT, PARAM, OUTPUT, GRAD, STATE, TEMP, LOSS = \
    "input", "param", "output", "grad", "state", "temp", "loss"
EXTERNAL = (INPUT, PARAM, OUTPUT, GRAD, STATE)
# graphc's own buffers start with "__", which no spec name can (graphc/names.py).
LOSS_MEAN = "__batch_loss"   # the batch-mean loss, a one-element buffer
# The update program (the optimizer step) sees the params and their gradients as the two
# flat blocks the caller holds, and each optimizer state slot as a buffer of its own.
PARAMS_BLOCK, GRADS_BLOCK = "__params", "__grads"
STEP_COUNT = "step"          # the state slot counting the steps taken, first in the state
UPDATE = "optimizer"         # the node an update kernel belongs to


def state_buffer(slot: str) -> str:
    """The update program's buffer for an optimizer state slot (`exp_avg`)."""
    return "__" + slot


def state_slot(buffer: str) -> str:
    return buffer[2:]

GRAD_SUFFIX = ".grad"

# Element types of a buffer: the model's floating type, or 32-bit integers (an input of
# indices: embedding rows, class indices). Integers are read, never written or
# differentiated.
REAL, INT32 = "real", "int32"


def grad_name(value: str) -> str:
    """The buffer holding d(loss)/d(value)."""
    return value + GRAD_SUFFIX


def grad_of(buffer: str) -> str | None:
    """The value whose gradient `buffer` holds, or None."""
    return buffer[:-len(GRAD_SUFFIX)] if buffer.endswith(GRAD_SUFFIX) else None


# ---------------------------------------------------------------- what the C computes

def param_layout(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """Each param's offset in the flat params block, in the order given (the Interface's:
    trainable params first), and the block's size."""
    offsets, off = {}, 0
    for p, shape in shapes.items():
        offsets[p] = off
        off += max(1, math.prod(shape))
    return offsets, off


@dataclass(frozen=True)
class Interface:
    """What a model's entry points read and write, from the graph: names and shapes in
    declaration order, and nothing of its formulas. The params' order is their layout:
    the trainable ones first (`trainable`, what the optimizer updates), then the others
    (running statistics), each group in declaration order."""
    name: str
    params: dict[str, tuple[int, ...]]
    inputs: dict[str, tuple[int, ...]]         # per-example shapes
    outputs: dict[str, tuple[int, ...]]
    loss: str | None
    # graph inputs each entry point reads ("forward", "evaluate", "gradients"): from the
    # graph's ancestry, not from what the C reads (a formula may cancel an input, and the
    # batch size must still come from it)
    reads: dict[str, tuple[str, ...]]
    optimizer: dict | None
    constant_fields: dict[str, str | None]     # node -> the spec field its constants are in
    trainable: tuple[str, ...]                 # the params the optimizer updates (a prefix)
    # inputs that hold int32 indices (embedding rows, class indices); the rest are real
    input_dtypes: dict[str, str] = field(default_factory=dict)
    index_bounds: dict[str, int] = field(default_factory=dict)   # int32 input -> indices < it
    # The optimizer state's slots that the train step reads as hyperparameters, each with
    # what it is (graphc/optim.py), and every slot a fresh state does not hold 0 in, with
    # its value (the hyperparameters' compiled values, NAdam's mu_product 1, ...).
    hyperparameters: dict[str, str] = field(default_factory=dict)
    state_start: dict[str, float] = field(default_factory=dict)
    # The optimizer's fields that shape its update, fixed at compile (flags, ...), by value.
    optimizer_fixed: dict = field(default_factory=dict)
    # The slots with one element per trainable param element (Adam's moments), by name:
    # a slot's size alone cannot tell them from the scalar ones when one element is trained.
    element_slots: tuple[str, ...] = ()




def index_range(index: sp.Expr, extents: dict) -> tuple[int, int]:
    """The least and greatest value of an affine index over the box of its loops."""
    index = sp.expand(index)
    low = high = int(index.subs({s: 0 for s in index.free_symbols}))
    for s in index.free_symbols:
        step, extent = int(index.coeff(s)), extents[s]
        if extent == BATCH:
            raise AssertionError(f"index {index} is bounded only by the batch size")
        low, high = low + min(0, step * (extent - 1)), high + max(0, step * (extent - 1))
    return low, high


def data_dependent(index: sp.Expr) -> bool:
    """Whether an index reads an array (an embedding's row, a class index): its range is
    the data's, not the loops'."""
    return isinstance(index, sp.Basic) and index.has(sp.Indexed)


def loop_symbols(expr: sp.Basic) -> set[sp.Symbol]:
    """The plain symbols of `expr` (loop indices, n): not the arrays an index reads, which
    SymPy's free_symbols also lists (`t[b]` and `t` for a read t[b])."""
    arrays = {a.base.label for a in expr.atoms(sp.Indexed)}
    return {s for s in expr.free_symbols if isinstance(s, sp.Symbol) and s not in arrays}


def range_guard(index, dims, extents: dict) -> sp.Basic:
    """The condition under which `index` lies inside an array of `dims`: one comparison per
    axis that the loops can take out of range (padding), `true` when none can. An index
    read from data (`data_dependent`) gets both comparisons, always: the C never reads
    outside an array whatever the indices hold. Built the same way for a padded read and
    for the scatter derived from it, so that the derived derivative's condition is
    recognised as the guard of the kernel it lands in."""
    index, dims = tuple(index), tuple(dims)
    used = set().union(*[sp.sympify(i).free_symbols for i in index])
    key = (index, dims, tuple(sorted(((s, e) for s, e in extents.items() if s in used),
                                     key=lambda se: str(se[0]))))
    if key not in _GUARDS:
        _GUARDS[key] = _range_guard(index, dims, extents)
    return _GUARDS[key]


# Guards by (index, dims, the extents of its loops): every padded read asks for its guard in
# lowering, derivation and padding, for each program, and building the Piecewise that
# rewrites it is slow (ResNet-8: 0.7 s of 5.6 in a profile). One small entry per padded
# read of the models a process compiles.
_GUARDS: dict = {}


def _range_guard(index, dims, extents: dict) -> sp.Basic:
    conds = []
    for i, d in zip(index, dims):
        if d == BATCH:
            continue
        if data_dependent(i):
            conds += [sp.Ge(i, 0), sp.Lt(i, d)]
            continue
        low, high = index_range(i, extents)
        if low < 0:
            conds.append(sp.Ge(i, 0))
        if high > d - 1:
            conds.append(sp.Lt(i, d))
    # As a Piecewise condition it is rewritten (i - 1 >= 0 becomes i >= 1); written so
    # here too, it is the same object in the read and in the derivative.
    return sp.Piecewise((1, sp.And(*conds)), (0, True)).args[0].cond if conds else sp.true


def array(name: str, dtype: str = "real") -> sp.IndexedBase:
    """The SymPy array a buffer's reads index. Its elements are real: otherwise SymPy asks,
    on every rebuild of tanh(tanh(x[i])), whether the argument is real by expanding its real
    and imaginary parts, which grows 3.4x per level of nesting. An int32 buffer's elements
    are integers (`t[b].is_integer`), so that they may index other arrays."""
    if dtype == INT32:
        return sp.IndexedBase(name, integer=True)
    return sp.IndexedBase(name, real=True)


def tree_size(expr: sp.Basic, limit: int) -> int:
    """Nodes of `expr` counted as a tree, a shared subexpression at each of its uses (what
    printing, `atoms` and `xreplace` walk), capped at `limit` + 1. A memo over the distinct
    subexpressions keeps it linear in those, however large the tree."""
    memo: dict[sp.Basic, int] = {}

    def size(e: sp.Basic) -> int:
        if e not in memo:
            memo[e] = min(limit + 1, 1 + sum(size(a) for a in e.args))
        return memo[e]

    return size(expr)


def index_symbols(count: int, start: int = 0) -> list[sp.Symbol]:
    return [sp.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(start, start + count)]


@dataclass(frozen=True)
class Buffer:
    """A named array. `shape` is per-example; a batched buffer has a leading batch axis."""
    name: str
    shape: tuple[int, ...]
    batched: bool
    role: str = TEMP            # one of the roles above
    differentiable: bool = True  # False for stable-shift values (stop-gradient)
    dtype: str = REAL           # REAL (the model's dtype) or INT32 (inputs of indices)

    @property
    def size(self) -> int:
        """Elements per example (batched) or in total (unbatched)."""
        return math.prod(self.shape)

    @property
    def base(self) -> sp.IndexedBase:
        return array(self.name, self.dtype)

    def strides(self) -> tuple[int, ...]:
        """Row-major strides of the full index (batch axis first when batched)."""
        dims = list(self.shape)
        out, acc = [], 1
        for d in reversed(dims):
            out.append(acc)
            acc *= d
        out.reverse()
        if not self.batched and not dims:
            return (1,)  # an unbatched scalar is indexed as [0]
        return ((acc,) if self.batched else ()) + tuple(out)

    def flat_offset(self, index: Iterable[sp.Expr]) -> sp.Expr:
        index = tuple(index)
        strides = self.strides()
        if len(index) != len(strides):
            raise AssertionError(f"{self.name}: index {index} does not fit rank {len(strides)}")
        return sp.Add(*[s * i for s, i in zip(strides, index)])


@dataclass(frozen=True)
class Store:
    """One more assignment in a kernel's loop body (`Kernel.also`): buffer[index] = value.
    A `local` store keeps its value in a variable of the loop body named `out` (a
    temporary only this kernel reads, such as the optimizer's decayed gradient d), which
    the later stores' values read as a symbol of that name."""
    out: str
    out_index: tuple[sp.Expr, ...]
    value: sp.Expr
    local: bool = False


@dataclass(frozen=True)
class Kernel:
    out: str
    out_index: tuple[sp.Expr, ...]
    loops: tuple[tuple[sp.Symbol, object], ...]  # (index symbol, extent: int or BATCH)
    body: sp.Expr
    mode: str = "assign"
    post: sp.Expr = ACC
    node: str = ""       # the graph node this kernel belongs to
    note: str = ""       # 'forward', or what the backward kernel computes
    # Loop points where the statement runs (accumulate only): a condition on loop indices,
    # for a scatter whose target index leaves the array (a padded convolution's dx), or on
    # the indices it reads (an embedding's dtable[tokens[b, i], d]: 0 <= tokens[b, i] < V).
    guard: sp.Basic = sp.true
    # Assignments run before (out, out_index, body) at each loop point, in order (assign
    # only; loop fusion of in-place updates, codegen/plan.py): a value reading a buffer
    # that an earlier store of the kernel writes sees the new value. A kernel reads a
    # buffer it writes only at the index it writes there (in place: the same loop point).
    also: tuple[Store, ...] = ()

    def stores(self) -> list[Store]:
        """Every assignment of the kernel in order, the last being (out, out_index, body)."""
        return [*self.also, Store(self.out, self.out_index, self.body)]

    def writes(self) -> list[str]:
        """The buffers the kernel writes, each once, in order."""
        return list(self._writes)

    def accesses(self) -> list[sp.Indexed]:
        """Distinct array reads, in a deterministic order: those of the body and the
        epilogue, and the indices that the guard and the written index read."""
        return list(self._accesses)

    def reads(self) -> list[str]:
        return list(self._reads)

    # Computed once per kernel: planning and emission ask for them many times.
    @functools.cached_property
    def _accesses(self) -> tuple[sp.Indexed, ...]:
        found = set(self.body.atoms(sp.Indexed)) | set(self.post.atoms(sp.Indexed))
        found |= set(sp.sympify(self.guard).atoms(sp.Indexed))
        for store in self.also:
            found |= set(store.value.atoms(sp.Indexed))
        for store in self.stores():
            for i in () if store.local else store.out_index:
                found |= set(sp.sympify(i).atoms(sp.Indexed))
        return tuple(sorted(found, key=sp.default_sort_key))

    @functools.cached_property
    def _writes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.out for s in self.stores() if not s.local))

    @functools.cached_property
    def _reads(self) -> tuple[str, ...]:
        return tuple(sorted({str(a.base.label) for a in self._accesses}))

    def uses_batch(self) -> bool:
        """Whether the kernel needs the batch size: a loop over it, or n in its formulas."""
        return any(e == BATCH for _, e in self.loops) or self.body.has(BATCH) \
            or self.post.has(BATCH) or any(s.value.has(BATCH) for s in self.also)

    def uses_step(self) -> bool:
        """Whether the kernel draws dropout masks: the train step's count in its formulas."""
        return self.body.has(STEP) or self.post.has(STEP) or any(s.value.has(STEP) for s in self.also)

    def reduction_loops(self) -> list[sp.Symbol]:
        used = set().union(*[e.free_symbols for e in self.out_index]) if self.out_index else set()
        return [s for s, _ in self.loops if s not in used]

    def reduction_position(self) -> sp.Expr:
        """The row-major position of a loop point within the reduction loops, in their
        declared order (the order an argmax scans in)."""
        extent, position, stride = dict(self.loops), sp.Integer(0), 1
        for s in reversed(self.reduction_loops()):
            position, stride = position + stride * s, stride * extent[s]
        return position

    def pretty(self) -> str:
        if self.also:
            return "; ".join((s.out if s.local else f"{s.out}[{', '.join(map(str, s.out_index))}]")
                             + f" = {s.value}" for s in self.stores())
        lhs = f"{self.out}[{', '.join(map(str, self.out_index))}]"
        red = self.reduction_loops()
        op = {"assign": "=", "accumulate": "+="}.get(self.mode, "=")
        if self.guard != sp.true:
            lhs = f"if {self.guard}: {lhs}"
        rhs = str(self.body)
        if self.mode in ("sum", "max", "argmax"):
            sym = {"sum": "Σ", "max": "max", "argmax": "argmax"}[self.mode]
            rhs = f"{sym}_{{{', '.join(map(str, red))}}} {rhs}"
            if self.post != ACC:
                # xreplace with a real symbol: subs, or an unknown symbol, makes SymPy
                # re-derive assumptions through every nested function of the epilogue
                rhs = str(self.post.xreplace({ACC: sp.Symbol(f"({rhs})", real=True)}))
        return f"{lhs} {op} {rhs}"


@dataclass
class Program:
    """Kernels in execution order over the buffers they name. After fusion, `origins[k]`
    lists the kernels of the program fusion started from that kernel k computes."""
    buffers: dict[str, Buffer]
    kernels: list[Kernel] = field(default_factory=list)
    origins: list[tuple[int, ...]] | None = None
    # Whether kernels update params and state in place (the optimizer step): there, a
    # param's gradient is the caller's input, and params and state are read, then written.
    in_place: bool = False

    def given(self) -> set[str]:
        """The buffers that hold values before the first kernel runs."""
        roles = (INPUT, PARAM, GRAD, STATE) if self.in_place else (INPUT, PARAM)
        return {b.name for b in self.buffers.values() if b.role in roles}

    def check(self) -> None:
        """Internal consistency; raises AssertionError naming the kernel at fault."""
        written = self.given()
        for k, kern in enumerate(self.kernels):
            where = f"kernel {k} ({kern.node}: {kern.note})"
            assert kern.mode in MODES, f"{where}: mode {kern.mode}"
            assert not kern.also or kern.mode == ASSIGN, f"{where}: stores after a {kern.mode}"
            for store in kern.stores():
                if store.local:
                    continue
                assert store.out in self.buffers, f"{where}: unknown output {store.out}"
                out = self.buffers[store.out]
                writable = (PARAM, GRAD, STATE, TEMP) if self.in_place else \
                    (OUTPUT, GRAD, TEMP, LOSS)
                assert out.role in writable, f"{where}: writes {out.role} {out.name}"
                assert len(store.out_index) == len(out.strides()), f"{where}: out rank"
                assert out.dtype == REAL, f"{where}: writes the {out.dtype} buffer {out.name}"
            # In place: a written buffer is read only where it is written (the old value).
            stored = {(s.out, tuple(s.out_index)) for s in kern.stores() if not s.local}
            for a in kern.accesses():
                name = str(a.base.label)
                assert name not in kern.writes() or (name, tuple(a.indices)) in stored, \
                    f"{where}: reads {a}, which it writes elsewhere"
            out = self.buffers[kern.out]
            loop_syms = [s for s, _ in kern.loops]
            assert len(set(loop_syms)) == len(loop_syms), f"{where}: repeated loop symbol"
            for a in kern.accesses():
                name = str(a.base.label)
                assert name in self.buffers, f"{where}: reads unknown buffer {name}"
                assert name in written, f"{where}: reads {name} before it is written"
                assert len(a.indices) == len(self.buffers[name].strides()), f"{where}: rank of {name}"
                assert set().union(*[loop_symbols(i) for i in a.indices]) <= set(loop_syms), \
                    f"{where}: {a} uses an index that is not a loop"
            if kern.mode == "accumulate":
                assert kern.out in written, f"{where}: accumulates into unwritten {kern.out}"
            if kern.guard != sp.true:
                assert kern.mode == "accumulate", f"{where}: a guard on a {kern.mode} kernel"
                assert loop_symbols(kern.guard) <= set(loop_syms), f"{where}: guard {kern.guard}"
                # A guard may read indices (the accesses above checked those reads), and
                # those are integers: no real value decides where a scatter writes.
                assert all(a.is_integer for a in kern.guard.atoms(sp.Indexed)), \
                    f"{where}: guard {kern.guard} reads a real array"
            if kern.mode == "assign" or kern.post != ACC:
                assert kern.mode in ("sum", "assign") and (kern.mode == "sum" or kern.post == ACC)
            written.update(kern.writes())

    def pretty(self) -> str:
        return "\n".join(k.pretty() for k in self.kernels)
