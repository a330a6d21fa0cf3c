"""Every op, declared once: inputs, attributes, shape rule, and its math in index notation.

An op's `lower` writes its output element as a SymPy expression of input elements (with
summation indices for contractions and reductions), through the small `Lowering` API. The
derivatives are not written here: `graphc.derive` differentiates these formulas. Stable
forms (max-shifted softmax, log-sum-exp, logits-based losses) are part of the formulas.
Shapes are per-example; the batch axis is implicit and handled by `Lowering`.

The NumPy reference for each op lives apart, in `graphc.reference`, on purpose: it is the
independent oracle the generated C is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy as sp

from .dropout import dropout_keep, keep_threshold, node_key
from .errors import SpecError
from .formula import number
from .functions import leaky_relu, relu, sigmoid, softplus
from .ir import (ACC, ASSIGN, BATCH, INT32, MAX, STEP, SUM, Buffer, Kernel, grad_name,
                 index_symbols, range_guard)

Shape = tuple[int, ...]


# ---------------------------------------------------------------- lowering context

@dataclass(frozen=True)
class Statistic:
    """What a training-mode lowering keeps for the train step: `kernel` writes the batch's
    value of a running statistic (a non-trainable param) into that param's gradient slot,
    and the train step moves the param towards it, `p = (1 - momentum)·p + momentum·g`."""
    param: str
    kernel: Kernel
    momentum: float


class Lowering:
    """What an op's `lower` sees: its input and output buffers and a kernel sink.

    `training` says which program the kernels are for: the gradients (and so the train
    step) lower in training mode, forward and evaluate in evaluation mode. Only ops that
    declare `OpDef.modes` lower differently (batch_norm: batch statistics or running ones)."""

    def __init__(self, node: str, inputs: list[Buffer], out: Buffer, attrs: dict,
                 new_buffer: Callable[[Buffer], Buffer], kernels: list[Kernel], *,
                 training: bool = False, statistics: list[Statistic] | None = None):
        self.node, self.inputs, self.out, self.attrs = node, inputs, out, attrs
        self._new_buffer, self._kernels = new_buffer, kernels
        self.training = training
        self._statistics = statistics if statistics is not None else []
        self._next_index = 0
        self.batch = sp.Symbol("b", integer=True, nonnegative=True)

    def indices(self, count: int) -> list[sp.Symbol]:
        syms = index_symbols(count, self._next_index)
        self._next_index += count
        return syms

    def at(self, buf: Buffer, index) -> sp.Indexed:
        """Element `index` (per-example) of `buf`; the batch index is added when batched."""
        full = ((self.batch,) if buf.batched else ()) + tuple(index)
        # An unbatched scalar is stored as one element, read at index 0.
        return buf.base[full if full else (sp.Integer(0),)]

    def bcast(self, buf: Buffer, out_index) -> sp.Indexed:
        """NumPy broadcasting: align right; size-1 axes read element 0."""
        out_index = list(out_index)
        lead = len(out_index) - len(buf.shape)
        return self.at(buf, [sp.Integer(0) if d == 1 else i
                             for d, i in zip(buf.shape, out_index[lead:])])

    def temp(self, suffix: str, shape: Shape, *, differentiable: bool = True,
             batched: bool | None = None) -> Buffer:
        batched = self.out.batched if batched is None else batched
        return self._new_buffer(Buffer(f"{self.node}.{suffix}", tuple(shape), batched,
                                       "temp", differentiable))

    def kernel(self, out: Buffer, out_index, loops, body, *, mode: str = ASSIGN,
               post: sp.Expr = ACC) -> None:
        """Emit `out[out_index] (mode) body` over the per-example `loops` (batch loop added)."""
        batch_loop = ((self.batch, BATCH),) if out.batched else ()
        full_index = ((self.batch,) if out.batched else ()) + tuple(out_index)
        if not full_index:  # a scalar: index it by a constant 0
            full_index = (sp.Integer(0),)
        self._kernels.append(Kernel(out.name, tuple(sp.sympify(i) for i in full_index),
                                    batch_loop + tuple(loops), sp.sympify(body), mode,
                                    sp.sympify(post), self.node, "forward"))

    def statistic(self, param: Buffer, index, loops, value, momentum: float) -> None:
        """Keep `value` (over `loops`, unbatched) as the batch's value of the running
        statistic `param`: a kernel writing `grad_name(param)`, which the train step
        blends into the param (see `Statistic`)."""
        assert self.training and not param.batched
        self._statistics.append(Statistic(param.name, Kernel(
            grad_name(param.name), tuple(sp.sympify(i) for i in index), tuple(loops),
            sp.sympify(value), ASSIGN, ACC, self.node, f"batch value of {param.name}"),
            momentum))

    def padded(self, buf: Buffer, index, loops, fill=0) -> sp.Expr:
        """Element `index` of `buf` where it lies inside, `fill` where the loops take it
        outside (padding): one guarded read, whose derivative SymPy carries through and
        whose scatter derive guards the same way (`graphc.ir.range_guard`)."""
        guard = range_guard(index, buf.shape, dict(loops))
        read = self.at(buf, index)
        return read if guard == sp.true else sp.Piecewise((read, guard), (fill, True))

    def map(self, out: Buffer, element: Callable[[list[sp.Symbol]], sp.Expr]) -> None:
        """out[idx] = element(idx) over out's whole shape."""
        idx = self.indices(len(out.shape))
        self.kernel(out, idx, list(zip(idx, out.shape)), element(idx))


# ---------------------------------------------------------------- attributes

@dataclass(frozen=True)
class Attr:
    kind: str   # float | int | ints | sides | pads | padding | bool | choice | axis | axes | shape | expr
    default: Any = None
    required: bool = False
    doc: str = ""
    low: int | None = 0   # int, ints: the smallest value allowed (None: any)
    choices: tuple[str, ...] = ()   # choice: the strings allowed; padding: its words


