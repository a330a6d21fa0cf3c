"""A model's calls from Python (`forward`, `predict`, `evaluate`, `train_step`) in C for the
common case (issue 15 §5).

From Python, a cffi call pays `ffi.from_buffer` for each array and `np.empty` for each
output: 2.5 µs on a 2 GHz Zen 1 core, ten times the W2 forward's own C (0.23 µs). The
extension module `fastcall.c` checks the arrays and makes the outputs through numpy's C API,
calls the entry through the model's glue (`glue`, compiled into the model's cffi wrapper:
one C signature for every entry), and hands every call it does not serve to the Python path
it stands in for. It is built once per cache, compiler, Python ABI and numpy version
(codegen/build.py), like a model.
"""

from __future__ import annotations

import functools
from pathlib import Path


# The entry points the C caller serves, and the pointers before `n` in each (_LEAD), as the
# model's header declares them; evaluate and train_step return the loss.
_LEAD = {"forward": ("const {t} *", "{t} *"), "predict": ("{t} *",),   # (params,) work
         "evaluate": ("const {t} *", "{t} *"), "train_step": ("{t} *", "{t} *", "{t} *")}
_RETURNS = ("evaluate", "train_step")


def glue_name(kind: str) -> str:
    return f"graphc_glue_{kind}"


def glue(cmodule) -> tuple[str, str]:
    """(cffi declarations, C definitions) for the model's wrapper: per entry the C caller
    serves, `void graphc_glue_<kind>(void *const *args, size_t n, double *loss)`, which
    calls it with `args` = its leading pointers, work, inputs and outputs, converted to the
    entry's own pointer types (one signature for the caller of every model and entry,
    and no call through a function pointer of another type). Entries with an int32 input
    (checked in Python), a step count (gradients) or no input (the batch size comes from
    one) have none."""
    t = "float" if cmodule.dtype == "float32" else "double"
    cdef, source = [], []
    for kind, entry in cmodule.entries.items():
        if kind not in _LEAD or entry.takes_step or not entry.inputs or \
                any(i in cmodule.input_dtypes for i in entry.inputs):
            continue
        types = [a.format(t=t) for a in _LEAD[kind]]
        types += [f"const {t} *"] * len(entry.inputs) + [f"{t} *"] * len(entry.outputs)
        args = [f"({ty})args[{k}]" for k, ty in enumerate(types)]
        lead = len(_LEAD[kind])
        call = f"{entry.c_name}({', '.join(args[:lead] + ['n'] + args[lead:])})"
        proto = f"void {glue_name(kind)}(void *const *args, size_t n, double *loss)"
        body = f"*loss = (double){call};" if kind in _RETURNS else f"(void)loss;\n    {call};"
        cdef.append(proto + ";")
        source.append(f"{proto}\n{{\n    {body}\n}}")
    return "\n".join(cdef) + "\n", "\n".join(source) + "\n"


@functools.lru_cache(maxsize=None)
def _module():
    import numpy as np
    from .build import build_extension
    source = (Path(__file__).parent / "fastcall.c").read_text(encoding="utf-8")
    return build_extension("_graphc_fastcall", source, (np.get_include(),),
                           version="numpy " + np.__version__)


def new_lock():
    """A model's lock (threading.Lock's acquire, release and `with`), which the C call takes
    without calling into Python."""
    return _module().Lock()


def install_methods(cls, returns: dict[str, str]) -> None:
    """Make each method `kind` of `cls` (returns[kind]: what it returns, "outputs", "loss"
    or "both") the extension's Method around it, once: read as an attribute it stays the
    Python function, and its plain call `model.forward(x=x)` goes to the model's Caller for
    `kind` (`model._fast_calls[kind]`) without a Python frame (0.4 µs of W2's forward).
    Done when the first model is made, since building the extension needs the compiler."""
    method = _module().Method
    for kind, what in returns.items():
        function = cls.__dict__[kind]
        if not isinstance(function, method):
            setattr(cls, kind, method(function, kind, what))


def caller(model, kind: str, fallback, lead: tuple, *, direct_below: int,
           threads: int | None, stage_bytes: int, release_from: int = 1):
    """The C caller of `model`'s entry `kind` (forward, predict, evaluate, train_step), or
    None when the model's wrapper has no glue for it (`glue`): its `run(given)` does what
    `fallback(given)` does, and `set_work(arena, batch)` must hear of every new work arena
    (under the model's lock). `lead`: the entry's cffi pointers before the work arena
    (params, state); `direct_below`: the batch from which calls go to `fallback` (whose
    thread timing serves them); `threads`: the OpenMP threads a call runs on, None to
    leave the count as it is; an input of `stage_bytes` or more goes to `fallback`, which
    may copy it to an aligned buffer; `release_from`: the batch from which the C runs with
    the GIL released (shorter calls keep it)."""
    ffi, lib, cmodule = model._ffi, model._lib, model.cmodule
    entry = cmodule.entries[kind]
    module = _module()   # its limits: inputs (and outputs) an entry has, per-example rank
    shapes = [cmodule.input_shapes[i] for i in entry.inputs] + \
        [cmodule.output_shapes[o] for o in entry.outputs]
    if not hasattr(lib, glue_name(kind)) or not entry.inputs \
            or max(len(entry.inputs), len(entry.outputs)) > module.MAX_ARRAYS \
            or any(len(s) > module.MAX_RANK for s in shapes):
        return None

    def address(pointer) -> int:
        return int(ffi.cast("uintptr_t", pointer))

    omp = threads is not None
    return module.Caller(
        glue=address(ffi.addressof(lib, glue_name(kind))),
        lead=tuple(address(p) for p in lead), returns_loss=kind in _RETURNS,
        dtype=cmodule.dtype, inputs=entry.inputs,
        input_shapes=tuple(tuple(cmodule.input_shapes[i]) for i in entry.inputs),
        outputs=entry.outputs,
        output_shapes=tuple(tuple(cmodule.output_shapes[o]) for o in entry.outputs),
        stage_bytes=stage_bytes, direct_below=direct_below, release_from=release_from,
        threads=threads or 0,
        get_threads=address(ffi.addressof(lib, "omp_get_max_threads")) if omp else None,
        set_threads=address(ffi.addressof(lib, "omp_set_num_threads")) if omp else None,
        lock=model._lock, fallback=fallback, keep=(lead, lib))
