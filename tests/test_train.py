"""graphc.fit / graphc.evaluate / History, and the data helpers: what a training run records,
that a seed repeats it exactly, and that Ctrl-C leaves the params of the steps taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.data import load_dataset, split
from graphc.errors import GraphcError, InputError

ROOT = Path(__file__).resolve().parent.parent


def _spec(loss_op: str = "softmax_cross_entropy", **extra) -> dict:
    """Logistic regression: 4 features, 3 classes (or 3 independent yes/no labels)."""
    return {"name": "toy", "inputs": {"x": [4], "y": [3]},
            "params": {"W": {"shape": [3, 4]}, "b": {"shape": [3]}},
            "nodes": {"logits": {"op": "dense", "inputs": ["x", "W", "b"]},
                      "loss": {"op": loss_op, "inputs": ["logits", "y"]}},
            "outputs": ["logits"], "loss": "loss",
            "optimizer": {"name": "adam", "lr": 0.05}, **extra}


TRUE_W = np.array([[2.0, -1.0, 0.5, 0.0], [-1.0, 2.0, 0.0, 0.5], [0.0, 0.5, -2.0, 1.0]])


def _data(n: int, seed: int = 0, kind: str = "softmax") -> dict[str, np.ndarray]:
    """Labels from a linear rule, so logistic regression can learn them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    scores = x @ TRUE_W.T
    y = np.eye(3)[scores.argmax(axis=1)] if kind == "softmax" else (scores > 0).astype(float)
    return {"x": x, "y": y}


@pytest.fixture(scope="module")
def compiled():
    return graphc.compile(_spec(), dtype="float64")


@pytest.fixture
def model(compiled):
    """The module's model back at its initial params and a fresh optimizer."""
    compiled.init_params(0)
    compiled.reset_optimizer()
    return compiled


def _fit(model, data, **kw):
    return graphc.fit(model, data, progress=False, **kw)


# ---------------------------------------------------------------- what fit records

def test_history_records_each_epoch_and_a_seed_repeats_the_run(model):
    data = _data(50)
    h = _fit(model, data, epochs=3, batch_size=16, seed=5)
    assert len(h) == len(h.epochs) == 3 and h.keys() == ["loss", "accuracy"]
    assert h.steps == 3 * 4 and not h.interrupted and h.seconds > 0
    assert h["loss"] == [e["loss"] for e in h.epochs]
    assert "3 epochs, 12 steps" in repr(h) and "accuracy" in repr(h)
    first = model.get_params()

    model.init_params(0)
    model.reset_optimizer()
    again = _fit(model, data, epochs=3, batch_size=16, seed=5)
    assert again["loss"] == h["loss"]
    assert all(np.array_equal(first[p], v) for p, v in model.get_params().items())

    model.init_params(0)
    model.reset_optimizer()
    _fit(model, data, epochs=3, batch_size=16, seed=6)
    assert not np.array_equal(first["W"], model.get_params()["W"])


def test_loss_falls_and_accuracy_rises_on_a_learnable_problem(model):
    h = _fit(model, _data(200), epochs=30, batch_size=20)
    assert h["loss"][-1] < 0.3 * h["loss"][0]
    # The first epoch's accuracy is 0.555 (from 0.31 at the initial params), the last 0.985.
    assert h["accuracy"][-1] >= 0.95
    assert h["accuracy"][-1] - h["accuracy"][0] >= 0.25


def test_every_example_once_per_epoch_last_batch_smaller_loss_weighted(model, monkeypatch):
    data = _data(10)
    seen, sizes, losses = [], [], []
    real = model.train_step

    def step(**batch):
        seen.append(batch["x"])
        sizes.append(len(batch["x"]))
        losses.append(real(**batch))
        return losses[-1]
    monkeypatch.setattr(model, "train_step", step)
    h = _fit(model, data, epochs=2, batch_size=4)
    assert sizes == [4, 4, 2] * 2 and h.steps == 6
    for epoch in (seen[:3], seen[3:]):
        rows = np.concatenate(epoch)
        assert sorted(map(tuple, rows)) == sorted(map(tuple, data["x"]))
    assert not np.array_equal(np.concatenate(seen[:3]), np.concatenate(seen[3:]))  # reshuffled
    assert h["loss"][0] == pytest.approx(np.dot(losses[:3], sizes[:3]) / 10, rel=1e-12)

    seen.clear()
    _fit(model, data, epochs=1, batch_size=4, shuffle=False)
    np.testing.assert_array_equal(np.concatenate(seen), data["x"])