def _plain_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_attr(node: str, name: str, attr: Attr, value: Any) -> Any:
    def fail(msg):
        return SpecError(msg, node=node, field=name)

    if attr.kind == "float":
        try:   # float() of a 400-digit integer raises OverflowError, not inf
            as_float = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError, OverflowError):
            as_float = None
        if as_float is None or not isinstance(value, (int, float)) or not math.isfinite(as_float):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise fail(f"must be a finite number within a double's range, got {shown}")
        return as_float
    if attr.kind in ("axis", "axes"):
        if value is None and attr.kind == "axes":
            return None
        vals = value if isinstance(value, (list, tuple)) and attr.kind == "axes" else [value]
        if not vals or any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
            raise fail(f"must be an integer axis{' or a list of axes' if attr.kind == 'axes' else ''}, got {value!r}")
        return tuple(vals) if attr.kind == "axes" else vals[0]
    if attr.kind == "shape":
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1) for v in value):
            raise fail(f"must be a list of positive integers (one may be -1), got {value!r}")
        if list(value).count(-1) > 1:
            raise fail("at most one dimension may be -1")
        return tuple(value)
    if attr.kind == "int":
        if value is None and attr.default is None and not attr.required:
            return None
        if not _plain_int(value) or (attr.low is not None and value < attr.low):
            raise fail("must be an integer" + (f" >= {attr.low}" if attr.low is not None else "")
                       + f", got {value!r}")
        return value
    if attr.kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {value!r}")
        return value
    if attr.kind in ("ints", "padding"):
        # One int for every spatial axis, or a list of one per axis (its length is checked
        # by the op's shape rule, which knows the rank); padding may also be a word.
        if attr.kind == "padding" and isinstance(value, str):
            if value not in attr.choices:
                raise fail(f"must be an integer, a list of integers or one of "
                           f"{', '.join(map(repr, attr.choices))}, got {value!r}")
            return value
        vals = value if isinstance(value, (list, tuple)) else [value]
        if not vals or len(vals) > 3 or any(not _plain_int(v) or v < attr.low for v in vals):
            raise fail(f"must be an integer >= {attr.low} or a list of 1 to 3 of them, "
                       f"got {value!r}")
        return vals[0] if not isinstance(value, (list, tuple)) else tuple(vals)
    if attr.kind == "sides":
        # An int for every spatial axis, or one per axis, each an int (both sides) or a
        # [before, after] pair (checked against the rank by the op's shape rule).
        def side(v):
            if _plain_int(v) and v >= 0:
                return v
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(
                    _plain_int(w) and w >= 0 for w in v):
                return tuple(v)
            return None
        vals = value if isinstance(value, (list, tuple)) else [value]
        sides = [side(v) for v in vals]
        if not vals or len(vals) > 3 or any(v is None for v in sides):
            raise fail(f"must be an integer >= 0, or a list of 1 to 3 of them, each an "
                       f"integer or a [before, after] pair, got {value!r}")
        return sides[0] if not isinstance(value, (list, tuple)) else tuple(sides)
    if attr.kind in ("pads", "perm"):
        if not isinstance(value, (list, tuple)) or any(not _plain_int(v) for v in value) \
                or (attr.kind == "pads" and (not value or len(value) % 2 or min(value) < 0)):
            what = ("a list of before/after pairs of integers >= 0 (torch.nn.functional.pad's "
                    "order: the last axis first)" if attr.kind == "pads"
                    else "a list of integers (a permutation of the per-example axes)")
            raise fail(f"must be {what}, got {value!r}")
        return tuple(value)
    if attr.kind == "choice":
        if not isinstance(value, str) or value not in attr.choices:
            raise fail(f"must be one of {', '.join(map(repr, attr.choices))}, got {value!r}")
        return value
    if attr.kind == "expr":
        return value  # parsed against the input names in Graph
    raise AssertionError(attr.kind)


def _axis(node: str, field_: str, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise SpecError(f"axis {axis} is out of range for a per-example value of rank {rank} "
                        "(axes count per-example dimensions; the batch axis is implicit)",
                        node=node, field=field_)
    return axis % rank


# ---------------------------------------------------------------- the op record

@dataclass(frozen=True)
class IntegerInput:
    """An input position that takes int32 values: indices into a table or a class axis.

    `wanted(shapes)` says whether the position holds integers, given the per-example shapes
    of all the node's inputs (a cross-entropy target holds class indices exactly when it
    has the logits' shape without the class axis); `bound(shapes)` is the number of valid
    indices, 0 to bound - 1, and `unit` what they count ("rows", "classes");
    `shape_rule(shapes)` says, for an error, which shape an integer needs where `wanted`
    is False."""
    what: str                                   # how the position is named in messages
    bound: Callable[[list[Shape]], int]
    unit: str
    wanted: Callable[[list[Shape]], bool] = lambda shapes: True
    shape_rule: Callable[[list[Shape]], str] = lambda shapes: ""


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: tuple[int, int | None]          # (min, max) inputs; max None = any
    shape: Callable[..., Shape]             # (node, in_shapes, attrs) -> out shape
    lower: Callable[[Lowering], None]
    attrs: dict[str, Attr] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()      # for error messages
    # Test domain per input: None (any real), 'positive', 'probabilities', 'labels01'.
    domain: tuple[Any, ...] = ()
    doc: str = ""                           # what it computes, for error messages
    is_loss: bool = False
    # Positions that take int32 inputs (graphc.graph refuses integers anywhere else).
    integer_inputs: dict[int, IntegerInput] = field(default_factory=dict)
    # Inputs that must be params, by position: "param" (trainable or not) or "statistic" (a
    # running statistic: declared `trainable: false`, written by the train step). Only
    # these positions take a non-trainable param.
    param_inputs: dict[int, str] = field(default_factory=dict)
    # The initializer of a param read at a position, when its spec names none.
    param_init: dict[int, str] = field(default_factory=dict)
    modes: bool = False                     # lowers differently for training (`Lowering.training`)

    def normalize_attrs(self, node: str, given: dict) -> dict:
        out = {}
        for name, attr in self.attrs.items():
            if name in given:
                out[name] = _check_attr(node, name, attr, given[name])
            elif attr.required:
                raise SpecError(f"op '{self.name}' needs attribute '{name}' ({attr.doc})",
                                node=node, field=name)
            else:
                out[name] = attr.default
        return out


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    assert op.name not in OPS, op.name
    OPS[op.name] = op
    return op


# ---------------------------------------------------------------- shape rules

def broadcast_shapes(node: str, shapes: list[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        dims = {s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0} - {1}
        if len(dims) > 1:
            raise SpecError("inputs do not broadcast: per-example shapes "
                            + " and ".join(str(list(s)) for s in shapes), node=node, field="inputs")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _same_shape(node: str, shapes: list[Shape]) -> Shape:
    if shapes[0] != shapes[1]:
        raise SpecError(f"prediction and target must have the same per-example shape, got "
                        f"{list(shapes[0])} and {list(shapes[1])}", node=node, field="inputs")
    return shapes[0]


# ---------------------------------------------------------------- elementwise maps

def _map_lower(formula: Callable[..., sp.Expr]) -> Callable[[Lowering], None]:
    def lower(L: Lowering) -> None:
        L.map(L.out, lambda idx: formula(*[L.bcast(b, idx) for b in L.inputs], **L.attrs))
    return lower


def map_op(name: str, formula: Callable[..., sp.Expr], arity: int, *, doc: str,
           domain: tuple = (), attrs: dict | None = None,
           check: Callable[[str, dict], None] | None = None) -> OpDef:
    """`check(node, attrs)` refuses attribute values the formula cannot take."""
    def shape(node, shapes, attrs):
        if check is not None:
            check(node, attrs)
        return broadcast_shapes(node, shapes)
    return register(OpDef(
        name, (arity, arity), shape,
        _map_lower(formula), attrs or {}, ("a", "b")[:arity] if arity > 1 else ("x",),
        domain or (None,) * arity, doc=doc))


map_op("add", lambda a, b: a + b, 2, doc="a + b, broadcasting")
map_op("sub", lambda a, b: a - b, 2, doc="a - b, broadcasting")
map_op("mul", lambda a, b: a * b, 2, doc="a * b, broadcasting")
map_op("div", lambda a, b: a / b, 2, doc="a / b, broadcasting", domain=(None, "positive"))
map_op("relu", relu, 1, doc="max(x, 0)")
map_op("leaky_relu", lambda x, alpha: leaky_relu(x, number(alpha)), 1,
       doc="x if x > 0 else alpha·x", attrs={"alpha": Attr("float", 0.01, doc="negative slope")})
map_op("sigmoid", sigmoid, 1, doc="1 / (1 + exp(-x))")
map_op("tanh", sp.tanh, 1, doc="tanh(x)")
map_op("exp", sp.exp, 1, doc="exp(x)")
map_op("log", sp.log, 1, doc="natural log", domain=("positive",))


# Named activations, as torch.nn.functional computes them: one formula each; SymPy derives
# the rest. NaN fails every comparison, so it takes each Piecewise's last branch, which is
# written to propagate it (as torch's forward does). Each kink belongs to the branch whose
# slope torch's backward takes there: elu'(0) = alpha, hardsigmoid'(±3) = 0, hardswish'(-3)
# = 0 and hardswish'(3) = 1 (the product rule on x·hardsigmoid(x) gives exactly those).

def _gelu(x, approximate):
    if approximate == "tanh":   # torch's kBeta = sqrt(2/pi), kKappa = 0.044715
        return x * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + number(0.044715) * x ** 3))) / 2
    return x * (1 + sp.erf(x / sp.sqrt(2))) / 2


