"""graphc.verify: finite differences only where the loss is differentiable, and values that
are not finite reported in words.

A zero-initialized relu net sits on the kink of every relu: there the central difference
is the mean of the two slopes and the reference (like torch) takes the left one, so the
check moves to a nearby point, and says so. A wrong gradient stays a MISMATCH, at a kink
or not. NaN and inf are located ("is NaN at 1 of 3 elements (first at [1])"), never
printed as an error of nan.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import graphc
from graphc.cli import main
from graphc.verify import (TOLERANCES, _compare, describe_nonfinite, finite_difference_check,
                           gradient_check, within_tolerance)

reference_module = importlib.import_module("graphc.reference")

RELU_ZEROS = """\
name: relu0
inputs: {x: [4], y: [3]}
params:
  W1: {shape: [3, 4], init: zeros}
  b1: {shape: [3], init: zeros}
nodes:
  h: {op: dense, inputs: [x, W1, b1]}
  out: {op: relu, inputs: [h]}
  loss: {op: mse, inputs: [out, y]}
outputs: [out]
loss: loss
"""

SQRT = """\
name: sq
inputs: {x: [3], y: [3]}
params:
  s: {shape: [3], init: ones}
nodes:
  h: {op: mul, inputs: [x, s]}
  a: {op: elementwise, inputs: [h], expr: "sqrt(h)"}
  loss: {op: mse, inputs: [a, y]}
outputs: [a]
loss: loss
"""

LOG = """\
name: lg
inputs: {x: [3], y: [3]}
params:
  s: {shape: [3], init: ones}
nodes:
  l: {op: elementwise, inputs: [x], expr: "log(x)"}
  out: {op: mul, inputs: [l, s]}
  loss: {op: mse, inputs: [out, y]}