def test_validation_metrics_are_a_direct_evaluate(model):
    train, val = _data(60, seed=1), _data(25, seed=2)
    h = _fit(model, train, epochs=2, batch_size=8, validation=val)
    assert h.keys() == ["loss", "accuracy", "val_loss", "val_accuracy"]
    direct = graphc.evaluate(model, val)
    assert h["val_loss"][-1] == pytest.approx(direct["loss"], rel=1e-12)
    assert h["val_accuracy"][-1] == direct["accuracy"]
    assert h["accuracy"][-1] == graphc.evaluate(model, train)["accuracy"]
    # Batched evaluation weighs each example once, whatever the batch size.
    small = graphc.evaluate(model, val, batch_size=7)
    assert small["loss"] == pytest.approx(direct["loss"], rel=1e-12)
    assert small["accuracy"] == direct["accuracy"]


def test_accuracy_and_loss_match_numpy_on_the_forward_pass(model):
    data = _data(80, seed=3)
    _fit(model, data, epochs=2, batch_size=16)
    got = graphc.evaluate(model, data, batch_size=30)
    logits = model.forward(x=data["x"])["logits"]
    assert got["accuracy"] == np.mean(logits.argmax(1) == data["y"].argmax(1))
    assert 0 < got["accuracy"] < 1
    assert got["loss"] == pytest.approx(model.gradients(**data)[0], rel=1e-12)


def test_binary_cross_entropy_accuracy_counts_every_label():
    model = graphc.compile(_spec("bce_with_logits"), dtype="float64")
    data = _data(80, seed=4, kind="bce")
    _fit(model, data, epochs=1, batch_size=16)
    logits = model.forward(x=data["x"])["logits"]
    want = np.mean((logits > 0) == (data["y"] > 0.5))
    got = graphc.evaluate(model, data)["accuracy"]
    assert got == pytest.approx(want, rel=1e-12) and 0 < got < 1


def test_no_accuracy_when_the_logits_are_not_an_output():
    spec = _spec()
    spec["nodes"]["p"] = {"op": "softmax", "inputs": ["logits"]}
    spec["outputs"] = ["p"]
    model = graphc.compile(spec, dtype="float64")
    assert _fit(model, _data(20), epochs=1).keys() == ["loss"]
    with pytest.raises(InputError, match="metric 'accuracy' compares the loss's prediction "
                                         "with its target: that needs a loss op"):
        _fit(model, _data(20), metrics=["accuracy"])


def test_tuple_and_list_data_map_to_the_inputs_in_spec_order(model):
    data = _data(30)
    h = _fit(model, data, epochs=2, batch_size=8, seed=1)
    want = model.get_params()
    for form in ((data["x"], data["y"]), [data["x"], data["y"]]):
        model.init_params(0)
        model.reset_optimizer()
        again = _fit(model, form, epochs=2, batch_size=8, seed=1, validation=form)
        assert again["loss"] == h["loss"]
        assert all(np.array_equal(want[p], v) for p, v in model.get_params().items())
    assert graphc.evaluate(model, (data["x"], data["y"])) == graphc.evaluate(model, data)


