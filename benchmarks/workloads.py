"""The workloads of issues 6 and 15 and the one problem every peer solves for each.

W1-W4: an MLP with ReLU hidden layers, softmax cross-entropy on one-hot targets (batch mean)
and plain SGD (lr 0.01). W5-W7: convolutional nets from their specs (`ConvWorkload`):
LeNet-5's SGD step (benchmarks/lenet5.yaml), MLPerf Tiny's ResNet-8 and DS-CNN inference
(examples/tiny). All in float32. Every peer starts from the same params and gets the same
batch (`problem`), and must reproduce graphc's float32 losses (train step) or logits
(forward) to `CHECK_RTOL` before it is timed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

LR = 0.01
CHECK_RTOL = 1e-4
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Workload:
    key: str
    sizes: tuple[int, ...]   # input, hidden..., classes
    batch: int
    train: bool              # one SGD step (forward, backward, update), else forward only
    model = "mlp"

    @property
    def title(self) -> str:
        what = "train step" if self.train else "forward"
        return f"MLP {'-'.join(map(str, self.sizes))}, batch {self.batch}, {what}"

    @property
    def layers(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each dense layer."""
        return list(zip(self.sizes, self.sizes[1:]))

    def flops(self) -> int:
        """Multiply-adds ×2 of the matrix products: the forward's, and for a step also the
        weight gradients and the gradients of every layer's input but the first."""
        fwd = sum(i * o for i, o in self.layers)
        if not self.train:
            return 2 * self.batch * fwd
        first = self.sizes[0] * self.sizes[1]
        return 2 * self.batch * (3 * fwd - first)

    def graph(self):
        import graphc
        return graphc.Graph.from_spec(spec(self.sizes))


@dataclass(frozen=True)
class ConvWorkload:
    """A convolutional net from its spec (input `x`, target `y`, output `logits`), with SGD
    at `LR` for a train step."""
    key: str
    model: str    # lenet5, resnet8 or ds_cnn: the peers' own versions are chosen by it
    name: str     # for the title
    batch: int
    train: bool

    @property
    def path(self) -> Path:
        if self.model == "lenet5":
            return Path(__file__).resolve().parent / "lenet5.yaml"
        return EXAMPLES / "tiny" / f"{self.model}.yaml"

    @property
    def title(self) -> str:
        shape = "×".join(map(str, self.graph().inputs["x"].shape))
        return f"{self.name} ({shape}), batch {self.batch}, {'SGD step' if self.train else 'forward'}"

    def graph(self):
        """The spec's graph; a trained one's spec says SGD at `LR` (benchmarks/lenet5.yaml)."""
        import graphc
        return graphc.load(self.path)

    def flops(self) -> int:
        """Multiply-adds ×2 of the convolutions and dense layers (padding's zeros included):
        the forward's, and for a step the weight gradients and the input gradients of every
        layer but the first too."""
        graph = self.graph()
        macs = []
        for v in graph.values.values():
            if v.op == "conv2d":
                _, w = v.inputs[:2]
                macs.append(int(np.prod(v.shape)) * int(np.prod(graph.values[w].shape[1:])))
            elif v.op == "dense":
                macs.append(int(np.prod(v.shape)) * graph.values[v.inputs[1]].shape[1])
        total = sum(macs) if not self.train else 3 * sum(macs) - macs[0]
        return 2 * self.batch * total


WORKLOADS = {
    "W1": Workload("W1", (64, 32, 10), 1, True),
    "W2": Workload("W2", (64, 32, 10), 1, False),
    "W3": Workload("W3", (784, 256, 128, 10), 128, True),
    "W4": Workload("W4", (784, 256, 128, 10), 128, False),
    "W5": ConvWorkload("W5", "lenet5", "LeNet-5", 64, True),
    "W6.1": ConvWorkload("W6.1", "resnet8", "ResNet-8", 1, False),
    "W6.64": ConvWorkload("W6.64", "resnet8", "ResNet-8", 64, False),
    "W7": ConvWorkload("W7", "ds_cnn", "DS-CNN", 1, False),
}


