"""`model.forward(x=...)` and `model.predict(x=...)` in C for the common case (issue 15 §5).

From Python, a cffi call pays `ffi.from_buffer` for each array and `np.empty` for the
output: 2.5 µs on a 2 GHz Zen 1 core, ten times the W2 forward's own C (0.23 µs). The
extension module `fastcall.c` checks the arrays and makes the output through numpy's C API,
and hands every call it does not serve to the Python path it stands in for. It is built
once per cache, compiler, Python ABI and numpy version (codegen/build.py), like a model.
"""

from __future__ import annotations

import functools
from pathlib import Path


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


def caller(model, kind: str, fallback, *, direct_below: int, threads: int | None,
           stage_bytes: int):
    """The C caller of `model`'s one-input, one-output entry `kind` (forward or predict):
    its `run(given)` does what `fallback(given)` does, and `set_work(arena, batch)` must hear
    of every new work arena (under the model's lock). `direct_below`: the batch from which
    calls go to `fallback` (whose thread timing serves them); `threads`: the OpenMP threads
    a call runs on, None to leave the count as it is; inputs of `stage_bytes` or more go
    to `fallback`, which may copy them to an aligned buffer."""
    ffi, lib, entry = model._ffi, model._lib, model.cmodule.entries[kind]
    (name,), (output,) = entry.inputs, entry.outputs

    def address(symbol: str) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, symbol)))

    omp = threads is not None
    return _module().Caller(
        fn=address(entry.c_name),
        params=int(ffi.cast("uintptr_t", model._c_params)) if kind == "forward" else None,
        dtype=model.dtype.name, input=name,
        input_shape=tuple(model.cmodule.input_shapes[name]), output=output,
        output_shape=tuple(model.cmodule.output_shapes[output]),
        stage_bytes=stage_bytes, direct_below=direct_below, threads=threads or 0,
        get_threads=address("omp_get_max_threads") if omp else None,
        set_threads=address("omp_set_num_threads") if omp else None,
        lock=model._lock, fallback=fallback, keep=(model._c_params, lib))
