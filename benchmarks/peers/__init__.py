"""The peers: one module each, with the same two functions.

- `version()`: the installed version, or `Skip` with a note when the peer is missing.
- `runners(problem, workdir)`: a `Runner` per variant timed (e.g. torch on one thread and
  on the default number), each solving `problem` (benchmarks/workloads.py), or `Skip`
  for a workload the peer does not run (NumPy, CasADi and PyTensor run the MLPs only).

A runner's `results()` runs on fresh state and returns what `workloads.check` compares
with graphc's: the losses returned by the first two steps (before and after one update)
for a train step, the logits for a forward pass. Then `time(opts)` times the same call
(benchmarks/timing.py). `kind` says which graphc figure the peer is compared with: "c"
(pure C, graphc's timing harness) or "python" (graphc from Python).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..timing import Options, Timing

NAMES = ("numpy", "torch", "torch_compile", "jax", "onnxruntime", "casadi", "pytensor", "graphc")


class Skip(Exception):
    """This peer or variant cannot run here; the message is the table's note."""


@dataclass
class Runner:
    label: str
    kind: str                                # "python" or "c"
    results: Callable[[], dict]
    time: Callable[[Options], Timing]
    notes: str = ""


def mlp_only(problem) -> None:
    """Skip a peer written for the MLP workloads (W1-W4) only."""
    if problem.workload.model != "mlp":
        raise Skip("written for the MLP workloads only")


def load(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown peer {name!r} (peers: {', '.join(NAMES)})")
    return importlib.import_module(f"{__name__}.{name}")
