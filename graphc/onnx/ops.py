"""Each ONNX op type graphc imports: a function of (importer, node, attributes) that binds
the node's outputs to graphc values (new nodes) or, when every input is a constant, to the
folded constant. The semantics are ONNX's operator documents (opset 13 to current)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

BATCH_MARK = -(1 << 62)     # the batch size inside folded shape arithmetic


def decimal(value: float) -> float:
    """The shortest decimal that a float32 attribute holds (1e-05 for epsilon's
    9.99999974738e-06): what the exporter was given, and what graphc computes with."""
    return float(str(np.float32(value)))
IMPORTERS: dict[str, Callable] = {}


@dataclass(frozen=True)
class Batched:
    """A graphc value: its name and per-example shape."""
    name: str
    shape: tuple[int, ...]


def rule(*op_types: str):
    def register(fn):
        for t in op_types:
            IMPORTERS[t] = fn
        return fn
    return register


def _per_example_axis(imp, axis: int, rank: int, field: str = "axis") -> int:
    """ONNX's axis on a batched tensor of per-example rank `rank` as graphc's axis."""
    full = axis + rank + 1 if axis < 0 else axis
    if not 0 <= full <= rank:
        raise imp.error(f"axis {axis} is out of range for rank {rank + 1}", field=field)
    if full == 0:
        raise imp.error("an op along the batch axis (axis 0) has no per-example form",
                        field=field)
    return full - 1


def _inputs(node) -> list[str]:
    return list(node.input)


def _bind(imp, node, value) -> None:
    imp.env[node.output[0]] = value


def _constant_inputs(imp, node) -> list | None:
    values = [imp.get(i) if i else None for i in node.input]
    return None if any(isinstance(v, Batched) for v in values) else values


# ---------------------------------------------------------------- pass-through and constants

@rule("Identity", "Dropout")
def _identity(imp, node, attrs):
    # Dropout at inference is the identity (its mask output, if used, is not supported).
    if len(node.output) > 1 and node.output[1]:
        raise imp.error("Dropout's mask output is not supported", field="output")
    imp.env[node.output[0]] = imp.get(node.input[0])


@rule("Constant")
def _constant(imp, node, attrs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            _bind(imp, node, np.array(attrs[key]))
            return
    raise imp.error("Constant without a value graphc reads (value, value_float(s), "
                    "value_int(s))", field="value")


@rule("Cast")
def _cast(imp, node, attrs):
    to = attrs.get("to")
    v = imp.get(node.input[0])
    if isinstance(v, Batched):
        if to not in (1, 11, 10):
            raise imp.error("Cast of a value to a non-floating type is not supported",
                            field="to")
        _bind(imp, node, v)   # float to float: graphc computes in the model's dtype
        return
    kinds = {1: np.float32, 11: np.float64, 7: np.int64, 6: np.int32, 9: np.bool_}
    if to not in kinds:
        raise imp.error(f"Cast to type {to} is not supported", field="to")
    _bind(imp, node, v.astype(kinds[to]))


@rule("Shape")
def _shape(imp, node, attrs):
    v = imp.get(node.input[0])
    full = np.array([BATCH_MARK, *v.shape], np.int64) if isinstance(v, Batched) \
        else np.array(v.shape, np.int64)
    start, end = attrs.get("start", 0), attrs.get("end", len(full))
    _bind(imp, node, full[start:end])


# ---------------------------------------------------------------- folding shape arithmetic

@rule("Gather")
def _gather(imp, node, attrs):
    data, indices = imp.get(node.input[0]), imp.get(node.input[1])
    axis = attrs.get("axis", 0)
    if isinstance(data, np.ndarray) and isinstance(indices, np.ndarray):
        _bind(imp, node, np.take(data, indices.astype(np.int64), axis=axis))
        return
    if isinstance(data, np.ndarray) and isinstance(indices, Batched) and axis == 0 \
            and data.ndim == 2:
        table = imp.param(node.input[0])   # an embedding: rows of a weight table
        _bind(imp, node, imp.add("embedding", [indices.name, table], node.output[0]))
        return
    raise imp.error("Gather is supported for constants and as an embedding lookup "
                    "(a 2-D weight table, integer indices, axis 0)", field="input")


def _fold(fn):
    def fold(imp, node, attrs):
        values = _constant_inputs(imp, node)
        if values is None:
            return False
        _bind(imp, node, fn(attrs, *values))
        return True
    return fold


def _folded_only(name: str, fn):
    fold = _fold(fn)

    def apply(imp, node, attrs):
        if not fold(imp, node, attrs):
            raise imp.error(f"{name} is supported on constants only (shape arithmetic)",
                            field="input")
    return apply


def _unsqueeze_const(attrs, x, axes=None):
    axes = attrs.get("axes", axes)
    out = x
    for a in sorted(int(a) % (x.ndim + len(axes)) for a in np.ravel(axes)):
        out = np.expand_dims(out, a)
    return out


def _squeeze_const(attrs, x, axes=None):
    axes = attrs.get("axes", axes)
    return np.squeeze(x) if axes is None else np.squeeze(x, tuple(int(a) for a in np.ravel(axes)))


def _slice_const(attrs, x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


@rule("Unsqueeze", "Squeeze")
def _squeeze_or_unsqueeze(imp, node, attrs):
    const = _unsqueeze_const if node.op_type == "Unsqueeze" else _squeeze_const
    if _fold(const)(imp, node, attrs):
        return
    x = imp.batched(node.input[0])
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in np.ravel(imp.constant(node.input[1], "axes"))]
    rank = len(x.shape)
    if node.op_type == "Unsqueeze":
        out_rank = rank + 1 + len(axes)
        ones = {int(a) % out_rank for a in axes}
        if 0 in ones:
            raise imp.error("Unsqueeze before the batch axis is not supported", field="axes")
        rest = iter(x.shape)
        shape = [1 if k in ones else next(rest) for k in range(1, out_rank)]
    else:
        if axes is None:
            per = [k for k, d in enumerate(x.shape) if d == 1]
        else:
            per = [_per_example_axis(imp, a, rank, "axes") for a in axes]
        if any(x.shape[a] != 1 for a in per):
            raise imp.error("Squeeze of an axis whose size is not 1", field="axes")
        shape = [d for k, d in enumerate(x.shape) if k not in per]
    _bind(imp, node, imp.add("reshape", [x.name], node.output[0], shape=shape))


@rule("Slice")
def _slice(imp, node, attrs):
    if _fold(_slice_const)(imp, node, attrs):
        return
    x = imp.batched(node.input[0])
    consts = [imp.constant(i, "Slice's starts, ends, axes and steps") if i else None
              for i in node.input[1:]]
    starts, ends = consts[0], consts[1]
    axes = consts[2] if len(consts) > 2 and consts[2] is not None else range(len(starts))
    steps = consts[3] if len(consts) > 3 and consts[3] is not None else [1] * len(starts)
    out = x
    for s, e, a, st in zip(starts, ends, axes, steps):
        axis = _per_example_axis(imp, int(a), len(out.shape), "axes")
        size = out.shape[axis]
        s, e, st = int(s), int(e), int(st)
        if st < 1:
            raise imp.error("Slice with a step below 1 is not supported", field="steps")
        start, stop, _ = slice(s, e, st).indices(size)
        out = imp.add("slice", [out.name], node.output[0], axis=axis, start=start,
                      stop=max(start, stop), step=st)
    _bind(imp, node, out)


@rule("Concat")
def _concat(imp, node, attrs):
    if _fold(lambda a, *xs: np.concatenate([np.atleast_1d(x) for x in xs], axis=a["axis"]))(
            imp, node, attrs):
        return
    xs = [imp.batched(i) for i in node.input]
    axis = _per_example_axis(imp, attrs["axis"], len(xs[0].shape))
    _bind(imp, node, imp.add("concat", [x.name for x in xs], node.output[0], axis=axis))


# ---------------------------------------------------------------- arithmetic

_BINARY = {"Add": ("add", "+", np.add), "Sub": ("sub", "-", np.subtract),
           "Mul": ("mul", "*", np.multiply), "Div": ("div", "/", np.divide),
           "Pow": (None, "**", np.power)}


def _number(value: np.ndarray) -> str | None:
    """A constant of one element as a formula's literal (repr: round-trips)."""
    if value.size != 1 or not np.isfinite(value).all():
        return None
    return repr(float(np.ravel(value)[0]))


