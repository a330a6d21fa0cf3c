"""Formulas rewritten to stable forms (graphc.functions.RULES): each rule is an identity SymPy
proves, each fires where its pattern is written, `explain` shows it, and the float32 C of
each rewritten formula equals the truth (120 digits) over x in [-100, 100], values and
gradients, wherever the true value is a float32."""

from __future__ import annotations

import re

import mpmath
import numpy as np
import pytest
import sympy as sp

import graphc
from graphc.functions import RULES, expand_definitions, softplus, stable_forms
from graphc.formula import formula_rewrites

a, b, u = sp.symbols("a b u", real=True)
E = sp.exp
# rule -> a general instance of its pattern (u, a, b stand for any expression)
INSTANCES = {
    "softplus": sp.log(1 + E(u)),
    "log-sum-exp": sp.log(E(a) + 3 * E(b) + 2),
    "reciprocal": (E(a) + E(b) + E(u)) ** -2,
    "exp product": (E(a) - 2 * E(-a)) / (E(a) + E(b)),
    "logistic": E(u) / (1 + E(u)) ** 3,
    "logistic product": E(2 * u) / (1 + E(u)) ** 3,
    "log-sigmoid": sp.log(1 / (1 + E(-u))),
    "one minus sigmoid": 1 - 1 / (1 + E(-u)),
}


def proved_equal(x: sp.Expr, y: sp.Expr) -> bool:
    """SymPy proves x = y (both real): their difference simplifies to 0, or that of their
    exponentials does (a log-sum-exp's form is a sum of logs)."""
    d = expand_definitions(x) - expand_definitions(y)
    if sp.simplify(d) == 0:
        return True
    e = sp.exp(expand_definitions(x)) - sp.exp(expand_definitions(y))
    return sp.simplify(sp.powsimp(sp.expand(e))) == 0


def test_every_rule_has_an_instance():
    assert set(INSTANCES) == set(RULES)


@pytest.mark.parametrize("rule", INSTANCES)
def test_each_rule_is_an_identity_sympy_proves(rule):
    record = []
    before = INSTANCES[rule]
    after = stable_forms(before, record)
    assert any(rule in r.rules for r in record), record
    assert not after.has(sp.exp) or all(
        f.args[0].has(graphc.functions.softplus) for f in after.atoms(sp.exp)), after
    assert proved_equal(after, before), f"{before} -> {after}"


def test_formulas_without_a_pattern_are_left_alone():
    h = sp.Symbol("h", real=True)
    record = []
    for e in (sp.exp(h) - 1, sp.sqrt(1 + sp.exp(h)), sp.log(1 + h * h), sp.exp(h) * sp.exp(2 * a),
              sp.log(sp.exp(h) - 1)):
        assert stable_forms(e, record) == e
    assert record == []


# Each rule at least once, in formulas a user would write; the issue's list first.
FORMULAS = {
    "softplus": "log(1 + exp(h))",
    "log-sigmoid": "log(1 / (1 + exp(-h)))",
    "logistic": "exp(h) / (1 + exp(h))",
    "log-sum-exp": "log(exp(h) + exp(-h) + exp(2 * h))",
    "log-sum-exp and a constant": "log(2 + exp(h))",
    "logistic squared": "exp(2 * h) / (1 + exp(h))**2",
    "tanh written out": "(exp(h) - exp(-h)) / (exp(h) + exp(-h))",
    "softmax of two": "exp(h) / (exp(h) + exp(h / 2))",
    "log of sigmoid": "log(sigmoid(h))",
    "log of one minus sigmoid": "log(1 - sigmoid(h))",
    "mish": "h * tanh(log(1 + exp(h)))",
}
WIDTH = 201   # x = -100, -99, ..., 100


def formulas_spec() -> dict:
    """One param c_k per formula: a_k = f_k(x + c_k), loss = Σ_k Σ a_k, so that the
    gradient of c_k (at c_k = 0) is f_k'(x)."""
    nodes, total = {}, None
    for k, expr in enumerate(FORMULAS.values()):
        nodes[f"h{k}"] = {"op": "add", "inputs": ["x", f"c{k}"]}
        nodes[f"a{k}"] = {"op": "elementwise", "inputs": [f"h{k}"], "expr": re.sub(r"\bh\b", f"h{k}", expr)}
        nodes[f"s{k}"] = {"op": "sum", "inputs": [f"a{k}"]}
        if total is None:
            total = f"s{k}"
        else:
            nodes[f"t{k}"] = {"op": "add", "inputs": [total, f"s{k}"]}
            total = f"t{k}"
    return {"name": "stable", "inputs": {"x": [WIDTH]},
            "params": {f"c{k}": {"shape": [WIDTH], "init": "zeros"} for k in range(len(FORMULAS))},
            "nodes": nodes, "outputs": [f"a{k}" for k in range(len(FORMULAS))], "loss": total}


@pytest.fixture(scope="module")
def float32_model():
    return graphc.compile(formulas_spec(), dtype="float32")


