"""Every op of graphc.ops.OPS, compiled to C, against the NumPy reference.

Each configuration of an op is an independent branch of one model (split into a few models
when there are many, to keep the compile fast), and every branch's result `out` is projected
onto its own random cotangent input (`cot_out`):

    proj_out = mul(out, cot_out);  term_out = sum(proj_out);  loss = term_a + term_b + ...

so a wrong backward cannot hide behind an all-ones seed (softmax's backward seeded with
ones is zero whatever the rule). The op's differentiable operands are params, directly
or through `mul(x, Q)` with a batched input x, so gradients flow through batched and
unbatched paths alike. Each model is compared with the float64 reference in both dtypes,
for several batch sizes on the same compiled model: forward outputs, loss, and every
param gradient, within the per-dtype tolerances of conftest.TOLERANCES.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import graphc
from graphc.ops import OPS
from graphc.reference import reference

from conftest import compile_strict

DTYPES = ("float64", "float32")
BATCHES = (1, 5)


# ---------------------------------------------------------------- data domains

def _away0(rng, shape):
    """|v| in [0.25, 2], so relu-like kinks are never near; half of the signs negative."""
    size = int(np.prod(shape, dtype=np.int64))
    signs = rng.permutation(np.where(np.arange(size) % 2 == 0, 1.0, -1.0)).reshape(shape)
    return signs * rng.uniform(0.25, 2.0, size=shape)


def _away3(rng, shape):
    """|v| in [0.25, 2.5] or [3.5, 6]: both sides of the kinks at 0 and ±3, none near."""
    near = _away0(rng, shape) * 1.25                   # |v| in [0.3125, 2.5]
    far = np.sign(near) * rng.uniform(3.5, 6.0, size=shape)
    return np.where(rng.uniform(size=shape) < 0.5, near, far)


def _onehot(rng, shape):
    return np.eye(shape[-1])[rng.integers(0, shape[-1], size=shape[:-1])]


def _probabilities(rng, shape):
    g = rng.gamma(1.0, size=shape) + 1e-3
    return g / g.sum(axis=-1, keepdims=True)


DOMAINS: dict[str | None, Callable] = {
    None: lambda rng, s: rng.standard_normal(s),
    "small": lambda rng, s: 0.5 * rng.standard_normal(s),
    "positive": lambda rng, s: rng.uniform(0.5, 2.0, size=s),
    "away0": _away0,
    "away3": _away3,
    "onehot": _onehot,
    "probabilities": _probabilities,
    "unit": lambda rng, s: rng.uniform(0.05, 0.95, size=s),          # fractional targets
    "binary": lambda rng, s: rng.integers(0, 2, size=s).astype(float),  # 0/1 targets
    "large": lambda rng, s: 30.0 * rng.standard_normal(s),           # saturating logits
    "offset200": lambda rng, s: 200.0 + rng.standard_normal(s),     # exp would overflow
}


def draw(rng, shape, domain) -> np.ndarray:
    if isinstance(domain, tuple):   # ("index", V): int32 indices 0 to V - 1, both ends drawn
        values = rng.integers(0, domain[1], size=tuple(shape))
        values.reshape(-1)[:2] = [0, domain[1] - 1][:values.size]
        return values.astype(np.int32)
    return np.asarray(DOMAINS[domain](rng, tuple(shape)), dtype=np.float64)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """The values the C model sees, given to the float64 reference too (indices as they are)."""
    if a.dtype == np.int32:
        return a
    return np.asarray(a, dtype=dtype).astype(np.float64)


# ---------------------------------------------------------------- a spec builder

@dataclass
class Net:
    """Assembles a spec and remembers shapes, data domains and which nodes to test."""
    name: str
    inputs: dict = field(default_factory=dict)    # name -> (shape, domain)
    params: dict = field(default_factory=dict)    # name -> (shape, domain)
    nodes: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    batched: dict = field(default_factory=dict)
    targets: list = field(default_factory=list)
    zero_grad: set = field(default_factory=set)  # params whose gradient may be all zeros
    frozen: set = field(default_factory=set)     # params declared trainable: false

    def input(self, name, shape, domain=None) -> str:
        self.inputs[name] = (tuple(shape), domain)
        self.shapes[name], self.batched[name] = tuple(shape), True
        return name

    def indices(self, name, shape, bound: int) -> str:
        """An int32 input of indices 0 to bound - 1 (an embedding's rows, class indices)."""
        return self.input(name, shape, ("index", bound))

    def param(self, name, shape, domain="small", trainable=True) -> str:
        self.params[name] = (tuple(shape), domain)
        self.shapes[name], self.batched[name] = tuple(shape), False
        if not trainable:
            self.frozen.add(name)
        return name

    def op(self, name, op, *inputs, **attrs) -> str:
        opdef = OPS[op]
        self.nodes[name] = {"op": op, "inputs": list(inputs), **attrs}
        norm = opdef.normalize_attrs(name, attrs)
        self.shapes[name] = tuple(opdef.shape(name, [self.shapes[i] for i in inputs], norm))
        self.batched[name] = any(self.batched[i] for i in inputs)
        return name

    def scaled(self, name, shape, domain=None, qdomain="positive", qshape=None) -> str:
        """mul(x, Q): a batched value in `domain` (for positive Q) that gives Q a gradient."""
        x = self.input(f"{name}_x", shape, domain)
        q = self.param(f"{name}_q", qshape if qshape is not None else shape, qdomain)
        return self.op(name, "mul", x, q)

    def target(self, name) -> str:
        self.targets.append(name)
        return name

    def part(self, name: str, targets) -> "Net":
        """The sub-network computing only `targets` (and what they depend on)."""
        need, todo = set(), list(targets)
        while todo:
            v = todo.pop()
            if v not in need:
                need.add(v)
                todo.extend(self.nodes[v]["inputs"] if v in self.nodes else [])
        keep = lambda d: {k: v for k, v in d.items() if k in need}  # noqa: E731
        return Net(name, keep(self.inputs), keep(self.params), keep(self.nodes), self.shapes,
                   self.batched, list(targets), self.zero_grad & need, self.frozen & need)

    def parts(self, size: int) -> list["Net"]:
        """Split into models of at most `size` targets, balanced: the compile time of a
        model grows faster than its size, and each model has a fixed cost too."""
        count = -(-len(self.targets) // size)
        return [self.part(f"{self.name}{k}", self.targets[k::count]) for k in range(count)]

    def spec(self) -> dict:
        nodes = dict(self.nodes)
        inputs = {k: {"shape": list(s), **({"dtype": "int32"} if isinstance(d, tuple) else {})}
                  for k, (s, d) in self.inputs.items()}
        parts = []
        for t in self.targets:
            inputs[f"cot_{t}"] = {"shape": list(self.shapes[t])}
            nodes[f"proj_{t}"] = {"op": "mul", "inputs": [t, f"cot_{t}"]}
            nodes[f"term_{t}"] = {"op": "sum", "inputs": [f"proj_{t}"]}
            parts.append(f"term_{t}")
        total = parts[0]
        for k, part in enumerate(parts[1:]):
            nodes[f"total{k}"] = {"op": "add", "inputs": [total, part]}
            total = f"total{k}"
        outputs = [t for t in self.targets if self.batched[t]] or [f"proj_{self.targets[0]}"]
        return {"name": self.name, "inputs": inputs,
                "params": {k: {"shape": list(s), **({"trainable": False} if k in self.frozen
                                                     else {})}
                           for k, (s, _) in self.params.items()},
                "nodes": nodes, "outputs": outputs, "loss": total}

    def draw_params(self, rng, dtype) -> dict:
        return {k: rounded(draw(rng, s, d), dtype) for k, (s, d) in self.params.items()}

    def draw_inputs(self, rng, n, dtype) -> dict:
        data = {k: rounded(draw(rng, (n,) + s, d), dtype) for k, (s, d) in self.inputs.items()}
        for t in self.targets:
            data[f"cot_{t}"] = rounded(draw(rng, (n,) + self.shapes[t], None), dtype)
        return data


@functools.lru_cache(maxsize=None)
def compiled(spec_json: str, dtype: str):
    """One compile per (spec, dtype) per session, shared by the tests that use it; built
    warning-free under -Wall -Wextra -Wpedantic -Werror. The float32 model is built
    optimized, as graphc.compile builds it; the float64 one, the same text but for its
    type, at -O0: GCC took 6x less time on it (conv2d's first part: 0.6 s against 3.3 s),
    and the tests compare the values, which no -O level may change."""
    return compile_strict(json.loads(spec_json), dtype, optimize=dtype == "float32")


def model_for(net: Net, dtype: str):
    return compiled(json.dumps(net.spec(), sort_keys=True), dtype)


def runs(net: Net, dtype: str, *, seed: int = 0, batches=BATCHES):
    """(n, model, reference, data) for each batch size, on one model with fixed params."""
    model = model_for(net, dtype)
    ref = reference(model.graph, dtype="float64")
    rng = np.random.default_rng(seed)
    params = net.draw_params(rng, dtype)
    model.set_params(params)
    ref.set_params(params)
    for n in batches:
        yield n, model, ref, net.draw_inputs(rng, n, dtype)


def compare_with_reference(net: Net, dtype: str, check_close, *, seed: int = 0,
                           batches=BATCHES) -> None:
    """Compile `net` in `dtype`; compare forward outputs (evaluation mode), the loss and
    the gradients (training mode: batch_norm by the batch's statistics)."""
    nonzero = set()
    for n, model, ref, data in runs(net, dtype, seed=seed, batches=batches):
        where = f"{net.name}, batch {n}"
        got, want = model.forward(**data), ref.forward(**data)
        assert set(got) == set(model.graph.outputs)
        for o in model.graph.outputs:
            check_close(got[o], want[o], dtype, f"{where}: forward output '{o}'")
        loss, grads = model.gradients(**data)
        ref_loss, ref_grads = ref.gradients(**data)
        check_close(loss, ref_loss, dtype, f"{where}: loss")
        trained = set(net.params) - net.frozen
        assert set(grads) == trained
        for p in trained:
            check_close(grads[p], ref_grads[p], dtype, f"{where}: gradient of '{p}'")
            if np.any(ref_grads[p] != 0):
                nonzero.add(p)
    vacuous = set(net.params) - net.frozen - nonzero - net.zero_grad
    assert not vacuous, f"{net.name}: the reference gradient of {sorted(vacuous)} is always 0"


# ---------------------------------------------------------------- the table

CASES: dict[str, Callable[[Net, np.random.Generator], None]] = {}


def cases(*ops):
    def register(fn):
        for op in ops:
            CASES[op] = (lambda fn_, op_: lambda net, rng: fn_(net, rng, op_))(fn, op)
        return fn
    return register


def dims(rng, k, lo=2, hi=4) -> list[int]:
    """k random small dimensions (never 1: size-1 axes are chosen on purpose below)."""
    return [int(d) for d in rng.integers(lo, hi + 1, size=k)]


@cases("add", "sub", "mul", "div")
def _binary(net: Net, rng, op):
    den = "positive" if op == "div" else None       # the second operand's domain
    qden = "positive" if op == "div" else "small"
    a, b, c = dims(rng, 3)
    # two params, [a, 1] with a scalar param
    net.target(net.op("pp", op, net.param("pp_a", [a, 1]), net.param("pp_b", [], qden)))
    # an unbatched param of higher rank than the batched input: [c, 1, b] with [a, b]
    net.target(net.op("hi", op, net.param("hi_p", [c, 1, b]), net.input("hi_x", [a, b], den)))
    # a per-example scalar input first, a param second
    net.target(net.op("xs", op, net.input("xs_x", []), net.param("xs_p", [b], qden)))
    # both operands batched, broadcast both ways ([a, 1] with [b]): gradients to both
    lhs = net.scaled("bb_l", [a, 1], None, "small")
    rhs = net.scaled("bb_r", [b], den, "positive" if op == "div" else "small")
    net.target(net.op("bb", op, lhs, rhs))
    # the same value on both sides
    both = net.scaled("same_h", [a], "positive", "positive")
    net.target(net.op("same", op, both, both))
    if op in ("sub", "div"):  # h - h and h / h are constant: a zero gradient
        net.zero_grad.add("same_h_q")


ACTIVATIONS = ("gelu", "silu", "softplus", "elu", "selu", "hard_sigmoid", "hard_swish", "mish")
# The named activations over [-12, 12], both sides of their kinks (0, ±3) and none near.
UNARY_DOMAIN = {"relu": "away0", "leaky_relu": "away0", "log": "positive",
                **{op: "away3" for op in ACTIVATIONS}}


@cases("relu", "leaky_relu", "sigmoid", "tanh", "exp", "log", *ACTIVATIONS)
def _unary(net: Net, rng, op):
    dom = UNARY_DOMAIN.get(op)
    q = "positive" if dom else "small"
    a, b, c = dims(rng, 3)
    net.target(net.op("p", op, net.param("p_p", [a, b], dom or "small")))
    net.target(net.op("h", op, net.scaled("h_h", [a, b, c], dom, q, qshape=[b, 1])))
    net.target(net.op("s", op, net.scaled("s_h", [], dom, q)))  # per-example scalar
    if op == "leaky_relu":
        net.target(net.op("a2", op, net.scaled("a2_h", [a, b], dom, q), alpha=0.2))
        net.target(net.op("aneg", op, net.param("aneg_p", [b], dom), alpha=-0.5))
    other_attrs = {"gelu": {"approximate": "tanh"}, "elu": {"alpha": 0.5},
                   # linear past beta·x = 6; below, a negative beta
                   "softplus": {"beta": 2.0, "threshold": 6.0}}
    if op in other_attrs:
        net.target(net.op("a2", op, net.scaled("a2_h", [a, b], dom, q), **other_attrs[op]))
    if op == "softplus":
        net.target(net.op("bneg", op, net.param("bneg_p", [b], dom), beta=-0.5))


@cases("elementwise")
def _elementwise(net: Net, rng, op):
    a, b = dims(rng, 2)
    # the DESIGN's mish-like activation (on batched values: the composed mlp below)
    mish = "{0} * tanh(log(1 + exp({0})))"
    net.target(net.op("mp", op, net.param("mp_p", [a, b]), expr=mish.format("mp_p")))
    # several inputs, broadcasting: batched [a, b], params [b] and [a, 1]
    x = net.input("m_x", [a, b])
    P, Q = net.param("m_P", [b]), net.param("m_Q", [a, 1])
    net.target(net.op("multi", op, x, P, Q, expr="m_x * sigmoid(m_P) + m_Q**2 * tanh(m_x)"
                                                 " - exp(-m_Q * m_P) / (1 + m_P**2)"))
    # Piecewise producers (relu, max, min, abs) away from their kinks and ties
    P = net.param("pw_P", [b], "away0")
    x = net.input("pw_x", [a, b], "away0")
    Q = net.param("pw_Q", [b], "away0")
    net.target(net.op("pw", op, x, P, Q,
                      expr="relu(pw_P) + max(pw_P, pw_Q) * abs(pw_x) + min(pw_x, 0) * pw_Q"
                           " + relu(pw_x) * min(pw_P, pw_Q) + abs(pw_P) * pw_x"))
    # the other functions of the formula language, on their domains
    P = net.param("fn_P", [a], "positive")
    x = net.input("fn_x", [b, a], "small")
    net.target(net.op("fn", op, P, x, expr=(
        "sqrt(fn_P) + pow(fn_P, 1.5) + log(fn_P) * erf(fn_x) + erf(fn_P * fn_x)"
        " + atan(fn_x * fn_P) + softplus(fn_x) - cosh(fn_P) + sin(fn_x) * cos(fn_P)"
        " + sinh(fn_x) / fn_P + tan(fn_x / 4) + asin(fn_x / 4) + acos(fn_x / 4) * fn_P"
        " + fn_P ** fn_x + e * fn_x - pi * fn_P")))
    # a value listed twice as an input, and a formula with constants only in one input
    h = net.scaled("tw_h", [a], "small", "small")
    net.target(net.op("tw", op, h, net.param("tw_P", [a]), h, expr="tw_h * tw_P + tw_h ** 3"))
    net.target(net.op("cst", op, net.input("cst_x", [a]), net.param("cst_P", [a]),
                      expr="2.5 * cst_x + 0.75"))
    net.zero_grad.add("cst_P")


@cases("dense")
def _dense(net: Net, rng, op):
    i, o, r, s = dims(rng, 4)
    net.target(net.op("b", op, net.input("b_x", [i]), net.param("b_W", [o, i]),
                      net.param("b_b", [o])))
    net.target(net.op("nb", op, net.input("nb_x", [r, i]), net.param("nb_W", [o, i])))
    # a 3-D input that itself needs a gradient, and a bias of shape [1]
    net.target(net.op("h", op, net.scaled("h_h", [s, r, i], None, "small", qshape=[i]),
                      net.param("h_W", [o, i]), net.param("h_b", [1])))
    # an unbatched (param) input and a scalar bias
    net.target(net.op("p", op, net.param("p_x", [i]), net.param("p_W", [o, i]),
                      net.param("p_b", [])))


@cases("matmul")
def _matmul(net: Net, rng, op):
    l, m, k, n = dims(rng, 4)

    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    P = net.param
    net.target(net.op("vv", op, h("vv_a", [k]), P("vv_b", [k])))                 # 1-D @ 1-D
    net.target(net.op("vm", op, h("vm_a", [k]), P("vm_b", [k, n])))              # 1-D @ 2-D
    net.target(net.op("mv", op, P("mv_a", [m, k]), h("mv_b", [k])))              # 2-D @ 1-D
    net.target(net.op("t2", op, h("t2_a", [l, m, k]), P("t2_b", [k, n])))        # 3-D @ 2-D
    net.target(net.op("hi", op, P("hi_a", [l, m, k]), h("hi_b", [k, n])))        # higher-rank P
    net.target(net.op("bc", op, P("bc_a", [1, m, k]), h("bc_b", [l, k, n])))     # lead 1 vs l
    net.target(net.op("t1", op, h("t1_a", [l, m, k]), P("t1_b", [k])))           # 3-D @ 1-D
    net.target(net.op("o3", op, P("o3_a", [k]), h("o3_b", [l, k, n])))           # 1-D @ 3-D
    net.target(net.op("f4", op, h("f4_a", [2, 1, m, k]), P("f4_b", [3, k, n])))  # 4-D, lead bcast
    net.target(net.op("pp", op, P("pp_a", [m, k]), P("pp_b", [k, n])))           # both params


@cases("sum", "mean")
def _reduce(net: Net, rng, op):
    a, b, c = dims(rng, 3)
    for name, axis in [("all", None), ("last", -1), ("a02", [0, 2]), ("neg", [-1, 0])]:
        attrs = {} if axis is None else {"axis": axis}
        net.target(net.op(name, op, net.scaled(f"{name}_h", [a, b, c], None, "small",
                                               qshape=[b, c]), **attrs))
    net.target(net.op("p", op, net.param("p_p", [a, b]), axis=[1]))
    net.target(net.op("v", op, net.scaled("v_h", [a], None, "small")))   # to a per-example scalar


@cases("softmax", "log_softmax")
def _softmax(net: Net, rng, op):
    a, b, c = dims(rng, 3)

    def h(name, shape, qshape=None):
        return net.scaled(name, shape, None, "small", qshape)

    net.target(net.op("last", op, h("last_h", [a, b])))
    net.target(net.op("a0", op, h("a0_h", [a, b, c], [b, c]), axis=0))
    net.target(net.op("m2", op, h("m2_h", [a, b, c], [a, 1, c]), axis=-2))
    net.target(net.op("p", op, net.param("p_p", [b, c]), axis=0))
    # logits near 200: exp overflows in float32 without the max shift
    net.target(net.op("big", op, net.op("big_h", "add", net.input("big_x", [b], "offset200"),
                                        net.param("big_p", [b]))))


@cases("reshape")
def _reshape(net: Net, rng, op):
    a, b, c = dims(rng, 3)

    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("m1", op, h("m1_h", [a, b, c]), shape=[c, -1]))
    net.target(net.op("flat", op, h("flat_h", [a, b, c]), shape=[-1]))
    net.target(net.op("ones", op, h("ones_h", [a, b, c]), shape=[b, 1, a * c]))
    net.target(net.op("mid", op, h("mid_h", [a * b]), shape=[a, -1, 1]))
    net.target(net.op("p", op, net.param("p_p", [a, b]), shape=[b, a]))


@cases("flatten")
def _flatten(net: Net, rng, op):
    a, b, c = dims(rng, 3)
    net.target(net.op("t3", op, net.scaled("t3_h", [a, b, c], None, "small")))
    net.target(net.op("t1", op, net.scaled("t1_h", [a], None, "small")))
    net.target(net.op("p", op, net.param("p_p", [a, b])))


@cases("concat")
def _concat(net: Net, rng, op):
    a, b, c = dims(rng, 3)
    w = dims(rng, 3, 1, 3)

    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("last", op, *[h(f"last_{k}", [a, w[k]]) for k in range(3)]))
    net.target(net.op("a0", op, *[h(f"a0_{k}", [w[k], b, c]) for k in range(3)], axis=0))
    net.target(net.op("m2", op, *[h(f"m2_{k}", [a, w[k], c]) for k in range(2)], axis=-2))
    net.target(net.op("p", op, net.param("p_0", [a, b]), net.param("p_1", [a, c])))
    net.target(net.op("one", op, h("one_h", [b])))
    t = h("tw_h", [a])
    net.target(net.op("tw", op, t, t))