outputs: [out]
loss: loss
"""


def spec(tmp_path, text: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def data(n: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4)), "y": rng.standard_normal((n, 3))}


def fd_checks(report):
    return {c.tensor: c for c in report.checks if c.kind == "reference vs finite differences"}


def wrong_relu(monkeypatch, factor: float = 1.5):
    """A reference relu whose derivative is `factor` instead of 1 where x > 0."""
    wrong = reference_module._Op(reference_module.OPS["relu"].forward,
                                 lambda g, args, out, attrs: [g * (args[0] > 0) * factor])
    monkeypatch.setitem(reference_module.OPS, "relu", wrong)


# ---------------------------------------------------------------- kinks

def test_zero_initialized_relu_net_is_checked_at_a_nearby_point(tmp_path):
    g = graphc.load(spec(tmp_path, RELU_ZEROS))
    ref = graphc.reference(g)
    # The kink is real: the plain central difference disagrees with the reference.
    plain = finite_difference_check(ref, data())
    assert plain["W1"]["rel_err"] > 0.1 and plain["b1"]["rel_err"] > 0.1
    model = graphc.compile(g, dtype="float64")
    report = model.verify(**data())
    assert report.ok, report.table()
    for name in ("d loss/d W1", "d loss/d b1"):
        c = fd_checks(report)[name]
        assert c.ok and c.max_rel < 1e-6
        assert "checked at a nearby point" in c.note and "kink" in c.note
    table = report.table()
    assert "MISMATCH" not in table and "all checks passed" in table
    assert "checked at a nearby point" in table and "not differentiable here" in table


def test_graphc_check_passes_a_zero_initialized_relu_net(tmp_path, capsys):
    assert main(["check", str(spec(tmp_path, RELU_ZEROS)), "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "checked at a nearby point" in out


def test_a_smooth_point_is_checked_where_it_is(tmp_path):
    """Away from kinks nothing moves: no note, the same numbers as finite_difference_check."""
    g = graphc.load(spec(tmp_path, RELU_ZEROS.replace("init: zeros", "init: normal")))
    ref = graphc.reference(g)
    plain = finite_difference_check(ref, data(), seed=3)
    checked = gradient_check(ref, data(), seed=3)
    for name, r in checked.items():
        assert r.ok and not r.note
        assert (r.analytic, r.numeric) == (plain[name]["analytic"], plain[name]["numeric"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradient_check_leaves_the_params_alone(tmp_path, dtype):
    ref = graphc.reference(graphc.load(spec(tmp_path, RELU_ZEROS)), dtype=dtype)
    before = ref.get_params()
    checked = gradient_check(ref, data())
    assert all("nearby point" in r.note for r in checked.values())   # the params were moved
    for k, v in ref.get_params().items():
        np.testing.assert_array_equal(v, before[k])
        assert v.dtype == np.dtype(dtype)


def test_a_wrong_gradient_at_a_kink_is_still_a_mismatch(tmp_path, monkeypatch):
    g = graphc.load(spec(tmp_path, RELU_ZEROS))
    wrong_relu(monkeypatch)
    checked = gradient_check(graphc.reference(g), data())
    for name in ("W1", "b1"):
        r = checked[name]
        assert not r.ok and r.finite and r.rel_err > 0.1
        assert "nearby point" in r.note and "disagrees there as well" in r.note


def test_a_wrong_gradient_at_a_smooth_point_is_a_mismatch_where_it_is(tmp_path, monkeypatch):
    g = graphc.load(spec(tmp_path, RELU_ZEROS.replace("init: zeros", "init: normal")))
    model = graphc.compile(g, dtype="float64")
    wrong_relu(monkeypatch)
    report = model.verify(**data())
    assert not report.ok
    fd = fd_checks(report)["d loss/d W1"]
    assert not fd.ok and fd.finite and fd.result == "MISMATCH" and fd.note == ""
    assert "MISMATCH" in report.table()


# ---------------------------------------------------------------- values that are not finite

def test_a_non_finite_reference_gradient_is_located_in_words(tmp_path):
    """sqrt'(0) is infinite: times x = 0 that is NaN in one element of the gradient, while
    the loss stays finite."""
    model = graphc.compile(graphc.load(spec(tmp_path, SQRT)), dtype="float64")
    x = np.abs(np.random.default_rng(0).standard_normal((4, 3))) + 0.5
    x[:, 1] = 0.0
    report = model.verify(x=x, y=np.ones((4, 3)))
    assert not report.ok
    fd = fd_checks(report)["d loss/d s"]
    assert not fd.ok and not fd.finite and fd.result == "NOT FINITE"
    assert fd.note == "the reference's gradient of s is NaN at 1 of 3 elements (first at [1])"
    # The C computes the same NaN: the two agree, and the note says where.
    (c,) = [c for c in report.checks if c.tensor == "d loss/d s" and c.kind == "C vs reference"]
    assert c.ok and "is NaN at 1 of 3 elements (first at [1]) in both the C and the reference" in c.note
    table = report.table()
    assert "the reference's gradient of s is NaN at 1 of 3 elements (first at [1])" in table
    assert "NOT FINITE" in table
    cells = [cell for line in table.splitlines() for cell in line.split()]
    assert "nan" not in cells    # errors that are not numbers read "n/a"


def test_a_non_finite_loss_is_said_in_words(tmp_path):
    model = graphc.compile(graphc.load(spec(tmp_path, LOG)), dtype="float64")
    x = np.full((4, 3), 2.0)
    x[2, 0] = -1.0                  # log of a negative number, given explicitly
    report = model.verify(x=x, y=np.ones((4, 3)))
    assert not report.ok
    notes = {(c.tensor, c.kind): c.note for c in report.checks}
    assert notes["out", "C vs reference"] == ("the output 'out' is NaN at 1 of 12 elements "
                                              "(first at [2, 0]) in both the C and the reference; "
                                              "the other elements are compared")
    assert notes["d loss/d s", "reference vs finite differences"] == (
        "the reference's loss is NaN at these params, so finite differences cannot check the "
        "gradient of s")
    assert "max rel err nan" not in report.table() and "n/a" in report.table()


def test_c_and_reference_disagreeing_on_finiteness_is_a_failure_in_words():
    want = np.arange(6.0).reshape(2, 3)
    got = want.copy()
    got[0, 2] = np.nan
    c = _compare("logits", got, want, "float64", "output 'logits'")
    assert not c.ok and not c.finite and c.result == "NOT FINITE"
    assert c.note == ("the C output 'logits' is NaN at 1 of 6 elements (first at [0, 2]), "
                      "where the reference is finite; the 5 elements finite in both differ by "
                      "at most 0.000e+00")
    assert c.max_abs == 0 and c.max_rel == 0   # the finite elements are still compared
    c = _compare("logits", want, got, "float64", "output 'logits'")
    assert c.note == ("the reference's output 'logits' is NaN at 1 of 6 elements (first at [0, 2]), "
                      "where the C is finite; the 5 elements finite in both differ by at most "
                      "0.000e+00")
    inf = want.copy()
    inf[1, 0] = np.inf
    c = _compare("logits", inf, got, "float64", "output 'logits'")
    assert c.note == ("the C output 'logits' is +inf at 1 of 6 elements (first at [1, 0]); "
                      "the reference's output 'logits' is NaN at 1 of 6 elements (first at [0, 2]); "
                      "the 4 elements finite in both differ by at most 0.000e+00")
    many = want.copy()
    many.ravel()[1:] = np.nan
    c = _compare("logits", many, want, "float64", "output 'logits'")
    assert c.note.startswith("the C output 'logits' is NaN at 5 of 6 elements (first at [0, 1], "
                             "[0, 2], [1, 0], ...), where the reference is finite")


@pytest.mark.parametrize("values, text", [
    (np.array(np.nan), "is NaN"),
    (np.array([1.0, np.inf, -np.inf]), "is infinite at 2 of 3 elements (first at [1], [2])"),
    (np.array([[np.nan, np.inf]]), "is not finite at all 2 elements"),
    (np.array([[0.0, -np.inf], [0.0, 0.0]]), "is -inf at 1 of 4 elements (first at [0, 1])"),
])
def test_describe_nonfinite(values, text):
    assert describe_nonfinite(values) == text


# ---------------------------------------------------------------- the tolerance rule

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_verify_and_the_suite_share_one_tolerance_rule(dtype, tolerances, assert_close):
    """max |got - want| <= max(rtol · max |want|, floor): the floor for a small tensor, rtol
    relative to the largest magnitude for a large one. verify's check and the suite's
    assert_close accept and refuse the same errors."""
    assert tolerances is TOLERANCES
    rtol, floor = TOLERANCES[dtype]
    # zeros; small (the floor rules); where rtol·scale is the floor (an rtol·scale + floor
    # rule would take 2·floor there); large
    for scale in (0.0, floor / rtol / 10, floor / rtol, 1.0, 1e6):
        want = np.array([scale, -scale / 2, 0.0])
        tol = max(rtol * scale, floor)
        assert within_tolerance(want, want, dtype) == (True, 0.0, tol)
        for factor, ok in ((0.5, True), (1.5, False)):
            got = want.copy()
            got[2] += factor * tol
            verdict, err, _ = within_tolerance(got, want, dtype)
            assert (verdict, err) == (ok, pytest.approx(factor * tol, rel=1e-6)), (scale, factor)
            assert _compare("t", got, want, dtype).ok == ok, (scale, factor)
            if ok:
                assert_close(got, want, dtype, "t")
            else:
                with pytest.raises(AssertionError, match="max abs error"):
                    assert_close(got, want, dtype, "t")


def test_within_tolerance_refuses_nan_and_other_shapes():
    assert within_tolerance([1.0, np.nan], [1.0, 2.0], "float64")[0] is False
    assert within_tolerance([1.0, 2.0], [1.0, np.nan], "float64")[0] is False
    ok, err, _ = within_tolerance([1.0, 2.0], [[1.0, 2.0]], "float64")
    assert not ok and np.isnan(err)
    assert within_tolerance(np.zeros((0, 3)), np.zeros((0, 3)), "float32") == (True, 0.0, 1e-6)


# A bias before a batch norm has a gradient of exactly 0 (the batch's mean takes it out);
# the central difference of a loss of a few units is then its rounding, some 1e-9, not 0.
BIAS_BEFORE_BN = {
    "name": "biasbn", "inputs": {"x": [2, 10, 10], "y": {"shape": [], "dtype": "int32"}},
    "params": {"K": {"shape": [16, 2, 3, 3], "init": "he_normal"}, "k": [16],
               "g": {"shape": [16], "init": "uniform", "low": 0.5, "high": 1.5},
               "s": {"shape": [16], "init": "normal", "std": 0.3},
               "m": {"shape": [16], "trainable": False},
               "v": {"shape": [16], "trainable": False},
               "W": {"shape": [40, 16], "init": "normal", "std": 3.0}},
    "nodes": {"c": {"op": "conv2d", "inputs": ["x", "K", "k"], "padding": 1},
              "n": {"op": "batch_norm", "inputs": ["c", "g", "s", "m", "v"]},
              "a": {"op": "relu", "inputs": ["n"]},
              "p": {"op": "global_avg_pool", "inputs": ["a"]},
              "logits": {"op": "dense", "inputs": ["p", "W"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss"}


def test_an_exact_zero_gradient_passes_within_the_differences_rounding(monkeypatch):
    ref = graphc.reference(graphc.Graph.from_spec(BIAS_BEFORE_BN), dtype="float64")
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((4, 2, 10, 10)),
              "y": rng.integers(0, 40, 4).astype(np.int32)}
    loss, grads = ref.gradients(**inputs)
    assert loss > 1 and np.max(np.abs(grads["k"])) < 1e-14
    checked = gradient_check(ref, inputs, seed=1)
    assert all(r.ok for r in checked.values()), checked
    assert checked["k"].abs_err > 1e-10    # rounding the old fixed floor called a mismatch
    monkeypatch.setattr("graphc.verify.FD_ROUNDING_ULPS", 0)
    assert not gradient_check(ref, inputs, seed=1)["k"].ok


# In float32, 1 + 1e-8 rounds to 1: h = x·W + b is 0 in the C (relu' = 0) and 1e-8 in the
# float64 reference (relu' = 1), so the gradients differ by the whole slope.
ON_THE_KINK = """\
name: kink
inputs: {x: [2], y: [1]}
params:
  W: {shape: [1, 2], init: ones}
  b: {shape: [1], init: uniform, low: -1.0, high: -1.0}
