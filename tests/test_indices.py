"""Integer inputs: an embedding's rows and a cross-entropy's class indices.

An int32 input is read where an op takes indices (OpDef.integer_inputs). Its values pick
which element is read (`table[tokens[b, i], d]`, `logits[b, y[b]]`): a guarded read, as
padding is, so the C never reads or writes outside an array whatever the indices hold,
while Python refuses an index outside its range, naming the input, the value, where it is
and the node that bounds it, before any C runs. Here: those refusals; the derived
gradients (softmax - onehot; the scatter-add into the table); the C text (int32_t, casts,
int32 comparisons) under every target's warning flags; the C at batch sizes 0, 1, 3 and
17 under AddressSanitizer and UBSan; the C called directly with indices out of range;
training with 1-D integer labels, from Python and from the command line.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import graphc
from codegen.build import check_strict
from codegen.printer import c_literal
from codegen.targets import get_target
from graphc.derive import derive
from graphc.errors import InputError
from graphc.ir import ACCUMULATE
from graphc.verify import sample_inputs

from sweep import CC, SANITIZE, Sweep, run_and_check, start_build

V, D, T, K = 10, 4, 6, 5     # table rows, features, tokens per example, classes

# tokens -> embedding -> flatten -> dense -> cross-entropy on a class index; the table
# first among the params, so that a read before its first row leaves the params array.
SPEC = {
    "name": "tok",
    "inputs": {"tokens": {"shape": [T], "dtype": "int32"}, "y": {"shape": [], "dtype": "int32"}},
    "params": {"E": {"shape": [V, D], "init": "normal"},
               "W": {"shape": [K, T * D], "init": "glorot_uniform"},
               "c": {"shape": [K], "init": "uniform", "low": -0.5, "high": 0.5}},
    "nodes": {"emb": {"op": "embedding", "inputs": ["tokens", "E"]},
              "f": {"op": "flatten", "inputs": ["emb"]},
              "logits": {"op": "dense", "inputs": ["f", "W", "c"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss", "optimizer": {"name": "adam", "lr": 0.05}}

TOKENS = np.array([[0, 9, 3, 3, 7, 1], [2, 2, 2, 8, 0, 9], [5, 4, 6, 1, 9, 0]], np.int32)
LABELS = np.array([0, 4, 2], np.int32)


@functools.lru_cache(maxsize=None)
def model(dtype: str = "float64"):
    return graphc.compile(SPEC, dtype)


def np_forward(params: dict, tokens: np.ndarray, y: np.ndarray):
    """The model in NumPy, with an index outside its range reading as 0, as the C does:
    (logits, per-example loss)."""
    E, W, c = params["E"], params["W"], params["c"]
    inside = (tokens >= 0) & (tokens < V)
    rows = np.where(inside[..., None], E[np.clip(tokens, 0, V - 1)], 0.0)
    logits = rows.reshape(len(tokens), -1) @ W.T + c
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    ok = (y >= 0) & (y < K)
    picked = np.where(ok, logits[np.arange(len(y)), np.clip(y, 0, K - 1)], 0.0)
    return logits, lse - picked


def np_gradients(params: dict, tokens: np.ndarray, y: np.ndarray) -> dict:
    """d mean loss / d params: softmax - onehot through the dense layer, and the rows'
    gradients added into the table (np.add.at: a row used twice gets both)."""
    E, W = params["E"], params["W"]
    n = len(tokens)
    logits, _ = np_forward(params, tokens, y)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ok = (y >= 0) & (y < K)
    onehot = np.zeros_like(p)
    onehot[np.arange(n)[ok], y[ok]] = 1
    dlogits = (p - onehot) / n
    inside = (tokens >= 0) & (tokens < V)
    rows = np.where(inside[..., None], E[np.clip(tokens, 0, V - 1)], 0.0)
    drows = (dlogits @ W).reshape(n, T, D)
    dE = np.zeros_like(E)
    np.add.at(dE, tokens[inside], drows[inside])
    return {"E": dE, "W": dlogits.T @ rows.reshape(n, -1), "c": dlogits.sum(axis=0)}


# ---------------------------------------------------------------- Python refuses bad indices

TOKEN_TOO_BIG = "input 'tokens' holds 10 at [1, 4]; embedding 'emb' has 10 rows (indices 0 to 9)"
LABEL_TOO_BIG = ("input 'y' holds 5 at [2]; softmax_cross_entropy 'loss' has 5 classes "
                 "(indices 0 to 4)")


def _bad(tokens=None, y=None):
    t = TOKENS.copy() if tokens is None else tokens
    return {"tokens": t, "y": LABELS.copy() if y is None else y}


def _with(a, where, value, dtype=None):
    a = a.astype(dtype or a.dtype)
    a[where] = value
    return a


@pytest.mark.parametrize("inputs, message", [
    (_bad(tokens=_with(TOKENS, (1, 4), 10)), TOKEN_TOO_BIG),
    (_bad(tokens=_with(TOKENS, (0, 2), -1)),
     "input 'tokens' holds -1 at [0, 2]; embedding 'emb' has 10 rows (indices 0 to 9)"),
    (_bad(tokens=_with(TOKENS, (2, 5), 2 ** 40, np.int64)),
     "input 'tokens' holds 1099511627776 at [2, 5]; embedding 'emb' has 10 rows"),
    (_bad(y=_with(LABELS, 2, 5)), LABEL_TOO_BIG),
    (_bad(y=_with(LABELS, 1, -3)), "input 'y' holds -3 at [1]; softmax_cross_entropy 'loss'"),
    (_bad(tokens=_with(TOKENS, (0, 0), 1.5, np.float64)),
     "input 'tokens' holds 1.5 at [0, 0]: int32 indices must be whole numbers"),
    (_bad(y=_with(LABELS, 0, np.nan, np.float64)),
     "input 'y' holds nan at [0]: int32 indices must be whole numbers"),
    (_bad(y=LABELS.astype(str)), "input 'y' takes int32 indices, got dtype <U"),
], ids=["row-too-big", "row-negative", "row-beyond-int32", "class-too-big", "class-negative",
        "not-whole", "nan", "strings"])
def test_python_refuses_indices_out_of_range_before_any_c_runs(inputs, message):
    m = model()
    before = m.get_params()
    calls = {"gradients": m.gradients, "evaluate": m.evaluate, "train_step": m.train_step,
             "verify": m.verify, "reference": graphc.reference(m.graph).gradients}
    if "input 'tokens'" in message:   # the forward pass reads the tokens only
        calls["forward"] = lambda **kw: m.forward(tokens=kw["tokens"])
    for name, call in calls.items():
        with pytest.raises(InputError) as e:
            call(**inputs)
        assert message in str(e.value), (name, str(e.value))
    with pytest.raises(InputError, match=re.escape(message)):
        graphc.evaluate(m, inputs)
    with pytest.raises(InputError, match=re.escape("data: " + message)):
        graphc.fit(m, inputs, epochs=1, progress=False)
    # nothing ran: a refused train step moved no param and counted no step
    assert all(np.array_equal(before[p], a) for p, a in m.get_params().items())
    assert m.optimizer_state().get("step", 0) == 0


def test_whole_floats_and_other_integer_types_are_taken_as_indices():
    m = model()
    loss, grads = m.gradients(tokens=TOKENS, y=LABELS)
    for tokens, y in [(TOKENS.astype(np.float64), LABELS.astype(np.float32)),
                      (TOKENS.astype(np.int64), LABELS.astype(np.uint8)),
                      (TOKENS.tolist(), [0, 4, 2])]:
        again, grads2 = m.gradients(tokens=tokens, y=y)
        assert again == loss
        assert all(np.array_equal(grads[p], grads2[p]) for p in grads)


# ---------------------------------------------------------------- the derived gradients

def test_class_index_gradient_is_softmax_minus_onehot():
    """L = mean_b -log softmax(P)[y_b] for logits P that are a param: dL/dP is
    softmax(P) - mean_b onehot(y_b), derived from the formula alone (a guarded read whose
    derivative becomes a guarded scatter of -1/n at P[y_b])."""
    spec = {"name": "ce", "inputs": {"y": {"shape": [], "dtype": "int32"}},
            "params": {"P": {"shape": [K], "init": "normal"}},
            "nodes": {"loss": {"op": "softmax_cross_entropy", "inputs": ["P", "y"]}},
            "loss": "loss"}
    graph = graphc.Graph.from_spec(spec)
    scatters = [k for k in derive(graph).gradients.kernels if k.guard != sp.true]
    (k,) = scatters
    assert k.mode == ACCUMULATE and str(k.guard) == "(y[b] >= 0) & (y[b] < 5)"
    assert str(k.out_index[-1]) == "y[b]" and str(k.body) == "-1/n"   # no Piecewise left
    m = graphc.compile(spec, "float64")
    y = np.array([0, 4, 4, 1, 3, 0, 2], np.int32)
    P = m.get_params()["P"]
    softmax = np.exp(P - P.max()) / np.exp(P - P.max()).sum()
    loss, grads = m.gradients(y=y)
    np.testing.assert_allclose(grads["P"], softmax - np.eye(K)[y].mean(axis=0), rtol=0,
                               atol=1e-15)
    np.testing.assert_allclose(loss, -np.log(softmax[y]).mean(), rtol=1e-14)


def test_c_matches_numpy_and_adds_repeated_rows():
    m = model()
    params = m.get_params()
    logits, per_example = np_forward(params, TOKENS, LABELS)
    np.testing.assert_allclose(m.forward(tokens=TOKENS)["logits"], logits, rtol=1e-13)
    loss, grads = m.gradients(tokens=TOKENS, y=LABELS)
    assert loss == pytest.approx(per_example.mean(), rel=1e-13)
    want = np_gradients(params, TOKENS, LABELS)
    for p in want:
        np.testing.assert_allclose(grads[p], want[p], rtol=1e-12, atol=1e-15, err_msg=p)
    # rows 2 and 9 are read three and three times, rows absent from the batch get nothing
    assert not grads["E"][np.setdiff1d(np.arange(V), TOKENS)].any()
    assert np.all(grads["E"][[2, 9]] != 0)


def test_bound_calls_take_int32_arrays_in_place():
    m = model()
    step = m.bind("forward", batch=3)
    assert step.inputs["tokens"].dtype == np.int32
    step.inputs["tokens"][...] = TOKENS
    step()
    np.testing.assert_array_equal(step.outputs["logits"], m.forward(tokens=TOKENS)["logits"])
    with pytest.raises(InputError, match="input 'tokens' must be a C-contiguous int32 array"):
        m.bind("forward", tokens=TOKENS.astype(np.float64))


# ---------------------------------------------------------------- the C text

@pytest.mark.parametrize("target", ["c99", "host", "cortex-m4"])
def test_c_text_reads_indices_as_int32_and_builds_under_every_targets_warnings(target):
    for dtype in ("float32", "float64"):
        graph, cm = graphc.generate(SPEC, dtype, target=target)
        src, header = cm.source, cm.header
        flat = " ".join(src.split())   # lines are broken at 100 characters
        # an index read is cast where it becomes an offset, compared as int32 where guarded
        assert "((tokens[6*b + i0] >= 0 && tokens[6*b + i0] < 10) ? " \
               f"(E[(size_t)tokens[6*b + i0]*4 + i1]) : ({c_literal(0.0, dtype)}))" in flat
        assert "if (y[b] >= 0 && y[b] < 5) { dlogits[(size_t)y[b] + 5*b] += -inv_n; }" in flat
        # the scatter into the table: its guard tested once the loops it reads are open
        assert "if (tokens[6*b + i0] >= 0 && tokens[6*b + i0] < 10) { " \
               "for (size_t i1 = 0; i1 < 4; ++i1) { dE[(size_t)tokens[6*b + i0]*4 + i1] += " in flat
        assert "const int32_t *restrict tokens" in src and "const int32_t *in_tokens" in header
        assert "in_tokens: n x TOK_INPUT_tokens_SIZE int32_t indices, 0 to 9" in header
        assert "in_y: n x TOK_INPUT_y_SIZE int32_t indices, 0 to 4" in header
        assert "#include <stdint.h>" in header
        if shutil.which(CC):   # -Wconversion (with -Wsign-conversion) and more, as errors
            assert check_strict(cm.name, src, header, get_target(target).check_flags)


def test_kernels_reading_at_data_dependent_indices_are_never_tiled():
    """The tiles load their operands unconditionally: a kernel that reads or writes at an
    index read from data keeps plain loops, whatever its mode (embedding into a dense, so
    that fusion could hand the tiler a guarded contraction)."""
    from codegen.emit import _strides
    from codegen.plan import fuse
    from codegen.tiles import tiling
    from graphc.ir import data_dependent
    spec = {"name": "ed", "inputs": {"t": {"shape": [8], "dtype": "int32"}},
            "params": {"E": {"shape": [64, 16]}, "W": {"shape": [32, 16]}},
            "nodes": {"e": {"op": "embedding", "inputs": ["t", "E"]},
                      "h": {"op": "dense", "inputs": ["e", "W"]},
                      "loss": {"op": "sum", "inputs": ["h"]}},
            "outputs": ["h"], "loss": "loss"}
    program = fuse(derive(graphc.Graph.from_spec(spec)).gradients)
    reading = [k for k in program.kernels
               if any(data_dependent(i) for a in k.accesses() for i in a.indices)
               or any(data_dependent(i) for i in k.out_index)]
    assert len(reading) >= 2   # the table's read (forward) and its scatter (backward)
    tiled = [k for k in program.kernels
             if tiling(k, _strides(k, program.buffers), 64, 4) is not None]
    assert tiled and not set(map(id, tiled)) & set(map(id, reading))


# ---------------------------------------------------------------- the C under sanitizers

@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_every_entry_at_batch_sizes_0_1_3_17_under_sanitizers(tmp_path, assert_close):
    batches = (0, 1, 3, 17)
    inputs = sample_inputs(graphc.Graph.from_spec(SPEC), max(batches), seed=1)   # the sweep's
    for name, bound in (("tokens", V), ("y", K)):   # both ends of each range are read
        assert {0, bound - 1} <= set(inputs[name][:17].ravel().tolist()), name
        assert inputs[name].dtype == np.int32
    models = {t: Sweep(SPEC, t) for t in ("c99", "cortex-m4")}
    builds = {t: start_build(m, tmp_path / t, batches) for t, m in models.items()}
    for t, m in models.items():
        run_and_check(m, tmp_path / t, builds[t], assert_close, batches)


DIRECT_MAIN = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tok.h"

static double *exactly(size_t count)   /* its own malloc: ASan sees a read past it */
{
    double *a = malloc(count * sizeof *a);
    if (!a) { exit(1); }
    memset(a, 0, count * sizeof *a);
    return a;
}

static void show(const char *label, const double *a, size_t count)
{
    size_t k;
    printf("%s %lu\n", label, (unsigned long)count);
    for (k = 0; k < count; ++k) {
        printf("%.17g\n", a[k]);
    }
}

int main(void)
{
    static const int32_t tokens_init[3 * TOK_INPUT_tokens_SIZE] = {TOKENS};
    static const int32_t y_init[3] = {LABELS};
    static const double params_init[TOK_PARAMS_SIZE] = {PARAMS};
    int32_t *tokens = malloc(sizeof tokens_init), *y = malloc(sizeof y_init);
    double *params = exactly(TOK_PARAMS_SIZE), *grads = exactly(TOK_PARAMS_SIZE);
    double *state = exactly(TOK_STATE_SIZE), *logits = exactly(3 * TOK_OUTPUT_logits_SIZE);
    double *work = exactly(TOK_WORK_SIZE(3));
    double loss;
    if (!tokens || !y) { return 1; }
    memcpy(tokens, tokens_init, sizeof tokens_init);
    memcpy(y, y_init, sizeof y_init);
    memcpy(params, params_init, sizeof params_init);
    tok_init_state(state);   /* the hyperparameters, in the state */
    tok_forward(params, work, 3, tokens, logits);
    show("logits", logits, 3 * TOK_OUTPUT_logits_SIZE);
    loss = tok_evaluate(params, work, 3, tokens, y, logits);
    show("evaluate", &loss, 1);
    loss = tok_gradients(params, grads, work, 3, tokens, y);
    show("loss", &loss, 1);
    show("grads", grads, TOK_PARAMS_SIZE);
    loss = tok_train_step(params, state, work, 3, tokens, y);
    show("train_loss", &loss, 1);
    show("params", params, TOK_PARAMS_SIZE);
    free(tokens); free(y); free(params); free(grads); free(state); free(logits); free(work);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_c_called_directly_with_indices_out_of_range_reads_nothing_outside(tmp_path):
    """What Python refuses, the C survives: called from C with rows -1, 10, INT32_MIN and
    INT32_MAX and classes -1, 5 and INT32_MAX, under ASan and UBSan (each array its own
    malloc; the table first in the params, so row -1 would read before them), every
    entry point runs, reads no memory outside its arrays, and computes what an index
    outside its range reading 0 gives: rows of zeros, a loss of log-sum-exp (finite), no
    gradient for the rows or the classes not read."""
    from codegen.harness import parse_output
    from graphc.init import initial_params
    graph, cm = graphc.generate(SPEC, "float64")
    flat = initial_params(graph, cm, 0)
    tokens = TOKENS.copy()
    tokens[0, 1], tokens[1, 0], tokens[1, 5], tokens[2, 3] = -1, 10, -2 ** 31, 2 ** 31 - 1
    y = np.array([-1, 5, 2 ** 31 - 1], np.int32)
    main = (DIRECT_MAIN.replace("{TOKENS}", "{" + ", ".join(map(str, tokens.ravel())) + "}")
            .replace("{LABELS}", "{" + ", ".join(map(str, y)) + "}")
            .replace("{PARAMS}", "{" + ", ".join(repr(float(v)) for v in flat) + "}"))
    # INT32_MIN as a literal: -2147483648 is long, then converted; spelt so it is int
    main = main.replace("-2147483648", "(-2147483647 - 1)")
    (tmp_path / "main.c").write_text(main)
    (tmp_path / "tok.c").write_text(cm.source)
    (tmp_path / "tok.h").write_text(cm.header)
    build = subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", *SANITIZE, "main.c",
                            "tok.c", "-o", "direct", "-lm"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run(["./direct"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr[-3000:]
    got = parse_output(run.stdout)
    params = {p: flat[off:off + np.prod(graph.params[p].shape)].reshape(graph.params[p].shape)
              for p, off in cm.param_offsets.items()}
    logits, per_example = np_forward(params, tokens, y)
    np.testing.assert_allclose(got["logits"].reshape(3, K), logits, rtol=1e-13)
    assert np.all(np.isfinite(per_example))
    assert got["loss"][0] == pytest.approx(per_example.mean(), rel=1e-13)
    assert got["evaluate"][0] == got["loss"][0] == got["train_loss"][0]
    want = np_gradients(params, tokens, y)
    grads = {p: got["grads"][cm.param_offsets[p]:cm.param_offsets[p] + want[p].size]
             .reshape(want[p].shape) for p in want}
    for p in want:
        np.testing.assert_allclose(grads[p], want[p], rtol=1e-12, atol=1e-15, err_msg=p)
    assert np.all(np.isfinite(got["params"]))
    # no class is read for these three examples: the gradient of the bias is softmax alone
    np.testing.assert_allclose(grads["c"].sum(), 1.0, rtol=1e-12)


# ---------------------------------------------------------------- training on class indices

CLASSIFIER = {
    "name": "labels", "inputs": {"x": [4], "y": {"shape": [], "dtype": "int32"}},
    "params": {"W": {"shape": [3, 4], "init": "glorot_uniform"}, "b": [3]},
    "nodes": {"logits": {"op": "dense", "inputs": ["x", "W", "b"]},
              "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss", "optimizer": {"name": "adam", "lr": 0.1}}


def _blobs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)) + 4.0 * np.eye(3, 4)[y]
    return x, y


def test_fit_and_accuracy_take_1d_integer_labels():
    m = graphc.compile(CLASSIFIER)
    x, y = _blobs(120, 0)
    xv, yv = _blobs(60, 1)
    history = graphc.fit(m, {"x": x, "y": y}, epochs=15, batch_size=16, progress=False,
                         validation={"x": xv, "y": yv.astype(np.float64)})   # whole floats too
    assert history["accuracy"][-1] >= 0.9 and history["val_accuracy"][-1] >= 0.9
    metrics = graphc.evaluate(m, {"x": xv, "y": yv})
    predicted = m.forward(x=xv)["logits"].argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == yv), abs=1e-12)
    assert metrics["accuracy"] == history["val_accuracy"][-1]
    with pytest.raises(InputError, match=re.escape(
            "validation: input 'y' holds 3 at [7]; softmax_cross_entropy 'loss' has 3 classes")):
        graphc.fit(m, {"x": x, "y": y}, epochs=1, progress=False,
                   validation={"x": xv, "y": _with(yv, 7, 3)})


def test_cli_trains_on_an_npz_with_integer_labels(tmp_path, capsys):
    from graphc.cli import main
    import yaml
    spec = tmp_path / "labels.yaml"
    spec.write_text(yaml.safe_dump(CLASSIFIER))
    x, y = _blobs(200, 2)
    np.savez(tmp_path / "data.npz", x=x, y=y.astype(np.int64))
    assert main(["train", str(spec), "--data", str(tmp_path / "data.npz"), "--epochs", "10",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy ([\d.]+)% on \d+ held-out", out).group(1))
    assert accuracy >= 90, out
    np.savez(tmp_path / "bad.npz", x=x, y=_with(y, 11, -1))
    assert main(["train", str(spec), "--data", str(tmp_path / "bad.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"graphc: error: {tmp_path / 'bad.npz'}: input 'y' holds -1 at [11]; "
                   "softmax_cross_entropy 'loss' has 3 classes (indices 0 to 2)\n")


def test_digits_give_class_indices_to_an_int32_input():
    pytest.importorskip("sklearn")
    from graphc.data import load_dataset, split
    root = Path(__file__).resolve().parent.parent
    labels = load_dataset("digits", graphc.load(root / "examples/digits_labels.yaml"))
    onehot = load_dataset("digits", graphc.load(root / "examples/digits/spec.yaml"))
    assert labels["y"].dtype == np.int32 and labels["y"].shape == (1797,)
    np.testing.assert_array_equal(labels["y"], onehot["y"].argmax(axis=1))
    # the split is stratified by class either way: the same examples held out
    (_, a), (_, b) = split(labels, 0.2, seed=0), split(onehot, 0.2, seed=0)
    np.testing.assert_array_equal(a["x"], b["x"])


def test_digits_give_pixel_levels_to_an_int32_image_input():
    """examples/digits_tokens.yaml: the pixels' levels 0 to 16 as int32 tokens, the image
    the float inputs get times 16."""
    pytest.importorskip("sklearn")
    from graphc.data import load_dataset
    root = Path(__file__).resolve().parent.parent
    tokens = load_dataset("digits", graphc.load(root / "examples/digits_tokens.yaml"))
    floats = load_dataset("digits", graphc.load(root / "examples/digits/spec.yaml"))
    assert tokens["pixels"].dtype == np.int32 and tokens["pixels"].shape == (1797, 64)
    assert tokens["pixels"].min() == 0 and tokens["pixels"].max() == 16
    np.testing.assert_array_equal(tokens["pixels"], floats["x"] * 16)
    np.testing.assert_array_equal(tokens["label"], floats["y"].argmax(axis=1))


# ---------------------------------------------------------------- explain

def test_explain_an_embedding_with_numbers():
    e = graphc.explain(SPEC, wrt="E", at={"tokens": TOKENS, "y": LABELS})
    text = e.text()
    assert "emb = embedding(tokens, E)" in text
    assert "∂L/∂E[tokens[b, i0], i1] += δemb[b, i0, i1], where (tokens[b, i0] ≥ 0) & " \
           "(tokens[b, i0] < 10)" in text
