"""A small Python builder producing the same Graph as the equivalent spec.

    b = Builder("mlp")
    x, y = b.input("x", [64]), b.input("y", [10])
    W1, b1 = b.param("W1", [32, 64], init="he_normal"), b.param("b1", [32])
    h1 = b.dense(x, W1, b1, name="h1")           # any op of graphc.ops.OPS is a method
    a1 = b.elementwise(h1, expr="h1 * sigmoid(h1)")
    ...
    g = b.build(outputs=[logits], loss=loss, optimizer={"name": "adam", "lr": 1e-3})

It only assembles a spec dict; `Graph.from_spec` does all the checking.
"""

from __future__ import annotations

import difflib
from typing import Any

from .errors import SpecError
from .graph import Graph
from .ops import OPS


class Builder:
    def __init__(self, name: str):
        self.spec: dict[str, Any] = {"name": name, "inputs": {}, "params": {}, "nodes": {}}
        self._counter = 0

    def _claim(self, section: str, name: str) -> None:
        # The spec is a dict per section: a repeated name would silently replace the first.
        if name in self.spec[section]:
            raise SpecError(f"name '{name}' is declared twice", node=name, field=section)

    def input(self, name: str, shape, dtype: str | None = None) -> str:
        """A batched input of per-example `shape`; `dtype="int32"` for indices (an
        embedding's rows, class indices), else the model's floating type."""
        self._claim("inputs", name)
        self.spec["inputs"][name] = {"shape": list(shape)}
        if dtype is not None:
            self.spec["inputs"][name]["dtype"] = dtype
        return name

    def param(self, name: str, shape, init: str | None = None, *, trainable: bool = True,
              **init_args) -> str:
        """A param; `trainable=False` for a running statistic (batch_norm's running_mean
        and running_var), which the train step updates instead of the optimizer."""
        self._claim("params", name)
        d: dict[str, Any] = {"shape": list(shape)}
        if init is not None:
            d["init"] = init
        if trainable is not True:   # Graph.from_spec checks it
            d["trainable"] = trainable
        self.spec["params"][name] = {**d, **init_args}
        return name

    def op(self, op: str, *inputs: str, name: str | None = None, **attrs) -> str:
        if name is None:
            name = f"{op}_{self._counter}"
            self._counter += 1
        self._claim("nodes", name)
        self.spec["nodes"][name] = {"op": op, "inputs": list(inputs), **attrs}
        return name

    def __getattr__(self, attr: str):
        # Only reached for names that are not attributes: the ops are methods (below).
        close = difflib.get_close_matches(attr, OPS, n=3) if not attr.startswith("_") else []
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise AttributeError(f"Builder has no op or method {attr!r}{hint} (the ops are "
                             "graphc.ops.OPS, listed in README.md under 'The spec')")

    def build(self, outputs=(), loss: str | None = None, optimizer: dict | None = None) -> Graph:
        spec = dict(self.spec, outputs=list(outputs))
        if loss is not None:
            spec["loss"] = loss
        if optimizer is not None:
            spec["optimizer"] = optimizer
        return Graph.from_spec(spec)


def _op_method(op: str):
    def method(self, *inputs: str, name: str | None = None, **attrs) -> str:
        return self.op(op, *inputs, name=name, **attrs)
    method.__name__ = method.__qualname__ = op
    attrs = ", ".join(f"{a}={v.default!r}" if not v.required else a
                      for a, v in OPS[op].attrs.items())
    method.__doc__ = f"Node `{op}`: {OPS[op].doc}." + (f" Attributes: {attrs}." if attrs else "")
    return method


# Every op a real method: listed by dir() and help(), completed by editors.
for _op in OPS:
    assert not hasattr(Builder, _op), f"op {_op!r} shadows a Builder method"
    setattr(Builder, _op, _op_method(_op))