@rule(*_BINARY)
def _binary(imp, node, attrs):
    op, symbol, fn = _BINARY[node.op_type]
    a, b = imp.get(node.input[0]), imp.get(node.input[1])
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if node.op_type == "Div" and np.issubdtype(a.dtype, np.integer):
            _bind(imp, node, a // b)
        else:
            _bind(imp, node, fn(a, b))
        return
    for x, c, x_first in ((a, b, True), (b, a, False)):
        if isinstance(x, Batched) and isinstance(c, np.ndarray):
            literal = _number(c)
            if literal is not None:   # x op 2.0: a formula
                expr = f"{x.name} {symbol} ({literal})" if x_first else \
                    f"({literal}) {symbol} {x.name}"
                _bind(imp, node, imp.add("elementwise", [x.name], node.output[0], expr=expr))
                return
            # A tensor constant (a bias, an exponent): a param, broadcast per example as
            # ONNX does when it has no batch axis of its own.
            c = _per_example_constant(imp, c, len(x.shape))
            p = imp.param(node.input[1 if x_first else 0], c)
            ins = [x.name, p] if x_first else [p, x.name]
            if op is None:
                _bind(imp, node, imp.add("elementwise", ins, node.output[0],
                                         expr=f"{ins[0]} ** {ins[1]}"))
            else:
                _bind(imp, node, imp.add(op, ins, node.output[0]))
            return
    if op is None:
        _bind(imp, node, imp.add("elementwise", [a.name, b.name], node.output[0],
                                 expr=f"{a.name} ** {b.name}"))
        return
    _bind(imp, node, imp.add(op, [a.name, b.name], node.output[0]))


def _per_example_constant(imp, c: np.ndarray, rank: int) -> np.ndarray:
    """A constant broadcast against a batched value of per-example rank `rank`: its leading
    axis, if it has as many axes as the batched tensor, must be 1 (it has no batch)."""
    if c.ndim == rank + 1:
        if c.shape[0] != 1:
            raise imp.error("a constant with a batch axis of its own is not supported",
                            field="input")
        c = c[0]
    return np.asarray(c, np.float64)


_UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log",
    "Softplus": "softplus", "HardSwish": "hard_swish", "Mish": "mish",
}
_FORMULAS = {   # x is the input's name
    "Abs": "abs({x})", "Neg": "-{x}", "Sqrt": "sqrt({x})", "Reciprocal": "1/{x}",
    "Erf": "erf({x})", "Sin": "sin({x})", "Cos": "cos({x})", "Tan": "tan({x})",
    "Asin": "asin({x})", "Acos": "acos({x})", "Atan": "atan({x})", "Sinh": "sinh({x})",
    "Cosh": "cosh({x})", "Softsign": "{x}/(1 + abs({x}))",
    "Asinh": "log({x} + sqrt({x}**2 + 1))", "Acosh": "log({x} + sqrt({x}**2 - 1))",
    "Atanh": "log((1 + {x})/(1 - {x}))/2",
}


