"""Random graphc specs, and an independent PyTorch evaluator of any spec (float64, autograd).

Used by tests/test_differential.py. Also a command line:

    python tests/torch_graphs.py SEED [SEED ...]        # print the spec, compile, compare
    python tests/torch_graphs.py --shrink SEED          # a smaller spec failing the same way
    python tests/torch_graphs.py --extreme SEED [--float32]   # an extreme-activation graph
    python tests/torch_graphs.py --spec FILE.yaml ...   # a hand-written (e.g. minimised) spec

The generator (`generate(seed)`) draws a random DAG over every op of `graphc.ops.OPS` and
every formula function, constant and operator of `graphc.formula`, with per-example
broadcasting ([3, 1] against [1, 4], params against batched values), concat (often feeding
a dense, often of a value that also feeds a dense), values used twice (`add(u, u)`,
`matmul(a, a)`, `concat([u, u])`, two consumers), params used twice, param-only subgraphs
(`exp(tanh(W))` as a dense weight), formulas that cancel an input (`x - x + 1`), large
constants (`10**20`), kinks and ties (`max(a, a)`, nested `abs`/`max`/`min`/`relu`), and a
random declaration order of inputs, params, nodes and top-level keys. Convolutions and
pools take [C, L] / [C, H, W] values (existing ones, another value reshaped, or fresh) with
random stride, padding (per axis, 'same', 'valid'), dilation, groups (depthwise too) and
count_include_pad; a max-pool window whose maximum is near (not at) a tie counts as a kink.
Domains are kept valid by construction: every value carries a magnitude bound and, when
known, a positive lower bound, and `log`/`sqrt`/`/`/`pow` only ever see values bounded away
from 0, `asin`/`acos` values in [-0.9, 0.9], `exp`/`sinh`/`cosh`/`tan` bounded arguments.

The evaluator (`torch_evaluate`) reads only the spec: it runs the graph one example at a
time on per-example tensors (so axes, broadcasting and matmul are exactly the per-example
semantics of DESIGN.md), params shared across examples, the loss the mean of the
per-example losses, and takes the param gradients with autograd. Batch norm alone sees the
whole batch (torch's F.batch_norm on the stacked examples): in training mode for the loss
and the gradients, in evaluation mode for the outputs and evaluate's loss. Formulas are parsed with
`ast` and mapped onto torch functions (sigmoid -> torch.sigmoid, softplus ->
logaddexp(x, 0), max -> torch.maximum, ...); constant subexpressions are folded exactly
(Fractions), as SymPy folds them.

`check_case` compiles a case (float64, warning-free under -Werror) and compares every output, the loss and every param
gradient with torch, and graphc's NumPy reference too; then it puts one NaN into one input
element of example 0 and checks that the outputs are NaN exactly where torch's are
(skipped when SymPy simplifies an input away, as in x - x: exact for numbers, not for NaN).
`extreme_case` is a second family: activations at |h| in the hundreds and thousands,
where float32's exp overflows (swish, mish, gelu, softplus, sigmoid, log_softmax, ...).
"""

from __future__ import annotations

import ast
import keyword
import math
import operator
import random
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from conftest import compile_strict   # tests/ is on sys.path: pytest's and this script's

# ---------------------------------------------------------------- what must be covered

# The named activations: each drawn less often than the core ops (their code paths are one
# map each), with random attributes (op_activation).
ACTIVATION_OPS = ("gelu", "silu", "softplus", "elu", "selu", "hard_sigmoid", "hard_swish",
                  "mish")
# Convolution, pooling and movement ops (op_conv, op_pool, ...): on per-example values
# [C, L] and [C, H, W], which spatial_value finds, reshapes or makes.
SPATIAL_OPS = ("conv1d", "conv2d", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d",
               "global_avg_pool", "pad", "slice", "transpose")
# Normalization (op_batch_norm): batch norm sees the whole batch, in training mode for the
# loss and gradients and in evaluation mode (running statistics) for the outputs. Dropout
# (op_dropout) zeroes and scales in training, the masks graphc's generator draws at step 0
# (torch's own generator cannot be asked for them), and is the identity otherwise.
NORM_OPS = ("batch_norm",)
MODE_OPS = NORM_OPS + ("dropout",)
OP_NAMES = ("dense", "matmul", "add", "sub", "mul", "div", "relu", "leaky_relu", "sigmoid",
            "tanh", "exp", "log", "softmax", "log_softmax", "sum", "mean", "reshape",
            "flatten", "concat", "elementwise", "layer_norm") + ACTIVATION_OPS + SPATIAL_OPS + (
                "embedding", "dropout") + NORM_OPS
OP_WEIGHTS = {"dense": 3, "elementwise": 3, "concat": 2, "matmul": 1.5,
              **{op: 0.4 for op in ACTIVATION_OPS}}
LOSS_OPS = ("mse", "softmax_cross_entropy", "bce_with_logits")
FORMULA_FUNCTIONS = ("exp", "log", "sqrt", "sin", "cos", "tan", "sinh", "cosh", "tanh",
                     "asin", "acos", "atan", "erf", "abs", "relu", "sigmoid", "softplus",
                     "max", "min", "pow")
FORMULA_CONSTANTS = ("pi", "e")
FORMULA_OPERATORS = ("+", "-", "*", "/", "**", "neg")
# Formula constructs beyond single functions: the cases that matter for the generated C.
FORMULA_TEMPLATES = ("swish", "mish", "gelu", "bigconst", "tie", "cancel", "kinks")
FORMULA_ITEMS = FORMULA_FUNCTIONS + FORMULA_CONSTANTS + FORMULA_OPERATORS

MAX_ELEMENTS = 24        # per-example elements of a generated value (a few more after ops)
MAG_LIMIT = 60.0         # values bounded by more feed only squashing ops and losses
RTOL = 1e-8              # |graphc - torch| <= RTOL * max(1, |torch|), element by element
FLOAT32_RTOL = 1e-4      # float32 C: 1e-4 * max(1, max |torch|) over each array
KINK_MARGIN = 1e-7       # a kink argument this close to (but not at) its kink: redraw data
VALUE_LIMIT = 1e6        # a reference value beyond this: the generator retries the spec

TRICKY_NAMES = ("b", "n", "i", "j", "k", "acc", "work", "params", "grads", "state", "out",
                "tmp", "i0", "b0", "L", "x_1", "in_x", "out_y", "loss", "h", "dx", "g",
                "main", "size_t", "M_PI", "INFINITY", "NAN", "fmax", "expf", "r0")
PREFIXES = {"input": ("x", "u", "data", "inp", "c", "tgt"),
            "param": ("W", "w", "p", "bias", "theta", "K"),
            "node": ("h", "z", "a", "v", "t", "y", "node", "act")}
RESERVED = (set(FORMULA_FUNCTIONS) | set(FORMULA_CONSTANTS) | set(keyword.kwlist)
            | {"True", "False", "None"})


# ---------------------------------------------------------------- small helpers

def broadcast(*shapes):
    """numpy's broadcast of per-example shapes, or None when they do not broadcast."""
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        return None


def size(shape) -> int:
    return math.prod(shape)


def fmt(x: float) -> str:
    """A number as formula text (negative numbers parenthesised)."""
    if float(x).is_integer() and abs(x) < 1e6:
        s = str(int(x))
    else:
        s = repr(float(x))
    return f"({s})" if x < 0 else s


@dataclass
class Val:
    """A value of the graph being generated, with what the generator knows about it."""
    name: str
    shape: tuple
    batched: bool
    data_only: bool            # computed from inputs only (may be a loss target)
    mag: float                 # a (heuristic) bound on |value|
    lo: float | None = None    # a lower bound > 0 when the value is known positive
    kind: str = "node"         # input | param | node


@dataclass
class E:
    """A formula being generated: its text, a bound on |value|, a positive lower bound."""
    text: str
    mag: float
    lo: float | None = None
    vars: frozenset = frozenset()


@dataclass
class Case:
    seed: int
    attempt: int
    spec: dict
    input_kinds: dict          # input name -> normal | pos | prob | onehot | unit | labels
    #                            | index:V (int32 indices 0 to V - 1)
    batch: int
    features: frozenset = frozenset()   # formula templates used: cancel, bigconst, tie, ...

    def yaml(self) -> str:
        return spec_yaml(self.spec)


def spec_yaml(spec: dict) -> str:
    import yaml
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100)


# ---------------------------------------------------------------- formulas