def test_validation_split_holds_out_the_last_examples_before_shuffling(model, monkeypatch):
    data = _data(50, seed=7)
    seen, real = [], model.train_step

    def step(**batch):
        seen.append(batch["x"])
        return real(**batch)
    monkeypatch.setattr(model, "train_step", step)
    h = _fit(model, data, epochs=2, batch_size=8, validation_split=0.2, seed=3)
    # Keras's rule: int(50 * 0.8) = 40 examples train, in 5 steps an epoch; 10 validate.
    assert len(seen) == 10
    assert sorted(map(tuple, np.concatenate(seen[:5]))) == sorted(map(tuple, data["x"][:40]))
    train, val = ({k: a[:40] for k, a in data.items()}, {k: a[40:] for k, a in data.items()})
    direct = graphc.evaluate(model, val)
    assert h["val_loss"][-1] == pytest.approx(direct["loss"], rel=1e-12)
    assert h["val_accuracy"][-1] == direct["accuracy"]
    trained = model.get_params()
    monkeypatch.undo()

    model.init_params(0)
    model.reset_optimizer()
    again = _fit(model, train, epochs=2, batch_size=8, seed=3, validation=val)
    assert again.epochs == h.epochs
    assert all(np.array_equal(trained[p], v) for p, v in model.get_params().items())


def test_classifier_metrics_match_numpy(model):
    train, val = _data(60, seed=1), _data(40, seed=2)
    h = _fit(model, train, epochs=1, batch_size=8, validation=val,
             metrics=["accuracy", "top_k_accuracy", "top_2_accuracy", ("top_k_accuracy", 1)])
    names = ["loss", "accuracy", "top_k_accuracy", "top_2_accuracy", "top_1_accuracy"]
    assert h.keys() == names + [f"val_{k}" for k in names]
    logits, labels = model.forward(x=val["x"])["logits"], val["y"].argmax(1)
    in_top_2 = np.mean([label in np.argsort(-row)[:2] for row, label in zip(logits, labels)])
    accuracy = np.mean(logits.argmax(1) == labels)
    assert 0 < accuracy < in_top_2 < 1
    assert h["val_top_2_accuracy"] == [in_top_2]
    assert h["val_top_1_accuracy"] == h["val_accuracy"] == [accuracy]
    assert h["val_top_k_accuracy"] == [1.0]   # k = 5, and 3 classes
    got = graphc.evaluate(model, val, batch_size=7, metrics="top_2_accuracy")
    assert got == {"loss": pytest.approx(h["val_loss"][0], rel=1e-12),
                   "top_2_accuracy": in_top_2}


def test_top_k_takes_class_indices_and_counts_a_tie_as_a_hit():
    from graphc.metrics import LossPair, Metric, batch_sums
    logits = np.array([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    labels = np.array([2, 1, 0], np.int32)   # ranks 2nd, tied 2nd/3rd, 4th
    top = [Metric(f"top_{k}_accuracy", "top_k_accuracy", k) for k in (1, 2, 3)] + \
        [Metric("accuracy", "accuracy")]
    pair = LossPair("softmax_cross_entropy", "logits", "y")
    for target in (labels, np.eye(4)[labels]):   # indices or one-hot rows: the same
        assert batch_sums(top, pair, {"logits": logits}, {"y": target}) == [0, 2, 2, 0]


REGRESSION = {"name": "reg", "inputs": {"x": [4], "y": [2]},
              "params": {"W": {"shape": [2, 4]}, "b": {"shape": [2]}},
              "nodes": {"pred": {"op": "dense", "inputs": ["x", "W", "b"]},
                        "loss": {"op": "mse", "inputs": ["pred", "y"]}},
              "outputs": ["pred"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.05}}


def test_regression_metrics_match_numpy():
    model = graphc.compile(REGRESSION, dtype="float64")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4))
    y = x @ rng.standard_normal((4, 2)) + 0.3 * rng.standard_normal((40, 2))
    h = _fit(model, (x, y), epochs=2, batch_size=8, validation_split=0.25,
             metrics=["mae", "mse", "rmse"])
    assert h.keys() == ["loss", "mae", "mse", "rmse", "val_loss", "val_mae", "val_mse", "val_rmse"]
    err = model.forward(x=x[30:])["pred"] - y[30:]
    assert h["val_mae"][-1] == pytest.approx(np.abs(err).mean(), rel=1e-12)
    assert h["val_mse"][-1] == pytest.approx((err ** 2).mean(), rel=1e-12)
    assert h["val_rmse"][-1] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-12)
    assert h["val_mse"][-1] == pytest.approx(h["val_loss"][-1], rel=1e-12)   # the loss is mse
    err = model.forward(x=x[:30])["pred"] - y[:30]
    assert h["rmse"][-1] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-12)
    # rmse is the root of the data set's mse, not a mean of batch roots
    got = graphc.evaluate(model, (x[30:], y[30:]), batch_size=3, metrics=["rmse"])
    assert got["rmse"] == pytest.approx(h["val_rmse"][-1], rel=1e-12)
    assert _fit(model, (x, y), epochs=1).keys() == ["loss"]   # no default metric
    with pytest.raises(InputError, match="metric 'accuracy' does not apply to a 'mse' loss "
                                         "\\(its metrics: mae, mse, rmse\\)"):
        _fit(model, (x, y), metrics=["accuracy"])


