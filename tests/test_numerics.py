"""Regressions from an adversarial run: wrong numbers, C that did not build, specs that hung.

Each test failed on the code before its fix. Models are built with the suite's strict flags
(conftest.compile_strict) and compared with the NumPy reference, and with torch where the
reference shared the fault (NaN through relu, swish's gradient at -100).
"""

from __future__ import annotations

import functools
import json
import re
import time

import numpy as np
import pytest
import sympy as sp

import graphc
from graphc.cli import main
from graphc.errors import SpecError
from graphc.functions import (DEFINED_FUNCTIONS, expand_definitions, sigmoid, softplus,
                              stable_forms)

from conftest import compile_strict


@functools.lru_cache(maxsize=None)
def strict(spec_json: str, dtype: str):
    return compile_strict(json.loads(spec_json), dtype)


def model(spec: dict, dtype: str = "float64"):
    return strict(json.dumps(spec), dtype)


def same_as_reference(m, data, rtol=1e-12):
    """Outputs, loss and every gradient of the C model equal the float64 reference's."""
    ref = graphc.reference(m.graph)
    ref.set_params(m.get_params())
    got, want = m.forward(**data), ref.forward(**data)
    for o in want:
        np.testing.assert_allclose(got[o], want[o], rtol=rtol, atol=rtol, err_msg=o)
    loss, grads = m.gradients(**data)
    ref_loss, ref_grads = ref.gradients(**data)
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    for p in grads:
        np.testing.assert_allclose(grads[p], ref_grads[p], rtol=rtol, atol=rtol, err_msg=p)


def normal_params(shapes: dict) -> dict:
    return {k: {"shape": s, "init": "normal", "std": 1.0} for k, s in shapes.items()}


def formula_spec(expr: str, name: str = "f", width: int = 3) -> dict:
    """x (+ a param c) -> a = expr(h) -> mse: the formula's gradient reaches c."""
    return {"name": name, "inputs": {"x": [width], "y": [width]},
            "params": {"c": {"shape": [width], "init": "zeros"}},
            "nodes": {"h": {"op": "add", "inputs": ["x", "c"]},
                      "a": {"op": "elementwise", "inputs": ["h"], "expr": expr},
                      "loss": {"op": "mse", "inputs": ["a", "y"]}},
            "outputs": ["a"], "loss": "loss"}


# ---------------------------------------------------------------- wrong numbers

@pytest.mark.parametrize("order", ["a1 first", "z first"])
def test_concat_slice_feeding_a_dense_backward(order):
    """Fusion made the concat's backward slice (a1.grad = c.grad[:, :5]) the epilogue of
    dense's 8-wide input-gradient reduction: W1's and b1's gradients were ~100% wrong."""
    parts = ["a1", "z"] if order == "a1 first" else ["z", "a1"]
    spec = {"name": "cat", "inputs": {"x": [4], "z": [3], "y": [2]},
            "params": normal_params({"W1": [5, 4], "b1": [5], "W2": [2, 8], "b2": [2]}),
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W1", "b1"]},
                      "a1": {"op": "tanh", "inputs": ["h"]},
                      "c": {"op": "concat", "inputs": parts},
                      "out": {"op": "dense", "inputs": ["c", "W2", "b2"]},
                      "loss": {"op": "mse", "inputs": ["out", "y"]}},
            "outputs": ["out"], "loss": "loss"}
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(3, 4)), "z": rng.normal(size=(3, 3)),
            "y": rng.normal(size=(3, 2))}
    for dtype in ("float64", "float32"):
        m = model(spec, dtype)
        m.init_params(1)
        same_as_reference(m, data, 1e-12 if dtype == "float64" else 2e-5)


CANCELLED = {"name": "cancel", "inputs": {"x": [3], "y": [3]},
             "params": {"c": {"shape": [3], "init": "ones"}},
             "nodes": {"h": {"op": "elementwise", "inputs": ["x", "c"], "expr": "x - x + c"},
                       "loss": {"op": "mse", "inputs": ["h", "y"]}},
             "outputs": ["h"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1}}


