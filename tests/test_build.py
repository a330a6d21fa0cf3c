"""The cffi build and its content-addressed cache, on a tiny hand-written C model."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest

from codegen import build as B
from graphc.errors import GraphcError

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXT = sysconfig.get_config_var("EXT_SUFFIX")

HEADER = """\
#ifndef DEMO_H
#define DEMO_H
#include <stddef.h>
double demo_dot(const double *a, const double *b, size_t n);
#endif
"""
SOURCE = """\
#include "demo.h"

double demo_dot(const double *a, const double *b, size_t n)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        s += a[i] * b[i];
    }
    return s;
}
"""
CDEF = "double demo_dot(const double *a, const double *b, size_t n);"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty cache of its own; the user's cache is never touched."""
    path = tmp_path / "cache"
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(path))
    monkeypatch.delenv("GRAPHC_KEEP_SOURCES", raising=False)
    return path


def dot(result: B.BuildResult, a: np.ndarray, b: np.ndarray) -> float:
    ffi = result.ffi
    return result.lib.demo_dot(ffi.cast("double *", a.ctypes.data),
                               ffi.from_buffer("double[]", b), a.size)


def test_builds_and_computes():
    r = B.build("demo", SOURCE, HEADER, CDEF)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(100), rng.standard_normal(100)
    assert dot(r, a, b) == pytest.approx(float(a @ b), rel=1e-12)
    assert not r.cached and len(r.key) == 64
    assert pathlib.Path(r.path).name == f"_graphc_demo_{r.key[:16]}{EXT}"
    assert "-std=c99" in B.compile_flags()


def test_second_build_is_cached(cache, monkeypatch):
    first = B.build("demo", SOURCE, HEADER, CDEF)
    again = B.build("demo", SOURCE, HEADER, CDEF)
    assert again.cached and again.lib is first.lib and again.key == first.key
    # As a fresh process would: forget the loaded module; the file on disk is loaded, not rebuilt.
    monkeypatch.setattr(B, "_loaded", {})
    from_disk = B.build("demo", SOURCE, HEADER, CDEF)
    assert from_disk.cached and from_disk.path == first.path
    assert sorted(p.name for p in cache.iterdir()) == [pathlib.Path(first.path).name]


def test_cache_dir_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert B.cache_dir() == tmp_path / "xdg" / "graphc"
    r = B.build("demo", SOURCE, HEADER, CDEF)
    assert pathlib.Path(r.path).parent == tmp_path / "xdg" / "graphc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert B.cache_dir() == tmp_path / "home" / ".cache" / "graphc"


def test_changes_give_new_keys_and_modules():
    base = B.build("demo", SOURCE, HEADER, CDEF)
    doubled = B.build("demo", SOURCE.replace("return s;", "return 2.0 * s;"), HEADER, CDEF)
    flagged = B.build("demo", SOURCE, HEADER, CDEF, extra_flags=("-O1",))
    assert len({base.key, doubled.key, flagged.key}) == 3
    assert len({base.path, doubled.path, flagged.path}) == 3
    a = np.arange(4.0)
    assert dot(base, a, a) == 14.0 and dot(doubled, a, a) == 28.0 and dot(flagged, a, a) == 14.0


def test_strict_extra_flags_apply_to_the_model_only():
    # cffi's wrapper is not -Wpedantic clean; the model must be, and still builds.
    r = B.build("demo", SOURCE, HEADER, CDEF,
                extra_flags=("-Wall", "-Wextra", "-Wpedantic", "-Werror"))
    assert dot(r, np.ones(3), np.ones(3)) == 3.0
    with pytest.raises(B.CompileError, match="unused"):
        B.build("demo", SOURCE.replace("size_t i;", "size_t i; int unused;"), HEADER, CDEF,
                extra_flags=("-Wall", "-Werror"))


def test_keep_sources(cache, monkeypatch):
    monkeypatch.setenv("GRAPHC_KEEP_SOURCES", "1")
    r = B.build("demo", SOURCE, HEADER, CDEF)
    kept = cache / f"_graphc_demo_{r.key[:16]}.src"
    assert (kept / "demo.c").read_text() == SOURCE and (kept / "demo.h").read_text() == HEADER


def test_compile_error_is_readable(cache):
    broken = SOURCE.replace("s += a[i] * b[i];", "s += a[i] * b[i]")   # missing ';'
    with pytest.raises(B.CompileError) as info:
        B.build("demo", broken, HEADER, CDEF)
    message = str(info.value)
    assert isinstance(info.value, GraphcError)
    assert "demo.c" in message and "error" in message and "-std=c99" in message
    assert list(cache.iterdir()) == []   # the temporary build dir is gone


