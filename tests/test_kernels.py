"""Register-blocked contractions (codegen/tiles.py) on awkward shapes, for c99 and host.

Extents that are no multiple of a tile or a lane count, extents of 1, primes, batch 1 and
odd batches: every tail of the blocked loops runs. Each model is compared with the float64
NumPy reference in both dtypes (conftest.TOLERANCES). The host target's C is built with
OpenMP; its results must not depend on the thread count (bit for bit), and the c99 and
Cortex-M text must carry no pragma.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import graphc
from codegen.emit import _strides
from codegen.harness import harness
from codegen.plan import fuse
from codegen import build as B
from codegen.targets import CHECK_FLAGS, TARGETS, get_target
from codegen.tiles import tiling
from graphc.derive import derive
from graphc.init import initial_params
from graphc.reference import reference
from graphc.verify import sample_inputs
from sweep import Sweep, run_and_check, start_build

from conftest import compile_strict, generated

ROOT = Path(__file__).resolve().parent.parent
CC = os.environ.get("CC", "cc")
needs_cc = pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")


def mlp(name: str, sizes: list[int]) -> graphc.Graph:
    """Dense layers with relu between them and softmax cross-entropy: W1 and W3's shape."""
    b = graphc.Builder(name)
    h, y = b.input("x", [sizes[0]]), b.input("y", [sizes[-1]])
    for k in range(len(sizes) - 1):
        h = b.dense(h, b.param(f"W{k}", [sizes[k + 1], sizes[k]], init="he_normal"),
                    b.param(f"b{k}", [sizes[k + 1]], init="normal", std=0.1), name=f"h{k}")
        if k < len(sizes) - 2:
            h = b.relu(h, name=f"a{k}")
    return b.build(outputs=[h], loss=b.softmax_cross_entropy(h, y, name="loss"),
                   optimizer={"name": "sgd", "lr": 0.01})


def contractions() -> graphc.Graph:
    """matmul per example (a kept loop outside the tiles), sums over one and two axes
    (a reduction loop besides the lanes), a weight read twice (accumulated gradient)."""
    b = graphc.Builder("contract")
    x, c = b.input("x", [5, 7]), b.input("c", [3, 11])
    P, Q = b.param("P", [7, 11]), b.param("Q", [3, 5])
    xp = b.matmul(x, P, name="xp")                       # [5, 11]
    qs = b.matmul(Q, b.tanh(xp, name="t"), name="qs")    # [3, 11]
    s0 = b.sum(b.mul(qs, c, name="m"), axis=0, name="s0")  # [11]
    w = b.dense(s0, b.param("W", [13, 11]), name="w")    # [13]
    w2 = b.dense(w, b.param("V", [13, 13]), name="w2")
    w3 = b.dense(w2, "V", name="w3")                     # V used twice
    return b.build(outputs=[qs, w3], loss=b.sum(w3, name="loss"),
                   optimizer={"name": "sgd", "lr": 0.01})


def conv_rows(name: str, channels: int) -> graphc.Graph:
    """A 3 x 3 convolution with a bias and relu epilogue, big enough for helpers: its
    output channels one past whole tiles leave a single row, stored outside a loop."""
    b = graphc.Builder(name)
    x, y = b.input("x", [4, 16, 16]), b.input("y", [channels, 16, 16])
    c = b.conv2d(x, b.param("K", [channels, 4, 3, 3], init="he_normal"),
                 b.param("k", [channels], init="normal", std=0.1), padding=1, name="c")
    a = b.relu(c, name="a")
    return b.build(outputs=[a], loss=b.sum(b.mul(a, y, name="ay"), name="loss"),
                   optimizer={"name": "sgd", "lr": 0.01})


def depthwise() -> graphc.Graph:
    """A depthwise 3 x 3 convolution and a batch norm: tiles of 8 output rows and a tail of
    3 (11 rows), its per-channel scale g/sqrt(v + eps) computed once per channel, outside
    the tiles (forward: running statistics; gradients: the batch's)."""
    b = graphc.Builder("depthwise")
    x, y = b.input("x", [6, 11, 7]), b.input("y", [6, 11, 7])
    # No bias: the batch norm takes out its gradient (a zero of rounding noise in float32).
    c = b.conv2d(x, b.param("K", [6, 1, 3, 3], init="he_normal"), padding=1, groups=6,
                 name="c")
    norm = b.batch_norm(c, b.param("g", [6], init="uniform", low=0.5, high=2.0),
                        b.param("s", [6], init="normal", std=0.1),
                        b.param("m", [6], init="normal", std=0.1, trainable=False),
                        b.param("v", [6], init="uniform", low=0.5, high=2.0, trainable=False),
                        name="n")
    a = b.relu(norm, name="a")
    return b.build(outputs=[a], loss=b.sum(b.mul(a, y, name="ay"), name="loss"),
                   optimizer={"name": "sgd", "lr": 0.01})


