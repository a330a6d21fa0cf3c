"""The NumPy reference: a Graph run by hand-written NumPy forwards and VJPs.

This is the oracle the generated C is checked against, so it is written independently of
the SymPy formulas in `graphc.ops`: every op has its own NumPy forward and its own
vector-Jacobian product here. The one exception is `elementwise`, whose math *is* a user
formula: it is evaluated with `sympy.lambdify` and differentiated with `sympy.diff`.

Internally every array carries a leading batch axis: of size n for batched values and of
size 1 for unbatched ones (params, and nodes that depend on params only). Broadcasting of
per-example shapes is then NumPy's broadcasting once the per-example ranks are aligned by
inserting singleton axes *after* the batch axis, and the batch axis itself broadcasts 1
against n. A VJP hands back a cotangent of the broadcast shape, which `_unbroadcast` sums
onto the operand's shape - over the batch axis too when the operand is a param.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy as sp

from .dtypes import DTYPES
from .errors import GraphcError, InputError
from .functions import for_lambdify, numpy_namespace
from .graph import Graph
from .init import init_params
from .optim import check_optimizer



# ---------------------------------------------------------------- broadcasting helpers

def _align(a: np.ndarray, rank: int) -> np.ndarray:
    """`a` with singleton axes inserted after the batch axis up to per-example rank `rank`."""
    return a.reshape(a.shape[:1] + (1,) * (rank - (a.ndim - 1)) + a.shape[1:])


def _aligned(args: list[np.ndarray]) -> list[np.ndarray]:
    rank = max(a.ndim for a in args) - 1
    return [_align(a, rank) for a in args]


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum the cotangent `g` onto an operand of (lifted) `shape` that broadcast to g's shape."""
    target = shape[:1] + (1,) * (g.ndim - len(shape)) + shape[1:]
    axes = tuple(k for k, (gd, d) in enumerate(zip(g.shape, target)) if d == 1 and gd != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _axis(axis: int, x: np.ndarray) -> int:
    """A per-example axis (negative allowed) as an axis of the lifted array."""
    return axis % (x.ndim - 1) + 1


def _example_axes(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _per_example_mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=_example_axes(x))


def _expand_to(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-example scalar cotangent (batch axis only) shaped to broadcast against `x`."""
    return g.reshape(g.shape + (1,) * (x.ndim - 1))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only, so nothing overflows for large |x|.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


# ---------------------------------------------------------------- ops
# forward(args, attrs) -> out;  vjp(g, args, out, attrs) -> [cotangent or None per arg].
# Arrays are lifted (batch axis first); a VJP's cotangents have their argument's shape.

@dataclass(frozen=True)
class _Op:
    forward: Callable[..., np.ndarray]
    vjp: Callable[..., list]


def _binary(fn, partials) -> _Op:
    """A broadcasting binary op; `partials(g, a, b)` gives the cotangents before summing."""
    def forward(args, attrs):
        return fn(*_aligned(args))

    def vjp(g, args, out, attrs):
        return [_unbroadcast(p, x.shape) for p, x in zip(partials(g, *_aligned(args)), args)]
    return _Op(forward, vjp)


def _unary(fn, derivative) -> _Op:
    """`derivative(x, y, attrs)` is dy/dx elementwise, given the input and the output."""
    def forward(args, attrs):
        return fn(args[0], attrs)

    def vjp(g, args, out, attrs):
        return [g * derivative(args[0], out, attrs)]
    return _Op(forward, vjp)


# NumPy has no erf, and lambdify's fallback (math.erf) takes scalars only. Formulas keep
# sigmoid, softplus and relu as functions (graphc.functions), evaluated in stable forms.
_NUMPY = [{**numpy_namespace(), "erf": np.vectorize(math.erf, otypes=[float])}, "numpy"]


def _floating(expr: sp.Expr) -> sp.Expr:
    """Integers beyond a double's exact range as floats: NumPy has no ufunc for a Python
    int past 64 bits (log(10**20) would raise)."""
    big = {a: sp.Float(a) for a in expr.atoms(sp.Integer) if abs(a) > 2**53}
    return expr.xreplace(big) if big else expr


class _Formula:
    """An `elementwise` node's formula, lambdified with its partial derivatives.

    A value used twice as an input (`inputs: [x, x]`) is one symbol in the formula, so
    its partial derivative already is the total one: it is returned once, at the first
    position, and the repeats get None (the backward sweep would otherwise add it twice).
    """

    def __init__(self, expr: sp.Expr, symbols: tuple[sp.Symbol, ...]):
        self.symbols = tuple(dict.fromkeys(symbols))
        self.position = [symbols.index(s) for s in self.symbols]
        # Inputs may be named like a NumPy function: the formula gets plain names. Real
        # ones, not lambdify's dummify (whose Dummy has no assumptions): SymPy asks whether
        # tanh(tanh(...)) of an unknown is real by an expansion that grows 3.4x per level.
        plain = tuple(sp.Symbol(f"v{k}", real=True) for k in range(len(self.symbols)))
        expr = expr.xreplace(dict(zip(self.symbols, plain)))
        self.fn = sp.lambdify(plain, for_lambdify(_floating(expr)), _NUMPY)
        self.partials = [sp.lambdify(plain, for_lambdify(_floating(sp.diff(expr, s))), _NUMPY)
                         for s in plain]

    def _eval(self, fn, args: list[np.ndarray]) -> np.ndarray:
        aligned = _aligned(args)
        out = np.empty(np.broadcast_shapes(*(a.shape for a in aligned)), args[0].dtype)
        # lambdify turns Piecewise into numpy.select, which evaluates every branch, also
        # where it is not selected (log of a negative, say): those warnings are spurious.
        with np.errstate(all="ignore"):
            out[...] = fn(*(aligned[k] for k in self.position))  # constants broadcast too
        return out

    def forward(self, args: list[np.ndarray]) -> np.ndarray:
        return self._eval(self.fn, args)

    def vjp(self, g: np.ndarray, args: list[np.ndarray]) -> list:
        grads: list = [None] * len(args)
        for k, partial in zip(self.position, self.partials):
            grads[k] = _unbroadcast(g * self._eval(partial, args), args[k].shape)
        return grads


def _dense_forward(args, attrs):
    x, W = args[0], args[1]
    rows = math.prod(x.shape[1:-1])
    # (B, rows, in) @ (B_W, in, out); the batch axes broadcast 1 against n.
    y = np.matmul(x.reshape(x.shape[0], rows, x.shape[-1]), np.swapaxes(W, -1, -2))
    y = y.reshape(y.shape[:1] + x.shape[1:-1] + W.shape[1:2])
    return y + _align(args[2], y.ndim - 1) if len(args) == 3 else y


def _dense_vjp(g, args, out, attrs):
    x, W = args[0], args[1]
    rows = math.prod(x.shape[1:-1])
    x2 = x.reshape(x.shape[0], rows, x.shape[-1])
    g2 = g.reshape(g.shape[0], rows, g.shape[-1])
    grads = [_unbroadcast(np.matmul(g2, W), x2.shape).reshape(x.shape),
             _unbroadcast(np.matmul(np.swapaxes(g2, -1, -2), x2), W.shape)]
    if len(args) == 3:
        grads.append(_unbroadcast(g, args[2].shape))
    return grads


def _matmul_operands(a, b):
    """Both operands promoted to per-example rank >= 2 as numpy.matmul does, then aligned."""
    a_vec, b_vec = a.ndim == 2, b.ndim == 2  # per-example rank 1
    a2 = a[:, None, :] if a_vec else a
    b2 = b[..., None] if b_vec else b
    a2, b2 = _aligned([a2, b2])
    return a2, b2, a_vec, b_vec


def _matmul_forward(args, attrs):
    a2, b2, a_vec, b_vec = _matmul_operands(*args)
    y = np.matmul(a2, b2)
    if a_vec:
        y = y.squeeze(-2)
    return y.squeeze(-1) if b_vec else y


def _matmul_vjp(g, args, out, attrs):
    a, b = args
    a2, b2, a_vec, b_vec = _matmul_operands(a, b)
    # Put back the axes the promotion added and the forward squeezed.
    if b_vec:
        g = g[..., None]
    if a_vec:
        g = np.expand_dims(g, -2)
    ga = np.matmul(g, np.swapaxes(b2, -1, -2))
    gb = np.matmul(np.swapaxes(a2, -1, -2), g)
    return [_unbroadcast(ga, a2.shape).reshape(a.shape),
            _unbroadcast(gb, b2.shape).reshape(b.shape)]


def _reduced(x, attrs) -> tuple[int, ...]:
    if attrs["axis"] is None:
        return _example_axes(x)
    return tuple(sorted(_axis(a, x) for a in attrs["axis"]))


def _reduce_vjp(mean: bool):
    def vjp(g, args, out, attrs):
        (x,) = args
        axes = _reduced(x, attrs)
        scale = 1 / math.prod(x.shape[a] for a in axes) if mean else 1
        return [np.broadcast_to(np.expand_dims(g, axes) * scale, x.shape)]
    return vjp


def _softmax_forward(args, attrs):
    (x,) = args
    axis = _axis(attrs["axis"], x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_vjp(g, args, out, attrs):
    axis = _axis(attrs["axis"], args[0])
    return [out * (g - (g * out).sum(axis=axis, keepdims=True))]


def _log_softmax_vjp(g, args, out, attrs):
    axis = _axis(attrs["axis"], args[0])
    return [g - np.exp(out) * g.sum(axis=axis, keepdims=True)]


def _reshape_forward(args, attrs):
    (x,) = args
    target = attrs["shape"]
    # Resolve -1 here: NumPy cannot when the batch is empty.
    known = math.prod(d for d in target if d != -1)
    size = math.prod(x.shape[1:])
    return x.reshape(x.shape[:1] + tuple(size // known if d == -1 else d for d in target))


def _concat_forward(args, attrs):
    axis = _axis(attrs["axis"], args[0])
    batch = max(a.shape[0] for a in args)  # a param is repeated across the batch
    return np.concatenate([np.broadcast_to(a, (batch,) + a.shape[1:]) for a in args], axis=axis)


def _concat_vjp(g, args, out, attrs):
    axis = _axis(attrs["axis"], args[0])
    cuts = np.cumsum([a.shape[axis] for a in args])[:-1]
    return [_unbroadcast(part, a.shape) for part, a in zip(np.split(g, cuts, axis=axis), args)]


# Losses: the target (second input) gets no cotangent.

def _mse_forward(args, attrs):
    p, t = _aligned(args)
    return _per_example_mean((p - t) ** 2)


def _mse_vjp(g, args, out, attrs):
    p, t = args
    d = p - t
    count = math.prod(d.shape[1:])
    return [_unbroadcast(_expand_to(g, d) * 2 * d / count, p.shape), None]


def _sce_forward(args, attrs):
    x, t = args
    return -(t * _log_softmax(x, -1)).sum(axis=-1)


def _sce_vjp(g, args, out, attrs):
    x, t = args
    # d/dx of -Σ t·(x - lse(x)) is softmax(x)·Σt - t; Σt is 1 only for proper targets.
    dx = np.exp(_log_softmax(x, -1)) * t.sum(axis=-1, keepdims=True) - t
    return [_unbroadcast(g[..., None] * dx, x.shape), None]


def _bce_forward(args, attrs):
    x, t = args
    return _per_example_mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))


def _bce_vjp(g, args, out, attrs):
    x, t = args
    d = _sigmoid(x) - t
    count = math.prod(d.shape[1:])
    return [_unbroadcast(_expand_to(g, d) * d / count, x.shape), None]


OPS: dict[str, _Op] = {
    "add": _binary(np.add, lambda g, a, b: (g, g)),
    "sub": _binary(np.subtract, lambda g, a, b: (g, -g)),
    "mul": _binary(np.multiply, lambda g, a, b: (g * b, g * a)),
    "div": _binary(np.divide, lambda g, a, b: (g / b, -g * a / b ** 2)),
    # Written so that NaN propagates, as in torch: relu(NaN) = NaN, and its derivative 1.
    "relu": _unary(lambda x, at: np.where(x <= 0, 0, x), lambda x, y, at: ~(x <= 0)),
    "leaky_relu": _unary(lambda x, at: np.where(x > 0, x, at["alpha"] * x),
                         lambda x, y, at: np.where(x > 0, 1, at["alpha"]).astype(x.dtype)),
    "sigmoid": _unary(lambda x, at: _sigmoid(x), lambda x, y, at: y * (1 - y)),
    "tanh": _unary(lambda x, at: np.tanh(x), lambda x, y, at: 1 - y ** 2),
    "exp": _unary(lambda x, at: np.exp(x), lambda x, y, at: y),
    "log": _unary(lambda x, at: np.log(x), lambda x, y, at: 1 / x),
    # attrs of an elementwise node is its compiled _Formula (see Reference.__init__).
    "elementwise": _Op(lambda args, f: f.forward(args), lambda g, args, out, f: f.vjp(g, args)),
    "dense": _Op(_dense_forward, _dense_vjp),
    "matmul": _Op(_matmul_forward, _matmul_vjp),
    "sum": _Op(lambda args, at: args[0].sum(axis=_reduced(args[0], at)), _reduce_vjp(False)),
    "mean": _Op(lambda args, at: args[0].mean(axis=_reduced(args[0], at)), _reduce_vjp(True)),
    "softmax": _Op(_softmax_forward, _softmax_vjp),
    "log_softmax": _Op(lambda args, at: _log_softmax(args[0], _axis(at["axis"], args[0])),
                       _log_softmax_vjp),
    "reshape": _Op(_reshape_forward, lambda g, args, out, at: [g.reshape(args[0].shape)]),
    "flatten": _Op(lambda args, at: args[0].reshape(args[0].shape[0], math.prod(args[0].shape[1:])),
                   lambda g, args, out, at: [g.reshape(args[0].shape)]),
    "concat": _Op(_concat_forward, _concat_vjp),
    "mse": _Op(_mse_forward, _mse_vjp),
    "softmax_cross_entropy": _Op(_sce_forward, _sce_vjp),
    "bce_with_logits": _Op(_bce_forward, _bce_vjp),
}


# ---------------------------------------------------------------- optimizers
# torch.optim.SGD and torch.optim.Adam as their single-tensor CPU code runs them
# (torch/optim/sgd.py `_single_tensor_sgd`, adam.py `_single_tensor_adam`), one param at a
# time, in the same operation order, so a trajectory matches torch's to rounding. Written
# apart from the SymPy update formulas in graphc/optim.py: this is what the C is checked
# against. `state` maps slot -> the param's array (updated in place); `step` counts this step.

def _sgd_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    if opt["weight_decay"] != 0:
        g = g + opt["weight_decay"] * p
    momentum = opt["momentum"]
    if momentum != 0:
        buf = state["momentum_buffer"]
        if step == 1:
            buf[...] = g  # torch clones the first gradient into the buffer
        else:
            buf *= momentum
            buf += g  # dampening 0: alpha = 1 - dampening = 1
        g = g + momentum * buf if opt["nesterov"] else buf
    p -= opt["lr"] * g


def _lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp: the form chosen by the weight, for accuracy (ATen/native/Lerp.h)."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def _adam_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    beta1, beta2 = opt["betas"]
    if opt["weight_decay"] != 0:
        g = g + opt["weight_decay"] * p
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg[...] = _lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g  # addcmul: value·t1·t2, left to right
    # Python floats from the step count, as torch does when not capturable.
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = opt["lr"] / bias_correction1
    denom = np.sqrt(exp_avg_sq) / bias_correction2 ** 0.5 + opt["eps"]
    p -= step_size * exp_avg / denom  # addcdiv: value·t1 / t2


_UPDATES: dict[str, Callable] = {"sgd": _sgd_update, "momentum": _sgd_update, "adam": _adam_update}


def _slots(opt: dict) -> tuple[str, ...]:
    """The state each param carries, by torch's names (plain SGD keeps none)."""
    if opt["name"] == "adam":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if opt["momentum"] != 0 else ()


# ---------------------------------------------------------------- the model

class Reference:
    """A Graph evaluated in NumPy, with the same methods as a compiled model."""

    def __init__(self, graph: Graph, dtype: str = "float64", seed: int = 0):
        if str(np.dtype(dtype)) not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.graph, self.dtype = graph, np.dtype(dtype)
        missing = sorted({v.op for v in graph.nodes.values()} - set(OPS))
        if missing:
            raise GraphcError(f"the NumPy reference has no implementation of op(s) {missing}")
        drawn = init_params({k: (v.shape, v.init) for k, v in graph.params.items()}, seed)
        self._params = {k: np.array(p, dtype=self.dtype) for k, p in drawn.items()}
        self._attrs = {k: _Formula(*v.attrs["expr"]) if v.op == "elementwise" else v.attrs
                       for k, v in graph.nodes.items()}
        # Values the loss can be differentiated through: params and what depends on them.
        self._differentiable: set[str] = set()
        for k, v in graph.values.items():
            if v.kind == "param" or any(i in self._differentiable for i in v.inputs):
                self._differentiable.add(k)
        self.optimizer = graph.optimizer

    def __repr__(self) -> str:
        return f"Reference({self.graph.name!r}, dtype={self.dtype.name})"

    # ------------------------------------------------------------ params
    def set_params(self, params: dict) -> None:
        """Copy in some or all params; nothing changes unless every one fits."""
        known = self.graph.params
        checked = {}
        for name, value in params.items():
            if name not in known:
                raise InputError(f"unknown param {name!r} (this model's params: "
                                 f"{', '.join(known) or 'none'})")
            array = self._array(value, f"param '{name}'")
            if array.shape != known[name].shape:
                raise InputError(f"param '{name}' must have shape {list(known[name].shape)}, "
                                 f"got {list(array.shape)}")
            checked[name] = array
        self._params.update(checked)

    def get_params(self) -> dict[str, np.ndarray]:
        return {k: p.copy() for k, p in self._params.items()}

    # ------------------------------------------------------------ evaluation
    def forward(self, **inputs) -> dict[str, np.ndarray]:
        """Output name -> array (batch axis first); needs only the inputs the outputs use."""
        env = self._run(inputs, self.graph.outputs)
        return {o: env[o] for o in self.graph.outputs}

    def values(self, **inputs) -> dict[str, np.ndarray]:
        """Every value of the graph (inputs, params, nodes); unbatched ones without batch axis."""
        env = self._run(inputs, self.graph.values)
        return {k: a if self.graph.values[k].batched else a[0] for k, a in env.items()}

    def loss(self, **inputs) -> float:
        """The batch mean of the per-example loss."""
        return float(self._per_example_loss(inputs)[1].mean())

    def gradients(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """(batch-mean loss, {param: d loss / d param}), by one reverse sweep of VJPs."""
        env, per_example = self._per_example_loss(inputs)
        n = per_example.shape[0]
        grads = {self.graph.loss: np.full(n, 1 / n, self.dtype)}
        for name in reversed(self.graph.nodes):
            g = grads.pop(name, None)
            if g is None:
                continue
            v = self.graph.values[name]
            args = [env[i] for i in v.inputs]
            for src, c in zip(v.inputs, OPS[v.op].vjp(g, args, env[name], self._attrs[name])):
                if c is not None and src in self._differentiable:
                    grads[src] = grads[src] + c if src in grads else c
        return float(per_example.mean()), {
            k: np.array(grads[k][0], self.dtype) if k in grads else np.zeros_like(p)
            for k, p in self._params.items()}

    # ------------------------------------------------------------ training
    @property
    def optimizer(self) -> dict | None:
        """The validated optimizer description (the graph's unless set); setting it resets
        the optimizer state."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, spec) -> None:
        self._optimizer = None if spec is None else check_optimizer(spec)
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """Step count 0 and zero state, as before the first step."""
        self._step = 0
        slots = _slots(self._optimizer) if self._optimizer else ()
        self._state = {s: {k: np.zeros_like(p) for k, p in self._params.items()} for s in slots}

    def optimizer_state(self) -> dict:
        """{"step": steps taken, slot: {param: array}} with torch's slot names."""
        return {"step": self._step, **{s: {k: a.copy() for k, a in per_param.items()}
                                       for s, per_param in self._state.items()}}

    def train_step(self, **inputs) -> float:
        """One optimizer step on this batch; returns the batch-mean loss before the update."""
        if self.graph.loss is None:
            raise InputError(f"graph '{self.graph.name}' has no loss, so it cannot train")
        if self._optimizer is None:
            raise InputError(f"graph '{self.graph.name}' has no optimizer: declare an "
                             "'optimizer:' section in the spec or set `optimizer`")
        loss, grads = self.gradients(**inputs)
        self._step += 1
        update = _UPDATES[self._optimizer["name"]]
        for k, p in self._params.items():
            update(self._optimizer, p, grads[k], {s: self._state[s][k] for s in self._state},
                   self._step)
        return loss

    # ------------------------------------------------------------ internals
    def _per_example_loss(self, inputs: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The evaluated ancestors of the loss, and the loss per example."""
        loss = self.graph.loss
        if loss is None:
            raise GraphcError(f"graph '{self.graph.name}' has no loss to evaluate or differentiate")
        env = self._run(inputs, [loss])
        if env[loss].shape[0] == 0:
            raise InputError("the batch is empty: the mean loss of no examples is undefined")
        return env, env[loss]

    def _array(self, value, what: str) -> np.ndarray:
        try:
            return np.array(value, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise InputError(f"{what}: cannot convert to a {self.dtype.name} array ({e})") from None

    def _run(self, inputs: dict, targets) -> dict[str, np.ndarray]:
        """Lifted arrays (batch axis of size 1 when unbatched) of `targets` and their ancestors."""
        needed = self.graph.ancestors(targets)
        env = self._inputs(inputs, needed)
        for name, v in self.graph.values.items():
            if name not in needed:
                continue
            if v.kind == "param":
                # A copy: values() hands arrays out, and reshape/flatten return views.
                env[name] = self._params[name][None].copy()
            elif v.kind == "node":
                env[name] = OPS[v.op].forward([env[i] for i in v.inputs], self._attrs[name])
        return env

    def _inputs(self, given: dict, needed: set[str]) -> dict[str, np.ndarray]:
        declared = self.graph.inputs
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise InputError(f"unknown input {unknown[0]!r} (this model's inputs: "
                             f"{', '.join(declared) or 'none'})")
        missing = [k for k in declared if k in needed and k not in given]
        if missing:
            raise InputError(f"missing input '{missing[0]}' (per-example shape "
                             f"{list(declared[missing[0]].shape)}, with a leading batch axis)")
        arrays: dict[str, np.ndarray] = {}
        for name, value in given.items():
            shape = declared[name].shape
            array = self._array(value, f"input '{name}'")
            if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
                expected = "(n" + "".join(f", {d}" for d in shape) + ")"
                raise InputError(f"input '{name}' must have shape {expected} (a batch of "
                                 f"per-example {list(shape)}), got {array.shape}")
            if arrays:
                first, other = next(iter(arrays.items()))
                if array.shape[0] != other.shape[0]:
                    raise InputError(f"inconsistent batch sizes: input '{first}' has "
                                     f"{other.shape[0]} examples, input '{name}' has "
                                     f"{array.shape[0]}")
            arrays[name] = array
        return arrays


def reference(graph: Graph, dtype: str = "float64", seed: int = 0) -> Reference:
    """The NumPy reference model of `graph` (params drawn from `seed` like the compiled one)."""
    return Reference(graph, dtype=dtype, seed=seed)
