"""The compiled model's Python surface: params, inputs, errors, batch sizes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.errors import InputError
from graphc.model import CompiledModel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", seed=1)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 64)), "y": np.eye(10)[rng.integers(0, 10, n)]}


def test_params_round_trip_and_are_copies(model):
    params = model.get_params()
    assert {k: v.shape for k, v in params.items()} == {
        "W1": (32, 64), "b1": (32,), "W2": (10, 32), "b2": (10,)}
    params["W1"][...] = 0
    assert np.any(model.get_params()["W1"] != 0)
    new = {k: np.full(v.shape, 0.5) for k, v in params.items()}
    model.set_params(new)
    assert all(np.all(v == np.float32(0.5)) for v in model.get_params().values())
    model.init_params(1)


def test_seeded_init_is_reproducible_and_follows_fan_in():
    a = graphc.compile(ROOT / "examples/mlp.yaml", seed=7).get_params()
    b = graphc.compile(ROOT / "examples/mlp.yaml", seed=7).get_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.all(a["b1"] == 0)
    assert abs(a["W1"].std() - np.sqrt(2 / 64)) < 0.02  # he_normal


def test_any_batch_size_matches_the_reference(model):
    ref = graphc.reference(model.graph)
    ref.set_params(model.get_params())
    for n in (1, 2, 17, 300):
        data = _batch(n, seed=n)
        np.testing.assert_allclose(model.forward(**data)["logits"], ref.forward(**data)["logits"],
                                   rtol=1e-4, atol=1e-5)
        loss, grads = model.gradients(**data)
        ref_loss, ref_grads = ref.gradients(**data)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for p in grads:
            np.testing.assert_allclose(grads[p], ref_grads[p], rtol=1e-4,
                                       atol=1e-5 * np.abs(ref_grads[p]).max())


def test_forward_needs_only_what_the_outputs_use(model):
    out = model.forward(x=np.zeros((3, 64)))
    assert out["logits"].shape == (3, 10) and out["logits"].dtype == np.float32
    model.forward(**_batch(3))  # the label is accepted and ignored


@pytest.mark.parametrize("inputs, message", [
    ({}, "missing input 'x'"),
    ({"x": np.zeros((3, 63))}, r"input 'x' must have shape \(n, 64\) with a leading batch axis, got \(3, 63\)"),
    ({"x": np.zeros(64)}, r"must have shape \(n, 64\)"),
    ({"x": np.zeros((3, 64), dtype=complex)}, "must hold real numbers, got dtype complex128"),
    ({"x": np.array([["a"] * 64])}, "must hold real numbers"),
    ({"x": np.zeros((0, 64))}, "the batch is empty"),
    ({"x": np.zeros((2, 64)), "z": np.zeros(2)}, "unknown input 'z'"),
])
def test_bad_inputs_are_clear_errors(model, inputs, message):
    with pytest.raises(InputError, match=message):
        model.forward(**inputs)


def test_inconsistent_batch_sizes(model):
    with pytest.raises(InputError, match="input 'y' has batch size 4, but 'x' has 3"):
        model.gradients(x=np.zeros((3, 64)), y=np.zeros((4, 10)))


def test_bad_params_change_nothing(model):
    before = model.get_params()
    with pytest.raises(InputError, match=r"param 'b2' must have shape \(10,\), got \(9,\)"):
        model.set_params({"W1": np.ones((32, 64)), "b2": np.ones(9)})
    with pytest.raises(InputError, match="unknown param 'W9'"):
        model.set_params({"W9": np.ones(3)})
    after = model.get_params()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_model_without_loss_has_no_gradients():
    b = graphc.Builder("infer")
    x = b.input("x", [4])
    W = b.param("W", [2, 4])
    m = graphc.compile(b.build(outputs=[b.dense(x, W, name="y")]))
    assert m.forward(x=np.ones((1, 4)))["y"].shape == (1, 2)
    with pytest.raises(InputError, match="has no loss"):
        m.gradients(x=np.ones((1, 4)))


def test_verify_reports_every_tensor(model):
    report = model.verify(**_batch(6))
    assert report.ok, report.table()
    names = {(c.tensor, c.kind) for c in report.checks}
    assert ("logits", "C vs reference") in names
    assert ("d loss/d W1", "reference vs finite differences") in names
    assert len(report.checks) == 1 + 1 + 4 + 4
    assert "all checks passed" in report.table()


def test_write_c_writes_both_files(model, tmp_path):
    c, h = model.write_c(tmp_path / "out")
    assert c.read_text() == model.c_source and h.read_text() == model.c_header
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mlp.c", "mlp.h"]


# ---------------------------------------------------------------- training surface

def test_evaluate_is_one_forward_pass_matching_forward_and_the_reference(model):
    data = _batch(9, seed=3)
    loss, outs = model.evaluate(**data)
    ref = graphc.reference(model.graph)
    ref.set_params(model.get_params())
    assert loss == pytest.approx(ref.loss(**data), rel=1e-5)
    assert loss == pytest.approx(model.gradients(**data)[0], rel=1e-6)
    np.testing.assert_array_equal(outs["logits"], model.forward(**data)["logits"])
    with pytest.raises(InputError, match="missing input 'y'"):
        model.evaluate(x=data["x"])


def test_train_step_layout_in_the_header_and_state_names():
    m = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float64",
                       optimizer={"name": "adam", "lr": 0.01})
    h = m.c_header
    assert "#define MLP_STATE_SIZE 4826\n" in h
    assert ("Optimizer state, adam: step count, lr, one_minus_beta1, one_minus_beta2, eps, "
            "weight_decay, exp_avg, exp_avg_sq.") in re.sub(r"\s*\n \*\s*", " ", h)
    assert "#define MLP_STATE_exp_avg_sq_OFFSET 2416 " in h
    # The gradients (2410) rounded up to the 16-element alignment, then the gradients
    # entry's arena (16 fixed, 144 per example), where the update's two per-step scalars
    # (16 elements each, for the alignment) go afterwards: it runs only for n >= 1.
    assert "#define MLP_TRAIN_STEP_WORK_SIZE(n) ((size_t)2432 + (size_t)144 * (size_t)(n))" in h
    assert ("double mlp_train_step(double *params, double *state, double *work, size_t n, "
            "const double *in_x, const double *in_y);") in " ".join(h.split())
    assert m.optimizer["lr"] == 0.01 and m.optimizer["betas"] == [0.9, 0.999]
    data = _batch(5)
    before = m.get_params()
    loss0, grads = m.gradients(**data)
    assert m.train_step(**data) == loss0
    state = m.optimizer_state()
    assert state["step"] == 1 and set(state) == {"step", "exp_avg", "exp_avg_sq", "hyperparameters"}
    for p in before:  # first Adam step: m = (1-β1)·g, v = (1-β2)·g²
        np.testing.assert_allclose(state["exp_avg"][p], 0.1 * grads[p], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(state["exp_avg_sq"][p], 0.001 * grads[p] ** 2, rtol=1e-12,
                                   atol=1e-300)
    m.reset_optimizer()
    assert m.optimizer_state()["step"] == 0


@pytest.mark.parametrize("opt, size, layout", [
    ({"name": "sgd"}, 3, "sgd: step count, lr, weight_decay"),
    ({"name": "momentum"}, 2414, "momentum: step count, lr, momentum, weight_decay, "
                                 "momentum_buffer"),
    ({"name": "adam"}, 4826, "adam: step count, lr, one_minus_beta1, one_minus_beta2, eps, "
                             "weight_decay, exp_avg, exp_avg_sq")])
def test_state_size_per_optimizer(opt, size, layout):
    _, cm = graphc.generate(ROOT / "examples/mlp.yaml", optimizer=opt)
    assert cm.state_size == size
    assert f"#define MLP_STATE_SIZE {size}\n" in cm.header
    assert f"Optimizer state, {layout}." in re.sub(r"\s*\n \*\s*", " ", cm.header)


def test_training_needs_a_loss_and_an_optimizer():
    spec = {"name": "noloss", "inputs": {"x": [3]}, "params": {"W": {"shape": [2, 3]}},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]}}, "outputs": ["h"]}
    m = graphc.compile(spec)
    with pytest.raises(InputError, match="model 'noloss' has no loss, so it cannot train"):
        m.train_step(x=np.zeros((1, 3)))
    with pytest.raises(graphc.SpecError, match="an optimizer needs a loss"):
        graphc.compile(spec, optimizer="sgd")
    lossy = graphc.load(ROOT / "examples/mlp.yaml").to_spec()
    del lossy["optimizer"]
    m = graphc.compile(lossy)
    with pytest.raises(InputError, match="has no optimizer: declare an 'optimizer:' section"):
        m.train_step(**_batch(2))


def test_save_and_load_params_round_trip(model, tmp_path):
    path = tmp_path / "p.npz"
    model.save_params(path)
    other = graphc.compile(ROOT / "examples/mlp.yaml", seed=99)
    other.load_params(path)
    a, b = model.get_params(), other.get_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("arrays, message", [
    ({"W1": np.zeros((32, 64))}, "missing param 'b1'"),
    ({"W1": np.zeros((32, 64)), "b1": np.zeros(32), "W2": np.zeros((10, 32)), "b2": np.zeros(10),
      "W3": np.zeros(1)}, "unknown array 'W3'"),
    ({"W1": np.zeros((64, 32)), "b1": np.zeros(32), "W2": np.zeros((10, 32)), "b2": np.zeros(10)},
     r"param 'W1' must be a real array of shape \(32, 64\), got float64 \(64, 32\)"),
    ({"W1": np.full((32, 64), np.nan), "b1": np.zeros(32), "W2": np.zeros((10, 32)),
      "b2": np.zeros(10)}, "param 'W1' holds non-finite values"),
])
def test_load_params_errors_name_the_file_and_param(model, tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    before = model.get_params()
    with pytest.raises(InputError, match=message) as info:
        model.load_params(path)
    assert str(path) in str(info.value)
    assert all(np.array_equal(before[k], v) for k, v in model.get_params().items())


def test_load_params_unreadable_file(model, tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(InputError, match="cannot read params from .*junk.npz"):
        model.load_params(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="cannot read params from .*absent.npz"):
        model.load_params(tmp_path / "absent.npz")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_baked_params_predict_like_forward(model, tmp_path, dtype):
    trained = graphc.compile(ROOT / "examples/mlp.yaml", dtype=dtype, seed=5)
    for k in range(3):
        trained.train_step(**_batch(16, seed=k))
    trained.save_params(tmp_path / "t.npz")
    baked = graphc.compile(ROOT / "examples/mlp.yaml", dtype=dtype, params=tmp_path / "t.npz")
    assert "static const " + ("float" if dtype == "float32" else "double") + \
        " trained_params[2410] = {" in baked.c_source
    assert set(baked.cmodule.entries) == {"forward", "predict"}
    data = _batch(7, seed=11)
    # The literals read back to the very same values, so predictions are bit-identical.
    np.testing.assert_array_equal(baked.predict(**data)["logits"], trained.forward(**data)["logits"])
    np.testing.assert_array_equal(baked.forward(**data)["logits"], trained.forward(**data)["logits"])
    with pytest.raises(InputError, match="compiled for inference with baked params"):
        baked.train_step(**data)
    with pytest.raises(InputError, match="has no baked params"):
        trained.predict(**data)


def test_baking_refuses_non_finite_params():
    params = {k: v.astype(np.float64) for k, v in
              graphc.compile(ROOT / "examples/mlp.yaml").get_params().items()}
    params["b2"][3] = np.inf
    with pytest.raises(InputError, match="param 'b2' holds non-finite values in float64"):
        graphc.generate(ROOT / "examples/mlp.yaml", "float64", params=params)
    params["b2"][3] = 1e39  # finite, but not as a float
    with pytest.raises(InputError, match="param 'b2' holds non-finite values in float32"):
        graphc.generate(ROOT / "examples/mlp.yaml", "float32", params=params)


def test_inputs_in_any_layout_give_the_same_results(model):
    """The fast path (contiguous arrays of the model's dtype) and the converting path agree."""
    data = _batch(6, seed=21)
    want = model.forward(**data)["logits"]
    x32 = data["x"].astype(np.float32)
    wide = np.zeros((6, 128), np.float32)
    wide[:, ::2] = x32
    fortran = np.asfortranarray(x32)
    readonly = x32.copy()
    readonly.flags.writeable = False
    swapped = x32.astype(">f4")   # float32, but not the model's dtype object: converted
    # float32 and C-contiguous, but one byte off a float's alignment: C must not read it
    raw = np.zeros(x32.nbytes + 1, np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(x32.shape)
    misaligned[:] = x32
    assert not misaligned.flags.aligned
    for x in (x32, wide[:, ::2], fortran, readonly, swapped, misaligned, data["x"],
              data["x"].tolist()):
        np.testing.assert_array_equal(model.forward(x=x)["logits"], want)
    with pytest.raises(InputError, match="input 'y' has batch size 5, but 'x' has 6"):
        model.gradients(x=x32, y=data["y"][:5].astype(np.float32))
    with pytest.raises(InputError, match="missing input 'y'"):
        model.gradients(x=x32)


def test_work_arena_grows_and_serves_smaller_batches(model):
    ref = graphc.reference(model.graph)
    ref.set_params(model.get_params())
    for n in (2, 40, 3, 41, 1):
        data = {k: v.astype(np.float32) for k, v in _batch(n, seed=n).items()}
        loss, _ = model.gradients(**data)
        assert loss == pytest.approx(ref.loss(**data), rel=1e-5)


def test_small_calls_match_the_reference_at_every_batch_size_and_free_a_moved_arena():
    """Calls with small inputs go to C through a plan per input shape (n, output shapes,
    work arena): more sizes than it remembers, and a batch that moves the arena, give the
    reference's results, and no plan keeps the old arena alive."""
    import gc
    import weakref
    from graphc.model import MAX_CALL_SHAPES, STAGE_BYTES
    spec = {"name": "tiny", "inputs": {"x": [2], "t": [1]},
            "params": {"W": {"shape": [1, 2], "init": "he_normal"},
                       "b": {"shape": [1], "init": "uniform"}},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "b"]},
                      "loss": {"op": "mse", "inputs": ["h", "t"]}},
            "outputs": ["h"], "loss": "loss"}
    m = graphc.compile(spec, dtype="float32", seed=4)
    ref = graphc.reference(m.graph)
    ref.set_params(m.get_params())
    rng = np.random.default_rng(0)

    def batch(n):
        return {"x": rng.standard_normal((n, 2)).astype(np.float32),
                "t": rng.standard_normal((n, 1)).astype(np.float32)}
    sizes = [*range(1, MAX_CALL_SHAPES + 3), 1, 2]
    assert max(sizes) * 2 * 4 < STAGE_BYTES     # every one of them a small call
    for n in sizes:
        data = batch(n)
        np.testing.assert_allclose(m.forward(x=data["x"])["h"], ref.forward(**data)["h"],
                                   rtol=1e-5, atol=1e-6)
        loss, outs = m.evaluate(**data)
        assert loss == pytest.approx(ref.loss(**data), rel=1e-5)
    old_arena = weakref.ref(m._work)
    m.forward(x=batch(4 * STAGE_BYTES)["x"])     # the arena moves, for a larger batch
    gc.collect()
    assert old_arena() is None
    data = batch(3)
    np.testing.assert_allclose(m.forward(x=data["x"])["h"], ref.forward(**data)["h"],
                               rtol=1e-5, atol=1e-6)
    first, second = m.forward(x=data["x"])["h"], m.forward(x=data["x"])["h"]
    assert not np.shares_memory(first, second)   # fresh outputs every call
    dropped = weakref.ref(m)   # the calls hold no cycle through the model: freed at once
    gc.disable()
    try:
        del m
        assert dropped() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plain_calls_run_in_c_and_every_other_call_as_before(dtype):
    """Calls on exactly the entry's inputs, arrays as they are, run in C
    (codegen/fastcall.c); a call that needs a larger arena, converting, staging or an error
    goes to the Python path. Both give the bound call's bits."""
    from graphc.model import STAGE_BYTES
    m = graphc.compile(ROOT / "examples/mlp.yaml", dtype=dtype, seed=5)
    baked = graphc.compile(ROOT / "examples/mlp.yaml", dtype=dtype, params=m.get_params())
    fast, fast_predict = m._runs["forward"].__self__, baked._runs["predict"].__self__
    assert type(fast).__name__ == "Caller" and fast.work_batch == 0
    assert graphc.compile(ROOT / "examples/mlp.yaml", dtype=dtype).forward(
        x=np.ones((2, 64), dtype))["logits"].shape == (2, 10)   # a model made for one call
    rng = np.random.default_rng(0)

    def check(x):
        bound = m.bind("forward", x=np.array(x, dtype, order="C"))
        bound()
        want = bound.outputs["logits"]
        for got in (m.forward(x=x)["logits"], baked.predict(x=x)["logits"]):
            assert got.dtype == dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)

    check(rng.standard_normal((6, 64)).astype(dtype))   # the arena grows: Python's path
    assert fast.work_batch == fast_predict.work_batch == 6
    assert set(m._sizes["forward"]) == {(6, 64)}
    for n in (1, 4, 6, 3):    # the arena serves them: C, and no Python plan is made
        check(rng.standard_normal((n, 64)).astype(dtype))
    assert set(m._sizes["forward"]) == {(6, 64)}
    x = rng.standard_normal((5, 64))
    other = np.float32 if dtype == "float64" else np.float64
    check(x.astype(other))                               # converted
    check(x.astype(dtype).tolist())                      # not an array
    check(np.asfortranarray(x.astype(dtype)))            # not C-contiguous
    check(x.astype(dtype).view(type("Sub", (np.ndarray,), {})))   # a subclass
    raw = np.zeros(x.size * np.dtype(dtype).itemsize + 1, np.uint8)
    unaligned = raw[1:].view(dtype).reshape(x.shape)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    check(unaligned)
    # The plain calls skip Python's forward too (fastcall.c's Method): a stand-in for the
    # Python path sees only the calls that C does not serve.
    seen, python_path = [], m._runs["forward"]
    m._runs["forward"] = lambda given: seen.append(sorted(given)) or python_path(given)
    check(rng.standard_normal((2, 64)).astype(dtype))
    assert seen == []
    check(x.astype(other))
    m.forward(**{"x": x.astype(dtype)})   # served by the Python function, as it was made
    assert seen == [["x"], ["x"]]
    m._runs["forward"] = python_path
    # read as an attribute, each method is the Python function (bound), as it was made
    assert m.forward.__func__ is CompiledModel.forward and m.forward.__self__ is m
    assert str(inspect.signature(m.train_step)) == "(**inputs) -> 'float'"
    assert "batch-mean loss" in CompiledModel.evaluate.__doc__
    with pytest.raises(TypeError, match="takes 1 positional argument but 2 were given"):
        m.forward(x)
    big = rng.standard_normal((STAGE_BYTES // 64 // np.dtype(dtype).itemsize + 1, 64))
    check(big.astype(dtype))                             # staged if need be
    assert fast.work_batch == big.shape[0]
    with pytest.raises(InputError, match=r"input 'x' must have shape \(n, 64\)"):
        m.forward(x=np.zeros((3, 63), dtype))
    with pytest.raises(InputError, match="the batch is empty"):
        m.forward(x=np.zeros((0, 64), dtype))
    with pytest.raises(InputError, match="unknown input 'z'"):
        m.forward(x=np.zeros((3, 64), dtype), z=np.zeros(3))
    with pytest.raises(InputError, match="missing input 'x'"):
        m.forward(y=np.zeros((3, 10), dtype))
    # evaluate and train_step run in C too (every input of the model's dtype): the bits of
    # a twin's bound calls, and, the arena serving these batches, no Python plan made
    twin = graphc.compile(ROOT / "examples/mlp.yaml", dtype=dtype, seed=5)
    assert set(m._fast_calls) == {"forward", "evaluate", "train_step"}
    for n in (3, 1, 5):
        data = {k: v.astype(dtype) for k, v in _batch(n, seed=n).items()}
        evaluate = twin.bind("evaluate", **data)
        loss, outs = m.evaluate(**data)
        assert loss == evaluate() and type(loss) is float
        np.testing.assert_array_equal(outs["logits"], evaluate.outputs["logits"])
        assert m.train_step(**data) == twin.bind("train_step", **data)()
        np.testing.assert_array_equal(m.get_params()["W1"], twin.get_params()["W1"])
    assert not m._sizes["train_step"] and not m._sizes["evaluate"]
    assert m.optimizer_state()["step"] == 3
    # the model's lock, which the C call takes: threading.Lock's behaviour
    with m._lock:
        assert m._lock.locked()
    assert not m._lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        m._lock.release()


def test_the_c_call_keeps_the_gil_only_while_its_kernels_are_short():
    """CModule.work: each entry's loop iterations per call, (fixed, per example); the C call
    from Python keeps the GIL below GIL_ITERATIONS of them and releases it from there."""
    from graphc.model import GIL_ITERATIONS
    spec = {"name": "d", "inputs": {"x": [5], "y": [3]}, "params": {"W": [3, 5], "b": [3]},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "b"]},
                      "a": {"op": "relu", "inputs": ["h"]},
                      "loss": {"op": "mse", "inputs": ["a", "y"]}},
            "outputs": ["a"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1}}
    m = graphc.compile(spec, dtype="float64")
    # forward: dense and relu in one 3x5 nest; evaluate adds the squared errors (3) and the
    # batch mean (1); gradients: the forward again (15 + 3 + 3 + 1), dh (3), dW (15), db (3);
    # a train step, those and the step count (1) and the SGD update of 18 params
    assert m.cmodule.work == {"forward": (0, 15), "evaluate": (0, 19), "gradients": (0, 43),
                              "train_step": (19, 43)}
    first = {kind: -(-(GIL_ITERATIONS - fixed) // each)
             for kind, (fixed, each) in m.cmodule.work.items() if kind != "gradients"}
    assert {k: c.release_from for k, c in m._fast_calls.items()} == first
    twin = graphc.compile(spec, dtype="float64")
    rng = np.random.default_rng(4)
    for n in (first["train_step"] - 1, first["train_step"]):   # both sides of the threshold
        x, y = rng.standard_normal((n, 5)), rng.standard_normal((n, 3))
        with m._lock:   # the arena serves n: the calls below are the C path's
            m._work_for(n)
        assert m.train_step(x=x, y=y) == twin.bind("train_step", x=x, y=y)()
        np.testing.assert_array_equal(m.forward(x=x)["a"], twin.forward(x=x)["a"])
        assert not m._sizes["train_step"] and not m._sizes["forward"]


def test_per_example_scalar_inputs_take_the_fast_path_and_reject_bad_shapes():
    spec = {"name": "scal", "inputs": {"x": [], "t": []}, "params": {"w": {"shape": [], "init": "ones"}},
            "nodes": {"h": {"op": "mul", "inputs": ["x", "w"]},
                      "loss": {"op": "mse", "inputs": ["h", "t"]}},
            "outputs": ["h"], "loss": "loss"}
    m = graphc.compile(spec, dtype="float64")
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(m.forward(x=x)["h"], x)
    with pytest.raises(InputError, match=r"input 'x' must have shape \(n\)"):
        m.forward(x=np.float64(2.0))


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of `a` whose data starts 4 bytes past a 16-byte boundary: never 64-aligned."""
    raw = np.empty(a.nbytes + 64, np.uint8)
    at = -raw.ctypes.data % 64 + 4
    out = raw[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_model_memory_is_64_byte_aligned_and_large_inputs_are_staged_aligned():
    """The kernels' 64-byte vector loads assume the arena layout's alignment holds in memory;
    a large misaligned input is copied to an aligned buffer, with bit-identical results."""
    m = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", seed=3)
    twin = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", seed=3)
    for a in (m._params.flat, m._grads, m._state, m._work_for(50) and m._work):
        assert a.ctypes.data % 64 == 0
    for n in (40, 20, 1):     # the staging buffer serves smaller batches; 1 is not staged
        data = {k: v.astype(np.float32) for k, v in _batch(n, seed=n).items()}
        odd = {k: _misaligned(v) for k, v in data.items()}
        assert all(v.ctypes.data % 64 for v in odd.values())
        np.testing.assert_array_equal(m.forward(x=odd["x"])["logits"],
                                      twin.forward(x=data["x"])["logits"])
        assert m.train_step(**odd) == twin.train_step(**data)
        np.testing.assert_array_equal(m._params.flat, twin._params.flat)
    assert set(m._stages) == {"x"}    # y (≤ 40 × 10 floats) is under STAGE_BYTES: passed as is


def test_bound_calls_read_their_inputs_in_place_and_match_the_model():
    m = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", seed=5)
    twin = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", seed=5)
    data = {k: v.astype(np.float32) for k, v in _batch(7, seed=2).items()}
    x = data["x"].copy()
    forward = m.bind("forward", x=x)
    assert forward() is None and forward.inputs["x"] is x and forward.batch == 7
    out = forward.outputs["logits"]
    np.testing.assert_array_equal(out, m.forward(x=x)["logits"])
    x[...] = _batch(7, seed=3)["x"]          # refilled in place: the next call sees it
    forward()
    assert forward.outputs["logits"] is out
    np.testing.assert_array_equal(out, m.forward(x=x)["logits"])

    step = m.bind("train_step", batch=7)
    assert set(step.inputs) == {"x", "y"} and step.inputs["x"].ctypes.data % 64 == 0
    for seed in range(3):
        batch = {k: v.astype(np.float32) for k, v in _batch(7, seed=seed).items()}
        for k, v in batch.items():
            step.inputs[k][...] = v
        assert step() == twin.train_step(**batch)
    np.testing.assert_array_equal(m._params.flat, twin._params.flat)
    assert m.optimizer_state()["step"] == 3

    evaluate = m.bind("evaluate", **step.inputs)
    loss, outs = m.evaluate(**step.inputs)
    assert evaluate() == loss
    np.testing.assert_array_equal(evaluate.outputs["logits"], outs["logits"])

    baked = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", params=m.get_params())
    predict = baked.bind("predict", x=x)
    assert predict() is None
    np.testing.assert_array_equal(predict.outputs["logits"], m.forward(x=x)["logits"])


@pytest.mark.parametrize("kind, args, message", [
    ("gradients", {"batch": 2}, "kind must be one of forward, evaluate, train_step, predict"),
    ("predict", {"batch": 2}, "baked params"),
    ("forward", {}, "give every input or a batch size of at least 1, got batch=None"),
    ("forward", {"batch": 0}, "got batch=0"),
    ("forward", {"z": np.zeros((2, 64), np.float32)}, "unknown input 'z' \\(it reads x\\)"),
    ("forward", {"x": np.zeros((2, 64))}, "input 'x' must be a C-contiguous float32 array"),
    ("forward", {"x": np.zeros((64, 2), np.float32).T}, "C-contiguous"),
    ("forward", {"x": np.zeros((2, 63), np.float32)}, r"shape \(batch, 64\), got \(2, 63\)"),
    ("forward", {"x": np.zeros((2, 64), np.float32), "batch": 3}, "batch size 2, not 3"),
])
def test_bind_errors_name_the_input_and_the_reason(model, kind, args, message):
    with pytest.raises(InputError, match=message):
        model.bind(kind, **args)


# staged inputs, the plain calls' C path, and one short enough to keep the GIL there
@pytest.mark.parametrize("n", [300, 15, 1])
def test_threads_sharing_a_model_get_their_own_results(n):
    """cffi releases the GIL in C, and every call of a model shares its work arena: without
    the model's lock, two threads got 353 of 400 forwards wrong. Bound calls have arenas of
    their own and run beside the model's calls."""
    import threading
    m = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32", seed=2)
    xs = [_batch(n, seed=s)["x"].astype(np.float32) for s in (1, 2)]
    want = [m.forward(x=x)["logits"] for x in xs]
    bound = m.bind("forward", x=xs[1].copy())
    wrong = []

    def run(i):
        for _ in range(100):
            if not np.array_equal(m.forward(x=xs[i])["logits"], want[i]):
                wrong.append(i)

    def run_bound():
        for _ in range(100):
            bound()
            if not np.array_equal(bound.outputs["logits"], want[1]):
                wrong.append("bound")
    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    threads.append(threading.Thread(target=run_bound))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