def shifted() -> graphc.Graph:
    """A 1 x 1 convolution with a bias and relu epilogue on a 9 x 7 map, its 63 positions
    the lanes: whole chunks and a short one whose last vector is more than half full (7
    of 8 lanes on c99, 15 of 16 with AVX2, 31 of 32 with AVX-512), which runs as a whole
    chunk ending at position 63."""
    b = graphc.Builder("shifted")
    x, y = b.input("x", [16, 9, 7]), b.input("y", [24, 9, 7])
    c = b.conv2d(x, b.param("K", [24, 16, 1, 1], init="he_normal"),
                 b.param("k", [24], init="normal", std=0.1), name="c")
    a = b.relu(c, name="a")
    return b.build(outputs=[a], loss=b.sum(b.mul(a, y, name="ay"), name="loss"),
                   optimizer={"name": "sgd", "lr": 0.01})


def pooled() -> graphc.Graph:
    """A padded 3 x 3 convolution, relu, 2 x 2 max pooling and a dense layer, trained: the
    padded copy, the pooling, its argmax and its gradient's zeroing and scatter are plain
    loops, shared out among the threads by example from batch 15 to 57 on the host (each
    output worth 16 multiply-adds against its 2^20)."""
    b = graphc.Builder("pooled")
    x, y = b.input("x", [4, 24, 24]), b.input("y", [10])
    c = b.conv2d(x, b.param("K", [8, 4, 3, 3], init="he_normal"),
                 b.param("k", [8], init="normal", std=0.1), padding=1, name="c")
    p = b.max_pool2d(b.relu(c, name="a"), kernel_size=2, name="p")
    h = b.dense(b.flatten(p, name="f"), b.param("W", [10, 1152], init="glorot_uniform"),
                b.param("v", [10], init="zeros"), name="h")
    return b.build(outputs=[h], loss=b.softmax_cross_entropy(h, y, name="loss"),
                   optimizer={"name": "sgd", "lr": 0.01})


MODELS = {
    "primes": (lambda: mlp("primes", [37, 19, 5]), (1, 3, 9, 17)),
    "ones": (lambda: mlp("ones", [1, 1, 3]), (1, 2)),
    "lanes": (lambda: mlp("lanes", [64, 32, 16]), (8, 16)),   # whole tiles only
    # 300 = 18·16 + 12 lanes; the host runs OpenMP from batch 14 on (2^20 multiply-adds).
    "wide": (lambda: mlp("wide", [300, 257, 3]), (1, 33)),
    # Fewer params and a big batch (for the C harness's arrays): a kernel of 8448
    # multiply-adds per example, so the module's tiles call helpers, and OpenMP from
    # batch 125 on.
    "batch": (lambda: mlp("batch", [48, 176, 3]), (139,)),
    "contract": (contractions, (1, 4, 9)),
    # 9 and 5 channels: tiles of 8 (16 accumulators) or 4 (8) rows, then one row.
    "conv9": (lambda: conv_rows("conv9", 9), (1, 3)),
    "conv5": (lambda: conv_rows("conv5", 5), (2,)),
    "depthwise": (depthwise, (1, 3)),
    "shifted": (shifted, (1, 5)),
    "pooled": (pooled, (1, 59)),   # odd, past every plain kernel's team (57)
}


