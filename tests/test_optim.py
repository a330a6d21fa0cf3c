"""Training in the generated C: every optimizer against the NumPy reference and torch.optim.

The reference's optimizers (graphc/reference.py) are torch's single-tensor code written out
in NumPy, independent of the SymPy update formulas the C is generated from; torch itself
checks both where it is installed. Trajectories are compared after every step.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sympy as sp

import graphc
from codegen.harness import harness, parse_output
from conftest import compile_strict
from graphc.errors import InputError, SpecError
from graphc.optim import check_optimizer, hyperparameters, slot_values, structure

CC = os.environ.get("CC", "cc")

# Two dense layers with a tanh between them; biases start non-zero so that weight decay,
# which applies to every param, acts on them from the first step.
SPEC = {
    "name": "net",
    "inputs": {"x": [5], "y": [3]},
    "params": {"W1": {"shape": [8, 5], "init": "he_normal"},
               "b1": {"shape": [8], "init": "normal", "std": 0.1},
               "W2": {"shape": [3, 8], "init": "glorot_uniform"},
               "b2": {"shape": [3], "init": "normal", "std": 0.1}},
    "nodes": {"h": {"op": "dense", "inputs": ["x", "W1", "b1"]},
              "a": {"op": "tanh", "inputs": ["h"]},
              "logits": {"op": "dense", "inputs": ["a", "W2", "b2"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"],
    "loss": "loss",
}

CONFIGS = {
    "sgd": {"name": "sgd", "lr": 0.1},
    "sgd_wd": {"name": "sgd", "lr": 0.1, "weight_decay": 0.05},
    "momentum": {"name": "momentum", "lr": 0.05},
    "nesterov": {"name": "momentum", "lr": 0.05, "nesterov": True},
    "momentum_wd": {"name": "momentum", "lr": 0.05, "momentum": 0.8, "weight_decay": 0.02},
    "adam": {"name": "adam", "lr": 0.01},
    "adam_wd": {"name": "adam", "lr": 0.01, "weight_decay": 0.1},
    # beta1 < 0.5 takes torch.lerp's other branch (weight 1 - beta1 >= 0.5)
    "adam_betas": {"name": "adam", "lr": 0.02, "betas": [0.3, 0.95], "eps": 1e-4},
    # a max_norm the gradients pass at every step (their norm is ~0.5 to 1 here)
    "adam_amsgrad_clip": {"name": "adam", "lr": 0.02, "amsgrad": True, "weight_decay": 0.05,
                          "clip_grad_norm": 0.3},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "adamw_amsgrad": {"name": "adamw", "lr": 0.01, "amsgrad": True, "betas": [0.8, 0.99]},
    "rmsprop": {"name": "rmsprop", "lr": 0.01},
    "rmsprop_momentum_wd": {"name": "rmsprop", "lr": 0.005, "momentum": 0.9, "alpha": 0.9,
                            "weight_decay": 0.05},
    "rmsprop_centered_clip": {"name": "rmsprop", "lr": 0.005, "centered": True, "eps": 1e-3,
                              "momentum": 0.5, "clip_grad_norm": 0.5},
    "adagrad": {"name": "adagrad", "lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.02,
                "initial_accumulator_value": 0.1},
    "adamax": {"name": "adamax", "lr": 0.02, "weight_decay": 0.05},
    "nadam": {"name": "nadam", "lr": 0.01, "weight_decay": 0.05, "momentum_decay": 0.04},
    "nadam_decoupled_clip": {"name": "nadam", "lr": 0.01, "weight_decay": 0.1,
                             "decoupled_weight_decay": True, "clip_grad_norm": 0.4},
    # max_norm 0 clips every gradient to 0, as torch's does: only the decay moves the params
    "sgd_clip0": {"name": "sgd", "lr": 0.05, "weight_decay": 0.1, "clip_grad_norm": 0.0},
}

STEPS = 8
# Relative to each tensor's largest magnitude. float64: C, reference and torch differ only in
# summation order and in how torch fuses its vector kernels (a few ulps, ~1e-15 measured).
RTOL64 = 1e-10
# float32 C against the float64 reference, both from the same float32-rounded params and
# inputs: each step adds a few float32 roundings (2^-24 ~ 6e-8) of each param plus lr times
# the float32 gradient's error (~1e-6 relative), so 8 steps stay below ~1e-5 (4e-7 measured).
# A wrong formula or hyperparameter moves the params by lr·|g|, about 1e-2 relative.
RTOL32 = 1e-5


@functools.lru_cache(maxsize=None)
def _build(structure: str, dtype: str) -> graphc.CompiledModel:
    return graphc.compile(SPEC, dtype=dtype, optimizer=json.loads(structure))


# The description each update structure was first built from, by (structure, dtype).
_FIRST: dict[tuple[str, str], str] = {}


def compiled(config: str, dtype: str) -> graphc.CompiledModel:
    """The model for a configuration: one build per update structure (the optimizer and its
    flags), its hyperparameters then set through the live `model.optimizer`, so that
    configurations differing only in numbers share a build. Every test sets the params and
    resets the state."""
    opt = check_optimizer(CONFIGS[config])
    first = _FIRST.setdefault((json.dumps(structure(opt), sort_keys=True), dtype),
                              json.dumps(opt, sort_keys=True))
    model = _build(first, dtype)
    for field in hyperparameters(opt):
        model.optimizer[field] = opt[field]
    return model


def exactly(config: str) -> graphc.CompiledModel:
    """A float64 model compiled with the configuration itself (its C's init_state writes
    its hyperparameters), at those hyperparameters."""
    opt = check_optimizer(CONFIGS[config])
    model = _build(json.dumps(opt, sort_keys=True), "float64")
    for field in hyperparameters(opt):
        model.optimizer[field] = opt[field]
    return model


def start(model, seed: int = 1) -> dict[str, np.ndarray]:
    """Fresh params from `seed` and a fresh optimizer state; returns the params."""
    model.init_params(seed)
    model.reset_optimizer()
    return model.get_params()


def batches(k: int, n: int = 16, seed: int = 0, dtype: str = "float64") -> list[dict]:
    """k batches of random inputs and one-hot labels, rounded to `dtype` (what the C sees)."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 5)).astype(dtype).astype(np.float64),
             "y": np.eye(3)[rng.integers(0, 3, n)]} for _ in range(k)]


