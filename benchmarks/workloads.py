"""The workloads of issue 6 and the one problem every peer solves for each.

An MLP with ReLU hidden layers, softmax cross-entropy on one-hot targets (batch mean) and
plain SGD (lr 0.01), in float32. Every peer starts from the same params and gets the same
batch (`problem`), and must reproduce graphc's float32 losses (train step) or logits
(forward) to `CHECK_RTOL` before it is timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LR = 0.01
CHECK_RTOL = 1e-4


@dataclass(frozen=True)
class Workload:
    key: str
    sizes: tuple[int, ...]   # input, hidden..., classes
    batch: int
    train: bool              # one SGD step (forward, backward, update), else forward only

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


WORKLOADS = {
    "W1": Workload("W1", (64, 32, 10), 1, True),
    "W2": Workload("W2", (64, 32, 10), 1, False),
    "W3": Workload("W3", (784, 256, 128, 10), 128, True),
    "W4": Workload("W4", (784, 256, 128, 10), 128, False),
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
    """Initial params and one batch, float32. `layers[k] = (W [out, in], b [out])`."""
    workload: Workload
    layers: list[tuple[np.ndarray, np.ndarray]]
    x: np.ndarray        # (batch, in)
    labels: np.ndarray   # (batch,) int64
    y: np.ndarray        # (batch, classes) one-hot
    # graphc's float32 results, filled in by the graphc peer before any other peer runs:
    # {"losses": [before, after one step]} or {"logits": array}
    expected: dict | None = None

    def graphc_params(self) -> dict[str, np.ndarray]:
        out = {}
        for k, (W, b) in enumerate(self.layers):
            out[f"W{k}"], out[f"b{k}"] = W, b
        return out

    def flat(self) -> np.ndarray:
        """W0, b0, W1, b1, ... each row-major, one float32 vector."""
        return np.concatenate([a.ravel() for W, b in self.layers for a in (W, b)])


def problem(w: Workload, seed: int = 0) -> Problem:
    """He-normal weights and small nonzero biases (so broadcasting matters from the first
    step), standard-normal inputs, uniform random labels."""
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(0.0, np.sqrt(2.0 / i), (o, i)).astype(np.float32),
               rng.uniform(-0.1, 0.1, o).astype(np.float32)) for i, o in w.layers]
    x = rng.standard_normal((w.batch, w.sizes[0])).astype(np.float32)
    labels = rng.integers(0, w.sizes[-1], w.batch)
    y = np.eye(w.sizes[-1], dtype=np.float32)[labels]
    return Problem(w, layers, x, labels, y)


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