@cases("mse")
def _mse(net: Net, rng, op):
    a, b = dims(rng, 2)
    net.target(net.op("h", op, net.scaled("h_h", [a, b], None, "small"), net.input("h_y", [a, b])))
    net.target(net.op("p", op, net.param("p_p", [b]), net.input("p_y", [b])))
    net.target(net.op("s", op, net.scaled("s_h", [], None, "small"), net.input("s_y", [])))


@cases("softmax_cross_entropy")
def _sce(net: Net, rng, op):
    a, k = dims(rng, 2, 2, 5)

    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("oh", op, h("oh_h", [k]), net.input("oh_y", [k], "onehot")))
    net.target(net.op("pr", op, h("pr_h", [a, k]), net.input("pr_y", [a, k], "probabilities")))
    net.target(net.op("ohr", op, h("ohr_h", [a, k]), net.input("ohr_y", [a, k], "onehot")))
    net.target(net.op("p", op, net.param("p_p", [k]), net.input("p_y", [k], "probabilities")))
    big = net.op("big_h", "add", net.input("big_x", [k], "offset200"), net.param("big_p", [k]))
    net.target(net.op("big", op, big, net.input("big_y", [k], "onehot")))
    # class indices (int32 targets): the guarded read x[..., t] and its scatter
    net.target(net.op("ci", op, h("ci_h", [k]), net.indices("ci_y", [], k)))
    net.target(net.op("cir", op, h("cir_h", [a, k]), net.indices("cir_y", [a], k)))
    net.target(net.op("cip", op, net.param("cip_p", [a, k]), net.indices("cip_y", [a], k)))
    cbig = net.op("cbig_h", "add", net.input("cbig_x", [k], "offset200"), net.param("cbig_p", [k]))
    net.target(net.op("cbig", op, cbig, net.indices("cbig_y", [], k)))