def rel_error(got, want) -> float:
    """max |got - want| relative to max |want| (0 when both are zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    return err / scale if scale else err


def assert_params(got: dict, want: dict, rtol: float, what: str):
    assert list(got) == list(want)
    for k in want:
        err = rel_error(got[k], want[k])
        assert err <= rtol, f"{what}: param {k}: relative error {err:.3g} > {rtol:g}"


def slots(opt) -> list[str]:
    """torch's per-param state names for a validated optimizer description (NAdam's
    mu_product, one number here, apart)."""
    name = opt["name"]
    if name in ("adam", "adamw"):
        return ["exp_avg", "exp_avg_sq"] + ["max_exp_avg_sq"] * opt["amsgrad"]
    if name == "rmsprop":
        return ["square_avg"] + ["grad_avg"] * opt["centered"] + \
            ["momentum_buffer"] * bool(opt["momentum"])
    if name == "adagrad":
        return ["sum"]
    if name == "adamax":
        return ["exp_avg", "exp_inf"]
    if name == "nadam":
        return ["exp_avg", "exp_avg_sq"]
    return ["momentum_buffer"] if opt["momentum"] else []


def state_keys(opt) -> list[str]:
    """What `optimizer_state()` of a compiled model holds."""
    return sorted(["step", "hyperparameters", *slots(opt)]
                  + ["mu_product"] * (opt["name"] == "nadam"))


def assert_slots(got: dict, want: dict, rtol: float, what: str):
    """The per-param state arrays agree (the step count has its own test)."""
    for slot in want:
        if slot not in ("step", "hyperparameters", "mu_product"):
            assert_params(got[slot], want[slot], rtol, f"{what}: {slot}")
    if "mu_product" in want:
        assert abs(got["mu_product"] - want["mu_product"]) <= rtol * abs(want["mu_product"])


# ---------------------------------------------------------------- C against the reference

# float32 for configurations that between them print every update rule (sgd, momentum,
# Nesterov, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam), weight decay and its absence,
# and clipping; float64 checks them all, so each step's formula against the reference
# and torch.
FLOAT32_CONFIGS = ["adam_amsgrad_clip", "adam_betas", "adagrad", "adamax", "adamw", "momentum_wd",
                   "nadam_decoupled_clip", "nesterov", "rmsprop_centered_clip", "sgd_wd"]


@pytest.mark.parametrize("config, dtype", [(c, "float64") for c in sorted(CONFIGS)]
                         + [(c, "float32") for c in FLOAT32_CONFIGS])
def test_c_trains_like_the_reference(config, dtype):
    model = compiled(config, dtype)
    ref = graphc.reference(model.graph)
    ref.set_params(start(model))
    ref.optimizer = model.optimizer
    assert ref.optimizer == model.optimizer == check_optimizer(CONFIGS[config])
    rtol = RTOL64 if dtype == "float64" else RTOL32
    for k, batch in enumerate(batches(STEPS, dtype=dtype)):
        loss, ref_loss = model.train_step(**batch), ref.train_step(**batch)
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss), f"step {k + 1}: loss {loss} != {ref_loss}"
        assert_params(model.get_params(), ref.get_params(), rtol, f"step {k + 1}")
    state = model.optimizer_state()
    assert sorted(state) == state_keys(model.optimizer)
    assert state["hyperparameters"] == {f: model.optimizer[f]
                                        for f in hyperparameters(model.optimizer)}
    assert_slots(state, ref.optimizer_state(), rtol, f"{config} {dtype}")


# ---------------------------------------------------------------- against torch.optim

TORCH_CLASSES = {"sgd": "SGD", "momentum": "SGD", "adam": "Adam", "adamw": "AdamW",
                 "rmsprop": "RMSprop", "adagrad": "Adagrad", "adamax": "Adamax", "nadam": "NAdam"}


def torch_trajectory(opt, params: dict, data: list[dict], change: dict | None = None):
    """torch.optim's optimizer of the description `opt` on the same net in float64, on the
    CPU's single-tensor path (foreach=False), with torch.nn.utils.clip_grad_norm_ before
    each step when `opt` clips: [(loss, params) after each step], and the final state.
    `change`: {step: {field: value}} set in the param group before that step (1-based).

    Its scalar state (the step count, NAdam's mu_product) is float64 too: torch keeps it in
    the default dtype, float32 unless set."""
    torch = pytest.importorskip("torch", reason="torch is not installed: no torch.optim trajectories")
    opt = check_optimizer(opt)
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    fields = {k: tuple(v) if k == "betas" else v for k, v in opt.items()
              if k not in ("name", "clip_grad_norm")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        optim = getattr(torch.optim, TORCH_CLASSES[opt["name"]])(list(tp.values()), foreach=False,
                                                                 **fields)
        steps, max_norm = [], opt["clip_grad_norm"]
        for k, batch in enumerate(data):
            for field, value in (change or {}).get(k + 1, {}).items():
                if field == "clip_grad_norm":
                    max_norm = value
                else:
                    optim.param_groups[0][field] = tuple(value) if field == "betas" else value
            x, y = torch.tensor(batch["x"]), torch.tensor(batch["y"])
            a = torch.tanh(x @ tp["W1"].T + tp["b1"])
            loss = torch.nn.functional.cross_entropy(a @ tp["W2"].T + tp["b2"], y)  # probability targets
            optim.zero_grad()
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(tp.values()), max_norm, foreach=False)
            optim.step()
            steps.append((loss.item(), {k: v.detach().numpy().copy() for k, v in tp.items()}))
    finally:
        torch.set_default_dtype(default)
    first = optim.state[tp["W1"]]
    state = {"step": int(first.get("step", 0))}
    for slot in slots(opt):
        state[slot] = {k: optim.state[v][slot].numpy().copy() for k, v in tp.items()}
    if "mu_product" in first:
        state["mu_product"] = float(first["mu_product"])
    return steps, state


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_c_trains_like_torch(config):
    model = compiled(config, "float64")
    data = batches(10, seed=5)
    steps, torch_state = torch_trajectory(CONFIGS[config], start(model, seed=2), data)
    for k, (batch, (torch_loss, torch_params)) in enumerate(zip(data, steps)):
        loss = model.train_step(**batch)
        assert abs(loss - torch_loss) <= RTOL64 * abs(torch_loss), f"step {k + 1}: loss"
        assert_params(model.get_params(), torch_params, RTOL64, f"step {k + 1}")
    assert_slots(model.optimizer_state(), torch_state, RTOL64, config)
    if model.optimizer["name"] not in ("sgd", "momentum"):   # torch's SGD keeps no step count
        assert model.optimizer_state()["step"] == torch_state["step"] == len(data)


@pytest.mark.parametrize("config", ["adam_wd", "adam_betas", "nesterov", "rmsprop_centered_clip",
                                    "nadam_decoupled_clip", "adagrad"])
def test_reference_trains_like_torch(config):
    """The reference on its own, without any C."""
    ref = graphc.reference(graphc.Graph.from_spec(SPEC), seed=4)
    ref.optimizer = CONFIGS[config]
    data = batches(10, seed=6)
    steps, torch_state = torch_trajectory(CONFIGS[config], ref.get_params(), data)
    for batch, (torch_loss, torch_params) in zip(data, steps):
        loss = ref.train_step(**batch)
        assert abs(loss - torch_loss) <= RTOL64 * abs(torch_loss)
        assert_params(ref.get_params(), torch_params, RTOL64, config)
    assert_slots(ref.optimizer_state(), torch_state, RTOL64, config)


# ---------------------------------------------------------------- hyperparameters in the state

# (config, {step: {field: value}}): the learning rate through set_lr (as a schedule does),
# and the other hyperparameters a user may move between steps, each as torch's param group.
CHANGES = {
    "momentum_wd": {4: {"lr": 0.2}, 7: {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.0}},
    "adam_amsgrad_clip": {2: {"clip_grad_norm": 0.0}, 3: {"lr": 0.05, "betas": [0.5, 0.9]},
                          6: {"eps": 1e-3, "weight_decay": 0.0, "clip_grad_norm": 2.0}},
    "rmsprop_momentum_wd": {5: {"lr": 0.02, "alpha": 0.5, "momentum": 0.1}},
    "adagrad": {2: {"lr": 0.3, "lr_decay": 0.5, "eps": 0.1}},
    "nadam_decoupled_clip": {4: {"lr": 0.03, "momentum_decay": 0.1, "betas": [0.7, 0.9]}},
}


@pytest.mark.parametrize("config", sorted(CHANGES))
def test_hyperparameters_changed_between_steps_act_as_in_torch(config):
    model = compiled(config, "float64")
    data = batches(8, seed=11)
    steps, _ = torch_trajectory(CONFIGS[config], start(model, seed=3), data, CHANGES[config])
    try:
        for k, (batch, (torch_loss, torch_params)) in enumerate(zip(data, steps)):
            for field, value in CHANGES[config].get(k + 1, {}).items():
                if field == "lr":
                    model.set_lr(value)
                else:
                    model.optimizer[field] = value
                assert model.optimizer[field] == value
            loss = model.train_step(**batch)
            assert abs(loss - torch_loss) <= RTOL64 * abs(torch_loss), f"step {k + 1}: loss"
            assert_params(model.get_params(), torch_params, RTOL64, f"step {k + 1}")
    finally:   # the shared build back to its configuration
        compiled(config, "float64")


def test_the_state_block_holds_the_hyperparameters():
    """Each hyperparameter is a slot after the step count, which the header documents and
    `<name>_init_state` writes; the C reads it at every step (so a device can schedule),
    and a reset keeps the current values."""
    model = compiled("adam_amsgrad_clip", "float64")
    cm = model.cmodule
    start(model)
    assert list(cm.state_offsets)[:7] == ["step", "lr", "one_minus_beta1", "one_minus_beta2",
                                          "eps", "weight_decay", "clip_grad_norm"]
    assert cm.state_size == 7 + 3 * cm.trainable_size
    for slot, at in cm.state_offsets.items():
        assert re.search(rf"^#define NET_STATE_{slot}_OFFSET {at}\b", cm.header, re.M), slot
    assert "#define NET_STATE_lr_OFFSET 1 /* starts at 0.02 */" in cm.header
    assert " *   lr: the learning rate\n" in cm.header
    assert "void net_init_state(double *state);" in cm.header
    # what init_state writes: the compiled hyperparameters, zeros elsewhere
    fresh = np.full(cm.state_size, np.nan)
    getattr(model.built.lib, "net_init_state")(model.built.ffi.from_buffer("double *", fresh))
    want = np.zeros(cm.state_size)
    want[1:7] = [0.02, 1 - 0.9, 1 - 0.999, 1e-8, 0.05, 0.3]   # the betas by 1 - beta
    np.testing.assert_array_equal(fresh, want)
    np.testing.assert_array_equal(cm.initial_state(), want)
    # written from Python, read by the C: a tiny lr moves the params by almost nothing
    data = batches(2, seed=12)
    model.set_lr(1e-12)
    p0 = model.get_params()
    model.train_step(**data[0])
    assert all(np.abs(model.get_params()[k] - p0[k]).max() < 1e-10 for k in p0)
    # a reset keeps the lr set since the compile, and zeros the step and the moments
    model.reset_optimizer()
    state = model.optimizer_state()
    assert state["step"] == 0 and state["hyperparameters"]["lr"] == 1e-12
    assert all(np.all(a == 0) for a in state["exp_avg"].values())
    compiled("adam_amsgrad_clip", "float64")


def test_float32_hyperparameters_read_back_as_written():
    """A float32 slot holds the value's rounding, as the literal it replaced did; reading
    gives the value written, and the same steps as a model compiled with it."""
    model = compiled("adam_betas", "float32")
    assert model.optimizer["lr"] == 0.02 and model.optimizer["betas"] == [0.3, 0.95]
    assert model.cmodule.initial_state()[1] == 0.02   # compiled with it: same rounding
    model.optimizer["eps"] = 1e-30   # representable in float32
    assert model.optimizer["eps"] == 1e-30
    with pytest.raises(SpecError, match="out of the range of float32") as e:
        model.optimizer["eps"] = 1e-50
    assert (e.value.node, e.value.field) == ("optimizer", "eps")
    assert model.optimizer["eps"] == 1e-30   # unchanged by the refused value
    compiled("adam_betas", "float32")


@pytest.mark.parametrize("config, field, value, message", [
    ("nesterov", "nesterov", False, "would change the update's formulas"),
    ("sgd", "momentum", 0.9, "would change the update's formulas"),
    ("momentum", "momentum", 0.0, "would change the update's formulas"),
    ("adam", "amsgrad", True, "compile again"),
    ("adam", "clip_grad_norm", 1.0, "would change the update's formulas"),
    ("adam_amsgrad_clip", "clip_grad_norm", None, "would change the update's formulas"),
    ("adam", "name", "adamw", "would change the update's formulas"),
    ("rmsprop", "centered", True, "would change the update's formulas"),
    ("adagrad", "initial_accumulator_value", 1.0, "would change the update's formulas"),
    ("nadam", "decoupled_weight_decay", True, "would change the update's formulas"),
    ("adam", "lr", -1.0, r"must lie in \[0, inf\]"),
    ("adam", "betas", [0.9, 1.0], r"must lie in \[0, 1\)"),
    ("adam", "beta1", 0.5, "unknown field 'beta1' for optimizer 'adam'"),
    ("rmsprop", "alpha", "fast", "must be a finite number"),
    ("nesterov", "momentum", 0.0, "Nesterov momentum needs momentum > 0"),
])
def test_bad_assignment_names_the_field(config, field, value, message):
    model = compiled(config, "float64")
    before = dict(model.optimizer)
    with pytest.raises(SpecError, match=message) as e:
        model.optimizer[field] = value
    assert e.value.node == "optimizer" and e.value.field in (field, "nesterov")
    assert dict(model.optimizer) == before
    with pytest.raises(SpecError, match="cannot be removed"):
        del model.optimizer["lr"]


def test_structural_fields_accept_their_compiled_value():
    model = compiled("nesterov", "float64")
    model.optimizer["nesterov"] = True   # what it is: nothing to recompile
    assert model.optimizer["nesterov"] is True


def test_set_lr_without_an_optimizer_is_a_clear_error():
    model = graphc.compile(SPEC, dtype="float64")
    with pytest.raises(InputError, match="has no optimizer"):
        model.set_lr(0.1)


# ---------------------------------------------------------------- learning

# A linearly separable two-class problem: the label is the side of a fixed hyperplane.
LEARN_SPEC = {
    "name": "separable",
    "inputs": {"x": [4], "y": [2]},
    "params": {"W1": {"shape": [8, 4], "init": "he_normal"}, "b1": {"shape": [8]},
               "W2": {"shape": [2, 8], "init": "glorot_uniform"}, "b2": {"shape": [2]}},
    "nodes": {"h": {"op": "dense", "inputs": ["x", "W1", "b1"]},
              "a": {"op": "tanh", "inputs": ["h"]},
              "logits": {"op": "dense", "inputs": ["a", "W2", "b2"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"],
    "loss": "loss",
}
# learning rates that suit this problem; the rest of each configuration as above
LEARNING_RATES = {"sgd": 0.5, "momentum": 0.1, "adam": 0.05}


# One configuration per update rule (a build each): the trajectory tests above hold every
# configuration's step to the reference and torch, this one that the rule descends.
@pytest.mark.parametrize("config", ["adam_wd", "momentum_wd", "nesterov", "sgd_wd"])
def test_loss_falls_on_a_separable_problem(config):
    opt = check_optimizer(CONFIGS[config])
    kind = "adam" if opt["name"] == "adam" else "momentum" if opt["momentum"] else "sgd"
    # The trajectory tests' weight decay (up to 0.1) caps the logits' scale and so the loss
    # (at ~0.2 here); a usual 1e-3 keeps this test about descent.
    decay = 1e-3 if opt["weight_decay"] else 0.0
    model = graphc.compile(LEARN_SPEC, optimizer={**CONFIGS[config], "lr": LEARNING_RATES[kind],
                                                  "weight_decay": decay})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4))
    labels = (x @ np.array([1.0, -2.0, 0.5, 1.5]) > 0).astype(int)
    data = {"x": x, "y": np.eye(2)[labels]}
    initial, _ = model.evaluate(**data)
    for _ in range(100):
        pick = rng.choice(256, 32, replace=False)
        model.train_step(x=x[pick], y=data["y"][pick])
    final, out = model.evaluate(**data)
    assert final < initial / 5, (initial, final)
    assert np.mean(out["logits"].argmax(axis=1) == labels) > 0.9


# ---------------------------------------------------------------- optimizer state

@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_reset_restarts(config):
    model = compiled(config, "float64")
    p0 = start(model, seed=3)
    state = model.optimizer_state()
    assert sorted(state) == state_keys(model.optimizer)
    fill = model.optimizer.get("initial_accumulator_value", 0.0)
    for slot in slots(model.optimizer):
        assert all(np.all(a == fill) for a in state[slot].values())
        assert {k: a.shape for k, a in state[slot].items()} == {k: a.shape for k, a in p0.items()}
    data = batches(3, seed=7)

    def run():
        losses = [model.train_step(**b) for b in data]
        return losses, model.get_params(), model.optimizer_state()

    first = run()
    model.set_params(p0)
    model.reset_optimizer()
    again = run()
    # the same C on the same numbers: equal to the last bit
    assert first[0] == again[0]
    for k in p0:
        np.testing.assert_array_equal(first[1][k], again[1][k])
    for slot in slots(model.optimizer):
        for k in p0:
            np.testing.assert_array_equal(first[2][slot][k], again[2][slot][k])
    if slots(model.optimizer):
        # without the reset, the carried state makes a different trajectory
        model.set_params(p0)
        assert run()[0] != first[0]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_counts_steps(config):
    """{"step": steps taken} for every optimizer, as the contract says, also where the update
    does not need it (torch's SGD keeps no count; its state is only the momentum buffer)."""
    model = compiled(config, "float64")
    start(model)
    assert model.optimizer_state()["step"] == 0
    for k, batch in enumerate(batches(3, seed=10)):
        model.train_step(**batch)
        assert model.optimizer_state()["step"] == k + 1
    model.reset_optimizer()
    assert model.optimizer_state()["step"] == 0


def test_reference_reset_and_optimizer_setter():
    ref = graphc.reference(graphc.Graph.from_spec({**SPEC, "optimizer": "adam"}))
    assert ref.optimizer == check_optimizer("adam")
    p0 = ref.get_params()
    data = batches(3, seed=8)
    first = [ref.train_step(**b) for b in data]
    assert ref.optimizer_state()["step"] == 3
    ref.set_params(p0)
    ref.reset_optimizer()
    assert [ref.train_step(**b) for b in data] == first
    # a new optimizer starts from fresh state
    ref.optimizer = {"name": "sgd", "lr": 0.1, "momentum": 0.5}
    assert ref.optimizer == check_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.5})
    state = ref.optimizer_state()
    assert state["step"] == 0 and sorted(state) == ["momentum_buffer", "step"]
    ref.optimizer = None
    with pytest.raises(InputError, match="has no optimizer"):
        ref.train_step(**data[0])


