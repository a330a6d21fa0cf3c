"""Padding as padded copies (codegen/padding.py): the c99 and host targets read a padded
convolution's input from a copy with zeros around it and scatter its input gradient into a
padded gradient, so that the loops doing the work test no guard; Cortex-M keeps the
guarded reads. Values stay the reference's, NaN weights included, at every batch size."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp

import graphc
from codegen.emit import box_pieces
from codegen.padding import pad_guards
from codegen.plan import fuse, plan
from graphc.derive import derive
from graphc.ir import BATCH

from conftest import compile_strict

# conv (stride 2, dilation, two paddings of one input), max pooling padded with -inf, an
# average pool without the padding in its count, and a value with two consumers, one of
# them padded: its gradient has a contribution besides the padded scatter.
SPEC = {
    "name": "padnet",
    "inputs": {"x": [2, 7, 6], "y": [4]},
    "params": {"K": {"shape": [3, 2, 3, 3], "init": "he_normal"},
               "c": {"shape": [3], "init": "normal"},
               "K2": {"shape": [3, 2, 3, 3], "init": "he_normal"},
               "L": {"shape": [3, 3, 3, 3], "init": "he_normal"},
               "W": {"shape": [4, 77], "init": "glorot_uniform"}},
    "nodes": {
        "h": {"op": "conv2d", "inputs": ["x", "K", "c"], "padding": 1},            # [3, 7, 6]
        "g": {"op": "conv2d", "inputs": ["x", "K2"], "padding": 2, "stride": 2,
              "dilation": 2},                                                       # [3, 4, 3]
        "t": {"op": "tanh", "inputs": ["h"]},
        "m": {"op": "max_pool2d", "inputs": ["t"], "kernel_size": 3, "stride": 2,
              "padding": 1},                                                        # [3, 4, 3]
        "u": {"op": "conv2d", "inputs": ["t", "L"], "padding": "same"},            # [3, 7, 6]
        "v": {"op": "avg_pool2d", "inputs": ["u"], "kernel_size": 3, "stride": 2,
              "padding": 1, "count_include_pad": False},                            # [3, 4, 3]
        "s": {"op": "add", "inputs": ["m", "v"]},
        "w": {"op": "add", "inputs": ["s", "g"]},
        "f": {"op": "flatten", "inputs": ["w"]},
        "tf": {"op": "flatten", "inputs": ["t"]},
        "f2": {"op": "slice", "inputs": ["tf"], "axis": 0, "start": 0, "stop": 41},
        "cat": {"op": "concat", "inputs": ["f", "f2"]},
        "logits": {"op": "dense", "inputs": ["cat", "W"]},
        "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss",
    "optimizer": {"name": "sgd", "lr": 0.01},
}


def _guarded_piecewise(kern) -> bool:
    loops = {s for s, _ in kern.loops}
    return kern.guard != sp.true or any(
        isinstance(p.args[0].expr, sp.Indexed) and p.args[0].cond.free_symbols & loops
        for p in kern.body.atoms(sp.Piecewise))   # a read under a guard (not argmax's routing)


def test_padded_program_tests_guards_only_where_the_copies_are_made():
    g = graphc.Graph.from_spec(SPEC)
    fused = fuse(derive(g).gradients)
    padded = pad_guards(fused)
    padded.check()
    guarded = [k for k in padded.kernels if _guarded_piecewise(k)]
    # only the copies test a guard (each element once), none of the convolutions or pools
    assert guarded and all(".pad" in k.out for k in guarded), [k.pretty() for k in guarded]
    assert any(_guarded_piecewise(k) for k in fused.kernels)
    # x is padded for two convolutions (1, and 2 with dilation 2, stride 2): one copy, as
    # wide as the wider reads on each side (the second reads one column past the right edge)
    assert padded.buffers["x.pad"].shape == (2, 7 + 2 + 2, 6 + 2 + 1)
    assert "x.pad_" not in "".join(padded.buffers)
    # the max pool's copy is filled with -inf, the padded scatters' with zeros first
    pads = {k.out: k for k in padded.kernels if k.out.endswith(".pad")}
    assert pads["t.pad"].body.args[1].expr == -sp.oo or \
        any(k.body.has(-sp.oo) for k in padded.kernels if k.out.startswith("t.pad"))
    assert len(padded.origins) == len(padded.kernels)
    # the copies are planned like any temp
    mem = plan(padded)
    assert {"x.pad", "t.pad.grad"} <= set(mem.places)


def _conv_functions(cm) -> dict[str, str]:
    """The C functions of the gradients entry's convolution and pooling kernels (not the
    copies, which test each element once)."""
    calls = cm.calls["gradients"]
    prog = cm.entries["gradients"].program
    out = {}
    for call, kern in zip(calls, prog.kernels):
        if kern.node in ("h", "g", "u", "m", "v") and not kern.out.endswith(".pad") \
                and ".pad" not in kern.note and kern.mode != "assign" \
                and any(e == BATCH for _, e in kern.loops):   # not the pool's count of taps
            out[call.function] = cm.functions[call.function]
    return out


@pytest.mark.parametrize("target", ["c99", "host"])
def test_the_c_of_the_convolutions_has_no_guard(target):
    _, cm = graphc.generate(SPEC, "float32", target=target)
    funcs = _conv_functions(cm)
    assert len(funcs) >= 6, list(funcs)
    for name, text in funcs.items():
        body = [line for line in text[text.index("\n{"):].splitlines()
                if not line.strip().startswith("for (")]
        guards = [line for line in body if GUARD.search(line)]
        assert not guards, f"{name}:\n{text}"


# A padding guard as the C prints it: a loop index compared with a number (`i3 + i5 >= 1`,
# `2*i1 + i3 < 8`); loop headers aside.
GUARD = re.compile(r"\bi\d+ (>=|<) \d")


@pytest.mark.parametrize("target", ["c99", "host"])
def test_the_padded_copies_test_nothing_per_element(target):
    """A padded copy runs its border and its inside as separate ranges of its loops: the
    inside is a plain copy (vectorized), the border a fill, no index compared per element
    (ResNet-8's copies were 7 % of its forward pass with the test)."""
    _, cm = graphc.generate(SPEC, "float32", target=target)
    copies = {name: text for name, text in cm.functions.items() if name.endswith("_pad_forward")}
    assert len(copies) >= 2, sorted(cm.functions)
    for name, text in copies.items():
        body = [line for line in text[text.index("\n{"):].splitlines()
                if not line.strip().startswith("for (")]
        assert not [line for line in body if "?" in line or GUARD.search(line)], text


def test_box_pieces_reads_the_bounds_of_a_padded_copy():
    h, w = sp.symbols("i2 i3", integer=True, nonnegative=True)
    x = sp.IndexedBase("x")
    body = sp.Piecewise((x[h - 1, w], (h >= 1) & (h < 33) & (w > -3) & sp.Ge(5, w)), (0, True))
    assert box_pieces(body, [h, w], {h: 34, w: 34}) == (x[h - 1, w], 0, {h: (1, 33), w: (0, 6)})
    # bounds past the loop: an empty inside, never a range beyond the loop's extent
    beyond = sp.Piecewise((x[h, w], h >= 40), (0, True))
    assert box_pieces(beyond, [h, w], {h: 34, w: 34})[2] == {h: (34, 34)}
    # not a box of constant bounds on loops of fixed extent: printed as it is
    assert box_pieces(sp.Piecewise((x[h, w], h >= w), (0, True)), [h, w], {h: 3, w: 3}) is None
    assert box_pieces(sp.Piecewise((x[h, w], h >= 1), (0, True)), [h, w], {h: BATCH, w: 3}) \
        is None
    assert box_pieces(x[h, w], [h, w], {h: 3, w: 3}) is None


def test_cortex_m_keeps_the_guarded_reads():
    _, cm = graphc.generate(SPEC, "float32", target="cortex-m4")
    assert not any(".pad" in b for b in cm.entries["gradients"].program.buffers)
    texts = "\n".join(_conv_functions(cm).values())
    assert GUARD.search(texts.replace("; ++", "")) and re.search(r"\bif \(i", texts)


@pytest.mark.parametrize("target", ["c99", "host"])
def test_padded_copies_give_the_reference_values(target, assert_close):
    model = compile_strict(SPEC, "float64", target=target)
    ref = graphc.reference(graphc.Graph.from_spec(SPEC))
    ref.set_params(model.get_params())
    rng = np.random.default_rng(3)
    for n in (1, 3, 9):   # n = 0 (and ASan at every n): tests/test_batch_sizes.py
        x = rng.normal(size=(n, 2, 7, 6))
        y = np.eye(4)[rng.integers(0, 4, n)]
        out, want = model.forward(x=x), ref.forward(x=x)
        assert out["logits"].shape == (n, 4)
        assert_close(out["logits"], want["logits"], "float64", f"logits at n={n}")
        loss, grads = model.gradients(x=x, y=y)
        rloss, rgrads = ref.gradients(x=x, y=y)
        assert_close(np.float64(loss), np.float64(rloss), "float64", f"loss at n={n}")
        for p in grads:
            assert_close(grads[p], rgrads[p], "float64", f"d{p} at n={n}")


def test_nan_weight_reaches_padded_outputs_and_gradients_through_the_copy():
    """0·NaN is NaN: the copy holds zeros, a term of the sum like any other."""
    spec = {"name": "nanpad", "inputs": {"x": [1, 4, 4]},
            "params": {"K": {"shape": [1, 1, 3, 3], "init": "ones"}},
            "nodes": {"y": {"op": "conv2d", "inputs": ["x", "K"], "padding": 1},
                      "l": {"op": "mean", "inputs": ["y"]}},
            "outputs": ["y"], "loss": "l", "optimizer": {"name": "sgd", "lr": 0.1}}
    model = compile_strict(spec, "float32")
    assert "x.pad" in model.cmodule.entries["forward"].program.buffers
    k = np.ones((1, 1, 3, 3), np.float32)
    k[0, 0, 0, 0] = np.nan   # touches only the padding at the first row and column
    model.set_params({"K": k})
    y = model.forward(x=np.ones((2, 1, 4, 4), np.float32))["y"]
    assert np.isnan(y).all(), y


# ---------------------------------------------------------------- the tiles take them

def test_the_convolutions_run_as_register_tiles():
    """Without their guards, a convolution, its weight gradient (lanes along the summed w:
    the tap q is 3 wide) and its input gradient's scatter (lanes along w, the taps one by
    one outside the tile) are tiles, like dense layers, summed by helpers shared by tile
    shape (channels and strides are arguments; the taps, constants of the helper)."""
    graph = graphc.load("examples/digits_cnn.yaml")
    _, cm = graphc.generate(graph, "float32", target="c99")
    f = cm.functions
    calls = {name: re.findall(r"\b((?:dot|tile)\w+)\(", f[name])
             for name in ("h1_forward", "h2_forward", "K2_grad", "K1_grad_2", "p1_pad_grad_2")}
    assert calls == {"h1_forward": ["tile8x8_nx3"], "h2_forward": ["tile16x4_nx3x3"],
                     "K2_grad": ["dot8x2_4_4_nx4"],
                     "K1_grad_2": ["dot8x2_4_8_nx8", "dot8x1_4_8_nx8"],
                     "p1_pad_grad_2": ["tile16x4_add"]}, calls
    for helper in ("tile8x8_nx3", "tile16x4_nx3x3", "dot8x2_4_4_nx4"):
        text = re.search(rf"^static void {helper}\(.*?^}}", cm.source, re.M | re.S)[0]
        assert "float c0[4]" in text, text


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="no C compiler")
def test_threads_change_no_bit_of_the_conv_net(tmp_path):
    """The host's OpenMP shares out whole outputs, a scatter's too (by example: its taps
    write the same elements, so they run one by one in each thread)."""
    from test_kernels import _run_harness
    graph = graphc.load("examples/digits_cnn.yaml")
    _, cm = graphc.generate(graph, "float32", target="host")
    assert "#pragma omp" in cm.functions["p1_pad_grad_2"]
    outs = _run_harness(graph, "host", 40, ["-O2", "-march=native", "-fopenmp"], tmp_path,
                        runs=[{"OMP_NUM_THREADS": str(t)} for t in (1, 2, 3)])
    assert outs[0] == outs[1] == outs[2]


