"""graphc.explain: the derivation shown to learners is right, complete and renders.

Textbook derivatives per op (from the records `derive` made, the ones the C uses), the
worked numbers against the compiled model, the fully expanded view on a tiny net, every
format, the pictures, the command line, and the HTML page rendered in headless Chromium.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import graphc
from graphc.cli import main
from graphc.explain import explain
from graphc.explain.derivation import sigma

try:   # the SymPy array a buffer's reads index (its elements may be declared real)
    from graphc.ir import array
except ImportError:
    array = sp.IndexedBase

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples/mlp.yaml"
b, i0, i1 = sp.symbols("b i0 i1", integer=True, nonnegative=True)
n = sp.Symbol("n", integer=True, positive=True)


def net(act=None, loss="mse", width=3, **attrs):
    """x[4] -> dense h[width] -> act a -> loss against y[width]."""
    bld = graphc.Builder("t")
    x, y = bld.input("x", [4]), bld.input("y", [width])
    h = bld.dense(x, bld.param("W", [width, 4]), bld.param("c", [width]), name="h")
    a = getattr(bld, act)(h, name="a", **attrs) if act else h
    return bld.build(outputs=[a], loss=getattr(bld, loss)(a, y, name="loss"))


def step(e, node: str, read: str):
    """The chain-rule step of `node` that differentiates with respect to a read of `read`."""
    found = [s for v in e.nodes if v.name == node for s in v.steps
             if str(s.local.wrt.base.label) == read]
    assert len(found) == 1, found
    return found[0]


def at(name, *idx):
    return array(name)[idx]


def _plain(e):
    """e with its array elements free of assumptions (the graph's may be declared real)."""
    e = sp.sympify(e)
    return e.xreplace({x: sp.IndexedBase(str(x.base.label))[x.indices] for x in e.atoms(sp.Indexed)})


def same(a, c) -> bool:
    d = _plain(a) - _plain(c)
    # Functions formulas keep whole (sigmoid, softplus) are compared through their definitions.
    return sp.simplify(d) == 0 or sp.simplify(d.rewrite(sp.exp)) == 0


# ---------------------------------------------------------------- textbook derivatives

def test_sigmoid_prime_is_sigma_one_minus_sigma():
    s = step(explain(net("sigmoid"), wrt="W", expand=False), "a", "h")
    h, a = at("h", b, i0), at("a", b, i0)
    sig = 1 / (1 + sp.exp(-h))
    assert same(s.local.derived, sig * (1 - sig))           # sympy.diff of the formula
    assert s.local.output_form and same(s.local.used, a * (1 - a))   # what the C uses: y(1-y)
    assert same(s.sigmoid_form - sigma(h) * (1 - sigma(h)), 0)       # shown as σ(1-σ)


def test_tanh_prime_is_one_minus_tanh_squared():
    s = step(explain(net("tanh"), wrt="W", expand=False), "a", "h")
    h, a = at("h", b, i0), at("a", b, i0)
    assert same(s.local.derived, 1 - sp.tanh(h) ** 2)
    assert s.local.output_form and same(s.local.used, 1 - a ** 2)


def test_exp_and_log():
    s = step(explain(net("exp"), wrt="W", expand=False), "a", "h")
    assert same(s.local.derived, sp.exp(at("h", b, i0))) and same(s.local.used, at("a", b, i0))
    s = step(explain(net("log"), wrt="W", expand=False), "a", "h")
    assert same(s.local.derived, 1 / at("h", b, i0)) and not s.local.output_form


@pytest.mark.parametrize("act, attrs, slope", [("relu", {}, 0.0), ("leaky_relu", {"alpha": 0.2}, 0.2)])
def test_relu_family_is_one_then_the_slope_and_the_slope_at_the_kink(act, attrs, slope):
    s = step(explain(net(act, **attrs), wrt="W", expand=False), "a", "h")
    h = at("h", b, i0)
    values = [float(s.local.derived.subs(h, v)) for v in (-1.5, 0.0, 2.0)]
    assert values == [slope, slope, 1.0]   # PyTorch's convention: the kink takes the left slope


_ERF = np.vectorize(math.erf)
_SELU = (1.0507009873554805, 1.6732632423543772)   # torch's scale and alpha
# name -> (op, attrs, NumPy forward as torch defines it, a function the shown derivative
# calls, slopes at the kinks: torch's)
ACTIVATIONS = {
    # (gelu's approximate='tanh' is left out: explain's sympy.simplify of its derivative
    # alone takes about 5 s)
    "gelu": ("gelu", {}, lambda x: x * (1 + _ERF(x / np.sqrt(2))) / 2, "erf(", {}),
    "silu": ("silu", {}, lambda x: x / (1 + np.exp(-x)), "sigmoid(h[b, i0])", {}),
    "softplus": ("softplus", {"beta": 2.0}, lambda x: np.log1p(np.exp(2 * x)) / 2,
                 "sigmoid(2·h[b, i0])", {}),
    "elu": ("elu", {"alpha": 0.5}, lambda x: np.where(x > 0, x, 0.5 * np.expm1(x)), "exp(",
            {0.0: 0.5}),
    "selu": ("selu", {}, lambda x: _SELU[0] * np.where(x > 0, x, _SELU[1] * np.expm1(x)),
             "exp(", {0.0: _SELU[0] * _SELU[1]}),
    "hard_sigmoid": ("hard_sigmoid", {}, lambda x: np.clip(x + 3, 0, 6) / 6, "1/6",
                     {-3.0: 0.0, 3.0: 0.0}),
    "hard_swish": ("hard_swish", {}, lambda x: x * np.clip(x + 3, 0, 6) / 6, "1/6",
                   {-3.0: 0.0, 3.0: 1.0}),
    "mish": ("mish", {}, lambda x: x * np.tanh(np.log1p(np.exp(x))), "tanh(softplus(h[b, i0]))",
             {}),
}


@functools.lru_cache(maxsize=None)
def activations_explained():
    """One explanation for a net with every activation of ACTIVATIONS on h (node a<k>)."""
    bld = graphc.Builder("acts")
    x, y = bld.input("x", [4]), bld.input("y", [3 * len(ACTIVATIONS)])
    h = bld.dense(x, bld.param("W", [3, 4]), name="h")
    acts = [getattr(bld, op)(h, name=f"a{k}", **attrs)
            for k, (op, attrs, *_) in enumerate(ACTIVATIONS.values())]
    cat = bld.concat(*acts, name="cat")
    return explain(bld.build(outputs=[cat], loss=bld.mse(cat, y, name="loss")), wrt="W",
                   expand=False)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_named_activations_are_explained_with_their_derivative(name):
    """The step shown for each named activation is its derivative: equal to central
    differences of torch's definition away from the kinks and to torch's slope at them,
    and printed through the function it calls (silu' through sigmoid, ...)."""
    k = list(ACTIVATIONS).index(name)
    _, _, f, calls, kinks = ACTIVATIONS[name]
    e = activations_explained()
    s = step(e, f"a{k}", "h")
    points = np.array([-4.5, -1.5, -0.25, 0.7, 2.0, 5.0])
    shown = [float(s.local.derived.subs(s.local.wrt, v)) for v in points]
    eps = 1e-6
    np.testing.assert_allclose(shown, (f(points + eps) - f(points - eps)) / (2 * eps),
                               rtol=1e-6, atol=1e-8)
    for v, slope in kinks.items():
        assert float(s.local.derived.subs(s.local.wrt, v)) == pytest.approx(slope, rel=1e-15)
    (line,) = [t for t in e.text().splitlines()
               if t.strip().startswith(f"∂a{k}[b, i0]/∂h[b, i0] = ")]
    assert calls in line, line


def test_mse_gradient_is_two_residuals_over_k():
    e = explain(net(None, "mse"), wrt="W", expand=False)
    s = step(e, "loss", "h")
    p, t = at("h", b, i0), at("y", b, i0)
    assert same(s.local.derived, 2 * (p - t) / 3)              # k = 3 elements per example
    assert same(s.kernel.body, 2 * (p - t) / (3 * n))          # times 1/n: L is the batch mean


def test_bce_with_logits_gradient_is_sigmoid_minus_target():
    s = step(explain(net(None, "bce_with_logits", width=2), wrt="W", expand=False), "loss", "h")
    z, t = at("h", b, i0), at("y", b, i0)
    assert same(s.sigmoid_form, (sigma(z) - t) / 2)
    for zv in (-3.0, 0.0, 0.7):   # both branches of the stable formula
        got = s.local.derived.subs({z: zv, t: 0.3})
        assert abs(float(got) - (1 / (1 + np.exp(-zv)) - 0.3) / 2) < 1e-14


def test_softmax_cross_entropy_gradient_is_p_minus_y():
    e = explain(net(None, "softmax_cross_entropy"), wrt="W", expand=False)
    (view,) = [v for v in e.nodes if v.name == "loss"]
    c = view.combined["h"]
    p, y = array("p"), array("y")
    assert same(c.reading, (p[b, i0] - y[b, i0]) / n)
    assert "sums to 1" in c.condition
    # The general form (what the C computes) is p·Σy - y: check it numerically as well.
    logits, target = np.array([0.3, -1.2, 2.0]), np.array([0.2, 0.5, 0.3])
    m, s = logits.max(), np.exp(logits - logits.max()).sum()
    subs = {at("h", 0, k): logits[k] for k in range(3)} | {at("y", 0, k): target[k] for k in range(3)}
    subs |= {at("loss.max", 0): m, at("loss.sumexp", 0): s, n: 1}
    got = [float(c.expr.xreplace({b: 0, i0: k}).doit().xreplace(subs)) for k in range(3)]
    softmax = np.exp(logits - m) / s
    assert np.allclose(got, softmax - target, atol=1e-14)


def test_softmax_vjp_reads_p_times_delta_minus_weighted_mean():
    bld = graphc.Builder("sm")
    x, y = bld.input("x", [3]), bld.input("y", [3])
    h = bld.dense(x, bld.param("W", [3, 3]), name="h")
    g = bld.build(outputs=[], loss=bld.mse(bld.softmax(h, name="p"), y, name="loss"))
    (view,) = [v for v in explain(g, wrt="W", expand=False).nodes if v.name == "p"]
    reading = view.combined["h"].reading
    P, D = array("p"), array("p.grad")
    (total,) = reading.atoms(sp.Sum)
    j = total.limits[0][0]
    assert same(reading, P[b, i0] * (D[b, i0] - sp.Sum(D[b, j] * P[b, j], total.limits[0])))


def test_dense_weight_gradient_is_delta_transpose_times_x():
    e = explain(MLP, wrt="W1", expand=False)
    s = step(e, "h1", "W1")
    assert s.local.derived == at("x", b, i1)
    link = e.params["W1"].chain[-1]
    assert link.matrix.text == "δh1ᵀ·x" and "\\top" in link.matrix.latex
    assert [l.value for l in e.params["W1"].chain] == ["loss", "logits", "a1", "h1", "W1"]
    assert e.params["W1"].paths == [["loss", "logits", "a1", "h1", "W1"]]


def test_the_records_are_derives_own_and_the_c_is_the_emitters():
    from codegen.targets import get_target
    from graphc.derive import derive
    from graphc.pipeline import to_c
    g = graphc.load(MLP)
    e = explain(g, expand=False)
    assert [s.local for s in e.steps] == derive(g).local
    plain = dataclasses.replace(get_target("c99"), vector_bytes=0)   # explain's C: plain loops
    source = to_c(g, "float32", plain).source
    for s in e.steps:
        fn = e.code[s.index]
        assert fn.text in source and f"{fn.name}(" in fn.call
    # Fusion put a1's derivative into the epilogue of logits' contraction: one function.
    assert e.code[step(e, "a1", "h1").index] is e.code[step(e, "logits", "a1").index]


# ---------------------------------------------------------------- numbers

def test_worked_numbers_equal_model_gradients():
    e = explain(MLP, wrt="W1", at="random", expand=False)
    w = e.worked
    assert all(ok for _, _, ok in w.checks), w.checks
    model = graphc.compile(e.graph, dtype="float64")
    model.set_params(w.params)
    _, grads = model.gradients(**w.inputs)
    for p, gr in grads.items():
        assert np.allclose(w.env[f"{p}.grad"], gr, rtol=1e-12, atol=1e-14), p
    first = w.traces["W1"][0]
    assert first.buffer == "W1.grad" and abs(first.value - grads["W1"][first.element]) < 1e-14
    # The hand computation: its terms add up to the element.
    assert abs(sum(t.value for _, t in first.terms) - first.value) < 1e-14
    assert [l.buffer for l in w.traces["W1"]] == ["W1.grad", "h1.grad", "a1.grad", "logits.grad",
                                                 "loss.sumexp.grad"]


def test_worked_example_at_given_arrays():
    g = net("tanh")
    rng = np.random.default_rng(3)
    given = {"x": rng.standard_normal((3, 4)), "y": rng.standard_normal((3, 3)),
             "W": rng.standard_normal((3, 4))}
    e = explain(g, wrt="W", at=given, expand=False)
    model = graphc.compile(g, dtype="float64")
    model.set_params({"W": given["W"]})
    _, grads = model.gradients(x=given["x"], y=given["y"])
    assert np.allclose(e.worked.env["W.grad"], grads["W"], rtol=1e-12, atol=1e-14)
    with pytest.raises(graphc.InputError, match="'z' is neither an input nor a param"):
        explain(g, at={"z": 1.0}, expand=False)


# A worked line's right-hand side, read back as Python: δv[i, j] and v[i, j] are their values.
_READ = re.compile(r"(δ?)([A-Za-z_][\w.]*)\[([\d, ]+)\]")
_POWERS = {c: f"**{k}" for k, c in enumerate("⁰¹²³⁴⁵⁶⁷⁸⁹")}


def _read_back(rhs: str, worked) -> float:
    def value(m):
        name = m.group(2) + (".grad" if m.group(1) else "")
        return f"({float(worked.env[name][tuple(int(i) for i in m.group(3).split(','))])!r})"
    code = _READ.sub(value, rhs).replace("·", "*").translate(str.maketrans(_POWERS))
    return eval(code, {"__builtins__": {}, "n": worked.n, "exp": np.exp, "log": np.log,
                       "tanh": np.tanh})


def _worked_lines(text: str):
    """(right-hand side, printed result) of every worked term line: the line `lhs = terms`,
    then `= numbers`, then `= result`."""
    lines = text.splitlines()
    for sym, nums, res in zip(lines, lines[1:], lines[2:]):
        m = re.fullmatch(r"\s+\S.*? \+?= (.+)", sym)
        if m and nums.lstrip().startswith("= ") and re.fullmatch(r"\s+= (-?[\d.]+(e[+-]\d+)?)", res):
            yield m.group(1), float(res.split("= ")[1])


def test_worked_terms_keep_their_parentheses_and_mean_what_is_computed():
    # mse's δa = (a - y)/n, worked as 1/n times a - y, printed as 1/n·a[0, 0] - y[0, 0].
    e = explain(net("tanh", "mse", width=2), at="random", expand=False)
    t = e.text()
    assert "δa[0, 0] = (1/n)·(a[0, 0] - y[0, 0])" in t
    assert r"\frac{1}{n} \cdot \left(a[0, 0] - y[0, 0]\right)" in e.latex()
    read = 0
    for rhs, result in _worked_lines(t):
        if not any(c in rhs for c in "∂…{Σ"):   # partials by name, omitted terms, cases
            assert _read_back(rhs, e.worked) == pytest.approx(result, rel=1e-5, abs=1e-12), rhs
            read += 1
    assert read >= 4


def test_a_sum_is_bracketed_where_it_would_reach_too_far():
    from graphc.explain.notation import show
    j = sp.Symbol("j", integer=True, nonnegative=True)
    total = sp.Sum(at("a", b, j) * at("h", b, j), (j, 0, 3))
    # Σ_{j} reaches to the end: (Σ_{j} a·h) + 1 is not Σ_{j} (a·h + 1), (Σ)² is not Σ of squares.
    assert show(total + 1).text == "(Σ_{j} a[b, j]·h[b, j]) + 1"
    assert show(total + 1).latex == r"\left(\sum_{j} a[b, j] \cdot h[b, j]\right) + 1"
    assert show(total ** 2).text == "(Σ_{j} a[b, j]·h[b, j])²"
    assert show(at("y", b, i0) - total).text == "y[b, i0] - Σ_{j} a[b, j]·h[b, j]"   # last: as it was


def test_random_inputs_are_drawn_apart_from_the_params(mlp_w1):
    # From one seeded stream, x was a multiple of W1's first elements: every W1[i]/x[i] was
    # he_normal's scale, and the element followed was an artefact of the draw.
    w = mlp_w1.worked
    for name, x in w.inputs.items():
        for p, value in w.params.items():
            x_, v = x.reshape(-1), value.reshape(-1)
            k = min(x_.size, v.size)
            if np.ptp(v[:k]) == 0:   # zeros-initialized
                continue
            assert abs(np.corrcoef(x_[:k], v[:k])[0, 1]) < 0.5, (name, p)
    ratios = w.params["W1"][0] / w.inputs["x"][0]
    assert np.ptp(ratios) > 0.1 * np.max(np.abs(ratios))


_NUMBER = r"\(?-?[\d.]+(?:e[+-]\d+)?\)?"
_SUM = rf"{_NUMBER}(?: (?:×|\+) {_NUMBER})*"


def _printed_sums(text: str):
    """(terms, result) of every worked `a × b + c = r` on the page: a numbers line and the
    result on the next, or `lhs = a + b = r` on one (a δ its kernels added up)."""
    lines = [l.strip() for l in text.splitlines()]
    for line, after in zip(lines, lines[1:] + [""]):
        one = re.fullmatch(rf".* = ({_SUM}) = (-?[\d.]+(?:e[+-]\d+)?)(?:    \[.*\])?", line)
        if one:
            yield one.group(1), one.group(2)
        elif re.fullmatch(rf"= {_SUM}", line) and re.fullmatch(r"= -?[\d.]+(?:e[+-]\d+)?", after):
            yield line[2:], after[2:]


def _adds_up(terms: str, result: str) -> bool:
    """Do the printed numbers, multiplied and added exactly, give the printed result to its
    last digit?"""
    from decimal import Decimal
    from fractions import Fraction
    exact = sum(np.prod([Fraction(f.strip("()")) for f in term.split(" × ")], dtype=object)
                for term in terms.split(" + "))
    return abs(exact - Fraction(result)) <= Fraction(10) ** Decimal(result).as_tuple().exponent / 2


def test_worked_arithmetic_adds_up_as_printed(mlp_w1):
    from graphc.explain.numbers import sum_of_products
    # From the issue: 0.203694 × 1 = 0.203695, the 1 being 1.000003.
    assert not _adds_up("0.203694 × 1", "0.203695")
    shown, total = sum_of_products([(0.2036944, 1.0000031)], 0.2036944 * 1.0000031)
    assert _adds_up(" + ".join(" × ".join(t) for t in shown), total), (shown, total)
    # Cancellation needs more digits; past a float's 17 what is left is the float sum's own
    # rounding (0.1 + 0.2 - 0.3 is 5.55e-17), and the total is the printed arithmetic.
    shown, total = sum_of_products([(0.1 + 1e-12,), (-0.1,)], (0.1 + 1e-12) - 0.1)
    assert _adds_up(" + ".join(t for (t,) in shown), total), (shown, total)
    shown, total = sum_of_products([(0.1,), (0.2,), (-0.3,)], 0.1 + 0.2 - 0.3)
    assert _adds_up(" + ".join(t for (t,) in shown), total), (shown, total)
    pages = [mlp_w1.text()] + [explain(net(act, "mse", width=2), at="random", expand=False, seed=s).text()
                               for act, s in (("tanh", 0), ("sigmoid", 1), ("relu", 2))]
    checked = 0
    for page in pages:
        for terms, result in _printed_sums(page):
            assert _adds_up(terms, result), f"{terms} = {result}"
            checked += 1
    assert checked >= 12


def test_wrt_follows_the_element_asked_for():
    g = net("tanh", "mse", width=2)
    largest = explain(g, wrt="W", at="random", expand=False).worked.traces["W"][0].element
    target = (0, 0) if largest != (0, 0) else (1, 3)
    e = explain(g, wrt=f"W[{target[0]},{target[1]}]", expand=False)   # at: random, to follow it
    lines = e.worked.traces["W"]
    assert e.wrt == ["W"] and e.elements == {"W": target}
    assert [(l.buffer, l.element) for l in lines][:1] == [("W.grad", target)]
    assert [l.buffer for l in lines] == ["W.grad", "h.grad", "a.grad"]   # the whole chain
    assert lines[0].value == pytest.approx(e.worked.grads_c["W"][target], abs=1e-14)
    assert sum(t.value for _, t in lines[0].terms) == pytest.approx(lines[0].value, abs=1e-14)
    text = " ".join(e.text().split())
    assert f"The element followed above: ∂L/∂W[{target[0]}, {target[1]}] (the one asked for)" in text
    assert explain(g, wrt=["W[1, 0]", "c"], expand=False).worked.traces["W"][0].element == (1, 0)
    with pytest.raises(graphc.GraphcError, match="at=None"):   # no worked example to follow it in
        explain(g, wrt="W[0, 0]", at=None, expand=False)


@pytest.mark.parametrize("wrt, message", [
    ("W[2, 0]", "'W[2, 0]' is out of range: W has shape [2, 4], so its elements run from W[0, 0] to W[1, 3]"),
    ("W[0]", "'W[0]' gives 1 index, but W has shape [2, 4], so an element takes 2"),
    ("W[0, i]", "'W[0, i]': an element's indices are integers (W has shape [2, 4])"),
    ("W[0, 0", "expected a param name, or one element of it such as W1[0, 0], got 'W[0, 0'"),
    ("V[0, 0]", "unknown param 'V' (this model's params: W, c)")])
def test_wrt_element_errors_name_the_param_and_its_shape(wrt, message):
    with pytest.raises(graphc.GraphcError, match=re.escape(message)):
        explain(net("tanh", "mse", width=2), wrt=wrt, expand=False)


def test_fully_expanded_loss_equals_the_chain_rule():
    bld = graphc.Builder("tiny")
    x, y = bld.input("x", [2]), bld.input("y", [2])
    h = bld.dense(x, bld.param("W1", [2, 2]), bld.param("b1", [2]), name="h")
    a = bld.sigmoid(h, name="a")
    o = bld.dense(a, bld.param("W2", [2, 2]), name="o")
    g = bld.build(outputs=[o], loss=bld.softmax_cross_entropy(o, y, name="loss"))
    e = explain(g, wrt="W1")            # 10 parameter scalars: expanded by default
    x_ = e.expanded["W1"]
    assert len(x_.checks) == 4 and all(c.ok for c in x_.checks)
    assert all(c.symbolic for c in x_.checks)   # SymPy reduces direct - chain rule to 0
    assert all(c.max_numeric_diff < 1e-12 for c in x_.checks)
    assert x_.loss.has(at("W1", 0, 0)) and "Fully expanded" in e.text()
    assert not explain(MLP, wrt="W1").expanded   # 2410 scalars: not expanded


# A 2-layer net of 44 parameter scalars, few enough for the expanded view, whose loss
# written out is too long for it (with `h*sigmoid(h)+tanh(h)**2` the view took over a
# minute to build, then only said L was too long to print).
WIDE = """\
name: wide
inputs: {x: [4], y: [2]}
params: {W1: {shape: [6, 4]}, b1: {shape: [6]}, W2: {shape: [2, 6]}, b2: {shape: [2]}}
nodes:
  h: {op: dense, inputs: [x, W1, b1]}
  a: {op: elementwise, inputs: [h], expr: "h*sigmoid(h)+tanh(h)**2"}
  out: {op: dense, inputs: [a, W2, b2]}
  loss: {op: mse, inputs: [out, y]}
outputs: [out]
loss: loss
"""


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs: a C compiler)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.mark.parametrize("at_", ["none", "random"])
def test_explain_bounds_the_expanded_view(tmp_path, at_):
    """In a subprocess with a timeout: unbounded, this did not end for minutes."""
    import sys
    path = tmp_path / "wide.yaml"
    path.write_text(WIDE)
    assert len(WIDE.encode()) <= 1024
    start = _children_cpu()   # CPU seconds: a machine busy with other work slows the wall clock
    run = subprocess.run([sys.executable, "-m", "graphc", "explain", str(path), "--at", at_],
                         capture_output=True, text=True, timeout=90, cwd=ROOT)
    seconds = _children_cpu() - start
    assert run.returncode == 0, run.stderr
    assert seconds < 20, f"graphc explain --at {at_} took {seconds:.1f} CPU seconds"
    out = " ".join(run.stdout.split())     # the note is wrapped to the page width
    assert ("The fully expanded view (L as one expression of the weights, differentiated "
            "directly) is omitted: written out, the loss L grows past 200 operations.") in out
    assert out.count("is omitted") == 1              # one line, not one per param
    assert "The chain rule put together" in out      # the rest is as before
    assert "Fully expanded:" not in out