# ---------------------------------------------------------------- errors

NO_LOSS = {k: v for k, v in SPEC.items() if k != "loss"}


def test_train_step_without_an_optimizer_is_a_clear_error():
    model = graphc.compile(SPEC, dtype="float64")
    assert model.optimizer is None
    batch = batches(1)[0]
    message = "model 'net' has no optimizer: declare an 'optimizer:' section"
    with pytest.raises(InputError, match=message):
        model.train_step(**batch)
    with pytest.raises(InputError, match="graph 'net' has no optimizer"):
        graphc.reference(model.graph).train_step(**batch)


def test_train_step_without_a_loss_is_a_clear_error():
    batch = batches(1)[0]
    model = graphc.compile(NO_LOSS, dtype="float64")
    with pytest.raises(InputError, match="model 'net' has no loss, so it cannot train"):
        model.train_step(**batch)
    with pytest.raises(InputError, match="graph 'net' has no loss, so it cannot train"):
        graphc.reference(model.graph).train_step(**batch)
    # an optimizer section does not make a loss: rejected where it is declared
    with pytest.raises(SpecError, match="needs a loss") as e:
        graphc.Graph.from_spec({**NO_LOSS, "optimizer": "sgd"})
    assert e.value.field == "optimizer"
    with pytest.raises(SpecError, match="needs a loss") as e:
        graphc.compile(NO_LOSS, optimizer="sgd")
    assert e.value.field == "optimizer"