def test_an_input_the_formula_cancels_still_gives_the_batch_size(tmp_path):
    """`x - x + c` reads no x in the C: forward returned shape (0, 3), the loss was NaN and
    one SGD step made every param -inf; `graphc check` died with a traceback."""
    m = model(CANCELLED)
    x = np.arange(12.0).reshape(4, 3)
    y = np.ones((4, 3)) * 3
    out = m.forward(x=x)["h"]
    assert out.shape == (4, 3) and np.all(out == 1)
    same_as_reference(m, {"x": x, "y": y})
    assert "(void)in_x;" in m.c_source   # in the signature, read by nothing
    loss = m.train_step(x=x, y=y)
    assert loss == pytest.approx(4.0)
    np.testing.assert_allclose(m.get_params()["c"], 1 + 0.1 * 2 * 2 / 3)   # c - lr·2(c-y)/3
    path = tmp_path / "cancel.json"
    path.write_text(json.dumps(CANCELLED))
    assert main(["check", str(path)]) == 0


def test_large_integer_constants_print_as_floating_constants():
    """`h * 10**20` was printed as an integer literal: `integer constant is too large`,
    and the value was wrong by 92% even in float64."""
    m = model(formula_spec("h * 10**20 + 3**40 * h**3 + 7"))
    code = re.sub(r"/\*.*?\*/", "", m.c_source, flags=re.S)   # the C without its comments
    assert "100000000000000000000" not in code and "1e+20*" in code
    assert "12157665459056928801" not in code and "1.2157665459056929e+19*" in code
    rng = np.random.default_rng(2)
    same_as_reference(m, {"x": rng.normal(size=(2, 3)), "y": rng.normal(size=(2, 3)) * 1e20})


# The named activations of graphc.ops, each with attributes to test it at: name -> (op, attrs).
ACTIVATIONS = {"gelu": ("gelu", {}), "gelu tanh": ("gelu", {"approximate": "tanh"}),
               "silu": ("silu", {}), "softplus": ("softplus", {}),
               "softplus beta 2 threshold 6": ("softplus", {"beta": 2.0, "threshold": 6.0}),
               "elu": ("elu", {}), "elu alpha 0.5": ("elu", {"alpha": 0.5}), "selu": ("selu", {}),
               "hard_sigmoid": ("hard_sigmoid", {}), "hard_swish": ("hard_swish", {}),
               "mish": ("mish", {})}


@pytest.mark.parametrize("expr", ["abs(atan(1 / (softplus(P) + 0.5)))", "log(10**20) * P / 46"])
def test_formulas_found_by_the_differential_search_compile_and_verify(expr):
    """|u| of a u SymPy cannot prove real differentiated to re() and im(), which C has no
    form for; a constant derivative (log(10**20)/46) went to `simplify` for an output form
    and took over a minute. Both compile now, and verify against the reference and finite
    differences."""
    spec = {"name": "found", "inputs": {"x": [3]}, "params": {"P": [3]},
            "nodes": {"e": {"op": "elementwise", "inputs": ["P", "x"], "expr": f"({expr}) * x"},
                      "s": {"op": "sum", "inputs": ["e"]}}, "outputs": ["e"], "loss": "s"}
    started = time.process_time()
    report = graphc.compile(spec, dtype="float64").verify()
    assert report.ok, report
    assert time.process_time() - started < 20


def test_a_non_finite_conv_weight_reaches_the_padded_outputs():
    """Padding contributes 0·w, NaN for a NaN or infinite w, as torch computes it: the
    guarded read is a term of value 0, never a skipped one."""
    spec = {"name": "nanconv", "inputs": {"x": [1, 2], "w": [1, 1, 1]},
            "nodes": {"y": {"op": "conv1d", "inputs": ["x", "w"], "padding": 1}},
            "outputs": ["y"]}
    model = graphc.compile(spec)
    x = np.array([[[1.0, 2.0]]])
    nan = model.forward(x=x, w=np.full((1, 1, 1, 1), np.nan))["y"]
    assert np.isnan(nan).all(), nan
    inf = model.forward(x=x, w=np.full((1, 1, 1, 1), np.inf))["y"]
    np.testing.assert_array_equal(inf, [[[np.nan, np.inf, np.inf, np.nan]]])


