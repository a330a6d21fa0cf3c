"""Idiomatic NumPy: the forward pass, the backward pass written out, SGD in place; float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..timing import time_python
from ..workloads import LR, Problem
from . import Runner, mlp_only


def version() -> str:
    return np.__version__


def forward(layers, x) -> list[np.ndarray]:
    """The input and every layer's output (after ReLU for hidden layers); logits last."""
    acts = [x]
    for k, (W, b) in enumerate(layers):
        h = acts[-1] @ W.T + b
        acts.append(np.maximum(h, 0) if k < len(layers) - 1 else h)
    return acts


def train_step(layers, x, labels) -> float:
    acts = forward(layers, x)
    z, n = acts[-1], len(x)
    rows = np.arange(n)
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - z[rows, labels]))
    d = e / s
    d[rows, labels] -= 1
    d /= n
    for k in reversed(range(len(layers))):
        W, b = layers[k]
        gW, gb = d.T @ acts[k], d.sum(axis=0)
        if k:
            d = (d @ W) * (acts[k] > 0)
        W -= LR * gW
        b -= LR * gb
    return loss


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    mlp_only(problem)
    layers = [(W.copy(), b.copy()) for W, b in problem.layers]
    x, labels = problem.x, problem.labels
    if problem.workload.train:
        def call():
            return train_step(layers, x, labels)

        def results():
            return {"losses": [call(), call()]}
    else:
        def call():
            return forward(layers, x)[-1]

        def results():
            return {"logits": call()}
    return [Runner("NumPy", "python", results, lambda opts: time_python(call, opts))]