@pytest.mark.parametrize("optimizer, field, message", [
    ({"name": "adam", "beta1": 0.9}, "beta1", "unknown field 'beta1' for optimizer 'adam'"),
    ({"name": "adam", "betas": [0.9, 1.5]}, "betas", r"must lie in \[0, 1\)"),
    ({"name": "adam", "betas": [0.9]}, "betas", "list of two numbers"),
    ({"name": "sgd", "nesterov": True}, "nesterov", "Nesterov momentum needs momentum > 0"),
])
def test_bad_optimizer_names_the_field(optimizer, field, message):
    """Through compile(optimizer=...) and the reference's setter, as in a spec."""
    with pytest.raises(SpecError, match=message) as e:
        graphc.compile(SPEC, optimizer=optimizer)
    assert (e.value.node, e.value.field) == ("optimizer", field)
    assert f"node 'optimizer': field '{field}'" in str(e.value)
    ref = graphc.reference(graphc.Graph.from_spec(SPEC))
    with pytest.raises(SpecError, match=message) as e:
        ref.optimizer = optimizer
    assert (e.value.node, e.value.field) == ("optimizer", field)


# ---------------------------------------------------------------- the C alone

def flat(model, per_param: dict) -> np.ndarray:
    """Arrays per param laid out as the C's params (and each state slot) are."""
    out = np.zeros(model.cmodule.params_size)
    for p, off in model.cmodule.param_offsets.items():
        out[off:off + per_param[p].size] = per_param[p].ravel()
    return out


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
@pytest.mark.parametrize("config", ["nesterov", "adam", "nadam_decoupled_clip", "adagrad"])
def test_the_c_trains_without_python(config, tmp_path):
    """A C main() calls <name>_init_state, then <name>_train_step under AddressSanitizer and
    UBSan: no report, and the params, losses and state of the cffi model and the reference."""
    model = exactly(config)
    p0 = start(model, seed=6)
    batch = batches(1, n=7, seed=9)[0]
    steps = 4
    cm = model.cmodule
    (tmp_path / f"{cm.name}.c").write_text(cm.source)
    (tmp_path / f"{cm.name}.h").write_text(cm.header)
    (tmp_path / "main.c").write_text(harness(cm, flat(model, p0), batch, train_steps=steps))
    # -O0 and no -g: UBSan's checks optimized at -O1 made net.c's build 3.6 s instead of
    # 1.2 s, -g doubled it again; unoptimized code keeps every check, and the sanitizers
    # name the function without -g. (The C's warnings under -O2 are compile_strict's test.)
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

    ref = graphc.reference(model.graph)
    ref.set_params(p0)
    ref.optimizer = model.optimizer
    losses = [model.train_step(**batch) for _ in range(steps)]
    ref_losses = [ref.train_step(**batch) for _ in range(steps)]
    # the same C, compiled apart: equal up to the compilers' freedom (none expected in C99)
    np.testing.assert_allclose(got["train_loss"], losses, rtol=1e-13)
    np.testing.assert_allclose(got["params"], flat(model, model.get_params()), rtol=0,
                               atol=1e-13 * np.abs(got["params"]).max())
    assert rel_error(got["train_loss"], ref_losses) <= RTOL64
    assert rel_error(got["params"], flat(model, ref.get_params())) <= RTOL64
    state = model.optimizer_state()
    assert got["state"].size == cm.state_size
    for slot in slots(model.optimizer):
        at = cm.state_offsets[slot]
        c_slot = got["state"][at:at + cm.trainable_size]
        np.testing.assert_allclose(c_slot, flat(model, state[slot]), rtol=0,
                                   atol=1e-13 * np.abs(c_slot).max())
        assert rel_error(c_slot, flat(model, ref.optimizer_state()[slot])) <= RTOL64
    assert got["state"][cm.state_offsets["step"]] == steps
    for field, slots_of in hyperparameters(model.optimizer).items():   # as init_state wrote
        held = [got["state"][cm.state_offsets[s]] for s in slots_of]
        assert held == slot_values(field, model.optimizer[field])


