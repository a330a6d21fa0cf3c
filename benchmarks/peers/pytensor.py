"""PyTensor: `pytensor.function` of the loss with the SGD updates on shared variables (or
of the logits), in float32, in PyTensor's default mode (its Numba backend in 3.x) and
in its C backend (mode "CVM"). The C backend links a BLAS only when told one:
`blas__ldflags=-lopenblas` is set when a system OpenBLAS is found (Debian:
libopenblas-dev) and $PYTENSOR_FLAGS does not say otherwise."""

from __future__ import annotations

import ctypes.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from ..timing import time_python
from ..workloads import LR, Problem
from . import Runner, Skip, mlp_only

MODES = ("default", "CVM")


def _configure() -> None:
    """Before pytensor is imported: float32 as floatX, OpenBLAS for the C backend."""
    flags = os.environ.get("PYTENSOR_FLAGS", "")
    extra = [] if "floatX" in flags else ["floatX=float32"]
    if "blas__ldflags" not in flags and ctypes.util.find_library("openblas"):
        extra.append("blas__ldflags=-lopenblas")
    os.environ["PYTENSOR_FLAGS"] = ",".join([f for f in [flags] + extra if f])


def version() -> str:
    if "pytensor" not in sys.modules:
        _configure()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "could not link to a BLAS" without OpenBLAS
            import pytensor
    except ImportError:
        raise Skip("not installed (pip install '.[bench]')") from None
    return pytensor.__version__


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    mlp_only(problem)
    return [_runner(problem, mode) for mode in MODES]


def _runner(problem: Problem, mode: str) -> Runner:
    import pytensor
    import pytensor.tensor as pt
    from pytensor.compile.mode import get_mode

    params = []   # weights stored [in, out], as PyTensor's tutorials do: `x @ W` is contiguous
    for k, (W, b) in enumerate(problem.layers):
        params += [pytensor.shared(np.ascontiguousarray(W.T), name=f"W{k}"),
                   pytensor.shared(b.copy(), name=f"b{k}")]
    x, y = pt.matrix("x", dtype="float32"), pt.matrix("y", dtype="float32")
    h = x
    for k in range(len(problem.layers)):
        h = h @ params[2 * k] + params[2 * k + 1]
        if k < len(problem.layers) - 1:
            h = pt.maximum(h, 0)
    m = get_mode(None if mode == "default" else mode)
    linker = type(m.linker).__name__
    blas = pytensor.config.blas__ldflags or "none"
    backend = {"NumbaLinker": "Numba", "VMLinker": "C VM"}.get(linker, linker)
    label = f"PyTensor, {'default mode' if mode == 'default' else 'mode ' + mode} ({backend})"
    if problem.workload.train:
        loss = -(y * pt.special.log_softmax(h, axis=1)).sum(axis=1).mean()
        grads = pytensor.grad(loss, params)
        lr = np.float32(LR)
        f = pytensor.function([x, y], loss, updates=[(p, p - lr * g) for p, g in zip(params, grads)],
                              mode=m)

        def call():
            return f(problem.x, problem.y)

        def results():
            return {"losses": [float(call()), float(call())]}
    else:
        f = pytensor.function([x], h, mode=m)

        def call():
            return f(problem.x)

        def results():
            return {"logits": np.asarray(call())}
    return Runner(label, "python", results, lambda opts: time_python(call, opts),
                  f"mode {mode}, linker {linker}, BLAS {blas}")