def truth(expr: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The formula as written (no rewrite) and its derivative, in 120-digit arithmetic."""
    h = sp.Symbol("h", real=True)
    f = sp.sympify(expr, locals={"h": h, "sigmoid": lambda z: 1 / (1 + sp.exp(-z))})
    value, slope = (sp.lambdify(h, e, "mpmath") for e in (f, sp.diff(f, h)))
    with mpmath.workdps(120):   # 1 - sigmoid(100) needs 44 digits
        return (np.array([float(value(mpmath.mpf(float(v)))) for v in x]),
                np.array([float(slope(mpmath.mpf(float(v)))) for v in x]))


def assert_float32_close(got: np.ndarray, want: np.ndarray, what: str, scale: float = 0.0) -> None:
    """Finite, and within 2e-6 relative (or 2e-6 of `scale`, or the float32 smallest
    normal, if larger) wherever the true value is a finite float32."""
    representable = np.abs(want) <= np.finfo(np.float32).max
    got, want = got[representable], want[representable]
    assert np.all(np.isfinite(got)), f"{what}: not finite at {np.flatnonzero(~np.isfinite(got))}"
    atol = max(2e-6 * scale, float(np.finfo(np.float32).tiny))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=atol, err_msg=what)


@pytest.mark.parametrize("k, name", list(enumerate(FORMULAS)))
def test_float32_c_equals_the_truth_from_minus_100_to_100(float32_model, k, name):
    x = np.linspace(-100, 100, WIDTH)[None, :]
    value, slope = truth(FORMULAS[name], x[0])
    assert_float32_close(float32_model.forward(x=x)[f"a{k}"][0], value, name)
    _, grads = float32_model.gradients(x=x)
    # Gradients to 2e-6 of their largest: sigmoid' is y·(1 - y) of the output y, as in
    # torch's backward, which is 0 where 1 - y rounds to 0 (its true value there is < 1e-7).
    assert_float32_close(grads[f"c{k}"], slope, f"{name}'", float(np.max(np.abs(slope))))


def test_explain_shows_the_rewrite():
    spec = graphc.load("examples/mlp.yaml")
    [rewrite] = formula_rewrites("h1 * tanh(log(1 + exp(h1)))", ["h1"], node="a1")
    assert str(rewrite) == ("rewritten: log(exp(h1) + 1) → softplus(h1) by softplus (exp(u) "
                            "overflows above u = 88 in float32; softplus never does)")
    text = " ".join(graphc.explain(spec, wrt="b1").text().split())
    assert ("Rewritten to a stable form: log(exp(h1) + 1) → softplus(h1), by softplus (exp(u) "
            "overflows above u = 88 in float32; softplus never does).") in text


def test_the_readme_mish_example_trains_on_raw_pixels_without_nan():
    """examples/mlp.yaml on the digits' raw 0-16 pixels with Adam at lr 0.05 (the issue's
    run reached NaN at epoch 3)."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    digits = load_digits()
    x, y = digits.data[:600], np.eye(10)[digits.target[:600]]
    model = graphc.compile("examples/mlp.yaml", optimizer={"name": "adam", "lr": 0.05})
    history = graphc.fit(model, {"x": x, "y": y}, epochs=4, batch_size=32, progress=False)
    assert np.all(np.isfinite(history["loss"])), history["loss"]
    assert history.steps == 4 * 19   # every step applied: none refused as non-finite
    assert all(np.all(np.isfinite(p)) for p in model.get_params().values())
    assert history["accuracy"][-1] > 0.5


TWO_INPUTS = {"log-sum-exp of two": "log(exp(a) + exp(b))",
              "softmax of three": "exp(a) / (exp(a) + exp(b) + exp(b / 2))"}


def test_formulas_of_two_inputs_and_their_partial_derivatives():
    """a = x + p, b = 3 - x/2 + q over x in [-100, 100] (a - b from -253 to 147): each value,
    and the gradient of p and of q (the partial derivatives), in float32 C."""
    nodes = {"a": {"op": "add", "inputs": ["x", "p"]},
             "half": {"op": "elementwise", "inputs": ["x", "q"], "expr": "3 - x / 2 + q"}}
    total = None
    for k, expr in enumerate(TWO_INPUTS.values()):
        nodes[f"f{k}"] = {"op": "elementwise", "inputs": ["a", "half"],
                          "expr": expr.replace("b", "half")}
        nodes[f"s{k}"] = {"op": "sum", "inputs": [f"f{k}"]}
    spec = {"name": "two", "inputs": {"x": [WIDTH]},
            "params": {p: {"shape": [WIDTH], "init": "zeros"} for p in ("p", "q")},
            "nodes": nodes, "outputs": ["f0", "f1"]}
    x = np.linspace(-100, 100, WIDTH)[None, :]
    sa, sb = sp.symbols("a b", real=True)
    for k, (name, expr) in enumerate(TWO_INPUTS.items()):
        spec["nodes"]["loss"] = {"op": "add", "inputs": [f"s{k}", f"s{k}"]}   # 2·Σ f
        spec["loss"] = "loss"
        model = graphc.compile(spec, dtype="float32")
        f = sp.sympify(expr, locals={"a": sa, "b": sb})
        exact = [sp.lambdify((sa, sb), e, "mpmath") for e in (f, sp.diff(f, sa), sp.diff(f, sb))]
        with mpmath.workdps(120):
            points = [(mpmath.mpf(float(v)), 3 - mpmath.mpf(float(v)) / 2) for v in x[0]]
            value, da, db = (np.array([float(g(*pt)) for pt in points]) for g in exact)
        assert_float32_close(model.forward(x=x)[f"f{k}"][0], value, name)
        _, grads = model.gradients(x=x)
        assert_float32_close(grads["p"], 2 * da, f"{name} d/da", float(np.max(np.abs(2 * da))))
        assert_float32_close(grads["q"], 2 * db, f"{name} d/db", float(np.max(np.abs(2 * db))))


def test_a_long_sum_of_softplus_patterns_is_rewritten_whole():
    """The rewrite budget grows with the formula: 69 softplus patterns all become softplus
    (a fixed budget used to leave the last ones as log(1 + exp) without a word)."""
    x = sp.Symbol("x", real=True)
    folded = stable_forms(sum(sp.log(1 + sp.exp(k * x)) for k in range(1, 70)))
    assert not folded.has(sp.exp, sp.log) and folded.count(softplus) == 69