# ---------------------------------------------------------------- strided reads, packed

# A stride-2 3 x 3 convolution (padded), a 1 x 1 stride-2 shortcut (unpadded, the tap axis
# dropped) and a dilated stride-2 one (taps 0, 2, 4 of a step of 2): each reads a copy
# packed by its stride, unit-stride along the output width (11 = 2 vectors of 4 and 3
# lanes for c99, 8 and 3 for AVX2).
STRIDED = {
    "name": "strided",
    "inputs": {"x": [3, 6, 21], "y": [2]},
    "params": {"K": {"shape": [5, 3, 3, 3], "init": "he_normal"},
               "S": {"shape": [5, 3, 1, 1], "init": "he_normal"},
               "D": {"shape": [5, 3, 3, 3], "init": "he_normal"},
               "W": {"shape": [2, 165], "init": "glorot_uniform"}},
    "nodes": {
        "c": {"op": "conv2d", "inputs": ["x", "K"], "stride": 2, "padding": 1},    # [5, 3, 11]
        "s": {"op": "conv2d", "inputs": ["x", "S"], "stride": 2},                  # [5, 3, 11]
        "d": {"op": "conv2d", "inputs": ["x", "D"], "stride": 2, "padding": 2,
              "dilation": 2},                                                       # [5, 3, 11]
        "t": {"op": "add", "inputs": ["c", "s"]},
        "u": {"op": "add", "inputs": ["t", "d"]},
        "a": {"op": "relu", "inputs": ["u"]},
        "f": {"op": "flatten", "inputs": ["a"]},
        "logits": {"op": "dense", "inputs": ["f", "W"]},
        "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss",
    "optimizer": {"name": "sgd", "lr": 0.01},
}


def test_strided_reads_read_packed_copies():
    padded = pad_guards(fuse(derive(graphc.Graph.from_spec(STRIDED)).gradients))
    copies = {k.out: k for k in padded.kernels if ".s2" in k.out}
    # x.pad is shared by c and d (pad 2 covers both); their taps differ, so two copies; the
    # shortcut reads x itself: [3, 6, 11], no tap axis
    assert padded.buffers["x.s2"].shape == (3, 6, 11)
    shapes = sorted(padded.buffers[name].shape for name in copies if name.startswith("x.pad"))
    rows = padded.buffers["x.pad"].shape[1]
    assert shapes == [(3, rows, 3, 11), (3, rows, 3, 11)], shapes
    for kern in padded.kernels:
        if kern.out in copies:
            continue
        for read in kern.accesses():   # no read of the sources steps by 2 along the width
            last = sp.expand(read.indices[-1])
            assert not any(last.coeff(s) == 2 for s, _ in kern.loops), kern.pretty()
    # the forward convolutions are tiles with lanes along the output width
    _, cm = graphc.generate(STRIDED, "float32", target="c99")
    prog = cm.entries["forward"].program
    for call, kern in zip(cm.calls["forward"], prog.kernels):
        if kern.node in ("c", "s", "d") and kern.mode == "sum":
            assert "float c0[4]" in cm.functions[call.function] \
                or "tile" in cm.functions[call.function], cm.functions[call.function]


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("target", ["c99", "host"])
def test_packed_strided_convolutions_under_sanitizers(target, tmp_path, assert_close):
    """Every entry point at n = 0, 1, 2 and 5 under ASan and UBSan against the reference."""
    from sweep import Sweep, run_and_check, start_build
    model = Sweep(STRIDED, target)
    batches = (0, 1, 2, 5)
    build = start_build(model, tmp_path, batches, ["-fopenmp"] if target == "host" else [])
    run_and_check(model, tmp_path, build, assert_close, batches, env={"OMP_NUM_THREADS": "2"})


# Pooling windows that run past the input: ceil_mode's clipped last windows, padding per
# side and over half the kernel, dilation. The padded copy (c99) and the guarded reads
# (cortex-m4) must neither read nor scatter past the arrays at any batch size.
POOLS = {
    "name": "pools",
    "inputs": {"x": [2, 7, 8], "y": [3]},
    "params": {"S": {"shape": [2, 7, 8], "init": "normal"},
               "W": {"shape": [3, 80], "init": "glorot_uniform"}},
    "nodes": {
        "h": {"op": "mul", "inputs": ["x", "S"]},
        "m": {"op": "max_pool2d", "inputs": ["h"], "kernel_size": 3, "stride": 2,
              "dilation": [1, 2], "padding": [[0, 2], 1], "ceil_mode": True},      # [2, 4, 4]
        "i": {"op": "avg_pool2d", "inputs": ["h"], "kernel_size": 3, "stride": [2, 3],
              "padding": [[1, 0], 1], "ceil_mode": True},                           # [2, 4, 3]
        "e": {"op": "avg_pool2d", "inputs": ["h"], "kernel_size": 3, "stride": [2, 3],
              "padding": [[1, 0], 1], "ceil_mode": True, "count_include_pad": False},
        "cat": {"op": "concat", "inputs": ["m", "i", "e"]},                        # [2, 4, 10]
        "f": {"op": "flatten", "inputs": ["cat"]},
        "logits": {"op": "dense", "inputs": ["f", "W"]},
        "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss",
    "optimizer": {"name": "sgd", "lr": 0.1},
}


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="no C compiler")
def test_pooling_past_the_input_under_the_sanitizers(tmp_path, assert_close):
    from sweep import Sweep, run_and_check, start_build
    batches = (0, 1, 3)
    models = {t: Sweep(POOLS, t, "float64") for t in ("c99", "cortex-m4")}
    builds = {t: start_build(m, tmp_path / t, batches) for t, m in models.items()}
    for t, m in models.items():
        run_and_check(m, tmp_path / t, builds[t], assert_close, batches)
