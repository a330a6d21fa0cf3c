"""graphc, timed three ways: from Python (`model.train_step`, `model.forward`), from Python
as a bound call (`model.bind`: no arguments, checks or allocations per call), and in pure C
(the generated timing harness calling `<name>_train_step` / `<name>_forward` in a loop).

From Python on every target of `TARGETS`: `graphc.compile`'s default first (its rows are
the reference every peer is checked against and divided by), then the others; each row
names its target. Their results come from models in this process, their times from a
process of graphc's own (benchmarks/graphc_timing.py: this one's OpenMP runtime is
PyTorch's). In pure C the `host` target's C, compiled with the host's flags
(-march=native, and OpenMP where the target has it) as graphc's own host build is
(benchmarks/charness.py); with OpenMP, also on one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

import graphc

from .. import charness, graphc_timing
from ..workloads import Problem
from . import Runner

DEFAULT_TARGET = inspect.signature(graphc.compile).parameters["target"].default
TARGETS = tuple(dict.fromkeys((DEFAULT_TARGET, "host", "c99")))
C_TARGET = "host"


def version() -> str:
    return f"{graphc.__version__} (default target {DEFAULT_TARGET})"


def flat_params(cmodule, problem: Problem) -> np.ndarray:
    """The params in the layout the generated C reads (offsets from the module)."""
    flat = np.zeros(cmodule.params_size, np.float32)
    for name, value in problem.graphc_params().items():
        at = cmodule.param_offsets[name]
        flat[at:at + value.size] = value.ravel()
    return flat


def c_program(cmodule, problem: Problem, train: bool) -> charness.Program:
    """The timing harness around one entry point of a generated module."""
    w, n = problem.workload, problem.workload.batch
    entry = cmodule.entries["train_step" if train else "forward"]
    data = {"x": problem.x, "y": problem.y}
    read = [("params", flat_params(cmodule, problem))] + [(f"in_{i}", data[i]) for i in entry.inputs]
    zeroed = [("work", cmodule.work_elements(n))]
    ins = ", ".join(f"in_{i}" for i in entry.inputs)
    setup = []
    if train:   # the state holds the hyperparameters: init_state writes them
        zeroed.append(("state", cmodule.state_size))
        setup.append(f"{cmodule.name}_init_state(state);")
        call = f"result = {entry.c_name}(params, state, work, {n}, {ins});"
        dump = []
    else:
        outs = [(f"out_{o}", n * int(np.prod(cmodule.output_shapes[o]))) for o in entry.outputs]
        zeroed += outs
        call = f"{entry.c_name}(params, work, {n}, {ins}, {', '.join(o for o, _ in outs)});"
        dump = outs
    name = cmodule.name
    key = w.key.lower().replace(".", "_")
    return charness.Program(f"{name}_{key}_{entry.kind}",
                            {f"{name}.c": cmodule.source, f"{name}.h": cmodule.header},
                            f"{name}.h", read, zeroed, call, dump, setup=setup)


def _model(problem: Problem, target: str):
    """A compiled model of its own (a fresh start for its check) at the problem's params."""
    model = graphc.compile(problem.workload.graph(), target=target)
    model.set_params(problem.graphc_params())
    return model


def problem_file(problem: Problem, workdir: Path) -> Path:
    """The problem as benchmarks/graphc_timing.py reads it."""
    path = workdir / f"graphc_{problem.workload.key}.npz"
    np.savez(path, **graphc_timing.problem_arrays(problem.graphc_params(), problem.x, problem.y))
    return path


def runners(problem: Problem, workdir: Path, targets=TARGETS) -> list[Runner]:
    """From Python and as a bound call per target, the default's first; pure C (host).
    Each row's results come from its call made here, its times from the same call made in
    benchmarks/graphc_timing.py's process."""
    w = problem.workload
    data = problem_file(problem, workdir)
    arrays = graphc_timing.problem_arrays(problem.graphc_params(), problem.x, problem.y)
    out = []
    for target in targets:
        for kind, label in (("python", "Python"), ("bound", "bound call")):
            model, call = graphc_timing.call_for(w.key, target, kind, arrays)
            if w.train:
                def results(call=call):
                    return {"losses": [call(), call()]}
            elif kind == "python":
                def results(call=call, logits=model.graph.outputs[0]):
                    return {"logits": call()[logits]}
            else:
                def results(call=call):
                    call()
                    return {"logits": next(iter(call.outputs.values())).copy()}
            notes = f"target {target}" if kind == "python" else \
                f"model.bind({'train_step' if w.train else 'forward'!r}), target {target}"
            out.append(Runner(f"graphc {target} ({label})", kind, results,
                              lambda opts, target=target, kind=kind:
                              graphc_timing.timed_apart(data, w.key, target, kind, opts),
                              notes))
    if C_TARGET in targets:
        program = c_program(_model(problem, C_TARGET).cmodule, problem, w.train)
        notes = f"flags: {' '.join(charness.flags())}"
        out.append(charness.runner(f"graphc {C_TARGET} (pure C)", program, workdir, w.train,
                                   notes))
        if charness.threaded():   # OpenMP's threads wait for each other beside a competitor
            out.append(charness.runner(f"graphc {C_TARGET} (pure C, OMP_NUM_THREADS=1)",
                                       program, workdir, w.train, notes, charness.ONE_THREAD))
    return out