def test_nan_propagates_through_every_op(assert_close):
    """relu(NaN) was 0 in the C and the reference (torch: NaN): a diverging model looked
    healthy. Every op and formula function gives NaN where its input is NaN, and the C's
    values elsewhere are the reference's."""
    ops = [(op, {}) for op in ("relu", "leaky_relu", "sigmoid", "tanh", "exp", "softmax",
                               "log_softmax")] + list(ACTIVATIONS.values())
    formulas = ["relu(x)", "abs(x)", "max(x, 0)", "max(0, x)", "min(x, 0)", "min(0, x)",
                "sigmoid(x)", "softplus(x)", "max(max(x, 1), 2)", "tanh(x) * exp(x)",
                "sqrt(x * x)", "erf(x)", "atan(x)"]
    nodes = {f"op{k}": {"op": op, "inputs": ["x"], **attrs} for k, (op, attrs) in enumerate(ops)}
    nodes.update({f"f{k}": {"op": "elementwise", "inputs": ["x"], "expr": e}
                  for k, e in enumerate(formulas)})
    spec = {"name": "nans", "inputs": {"x": [4]}, "nodes": nodes, "outputs": list(nodes)}
    x = np.array([[0.5, -2.0, 3.0, 1.5], [np.nan, -1.0, 2.0, 0.25]])
    for dtype in ("float64", "float32"):
        got = model(spec, dtype).forward(x=x)
        ref = graphc.reference(model(spec, dtype).graph).forward(x=x)
        for name, value in got.items():
            what = nodes[name].get("expr", nodes[name]["op"])
            row_wide = nodes[name]["op"] in ("softmax", "log_softmax")   # NaN fills the row
            for source, v in (("C", value), ("reference", ref[name])):
                assert np.isnan(v[1, 0]), f"{what} ({dtype}, {source}) of NaN is {v[1, 0]}"
                assert np.all(np.isnan(v[1, 1:])) == row_wide, f"{what} ({dtype}, {source})"
            # (finite there: assert_close refuses NaN and inf)
            assert_close(value[0], ref[name][0], dtype, f"{what} ({dtype}) of a row without NaN")
            if not row_wide:
                assert_close(value[1, 1:], ref[name][1, 1:], dtype,
                             f"{what} ({dtype}) beside the NaN")


def exact_derivative(expr: str, points) -> np.ndarray:
    """The formula's derivative at `points` by mpmath at 40 digits, from the written-out
    formula: independent of graphc's folds and of float overflow."""
    import mpmath
    h = sp.Symbol("h")
    plain = sp.sympify(expr, locals={"sigmoid": lambda u: 1 / (1 + sp.exp(-u)),
                                     "softplus": lambda u: sp.log(1 + sp.exp(u))})
    f = sp.lambdify(h, plain, "mpmath")
    with mpmath.workdps(40):
        return np.array([float(mpmath.diff(f, mpmath.mpf(float(v)))) for v in points])


STABLE_CASES = {"swish": "h * sigmoid(h)", "swish written out": "h / (1 + exp(-h))",
                "README's mish": "h * tanh(log(1 + exp(h)))", "mish": "h * tanh(softplus(h))",
                "softplus written out": "log(1 + exp(h))", "logistic": "exp(h) / (1 + exp(h))"}