@rule(*_UNARY)
def _unary(imp, node, attrs):
    x = imp.batched(node.input[0])
    _bind(imp, node, imp.add(_UNARY[node.op_type], [x.name], node.output[0]))


@rule(*_FORMULAS)
def _formula(imp, node, attrs):
    x = imp.batched(node.input[0])
    _bind(imp, node, imp.add("elementwise", [x.name], node.output[0],
                             expr=_FORMULAS[node.op_type].format(x=x.name)))


@rule("LeakyRelu")
def _leaky(imp, node, attrs):
    x = imp.batched(node.input[0])
    _bind(imp, node, imp.add("leaky_relu", [x.name], node.output[0],
                             alpha=float(attrs.get("alpha", 0.01))))


SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875   # ONNX's


@rule("Selu")
def _selu(imp, node, attrs):
    x = imp.batched(node.input[0])
    alpha, gamma = float(attrs.get("alpha", SELU_ALPHA)), float(attrs.get("gamma", SELU_GAMMA))
    if np.isclose(alpha, SELU_ALPHA, rtol=1e-7) and np.isclose(gamma, SELU_GAMMA, rtol=1e-7):
        _bind(imp, node, imp.add("selu", [x.name], node.output[0]))
        return
    expr = f"{gamma!r}*(max({x.name}, 0) + min(0, {alpha!r}*(exp({x.name}) - 1)))"
    _bind(imp, node, imp.add("elementwise", [x.name], node.output[0], expr=expr))


