"""JAX: `jax.jit` of the whole step (forward, `jax.value_and_grad`, SGD) with the params
donated, or of the forward pass. CPU, float32, XLA's default threading.

The net is the workload's graph written in `jax.numpy` and `jax.lax` (`logits`), one
line per op: dense `x @ W.T + b`, conv2d `lax.conv_general_dilated` (NCHW, OIHW, feature
groups), max pooling `lax.reduce_window`, batch norm with its running statistics (eval
mode), global average pooling as a mean; no other op is written (such a workload is
skipped). The loss is the batch mean of softmax cross-entropy through
`jax.nn.log_softmax`.

Timed twice: as a training loop runs it, dispatching calls asynchronously with one
`block_until_ready` at the end of each repeat (the faster figure, the one the targets
are held to), and with `block_until_ready` after every call (the latency of one call)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..timing import time_python
from ..workloads import LR, Problem
from . import Runner, Skip


def version() -> str:
    try:
        import jax
        import jaxlib
    except ImportError:
        raise Skip("not installed (pip install '.[bench]')") from None
    return f"{jax.__version__} (jaxlib {jaxlib.__version__})"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _ops():
    """op -> f(attrs, *inputs) on batched NCHW values; params as their own shapes."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv2d(a, x, w, b=None):
        # "same" pads an odd total one more after, as torch and XLA both do
        pad = a["padding"].upper() if isinstance(a["padding"], str) else \
            [(p, p) for p in _pair(a["padding"])]
        y = lax.conv_general_dilated(x, w, _pair(a["stride"]), pad,
                                     rhs_dilation=_pair(a["dilation"]),
                                     feature_group_count=a["groups"],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y if b is None else y + b[:, None, None]

    def max_pool2d(a, x):
        k = _pair(a["kernel_size"])
        s = _pair(a["stride"] or a["kernel_size"])
        pad = _pair(a["padding"])
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, *k), (1, 1, *s),
                                 [(0, 0), (0, 0), *[(p, p) for p in pad]])

    def batch_norm(a, x, g, s, m, v):
        scale = g * lax.rsqrt(v + a["eps"])
        return x * scale[:, None, None] + (s - m * scale)[:, None, None]

    return {"dense": lambda a, x, W, b=0.0: x @ W.T + b,
            "relu": lambda a, x: jax.nn.relu(x),
            "add": lambda a, x, y: x + y,
            "flatten": lambda a, x: x.reshape(x.shape[0], -1),
            "global_avg_pool": lambda a, x: x.mean(axis=tuple(range(2, x.ndim))),
            "dropout": lambda a, x: x,   # forward passes only (checked in `runners`)
            "conv2d": conv2d, "max_pool2d": max_pool2d, "batch_norm": batch_norm}


def logits_fn(graph, train: bool):
    """`logits(params, x)`: the graph's nodes up to its output, in topological order."""
    ops = _ops()
    needed = graph.ancestors(graph.outputs)
    nodes = [v for k, v in graph.values.items() if v.kind == "node" and k in needed]
    for v in nodes:
        if v.op not in ops or (train and v.op in ("dropout", "batch_norm")):
            raise Skip(f"op {v.op!r} is not written for JAX here"
                       + (" in a train step" if v.op in ops else ""))

    def logits(params, x):
        env = dict(params, x=x)
        for v in nodes:
            env[v.name] = ops[v.op](v.attrs, *(env[i] for i in v.inputs))
        return env[graph.outputs[0]]
    return logits


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    import jax
    import jax.numpy as jnp
    graph = problem.workload.graph()
    logits = logits_fn(graph, problem.workload.train)
    trainable = {p for p, v in graph.params.items() if v.trainable}

    def loss_fn(params, x, y):
        log_p = jax.nn.log_softmax(logits(params, x))
        if y.ndim == 1:   # class indices
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))
        return -jnp.mean(jnp.sum(y * log_p, axis=1))

    @jax.jit
    def forward(params, x):
        return logits(params, x)

    def sgd_step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return {k: p - LR * grads[k] if k in trainable else p for k, p in params.items()}, loss

    step = jax.jit(sgd_step, donate_argnums=0)
    return [_runner(problem, step, forward, True), _runner(problem, step, forward, False)]


def _runner(problem: Problem, step, forward, pipelined: bool) -> Runner:
    """A runner with its own params (a fresh start for its check)."""
    import jax
    import jax.numpy as jnp

    state = {"params": {k: jnp.asarray(v) for k, v in problem.params.items()}, "out": None}
    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)
    if problem.workload.train:
        def call():
            state["params"], state["out"] = step(state["params"], x, y)
    else:
        def call():
            state["out"] = forward(state["params"], x)

    def sync():
        jax.block_until_ready((state["params"], state["out"]))

    def blocking():
        call()
        sync()

    def results():
        if problem.workload.train:
            losses = []
            for _ in range(2):
                blocking()
                losses.append(float(state["out"]))
            return {"losses": losses}
        blocking()
        return {"logits": np.asarray(state["out"])}

    device = f"device {jax.devices()[0]}"
    if pipelined:
        return Runner("JAX jit", "python", results, lambda opts: time_python(call, opts, sync),
                      device + "; block_until_ready once per repeat")
    return Runner("JAX jit, blocking every call", "python", results,
                  lambda opts: time_python(blocking, opts), device)
