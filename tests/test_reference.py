"""The NumPy reference: forwards against plain NumPy, gradients against finite differences.

Each op case builds a tiny graph

    out = op(a0, a1, ...);  prod = mul(out, c);  loss = sum(prod)

with `c` a random batched cotangent of out's per-example shape, so the loss gradient is the
op's VJP applied to a random cotangent. Operands come in three kinds:

- param:   an unbatched param (gets a gradient, summed over the batch);
- batched: a node mul(x_k, p_k) of an input and a param, i.e. a batched value that still
           gets a gradient (through p_k);
- input:   a batched input, no gradient (loss targets);
- stat:    an unbatched param declared `trainable: false` (batch_norm's running
           statistics): no gradient.

Gradients are taken in training mode (batch_norm by the batch's statistics) and checked
against finite differences of the training-mode loss; forwards in evaluation mode.

The expected forward is computed independently, one example at a time, with plain NumPy on
per-example arrays (so per-example axes are NumPy's axes, negative ones included).
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from graphc.errors import GraphcError, InputError
from graphc.graph import Graph
from graphc.init import init_params
from graphc.reference import Reference, reference
from graphc.verify import finite_difference_check

# The module itself: the attribute graphc.reference is the function of that name.
reference_module = importlib.import_module("graphc.reference")

N = 3  # batch size


# ---------------------------------------------------------------- case description

@dataclass(frozen=True)
class Operand:
    kind: str                    # param | batched | input | stat
    shape: tuple[int, ...]
    domain: str = "any"          # any | positive | nonzero | unit | probs | onehot


def P(*shape, domain="any"):
    return Operand("param", shape, domain)


def B(*shape, domain="any"):
    return Operand("batched", shape, domain)


def I(*shape, domain="any"):
    return Operand("input", shape, domain)


def X(*shape, bound: int):
    """An int32 input of indices 0 to bound - 1 (an embedding's rows, class indices)."""
    return Operand("index", shape, f"below {bound}")


def S(*shape, domain="any"):
    return Operand("stat", shape, domain)


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    operands: tuple[Operand, ...]
    expected: Callable[..., np.ndarray]   # per-example operands -> per-example output
    attrs: dict = field(default_factory=dict)


def sample(rng, shape, domain):
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":  # |v| >= 0.3: far from kinks and poles for eps = 1e-6
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.3, 1.5, shape)
    if domain == "wide":   # both sides of the activations' kinks (0, ±3), none near
        return rng.choice([-1.0, 1.0], shape) * np.where(
            rng.uniform(size=shape) < 0.5, rng.uniform(0.3, 2.5, shape), rng.uniform(3.5, 6, shape))
    if domain == "unit":
        return rng.uniform(0.0, 1.0, shape)
    if domain == "probs":
        e = np.exp(rng.normal(size=shape))
        return e / e.sum(axis=-1, keepdims=True)
    if domain == "onehot":
        return np.eye(shape[-1])[rng.integers(0, shape[-1], shape[:-1])]
    return rng.normal(size=shape)


@dataclass
class Built:
    graph: Graph
    inputs: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    per_example: list[Callable[[int], np.ndarray]]  # operand k at example b


def build(case: Case, seed: int = 0) -> Built:
    rng = np.random.default_rng(seed)
    spec_inputs, spec_params, nodes = {}, {}, {}
    inputs, params, per_example = {}, {}, []
    for k, o in enumerate(case.operands):
        name = f"a{k}"
        if o.kind in ("param", "stat"):
            spec_params[name] = {"shape": list(o.shape), "init": "normal",
                                 **({"trainable": False} if o.kind == "stat" else {})}
            params[name] = sample(rng, o.shape, o.domain)
            per_example.append(lambda b, v=params[name]: v)
        elif o.kind == "input":
            spec_inputs[name] = {"shape": list(o.shape)}
            inputs[name] = sample(rng, (N,) + o.shape, o.domain)
            per_example.append(lambda b, v=inputs[name]: v[b])
        elif o.kind == "index":
            spec_inputs[name] = {"shape": list(o.shape), "dtype": "int32"}
            bound = int(o.domain.split()[1])
            values = rng.integers(0, bound, (N,) + o.shape)
            values.reshape(-1)[:2] = [0, bound - 1]   # both ends of the range, always
            inputs[name] = values.astype(np.int32)
            per_example.append(lambda b, v=inputs[name]: v[b])
        else:
            x, p = f"x{k}", f"p{k}"
            spec_inputs[x] = {"shape": list(o.shape)}
            spec_params[p] = {"shape": list(o.shape), "init": "normal"}
            inputs[x] = sample(rng, (N,) + o.shape, o.domain)
            params[p] = sample(rng, o.shape, o.domain)
            nodes[name] = {"op": "mul", "inputs": [x, p]}
            per_example.append(lambda b, v=inputs[x], w=params[p]: v[b] * w)
    out_shape = np.shape(case.expected(*[f(0) for f in per_example]))
    spec_inputs["c"] = {"shape": list(out_shape)}
    inputs["c"] = rng.normal(size=(N,) + out_shape)
    nodes["out"] = {"op": case.op, "inputs": [f"a{k}" for k in range(len(case.operands))],
                    **case.attrs}
    nodes["prod"] = {"op": "mul", "inputs": ["out", "c"]}
    nodes["loss"] = {"op": "sum", "inputs": ["prod"]}
    spec = {"name": "t", "inputs": spec_inputs, "params": spec_params, "nodes": nodes,
            "outputs": ["prod"], "loss": "loss"}
    return Built(Graph.from_spec(spec), inputs, params, per_example)


def full_finite_differences(ref: Reference, name: str, inputs: dict, eps=1e-6) -> np.ndarray:
    """d loss / d param, element by element, by central differences of the loss the
    gradients differentiate (training mode)."""
    base = ref.get_params()[name]
    grad = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        losses = []
        for step in (eps, -eps):
            p = base.copy()
            p[idx] += step
            ref.set_params({name: p})
            losses.append(ref.training_loss(**inputs))
        grad[idx] = (losses[0] - losses[1]) / (2 * eps)
    ref.set_params({name: base})
    return grad


def assert_gradients_match_finite_differences(ref: Reference, inputs: dict):
    _, grads = ref.gradients(**inputs)
    assert set(grads) == set(ref.graph.trainable_params)
    for name, g in grads.items():
        assert g.shape == ref.graph.params[name].shape
        fd = full_finite_differences(ref, name, inputs)
        scale = max(1.0, float(np.abs(fd).max()))
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
    for name, r in finite_difference_check(ref, inputs).items():
        assert r["rel_err"] < 1e-6, (name, r)


