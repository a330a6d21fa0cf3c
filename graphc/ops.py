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

from .errors import SpecError
from .formula import number
from .functions import leaky_relu, relu, sigmoid
from .ir import ACC, ASSIGN, BATCH, MAX, SUM, Buffer, Kernel, index_symbols

Shape = tuple[int, ...]


# ---------------------------------------------------------------- lowering context

class Lowering:
    """What an op's `lower` sees: its input and output buffers and a kernel sink."""

    def __init__(self, node: str, inputs: list[Buffer], out: Buffer, attrs: dict,
                 new_buffer: Callable[[Buffer], Buffer], kernels: list[Kernel]):
        self.node, self.inputs, self.out, self.attrs = node, inputs, out, attrs
        self._new_buffer, self._kernels = new_buffer, kernels
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

    def temp(self, suffix: str, shape: Shape, *, differentiable: bool = True) -> Buffer:
        return self._new_buffer(Buffer(f"{self.node}.{suffix}", tuple(shape), self.out.batched,
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

    def map(self, out: Buffer, element: Callable[[list[sp.Symbol]], sp.Expr]) -> None:
        """out[idx] = element(idx) over out's whole shape."""
        idx = self.indices(len(out.shape))
        self.kernel(out, idx, list(zip(idx, out.shape)), element(idx))


# ---------------------------------------------------------------- attributes

@dataclass(frozen=True)
class Attr:
    kind: str          # float | axis | axes | shape | expr
    default: Any = None
    required: bool = False
    doc: str = ""


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
           domain: tuple = (), attrs: dict | None = None) -> OpDef:
    return register(OpDef(
        name, (arity, arity), lambda node, shapes, attrs: broadcast_shapes(node, shapes),
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


# ---------------------------------------------------------------- losses (per example)

def _mse_lower(L: Lowering) -> None:
    p, t = L.inputs
    idx = L.indices(len(p.shape))
    L.kernel(L.out, [], list(zip(idx, p.shape)), (L.at(p, idx) - L.at(t, idx)) ** 2,
             mode=SUM, post=ACC / max(1, math.prod(p.shape)))


def _sce_shape(node, shapes, attrs):
    logits = _same_shape(node, shapes)
    if not logits:
        raise SpecError("logits must have a class axis (rank >= 1)", node=node, field="inputs")
    return logits[:-1]


def _sce_lower(L: Lowering) -> None:
    # -Σ_k t_k·log softmax(x)_k = -Σ_k t_k·(x_k - m - log Σ_j exp(x_j - m))
    x, t = L.inputs
    axis = len(x.shape) - 1
    idx = L.indices(len(x.shape))
    m, s, keep = _shift_and_normalizer(L, x, axis, idx)
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
               doc="-Σ target·log softmax(logits) over the last axis (one-hot or probabilities)",
               is_loss=True))
register(OpDef("bce_with_logits", (2, 2), _scalar_loss_shape, _bce_lower,
               input_names=("logits", "target"), domain=(None, "unit"),
               doc="mean over elements of the logits-based binary cross-entropy", is_loss=True))
