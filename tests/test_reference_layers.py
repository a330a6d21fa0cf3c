"""The NumPy reference's spatial and movement ops (conv, pooling, pad, slice, transpose,
layer_norm) against torch.nn.functional (pooling torch cannot express: against ONNX's
reference implementation), and their VJPs against finite differences.

The reference functions are called directly on lifted arrays (batch axis first: x of shape
(n, *per_example), a param of shape (1, *shape)). Against torch, in float64: the forward, and
the VJP of a random cotangent against torch.autograd.grad, to 1e-12 relative, for n = 1 and
n = 3. Against central differences (no torch needed): each VJP along random directions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from graphc.reference import OPS

NAN, NEGINF = float("nan"), float("-inf")


@pytest.fixture(scope="module")
def torch():
    # Only the torch comparisons skip without torch: the finite differences stand alone.
    return pytest.importorskip("torch")


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    x: tuple[int, ...]                        # per-example shape of the batched input
    params: tuple[tuple[int, ...], ...] = ()  # shapes of the unbatched params (weight, bias)
    attrs: dict = field(default_factory=dict)
    values: str = "normal"                    # normal | ties | nan | neginf


def conv(d, id, x, w, bias=True, **attrs):
    params = (w, (w[0],)) if bias else (w,)
    return Case(f"conv{d}d-{id}", f"conv{d}d", x, params, attrs)


CASES = [
    conv(2, "plain", (3, 7, 6), (4, 3, 3, 3)),
    conv(2, "stride-pad-odd", (3, 9, 7), (5, 3, 3, 2), stride=(2, 1), padding=(1, 2)),
    conv(2, "stride-int-pad-int", (2, 8, 9), (3, 2, 3, 3), stride=2, padding=1),
    conv(2, "dilation", (2, 9, 8), (3, 2, 3, 3), dilation=2, padding=2, stride=2),
    conv(2, "dilation-tuple", (2, 9, 8), (3, 2, 2, 3), dilation=(3, 1), padding=(0, 1)),
    conv(2, "groups", (4, 6, 5), (6, 2, 3, 3), groups=2, padding=1),
    conv(2, "depthwise", (3, 6, 6), (3, 1, 3, 3), groups=3, padding=1),
    conv(2, "depthwise-x2", (3, 7, 6), (6, 1, 3, 3), groups=3, stride=2, padding=1),
    conv(2, "same-even", (2, 7, 6), (3, 2, 4, 2), padding="same"),
    conv(2, "same-even-dilated", (2, 7, 8), (3, 2, 2, 4), padding="same", dilation=(3, 2)),
    conv(2, "valid", (2, 6, 5), (3, 2, 2, 3), bias=False, padding="valid"),
    conv(2, "1x1-stride", (3, 5, 7), (2, 3, 1, 1), stride=2),
    conv(2, "1-tuple", (2, 6, 6), (2, 2, 3, 3), stride=(2,), padding=(1,)),
    conv(1, "plain", (3, 11), (4, 3, 3)),
    conv(1, "stride-pad-dilation", (3, 13), (4, 3, 3), stride=3, padding=2, dilation=2),
    conv(1, "groups", (4, 9), (2, 2, 4), groups=2, stride=2, padding=1),
    conv(1, "depthwise-x2", (3, 8), (6, 1, 3), groups=3, padding=1),
    conv(1, "same-even", (2, 9), (3, 2, 4), padding="same", dilation=3),
    conv(1, "valid", (2, 7), (3, 2, 5), bias=False, padding="valid"),

    Case("max_pool2d-k3s2p1", "max_pool2d", (2, 7, 7), attrs=dict(kernel_size=3, stride=2, padding=1)),
    Case("max_pool2d-rect", "max_pool2d", (2, 7, 8), attrs=dict(kernel_size=(2, 3))),
    Case("max_pool2d-overlap", "max_pool2d", (2, 5, 6), attrs=dict(kernel_size=2, stride=1)),
    Case("max_pool2d-mixed", "max_pool2d", (1, 9, 7),
         attrs=dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 1))),
    Case("max_pool2d-ties", "max_pool2d", (2, 7, 7),
         attrs=dict(kernel_size=3, stride=2, padding=1), values="ties"),
    Case("max_pool2d-ties-overlap", "max_pool2d", (2, 6, 6),
         attrs=dict(kernel_size=3, stride=1), values="ties"),
    Case("max_pool2d-nan", "max_pool2d", (2, 6, 6),
         attrs=dict(kernel_size=3, stride=1, padding=1), values="nan"),
    Case("max_pool2d-neginf", "max_pool2d", (2, 6, 6),
         attrs=dict(kernel_size=3, stride=2, padding=1), values="neginf"),
    Case("max_pool1d-k3s2p1", "max_pool1d", (3, 10), attrs=dict(kernel_size=3, stride=2, padding=1)),
    Case("max_pool1d-default-stride", "max_pool1d", (3, 11), attrs=dict(kernel_size=(2,))),
    Case("max_pool1d-ties", "max_pool1d", (3, 12), attrs=dict(kernel_size=4, stride=1, padding=2),
         values="ties"),
    Case("max_pool1d-nan", "max_pool1d", (3, 12), attrs=dict(kernel_size=3, stride=1), values="nan"),
    Case("max_pool1d-neginf", "max_pool1d", (3, 10), attrs=dict(kernel_size=4, stride=3, padding=2),
         values="neginf"),
    # ceil_mode: a last window clipped at the end (8 wide, k3 s2: 4 windows, not 3); with
    # dilation; avg_pool1d-ceil below: none starting in the padding after (4, not 5)
    Case("max_pool2d-ceil", "max_pool2d", (2, 8, 7), attrs=dict(kernel_size=3, stride=2,
                                                                ceil_mode=True)),
    Case("max_pool2d-ceil-pad-dilation", "max_pool2d", (2, 8, 9),
         attrs=dict(kernel_size=(3, 2), stride=(2, 3), padding=1, dilation=(2, 1),
                    ceil_mode=True)),
    Case("max_pool2d-dilation", "max_pool2d", (2, 7, 7),
         attrs=dict(kernel_size=2, stride=1, dilation=2)),
    Case("max_pool2d-ceil-ties", "max_pool2d", (2, 6, 6),
         attrs=dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), values="ties"),
    Case("max_pool1d-ceil-dilation", "max_pool1d", (3, 10),
         attrs=dict(kernel_size=3, stride=3, padding=1, dilation=2, ceil_mode=True)),
]
for _inc in (True, False):
    _tag = "incl" if _inc else "excl"
    CASES += [
        Case(f"avg_pool2d-k3s2p1-{_tag}", "avg_pool2d", (2, 7, 7),
             attrs=dict(kernel_size=3, stride=2, padding=1, count_include_pad=_inc)),
        Case(f"avg_pool2d-rect-{_tag}", "avg_pool2d", (2, 6, 9),
             attrs=dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), count_include_pad=_inc)),
        Case(f"avg_pool2d-default-stride-{_tag}", "avg_pool2d", (2, 7, 8),
             attrs=dict(kernel_size=2, count_include_pad=_inc)),
        Case(f"avg_pool1d-k4s3p2-{_tag}", "avg_pool1d", (3, 11),
             attrs=dict(kernel_size=4, stride=3, padding=2, count_include_pad=_inc)),
        Case(f"avg_pool1d-overlap-{_tag}", "avg_pool1d", (3, 9),
             attrs=dict(kernel_size=3, stride=1, padding=1, count_include_pad=_inc)),
        # ceil_mode: the divisor counts the padding (or not) but never the overhang
        Case(f"avg_pool2d-ceil-{_tag}", "avg_pool2d", (2, 8, 7),
             attrs=dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                        count_include_pad=_inc)),
        Case(f"avg_pool1d-ceil-{_tag}", "avg_pool1d", (3, 10),
             attrs=dict(kernel_size=4, stride=3, padding=2, ceil_mode=True,
                        count_include_pad=_inc)),
    ]
CASES += [
    Case("global_avg_pool-2d", "global_avg_pool", (3, 5, 4)),
    Case("global_avg_pool-1d", "global_avg_pool", (3, 7)),
    Case("pad-last", "pad", (3, 5, 4), attrs=dict(pad=(1, 2), value=0.5)),
    Case("pad-two", "pad", (3, 5, 4), attrs=dict(pad=(0, 1, 2, 0))),
    Case("pad-all", "pad", (3, 5, 4), attrs=dict(pad=(1, 0, 0, 2, 1, 1), value=-1.0)),
    Case("pad-1d-channels", "pad", (3, 5), attrs=dict(pad=(2, 1, 1, 0))),
    Case("pad-zero", "pad", (3, 5), attrs=dict(pad=(0, 0))),
    Case("slice-neg-start", "slice", (3, 5, 6), attrs=dict(axis=-1, start=-3)),
    Case("slice-step", "slice", (3, 7, 6), attrs=dict(axis=1, start=1, stop=-1, step=2)),
    Case("slice-clamped", "slice", (5, 4), attrs=dict(axis=0, start=-10, stop=100, step=3)),
    Case("slice-neg-stop", "slice", (4, 9), attrs=dict(axis=-1, stop=-2, step=3)),
    Case("slice-empty", "slice", (4, 9), attrs=dict(axis=1, start=6, stop=2)),
    Case("slice-defaults", "slice", (4, 9), attrs=dict(axis=-2)),
    Case("transpose-reverse", "transpose", (3, 5, 4), attrs=dict(perm=None)),
    Case("transpose-swap", "transpose", (3, 5, 4), attrs=dict(perm=(1, 0, 2))),
    Case("transpose-negative", "transpose", (3, 5, 4), attrs=dict(perm=(-1, 0, 1))),
    Case("layer_norm-last-wb", "layer_norm", (3, 5, 4), ((4,), (4,)), dict(axes=(-1,))),
    Case("layer_norm-two-w", "layer_norm", (3, 5, 4), ((5, 4),), dict(axes=(-2, -1), eps=1e-3)),
    Case("layer_norm-all-plain", "layer_norm", (3, 5, 4), (), dict(axes=(0, 1, 2))),
    Case("layer_norm-default", "layer_norm", (6,), ((6,), (6,)), {}),
]


# Pooling torch has no form for (padding per side, or over half the kernel; an average's
# dilation): against ONNX's reference implementation (onnx.reference), and finite
# differences. With ceil_mode, the overhang is kept at 1: past it, ONNX's reference pads
# half of it before the input and shifts the windows (torch does not).
ONNX_CASES = [
    Case("max_pool2d-sides", "max_pool2d", (2, 7, 6),
         attrs=dict(kernel_size=3, stride=2, padding=((0, 2), (2, 1)))),
    Case("max_pool1d-sides-ceil-dilation", "max_pool1d", (3, 9),
         attrs=dict(kernel_size=3, stride=3, dilation=2, padding=((3, 1),), ceil_mode=True)),
    Case("avg_pool2d-dilation-ceil", "avg_pool2d", (2, 7, 6),
         attrs=dict(kernel_size=2, stride=2, dilation=2, ceil_mode=True,
                    count_include_pad=False)),
]
for _inc in (True, False):
    ONNX_CASES += [
        Case(f"avg_pool2d-sides-{'incl' if _inc else 'excl'}", "avg_pool2d", (2, 6, 7),
             attrs=dict(kernel_size=(3, 2), stride=(2, 1), padding=((2, 0), 1),
                        count_include_pad=_inc)),
        Case(f"avg_pool1d-sides-ceil-{'incl' if _inc else 'excl'}", "avg_pool1d", (2, 9),
             attrs=dict(kernel_size=3, stride=2, padding=((2, 1),), ceil_mode=True,
                        count_include_pad=_inc)),
    ]


def make_args(case: Case, n: int, rng) -> list[np.ndarray]:
    x = rng.normal(size=(n,) + case.x)
    if case.values == "ties":
        x = rng.integers(0, 3, size=x.shape).astype(np.float64)
    elif case.values in ("nan", "neginf"):
        special = NAN if case.values == "nan" else NEGINF
        x[rng.uniform(size=x.shape) < 0.25] = special
        x[..., :2] = special                  # also windows of specials only, at the edge
        if x.ndim == 4:
            x[..., :2, :] = special
    return [x] + [rng.normal(size=(1,) + s) for s in case.params]


# ---------------------------------------------------------------- torch's side

def torch_forward(torch, case: Case, x, *params):
    F = torch.nn.functional
    a = dict(case.attrs)
    if case.op.startswith("conv"):
        fn = F.conv1d if case.op == "conv1d" else F.conv2d
        return fn(x, params[0], params[1] if len(params) > 1 else None, **a)
    if case.op.startswith(("max_pool", "avg_pool")):
        return getattr(F, case.op)(x, **a)
    if case.op == "global_avg_pool":
        return x.mean(dim=tuple(range(2, x.ndim)))
    if case.op == "pad":
        return F.pad(x, a["pad"], value=a.get("value", 0.0))
    if case.op == "slice":
        axis = a["axis"] % (x.ndim - 1) + 1
        return x[(slice(None),) * axis + (slice(a.get("start"), a.get("stop"), a.get("step")),)]
    if case.op == "transpose":
        perm = a["perm"] if a["perm"] is not None else tuple(range(x.ndim - 1))[::-1]
        return x.permute(0, *(p % (x.ndim - 1) + 1 for p in perm))
    if case.op == "layer_norm":
        k = len(a.get("axes", (-1,)))
        return F.layer_norm(x, x.shape[x.ndim - k:], *params, eps=a.get("eps", 1e-5))
    raise AssertionError(case.op)


def assert_rel(got, want, what, rtol=1e-12):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch {want.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaNs differ"
    finite = ~np.isnan(want)
    assert np.array_equal(got[~finite | np.isinf(want)], want[~finite | np.isinf(want)],
                          equal_nan=True), f"{what}: infinities differ"
    ok = np.isfinite(want)
    if not ok.any():
        return
    scale = max(float(np.abs(want[ok]).max()), 1e-300)
    err = float(np.abs(got[ok] - want[ok]).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_against_torch(torch, case, n):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()) + n)
    args = make_args(case, n, rng)
    op = OPS[case.op]
    out = op.forward(args, case.attrs)

    tx = torch.tensor(args[0], requires_grad=True)
    tp = [torch.tensor(p[0], requires_grad=True) for p in args[1:]]  # params unlifted
    t_out = torch_forward(torch, case, tx, *tp)
    assert_rel(out, t_out.detach().numpy(), "forward")
    assert out.dtype == np.float64

    g = rng.normal(size=out.shape)
    grads = op.vjp(g, args, out, case.attrs)
    assert len(grads) == len(args)
    t_grads = torch.autograd.grad(t_out, [tx] + tp, torch.tensor(g), allow_unused=True)
    for k, (got, a, want) in enumerate(zip(grads, args, t_grads)):
        want = np.zeros(a.shape) if want is None else want.numpy()
        assert got.shape == a.shape, f"cotangent {k}: shape {got.shape}, argument {a.shape}"
        assert_rel(got, want.reshape(a.shape), f"cotangent {k}")


def test_conv_batched_weight_unbatched_x(torch):
    """The other broadcast: a per-example weight and bias with an unbatched input; the
    input's cotangent is summed over the batch."""
    rng = np.random.default_rng(5)
    n, attrs = 3, dict(stride=2, padding=1, groups=2)
    x, w, b = rng.normal(size=(1, 4, 7, 6)), rng.normal(size=(n, 6, 2, 3, 3)), rng.normal(size=(n, 6))
    out = OPS["conv2d"].forward([x, w, b], attrs)
    g = rng.normal(size=out.shape)
    gx, gw, gb = OPS["conv2d"].vjp(g, [x, w, b], out, attrs)
    tx = torch.tensor(x[0], requires_grad=True)
    want_gx = np.zeros(x.shape)
    for i in range(n):
        tw, tb = torch.tensor(w[i], requires_grad=True), torch.tensor(b[i], requires_grad=True)
        y = torch.nn.functional.conv2d(tx[None], tw, tb, **attrs)[0]
        assert_rel(out[i], y.detach().numpy(), f"forward {i}")
        ggx, ggw, ggb = torch.autograd.grad(y, [tx, tw, tb], torch.tensor(g[i]))
        want_gx[0] += ggx.numpy()
        assert_rel(gw[i], ggw.numpy(), f"weight cotangent {i}")
        assert_rel(gb[i], ggb.numpy(), f"bias cotangent {i}")
    assert_rel(gx, want_gx, "input cotangent")