EXTENSION = """\
#include <Python.h>
static struct PyModuleDef demo = {PyModuleDef_HEAD_INIT, "_graphc_demo_ext", NULL, -1, NULL,
                                  NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__graphc_demo_ext(void)
{
    PyObject *m = PyModule_Create(&demo);
    if (m != NULL && PyModule_AddIntConstant(m, "answer", 42) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
"""


def test_graphcs_own_extension_is_built_once_per_cache_and_its_errors_are_readable(
        cache, monkeypatch):
    """build_extension (codegen/fastcall.c's builder): compiled once into the cache, then
    loaded from it (a fresh process finds it by a stat of the compiler); a compiler error
    names the module and leaves nothing behind."""
    first = B.build_extension("_graphc_demo_ext", EXTENSION, version="1")
    assert first.answer == 42 and B.build_extension("_graphc_demo_ext", EXTENSION,
                                                    version="1") is first
    (entry,) = cache.iterdir()
    assert entry.name.startswith("_graphc_demo_ext_") and entry.name.endswith(EXT)
    monkeypatch.setattr(B, "_loaded", {})   # as a fresh process: loaded, not built
    monkeypatch.setattr(B, "_build_extension", lambda *a: pytest.fail("built again"))
    assert B.build_extension("_graphc_demo_ext", EXTENSION, version="1").answer == 42
    monkeypatch.undo()
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(cache))
    with pytest.raises(B.CompileError, match=r"(?s)building graphc's _graphc_demo_bad.*nope"):
        B.build_extension("_graphc_demo_bad", "#error nope\n")
    assert [p.name for p in cache.iterdir()] == [entry.name]


# A child process: wait for the go file, so both children start building together, then build.
CHILD = textwrap.dedent("""
    import os, sys, time
    from codegen.build import build
    go = sys.argv[1]
    while not os.path.exists(go):
        time.sleep(0.005)
    r = build("demo", sys.argv[2], sys.argv[3], sys.argv[4])
    assert r.lib.demo_dot(r.ffi.new("double[]", [1, 2]), r.ffi.new("double[]", [3, 4]), 2) == 11
    print(r.key, r.cached)
""")


def test_concurrent_builders_both_succeed(tmp_path, cache):
    # A compiler that is slow to link makes sure both children find the cache empty and
    # really race to publish.
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text('#!/bin/sh\ncase " $* " in *" -shared "*) sleep 0.5;; esac\n'
                       'exec cc "$@"\n')
    slow_cc.chmod(0o755)
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(cache), "CC": str(slow_cc),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(go), SOURCE, HEADER, CDEF],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
                for _ in range(2)]
    go.touch()
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
    (key1, cached1), (key2, cached2) = (out.split() for out, _ in outputs)
    assert key1 == key2 and cached1 == cached2 == "False"   # both built: a real race
    assert sorted(p.name for p in cache.iterdir()) == [f"_graphc_demo_{key1[:16]}{EXT}"]


def test_written_files_follow_the_umask_and_leave_no_temporaries(tmp_path):
    """mkstemp stages files as 0600; the published files must be as open() would make them."""
    from codegen.files import write_all
    old = os.umask(0o022)
    try:
        write_all({tmp_path / "a.c": "int a;\n", tmp_path / "sub" / "b.bin": b"\x00\x01"})
    finally:
        os.umask(old)
    assert (tmp_path / "a.c").read_text() == "int a;\n"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE((tmp_path / "a.c").stat().st_mode) == 0o644
    assert not list(tmp_path.rglob(".*"))


# ---------------------------------------------------------------- prepared modules

TINY = {"name": "tiny", "inputs": {"x": [3], "y": [2]},
        "params": {"W": {"shape": [2, 3], "init": "he_normal"}, "c": {"shape": [2]}},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "c"]},
                  "loss": {"op": "softmax_cross_entropy", "inputs": ["h", "y"]}},
        "outputs": ["h"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1}}


def _fresh_process(monkeypatch):
    monkeypatch.setattr(B, "_loaded", {})