def _softplus(x, beta, threshold):
    # x where beta·x > threshold, as in torch: a jump of log(1 + exp(-threshold))/beta there.
    b = number(beta)
    return sp.Piecewise((x, b * x > number(threshold)), (softplus(b * x) / b, True))


def _elu(x, alpha):
    return sp.Piecewise((alpha * (sp.exp(x) - 1), x <= 0), (x, True))


def _hard_sigmoid(x):
    return sp.Piecewise((0, x <= -3), (1, x >= 3), ((x + 3) / 6, True))


def _nonzero_beta(node: str, attrs: dict) -> None:
    if attrs["beta"] == 0:
        raise SpecError("must not be 0 (softplus divides by it)", node=node, field="beta")


# torch's SELU constants (ATen/native/Activation.cpp)
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

map_op("gelu", _gelu, 1, doc="x·Φ(x) (torch's F.gelu; approximate='tanh' for its tanh form)",
       attrs={"approximate": Attr("choice", "none", choices=("none", "tanh"),
                                  doc="'none' (with erf) or 'tanh', as torch's F.gelu")})
map_op("silu", lambda x: x * sigmoid(x), 1, doc="x·sigmoid(x)")
map_op("softplus", _softplus, 1, check=_nonzero_beta,
       doc="log(1 + exp(beta·x))/beta, or x where beta·x > threshold",
       attrs={"beta": Attr("float", 1.0, doc="sharpness (not 0)"),
              "threshold": Attr("float", 20.0, doc="linear where beta·x exceeds it")})
map_op("elu", lambda x, alpha: _elu(x, number(alpha)), 1,
       doc="x if x > 0 else alpha·(exp(x) - 1)",
       attrs={"alpha": Attr("float", 1.0, doc="elu tends to -alpha as x -> -inf")})
map_op("selu", lambda x: number(SELU_SCALE) * _elu(x, number(SELU_ALPHA)), 1,
       doc="scale·elu(x, alpha) with torch's constants")
map_op("hard_sigmoid", _hard_sigmoid, 1, doc="relu6(x + 3)/6 (torch's F.hardsigmoid)")
map_op("hard_swish", lambda x: x * _hard_sigmoid(x), 1,
       doc="x·relu6(x + 3)/6 (torch's F.hardswish)")
map_op("mish", lambda x: x * sp.tanh(softplus(x)), 1, doc="x·tanh(softplus(x))")


def _elementwise_shape(node, shapes, attrs):
    return broadcast_shapes(node, shapes)


def _elementwise_lower(L: Lowering) -> None:
    expr, symbols = L.attrs["expr"]  # parsed by Graph against the input names

    def element(idx):
        return expr.xreplace({symbols[k]: L.bcast(b, idx) for k, b in enumerate(L.inputs)})
    L.map(L.out, element)


register(OpDef("elementwise", (1, None), _elementwise_shape, _elementwise_lower,
               {"expr": Attr("expr", required=True, doc="a formula over the input names")},
               doc="a user formula over the input names, applied elementwise"))


# ---------------------------------------------------------------- contractions

def _dense_shape(node, shapes, attrs):
    x, W = shapes[0], shapes[1]
    if len(W) != 2:
        raise SpecError(f"weight must be 2-D [out, in], got {list(W)}", node=node, field="inputs")
    if not x or x[-1] != W[1]:
        raise SpecError(f"input's last dimension {x[-1] if x else 'none'} does not match the "
                        f"weight's in-dimension {W[1]} (weight is [out, in] = {list(W)})",
                        node=node, field="inputs")
    if len(shapes) == 3 and shapes[2] not in ((W[0],), (1,), ()):
        raise SpecError(f"bias must have shape [{W[0]}], got {list(shapes[2])}",
                        node=node, field="inputs")
    return x[:-1] + (W[0],)


def _dense_lower(L: Lowering) -> None:
    x, W = L.inputs[0], L.inputs[1]
    out_idx = L.indices(len(L.out.shape))
    (i,) = L.indices(1)
    post = ACC + (L.bcast(L.inputs[2], out_idx[-1:]) if len(L.inputs) == 3 else 0)
    # y[..., o] = Σ_i x[..., i]·W[o, i] + bias[o]
    L.kernel(L.out, out_idx, list(zip(out_idx, L.out.shape)) + [(i, W.shape[1])],
             L.at(x, out_idx[:-1] + [i]) * L.at(W, [out_idx[-1], i]), mode=SUM, post=post)


register(OpDef("dense", (2, 3), _dense_shape, _dense_lower, input_names=("x", "W", "bias"),
               doc="x·Wᵀ + bias with W as [out, in] (torch.nn.Linear's layout)"))


def _matmul_parts(node, a: Shape, b: Shape):
    if not a or not b:
        raise SpecError("matmul needs operands of rank >= 1 (per-example)", node=node, field="inputs")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise SpecError(f"contracted dimensions differ: {list(a)} @ {list(b)}", node=node,
                        field="inputs")
    lead = broadcast_shapes(node, [a2[:-2], b2[:-2]]) if (a2[:-2] or b2[:-2]) else ()
    return a2, b2, lead


def _matmul_shape(node, shapes, attrs):
    a, b = shapes
    a2, b2, lead = _matmul_parts(node, a, b)
    return lead + ((a2[-2],) if len(a) > 1 else ()) + ((b2[-1],) if len(b) > 1 else ())


def _matmul_lower(L: Lowering) -> None:
    A, B = L.inputs
    a2, b2, lead = _matmul_parts(L.node, A.shape, B.shape)
    lead_idx = L.indices(len(lead))
    i, j, k = L.indices(3)

    def side(buf, full2, tail):
        own_lead = full2[:-2]
        lead_part = [sp.Integer(0) if d == 1 and lead[len(lead) - len(own_lead) + n] != 1
                     else lead_idx[len(lead) - len(own_lead) + n] for n, d in enumerate(own_lead)]
        return L.at(buf, lead_part + tail)

    a_tail = [i, k] if len(A.shape) > 1 else [k]
    b_tail = [k, j] if len(B.shape) > 1 else [k]
    out_idx = lead_idx + ([i] if len(A.shape) > 1 else []) + ([j] if len(B.shape) > 1 else [])
    extents = dict(zip(lead_idx, lead)) | {i: a2[-2], j: b2[-1], k: a2[-1]}
    L.kernel(L.out, out_idx, [(s, extents[s]) for s in out_idx] + [(k, extents[k])],
             side(A, a2, a_tail) * side(B, b2, b_tail), mode=SUM)


register(OpDef("matmul", (2, 2), _matmul_shape, _matmul_lower, input_names=("a", "b"),
               doc="numpy.matmul on the per-example shapes"))


# ---------------------------------------------------------------- reductions

def _reduced_axes(node, shape, attrs) -> tuple[int, ...]:
    axes = attrs.get("axis")
    if axes is None:
        return tuple(range(len(shape)))
    norm = sorted({_axis(node, "axis", a, len(shape)) for a in axes})
    if len(norm) != len(axes):
        raise SpecError(f"repeated axis in {list(axes)}", node=node, field="axis")
    return tuple(norm)


def _reduce_shape(node, shapes, attrs):
    axes = _reduced_axes(node, shapes[0], attrs)
    return tuple(d for k, d in enumerate(shapes[0]) if k not in axes)