# ---------------------------------------------------------------- independent NumPy

def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


np_erf = np.vectorize(math.erf)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_dense(x, W, b=0.0):
    return x @ W.T + b


def np_bce(x, t):
    return np.mean(-(t * np.log(np_sigmoid(x)) + (1 - t) * np.log(1 - np_sigmoid(x))))


# Spatial and movement ops, one example at a time by direct loops over output positions
# (torch.nn.functional's definitions; no shifted slices or np.pad, unlike the reference).

def _per_axis(value, d):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * d


def _inside(where, size):
    return all(0 <= w < n for w, n in zip(where, size))


def np_conv(x, W, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    """conv1d / conv2d of one example x [C, *spatial] with W [O, C/groups, *kernel]."""
    d = x.ndim - 1
    stride, dilation, kernel = _per_axis(stride, d), _per_axis(dilation, d), W.shape[2:]
    if padding == "valid":
        before = after = (0,) * d
    elif padding == "same":   # torch: the odd unit of d·(k - 1) after
        total = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
        before, after = tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    else:
        before = after = _per_axis(padding, d)
    size = x.shape[1:]
    out = tuple((n + lo + hi - dl * (k - 1) - 1) // s + 1
                for n, lo, hi, dl, k, s in zip(size, before, after, dilation, kernel, stride))
    per_group_in, per_group_out = W.shape[1], W.shape[0] // groups
    y = np.zeros((W.shape[0],) + out)
    for o in range(W.shape[0]):
        g = o // per_group_out
        for pos in np.ndindex(*out):
            acc = 0.0 if b is None else float(b[o])
            for c in range(per_group_in):
                for tap in np.ndindex(*kernel):
                    where = tuple(p * s + t * dl - lo for p, s, t, dl, lo
                                  in zip(pos, stride, tap, dilation, before))
                    if _inside(where, size):
                        acc += x[(g * per_group_in + c,) + where] * W[(o, c) + tap]
            y[(o,) + pos] = acc
    return y


def np_pool(x, kind, *, kernel_size, stride=None, padding=0, count_include_pad=True):
    """max_pool / avg_pool of one example x [C, *spatial]; padding never wins a max."""
    d = x.ndim - 1
    kernel = _per_axis(kernel_size, d)
    stride = kernel if stride is None else _per_axis(stride, d)
    pad = _per_axis(padding, d)
    size = x.shape[1:]
    out = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(size, pad, kernel, stride))
    y = np.zeros((x.shape[0],) + out)
    for c in range(x.shape[0]):
        for pos in np.ndindex(*out):
            vals = [x[(c,) + where] for tap in np.ndindex(*kernel)
                    for where in [tuple(q * s + t - p for q, s, t, p in zip(pos, stride, tap, pad))]
                    if _inside(where, size)]
            if kind == "max":
                y[(c,) + pos] = max(vals)
            else:
                y[(c,) + pos] = sum(vals) / (math.prod(kernel) if count_include_pad else len(vals))
    return y