# ---------------------------------------------------------------- Ctrl-C

def _replay(model, data, steps: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """What `steps` steps of fit do, written out: one generator, a permutation per epoch."""
    n = len(data["x"])
    rng, done = np.random.default_rng(seed), 0
    while done < steps:
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            if done == steps:
                break
            model.train_step(**{k: a[order[lo:lo + batch_size]] for k, a in data.items()})
            done += 1
    return model.get_params()


def test_keyboard_interrupt_keeps_the_params_of_the_steps_taken(model, monkeypatch):
    data, k = _data(40), 5  # 3 steps an epoch: interrupted in the second
    calls = []
    real = model.train_step

    def step(**batch):
        calls.append(1)
        if len(calls) > k:
            raise KeyboardInterrupt
        return real(**batch)
    monkeypatch.setattr(model, "train_step", step)
    h = _fit(model, data, epochs=10, batch_size=16, seed=3)
    assert h.interrupted and h.steps == k and len(h.epochs) == 1 and "interrupted" in repr(h)
    trained = model.get_params()
    monkeypatch.undo()

    model.init_params(0)
    model.reset_optimizer()
    want = _replay(model, data, k, 16, seed=3)
    assert all(np.array_equal(trained[p], want[p]) for p in want)


SIGINT_SCRIPT = """
import json, os, signal, sys
import numpy as np
import graphc
sys.path.insert(0, {tests!r})
from test_train import _data, _replay, _spec

# Python leaves SIGINT ignored when it starts ignored (a job started with & by a
# non-interactive shell): restore the handler that raises KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
model = graphc.compile(_spec(), dtype="float64")
data, calls, real = _data(40), [], model.train_step

def step(**batch):
    loss = real(**batch)
    calls.append(1)
    if len(calls) == 4:  # a real SIGINT while the 4th step is running
        os.kill(os.getpid(), signal.SIGINT)
    return loss
model.train_step = step
h = graphc.fit(model, data, epochs=100, batch_size=16, seed=3, progress=False)
trained = model.get_params()
model.train_step = real
model.init_params(0)
model.reset_optimizer()
want = _replay(model, data, h.steps, 16, seed=3)
print(json.dumps({{"steps": h.steps, "epochs": len(h.epochs), "interrupted": h.interrupted,
                  "same": all(np.array_equal(trained[p], want[p]) for p in want)}}))
"""


def test_sigint_stops_after_the_running_step():
    script = SIGINT_SCRIPT.format(tests=str(ROOT / "tests"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"steps": 4, "epochs": 1, "interrupted": True, "same": True}


# ---------------------------------------------------------------- History

def test_plot_writes_a_png(model, tmp_path):
    h = _fit(model, _data(30), epochs=3, batch_size=8, validation=_data(10, seed=1))
    h.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_metric_names_the_recorded_ones(model):
    h = _fit(model, _data(20), epochs=1)
    with pytest.raises(KeyError, match="'val_loss'.*recorded: loss, accuracy"):
        h["val_loss"]


# ---------------------------------------------------------------- errors

X, Y = _data(12)["x"], _data(12)["y"]


@pytest.mark.parametrize("kwargs, message", [
    ({"data": {"x": X, "y": Y[:-1]}}, "data: input 'y' has batch size 11, but 'x' has 12"),
    ({"data": {"x": X}}, "data: missing input 'y'"),
    ({"data": {"x": X, "y": Y, "z": X}}, "data: unknown input 'z'"),
    ({"data": (X,)}, "data: 1 array for 2 inputs: give one per input, in this order: x, y"),
    ({"data": X}, "data must be a dict of arrays named after the inputs, or a tuple of arrays "
                  "in their order (x, y), got ndarray"),
    ({"validation": (X, Y, X)}, "validation: 3 arrays for 2 inputs"),
    ({"validation": (X, Y), "validation_split": 0.5}, "give validation or validation_split"),
    ({"validation_split": 1.0}, "validation_split must lie strictly between 0 and 1, got 1.0"),
    ({"validation_split": 0.95}, "validation_split 0.95 of the 12 examples in data leaves no "
                                 "training examples"),
    ({"validation_split": 1e-17}, "leaves no validation examples"),
    ({"metrics": ["mae"]}, "metric 'mae' does not apply to a 'softmax_cross_entropy' loss "
                           "(its metrics: accuracy, top_k_accuracy)"),
    ({"metrics": ["acc"]}, "unknown metric 'acc' (known: accuracy, top_k_accuracy, mae, mse"),
    ({"metrics": [("top_k_accuracy", 0)]}, "k must be a positive integer, got 0"),
    ({"metrics": ["accuracy", "accuracy"]}, "metric 'accuracy' is asked for twice"),
    ({"callbacks": [print]}, "callbacks must be graphc.callbacks.Callback objects, got "
                             "builtin_function_or_method"),
    ({"data": {"x": X[:, :3], "y": Y}}, "data: input 'x' must have shape (n, 4)"),
    ({"validation": {"x": X[:5], "y": Y}}, "validation: input 'y' has batch size 12, but 'x' has 5"),
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"epochs": True}, "epochs must be a positive integer, got True"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
])
def test_fit_rejects_bad_arguments_before_any_step(model, kwargs, message):
    before = model.get_params()
    with pytest.raises(InputError) as e:
        graphc.fit(model, **{"data": {"x": X, "y": Y}, "progress": False, **kwargs})
    assert message in str(e.value)
    assert all(np.array_equal(before[p], v) for p, v in model.get_params().items())


def test_a_model_without_a_loss_cannot_be_fit():
    spec = _spec()
    del spec["loss"], spec["optimizer"], spec["nodes"]["loss"]
    with pytest.raises(InputError, match="'toy' has no loss"):
        graphc.fit(graphc.compile(spec), _data(4), progress=False)


# ---------------------------------------------------------------- data sets

def test_split_is_seeded_and_stratified():
    data = _data(300, seed=5)
    train, test = split(data, 0.25, seed=1)
    again, _ = split(data, 0.25, seed=1)
    other, _ = split(data, 0.25, seed=2)
    assert np.array_equal(train["x"], again["x"]) and not np.array_equal(train["x"], other["x"])
    assert len(train["x"]) + len(test["x"]) == 300
    assert sorted(map(tuple, np.concatenate([train["x"], test["x"]]))) == \
        sorted(map(tuple, data["x"]))
    per_class, in_test = data["y"].sum(0), test["y"].sum(0)
    np.testing.assert_array_equal(in_test, np.round(per_class * 0.25))
    with pytest.raises(GraphcError, match="strictly between 0 and 1"):
        split(data, 1.0, seed=0)


def test_digits_are_matched_to_the_inputs_by_shape():
    pytest.importorskip("sklearn")
    graph = graphc.Graph.from_spec({
        "name": "d", "inputs": {"label": [10], "image": [8, 8]},
        "params": {"W": {"shape": [10, 64]}},
        "nodes": {"f": {"op": "flatten", "inputs": ["image"]},
                  "logits": {"op": "dense", "inputs": ["f", "W"]},
                  "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "label"]}},
        "outputs": ["logits"], "loss": "loss"})
    data = load_dataset("digits", graph)
    assert data["image"].shape == (1797, 8, 8) and data["label"].shape == (1797, 10)
    assert data["image"].min() == 0 and data["image"].max() == 1
    np.testing.assert_array_equal(data["label"].sum(1), 1)
    with pytest.raises(GraphcError, match="does not fit input 'x' of shape \\[4\\]"):
        load_dataset("digits", graphc.Graph.from_spec(_spec()))
