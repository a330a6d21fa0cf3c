"""The generated C: exact printer strings, determinism, strict compiles, sanitizers, goldens."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import graphc
from codegen.emit import common_subexpressions, schedule
from codegen.harness import harness, parse_output
from codegen.plan import EXTERNAL, plan
from codegen.printer import GraphcPrinter, prepare
from graphc.derive import derive
from graphc.ir import Buffer
from graphc.verify import sample_inputs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]
CC = os.environ.get("CC", "cc")


# ---------------------------------------------------------------- the printer

def _print(expr, dtype="float32"):
    x = Buffer("x", (3,), True)
    return GraphcPrinter(dtype, {"x": ("a1", x)}).doprint(prepare(expr))


def test_printer_follows_the_dtype():
    x = sp.IndexedBase("x")[sp.Symbol("b"), sp.Symbol("i0")]
    assert _print(sp.exp(x) + sp.tanh(x)) == "expf(a1[3*b + i0]) + tanhf(a1[3*b + i0])"
    assert _print(sp.exp(x), "float64") == "exp(a1[3*b + i0])"


def test_printer_writes_round_trip_digits_and_expands_small_powers():
    """The shortest digits that read back to the same value in the C type: 0.1 + 0.2 is
    0.3F as a float, and keeps all 17 digits as a double."""
    x = sp.IndexedBase("x")[sp.Symbol("b"), sp.Symbol("i0")]
    assert _print(sp.Float(repr(0.1 + 0.2), 17) * x) == "0.3F*a1[3*b + i0]"
    assert _print(sp.Float(repr(0.1 + 0.2), 17) * x, "float64") == \
        "0.30000000000000004*a1[3*b + i0]"
    assert _print(sp.Float(1e-8, 17) + x, "float64") == "a1[3*b + i0] + 1e-08"
    assert _print(x ** 2) == "a1[3*b + i0]*a1[3*b + i0]"
    assert _print(sp.Rational(1, 3) * x, "float64") == "(1.0/3.0)*a1[3*b + i0]"


def test_printer_writes_constants_as_literals():
    x = sp.IndexedBase("x")[sp.Symbol("b"), sp.Symbol("i0")]
    assert _print(x / sp.sqrt(sp.pi), "float64") == "a1[3*b + i0]/sqrt(3.141592653589793)"
    assert _print(sp.E * x) == "2.7182817F*a1[3*b + i0]"   # float32(e), shortest digits


def test_cse_and_power_expansion_keep_the_value():
    """Regression: expanding x**2 before cse turned 2·c·x·exp(-x²) into c·x²·exp(-x²)."""
    x = Buffer("x", (3,), True)
    c = Buffer("c", (3,), True)
    b, i = sp.Symbol("b"), sp.Symbol("i0")
    X, C = x.base[b, i], c.base[b, i]
    expr = 2 * sp.exp(-X ** 2) * C * X / (sp.sqrt(sp.pi) * sp.Symbol("n"))
    printer = GraphcPrinter("float64", {"x": ("a1", x), "c": ("a2", c)})
    temps, (value,) = common_subexpressions([expr], printer)
    assert not temps
    assert value == ("2*a2[3*b + i0]*a1[3*b + i0]*1.0/n*exp(-(a1[3*b + i0]*a1[3*b + i0]))"
                     "/sqrt(3.141592653589793)")


def test_printer_refuses_what_c_cannot_express():
    with pytest.raises(Exception, match="Unsupported by <class 'codegen.printer.GraphcPrinter'>: zeta"):
        _print(sp.zeta(sp.IndexedBase("x")[sp.Symbol("b"), sp.Symbol("i0")]))


# ---------------------------------------------------------------- text properties

@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_text_is_portable_and_heap_free(spec, dtype):
    _, cm = graphc.generate(spec, dtype)
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", cm.source)
    assert includes == ["math.h", "stddef.h", "stdint.h", f"{cm.name}.h"]
    assert re.findall(r"#include\s*<([^>]+)>", cm.header) == ["stddef.h"]
    code = re.sub(r"/\*.*?\*/", "", cm.source, flags=re.S)
    for word in ("malloc", "calloc", "free", "alloca", "printf"):
        assert not re.search(rf"\b{word}\b", code), word
    # No file-scope mutable state: every file-scope object would make the code non-reentrant.
    assert not re.search(r"^static\s+(?!void\b)[^(]*;", code, flags=re.M)
    if dtype == "float32":
        assert "double" not in code and not re.search(r"\b(exp|log|tanh)\(", code)


def test_same_spec_same_bytes_across_processes():
    """Hash randomisation must not reach the text (no set or id() order anywhere)."""
    script = ("import graphc,sys; _, cm = graphc.generate(sys.argv[1], 'float32'); "
              "sys.stdout.write(cm.source + cm.header)")
    outs = []
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.append(subprocess.run([sys.executable, "-c", script, str(ROOT / "examples/mlp.yaml")],
                                   capture_output=True, text=True, env=env, check=True).stdout)
    assert outs[0] == outs[1] == outs[2] and "mlp_gradients" in outs[0]


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_golden_files(spec):
    """Any byte change in an example's C is deliberate: regenerate with
    GRAPHC_UPDATE_GOLDEN=1 and review the diff."""
    _, cm = graphc.generate(spec, "float32")
    for suffix, text in ((".c", cm.source), (".h", cm.header)):
        path = GOLDEN / f"{spec.stem}{suffix}"
        if os.environ.get("GRAPHC_UPDATE_GOLDEN") == "1":
            path.write_text(text)
        assert path.exists(), f"missing golden file {path}; run with GRAPHC_UPDATE_GOLDEN=1"
        assert text == path.read_text(), f"{path.name} changed"


# ---------------------------------------------------------------- compiling it

@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strict_compile(spec, dtype, tmp_path):
    _, cm = graphc.generate(spec, dtype)
    (tmp_path / f"{cm.name}.c").write_text(cm.source)
    (tmp_path / f"{cm.name}.h").write_text(cm.header)
    r = subprocess.run([CC, *STRICT, "-O2", "-c", f"{cm.name}.c", "-o", "m.o"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_sanitizers_and_standalone_build_match_the_loaded_module(tmp_path):
    """The mlp example, outside Python, under AddressSanitizer and UBSan: no report, and
    the same numbers as the cffi module and the reference."""
    model = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float64", seed=3)
    inputs = sample_inputs(model.graph, n=5, seed=4)
    cm = model.cmodule
    (tmp_path / "mlp.c").write_text(cm.source)
    (tmp_path / "mlp.h").write_text(cm.header)
    (tmp_path / "main.c").write_text(harness(cm, model._params.flat, inputs))
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    build = subprocess.run([CC, *flags, "main.c", "mlp.c", "-o", "prog", "-lm"], cwd=tmp_path,
                           capture_output=True, text=True)
    if build.returncode and "asan" in build.stderr.lower():
        pytest.skip(f"sanitizer runtime unavailable: {build.stderr[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run(["./prog"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"))
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr
    got = parse_output(run.stdout)
    out = model.forward(**inputs)
    loss, grads = model.gradients(**inputs)
    np.testing.assert_allclose(got["logits"], out["logits"].ravel(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got["loss"], [loss], rtol=1e-13)
    flat = np.concatenate([grads[p].ravel() for p in model.graph.params])
    np.testing.assert_allclose(got["grads"], flat, rtol=1e-12, atol=1e-15)
    ref = graphc.reference(model.graph)
    ref.set_params(model.get_params())
    np.testing.assert_allclose(ref.loss(**inputs), loss, rtol=1e-12)


# ---------------------------------------------------------------- planning and scheduling

@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_memory_plan_never_overlaps_live_buffers(spec):
    _, cm = graphc.generate(spec, "float32")
    for entry in cm.entries.values():
        mem, prog = entry.memory, entry.program
        n = 3
        spans = {}
        for name, p in mem.places.items():
            start = (mem.fixed + p.offset * n) if p.batched else p.offset
            spans[name] = (start, start + p.size * (n if p.batched else 1), p.first, p.last)
            assert spans[name][1] <= mem.elements(n)
        names = sorted(spans)
        for a in names:
            for b in names:
                if a < b:
                    sa, sb = spans[a], spans[b]
                    alive_together = not (sa[3] < sb[2] or sb[3] < sa[2])
                    disjoint = sa[1] <= sb[0] or sb[1] <= sa[0]
                    assert disjoint or not alive_together, (a, b)
        assert mem.fixed <= mem.fixed_no_reuse and mem.per_example <= mem.per_example_no_reuse
        internal = {b for b, buf in prog.buffers.items() if buf.role not in EXTERNAL}
        assert internal == set(mem.places)


def test_reuse_saves_memory_on_a_deep_chain():
    b = graphc.Builder("chain")
    h = b.input("x", [32])
    b.input("c", [32])
    for k in range(6):
        w = b.param(f"W{k}", [32, 32])
        h = b.tanh(b.dense(h, w), name=f"a{k}")
    g = b.build(outputs=[h], loss=b.sum(b.mul(h, "c")))
    prog = derive(g).gradients
    mem = plan(prog)
    assert mem.per_example < mem.per_example_no_reuse / 2


def test_loop_order_streams_contiguous_memory():
    """dW[o, i] = Σ_b dy[b, o]·x[b, i]: zero, then accumulate with i innermost."""
    g = graphc.Graph.from_spec({"name": "d", "inputs": {"x": [8]}, "params": {"W": [4, 8]},
                                "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                                          "l": {"op": "sum", "inputs": ["h"]}},
                                "outputs": ["h"], "loss": "l"})
    prog = derive(g).gradients
    (kern,) = [k for k in prog.kernels if k.out == "W.grad"]
    order, strategy = schedule(kern, prog.buffers)
    assert strategy == "init" and order[-1] == kern.out_index[-1]