# ---------------------------------------------------------------- the update as IR kernels

def _update(optimizer):
    from graphc.derive import derive
    from graphc.graph import Graph
    return derive(Graph.from_spec({**SPEC, "optimizer": optimizer})).update


@pytest.mark.parametrize("config, slots", [("sgd_wd", []), ("nesterov", ["momentum_buffer"]),
                                           ("adam_wd", ["exp_avg", "exp_avg_sq"])])
def test_the_update_is_ir_kernels_fused_into_one_pass(config, slots):
    """The optimizer's formulas are kernels of the update program (derived in graphc, not
    printed by the emitter); fusion runs them in one loop over the params, the decayed
    gradient d a variable of that loop, after one scalar kernel for the step count."""
    from codegen.plan import fuse
    from graphc.ir import GRADS_BLOCK, PARAMS_BLOCK, STATE, UPDATE, state_buffer
    update = _update(CONFIGS[config])
    assert update.in_place and all(k.node == UPDATE for k in update.kernels)
    live = [s for f, ss in hyperparameters(check_optimizer(CONFIGS[config])).items() for s in ss]
    assert [b for b, buf in update.buffers.items() if buf.role == STATE] == \
        [state_buffer(s) for s in ["step", *live, *slots]]
    fused = fuse(update)
    count, loop = fused.kernels
    assert count.loops == () and count.stores()[0].out == state_buffer("step")
    stores = loop.stores()
    assert [s.out for s in stores] == ["d", *map(state_buffer, slots), PARAMS_BLOCK]
    assert stores[0].local and not any(s.local for s in stores[1:])
    assert sorted(sum(fused.origins, ())) == list(range(len(update.kernels)))
    # d = g + weight_decay*p is computed once; the later formulas read it, not the gradient
    grad = update.buffers[GRADS_BLOCK].base[loop.loops[0][0]]
    assert stores[0].value.has(grad) and stores[1].value.has(sp.Symbol("d", real=True))
    assert not any(s.value.has(grad) for s in stores[1:])