class FormulaGen:
    """Random formula text over some leaves, with domains kept valid (see module doc)."""

    def __init__(self, rng: random.Random, leaves: list[E], todo: list[str], *,
                 cancellations: bool = True, events: set | None = None):
        self.rng, self.leaves, self.todo = rng, leaves, todo
        self.cancellations = cancellations
        self.events = set() if events is None else events

    # -- leaves
    def number(self, positive: bool = False) -> E:
        x = self.rng.choice((0.5, 2, 3, 1.5, 0.25, 0.1, 1, 4, 0.75, 1.25, 2.5, 0.3))
        if not positive and self.rng.random() < 0.3:
            x = -x
        return E(fmt(x), abs(x), x if x > 0 else None)

    def constant(self, name: str | None = None) -> E:
        name = name or self.rng.choice(FORMULA_CONSTANTS)
        v = math.pi if name == "pi" else math.e
        return E(name, v, v)

    def leaf(self) -> E:
        r = self.rng.random()
        if r < 0.8:
            return self.rng.choice(self.leaves)
        if r < 0.93:
            return self.number()
        return self.constant()

    # -- domain helpers
    def bounded(self, a: E, limit: float) -> E:
        """`a` itself when |a| <= limit, else a squashed (and scaled) version of it."""
        if a.mag <= limit:
            return a
        w = self.rng.choice(("tanh", "sin", "cos", "atan", "erf", "sigmoid"))
        b = E(f"{w}({a.text})", math.pi / 2 if w == "atan" else 1.0, None, a.vars)
        if b.mag > limit:
            c = math.floor(limit / b.mag * 1000) / 1000
            b = E(f"({fmt(c)} * {b.text})", c * b.mag, None, a.vars)
        return b

    def positive(self, a: E, lo: float) -> E:
        """`a` when it is known >= lo, else a positive function of it (>= 0.1 at least)."""
        if a.lo is not None and a.lo >= lo:
            return a
        r, v = self.rng, a.vars
        t = r.randrange(16)
        if t == 0:
            s = self.bounded(a, 10)
            return E(f"(1 + {s.text} * {s.text})", 1 + s.mag ** 2, 1.0, v)
        if t == 1:
            s = self.bounded(a, 2)
            return E(f"exp({s.text})", math.exp(s.mag), math.exp(-s.mag), v)
        if t == 2:
            return E(f"(softplus({a.text}) + 0.5)", a.mag + 1.2, 0.5, v)
        if t == 3:
            s = self.bounded(a, 3)
            return E(f"cosh({s.text})", math.cosh(s.mag), 1.0, v)
        if t == 4:
            s = self.bounded(a, 100)
            return E(f"sqrt(1 + {s.text} * {s.text})", math.sqrt(1 + s.mag ** 2), 1.0, v)
        if t == 5:
            return E(f"(pi + atan({a.text}))", math.pi * 1.5, math.pi / 2, v)
        if t == 6:
            return E(f"(e + sin({a.text}))", math.e + 1, math.e - 1, v)
        if t == 7:
            return E(f"(2 - tanh({a.text}))", 3.0, 1.0, v)
        if t == 8:
            return E(f"(abs({a.text}) + 1)", a.mag + 1, 1.0, v)
        if t == 9:
            return E(f"max({a.text}, 0.5)", max(a.mag, 0.5), 0.5, v)
        if t == 10:
            return E(f"(relu({a.text}) + 0.25)", a.mag + 0.25, 0.25, v)
        if t == 11:
            return E(f"(sigmoid({a.text}) + 0.1)", 1.1, 0.1, v)
        if t == 12:
            return E(f"(erf({a.text}) + 1.5)", 2.5, 0.5, v)
        if t == 13:
            s = self.bounded(a, 10)
            return E(f"({s.text} ** 2 + 0.5)", s.mag ** 2 + 0.5, 0.5, v)
        if t == 14:
            s = self.bounded(a, 0.9)
            return E(f"acos({s.text})", math.pi, math.acos(0.9), v)
        return E(f"(1.5 + cos({a.text}))", 2.5, 0.5, v)

    # -- the recursion
    def expr(self, depth: int) -> E:
        if depth <= 0 or self.rng.random() < 0.15:
            if self.todo and any(t in FORMULA_CONSTANTS for t in self.todo):
                name = next(t for t in self.todo if t in FORMULA_CONSTANTS)
                self.todo.remove(name)
                return self.constant(name)
            return self.leaf()
        if self.todo and self.rng.random() < 0.7:
            name = self.todo.pop(self.rng.randrange(len(self.todo)))
        else:
            kinds = (FORMULA_FUNCTIONS, FORMULA_OPERATORS, FORMULA_TEMPLATES)
            name = self.rng.choice(self.rng.choices(kinds, (5, 4, 2))[0])
        if name in FORMULA_CONSTANTS:
            c = self.constant(name)
            other = self.expr(depth - 1)
            return E(f"({c.text} * {other.text})", c.mag * other.mag, None, other.vars)
        e = self.build(name, depth)
        if e.mag > 1e4:
            e = self.bounded(e, 1.0)
        return e

    def build(self, name: str, depth: int) -> E:
        r = self.rng
        if name in FORMULA_TEMPLATES and (name != "cancel" or self.cancellations):
            self.events.add(name)

        def sub() -> E:
            return self.expr(depth - 1)

        def small() -> E:  # a subformula that is repeated in the text: keep it short
            return self.expr(min(depth - 1, 1))

        def call(f, a: E, mag, lo=None) -> E:
            return E(f"{f}({a.text})", mag, lo, a.vars)

        if name == "exp":
            a = self.bounded(sub(), 5)
            return call("exp", a, math.exp(a.mag), math.exp(-a.mag))
        if name in ("log", "sqrt"):
            a = self.positive(sub(), 0.01)
            if name == "sqrt":
                return call("sqrt", a, math.sqrt(a.mag), math.sqrt(a.lo))
            lo = math.log(a.lo) if a.lo > 1.2 else None
            return call("log", a, max(abs(math.log(a.lo)), abs(math.log(a.mag))), lo)
        if name in ("sin", "cos", "tanh", "erf"):
            return call(name, sub(), 1.0)
        if name == "atan":
            return call(name, sub(), math.pi / 2)
        if name == "sigmoid":
            a = sub()
            return call(name, a, 1.0, 1 / (1 + math.exp(a.mag)) if a.mag < 10 else None)
        if name == "tan":
            a = self.bounded(sub(), 1.2)
            return call(name, a, math.tan(a.mag))
        if name in ("sinh", "cosh"):
            a = self.bounded(sub(), 4)
            return call(name, a, math.cosh(a.mag), 1.0 if name == "cosh" else None)
        if name in ("asin", "acos"):
            a = self.bounded(sub(), 0.9)
            return call(name, a, math.pi / 2 if name == "asin" else math.pi,
                        math.acos(a.mag) if name == "acos" else None)
        if name == "abs":
            a = sub()
            return call(name, a, a.mag, a.lo)
        if name == "relu":
            a = sub()
            return call(name, a, a.mag, a.lo)
        if name == "softplus":
            a = sub()
            return call(name, a, a.mag + 0.7,
                        math.log1p(math.exp(-a.mag)) if a.mag < 10 else None)
        if name in ("max", "min"):
            a = sub()
            b = sub() if r.random() < 0.75 else self.number()
            if r.random() < 0.5:
                a, b = b, a
            if name == "max":
                lo = max(a.lo or 0, b.lo or 0) or None
            else:
                lo = min(a.lo, b.lo) if a.lo and b.lo else None
            return E(f"{name}({a.text}, {b.text})", max(a.mag, b.mag), lo, a.vars | b.vars)
        if name in ("pow", "**"):
            def shown(base: E, ex: E) -> str:
                return (f"pow({base.text}, {ex.text})" if name == "pow"
                        else f"({base.text} ** {ex.text})")
            if r.random() < 0.45:   # any base, a small integer exponent
                base = self.bounded(sub(), 5)
                k = r.choice((2, 3, 2, 1))
                if base.lo is not None and base.lo >= 0.3 and r.random() < 0.4:
                    k = -k
                    mag = base.lo ** k
                else:
                    mag = base.mag ** k
                lo = base.lo ** k if base.lo and k > 0 else (1 / base.mag ** -k if k < 0 else None)
                return E(shown(base, E(fmt(k), abs(k))), mag, lo, base.vars)
            base = self.positive(self.bounded(sub(), 8), 0.2)
            if base.mag > 20:
                base = self.positive(self.bounded(base, 8), 0.2)
            if r.random() < 0.5:
                ex = self.number()
                ex = E(ex.text, min(ex.mag, 2.5), ex.lo)
            else:
                ex = self.bounded(sub(), 1.5)
            top = max(base.mag, 1 / base.lo) ** ex.mag
            return E(shown(base, ex), top, 1 / top, base.vars | ex.vars)
        if name == "neg":
            a = sub()
            return E(f"(-{a.text})", a.mag, None, a.vars)
        if name in ("+", "-"):
            a, b = sub(), sub()
            lo = a.lo + b.lo if name == "+" and a.lo and b.lo else None
            return E(f"({a.text} {name} {b.text})", a.mag + b.mag, lo, a.vars | b.vars)
        if name == "*":
            a, b = sub(), sub()
            if a.mag * b.mag > 1e3:
                b = self.bounded(b, 2)
            lo = a.lo * b.lo if a.lo and b.lo else None
            return E(f"({a.text} * {b.text})", a.mag * b.mag, lo, a.vars | b.vars)
        if name == "/":
            a = sub()
            b = self.positive(sub(), 0.1) if r.random() < 0.8 else self.number(positive=True)
            if r.random() < 0.2:
                b = E(f"(-{b.text})", b.mag, None, b.vars)
                lo = None
            else:
                lo = a.lo / b.mag if a.lo else None
            return E(f"({a.text} / {b.text})", a.mag / abs(self._lo(b)), lo, a.vars | b.vars)
        if name == "swish":
            a = small()
            return E(f"({a.text} * sigmoid({a.text}))", a.mag, None, a.vars)
        if name == "mish":
            a = small()
            return E(f"({a.text} * tanh(softplus({a.text})))", a.mag, None, a.vars)
        if name == "gelu":
            a = small()
            return E(f"(0.5 * {a.text} * (1 + erf({a.text} / sqrt(2))))", a.mag, None, a.vars)
        if name == "bigconst":
            a = small()
            t = r.randrange(5)
            if t == 0:
                return E(f"(tanh({a.text} / 10**20) * 10**20)", a.mag, a.lo, a.vars)
            if t == 1:
                return E(f"({a.text} * 10**20 / (10**20 + {a.text} * {a.text}))", a.mag, None,
                         a.vars)
            if t == 2:
                return E(f"(10**20 * exp(-50 - {a.text} * {a.text}))", 0.02, None, a.vars)
            if t == 3:
                return E(f"(log(10**20) * {a.text} / 46)", a.mag, a.lo, a.vars)
            return E(f"({a.text} * 1e-20 * 1.0e20 + 1e-300)", a.mag + 1e-300, None, a.vars)
        if name == "tie":
            a = small()
            f = r.choice(("max", "min"))
            return E(f"{f}({a.text}, {a.text})", a.mag, a.lo, a.vars)
        if name == "cancel":
            if not self.cancellations:
                return sub()
            a, c = small(), self.number()
            # the formula no longer depends on `a` once SymPy simplifies it
            return E(f"({a.text} - {a.text} + {c.text})", c.mag, c.lo, frozenset())
        if name == "kinks":
            a, b = sub(), sub()
            t = r.randrange(6)
            vs = a.vars | b.vars
            if t == 0:
                c = small()
                return E(f"max(abs({a.text}), min({b.text}, abs({c.text})))",
                         max(a.mag, b.mag, c.mag), None, vs | c.vars)
            if t == 1:
                return E(f"abs(max({a.text}, {b.text}))", max(a.mag, b.mag), None, vs)
            if t == 2:
                return E(f"relu(abs({a.text}) - 0.5)", a.mag, None, a.vars)
            if t == 3:
                return E(f"abs(abs({a.text}) - 1)", a.mag + 1, None, a.vars)
            if t == 4:
                return E(f"min(max({a.text}, -1), 1)", 1.0, None, a.vars)
            return E(f"max(min({a.text}, {b.text}), abs(min({b.text}, {a.text})))",
                     max(a.mag, b.mag), None, vs)
        raise AssertionError(name)

    @staticmethod
    def _lo(b: E) -> float:
        return b.lo if b.lo else 0.1


# ---------------------------------------------------------------- graphs

