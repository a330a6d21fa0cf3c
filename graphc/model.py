"""`graphc.compile` and the CompiledModel: NumPy arrays in, generated C, NumPy arrays out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import InputError, SpecError
from .graph import Graph
from .init import init_params

DTYPES = ("float32", "float64")


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


def check_dtype(dtype) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise SpecError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    return name


def batch_arrays(names, shapes: Mapping[str, tuple], given: Mapping, dtype,
                 known: set[str]) -> tuple[dict[str, np.ndarray], int]:
    """Check and convert the arrays an entry point needs; returns them and the batch size.

    Names of other graph inputs are accepted and ignored, so one dict of data serves
    forward, gradients and verify alike."""
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
            raise InputError(f"input '{name}' must hold real numbers, got dtype {arr.dtype}")
        want = shapes[name]
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != tuple(want):
            raise InputError(f"input '{name}' must have shape (n, {', '.join(map(str, want))})"
                             .replace(", )", ")") + f" with a leading batch axis, got {arr.shape}")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise InputError(f"input '{name}' has batch size {arr.shape[0]}, but "
                             f"'{names[0]}' has {n}")
        out[name] = np.ascontiguousarray(arr, dtype=dtype)
    if n == 0:
        raise InputError("the batch is empty (leading axis of size 0)")
    return out, n or 0


class _ParamStore:
    """Params as views into one flat array, the layout the generated C expects."""

    def __init__(self, graph: Graph, offsets: dict[str, int], size: int, dtype):
        self.graph, self.offsets, self.dtype = graph, offsets, np.dtype(dtype)
        self.flat = np.zeros(size, self.dtype)

    def view(self, flat: np.ndarray, name: str) -> np.ndarray:
        shape = self.graph.params[name].shape
        off = self.offsets[name]
        return flat[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def set(self, params: Mapping[str, np.ndarray]) -> None:
        staged = {}
        for name, value in params.items():
            if name not in self.graph.params:
                raise InputError(f"unknown param '{name}' (params: {', '.join(self.graph.params)})")
            arr = np.asarray(value)
            if arr.dtype.kind not in "fiub":
                raise InputError(f"param '{name}' must hold real numbers, got dtype {arr.dtype}")
            want = self.graph.params[name].shape
            if arr.shape != want:
                raise InputError(f"param '{name}' must have shape {want}, got {arr.shape}")
            staged[name] = arr
        for name, arr in staged.items():  # all checked first: nothing is changed half-way
            self.view(self.flat, name)[...] = arr

    def get(self, flat: np.ndarray | None = None) -> dict[str, np.ndarray]:
        flat = self.flat if flat is None else flat
        return {p: self.view(flat, p).copy() for p in self.graph.params}


class CompiledModel:
    """A graph compiled to C and loaded. Params live in one flat array owned by the model."""

    def __init__(self, graph: Graph, cmodule, built, *, seed: int = 0):
        self.graph, self.cmodule, self.built = graph, cmodule, built
        self.dtype = np.dtype(cmodule.dtype)
        self.name = graph.name
        self._ffi, self._lib = built.ffi, built.lib
        self._ctype = "float *" if cmodule.dtype == "float32" else "double *"
        self._params = _ParamStore(graph, cmodule.param_offsets, cmodule.params_size, self.dtype)
        self._grads = np.zeros(cmodule.params_size, self.dtype)
        self._work = np.zeros(0, self.dtype)
        self.init_params(seed)

    # ------------------------------------------------------------ params
    def init_params(self, seed: int = 0) -> None:
        """Draw every param from its initializer with a seeded generator."""
        self._params.set(init_params({p: (v.shape, v.init) for p, v in self.graph.params.items()},
                                     seed))

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        self._params.set(params)

    def get_params(self) -> dict[str, np.ndarray]:
        return self._params.get()

    # ------------------------------------------------------------ calls
    def _ptr(self, arr: np.ndarray):
        return self._ffi.cast(self._ctype, arr.ctypes.data)

    def _work_for(self, n: int):
        need = self.cmodule.work_elements(n)
        if self._work.size < need:
            self._work = np.zeros(need, self.dtype)
        return self._ptr(self._work)

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        entry = self.cmodule.entries["forward"]
        arrays, n = batch_arrays(entry.inputs, self.cmodule.input_shapes, inputs, self.dtype,
                                 set(self.graph.inputs))
        outs = {o: np.empty((n,) + self.cmodule.output_shapes[o], self.dtype) for o in entry.outputs}
        getattr(self._lib, entry.c_name)(
            self._ptr(self._params.flat), self._work_for(n), n,
            *[self._ptr(arrays[i]) for i in entry.inputs], *[self._ptr(outs[o]) for o in entry.outputs])
        return outs

    def gradients(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """(batch-mean loss, gradient of it for every param)."""
        entry = self.cmodule.entries.get("gradients")
        if entry is None:
            raise InputError(f"model '{self.name}' has no loss, so no gradients")
        arrays, n = batch_arrays(entry.inputs, self.cmodule.input_shapes, inputs, self.dtype,
                                 set(self.graph.inputs))
        loss = getattr(self._lib, entry.c_name)(
            self._ptr(self._params.flat), self._ptr(self._grads), self._work_for(n), n,
            *[self._ptr(arrays[i]) for i in entry.inputs])
        return float(loss), self._params.get(self._grads)

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


def generate(graph, dtype: str = "float32"):
    """Spec to C text, without building: (Graph, CModule)."""
    from codegen.emit import emit
    from .derive import derive
    graph = as_graph(graph)
    return graph, emit(graph, derive(graph), check_dtype(dtype))


def compile(graph, dtype: str = "float32", optimizer: dict | None = None, *,
            seed: int = 0) -> CompiledModel:
    """Derive, generate, build (cached) and load; params drawn from their initializers."""
    from codegen.build import build
    graph = as_graph(graph)
    if optimizer is not None:
        from .optim import check_optimizer
        graph = Graph(graph.name, graph.values, graph.outputs, graph.loss,
                      check_optimizer(optimizer), graph.description)
    graph, cmodule = generate(graph, dtype)
    built = build(graph.name, cmodule.source, cmodule.header, cmodule.cdef)
    return CompiledModel(graph, cmodule, built, seed=seed)