nodes:
  h: {op: dense, inputs: [x, W, b]}
  a: {op: relu, inputs: [h]}
  loss: {op: mse, inputs: [a, y]}
outputs: [a]
loss: loss
"""


def test_a_float32_relu_mask_across_the_kink_is_checked_nearby(tmp_path, monkeypatch):
    model = graphc.compile(spec(tmp_path, ON_THE_KINK))
    # the second example is well inside the relu's linear side, at every nearby point too
    inputs = {"x": np.array([[1.0, 1e-8], [2.0, 0.5]]), "y": np.array([[1.0], [0.0]])}
    before = model.get_params()
    report = model.verify(**inputs)
    checks = {c.tensor: c for c in report.checks if c.kind == "C vs reference"}
    assert report.ok and "nearby point" in checks["d loss/d W"].note
    assert "kink" in checks["d loss/d b"].note and not checks["loss (loss)"].note
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, before[k])
    # At the params given the two disagree by the first example's whole slope.
    _, grads = model.gradients(**inputs)
    _, ref_grads = graphc.reference(model.graph).gradients(**inputs)
    assert abs(grads["b"][0] - ref_grads["b"][0]) > 0.5
    # A wrong gradient stays wrong nearby.
    wrong_relu(monkeypatch)
    report = model.verify(**inputs)
    checks = {c.tensor: c for c in report.checks if c.kind == "C vs reference"}
    assert not checks["d loss/d W"].ok and not checks["d loss/d b"].ok