def test_expanded_view_is_measured_as_it_is_built(tmp_path):
    from graphc.derive import derive
    from graphc.explain.numbers import MAX_LOSS_OPS, TooLarge, expand_all, run_symbolic
    (tmp_path / "wide.yaml").write_text(WIDE)
    g = graphc.load(tmp_path / "wide.yaml")
    d = derive(g)
    with pytest.raises(TooLarge, match=f"the loss L grows past {MAX_LOSS_OPS} operations"):
        run_symbolic(d.gradients)
    with pytest.raises(TooLarge, match="an element of .* grows past 50 operations"):
        run_symbolic(d.gradients, max_ops=50)
    views = expand_all(d.gradients, g, list(g.params))
    assert set(views) == set(g.params)
    assert all(v.skipped and not v.checks for v in views.values())
    # Unbounded, the same program is written out in full: the bound only decides where
    # it stops (the tiny net above still gets its expanded view).
    env = run_symbolic(d.gradients, None, None, None)
    assert sp.count_ops(env["__batch_loss"][0]) > MAX_LOSS_OPS


def test_symbolic_steps_give_up_on_large_expressions_quickly():
    import time

    from graphc.explain.bounds import expansion_work, ops_within, rewritten_within
    from graphc.explain.numbers import is_zero
    x, y = sp.symbols("x y", real=True)
    deep = x
    for _ in range(12):         # 12 levels of tanh: about 12,000 operations as a tree
        deep = sp.tanh(deep + y) * deep
    start = time.perf_counter()
    assert ops_within(deep, 100) is None and ops_within(x + y, 100) == 1
    assert rewritten_within(deep, sp.exp, 2000) is None          # 4x per level, stopped early
    assert rewritten_within(sp.tanh(x), sp.exp, 100) == sp.tanh(x).rewrite(sp.exp)
    assert expansion_work(sp.Mul(*[(x + y + k) ** 3 for k in range(6)]), 4000) is None
    assert is_zero(deep - x) is None                              # too large to try
    assert time.perf_counter() - start < 5
    assert is_zero(sp.tanh(x) ** 2 + 1 / sp.cosh(x) ** 2 - 1) is True
    assert is_zero(sp.tanh(x) - x) is False