def np_pad(x, pad, value=0.0):
    """torch.nn.functional.pad (constant): `pad` pairs from the last axis backwards."""
    before = [0] * x.ndim
    after = [0] * x.ndim
    for k in range(len(pad) // 2):
        before[x.ndim - 1 - k], after[x.ndim - 1 - k] = pad[2 * k], pad[2 * k + 1]
    y = np.full(tuple(n + lo + hi for n, lo, hi in zip(x.shape, before, after)), float(value))
    for idx in np.ndindex(*x.shape):
        y[tuple(i + lo for i, lo in zip(idx, before))] = x[idx]
    return y


def np_slice(x, axis, start=0, stop=None, step=1):
    return np.take(x, list(range(x.shape[axis]))[start:stop:step], axis=axis)


def np_layer_norm(x, w=None, b=None, *, axes=(-1,), eps=1e-5):
    """Per example, from the definition: (x - mean)/sqrt(biased var + eps)·w + b."""
    k = len(axes)
    flat = x.reshape(x.shape[:x.ndim - k] + (-1,))
    mean = flat.mean(axis=-1, keepdims=True)
    var = ((flat - mean) ** 2).mean(axis=-1, keepdims=True)
    y = ((flat - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * (1.0 if w is None else w) + (0.0 if b is None else b)


def np_transpose(x, perm=None):
    """Out axis k is x's axis perm[k] (default: reversed), element by element."""
    perm = list(range(x.ndim))[::-1] if perm is None else [p % x.ndim for p in perm]
    y = np.zeros(tuple(x.shape[p] for p in perm))
    for idx in np.ndindex(*y.shape):
        src = [0] * x.ndim
        for k, p in enumerate(perm):
            src[p] = idx[k]
        y[idx] = x[tuple(src)]
    return y


def np_batch_norm_eval(x, w, b, mean, var, eps=1e-5):
    """One example [C, ...] normalized by running statistics, channel by channel."""
    y = np.empty_like(x)
    for c in range(x.shape[0]):
        y[c] = (x[c] - mean[c]) / math.sqrt(var[c] + eps) * w[c] + b[c]
    return y


def conv_case(id, d, operands, **attrs):
    return Case(f"conv{d}d-{id}", f"conv{d}d", operands,
                lambda *a: np_conv(*a, **attrs), attrs)


def pool_case(id, kind, d, operand, **attrs):
    return Case(f"{kind}_pool{d}d-{id}", f"{kind}_pool{d}d", (operand,),
                lambda x: np_pool(x, kind, **attrs), attrs)


CASES = [
    # binary ops, per-example broadcasting (a param of higher rank than the batched operand)
    Case("add-same", "add", (P(3), B(3)), np.add),
    Case("add-param-higher-rank", "add", (B(3), P(4, 3)), np.add),
    Case("add-both-broadcast", "add", (P(2, 1, 3), B(4, 1)), np.add),
    Case("add-batched-batched", "add", (B(2, 3), B(3)), np.add),
    Case("add-params-only", "add", (P(3), P(2, 3)), np.add),
    Case("add-scalar-example", "add", (B(), P(2)), np.add),
    Case("sub-param-right", "sub", (B(2, 3), P(3)), np.subtract),
    Case("sub-param-left-higher-rank", "sub", (P(4, 3), B(3)), np.subtract),
    Case("sub-singletons", "sub", (P(1, 3), B(2, 1)), np.subtract),
    Case("mul-param-column", "mul", (B(2, 3), P(2, 1)), np.multiply),
    Case("mul-outer", "mul", (P(3, 1), B(4)), np.multiply),
    Case("mul-by-input", "mul", (B(3), I(3)), np.multiply),
    Case("div-param-denominator", "div", (B(2, 3), P(3, domain="positive")), np.divide),
    Case("div-batched-denominator", "div", (P(3), B(2, 3, domain="positive")), np.divide),
    Case("div-batched-both", "div", (B(3), B(1, domain="nonzero")), np.divide),
    # unary maps
    *[Case(f"{op}-{kind}", op, (o,), fn, attrs)
      for op, fn, domain, attrs in [
          ("relu", lambda x: np.maximum(x, 0), "nonzero", {}),
          ("leaky_relu", lambda x: np.where(x > 0, x, 0.01 * x), "nonzero", {}),
          ("leaky_relu", lambda x: np.where(x > 0, x, 0.2 * x), "nonzero", {"alpha": 0.2}),
          ("sigmoid", np_sigmoid, "any", {}),
          ("tanh", np.tanh, "any", {}),
          ("exp", np.exp, "any", {}),
          ("log", np.log, "positive", {})]
      for kind, o in [("param", P(2, 3, domain=domain)), ("batched", B(4, domain=domain))]],
    # the named activations, as torch.nn.functional defines them
    *[Case(f"{op}{tag}-{kind}", op, (o,), fn, attrs)
      for op, tag, fn, domain, attrs in [
          ("gelu", "", lambda x: 0.5 * x * (1 + np_erf(x / np.sqrt(2))), "wide", {}),
          ("gelu", "-tanh", lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                             * (x + 0.044715 * x ** 3))),
           "wide", {"approximate": "tanh"}),
          ("silu", "", lambda x: x * np_sigmoid(x), "wide", {}),
          ("softplus", "", lambda x: np.where(x > 20, x, np.log1p(np.exp(x))), "wide", {}),
          ("softplus", "-beta2-threshold6",
           lambda x: np.where(2 * x > 6, x, np.log1p(np.exp(2 * x)) / 2), "wide",
           {"beta": 2.0, "threshold": 6.0}),
          ("elu", "", lambda x: np.where(x > 0, x, np.exp(x) - 1), "wide", {}),
          ("elu", "-alpha0.5", lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1)), "wide",
           {"alpha": 0.5}),
          ("selu", "", lambda x: 1.0507009873554805 * np.where(
              x > 0, x, 1.6732632423543772 * (np.exp(x) - 1)), "wide", {}),
          ("hard_sigmoid", "", lambda x: np.clip(x / 6 + 0.5, 0, 1), "wide", {}),
          ("hard_swish", "", lambda x: x * np.clip(x / 6 + 0.5, 0, 1), "wide", {}),
          ("mish", "", lambda x: x * np.tanh(np.log1p(np.exp(x))), "wide", {})]
      for kind, o in [("param", P(2, 3, domain=domain)), ("batched", B(4, domain=domain))]],
    # elementwise: user formulas over the input names a0, a1, ...
    Case("elementwise-mish", "elementwise", (B(4),),
         lambda a: a * np.tanh(np.log(1 + np.exp(a))),
         {"expr": "a0 * tanh(log(1 + exp(a0)))"}),
    Case("elementwise-mish-param", "elementwise", (P(2, 3),),
         lambda a: a * np.tanh(np.log(1 + np.exp(a))),
         {"expr": "a0 * tanh(log(1 + exp(a0)))"}),
    Case("elementwise-two-inputs", "elementwise",
         (B(3, domain="nonzero"), P(2, 3, domain="nonzero")),
         lambda a, b: a * np_sigmoid(b) + np.maximum(a, b),
         {"expr": "a0 * sigmoid(a1) + max(a0, a1)"}),
    Case("elementwise-three-inputs", "elementwise", (P(3), B(2, 3), P(1)),
         lambda a, b, c: a * b - c ** 2 / (1 + a ** 2),
         {"expr": "a0 * a1 - a2**2 / (1 + a0**2)"}),
    Case("elementwise-piecewise", "elementwise",
         (B(2, 3, domain="nonzero"), P(3, domain="nonzero")),
         lambda a, b: np.maximum(a, 0) + np.abs(b) - np.minimum(a, 2 * b),
         {"expr": "relu(a0) + abs(a1) - min(a0, 2 * a1)"}),
    Case("elementwise-constant-partial", "elementwise", (P(3), B(2, 1)),
         lambda a, b: np.broadcast_to(2 * a + 3, np.broadcast_shapes(a.shape, b.shape)),
         {"expr": "2 * a0 + 3"}),
    # dense: y = x·Wᵀ + bias
    Case("dense", "dense", (B(3), P(4, 3)), np_dense),
    Case("dense-bias", "dense", (B(3), P(4, 3), P(4)), np_dense),
    Case("dense-2d-input", "dense", (B(2, 3), P(4, 3), P(4)), np_dense),
    Case("dense-3d-input-bias1", "dense", (B(2, 2, 3), P(4, 3), P(1)), np_dense),
    Case("dense-scalar-bias", "dense", (B(3), P(2, 3), P()), np_dense),
    Case("dense-batched-weight", "dense", (P(3), B(4, 3), B(4)), np_dense),
    # matmul: numpy.matmul on per-example shapes
    Case("matmul-vec-mat", "matmul", (B(3), P(3, 4)), np.matmul),
    Case("matmul-mat-vec", "matmul", (P(4, 3), B(3)), np.matmul),
    Case("matmul-vec-vec", "matmul", (B(3), P(3)), np.matmul),
    Case("matmul-mat-mat", "matmul", (B(2, 3), P(3, 4)), np.matmul),
    Case("matmul-param-left", "matmul", (P(2, 3), B(3, 4)), np.matmul),
    Case("matmul-stacked-left", "matmul", (B(5, 2, 3), P(3, 4)), np.matmul),
    Case("matmul-lead-broadcast", "matmul", (P(2, 1, 2, 3), B(4, 3, 2)), np.matmul),
    Case("matmul-vec-stacked", "matmul", (B(3), P(2, 3, 4)), np.matmul),
    Case("matmul-stacked-vec", "matmul", (P(2, 4, 3), B(3)), np.matmul),
    Case("matmul-batched-both", "matmul", (B(2, 3), B(3, 2)), np.matmul),
    # reductions
    *[Case(f"{op}-axis-{axis}", op, (B(2, 3, 4),),
           lambda a, fn=fn, axis=axis: fn(a, axis=tuple(axis) if isinstance(axis, list) else axis),
           {} if axis is None else {"axis": axis})
      for op, fn in [("sum", np.sum), ("mean", np.mean)]
      for axis in [None, 1, -1, [0, 2], [-3, -1], [0, 1, 2]]],
    Case("sum-param", "sum", (P(2, 3),), lambda a: a.sum(axis=0), {"axis": 0}),
    Case("mean-scalar-example", "mean", (B(),), np.mean),
    # softmax / log_softmax
    *[Case(f"{op}-{name}", op, (o,), lambda a, fn=fn, axis=axis: fn(a, axis),
           {} if axis == -1 else {"axis": axis})
      for op, fn in [("softmax", np_softmax),
                     ("log_softmax", lambda a, axis: np.log(np_softmax(a, axis)))]
      for name, o, axis in [("last", B(4), -1), ("axis0", B(2, 3), 0),
                            ("axis-2", B(2, 3, 4), -2), ("param", P(3, 4), 1)]],
    # movement
    Case("reshape-swap", "reshape", (B(2, 3),), lambda a: a.reshape(3, 2), {"shape": [3, 2]}),
    Case("reshape-minus-one", "reshape", (B(2, 3),), lambda a: a.reshape(-1), {"shape": [-1]}),
    Case("reshape-3d", "reshape", (B(2, 3, 2),), lambda a: a.reshape(3, -1), {"shape": [3, -1]}),
    Case("reshape-unit-minus-one", "reshape", (B(2, 2),), lambda a: a.reshape(4, 1, 1),
         {"shape": [4, 1, -1]}),
    Case("reshape-param", "reshape", (P(6),), lambda a: a.reshape(2, 3, 1), {"shape": [2, -1, 1]}),
    Case("flatten-2d", "flatten", (B(2, 3),), np.ravel),
    Case("flatten-3d", "flatten", (B(2, 2, 2),), np.ravel),
    Case("flatten-1d", "flatten", (B(5),), np.ravel),
    Case("flatten-param", "flatten", (P(2, 3),), np.ravel),
    Case("concat-two", "concat", (B(2), B(3)), lambda *a: np.concatenate(a)),
    Case("concat-with-param", "concat", (B(2, 3), P(2, 2)),
         lambda *a: np.concatenate(a, axis=-1), {"axis": -1}),
    Case("concat-three-axis0", "concat", (B(2, 3), B(1, 3), P(3, 3)),
         lambda *a: np.concatenate(a, axis=0), {"axis": 0}),
    Case("concat-axis2", "concat", (B(2, 3, 1), P(2, 3, 2)),
         lambda *a: np.concatenate(a, axis=2), {"axis": 2}),
    Case("concat-single", "concat", (B(3),), lambda *a: np.concatenate(a)),
    # convolution (x [C, *spatial], W [O, C/groups, *kernel], bias [O]): the input is
    # batched through mul(x, q), so its gradient (the guarded scatter) is checked too
    conv_case("plain", 2, (B(2, 5, 4), P(3, 2, 3, 3), P(3))),
    conv_case("stride-pad-odd", 2, (B(2, 7, 6), P(3, 2, 3, 2), P(3)), stride=[2, 1],
              padding=[1, 2]),
    conv_case("stride-int-pad-int", 2, (B(2, 7, 5), P(2, 2, 3, 3)), stride=2, padding=1),
    conv_case("dilation", 2, (B(2, 7, 7), P(2, 2, 3, 3), P(2)), stride=2, padding=2,
              dilation=[2, 1]),
    conv_case("groups", 2, (B(4, 5, 5), P(6, 2, 3, 3), P(6)), groups=2, padding=1),
    conv_case("depthwise", 2, (B(3, 5, 4), P(3, 1, 3, 3)), groups=3, padding=1),
    conv_case("depthwise-x2", 2, (B(3, 6, 5), P(6, 1, 3, 3), P(6)), groups=3, stride=2,
              padding=1),
    conv_case("same-even", 2, (B(2, 5, 6), P(3, 2, 4, 2), P(3)), padding="same"),
    conv_case("same-even-dilated", 2, (B(2, 5, 6), P(2, 2, 2, 3)), padding="same",
              dilation=[2, 2]),
    conv_case("valid", 2, (B(2, 5, 4), P(3, 2, 2, 3), P(3)), padding="valid"),
    conv_case("1x1-stride", 2, (B(3, 5, 5), P(2, 3, 1, 1)), stride=2),
    conv_case("batched-weight", 2, (P(2, 4, 4), B(3, 2, 2, 2), B(3)), padding=1),
    conv_case("params-only", 2, (P(1, 4, 4), P(2, 1, 3, 3), P(2)), stride=[1, 2]),
    conv_case("plain", 1, (B(3, 7), P(4, 3, 3), P(4))),
    conv_case("stride-pad-dilation", 1, (B(2, 11), P(3, 2, 3)), stride=3, padding=2,
              dilation=2),
    conv_case("groups", 1, (B(4, 9), P(2, 2, 4), P(2)), groups=2, stride=2, padding=1),
    conv_case("depthwise", 1, (B(3, 6), P(3, 1, 3)), groups=3, padding=1),
    conv_case("depthwise-x2", 1, (B(3, 8), P(6, 1, 3), P(6)), groups=3, padding=1),
    conv_case("same-even", 1, (B(2, 9), P(3, 2, 4), P(3)), padding="same", dilation=3),
    conv_case("valid", 1, (B(2, 7), P(3, 2, 5)), padding="valid"),
    conv_case("batched-weight", 1, (B(2, 6), B(3, 2, 3)), padding=[1]),
    # pooling: odd sizes (the last row / column dropped), stride > 1 with padding
    pool_case("k2-odd", "max", 2, B(2, 5, 5), kernel_size=2),
    pool_case("k3s2p1", "max", 2, B(2, 5, 6), kernel_size=3, stride=2, padding=1),
    pool_case("rect-mixed", "max", 2, B(1, 7, 5), kernel_size=[3, 2], stride=[2, 1],
              padding=[1, 1]),
    pool_case("overlap", "max", 2, B(2, 4, 4), kernel_size=2, stride=1),
    pool_case("param", "max", 2, P(2, 4, 5), kernel_size=[2, 3], stride=[2, 1]),
    pool_case("k3s2p1", "max", 1, B(3, 8), kernel_size=3, stride=2, padding=1),
    pool_case("default-stride-odd", "max", 1, B(2, 7), kernel_size=[2]),
    pool_case("overlap-pad", "max", 1, B(2, 6), kernel_size=4, stride=1, padding=2),
    *[c for inc, tag in [(True, "incl"), (False, "excl")] for c in [
        pool_case(f"k3s2p1-{tag}", "avg", 2, B(2, 5, 6), kernel_size=3, stride=2, padding=1,
                  count_include_pad=inc),
        pool_case(f"rect-{tag}", "avg", 2, B(2, 5, 7), kernel_size=[2, 3], stride=[1, 2],
                  padding=[1, 1], count_include_pad=inc),
        pool_case(f"param-{tag}", "avg", 2, P(1, 4, 3), kernel_size=2, stride=1, padding=1,
                  count_include_pad=inc),
        pool_case(f"k4s3p2-{tag}", "avg", 1, B(3, 9), kernel_size=4, stride=3, padding=2,
                  count_include_pad=inc),
        pool_case(f"overlap-{tag}", "avg", 1, B(2, 6), kernel_size=3, stride=1, padding=1,
                  count_include_pad=inc)]],
    pool_case("default-odd", "avg", 2, B(2, 5, 4), kernel_size=2),
    pool_case("default-odd", "avg", 1, B(2, 7), kernel_size=3),
    Case("global_avg_pool-2d", "global_avg_pool", (B(3, 4, 5),),
         lambda x: x.reshape(x.shape[0], -1).mean(axis=1)),
    Case("global_avg_pool-1d", "global_avg_pool", (B(3, 7),), lambda x: x.mean(axis=1)),
    Case("global_avg_pool-3d", "global_avg_pool", (B(2, 2, 3, 2),),
         lambda x: x.reshape(x.shape[0], -1).mean(axis=1)),
    Case("global_avg_pool-param", "global_avg_pool", (P(2, 3, 2),),
         lambda x: x.reshape(x.shape[0], -1).mean(axis=1)),
    # pad (torch's order: the last axis first), slice (Python's slices), transpose
    *[Case(f"pad-{id}", "pad", (o,), lambda x, at=attrs: np_pad(x, **at), attrs)
      for id, o, attrs in [
          ("last", B(3, 4), {"pad": [1, 2], "value": 0.5}),
          ("two", B(2, 3, 4), {"pad": [0, 1, 2, 0]}),
          ("all", B(2, 3, 4), {"pad": [1, 0, 0, 2, 1, 1], "value": -1.0}),
          ("param", P(3), {"pad": [2, 1], "value": 2.0}),
          ("nothing", B(4), {"pad": [0, 0]})]],
    *[Case(f"slice-{id}", "slice", (o,), lambda x, at=attrs: np_slice(x, **at), attrs)
      for id, o, attrs in [
          ("neg-start", B(3, 5, 6), {"axis": -1, "start": -3}),
          ("step", B(3, 7, 6), {"axis": 1, "start": 1, "stop": -1, "step": 2}),
          ("clamped", B(5, 4), {"axis": 0, "start": -10, "stop": 100, "step": 3}),
          ("neg-stop-step", B(4, 9), {"axis": -1, "stop": -2, "step": 3}),
          ("neg-both", B(4, 9), {"axis": 1, "start": -7, "stop": -2}),
          ("defaults", B(4, 9), {"axis": -2}),
          ("param", P(6, 2), {"axis": 0, "start": -5, "stop": -1, "step": 2})]],
    *[Case(f"transpose-{id}", "transpose", (o,), lambda x, at=attrs: np_transpose(x, **at),
           attrs)
      for id, o, attrs in [
          ("default", B(3, 5, 4), {}),
          ("swap", B(3, 5, 4), {"perm": [1, 0, 2]}),
          ("negative", B(2, 3, 4), {"perm": [-1, 0, 1]}),
          ("4d", B(2, 3, 2, 2), {"perm": [2, 0, 3, 1]}),
          ("1d", B(4), {}),
          ("param", P(2, 3), {})]],
    *[Case(f"layer_norm-{id}", "layer_norm", ops,
           lambda *a, at=attrs: np_layer_norm(*a, **{"axes": (-1,), **at}), attrs)
      for id, ops, attrs in [
          ("last", (B(3, 5),), {}),
          ("weight-bias", (B(2, 4), P(4), P(4)), {"eps": 1e-3}),
          ("two-axes", (B(2, 3, 4), P(3, 4)), {"axes": [-2, -1]}),
          ("all-positive-axes", (B(2, 3), P(2, 3), P(2, 3)), {"axes": [0, 1], "eps": 0.1}),
          ("vector", (B(6),), {}),
          ("param", (P(2, 3), P(3), P(3)), {})]],
    # losses (the target is an input and gets no gradient)
    Case("mse", "mse", (B(3), I(3)), lambda p, t: np.mean((p - t) ** 2)),
    Case("mse-param-prediction", "mse", (P(2, 3), I(2, 3)), lambda p, t: np.mean((p - t) ** 2)),
    Case("mse-scalar-example", "mse", (B(), I()), lambda p, t: (p - t) ** 2),
    Case("sce-onehot", "softmax_cross_entropy", (B(4), I(4, domain="onehot")),
         lambda x, t: -(t * np.log(np_softmax(x))).sum(-1)),
    Case("sce-probs-2d", "softmax_cross_entropy", (B(2, 4), I(2, 4, domain="probs")),
         lambda x, t: -(t * np.log(np_softmax(x))).sum(-1)),
    Case("sce-param-logits", "softmax_cross_entropy", (P(3, 4), I(3, 4, domain="probs")),
         lambda x, t: -(t * np.log(np_softmax(x))).sum(-1)),
    Case("sce-unnormalized-target", "softmax_cross_entropy", (B(5), I(5, domain="unit")),
         lambda x, t: -(t * np.log(np_softmax(x))).sum(-1)),
    # class indices (an int32 target, torch's F.cross_entropy with integer targets)
    Case("sce-class-index", "softmax_cross_entropy", (B(4), X(bound=4)),
         lambda x, t: -np.log(np_softmax(x))[t]),
    Case("sce-class-index-2d", "softmax_cross_entropy", (B(2, 4), X(2, bound=4)),
         lambda x, t: -np.log(np_softmax(x))[np.arange(2), t]),
    Case("sce-class-index-param-logits", "softmax_cross_entropy", (P(3, 5), X(3, bound=5)),
         lambda x, t: -np.log(np_softmax(x))[np.arange(3), t]),
    Case("bce", "bce_with_logits", (B(3), I(3, domain="unit")), np_bce),
    Case("bce-param-logits", "bce_with_logits", (P(2, 3), I(2, 3, domain="unit")), np_bce),
    Case("bce-scalar-example", "bce_with_logits", (B(), I(domain="unit")), np_bce),
    # batch_norm: the forward in evaluation mode (running statistics), gradients in training
    Case("batch_norm-2d", "batch_norm", (B(3, 4, 5), P(3), P(3), S(3), S(3, domain="positive")),
         lambda *a: np_batch_norm_eval(*a, eps=1e-3), {"eps": 1e-3}),
    Case("batch_norm-1d", "batch_norm", (B(4), P(4), P(4), S(4), S(4, domain="positive")),
         np_batch_norm_eval),
    Case("batch_norm-params", "batch_norm", (P(2, 3), P(2), P(2), S(2), S(2, domain="positive")),
         np_batch_norm_eval, {"momentum": 0.5}),
    # dropout: the identity in evaluation; gradients through step 0's masks in training
    Case("dropout-batched", "dropout", (B(3, 4),), lambda x: x, {"p": 0.5}),
    Case("dropout-param", "dropout", (P(5),), lambda x: x, {"p": 0.25, "seed": 4}),
]