@cases("embedding")
def _embedding(net: Net, rng, op):
    v, d = dims(rng, 2, 3, 6)
    net.target(net.op("e", op, net.indices("e_i", [5], v), net.param("e_t", [v, d])))
    # two rows for eight lookups: every row repeats, its gradient adds up
    net.target(net.op("r", op, net.indices("r_i", [2, 4], 2), net.param("r_t", [2, d])))
    net.target(net.op("s", op, net.indices("s_i", [], v), net.param("s_t", [v, 3])))
    # a table that is data times a param: the scatter reaches the param through mul
    net.target(net.op("m", op, net.indices("m_i", [3], v),
                      net.scaled("m_t", [v, d], None, "small")))


@cases("bce_with_logits")
def _bce(net: Net, rng, op):
    a, b = dims(rng, 2)

    def h(name, shape, dom=None):
        return net.scaled(name, shape, dom, "small")

    net.target(net.op("bin", op, h("bin_h", [a, b]), net.input("bin_y", [a, b], "binary")))
    net.target(net.op("frac", op, h("frac_h", [b]), net.input("frac_y", [b], "unit")))
    net.target(net.op("big", op, h("big_h", [a], "large"), net.input("big_y", [a], "binary")))
    net.target(net.op("p", op, net.param("p_p", [b]), net.input("p_y", [b], "unit")))