def _in_place(shift: int):
    """A[i] = A[i] + 1, then B[i] = 2·A[i + shift], over i < 8: in place, as an update is."""
    from graphc.ir import ASSIGN, STATE, Buffer, Kernel, Program, index_symbols
    (i,) = index_symbols(1)
    A, B = Buffer("A", (9,), False, STATE), Buffer("B", (8,), False, STATE)
    loops = ((i, 8),)
    return Program({"A": A, "B": B}, [Kernel("A", (i,), loops, A.base[i] + 1, ASSIGN),
                                      Kernel("B", (i,), loops, 2 * A.base[i + shift], ASSIGN)],
                   in_place=True)


def test_update_fusion_keeps_what_each_loop_read():
    """Two loops run as one only where each reads what the other writes at the point it
    writes it: B[i] = 2·A[i + 1] must see A[i + 1] after the first loop has written it,
    which a fused loop at point i has not done yet."""
    from codegen.plan import fuse
    assert len(fuse(_in_place(0)).kernels) == 1
    assert len(fuse(_in_place(1)).kernels) == 2


def test_update_with_a_zero_beta_builds_under_the_review_flags():
    """With beta1 = 0 the update never reads the old exp_avg (no argument goes unused)."""
    model = compile_strict(SPEC, "float32", optimizer={"name": "adam", "betas": [0.0, 0.9]})
    assert "const float *restrict exp_avg" not in model.c_source
    start = model.get_params()
    model.train_step(x=np.ones((2, 5), np.float32), y=np.eye(3, dtype=np.float32)[:2])
    assert all(np.all(np.isfinite(v)) for v in model.get_params().values())
    assert any(not np.array_equal(v, start[p]) for p, v in model.get_params().items())