@pytest.mark.parametrize("target", ["c99", "host"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocked_kernels_against_reference(name, dtype, target, assert_close):
    make, batches = MODELS[name]
    graph = make()
    model = compile_strict(graph, dtype, target=target)   # the review flags, -Werror
    if target == "c99" or name in ("wide", "batch"):
        assert ("#pragma omp" in model.cmodule.source) == (target == "host")
    _check_against_reference(model, name, target, dtype, batches, assert_close)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["primes", "wide", "batch", "contract"])
def test_host_tiles_for_avx2_against_reference(name, dtype, assert_close, monkeypatch, tmp_path):
    """The host's tiles as an AVX2 machine gets them (32-byte vectors), built here with this
    machine's flags: other lane counts, chunks and helpers, the same results."""
    monkeypatch.setenv("GRAPHC_HOST_VECTOR_BYTES", "32")
    # A cache of its own: these 32-byte modules are of no use to the other tests.
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    make, batches = MODELS[name]
    model = compile_strict(make(), dtype, target="host")
    # Accumulators of one vector; a tail chunk of lanes takes fewer than two.
    lanes = 32 // np.dtype(dtype).itemsize
    sizes = {int(k) for k in re.findall(r"(?:float|double) c\d+\[(\d+)\]", model.cmodule.source)}
    assert lanes in sizes and max(sizes) < 2 * lanes
    _check_against_reference(model, name, "host/32", dtype, batches, assert_close)


def _check_against_reference(model, name: str, target: str, dtype: str, batches,
                             assert_close) -> None:
    ref = reference(model.graph)
    ref.set_params(model.get_params())
    for n in batches:
        data = sample_inputs(model.graph, n, seed=n)
        data = {k: v.astype(dtype).astype(np.float64) for k, v in data.items()}
        got, want = model.forward(**data), ref.forward(**data)
        for o in model.graph.outputs:
            assert_close(got[o], want[o], dtype, f"{name}/{target}: '{o}' at batch {n}")
        (loss, grads), (ref_loss, ref_grads) = model.gradients(**data), ref.gradients(**data)
        assert_close(loss, ref_loss, dtype, f"{name}/{target}: loss at batch {n}")
        assert grads.keys() == ref_grads.keys() == model.graph.trainable_params.keys()
        for p in grads:
            assert_close(grads[p], ref_grads[p], dtype, f"{name}/{target}: d{p} at batch {n}")


@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_a_short_last_chunk_runs_as_a_whole_one_ending_at_the_row(vector_bytes, monkeypatch):
    """63 positions in chunks of 2 vectors: the last chunk is a whole one from 63 - width
    (its values are checked in test_blocked_kernels_against_reference), not a short one."""
    monkeypatch.setenv("GRAPHC_HOST_VECTOR_BYTES", str(vector_bytes))
    _, cm = graphc.generate(shifted(), "float32", target="host")
    prog = cm.entries["forward"].program
    (call,) = [c for c, k in zip(cm.calls["forward"], prog.kernels)
               if k.node == "a" and k.mode == "sum"]
    fn = cm.functions[call.function]   # with its `_tiles` body
    width = 2 * vector_bytes // 4
    assert f"tile8x{width}_fma(K + 16*i1_t, 16, 1, x + 1008*b + {63 - width}, 63, 16, " \
        f"a + 1512*b + 63*i1_t + {63 - width}, 63);" in " ".join(fn.split()), fn
    assert {int(k) for k in re.findall(r"\bl < (\d+);", fn)} == {width}, fn


def test_tiling_chooses_lanes_by_stride():
    """y = x·Wᵀ sums lanes of its reduction (W[o, i] is not unit-stride along o); dW and dx
    put lanes on their output's unit-stride axis; no SIMD width, or a call in the body
    (nothing a compiler vectorizes), keeps the plain loops."""
    prog = fuse(derive(mlp("m", [37, 19, 5])).gradients)
    dense = next(k for k in prog.kernels if k.out == "h0")
    t = tiling(dense, _strides(dense, prog.buffers), 16, 4)
    assert t.reduce_lanes and str(t.lane) == str(dense.reduction_loops()[0])
    assert t.lanes == 4 and len(t.tiles) == 2
    # 37 terms are fewer than four 16-lane vectors: the lanes' final sum would not pay.
    assert tiling(dense, _strides(dense, prog.buffers), 64, 4) is None
    dW = next(k for k in prog.kernels if k.out == "W0.grad")
    t = tiling(dW, _strides(dW, prog.buffers), 64, 4)
    assert not t.reduce_lanes and t.lane == dW.out_index[-1] and t.chunks == 2
    dx = next(k for k in prog.kernels if k.out == "h0.grad")
    t = tiling(dx, _strides(dx, prog.buffers), 16, 8)
    assert not t.reduce_lanes and t.lane == dx.out_index[-1] and t.lanes == 2
    assert tiling(dW, _strides(dW, prog.buffers), 0, 4) is None
    sumexp = next(k for k in prog.kernels if k.out == "loss.sumexp")
    assert tiling(sumexp, _strides(sumexp, prog.buffers), 64, 4) is None  # exp(...)


def test_helpers_are_shared_emitted_once_and_chosen_by_module_size():
    """A big module sums every product tile in shared helpers (one definition each); a
    small one keeps its batch-1 tails and batch-summed tiles inline."""
    helper = re.compile(r"^static void ((?:dot|tile)\w+)\(.*?^}\n", re.M | re.S)
    _, big = graphc.generate(MODELS["wide"][0](), "float32", target="host")
    names = helper.findall(big.source)
    assert {n.split("_")[0][:3] for n in names} == {"dot", "til"}
    assert len(names) == len(set(names))
    assert "c0[l] +=" not in helper.sub("", big.source)   # no inline tile left
    _, small = graphc.generate(MODELS["primes"][0](), "float32", target="host")
    assert helper.findall(small.source) and "c0[l] +=" in helper.sub("", small.source)


# examples/tiny (the MLPerf Tiny models) has budgeted tests of its own: tests/test_tiny.py.
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                  if p.parent != ROOT / "examples" / "tiny")


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_pragmas_only_on_the_host_and_guarded(spec):
    for target in TARGETS:
        for dtype in ("float32", "float64"):
            _, cm = generated(spec, dtype, target)
            lines = cm.source.splitlines()
            pragmas = [k for k, line in enumerate(lines) if line.startswith("#pragma")]
            if target != "host":
                assert not pragmas and "_OPENMP" not in cm.source, (spec.name, target)
            for k in pragmas:
                assert lines[k] in ("#pragma omp for schedule(static) nowait",
                                    "#pragma omp single nowait", "#pragma omp parallel")
                assert "#ifdef _OPENMP" in lines[k - 2:k], (spec.name, k)


