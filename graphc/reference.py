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

from .dropout import keep_mask, keep_threshold, node_key
from .dtypes import DTYPES
from .errors import GraphcError, InputError
from .functions import for_lambdify, numpy_namespace
from .graph import Graph
from .init import start_params
from .indices import index_array
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
# An op that computes differently in training (batch_norm) has a `train_forward` too: the
# gradients and the train step run it, and `vjp` is its VJP; `forward` is the evaluation
# mode's (outputs, the loss, evaluate).

@dataclass(frozen=True)
class _Op:
    forward: Callable[..., np.ndarray]
    vjp: Callable[..., list]
    train_forward: Callable[..., np.ndarray] | None = None
    # Draws dropout masks: in training, its attrs carry the train step's count ("step").
    random: bool = False


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


# Named activations, written from torch.nn.functional's definitions, not from graphc.ops.
# The kinks take torch's slopes (elu'(0) = alpha, hardsigmoid'(±3) = 0, hardswish'(-3) = 0,
# hardswish'(3) = 1). NaN propagates through the values; at NaN the derivatives are the C's
# (its Piecewise's last branch): hardsigmoid'(NaN) is 1/6, where torch's backward gives 0.

_erf = np.vectorize(math.erf, otypes=[float])   # NumPy has no erf (see _NUMPY below)
_GELU_BETA, _GELU_KAPPA = math.sqrt(2) * (2 / math.sqrt(math.pi)) * 0.5, 0.044715   # torch's
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _gelu(x, at):
    if at["approximate"] == "tanh":
        return 0.5 * x * (1 + np.tanh(_GELU_BETA * (x + _GELU_KAPPA * x ** 3)))
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(x.dtype)