@rule("Elu", "Celu")
def _elu(imp, node, attrs):
    x = imp.batched(node.input[0])
    alpha = float(attrs.get("alpha", 1.0))
    if node.op_type == "Elu":
        _bind(imp, node, imp.add("elu", [x.name], node.output[0], alpha=alpha))
        return
    expr = f"max({x.name}, 0) + min(0, {alpha!r}*(exp({x.name}/{alpha!r}) - 1))"
    _bind(imp, node, imp.add("elementwise", [x.name], node.output[0], expr=expr))


@rule("HardSigmoid")
def _hard_sigmoid(imp, node, attrs):
    x = imp.batched(node.input[0])
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    expr = f"max(0, min(1, {alpha!r}*{x.name} + {beta!r}))"
    _bind(imp, node, imp.add("elementwise", [x.name], node.output[0], expr=expr))


@rule("Gelu")
def _gelu(imp, node, attrs):
    x = imp.batched(node.input[0])
    _bind(imp, node, imp.add("gelu", [x.name], node.output[0],
                             approximate=attrs.get("approximate", "none")))


@rule("Clip")
def _clip(imp, node, attrs):
    x = imp.batched(node.input[0])
    bounds = [imp.constant(i, "Clip's bounds") if i else None for i in node.input[1:3]]
    expr = x.name
    if len(bounds) > 0 and bounds[0] is not None:
        expr = f"max({expr}, {_number(bounds[0])})"
    if len(bounds) > 1 and bounds[1] is not None:
        expr = f"min({expr}, {_number(bounds[1])})"
    _bind(imp, node, imp.add("elementwise", [x.name], node.output[0], expr=expr))


@rule("Softmax", "LogSoftmax")
def _softmax(imp, node, attrs):
    x = imp.batched(node.input[0])
    axis = _per_example_axis(imp, attrs.get("axis", -1), len(x.shape))
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    _bind(imp, node, imp.add(op, [x.name], node.output[0], axis=axis))


def _operands(imp, node) -> tuple[list[str], list[str]]:
    """The formula's terms for each input of a variadic node (a value's name, a number's
    literal, a constant tensor's param) and the graphc inputs they read."""
    values = [imp.get(i) for i in node.input]
    rank = max((len(v.shape) for v in values if isinstance(v, Batched)), default=None)
    if rank is None:
        raise imp.error("every input is a constant: nothing per example", field="input")
    terms, reads = [], []
    for onnx_name, v in zip(node.input, values):
        if isinstance(v, Batched):
            terms.append(v.name)
            reads.append(v.name)
        elif _number(v) is not None:
            terms.append(f"({_number(v)})")
        else:
            p = imp.param(onnx_name, _per_example_constant(imp, v, rank))
            terms.append(p)
            reads.append(p)
    return terms, list(dict.fromkeys(reads))


@rule("Max", "Min", "Sum", "Mean")
def _variadic(imp, node, attrs):
    terms, reads = _operands(imp, node)
    if node.op_type in ("Max", "Min"):
        expr = terms[0]
        for t in terms[1:]:
            expr = f"{node.op_type.lower()}({expr}, {t})"
    else:
        expr = " + ".join(terms)
        if node.op_type == "Mean":
            expr = f"({expr})/{len(terms)}"
    _bind(imp, node, imp.add("elementwise", reads, node.output[0], expr=expr))


@rule("PRelu")
def _prelu(imp, node, attrs):
    x = imp.batched(node.input[0])
    slope = imp.constant(node.input[1], "PRelu's slope")
    literal = _number(slope)
    if literal is not None:
        expr = f"max({x.name}, 0) + ({literal})*min({x.name}, 0)"
        _bind(imp, node, imp.add("elementwise", [x.name], node.output[0], expr=expr))
        return
    s = imp.param(node.input[1], _per_example_constant(imp, slope, len(x.shape)))
    _bind(imp, node, imp.add("elementwise", [x.name, s], node.output[0],
                             expr=f"max({x.name}, 0) + {s}*min({x.name}, 0)"))


# ---------------------------------------------------------------- linear layers

