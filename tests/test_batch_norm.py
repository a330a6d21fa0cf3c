"""batch_norm and non-trainable params, end to end: the generated C against PyTorch's
nn.BatchNorm1d/2d (float64), and against the NumPy reference (float32 too).

One model holds both forms: a [C, H, W] batch norm after a convolution (BatchNorm2d:
statistics over the batch and the spatial axes) and a [C] one after a dense layer
(BatchNorm1d: over the batch). Its running statistics are params declared `trainable:
false`. Checked:

- `forward` and `evaluate` normalize by the running statistics (torch's `.eval()`), the
  gradients entry by the batch's (torch's `.train()`), and the two differ;
- train steps with Adam and with SGD (momentum) follow torch.optim step for step, the
  running statistics too (torch's update: momentum·batch + (1 − momentum)·running, the
  variance unbiased); they have no gradient and no optimizer slot;
- at batch 1 the [C] batch norm has one value per channel (torch refuses to train then):
  the running variance stays, the rest goes on, and everything is finite;
- the params API (get/set/save/load) includes the running statistics, `gradients` does not.

The C at n = 0 and under the sanitizers: tests/test_batch_sizes.py (examples/bn_cnn.yaml).
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest

from graphc.model import CompiledModel
from graphc.reference import reference

from conftest import compile_strict
from sweep import CC, Sweep, run_and_check, start_build

try:
    import torch
except ImportError:   # the comparisons with torch skip; those with the reference still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

SPEC = {
    "name": "bnnet", "inputs": {"x": [2, 5, 4], "y": [3]},
    "params": {
        "K": {"shape": [4, 2, 3, 3], "init": "he_normal"},
        "g1": {"shape": [4], "init": "uniform", "low": 0.5, "high": 1.5},
        "s1": {"shape": [4], "init": "normal", "std": 0.2},
        "m1": {"shape": [4], "init": "normal", "std": 0.3, "trainable": False},
        "v1": {"shape": [4], "init": "uniform", "low": 0.5, "high": 2.0, "trainable": False},
        "W1": {"shape": [6, 80], "init": "he_normal"},
        "g2": {"shape": [6], "init": "uniform", "low": 0.5, "high": 1.5},
        "s2": {"shape": [6], "init": "normal", "std": 0.2},
        "m2": {"shape": [6], "init": "normal", "std": 0.3, "trainable": False},
        "v2": {"shape": [6], "init": "uniform", "low": 0.5, "high": 2.0, "trainable": False},
        "W2": {"shape": [3, 6], "init": "glorot_uniform"}, "b2": {"shape": [3]}},
    "nodes": {
        "c": {"op": "conv2d", "inputs": ["x", "K"], "padding": 1},            # [4, 5, 4]
        "n1": {"op": "batch_norm", "inputs": ["c", "g1", "s1", "m1", "v1"],
               "eps": 1e-4, "momentum": 0.2},
        "a1": {"op": "tanh", "inputs": ["n1"]},
        "f": {"op": "flatten", "inputs": ["a1"]},                               # [80]
        "h": {"op": "dense", "inputs": ["f", "W1"]},                            # [6]
        "n2": {"op": "batch_norm", "inputs": ["h", "g2", "s2", "m2", "v2"]},
        "a2": {"op": "tanh", "inputs": ["n2"]},
        "logits": {"op": "dense", "inputs": ["a2", "W2", "b2"]},
        "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss", "optimizer": {"name": "adam", "lr": 0.01}}
TRAINABLE = ["K", "g1", "s1", "W1", "g2", "s2", "W2", "b2"]
RUNNING = ["m1", "v1", "m2", "v2"]
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
TORCH_RTOL = 1e-9


@functools.lru_cache(maxsize=None)
def model(dtype: str = "float64", optimizer: str = "adam"):
    return compile_strict(SPEC, dtype, optimizer=SGD if optimizer == "sgd" else None)


def fresh(dtype="float64", optimizer="adam", seed=3):
    """A model of its own on the shared build, at the params drawn from `seed`."""
    m = model(dtype, optimizer)
    return CompiledModel(m.graph, m.cmodule, m.built, seed=seed)


if torch is not None:
    class TorchNet(torch.nn.Module):
        """SPEC in torch's layers, with graphc's params."""

        def __init__(self, params: dict):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.2)
            self.lin1 = torch.nn.Linear(80, 6, bias=False)
            self.bn2 = torch.nn.BatchNorm1d(6)   # eps 1e-5, momentum 0.1: graphc's defaults
            self.lin2 = torch.nn.Linear(6, 3)
            self.double()
            where = {"K": self.conv.weight, "g1": self.bn1.weight, "s1": self.bn1.bias,
                     "m1": self.bn1.running_mean, "v1": self.bn1.running_var,
                     "W1": self.lin1.weight, "g2": self.bn2.weight, "s2": self.bn2.bias,
                     "m2": self.bn2.running_mean, "v2": self.bn2.running_var,
                     "W2": self.lin2.weight, "b2": self.lin2.bias}
            self.where = where
            with torch.no_grad():
                for name, t in where.items():
                    t.copy_(torch.from_numpy(np.asarray(params[name], dtype=np.float64)))

        def forward(self, x):
            a1 = torch.tanh(self.bn1(self.conv(x)))
            return self.lin2(torch.tanh(self.bn2(self.lin1(a1.flatten(1)))))

        def params(self) -> dict:
            return {name: t.detach().numpy().copy() for name, t in self.where.items()}

        def trainable(self) -> list:
            return [self.where[p] for p in TRAINABLE]


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 2, 5, 4)), "y": np.eye(3)[rng.integers(0, 3, n)]}


def torch_loss(net, batch):
    logits = net(torch.from_numpy(batch["x"]))
    return -(torch.from_numpy(batch["y"]) * torch.log_softmax(logits, 1)).sum(1).mean(), logits


def close(got, want, what, rtol=TORCH_RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want)))
    tol = rtol * max(1.0, float(np.max(np.abs(want))))
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"
    return err


@needs_torch
@pytest.mark.parametrize("n", [2, 5, 16])
def test_evaluation_and_training_modes_match_torch(n):
    """forward/evaluate = torch's eval(), gradients = torch's train(), and they differ."""
    m = fresh()
    batch = data(n, seed=n)
    net = TorchNet(m.get_params())
    net.eval()
    with torch.no_grad():
        eval_loss, eval_logits = torch_loss(net, batch)
    close(m.forward(x=batch["x"])["logits"], eval_logits, "forward (eval mode)")
    loss, outputs = m.evaluate(**batch)
    close(outputs["logits"], eval_logits, "evaluate's outputs")
    close(loss, eval_loss.item(), "evaluate's loss")
    net.train()
    train_loss, train_logits = torch_loss(net, batch)
    train_loss.backward()
    loss, grads = m.gradients(**batch)
    close(loss, train_loss.item(), "gradients' loss (training mode)")
    assert list(grads) == TRAINABLE
    for p in TRAINABLE:
        close(grads[p], net.where[p].grad, f"gradient of {p}")
    # the two modes give different numbers, each its torch mode's
    assert abs(loss - m.evaluate(**batch)[0]) > 1e-3
    assert np.max(np.abs(train_logits.detach().numpy() - eval_logits.numpy())) > 1e-2
    ref = reference(m.graph)
    ref.set_params(m.get_params())
    close(ref.forward(x=batch["x"])["logits"], eval_logits, "reference forward")
    close(ref.loss(**batch), eval_loss.item(), "reference loss (eval)")
    ref_loss, ref_grads = ref.gradients(**batch)
    close(ref_loss, train_loss.item(), "reference loss (training)")
    for p in TRAINABLE:
        close(ref_grads[p], net.where[p].grad, f"reference gradient of {p}")


@needs_torch
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_steps_follow_torch_running_statistics_included(optimizer):
    m = fresh(optimizer=optimizer)
    net = TorchNet(m.get_params())
    net.train()
    opt = (torch.optim.Adam(net.trainable(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(net.trainable(), lr=0.1, momentum=0.9))
    for step, n in enumerate([4, 2, 7, 3, 9]):
        batch = data(n, seed=100 + step)
        opt.zero_grad()
        loss, _ = torch_loss(net, batch)
        loss.backward()
        opt.step()
        close(m.train_step(**batch), loss.item(), f"loss of step {step}")
        got, want = m.get_params(), net.params()
        for p in TRAINABLE + RUNNING:
            close(got[p], want[p], f"{p} after step {step}")
    # the running statistics have no optimizer slot; the state holds the trainable params'
    state = m.optimizer_state()
    assert state["step"] == 5
    for slot in ("exp_avg", "exp_avg_sq") if optimizer == "adam" else ("momentum_buffer",):
        assert list(state[slot]) == TRAINABLE
    cm = m.cmodule
    trainable_size = sum(int(np.prod(m.graph.params[p].shape)) for p in TRAINABLE)
    assert cm.trainable_size == trainable_size
    hyper = len(cm.hyperparameters)   # lr, ... one element each after the step count
    assert cm.state_size == 1 + hyper + (2 if optimizer == "adam" else 1) * trainable_size
    assert all(cm.param_offsets[p] >= trainable_size for p in RUNNING)
    assert f"#define BNNET_TRAINABLE_SIZE {trainable_size}" in cm.header
    assert "/* shape [4]; a running statistic */" in cm.header


@needs_torch
def test_running_statistics_move_from_their_start():
    m = fresh()
    before = m.get_params()
    batch = data(6, seed=7)
    m.train_step(**batch)
    after = m.get_params()
    for p in RUNNING:
        assert np.all(after[p] != before[p]), p
    # the conv's output statistics, by hand: 0.2·batch + 0.8·running (BatchNorm2d)
    conv = torch.nn.functional.conv2d(torch.from_numpy(batch["x"]),
                                      torch.from_numpy(before["K"]), padding=1).numpy()
    np.testing.assert_allclose(after["m1"], 0.2 * conv.mean(axis=(0, 2, 3)) + 0.8 * before["m1"],
                               rtol=1e-12)
    np.testing.assert_allclose(after["v1"], 0.2 * conv.var(axis=(0, 2, 3), ddof=1)
                               + 0.8 * before["v1"], rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_against_the_reference_at_several_batch_sizes(dtype, assert_close):
    """Gradients and three SGD steps (params and running statistics), n = 1 included:
    there the [C] batch norm has one value per channel (N = 1, which torch refuses in
    training): its running variance stays as it was, its running mean moves, the
    [C, H, W] one (N = 20) trains on, and everything stays finite.

    (SGD, not Adam: at n <= 2 the [C] batch norm's output hardly depends on its input
    (x̂ = ±1 for two values), so the gradients before it are float32 rounding, which
    Adam would scale up to a step of lr.)"""
    for n in (1, 2, 7, 33):
        m = fresh(dtype, "sgd", seed=n)
        ref = reference(m.graph)
        ref.set_params({k: v.astype(np.float64) for k, v in m.get_params().items()})
        for step in range(3):
            batch = {k: v.astype(dtype).astype(np.float64)
                     for k, v in data(n, seed=10 * n + step).items()}
            loss, grads = m.gradients(**batch)
            ref_loss, ref_grads = ref.gradients(**batch)
            assert_close(loss, ref_loss, dtype, f"loss, n={n}, step {step}")
            for p in TRAINABLE:
                assert_close(grads[p], ref_grads[p], dtype, f"d{p}, n={n}, step {step}")
            before = m.get_params()
            assert_close(m.train_step(**batch), ref.train_step(**batch), dtype,
                         f"step loss, n={n}")
            got, want = m.get_params(), ref.get_params()
            for p in TRAINABLE + RUNNING:
                assert_close(got[p], want[p], dtype, f"{p} after step {step}, n={n}")
                assert np.all(np.isfinite(got[p]))
            if n == 1:
                np.testing.assert_array_equal(got["v2"], before["v2"])
                assert np.all(got["m2"] != before["m2"]) and np.all(got["v1"] != before["v1"])


def test_params_api_includes_the_running_statistics(tmp_path):
    m = fresh()
    batch = data(5)
    m.train_step(**batch)
    params = m.get_params()
    assert list(params) == list(SPEC["params"])           # declaration order, all of them
    m.save_params(tmp_path / "p.npz")
    other = fresh(seed=9)
    assert not np.array_equal(other.get_params()["m1"], params["m1"])
    other.load_params(tmp_path / "p.npz")
    for p in params:
        np.testing.assert_array_equal(other.get_params()[p], params[p])
    np.testing.assert_array_equal(other.forward(x=batch["x"])["logits"],
                                  m.forward(x=batch["x"])["logits"])
    # the running statistics are what forward reads: setting them changes the outputs
    # (and not the training mode's gradients, which use the batch's statistics)
    loss, grads = other.gradients(**batch)
    other.set_params({"v2": params["v2"] * 4, "m1": params["m1"] + 1})
    assert not np.allclose(other.forward(x=batch["x"])["logits"],
                           m.forward(x=batch["x"])["logits"])
    loss2, grads2 = other.gradients(**batch)
    assert loss2 == loss and all(np.array_equal(grads[p], grads2[p]) for p in grads)
    assert "m1" not in grads and set(grads) == set(TRAINABLE)


@needs_torch
def test_frozen_weight_and_bias_are_constants_of_the_training():
    """torch's affine=False is a batch norm whose weight (ones) and bias (zeros) are
    declared `trainable: false`: no gradient, no optimizer slot, unchanged by a step."""
    spec = {"name": "frozen", "inputs": {"x": [3], "y": [3]},
            "params": {"W": {"shape": [3, 3], "init": "he_normal"},
                       "one": {"shape": [3], "init": "ones", "trainable": False},
                       "zero": {"shape": [3], "init": "zeros", "trainable": False},
                       "rm": {"shape": [3], "trainable": False},
                       "rv": {"shape": [3], "trainable": False}},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                      "n": {"op": "batch_norm", "inputs": ["h", "one", "zero", "rm", "rv"]},
                      "loss": {"op": "softmax_cross_entropy", "inputs": ["n", "y"]}},
            "outputs": ["n"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.5}}
    m = compile_strict(spec, "float64")
    m.init_params(1)
    start = m.get_params()
    batch = {"x": np.random.default_rng(0).normal(size=(8, 3)),
             "y": np.eye(3)[np.arange(8) % 3]}
    net = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False),
                              torch.nn.BatchNorm1d(3, affine=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(start["W"]))
    loss = -(torch.from_numpy(batch["y"]) * torch.log_softmax(net(torch.from_numpy(batch["x"])),
                                                              1)).sum(1).mean()
    loss.backward()
    _, grads = m.gradients(**batch)
    assert set(grads) == {"W"}
    close(grads["W"], net[0].weight.grad, "dW with a frozen affine")
    close(m.train_step(**batch), loss.item(), "loss")
    after = m.get_params()
    np.testing.assert_array_equal(after["one"], start["one"])
    np.testing.assert_array_equal(after["zero"], start["zero"])
    close(after["rm"], net[1].running_mean, "running mean")
    close(after["rv"], net[1].running_var, "running var")
    assert m.cmodule.running == {"rm": 0.1, "rv": 0.1}


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_both_forms_under_the_sanitizers_at_every_batch_size(tmp_path, assert_close):
    """The [C, H, W] and the [C] batch norm (whose running variance stays at n = 1) under
    ASan and UBSan at every batch size of the sweep, n = 0 included (nothing changes),
    against the reference. float64: at n = 2 the [C] batch norm's input gradients are
    rounding (its output is ±1 whatever the input), which float32 leaves above its
    tolerance and float64 does not. (examples/bn_cnn.yaml runs in float32, every target.)"""
    m = Sweep(SPEC, "c99", "float64")
    run_and_check(m, tmp_path, start_build(m, tmp_path), assert_close)


def test_baked_params_predict_with_the_running_statistics():
    """`compile(..., params=)` bakes the running statistics with the rest: predict is the
    evaluation mode's forward."""
    m = fresh(seed=4)
    m.train_step(**data(6, seed=1))
    baked = compile_strict(SPEC, "float64", params=m.get_params())
    x = data(5, seed=2)["x"]
    np.testing.assert_array_equal(baked.predict(x=x)["logits"], m.forward(x=x)["logits"])
