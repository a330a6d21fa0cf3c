"""graphc's rows from Python, timed in a process of their own.

    python -m benchmarks.graphc_timing DATA.npz WORKLOAD TARGET KIND OPTIONS_JSON

`python -m benchmarks` (and benchmarks/cnn.py) starts this for each measurement of a
`graphc ... (Python)` or `(bound call)` row and reads the Timing it prints as JSON. Its own
process has imported PyTorch for the peers' rows, and PyTorch brings its copy of libgomp,
under the soname every OpenMP module asks for (libgomp.so.1): the runtime a graphc module
loaded later shares, started with libgomp's default wait (idle threads spin 300,000
rounds), not graphc's settings (codegen/openmp.py; passive with no spin when these figures
were taken). Timed there on a 2-core Zen 5 VM, W3's step from Python took 0.48
ms quiet and 1.21 ms beside a busy process (2.5x); timed here, 0.76 and 0.88 ms (1.16x).
Here graphc loads the runtime itself, as in a user's process that imports graphc and NumPy
only: nothing here imports PyTorch. DATA.npz holds the problem (`param:<name>` arrays, `x`,
`y`), written by benchmarks/peers/graphc.py, since making a conv net's problem imports
PyTorch. WORKLOAD is a key of benchmarks/workloads.py or `digits_cnn`
(examples/digits_cnn.yaml, its Adam step). KIND is `python` (`model.train_step(x=, y=)` or
`model.forward(x=)`) or `bound` (`model.bind`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import graphc

from .timing import Options, Timing, time_python
from .workloads import WORKLOADS

KINDS = ("python", "bound")
ROOT = Path(__file__).resolve().parent.parent   # where `benchmarks` imports from
DIGITS_CNN = "digits_cnn"
DIGITS_CNN_SPEC = ROOT / "examples" / "digits_cnn.yaml"


def problem_arrays(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict:
    """A problem as DATA.npz holds it."""
    return {"x": x, "y": y, **{f"param:{k}": v for k, v in params.items()}}


def call_for(workload_key: str, target: str, kind: str, data: dict[str, np.ndarray]):
    """(model, the call a row times): a model compiled at the problem's params, and
    `model.train_step(x=, y=)` / `model.forward(x=)` (`python`) or its bound call (`bound`)."""
    if workload_key == DIGITS_CNN:
        graph, train = graphc.load(DIGITS_CNN_SPEC), True
    else:
        graph, train = WORKLOADS[workload_key].graph(), WORKLOADS[workload_key].train
    model = graphc.compile(graph, target=target)
    model.set_params({k.split(":", 1)[1]: v for k, v in data.items() if k.startswith("param:")})
    x, y = data["x"], data["y"]
    if kind == "python":
        if train:
            return model, lambda: model.train_step(x=x, y=y)
        return model, lambda: model.forward(x=x)
    bound = model.bind("train_step" if train else "forward", batch=len(x))
    for name, buffer in bound.inputs.items():
        buffer[...] = data[name]
    return model, bound


def command(path, workload_key: str, target: str, kind: str,
            opts: Options) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run this module on DATA.npz `path`."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return ([sys.executable, "-m", "benchmarks.graphc_timing", str(path), workload_key, target,
             kind, json.dumps(dataclasses.asdict(opts))], env)


def timed_apart(path, workload_key: str, target: str, kind: str, opts: Options) -> Timing:
    """A row's Timing, measured by this module in a process of its own on DATA.npz `path`."""
    argv, env = command(path, workload_key, target, kind, opts)
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"graphc's timing process failed:\n{done.stderr[-3000:]}")
    return Timing(**json.loads(done.stdout.splitlines()[-1]))


def main(argv: list[str]) -> None:
    path, key, target, kind, options = argv
    if kind not in KINDS:
        raise SystemExit(f"KIND must be one of {', '.join(KINDS)}, got {kind!r}")
    with np.load(path, allow_pickle=False) as stored:
        data = {k: stored[k] for k in stored.files}
    _, call = call_for(key, target, kind, data)
    timing = time_python(call, Options(**json.loads(options)))
    print(json.dumps(timing.as_dict()))


if __name__ == "__main__":
    main(sys.argv[1:])
