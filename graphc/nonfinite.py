"""When training meets a NaN or infinite loss or gradient: which tensor went first, in words.

The generated train step refuses such a step itself (params, optimizer state and step count
unchanged, NaN returned; see its header comment), so the check costs one pass over the
gradients in C and a float comparison in Python. Only then does `fit` come here: the
failed batch is run again, at the unchanged params, through the NumPy reference in the
model's dtype (every activation, in graph order, the loss among them) and through the C's
own `gradients`, and the first tensor holding a NaN or an infinity is named.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .errors import GraphcError, InputError, NonFiniteError
from .verify import describe_nonfinite

ON_NONFINITE = ("raise", "warn", "ignore")


def check_on_nonfinite(value) -> str:
    if value not in ON_NONFINITE:
        raise InputError(f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, "
                         f"got {value!r}")
    return value


def first_nonfinite(model, batch: dict) -> tuple[str, str]:
    """(name, what it holds in words) of the first tensor that is not finite when `model`
    takes gradients on `batch` at its current params: a param, an activation or the loss
    (graph order, from the NumPy reference in the model's dtype), else the C's loss, else a
    gradient from the C (param order). ("", why not) when none is."""
    from .reference import Reference
    graph, dtype = model.graph, model.dtype.name
    params = model.get_params()
    for name, p in params.items():
        if not np.all(np.isfinite(p)):
            return name, f"param '{name}' {describe_nonfinite(p)}"
    try:
        ref = Reference(graph, dtype=dtype)
        ref.set_params(params)
        ref._step = model._step_count()   # dropout draws the masks of the step refused
        with np.errstate(all="ignore"):
            values = ref.training_values(**batch)
    except GraphcError:   # an op the reference lacks: the C's numbers below still tell
        values = {}
    for name, v in graph.nodes.items():
        a = values.get(name)
        if a is not None and a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            role = "the loss" if name == graph.loss else "activation"
            return name, (f"{role} '{name}' ({v.op}) {describe_nonfinite(a)}, recomputed by "
                          f"the NumPy reference in {dtype}")
    loss, grads = model.gradients(**batch)
    if not math.isfinite(loss):
        return graph.loss, f"the loss '{graph.loss}' is {loss} (its batch mean, in the C)"
    for name, g in grads.items():
        if not np.all(np.isfinite(g)):
            return name, f"the gradient of '{name}' {describe_nonfinite(g)} (in the C)"
    return "", "no loss or gradient is NaN or infinite when the batch is run again"


class NonFiniteGuard:
    """`fit`'s response to a step the C refused: raise NonFiniteError naming the first
    non-finite tensor, warn once per fit, or carry on silently. Either way the step changed
    nothing (the C refuses it)."""

    def __init__(self, model, on_nonfinite: str):
        self.model, self.policy = model, check_on_nonfinite(on_nonfinite)
        self.refused = 0   # steps the C refused in this fit

    def __call__(self, batch: dict, epoch: int, step: int) -> None:
        """A refused step: `epoch` and `step` (within the epoch) count from 1."""
        self.refused += 1
        if self.policy == "ignore" or (self.policy == "warn" and self.refused > 1):
            return
        name, what = first_nonfinite(self.model, batch)
        where = f"epoch {epoch}, step {step}"
        if self.policy == "raise":
            raise NonFiniteError(
                f"training stopped at {where}: {what}. The step was not applied: params and "
                f"optimizer state are as before it. (fit(on_nonfinite=\"warn\") or \"ignore\" "
                f"skips such steps and goes on.)", epoch=epoch, step=step, tensor=name)
        warnings.warn(f"non-finite step at {where}: {what}. Steps like it are skipped (not "
                      f"applied); this warning is not repeated in this fit.", RuntimeWarning,
                      stacklevel=3)
