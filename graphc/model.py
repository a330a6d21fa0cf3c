"""`graphc.compile` and the CompiledModel: NumPy arrays in, generated C, NumPy arrays out."""

from __future__ import annotations

import functools
import os
import sys
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np

from .dtypes import DTYPES
from .errors import InputError, SpecError
from .graph import Graph
from .indices import index_array
from .init import start_params
from .npz import MAX_ITEM_BYTES, MAX_NPZ_MEMBER_BYTES, NPY_HEADER_BYTES, NpzReader

# The largest batch static memory may be planned for (`max_batch`): far beyond any real
# batch, and small enough that every header size stays a plain integer constant.
MAX_BATCH = 1 << 24


def as_graph(graph) -> Graph:
    """A Graph from a Graph, a spec dict, or a spec file path."""
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, dict):
        return Graph.from_spec(graph)
    if isinstance(graph, (str, os.PathLike)):
        from .spec import load
        return load(graph)
    raise TypeError(f"expected a Graph, a spec dict or a spec path, got {type(graph).__name__}")


def check_seed(seed) -> int:
    """`seed` if it is a non-negative integer (NumPy's generators refuse negative ones with
    a ValueError that would surface as a traceback); else an InputError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_dtype(dtype) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise SpecError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    return name


def batch_arrays(names, shapes: Mapping[str, tuple], given: Mapping, dtype, known: set[str],
                 indices: Mapping | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Check and convert the arrays an entry point needs; returns them and the batch size.

    `indices` maps each int32 input to its IndexBound (or None): those are checked and
    converted by `index_array`, the rest to `dtype`. Names of other graph inputs are
    accepted and ignored, so one dict of data serves forward, gradients and verify alike."""
    indices = indices or {}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InputError(f"unknown input '{unknown[0]}' (this model's inputs: {', '.join(sorted(known))})")
    out, n = {}, None
    for name in names:
        if name not in given:
            raise InputError(f"missing input '{name}' (needed here: {', '.join(names)})")
        value = given[name]
        try:
            arr = np.asarray(value)
        except Exception as e:  # ragged lists and the like
            raise InputError(f"input '{name}' is not an array: {e}") from None
        if arr.dtype.kind not in "fiub":
            what = "takes int32 indices" if name in indices else "must hold real numbers"
            raise InputError(f"input '{name}' {what}, got dtype {arr.dtype}")
        want = shapes[name]
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != tuple(want):
            raise InputError(f"input '{name}' must have shape (n, {', '.join(map(str, want))})"
                             .replace(", )", ")") + f" with a leading batch axis, got {arr.shape}")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise InputError(f"input '{name}' has batch size {arr.shape[0]}, but "
                             f"'{names[0]}' has {n}")
        out[name] = index_array(name, arr, indices[name]) if name in indices \
            else np.require(arr, dtype, ("C", "A"))   # C reads it as dtype: aligned to one
    if n == 0:
        raise InputError("the batch is empty (leading axis of size 0)")
    return out, n or 0


# The generated C places every arena buffer at a multiple of 64 bytes from the work array's
# start (codegen/plan.py) and the params likewise: only a 64-byte aligned base makes those
# real cache-line and SIMD alignments. numpy guarantees 16 bytes, and a 64-byte vector load
# that straddles two cache lines costs the W4 forward a fifth of its time.
ALIGN_BYTES = 64
# Inputs this large are copied to an aligned buffer when they are not aligned (_aligned).
STAGE_BYTES = 4096
# A model called with ever new batch sizes forgets all its per-shape call plans when it
# holds this many (each is remade on the next call of its shape).
MAX_CALL_SHAPES = 64
# A call from Python whose kernels run fewer loop iterations than this (CModule.work) keeps
# the GIL in C (codegen/fastcall.c): a microsecond or two of C (W2's forward at batch 1 is
# 2,368 iterations and 0.23 µs; W1's train step 7,602 and 1.9 µs), where handing the GIL over
# and back costs 0.18 µs and no other thread could do much with it (Python hands it between
# threads every 5 ms). numpy keeps it likewise for loops of under 500 elements.
GIL_ITERATIONS = 8192