# Spatial and movement ops. Inputs are batched through mul(x, Q) (so the input's gradient,
# the guarded scatter of a padded window, reaches Q) or are params; a weight is a param or
# batched. Sizes are odd on purpose (windows that do not tile the input drop its end).

# Values on a grid of halves: sums of two are exact, so equal values tie exactly (max pool).
DOMAINS["ties"] = lambda rng, s: rng.integers(-2, 3, size=s) / 2.0
DOMAINS["negative"] = lambda rng, s: rng.standard_normal(s) - 1.5   # mostly < 0


@cases("conv1d", "conv2d")
def _conv(net: Net, rng, op):
    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    P = net.param
    if op == "conv2d":
        # odd sizes, stride > 1 with asymmetric padding; dx is a guarded scatter
        net.target(net.op("pad", op, h("pad_x", [2, 5, 4]), P("pad_W", [3, 2, 3, 2]),
                          P("pad_b", [3]), stride=[2, 1], padding=[1, 2]))
        # depthwise (multiplier 1) with dilation, stride and padding
        net.target(net.op("dw1", op, h("dw1_x", [3, 7, 6]), P("dw1_W", [3, 1, 3, 3]),
                          groups=3, stride=2, padding=2, dilation=[2, 1]))
        net.target(net.op("grp", op, h("grp_x", [4, 5, 5]), P("grp_W", [4, 2, 3, 3]),
                          P("grp_b", [4]), groups=2, padding=1))
        # depthwise, multiplier 2
        net.target(net.op("dw2", op, h("dw2_x", [3, 6, 5]), P("dw2_W", [6, 1, 3, 3]),
                          P("dw2_b", [6]), groups=3, stride=2, padding=1))
        # 'same' with an even kernel (more padding after) and dilation
        net.target(net.op("same", op, h("same_x", [2, 5, 6]), P("same_W", [3, 2, 4, 2]),
                          padding="same", dilation=[1, 2]))
        # an unbatched input with a batched weight and bias
        net.target(net.op("valid", op, P("valid_x", [2, 4, 5]), h("valid_W", [3, 2, 2, 3]),
                          h("valid_b", [3]), padding="valid"))
    else:
        net.target(net.op("pad", op, h("pad_x", [2, 11]), P("pad_W", [3, 2, 3]),
                          P("pad_b", [3]), stride=3, padding=2, dilation=2))
        net.target(net.op("grp", op, h("grp_x", [4, 9]), P("grp_W", [2, 2, 4]),
                          P("grp_b", [2]), groups=2, stride=2, padding=1))
        net.target(net.op("dw1", op, h("dw1_x", [3, 6]), P("dw1_W", [3, 1, 3]),
                          groups=3, padding=1))
        net.target(net.op("dw2", op, h("dw2_x", [3, 8]), P("dw2_W", [6, 1, 3]),
                          P("dw2_b", [6]), groups=3, padding=[1]))
        net.target(net.op("same", op, h("same_x", [2, 9]), P("same_W", [3, 2, 4]),
                          padding="same", dilation=3))
        net.target(net.op("valid", op, P("valid_x", [2, 7]), h("valid_W", [3, 2, 5]),
                          padding="valid"))