def test_movement_ops_and_partial_writes_are_shown_honestly():
    bld = graphc.Builder("mv")
    x, y = bld.input("x", [2, 2]), bld.input("y", [2, 4])
    f = bld.flatten(bld.mul(x, bld.param("s", [2]), name="q"), name="f")
    k = bld.concat(f, f, name="k")
    r = bld.reshape(k, shape=[2, 4], name="r")
    g = bld.build(outputs=[r], loss=bld.mse(r, y, name="loss"))
    e = explain(g, wrt="s", at="random", expand=False)
    assert all(ok for _, _, ok in e.worked.checks), e.worked.checks
    t = e.text()
    assert "r[b, ⌊i0/4⌋, i0 mod 4] = k[b, i0]" in t        # reshape's offset, unravelled
    assert "k = f" not in t and "δf += δk" not in t        # half of k is not all of k
    unused = graphc.Builder("u")
    ux, uy = unused.input("x", [2]), unused.input("y", [2])
    unused.param("idle", [3])
    h = unused.dense(ux, unused.param("W", [2, 2]), name="h")
    t = explain(unused.build(outputs=[h], loss=unused.mse(h, uy, name="loss"))).text()
    assert "idle does not affect the loss: ∂L/∂idle = 0" in t


def test_cli_explain_at_an_npz(tmp_path, capsys):
    g = graphc.load(MLP)
    rng = np.random.default_rng(1)
    path = tmp_path / "at.npz"
    np.savez(path, x=rng.standard_normal((1, 64)), y=np.eye(10)[[3]])
    assert main(["explain", str(MLP), "--wrt", "b2", "--at", str(path)]) == 0
    out = capsys.readouterr().out
    assert "n = 1 example." in out and "MISMATCH" not in out
    assert "δlogits = (p - y)/n" in out and g.name == "mlp"