@pytest.mark.parametrize("expr", STABLE_CASES.values(), ids=STABLE_CASES.keys())
def test_derived_forms_stay_finite_over_a_wide_range(expr):
    """The gradient of h·sigmoid(h) was inf/inf = NaN for h < -88 in float32 (mish's for
    h > 88), in the C and in the reference; torch gives 0. Over h in [-100, 100] the
    float32 C equals the float64 reference, which equals the formula's exact derivative."""
    width = 201
    h = np.linspace(-100, 100, width)[None, :]
    spec = formula_spec(expr, "wide", width)
    spec["nodes"]["loss"] = {"op": "sum", "inputs": ["a"]}   # dL/dc[k] = a'(h[k])
    m64, m32 = model(spec, "float64"), model(spec, "float32")
    ref = graphc.reference(m64.graph)
    _, want = ref.gradients(x=h, y=h)
    truth = exact_derivative(expr, h[0])
    scale = max(1.0, float(np.max(np.abs(truth))))   # errors count against the slope's scale
    np.testing.assert_allclose(want["c"], truth, rtol=1e-12, atol=1e-12 * scale)
    for m, tol in ((m64, 1e-12), (m32, 2e-6)):
        _, got = m.gradients(x=h, y=h)
        assert np.all(np.isfinite(got["c"])), f"{m.dtype}: {got['c']}"
        np.testing.assert_allclose(got["c"], truth, rtol=tol, atol=tol * scale)
        out = m.forward(x=h)["a"][0]
        np.testing.assert_allclose(out, ref.forward(x=h)["a"][0], rtol=tol, atol=tol * scale)


def _activation_truth():
    """name -> the activation in mpmath, written from torch.nn.functional's definitions."""
    import mpmath as mp

    def elu(x, alpha=1):
        return x if x > 0 else alpha * (mp.exp(x) - 1)

    def hard_sigmoid(x):
        return min(max(x + 3, 0), 6) / 6

    return {"gelu": lambda x: x * (1 + mp.erf(x / mp.sqrt(2))) / 2,
            "gelu tanh": lambda x: x * (1 + mp.tanh(mp.sqrt(2 / mp.pi)
                                                    * (x + mp.mpf(0.044715) * x ** 3))) / 2,
            "silu": lambda x: x / (1 + mp.exp(-x)),
            "softplus": lambda x: x if x > 20 else mp.log(1 + mp.exp(x)),
            "softplus beta 2 threshold 6": lambda x: x if 2 * x > 6 else mp.log(1 + mp.exp(2 * x)) / 2,
            "elu": elu, "elu alpha 0.5": lambda x: elu(x, 0.5),
            "selu": lambda x: mp.mpf("1.0507009873554804934193349852946")
            * elu(x, mp.mpf("1.6732632423543772848170429916717")),
            "hard_sigmoid": hard_sigmoid, "hard_swish": lambda x: x * hard_sigmoid(x),
            "mish": lambda x: x * mp.tanh(mp.log(1 + mp.exp(x)))}


WIDE = 200   # points over [-100, 100]; with an even count none is a kink (0, ±3, 20)


def activations_spec() -> dict:
    """Each activation of ACTIVATIONS on x + c_k, all summed into the loss: dL/dc_k is the
    k-th activation's derivative at x (one model per dtype for the whole table)."""
    nodes, params, terms = {}, {}, []
    for k, (op, attrs) in enumerate(ACTIVATIONS.values()):
        params[f"c{k}"] = {"shape": [WIDE], "init": "zeros"}
        nodes[f"h{k}"] = {"op": "add", "inputs": ["x", f"c{k}"]}
        nodes[f"a{k}"] = {"op": op, "inputs": [f"h{k}"], **attrs}
        nodes[f"s{k}"] = {"op": "sum", "inputs": [f"a{k}"]}
        terms.append(f"s{k}")
    nodes["loss"] = {"op": "elementwise", "inputs": terms, "expr": " + ".join(terms)}
    return {"name": "acts", "inputs": {"x": [WIDE]}, "params": params, "nodes": nodes,
            "outputs": [f"a{k}" for k in range(len(ACTIVATIONS))], "loss": "loss"}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_stay_finite_and_accurate_over_a_wide_range(name):
    """Each named activation's float32 gradient is finite and within 2e-6 (relative to its
    largest slope) of the exact derivative (mpmath, 40 digits) over x in [-100, 100], where
    exp(±x) overflows float32; the float64 C and the reference within 1e-12."""
    import mpmath
    k = list(ACTIVATIONS).index(name)
    # float32 values, so that every model and mpmath see the same numbers
    h = np.linspace(-100, 100, WIDE).astype(np.float32).astype(np.float64)[None, :]
    f = _activation_truth()[name]
    with mpmath.workdps(40):
        value = np.array([float(f(mpmath.mpf(v))) for v in h[0]])
        truth = np.array([float(mpmath.diff(f, mpmath.mpf(v))) for v in h[0]])
    scale = max(1.0, float(np.max(np.abs(truth))))
    m64 = model(activations_spec(), "float64")
    ref = graphc.reference(m64.graph)
    for what, m, tol in (("reference", ref, 1e-12), ("float64 C", m64, 1e-12),
                         ("float32 C", model(activations_spec(), "float32"), 2e-6)):
        grad = m.gradients(x=h)[1][f"c{k}"]
        assert np.all(np.isfinite(grad)), f"{what}: {grad}"
        np.testing.assert_allclose(grad, truth, rtol=tol, atol=tol * scale, err_msg=what)
        np.testing.assert_allclose(m.forward(x=h)[f"a{k}"][0], value, rtol=tol,
                                   atol=tol * scale, err_msg=what)


