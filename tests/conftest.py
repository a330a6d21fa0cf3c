"""Shared test setup: a private build cache, and the C-versus-reference comparison.

The tolerance table and `assert_close` are handed out as session-scoped fixtures (not
imported from a module) so that every test file states its accuracy the same way. The rule
itself is graphc.verify's (TOLERANCES, within_tolerance): `graphc check` and the suite judge
the C alike.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

# dtype of the compiled model -> (rtol relative to the max |reference|, absolute floor).
from graphc.verify import TOLERANCES, within_tolerance


@pytest.fixture(scope="session", autouse=True)
def graphc_cache_dir(tmp_path_factory):
    """Builds go to a temporary cache unless $GRAPHC_CACHE_DIR is set (CI may set it);
    the suite never touches the user's cache."""
    preset = os.environ.get("GRAPHC_CACHE_DIR")
    if preset:
        yield preset
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n: one cache for all workers (their temp dirs share a parent), so that a
        # model built by one is loaded by the others; the cache's writes are atomic.
        shared = tmp_path_factory.getbasetemp().parent / "graphc-cache"
        shared.mkdir(exist_ok=True)
        path = str(shared)
    else:
        path = str(tmp_path_factory.mktemp("graphc-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHC_CACHE_DIR", path)
        yield path


def check_close(got, want, dtype: str, what: str) -> None:
    """max |got - want| <= max(rtol · max |want|, floor), with rtol and floor per dtype
    (graphc.verify.within_tolerance); both finite."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    assert np.all(np.isfinite(want)), f"{what}: the reference is not finite: {want}"
    assert np.all(np.isfinite(got)), f"{what}: not finite: {got}"
    ok, err, tol = within_tolerance(got, want, dtype)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    assert ok, (f"{what} ({dtype}): max abs error {err:.3g} > tolerance {tol:.3g} "
                f"(max |reference| {scale:.3g})\n got: {got}\nwant: {want}")


@pytest.fixture(scope="session")
def tolerances() -> dict[str, tuple[float, float]]:
    return TOLERANCES


@pytest.fixture(scope="session")
def assert_close():
    return check_close


# Warnings are errors for every model the op and numerics tests build: C that the suite
# runs has been compiled under the review flags every target's C must pass (CHECK_FLAGS:
# -Wconversion, -Wdouble-promotion, -Wshadow, ... with -Werror), which `graphc compile`
# checks too before writing.
from codegen.targets import CHECK_FLAGS as STRICT_FLAGS   # noqa: E402


def generated(spec, dtype: str = "float32", target: str = "c99"):
    """graphc.generate's (graph, CModule) for a spec file, once per process per dtype
    and target: generation is deterministic (test_codegen checks the bytes across
    processes), so the many tests that only read an example's text share one. Read it,
    never change it. A spec given as a dict or a graph is generated afresh."""
    if isinstance(spec, (str, os.PathLike)):
        return _generated(spec, dtype, target)
    import graphc
    return graphc.generate(spec, dtype, target=target)


@functools.lru_cache(maxsize=None)
def _generated(spec, dtype: str, target: str):
    import graphc
    return graphc.generate(spec, dtype, target=target)


def compile_strict(spec, dtype: str = "float32", *, target: str = "c99",
                   optimize: bool = True, **kwargs):
    """graphc.compile's model for `target` (the host's with -march=native and -fopenmp),
    its C built under STRICT_FLAGS (cached like any build); with optimize=False, at -O0
    (a sixth of the compile time; for tests that build the same text optimized in the
    other dtype too)."""
    import graphc
    from codegen.build import build
    from codegen.fastcall import glue
    from codegen.targets import get_target
    from graphc.model import CompiledModel
    graph, cm = graphc.generate(spec, dtype, target=target, **kwargs)
    tgt = get_target(target)
    built = build(graph.name, cm.source, cm.header, cm.cdef,
                  extra_flags=(*tgt.build_flags, *STRICT_FLAGS, *(() if optimize else ("-O0",))),
                  machine=tgt.machine,
                  glue=glue(cm))
    return CompiledModel(graph, cm, built)


# The suite's longest tests (10 to 25 s each on a quiet 2-core machine, `--durations`), run
# first: xdist's load scheduler hands out tests in collection order, and one of these
# started last keeps a worker busy while the other idles. Within a file the order stays.
LONGEST_FIRST = (
    "tests/test_batch_sizes.py::",
    "tests/test_differential.py::test_random_graph_matches_torch",
    "tests/test_embedded.py::test_cppcheck_finds_nothing",
    "tests/test_onnx.py::test_onnx_node_conformance_cases",
    "tests/test_tiny.py::test_mobilenet_forward_and_loss_against_the_reference",
    "tests/test_codegen.py::test_strict_compile",
    "tests/test_embedded.py::test_cross_compiles_warning_free",
    "tests/test_properties.py::test_c_gradients_equal_the_reference",
    "tests/test_numerics.py::test_every_pair_of_piecewise_ops_builds_strictly_and_matches",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))