def test_warm_compile_skips_derivation_and_runs_the_same(cache, monkeypatch):
    import graphc
    import graphc.model
    first = graphc.compile(TINY, seed=3)
    assert not first.built.cached and len(list(cache.glob("_graphc_prepared_*.pickle"))) == 1
    _fresh_process(monkeypatch)

    def no_generation(*args, **kwargs):
        raise AssertionError("a warm compile must not derive and emit again")
    monkeypatch.setattr(graphc.model, "generate", no_generation)
    again = graphc.compile(TINY, seed=3)
    assert again.built.cached and again.built.path == first.built.path
    x, y = np.ones((2, 3)), np.eye(2)
    assert again.train_step(x=x, y=y) == first.train_step(x=x, y=y)
    np.testing.assert_array_equal(again.get_params()["W"], first.get_params()["W"])
    assert again.cmodule.entries["train_step"].program is None   # the runtime needs no kernels
    assert again.cmodule.work_elements(5) == first.cmodule.work_elements(5)


@pytest.mark.parametrize("change", [
    {"dtype": "float64"}, {"optimizer": {"name": "adam"}}, {"target": "c99"},
    {"spec": {**TINY, "nodes": {**TINY["nodes"], "h": {"op": "dense", "inputs": ["x", "W"]}}}}])
def test_anything_that_changes_the_c_misses_the_prepared_cache(cache, change):
    import graphc
    graphc.compile(TINY)
    spec = change.pop("spec", TINY)
    other = graphc.compile(spec, **change)
    assert not other.built.cached
    assert len(list(cache.glob("_graphc_prepared_*.pickle"))) == 2


def test_a_damaged_prepared_entry_or_a_missing_module_is_rebuilt(cache, monkeypatch):
    import graphc
    first = graphc.compile(TINY)
    (entry,) = cache.glob("_graphc_prepared_*.pickle")
    entry.write_bytes(b"not a pickle")
    _fresh_process(monkeypatch)
    assert graphc.compile(TINY).built.cached            # regenerated, the .so reused
    os.unlink(first.built.path)
    _fresh_process(monkeypatch)
    rebuilt = graphc.compile(TINY)
    assert not rebuilt.built.cached and os.path.exists(rebuilt.built.path)


WARM_CHILD = r"""
import json, sys
import numpy as np
import graphc
spec = json.loads(sys.argv[1])
model = graphc.compile(spec, seed=3)
loss = model.train_step(x=np.ones((2, 3)), y=np.eye(2))
heavy = ["codegen.emit", "codegen.printer", "codegen.tiles", "graphc.derive",
         "sympy.codegen.rewriting", "sympy.printing.c", "cffi"]
print(json.dumps({"cached": model.built.cached, "loss": loss,
                  "imported": [m for m in heavy if m in sys.modules]}))
"""


def test_a_warm_compile_in_a_fresh_process_imports_no_emitter(cache):
    """The prepared entry unpickles from light modules (codegen/cmodule.py, codegen/plan.py):
    a warm compile does not import the emitter, the printer, SymPy's code rewriting or
    cffi's builder, which cost a fresh process more than everything else it does."""
    import json

    import graphc
    loss = graphc.compile(TINY, seed=3).train_step(x=np.ones((2, 3)), y=np.eye(2))
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", WARM_CHILD, json.dumps(TINY)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["cached"] and out["imported"] == []
    assert out["loss"] == loss


def test_the_module_description_keeps_its_old_import_path():
    from codegen import cmodule, emit
    assert emit.CModule is cmodule.CModule and emit.Entry is cmodule.Entry


def test_the_source_fingerprint_sees_every_edit_below_a_package(tmp_path, monkeypatch, request):
    """Even a same-size edit that kept its mtime (a copied tree) changes the fingerprint."""
    import graphc
    request.addfinalizer(B._source_fingerprint.cache_clear)   # not the tmp tree's, later
    pkg = tmp_path / "graphc"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "__pycache__" / "a.py").write_text("ignored\n")
    (pkg / "notes.txt").write_text("ignored\n")
    assert sorted(os.path.relpath(p, pkg) for p in B._sources(str(pkg))) == [
        "__init__.py", os.path.join("sub", "b.py")]
    monkeypatch.setattr(graphc, "__file__", str(pkg / "__init__.py"))

    def fingerprint():
        B._source_fingerprint.cache_clear()
        return B._source_fingerprint()

    before = fingerprint()
    path = pkg / "sub" / "b.py"
    st = path.stat()
    path.write_text("y = 3\n")                                   # same size ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))          # ... same mtime
    assert fingerprint() != before
    (pkg / "__pycache__" / "a.py").write_text("still ignored\n")
    after = fingerprint()
    assert fingerprint() == after
