"""PyTorch eager, idiomatic: `nn.Sequential` of `nn.Linear` and `nn.ReLU`, `F.cross_entropy`,
`torch.optim.SGD`; forward under `torch.inference_mode()`. Timed on one thread and on
torch's default number of threads."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..timing import time_python
from ..workloads import LR, Problem
from . import Runner, Skip


def version() -> str:
    try:
        import torch
    except ImportError:
        raise Skip("not installed (pip install '.[bench]')") from None
    return torch.__version__


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    import torch
    default = torch.get_num_threads()
    return [_runner(problem, 1, "PyTorch eager, 1 thread"),
            _runner(problem, default, f"PyTorch eager, {default} threads (default)")]


def _runner(problem: Problem, threads: int, label: str) -> Runner:
    import torch
    import torch.nn.functional as F

    @contextmanager
    def on_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    modules = []
    for k, (W, b) in enumerate(problem.layers):
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        modules += [lin] + ([torch.nn.ReLU()] if k < len(problem.layers) - 1 else [])
    net = torch.nn.Sequential(*modules)
    x = torch.from_numpy(problem.x)
    labels = torch.from_numpy(problem.labels)
    if problem.workload.train:
        opt = torch.optim.SGD(net.parameters(), lr=LR)

        def call():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), labels)
            loss.backward()
            opt.step()
            return loss

        def results():
            with on_threads():
                return {"losses": [call().item(), call().item()]}
    else:
        def call():
            with torch.inference_mode():
                return net(x)

        def results():
            with on_threads():
                return {"logits": call().numpy()}

    def timed(opts):
        with on_threads():
            return time_python(call, opts)
    return Runner(label, "python", results, timed)
