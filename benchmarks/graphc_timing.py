"""graphc's rows from Python, timed in a process of their own.

    python -m benchmarks.graphc_timing DATA.npz WORKLOAD TARGET KIND OPTIONS_JSON

`python -m benchmarks` starts this for each measurement of a `graphc ... (Python)` or
`(bound call)` row and reads the Timing it prints as JSON. Its own process has imported
PyTorch for the peers' rows, and PyTorch brings its copy of libgomp, under the soname every
OpenMP module asks for (libgomp.so.1): the runtime a graphc module loaded later shares,
started with libgomp's default wait (idle threads spin 300,000 rounds), not graphc's passive
one (codegen/openmp.py). Timed there on a 2-core Zen 5 VM, W3's step from Python took 0.48
ms quiet and 1.21 ms beside a busy process (2.5x); timed here, 0.76 and 0.88 ms (1.16x).
Here graphc loads the runtime itself, as in a user's process that imports graphc and NumPy
only: nothing here imports PyTorch. DATA.npz holds the problem (`param:<name>` arrays, `x`,
`y`), written by benchmarks/peers/graphc.py, since making a conv net's problem imports
PyTorch. KIND is `python` (`model.train_step(x=, y=)` or `model.forward(x=)`) or `bound`
(`model.bind`).
"""

from __future__ import annotations

import json
import sys

import numpy as np

import graphc

from .timing import Options, time_python
from .workloads import WORKLOADS

KINDS = ("python", "bound")


def call_for(workload_key: str, target: str, kind: str, data: dict[str, np.ndarray]):
    """The call a row times, on a model compiled here at the problem's params."""
    w = WORKLOADS[workload_key]
    model = graphc.compile(w.graph(), target=target)
    model.set_params({k.split(":", 1)[1]: v for k, v in data.items() if k.startswith("param:")})
    x, y = data["x"], data["y"]
    if kind == "python":
        if w.train:
            return lambda: model.train_step(x=x, y=y)
        return lambda: model.forward(x=x)
    bound = model.bind("train_step" if w.train else "forward", batch=w.batch)
    for name, buffer in bound.inputs.items():
        buffer[...] = data[name]
    return bound


def main(argv: list[str]) -> None:
    path, key, target, kind, options = argv
    if kind not in KINDS:
        raise SystemExit(f"KIND must be one of {', '.join(KINDS)}, got {kind!r}")
    with np.load(path, allow_pickle=False) as stored:
        data = {k: stored[k] for k in stored.files}
    timing = time_python(call_for(key, target, kind, data), Options(**json.loads(options)))
    print(json.dumps(timing.as_dict()))


if __name__ == "__main__":
    main(sys.argv[1:])
