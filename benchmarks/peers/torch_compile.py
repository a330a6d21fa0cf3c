"""PyTorch through `torch.compile` (TorchInductor, CPU): benchmarks/peers/torch.py's modules
compiled with the default mode; a step runs the compiled forward and its compiled backward,
then the eager `torch.optim.SGD`. Compiled on the first call of the check, outside the clock;
timed on torch's default number of threads. Where it cannot compile (no C++ compiler, an
unsupported op), the row is skipped with the error."""

from __future__ import annotations

from pathlib import Path

from ..workloads import Problem
from . import Runner
from . import torch as eager


def version() -> str:
    return eager.version()


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    import torch
    threads = torch.get_num_threads()
    return [eager.runner(problem, threads, f"PyTorch torch.compile, {threads} threads (default)",
                         torch.compile, "inductor, mode default")]