def _torch_activation(name: str):
    import torch.nn.functional as F
    op, attrs = ACTIVATIONS[name]
    fn = {"gelu": F.gelu, "silu": F.silu, "softplus": F.softplus, "elu": F.elu, "selu": F.selu,
          "hard_sigmoid": F.hardsigmoid, "hard_swish": F.hardswish, "mish": F.mish}[op]
    return lambda t: fn(t, **attrs)


# Every kink (0, ±3, softplus's thresholds 20 and 3), a point just beside each, and the
# extremes; tiled to the model's width.
KINK_GRID = [-100.0, -20.0, -3.5, -3.0, -2.99, -1.0, -0.01, 0.0, 0.01, 0.5, 1.0, 2.99, 3.0,
             3.01, 3.5, 6.0, 19.99, 20.0, 20.01, 100.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_activations_match_torch_at_their_kinks(dtype):
    """Values and gradients of the C (and, in float64, of the reference) equal torch's
    (float64) on KINK_GRID, the kinks included: the slope at each kink is the one torch's
    backward takes (elu'(0) = alpha, selu'(0) = scale·alpha, hardsigmoid'(±3) = 0,
    hardswish'(-3) = 0 and (3) = 1, softplus' = sigmoid at beta·x = threshold)."""
    torch = pytest.importorskip("torch")
    x = np.resize(np.array(KINK_GRID), WIDE)[None, :]
    m = model(activations_spec(), dtype)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    for what, runs in [("C", m)] + ([("reference", graphc.reference(m.graph))]
                                    if dtype == "float64" else []):
        out, (_, grads) = runs.forward(x=x), runs.gradients(x=x)
        for k, name in enumerate(ACTIVATIONS):
            t = torch.tensor(x[0], dtype=torch.float64, requires_grad=True)
            y = _torch_activation(name)(t)
            y.sum().backward()
            # torch's hardsigmoid backward multiplies by 1/6 rounded to float32, even in float64
            slope_tol = 3e-8 if name == "hard_sigmoid" else rtol
            np.testing.assert_allclose(out[f"a{k}"][0], y.detach().numpy(), rtol=rtol,
                                       atol=rtol, err_msg=f"{what}: {name}")
            np.testing.assert_allclose(grads[f"c{k}"], t.grad.numpy(), rtol=slope_tol,
                                       atol=slope_tol, err_msg=f"{what}: {name}'")


def test_max_and_min_split_the_gradient_at_a_tie_like_torch():
    spec = formula_spec("max(h, 1) + min(h, -1) + max(h, h)")
    spec["nodes"]["loss"] = {"op": "sum", "inputs": ["a"]}   # dL/dc = a'(h)
    _, grads = model(spec).gradients(x=np.array([[1.0, -1.0, 0.0]]), y=np.zeros((1, 3)))
    # max(h, 1) gives 1/2 at h = 1, min(h, -1) 1/2 at h = -1, and max(h, h) = h gives 1
    np.testing.assert_allclose(grads["c"], [0.5 + 0 + 1, 0 + 0.5 + 1, 0 + 0 + 1])


# ---------------------------------------------------------------- C that must build

PIECEWISE = {"relu": "relu({0})", "leaky": "leaky_relu", "max": "max({0}, 0.5)",
             "min": "min({0}, 0.5)", "abs": "abs({0})", "clamp": "min(max({0}, 0), 1)",
             "absrelu": "abs(relu({0}))", "maxneg": "max({0}, -{0})", "relu_op": "relu"}


def pairs_spec(pairs) -> dict:
    """h = dense(x, W), then second(first(h)) for each (first, second) as nodes (fused),
    all concatenated into an mse loss."""
    nodes, outs = {}, []

    def apply(kind, src, name):
        how = PIECEWISE[kind]
        if how in ("relu", "leaky_relu"):
            nodes[name] = {"op": how, "inputs": [src]}
        else:
            nodes[name] = {"op": "elementwise", "inputs": [src], "expr": how.format(src)}

    for first, second in pairs:
        inner, outer = f"{first}_1", f"{first}_{second}_2"
        if inner not in nodes:
            apply(first, "h", inner)
        apply(second, inner, outer)
        outs.append(outer)
    nodes["h"] = {"op": "dense", "inputs": ["x", "W"]}
    nodes["total"] = {"op": "concat", "inputs": outs}
    nodes["loss"] = {"op": "mse", "inputs": ["total", "y"]}
    return {"name": "pairs", "inputs": {"x": [3], "y": [4 * len(outs)]},
            "params": normal_params({"W": [4, 3]}), "nodes": nodes, "outputs": ["total"],
            "loss": "loss"}


def test_every_pair_of_piecewise_ops_builds_strictly_and_matches():
    """Two nested piecewise ops printed `false` (no <stdbool.h>): 40 of 81 pairs failed
    to compile. All 81 pairs in one model, in float64. float32's C differs in its literals
    and function names only, so there each kind is nested in itself and in the next: 18
    pairs, each kind twice inside and twice outside (all 81 take ~10 s to generate and
    build)."""
    kinds = list(PIECEWISE)
    every = [(first, second) for first in kinds for second in kinds]
    some = [(first, kinds[(k + shift) % len(kinds)]) for k, first in enumerate(kinds)
            for shift in (0, 1)]
    for dtype, pairs in (("float64", every), ("float32", some)):
        spec = pairs_spec(pairs)
        rng = np.random.default_rng(3)
        data = {"x": rng.normal(size=(5, 3)), "y": rng.normal(size=(5, 4 * len(pairs)))}
        m = model(spec, dtype)
        assert "false" not in m.c_source and "true" not in m.c_source
        same_as_reference(m, data, 1e-12 if dtype == "float64" else 1e-5)


def test_hoisted_calls_leave_no_unused_variable():
    """exp(tanh(p)) hoisted two calls, one of them never used: `unused variable 'u1'`."""
    spec = {"name": "hoist", "inputs": {"x": [3], "y": [3]},
            "params": normal_params({"p": [1], "W": [3, 3]}),
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                      "a": {"op": "elementwise", "inputs": ["h", "p"],
                            "expr": "h * exp(tanh(p)) + tanh(p)"},
                      "loss": {"op": "mse", "inputs": ["a", "y"]}},
            "outputs": ["a"], "loss": "loss"}
    rng = np.random.default_rng(4)
    same_as_reference(model(spec), {"x": rng.normal(size=(3, 3)), "y": rng.normal(size=(3, 3))})