def _reduce_lower(mean: bool):
    def lower(L: Lowering) -> None:
        (x,) = L.inputs
        axes = _reduced_axes(L.node, x.shape, L.attrs)
        idx = L.indices(len(x.shape))
        out_idx = [s for k, s in enumerate(idx) if k not in axes]
        count = math.prod(x.shape[k] for k in axes)
        L.kernel(L.out, out_idx, list(zip(out_idx, L.out.shape))
                 + [(idx[k], x.shape[k]) for k in axes], L.at(x, idx), mode=SUM,
                 post=ACC / count if mean else ACC)
    return lower


_axes_attr = {"axis": Attr("axes", None, doc="per-example axis or axes; all when omitted")}
register(OpDef("sum", (1, 1), _reduce_shape, _reduce_lower(False), _axes_attr,
               doc="sum over per-example axes"))
register(OpDef("mean", (1, 1), _reduce_shape, _reduce_lower(True), _axes_attr,
               doc="mean over per-example axes"))


def _shift_and_normalizer(L: Lowering, x: Buffer, axis: int, idx: list[sp.Symbol]):
    """m = max_k x (a stop-gradient shift) and s = Σ_k exp(x - m), both without `axis`."""
    red_shape = x.shape[:axis] + x.shape[axis + 1:]
    keep = idx[:axis] + idx[axis + 1:]
    (k,) = L.indices(1)
    along = idx[:axis] + [k] + idx[axis + 1:]
    m = L.temp("max", red_shape, differentiable=False)
    L.kernel(m, keep, list(zip(keep, red_shape)) + [(k, x.shape[axis])], L.at(x, along), mode=MAX)
    s = L.temp("sumexp", red_shape)
    L.kernel(s, keep, list(zip(keep, red_shape)) + [(k, x.shape[axis])],
             sp.exp(L.at(x, along) - L.at(m, keep)), mode=SUM)
    return m, s, keep


def _softmax_lower(log: bool):
    def lower(L: Lowering) -> None:
        (x,) = L.inputs
        axis = _axis(L.node, "axis", L.attrs["axis"], len(x.shape))
        idx = L.indices(len(x.shape))
        m, s, keep = _shift_and_normalizer(L, x, axis, idx)
        shifted = L.at(x, idx) - L.at(m, keep)
        body = shifted - sp.log(L.at(s, keep)) if log else sp.exp(shifted) / L.at(s, keep)
        L.kernel(L.out, idx, list(zip(idx, x.shape)), body)
    return lower


def _softmax_shape(node, shapes, attrs):
    if not shapes[0]:
        raise SpecError("needs a per-example value of rank >= 1", node=node, field="inputs")
    _axis(node, "axis", attrs["axis"], len(shapes[0]))
    return shapes[0]


_axis_attr = {"axis": Attr("axis", -1, doc="per-example axis (default: last)")}
register(OpDef("softmax", (1, 1), _softmax_shape, _softmax_lower(False), _axis_attr,
               doc="exp(x - max) / Σ exp(x - max)"))
register(OpDef("log_softmax", (1, 1), _softmax_shape, _softmax_lower(True), _axis_attr,
               doc="x - max - log Σ exp(x - max)"))


# ---------------------------------------------------------------- movement

def _reshape_target(node, shape: Shape, target: Shape) -> Shape:
    total = math.prod(shape)
    known = math.prod(d for d in target if d != -1)
    if -1 in target:
        if total % known:
            raise SpecError(f"cannot reshape {list(shape)} ({total} elements) to {list(target)}",
                            node=node, field="shape")
        target = tuple(total // known if d == -1 else d for d in target)
    if math.prod(target) != total:
        raise SpecError(f"cannot reshape {list(shape)} ({total} elements) to {list(target)} "
                        f"({math.prod(target)} elements)", node=node, field="shape")
    return target


def _ravel(shape: Shape, idx) -> sp.Expr:
    flat, stride = sp.Integer(0), 1
    for d, i in zip(reversed(shape), reversed(list(idx))):
        flat += stride * i
        stride *= d
    return flat


def _copy_lower(L: Lowering) -> None:
    # Row-major data is unchanged by reshape: out at x's row-major position = x[idx]. Only
    # the out index's flat offset is ever used, so the whole position goes in the last axis
    # (it stays affine in the loop indices).
    (x,) = L.inputs
    idx = L.indices(len(x.shape))
    out_idx = [sp.Integer(0)] * (len(L.out.shape) - 1) + [_ravel(x.shape, idx)]
    L.kernel(L.out, out_idx if L.out.shape else [], list(zip(idx, x.shape)), L.at(x, idx))


def _reshape_shape(node, shapes, attrs):
    return _reshape_target(node, shapes[0], attrs["shape"])


def _flatten_shape(node, shapes, attrs):
    return (math.prod(shapes[0]),)


register(OpDef("reshape", (1, 1), _reshape_shape, _copy_lower,
               {"shape": Attr("shape", required=True, doc="per-example target shape")},
               doc="same elements, new per-example shape"))
register(OpDef("flatten", (1, 1), _flatten_shape, _copy_lower,
               doc="per-example value to 1-D (torch.flatten(start_dim=1))"))


def _concat_shape(node, shapes, attrs):
    rank = len(shapes[0])
    if rank == 0:
        raise SpecError("cannot concatenate per-example scalars", node=node, field="inputs")
    axis = _axis(node, "axis", attrs["axis"], rank)
    for s in shapes[1:]:
        if len(s) != rank or any(a != b for k, (a, b) in enumerate(zip(s, shapes[0])) if k != axis):
            raise SpecError("inputs must match except along the concatenation axis: "
                            + ", ".join(str(list(t)) for t in shapes), node=node, field="inputs")
    return shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]


def _concat_lower(L: Lowering) -> None:
    axis = _axis(L.node, "axis", L.attrs["axis"], len(L.out.shape))
    offset = 0
    for x in L.inputs:
        idx = L.indices(len(x.shape))
        out_idx = idx[:axis] + [idx[axis] + offset] + idx[axis + 1:]
        L.kernel(L.out, out_idx, list(zip(idx, x.shape)), L.at(x, idx))
        offset += x.shape[axis]


register(OpDef("concat", (1, None), _concat_shape, _concat_lower, _axis_attr,
               doc="join along a per-example axis (default: last)"))


