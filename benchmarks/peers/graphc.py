"""graphc, timed three ways: from Python (`model.train_step`, `model.forward`), from Python
as a bound call (`model.bind`: no arguments, checks or allocations per call), and in pure C
(the generated timing harness calling `<name>_train_step` / `<name>_forward` in a loop).

Both are the `host` target: graphc's own build adds the target's flags (-march=native), and
the harness is compiled with the same flags (benchmarks/charness.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import graphc

from .. import charness
from ..timing import time_python
from ..workloads import Problem, spec
from . import Runner

TARGET = "host"


def version() -> str:
    return graphc.__version__


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
    if train:
        zeroed.append(("state", cmodule.state_size))
        call = f"result = {entry.c_name}(params, state, work, {n}, {ins});"
        dump = []
    else:
        outs = [(f"out_{o}", n * int(np.prod(cmodule.output_shapes[o]))) for o in entry.outputs]
        zeroed += outs
        call = f"{entry.c_name}(params, work, {n}, {ins}, {', '.join(o for o, _ in outs)});"
        dump = outs
    name = cmodule.name
    return charness.Program(f"{name}_{w.key.lower()}_{entry.kind}",
                            {f"{name}.c": cmodule.source, f"{name}.h": cmodule.header},
                            f"{name}.h", read, zeroed, call, dump)


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    w = problem.workload
    model = graphc.compile(spec(w.sizes), target=TARGET)
    model.set_params(problem.graphc_params())
    x, y, out = problem.x, problem.y, model.cmodule.entries["forward"].outputs[0]
    if w.train:
        def call():
            return model.train_step(x=x, y=y)

        def results():
            return {"losses": [call(), call()]}
    else:
        def call():
            return model.forward(x=x)

        def results():
            return {"logits": call()[out]}
    return [Runner("graphc (Python)", "python", results, lambda opts: time_python(call, opts),
                   f"target {TARGET}"),
            bound_runner(problem),
            charness.runner("graphc (pure C)", c_program(model.cmodule, problem, w.train), workdir,
                            w.train, f"flags: {' '.join(charness.flags())}")]


def bound_runner(problem: Problem) -> Runner:
    """`model.bind`: the same entry point as a call without arguments on arrays fixed once
    (the inputs copied into its aligned buffers once, outside the clock)."""
    w = problem.workload
    model = graphc.compile(spec(w.sizes), target=TARGET)   # its own params: a fresh start
    model.set_params(problem.graphc_params())
    kind = "train_step" if w.train else "forward"
    call = model.bind(kind, batch=w.batch)
    data = {"x": problem.x, "y": problem.y}
    for name, buffer in call.inputs.items():
        buffer[...] = data[name]
    if w.train:
        def results():
            return {"losses": [call(), call()]}
    else:
        def results():
            call()
            return {"logits": next(iter(call.outputs.values())).copy()}
    return Runner("graphc (Python, bound call)", "bound", results,
                  lambda opts: time_python(call, opts), f"model.bind({kind!r}), target {TARGET}")