def test_a_model_without_params_builds_strictly_and_trains():
    """The optimizer step printed `for (size_t i = 0; i < 0; ++i)` (-Wtype-limits)."""
    spec = {"name": "noparams", "inputs": {"x": [3], "y": [3]},
            "nodes": {"a": {"op": "tanh", "inputs": ["x"]},
                      "loss": {"op": "mse", "inputs": ["a", "y"]}},
            "outputs": ["a"], "loss": "loss", "optimizer": {"name": "adam"}}
    m = model(spec, "float32")
    x = np.zeros((2, 3), np.float32)
    assert m.train_step(x=x, y=x + 1) == pytest.approx(1.0)
    assert m.optimizer_state()["step"] == 1


@pytest.mark.parametrize("field, spec_change, value", [
    ("expr", {"expr": "1e300 * h"}, "1e+300"),
    ("expr", {"expr": "1e-50 * h * h + h"}, "1e-50"),
    ("alpha", {"op": "leaky_relu", "alpha": 1e-50}, "1e-50")])
def test_float32_constants_out_of_range_are_refused(field, spec_change, value):
    """1e300 overflowed and 1e-50 truncated to zero in float32, each with a compiler
    warning and a wrong value: refused naming the node and field; float64 takes them."""
    spec = formula_spec("h")
    node = spec["nodes"]["a"]
    if "op" in spec_change:
        spec["nodes"]["a"] = {"op": spec_change["op"], "inputs": ["h"],
                              "alpha": spec_change["alpha"]}
    else:
        node.update(spec_change)
    with pytest.raises(SpecError, match=re.escape(f"node 'a': field '{field}': constant {value} "
                                                  "is out of the range of float (float32)")):
        graphc.generate(spec, "float32")
    m = model(spec)   # float64 holds the constant
    if value == "1e-50":   # (1e300·h)² overflows even a double: nothing to compare there
        rng = np.random.default_rng(5)
        same_as_reference(m, {"x": rng.normal(size=(2, 3)), "y": rng.normal(size=(2, 3))})