@pytest.mark.parametrize("op, attrs, shapes", [
    ("conv2d", dict(stride=2, padding=1, groups=2), [(3, 4, 9, 8), (1, 6, 2, 3, 3), (1, 6)]),
    ("max_pool2d", dict(kernel_size=3, stride=2, padding=1), [(3, 4, 9, 8)]),
    ("avg_pool2d", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
     [(3, 4, 9, 8)]),
    ("layer_norm", dict(axes=(-2, -1)), [(3, 4, 9, 8), (1, 9, 8), (1, 9, 8)]),
])
def test_float32_keeps_its_dtype(op, attrs, shapes):
    rng = np.random.default_rng(1)
    args64 = [rng.normal(size=s) for s in shapes]
    args32 = [a.astype(np.float32) for a in args64]
    out64, out32 = OPS[op].forward(args64, attrs), OPS[op].forward(args32, attrs)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0, atol=1e-5 * np.abs(out64).max())
    g = rng.normal(size=out64.shape)
    for c32, c64 in zip(OPS[op].vjp(g.astype(np.float32), args32, out32, attrs),
                        OPS[op].vjp(g, args64, out64, attrs)):
        assert c32.dtype == np.float32
        np.testing.assert_allclose(c32, c64, rtol=0, atol=1e-5 * np.abs(c64).max())