@rule("Gemm")
def _gemm(imp, node, attrs):
    x = imp.batched(node.input[0])
    if attrs.get("transA", 0):
        raise imp.error("Gemm with transA = 1 would move the batch axis", field="transA")
    b = imp.constant(node.input[1], "Gemm's B")
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    weight = b if attrs.get("transB", 0) else b.T    # dense's W is [out, in]
    ins = [x.name, imp.param(node.input[1], alpha * weight if alpha != 1 or not
                             attrs.get("transB", 0) else None)]
    if len(node.input) > 2 and node.input[2]:
        raw = imp.constant(node.input[2], "Gemm's C")
        c = np.asarray(raw, np.float64)
        if c.ndim == 2 and c.shape[0] == 1:
            c = c[0]
        if c.size == 1:   # a scalar bias broadcast over the outputs
            c = np.full(weight.shape[0], float(c.ravel()[0]))
        if c.ndim != 1 or c.shape[0] != weight.shape[0]:
            raise imp.error(f"Gemm's C of shape {list(c.shape)} is not a bias of "
                            f"{weight.shape[0]} elements", field="input")
        same = beta == 1 and c.shape == raw.shape
        ins.append(imp.param(node.input[2], None if same else beta * c))
    _bind(imp, node, imp.add("dense", ins, node.output[0]))


@rule("MatMul")
def _matmul(imp, node, attrs):
    a, b = imp.get(node.input[0]), imp.get(node.input[1])
    if isinstance(a, Batched) and isinstance(b, np.ndarray) and b.ndim == 2 \
            and len(a.shape) == 1:
        _bind(imp, node, imp.add("dense", [a.name, imp.param(node.input[1], b.T)],
                                 node.output[0]))
        return
    if isinstance(a, Batched) and isinstance(b, np.ndarray):
        value = None
        if b.ndim == len(a.shape) + 1:   # its first axis broadcasts against the batch
            value = _per_example_constant(imp, b, len(a.shape))
        _bind(imp, node, imp.add("matmul", [a.name, imp.param(node.input[1], value)],
                                 node.output[0]))
        return
    if isinstance(a, Batched) and isinstance(b, Batched):
        _bind(imp, node, imp.add("matmul", [a.name, b.name], node.output[0]))
        return
    raise imp.error("MatMul of a constant by a value is not supported", field="input")


# ---------------------------------------------------------------- convolution and pooling

