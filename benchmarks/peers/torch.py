"""PyTorch eager, idiomatic: an `nn.Module` per workload (MLPs and LeNet-5 as `nn.Sequential`
of `nn.Linear`, `nn.Conv2d`, `nn.ReLU`, `nn.MaxPool2d`; ResNet-8 and DS-CNN as
examples/tiny/torch_models.py writes them in `torch.nn.functional`, eval mode), graphc's
params copied in; a step is `F.cross_entropy` on the class indices, `backward`,
`torch.optim.SGD`; a forward pass runs under `torch.inference_mode()`. Timed on one thread
and on torch's default number of threads. benchmarks/peers/torch_compile.py times the same
modules through `torch.compile`."""

from __future__ import annotations

from pathlib import Path

from ..machine import torch_threads
from ..timing import time_python
from ..workloads import LR, Problem, torch_models
from . import Runner, Skip

# LeNet-5's nn.Sequential index -> (weight, bias) in benchmarks/lenet5.yaml
LENET5 = {0: ("K1", "k1"), 3: ("K2", "k2"), 7: ("W3", "b3"), 9: ("W4", "b4"), 11: ("W5", "b5")}


def version() -> str:
    try:
        import torch
    except ImportError:
        raise Skip("not installed (pip install '.[bench]')") from None
    return torch.__version__


def lenet5(params: dict | None = None):
    """LeNet-5 as benchmarks/lenet5.yaml declares it; torch's initial weights unless `params`
    (the spec's names) are given."""
    from torch import nn
    net = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                        nn.Linear(84, 10))
    if params is not None:
        _copy(net, {i: (params[w], params[b]) for i, (w, b) in LENET5.items()})
    return net


def _copy(net, weights: dict) -> None:
    import torch
    with torch.no_grad():
        for i, (w, b) in weights.items():
            net[i].weight.copy_(torch.from_numpy(w))
            net[i].bias.copy_(torch.from_numpy(b))


def module(problem: Problem):
    """The workload's net with the problem's params."""
    import torch
    from torch import nn
    model = problem.workload.model
    if model == "mlp":
        layers = []
        for k, (W, b) in enumerate(problem.layers):
            layers += [nn.Linear(W.shape[1], W.shape[0])] + \
                ([nn.ReLU()] if k < len(problem.layers) - 1 else [])
        net = nn.Sequential(*layers)
        _copy(net, {2 * k: Wb for k, Wb in enumerate(problem.layers)})
        return net
    if model == "lenet5":
        return lenet5(problem.params)
    if model in torch_models().MODELS:
        class Functional(nn.Module):
            def __init__(self):
                super().__init__()
                self.P = nn.ParameterDict({k: nn.Parameter(torch.from_numpy(v.copy()))
                                           for k, v in problem.params.items()})

            def forward(self, x):
                return torch_models().forward(model, self.P, x)
        return Functional().eval()
    raise Skip(f"no PyTorch version of {model}")


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    import torch
    default = torch.get_num_threads()
    return [runner(problem, 1, "PyTorch eager, 1 thread"),
            runner(problem, default, f"PyTorch eager, {default} threads (default)")]


def runner(problem: Problem, threads: int, label: str, compile_net=None, notes: str = "") -> Runner:
    """A runner with its own net (a fresh start for its check); `compile_net(net)` gives
    the callable used in its place (torch.compile)."""
    import torch
    import torch.nn.functional as F
    net = module(problem)
    fn = compile_net(net) if compile_net else net
    x = torch.from_numpy(problem.x)
    labels = torch.from_numpy(problem.labels)
    if problem.workload.train:
        if problem.workload.model not in ("mlp", "lenet5"):
            raise Skip(f"{problem.workload.model} is benchmarked for inference only")
        opt = torch.optim.SGD(net.parameters(), lr=LR)

        def call():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(x), labels)
            loss.backward()
            opt.step()
            return loss

        def results():
            with torch_threads(threads):
                return {"losses": [call().item(), call().item()]}
    else:
        def call():
            with torch.inference_mode():
                return fn(x)

        def results():
            with torch_threads(threads):
                return {"logits": call().numpy()}

    def timed(opts):
        with torch_threads(threads):
            return time_python(call, opts)
    return Runner(label, "python", results, timed, notes)