@cases("max_pool1d", "max_pool2d")
def _max_pool(net: Net, rng, op):
    def h(name, shape, domain=None, qdomain="small"):
        return net.scaled(name, shape, domain, qdomain)

    def ties(name, shape):   # exact ties in a batched value, each element's own gradient
        return net.op(name, "add", net.input(f"{name}_x", shape, "ties"),
                      net.param(f"{name}_p", shape, "ties"))

    def relu_neg(name, shape):  # mostly exact zeros (ties), a few positive values
        return net.op(name, "relu", h(f"{name}_h", shape, "negative", "positive"))

    if op == "max_pool2d":
        net.target(net.op("k2", op, h("k2_h", [2, 5, 5]), kernel_size=2))
        net.target(net.op("k3s2p1", op, h("k3s2p1_h", [2, 5, 6]), kernel_size=3, stride=2,
                          padding=1))
        net.target(net.op("rect", op, h("rect_h", [1, 7, 5]), kernel_size=[3, 2],
                          stride=[2, 1], padding=[1, 1]))
        net.target(net.op("ties", op, ties("ties_h", [2, 4, 4]), kernel_size=3, stride=1,
                          padding=1))
        net.target(net.op("relu", op, relu_neg("relu_h", [2, 5, 4]), kernel_size=2))
        net.target(net.op("p", op, net.param("p_p", [2, 4, 5], "ties"), kernel_size=[2, 3],
                          stride=[2, 1]))
        # ceil_mode's clipped last windows, dilation, padding per side and over half the
        # kernel (ONNX's), ties routed through all of them
        net.target(net.op("ceil", op, ties("ceil_h", [2, 6, 8]), kernel_size=3, stride=2,
                          dilation=[1, 2], padding=[[0, 2], 1], ceil_mode=True))
    else:
        net.target(net.op("k3s2p1", op, h("k3s2p1_h", [3, 8]), kernel_size=3, stride=2,
                          padding=1))
        net.target(net.op("odd", op, h("odd_h", [2, 7]), kernel_size=[2]))
        net.target(net.op("ovl", op, h("ovl_h", [2, 6]), kernel_size=4, stride=1, padding=2))
        net.target(net.op("ties", op, ties("ties_h", [3, 9]), kernel_size=3, stride=1,
                          padding=1))
        net.target(net.op("relu", op, relu_neg("relu_h", [2, 8]), kernel_size=2))
        net.target(net.op("p", op, net.param("p_p", [2, 7], "ties"), kernel_size=3, stride=2,
                          padding=1))
        net.target(net.op("ceil", op, h("ceil_h", [2, 9]), kernel_size=3, stride=3,
                          dilation=2, padding=[[3, 1]], ceil_mode=True))


@cases("avg_pool1d", "avg_pool2d")
def _avg_pool(net: Net, rng, op):
    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    for inc, tag in ((True, "i"), (False, "x")):
        if op == "avg_pool2d":
            net.target(net.op(f"k3{tag}", op, h(f"k3{tag}_h", [2, 5, 6]), kernel_size=3,
                              stride=2, padding=1, count_include_pad=inc))
            net.target(net.op(f"rect{tag}", op, h(f"rect{tag}_h", [2, 5, 7]),
                              kernel_size=[2, 3], stride=[1, 2], padding=[1, 1],
                              count_include_pad=inc))
        else:
            net.target(net.op(f"k4{tag}", op, h(f"k4{tag}_h", [3, 9]), kernel_size=4,
                              stride=3, padding=2, count_include_pad=inc))
            net.target(net.op(f"ovl{tag}", op, h(f"ovl{tag}_h", [2, 6]), kernel_size=3,
                              stride=1, padding=1, count_include_pad=inc))
        # ceil_mode: the divisor counts the padding (or not), never the overhang
        if op == "avg_pool2d":
            net.target(net.op(f"ceil{tag}", op, h(f"ceil{tag}_h", [2, 6, 8]), kernel_size=3,
                              stride=2, dilation=[1, 2], padding=[[0, 2], 1], ceil_mode=True,
                              count_include_pad=inc))
        else:
            net.target(net.op(f"ceil{tag}", op, h(f"ceil{tag}_h", [2, 9]), kernel_size=3,
                              stride=2, padding=[[2, 1]], ceil_mode=True,
                              count_include_pad=inc))
    spatial = [5, 4] if op == "avg_pool2d" else [7]
    net.target(net.op("odd", op, h("odd_h", [2] + spatial), kernel_size=2))
    net.target(net.op("p", op, net.param("p_p", [1, 4, 3] if op == "avg_pool2d" else [2, 5]),
                      kernel_size=2, stride=1, padding=1, count_include_pad=False))


@cases("layer_norm")
def _layer_norm(net: Net, rng, op):
    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("last", op, h("last_h", [3, 5])))
    net.target(net.op("wb", op, h("wb_h", [2, 4]), net.param("wb_w", [4]),
                      net.param("wb_b", [4]), eps=1e-3))
    net.target(net.op("two", op, h("two_h", [2, 3, 4]), net.param("two_w", [3, 4]),
                      axes=[-2, -1]))
    net.target(net.op("all", op, h("all_h", [2, 3]), net.param("all_w", [2, 3]),
                      net.param("all_b", [2, 3]), axes=[0, 1], eps=0.1))
    net.target(net.op("p", op, net.param("p_p", [2, 3]), net.param("p_w", [3])))


@cases("global_avg_pool")
def _global_avg_pool(net: Net, rng, op):
    for name, shape in [("d2", [3, 4, 5]), ("d1", [3, 7]), ("d3", [2, 2, 3, 2])]:
        net.target(net.op(name, op, net.scaled(f"{name}_h", shape, None, "small")))
    net.target(net.op("p", op, net.param("p_p", [2, 3, 2])))


@cases("pad")
def _pad(net: Net, rng, op):
    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("last", op, h("last_h", [3, 4]), pad=[1, 2], value=0.5))
    net.target(net.op("two", op, h("two_h", [2, 3, 4]), pad=[0, 1, 2, 0]))
    net.target(net.op("all", op, h("all_h", [2, 3, 4]), pad=[1, 0, 0, 2, 1, 1], value=-1.0))
    net.target(net.op("none", op, h("none_h", [4]), pad=[0, 0]))
    net.target(net.op("p", op, net.param("p_p", [3]), pad=[2, 1], value=2.0))


@cases("slice")
def _slice(net: Net, rng, op):
    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("nstart", op, h("nstart_h", [3, 5, 6]), axis=-1, start=-3))
    net.target(net.op("step", op, h("step_h", [3, 7, 6]), axis=1, start=1, stop=-1, step=2))
    net.target(net.op("clamp", op, h("clamp_h", [5, 4]), axis=0, start=-10, stop=100, step=3))
    net.target(net.op("nstop", op, h("nstop_h", [4, 9]), axis=-1, stop=-2, step=3))
    net.target(net.op("nboth", op, h("nboth_h", [4, 9]), axis=-2, start=-3, stop=-1))
    net.target(net.op("p", op, net.param("p_p", [6, 2]), axis=0, start=-5, stop=-1, step=2))


@cases("transpose")
def _transpose(net: Net, rng, op):
    def h(name, shape):
        return net.scaled(name, shape, None, "small")

    net.target(net.op("rev", op, h("rev_h", [3, 5, 4])))
    net.target(net.op("swap", op, h("swap_h", [3, 5, 4]), perm=[1, 0, 2]))
    net.target(net.op("neg", op, h("neg_h", [2, 3, 4]), perm=[-1, 0, 1]))
    net.target(net.op("d4", op, h("d4_h", [2, 3, 2, 2]), perm=[2, 0, 3, 1]))
    net.target(net.op("d1", op, h("d1_h", [4])))
    net.target(net.op("p", op, net.param("p_p", [2, 3])))