def _spatial(imp, node, attrs, x: Batched, kernel: list[int]) -> dict:
    """stride, dilation and the padding before ("begin") and after ("end") each spatial
    axis, from ONNX's strides, dilations, pads and auto_pad."""
    dims = len(kernel)
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(x.shape[1:], kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            pads_begin.append(small if auto == "SAME_UPPER" else large)
            pads_end.append(large if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pads_begin = pads_end = [0] * dims
    elif auto == "NOTSET":
        pads = list(attrs.get("pads", [0] * 2 * dims))
        pads_begin, pads_end = pads[:dims], pads[dims:]
    else:
        raise imp.error(f"auto_pad {auto!r} is not an ONNX value", field="auto_pad")
    return {"stride": strides, "dilation": dilations, "begin": pads_begin, "end": pads_end}


def _padded(imp, node, x: Batched, geometry: dict) -> tuple[Batched, list[int]]:
    """x and the symmetric padding left for a convolution: an asymmetric part becomes a pad
    node first (torch.nn.functional.pad's order: last axis first)."""
    begin, end = geometry["begin"], geometry["end"]
    if begin == end:
        return x, begin
    pad = []
    for b, e in reversed(list(zip(begin, end))):
        pad += [b, e]
    return imp.add("pad", [x.name], node.output[0] + "_pad", pad=pad, value=0.0), \
        [0] * len(begin)


@rule("Conv")
def _conv(imp, node, attrs):
    x = imp.batched(node.input[0])
    w = imp.constant(node.input[1], "Conv's weight")
    dims = w.ndim - 2
    if dims not in (1, 2) or len(x.shape) != dims + 1:
        raise imp.error(f"Conv over {dims} spatial axes is not supported (1-D and 2-D are)",
                        field="kernel_shape")
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    geometry = _spatial(imp, node, attrs, x, kernel)
    x, padding = _padded(imp, node, x, geometry)
    ins = [x.name, imp.param(node.input[1])]
    if len(node.input) > 2 and node.input[2]:
        ins.append(imp.param(node.input[2]))
    _bind(imp, node, imp.add(f"conv{dims}d", ins, node.output[0], stride=geometry["stride"],
                             padding=padding, dilation=geometry["dilation"],
                             groups=int(attrs.get("group", 1))))


@rule("MaxPool", "AveragePool")
def _pool(imp, node, attrs):
    if len(node.output) > 1 and node.output[1]:
        raise imp.error("MaxPool's indices output is not supported", field="output")
    x = imp.batched(node.input[0])
    kernel = list(attrs["kernel_shape"])
    dims = len(kernel)
    if dims not in (1, 2) or len(x.shape) != dims + 1:
        raise imp.error(f"pooling over {dims} spatial axes is not supported", field="kernel_shape")
    geometry = _spatial(imp, node, attrs, x, kernel)
    # graphc's padding per axis: an int when both sides agree, else [before, after]
    padding = [b if b == e else [b, e] for b, e in zip(geometry["begin"], geometry["end"])]
    maximum = node.op_type == "MaxPool"
    extra = {} if maximum else {"count_include_pad": bool(attrs.get("count_include_pad", 0))}
    if attrs.get("ceil_mode", 0):
        extra["ceil_mode"] = True
    if any(d != 1 for d in geometry["dilation"]):
        extra["dilation"] = geometry["dilation"]
    op = f"{'max' if maximum else 'avg'}_pool{dims}d"
    _bind(imp, node, imp.add(op, [x.name], node.output[0], kernel_size=kernel,
                             stride=geometry["stride"], padding=padding, **extra))


@rule("GlobalAveragePool")
def _global_avg_pool(imp, node, attrs):
    x = imp.batched(node.input[0])
    pooled = imp.add("global_avg_pool", [x.name], node.output[0] + "_pooled")
    # ONNX keeps the spatial axes as ones: [C, 1, 1]
    _bind(imp, node, imp.add("reshape", [pooled.name], node.output[0],
                             shape=[x.shape[0]] + [1] * (len(x.shape) - 1)))


# ---------------------------------------------------------------- normalization

@rule("BatchNormalization")
def _batch_norm(imp, node, attrs):
    if attrs.get("training_mode", 0) or any(o for o in node.output[1:]):
        raise imp.error("BatchNormalization in training mode is not supported (export the "
                        "model in eval mode)", field="training_mode")
    x = imp.batched(node.input[0])
    weight, bias = imp.param(node.input[1]), imp.param(node.input[2])
    mean = imp.param(node.input[3], trainable=False)
    var = imp.param(node.input[4], trainable=False)
    # ONNX's momentum weighs the running value (0.9); torch's and graphc's weigh the batch.
    momentum = decimal(1.0 - float(attrs.get("momentum", 0.9)))
    _bind(imp, node, imp.add("batch_norm", [x.name, weight, bias, mean, var], node.output[0],
                             eps=float(attrs.get("epsilon", 1e-5)), momentum=momentum))


@rule("LayerNormalization")
def _layer_norm(imp, node, attrs):
    x = imp.batched(node.input[0])
    rank = len(x.shape)
    first = _per_example_axis(imp, attrs.get("axis", -1), rank)
    eps = float(attrs.get("epsilon", 1e-5))
    ins = [x.name] + [imp.param(i) for i in node.input[1:3] if i]
    _bind(imp, node, imp.add("layer_norm", ins, node.output[0],
                             axes=list(range(first - rank, 0)), eps=eps))
    outputs = list(node.output) + ["", ""]
    if not (outputs[1] or outputs[2]):
        return
    # The optional outputs: the mean and 1/sqrt(variance + epsilon) over the normalized
    # axes, kept as ones (ONNX's shapes).
    axes = list(range(first, rank))
    kept = [1 if k in axes else d for k, d in enumerate(x.shape)]
    base = outputs[1] or outputs[2]
    mean = imp.add("reshape", [imp.add("mean", [x.name], base + "_mean", axis=axes).name],
                   outputs[1] or base + "_mean_kept", shape=kept)
    if outputs[1]:
        imp.env[outputs[1]] = mean
    if outputs[2]:
        squared = imp.add("elementwise", [x.name, mean.name], base + "_squared",
                          expr=f"({x.name} - {mean.name})**2")
        variance = imp.add("mean", [squared.name], base + "_variance", axis=axes)
        inverse = imp.add("elementwise", [variance.name], base + "_inverse",
                          expr=f"1/sqrt({variance.name} + {eps!r})")
        imp.env[outputs[2]] = imp.add("reshape", [inverse.name], outputs[2], shape=kept)


# ---------------------------------------------------------------- movement and reduction

@rule("Flatten")
def _flatten(imp, node, attrs):
    x = imp.batched(node.input[0])
    if attrs.get("axis", 1) != 1:
        raise imp.error("Flatten is supported with axis 1 (keep the batch axis)", field="axis")
    _bind(imp, node, imp.add("flatten", [x.name], node.output[0]))


@rule("Reshape")
def _reshape(imp, node, attrs):
    x = imp.get(node.input[0])
    target = imp.constant(node.input[1], "Reshape's shape").astype(np.int64).tolist()
    if isinstance(x, np.ndarray):
        _bind(imp, node, x.reshape(target))
        return
    full = [BATCH_MARK, *x.shape]
    if attrs.get("allowzero", 0):   # 0 is a size of 0, not "keep this axis"
        if 0 in target:
            raise imp.error("Reshape to an empty tensor", field="shape")
    else:
        target = [full[k] if d == 0 else d for k, d in enumerate(target)]
    per = target[1:]
    # The batch axis stays first: the marker of folded shape arithmetic, -1 for it with
    # the rest known, or the batch size a static export was traced with (its inputs' fixed
    # first axis: `x.view(x.size(0), -1)` becomes [8, -1]).
    if not (target[0] == BATCH_MARK or (target[0] == -1 and -1 not in per)
            or target[0] in imp.static_batch):
        raise imp.error(f"Reshape to {target} does not keep the batch axis first",
                        field="shape")
    if any(d == BATCH_MARK for d in per) or any(d < -1 for d in per):
        raise imp.error(f"Reshape moves the batch axis (target {target})", field="shape")
    size = int(np.prod(x.shape))
    if -1 in per:
        known = int(np.prod([d for d in per if d != -1]))
        if known == 0 or size % known:
            raise imp.error(f"cannot reshape {list(x.shape)} per example to {per}",
                            field="shape")
        per = [size // known if d == -1 else d for d in per]
    _bind(imp, node, imp.add("reshape", [x.name], node.output[0], shape=per))


@rule("Transpose")
def _transpose(imp, node, attrs):
    x = imp.batched(node.input[0])
    perm = list(attrs.get("perm", reversed(range(len(x.shape) + 1))))
    if perm[0] != 0:
        raise imp.error("Transpose that moves the batch axis is not supported", field="perm")
    _bind(imp, node, imp.add("transpose", [x.name], node.output[0], perm=[p - 1 for p in perm[1:]]))


@rule("ReduceMean", "ReduceSum", "ReduceL2", "ReduceLogSumExp")
def _reduce(imp, node, attrs):
    x = imp.batched(node.input[0])
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in np.ravel(imp.constant(node.input[1], "axes"))]
    if axes is None or len(axes) == 0:
        if attrs.get("noop_with_empty_axes", 0):
            _bind(imp, node, x)
            return
        raise imp.error("a reduction over every axis includes the batch axis", field="axes")
    per = sorted(_per_example_axis(imp, a, len(x.shape), "axes") for a in axes)
    keep = attrs.get("keepdims", 1)
    name = node.output[0] + ("_reduced" if keep else "")
    if node.op_type == "ReduceLogSumExp":
        if len(per) != 1:
            raise imp.error("ReduceLogSumExp is supported over one axis", field="axes")
        # x - log_softmax(x) is log Σ exp(x) at every position along the axis, computed
        # with the stable shift: take it at position 0.
        lsm = imp.add("log_softmax", [x.name], node.output[0] + "_log_softmax", axis=per[0])
        lse = imp.add("sub", [x.name, lsm.name], node.output[0] + "_logsumexp")
        taken = imp.add("slice", [lse.name], node.output[0] + "_first", axis=per[0], start=0,
                        stop=1)
        reduced = imp.add("reshape", [taken.name], name,
                          shape=[d for k, d in enumerate(x.shape) if k != per[0]])
    elif node.op_type == "ReduceL2":
        squared = imp.add("elementwise", [x.name], node.output[0] + "_squared",
                          expr=f"{x.name}**2")
        total = imp.add("sum", [squared.name], node.output[0] + "_sum", axis=per)
        reduced = imp.add("elementwise", [total.name], name, expr=f"sqrt({total.name})")
    else:
        op = "mean" if node.op_type == "ReduceMean" else "sum"
        reduced = imp.add(op, [x.name], name, axis=per)
    if keep:
        shape = [1 if k in per else d for k, d in enumerate(x.shape)]
        reduced = imp.add("reshape", [reduced.name], node.output[0], shape=shape)
    _bind(imp, node, reduced)


SUPPORTED_OPS = frozenset(IMPORTERS)
