"""The generated C: exact printer strings, determinism, strict compiles, sanitizers, goldens."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import sympy as sp

import graphc
from codegen import firmware
from codegen.cnames import buffer_word
from codegen.emit import common_subexpressions, schedule
from codegen.harness import harness, parse_output
from codegen.plan import EXTERNAL, plan
from codegen.printer import GraphcPrinter, prepare
from codegen.targets import CHECK_FLAGS, get_target
from graphc.derive import derive
from graphc.ir import Buffer
from graphc.verify import sample_inputs

from conftest import compile_strict, generated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"
STRICT = list(CHECK_FLAGS)
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


def test_printer_keeps_every_value_in_the_real_type():
    """Regressions, both caught by -Wconversion/-Wdouble-promotion: sign(x)'s branches were
    int literals (an int expression meeting a real), and a double's -oo was C's float
    INFINITY (a promotion)."""
    x = sp.IndexedBase("x")[sp.Symbol("b"), sp.Symbol("i0")]
    sign = sp.Piecewise((1, x > 0), (-1, x < 0), (0, True))
    assert _print(sign * x) == ("((a1[3*b + i0] > (float)(0)) ? (1.0F) : ((a1[3*b + i0] < "
                                "(float)(0)) ? (-1.0F) : (0.0F)))*a1[3*b + i0]")
    assert _print(sp.Piecewise((x, x > 0), (-sp.oo, True)), "float64") == \
        "((a1[3*b + i0] > (double)(0)) ? (a1[3*b + i0]) : (-HUGE_VAL))"
    assert _print(-sp.oo) == "-INFINITY"


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
    assert value == ("2*a2[3*b + i0]*a1[3*b + i0]*exp(-(a1[3*b + i0]*a1[3*b + i0]))"
                     "/sqrt(3.141592653589793)/n")


def test_printer_refuses_what_c_cannot_express():
    with pytest.raises(Exception, match="Unsupported by <class 'codegen.printer.GraphcPrinter'>: zeta"):
        _print(sp.zeta(sp.IndexedBase("x")[sp.Symbol("b"), sp.Symbol("i0")]))


# ---------------------------------------------------------------- text properties

@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_text_is_portable_and_heap_free(spec, dtype):
    _, cm = generated(spec, dtype)
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", cm.source)
    assert includes == ["math.h", "stddef.h", "stdint.h", f"{cm.name}.h"]
    # <stdint.h> only for the int32_t of an input of indices
    assert re.findall(r"#include\s*<([^>]+)>", cm.header) == \
        ["stddef.h"] + ["stdint.h"] * bool(cm.input_dtypes)
    code = re.sub(r"/\*.*?\*/", "", cm.source, flags=re.S)
    for word in ("malloc", "calloc", "free", "alloca", "printf"):
        assert not re.search(rf"\b{word}\b", code), word
    # No file-scope mutable state: every file-scope object would make the code non-reentrant.
    assert not re.search(r"^static\s+(?!void\b)[^(]*;", code, flags=re.M)
    if dtype == "float32":
        assert "double" not in code and not re.search(r"\b(exp|log|tanh)\(", code)


def test_codegen_reads_only_the_ir_contract():
    """Data flows one way: the emitter imports, of graphc, only the IR (and the functions
    its formulas may call) and the errors it raises; never the graph, derivation or model."""
    script = ("import sys, codegen.emit; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'graphc'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == ("['graphc', 'graphc.dtypes', 'graphc.errors', 'graphc.functions', "
                           "'graphc.ir']"), out


def _imports(tree, module: str, modules: dict) -> tuple[set, set]:
    """(module-level, function-local) graphc/codegen modules that `module` imports. Names
    imported from a package (not its submodules) need the package's __init__."""
    package = module if modules[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    top, local = set(), set()
    at_top = {node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{source}.{a.name}" for a in node.names} & set(modules)
            found = subs | ({source} if len(subs) < len(node.names) else set())
        else:
            continue
        (top if node in at_top else local).update(found & set(modules) - {module})
    return top, local


def test_no_function_local_import_hides_a_cycle():
    """An import inside a function is only for load time (the CLI's --help, cffi), never to
    break a cycle: the imports of graphc and codegen, module-level and local alike, form no
    cycle (a local import that closed one would fail at module level)."""
    modules = {}
    for path in [*(ROOT / "graphc").rglob("*.py"), *(ROOT / "codegen").rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        top, inner = _imports(ast.parse(path.read_text()), name, modules)
        graph.add_edges_from((name, t) for t in top | inner)
    assert not list(nx.simple_cycles(graph))


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


@pytest.mark.parametrize("target", ["c99", "cortex-m4"])
@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_golden_files(spec, target):
    """Any byte change in an example's C is deliberate: regenerate with
    GRAPHC_UPDATE_GOLDEN=1 and review the diff. The Cortex-M4 float32 files are the C
    that ships to a microcontroller."""
    _, cm = generated(spec, "float32", target)
    stem = spec.stem if target == "c99" else f"{spec.stem}.{target}"
    for suffix, text in ((".c", cm.source), (".h", cm.header)):
        path = GOLDEN / f"{stem}{suffix}"
        if os.environ.get("GRAPHC_UPDATE_GOLDEN") == "1":
            path.write_text(text)
        assert path.exists(), f"missing golden file {path}; run with GRAPHC_UPDATE_GOLDEN=1"
        assert text == path.read_text(), f"{path.name} changed"


# ---------------------------------------------------------------- compiling it

# The Cortex-M text is compiled under these flags by arm-none-eabi-gcc itself
# (test_embedded.test_cross_compiles_warning_free); the host compiler checks it only where
# the cross compiler is missing.
_cross_checked = pytest.mark.skipif(firmware.missing_tools(run=False) is None,
                                    reason="the cross compiler checks the Cortex-M C")


@pytest.mark.parametrize("target", ["c99", "host", pytest.param("cortex-m4",
                                                                marks=_cross_checked)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strict_compile(target, dtype, tmp_path):
    """Every example under the review flags (-Wconversion -Wdouble-promotion -Wshadow
    -Wcast-qual among them) with -Werror, the host's with OpenMP too."""
    sources = []
    for spec in [*EXAMPLES, ROOT / "examples/digits/spec.yaml"]:
        _, cm = generated(spec, dtype, target)
        (tmp_path / f"{cm.name}.c").write_text(cm.source)
        (tmp_path / f"{cm.name}.h").write_text(cm.header)
        sources.append(f"{cm.name}.c")
    extra = ["-fopenmp"] if target == "host" else []
    r = subprocess.run([CC, *STRICT, *extra, "-O2", "-c", *sources], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr


@pytest.mark.parametrize("target", ["c99", "host", "cortex-m4"])
def test_text_a_reviewer_reads(target):
    """ASCII, lines of at most 100 characters, kernels named after what they compute and
    their arguments after their buffers, params addressed through the header's macros."""
    for spec in [*EXAMPLES, ROOT / "examples/digits/spec.yaml"]:
        for dtype in ("float32", "float64"):
            _, cm = generated(spec, dtype, target)
            for name, text in ((f"{cm.name}.c", cm.source), (f"{cm.name}.h", cm.header)):
                assert text.isascii(), name
                long = [line for line in text.splitlines() if len(line) > 100]
                assert not long, (name, long[0])
            kernels = re.findall(r"^static void (\w+)\(", cm.source, re.M)
            assert not [k for k in kernels if re.fullmatch(r"k\d+(_tiles)?", k)], kernels
            # A function serves identical kernels over other buffers too: its parameters
            # are named after the buffers of one of its calls.
            uses, params = {}, {}
            for call in (c for calls in cm.calls.values() for c in calls):
                uses.setdefault(call.function, set()).add(
                    tuple(buffer_word(b) for _, b, _ in call.arguments))
                params[call.function] = tuple(p.rstrip("_") for p, _, _ in call.arguments)
            assert all(params[f] in uses[f] for f in uses), (params, uses)
            assert not re.search(r"\bparams \+ \d", cm.source), name
            # a reciprocal is one division, never `a*1.0F/b`
            assert not re.search(r"\*1\.0F?/", cm.source), name
    _, cm = graphc.generate(ROOT / "examples/mlp.yaml", "float32", target=target)
    names = set(cm.functions)
    assert {"h1_forward", "logits_forward", "W1_grad", "b2_grad", "h1_grad"} <= names, names
    assert "static void adam_update(" in cm.source and "static void step_count(" in cm.source
    assert "W1_grad(n, grads + MLP_PARAM_W1_OFFSET, " in cm.source
    assert re.search(r"static void W1_grad\(size_t n, float \*restrict dW1, "
                     r"const float \*restrict dh1,\s+const float \*restrict x\)", cm.source)


CLASHING = {
    # Spec names that meet C's and the emitter's own: libm (`exp`), a <math.h> macro
    # (`NAN`), the batch size and loop index (`n`, `b`), locals (`acc`, `t0`), and a node
    # named as the model, whose kernel `clash_forward` would be the entry point's name;
    # `o` and `efault`, whose gradients' arguments would be the keywords `do` and `default`.
    "name": "clash",
    "inputs": {"n": [4], "b": [3]},
    "params": {"exp": {"shape": [3, 4]}, "NAN": {"shape": [3], "init": "normal"}},
    "nodes": {"acc": {"op": "dense", "inputs": ["n", "exp", "NAN"]},
              "o": {"op": "tanh", "inputs": ["acc"]},
              "efault": {"op": "mul", "inputs": ["o", "o"]},
              "t0": {"op": "sub", "inputs": ["efault", "b"]},
              "clash": {"op": "add", "inputs": ["t0", "o"]},
              "loss": {"op": "mse", "inputs": ["clash", "b"]}},
    "outputs": ["clash"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1},
}


def test_the_namer_keeps_clear_of_c_and_its_headers():
    from codegen.cnames import MAX_IDENTIFIER, Namer
    namer = Namer(["h1_forward"])
    got = [namer.take(w) for w in ("exp", "NAN", "size_t", "do", "INT8_MAX", "M_PI", "W1", "W1")]
    assert got == ["exp_", "NAN_", "size_t_", "do_", "v_INT8_MAX", "v_M_PI", "W1", "W1_"]
    assert [namer.take("h1_forward", numbered=True) for _ in range(2)] == \
        ["h1_forward_2", "h1_forward_3"]
    long = namer.take("x" * 70 + "_forward", numbered=True)
    assert len(long) <= MAX_IDENTIFIER and long.startswith("kernel")


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
def test_spec_names_never_clash_in_the_c(tmp_path):
    from codegen.build import check_strict
    for target in ("c99", "cortex-m4"):
        _, cm = graphc.generate(CLASHING, "float32", target=target)
        assert check_strict(cm.name, cm.source, cm.header, CHECK_FLAGS)
        assert "clash_forward_2" in cm.functions and "clash_forward" not in cm.functions
        params = {p for call in cm.calls["gradients"] for p, _, _ in call.arguments}
        assert {"n_", "exp_", "NAN_", "b_", "do_"} <= params, params
    assert graphc.compile(CLASHING, "float64").verify().ok


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_firmware_includes_the_header_and_links_the_c(tmp_path):
    """C++ sees C linkage: a C++ main calls the entry points of the C object file."""
    _, cm = graphc.generate(ROOT / "examples/mlp.yaml", "float32")
    (tmp_path / "mlp.c").write_text(cm.source)
    (tmp_path / "mlp.h").write_text(cm.header)
    (tmp_path / "main.cpp").write_text("\n".join([
        '#include <cstdio>', '#include <vector>', '#include "mlp.h"', "int main()", "{",
        "    std::vector<float> params(MLP_PARAMS_SIZE, 0.01f), work(MLP_WORK_SIZE(2));",
        "    std::vector<float> x(2 * MLP_INPUT_x_SIZE, 1.0f), y(2 * MLP_INPUT_y_SIZE, 0.1f);",
        "    std::vector<float> grads(MLP_PARAMS_SIZE), logits(2 * MLP_OUTPUT_logits_SIZE);",
        "    mlp_forward(params.data(), work.data(), 2, x.data(), logits.data());",
        "    float loss = mlp_gradients(params.data(), grads.data(), work.data(), 2, x.data(),",
        "                               y.data());",
        '    std::printf("%.6f %.6f\\n", (double)logits[0], (double)loss);', "    return 0;",
        "}", ""]))
    subprocess.run([CC, *STRICT, "-O1", "-c", "mlp.c", "-o", "mlp.o"], cwd=tmp_path, check=True)
    build = subprocess.run(["g++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "main.cpp",
                            "mlp.o", "-o", "prog", "-lm"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run(["./prog"], cwd=tmp_path, capture_output=True, text=True, check=True)
    model = graphc.compile(ROOT / "examples/mlp.yaml", "float32")
    model.set_params({p: np.full(v.shape, 0.01) for p, v in model.graph.params.items()})
    x, y = np.ones((2, 64)), np.full((2, 10), 0.1)
    logit, loss = (float(v) for v in run.stdout.split())
    assert logit == pytest.approx(float(model.forward(x=x)["logits"][0, 0]), rel=1e-5)
    assert loss == pytest.approx(model.gradients(x=x, y=y)[0], rel=1e-5)


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
    _, cm = generated(spec, "float32")
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


@pytest.mark.parametrize("target", ["c99", "host", "cortex-m4"])
@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_every_arena_offset_keeps_the_targets_alignment(spec, target):
    """Planned offsets, and the work pointers the entry bodies pass (train_step hands the
    gradients entry the arena behind the gradients), are multiples of the target's
    alignment, so a 64-byte aligned work array gives 64-byte aligned buffers."""
    _, cm = generated(spec, "float32", target)
    align = get_target(target).align
    for kind, entry in cm.entries.items():
        mem = entry.memory
        offsets = [entry.work_before, mem.fixed, mem.per_example]
        offsets += [p.offset for p in mem.places.values()]
        assert all(o % align == 0 for o in offsets), (kind, offsets)
    first = re.search(rf"^\w+ {cm.entries['forward'].c_name}\(", cm.source, re.M)
    entries = cm.source[first.start():]
    printed = [int(k) for k in re.findall(r"\bwork \+ (\d+)|(\d+) \* n\b", entries)
               for k in k if k]
    assert printed and all(k % align == 0 for k in printed), printed


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_each_kernel_runs_once_per_entry_point(spec):
    """No entry point repeats a computation: gelu's softmax output and its cross-entropy
    loss read one max and one sum of exponentials of the logits."""
    _, cm = generated(spec, "float32")
    for kind, entry in cm.entries.items():
        if kind in ("train_step", "predict"):
            continue   # they call other entry points
        body = re.search(rf"^\w+ {entry.c_name}\(.*?^}}", cm.source, re.M | re.S).group(0)
        body = re.sub(r",\n\s+", ", ", body)   # calls broken over lines, joined
        calls = re.findall(r"^    (\w+\(.*\));$", body, re.M)
        assert len(calls) == len(entry.program.kernels), (kind, calls)
        # The same text may recur for other buffers that the plan put at the same offsets
        # (flatten's copy forward, and its gradient's copy back): the same function on the
        # same buffers may not.
        work = [(c.function, tuple(b for _, b, _ in c.arguments)) for c in cm.calls[kind]]
        assert [c.text for c in cm.calls[kind]] == calls
        assert len(set(work)) == len(work), (kind, work)
    if cm.name == "gelu_net":
        kernels = cm.entries["evaluate"].program.kernels
        assert sum(k.mode == "max" for k in kernels) == 1, [k.out for k in kernels]


@pytest.mark.parametrize("target", ["c99", "host", "cortex-m4"])
def test_no_loop_runs_once_or_never(target):
    """A loop with a constant trip count of 0 or 1 is printed as its body (one tile, one
    chunk of lanes, a last term), and a 10-class sum keeps plain loops."""
    loop = re.compile(r"for \(size_t (\w+) = (\d+); \1 < (\d+); (?:\+\+\1|\1 \+= (\d+))\)")
    for spec in [*EXAMPLES, ROOT / "examples/digits/spec.yaml"]:
        _, cm = generated(spec, "float32", target)
        for m in loop.finditer(cm.source):
            start, stop, step = int(m[2]), int(m[3]), int(m[4] or 1)
            assert stop - start > step, f"{spec.stem}/{target}: {m[0]}"
    _, cm = graphc.generate(ROOT / "examples/mlp.yaml", "float32", target=target)
    sumexp_grad = re.search(r"^/\* loss: dloss/dloss.sumexp.*?^}", cm.source, re.M | re.S)[0]
    assert "[l]" not in sumexp_grad, sumexp_grad


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_fusion_records_which_derived_kernels_each_kernel_computes(spec):
    """`origins` partitions the derived program: explain finds every derived kernel's C
    function through it and the module's call map, without re-running fusion or reading C."""
    graph = graphc.load(spec)
    d = derive(graph)
    cm = graphc.generate(graph, "float32")[1]
    for kind, derived in (("forward", d.forward), ("evaluate", d.evaluation),
                          ("gradients", d.gradients)):
        fused = cm.entries[kind].program
        merged = sorted(i for origin in fused.origins for i in origin)
        assert merged == list(range(len(derived.kernels))), kind
        for kern, origin in zip(fused.kernels, fused.origins):
            if not origin:   # a padded copy, or a padded gradient's interior (codegen/padding.py)
                assert ".pad" in kern.out or ".pad" in kern.note, (kind, kern.out, kern.note)
                continue
            # a padded scatter computes its derived kernel into a padded copy of the target
            out = re.sub(r"\.pad\d*_*", "", kern.out)
            assert out in {derived.kernels[i].out for i in origin}, (kind, kern.out)
        assert [c.index for c in cm.calls[kind]] == list(range(len(fused.kernels)))


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


def test_packed_plan_meets_the_liveness_bound_where_first_use_order_did_not():
    """The digits CNN's train step on a Cortex-M (1-element alignment): first fit by first
    use left the arena 8 % above the liveness bound; largest first meets it, and the plan
    keeps the smaller of the two (tests/test_tiny.py pins MobileNetV1's forward pass)."""
    from codegen.plan import _first_fit
    from codegen.report import memory_report
    _, cm = graphc.generate(ROOT / "examples/digits_cnn.yaml", target="cortex-m4")
    step = memory_report(cm)["entries"]["train_step"]
    assert step["arena"] == step["live_peak"]
    mem = cm.entries["train_step"].memory
    batched = {n: p for n, p in mem.places.items() if p.batched}
    live = {n: [p.first, p.last] for n, p in batched.items()}
    size = {n: p.size for n, p in batched.items()}
    _, by_first_use = _first_fit(sorted(batched, key=lambda n: (live[n][0], -size[n], n)),
                                 size, live, 1)
    assert by_first_use > mem.per_example


@pytest.mark.parametrize("target", ["c99", "host"])
def test_a_read_that_a_unit_loop_cancels_is_no_argument(target):
    """mse(x, x) over an axis of one: inlined, its body (x[.., 0, ..] - x[.., i1, ..])² is 0
    once the loop of one iteration is gone, so the kernel reads nothing and takes no `x`
    (an argument never read broke -Werror: -Wunused-parameter; random graph seed 1044)."""
    spec = {"name": "unit_cancel", "inputs": {"x": [3, 1, 3]},
            "nodes": {"a": {"op": "elementwise", "inputs": ["x"], "expr": "x"},
                      "loss": {"op": "mse", "inputs": ["a", "x"]}},
            "outputs": ["a"], "loss": "loss"}
    model = compile_strict(spec, "float64", target=target)   # -Werror
    x = np.random.default_rng(0).standard_normal((5, 3, 1, 3))
    loss, outs = model.evaluate(x=x)
    np.testing.assert_array_equal(outs["a"], x)
    assert loss == 0