@cases("batch_norm")
def _batch_norm(net: Net, rng, op):
    def stats(name, c):   # running statistics: mean any, variance positive
        return (net.param(f"{name}_rm", [c], "small", trainable=False),
                net.param(f"{name}_rv", [c], "positive", trainable=False))

    def affine(name, c, trainable=True):
        return (net.param(f"{name}_w", [c], "positive", trainable),
                net.param(f"{name}_b", [c], "small", trainable))

    # [C, H, W] (torch's BatchNorm2d) with a batched input that needs a gradient
    net.target(net.op("d2", op, net.scaled("d2_h", [3, 4, 5], None, "small", qshape=[5]),
                      *affine("d2", 3), *stats("d2", 3), eps=1e-3, momentum=0.3))
    # [C] features (BatchNorm1d) of a dense layer: N = n, one value per channel at n = 1.
    # (Batch norm ignores a per-channel scale or shift of its input, so the inputs here
    # mix channels or scale along other axes: their gradients are not zero by symmetry.)
    h = net.op("d1_h", "dense", net.input("d1_x", [3]), net.param("d1_Q", [4, 3]))
    net.target(net.op("d1", op, h, *affine("d1", 4), *stats("d1", 4)))
    # [C, L] with a frozen affine (torch's affine=False as weight 1, bias 0: trainable false)
    net.target(net.op("fz", op, net.scaled("fz_h", [2, 6], None, "small", qshape=[6]),
                      *affine("fz", 2, trainable=False), *stats("fz", 2)))


@cases("dropout")
def _dropout(net: Net, rng, op):
    # The gradients draw the masks of step 0 in C and in the reference alike: equal only if
    # both draw the same bits. A rank-3 batched value, a param (one mask for the batch),
    # p = 0 (the identity) and p = 0.9, another seed.
    net.target(net.op("h3", op, net.scaled("h3_h", [3, 4, 5], None, "small", qshape=[5]),
                      p=0.25))
    net.target(net.op("p", op, net.param("p_p", [7]), p=0.5, seed=3))
    net.target(net.op("id", op, net.scaled("id_h", [4], None, "small"), p=0.0))
    net.target(net.op("hi", op, net.scaled("hi_h", [6, 5], None, "small"), p=0.9, seed=12))


def _seed(op: str) -> int:
    return zlib.crc32(op.encode())


PART_SIZE = 6  # targets per compiled model


def build_net(op: str) -> Net:
    net = Net(f"op_{op}")
    CASES[op](net, np.random.default_rng(_seed(op)))
    return net


# ---------------------------------------------------------------- the tests

def test_table_covers_every_op():
    assert set(CASES) == set(OPS), (f"ops without a C test: {sorted(set(OPS) - set(CASES))}; "
                                    f"cases for unknown ops: {sorted(set(CASES) - set(OPS))}")