def _gelu_d(x, y, at):
    if at["approximate"] == "tanh":
        t = np.tanh(_GELU_BETA * (x + _GELU_KAPPA * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_BETA * (1 + 3 * _GELU_KAPPA * x * x)
    # Φ(x) + x·φ(x); exp(-x²/2) is 0, not inf, for large |x|
    return (0.5 * (1 + _erf(x / math.sqrt(2)))
            + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)).astype(x.dtype)


def _log1p_exp(x):
    with np.errstate(invalid="ignore"):   # logaddexp warns of a NaN, which it returns
        return np.logaddexp(0, x)


def _softplus(x, at):
    bx = at["beta"] * x
    return np.where(bx > at["threshold"], x, _log1p_exp(bx) / at["beta"])


def _elu(x, alpha):
    # expm1 of min(x, 0): no overflow on the side np.where discards
    return np.where(x <= 0, alpha * np.expm1(np.minimum(x, 0)), x)


def _elu_d(x, alpha):
    return np.where(x <= 0, alpha * np.exp(np.minimum(x, 0)), 1.0).astype(x.dtype)


def _hard_sigmoid(x):
    return np.clip(x + 3, 0, 6) / 6   # np.clip keeps NaN


def _hard_sigmoid_d(x):
    return np.where((x <= -3) | (x >= 3), 0.0, 1 / 6).astype(x.dtype)


def _mish_d(x, y, at):
    t = np.tanh(_log1p_exp(x))
    return t + x * (1 - t * t) * _sigmoid(x)


# NumPy has no erf, and lambdify's fallback (math.erf) takes scalars only. Formulas keep
# sigmoid, softplus and relu as functions (graphc.functions), evaluated in stable forms.
_NUMPY = [{**numpy_namespace(), "erf": _erf}, "numpy"]


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
        # Broadcast, not only aligned: lambdify prints And/Or as logical_and.reduce of a
        # tuple, which needs its conditions in one shape.
        aligned = np.broadcast_arrays(*_aligned(args))
        out = np.empty(aligned[0].shape if aligned else (), args[0].dtype)
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


def _class_index(t: np.ndarray) -> bool:
    """An integer target: class indices (torch's F.cross_entropy with an integer target)."""
    return t.dtype.kind in "iu"


def _picked(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x[..., t[...]] along the last axis, x broadcast over t's batch (a param's logits)."""
    x = np.broadcast_to(x, t.shape[:1] + x.shape[1:])
    return np.take_along_axis(x, t[..., None], axis=-1)[..., 0]


def _sce_forward(args, attrs):
    x, t = args
    if _class_index(t):
        return -_picked(_log_softmax(x, -1), t)
    return -(t * _log_softmax(x, -1)).sum(axis=-1)


def _sce_vjp(g, args, out, attrs):
    x, t = args
    if _class_index(t):
        # d/dx of -(x_t - lse(x)) is softmax(x) - onehot(t)
        onehot = (np.arange(x.shape[-1]) == t[..., None]).astype(x.dtype)
        return [_unbroadcast(g[..., None] * (np.exp(_log_softmax(x, -1)) - onehot), x.shape),
                None]
    # d/dx of -Σ t·(x - lse(x)) is softmax(x)·Σt - t; Σt is 1 only for proper targets.
    dx = np.exp(_log_softmax(x, -1)) * t.sum(axis=-1, keepdims=True) - t
    return [_unbroadcast(g[..., None] * dx, x.shape), None]


# embedding: out[b, ..., d] = table[b, indices[b, ...], d], the table's batch axis of size 1
# (a param) or n; its VJP adds each row's cotangent into the table (np.add.at: an index
# repeated in a batch adds up, as torch's embedding_backward does).

def _embedding_rows(indices: np.ndarray, table: np.ndarray):
    batch = np.arange(table.shape[0]).reshape((-1,) + (1,) * (indices.ndim - 1))
    return np.broadcast_to(batch, indices.shape) if table.shape[0] > 1 else 0, indices


def _embedding_forward(args, attrs):
    indices, table = args
    return table[_embedding_rows(indices, table)]


def _embedding_vjp(g, args, out, attrs):
    indices, table = args
    grad = np.zeros_like(table)
    np.add.at(grad, _embedding_rows(indices, table), g)
    return [None, grad]


def _bce_forward(args, attrs):
    x, t = args
    return _per_example_mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))


def _bce_vjp(g, args, out, attrs):
    x, t = args
    d = _sigmoid(x) - t
    count = math.prod(d.shape[1:])
    return [_unbroadcast(_expand_to(g, d) * d / count, x.shape), None]


# ---------------------------------------------------------------- spatial and movement ops
# torch.nn.functional's semantics, per example in torch's layout without the batch axis:
# [C, L] for 1-D, [C, H, W] for 2-D; lifted, the spatial axes are the last d. Attributes
# come validated but unexpanded: an int is repeated per spatial axis. Convolution and
# pooling loop over the kernel's offsets: at each, the input positions it reads form one
# strided slice of the padded input, so a forward is a sum of shifted slices and a VJP adds
# into the same slices (distinct positions within one slice, so `+=` on the view is exact).

def _spatial(value, d: int, what: str) -> tuple[int, ...]:
    """An int or a tuple of ints as one int per spatial axis (torch also takes a 1-tuple)."""
    vals = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(vals) == 1:
        vals *= d
    if len(vals) != d:
        raise ValueError(f"{what} must be an int or {d} of them, got {value!r}")
    return vals


def _out_size(size, lo, hi, k, s, dil, ceil=False) -> int:
    extent = dil * (k - 1) + 1
    if size + lo + hi < extent:
        raise ValueError(f"an input of size {size} (padding {lo}+{hi}) is smaller than the "
                         f"kernel's extent {extent}")
    if not ceil:
        return (size + lo + hi - extent) // s + 1
    # torch's pooling_output_shape: rounded up, but the last window starts before the end
    # of the input and the padding before it
    n = math.ceil((size + lo + hi - extent) / s) + 1
    return n - 1 if (n - 1) * s >= size + lo else n


@dataclass(frozen=True)
class _Window:
    """A kernel sliding over the last d axes: sizes, strides and padding per axis."""
    size: tuple[int, ...]       # input's spatial sizes
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]  # (before, after) per axis
    out: tuple[int, ...]
    overhang: tuple[int, ...]         # per axis, how far ceil_mode's last window runs past

    @staticmethod
    def make(size, kernel, stride, dilation, pad, ceil=False) -> "_Window":
        out = tuple(_out_size(n, lo, hi, k, s, dl, ceil)
                    for n, (lo, hi), k, s, dl in zip(size, pad, kernel, stride, dilation))
        overhang = tuple(max(0, (o - 1) * s + dl * (k - 1) + 1 - (n + lo + hi))
                         for o, n, (lo, hi), k, s, dl
                         in zip(out, size, pad, kernel, stride, dilation))
        return _Window(tuple(size), kernel, stride, dilation, tuple(pad), out, overhang)

    def padded(self, x: np.ndarray, value=0.0) -> np.ndarray:
        """x inside its padding and the overhang, both filled with `value`."""
        widths = tuple((lo, hi + over) for (lo, hi), over in zip(self.pad, self.overhang))
        if not any(lo or hi for lo, hi in widths):
            return x
        return np.pad(x, ((0, 0),) * (x.ndim - len(widths)) + widths, constant_values=value)

    def crop(self, xp: np.ndarray) -> np.ndarray:
        return xp[(Ellipsis,) + tuple(slice(lo, lo + n) for (lo, _), n in zip(self.pad, self.size))]

    def offsets(self):
        """(kernel offset, index of the padded input's positions it reads, one per output)."""
        for koff in np.ndindex(*self.kernel):
            yield koff, (Ellipsis,) + tuple(
                slice(o * dl, o * dl + s * (n - 1) + 1, s)
                for o, dl, s, n in zip(koff, self.dilation, self.stride, self.out))

    def in_bounds(self, dtype) -> np.ndarray:
        """1 at the padded input's real positions, 0 in the padding (spatial axes only)."""
        return self.padded(np.ones(self.size, dtype)[None])[0]

    def in_padding(self, dtype) -> np.ndarray:
        """1 at the real positions and in the padding, 0 in the overhang."""
        inner = np.ones(tuple(n + lo + hi for n, (lo, hi) in zip(self.size, self.pad)), dtype)
        return np.pad(inner, tuple((0, over) for over in self.overhang))


def _conv_geometry(d: int, args, attrs):
    x, w = args[0], args[1]
    if x.ndim != d + 2 or w.ndim != d + 3:
        raise ValueError(f"conv{d}d: input must be [C{', L' if d == 1 else ', H, W'}] and "
                         f"weight [O, C/groups, k...], got {x.shape[1:]} and {w.shape[1:]}")
    groups = attrs.get("groups", 1)
    c, o, cg = x.shape[1], w.shape[1], w.shape[2]
    if c != cg * groups or o % groups:
        raise ValueError(f"conv{d}d: {c} input channels, weight {w.shape[1:]} and "
                         f"groups={groups} do not fit")
    kernel = w.shape[3:]
    stride = _spatial(attrs.get("stride", 1), d, "stride")
    dilation = _spatial(attrs.get("dilation", 1), d, "dilation")
    padding = attrs.get("padding", 0)
    if padding == "valid":
        pad = ((0, 0),) * d
    elif padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError(f"conv{d}d: padding='same' needs stride 1, got {stride}")
        # torch: total d·(k-1) per axis, the odd unit on the right.
        total = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
        pad = tuple((t // 2, t - t // 2) for t in total)
    else:
        pad = tuple((p, p) for p in _spatial(padding, d, "padding"))
    return _Window.make(x.shape[2:], kernel, stride, dilation, pad), groups


def _conv(d: int) -> _Op:
    def forward(args, attrs):
        x, w = args[0], args[1]
        win, groups = _conv_geometry(d, args, attrs)
        xp = win.padded(x)
        bx, bw = x.shape[0], w.shape[0]
        batch = max(bx, bw) if min(bx, bw) else 0
        c, o = x.shape[1], w.shape[1]
        cg, og, spots = c // groups, o // groups, math.prod(win.out)
        wg = w.reshape((bw, groups, og, cg) + win.kernel)
        y = np.zeros((batch, groups, og, spots), np.result_type(x, w))
        for koff, idx in win.offsets():
            xs = xp[idx].reshape(bx, groups, cg, spots)
            y += np.matmul(wg[(Ellipsis,) + koff], xs)   # (B, G, Og, Cg) @ (B, G, Cg, P)
        y = y.reshape((batch, o) + win.out)
        if len(args) == 3:
            y = y + args[2].reshape(args[2].shape + (1,) * d)
        return y

    def vjp(g, args, out, attrs):
        x, w = args[0], args[1]
        win, groups = _conv_geometry(d, args, attrs)
        xp = win.padded(x)
        bx, bw, batch = x.shape[0], w.shape[0], g.shape[0]
        c, o = x.shape[1], w.shape[1]
        cg, og, spots = c // groups, o // groups, math.prod(win.out)
        wg = w.reshape((bw, groups, og, cg) + win.kernel)
        gg = g.reshape(batch, groups, og, spots)
        gxp = np.zeros((batch,) + xp.shape[1:], g.dtype)
        gw = np.zeros((bw, groups, og, cg) + win.kernel, g.dtype)
        for koff, idx in win.offsets():
            wk = wg[(Ellipsis,) + koff]
            part = np.matmul(np.swapaxes(wk, -1, -2), gg)          # (B, G, Cg, P)
            gxp[idx] += part.reshape((batch, c) + win.out)
            xs = xp[idx].reshape(bx, groups, cg, spots)
            gwk = np.matmul(gg, np.swapaxes(xs, -1, -2))           # (B, G, Og, Cg)
            gw[(Ellipsis,) + koff] = gwk.sum(axis=0, keepdims=True) if bw == 1 else gwk
        grads = [_unbroadcast(win.crop(gxp), x.shape), gw.reshape(w.shape)]
        if len(args) == 3:
            grads.append(_unbroadcast(g.sum(axis=tuple(range(2, g.ndim))), args[2].shape))
        return grads
    return _Op(forward, vjp)


def _pool_window(d: int, x: np.ndarray, attrs, op: str) -> _Window:
    if x.ndim != d + 2:
        raise ValueError(f"{op}: input must have per-example rank {d + 1}, got {x.shape[1:]}")
    kernel = _spatial(attrs["kernel_size"], d, "kernel_size")
    stride = attrs.get("stride")
    stride = kernel if stride is None else _spatial(stride, d, "stride")
    dilation = _spatial(attrs.get("dilation", 1), d, "dilation")
    padding = attrs.get("padding", 0)
    # per axis an int (both sides) or a (before, after) pair
    per_axis = [padding] * d if not isinstance(padding, (list, tuple)) else list(padding)
    if len(per_axis) == 1:
        per_axis *= d
    pad = tuple(tuple(p) if isinstance(p, (list, tuple)) else (p, p) for p in per_axis)
    win = _Window.make(x.shape[2:], kernel, stride, dilation, pad, attrs.get("ceil_mode", False))
    # a window must hold an input element (torch asks padding <= kernel/2; ONNX allows more)
    inb = win.in_bounds(bool)
    hit = np.zeros(win.out, bool)
    for _, idx in win.offsets():
        hit |= inb[idx[1:]]
    if not hit.all():
        raise ValueError(f"{op}: a window reads only padding (padding {pad}, kernel {kernel}, "
                         f"dilation {dilation})")
    return win


def _max_pool_choice(d: int, x: np.ndarray, attrs):
    """The window, the values of every offset stacked (K, B, C, *out), and per output the
    offset torch's CPU kernel picks: scanning row-major, `val > maxval || isnan(val)`
    replaces the running maximum (start: -inf at the first in-bounds position), so the
    first of tied maxima wins, and the last NaN if there is one."""
    win = _pool_window(d, x, attrs, f"max_pool{d}d")
    xp = win.padded(x, -np.inf)
    stack = np.stack([xp[idx] for _, idx in win.offsets()])
    nan = np.isnan(stack)
    last_nan = len(stack) - 1 - np.argmax(nan[::-1], axis=0)
    first_max = np.argmax(stack, axis=0)          # no NaN in these windows: the first max
    inb = win.in_bounds(bool)
    first_in = np.argmax(np.stack([inb[idx[1:]] for _, idx in win.offsets()]), axis=0)
    best = np.take_along_axis(stack, first_max[None], axis=0)[0]
    choice = np.where(nan.any(axis=0), last_nan,
                      np.where(best == -np.inf, first_in, first_max))
    return win, stack, choice


def _max_pool(d: int) -> _Op:
    def forward(args, attrs):
        _, stack, choice = _max_pool_choice(d, args[0], attrs)
        return np.take_along_axis(stack, choice[None], axis=0)[0]

    def vjp(g, args, out, attrs):
        (x,) = args
        win, _, choice = _max_pool_choice(d, x, attrs)
        # The chosen input position (unpadded, row-major within its channel plane).
        koffs = np.array(list(np.ndindex(*win.kernel)), dtype=np.intp).reshape(-1, d)
        flat = np.zeros(choice.shape, np.intp)
        for a in range(d):
            pos = np.arange(win.out[a]) * win.stride[a] - win.pad[a][0]
            pos = pos.reshape((-1,) + (1,) * (d - 1 - a))
            flat = flat * win.size[a] + pos + koffs[choice, a] * win.dilation[a]
        planes = x.shape[0] * x.shape[1]
        size = math.prod(win.size)
        flat = flat + (np.arange(planes) * size).reshape(x.shape[:2] + (1,) * d)
        gx = np.bincount(flat.ravel(), weights=g.ravel(), minlength=planes * size)
        return [gx.astype(g.dtype).reshape(x.shape)]
    return _Op(forward, vjp)


def _avg_divisor(win: _Window, attrs, dtype) -> np.ndarray:
    """Per output position, the window's elements inside the input, or (count_include_pad)
    inside the input and its padding: never ceil_mode's overhang (torch)."""
    inside = win.in_padding(dtype) if attrs.get("count_include_pad", True) \
        else win.in_bounds(dtype)
    return sum(inside[idx[1:]] for _, idx in win.offsets())


def _avg_pool(d: int) -> _Op:
    def forward(args, attrs):
        (x,) = args
        win = _pool_window(d, x, attrs, f"avg_pool{d}d")
        xp = win.padded(x)
        total = sum(xp[idx] for _, idx in win.offsets())
        return (total / _avg_divisor(win, attrs, x.dtype)).astype(x.dtype, copy=False)

    def vjp(g, args, out, attrs):
        (x,) = args
        win = _pool_window(d, x, attrs, f"avg_pool{d}d")
        share = g / _avg_divisor(win, attrs, g.dtype)
        gxp = np.zeros(x.shape[:2] + win.in_padding(bool).shape, g.dtype)
        for _, idx in win.offsets():
            gxp[idx] += share
        return [win.crop(gxp)]
    return _Op(forward, vjp)


def _global_avg_pool_vjp(g, args, out, attrs):
    (x,) = args
    spatial = x.shape[2:]
    share = g.reshape(g.shape + (1,) * len(spatial)) / math.prod(spatial)
    return [np.broadcast_to(share, x.shape).astype(g.dtype)]


def _pad_widths(x: np.ndarray, attrs) -> list[tuple[int, int]]:
    """np.pad's widths from torch's `pad`: (before, after) of the last axis first."""
    pad = tuple(attrs["pad"])
    if len(pad) % 2 or len(pad) // 2 > x.ndim - 1:
        raise ValueError(f"pad: {pad} must have an even length of at most 2 x the "
                         f"per-example rank {x.ndim - 1}")
    pairs = [(pad[k], pad[k + 1]) for k in range(0, len(pad), 2)][::-1]
    return [(0, 0)] * (x.ndim - len(pairs)) + pairs


def _pad_forward(args, attrs):
    (x,) = args
    return np.pad(x, _pad_widths(x, attrs), constant_values=attrs.get("value", 0.0))


def _pad_vjp(g, args, out, attrs):
    (x,) = args
    widths = _pad_widths(x, attrs)
    return [g[tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, x.shape))]]


def _slice_index(x: np.ndarray, attrs) -> tuple:
    axis = _axis(attrs["axis"], x)
    step = attrs.get("step", 1)
    if step is None:
        step = 1
    return (slice(None),) * axis + (slice(attrs.get("start", 0), attrs.get("stop"), step),)


def _slice_vjp(g, args, out, attrs):
    (x,) = args
    gx = np.zeros(x.shape, g.dtype)
    gx[_slice_index(x, attrs)] = g
    return [gx]


def _perm(x: np.ndarray, attrs) -> tuple[int, ...]:
    """The lifted array's axis order: the batch axis stays first."""
    perm = attrs.get("perm")
    rank = x.ndim - 1
    perm = tuple(range(rank))[::-1] if perm is None else tuple(p % rank for p in perm)
    if sorted(perm) != list(range(rank)):
        raise ValueError(f"transpose: perm {attrs.get('perm')!r} is not a permutation of "
                         f"{rank} axes")
    return (0,) + tuple(p + 1 for p in perm)


def _layer_norm_stats(x: np.ndarray, attrs):
    rank = x.ndim - 1
    axes = tuple(sorted(a % rank + 1 for a in attrs.get("axes", (-1,))))
    if axes != tuple(range(x.ndim - len(axes), x.ndim)) or len(set(axes)) != len(axes):
        raise ValueError(f"layer_norm: axes {attrs.get('axes')!r} must be trailing axes")
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)      # biased, as torch
    rstd = 1 / np.sqrt(var + attrs.get("eps", 1e-5))
    return axes, (x - mu) * rstd, rstd


def _layer_norm_forward(args, attrs):
    x = args[0]
    _, xhat, _ = _layer_norm_stats(x, attrs)
    y = xhat * _align(args[1], x.ndim - 1) if len(args) > 1 else xhat
    return y + _align(args[2], x.ndim - 1) if len(args) > 2 else y


def _layer_norm_vjp(g, args, out, attrs):
    x = args[0]
    axes, xhat, rstd = _layer_norm_stats(x, attrs)
    gh = g * _align(args[1], x.ndim - 1) if len(args) > 1 else g
    gx = rstd * (gh - gh.mean(axis=axes, keepdims=True)
                 - xhat * (gh * xhat).mean(axis=axes, keepdims=True))
    grads = [_unbroadcast(gx, x.shape)]
    if len(args) > 1:
        grads.append(_unbroadcast(g * xhat, args[1].shape))
    if len(args) > 2:
        grads.append(_unbroadcast(g, args[2].shape))
    return grads


# batch_norm, torch's (ATen/native/Normalization.cpp): per channel (axis 1 lifted) over the
# batch and the spatial axes. Training normalizes by the batch's mean and biased variance;
# evaluation by the running statistics, which a train step moves towards the batch's mean
# and unbiased variance (`_running_statistics`).

def _channels(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-channel param (lifted [1, C]) shaped to broadcast against x [B, C, ...]."""
    return a.reshape(a.shape[:2] + (1,) * (x.ndim - 2))


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _batch_norm_eval(args, attrs):
    x, w, b, mean, var = args
    return ((x - _channels(mean, x)) / np.sqrt(_channels(var, x) + attrs["eps"])
            * _channels(w, x) + _channels(b, x))


def _batch_norm_stats(x, attrs):
    axes = _channel_axes(x)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)   # biased, to normalize
    rstd = 1 / np.sqrt(var + attrs["eps"])
    return axes, (x - mean) * rstd, rstd


def _batch_norm_train(args, attrs):
    x, w, b = args[:3]
    _, xhat, _ = _batch_norm_stats(x, attrs)
    return xhat * _channels(w, x) + _channels(b, x)


def _batch_norm_vjp(g, args, out, attrs):
    x, w, b = args[:3]
    axes, xhat, rstd = _batch_norm_stats(x, attrs)
    gh = g * _channels(w, x)
    gx = rstd * (gh - gh.mean(axis=axes, keepdims=True)
                 - xhat * (gh * xhat).mean(axis=axes, keepdims=True))
    per_channel = (1, x.shape[1])
    return [gx, (g * xhat).sum(axis=axes).reshape(per_channel),
            g.sum(axis=axes).reshape(per_channel), None, None]


def _batch_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The batch's mean per channel and its unbiased variance (the sum over N values
    divided by N - 1; None at N = 1, which torch refuses in training), as torch's
    batch_norm_cpu_update_stats_template moves the running statistics towards them."""
    axes = _channel_axes(x)
    count = x.size // x.shape[1]
    mean = x.mean(axis=axes, keepdims=True)
    var_sum = ((x - mean) ** 2).sum(axis=axes)
    return mean.reshape(-1), (var_sum / (count - 1) if count > 1 else None)


def _running_statistics(batch: tuple[np.ndarray, np.ndarray | None], running_mean: np.ndarray,
                        running_var: np.ndarray, momentum: float) -> None:
    """torch's update in place: running = momentum · batch + (1 - momentum) · running; the
    running variance stays as it is when the batch has none."""
    mean, var = batch
    running_mean[...] = momentum * mean + (1 - momentum) * running_mean
    if var is not None:
        running_var[...] = momentum * var + (1 - momentum) * running_var


def _dropout_scale(x: np.ndarray, attrs: dict) -> np.ndarray:
    """The mask over the elements of lifted `x` (flat index b·S + i) divided by 1 − p,
    as torch's inverted dropout scales it; drawn by graphc/dropout.py's generator."""
    p = attrs["p"]
    if p == 0:
        return np.ones_like(x)
    kept = keep_mask(attrs["key"], attrs["step"], np.arange(x.size).reshape(x.shape),
                     keep_threshold(p))
    return kept / (1 - p)


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
    "gelu": _unary(_gelu, _gelu_d),
    "silu": _unary(lambda x, at: x * _sigmoid(x),
                   lambda x, y, at: _sigmoid(x) * (1 + x * _sigmoid(-x))),
    "softplus": _unary(_softplus, lambda x, y, at: np.where(
        at["beta"] * x > at["threshold"], 1.0, _sigmoid(at["beta"] * x)).astype(x.dtype)),
    "elu": _unary(lambda x, at: _elu(x, at["alpha"]), lambda x, y, at: _elu_d(x, at["alpha"])),
    "selu": _unary(lambda x, at: _SELU_SCALE * _elu(x, _SELU_ALPHA),
                   lambda x, y, at: _SELU_SCALE * _elu_d(x, _SELU_ALPHA)),
    "hard_sigmoid": _unary(lambda x, at: _hard_sigmoid(x), lambda x, y, at: _hard_sigmoid_d(x)),
    "hard_swish": _unary(lambda x, at: x * _hard_sigmoid(x),
                         lambda x, y, at: _hard_sigmoid(x) + x * _hard_sigmoid_d(x)),
    "mish": _unary(lambda x, at: x * np.tanh(_log1p_exp(x)), _mish_d),
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
    "embedding": _Op(_embedding_forward, _embedding_vjp),
    "bce_with_logits": _Op(_bce_forward, _bce_vjp),
    # spatial and movement ops
    "conv1d": _conv(1),
    "conv2d": _conv(2),
    "max_pool1d": _max_pool(1),
    "max_pool2d": _max_pool(2),
    "avg_pool1d": _avg_pool(1),
    "avg_pool2d": _avg_pool(2),
    "global_avg_pool": _Op(lambda args, at: args[0].mean(axis=tuple(range(2, args[0].ndim))),
                           _global_avg_pool_vjp),
    "pad": _Op(_pad_forward, _pad_vjp),
    "slice": _Op(lambda args, at: args[0][_slice_index(args[0], at)], _slice_vjp),
    "transpose": _Op(lambda args, at: args[0].transpose(_perm(args[0], at)),
                     lambda g, args, out, at: [g.transpose(np.argsort(_perm(args[0], at)))]),
    "layer_norm": _Op(_layer_norm_forward, _layer_norm_vjp),
    "batch_norm": _Op(_batch_norm_eval, _batch_norm_vjp, _batch_norm_train),
    # dropout: the identity out of training (a copy: values() hands arrays out).
    "dropout": _Op(lambda args, at: args[0].copy(),
                   lambda g, args, out, at: [g * _dropout_scale(args[0], at)],
                   lambda args, at: args[0] * _dropout_scale(args[0], at), random=True),
}


# ---------------------------------------------------------------- optimizers
# torch.optim's optimizers as their single-tensor CPU code runs them (torch/optim/sgd.py
# `_single_tensor_sgd`, adam.py `_single_tensor_adam`, and so on), one param at a
# time, in the same operation order, so a trajectory matches torch's to rounding. Written
# apart from the SymPy update formulas in graphc/optim.py: this is what the C is checked
# against. `state` maps slot -> the param's array (updated in place); `step` counts this step.

def _sgd_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    g = _decay(opt, p, g)
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


def _decay(opt: dict, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The gradient after weight decay: L2 added to it (torch's default), or, decoupled
    (AdamW, NAdam's option), the param shrunk in place and the gradient as it is."""
    if opt["weight_decay"] == 0:
        return g
    if opt["name"] == "adamw" or opt.get("decoupled_weight_decay"):
        p *= 1 - opt["lr"] * opt["weight_decay"]
        return g
    return g + opt["weight_decay"] * p


def _adam_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    beta1, beta2 = opt["betas"]
    g = _decay(opt, p, g)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg[...] = _lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g  # addcmul: value·t1·t2, left to right
    # Python floats from the step count, as torch does when not capturable.
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = opt["lr"] / bias_correction1
    if opt["amsgrad"]:
        np.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        exp_avg_sq = state["max_exp_avg_sq"]
    denom = np.sqrt(exp_avg_sq) / bias_correction2 ** 0.5 + opt["eps"]
    p -= step_size * exp_avg / denom  # addcdiv: value·t1 / t2


def _rmsprop_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    alpha = opt["alpha"]
    g = _decay(opt, p, g)
    square_avg = state["square_avg"]
    square_avg *= alpha
    square_avg += (1 - alpha) * g * g
    if opt["centered"]:
        grad_avg = state["grad_avg"]
        grad_avg[...] = _lerp(grad_avg, g, 1 - alpha)
        avg = np.sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = np.sqrt(square_avg)
    avg = avg + opt["eps"]
    if opt["momentum"] > 0:
        buf = state["momentum_buffer"]
        buf *= opt["momentum"]
        buf += g / avg
        p -= opt["lr"] * buf
    else:
        p -= opt["lr"] * g / avg


def _adagrad_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    g = _decay(opt, p, g)
    clr = opt["lr"] / (1 + (step - 1) * opt["lr_decay"])
    state["sum"] += g * g
    p -= clr * g / (np.sqrt(state["sum"]) + opt["eps"])


def _adamax_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    beta1, beta2 = opt["betas"]
    g = _decay(opt, p, g)
    state["exp_avg"][...] = _lerp(state["exp_avg"], g, 1 - beta1)
    np.maximum(state["exp_inf"] * beta2, np.abs(g) + opt["eps"], out=state["exp_inf"])
    clr = opt["lr"] / (1 - beta1 ** step)
    p -= clr * state["exp_avg"] / state["exp_inf"]


def _nadam_update(opt: dict, p: np.ndarray, g: np.ndarray, state: dict, step: int) -> None:
    beta1, beta2 = opt["betas"]
    psi = opt["momentum_decay"]
    bias_correction2 = 1 - beta2 ** step
    g = _decay(opt, p, g)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
    state["mu_product"][...] *= mu   # a 0-d array: one number, updated in place
    mu_product = float(state["mu_product"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg[...] = _lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    denom = np.sqrt(exp_avg_sq / bias_correction2) + opt["eps"]
    p += (-opt["lr"] * (1.0 - mu) / (1.0 - mu_product)) * g / denom
    p += ((-opt["lr"] * mu_next) / (1.0 - mu_product * mu_next)) * exp_avg / denom


_UPDATES: dict[str, Callable] = {"sgd": _sgd_update, "momentum": _sgd_update, "adam": _adam_update,
                                 "adamw": _adam_update, "rmsprop": _rmsprop_update,
                                 "adagrad": _adagrad_update, "adamax": _adamax_update,
                                 "nadam": _nadam_update}


def _slots(opt: dict) -> tuple[str, ...]:
    """The state each param carries, by torch's names (plain SGD keeps none)."""
    name = opt["name"]
    if name in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if opt["amsgrad"] else ())
    if name == "rmsprop":
        return ("square_avg",) + (("grad_avg",) if opt["centered"] else ()) + \
            (("momentum_buffer",) if opt["momentum"] != 0 else ())
    if name == "adagrad":
        return ("sum",)
    if name == "adamax":
        return ("exp_avg", "exp_inf")
    if name == "nadam":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if opt["momentum"] != 0 else ()


def _slot_start(opt: dict) -> dict[str, float]:
    """Slots that do not start at 0 (torch's initial_accumulator_value, NAdam's mu_product)."""
    return {"sum": opt["initial_accumulator_value"]} if opt["name"] == "adagrad" else \
        {"mu_product": 1.0} if opt["name"] == "nadam" else {}


def _clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ (norm_type 2), in place: the 2-norm of the params'
    2-norms, and every gradient scaled by max_norm / (norm + 1e-6) when that is below 1."""
    total = np.linalg.norm([np.linalg.norm(g.ravel()) for g in grads.values()])
    coef = min(max_norm / (total + 1e-6), 1.0)
    for g in grads.values():
        g *= coef


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
        drawn = start_params(graph, seed)
        self._params = {k: np.array(p, dtype=self.dtype) for k, p in drawn.items()}
        self._attrs = {k: _Formula(*v.attrs["expr"]) if v.op == "elementwise" else v.attrs
                       for k, v in graph.nodes.items()}
        for k, v in graph.nodes.items():   # a dropout node's masks follow its name and seed
            if v.op == "dropout":
                self._attrs[k] = {**v.attrs, "key": node_key(k, v.attrs["seed"])}
        # Values the loss can be differentiated through: trainable params and what depends
        # on them.
        self._differentiable: set[str] = set()
        for k, v in graph.values.items():
            if (v.kind == "param" and v.trainable) or any(i in self._differentiable
                                                         for i in v.inputs):
                self._differentiable.add(k)
        self.optimizer = graph.optimizer
        # int32 inputs (indices) -> what bounds them: checked as the compiled model checks
        bounds = graph.index_bounds()
        self._indices = {k: bounds.get(k) for k, v in graph.inputs.items() if v.dtype == "int32"}

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
        """Every value of the graph (inputs, params, nodes); unbatched ones without batch
        axis. In evaluation mode, as `forward` (batch norm by its running statistics)."""
        return self._values(inputs, training=False)

    def training_values(self, **inputs) -> dict[str, np.ndarray]:
        """`values` in training mode, as `gradients` computes them (batch norm by the
        batch's statistics)."""
        return self._values(inputs, training=True)

    def _values(self, inputs: dict, training: bool) -> dict[str, np.ndarray]:
        env = self._run(inputs, self.graph.values, training)
        return {k: a if self.graph.values[k].batched else a[0] for k, a in env.items()}

    def loss(self, **inputs) -> float:
        """The batch mean of the per-example loss, in evaluation mode (batch norm by its
        running statistics), as `evaluate` computes it."""
        return float(self._per_example_loss(inputs)[1].mean())

    def training_loss(self, **inputs) -> float:
        """The batch mean of the per-example loss in training mode (batch norm by the
        batch's statistics): the loss `gradients` differentiates and returns."""
        return float(self._per_example_loss(inputs, training=True)[1].mean())

    def gradients(self, **inputs) -> tuple[float, dict[str, np.ndarray]]:
        """(batch-mean loss, {trainable param: d loss / d param}) in training mode, by one
        reverse sweep of VJPs."""
        loss, grads, _ = self._gradients(inputs)
        return loss, grads

    def _gradients(self, inputs: dict) -> tuple[float, dict[str, np.ndarray], dict]:
        env, per_example = self._per_example_loss(inputs, training=True)
        n = per_example.shape[0]
        grads = {self.graph.loss: np.full(n, 1 / n, self.dtype)}
        for name in reversed(self.graph.nodes):
            g = grads.pop(name, None)
            if g is None:
                continue
            v = self.graph.values[name]
            args = [env[i] for i in v.inputs]
            attrs = self._training_attrs(name)
            for src, c in zip(v.inputs, OPS[v.op].vjp(g, args, env[name], attrs)):
                if c is not None and src in self._differentiable:
                    grads[src] = grads[src] + c if src in grads else c
        return float(per_example.mean()), {
            k: np.array(grads[k][0], self.dtype) if k in grads else np.zeros_like(self._params[k])
            for k in self.graph.trainable_params}, env

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
        start = _slot_start(self._optimizer) if self._optimizer else {}
        self._state = {s: {k: np.full_like(self._params[k], start.get(s, 0.0))
                           for k in self.graph.trainable_params} for s in slots}
        if "mu_product" in start:   # one number for every param, as torch's are equal
            self._state["mu_product"] = {k: np.array(1.0) for k in self.graph.trainable_params}

    def optimizer_state(self) -> dict:
        """{"step": steps taken, slot: {param: array}} with torch's slot names (NAdam's
        mu_product, the same for every param, as one number)."""
        out = {"step": self._step, **{s: {k: a.copy() for k, a in per_param.items()}
                                      for s, per_param in self._state.items()}}
        if "mu_product" in out:
            out["mu_product"] = float(next(iter(self._state["mu_product"].values())))
        return out

    def train_step(self, **inputs) -> float:
        """One optimizer step on this batch; returns the batch-mean loss before the update,
        or NaN, changing nothing, when the loss or a gradient is NaN or infinite."""
        if self.graph.loss is None:
            raise InputError(f"graph '{self.graph.name}' has no loss, so it cannot train")
        if self._optimizer is None:
            raise InputError(f"graph '{self.graph.name}' has no optimizer: declare an "
                             "'optimizer:' section in the spec or set `optimizer`")
        loss, grads, env = self._gradients(inputs)
        # The batch's statistics, which the running ones move towards (from the forward
        # pass, before the update, as in torch); the C keeps them in their gradient slots.
        batch = {name: _batch_statistics(env[v.inputs[0]])
                 for name, v in self.graph.nodes.items() if v.op == "batch_norm" and name in env}
        # As the C's train step: a NaN or infinite loss, gradient or batch statistic changes
        # nothing.
        stats = [s for pair in batch.values() for s in pair if s is not None]
        if not (math.isfinite(loss) and all(np.all(np.isfinite(g))
                                            for g in [*grads.values(), *stats])):
            return math.nan
        self._step += 1
        if self._optimizer["clip_grad_norm"] is not None and grads:
            _clip_grad_norm(grads, self._optimizer["clip_grad_norm"])
        update = _UPDATES[self._optimizer["name"]]
        for k in self.graph.trainable_params:
            update(self._optimizer, self._params[k], grads[k],
                   {s: self._state[s][k] for s in self._state}, self._step)
        for name, stats in batch.items():   # then the running statistics
            v = self.graph.nodes[name]
            _running_statistics(stats, self._params[v.inputs[3]], self._params[v.inputs[4]],
                                v.attrs["momentum"])
        return loss

    # ------------------------------------------------------------ internals
    def _per_example_loss(self, inputs: dict, training: bool = False
                          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The evaluated ancestors of the loss, and the loss per example."""
        loss = self.graph.loss
        if loss is None:
            raise GraphcError(f"graph '{self.graph.name}' has no loss to evaluate or differentiate")
        env = self._run(inputs, [loss], training)
        if env[loss].shape[0] == 0:
            raise InputError("the batch is empty: the mean loss of no examples is undefined")
        return env, env[loss]

    def _training_attrs(self, name: str):
        """A node's attrs in training: dropout's with the step whose masks it draws (the
        count of steps taken, as the C's train step passes it)."""
        attrs = self._attrs[name]
        return {**attrs, "step": self._step} if OPS[self.graph.nodes[name].op].random else attrs

    def _array(self, value, what: str) -> np.ndarray:
        try:
            return np.array(value, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise InputError(f"{what}: cannot convert to a {self.dtype.name} array ({e})") from None

    def _run(self, inputs: dict, targets, training: bool = False) -> dict[str, np.ndarray]:
        """Lifted arrays (batch axis of size 1 when unbatched) of `targets` and their
        ancestors, in training mode or evaluation mode (see `_Op`)."""
        needed = self.graph.ancestors(targets)
        env = self._inputs(inputs, needed)
        for name, v in self.graph.values.items():
            if name not in needed:
                continue
            if v.kind == "param":
                # A copy: values() hands arrays out, and reshape/flatten return views.
                env[name] = self._params[name][None].copy()
            elif v.kind == "node":
                op = OPS[v.op]
                forward = op.train_forward if training and op.train_forward else op.forward
                attrs = self._training_attrs(name) if training else self._attrs[name]
                env[name] = forward([env[i] for i in v.inputs], attrs)
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
            if name in self._indices:   # int32 indices stay integers
                try:
                    array = np.asarray(value)
                except (TypeError, ValueError) as e:
                    raise InputError(f"input '{name}': not an array ({e})") from None
                array = index_array(name, array, self._indices[name]).astype(np.int64)
            else:
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