def _write(cm, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{cm.name}.c").write_text(cm.source)
    (directory / f"{cm.name}.h").write_text(cm.header)
    return directory / f"{cm.name}.c"


@needs_cc
def test_host_c_without_openmp_compiles_strictly(tmp_path):
    """The host's C as a user compiles it without -fopenmp: the `#else` side of its
    parallel kernels under the review flags with -Werror. (With OpenMP, and the c99 text,
    each model is built under those flags by test_blocked_kernels_against_reference.)"""
    sources = []
    for name, (make, _) in sorted(MODELS.items()):
        _, cm = graphc.generate(make(), "float32", target="host")
        if "#pragma omp" in cm.source:
            sources.append(_write(cm, tmp_path / name).relative_to(tmp_path))
    assert len(sources) >= 2, "no model of MODELS runs OpenMP any more"
    r = subprocess.run([CC, *CHECK_FLAGS, "-O2", "-c", *map(str, sources)], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr


@pytest.mark.skipif(not B._is_gcc(B.c_compiler()) or shutil.which("nm") is None,
                    reason="GCC's loop distribution, read with nm")
def test_graphc_s_gcc_build_turns_no_loop_into_a_library_call(tmp_path):
    """GCC rewrites a tile's zeroing and storing loops as memset and memcpy calls once it
    knows the caller's strides; its sums then live in memory, loaded and stored at every
    product (ResNet-8's forward at batch 64: 86 ms of one Zen 1 core, 64 ms without)."""
    host = get_target("host")
    for name in ("lanes", "conv9"):
        _, cm = graphc.generate(MODELS[name][0](), "float32", target="host")
        source = _write(cm, tmp_path / name)
        r = subprocess.run([*B.c_compiler(), *B.compile_flags(), *host.build_flags, "-c",
                            source.name, "-o", "model.o"], cwd=source.parent,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        undefined = subprocess.run(["nm", "-u", "model.o"], cwd=source.parent, check=True,
                                   capture_output=True, text=True).stdout.split()
        assert not {"memset", "memcpy", "memmove"} & set(undefined), (name, undefined)


@pytest.mark.skipif(shutil.which("cppcheck") is None, reason="cppcheck not installed")
def test_cppcheck_finds_nothing_in_blocked_kernels(tmp_path):
    sources = []
    for target in ("c99", "host"):
        for name in ("primes", "contract"):
            _, cm = graphc.generate(MODELS[name][0](), "float32", target=target)
            sources.append(str(_write(cm, tmp_path / f"{target}_{name}")))
    r = subprocess.run(["cppcheck", "--std=c99", "--enable=warning,style,performance,portability",
                        "--suppress=unusedFunction", "--suppress=missingIncludeSystem",
                        "--error-exitcode=1", "-q", *sources], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def _run_harness(graph, target: str, n: int, flags: list[str], tmp_path: Path,
                 env: dict | None = None, runs=({},)) -> list[str]:
    """The harness's printed output, one per run environment in `runs`."""
    graph, cm = graphc.generate(graph, "float32", target=target)
    src = _write(cm, tmp_path)
    inputs = sample_inputs(graph, n, seed=1)
    (tmp_path / "main.c").write_text(harness(cm, initial_params(graph, cm), inputs,
                                             train_steps=2))
    build = subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", *flags, "main.c",
                            src.name, "-o", "prog", "-lm"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr
    outs = []
    for extra in runs:
        run = subprocess.run(["./prog"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, **(env or {}), **extra})
        assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr
        outs.append(run.stdout)
    return outs


@needs_cc
@pytest.mark.parametrize("target", ["c99", "host"])
def test_sanitizers_on_every_tail(target, tmp_path, assert_close):
    """Every tail of the tiles, and n = 0, under AddressSanitizer and UBSan (host with
    OpenMP on 2 threads), each entry point's values against the reference."""
    flags = ["-fopenmp"] if target == "host" else []
    names = ("primes", "batch", "contract", "depthwise", "shifted", "pooled")
    models = {name: Sweep(MODELS[name][0](), target) for name in names}
    builds = {name: start_build(models[name], tmp_path / name, (0,) + MODELS[name][1], flags)
              for name in names}
    for name in names:
        run_and_check(models[name], tmp_path / name, builds[name], assert_close,
                      (0,) + MODELS[name][1], env={"OMP_NUM_THREADS": "2"})


@pytest.mark.parametrize("name", ["primes", "lanes", "conv9", "depthwise", "shifted"])
def test_an_example_gets_the_same_bits_alone_and_in_a_batch(name):
    """Whole tiles (helpers) and tails (inline) sum each output in one order, and add
    its products alike (fused on an FMA host): an example's outputs do not depend on the
    batch around it or on where in it it sits."""
    model = compile_strict(MODELS[name][0](), "float32", target="host")
    products = re.findall(r"c\d+\[l\] (?:= fmaf\(|\+= )", model.cmodule.source)
    assert products   # the tiles accumulate (fused or not, by this machine's target)
    data = sample_inputs(model.graph, 11, seed=3)
    together = model.forward(**data)
    for i in (0, 7, 8, 10):   # in the first tile, its last row, the next, the tail
        alone = model.forward(**{k: v[i:i + 1] for k, v in data.items()})
        for o in model.graph.outputs:
            np.testing.assert_array_equal(alone[o][0], together[o][i], f"{name}: {o}[{i}]")


@needs_cc
@pytest.mark.parametrize("name", ["batch", "pooled"])
def test_openmp_results_do_not_depend_on_the_thread_count(name, tmp_path):
    """A static schedule of whole outputs: 1, 2 or 3 threads give the same bits (outputs,
    gradients, and params after two SGD steps), the tiles' and the plain loops' shared out
    by example (pooled)."""
    make, batches = MODELS[name]
    outs = _run_harness(make(), "host", batches[-1], ["-O2", "-march=native", "-fopenmp"],
                        tmp_path, runs=[{"OMP_NUM_THREADS": str(t)} for t in (1, 2, 3)])
    assert outs[0] == outs[1] == outs[2]
    assert "#pragma omp" in graphc.generate(make(), target="host")[1].source


def test_plain_loops_are_shared_out_by_example_where_each_writes_its_own():
    """The padded copy, relu's map and its gradient, the pooling, its argmax, its
    gradient's zeroing and scatter, and flatten's copy write an example's outputs from
    its own inputs: OpenMP shares out their loop over the examples, from the batch where
    their outputs (16 multiply-adds' worth each, and a reduction's iterations) reach the
    host's 2^20. The c99 text has no pragma."""
    _, cm = graphc.generate(pooled(), "float32", target="host")
    teams = dict(re.findall(r"static void (\w+)\(size_t n[^{]*\{\n#ifdef _OPENMP\n"
                            r"    if \(n >= (\d+)\)", cm.source))
    shared = re.findall(r"static void (\w+)_examples\(", cm.source)
    # 4·26·26 copied, 8·24·24 mapped or scattered, 8·12·12 windows of 4, 1152 copied
    assert {f: int(teams[f]) for f in shared} == {
        "x_pad_forward": 25, "a_forward_2": 15, "p_forward": 46, "p_argmax_forward": 46,
        "f_forward": 57, "a_grad": 15, "a_grad_2": 15, "c_grad": 15}
    for f in shared:   # the loop shared out is the examples', outermost
        body = cm.source.split(f"static void {f}_examples(", 1)[1].split("\n}\n", 1)[0]
        assert re.search(r"#pragma omp for schedule\(static\) nowait\n#endif\n"
                         r"    for \(size_t (\w+) = 0; \1 < n; \+\+\1\) \{", body), body
    assert "_examples" not in graphc.generate(pooled(), "float32", target="c99")[1].source


# A 1 x 1 convolution with a batch-norm and relu epilogue on a 5 x 3 map: its rows are
# contiguous in the input and the output, so the tiles fill lanes along the 15 pixels, not
# the 3 of a row; the epilogue's per-channel factor g/sqrt(v + eps) is computed once per
# channel and tile, not once per lane.
POINTWISE = {
    "name": "pointwise",
    "inputs": {"x": [6, 5, 3], "y": [2]},
    "params": {"K": {"shape": [7, 6, 1, 1], "init": "he_normal"},
               "c": {"shape": [7], "init": "normal"},
               "g": {"shape": [7], "init": "uniform", "low": 0.5, "high": 2.0},
               "s": {"shape": [7], "init": "normal"},
               "m": {"shape": [7], "init": "normal", "trainable": False},
               "v": {"shape": [7], "init": "uniform", "low": 0.5, "high": 2.0,
                     "trainable": False},
               "W": {"shape": [2, 105], "init": "glorot_uniform"}},
    "nodes": {
        "p": {"op": "conv2d", "inputs": ["x", "K", "c"]},
        "nrm": {"op": "batch_norm", "inputs": ["p", "g", "s", "m", "v"]},
        "a": {"op": "relu", "inputs": ["nrm"]},
        "f": {"op": "flatten", "inputs": ["a"]},
        "logits": {"op": "dense", "inputs": ["f", "W"]},
        "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
    "outputs": ["logits"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.01},
}


def _lane_loops(text: str) -> list[str]:
    """The bodies of the `for (size_t l ...)` loops of a kernel's text, one per loop."""
    out, depth, body = [], 0, []
    for line in text.splitlines():
        if depth:
            depth += line.count("{") - line.count("}")
            body.append(line)
            if depth <= 0:
                out.append("\n".join(body))
                depth, body = 0, []
        elif "for (size_t l = 0;" in line:
            depth = line.count("{") - line.count("}")
            body = [line]
    return out


def test_pointwise_rows_fill_the_lanes_and_the_epilogue_is_hoisted():
    _, cm = graphc.generate(POINTWISE, "float32", target="c99")
    prog = cm.entries["forward"].program
    (fn,) = [cm.functions[c.function] for c, k in zip(cm.calls["forward"], prog.kernels)
             if k.node == "a" and k.mode == "sum"]
    # 15 pixels (5 x 3) as two whole tiles of 8, the second from pixel 7 (it writes pixel
    # 7 again); no short tile of 7, no loop along a row of 3
    assert "< 3;" not in fn and "l < 8;" in fn and "l < 7;" not in fn, fn
    assert re.search(r"x \+ \d+\*b \+ 7\b", fn), fn
    # the comment shows the kernel as the IR has it
    assert "a[b, i1, i3, i4] =" in fn, fn
    assert "sqrtf" in fn and not any("sqrtf" in body for body in _lane_loops(fn)), fn


@needs_cc
@pytest.mark.parametrize("target", ["c99", "host"])
def test_pointwise_under_sanitizers(target, tmp_path, assert_close):
    """Every entry point at n = 0, 1, 2 and 5 under ASan and UBSan against the reference
    (training batch norm's kernels too: they read the rows as one loop as well)."""
    model = Sweep(POINTWISE, target)
    batches = (0, 1, 2, 5)
    build = start_build(model, tmp_path, batches, ["-fopenmp"] if target == "host" else [])
    run_and_check(model, tmp_path, build, assert_close, batches, env={"OMP_NUM_THREADS": "2"})