# ---------------------------------------------------------------- the CLI

def test_cli_trains_with_any_optimizer_and_clipping(tmp_path, capsys):
    """`graphc train --optimizer` offers every optimizer (OPTIMIZERS), and
    `--clip-grad-norm` turns clipping on; a bad max_norm is one line, exit 2."""
    import yaml
    from graphc.cli import main
    from graphc.optim import OPTIMIZERS
    spec = tmp_path / "separable.yaml"
    spec.write_text(yaml.safe_dump(LEARN_SPEC))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    labels = (x @ np.array([1.0, -2.0, 0.5, 1.5]) > 0).astype(int)
    np.savez(tmp_path / "data.npz", x=x, y=np.eye(2)[labels])
    help_text = subprocess.run([sys.executable, "-m", "graphc", "train", "--help"],
                               capture_output=True, text=True).stdout
    assert all(name in help_text for name in OPTIMIZERS) and "--clip-grad-norm" in help_text
    assert main(["train", str(spec), "--data", str(tmp_path / "data.npz"), "--optimizer", "nadam",
                 "--lr", "0.05", "--clip-grad-norm", "1.0", "--epochs", "10",
                 "--no-progress"]) == 0
    accuracy = re.search(r"accuracy ([\d.]+)%", capsys.readouterr().out)
    assert accuracy and float(accuracy.group(1)) >= 85
    assert main(["train", str(spec), "--data", str(tmp_path / "data.npz"),
                 "--clip-grad-norm", "-1", "--no-progress"]) == 2
    assert "--clip-grad-norm must be a number >= 0" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_every_update_builds_under_the_review_flags(tmp_path):
    """Each update structure's C (every optimizer, flag and clipping) compiles without a
    warning under the review flags (-Wconversion, -Wdouble-promotion, -Werror...), in float
    (where a double constant or libm call would show), for the host target (vector tiles,
    OpenMP): one compiler run for all of them."""
    dtype = "float32"
    from codegen.targets import CHECK_FLAGS
    sources = []
    for config in ["adam_amsgrad_clip", "adamw_amsgrad", "rmsprop_centered_clip",
                   "rmsprop_momentum_wd", "adagrad", "adamax", "nadam_decoupled_clip", "nesterov"]:
        name = f"net_{config}"
        _, cm = graphc.generate({**SPEC, "name": name}, dtype, target="host",
                                optimizer=CONFIGS[config])
        (tmp_path / f"{name}.c").write_text(cm.source)
        (tmp_path / f"{name}.h").write_text(cm.header)
        sources.append(f"{name}.c")
    r = subprocess.run([CC, *CHECK_FLAGS, "-fopenmp", "-O2", "-c", *sources], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