# ---------------------------------------------------------------- formats and pictures

@pytest.fixture(scope="module")
def mlp_w1():
    return explain(MLP, wrt="W1", at="random")


def w1_grad_function(e) -> str:
    """`static void <name>(`: the C function that computes ∂L/∂W1 (the emitter names it)."""
    return f"static void {e.code[step(e, 'h1', 'W1').index].name}("


def test_text_has_the_whole_story(mlp_w1):
    t = mlp_w1.text()
    for piece in ["L ← loss ← logits ← a1 ← h1 ← W1", "∂h1[b, i0]/∂W1[i0, i1] = x[b, i1]",
                  "∂L/∂W1 = δh1ᵀ·x", "(p[b, i0] - y[b, i0])/n", w1_grad_function(mlp_w1), "Worked example",
                  "vs model.gradients (C)"]:
        assert piece in t, piece
    assert "MISMATCH" not in t and str(mlp_w1) == t


def test_markdown_latex_and_html(mlp_w1):
    md = mlp_w1.markdown()
    assert "$$" in md and "```c" in md and r"\delta_{\mathrm{h1}}^{\top}" in md
    tex = mlp_w1.latex()
    assert tex.startswith("\\documentclass") and tex.rstrip().endswith("\\end{document}")
    assert tex.count("\\begin{verbatim}") == tex.count("\\end{verbatim}")
    verbatim = "".join(re.findall(r"\\begin\{verbatim\}(.*?)\\end\{verbatim\}", tex, re.S))
    assert verbatim.isascii()   # pdflatex's verbatim takes ASCII only
    page = mlp_w1.html()
    assert page.startswith("<!DOCTYPE html>") and page.count("<math") > 50
    assert "<mfrac>" in page and w1_grad_function(mlp_w1) in page
    # Offline: nothing is loaded from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<script" not in page
    assert mlp_w1._repr_html_().startswith('<div class="graphc-explain">')
    assert mlp_w1._repr_markdown_() == md and mlp_w1._repr_latex_().startswith("$$")
    # The pictures are inline SVG when Graphviz draws them, their DOT text when it is absent.
    if shutil.which("dot") is None:
        assert "<svg" not in page and "digraph" in page
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz): the page's "
                    "pictures are not tested")
    assert page.count("<svg") == 2


