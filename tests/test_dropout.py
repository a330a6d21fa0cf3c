"""dropout end to end.

- The generator (graphc/dropout.py): the C helper's bits equal keep_mask's, compiled for
  the host and run on an emulated Cortex-M0 (no 64-bit multiply, soft float); the kept
  fraction is 1 - p and masks of other steps, nodes, seeds and neighbouring elements are
  uncorrelated.
- One model holding batch norm and dropout, in C against the NumPy reference and against
  PyTorch: `forward` and `evaluate` are the evaluation mode (running statistics, dropout
  the identity), `gradients` and `train_step` the training mode (batch statistics, the
  masks of the current step: gradients at step k equal torch's with graphc's step-k mask,
  and train steps follow the reference step by step, each with its own masks).

Every op table (tests/test_ops_c.py, test_reference.py, the random torch graphs, the
Cortex-M models of test_embedded.py) has dropout too; examples/digits_tokens.yaml runs the
sanitizer sweep of tests/test_batch_sizes.py.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess

import numpy as np
import pytest

from codegen import firmware
from codegen.printer import helper_source
from codegen.targets import CHECK_FLAGS
from graphc.dropout import keep_mask, keep_threshold, node_key
from graphc.reference import reference

from conftest import compile_strict

CC = "cc"
# (key, step, threshold): keys past 2^31, steps 0 and large, p = 0.5, 0.1, 0.9 and 0.
DRAWS = [(node_key("drop", 0), 0, keep_threshold(0.5)), (0xFFFFFFFF, 1, keep_threshold(0.1)),
         (12345, 2**31 + 7, keep_threshold(0.9)), (node_key("h", 3), 99, keep_threshold(0.0))]
ELEMENTS = 256


def _bits_program() -> str:
    """Prints, per draw, the keep decisions of elements 0..255 as eight hex words."""
    lines = ["#include <stdint.h>", "#include <stdio.h>", "",
             helper_source("dropout_keep", "float32"), "",
             "static const uint32_t draws[][3] = {"]
    lines += [f"    {{{k:#x}U, {s:#x}U, {t:#x}U}}," for k, s, t in DRAWS]
    lines += ["};", "", "int main(void)", "{",
              "    for (unsigned d = 0; d < sizeof draws / sizeof draws[0]; ++d) {",
              f"        for (uint32_t w = 0; w < {ELEMENTS // 32}; ++w) {{",
              "            uint32_t word = 0;",
              "            for (uint32_t b = 0; b < 32; ++b) {",
              "                if (dropout_keep(draws[d][0], draws[d][1], 32 * w + b, "
              "draws[d][2]) != 0.0F) {",
              "                    word |= (uint32_t)1 << b;", "                }", "            }",
              '            printf("%08lx\\n", (unsigned long)word);', "        }", "    }",
              "    return 0;", "}", ""]
    return "\n".join(lines)


def _expected_words() -> list[str]:
    words = []
    for key, step, threshold in DRAWS:
        kept = keep_mask(key, step, np.arange(ELEMENTS), threshold).reshape(-1, 32)
        words += [f"{int((k.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum()):08x}"
                  for k in kept]
    return words


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_c_generator_draws_the_reference_bits_on_the_host(tmp_path):
    (tmp_path / "bits.c").write_text(_bits_program())
    build = subprocess.run([CC, *CHECK_FLAGS, "-O2", "bits.c", "-o", "bits"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert build.returncode == 0 and not build.stderr, build.stderr
    run = subprocess.run(["./bits"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert run.stdout.split() == _expected_words()


@pytest.mark.skipif(firmware.missing_tools(run=True) is not None,
                    reason=f"ARM tools or QEMU missing: {firmware.missing_tools(run=True)}")
def test_c_generator_draws_the_reference_bits_on_a_cortex_m0(tmp_path):
    (tmp_path / "main.c").write_text(_bits_program())
    elf = firmware.build(tmp_path, "microbit")
    done = firmware.run(elf, "microbit")
    assert done.status == 0, done.stderr
    assert done.stdout.split() == _expected_words()


def test_kept_fraction_and_independence():
    """Over 2^20 elements: the kept share is 1 - p within 5 standard deviations; masks of
    the next step, another node, another seed, and of the neighbouring element agree as
    often as independent draws would (p² + (1 - p)²)."""
    elements = np.arange(1 << 20)
    for p in (0.1, 0.5, 0.9):
        t = keep_threshold(p)
        count = elements.size
        sigma = 5 * math.sqrt(p * (1 - p) / count)
        base = keep_mask(node_key("a", 0), 0, elements, t)
        assert abs(base.mean() - (1 - p)) < sigma, (p, base.mean())
        agree = p * p + (1 - p) * (1 - p)
        sigma_agree = 5 * math.sqrt(agree * (1 - agree) / count)
        for other in (keep_mask(node_key("a", 0), 1, elements, t),      # the next step
                      keep_mask(node_key("b", 0), 0, elements, t),      # another node
                      keep_mask(node_key("a", 1), 0, elements, t),      # another seed
                      np.roll(base, 1)):                                # the neighbour
            assert abs((base == other).mean() - agree) < sigma_agree, p
    assert keep_mask(7, 3, elements[:4096], keep_threshold(0.0)).all()
    # Two steps whose streams differ only in low bits still give unrelated masks.
    a, b = (keep_mask(0, s, elements[:65536], keep_threshold(0.5)) for s in (0, 2**31))
    assert abs((a == b).mean() - 0.5) < 0.01


# ---------------------------------------------------------------- one model, both modes

SPEC = {
    "name": "bndrop", "inputs": {"x": [2, 5, 4], "y": {"shape": [], "dtype": "int32"}},
    "params": {
        "K": {"shape": [3, 2, 3, 3], "init": "he_normal"},
        "g": {"shape": [3], "init": "uniform", "low": 0.5, "high": 1.5},
        "s": {"shape": [3], "init": "normal", "std": 0.2},
        "m": {"shape": [3], "init": "normal", "std": 0.3, "trainable": False},
        "v": {"shape": [3], "init": "uniform", "low": 0.5, "high": 2.0, "trainable": False},
        "W": {"shape": [4, 60], "init": "glorot_uniform"}, "b": {"shape": [4]}},
    "nodes": {
        "c": {"op": "conv2d", "inputs": ["x", "K"], "padding": 1},             # [3, 5, 4]
        "n": {"op": "batch_norm", "inputs": ["c", "g", "s", "m", "v"], "momentum": 0.2},
        "a": {"op": "tanh", "inputs": ["n"]},
        "d": {"op": "dropout", "inputs": ["a"], "p": 0.4},
        "f": {"op": "flatten", "inputs": ["d"]},                                 # [60]
        "logits": {"op": "dense", "inputs": ["f", "W", "b"]},
        "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss", "optimizer": {"name": "adam", "lr": 0.05}}
N = 6


def _data(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((N, 2, 5, 4)), "y": rng.integers(0, 4, N).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def _model(p: float = 0.4):
    spec = {**SPEC, "nodes": {**SPEC["nodes"], "d": {**SPEC["nodes"]["d"], "p": p}}}
    return compile_strict(spec, "float64")


def _fresh(p: float = 0.4):
    model = _model(p)
    model.init_params(3)
    model.reset_optimizer()
    ref = reference(model.graph)
    ref.set_params(model.get_params())
    return model, ref


def test_evaluation_mode_is_the_identity_and_training_mode_draws_masks(assert_close):
    model, ref = _fresh()
    plain, _ = _fresh(p=0.0)
    data = _data(0)
    forward = model.forward(**data)["logits"]
    assert_close(forward, ref.forward(**data)["logits"], "float64", "forward")
    # dropout out of training: the same outputs and evaluate loss as without it
    assert np.array_equal(forward, plain.forward(**data)["logits"])
    assert model.evaluate(**data)[0] == plain.evaluate(**data)[0]
    # in training: masks, so another loss than p = 0's; the reference draws the same
    loss, grads = model.gradients(**data)
    ref_loss, ref_grads = ref.gradients(**data)
    assert_close(loss, ref_loss, "float64", "training loss")
    for k in grads:
        assert_close(grads[k], ref_grads[k], "float64", f"gradient of {k}")
    assert abs(loss - plain.gradients(**data)[0]) > 1e-6


def test_train_steps_draw_new_masks_each_step_as_the_reference(assert_close):
    model, ref = _fresh()
    data = _data(1)
    for step in range(5):
        assert model.optimizer_state()["step"] == ref.optimizer_state()["step"] == step
        loss, grads = model.gradients(**data)   # the masks of the coming step
        ref_loss, ref_grads = ref.gradients(**data)
        assert_close(loss, ref_loss, "float64", f"training loss at step {step}")
        assert_close(grads["K"], ref_grads["K"], "float64", f"gradient of K at step {step}")
        assert_close(model.train_step(**data), ref_loss, "float64", f"step {step}'s loss")
        ref.train_step(**data)
        for k, want in ref.get_params().items():
            assert_close(model.get_params()[k], want, "float64", f"{k} after step {step}")


def test_the_step_count_chooses_the_masks():
    """The same params and batch: step 1's masks give other gradients than step 0's, and
    a count the state cannot hold (NaN, negative, past 2^32) gives step 0's, in C and in
    Python alike, never an undefined conversion."""
    model, _ = _fresh()
    data = _data(2)
    step = model.cmodule.state_offsets["step"]
    loss0, grads0 = model.gradients(**data)
    model._state[step] = 1
    loss1, grads1 = model.gradients(**data)
    assert loss1 != loss0 and not np.array_equal(grads1["W"], grads0["W"])
    for bad in (np.nan, -1.0, 1e30):
        model._state[step] = bad
        loss, grads = model.gradients(**data)
        assert loss == loss0 and all(np.array_equal(grads[k], grads0[k]) for k in grads)
        params = model.get_params()
        assert model.train_step(**data) == loss0
        model.set_params(params)


def test_header_documents_the_step_argument():
    header = _model().cmodule.header
    assert "size_t n, uint32_t step," in header.replace("\n        ", " ")
    assert "train_step passes its count of steps taken" in header
    source = _model().cmodule.source
    assert "const uint32_t step = count >= 0 && count < 4294967296.0 ? (uint32_t)count : 0;" \
        in source


def test_both_modes_against_torch(assert_close):
    """forward: torch's eval() (running statistics, no dropout); gradients: train() with
    the batch's statistics and x·mask/(1 − p), graphc's step-k mask, at k = 0 and after
    three train steps; the running statistics after those steps as torch updates them."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    model, _ = _fresh()
    data = _data(4)
    x, y = torch.tensor(data["x"]), torch.tensor(data["y"], dtype=torch.long)

    def torch_run(params: dict, training: bool, step: int):
        P = {k: torch.tensor(v, requires_grad=k not in ("m", "v")) for k, v in params.items()}
        c = F.conv2d(x, P["K"], padding=1)
        n = F.batch_norm(c, P["m"].detach().clone(), P["v"].detach().clone(), P["g"], P["s"],
                         training=training, momentum=0.2, eps=1e-5)
        a = torch.tanh(n)
        if training:
            kept = keep_mask(node_key("d", 0), step, np.arange(a.numel()).reshape(a.shape),
                             keep_threshold(0.4))
            a = a * torch.tensor(kept, dtype=a.dtype) / (1 - 0.4)
        logits = F.linear(a.flatten(1), P["W"], P["b"])
        loss = F.cross_entropy(logits, y)
        if training:
            loss.backward()
        grads = {k: t.grad.numpy() for k, t in P.items() if t.grad is not None}
        return logits.detach().numpy(), float(loss.detach()), grads


    for step in (0, 3):
        while model.optimizer_state()["step"] < step:
            model.train_step(**data)
        params = model.get_params()
        logits, _, _ = torch_run(params, False, step)
        assert_close(model.forward(**data)["logits"], logits, "float64", f"eval at {step}")
        _, loss, grads = torch_run(params, True, step)
        got_loss, got = model.gradients(**data)
        assert_close(got_loss, loss, "float64", f"training loss at step {step}")
        for k, want in grads.items():
            assert_close(got[k], want, "float64", f"gradient of {k} at step {step}")
    # the running statistics after three steps, as torch's F.batch_norm moves them
    m, v = (torch.tensor(_fresh()[0].get_params()[k]) for k in ("m", "v"))
    fresh = _fresh()[0]
    for _ in range(3):
        params = fresh.get_params()
        P = {k: torch.tensor(val) for k, val in params.items()}
        F.batch_norm(F.conv2d(x, P["K"], padding=1), m, v, P["g"], P["s"], training=True,
                     momentum=0.2)
        fresh.train_step(**data)
    assert_close(fresh.get_params()["m"], m.numpy(), "float64", "running mean")
    assert_close(fresh.get_params()["v"], v.numpy(), "float64", "running variance")


