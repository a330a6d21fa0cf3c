"""JAX: `jax.jit` of the whole step (forward, `jax.value_and_grad`, SGD) with the params
donated, or of the forward pass. CPU, float32, XLA's default threading.

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


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    import jax
    import jax.numpy as jnp

    def logits(params, x):
        for k, (W, b) in enumerate(params):
            x = x @ W.T + b
            if k < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    def loss_fn(params, x, y):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits(params, x)), axis=1))

    @jax.jit
    def forward(params, x):
        return logits(params, x)

    def sgd_step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), loss

    step = jax.jit(sgd_step, donate_argnums=0)
    return [_runner(problem, step, forward, True), _runner(problem, step, forward, False)]


def _runner(problem: Problem, step, forward, pipelined: bool) -> Runner:
    """A runner with its own params (a fresh start for its check)."""
    import jax
    import jax.numpy as jnp

    state = {"params": [(jnp.asarray(W), jnp.asarray(b)) for W, b in problem.layers], "out": None}
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