def test_empty_batch():
    x = np.zeros((0, 3, 6, 5))
    w, b = np.ones((1, 4, 3, 3, 3)), np.ones((1, 4))
    assert OPS["conv2d"].forward([x, w, b], dict(padding=1)).shape == (0, 4, 6, 5)
    assert OPS["max_pool2d"].forward([x], dict(kernel_size=2)).shape == (0, 3, 3, 2)
    gx, gw, gb = OPS["conv2d"].vjp(np.zeros((0, 4, 6, 5)), [x, w, b], None, dict(padding=1))
    assert gx.shape == x.shape and not gw.any() and not gb.any()
    gx, = OPS["max_pool2d"].vjp(np.zeros((0, 3, 3, 2)), [x], None, dict(kernel_size=2))
    assert gx.shape == x.shape


@pytest.mark.parametrize("op, attrs, shapes", [
    ("conv2d", dict(padding="same", stride=2), [(1, 2, 5, 5), (1, 3, 2, 2, 2)]),
    ("conv2d", dict(groups=2), [(1, 3, 5, 5), (1, 4, 1, 2, 2)]),
    ("conv1d", dict(stride=(1, 1)), [(1, 2, 5), (1, 3, 2, 2)]),
    ("conv1d", dict(), [(1, 2, 3), (1, 3, 2, 4)]),
    ("max_pool1d", dict(kernel_size=2, padding=2), [(1, 2, 5)]),
    ("layer_norm", dict(axes=(0,)), [(1, 2, 5)]),
    ("transpose", dict(perm=(0, 0)), [(1, 2, 5)]),
    ("pad", dict(pad=(1,)), [(1, 2, 5)]),
])
def test_rejected_geometry(op, attrs, shapes):
    with pytest.raises(ValueError):
        OPS[op].forward([np.zeros(s) for s in shapes], attrs)