def aligned_zeros(size: int, dtype) -> np.ndarray:
    """A zeroed 1-D array whose data starts on an ALIGN_BYTES boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(size * dtype.itemsize + ALIGN_BYTES, np.uint8)
    skip = -raw.ctypes.data % ALIGN_BYTES
    return raw[skip:skip + size * dtype.itemsize].view(dtype)


class _ParamStore:
    """Params as views into one flat array, the layout the generated C expects."""

    def __init__(self, graph: Graph, offsets: dict[str, int], size: int, dtype):
        self.graph, self.offsets, self.dtype = graph, offsets, np.dtype(dtype)
        self.flat = aligned_zeros(size, self.dtype)

    def view(self, flat: np.ndarray, name: str) -> np.ndarray:
        shape = self.graph.values[name].shape   # `params` builds a dict per call
        off = self.offsets[name]
        return flat[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def set(self, params: Mapping[str, np.ndarray]) -> None:
        staged, known = {}, self.graph.params
        for name, value in params.items():
            if name not in known:
                raise InputError(f"unknown param '{name}' (params: {', '.join(known)})")
            arr = np.asarray(value)
            if arr.dtype.kind not in "fiub":
                raise InputError(f"param '{name}' must hold real numbers, got dtype {arr.dtype}")
            want = known[name].shape
            if arr.shape != want:
                raise InputError(f"param '{name}' must have shape {want}, got {arr.shape}")
            staged[name] = arr
        for name, arr in staged.items():  # all checked first: nothing is changed half-way
            self.view(self.flat, name)[...] = arr

    def get(self, flat: np.ndarray | None = None, names=None) -> dict[str, np.ndarray]:
        """Copies of the params (or of `names`) in `flat`'s layout (the params', the
        gradients', an optimizer slot's: the trainable params are the front of each)."""
        flat = self.flat if flat is None else flat
        return {p: self.view(flat, p).copy() for p in (self.graph.params if names is None
                                                       else names)}


class BoundCall(functools.partial):
    """One entry point of a compiled model with its arrays fixed: calling it runs the C on
    the current contents of `inputs` and writes `outputs` in place (the same arrays every
    call), returning the batch-mean loss, or None for `forward` and `predict`.

    For a loop that refills the same buffers (a controller, an environment's policy, a
    training loop over a staged batch) it costs one cffi call, about 0.1 µs above the C:
    no kwargs, checks or allocations per call. A partial object, so the call stays in C;
    a batch big enough for a parallel region, under the default `threads=None`, goes
    through the Python function that times one thread against all (about 0.5 µs).

    It takes no lock: it has its own work arena, so it may run beside the model's own calls
    and other bound calls, except while the params change (a train step, `set_params`);
    and one bound call must not run in two threads at once (its outputs are shared)."""

    kind: str
    batch: int
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    def __repr__(self) -> str:
        return (f"<BoundCall {self.kind} batch={self.batch} inputs={list(self.inputs)} "
                f"outputs={list(self.outputs)}>")


# The entry points a model runs on fresh arrays or binds, and what the error says a model
# without one cannot do.
_VERBS = {"forward": "run forward", "evaluate": "evaluate", "train_step": "train",
          "predict": "predict"}
# What a bound call passes to each entry before `n` and the input and output pointers.
_BOUND_LEAD = {"forward": ("params", "work"), "evaluate": ("params", "work"),
               "train_step": ("params", "state", "work"), "predict": ("work",)}
# What each of those methods returns of its call's (loss, outputs): their plain calls are
# made in C (codegen/fastcall.py install_methods), which must return the same.
_FAST_RETURNS = {"forward": "outputs", "predict": "outputs", "evaluate": "both",
                 "train_step": "loss"}


class CompiledModel:
    """A graph compiled to C and loaded. Params live in one flat array owned by the model."""

    def __init__(self, graph: Graph, cmodule, built, *, seed: int = 0, threads: int | None = None):
        self.graph, self.cmodule, self.built = graph, cmodule, built
        self.dtype = np.dtype(cmodule.dtype)
        self.name = graph.name
        self._ffi, self._lib = built.ffi, built.lib
        self._ctype = "float *" if cmodule.dtype == "float32" else "double *"
        self._params = _ParamStore(graph, cmodule.param_offsets, cmodule.params_size, self.dtype)
        self._grads = aligned_zeros(cmodule.params_size, self.dtype)
        self._state = aligned_zeros(cmodule.state_size, self.dtype)
        self._optimizer = None
        self._work = aligned_zeros(0, self.dtype)
        self._work_batch = 0          # the largest batch the current work array serves
        # Model-owned arrays never move (updates are in place), so their C pointers are made
        # once: a numpy-to-cffi conversion costs more than the whole call of a small model.
        buffer = self._ffi.from_buffer
        self._c_params = buffer(self._ctype, self._params.flat)
        self._c_grads = buffer(self._ctype, self._grads)
        self._c_state = buffer(self._ctype, self._state)
        self._c_work = buffer(self._ctype, self._work)
        self._known = frozenset(graph.inputs)
        # int32 inputs -> what bounds their values (checked before any C runs)
        bounds = graph.index_bounds()
        self._indices = {i: bounds.get(i) for i in cmodule.input_dtypes}
        self._stages: dict[str, np.ndarray] = {}   # input -> aligned copy (_aligned)
        # cffi releases the GIL during a C call, and every call shares the work arena (and
        # a train step the params): two threads at once got 353 of 400 forwards wrong. One
        # lock per model serializes them (codegen/fastcall.py's, which the C call of forward
        # takes without calling into Python).
        from codegen.fastcall import install_methods, new_lock
        self._lock = new_lock()
        install_methods(CompiledModel, _FAST_RETURNS)
        self._threads = self._check_threads(threads)
        self._calls = {kind: self._c_function(e.c_name) for kind, e in cmodule.entries.items()}
        # kind -> {input shapes (one input's: its shape): (n, output shapes, work pointer,
        # C call)}: what a call of those shapes needs, so that it checks them with one dict
        # lookup (_runner); forgotten when the work arena moves
        self._sizes: dict[str, dict] = {kind: {} for kind in cmodule.entries}
        # kind -> its call (_runner), or what raises the reason the model has none; they
        # see the model through a weak proxy, so that the model is not a reference cycle
        # (freed, arenas and all, as soon as it is dropped)
        model = weakref.proxy(self)
        self._fast_calls = {}   # kind -> its C caller (_runner), told of every new work arena
        pointer = {"params": self._c_params, "state": self._c_state}
        self._runs = {kind: self._runner(model, kind, tuple(pointer[p] for p in lead[:-1]))
                      if kind in cmodule.entries else functools.partial(self._no_entry, model, kind)
                      for kind, lead in _BOUND_LEAD.items()}
        if cmodule.optimizer is not None and "train_step" in cmodule.entries:
            from .optim import LiveOptimizer
            getattr(self._lib, f"{cmodule.name}_init_state")(self._c_state)
            self._optimizer = LiveOptimizer(cmodule.optimizer, self._state,
                                            cmodule.state_offsets, self._lock)
        self.init_params(seed)

    def _check_threads(self, threads) -> int | None:
        from codegen.openmp import check_threads
        threads = check_threads(threads)
        if threads not in (None, 1) and not hasattr(self._lib, "omp_set_num_threads"):
            raise InputError(f"threads={threads}: model '{self.name}' was built without OpenMP "
                             f"(target '{self.cmodule.target}'), so it runs on one thread")
        return threads

    def _c_function(self, c_name: str, batch: int | None = None):
        """The entry point, run on the model's thread count if it has one, else on one
        thread or all, whichever is lately faster (codegen/openmp.py); the C function
        itself when it runs no parallel region (at `batch`, if the batch is known)."""
        fn = getattr(self._lib, c_name)
        if not hasattr(self._lib, "omp_set_num_threads"):
            return fn
        from codegen.openmp import FasterOfOneOrAll, OnThreads
        if self._threads is not None:
            return OnThreads(self._lib, fn, self._threads)
        kind = next(k for k, e in self.cmodule.entries.items() if e.c_name == c_name)
        start = self.cmodule.parallel_from.get(kind)
        if start is None or (batch is not None and batch < start):
            return fn
        n_at = 3 if kind == "gradients" else len(_BOUND_LEAD[kind])   # (params, grads, work, n)
        return FasterOfOneOrAll(self._lib, fn, n_at, start).entry

    @property
    def threads(self) -> int | None:
        """The OpenMP threads each call runs on (None: one or all, whichever is lately
        faster; `graphc.compile`), fixed at `graphc.compile(..., threads=)`: the bound calls
        made so far hold it."""
        return self._threads

    @property
    def optimizer(self):
        """The optimizer of the C `train_step` (torch.optim's semantics), None without one:
        a mapping like the spec's section, live over the optimizer state. Its
        hyperparameters (lr, weight_decay, betas, ...: those a schedule would change) read
        as the next step will use them, and `model.optimizer["lr"] = 0.01` takes effect at
        the next step; fields that shape the update (nesterov, amsgrad, momentum zero or
        not, ...) are fixed at compile, and assigning another value raises a SpecError."""
        return self._optimizer

    def set_lr(self, lr: float) -> None:
        """The learning rate from the next train step on (torch's `param_group["lr"] = lr`)."""
        self._entry("train_step", "train")   # raises the reason when there is no optimizer
        self._optimizer["lr"] = lr

    # ------------------------------------------------------------ params
    def init_params(self, seed: int = 0) -> None:
        """Draw every param from its initializer with a seeded generator (a param the
        graph holds a value for, as an imported model's weights, starts from it)."""
        drawn = start_params(self.graph, check_seed(seed))
        with self._lock:
            self._params.set(drawn)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            self._params.set(params)

    def get_params(self) -> dict[str, np.ndarray]:
        with self._lock:
            return self._params.get()

    def save_params(self, path: str | os.PathLike) -> None:
        """Write the params to an .npz file, one array per param, in the model's dtype."""
        save_params(self.get_params(), path)

    def load_params(self, path: str | os.PathLike) -> None:
        """Read params saved by `save_params`; every param must be there, with its shape."""
        self.set_params(load_params(path, self.graph))

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write the model to one file to resume from (graphc/checkpoint.py): the spec, the
        params, the optimizer state slot by slot (the step count, which also draws the
        dropout masks, moments and whatever else the optimizer keeps). Written whole or not
        at all; `graphc.load_model(path)` continues training bit for bit."""
        from .checkpoint import write_checkpoint
        write_checkpoint(self._checkpoint(), path)

    def _checkpoint(self) -> bytes:
        from .checkpoint import checkpoint_bytes, header_text, state_slots
        header = header_text(self)
        with self._lock:   # params and state of one moment, between two steps
            params = self._params.get()
            state = {slot: self._state[at:at + size].copy()
                     for slot, (at, size) in state_slots(self.cmodule).items()}
        initial = {p: np.asarray(v, np.float64) for p, v in self.graph.initial.items()}
        return checkpoint_bytes(header, params, state, initial)

    def _restore(self, params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> None:
        """Params and state slots as a checkpoint holds them (checked by its reader)."""
        from .checkpoint import state_slots
        with self._lock:
            self._params.set(params)
            for slot, (at, size) in state_slots(self.cmodule).items():
                self._state[at:at + size] = state[slot]

    def __reduce__(self):
        # A cffi library cannot be pickled; the checkpoint's bytes rebuild the model (from
        # the build cache when warm), with its params and optimizer state.
        return _from_pickle, (self._checkpoint(), self._threads)

    # ------------------------------------------------------------ calls
    def _work_for(self, n: int):
        """The work arena's C pointer for a call of batch `n`, grown first if need be;
        under the model's lock."""
        if n > self._work_batch:
            need = self.cmodule.work_elements(n)
            if self._work.size < need:
                self._work = aligned_zeros(need, self.dtype)
                self._c_work = self._ffi.from_buffer(self._ctype, self._work)
                for sizes in self._sizes.values():
                    sizes.clear()
            self._work_batch = n
            for fast in self._fast_calls.values():
                fast.set_work(self._work, n)
        return self._c_work

    # Small models spend most of a call from Python here (W2's forward: 0.7 µs of C), so
    # the common case (the entry's inputs exactly, as C-contiguous arrays of the model's
    # dtype, small enough to need no staging) is checked with a few identity compares and
    # one dict lookup; all the rest goes through _prepare, which converts or says why.
    @staticmethod
    def _runner(model, kind: str, lead: tuple):
        """The call of entry `kind` of `model` (a weak proxy) after the leading pointers
        `lead` (params, state: never moved), as a function of the dict of given inputs:
        (C result, outputs)."""
        cmodule, dtype, lock = model.cmodule, model.dtype, model._lock
        entry = cmodule.entries[kind]
        call = functools.partial(model._calls[kind], *lead)
        # Under the default threads, batches below the first parallel region gain nothing
        # from the timing wrapper (FasterOfOneOrAll): their plans call the C function.
        timed = hasattr(model._calls[kind], "controller")
        direct = functools.partial(getattr(model._lib, entry.c_name), *lead) if timed else call
        team_from = cmodule.parallel_from.get(kind, 0) if timed else 0
        buffer, ctype, empty, ndarray = model._ffi.from_buffer, model._ctype, np.empty, np.ndarray
        acquire, release, sizes = lock.acquire, lock.release, model._sizes[kind]
        # the dtype an array must have to go to C as it is: None for int32 inputs, whose
        # values are always checked (batch_arrays)
        wants = tuple((i, None if i in cmodule.input_dtypes else dtype) for i in entry.inputs)
        per_example = [tuple(cmodule.input_shapes[i]) for i in entry.inputs]
        outputs = [(o, tuple(cmodule.output_shapes[o])) for o in entry.outputs]

        def slow(given):
            with lock:
                n, ptrs, outs = model._prepare(kind, given)
                return call(model._work_for(n), n, *ptrs), outs

        def sized(shapes: tuple, key):
            """(n, output shapes, work pointer, call) for inputs of `shapes` that go to C as
            they are, remembered as `key`; None when the slow path must convert or refuse
            them."""
            n = None
            for shape, want in zip(shapes, per_example):
                if len(shape) != len(want) + 1 or shape[1:] != want or shape[0] < 1 \
                        or shape[0] != (n or shape[0]) \
                        or _size(shape) * dtype.itemsize >= STAGE_BYTES:
                    return None
                n = shape[0]
            if n is None:
                return None
            if len(sizes) >= MAX_CALL_SHAPES:
                sizes.clear()
            # A call holding a plan whose arena has moved since (_work_for forgets them)
            # still passes a live arena large enough: the pointer keeps it alive.
            with lock:
                plan = sizes[key] = (n, tuple((n, *shape) for _, shape in outputs),
                                     model._work_for(n), direct if n < team_from else call)
            return plan

        def run_one(given):   # one input, one output: a forward or predict
            if len(given) == 1:
                a = given.get(name)
                if type(a) is ndarray and a.dtype is want and a.flags.aligned:
                    plan = sizes.get(a.shape) or sized((a.shape,), a.shape)
                    if plan is not None:
                        n, (shape,), work, run_c = plan
                        try:   # cffi refuses an array that is not C-contiguous
                            pa = buffer(ctype, a)
                        except ValueError:
                            return slow(given)
                        out = empty(shape, dtype)
                        po = buffer(ctype, out)
                        acquire()
                        try:
                            result = run_c(work, n, pa, po)
                        finally:
                            release()
                        return result, {output: out}
            return slow(given)

        def run(given):
            if len(given) == len(wants):
                arrays, shapes = [], ()
                for i, want in wants:
                    a = given.get(i)
                    if type(a) is not ndarray or a.dtype is not want or not a.flags.aligned:
                        return slow(given)
                    arrays.append(a)
                    shapes += (a.shape,)
                plan = sizes.get(shapes) or sized(shapes, shapes)
                if plan is not None:
                    n, out_shapes, work, run_c = plan
                    try:   # cffi refuses an array that is not C-contiguous
                        ptrs = [buffer(ctype, a) for a in arrays]
                    except ValueError:
                        return slow(given)
                    outs = {}
                    for (o, _), shape in zip(outputs, out_shapes):
                        out = outs[o] = empty(shape, dtype)
                        ptrs.append(buffer(ctype, out))
                    acquire()
                    try:
                        return run_c(work, n, *ptrs), outs
                    finally:
                        release()
            return slow(given)

        plain = run
        if len(wants) == 1 and len(outputs) == 1:
            (name, want), ((output, _),) = wants[0], outputs
            plain = run_one
        if any(want is None for _, want in wants):   # int32 values are checked in Python
            return plain
        # The same call in C (codegen/fastcall.py): from Python, W2's forward took 1.7 µs
        # of CPU instead of 5.7, W1's train step 3.0 instead of 9.0 (1.07 and 2.25 with
        # the methods in C too, and the GIL kept for short calls).
        from codegen.fastcall import caller
        threaded = hasattr(model._lib, "omp_set_num_threads")
        # the first batch of GIL_ITERATIONS or more, which the C runs without the GIL
        fixed, each = cmodule.work.get(kind, (GIL_ITERATIONS, 0))
        release_from = 1 if fixed >= GIL_ITERATIONS else \
            -(-(GIL_ITERATIONS - fixed) // each) if each else sys.maxsize
        fast = caller(model, kind, plain, lead, stage_bytes=STAGE_BYTES,
                      direct_below=team_from if timed else sys.maxsize,
                      threads=model._threads if threaded else None, release_from=release_from)
        if fast is None:
            return plain
        fast.set_work(model._work, model._work_batch)
        model._fast_calls[kind] = fast
        return fast.run

    def _prepare(self, kind: str, given) -> tuple:
        """(batch size, input and output pointers, outputs) for a call of `kind` on arrays
        that may need converting (batch_arrays: or the clear error) or staging (_aligned);
        run under the lock, which guards the staging buffers."""
        entry = self.cmodule.entries[kind]
        arrays, n = batch_arrays(entry.inputs, self.cmodule.input_shapes, given, self.dtype,
                                 self._known, self._indices)
        ptrs = [self._aligned(i, arrays[i]) for i in entry.inputs]
        outs = {}
        for name in entry.outputs:
            a = outs[name] = np.empty((n, *self.cmodule.output_shapes[name]), self.dtype)
            ptrs.append(self._ffi.from_buffer(self._ctype, a))
        return n, ptrs, outs

    @staticmethod
    def _no_entry(model, kind: str, given):
        model._entry(kind, _VERBS[kind])   # raises the reason

    def _aligned(self, name: str, a: np.ndarray):
        """A C pointer to `a`'s data, or to an aligned copy of it when it is large and not
        64-byte aligned: the kernels' vector loads along a row then straddle cache lines
        (the W4 forward takes 1.6x as long from an input 16 bytes off), and the copy costs
        about 1% of that."""
        ctype = self._input_ctype(name)
        p = self._ffi.from_buffer(ctype, a)
        if a.nbytes < STAGE_BYTES or not int(self._ffi.cast("size_t", p)) % ALIGN_BYTES:
            return p
        stage = self._stages.get(name)
        if stage is None or stage.size < a.size:
            stage = self._stages[name] = aligned_zeros(a.size, a.dtype)
        stage[:a.size] = a.reshape(-1)
        return self._ffi.from_buffer(ctype, stage)

    def _input_ctype(self, name: str) -> str:
        return "int32_t *" if name in self._indices else self._ctype

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        return self._runs["forward"](inputs)[1]

    def gradients(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """(batch-mean loss, gradient of it for every trainable param), in training mode
        (batch norm normalizes by the batch's statistics, as the train step does; dropout
        draws the masks of the next train step: `optimizer_state()["step"]`)."""
        fn = self._calls.get("gradients") or self._entry("gradients", "take gradients")
        with self._lock:
            n, ptrs, _ = self._prepare("gradients", inputs)
            if self.cmodule.entries["gradients"].takes_step:
                ptrs.insert(0, self._step_count())
            loss = fn(self._c_params, self._c_grads, self._work_for(n), n, *ptrs)
            return float(loss), self._params.get(self._grads, self.graph.trainable_params)

    def evaluate(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """(batch-mean loss, outputs) from one forward pass, no gradients."""
        loss, outs = self._runs["evaluate"](inputs)
        return float(loss), outs

    def train_step(self, **inputs) -> float:
        """One optimizer step in C on a batch; returns the batch-mean loss before the update,
        or NaN when the loss or a gradient is NaN or infinite: the C then changes nothing."""
        return self._runs["train_step"](inputs)[0]   # the C's loss, a float from cffi

    def _step_count(self) -> int:
        """The steps taken, as the C train step reads them from the state (a count the
        state cannot hold is 0)."""
        at = self.cmodule.state_offsets.get("step")
        count = float(self._state[at]) if at is not None else 0.0
        return int(count) if 0 <= count < 2.0 ** 32 else 0

    def reset_optimizer(self) -> None:
        """A fresh optimizer state (`<name>_init_state`): step count 0 and every slot at its
        start, so that the next step is a first step again. The hyperparameters keep their
        current values (a learning rate set since compile stays), as torch keeps a
        param_group's lr when its optimizer's state is cleared."""
        cm = self.cmodule
        if self._optimizer is None:
            return
        with self._lock:
            kept = {s: self._state[cm.state_offsets[s]] for s in cm.hyperparameters}
            getattr(self._lib, f"{cm.name}_init_state")(self._c_state)
            for s, value in kept.items():
                self._state[cm.state_offsets[s]] = value

    def optimizer_state(self) -> dict:
        """{"step": count, slot: {param: array} or a number (NAdam's mu_product),
        "hyperparameters": {field: value}} with torch.optim's names (the trainable params
        have slots; the hyperparameters are the live fields of `optimizer`); {} without an
        optimizer."""
        out: dict = {}
        if self._optimizer is None:
            return out
        cm = self.cmodule
        with self._lock:
            for slot, at in cm.state_offsets.items():
                if slot == "step":
                    out["step"] = int(self._state[at])
                elif slot in cm.hyperparameters:
                    continue
                elif slot in cm.element_slots:
                    out[slot] = self._params.get(self._state[at:], self.graph.trainable_params)
                else:   # a scalar slot (NAdam's mu_product)
                    out[slot] = float(self._state[at])
        from .optim import hyperparameters
        out["hyperparameters"] = {f: self._optimizer[f] for f in hyperparameters(cm.optimizer)}
        return out

    def predict(self, **inputs) -> dict[str, np.ndarray]:
        """The outputs from the params baked into the C (`compile(..., params=...)`)."""
        return self._runs["predict"](inputs)[1]

    def bind(self, kind: str = "forward", batch: int | None = None, **inputs) -> BoundCall:
        """`kind` ("forward", "evaluate", "train_step" or "predict") as a call without
        arguments on fixed arrays: each input given here is read in place at every call (it
        must already be a C-contiguous array of the model's dtype, leading axis the batch),
        and each input not given is made zeroed, 64-byte aligned, with `batch` examples,
        for the caller to fill through `bound.inputs[name]`."""
        if kind not in _VERBS:
            raise InputError(f"bind: kind must be one of {', '.join(_VERBS)}, got {kind!r}")
        entry = self._entry(kind, _VERBS[kind])
        unknown = sorted(set(inputs) - set(entry.inputs))
        if unknown:
            raise InputError(f"bind {kind}: unknown input '{unknown[0]}' "
                             f"(it reads {', '.join(entry.inputs)})")
        n = batch
        for name, a in inputs.items():
            shape = self.cmodule.input_shapes[name]
            want = np.dtype(self.cmodule.input_dtype(name))
            if not isinstance(a, np.ndarray) or a.dtype != want or not a.flags.c_contiguous:
                raise InputError(f"bind {kind}: input '{name}' must be a C-contiguous "
                                 f"{want} array (it is read in place at every call)")
            if a.shape[1:] != shape or a.ndim == 0 or not a.shape[0]:
                raise InputError(f"bind {kind}: input '{name}' must have shape "
                                 f"(batch, {', '.join(map(str, shape))})".replace(", )", ")")
                                 + f", got {a.shape}")
            if n is not None and a.shape[0] != n:
                raise InputError(f"bind {kind}: input '{name}' has batch size {a.shape[0]}, "
                                 f"not {n}")
            n = a.shape[0]
        if n is None or isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"bind {kind}: give every input or a batch size of at least 1, "
                             f"got batch={batch!r}")
        n = int(n)
        # (A bound call checks nothing: an int32 index outside its range reads as 0 in C.)
        ins = {name: inputs[name] if name in inputs else
               aligned_zeros(n * _size(self.cmodule.input_shapes[name]),
                             self.cmodule.input_dtype(name))
               .reshape(n, *self.cmodule.input_shapes[name]) for name in entry.inputs}
        outs = {name: aligned_zeros(n * _size(self.cmodule.output_shapes[name]), self.dtype)
                .reshape(n, *self.cmodule.output_shapes[name]) for name in entry.outputs}
        buffer = self._ffi.from_buffer
        # A work arena of its own: a bound forward may run beside the model's calls.
        work = buffer(self._ctype, aligned_zeros(self.cmodule.work_elements(n), self.dtype))
        pointer = {"params": self._c_params, "state": self._c_state, "work": work}
        args = [pointer[p] for p in _BOUND_LEAD[kind]] + [n] + \
            [buffer(self._input_ctype(name), a) for name, a in ins.items()] + \
            [buffer(self._ctype, a) for a in outs.values()]
        bound = BoundCall(self._c_function(entry.c_name, n), *args)
        bound.kind, bound.batch, bound.inputs, bound.outputs = kind, n, ins, outs
        return bound

    def _entry(self, kind: str, what: str):
        entry = self.cmodule.entries.get(kind)
        if entry is not None:
            return entry
        if self.cmodule.baked_params and kind != "predict":
            raise InputError(f"model '{self.name}' was compiled for inference with baked params; "
                             f"compile it without params to {what}")
        if kind == "predict":
            raise InputError(f"model '{self.name}' has no baked params: "
                             "compile it with params=... to predict from them")
        if self.graph.loss is None:
            raise InputError(f"model '{self.name}' has no loss, so it cannot {what}")
        raise InputError(f"model '{self.name}' has no optimizer: declare an 'optimizer:' section "
                         "in the spec or pass optimizer=... to graphc.compile")

    def verify(self, seed: int = 0, **inputs):
        """C against the NumPy reference, and the reference against finite differences."""
        from .verify import verify
        return verify(self, inputs, seed=seed)

    # ------------------------------------------------------------ the C
    @property
    def c_source(self) -> str:
        return self.cmodule.source

    @property
    def c_header(self) -> str:
        return self.cmodule.header

    def write_c(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        from codegen.files import write_sources
        return write_sources(self.cmodule, directory)

    def __repr__(self) -> str:
        return f"<CompiledModel {self.name!r} {self.dtype.name}, {self.cmodule.params_size} params>"

    def summary(self, batch: int = 1, print_fn=None) -> None:
        """Print a table of the model, as Keras's `model.summary()`: per input and node its
        op, inputs, output shape (None: the batch), param count and bytes of C memory (its
        params' values, gradients and optimizer slots), then the totals: params trainable
        and not, and the C memory of params, gradients, optimizer state and the work arena
        at `batch` examples. `print_fn` gets the text instead of `print`."""
        from .display import Summary, print_summary
        print_summary(Summary(self.graph, self.cmodule, check_batch(batch)), print_fn)

    def _repr_html_(self) -> str:
        """Jupyter: dtype, target, threads, optimizer, entry points and the summary table."""
        from .display import model_html
        return model_html(self)


def check_batch(batch, field: str = "batch") -> int:
    """A batch size static memory may be planned for: an integer in [1, MAX_BATCH]."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) \
            or not 1 <= batch <= MAX_BATCH:
        # (a huge int is not printed: Python refuses to print more than 4300 digits)
        shown = repr(batch) if not isinstance(batch, int) or batch < 10 ** 30 \
            else "a larger integer"
        raise InputError(f"{field} must be an integer from 1 to {MAX_BATCH} (2^24), got {shown}")
    return int(batch)


def load_model(path: str | os.PathLike | bytes, *, threads: int | None = None) -> CompiledModel:
    """The model saved in `path` (by `model.save`; graphc/checkpoint.py), compiled (a cache
    hit when warm) and restored: params, optimizer state (step count, moments, every slot)
    as they were, so that training continues bit for bit. `path` may also be a checkpoint's
    bytes. `threads` as for `graphc.compile`."""
    from .checkpoint import open_checkpoint
    with open_checkpoint(path) as (graph, header, params, read_state):
        model = compile(graph, header["dtype"], target=header["target"], threads=threads,
                        params=params if header["baked_params"] else None)
        state = read_state(model)
    model._restore(params, state)
    return model


def _from_pickle(data: bytes, threads: int | None) -> CompiledModel:
    """`pickle.loads` of a model (CompiledModel.__reduce__): its checkpoint's bytes, loaded."""
    return load_model(data, threads=threads)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def save_params(params: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """An .npz file with one array per param, written whole or not at all."""
    import io
    from codegen.files import write_all
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in params.items()})
    try:
        write_all({Path(path): buf.getvalue()})
    except OSError as e:
        raise InputError(f"cannot write params to {path}: {e.strerror or e}") from None


def load_params(path: str | os.PathLike, graph=None) -> dict[str, np.ndarray]:
    """Params from an .npz file; with a graph, every param must be there with its shape.

    With a graph, the file's member names and declared sizes are checked against the
    params before any array is read: a zip bomb is refused unread."""
    with NpzReader(path, "params") as z:
        if graph is None:
            z.refuse_larger_than(MAX_NPZ_MEMBER_BYTES, "more than any model's params")
            return z.read_all()
        graph = as_graph(graph)
        missing = [p for p in graph.params if p not in z.members]
        extra = [p for p in z.members if p not in graph.params]
        if missing or extra:
            what = f"missing param '{missing[0]}'" if missing else f"unknown array '{extra[0]}'"
            raise InputError(f"{path}: {what} (model '{graph.name}' has params: "
                             f"{', '.join(graph.params)})")
        for p, v in graph.params.items():
            if z.size(p) > _size(v.shape) * MAX_ITEM_BYTES + NPY_HEADER_BYTES:
                raise InputError(f"{path}: param '{p}' must be a real array of shape {v.shape}, "
                                 f"but its member is {z.size(p)} bytes uncompressed; not read")
        params = {}
        for p, v in graph.params.items():
            arr = params[p] = z.read(p)
            if arr.shape != v.shape or arr.dtype.kind not in "fiu":
                raise InputError(f"{path}: param '{p}' must be a real array of shape {v.shape}, "
                                 f"got {arr.dtype} {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise InputError(f"{path}: param '{p}' holds non-finite values")
    return params


def _with_optimizer(graph: Graph, optimizer) -> Graph:
    from .optim import check_optimizer
    if graph.loss is None:
        raise SpecError("an optimizer needs a loss to minimise: add a 'loss' entry",
                        field="optimizer")
    return Graph(graph.name, graph.values, graph.outputs, graph.loss,
                 check_optimizer(optimizer), graph.description, initial=graph.initial)


def _flat_params(graph: Graph, params, offsets: dict[str, int], size: int, dtype) -> np.ndarray:
    if isinstance(params, (str, os.PathLike)):
        params = load_params(params, graph)
    store = _ParamStore(graph, offsets, size, dtype)
    missing = [p for p in graph.params if p not in params]
    if missing:
        raise InputError(f"missing param '{missing[0]}' to bake into the C")
    store.set(params)
    if not np.all(np.isfinite(store.flat)):  # also values beyond float32's range
        bad = next(p for p in graph.params if not np.all(np.isfinite(store.view(store.flat, p))))
        raise InputError(f"param '{bad}' holds non-finite values in {np.dtype(dtype).name}; "
                         "they cannot be baked into C")
    return store.flat


def generate(graph, dtype: str = "float32", *, optimizer: dict | None = None, params=None,
             target: str = "c99", max_batch: int | None = None):
    """Spec to C text, without building: (Graph, CModule).

    `optimizer` replaces the spec's section. `params` (a dict or an .npz path) makes
    inference C with those params baked in as a `static const` table. `target`
    (c99, host, cortex-m4, cortex-m0) picks how contractions print (tiles for 16-byte
    SIMD, or for this machine's width with OpenMP on host; rows of fmaf on the Cortex-M4F,
    plain loops on the M0) and the header's note; `max_batch` adds `<NAME>_MAX_BATCH` to the
    header for statically sized memory."""
    from .ir import param_layout
    from codegen.targets import get_target
    from .derive import layout_order
    from .pipeline import to_c
    graph = as_graph(graph)
    dtype = check_dtype(dtype)
    tgt = get_target(target)
    if max_batch is not None:
        max_batch = check_batch(max_batch, "max_batch")
    if optimizer is not None:
        graph = _with_optimizer(graph, optimizer)
    flat = None
    if params is not None:
        offsets, size = param_layout(layout_order(graph))
        with np.errstate(over="ignore"):
            flat = _flat_params(graph, params, offsets, size, dtype)
    cmodule = to_c(graph, dtype, target, params=flat, max_batch=max_batch)
    if max_batch is not None:
        # <NAME>_WORK_SIZE(<NAME>_MAX_BATCH) sizes a static array: its bytes must fit the
        # target's size_t (32 bits on Cortex-M; arrays up to PTRDIFF_MAX).
        limit = (1 << 31) - 1 if tgt.embedded else (1 << 63) - 1
        need = cmodule.work_elements(max_batch) * np.dtype(dtype).itemsize
        if need > limit:
            raise InputError(f"max_batch {max_batch}: the work arena for it would take {need} "
                             f"bytes, more than a static array on target '{target}' can hold")
    return graph, cmodule


def compile(graph, dtype: str = "float32", optimizer: dict | None = None, *,
            seed: int = 0, params=None, target: str = "host",
            threads: int | None = None) -> CompiledModel:
    """Derive, generate, build (cached) and load; params drawn from their initializers.

    With `params` (dict or .npz path) the C is for inference with those params baked in
    (`model.predict`); the model also starts from them. The default target, "host", builds
    for the machine this runs on (-march=native, OpenMP over big kernels); "c99" builds the
    portable C that `graphc compile` writes (what firmware and other machines get), and
    the Cortex-M targets build as c99 here. `threads` (host): the OpenMP threads each call
    of this model runs on. None (the default): a call big enough for a parallel region runs
    on one thread or on all of OpenMP's count (every core, unless OMP_NUM_THREADS or
    omp_set_num_threads in the calling thread says fewer), whichever has lately been faster
    for its batch size; all win on an idle machine, one beside a busy process, whose core
    the others would wait for. Every count computes the same bits."""
    import json
    from codegen.build import build, load_prepared, prepared_key, store_prepared
    from codegen.fastcall import glue
    from codegen.targets import get_target, target_identity
    from codegen.openmp import check_threads
    check_seed(seed)   # before any work: a bad seed or thread count must not cost a build
    check_threads(threads)
    graph = as_graph(graph)
    dtype = check_dtype(dtype)
    identity = target_identity(target)   # validates the name; for host, no compiler run
    if optimizer is not None:
        graph = _with_optimizer(graph, optimizer)
    if isinstance(params, (str, os.PathLike)):
        params = load_params(params, graph)
    # Baked params are not worth a prepared entry (the key would hash every number).
    # The spec's content is keyed canonically (sorted keys), but the declaration order of
    # inputs, params and nodes is keyed too: it fixes the C's argument order and param
    # offsets, so two orders must never share an entry.
    key = None if params is not None else prepared_key(
        json.dumps(graph.to_spec(), sort_keys=True, default=repr),
        json.dumps(list(graph.values)), dtype, identity)
    hit = load_prepared(key) if key else None
    if hit:
        cmodule, built = hit
    else:
        tgt = get_target(target)
        graph, cmodule = generate(graph, dtype, params=params, target=target)
        built = build(graph.name, cmodule.source, cmodule.header, cmodule.cdef,
                      extra_flags=tgt.build_flags, machine=tgt.machine, glue=glue(cmodule))
        if key:
            store_prepared(key, cmodule, built)
    model = CompiledModel(graph, cmodule, built, seed=seed, threads=threads)
    if params is not None:
        model.set_params(params)
    return model
