"""A NaN or infinite loss or gradient in training: the C train step refuses the step (params,
state and step count unchanged, NaN returned), and `fit` raises NonFiniteError naming the
epoch, the step and the first non-finite tensor, or warns once, or carries on."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import graphc
from codegen.harness import harness, parse_output
from graphc.errors import InputError, NonFiniteError
from graphc.reference import reference

CC = os.environ.get("CC", "cc")


def exp_spec(optimizer: str = "adam") -> dict:
    """x -> dense -> exp -> dense -> mse: exp overflows for a large input."""
    return {"name": "blowup", "inputs": {"x": [3], "y": [2]},
            "params": {"W": {"shape": [4, 3], "init": "normal", "std": 0.5},
                       "V": {"shape": [2, 4], "init": "normal", "std": 0.5}},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                      "a": {"op": "elementwise", "inputs": ["h"], "expr": "exp(h)"},
                      "o": {"op": "dense", "inputs": ["a", "V"]},
                      "loss": {"op": "mse", "inputs": ["o", "y"]}},
            "outputs": ["o"], "loss": "loss", "optimizer": {"name": optimizer, "lr": 0.01}}


# a = sqrt(x + c) at x + c = 0: the loss is 0, its gradient infinite
SQRT = {"name": "sqrtgrad", "inputs": {"x": [2]}, "params": {"c": {"shape": [2], "init": "zeros"}},
        "nodes": {"h": {"op": "add", "inputs": ["x", "c"]},
                  "a": {"op": "elementwise", "inputs": ["h"], "expr": "sqrt(h)"},
                  "loss": {"op": "sum", "inputs": ["a"]}},
        "outputs": ["a"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}

NO_PARAMS = {"name": "noparams_exp", "inputs": {"x": [2], "y": [2]},
             "nodes": {"a": {"op": "exp", "inputs": ["x"]},
                       "loss": {"op": "mse", "inputs": ["a", "y"]}},
             "outputs": ["a"], "loss": "loss", "optimizer": {"name": "adam"}}


@pytest.fixture(scope="module")
def blowup():
    return graphc.compile(exp_spec(), dtype="float32")


@pytest.fixture(scope="module")
def blowup64():
    return graphc.compile(exp_spec(), dtype="float64")


@pytest.fixture(scope="module")
def sqrt_model():
    return graphc.compile(SQRT, dtype="float32")


def data(n: int = 40, bad=(), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    x[list(bad)] = 1e4   # exp(1e4·Σw) overflows (Σw > 0.071 in float64) for some output
    return {"x": x, "y": rng.normal(size=(n, 2))}


def snapshot(model) -> tuple[dict, dict]:
    return model.get_params(), model.optimizer_state()


def assert_unchanged(model, before) -> None:
    params, state = snapshot(model)
    for k, v in before[0].items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    assert state["step"] == before[1]["step"]
    for slot, per_param in before[1].items():
        if slot != "step":
            for k, v in per_param.items():
                np.testing.assert_array_equal(state[slot][k], v, err_msg=f"{slot} {k}")


# ---------------------------------------------------------------- the C train step

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_non_finite_loss_leaves_params_and_state_as_they_were(blowup, blowup64, dtype):
    blowup = blowup if dtype == "float32" else blowup64   # the C tests each dtype's bits
    blowup.init_params(1)
    blowup.reset_optimizer()
    blowup.train_step(**data(8, seed=1))   # one ordinary step: state is not all zero
    before = snapshot(blowup)
    assert before[1]["step"] == 1
    assert math.isnan(blowup.train_step(**data(8, bad=[3], seed=2)))
    assert_unchanged(blowup, before)
    assert math.isfinite(blowup.train_step(**data(8, seed=3)))   # and training goes on
    assert blowup.optimizer_state()["step"] == 2


def test_a_non_finite_gradient_with_a_finite_loss_is_refused_too(sqrt_model):
    sqrt_model.init_params(0)
    sqrt_model.reset_optimizer()
    x = np.array([[0.0, 1.0], [4.0, 1.0]])
    loss, grads = sqrt_model.gradients(x=x)
    assert loss == pytest.approx(2.0) and np.isinf(grads["c"][0])
    before = snapshot(sqrt_model)
    assert math.isnan(sqrt_model.train_step(x=x))
    assert_unchanged(sqrt_model, before)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # NumPy's, on inf - inf
def test_the_reference_refuses_the_same_step():
    ref = graphc.reference(graphc.Graph.from_spec(exp_spec()), dtype="float32")
    ref.train_step(**data(8, seed=1))
    before = ref.get_params(), ref.optimizer_state()
    assert math.isnan(ref.train_step(**data(8, bad=[3], seed=2)))
    assert_unchanged(ref, before)


def test_a_model_without_params_checks_its_loss():
    m = graphc.compile(NO_PARAMS, dtype="float32")
    x = np.zeros((2, 2), np.float32)
    assert m.train_step(x=x, y=x + 1) == pytest.approx(0.0)
    assert math.isnan(m.train_step(x=x + 200, y=x))
    assert m.optimizer_state()["step"] == 1


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_the_c_refuses_the_step_under_the_sanitizers(tmp_path):
    """A C main() runs two train steps on a batch whose loss overflows, under AddressSanitizer
    and UBSan: both return NaN, the params are the ones given, the state as `init_state` wrote it."""
    model = graphc.compile(exp_spec("adam"), dtype="float32")
    cm = model.cmodule
    params = np.zeros(cm.params_size, np.float32)
    for p, at in cm.param_offsets.items():
        value = model.get_params()[p].ravel()
        params[at:at + value.size] = value
    (tmp_path / f"{cm.name}.c").write_text(cm.source)
    (tmp_path / f"{cm.name}.h").write_text(cm.header)
    batch = data(5, bad=[2], seed=4)
    (tmp_path / "main.c").write_text(harness(cm, params, batch, train_steps=2))
    flags = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O0",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    build = subprocess.run([CC, *flags, "main.c", f"{cm.name}.c", "-o", "prog", "-lm"],
                           cwd=tmp_path, capture_output=True, text=True)
    if build.returncode and "asan" in build.stderr.lower():
        pytest.skip(f"sanitizer runtime unavailable: {build.stderr[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run(["./prog"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"))
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr
    got = parse_output(run.stdout)
    assert np.all(np.isnan(got["train_loss"]))
    np.testing.assert_array_equal(got["params"].astype(np.float32), params)   # %.9g: exact
    np.testing.assert_array_equal(got["state"].astype(np.float32),   # as init_state left it
                                  cm.initial_state().astype(np.float32))


# ---------------------------------------------------------------- fit

def test_fit_raises_naming_the_epoch_the_step_and_the_first_tensor(blowup):
    """Batches of 8 in order: example 19 is in step 3. The error names the activation
    that overflowed first (not the loss or the gradients after it), and the model holds
    the params of the two steps before."""
    blowup.init_params(2)
    blowup.reset_optimizer()
    with pytest.raises(NonFiniteError) as e:
        graphc.fit(blowup, data(bad=[19]), epochs=2, batch_size=8, shuffle=False,
                   progress=False)
    assert (e.value.epoch, e.value.step, e.value.tensor) == (1, 3, "a")
    assert str(e.value).startswith("training stopped at epoch 1, step 3: activation 'a' "
                                   "(elementwise) is +inf at ")
    assert "recomputed by the NumPy reference in float32" in str(e.value)
    assert "The step was not applied" in str(e.value)
    after = blowup.get_params()
    blowup.init_params(2)
    blowup.reset_optimizer()
    graphc.fit(blowup, {k: v[:16] for k, v in data(bad=[19]).items()}, epochs=1, batch_size=8,
               shuffle=False, progress=False)
    for k, v in blowup.get_params().items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_fit_names_a_gradient_when_only_the_gradient_is_not_finite(sqrt_model):
    sqrt_model.init_params(0)
    sqrt_model.reset_optimizer()
    x = np.array([[2.0, 3.0], [0.0, 5.0], [1.0, 1.0], [1.0, 2.0]])
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1: the gradient of 'c' is \+inf "
                                             r"at 1 of 2 elements \(first at \[0\]\) \(in the C\)"):
        graphc.fit(sqrt_model, {"x": x}, epochs=1, batch_size=2, shuffle=False, progress=False)


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_warn_and_ignore_skip_the_bad_steps(blowup, policy):
    """Two bad batches a epoch, two epochs: one warning (with "warn") or none; the other
    steps are taken, and the epoch losses are theirs (finite)."""
    blowup.init_params(3)
    blowup.reset_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = graphc.fit(blowup, data(bad=[2, 30]), epochs=2, batch_size=8, shuffle=False,
                             progress=False, on_nonfinite=policy)
    ours = [w for w in caught if "non-finite step" in str(w.message)]
    assert len(ours) == (policy == "warn")
    if ours:
        assert str(ours[0].message).startswith("non-finite step at epoch 1, step 1: "
                                               "activation 'a'")
    assert history.steps == 2 * (5 - 2)
    assert blowup.optimizer_state()["step"] == 6
    assert np.all(np.isfinite(history["loss"]))
    assert all(np.all(np.isfinite(p)) for p in blowup.get_params().values())


def test_on_nonfinite_must_be_a_known_policy(blowup):
    with pytest.raises(InputError, match="on_nonfinite must be one of 'raise', 'warn', "
                                         "'ignore', got 'stop'"):
        graphc.fit(blowup, data(), on_nonfinite="stop", progress=False)


# ---------------------------------------------------------------- verify

COSH_RATIO = {"name": "coshr", "inputs": {"x": [3], "y": [3]},
              "params": {"c": {"shape": [3], "init": "zeros"}},
              "nodes": {"h": {"op": "add", "inputs": ["x", "c"]},
                        "a": {"op": "elementwise", "inputs": ["h"], "expr": "cosh(h) / cosh(h / 2)"},
                        "loss": {"op": "mse", "inputs": ["a", "y"]}},
              "outputs": ["a"], "loss": "loss"}


def test_verify_says_where_the_c_is_not_finite_and_still_compares_the_rest():
    """cosh(100) overflows float32 (the float64 reference holds it): the report locates the
    infinities in words and compares the elements finite on both sides; no cell is NaN."""
    m = graphc.compile(COSH_RATIO)
    x = np.array([[0.5, 100.0, -1.0], [1.0, 2.0, 100.0]])
    report = m.verify(x=x, y=np.zeros((2, 3)))
    checks = {(c.tensor, c.kind): c for c in report.checks}
    a = checks["a", "C vs reference"]
    assert a.result == "NOT FINITE" and a.max_abs < 1e-5
    assert a.note.startswith("the C output 'a' is +inf at 2 of 6 elements (first at [0, 1], "
                             "[1, 2]), where the reference is finite; the 4 elements finite in "
                             "both differ by at most ")
    grad = checks["d loss/d c", "C vs reference"]
    assert grad.note.startswith("the C gradient of c is NaN at 2 of 3 elements (first at [1], "
                                "[2]), where the reference is finite; the 1 element finite in "
                                "both differs by at most ")
    cells = [cell for line in report.table().splitlines() for cell in line.split()]
    assert "nan" not in cells and "n/a" in cells   # the loss: one element, not finite


@pytest.mark.parametrize("target", ["c99", "host"])
def test_max_pooling_passes_nan_on_and_its_gradient_to_the_last_nan(target):
    """Max pooling as torch's: a NaN in a window wins (the last of two), so that it reaches
    the loss; -inf and ties pool as any value. The C (its selects) against the reference,
    which tests/test_reference_layers.py holds to torch; the gradient of `s`, added before
    the pool, shows which element each window's argmax took."""
    spec = {"name": "pool_nan", "inputs": {"x": [2, 4, 6]},
            "params": {"s": {"shape": [2, 4, 6], "init": "zeros"},
                       "w": {"shape": [2, 2, 3], "init": "normal"}},
            "nodes": {"h": {"op": "add", "inputs": ["x", "s"]},
                      "p": {"op": "max_pool2d", "inputs": ["h"], "kernel_size": 2},
                      "q": {"op": "mul", "inputs": ["p", "w"]},
                      "loss": {"op": "sum", "inputs": ["q"]}},
            "outputs": ["p"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1}}
    model = graphc.compile(spec, target=target)
    ref = reference(model.graph)
    ref.set_params(model.get_params())
    x = np.random.default_rng(5).standard_normal((3, 2, 4, 6)).astype(np.float32)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan       # two NaNs in one window: the last wins
    x[0, 0, :2, 4:] = np.nan                      # a window of NaNs only
    x[0, 0, 3, 3] = np.nan                        # one NaN among finite values
    x[0, 1, 2:, 2:4] = -np.inf                    # a window of -inf
    x[0, 1, 2:, 4:] = 0.5                         # ties: the first
    got, want = model.forward(x=x)["p"], ref.forward(x=x)["p"]
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[0, 0]).tolist() == [[True, False, True], [False, True, False]]
    assert got[0, 1, 1, 1] == -np.inf and got[0, 1, 1, 2] == 0.5
    # One example: the gradient of `s` is the pool's routing (its mean over a batch of 1)
    one = x[:1]
    (_, grads), (_, ref_grads) = model.gradients(x=one), ref.gradients(x=one)
    np.testing.assert_allclose(grads["s"], ref_grads["s"], rtol=1e-6)
    routed = grads["s"][0] != 0
    assert routed[:2, :2].tolist() == [[False, False], [True, False]]   # the second NaN
    assert routed[:2, 4:].tolist() == [[False, False], [False, True]]   # the last of its NaNs
    assert routed[2:, 2:4].tolist() == [[False, False], [False, True]]  # the NaN
    assert grads["s"][1][2:, 4:].tolist() == [[grads["s"][1][2, 4], 0], [0, 0]]   # ties: the first