# ---------------------------------------------------------------- specs that hung

def nested(depth: int, kind: str) -> str:
    if kind == "max":   # each max repeated its argument three times in a Piecewise
        return "max(" * depth + "h" + "".join(f", {k})" for k in range(depth))
    return f"{kind}(" * depth + "h" + ")" * depth


def chain(depth: int, expr: str) -> dict:
    """`depth` elementwise nodes, each applying expr to the previous one (fused into one)."""
    spec = formula_spec("h")
    prev = "h"
    for k in range(depth):
        spec["nodes"][f"a{k}"] = {"op": "elementwise", "inputs": [prev],
                                  "expr": expr.replace("H", prev)}
        prev = f"a{k}"
    spec["nodes"]["a"] = {"op": "elementwise", "inputs": [prev], "expr": prev}
    return spec


GROWTH = {"tanh": lambda d: formula_spec(nested(d, "tanh")),
          "max": lambda d: formula_spec(nested(d, "max")),
          "abs": lambda d: formula_spec(nested(d, "abs")),
          "relu": lambda d: formula_spec(nested(d, "relu")),
          "tanh nodes": lambda d: chain(d, "tanh(H)"),
          "swish nodes": lambda d: chain(d, "H * sigmoid(H)"),
          "relu-leaky nodes": lambda d: chain(d, "relu(H) - 0.1 * relu(-H)")}


@pytest.mark.parametrize("kind", GROWTH)
def test_nesting_grows_the_c_linearly(kind):
    """max(max(max(max(max(h,1),2),3),4),5) (45 bytes) hung for > 200 s; 14 nested tanh or
    a chain of 12-14 tanh nodes grew 3.4x per level. The C for depth 2d is at most about
    twice that for depth d, and depth 24 generates within seconds."""
    sizes = {}
    for depth in (6, 12, 24):
        start = time.perf_counter()
        _, cm = graphc.generate(GROWTH[kind](depth), "float32")
        sizes[depth] = len(cm.source)
        assert time.perf_counter() - start < 60, f"{kind} at depth {depth}"
    assert sizes[24] - sizes[12] <= 2.5 * (sizes[12] - sizes[6]) + 2000, sizes


def test_a_derivative_too_large_to_compile_is_refused():
    """A 1 KiB product of 100 factors has a derivative of 100 products of 99: refused with
    the node, instead of minutes of printing and compiling."""
    expr = "*".join(f"sin({k}*h)" for k in range(1, 101))
    assert len(expr) < 1024
    with pytest.raises(SpecError, match=r"node 'a': field 'expr': the derivative with respect "
                                        r"to h grows past 20000 terms"):
        graphc.generate(formula_spec(expr), "float32")


# ---------------------------------------------------------------- the defined functions

