"""onnxruntime: the workload's graph written to ONNX by `graphc.onnx.save` with the problem's
params, run by an `InferenceSession` (CPU execution provider, default graph optimizations)
on one intra-op thread and on onnxruntime's default number; forward passes only
(onnxruntime's training API is another package). Timed as `session.run(None, {x: batch})`
from Python, its outputs new arrays per call, as `model.forward`'s are."""

from __future__ import annotations

from pathlib import Path

import graphc.onnx

from ..timing import time_python
from ..workloads import Problem
from . import Runner, Skip


def version() -> str:
    try:
        import onnxruntime
    except ImportError:
        raise Skip("not installed (pip install onnxruntime)") from None
    return onnxruntime.__version__


def session(path: Path, threads: int | None):
    """An InferenceSession on the CPU, on `threads` intra-op threads (None: its default)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    w = problem.workload
    if w.train:
        raise Skip("inference only (no training in onnxruntime's inference package)")
    path = graphc.onnx.save(w.graph(), workdir / f"{w.key.lower()}.onnx",
                            params=problem.graphc_params())
    return [_runner(path, problem, threads) for threads in (1, None)]


def _runner(path: Path, problem: Problem, threads: int | None) -> Runner:
    s = session(path, threads)
    feed = {s.get_inputs()[0].name: problem.x}

    def call():
        return s.run(None, feed)

    def results():
        return {"logits": call()[0]}
    label = f"onnxruntime, {threads} thread" if threads else "onnxruntime, default threads"
    return Runner(label, "python", results, lambda opts: time_python(call, opts),
                  f"{path.name} from graphc.onnx.save")