@pytest.mark.parametrize("case", ONNX_CASES, ids=lambda c: c.id)
def test_pooling_against_onnx_reference(case):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator
    a, d = case.attrs, len(case.x) - 1

    def per_axis(v):
        return list(v) * (d // len(v)) if isinstance(v, tuple) else [v] * d
    sides = [p if isinstance(p, tuple) else (p, p) for p in per_axis(a.get("padding", 0))]
    attrs = dict(kernel_shape=per_axis(a["kernel_size"]), strides=per_axis(a["stride"]),
                 dilations=per_axis(a.get("dilation", 1)), ceil_mode=int(a.get("ceil_mode", 0)),
                 pads=[b for b, _ in sides] + [e for _, e in sides])
    if case.op.startswith("avg"):
        attrs["count_include_pad"] = int(a["count_include_pad"])
    node = onnx.helper.make_node("MaxPool" if case.op.startswith("max") else "AveragePool",
                                 ["x"], ["y"], **attrs)
    x = np.random.default_rng(zlib.crc32(case.id.encode())).normal(size=(3,) + case.x)
    model = onnx.helper.make_model(
        onnx.helper.make_graph([node], "pool", [onnx.helper.make_tensor_value_info(
            "x", onnx.TensorProto.DOUBLE, None)], [onnx.helper.make_tensor_value_info(
                "y", onnx.TensorProto.DOUBLE, None)]),
        opset_imports=[onnx.helper.make_opsetid("", 22)])
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    assert_rel(OPS[case.op].forward([x], a), want, "forward")


# ---------------------------------------------------------------- finite differences

FD_CASES = [c for c in CASES + ONNX_CASES if c.values == "normal"]


@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: c.id)
def test_vjp_finite_differences(case):
    """<vjp(g), t> against (L(a + eps·t) - L(a - eps·t)) / 2eps with L = <forward, g>, for
    each argument along 3 random unit directions. The error is relative to |vjp(g)|, the
    largest directional derivative: one along a single random direction can be small by
    cancellation, and then rounding in L alone exceeds 1e-6 of it."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    op, attrs, eps = OPS[case.op], case.attrs, 1e-5
    args = make_args(case, 2, rng)
    out = op.forward(args, attrs)
    g = rng.normal(size=out.shape)
    grads = op.vjp(g, args, out, attrs)

    def loss(k, a):
        return float(np.sum(op.forward(args[:k] + [a] + args[k + 1:], attrs) * g))

    for k, a in enumerate(args):
        for _ in range(3):
            t = rng.normal(size=a.shape)
            t /= np.linalg.norm(t)
            numeric = (loss(k, a + eps * t) - loss(k, a - eps * t)) / (2 * eps)
            analytic = float(np.sum(grads[k] * t))
            scale = max(float(np.linalg.norm(grads[k])), abs(numeric), 1e-12)
            assert abs(analytic - numeric) < 1e-6 * scale, \
                f"argument {k}: analytic {analytic}, numeric {numeric}, |vjp| {scale}"