@pytest.mark.parametrize("cls", DEFINED_FUNCTIONS, ids=lambda c: c.__name__)
def test_defined_functions_differentiate_as_their_definitions(cls):
    """sympy.diff of each function (its fdiff, derived and folded) equals the derivative of
    its written-out definition: SymPy proves it."""
    x = sp.Symbol("x", real=True)
    args = (x, sp.Rational(1, 10)) if cls.nargs == {2} else (x,)
    folded = expand_definitions(sp.diff(cls(*args), x))
    plain = sp.diff(cls.definition(*args), x)
    assert sp.simplify(sp.piecewise_fold(folded - plain)) == 0


def test_stable_forms_fold_the_written_out_logistic_and_softplus():
    h = sp.Symbol("h", real=True)
    assert stable_forms(h / (1 + sp.exp(-h))) == h * sigmoid(h)
    assert stable_forms(sp.exp(h) / (1 + sp.exp(h))) == sigmoid(h)
    assert stable_forms(sp.log(1 + sp.exp(2 * h))) == softplus(2 * h)
    assert stable_forms(sp.exp(-h) / (1 + sp.exp(-h)) ** 2) == sigmoid(h) * sigmoid(-h)
    for e in (h / (1 + sp.exp(-h)), sp.exp(-h) / (1 + sp.exp(-h)) ** 2,
              h * sp.tanh(sp.log(1 + sp.exp(h)))):
        assert sp.simplify(expand_definitions(stable_forms(e)) - e) == 0


# ---------------------------------------------------------------- found by the differential test

def _one_formula(expr: str, inputs=("h",)) -> dict:
    return {"name": "diff", "inputs": {"x": [3], "s": []}, "params": normal_params({"r": [3]}),
            "nodes": {"h": {"op": "mul", "inputs": ["x", "r"]},
                      "z": {"op": "elementwise", "inputs": list(inputs), "expr": expr},
                      "loss": {"op": "sum", "inputs": ["z"]}},
            "outputs": ["z"], "loss": "loss"}


@pytest.mark.parametrize("expr, inputs", [
    ("max(h / (1 + h * h), -0.25)", ("h",)),       # the printer's x*(1 + x*x)**-1 in a Max
    ("min(h, relu(4))", ("h",)),                   # max/min of a defined function of numbers
    ("min(max(h, pi), softplus(pi))", ("h",)),
    ("min(log(1 + exp(-e)), h)", ("h",)),          # folded to softplus(-e) inside a Min
    ("log(10**20) * h", ("h",)),                   # the reference's NumPy had no int ufunc
    ("min(s, max(h, 0.3))", ("s", "h"))])          # operands of two shapes
def test_max_min_and_large_constants_that_crashed(expr, inputs):
    rng = np.random.default_rng(6)
    data = {"x": rng.normal(size=(4, 3)), "s": rng.normal(size=(4,))}
    m = model(_one_formula(expr, inputs))
    m.init_params(6)
    same_as_reference(m, {k: v for k, v in data.items() if k in m.graph.inputs})


def test_a_reduction_over_no_loops_names_its_temporaries_once():
    """A loss fused as the epilogue of a reduction over no loops put the body's and the
    epilogue's `const double t0` in one scope: `redefinition of 't0'`."""
    spec = {"name": "scope", "inputs": {"x": [], "c": [], "t": [], "u": []},
            "nodes": {"a": {"op": "elementwise", "inputs": ["x"],
                            "expr": "exp(asin(0.9 * cos(x)))"},
                      "p": {"op": "elementwise", "inputs": ["a", "c"],
                            "expr": "c * a + 0.25 * a * a"},
                      "q": {"op": "bce_with_logits", "inputs": ["t", "u"]},
                      "s": {"op": "sub", "inputs": ["p", "q"]}},
            "outputs": ["a", "s"], "loss": "s"}
    rng = np.random.default_rng(7)
    data = {"x": rng.normal(size=5), "c": rng.normal(size=5), "t": rng.normal(size=5),
            "u": rng.uniform(size=5)}
    m = model(spec)
    ref = graphc.reference(m.graph)
    for o, v in m.forward(**data).items():
        np.testing.assert_allclose(v, ref.forward(**data)[o], rtol=1e-12)
    np.testing.assert_allclose(m.evaluate(**data)[0], ref.loss(**data), rtol=1e-12)