def test_explain_shows_the_mask_and_works_the_first_steps_numbers():
    """The local derivative of dropout is the mask over 1 − p (derived by SymPy, as every
    op's), and the worked numbers are those of the first train step: the model's
    gradients at step 0."""
    from graphc.explain import explain
    spec = {"name": "tinyd", "inputs": {"x": [3], "y": [2]}, "params": {"W": [2, 3]},
            "nodes": {"d": {"op": "dropout", "inputs": ["x"], "p": 0.5},
                      "h": {"op": "dense", "inputs": ["d", "W"]},
                      "loss": {"op": "mse", "inputs": ["h", "y"]}},
            "outputs": ["h"], "loss": "loss"}
    e = explain(spec, wrt="W", at="random")
    assert all(ok for _, _, ok in e.worked.checks), e.worked.checks
    text = e.text()
    assert "dropout_keep(" in text and "step" in text
    model = compile_strict(spec, "float64")
    model.set_params(e.worked.params)
    _, grads = model.gradients(**e.worked.inputs)
    assert np.allclose(e.worked.env["W.grad"], grads["W"], rtol=1e-12, atol=1e-14)
    # some inputs dropped, some kept: the mask is not trivial at this batch
    kept = e.worked.env["d"] != 0
    assert kept.any() and not kept.all()