def np_embedding(indices, table):
    """Row by row: out[..., :] = table[indices[...], :]."""
    out = np.zeros(indices.shape + table.shape[1:])
    for idx in np.ndindex(*indices.shape):
        out[idx] = table[int(indices[idx])]
    return out


CASES += [
    Case("embedding", "embedding", (X(5, bound=6), P(6, 3)), np_embedding),
    Case("embedding-repeated-rows", "embedding", (X(4, bound=2), P(2, 3)), np_embedding),
    Case("embedding-scalar-index", "embedding", (X(bound=4), P(4, 2)), np_embedding),
    Case("embedding-2d-indices", "embedding", (X(2, 3, bound=5), P(5, 4)), np_embedding),
    Case("embedding-batched-table", "embedding", (X(3, bound=4), B(4, 2)), np_embedding),
]


def test_every_op_has_cases():
    from graphc.ops import OPS
    assert {c.op for c in CASES} == set(OPS)


def test_formula_conditions_on_broadcast_operands():
    """A derivative whose Piecewise joins conditions on operands of different shapes (an
    input [2, 3] and a param [3]): lambdify's logical_and.reduce needs them in one shape
    (random graph seed 1009 raised 'inhomogeneous shape')."""
    g = Graph.from_spec({
        "name": "conds", "inputs": {"x": [2, 3]}, "params": {"p": [3]},
        "nodes": {"e": {"op": "elementwise", "inputs": ["x", "p"],
                        "expr": "max(cos(x) + relu(abs(p) - 0.5), 0)"},
                  "s": {"op": "sum", "inputs": ["e"]}},
        "outputs": ["e"], "loss": "s"})
    ref = Reference(g)
    rng = np.random.default_rng(3)
    ref.set_params({"p": rng.uniform(-3, 3, 3)})
    assert_gradients_match_finite_differences(ref, {"x": rng.uniform(-2, 2, (4, 2, 3))})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op(case: Case):
    built = build(case)
    ref = Reference(built.graph)
    ref.set_params(built.params)
    inputs = built.inputs
    out = built.graph.values["out"]

    # (1) forward against per-example NumPy
    if out.batched:
        expected = np.stack([np.asarray(case.expected(*[f(b) for f in built.per_example]))
                             for b in range(N)])
    else:
        expected = np.asarray(case.expected(*[f(0) for f in built.per_example]))
    got = ref.values(**inputs)["out"]
    assert got.shape == expected.shape
    assert out.shape == (got.shape[1:] if out.batched else got.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    prod = ref.forward(**inputs)["prod"]
    np.testing.assert_allclose(prod, expected * inputs["c"], rtol=1e-12, atol=1e-12)
    per_example = prod.reshape(N, -1).sum(axis=1)
    assert ref.loss(**inputs) == pytest.approx(per_example.mean(), rel=1e-12, abs=1e-12)

    # (2) and (3): gradients against full and projected finite differences
    assert_gradients_match_finite_differences(ref, inputs)


def batch_norm_graph(shape, momentum=0.1):
    c = shape[0]
    return Graph.from_spec({
        "name": "bn", "inputs": {"x": list(shape), "c": list(shape)},
        "params": {"w": {"shape": [c], "init": "normal"}, "b": {"shape": [c], "init": "normal"},
                   "rm": {"shape": [c], "init": "normal", "trainable": False},
                   "rv": {"shape": [c], "init": "uniform", "low": 0.5, "high": 2,
                          "trainable": False}},
        "nodes": {"y": {"op": "batch_norm", "inputs": ["x", "w", "b", "rm", "rv"],
                        "momentum": momentum},
                  "p": {"op": "mul", "inputs": ["y", "c"]}, "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["y"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1}})


@pytest.mark.parametrize("shape, n", [((2, 3), 4), ((3,), 5), ((2, 2, 3), 1), ((3,), 1)])
def test_batch_norm_modes_and_running_statistics(shape, n):
    """Training mode normalizes each channel by the batch's mean and biased variance over
    the batch and the spatial axes; evaluation mode by the running statistics; a train step
    moves those as torch does, m·batch + (1 - m)·running with the unbiased variance, and
    leaves the running variance alone when a channel has N = 1 value."""
    ref = Reference(batch_norm_graph(shape, momentum=0.3), seed=2)
    rng = np.random.default_rng(0)
    X, C = rng.normal(size=(n, *shape)), rng.normal(size=(n, *shape))
    p = ref.get_params()
    axes = (0,) + tuple(range(2, X.ndim))
    per_channel = (1, shape[0]) + (1,) * (len(shape) - 1)
    mean, var = X.mean(axis=axes), X.var(axis=axes)
    train_y = (X - mean.reshape(per_channel)) / np.sqrt(var.reshape(per_channel) + 1e-5) \
        * p["w"].reshape(per_channel) + p["b"].reshape(per_channel)
    eval_y = (X - p["rm"].reshape(per_channel)) / np.sqrt(p["rv"].reshape(per_channel) + 1e-5) \
        * p["w"].reshape(per_channel) + p["b"].reshape(per_channel)
    np.testing.assert_allclose(ref.forward(x=X)["y"], eval_y, rtol=1e-12)
    assert ref.loss(x=X, c=C) == pytest.approx((eval_y * C).sum() / n, rel=1e-12)
    assert ref.training_loss(x=X, c=C) == pytest.approx((train_y * C).sum() / n, rel=1e-12)
    loss, grads = ref.gradients(x=X, c=C)
    assert set(grads) == {"w", "b"} and loss == ref.training_loss(x=X, c=C)
    assert ref.train_step(x=X, c=C) == loss
    after = ref.get_params()
    np.testing.assert_allclose(after["rm"], 0.3 * mean + 0.7 * p["rm"], rtol=1e-14)
    count = X.size // shape[0]
    want_rv = 0.3 * X.var(axis=axes, ddof=1) + 0.7 * p["rv"] if count > 1 else p["rv"]
    np.testing.assert_allclose(after["rv"], want_rv, rtol=1e-14)
    assert set(ref.optimizer_state()) == {"step"}   # plain SGD: no slots, none for rm, rv
    assert_gradients_match_finite_differences(ref, {"x": X, "c": C})


# ---------------------------------------------------------------- kinks, stability

def kink_graph(op: str, attrs: dict) -> Graph:
    return Graph.from_spec({
        "name": "k", "inputs": {"c": [5]}, "params": {"P": {"shape": [5], "init": "zeros"}},
        "nodes": {"a": {"op": op, "inputs": ["P"], **attrs},
                  "p": {"op": "mul", "inputs": ["a", "c"]}, "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["p"], "loss": "loss"})


@pytest.mark.parametrize("op, attrs, slope_at_zero, negative_slope", [
    ("relu", {}, 0.0, 0.0),
    ("leaky_relu", {}, 0.01, 0.01),
    ("leaky_relu", {"alpha": 0.3}, 0.3, 0.3),
])
def test_derivative_at_the_kink(op, attrs, slope_at_zero, negative_slope):
    ref = Reference(kink_graph(op, attrs))
    ref.set_params({"P": np.array([-2.0, 0.0, 0.0, 1e-300, 3.0])})
    _, grads = ref.gradients(c=np.ones((2, 5)))
    np.testing.assert_array_equal(
        grads["P"], [negative_slope, slope_at_zero, slope_at_zero, 1.0, 1.0])


def test_stable_forms_with_extreme_values():
    g = Graph.from_spec({
        "name": "s", "inputs": {"t": [4]},
        "params": {"P": {"shape": [4], "init": "zeros"}},
        "nodes": {"sig": {"op": "sigmoid", "inputs": ["P"]},
                  "sm": {"op": "softmax", "inputs": ["P"]},
                  "lsm": {"op": "log_softmax", "inputs": ["P"]},
                  "ce": {"op": "softmax_cross_entropy", "inputs": ["P", "t"]},
                  "bce": {"op": "bce_with_logits", "inputs": ["P", "t"]},
                  "loss": {"op": "add", "inputs": ["ce", "bce"]}},
        "outputs": ["ce"], "loss": "loss"})
    ref = Reference(g)
    ref.set_params({"P": np.array([-1000.0, -50.0, 0.0, 1000.0])})
    t = np.array([[0.0, 0.0, 0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings either
        v = ref.values(t=t)
        loss, grads = ref.gradients(t=t)
    np.testing.assert_allclose(v["sig"], [0.0, np_sigmoid(-50.0), 0.5, 1.0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(v["sm"], [0.0, 0.0, 0.0, 1.0], atol=1e-300)
    np.testing.assert_allclose(v["lsm"], [-2000.0, -1050.0, -1000.0, 0.0])
    # bce: per element max(x,0) - x·t + log1p(exp(-|x|))
    assert v["bce"][0] == pytest.approx((math.exp(-50.0) + math.log(2.0)) / 4, rel=1e-15)
    assert v["ce"][0] == pytest.approx(0.0, abs=1e-300)
    assert np.isfinite(loss) and np.all(np.isfinite(grads["P"]))


# ---------------------------------------------------------------- fan-out

def test_value_used_by_two_nodes_and_twice_by_one():
    g = Graph.from_spec({
        "name": "f", "inputs": {"x": [3], "c": [3]},
        "params": {"W": {"shape": [3], "init": "normal"}, "V": {"shape": [2, 3], "init": "normal"}},
        "nodes": {"h": {"op": "tanh", "inputs": ["W"]},
                  "u": {"op": "exp", "inputs": ["h"]},                   # h used twice ...
                  "v": {"op": "mul", "inputs": ["h", "x"]},              # ... by two nodes
                  "hh": {"op": "add", "inputs": ["h", "h"]},             # and twice by one
                  "vv": {"op": "mul", "inputs": ["V", "V"]},             # a param used twice
                  "sq": {"op": "elementwise", "inputs": ["v", "v"], "expr": "v * sin(v)"},
                  "s": {"op": "sum", "inputs": ["vv"], "axis": 0},
                  "w": {"op": "elementwise", "inputs": ["u", "sq", "hh", "s"],
                        "expr": "u + sq * hh - s"},
                  "p": {"op": "mul", "inputs": ["w", "c"]},
                  "loss": {"op": "mean", "inputs": ["p"]}},
        "outputs": ["w"], "loss": "loss"})
    rng = np.random.default_rng(5)
    inputs = {"x": rng.normal(size=(4, 3)), "c": rng.normal(size=(4, 3))}
    ref = Reference(g, seed=3)
    assert_gradients_match_finite_differences(ref, inputs)
    # mul(V, V): d/dV Σ_b mean(c·(-Σ_0 V²))/n = -2V·(mean over batch of c)/3
    _, grads = ref.gradients(**inputs)
    V = ref.get_params()["V"]
    np.testing.assert_allclose(grads["V"], -2 * V * inputs["c"].mean(axis=0) / 3, rtol=1e-12)


def test_param_the_loss_does_not_use_gets_zeros():
    g = Graph.from_spec({
        "name": "z", "inputs": {"x": [2]},
        "params": {"W": {"shape": [2], "init": "ones"}, "U": {"shape": [2, 2], "init": "ones"}},
        "nodes": {"a": {"op": "mul", "inputs": ["x", "W"]},
                  "o": {"op": "matmul", "inputs": ["a", "U"]},
                  "loss": {"op": "sum", "inputs": ["a"]}},
        "outputs": ["o"], "loss": "loss"})
    loss, grads = Reference(g).gradients(x=np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert loss == 5.0
    np.testing.assert_array_equal(grads["W"], [2.0, 3.0])
    np.testing.assert_array_equal(grads["U"], np.zeros((2, 2)))


# ---------------------------------------------------------------- a whole model

MLP = {
    "name": "mlp", "inputs": {"x": [5], "y": [3]},
    "params": {"W1": {"shape": [4, 5], "init": "he_normal"}, "b1": {"shape": [4], "init": "normal"},
               "W2": {"shape": [3, 4], "init": "glorot_uniform"}, "b2": {"shape": [3]}},
    "nodes": {"h1": {"op": "dense", "inputs": ["x", "W1", "b1"]},
              "a1": {"op": "elementwise", "inputs": ["h1"], "expr": "h1 * tanh(log(1 + exp(h1)))"},
              "logits": {"op": "dense", "inputs": ["a1", "W2", "b2"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss"}


def mlp_data(n=6):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 5)), "y": np.eye(3)[rng.integers(0, 3, n)]}


def test_mlp_end_to_end():
    ref = reference(Graph.from_spec(MLP))
    data = mlp_data()
    p = ref.get_params()
    h = data["x"] @ p["W1"].T + p["b1"]
    logits = (h * np.tanh(np.log1p(np.exp(h)))) @ p["W2"].T + p["b2"]
    np.testing.assert_allclose(ref.forward(x=data["x"])["logits"], logits, rtol=1e-12)
    expected = -(data["y"] * np.log(np_softmax(logits))).sum(axis=1).mean()
    assert ref.loss(**data) == pytest.approx(expected, rel=1e-12)
    assert_gradients_match_finite_differences(ref, data)


def test_params_are_initialized_from_the_seed():
    g = Graph.from_spec(MLP)
    drawn = init_params({k: (v.shape, v.init) for k, v in g.params.items()}, 7)
    got = Reference(g, seed=7).get_params()
    assert list(got) == list(drawn)
    for k in drawn:
        np.testing.assert_array_equal(got[k], drawn[k])


def test_float32():
    g = Graph.from_spec(MLP)
    data = mlp_data()
    r64, r32 = Reference(g), Reference(g, dtype="float32")
    assert all(p.dtype == np.float32 for p in r32.get_params().values())
    assert all(a.dtype == np.float32 for a in r32.values(**data).values())
    l32, g32 = r32.gradients(**data)
    l64, g64 = r64.gradients(**data)
    assert l32 == pytest.approx(l64, rel=1e-5)
    for k in g64:
        assert g32[k].dtype == np.float32
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-4, atol=1e-5)
    # the check runs in float64 whatever the reference's dtype
    assert all(r["rel_err"] < 1e-6 for r in finite_difference_check(r32, data).values())


def test_params_are_copied_both_ways():
    ref = Reference(Graph.from_spec(MLP))
    W = np.ones((4, 5))
    ref.set_params({"W1": W})
    W[0, 0] = 5.0
    got = ref.get_params()["W1"]
    assert got[0, 0] == 1.0
    got[0, 0] = 7.0
    assert ref.get_params()["W1"][0, 0] == 1.0
    ref.values(**mlp_data())["W1"][0, 0] = 9.0
    assert ref.get_params()["W1"][0, 0] == 1.0


# ---------------------------------------------------------------- finite_difference_check

def test_finite_difference_check_leaves_params_alone():
    ref = Reference(Graph.from_spec(MLP))
    before = ref.get_params()
    report = finite_difference_check(ref, mlp_data(), eps=1e-5, seed=4)
    assert set(report) == set(before)
    assert set(report["W1"]) == {"analytic", "numeric", "abs_err", "rel_err"}
    for k, v in ref.get_params().items():
        np.testing.assert_array_equal(v, before[k])


def test_finite_difference_check_catches_a_wrong_softmax_backward(monkeypatch):
    case = next(c for c in CASES if c.id == "softmax-last")
    built = build(case)
    ref = Reference(built.graph)
    ref.set_params(built.params)
    assert all(r["rel_err"] < 1e-6 for r in finite_difference_check(ref, built.inputs).values())
    # The diagonal of the Jacobian only, y(1 - y): a classic mistake.
    wrong = reference_module._Op(reference_module.OPS["softmax"].forward,
                                 lambda g, args, out, attrs: [g * out * (1 - out)])
    monkeypatch.setitem(reference_module.OPS, "softmax", wrong)
    report = finite_difference_check(ref, built.inputs)
    assert report["p0"]["rel_err"] > 1e-3


# ---------------------------------------------------------------- errors

def small_ref():
    return Reference(Graph.from_spec({
        "name": "e", "inputs": {"x": [3], "c": [4]},
        "params": {"W": {"shape": [4, 3], "init": "normal"}},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                  "p": {"op": "mul", "inputs": ["h", "c"]},
                  "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["h"], "loss": "loss"}))


def test_forward_needs_only_the_inputs_the_outputs_use():
    assert small_ref().forward(x=np.zeros((2, 3)))["h"].shape == (2, 4)


def test_missing_input():
    with pytest.raises(InputError, match=r"missing input 'c'.*\[4\]"):
        small_ref().loss(x=np.zeros((2, 3)))


def test_wrong_input_shape_names_input_expected_and_got():
    with pytest.raises(InputError, match=r"input 'x' must have shape \(n, 3\).*got \(2, 4\)"):
        small_ref().forward(x=np.zeros((2, 4)))
    with pytest.raises(InputError, match=r"input 'x' must have shape \(n, 3\).*got \(3,\)"):
        small_ref().forward(x=np.zeros(3))


def test_inconsistent_batch_sizes():
    with pytest.raises(InputError, match=r"inconsistent batch sizes: input 'x' has 2 examples, "
                                         r"input 'c' has 5"):
        small_ref().gradients(x=np.zeros((2, 3)), c=np.zeros((5, 4)))


def test_unknown_and_unconvertible_inputs():
    with pytest.raises(InputError, match=r"unknown input 'z'.*x, c"):
        small_ref().forward(x=np.zeros((2, 3)), z=1)
    with pytest.raises(InputError, match=r"input 'x': cannot convert"):
        small_ref().forward(x=[["a", "b", "c"]])


def test_empty_batch_has_no_loss():
    ref = small_ref()
    assert ref.forward(x=np.zeros((0, 3)))["h"].shape == (0, 4)
    with pytest.raises(InputError, match="empty"):
        ref.loss(x=np.zeros((0, 3)), c=np.zeros((0, 4)))


def test_set_params_errors_change_nothing():
    ref = small_ref()
    before = ref.get_params()["W"]
    with pytest.raises(InputError, match=r"unknown param 'V'.*W"):
        ref.set_params({"W": np.zeros((4, 3)), "V": np.zeros(3)})
    with pytest.raises(InputError, match=r"param 'W' must have shape \[4, 3\], got \[3, 4\]"):
        ref.set_params({"W": np.zeros((3, 4))})
    np.testing.assert_array_equal(ref.get_params()["W"], before)


def test_graph_without_loss():
    g = Graph.from_spec({"name": "n", "inputs": {"x": [2]},
                         "nodes": {"y": {"op": "relu", "inputs": ["x"]}}, "outputs": ["y"]})
    ref = Reference(g)
    np.testing.assert_array_equal(ref.forward(x=[[-1.0, 2.0]])["y"], [[0.0, 2.0]])
    with pytest.raises(GraphcError, match="no loss"):
        ref.gradients(x=[[1.0, 2.0]])


def test_unsupported_dtype():
    with pytest.raises(ValueError, match="float32, float64"):
        Reference(Graph.from_spec(MLP), dtype="int32")
