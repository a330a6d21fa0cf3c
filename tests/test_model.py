"""The compiled model's Python surface: params, inputs, errors, batch sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.errors import InputError

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