def test_configurations_respect_op_domains():
    """Each op's OpDef.domain ('positive', 'probabilities', ...) is what its cases draw."""
    compatible = {None: set(DOMAINS), "positive": {"positive"},
                  "probabilities": {"onehot", "probabilities"}, "unit": {"binary", "unit"}}
    for op in OPS:
        net = build_net(op)
        domains = {**net.inputs, **net.params}
        for name, node in net.nodes.items():
            if node["op"] != op:
                continue
            for k, src in enumerate(node["inputs"]):
                want = OPS[op].domain[k] if k < len(OPS[op].domain) else None
                if src in domains and isinstance(domains[src][1], tuple):   # int32 indices
                    assert k in OPS[op].integer_inputs, (op, name, src)
                    bound = OPS[op].integer_inputs[k].bound(
                        [net.shapes[i] for i in node["inputs"]])
                    assert domains[src][1] == ("index", bound), (op, name, src)
                elif src in domains:
                    assert domains[src][1] in compatible[want], (op, name, src)
                elif want == "positive":  # mul(x, Q) of positive x and Q
                    assert all(domains[i][1] == "positive" for i in net.nodes[src]["inputs"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(CASES))
def test_op_against_reference(op, dtype, assert_close):
    """Forward outputs, the loss and every param gradient, at several batch sizes."""
    for part in build_net(op).parts(PART_SIZE):
        compare_with_reference(part, dtype, assert_close, seed=_seed(op))


# ---------------------------------------------------------------- kinks

@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_like_kinks_take_the_pytorch_derivative(dtype, assert_close):
    """At exactly 0: relu' = 0, leaky_relu' = alpha, abs' = 0 (torch.sign(0)), in C and in
    the reference, for params (unbatched) and for a batched value x + Q that is exactly 0."""
    net = Net(f"kinks_{dtype}")
    K = (-1.0, 0.0, 0.0, 2.0)
    net.target(net.op("r", "relu", net.param("R", [4])))
    net.target(net.op("l", "leaky_relu", net.param("L", [4]), alpha=0.125))
    net.target(net.op("l0", "leaky_relu", net.param("L0", [4])))
    net.target(net.op("a", "elementwise", net.param("A", [4]), expr="abs(A)"))
    net.target(net.op("e", "elementwise", net.param("E", [4]), expr="relu(E)"))
    net.target(net.op("bx", "relu", net.op("bx_h", "add", net.input("x", [3]),
                                         net.param("Q", [3]))))
    model = graphc.compile(net.spec(), dtype=dtype)
    ref = reference(model.graph)
    Q = np.array([0.5, -0.25, 0.75])
    params = {"R": K, "L": K, "L0": K, "A": K, "E": K, "Q": Q}
    rng = np.random.default_rng(1)
    slope = {"R": [0, 0, 0, 1], "L": [0.125, 0.125, 0.125, 1], "L0": [0.01, 0.01, 0.01, 1],
             "A": [-1, 0, 0, 1], "E": [0, 0, 0, 1]}
    for m in (model, ref):
        m.set_params(params)
    for n in BATCHES:
        x = rounded(rng.standard_normal((n, 3)), dtype)
        x[:, 1] = -Q[1]             # x + Q is exactly 0 there, in every example
        x[0, 0] = -Q[0]
        data = {"x": x, **{f"cot_{t}": rounded(rng.standard_normal((n,) + net.shapes[t]), dtype)
                           for t in net.targets}}
        expected = {p: data[f"cot_{t}"].mean(axis=0) * np.array(slope[p], float)
                    for p, t in [("R", "r"), ("L", "l"), ("L0", "l0"), ("A", "a"), ("E", "e")]}
        expected["Q"] = (data["cot_bx"] * (x + Q > 0)).mean(axis=0)
        for m, what in [(model, "C"), (ref, "reference")]:
            out = m.forward(**data)["bx"]
            assert_close(out, np.maximum(x + Q, 0), dtype, f"{what} forward of relu at batch {n}")
            grads = m.gradients(**data)[1]
            for p, want in expected.items():
                assert_close(grads[p], want, dtype, f"{what}: d/d{p} at the kink, batch {n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_at_zero_logit(dtype, assert_close):
    """The logits-based form is split at 0 (x >= 0 / x < 0): both sides meet there."""
    net = Net(f"bce0_{dtype}")
    net.target(net.op("l", "bce_with_logits", net.param("P", [3]), net.input("y", [3], "unit")))
    model = graphc.compile(net.spec(), dtype=dtype)
    ref = reference(model.graph)
    P = np.array([0.0, -0.0, 0.5])
    rng = np.random.default_rng(2)
    y = rounded(rng.uniform(0, 1, (5, 3)), dtype)
    c = rounded(rng.standard_normal(5), dtype)
    sig = 1 / (1 + np.exp(-P))
    want_out = (np.maximum(P, 0) - P * y + np.log1p(np.exp(-np.abs(P)))).mean(axis=1)
    want_grad = (c[:, None] * (sig - y) / 3).mean(axis=0)
    for m, what in [(model, "C"), (ref, "reference")]:
        m.set_params({"P": P})
        loss, grads = m.gradients(y=y, cot_l=c)
        assert_close(grads["P"], want_grad, dtype, f"{what}: gradient at logit 0")
        assert_close(m.forward(y=y, cot_l=c)["l"], want_out, dtype, f"{what}: forward")


# ---------------------------------------------------------------- composed networks

def _he(rng, shape):
    return rng.standard_normal(shape) * (math.sqrt(2.0 / shape[-1]) if len(shape) > 1 else 0.3)


COMPOSED: dict[str, tuple[dict, dict]] = {
    # (spec, data domains of the inputs); every param is drawn by _he
    "mlp": ({  # the DESIGN's example
        "inputs": {"x": {"shape": [64]}, "y": {"shape": [10]}},
        "params": {"W1": {"shape": [32, 64], "init": "he_normal"}, "b1": {"shape": [32]},
                   "W2": {"shape": [10, 32], "init": "glorot_uniform"}, "b2": {"shape": [10]}},
        "nodes": {"h1": {"op": "dense", "inputs": ["x", "W1", "b1"]},
                  "a1": {"op": "elementwise", "inputs": ["h1"],
                         "expr": "h1 * tanh(log(1 + exp(h1)))"},
                  "logits": {"op": "dense", "inputs": ["a1", "W2", "b2"]},
                  "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
        "outputs": ["logits"], "loss": "loss"}, {"y": "onehot"}),
    "regression": ({
        "inputs": {"x": [8], "y": [3]},
        "params": {"W1": [16, 8], "b1": [16], "W2": [3, 16], "b2": [3]},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W1", "b1"]},
                  "a": {"op": "tanh", "inputs": ["h"]},
                  "pred": {"op": "dense", "inputs": ["a", "W2", "b2"]},
                  "loss": {"op": "mse", "inputs": ["pred", "y"]}},
        "outputs": ["pred", "a"], "loss": "loss"}, {}),
    "fanout": ({  # h feeds two nodes; V is used twice by one node; a feeds two nodes
        "inputs": {"x": [6], "c": [4]},
        "params": {"W": [5, 6], "b": [5], "V": [4, 5]},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "b"]},
                  "a": {"op": "sigmoid", "inputs": ["h"]},
                  "m": {"op": "mul", "inputs": ["a", "h"]},
                  "s": {"op": "add", "inputs": ["m", "a"]},
                  "VV": {"op": "mul", "inputs": ["V", "V"]},
                  "out": {"op": "dense", "inputs": ["s", "VV"]},
                  "p": {"op": "mul", "inputs": ["out", "c"]},
                  "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["out"], "loss": "loss"}, {}),
    "softmax_log": ({
        "inputs": {"x": [5], "c": [4]},
        "params": {"W": [4, 5], "b": [4]},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "b"]},
                  "s": {"op": "softmax", "inputs": ["h"]},
                  "l": {"op": "log", "inputs": ["s"]},
                  "p": {"op": "mul", "inputs": ["l", "c"]},
                  "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["s", "l"], "loss": "loss"}, {}),
    "log_softmax_sum": ({
        "inputs": {"x": [3, 5], "y": [3, 4]},
        "params": {"W": [4, 5], "b": [4]},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "b"]},
                  "ls": {"op": "log_softmax", "inputs": ["h"]},
                  "p": {"op": "mul", "inputs": ["ls", "y"]},
                  "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["ls"], "loss": "loss"}, {"y": "probabilities"}),
    "branches": ({  # two branches joined by concat
        "inputs": {"x": [6], "y": [2]},
        "params": {"W1": [4, 6], "W2": [3, 6], "b2": [3], "W3": [2, 7], "b3": [2]},
        "nodes": {"h1": {"op": "tanh", "inputs": ["d1"]},
                  "d1": {"op": "dense", "inputs": ["x", "W1"]},
                  "d2": {"op": "dense", "inputs": ["x", "W2", "b2"]},
                  "h2": {"op": "relu", "inputs": ["d2"]},
                  "cat": {"op": "concat", "inputs": ["h1", "h2"]},
                  "out": {"op": "dense", "inputs": ["cat", "W3", "b3"]},
                  "loss": {"op": "mse", "inputs": ["out", "y"]}},
        "outputs": ["out"], "loss": "loss"}, {}),
    "reshapes": ({  # flatten and reshape between denses
        "inputs": {"x": [4, 6], "y": [3, 2]},
        "params": {"W1": [5, 6], "W2": [12, 20], "b2": [12], "W3": [2, 4]},
        "nodes": {"d1": {"op": "dense", "inputs": ["x", "W1"]},
                  "f": {"op": "flatten", "inputs": ["d1"]},
                  "d2": {"op": "dense", "inputs": ["f", "W2", "b2"]},
                  "r": {"op": "reshape", "inputs": ["d2"], "shape": [3, -1]},
                  "d3": {"op": "dense", "inputs": ["r", "W3"]},
                  "ce": {"op": "softmax_cross_entropy", "inputs": ["d3", "y"]},
                  "loss": {"op": "mean", "inputs": ["ce"]}},
        "outputs": ["d3"], "loss": "loss"}, {"y": "onehot"}),
    "matmul_param": ({
        "inputs": {"x": [3, 4], "c": [2, 5]},
        "params": {"P": [4, 5], "Q": [2, 3]},
        "nodes": {"xp": {"op": "matmul", "inputs": ["x", "P"]},
                  "s": {"op": "softmax", "inputs": ["xp"], "axis": 0},
                  "qs": {"op": "matmul", "inputs": ["Q", "s"]},
                  "p": {"op": "mul", "inputs": ["qs", "c"]},
                  "loss": {"op": "sum", "inputs": ["p"]}},
        "outputs": ["qs"], "loss": "loss"}, {}),
    "cnn": ({  # the spatial and movement ops in a chain: conv, pools, pad, slice, transpose
        "inputs": {"x": [2, 7, 6], "y": [3]},
        "params": {"K1": [4, 2, 3, 3], "c1": [4], "K2": [4, 2, 2, 2], "K3": [4, 4, 3],
                   "c3": [4], "W": [3, 12], "b": [3]},
        "nodes": {"h1": {"op": "conv2d", "inputs": ["x", "K1", "c1"], "padding": 1},
                  "a1": {"op": "relu", "inputs": ["h1"]},
                  "p1": {"op": "max_pool2d", "inputs": ["a1"], "kernel_size": 2},   # [4, 3, 3]
                  "h2": {"op": "conv2d", "inputs": ["p1", "K2"], "padding": "same",
                         "groups": 2},
                  "q": {"op": "pad", "inputs": ["h2"], "pad": [1, 0, 0, 1]},      # [4, 4, 4]
                  "s": {"op": "slice", "inputs": ["q"], "axis": -1, "start": 1, "step": 2},
                  "t": {"op": "transpose", "inputs": ["s"], "perm": [0, 2, 1]},  # [4, 2, 4]
                  "ap": {"op": "avg_pool2d", "inputs": ["t"], "kernel_size": 2, "padding": 1,
                         "count_include_pad": False},                           # [4, 2, 3]
                  "g": {"op": "global_avg_pool", "inputs": ["ap"]},             # [4]
                  "r": {"op": "reshape", "inputs": ["t"], "shape": [4, 8]},
                  "h3": {"op": "conv1d", "inputs": ["r", "K3", "c3"], "stride": 2},  # [4, 3]
                  "m3": {"op": "max_pool1d", "inputs": ["h3"], "kernel_size": 2,
                         "stride": 1},                                          # [4, 2]
                  "f": {"op": "flatten", "inputs": ["m3"]},
                  "cat": {"op": "concat", "inputs": ["g", "f"]},                # [12]
                  "logits": {"op": "dense", "inputs": ["cat", "W", "b"]},
                  "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
        "outputs": ["logits", "p1"], "loss": "loss"}, {"y": "onehot"}),
}


def composed_runs(name: str, dtype: str):
    spec, domains = COMPOSED[name]
    model = compiled(json.dumps({"name": name, **spec}, sort_keys=True), dtype)
    ref = reference(model.graph)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    params = {p: rounded(_he(rng, v.shape), dtype) for p, v in model.graph.params.items()}
    model.set_params(params)
    ref.set_params(params)
    for n in BATCHES:
        data = {i: rounded(draw(rng, (n,) + v.shape, domains.get(i)), dtype)
                for i, v in model.graph.inputs.items()}
        yield n, model, ref, data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_composed_network_against_reference(name, dtype, assert_close):
    for n, model, ref, data in composed_runs(name, dtype):
        got, want = model.forward(**data), ref.forward(**data)
        for o in model.graph.outputs:
            assert_close(got[o], want[o], dtype, f"{name}: output '{o}' at batch {n}")
        (loss, grads), (ref_loss, ref_grads) = model.gradients(**data), ref.gradients(**data)
        assert_close(loss, ref_loss, dtype, f"{name}: loss at batch {n}")
        for p in model.graph.params:
            assert np.any(ref_grads[p] != 0), f"{name}: the gradient of '{p}' is zero"
            assert_close(grads[p], ref_grads[p], dtype, f"{name}: gradient of '{p}' at batch {n}")


# ---------------------------------------------------------------- library bugs
# Minimal cases of bugs this file found, kept as regression tests;
# the tie convention of max/min is pinned here.

def _grad_spec(name: str, expr: str, inputs: dict, params: dict) -> dict:
    """h = elementwise(expr); loss = sum(mul(h, c))."""
    args = list(inputs) + list(params)
    return {"name": name, "inputs": {**inputs, "c": [3]}, "params": params,
            "nodes": {"h": {"op": "elementwise", "inputs": args, "expr": expr},
                      "p": {"op": "mul", "inputs": ["h", "c"]},
                      "loss": {"op": "sum", "inputs": ["p"]}},
            "outputs": ["p"], "loss": "loss"}


def test_loss_survives_unbatched_backward_temporaries():
    """codegen.plan.plan ended the loss buffer's live range at its last kernel, not at the
    entry's `return`: a later unbatched buffer (here h.grad) overwrote it."""
    spec = {"name": "lossbug", "inputs": {"c": [2]}, "params": {"P": [2], "Q": [2]},
            "nodes": {"h": {"op": "mul", "inputs": ["P", "Q"]},   # unbatched: so is h.grad
                      "p": {"op": "mul", "inputs": ["h", "c"]},
                      "loss": {"op": "sum", "inputs": ["p"]}},
            "outputs": ["p"], "loss": "loss"}
    model = graphc.compile(spec, dtype="float64")
    P, Q, c = np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([[1.0, 1.0]])
    model.set_params({"P": P, "Q": Q})
    loss, grads = model.gradients(c=c)
    np.testing.assert_allclose(grads["P"], Q)      # gradients are right...
    assert loss == pytest.approx(11.0)              # ...the loss was h.grad[0] = 1.0


@pytest.mark.parametrize("expr", ["x * P + pi", "x * P * e", "erf(x * P)"],
                         ids=["pi", "e", "erf_gradient"])
def test_number_symbols_compile(expr):
    """codegen.printer printed pi and E as declarations ('const double pi = ...;') inside
    an expression. erf: its derivative 2·exp(-u²)/sqrt(pi) brings pi into the backward."""
    spec = _grad_spec("numsym", expr, {"x": [3]}, {"P": [3]})
    model = graphc.compile(spec, dtype="float64")
    model.set_params({"P": np.array([0.5, -0.25, 1.0])})
    x, c = np.array([[0.3, -0.7, 0.2]]), np.array([[1.0, -2.0, 0.5]])
    f, df = {"x * P + pi": (lambda u: u + math.pi, lambda u: 1.0),
             "x * P * e": (lambda u: u * math.e, lambda u: math.e),
             "erf(x * P)": (np.vectorize(math.erf),
                            lambda u: 2 / math.sqrt(math.pi) * np.exp(-u * u))}[expr]
    u = x * model.get_params()["P"]
    np.testing.assert_allclose(model.forward(x=x, c=c)["p"], f(u) * c, rtol=1e-12)
    np.testing.assert_allclose(model.gradients(x=x, c=c)[1]["P"], (c * df(u) * x)[0],
                               rtol=1e-12)


def test_reference_evaluates_erf_on_arrays():
    """graphc.reference._Formula: lambdify(..., 'numpy') turned erf into math.erf."""
    g = graphc.Graph.from_spec({"name": "erfref", "inputs": {"x": [3]},
                                "nodes": {"h": {"op": "elementwise", "inputs": ["x"],
                                                "expr": "erf(x)"}},
                                "outputs": ["h"]})
    x = np.array([[0.3, -0.7, 0.2], [1.0, 2.0, -1.5]])
    np.testing.assert_allclose(reference(g).forward(x=x)["h"], np.vectorize(math.erf)(x),
                               rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cse_keeps_factor_two(dtype, assert_close):
    """codegen.emit ran sympy.cse on printer.prepare's output: prepare turns P**2 into an
    unevaluated P*P, and cse then rewrote 2*P*(1 + P*P)**-2 as P**2*(1 + P*P)**-2."""
    spec = _grad_spec(f"csebug_{dtype}", "1 / (1 + P**2)", {}, {"P": [3]})
    model = graphc.compile(spec, dtype=dtype)
    P = np.array([0.5, -1.5, 2.0])
    c = np.array([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0]])
    model.set_params({"P": P})
    want = c.mean(axis=0) * (-2 * P / (1 + P ** 2) ** 2)
    ref = reference(model.graph)
    ref.set_params({"P": P})
    assert_close(ref.gradients(c=c)[1]["P"], want, "float64", "reference")
    assert_close(model.gradients(c=c)[1]["P"], want, dtype, "C")


def test_max_min_ties_split_the_gradient_like_pytorch():
    spec = _grad_spec("ties", "max(P, Q) + 3 * min(P, Q)", {}, {"P": [3], "Q": [3]})
    model = graphc.compile(spec, dtype="float64")
    ref = reference(model.graph)
    tie = np.array([0.0, 1.5, -2.0])
    c = np.array([[1.0, 2.0, -1.0]])
    for m in (model, ref):
        m.set_params({"P": tie, "Q": tie})
        grads = m.gradients(c=c)[1]
        np.testing.assert_allclose(grads["P"], 2.0 * c[0])   # 0.5·1 + 0.5·3
        np.testing.assert_allclose(grads["Q"], 2.0 * c[0])