class SpecGenerator:
    """One random spec; see the module docstring. `required_ops` and `required_formula`
    are forced in (so that a handful of seeds covers everything)."""

    def __init__(self, seed: int, *, steps: int, required_ops=(), required_formula=(),
                 cancellations: bool = True):
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = steps
        self.required_ops = list(required_ops)
        self.todo = list(required_formula)
        self.cancellations = cancellations
        self.vals: dict[str, Val] = {}
        self.inputs: dict[str, object] = {}
        self.params: dict[str, object] = {}
        self.nodes: dict[str, dict] = {}
        self.input_kinds: dict[str, str] = {}
        self.uses: Counter = Counter()
        self.taken: set[str] = set()
        self.counter = 0
        self.events: set[str] = set()

    # -- names and leaves
    def fresh_name(self, kind: str) -> str:
        r = self.rng
        if r.random() < 0.08:
            free = [t for t in TRICKY_NAMES if t not in self.taken and t not in RESERVED]
            if free:
                name = r.choice(free)
                self.taken.add(name)
                return name
        while True:
            name = f"{r.choice(PREFIXES[kind])}{self.counter}"
            self.counter += 1
            if name not in self.taken:
                self.taken.add(name)
                return name

    def new_input(self, shape, kind: str = "normal") -> Val:
        name = self.fresh_name("input")
        shape = tuple(shape)
        self.inputs[name] = list(shape) if self.rng.random() < 0.3 else {"shape": list(shape)}
        self.input_kinds[name] = kind
        if kind.startswith("index:"):   # int32 indices: only embedding and cross-entropy read them
            self.inputs[name] = {"shape": list(shape), "dtype": "int32"}
            v = self.vals[name] = Val(name, shape, True, True, float(kind[6:]), None, "input")
            return v
        mag, lo = {"normal": (3.0, None), "pos": (2.0, 0.5), "prob": (1.0, None),
                   "onehot": (1.0, None), "unit": (1.0, None), "labels": (1.0, None)}[kind]
        v = self.vals[name] = Val(name, shape, True, True, mag, lo, "input")
        return v

    def new_param(self, shape, positive: bool = False, trainable: bool = True) -> Val:
        """A fresh param; one declared `trainable: false` (batch norm's running statistics,
        a frozen weight) is not offered to other ops (graphc refuses it elsewhere)."""
        name = self.fresh_name("param")
        shape = tuple(shape)
        r = self.rng
        if positive:
            init, mag, lo = r.choice(((
                {"init": "uniform", "low": 0.5, "high": 1.5}, 1.5, 0.5),
                ({"init": "ones"}, 1.0, 1.0), ({"init": "uniform", "low": 1, "high": 2}, 2.0, 1.0)))
        else:
            options = [({"init": "uniform", "low": -1, "high": 1}, 1.0),
                       ({"init": "normal", "std": 0.5}, 2.5),
                       ({"init": "normal", "mean": 0.3, "std": 0.4}, 2.3),
                       ({"init": "uniform", "low": -0.5, "high": 1.5}, 1.5)]
            if len(shape) >= 1:
                options += [({"init": "glorot_uniform"}, 1.5), ({"init": "he_normal"}, 5.0),
                            ({"init": "glorot_normal"}, 3.0), ({"init": "he_uniform"}, 2.5)]
            if len(shape) <= 1:
                options += [({"init": "zeros"}, 0.0)]
            init, mag = r.choice(options)
            lo = None
        if not trainable:
            self.params[name] = {"shape": list(shape), **init, "trainable": False}
            return Val(name, shape, False, False, mag, lo, "param")
        if r.random() < 0.15 and init["init"] == ("zeros" if len(shape) <= 1 else "glorot_uniform"):
            self.params[name] = list(shape)   # shorthand: the default initializer
        else:
            self.params[name] = {"shape": list(shape), **init}
        v = self.vals[name] = Val(name, shape, False, False, mag, lo, "param")
        return v

    def fresh(self, shape, *, positive: bool = False, param_p: float = 0.6) -> Val:
        if self.rng.random() < param_p:
            return self.new_param(shape, positive)
        return self.new_input(shape, "pos" if positive else "normal")

    def node(self, op: str, inputs: list[Val], out_shape, *, mag: float, lo=None, **attrs) -> Val:
        name = self.fresh_name("node")
        self.nodes[name] = {"op": op, "inputs": [v.name for v in inputs], **attrs}
        for v in inputs:
            self.uses[v.name] += 1
        v = self.vals[name] = Val(name, tuple(out_shape), any(i.batched for i in inputs),
                                  all(i.data_only for i in inputs), min(mag, 1e30),
                                  lo if lo and lo > 0 else None)
        return v

    def pick(self, ok=lambda v: True, *, max_mag: float = MAG_LIMIT, fresh_p: float = 0.1,
             no_targets: bool = True) -> Val | None:
        """An existing value (None: make a fresh one), favouring nodes nothing consumes yet."""
        cands = [v for v in self.vals.values() if v.mag <= max_mag and ok(v)
                 and not (no_targets and self.input_kinds.get(v.name, "normal") != "normal")]
        if not cands or self.rng.random() < fresh_p:
            return None
        weights = [(6 if not self.uses[v.name] else 1.5) if v.kind == "node" else 0.7
                   for v in cands]
        return self.rng.choices(cands, weights)[0]

    def rand_shape(self, min_rank: int = 0, max_rank: int = 3) -> tuple:
        r = self.rng
        rank = r.choice([k for k in (0, 1, 1, 1, 2, 2, 3) if min_rank <= k <= max_rank]
                        or [min_rank])
        while True:
            shape = tuple(r.choice((1, 2, 2, 3, 3, 4, 5)) for _ in range(rank))
            if size(shape) <= MAX_ELEMENTS:
                return shape

    def any_value(self, min_rank: int = 0, max_mag: float = MAG_LIMIT) -> Val:
        return (self.pick(lambda v: len(v.shape) >= min_rank, max_mag=max_mag)
                or self.fresh(self.rand_shape(min_rank), param_p=0.3))

    def partner_shape(self, s: tuple) -> tuple:
        """A shape that broadcasts against `s`: equal, with 1s, fewer or more axes, or
        expanding s's 1-axes ([3, 1] against [1, 4])."""
        r = self.rng
        s = list(s)
        for _ in range(10):
            t = r.random()
            if t < 0.25:
                out = s
            elif t < 0.45:
                out = [d if r.random() < 0.5 else 1 for d in s]
            elif t < 0.6:
                out = s[r.randint(0, len(s)):]
            elif t < 0.8:
                out = [r.randint(2, 4) if d == 1 else (d if r.random() < 0.6 else 1) for d in s]
            elif t < 0.9 and len(s) < 3:
                out = [r.randint(2, 3)] + [1 if r.random() < 0.6 else d for d in s]
            else:
                out = [1] * len(s) if s else [r.randint(2, 3)]
            b = broadcast(s, out)
            if b is not None and size(b) <= 2 * MAX_ELEMENTS:
                return tuple(out)
        return tuple(s)

    def operand_like(self, a: Val, *, positive: bool = False, allow_self: bool = True) -> Val:
        """A second operand broadcasting against `a`: an existing value or a fresh one."""
        ok_shape = (lambda v: broadcast(a.shape, v.shape) is not None
                    and size(broadcast(a.shape, v.shape)) <= 2 * MAX_ELEMENTS)
        if allow_self and not positive and self.rng.random() < 0.08:
            return a   # the same value twice: add(u, u)
        if positive:
            v = self.pick(lambda v: ok_shape(v) and v.lo is not None and v.lo >= 0.1, fresh_p=0.3)
            return v or self.positive_value(self.partner_shape(a.shape))
        v = self.pick(lambda v: ok_shape(v) and v.name != a.name, fresh_p=0.5)
        return v or self.fresh(self.partner_shape(a.shape))

    def positive_value(self, shape) -> Val:
        """A value of `shape` bounded below by 0.1 (divisors, log and sqrt arguments)."""
        r = self.rng.random()
        if r < 0.45:
            return self.fresh(shape, positive=True, param_p=0.5)
        src = self.pick(lambda v: v.shape == tuple(shape), fresh_p=0.3) or self.fresh(shape)
        if r < 0.55:
            t = src if src.mag <= 2 else self.node("tanh", [src], src.shape, mag=1.0)
            return self.node("exp", [t], t.shape, mag=math.exp(t.mag), lo=math.exp(-t.mag))
        gen = FormulaGen(self.rng, [E(src.name, src.mag, src.lo, frozenset([src.name]))],
                         self.todo, cancellations=self.cancellations, events=self.events)
        e = gen.positive(E(src.name, src.mag, src.lo, frozenset([src.name])), 0.1)
        if e.lo is None or e.lo < 0.1:
            e = E(f"(1 + {src.name} * {src.name})", 1 + src.mag ** 2, 1.0)
        return self.node("elementwise", [src], src.shape, mag=e.mag, lo=e.lo, expr=e.text)

    # -- one builder per op
    def op_dense(self) -> Val:
        r = self.rng
        x = (self.pick(lambda v: len(v.shape) >= 1 and v.shape[-1] <= 6 and size(v.shape) <= 12)
             or self.fresh(self.rand_shape(1, 2), param_p=0.1))
        k, o = x.shape[-1], r.randint(1, 4)
        t = r.random()
        if t < 0.1:     # a weight computed from a param: exp(tanh(W)) and the like
            p = self.new_param((o, k))
            expr = r.choice(("exp(tanh({p}))", "tanh({p})", "{p} * sigmoid({p})",
                             "sin({p}) + {p} / 2", "{p} - {p} + 0.5")).format(p=p.name)
            if " - " in expr:
                self.events.add("cancel")
            W = self.node("elementwise", [p], (o, k), mag=math.e * p.mag, expr=expr)
        elif t < 0.16:  # a weight that is data
            W = self.new_input((o, k))
        else:
            W = self.pick(lambda v: v.shape == (o, k) and v.kind == "param", fresh_p=0.7) \
                or self.new_param((o, k))
        ins = [x, W]
        t = r.random()
        bmag = 0.0
        if t < 0.65:
            bshape = r.choice(((o,), (o,), (o,), (1,), ()))
            b = self.pick(lambda v: v.shape == bshape and not v.batched, fresh_p=0.7) \
                or self.new_param(bshape)
            ins.append(b)
            bmag = b.mag
        return self.node("dense", ins, x.shape[:-1] + (o,),
                         mag=x.mag * W.mag * math.sqrt(k) + bmag)

    def op_matmul(self) -> Val:
        r = self.rng
        a = self.pick(lambda v: 1 <= len(v.shape) <= 3 and max(v.shape) <= 5) \
            or self.fresh(self.rand_shape(1, 3), param_p=0.2)
        sa = a.shape
        if len(sa) == 2 and sa[0] == sa[1] and r.random() < 0.3:
            return self.node("matmul", [a, a], sa, mag=a.mag * a.mag * sa[0])
        m, s = r.randint(1, 4), r.randint(2, 3)
        left = r.random() < 0.65
        if left:   # a @ other
            k = sa[-1]
            options = [(k,), (k, m), (k, m)] + ([(s, k, m)] if len(sa) <= 2 else [(sa[0], k, m), (1, k, m)])
        else:      # other @ a
            k = sa[0] if len(sa) == 1 else sa[-2]
            options = [(k,), (m, k), (m, k)] + ([(s, m, k)] if len(sa) <= 2 else [(sa[0], m, k), (1, m, k)])
        for _ in range(5):
            sb = r.choice(options)
            A, B = (sa, sb) if left else (sb, sa)
            out = np.matmul(np.zeros(A), np.zeros(B)).shape
            if size(out) <= 2 * MAX_ELEMENTS:
                break
        else:
            sb = options[0]
            A, B = (sa, sb) if left else (sb, sa)
            out = np.matmul(np.zeros(A), np.zeros(B)).shape
        b = self.pick(lambda v: v.shape == sb, fresh_p=0.5) or self.fresh(sb)
        ins = [a, b] if left else [b, a]
        return self.node("matmul", ins, out, mag=a.mag * b.mag * k)

    def op_binary(self, op: str) -> Val:
        a = self.any_value()
        b = self.operand_like(a, positive=(op == "div"))
        if op == "sub" and a is b:
            self.events.add("cancel")   # sub(u, u) is 0 for SymPy, NaN - NaN is NaN
        if op != "div" and self.rng.random() < 0.5:
            a, b = b, a
        shape = broadcast(a.shape, b.shape)
        lo = None
        if op == "add":
            mag = a.mag + b.mag
            lo = a.lo + b.lo if a.lo and b.lo else None
        elif op == "sub":
            mag = a.mag + b.mag
        elif op == "mul":
            mag = a.mag * b.mag
            lo = a.lo * b.lo if a.lo and b.lo else None
        else:
            mag = a.mag / b.lo
            lo = a.lo / b.mag if a.lo else None
        return self.node(op, [a, b], shape, mag=mag, lo=lo)

    def op_unary(self, op: str) -> Val:
        r = self.rng
        if op in ("sigmoid", "tanh"):
            x = self.any_value(max_mag=1e30)
            lo = 1 / (1 + math.exp(x.mag)) if op == "sigmoid" and x.mag < 10 else None
            return self.node(op, [x], x.shape, mag=1.0, lo=lo)
        if op == "relu":
            x = self.any_value(max_mag=1e30)
            return self.node(op, [x], x.shape, mag=x.mag, lo=x.lo)
        if op == "leaky_relu":
            x = self.any_value(max_mag=1e30)
            alpha = r.choice((0.01, 0.1, 0.2, 0.5, 0.0, -0.3, 1.5, 0.05))
            attrs = {} if alpha == 0.01 and r.random() < 0.5 else {"alpha": alpha}
            return self.node(op, [x], x.shape, mag=x.mag * max(1, abs(alpha)),
                             lo=x.lo, **attrs)
        if op == "exp":
            x = self.pick(lambda v: True, max_mag=5.0)
            if x is None:
                y = self.any_value(max_mag=1e30)
                x = self.node("tanh", [y], y.shape, mag=1.0)
            return self.node(op, [x], x.shape, mag=math.exp(x.mag), lo=math.exp(-x.mag))
        if op == "log":
            x = self.pick(lambda v: v.lo is not None and v.lo >= 0.01, fresh_p=0.2)
            if x is None:
                x = self.positive_value(self.any_value().shape)
            return self.node(op, [x], x.shape,
                             mag=max(abs(math.log(x.lo)), abs(math.log(max(x.mag, 1)))),
                             lo=math.log(x.lo) if x.lo > 1.2 else None)
        raise AssertionError(op)

    def op_activation(self, op: str) -> Val:
        """A named activation, its attributes drawn (defaults omitted at times); the output
        is bounded about as its input (hard_sigmoid: by 1)."""
        r = self.rng
        x = self.any_value(max_mag=1e30 if op == "hard_sigmoid" else MAG_LIMIT)
        attrs, mag = {}, x.mag
        if op == "gelu" and r.random() < 0.5:
            attrs["approximate"] = r.choice(("none", "tanh"))
        elif op == "softplus":
            if r.random() < 0.7:
                attrs["beta"] = r.choice((1.0, 0.5, 2.0, 3.0, -1.0))
            if r.random() < 0.7:
                attrs["threshold"] = r.choice((20.0, 1.0, 2.0, 5.0))
            mag = x.mag + math.log(2) / abs(attrs.get("beta", 1.0))
        elif op == "elu":
            if r.random() < 0.7:
                attrs["alpha"] = r.choice((1.0, 0.5, 2.0, 0.1))
            mag = max(x.mag, attrs.get("alpha", 1.0))
        elif op == "selu":
            mag = 1.06 * max(x.mag, 1.68)
        elif op == "hard_sigmoid":
            mag = 1.0
        return self.node(op, [x], x.shape, mag=mag, **attrs)

    def op_softmax(self, op: str) -> Val:
        x = self.any_value(min_rank=1, max_mag=1e30 if op == "softmax" else 1e3)
        rank = len(x.shape)
        attrs = {} if self.rng.random() < 0.4 else {"axis": self.rng.randint(-rank, rank - 1)}
        axis = attrs.get("axis", -1)
        mag = 1.0 if op == "softmax" else 2 * x.mag + math.log(x.shape[axis]) + 1
        return self.node(op, [x], x.shape, mag=mag)

    def op_reduce(self, op: str) -> Val:
        r = self.rng
        x = self.pick(lambda v: len(v.shape) >= 1 or r.random() < 0.2) \
            or self.fresh(self.rand_shape(1), param_p=0.3)
        rank = len(x.shape)
        t = r.random()
        if rank == 0 or t < 0.3:
            attrs, axes = {}, tuple(range(rank))
        elif t < 0.65:
            a = r.randrange(rank)
            attrs, axes = {"axis": a - rank if r.random() < 0.3 else a}, (a,)
        else:
            axes = tuple(sorted(r.sample(range(rank), r.randint(1, rank))))
            listed = [a - rank if r.random() < 0.3 else a for a in axes]
            r.shuffle(listed)
            attrs = {"axis": listed}
        shape = tuple(d for k, d in enumerate(x.shape) if k not in axes)
        count = size([x.shape[k] for k in axes])
        mag = x.mag * (count if op == "sum" else 1)
        lo = x.lo if op == "mean" else (x.lo * count if x.lo else None)
        return self.node(op, [x], shape, mag=mag, lo=lo, **attrs)

    def factor_shape(self, total: int) -> list:
        r = self.rng
        dims, rest = [], total
        while rest > 1 and len(dims) < 3:
            divs = [d for d in range(1, rest + 1) if rest % d == 0 and d > 1]
            d = r.choice(divs)
            dims.append(d)
            rest //= d
        if rest > 1:
            dims[-1] *= rest
        if r.random() < 0.3 and len(dims) < 3:
            dims.insert(r.randint(0, len(dims)), 1)
        r.shuffle(dims)
        if not dims and r.random() < 0.5:
            dims = [1]
        return dims

    def op_reshape(self, op: str) -> Val:
        x = self.any_value(max_mag=1e30)
        if op == "flatten":
            return self.node(op, [x], (size(x.shape),), mag=x.mag, lo=x.lo)
        dims = self.factor_shape(size(x.shape))
        shape = tuple(dims)
        if dims and self.rng.random() < 0.3:
            dims = list(dims)
            dims[self.rng.randrange(len(dims))] = -1
        return self.node(op, [x], shape, mag=x.mag, lo=x.lo, shape=list(dims))

    def op_concat(self) -> Val:
        r = self.rng
        # often a dense output: its backward may be fused with the concat's
        dense_first = r.random() < 0.3
        first = self.op_dense() if dense_first else self.any_value(min_rank=1)
        rank = len(first.shape)
        axis = r.randrange(rank)
        ins = [first]
        for _ in range(r.choice((1, 1, 2))):
            def fits(v):
                return (v.name != first.name and len(v.shape) == rank and v.shape[:axis] == first.shape[:axis]
                        and v.shape[axis + 1:] == first.shape[axis + 1:])
            if r.random() < 0.12:
                v = first                       # concat([u, u])
            else:
                v = self.pick(fits, fresh_p=0.4)
                if v is None:
                    s = list(first.shape)
                    s[axis] = r.randint(1, 3)
                    v = self.fresh(s)
            ins.append(v)
        if r.random() < 0.5 and not dense_first:
            r.shuffle(ins)
        shape = list(first.shape)
        shape[axis] = sum(v.shape[axis] for v in ins)
        attrs = {}
        if axis != rank - 1 or r.random() < 0.3:
            attrs["axis"] = axis - rank if r.random() < 0.3 else axis
        out = self.node("concat", ins, shape, mag=max(v.mag for v in ins),
                        lo=min(v.lo or 0 for v in ins) or None, **attrs)
        # concat -> dense (and the concat's first input into a dense as well)
        if r.random() < 0.3 and not dense_first and ins[0].shape and ins[0].mag <= MAG_LIMIT:
            k, o = ins[0].shape[-1], r.randint(1, 3)
            W = self.new_param((o, k))
            self.node("dense", [ins[0], W], ins[0].shape[:-1] + (o,),
                      mag=ins[0].mag * W.mag * math.sqrt(k))
        if r.random() < (0.8 if dense_first else 0.45) and out.mag <= MAG_LIMIT:
            k, o = shape[-1], r.randint(1, 4)
            W = self.new_param((o, k))
            b = [self.new_param((o,))] if r.random() < 0.5 else []
            return self.node("dense", [out, W, *b], tuple(shape[:-1]) + (o,),
                             mag=out.mag * W.mag * math.sqrt(k) + (b[0].mag if b else 0))
        return out

    def op_elementwise(self) -> Val:
        r = self.rng
        first = self.any_value(max_mag=1e4)
        ins = [first]
        for _ in range(r.choice((0, 0, 1, 1, 2))):
            ins.append(self.operand_like(first, allow_self=True))
        shape = broadcast(*[v.shape for v in ins])
        if shape is None or size(shape) > 2 * MAX_ELEMENTS:
            ins, shape = [first], first.shape
        distinct = list(dict.fromkeys(v.name for v in ins))
        leaves = [E(v.name, self.vals[v.name].mag, self.vals[v.name].lo, frozenset([v.name]))
                  for v in map(self.vals.get, distinct)]
        gen = FormulaGen(r, leaves, self.todo, cancellations=self.cancellations,
                         events=self.events)
        e = gen.expr(r.choice((1, 2, 2, 3)))
        for leaf in leaves:    # every input appears (unless it is cancelled on purpose)
            if leaf.text not in e.vars:
                if r.random() < 0.5:
                    c = gen.number()
                    e = E(f"({e.text} + {c.text} * {leaf.text})", e.mag + c.mag * leaf.mag,
                          None, e.vars | leaf.vars)
                else:
                    t = gen.bounded(leaf, 1)
                    e = E(f"({e.text} * (2 + {t.text}))", e.mag * 3, e.lo, e.vars | leaf.vars)
        if self.cancellations and r.random() < 0.06:
            # an extra input the formula cancels: `x - x` as a whole input
            extra = self.operand_like(first, allow_self=False)
            if broadcast(shape, extra.shape) is not None and size(broadcast(shape, extra.shape)) <= 2 * MAX_ELEMENTS:
                ins.append(extra)
                self.events.add("cancel")
                shape = broadcast(shape, extra.shape)
                e = E(f"({e.text} + {extra.name} - {extra.name})", e.mag, e.lo, e.vars)
        if len(e.text) > 1500:
            e = E(f"tanh({distinct[0]})", 1.0, None)
        if r.random() < 0.1 and len(ins) == 1:
            ins = ins * 2   # the same value listed twice as an input
        return self.node("elementwise", ins, shape, mag=e.mag, lo=e.lo, expr=e.text)

    # -- convolution, pooling and movement ops: per-example [C, L] or [C, H, W]
    def spatial_shape(self, d: int, total: int) -> tuple | None:
        """A random [C, *d spatial sizes >= 2] of `total` elements, or None if none."""
        def splits(n, k):
            if k == 0:
                return [()] if n == 1 else []
            return [(f,) + rest for f in range(2, n + 1) if n % f == 0
                    for rest in splits(n // f, k - 1)]
        options = [(c,) + s for c in range(1, 5) if total % c == 0
                   for s in splits(total // c, d)]
        return self.rng.choice(options) if options else None

    def spatial_value(self, d: int) -> Val:
        """A value of per-example rank d + 1 with spatial sizes >= 2: an existing one, an
        existing value reshaped to it (so gradients flow on into the graph), or fresh."""
        r = self.rng
        v = self.pick(lambda v: len(v.shape) == d + 1 and min(v.shape[1:]) >= 2
                      and size(v.shape) <= 2 * MAX_ELEMENTS, fresh_p=0.2)
        if v is not None:
            return v
        if r.random() < 0.5:
            src = self.pick(lambda v: 4 <= size(v.shape) <= 2 * MAX_ELEMENTS, fresh_p=0.0)
            shape = src and self.spatial_shape(d, size(src.shape))
            if shape:
                return self.node("reshape", [src], shape, mag=src.mag, lo=src.lo,
                                 shape=list(shape))
        while True:
            shape = (r.randint(1, 3),) + tuple(r.randint(2, 7 if d == 1 else 5) for _ in range(d))
            if size(shape) <= 2 * MAX_ELEMENTS:
                return self.fresh(shape, param_p=0.3)

    def per_axis(self, attrs: dict, name: str, values: tuple, default) -> None:
        """attrs[name] as one int (when all equal), a list, or omitted when the default."""
        r = self.rng
        if len(set(values)) == 1 and r.random() < 0.6:
            if values[0] != default or r.random() < 0.4:
                attrs[name] = values[0]
        else:
            attrs[name] = list(values)

    def op_conv(self, op: str) -> Val:
        r = self.rng
        d = 1 if op == "conv1d" else 2
        x = self.spatial_value(d)
        c, spatial = x.shape[0], x.shape[1:]
        for _ in range(30):
            groups = 1 if r.random() < 0.5 else r.choice([g for g in range(1, c + 1) if c % g == 0])
            o = groups * r.choice((1, 1, 2)) if groups > 1 else r.randint(1, 4)
            kernel = tuple(r.randint(1, 3) for _ in spatial)
            dilation = tuple(r.choice((1, 1, 2)) for _ in spatial)
            stride = (1,) * d if r.random() < 0.5 else tuple(r.choice((1, 2, 3)) for _ in spatial)
            t = r.random()
            if t < 0.25 and set(stride) == {1}:
                padding = "same"
                pads = [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2)
                        for dl, k in zip(dilation, kernel)]
            elif t < 0.4:
                padding, pads = "valid", [(0, 0)] * d
            else:
                p = tuple(r.randint(0, 2) for _ in spatial)
                padding, pads = p, [(q, q) for q in p]
            out = tuple((n + lo + hi - dl * (k - 1) - 1) // s + 1 for n, (lo, hi), dl, k, s
                        in zip(spatial, pads, dilation, kernel, stride))
            if min(out) >= 1 and o * size(out) <= 2 * MAX_ELEMENTS:
                break
        else:   # always fits
            groups, o, kernel, dilation, stride, padding = 1, 1, (1,) * d, (1,) * d, (1,) * d, 0
            out = spatial
        attrs = {}
        self.per_axis(attrs, "stride", stride, 1)
        if isinstance(padding, str):
            attrs["padding"] = padding
        else:
            self.per_axis(attrs, "padding", padding, 0)
        self.per_axis(attrs, "dilation", dilation, 1)
        if groups != 1 or r.random() < 0.2:
            attrs["groups"] = groups
        wshape = (o, c // groups) + kernel
        if r.random() < 0.12:
            W = self.new_input(wshape)           # a weight that is data: batched
        else:
            W = self.pick(lambda v: v.shape == wshape and v.kind == "param", fresh_p=0.7) \
                or self.new_param(wshape)
        ins, bmag = [x, W], 0.0
        if r.random() < 0.5:
            b = self.pick(lambda v: v.shape == (o,) and not v.batched, fresh_p=0.7) \
                or self.new_param((o,))
            ins.append(b)
            bmag = b.mag
        fan = c // groups * size(kernel)
        return self.node(op, ins, (o,) + out, mag=x.mag * W.mag * math.sqrt(fan) + bmag, **attrs)

    def op_pool(self, op: str) -> Val:
        r = self.rng
        d = int(op[-2])
        x = self.spatial_value(d)
        spatial = x.shape[1:]
        kernel = tuple(r.randint(1, min(3, n + 1)) for n in spatial)
        padding = tuple(r.randint(0, k // 2) if r.random() < 0.5 else 0 for k in kernel)
        padding = tuple(k // 2 if n + 2 * p < k else p for n, k, p in zip(spatial, kernel, padding))
        stride = None if r.random() < 0.4 else tuple(r.randint(1, 3) for _ in spatial)
        step = kernel if stride is None else stride
        out = tuple((n + 2 * p - k) // s + 1 for n, k, p, s in zip(spatial, kernel, padding, step))
        attrs = {}
        self.per_axis(attrs, "kernel_size", kernel, None)
        if stride is not None:
            self.per_axis(attrs, "stride", stride, None)
        self.per_axis(attrs, "padding", padding, 0)
        lo = x.lo
        if op.startswith("avg"):
            if r.random() < 0.7:
                attrs["count_include_pad"] = r.random() < 0.5
            if any(padding) and attrs.get("count_include_pad", True):
                lo = None    # zeros of the padding count
        return self.node(op, [x], (x.shape[0],) + out, mag=x.mag, lo=lo, **attrs)

    def op_layer_norm(self) -> Val:
        """Over 1 to all trailing axes, with or without weight and bias."""
        r = self.rng
        x = self.pick(lambda v: len(v.shape) >= 1) or self.new_input((r.randint(2, 5),))
        k = r.randint(1, len(x.shape))
        normalized = x.shape[len(x.shape) - k:]
        attrs = {}
        if k > 1 or r.random() < 0.3:
            attrs["axes"] = [a - len(x.shape) if r.random() < 0.5 else a
                             for a in range(len(x.shape) - k, len(x.shape))]
        if r.random() < 0.3:
            attrs["eps"] = r.choice((1e-3, 1e-5, 0.1))
        ins, mag = [x], math.sqrt(size(normalized))
        if r.random() < 0.7:
            w = self.pick(lambda v: v.shape == normalized and not v.batched, fresh_p=0.7) \
                or self.new_param(normalized)
            ins.append(w)
            mag *= w.mag
            if r.random() < 0.7:
                b = self.pick(lambda v: v.shape == normalized and not v.batched, fresh_p=0.7) \
                    or self.new_param(normalized)
                ins.append(b)
                mag += b.mag
        return self.node("layer_norm", ins, x.shape, mag=mag, **attrs)

    def op_embedding(self) -> Val:
        """Rows of a 2-D value (a param, or any value: a table that is data) at int32
        indices of a fresh input, of rank 0 to 2."""
        r = self.rng
        table = self.pick(lambda v: len(v.shape) == 2 and v.shape[0] >= 2
                          and size(v.shape) <= 12, fresh_p=0.5)
        if table is None:
            table = self.new_param((r.randint(2, 5), r.randint(1, 4)))
        rows, features = table.shape
        while True:
            shape = self.rand_shape(0, 2)
            if size(shape) * features <= MAX_ELEMENTS:
                break
        indices = self.new_input(shape, f"index:{rows}")
        return self.node("embedding", [indices, table], shape + (features,), mag=table.mag,
                         lo=table.lo)

    def op_global_avg_pool(self) -> Val:
        x = self.pick(lambda v: len(v.shape) >= 2) or self.spatial_value(self.rng.choice((1, 2)))
        return self.node("global_avg_pool", [x], x.shape[:1], mag=x.mag, lo=x.lo)

    def op_pad(self) -> Val:
        r = self.rng
        x = self.any_value(min_rank=1)
        rank = len(x.shape)
        for _ in range(10):
            axes = r.randint(1, min(rank, 3))
            pad = [r.choice((0, 1, 1, 2)) for _ in range(2 * axes)]
            shape = list(x.shape)
            for k in range(axes):
                shape[rank - 1 - k] += pad[2 * k] + pad[2 * k + 1]
            if size(shape) <= 2 * MAX_ELEMENTS:
                break
        else:
            pad, shape = [0, 1], list(x.shape[:-1]) + [x.shape[-1] + 1]
        attrs = {"pad": pad}
        value = r.choice((0.0, 0.0, 0.5, -1.0, 2.0))
        if value != 0.0 or r.random() < 0.3:
            attrs["value"] = value
        lo = min(x.lo, value) if x.lo and value > 0 else None
        return self.node("pad", [x], shape, mag=max(x.mag, abs(value)), lo=lo, **attrs)

    def op_slice(self) -> Val:
        r = self.rng
        x = self.any_value(min_rank=1, max_mag=1e30)
        rank = len(x.shape)
        axis = r.randrange(rank)
        n = x.shape[axis]
        attrs = {"axis": axis - rank if r.random() < 0.3 else axis}
        for _ in range(20):
            start = r.choice((None, r.randint(-n - 1, n - 1)))
            stop = r.choice((None, r.randint(-n, n + 1)))
            step = r.choice((None, 1, 2, 3))
            taken = range(n)[slice(start, stop, step)]
            if len(taken):
                break
        else:
            start, stop, step, taken = None, None, None, range(n)
        for k, v in (("start", start), ("stop", stop), ("step", step)):
            if v is not None:
                attrs[k] = v
        shape = x.shape[:axis] + (len(taken),) + x.shape[axis + 1:]
        return self.node("slice", [x], shape, mag=x.mag, lo=x.lo, **attrs)

    def op_transpose(self) -> Val:
        r = self.rng
        x = self.any_value(min_rank=1, max_mag=1e30)
        rank = len(x.shape)
        if r.random() < 0.3:
            perm = list(range(rank))[::-1]
            attrs = {}
        else:
            perm = list(range(rank))
            r.shuffle(perm)
            attrs = {"perm": [p - rank if r.random() < 0.2 else p for p in perm]}
        return self.node("transpose", [x], tuple(x.shape[p] for p in perm), mag=x.mag, lo=x.lo,
                         **attrs)

    def op_batch_norm(self) -> Val:
        """batch_norm of a [C, ...] value: weight and bias fresh or shared params (now and
        then frozen), running statistics fresh non-trainable params (the variance > 0)."""
        r = self.rng
        x = self.any_value(min_rank=1)
        c = x.shape[0]
        frozen = r.random() < 0.15

        def affine(positive: bool) -> Val:
            if not frozen and r.random() < 0.3:
                v = self.pick(lambda v: v.shape == (c,) and v.kind == "param", fresh_p=0.3)
                if v is not None:
                    return v
            return self.new_param((c,), positive, trainable=not frozen)

        w, b = affine(True), affine(False)
        mean, var = self.new_param((c,), trainable=False), \
            self.new_param((c,), positive=True, trainable=False)
        attrs = {}
        if r.random() < 0.4:
            attrs["eps"] = r.choice((1e-3, 0.1))
        if r.random() < 0.3:
            attrs["momentum"] = r.choice((0.0, 0.5, 1.0))
        # evaluation: (x - mean)/sqrt(var); training: |x̂| <= sqrt(N - 1), N <= 4·size
        mag = w.mag * max((x.mag + mean.mag) / math.sqrt(var.lo), math.sqrt(4 * size(x.shape)))
        return self.node("batch_norm", [x, w, b, mean, var], x.shape, mag=mag + b.mag, **attrs)

    def op_dropout(self) -> Val:
        r = self.rng
        x = self.any_value(min_rank=0)
        p = r.choice((0.0, 0.1, 0.5, 0.9))
        attrs = {"p": p, **({"seed": r.randint(0, 99)} if r.random() < 0.3 else {})}
        return self.node("dropout", [x], x.shape, mag=x.mag / (1 - p), **attrs)

    def step(self, op: str) -> Val:
        if op == "dense":
            return self.op_dense()
        if op == "matmul":
            return self.op_matmul()
        if op in ("add", "sub", "mul", "div"):
            return self.op_binary(op)
        if op in ("relu", "leaky_relu", "sigmoid", "tanh", "exp", "log"):
            return self.op_unary(op)
        if op in ACTIVATION_OPS:
            return self.op_activation(op)
        if op in ("softmax", "log_softmax"):
            return self.op_softmax(op)
        if op in ("sum", "mean"):
            return self.op_reduce(op)
        if op in ("reshape", "flatten"):
            return self.op_reshape(op)
        if op == "concat":
            return self.op_concat()
        if op in ("conv1d", "conv2d"):
            return self.op_conv(op)
        if op in ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"):
            return self.op_pool(op)
        if op in ("global_avg_pool", "pad", "slice", "transpose", "layer_norm", "embedding",
                  "dropout"):
            return getattr(self, f"op_{op}")()
        if op == "elementwise":
            return self.op_elementwise()
        if op == "batch_norm":
            return self.op_batch_norm()
        raise AssertionError(op)

    # -- the loss
    def loss_term(self, v: Val, kind: str) -> Val:
        r = self.rng
        s = v.shape
        if kind == "mse":
            t = self.pick(lambda w: w.data_only and w.batched and w.shape == s
                          and not self.input_kinds.get(w.name, "").startswith("index:"),
                          fresh_p=0.6, no_targets=False) or self.new_input(s)
            return self.node("mse", [v, t], (), mag=(v.mag + t.mag) ** 2)
        if kind == "softmax_cross_entropy":
            t = r.random()
            if r.random() < 0.3:   # class indices, as torch's F.cross_entropy takes them
                tgt = self.new_input(s[:-1], f"index:{s[-1]}")
            elif t < 0.45:
                tgt = self.new_input(s, "prob")
            elif t < 0.65:
                tgt = self.new_input(s, "onehot")
            elif t < 0.8:
                tgt = self.new_input(s, "unit")    # not normalised: -Σ t·log softmax still
            else:
                x = self.new_input(s)
                tgt = self.node("softmax", [x], s, mag=1.0)  # a target computed from data
            out = self.node("softmax_cross_entropy", [v, tgt], s[:-1], mag=2 * v.mag + 5)
            if out.shape:
                out = self.node(r.choice(("sum", "mean")), [out], (), mag=out.mag * size(s))
            return out
        if kind == "bce_with_logits":
            t = r.random()
            if t < 0.5:
                tgt = self.new_input(s, "unit")
            elif t < 0.75:
                tgt = self.new_input(s, "labels")
            else:
                x = self.new_input(s)
                tgt = self.node("sigmoid", [x], s, mag=1.0)
            return self.node("bce_with_logits", [v, tgt], (), mag=v.mag + 1)
        # a random cotangent: sum(v * c) tests the whole vector-Jacobian product
        c = self.new_input(self.partner_shape(s) if r.random() < 0.3 else s)
        shape = broadcast(s, c.shape)
        if r.random() < 0.5:
            m = self.node("mul", [v, c] if r.random() < 0.5 else [c, v], shape, mag=v.mag * 3)
        else:
            m = self.node("elementwise", [v, c], shape, mag=v.mag * 3,
                          expr=f"{v.name} * {c.name}" if r.random() < 0.7
                          else f"{c.name} * {v.name} + 0.25 * {v.name} * {v.name}")
        if not shape:
            return m
        red = r.choice(("sum", "mean"))
        return self.node(red, [m], (), mag=m.mag * size(shape))

    def generate(self, name: str) -> dict:
        r = self.rng
        weights = [OP_WEIGHTS.get(op, 1) for op in OP_NAMES]
        ops = r.choices(OP_NAMES, weights, k=self.steps)
        for op in self.required_ops:
            if op in OP_NAMES:
                ops.insert(r.randint(0, len(ops)), op)
        for op in ops:
            self.step(op)
        for _ in range(4):      # formula items still owed: one more formula node each
            if not self.todo:
                break
            self.op_elementwise()
        # every value nothing consumes gets a loss term
        sinks = [v for v in list(self.vals.values()) if v.kind == "node" and not self.uses[v.name]]
        losses = [k for k in self.required_ops if k in LOSS_OPS]
        terms = []
        for k, v in enumerate(sinks):
            kinds = ["mse", "dot", "dot"]
            if v.shape:
                kinds.append("softmax_cross_entropy")
            kinds.append("bce_with_logits")
            want = [x for x in losses if x in kinds]
            kind = want[0] if want else r.choice(kinds)
            if kind in losses:
                losses.remove(kind)
            terms.append(self.loss_term(v, kind))
        for kind in losses:   # a required loss no sink took: on a fresh value
            v = self.any_value(min_rank=1)
            terms.append(self.loss_term(v, kind))
        while len(terms) > 1:
            r.shuffle(terms)
            if len(terms) >= 3 and r.random() < 0.4:
                a, b, c = terms[:3]
                w = r.choice(("0.5", "2", "1"))
                expr = f"{a.name} + {w} * {b.name} - 0.25 * {c.name}"
                t = self.node("elementwise", [a, b, c], (), mag=a.mag + b.mag + c.mag, expr=expr)
                terms = [t] + terms[3:]
            else:
                a, b = terms[:2]
                op = r.choice(("add", "add", "sub"))
                terms = [self.node(op, [a, b], (), mag=a.mag + b.mag)] + terms[2:]
        loss = terms[0]
        if not loss.batched:
            raise AssertionError("the loss must depend on an input")
        # outputs: the batched sinks and some other nodes
        candidates = [v for v in self.vals.values() if v.kind == "node" and v.batched]
        outputs = [v.name for v in candidates
                   if (v.name in [s.name for s in sinks] and r.random() < 0.8) or r.random() < 0.25]
        if not outputs:
            outputs = [loss.name]
        r.shuffle(outputs)
        spec = {"name": name, "inputs": shuffled(r, self.inputs),
                "params": shuffled(r, self.params), "nodes": shuffled(r, self.nodes),
                "outputs": outputs, "loss": loss.name}
        if not spec["params"]:
            del spec["params"]
        keys = list(spec)
        rest = keys[1:]
        r.shuffle(rest)
        return {k: spec[k] for k in [keys[0]] + rest}


def shuffled(rng: random.Random, d: dict) -> dict:
    items = list(d.items())
    rng.shuffle(items)
    return dict(items)


def focus(seed: int, count: int, items: tuple) -> list:
    """The items a seed must contain: `count` consecutive ones, in turn over the seeds."""
    return [items[(seed * count + k) % len(items)] for k in range(count)]


SMALL_STEPS, LARGE_STEPS = (0, 2), (3, 9)
# The always-run seeds (test_differential.FAST_SEEDS: 0-9) between them require every op.
OPS_PER_SEED = -(-len(OP_NAMES) // 10)


def generate(seed: int, *, attempt: int = 0, steps: int | tuple | None = None,
             cancellations: bool = True) -> Case:
    """The random case for `seed` (and `attempt`, bumped when a draw is unusable), with
    `steps` random op steps (or a number in that range) besides the required ones; by
    default SMALL_STEPS for seeds below 1000 (the always-run set), else LARGE_STEPS."""
    rng = random.Random(f"{seed}:{attempt}")
    if steps is None:
        steps = SMALL_STEPS if seed < 1000 else LARGE_STEPS
    if isinstance(steps, tuple):
        steps = rng.randint(*steps)
    gen = SpecGenerator(rng.getrandbits(64), steps=steps,
                        required_ops=focus(seed, OPS_PER_SEED, OP_NAMES) + focus(seed, 1, LOSS_OPS),
                        required_formula=focus(seed, 3, FORMULA_ITEMS),
                        cancellations=cancellations)
    spec = gen.generate(f"g{seed}")
    return Case(seed, attempt, spec, dict(gen.input_kinds), rng.randint(1, 4),
                frozenset(gen.events))


# ---------------------------------------------------------------- extreme activations

# Activations whose naive derivative overflows (exp(-h)/(1 + exp(-h))**2 is inf/inf) where
# torch's stays finite: swish, mish, gelu, softplus and friends at |h| of hundreds.
EXTREME_ACTIVATIONS = (
    ("elementwise", "{h} * sigmoid({h})"), ("elementwise", "{h} * tanh(softplus({h}))"),
    ("elementwise", "0.5 * {h} * (1 + erf({h} / sqrt(2)))"), ("elementwise", "softplus({h})"),
    ("elementwise", "sigmoid({h})"), ("elementwise", "tanh({h}) * {h}"),
    ("elementwise", "{h} / (1 + abs({h}))"), ("elementwise", "max({h}, 0.1 * {h})"),
    ("elementwise", "min(max({h}, -1), 1)"), ("elementwise", "exp(-abs({h})) + relu({h})"),
    ("elementwise", "log(1 + exp(-abs({h}))) + relu({h})"),
    ("elementwise", "{h} * sigmoid(1.702 * {h})"), ("elementwise", "tanh(softplus({h}))"),
    ("sigmoid", None), ("tanh", None), ("relu", None), ("leaky_relu", None),
    ("log_softmax", None), ("softmax", None), *((op, None) for op in ACTIVATION_OPS),
)
EXTREME_SCALES = (300.0, 1000.0, 3000.0)


def extreme_case(seed: int, per_graph: int = 7) -> Case:
    """`per_graph` activations above (in turn over the seeds), each on its own dense layer
    of one shared input whose elements
    span magnitudes 1 .. 100-3000 (float32's exp overflows beyond 88, float64's beyond
    709), each into its own loss term; the logits also into bce / cross-entropy terms."""
    r = random.Random(f"extreme:{seed}")
    k = r.randint(1, 3)
    scale = EXTREME_SCALES[seed % len(EXTREME_SCALES)]
    inputs, params, nodes, kinds, terms, outputs = {"x": [k]}, {}, {}, {"x": f"scaled:{scale}"}, [], []
    chosen = [(seed * per_graph + j) % len(EXTREME_ACTIVATIONS) for j in range(per_graph)]
    for i in chosen:
        op, expr = EXTREME_ACTIVATIONS[i]
        m = r.randint(1, 3) if op not in ("softmax", "log_softmax") else r.randint(2, 3)
        params[f"W{i}"] = {"shape": [m, k], "init": "uniform", "low": -1, "high": 1}
        params[f"c{i}"] = {"shape": [m], "init": "uniform", "low": -1, "high": 1}
        nodes[f"h{i}"] = {"op": "dense", "inputs": ["x", f"W{i}", f"c{i}"]}
        nodes[f"a{i}"] = {"op": op, "inputs": [f"h{i}"]}
        if expr:
            nodes[f"a{i}"]["expr"] = expr.format(h=f"h{i}")
        if op == "leaky_relu":
            nodes[f"a{i}"]["alpha"] = r.choice((0.01, 0.2))
        outputs += [f"a{i}", f"h{i}"]
        inputs[f"y{i}"] = [m]
        kinds[f"y{i}"] = "normal"
        kind = r.choice(("mse", "dot", "bce_with_logits", "softmax_cross_entropy"))
        if kind == "mse":
            nodes[f"t{i}"] = {"op": "mse", "inputs": [f"a{i}", f"y{i}"]}
        elif kind == "dot":
            nodes[f"p{i}"] = {"op": "mul", "inputs": [f"a{i}", f"y{i}"]}
            nodes[f"t{i}"] = {"op": "sum", "inputs": [f"p{i}"]}
        else:   # the extreme logits into a loss, the activation by a cotangent
            kinds[f"y{i}"] = "unit" if kind == "bce_with_logits" else "prob"
            nodes[f"l{i}"] = {"op": kind, "inputs": [f"h{i}", f"y{i}"]}
            nodes[f"p{i}"] = {"op": "elementwise", "inputs": [f"a{i}", f"y{i}"],
                              "expr": f"a{i} * y{i}"}
            nodes[f"s{i}"] = {"op": "mean", "inputs": [f"p{i}"]}
            nodes[f"t{i}"] = {"op": "add", "inputs": [f"l{i}", f"s{i}"]}
        terms.append(f"t{i}")
    nodes["loss"] = {"op": "elementwise", "inputs": terms, "expr": " + ".join(terms)}
    spec = {"name": f"extreme{seed}", "inputs": inputs, "params": params, "nodes": nodes,
            "outputs": outputs, "loss": "loss"}
    return Case(seed, 0, spec, kinds, r.randint(6, 10))


# ---------------------------------------------------------------- data

def draw_inputs(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, d in case.spec["inputs"].items():
        shape = tuple(d["shape"] if isinstance(d, dict) else d)
        full = (case.batch,) + shape
        kind = case.input_kinds.get(name, "normal")
        if kind == "normal":
            a = np.clip(rng.standard_normal(full), -3, 3)
        elif kind.startswith("scaled:"):   # most within 10x of the scale, some about 1
            top = math.log10(float(kind.split(":")[1]))
            lo = np.where(rng.uniform(size=full) < 0.7, top - 1, 0.0)
            a = rng.choice((-1.0, 1.0), full) * 10 ** rng.uniform(lo, lo + 1)
        elif kind == "pos":
            a = rng.uniform(0.5, 2.0, full)
        elif kind == "unit":
            a = rng.uniform(0.0, 1.0, full)
        elif kind == "labels":
            a = (rng.uniform(0.0, 1.0, full) < 0.5).astype(np.float64)
        elif kind == "prob":
            a = rng.dirichlet(np.ones(shape[-1]), full[:-1]) if shape else np.ones(full)
        elif kind == "onehot":
            a = np.eye(shape[-1])[rng.integers(0, shape[-1], full[:-1])]
        elif kind.startswith("index:"):   # int32 indices, both ends of the range included
            a = rng.integers(0, int(kind[6:]), full)
            a.reshape(-1)[:2] = [0, int(kind[6:]) - 1][:a.size]
            out[name] = np.ascontiguousarray(a, dtype=np.int32)
            continue
        else:
            raise AssertionError(kind)
        out[name] = np.ascontiguousarray(a, dtype=np.float64)
    return out


# ---------------------------------------------------------------- the torch evaluator

_TORCH_FUNCTIONS = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "sin": torch.sin,
    "cos": torch.cos, "tan": torch.tan, "sinh": torch.sinh, "cosh": torch.cosh,
    "tanh": torch.tanh, "asin": torch.asin, "acos": torch.acos, "atan": torch.atan,
    "erf": torch.erf, "abs": torch.abs, "relu": torch.relu, "sigmoid": torch.sigmoid,
    "softplus": lambda a: torch.logaddexp(a, torch.zeros_like(a)),
    "max": torch.maximum, "min": torch.minimum, "pow": torch.pow,
}
_MATH_FUNCTIONS = {
    "exp": math.exp, "log": math.log, "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "asin": math.asin, "acos": math.acos, "atan": math.atan, "erf": math.erf,
    "abs": abs, "relu": lambda a: max(a, 0), "sigmoid": lambda a: 1 / (1 + math.exp(-a)),
    "softplus": lambda a: max(a, 0) + math.log1p(math.exp(-abs(a))),
    "max": max, "min": min, "pow": None,
}
_KINKS = {"abs": 0, "relu": 0, "max": 1, "min": 1}


class _Kinks:
    """The smallest nonzero distance of any kink argument to its kink (|x| for relu and
    abs, |a - b| for max and min): C and torch may round such a value to either side."""

    def __init__(self):
        self.margin = math.inf

    def see(self, t) -> None:
        if isinstance(t, torch.Tensor):
            a = t.detach().abs()
            a = a[a != 0]
            if a.numel():
                self.margin = min(self.margin, float(a.min()))
        elif t != 0:
            self.margin = min(self.margin, abs(float(t)))


def _const_pow(a, b):
    if isinstance(a, (int, Fraction)) and isinstance(b, int) and not isinstance(b, bool):
        if a == 0 and b < 0:
            raise ZeroDivisionError
        return Fraction(a) ** b
    return float(a) ** float(b)


def _formula(text: str, env: dict, kinks: _Kinks):
    """Evaluate an `elementwise` formula on torch tensors; constants folded exactly."""
    tree = ast.parse(text.strip(), mode="eval")

    def is_t(x):
        return isinstance(x, torch.Tensor)

    def tens(x):
        return x if is_t(x) else torch.tensor(float(x), dtype=torch.float64)

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return n.value if isinstance(n.value, int) else n.value
        if isinstance(n, ast.Name):
            if n.id in env:
                return env[n.id]
            return {"pi": math.pi, "e": math.e}[n.id]
        if isinstance(n, ast.UnaryOp):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            if not is_t(a) and not is_t(b):   # exact where SymPy is exact
                if isinstance(a, float) or isinstance(b, float):
                    a, b = float(a), float(b)
                op = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                      ast.Div: lambda x, y: (Fraction(x) / Fraction(y)
                                             if isinstance(x, (int, Fraction)) else x / y),
                      ast.Pow: _const_pow}[type(n.op)]
                return op(a, b)
            if isinstance(n.op, ast.Pow):
                return torch.pow(tens(a), tens(b) if is_t(b) else float(b))
            if not is_t(a):
                a = float(a)
            if not is_t(b):
                b = float(b)
            return {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                    ast.Div: operator.truediv}[type(n.op)](a, b)
        if isinstance(n, ast.Call):
            f = n.func.id
            args = [ev(a) for a in n.args]
            if f in _KINKS:
                kinks.see(args[0] if _KINKS[f] == 0 else
                          (tens(args[0]) - tens(args[1]) if any(map(is_t, args))
                           else float(args[0]) - float(args[1])))
            if not any(map(is_t, args)):
                if f == "pow":
                    return _const_pow(*args)
                return _MATH_FUNCTIONS[f](*[float(a) for a in args])
            if f == "pow":
                return torch.pow(tens(args[0]), tens(args[1]) if is_t(args[1]) else float(args[1]))
            return _TORCH_FUNCTIONS[f](*[tens(a) for a in args])
        raise ValueError(f"not a formula: {ast.unparse(n)}")

    return ev(tree)


_TORCH_ACTIVATIONS = {
    "gelu": lambda x, a: F.gelu(x, **a), "silu": lambda x, a: F.silu(x),
    "softplus": lambda x, a: F.softplus(x, **a), "elu": lambda x, a: F.elu(x, **a),
    # F.hardsigmoid's backward multiplies by 1/6 rounded to float32 even in float64 (3e-8
    # off); relu6(x + 3)/6 is the same function, exact, with the same slopes at ±3.
    "selu": lambda x, a: F.selu(x), "hard_sigmoid": lambda x, a: F.relu6(x + 3) / 6,
    "hard_swish": lambda x, a: F.hardswish(x), "mish": lambda x, a: F.mish(x),
}


def _per_axis(value, d: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * d


def _window_gaps(x, kernel, stride, padding):
    """Per max-pool window of x [C, *spatial]: max - v for its values (0 at the max and at
    exact ties, inf for the -inf padding), to keep data away from near-ties."""
    d = len(kernel)
    xp = F.pad(x.detach(), [q for p in reversed(padding) for q in (p, p)], value=-math.inf)
    for a in range(d):
        xp = xp.unfold(1 + a, kernel[a], stride[a])
    w = xp.reshape(tuple(xp.shape[:1 + d]) + (-1,))
    return w.max(dim=-1, keepdim=True).values - w


def _apply_spatial(op: str, ins: list, d: dict, kinks: _Kinks):
    """torch.nn.functional on one example ([C, *spatial]: a batch axis of 1 added)."""
    x = ins[0]
    if op in ("conv1d", "conv2d"):
        pad = d.get("padding", 0)
        fn = F.conv1d if op == "conv1d" else F.conv2d
        with warnings.catch_warnings():   # 'same' with an even kernel: "a zero-padded copy"
            warnings.simplefilter("ignore", UserWarning)
            return fn(x[None], ins[1], ins[2] if len(ins) == 3 else None,
                      stride=_per_axis(d.get("stride", 1), x.dim() - 1),
                      padding=pad if isinstance(pad, str) else _per_axis(pad, x.dim() - 1),
                      dilation=_per_axis(d.get("dilation", 1), x.dim() - 1),
                      groups=d.get("groups", 1))[0]
    if op in ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"):
        dims = x.dim() - 1
        kernel = _per_axis(d["kernel_size"], dims)
        stride = kernel if d.get("stride") is None else _per_axis(d["stride"], dims)
        padding = _per_axis(d.get("padding", 0), dims)
        if op.startswith("max"):
            kinks.see(_window_gaps(x, kernel, stride, padding))
            return getattr(F, op)(x[None], kernel, stride, padding)[0]
        return getattr(F, op)(x[None], kernel, stride, padding,
                              count_include_pad=d.get("count_include_pad", True))[0]
    if op == "global_avg_pool":
        return x.mean(dim=tuple(range(1, x.dim())))
    if op == "pad":
        return F.pad(x, tuple(d["pad"]), value=d.get("value", 0.0))
    if op == "slice":
        axis = d["axis"] % x.dim()
        return x[(slice(None),) * axis + (slice(d.get("start", 0), d.get("stop"),
                                                d.get("step", 1)),)]
    if op == "transpose":
        perm = d.get("perm")
        return x.permute(*(range(x.dim() - 1, -1, -1) if perm is None else perm))
    raise ValueError(f"unknown op {op!r}")


def _axes(axis):
    return None if axis is None else (tuple(axis) if isinstance(axis, (list, tuple)) else (axis,))


def _apply(op: str, ins: list, d: dict, kinks: _Kinks):
    """One op on per-example tensors (params unbatched, like every other value here)."""
    if op == "dense":
        y = torch.matmul(ins[0], ins[1].transpose(0, 1))
        return y + ins[2] if len(ins) == 3 else y
    if op == "matmul":
        return torch.matmul(ins[0], ins[1])
    if op in ("add", "sub", "mul", "div"):
        return {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                "div": operator.truediv}[op](ins[0], ins[1])
    if op == "relu":
        kinks.see(ins[0])
        return torch.relu(ins[0])
    if op == "leaky_relu":
        kinks.see(ins[0])
        return F.leaky_relu(ins[0], d.get("alpha", 0.01))
    if op in ("sigmoid", "tanh", "exp", "log"):
        return getattr(torch, op)(ins[0])
    if op in ACTIVATION_OPS:
        x = ins[0]
        if op in ("elu", "selu"):
            kinks.see(x)
        elif op in ("hard_sigmoid", "hard_swish"):
            kinks.see(x - 3)
            kinks.see(x + 3)
        elif op == "softplus":   # linear past beta·x = threshold
            kinks.see(d.get("beta", 1.0) * x - d.get("threshold", 20.0))
        return _TORCH_ACTIVATIONS[op](x, {a: v for a, v in d.items() if a not in ("op", "inputs")})
    if op == "softmax":
        return torch.softmax(ins[0], dim=d.get("axis", -1))
    if op == "log_softmax":
        return torch.log_softmax(ins[0], dim=d.get("axis", -1))
    if op in ("sum", "mean"):
        axes = _axes(d.get("axis"))
        x = ins[0]
        if axes is None or x.dim() == 0:
            return x.sum() if op == "sum" else x.mean()
        return x.sum(dim=axes) if op == "sum" else x.mean(dim=axes)
    if op == "reshape":
        return ins[0].reshape(tuple(d["shape"]))
    if op == "flatten":
        return ins[0].reshape(-1)
    if op == "concat":
        return torch.cat(list(ins), dim=d.get("axis", -1))
    if op in SPATIAL_OPS:
        return _apply_spatial(op, ins, d, kinks)
    if op == "layer_norm":
        k = len(d.get("axes", [-1]))
        return F.layer_norm(ins[0], ins[0].shape[ins[0].dim() - k:], *ins[1:],
                            eps=d.get("eps", 1e-5))
    if op == "elementwise":
        names = d["inputs"]
        env = dict(zip(names, ins))
        out = _formula(d["expr"], env, kinks)
        shape = torch.broadcast_shapes(*[t.shape for t in ins])
        if not isinstance(out, torch.Tensor):
            out = torch.tensor(float(out), dtype=torch.float64)
        return out.expand(shape) if out.shape != shape else out
    if op == "mse":
        return F.mse_loss(ins[0], ins[1])
    if op == "softmax_cross_entropy":
        x, t = ins
        c = x.shape[-1]
        if not t.is_floating_point():   # class indices
            loss = F.cross_entropy(x.reshape(-1, c), t.reshape(-1).long(), reduction="none")
        else:
            loss = F.cross_entropy(x.reshape(-1, c), t.reshape(-1, c), reduction="none")
        return loss.reshape(x.shape[:-1])
    if op == "embedding":
        return F.embedding(ins[0].long(), ins[1])
    if op == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(ins[0], ins[1])
    raise ValueError(f"unknown op {op!r}")


def topological(nodes: dict) -> list[str]:
    order, state = [], {}

    def visit(n):
        if state.get(n) == 2 or n not in nodes:
            return
        if state.get(n) == 1:
            raise ValueError(f"cycle at {n}")
        state[n] = 1
        for i in nodes[n]["inputs"]:
            visit(i)
        state[n] = 2
        order.append(n)

    for n in nodes:
        visit(n)
    return order


@dataclass
class Reference:
    outputs: dict
    loss: float
    grads: dict
    kink_margin: float
    max_abs: float = 0.0
    values: dict = field(default_factory=dict)
    eval_loss: float | None = None   # evaluate's loss (batch norm by running statistics)


def _batch_norm(d: dict, envs: list[dict], training: bool) -> list:
    """torch.nn.functional.batch_norm over the batch (the per-example values stacked);
    in training mode by the batch's statistics. torch refuses N = 1 value per channel in
    training: there, its definition (then y = bias, whatever x)."""
    x = torch.stack([env[d["inputs"][0]] for env in envs])
    w, b, mean, var = (envs[0][i] for i in d["inputs"][1:])
    eps = d.get("eps", 1e-5)
    if training and x.numel() == x.shape[1]:
        y = (x - x.mean(dim=0)) / torch.sqrt(eps + x.var(dim=0, unbiased=False)) * w + b
    else:   # copies: F.batch_norm updates the running statistics it is given in training
        y = F.batch_norm(x, mean.detach().clone(), var.detach().clone(), w, b,
                         training=training, momentum=d.get("momentum", 0.1), eps=eps)
    return list(y)


def _dropout(name: str, d: dict, envs: list[dict], training: bool, batched: bool) -> list:
    """torch's inverted dropout, x·mask/(1 − p), in training; the identity otherwise. The
    mask of example b's element i is graphc's generator's at step 0 for element b·S + i
    of a batched value, i of a param's (one mask for every example)."""
    from graphc.dropout import keep_mask, keep_threshold, node_key
    xs = [env[d["inputs"][0]] for env in envs]
    p = d.get("p", 0.5)
    if not training or p == 0:
        return xs
    out = []
    for b, x in enumerate(xs):
        first = b * x.numel() if batched else 0
        kept = keep_mask(node_key(name, d.get("seed", 0)), 0,
                         first + np.arange(x.numel()).reshape(tuple(x.shape)), keep_threshold(p))
        out.append(x * torch.tensor(kept, dtype=x.dtype) / (1 - p))
    return out


def _batched(spec: dict) -> set[str]:
    """The values that have a batch axis: inputs, and nodes reading one."""
    found = set(spec.get("inputs", {}))
    for name in topological(spec["nodes"]):
        if any(i in found for i in spec["nodes"][name]["inputs"]):
            found.add(name)
    return found


def _run_examples(spec: dict, order: list[str], inputs: dict, P: dict, training: bool,
                  kinks: _Kinks) -> tuple[list[dict], float]:
    """Every node for every example (params shared), node by node; batch norm sees the
    whole batch, dropout numbers the batch's elements. Returns the per-example
    environments and the largest magnitude."""
    n = next(iter(inputs.values())).shape[0]
    envs = [dict(P, **{k: torch.tensor(v[b]) for k, v in inputs.items()}) for b in range(n)]
    biggest = 0.0
    batched = _batched(spec)
    for name in order:
        d = dict(spec["nodes"][name])
        if d["op"] == "batch_norm":
            values = _batch_norm(d, envs, training)
        elif d["op"] == "dropout":
            values = _dropout(name, d, envs, training, name in batched)
        else:
            values = [_apply(d["op"], [env[i] for i in d["inputs"]], d, kinks) for env in envs]
        for env, v in zip(envs, values):
            env[name] = v
            if v.numel():
                biggest = max(biggest, float(v.detach().abs().max()))
    return envs, biggest


def torch_evaluate(spec: dict, inputs: dict, params: dict) -> Reference:
    """The spec run by PyTorch in float64, example by example (batch norm over the batch);
    loss = mean of the per-example losses; gradients of the trainable params by autograd.
    With batch norm, the loss and gradients come from training mode (batch statistics)
    and the outputs and evaluate's loss from evaluation mode (running statistics)."""
    nodes = spec["nodes"]
    order = topological(nodes)
    frozen = {k for k, v in spec.get("params", {}).items()
              if isinstance(v, dict) and v.get("trainable") is False}
    P = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=k not in frozen)
         for k, v in params.items()}
    kinks = _Kinks()

    def loss_of(envs):
        if not spec.get("loss"):
            return torch.tensor(float("nan"))
        return torch.stack([env[spec["loss"]] for env in envs]).mean()

    envs, biggest = _run_examples(spec, order, inputs, P, True, kinks)
    loss = loss_of(envs)
    if spec.get("loss") and loss.requires_grad:
        loss.backward()
    grads = {k: (p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape))
             for k, p in P.items() if k not in frozen}
    if any(d["op"] in MODE_OPS for d in nodes.values()):
        with torch.no_grad():
            envs, also = _run_examples(spec, order, inputs, P, False, kinks)
        biggest = max(biggest, also)
    outputs = {o: torch.stack([env[o] for env in envs]).detach().numpy()
               for o in spec.get("outputs", [])}
    return Reference(outputs, float(loss.detach()), grads, kinks.margin,
                     max(biggest, max((float(np.abs(g).max()) for g in grads.values()
                                       if g.size), default=0.0)),
                     eval_loss=float(loss_of(envs).detach()))


def reference_is_usable(ref: Reference) -> str | None:
    """Why a draw cannot be compared (None when it can)."""
    vals = [ref.loss] + [a for a in ref.outputs.values()] + list(ref.grads.values())
    if not all(np.all(np.isfinite(v)) for v in vals) or not math.isfinite(ref.max_abs):
        return "the torch reference is not finite"
    if ref.max_abs > VALUE_LIMIT:
        return f"the torch reference reaches {ref.max_abs:.3g}"
    if ref.kink_margin < KINK_MARGIN:
        return f"a kink argument is {ref.kink_margin:.3g} from its kink"
    return None


def init_params(spec: dict) -> dict:
    """The params graphc draws for this spec (seed 0), without building any C."""
    from graphc.graph import Graph
    from graphc.init import init_params as draw
    g = Graph.from_spec(spec)
    return draw({p: (v.shape, v.init) for p, v in g.params.items()}, 0)


# ---------------------------------------------------------------- comparing

def compare(what: str, got, want, rtol: float = RTOL, per_array: bool = False) -> str | None:
    """None when every element satisfies |got - want| <= rtol * max(1, |want|) (with
    `per_array`, rtol * max(1, max |want|)); NaN only matches NaN. Else a line saying
    where and by how much they differ."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, torch {want.shape}"
    if not want.size:
        return None
    tol = rtol * np.maximum(1.0, np.abs(want))
    if per_array:
        tol = np.full(want.shape, rtol * max(1.0, float(np.nanmax(np.abs(want)))))
    with np.errstate(invalid="ignore"):
        err = np.abs(got - want)
        bad = ~(err <= tol) & ~(np.isnan(got) & np.isnan(want))
    if not bad.any():
        return None
    ratio = np.where(bad, np.nan_to_num(err / tol, nan=np.inf, posinf=np.inf), -1.0)
    k = np.unravel_index(int(np.argmax(ratio)), want.shape)
    where = f"[{', '.join(map(str, k))}]" if want.ndim else ""
    return (f"{what}{where}: graphc {got[k]!r}, torch {want[k]!r}, |diff| {err[k]:.3g} > "
            f"{tol[k]:.3g} ({int(bad.sum())} of {want.size} elements differ)")


def find_case(seed: int, *, steps: int | tuple | None = None, cancellations: bool = True,
              tries: int = 12) -> tuple[Case, dict, np.random.Generator]:
    """A usable case for `seed`: its spec, and inputs on which torch is finite, moderate and
    not within KINK_MARGIN of a kink (else the next data draw, then the next attempt)."""
    reasons = []
    for attempt in range(tries):
        case = generate(seed, attempt=attempt, steps=steps, cancellations=cancellations)
        rng = np.random.default_rng([seed, attempt])
        try:
            params = init_params(case.spec)
        except Exception:   # graphc rejects the spec: the compile will say so, with the spec
            return case, draw_inputs(case, rng), rng
        for _ in range(3):
            inputs = draw_inputs(case, rng)
            why = reference_is_usable(torch_evaluate(case.spec, inputs, params))
            if why is None:
                return case, inputs, rng
            reasons.append(f"attempt {attempt}: {why}")
    raise RuntimeError(f"seed {seed}: no usable case in {tries} attempts: " + "; ".join(reasons))


def check_model(model, spec: dict, inputs: dict, *, rtol: float = RTOL,
                per_array: bool = False, reference: bool = True) -> list[str]:
    """Every output (forward and evaluate), the batch-mean loss (gradients and evaluate)
    and every param gradient of the compiled `model` against torch; with `reference`,
    graphc's NumPy reference too. Returns the mismatches. For a float32 model, pass
    inputs that are float32 values: torch then computes in float64 on the same numbers."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in model.get_params().items()}
    ref = torch_evaluate(spec, inputs, params)
    problems = []

    def cmp(what, got, want):
        problems.append(compare(what, got, want, rtol, per_array))

    fwd = model.forward(**inputs)
    for o, want in ref.outputs.items():
        cmp(f"output {o} (forward)", fwd.get(o), want)
    loss, grads = model.gradients(**inputs)
    cmp("loss (gradients)", loss, ref.loss)
    for p, want in ref.grads.items():
        cmp(f"gradient of {p}", grads.get(p), want)
    eloss, eouts = model.evaluate(**inputs)
    cmp("loss (evaluate)", eloss, ref.eval_loss)
    for o, want in ref.outputs.items():
        cmp(f"output {o} (evaluate)", eouts.get(o), want)
    if reference:
        import graphc
        try:
            r = graphc.reference(model.graph)
            r.set_params(params)
            rl, rg = r.gradients(**inputs)
            rout = r.forward(**inputs)
        except Exception as e:  # noqa: BLE001 - reported with the spec
            return [p for p in problems if p] + [f"graphc.reference raised {type(e).__name__}: {e}"]
        for o, want in ref.outputs.items():
            cmp(f"graphc.reference output {o}", rout.get(o), want)
        cmp("graphc.reference loss", rl, ref.loss)
        for p, want in ref.grads.items():
            cmp(f"graphc.reference gradient of {p}", rg.get(p), want)
    return [p for p in problems if p]


def check_nan(model, case: Case, inputs: dict, rng: np.random.Generator) -> list[str]:
    """One NaN in one input element of example 0: the forward outputs and the loss must be
    NaN exactly where torch's are (relu(NaN), max(NaN, x), softmax rows, ...), and every
    other example unchanged. (Not for formulas that cancel an input: SymPy's x - x is 0.)"""
    names = sorted(k for k, kind in case.input_kinds.items() if kind == "normal")
    if not names:
        return []
    name = names[int(rng.integers(len(names)))]
    bad = {k: v.copy() for k, v in inputs.items()}
    flat = bad[name][0].reshape(-1)
    flat[int(rng.integers(flat.size))] = np.nan
    bad[name][0] = flat.reshape(bad[name][0].shape)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in model.get_params().items()}
    ref = torch_evaluate(case.spec, bad, params)
    problems = [f"(with a NaN in {name}[0])"]
    fwd = model.forward(**bad)
    for o, want in ref.outputs.items():
        problems.append(compare(f"output {o} (forward)", fwd.get(o), want))
    eloss, _ = model.evaluate(**bad)
    problems.append(compare("loss (evaluate)", eloss, ref.eval_loss))
    problems = [p for p in problems if p]
    return problems if len(problems) > 1 else []


def report(case: Case, problems: list[str], *, dtype: str = "float64", note: str = "",
           repro: str | None = None) -> str:
    """The assertion message: what differs by how much, how to reproduce it, the spec."""
    repro = repro or f"python tests/torch_graphs.py {case.seed}"
    return (f"graphc ({dtype}) differs from PyTorch on random graph seed {case.seed} "
            f"(attempt {case.attempt}, batch {case.batch}){note}:\n  "
            + "\n  ".join(problems)
            + f"\nreproduce: {repro}\nspec:\n{case.yaml()}")


def case_from_spec(spec: dict, *, batch: int = 3, seed: int = 0) -> Case:
    """A Case for a hand-written spec: inputs standard normal, except cross-entropy
    targets (probability rows), bce targets (uniform in [0, 1]) and int32 inputs (indices
    over their whole range)."""
    from graphc.graph import Graph
    kinds = {name: "normal" for name in spec.get("inputs", {})}
    for name, bound in Graph.from_spec(spec).index_bounds().items():
        kinds[name] = f"index:{bound.bound}"
    for d in spec["nodes"].values():
        if d["op"] == "softmax_cross_entropy" and kinds.get(d["inputs"][1]) == "normal":
            kinds[d["inputs"][1]] = "prob"
        if d["op"] == "bce_with_logits" and d["inputs"][1] in kinds:
            kinds[d["inputs"][1]] = "unit"
    return Case(seed, 0, spec, kinds, batch)


def check_case(case: Case, inputs: dict, rng: np.random.Generator) -> tuple[list[str], str]:
    """Compile `case` (float64) and compare it with torch; then, unless a formula cancels
    an input, the NaN propagation (check_nan). Returns (mismatches, what was checked)."""
    try:
        model = compile_strict(case.spec, "float64")   # and warning-free under -Werror
        problems = check_model(model, case.spec, inputs)
    except Exception as e:   # noqa: BLE001 - a crash on a valid spec is reported with it
        return [f"{type(e).__name__}: {e}"], ""
    if problems or cancelling_nodes(case.spec):   # SymPy's x - x is 0 even for x = NaN
        return problems, ""
    return check_nan(model, case, inputs, rng), " (NaN propagation)"


def cancelling_nodes(spec: dict) -> list[str]:
    """Nodes whose math loses an input to SymPy's simplification (x - x, (a + b) - b, or
    sub(u, u)): exact for numbers, but the NaN of such an input no longer propagates."""
    import sympy as sp
    from graphc.formula import parse_formula
    out = []
    for name, d in spec["nodes"].items():
        ins = d["inputs"]
        if d["op"] in ("sub", "div", "mse") and len(set(ins)) < len(ins):
            out.append(name)
        elif d["op"] == "elementwise":
            symbols = {i: sp.Symbol(i, real=True) for i in ins}
            expr = parse_formula(d["expr"], symbols, node=name)
            used = {n.id for n in ast.walk(ast.parse(d["expr"], mode="eval"))
                    if isinstance(n, ast.Name)}
            if (used & set(ins)) - {str(x) for x in expr.free_symbols}:
                out.append(name)
    return out


def check_extreme_case(seed: int, dtype: str) -> tuple[Case, list[str]]:
    """The extreme-activation graph `seed` compiled for `dtype`, against torch (float32:
    torch in float64 on the float32 numbers, 1e-4 relative to each array's largest)."""
    case = extreme_case(seed)
    inputs = draw_inputs(case, np.random.default_rng(seed))
    if dtype == "float32":
        inputs = {k: v.astype(np.float32).astype(np.float64) for k, v in inputs.items()}
    try:
        model = compile_strict(case.spec, dtype)
        if dtype == "float32":
            return case, check_model(model, case.spec, inputs, rtol=FLOAT32_RTOL,
                                     per_array=True, reference=False)
        return case, check_model(model, case.spec, inputs)
    except Exception as e:   # noqa: BLE001 - a crash on a valid spec is reported with it
        return case, [f"{type(e).__name__}: {e}"]


def _signature(problems: list[str]) -> str:
    """What kind of failure: the exception's type, or which kind of value differs."""
    p = problems[0] if problems else ""
    if p.startswith("(with a NaN"):
        return "nan"
    head = p.split(":")[0]
    return head if " " not in head or head.startswith("graphc.reference raised") else \
        head.split()[0] + ("-reference" if "reference" in head else "")


def shrink(case: Case, *, log=print) -> Case:
    """A smaller spec failing the same way: greedily replace a node by a fresh input (a
    param, for a node computed from params only) of its shape, dropping what no longer
    feeds anything, while check_case still fails with the same signature."""
    import copy
    from graphc.graph import Graph

    def fails(c: Case) -> str | None:
        rng = np.random.default_rng(0)
        problems, _ = check_case(c, draw_inputs(c, rng), rng)
        return _signature(problems) if problems else None

    want = fails(case)
    if want is None:
        log("the case does not fail")
        return case
    changed = True
    while changed:
        changed = False
        values = Graph.from_spec(case.spec).values
        for name in list(case.spec["nodes"]):
            if name == case.spec.get("loss"):
                continue
            spec, kinds = copy.deepcopy(case.spec), dict(case.input_kinds)
            v = values[name]
            del spec["nodes"][name]
            if v.batched:
                spec["inputs"][name] = list(v.shape)
                kinds[name] = "normal"
            else:
                spec.setdefault("params", {})[name] = {"shape": list(v.shape), "init": "uniform",
                                                       "low": -1, "high": 1}
            _prune(spec, kinds)
            trial = Case(case.seed, case.attempt, spec, kinds, case.batch, case.features)
            try:
                got = fails(trial)
            except Exception:   # noqa: BLE001 - an invalid trial is just not smaller
                got = None
            if got == want:
                log(f"dropped {name}: {len(spec['nodes'])} nodes left")
                case, changed = trial, True
                break
    return case


def _prune(spec: dict, kinds: dict) -> None:
    """Drop nodes, inputs and params that nothing reachable from the loss and outputs uses."""
    keep, todo = set(), [spec["loss"], *spec.get("outputs", [])]
    while todo:
        n = todo.pop()
        if n in keep:
            continue
        keep.add(n)
        todo.extend(spec["nodes"].get(n, {}).get("inputs", []))
    spec["nodes"] = {k: d for k, d in spec["nodes"].items() if k in keep}
    spec["outputs"] = [o for o in spec.get("outputs", []) if o in spec["nodes"]]
    spec["inputs"] = {k: d for k, d in spec["inputs"].items() if k in keep}
    for k in list(kinds):
        if k not in spec["inputs"]:
            del kinds[k]
    if "params" in spec:
        spec["params"] = {k: d for k, d in spec["params"].items() if k in keep}
        if not spec["params"]:
            del spec["params"]


def main(argv: list[str]) -> int:
    """python tests/torch_graphs.py SEED [SEED ...]
       python tests/torch_graphs.py --shrink SEED    # a smaller spec failing the same way
       python tests/torch_graphs.py --extreme SEED [--float32]
       python tests/torch_graphs.py --spec FILE.yaml [FILE ...]"""
    import yaml
    status = 0
    if argv[:1] == ["--shrink"]:
        case, _, _ = find_case(int(argv[1]))
        small = shrink(case)
        print(small.yaml())
        rng = np.random.default_rng(0)
        problems, what = check_case(small, draw_inputs(small, rng), rng)
        print(what.strip())
        print("\n".join(problems))
        return 0
    if argv[:1] == ["--extreme"]:
        dtype = "float32" if "--float32" in argv else "float64"
        case, problems = check_extreme_case(int(argv[1]), dtype)
        print(case.yaml())
        print("\n".join(problems) if problems else "OK: graphc matches torch")
        return bool(problems)
    if argv[:1] == ["--spec"]:
        for path in argv[1:]:
            with open(path) as f:
                case = case_from_spec(yaml.safe_load(f))
            rng = np.random.default_rng(0)
            problems, _ = check_case(case, draw_inputs(case, rng), rng)
            print(f"# {path}")
            print("\n".join(problems) if problems else "OK: graphc matches torch")
            status |= bool(problems)
        return status
    for s in argv:
        seed = int(s)
        case, inputs, rng = find_case(seed)
        print(f"# seed {seed} (attempt {case.attempt}, batch {case.batch})")
        print(case.yaml())
        problems, what = check_case(case, inputs, rng)
        if problems and what:
            print(what.strip())
        print("\n".join(problems) if problems else "OK: graphc matches torch")
        status |= bool(problems)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