def _pad_widths(node: str, shape: Shape, pads: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) per per-example axis from torch's order (last axis first)."""
    if len(pads) > 2 * len(shape):
        raise SpecError(f"{len(pads) // 2} axes padded, but the per-example value has rank "
                        f"{len(shape)}", node=node, field="pad")
    widths = [(0, 0)] * len(shape)
    for k in range(len(pads) // 2):
        widths[len(shape) - 1 - k] = (pads[2 * k], pads[2 * k + 1])
    return widths


def _pad_shape(node, shapes, attrs):
    return tuple(d + b + a for d, (b, a) in zip(shapes[0], _pad_widths(node, shapes[0], attrs["pad"])))


def _pad_lower(L: Lowering) -> None:
    (x,) = L.inputs
    widths = _pad_widths(L.node, x.shape, L.attrs["pad"])
    idx = L.indices(len(x.shape))
    loops = list(zip(idx, L.out.shape))
    L.kernel(L.out, idx, loops, L.padded(x, [i - b for i, (b, _) in zip(idx, widths)], loops,
                                         number(L.attrs["value"])))


register(OpDef("pad", (1, 1), _pad_shape, _pad_lower,
               {"pad": Attr("pads", required=True, doc="before/after widths, last axis first "
                            "(torch.nn.functional.pad's order)"),
                "value": Attr("float", 0.0, doc="the value of the padding")},
               doc="constant padding (torch.nn.functional.pad, mode 'constant')"))


def _slice_range(node: str, shape: Shape, attrs: dict) -> tuple[int, range]:
    if not shape:
        raise SpecError("cannot slice a per-example scalar", node=node, field="inputs")
    axis = _axis(node, "axis", attrs["axis"], len(shape))
    if attrs["step"] < 1:
        raise SpecError(f"must be >= 1, got {attrs['step']}", node=node, field="step")
    taken = range(*slice(attrs["start"], attrs["stop"], attrs["step"]).indices(shape[axis]))
    if len(taken) == 0:
        raise SpecError(f"start {attrs['start']}, stop {attrs['stop']} and step {attrs['step']} "
                        f"select nothing of an axis of {shape[axis]}", node=node, field="stop")
    return axis, taken


def _slice_shape(node, shapes, attrs):
    axis, taken = _slice_range(node, shapes[0], attrs)
    return shapes[0][:axis] + (len(taken),) + shapes[0][axis + 1:]


def _slice_lower(L: Lowering) -> None:
    (x,) = L.inputs
    axis, taken = _slice_range(L.node, x.shape, L.attrs)
    idx = L.indices(len(x.shape))
    where = idx[:axis] + [taken.start + taken.step * idx[axis]] + idx[axis + 1:]
    L.kernel(L.out, idx, list(zip(idx, L.out.shape)), L.at(x, where))


register(OpDef("slice", (1, 1), _slice_shape, _slice_lower,
               {"axis": Attr("axis", required=True, doc="the per-example axis sliced"),
                "start": Attr("int", 0, low=None, doc="first index (negative: from the end)"),
                "stop": Attr("int", None, low=None, doc="end, excluded (default: the end)"),
                "step": Attr("int", 1, low=1, doc="stride")},
               doc="x[..., start:stop:step, ...] along one per-example axis, as Python slices"))


def _perm(node: str, shape: Shape, attrs: dict) -> tuple[int, ...]:
    perm = attrs["perm"]
    if perm is None:
        return tuple(reversed(range(len(shape))))
    if sorted(_axis(node, "perm", p, len(shape)) for p in perm) != list(range(len(shape))):
        raise SpecError(f"must be a permutation of the per-example axes 0..{len(shape) - 1}, "
                        f"got {list(perm)}", node=node, field="perm")
    return tuple(p % len(shape) for p in perm)


def _transpose_shape(node, shapes, attrs):
    return tuple(shapes[0][p] for p in _perm(node, shapes[0], attrs))


def _transpose_lower(L: Lowering) -> None:
    (x,) = L.inputs
    perm = _perm(L.node, x.shape, L.attrs)
    idx = L.indices(len(x.shape))
    where = [None] * len(idx)
    for k, p in enumerate(perm):   # out axis k is x's axis p
        where[p] = idx[k]
    L.kernel(L.out, idx, list(zip(idx, L.out.shape)), L.at(x, where))


register(OpDef("transpose", (1, 1), _transpose_shape, _transpose_lower,
               {"perm": Attr("perm", None, doc="out axis k is the input's axis perm[k] "
                             "(per-example axes; default: reversed)")},
               doc="permute the per-example axes (torch.permute without the batch axis)"))


def _embedding_shape(node, shapes, attrs):
    indices, table = shapes
    if len(table) != 2:
        raise SpecError(f"the table must be 2-D [rows, features] (torch's F.embedding weight), "
                        f"got {list(table)}", node=node, field="inputs")
    return tuple(indices) + (table[1],)


def _embedding_lower(L: Lowering) -> None:
    # out[idx..., d] = table[indices[idx...], d]: a read whose row is data, guarded like
    # padding (0 <= row < V), so the C never reads outside the table; its gradient is the
    # scatter dtable[indices[idx...], d] += δ under the same guard (graphc.derive).
    indices, table = L.inputs
    idx = L.indices(len(indices.shape))
    (d,) = L.indices(1)
    loops = list(zip(idx, indices.shape)) + [(d, table.shape[1])]
    L.kernel(L.out, idx + [d], loops, L.padded(table, [L.at(indices, idx), d], loops))


register(OpDef("embedding", (2, 2), _embedding_shape, _embedding_lower,
               input_names=("indices", "table"),
               doc="rows of table [V, D] at int32 indices: out[..., d] = table[indices[...], d] "
                   "(torch.nn.functional.embedding)",
               integer_inputs={0: IntegerInput("indices", lambda s: s[1][0], "rows")}))


# ---------------------------------------------------------------- convolution and pooling
#
# Per-example layout [C, *spatial] (torch's without the batch axis). A window's element is
# read at `o·stride + k·dilation − pad_before` along each spatial axis: one padded read
# (`Lowering.padded`), so padding, stride and dilation are index arithmetic, not cases.

def _per_axis(node: str, name: str, value, rank: int) -> tuple[int, ...]:
    if isinstance(value, tuple):
        if len(value) != rank:
            raise SpecError(f"needs one value per spatial axis ({rank}), got {list(value)}",
                            node=node, field=name)
        return value
    return (value,) * rank


@dataclass(frozen=True)
class Window:
    """Where each output position's window lies along the spatial axes."""
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    before: tuple[int, ...]          # padding before each axis
    after: tuple[int, ...]           # and after it (a stride may leave part of it unread)
    out: tuple[int, ...]

    def position(self, axis: int, out_index: sp.Expr, tap: sp.Expr) -> sp.Expr:
        return out_index * self.stride[axis] + tap * self.dilation[axis] - self.before[axis]


def _window(node: str, spatial: Shape, kernel: tuple[int, ...], attrs: dict) -> Window:
    rank = len(spatial)
    stride = _per_axis(node, "stride", attrs["stride"] if attrs.get("stride") is not None
                       else attrs.get("kernel_size", 1), rank)
    dilation = _per_axis(node, "dilation", attrs.get("dilation", 1), rank)
    padding = attrs.get("padding", 0)
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
    if padding == "valid":
        before = after = (0,) * rank
    elif padding == "same":
        if any(s != 1 for s in stride):
            raise SpecError("padding 'same' needs stride 1 (as in torch)", node=node,
                            field="padding")
        # torch: the total d·(k−1) split with the odd one after (an even kernel pads more
        # on the right and bottom).
        before = tuple((s - 1) // 2 for s in span)
        after = tuple(s - 1 - b for s, b in zip(span, before))
    else:   # per axis an int (both sides) or a (before, after) pair
        sides = [p if isinstance(p, tuple) else (p, p)
                 for p in _per_axis(node, "padding", padding, rank)]
        before, after = tuple(b for b, _ in sides), tuple(a for _, a in sides)
    out = []
    for axis in range(rank):
        room = spatial[axis] + before[axis] + after[axis] - span[axis]
        if room < 0:
            raise SpecError(f"the window ({span[axis]} wide with dilation) is larger than "
                            f"the padded input ({spatial[axis] + before[axis] + after[axis]}) "
                            f"along spatial axis {axis}", node=node, field="inputs")
        if not attrs.get("ceil_mode"):
            out.append(room // stride[axis] + 1)
            continue
        # ceil_mode (torch, ONNX): one more window where the last one would run past the
        # padded input, unless it would start past the input and the padding before it.
        count = -(-room // stride[axis]) + 1
        if (count - 1) * stride[axis] >= spatial[axis] + before[axis]:
            count -= 1
        out.append(count)
    return Window(tuple(kernel), stride, dilation, before, after, tuple(out))


def _conv_parts(node: str, shapes: list[Shape], attrs: dict, rank: int):
    x, W = shapes[0], shapes[1]
    groups = attrs["groups"]
    if len(x) != rank + 1:
        raise SpecError(f"input must be [channels, {', '.join(['length'] if rank == 1 else ['height', 'width'])}] "
                        f"per example, got {list(x)}", node=node, field="inputs")
    if len(W) != rank + 2:
        raise SpecError(f"weight must be [out_channels, in_channels/groups, {rank} kernel "
                        f"dims] (torch's layout), got {list(W)}", node=node, field="inputs")
    if x[0] % groups or W[0] % groups:
        raise SpecError(f"groups {groups} must divide the input channels ({x[0]}) and the "
                        f"output channels ({W[0]})", node=node, field="groups")
    if W[1] * groups != x[0]:
        raise SpecError(f"weight's in_channels/groups is {W[1]}, but the input has {x[0]} "
                        f"channels in {groups} group(s): expected {x[0] // groups}",
                        node=node, field="inputs")
    if len(shapes) == 3 and shapes[2] != (W[0],):
        raise SpecError(f"bias must have shape [{W[0]}], got {list(shapes[2])}",
                        node=node, field="inputs")
    if attrs["padding"] == "same" and any(s != 1 for s in _per_axis(node, "stride", attrs["stride"], rank)):
        raise SpecError("padding 'same' needs stride 1 (as in torch)", node=node, field="padding")
    return _window(node, x[1:], W[2:], attrs)


def _conv_shape(rank: int):
    def shape(node, shapes, attrs):
        return (shapes[1][0],) + _conv_parts(node, shapes, attrs, rank).out
    return shape


def _conv_lower(rank: int):
    def lower(L: Lowering) -> None:
        x, W = L.inputs[0], L.inputs[1]
        win = _conv_parts(L.node, [b.shape for b in L.inputs], L.attrs, rank)
        groups = L.attrs["groups"]
        per_group_in, per_group_out = W.shape[1], W.shape[0] // groups
        g, j, c = L.indices(3)
        spatial, taps = L.indices(rank), L.indices(rank)
        # Output channel o = g·(O/groups) + j reads input channels g·(C/groups) + c: both
        # affine, so groups (depthwise included) need no division in an index. A loop of
        # one is dropped (its index is 0).
        loops = [(g, groups), (j, per_group_out)] + list(zip(spatial, win.out)) + \
            [(c, per_group_in)] + list(zip(taps, win.kernel))
        zero = {s: sp.Integer(0) for s, e in loops if e == 1}
        loops = [(s, e) for s, e in loops if e != 1]
        o = (g * per_group_out + j).xreplace(zero)
        channel = (g * per_group_in + c).xreplace(zero)
        positions = [win.position(a, spatial[a], taps[a]) for a in range(rank)]
        read = L.padded(x, [channel] + [p.xreplace(zero) for p in positions], loops)
        body = read * L.at(W, [o, c.xreplace(zero)] + [t.xreplace(zero) for t in taps])
        post = ACC + (L.at(L.inputs[2], [o]) if len(L.inputs) == 3 else 0)
        # y[o, h, w] = Σ_{c,p,q} x[c, h·s + p·d − pad, w·s + q·d − pad]·W[o, c, p, q] + bias[o]
        L.kernel(L.out, [o] + [s.xreplace(zero) for s in spatial], loops, body, mode=SUM,
                 post=post)
    return lower


_conv_attrs = {
    "stride": Attr("ints", 1, low=1, doc="step between windows, per spatial axis"),
    "padding": Attr("padding", 0, choices=("same", "valid"),
                    doc="zeros added on both sides per spatial axis, or 'same' / 'valid'"),
    "dilation": Attr("ints", 1, low=1, doc="spacing between kernel taps"),
    "groups": Attr("int", 1, low=1, doc="channel groups (depthwise: as many as channels)"),
}
for _rank in (1, 2):
    register(OpDef(f"conv{_rank}d", (2, 3), _conv_shape(_rank), _conv_lower(_rank), _conv_attrs,
                   input_names=("x", "weight", "bias"),
                   doc=f"torch.nn.functional.conv{_rank}d: weight [out, in/groups, "
                       f"{'k' if _rank == 1 else 'kh, kw'}]"))


def _pool_parts(node: str, shapes: list[Shape], attrs: dict, rank: int) -> Window:
    (x,) = shapes
    if len(x) != rank + 1:
        raise SpecError(f"input must be [channels, {rank} spatial dims] per example, got "
                        f"{list(x)}", node=node, field="inputs")
    kernel = _per_axis(node, "kernel_size", attrs["kernel_size"], rank)
    win = _window(node, x[1:], kernel, attrs)
    # Every window must reach the input: a max over padding alone would be -inf and an
    # average over it 0/0 (torch refuses padding over half the kernel; ONNX allows more).
    for axis, size in enumerate(x[1:]):
        span = win.dilation[axis] * (kernel[axis] - 1) + 1
        if max(win.before[axis], win.after[axis]) >= span:
            raise SpecError(f"padding {[win.before[axis], win.after[axis]]} along spatial "
                            f"axis {axis} must be smaller than the window's extent {span} "
                            f"(kernel_size with dilation): a window would lie in the "
                            f"padding alone", node=node, field="padding")
        missed = _window_in_padding(win, axis, size)
        if missed is not None:
            raise SpecError(f"window {missed} along spatial axis {axis} reads only padding: "
                            f"its taps, {win.dilation[axis]} apart, step over the input "
                            f"({size} wide)", node=node, field="dilation")
    return win


def _window_in_padding(win: Window, axis: int, size: int) -> int | None:
    """The first window along `axis` none of whose taps lands inside the input, if any.
    A window starting inside the input has its first tap there (the last one starts
    there: padding after < extent, and ceil_mode's rule); one starting r before it has
    its first inside tap (-r mod dilation) in, which a dilation up to the input's size
    always reaches. Only the windows starting in the padding before need a look, and
    their start repeats modulo the dilation after dilation / gcd(stride, dilation)."""
    stride, dilation, before = win.stride[axis], win.dilation[axis], win.before[axis]
    if dilation <= size or not before:
        return None
    starting_before = min(win.out[axis], -(-before // stride))
    for o in range(min(starting_before, dilation // math.gcd(stride, dilation))):
        if (o * stride - before) % dilation >= size:
            return o
    return None


def _pool_shape(rank: int):
    def shape(node, shapes, attrs):
        return (shapes[0][0],) + _pool_parts(node, shapes, attrs, rank).out
    return shape


def _window_counts(win: Window, axis: int, low: int, high: int) -> list[int]:
    """Per window along `axis`, its taps t (0 <= t < kernel) at positions low <= p < high,
    p = start + t·dilation."""
    d, k = win.dilation[axis], win.kernel[axis]
    counts = []
    for o in range(win.out[axis]):
        start = o * win.stride[axis] - win.before[axis]
        first, last = max(0, -((start - low) // d)), min(k - 1, (high - 1 - start) // d)
        counts.append(max(0, last - first + 1))
    return counts


def _pool_lower(rank: int, kind: str):
    def lower(L: Lowering) -> None:
        (x,) = L.inputs
        win = _pool_parts(L.node, [x.shape], L.attrs, rank)
        (c,) = L.indices(1)
        spatial, taps = L.indices(rank), L.indices(rank)
        loops = [(c, x.shape[0])] + list(zip(spatial, win.out)) + list(zip(taps, win.kernel))
        where = [c] + [win.position(a, spatial[a], taps[a]) for a in range(rank)]
        out_idx = [c] + spatial
        if kind == "max":   # padding never wins: it is -inf, as in torch
            L.kernel(L.out, out_idx, loops, L.padded(x, where, loops, -sp.oo), mode=MAX)
            return
        # The divisor: the window's taps inside the input, or with count_include_pad inside
        # the input and its padding, never the part past it that ceil_mode adds (torch).
        include = L.attrs["count_include_pad"]
        sizes = x.shape[1:]
        per_axis = [_window_counts(win, a, -win.before[a] if include else 0,
                                   n + win.after[a] if include else n)
                    for a, n in enumerate(sizes)]
        if all(len(set(counts)) == 1 for counts in per_axis):
            count = math.prod(counts[0] for counts in per_axis)
        else:   # counted once per call, from the same index arithmetic as the reads
            counts = L.temp("count", win.out, differentiable=False, batched=False)
            shift = [win.before[a] if include else 0 for a in range(rank)]
            extent = [n + win.before[a] + win.after[a] if include else n
                      for a, n in enumerate(sizes)]
            inside = range_guard([p + s for p, s in zip(where[1:], shift)], extent, dict(loops))
            L.kernel(counts, spatial, list(zip(spatial, win.out)) + list(zip(taps, win.kernel)),
                     sp.Piecewise((1, inside), (0, True)), mode=SUM)
            count = L.at(counts, spatial)
        L.kernel(L.out, out_idx, loops, L.padded(x, where, loops, 0), mode=SUM,
                 post=ACC / count)
    return lower


def _pool_attrs(average: bool) -> dict[str, Attr]:
    attrs = {"kernel_size": Attr("ints", required=True, low=1, doc="window size per spatial axis"),
             "stride": Attr("ints", None, low=1, doc="step between windows (default: the window)"),
             "padding": Attr("sides", 0, doc="padding per spatial axis: an int for both sides "
                             "or a [before, after] pair"),
             "dilation": Attr("ints", 1, low=1, doc="spacing between a window's taps"),
             "ceil_mode": Attr("bool", False, doc="round the output size up: a last window "
                               "may run past the padded input (it is clipped)")}
    if average:
        attrs["count_include_pad"] = Attr("bool", True, doc="divide by the window's taps "
                                          "inside the input and its padding (true) or inside "
                                          "the input only")
    return attrs


for _rank in (1, 2):
    register(OpDef(f"max_pool{_rank}d", (1, 1), _pool_shape(_rank), _pool_lower(_rank, "max"),
                   _pool_attrs(False), doc=f"torch.nn.functional.max_pool{_rank}d"))
    register(OpDef(f"avg_pool{_rank}d", (1, 1), _pool_shape(_rank), _pool_lower(_rank, "avg"),
                   _pool_attrs(True), doc=f"torch.nn.functional.avg_pool{_rank}d"))


def _global_pool_shape(node, shapes, attrs):
    if len(shapes[0]) < 2:
        raise SpecError(f"input must be [channels, spatial dims...] per example, got "
                        f"{list(shapes[0])}", node=node, field="inputs")
    return shapes[0][:1]


def _global_pool_lower(L: Lowering) -> None:
    (x,) = L.inputs
    idx = L.indices(len(x.shape))
    L.kernel(L.out, idx[:1], list(zip(idx, x.shape)), L.at(x, idx), mode=SUM,
             post=ACC / math.prod(x.shape[1:]))


register(OpDef("global_avg_pool", (1, 1), _global_pool_shape, _global_pool_lower,
               doc="mean over all spatial axes: [C, ...] -> [C]"))


# ---------------------------------------------------------------- normalization

def _norm_axes(node: str, shape: Shape, attrs: dict) -> tuple[int, ...]:
    axes = sorted({_axis(node, "axes", a, len(shape)) for a in attrs["axes"]})
    if len(axes) != len(attrs["axes"]) or axes != list(range(len(shape) - len(axes), len(shape))):
        raise SpecError(f"must be the trailing per-example axes (torch's normalized_shape), "
                        f"got {list(attrs['axes'])} for a value of rank {len(shape)}",
                        node=node, field="axes")
    return tuple(axes)


def _layer_norm_shape(node, shapes, attrs):
    x = shapes[0]
    if not x:
        raise SpecError("cannot normalize a per-example scalar", node=node, field="inputs")
    axes = _norm_axes(node, x, attrs)
    normalized = x[axes[0]:]
    for k, s in enumerate(shapes[1:]):
        if s != normalized:
            raise SpecError(f"{('weight', 'bias')[k]} must have the normalized shape "
                            f"{list(normalized)}, got {list(s)}", node=node, field="inputs")
    return x


def _layer_norm_lower(L: Lowering) -> None:
    x = L.inputs[0]
    axes = _norm_axes(L.node, x.shape, L.attrs)
    idx = L.indices(len(x.shape))
    keep, inner = idx[:axes[0]], idx[axes[0]:]
    kept_shape, count = x.shape[:axes[0]], math.prod(x.shape[axes[0]:])
    loops = list(zip(idx, x.shape))
    # Two passes, as torch: the variance of x − mean, never E[x²] − mean² (cancellation).
    mean = L.temp("mean", kept_shape)
    L.kernel(mean, keep, loops, L.at(x, idx), mode=SUM, post=ACC / count)
    centered = L.at(x, idx) - L.at(mean, keep)
    var = L.temp("var", kept_shape)
    L.kernel(var, keep, loops, centered ** 2, mode=SUM, post=ACC / count)
    y = centered / sp.sqrt(L.at(var, keep) + number(L.attrs["eps"]))
    if len(L.inputs) > 1:
        y = y * L.at(L.inputs[1], inner)
    if len(L.inputs) > 2:
        y = y + L.at(L.inputs[2], inner)
    L.kernel(L.out, idx, loops, y)


register(OpDef("layer_norm", (1, 3), _layer_norm_shape, _layer_norm_lower,
               {"axes": Attr("axes", (-1,), doc="the trailing per-example axes normalized"),
                "eps": Attr("float", 1e-5, doc="added to the variance")},
               input_names=("x", "weight", "bias"),
               doc="torch.nn.functional.layer_norm over the trailing axes (biased variance)"))


def _batch_norm_shape(node, shapes, attrs):
    x = shapes[0]
    if not x:
        raise SpecError("input must be [channels, ...] per example (rank >= 1)", node=node,
                        field="inputs")
    for name, s in zip(("weight", "bias", "running_mean", "running_var"), shapes[1:]):
        if s != x[:1]:
            raise SpecError(f"{name} must have shape [{x[0]}] (one per channel), got "
                            f"{list(s)}", node=node, field="inputs")
    if not 0 <= attrs["momentum"] <= 1:
        raise SpecError(f"must lie in [0, 1], got {attrs['momentum']!r}", node=node,
                        field="momentum")
    if attrs["eps"] < 0:
        raise SpecError(f"must be >= 0, got {attrs['eps']!r}", node=node, field="eps")
    return x


def _batch_norm_lower(L: Lowering) -> None:
    x, weight, bias, running_mean, running_var = L.inputs
    idx = L.indices(len(x.shape))
    c, loops = idx[0], list(zip(idx, x.shape))
    eps = number(L.attrs["eps"])

    def affine(normalized):
        return normalized * L.at(weight, [c]) + L.at(bias, [c])

    if not L.training:
        # y[c, ...] = (x[c, ...] − running_mean[c]) / sqrt(running_var[c] + eps)·w[c] + b[c]
        L.kernel(L.out, idx, loops, affine((L.at(x, idx) - L.at(running_mean, [c]))
                                           / sp.sqrt(L.at(running_var, [c]) + eps)))
        return
    # Per channel over the batch and the spatial axes (N = n·S values), two passes as torch:
    # mean[c] = Σ_{b,s} x / N, var[c] = Σ_{b,s} (x − mean[c])² / N (biased, to normalize).
    # Unbatched temps reduced over the batch loop; their derivatives come from the sweep.
    # (An x computed from params alone has no batch axis: its N is S.)
    examples = BATCH if x.batched else 1
    count = examples * math.prod(x.shape[1:])
    over_batch = ([(L.batch, BATCH)] if x.batched else []) + loops
    channels = (x.shape[0],)
    mean = L.temp("mean", channels, batched=False)
    L.kernel(mean, [c], over_batch, L.at(x, idx), mode=SUM, post=ACC / count)
    centered = L.at(x, idx) - L.at(mean, [c])
    var = L.temp("var", channels, batched=False)
    L.kernel(var, [c], over_batch, centered ** 2, mode=SUM, post=ACC / count)
    L.kernel(L.out, idx, loops, affine(centered / sp.sqrt(L.at(var, [c]) + eps)))
    # What the train step keeps, as torch: the mean, and the unbiased variance var·N/(N − 1)
    # (written var/(1 − 1/N), so that n appears only as 1/n). N = 1 (one value per channel,
    # which torch refuses in training) leaves the running variance as it is.
    momentum, per_channel = L.attrs["momentum"], [(c, x.shape[0])]
    L.statistic(running_mean, [c], per_channel, L.at(mean, [c]), momentum)
    unbiased = L.at(var, [c]) / (1 - 1 / count)
    if count == 1:
        unbiased = L.at(running_var, [c])
    elif count == BATCH:
        unbiased = sp.Piecewise((unbiased, BATCH > 1), (L.at(running_var, [c]), True))
    L.statistic(running_var, [c], per_channel, unbiased, momentum)


register(OpDef("batch_norm", (5, 5), _batch_norm_shape, _batch_norm_lower,
               {"eps": Attr("float", 1e-5, doc="added to the variance"),
                "momentum": Attr("float", 0.1, doc="weight of the batch's statistics in the "
                                 "running ones (torch's meaning), in [0, 1]")},
               input_names=("x", "weight", "bias", "running_mean", "running_var"),
               domain=(None, None, None, None, "positive"),
               doc="torch's batch norm per channel (axis 0) over the batch and the spatial "
                   "axes: batch statistics in training, running ones otherwise",
               param_inputs={1: "param", 2: "param", 3: "statistic", 4: "statistic"},
               param_init={1: "ones", 4: "ones"}, modes=True))


# ---------------------------------------------------------------- dropout

def _dropout_shape(node, shapes, attrs):
    if not 0 <= attrs["p"] < 1:
        raise SpecError(f"must lie in [0, 1), got {attrs['p']!r}", node=node, field="p")
    return shapes[0]


def _dropout_lower(L: Lowering) -> None:
    # Inverted dropout, as torch: in training y = x·keep/(1 − p), keep drawn per element
    # and train step by graphc/dropout.py's generator (the backward draws it again, so
    # nothing is stored); otherwise y = x.
    (x,) = L.inputs
    p = L.attrs["p"]
    if not L.training or p == 0:
        L.map(L.out, lambda idx: L.at(x, idx))
        return
    idx = L.indices(len(x.shape))
    element = _ravel(x.shape, idx)
    if x.batched:
        element += L.batch * math.prod(x.shape)
    keep = dropout_keep(node_key(L.node, L.attrs["seed"]), STEP, element, keep_threshold(p))
    L.kernel(L.out, idx, list(zip(idx, x.shape)), L.at(x, idx) * keep / number(1 - p))


register(OpDef("dropout", (1, 1), _dropout_shape, _dropout_lower,
               {"p": Attr("float", 0.5, doc="the probability of zeroing an element, in [0, 1)"),
                "seed": Attr("int", 0, doc="with the node's name, which masks it draws")},
               input_names=("x",),
               doc="torch's inverted dropout in training (the gradients and the train "
                   "step), the identity otherwise", modes=True))


# ---------------------------------------------------------------- losses (per example)

def _mse_lower(L: Lowering) -> None:
    p, t = L.inputs
    idx = L.indices(len(p.shape))
    L.kernel(L.out, [], list(zip(idx, p.shape)), (L.at(p, idx) - L.at(t, idx)) ** 2,
             mode=SUM, post=ACC / max(1, math.prod(p.shape)))


def _class_indices(shapes) -> bool:
    """Whether a cross-entropy target holds class indices: the logits' shape without the
    class axis (torch.nn.functional.cross_entropy's integer target)."""
    return bool(shapes[0]) and tuple(shapes[1]) == tuple(shapes[0][:-1])


def _sce_shape(node, shapes, attrs):
    logits = shapes[0]
    if not logits:
        raise SpecError("logits must have a class axis (rank >= 1)", node=node, field="inputs")
    if not _class_indices(shapes) and tuple(shapes[1]) != tuple(logits):
        raise SpecError(f"the target must have the logits' per-example shape {list(logits)} "
                        f"(one-hot or probabilities) or, as int32 class indices, "
                        f"{list(logits[:-1])}; got {list(shapes[1])}", node=node, field="inputs")
    return logits[:-1]


def _sce_lower(L: Lowering) -> None:
    x, t = L.inputs
    axis = len(x.shape) - 1
    idx = L.indices(len(x.shape))
    m, s, keep = _shift_and_normalizer(L, x, axis, idx)
    if t.dtype == INT32:
        # Class indices: -log softmax(x)[t] = -(x[t] - m - log Σ_j exp(x_j - m)). The read
        # x[..., t] is guarded (0 <= t < K): an index outside the classes reads 0, never
        # memory outside x (Python refuses such targets before the C runs).
        loops = list(zip(keep, L.out.shape))
        picked = L.padded(x, keep + [L.at(t, keep)], loops)
        L.kernel(L.out, keep, loops, -(picked - L.at(m, keep) - sp.log(L.at(s, keep))))
        return
    # -Σ_k t_k·log softmax(x)_k = -Σ_k t_k·(x_k - m - log Σ_j exp(x_j - m))
    L.kernel(L.out, keep, list(zip(keep, L.out.shape)) + [(idx[axis], x.shape[axis])],
             -L.at(t, idx) * (L.at(x, idx) - L.at(m, keep) - sp.log(L.at(s, keep))), mode=SUM)


def _bce_lower(L: Lowering) -> None:
    x, t = L.inputs
    idx = L.indices(len(x.shape))
    xi, ti = L.at(x, idx), L.at(t, idx)
    # max(x, 0) - x·t + log(1 + exp(-|x|)), split so that exp never overflows.
    body = sp.Piecewise((xi - xi * ti + sp.log(1 + sp.exp(-xi)), xi >= 0),
                        (-xi * ti + sp.log(1 + sp.exp(xi)), True))
    L.kernel(L.out, [], list(zip(idx, x.shape)), body, mode=SUM,
             post=ACC / max(1, math.prod(x.shape)))


def _scalar_loss_shape(node, shapes, attrs):
    _same_shape(node, shapes)
    return ()


register(OpDef("mse", (2, 2), _scalar_loss_shape, _mse_lower, input_names=("prediction", "target"),
               doc="mean over the example's elements of (prediction - target)²", is_loss=True))
register(OpDef("softmax_cross_entropy", (2, 2), _sce_shape, _sce_lower,
               input_names=("logits", "target"), domain=(None, "probabilities"),
               doc="-Σ target·log softmax(logits) over the last axis (one-hot or probabilities; "
                   "or int32 class indices, the logits' shape without the class axis)",
               is_loss=True,
               integer_inputs={1: IntegerInput(
                   "class-index target", lambda s: s[0][-1], "classes", _class_indices,
                   lambda s: f"per-example shape {list(s[0][:-1])} (the logits' without the "
                             f"class axis)")}))
register(OpDef("bce_with_logits", (2, 2), _scalar_loss_shape, _bce_lower,
               input_names=("logits", "target"), domain=(None, "unit"),
               doc="mean over elements of the logits-based binary cross-entropy", is_loss=True))