def spec(sizes, name: str = "mlp") -> dict:
    """The graphc spec: dense layers W{k} ([out, in]) and b{k}, relu between, SGD."""
    params, nodes, h = {}, {}, "x"
    for k, (i, o) in enumerate(zip(sizes, sizes[1:])):
        params[f"W{k}"] = {"shape": [o, i], "init": "he_normal"}
        params[f"b{k}"] = {"shape": [o], "init": "zeros"}
        nodes[f"h{k}"] = {"op": "dense", "inputs": [h, f"W{k}", f"b{k}"]}
        h = f"h{k}"
        if k < len(sizes) - 2:
            nodes[f"a{k}"] = {"op": "relu", "inputs": [h]}
            h = f"a{k}"
    nodes["loss"] = {"op": "softmax_cross_entropy", "inputs": [h, "y"]}
    return {"name": name, "inputs": {"x": [sizes[0]], "y": [sizes[-1]]}, "params": params,
            "nodes": nodes, "outputs": [h], "loss": "loss",
            "optimizer": {"name": "sgd", "lr": LR}}


@dataclass
class Problem:
    """Initial params (graphc's names) and one batch, float32."""
    workload: Workload | ConvWorkload
    params: dict[str, np.ndarray]
    x: np.ndarray        # (batch, *input shape)
    labels: np.ndarray   # (batch,) int64
    y: np.ndarray        # the target graphc's `y` takes: one-hot, or int32 class indices
    # graphc's float32 results, filled in by the graphc peer before any other peer runs:
    # {"losses": [before, after one step]} or {"logits": array}
    expected: dict | None = None

    @property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """An MLP's `(W [out, in], b [out])` per layer."""
        return [(self.params[f"W{k}"], self.params[f"b{k}"])
                for k in range(len(self.workload.layers))]

    def graphc_params(self) -> dict[str, np.ndarray]:
        return self.params

    def flat(self) -> np.ndarray:
        """W0, b0, W1, b1, ... each row-major, one float32 vector."""
        return np.concatenate([a.ravel() for W, b in self.layers for a in (W, b)])


def problem(w: Workload | ConvWorkload, seed: int = 0) -> Problem:
    """Standard-normal inputs and uniform random labels. An MLP's weights are He-normal
    with small nonzero biases (so broadcasting matters from the first step); a conv net's
    are its initializers' with every bias and batch norm drawn at random
    (examples/tiny/torch_models.py: `varied_params`), so that no layer is an identity."""
    rng = np.random.default_rng(seed)
    graph = w.graph()
    if isinstance(w, Workload):
        params = {}
        for k, (i, o) in enumerate(w.layers):
            params[f"W{k}"] = rng.normal(0.0, np.sqrt(2.0 / i), (o, i)).astype(np.float32)
            params[f"b{k}"] = rng.uniform(-0.1, 0.1, o).astype(np.float32)
    else:
        params = {k: v.astype(np.float32) for k, v in
                  torch_models().varied_params(graph, seed).items()}
    x = rng.standard_normal((w.batch, *graph.inputs["x"].shape)).astype(np.float32)
    classes = graph.values[graph.outputs[0]].shape[-1]
    labels = rng.integers(0, classes, w.batch)
    y = labels.astype(np.int32) if graph.inputs["y"].dtype == "int32" else \
        np.eye(classes, dtype=np.float32)[labels]
    return Problem(w, params, x, labels, y)


@lru_cache(maxsize=None)
def torch_models():
    """examples/tiny/torch_models.py (a file, not a package): the MLPerf Tiny models in
    PyTorch and `varied_params`."""
    loader = importlib.util.spec_from_file_location("torch_models",
                                                    EXAMPLES / "tiny" / "torch_models.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def rel_error(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(problem: Problem, got: dict) -> float:
    """A peer's relative error against graphc's results (losses or logits)."""
    key = "losses" if problem.workload.train else "logits"
    return rel_error(got[key], problem.expected[key])