def _parse_dot(text):
    """A small DOT reader: quoted node statements and edges; checks quoting and braces."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)      # strings out of the way
    assert body.count("{") == body.count("}") == 1
    nodes = re.findall(r'^\s*"((?:[^"\\]|\\.)*)" \[', text, re.M)
    edges = re.findall(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"', text, re.M)
    return nodes, edges


def test_dot_pictures(mlp_w1, tmp_path):
    nodes, edges = _parse_dot(mlp_w1.dot("forward"))
    assert set(mlp_w1.graph.values) == set(nodes) and ("W1", "h1") in edges
    nodes, edges = _parse_dot(mlp_w1.dot("backward"))
    assert {"L", "W1.grad", "h1.grad", "a1.grad", "logits.grad", "loss.sumexp.grad"} <= set(nodes)
    assert ("h1.grad", "W1.grad") in edges and ("L", "logits.grad") in edges
    g = mlp_w1.to_networkx("backward")
    assert "δh1ᵀ" not in g.nodes["W1.grad"]["label"] and "Σ_{b} δh1[b, i0]·x[b, i1]" in g.nodes["W1.grad"]["label"]
    assert g.nodes["W1.grad"].get("color") and not g.nodes["W2.grad"].get("color")  # W1's path lit
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz): rendering not tested")
    svg = mlp_w1.svg("backward")
    assert svg.lstrip().startswith(("<?xml", "<!DOCTYPE", "<svg")) and "δh1" in svg
    png = mlp_w1.render_graph(tmp_path / "backward.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- command line

def test_cli_explain_to_stdout(capsys):
    assert main(["explain", str(MLP), "--wrt", "W1", "--at", "none"]) == 0
    out = capsys.readouterr().out
    assert "∂L/∂W1 = δh1ᵀ·x" in out and "Worked example" not in out


def test_cli_explain_writes_a_file_atomically(tmp_path, capsys):
    target = tmp_path / "sub" / "derivation.html"
    assert main(["explain", str(MLP), "--wrt", "W1", "--format", "html", "-o", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Worked example" in page   # numbers by default
    assert os.listdir(target.parent) == ["derivation.html"]   # no temporary left behind


def test_cli_explain_follows_one_element(capsys):
    assert main(["explain", str(MLP), "--wrt", "W2[3,7]", "--seed", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "The element followed above: ∂L/∂W2[3, 7] (the one asked for)" in out
    assert "∂L/∂W2[3, 7] = δlogits[0, 3]·a1[0, 7] + δlogits[1, 3]·a1[1, 7]" in out
    for wrt, shown in [("W2[10,0]", "W2 has shape [10, 32]"), ("W2[0]", "W2 has shape [10, 32]")]:
        assert main(["explain", str(MLP), "--wrt", wrt]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and shown in err and "mlp.yaml" in err and "Traceback" not in err
    assert main(["explain", str(MLP), "--wrt", "W2[0,0]", "--at", "none"]) == 2
    assert "--at none" in capsys.readouterr().err


def test_cli_explain_bad_wrt_exits_2_naming_the_param(capsys):
    assert main(["explain", str(MLP), "--wrt", "W9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'W9'" in err and "mlp.yaml" in err and "W1, b1, W2, b2" in err


# ---------------------------------------------------------------- convolution and pooling

DIGITS_CNN = ROOT / "examples/digits_cnn.yaml"
# Every new kernel form at once: stride, padding and dilation per axis, groups with 'same'
# padding, max pooling over padding (argmax routing), average pooling that divides by the
# window's elements inside the input, a global average pool.
CONV = {"name": "c", "inputs": {"x": {"shape": [3, 9, 8]}},
        "params": {"W": {"shape": [4, 3, 3, 2]}, "b": {"shape": [4]}, "W2": {"shape": [4, 2, 2, 2]}},
        "nodes": {"y": {"op": "conv2d", "inputs": ["x", "W", "b"], "padding": [1, 2], "stride": [2, 1],
                        "dilation": [1, 2]},
                  "z": {"op": "conv2d", "inputs": ["y", "W2"], "groups": 2, "padding": "same"},
                  "p": {"op": "max_pool2d", "inputs": ["z"], "kernel_size": 2, "padding": 1},
                  "a": {"op": "avg_pool2d", "inputs": ["z"], "kernel_size": 3, "stride": 2, "padding": 1,
                        "count_include_pad": False},
                  "g": {"op": "global_avg_pool", "inputs": ["a"]},
                  "s": {"op": "sum", "inputs": ["p"]}, "t": {"op": "sum", "inputs": ["g"]},
                  "l": {"op": "add", "inputs": ["s", "t"]}},
        "outputs": ["p", "a"], "loss": "l"}


@pytest.fixture(scope="module")
def conv_w():
    return explain(CONV, wrt="W", at="random")


@pytest.fixture(scope="module")
def digits_k1():
    return explain(DIGITS_CNN, wrt="K1", at="random")


_IDENT = re.compile(r"[A-Za-zδ∂_][\w.']*")
_NOT_INDICES = {"if", "otherwise", "mod", "n", "oo"}
_OPEN, _CLOSE = "([{⌊", ")]}⌋"


def unbound_indices(rhs: str, lhs: str) -> list[str]:
    """What is wrong with the indices of a printed right-hand side: an index symbol neither
    on the left nor bound by an enclosing Σ_{...} (or max_, argmax_), or a Σ that binds an
    index the left or an enclosing Σ already uses. A Σ binds up to the end of the bracket
    it stands in (the printer brackets a Σ that does not reach to the end of its term)."""
    def is_index(text, m) -> bool:
        name = text[m.start():m.end()]
        before = text[m.start() - 1] if m.start() else " "
        return not (text[m.end():m.end() + 1] in ("[", "(") or name in _NOT_INDICES
                    or name[0] in "δ∂" or before.isalnum() or before in "._'")

    outer = {m.group() for m in _IDENT.finditer(lhs) if is_index(lhs, m)}
    problems, scopes, depth, i = [], [], 0, 0     # scopes: (depth, names bound there)
    while i < len(rhs):
        binder = re.match(r"(Σ|argmax|max)_\{", rhs[i:])
        if binder and (i == 0 or not rhs[i - 1].isalnum()):
            j, d = i + binder.end(), 1
            while d:
                d += (rhs[j] in _OPEN) - (rhs[j] in _CLOSE)
                j += 1
            sub = rhs[i + binder.end():j - 1]
            names = {m.group() for m in _IDENT.finditer(sub) if is_index(sub, m)}
            in_use = outer.union(*[ns for _, ns in scopes])
            problems += [f"{x} bound again by {binder.group(1)}" for x in sorted(names & in_use)]
            scopes.append((depth, names))
            i = j
            continue
        if rhs[i] in _OPEN:
            depth += 1
        elif rhs[i] in _CLOSE:
            depth -= 1
            scopes = [(d, ns) for d, ns in scopes if d <= depth]
        m = _IDENT.match(rhs, i)
        if m and (i == 0 or not (rhs[i - 1].isalnum() or rhs[i - 1] in "._'")):
            if is_index(rhs, m) and m.group() not in outer.union(*[ns for _, ns in scopes]):
                problems.append(f"{m.group()} is free")
            i = m.end()
            continue
        i += 1
    return problems


def printed_equations(e):
    """(lhs, rhs) of every formula in index notation the page prints (text form): the
    equations, the chain rule, the words; `    = ...` lines continue the one above."""
    from graphc.explain import notation as nt
    from graphc.explain.render import Details, Eqs, P, Row, document
    maths = []

    def walk(blocks):
        for blk in blocks:
            if isinstance(blk, Eqs):
                maths.extend(m.text for m, _ in blk.items)
            elif isinstance(blk, P):
                maths.extend(p.text for p in blk.parts if isinstance(p, nt.Math))
            elif isinstance(blk, Row):
                walk(blk.left)
                walk(blk.right)
            elif isinstance(blk, Details):
                walk(blk.blocks)
    walk(document(e))
    last = ""
    for t in maths:
        m = re.match(r"(.*?) \+?= (.*)", t)
        if not m:
            continue
        lhs = m.group(1).strip() or last
        last = lhs
        if re.search(r"\[[^\]]*[A-Za-z]", lhs):   # index notation (not numbers, not matrices)
            yield lhs, m.group(2).split(", where ")[0] if ", where " in m.group(2) else m.group(2)


def test_the_index_checker_finds_free_and_reused_indices():
    # The line the chain rule printed for the grouped convolution before it was a gather.
    bad = "Σ_{i1} W2[2·i0 + i1, i2, i5, i6]·δz[b, 2·i0 + i1, i3, i4]"
    assert unbound_indices(bad, "δy[b, i0, i1, i2]") == [
        "i1 bound again by Σ", "i5 is free", "i6 is free", "i3 is free", "i4 is free"]
    assert unbound_indices("(Σ_{j0} a[b, j0]) + Σ_{j0} c[j0, i0]", "δy[b, i0]") == []
    assert unbound_indices("(Σ_{j0} a[b, j0]) + c[j0, i0]", "δy[b, i0]") == ["j0 is free"]
    assert unbound_indices("argmax_{2·i3 + i4} z[b, i0, 2·i1 + i3]", "p[b, i0, i1]") == []


EXPLAINED = {"conv W": "conv_w", "digits_cnn K1": "digits_k1", "mlp W1": "mlp_w1"}   # fixtures


@pytest.mark.parametrize("model", list(EXPLAINED))
def test_no_printed_formula_has_a_free_or_reused_index(model, request):
    e = request.getfixturevalue(EXPLAINED[model])
    checked = 0
    for lhs, rhs in printed_equations(e):
        assert unbound_indices(rhs, lhs) == [], f"{lhs} = {rhs}"
        checked += 1
    assert checked >= {"conv W": 40, "digits_cnn K1": 50, "mlp W1": 20}[model]


def formula_values(expr, idx, target, env, batch: int, zero_outside: bool = False,
                   most: int = 300) -> np.ndarray:
    """A printed formula (of its left-hand side's index `idx`) at the elements of `target`
    (every one, or `most` spread over a larger array; the others are left as target's),
    evaluated the way a reader would: cases lazily, Σ as loops, and a read outside its
    array an error, or 0 for a reading that takes the padding as 0."""
    class Reads:
        def __init__(self, a):
            self.a = a

        def __getitem__(self, i):
            i = tuple(int(k) for k in (i if isinstance(i, tuple) else (i,)))
            if any(k < 0 or k >= d for k, d in zip(i, self.a.shape)):
                if zero_outside:
                    return 0.0
                raise IndexError(f"{i} outside {self.a.shape}")
            return float(self.a[i])
    bases = sorted({a.base for a in expr.atoms(sp.Indexed)}, key=str)
    named = {base: sp.IndexedBase(f"A{k}") for k, base in enumerate(bases)}
    e = sp.sympify(expr).xreplace({a: named[a.base][a.indices] for a in expr.atoms(sp.Indexed)})
    f = sp.lambdify([*named.values(), n, *[i for i in idx if isinstance(i, sp.Symbol)]], e,
                    [{"floor": math.floor, "Mod": lambda a, m: a % m}, "math"])
    arrays = [Reads(env[str(base.label)]) for base in bases]
    out = np.array(target, dtype=np.float64, copy=True)
    for flat in np.unique(np.linspace(0, target.size - 1, min(most, target.size)).astype(int)):
        el = np.unravel_index(flat, target.shape)
        out[el] = f(*arrays, batch, *el)
    return out


@pytest.mark.parametrize("model", ["conv W", "digits_cnn K1"])
def test_chain_rule_formulas_compute_the_kernels_numbers(model, request):
    """Each line of the chain rule put together (scatters written as gathers, pooling as a
    read from one window, the transposed convolution), and each node's contribution and its
    textbook reading, evaluated element by element at the worked example, is the δ the
    kernels computed."""
    from graphc.explain.derivation import canonical
    e = request.getfixturevalue(EXPLAINED[model])
    w, bufs = e.worked, e.derivation.gradients.buffers
    checked = 0
    for link in e.params[e.wrt[0]].chain[1:]:
        assert link.expr is not None and not link.kernels, link.value   # every link composed
        target = w.env[f"{link.value}.grad"]
        idx = canonical(f"{link.value}.grad", bufs)
        assert np.max(np.abs(formula_values(link.expr, idx, target, w.env, w.n) - target)) < 1e-12, link.value
        checked += 1
    for view in e.nodes:   # a reading that takes padding as 0 computes what the kernels do
        for u, c in view.combined.items():
            if c.reading is not None and "counts as 0" in (c.condition or ""):
                target = w.env[f"{u}.grad"]
                whole = formula_values(c.expr, c.index, target, w.env, w.n)
                read = formula_values(c.reading, c.index, target, w.env, w.n, zero_outside=True)
                assert np.max(np.abs(read - whole)) < 1e-12, (view.name, u)
                checked += 1
    assert checked >= 6


def test_gathers_read_as_the_transposed_convolution_and_one_window(conv_w, digits_k1):
    chain = {l.value: l for l in digits_k1.params["K1"].chain}
    # max pooling 2x2: each element reads its one window, and δ goes where the max was.
    assert chain["a1"].rhs.text == ("{δp1[b, i0, ⌊i1/2⌋, ⌊i2/2⌋] if 2·(i1 mod 2) + i2 mod 2 = "
                                    "p1.argmax[b, i0, ⌊i1/2⌋, ⌊i2/2⌋]; 0 otherwise}")
    # a 3x3 convolution padded by 1: the transposed convolution, δh2 taken as 0 outside.
    assert chain["p1"].reading.text == \
        "Σ_{j0, j1, j2} K2[j0, i0, j1, j2]·δh2[b, j0, i1 - j1 + 1, i2 - j2 + 1]"
    assert "δh2 counts as 0 outside its array" in chain["p1"].condition
    conv = {l.value: l for l in conv_w.params["W"].chain}
    # groups = 2: input channel i0 belongs to group ⌊i0/2⌋ (no free index, no Σ over i1).
    assert conv["y"].rhs.text.startswith("Σ_{j0, j1, j2} {W2[j0 + 2·⌊i0/2⌋, i0 mod 2, j1, j2]·"
                                         "δz[b, j0 + 2·⌊i0/2⌋, i1 - j1, i2 - j2] if ")
    text = conv_w.text()
    assert "δy[b, i0, i1, i2] = Σ_{i1}" not in text
    # Stride 2 and dilation 2 in the words; p is a node here, so the tap index is p'.
    assert ("In words: ∂L/∂W[o, c, p', q] = Σ_{b, h, w} x[b, c, 2·h + p' - 1, w + 2·q - 2]·"
            "δy[b, o, h, w]") in text
    # A grouped convolution's weight: the input channel is c within o's group.
    grouped = explain(CONV, wrt="W2", expand=False).text()
    assert ("In words: ∂L/∂W2[o, c, p', q] = Σ_{b, h, w} y[b, c + 2·⌊o/2⌋, h + p', w + q]·"
            "δz[b, o, h, w]") in grouped
    # The scatter itself, in the step, says where it runs.
    assert ("δy[b, 2·i0 + i2, i3 + i5, i4 + i6] += Σ_{i1} W2[2·i0 + i1, i2, i5, i6]·"
            "δz[b, 2·i0 + i1, i3, i4], where (i3 + i5 < 5) & (i4 + i6 < 10)") in text


def test_conv_weight_gradient_is_the_correlation_of_input_and_delta(digits_k1):
    """--wrt K1: the summary says it in words, and the followed element's listed products
    add up to it, which is the NumPy reference's gradient; the correlation itself, computed
    in NumPy from x and δh1, is the reference's whole ∂L/∂K1."""
    from graphc.reference import Reference
    e, w = digits_k1, digits_k1.worked
    text = " ".join(e.text().split())
    said = ("In words: ∂L/∂K1[o, c, p, q] = Σ_{b, h, w} x[b, c, h + p - 1, w + q - 1]·δh1[b, o, h, w]: "
            "the gradient of a convolution's weight is the correlation of its input x with δh1, "
            "the gradient at its output.")
    assert said in text
    assert text.count(said) == 2      # in h1's step and in the chain rule put together
    assert "∂L/∂K1[i0, i1, i2, i3] = Σ_{b, j0, j1} δh1[b, i0, j0, j1]·x[b, 0, i2 + j0 - 1, i3 + j1 - 1]" in text
    ref = Reference(e.graph, "float64")
    ref.set_params(w.params)
    _, grads = ref.gradients(**w.inputs)
    first = w.traces["K1"][0]
    (step_,) = {s for s, _ in first.terms}
    assert first.buffer == "K1.grad" and not first.omitted[step_]     # every non-zero term listed
    zeros = first.zeros[step_]
    assert len(first.terms) + zeros.count == w.n * 8 * 8           # b, h, w
    assert zeros.padding == zeros.local > 0                         # a read in the padding
    assert sum(t.value for _, t in first.terms) == pytest.approx(first.value, abs=1e-15)
    assert first.value == pytest.approx(grads["K1"][first.element], abs=1e-14)
    o, c, p, q = first.element
    for _, t in first.terms:   # δh1[b, o, h, w]·x[b, c, h + p - 1, w + q - 1], and their values
        (delta, dv), (read, xv) = t.factors
        bb, oo, h, w_ = delta.indices
        assert str(delta.base.label) == "h1.grad" and oo == o and dv == w.env["h1.grad"][bb, o, h, w_]
        assert tuple(read.indices) == (bb, c, h + p - 1, w_ + q - 1) and xv == w.inputs["x"][read.indices]
    xp = np.pad(w.inputs["x"], ((0, 0), (0, 0), (1, 1), (1, 1)))
    dh1 = w.env["h1.grad"]
    corr = np.einsum("bchwpq,bohw->ocpq", np.lib.stride_tricks.sliding_window_view(
        xp, (3, 3), axis=(2, 3)), dh1)
    np.testing.assert_allclose(corr, grads["K1"], rtol=1e-12, atol=1e-14)
    # The worked line lists the products, says what was left out, and adds up as printed.
    lines = [l for l in e.text().splitlines()
             if re.match(rf"\s*∂L/∂K1\[{', '.join(map(str, first.element))}\] \+?= δh1\[", l)]
    assert lines and f"({zeros.count} more terms, each 0: δh1 is 0 at {zeros.seed}, the local derivative " \
        f"at {zeros.local} (its read lies in the padding))" in lines[0]
    assert sum(1 for _ in _printed_sums(e.text())) >= 8
    for terms, result in _printed_sums(e.text()):
        assert _adds_up(terms, result), f"{terms} = {result}"


def test_worked_conv_element_lists_every_product_that_is_not_0(conv_w):
    """Stride, dilation, padding and a grouped layer above: the followed element of ∂L/∂W
    is the sum of its listed products, every one of them, and the reference's gradient."""
    from graphc.reference import Reference
    w = conv_w.worked
    ref = Reference(conv_w.graph, "float64")
    ref.set_params(w.params)
    _, grads = ref.gradients(**w.inputs)
    for line in w.traces["W"]:
        for s_ in line.parts:
            assert not line.omitted[s_], (line.buffer, line.element)
            listed = sum(t.value for s2, t in line.terms if s2 is s_)
            assert listed == pytest.approx(line.parts[s_], rel=1e-12, abs=1e-15)
    first = w.traces["W"][0]
    assert first.value == pytest.approx(grads["W"][first.element], rel=1e-12)
    assert [l.buffer for l in w.traces["W"]][:3] == ["W.grad", "y.grad", "z.grad"]
    for terms, result in _printed_sums(conv_w.text()):
        assert _adds_up(terms, result), f"{terms} = {result}"


def test_max_pooling_routes_the_gradient_to_the_first_maximum(digits_k1):
    from graphc.explain.numbers import argmax_position
    text = " ".join(digits_k1.text().split())
    assert "p1.argmax[b, i0, i1, i2] = argmax_{2·i3 + i4} a1[b, i0, 2·i1 + i3, 2·i2 + i4]" in text
    assert "The gradient goes to the window's first maximum, as torch does" in text
    (view,) = [v for v in digits_k1.nodes if v.name == "p1"]
    kernels = digits_k1.derivation.gradients.kernels
    assert [kernels[i].mode for i in view.forward] == ["max", "argmax"]   # the argmax is a step
    assert digits_k1.code[view.forward[1]].name in text                  # beside its C
    # The C's scan: the first of tied maxima; the last NaN; 0 when all are -inf.
    windows = np.array([[1.0, 3.0, 3.0, 2.0], [np.nan, 1.0, np.nan, 0.0], [-np.inf] * 4, [0, 0, 0, 5.0]])
    assert argmax_position(windows, (1,)).ravel().tolist() == [1, 2, 0, 3]
    # The worked example agrees with the reference's routing (checked against the C too).
    assert all(ok for _, _, ok in digits_k1.worked.checks), digits_k1.worked.checks
    env = digits_k1.worked.env
    a1 = env["a1"].reshape(2, 16, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 16, 4, 4, 4)
    assert np.array_equal(env["p1.argmax"], np.argmax(a1, axis=-1).astype(float))


def test_expanded_view_handles_padding_and_says_why_not_for_max_pooling(digits_k1):
    import time
    from graphc.explain.numbers import expand_all
    tiny = {"name": "tc", "inputs": {"x": {"shape": [1, 3, 3]}, "t": {"shape": [1]}},
            "params": {"K": {"shape": [1, 1, 2, 2]}},
            "nodes": {"h": {"op": "conv2d", "inputs": ["x", "K"], "padding": 1, "stride": 2},
                      "m": {"op": "avg_pool2d", "inputs": ["h"], "kernel_size": 2, "padding": 1,
                            "count_include_pad": False},
                      "g": {"op": "global_avg_pool", "inputs": ["m"]},
                      "loss": {"op": "mse", "inputs": ["g", "t"]}},
            "outputs": ["g"], "loss": "loss"}
    x = explain(tiny, wrt="K").expanded["K"]      # 4 parameter scalars: expanded by default
    assert not x.skipped and len(x.checks) == 4 and all(c.ok and c.symbolic for c in x.checks)
    tiny["nodes"]["m"] = {"op": "max_pool2d", "inputs": ["h"], "kernel_size": 2}
    x = explain(tiny, wrt="K").expanded["K"]
    assert x.skipped.startswith("max pooling sends the gradient to each window's first maximum")
    start = time.perf_counter()   # a net as large as digits_cnn is refused at once
    views = expand_all(digits_k1.derivation.gradients, digits_k1.graph, ["K1"])
    assert views["K1"].skipped and time.perf_counter() - start < 2


def test_cli_explains_a_conv_net_quickly(tmp_path):
    """About 5 s on an idle machine (C compiler included). Measured in CPU seconds of the
    command and its compiler, which a machine busy with other work inflates far less than
    the wall clock; the timeout catches a hang."""
    import sys
    start = _children_cpu()
    run = subprocess.run([sys.executable, "-m", "graphc", "explain", str(DIGITS_CNN), "--wrt", "K2[0,0,1,1]",
                          "--format", "html", "-o", str(tmp_path / "k2.html")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    seconds = _children_cpu() - start
    assert run.returncode == 0, run.stderr
    assert seconds < 20, f"graphc explain digits_cnn took {seconds:.1f} CPU seconds"
    page = (tmp_path / "k2.html").read_text(encoding="utf-8")
    assert "the correlation of its input" in page and "MISMATCH" not in page
    assert "The element followed above" in page and page.count("<math") > 100


# ---------------------------------------------------------------- the page in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

# Added to a copy of the page only: measures the laid-out formulas into the DOM.
PROBE = """<script>
window.addEventListener('load', () => {
  const m = [...document.querySelectorAll('math')];
  const f = document.querySelector('.eq mfrac');
  const top = f.children[0].getBoundingClientRect(), bottom = f.children[1].getBoundingClientRect();
  document.body.setAttribute('data-probe', JSON.stringify({
    math: m.length, visible: m.filter(e => e.getBoundingClientRect().width > 0).length,
    frac: f.getBoundingClientRect().height, numerator: top.height,
    stacked: top.bottom <= bottom.top + 1}));
});
</script>"""


def _chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium): the page is not rendered")
def test_html_page_renders_offline_in_chromium(mlp_w1, tmp_path):
    import json
    page = tmp_path / "derivation.html"
    page.write_text(mlp_w1.html(), encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(mlp_w1.html().replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    dom = done.stdout
    assert "<math" in dom, done.stderr[-2000:]
    m = json.loads(re.search(r"data-probe=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
    # MathML is laid out natively: every formula has a size, and a fraction stacks (as
    # plain inline text its numerator and denominator would sit side by side).
    assert m["math"] > 50 and m["visible"] == m["math"]
    assert m["stacked"] and m["frac"] > 1.6 * m["numerator"], m
    for piece in [w1_grad_function(mlp_w1), "δh1", "vs model.gradients (C)", "ok", "Worked example"]:
        assert piece in dom, piece
    assert "MISMATCH" not in dom
    trace = mlp_w1.worked.traces["W1"][0]
    assert f"{trace.value:.6g}" in dom          # the numbers are on the page
    shot = tmp_path / "page.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000, done.stderr[-2000:]


# Added to a copy of the page only: what does not fit the 1280 px window. An element that
# scrolls sideways (a formula or C listing behind a scroll bar), one that reaches past the
# page, or one that reaches out of its column of a formula-beside-C row; each reported once,
# by the outermost element that does not fit.
OVERFLOW_PROBE = """<script>
window.addEventListener('load', () => {
  const width = document.documentElement.clientWidth, found = [], seen = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('svg') && el.tagName.toLowerCase() !== 'svg') continue;
    if (seen.some(s => s.contains(el))) continue;
    const r = el.getBoundingClientRect(), col = el.parentElement.closest('.row > div');
    let why = null;
    if (getComputedStyle(el).overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1) why = 'scrolls';
    else if (r.right > width + 1) why = 'reaches past the page';
    else if (col && r.right > col.getBoundingClientRect().right + 1) why = 'reaches out of its column';
    if (why) {
      seen.push(el);
      found.push(why + ': <' + el.tagName.toLowerCase() + ' class="' + el.className + '"> ' +
                 Math.round(r.width) + ' px: ' + (el.textContent || '').slice(0, 80));
    }
  }
  document.body.setAttribute('data-overflow', JSON.stringify({width: width,
    page: document.documentElement.scrollWidth, measured: document.querySelectorAll('body *').length,
    found: found}));
});
</script>"""


# The mlp's page, a tiny net's, whose expanded view writes out long formulas, and the conv
# net's, whose formulas are long index expressions.
TINY = """\
name: tiny
inputs: {x: [3], y: [2]}
params: {W1: {shape: [4, 3]}, b1: {shape: [4]}, W2: {shape: [2, 4]}, b2: {shape: [2]}}
nodes:
  h: {op: dense, inputs: [x, W1, b1]}
  a: {op: tanh, inputs: [h]}
  out: {op: dense, inputs: [a, W2, b2]}
  loss: {op: mse, inputs: [out, y]}
outputs: [out]
loss: loss
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium, chromium-browser or google-chrome "
                    "(apt-get install chromium): the page is not rendered")
@pytest.mark.parametrize("page", ["mlp W1", "tiny, expanded", "conv W"])
def test_html_page_fits_1280_px_without_scrolling(mlp_w1, tmp_path, page, request):
    import json
    import html as _html
    if page == "mlp W1":
        e = mlp_w1
    elif page == "conv W":   # long index formulas: padded reads, gathers, worked sums
        e = request.getfixturevalue("conv_w")
    else:
        (tmp_path / "tiny.yaml").write_text(TINY)
        e = explain(tmp_path / "tiny.yaml", wrt="W1", at="random")
        assert e.expanded["W1"].loss is not None
    probe = tmp_path / "probe.html"
    probe.write_text(e.html().replace("</body>", OVERFLOW_PROBE + "</body>"), encoding="utf-8")
    done = _chromium("--window-size=1280,2000", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-overflow="([^"]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    m = json.loads(_html.unescape(found.group(1)))
    assert m["width"] == 1280 and m["measured"] > 500, m
    assert m["found"] == [] and m["page"] == m["width"], "\n".join(m["found"])
