"""How graphc's host modules run OpenMP: the thread count a model is compiled with, and the
wait policy graphc gives the runtime it loads (codegen/openmp.py)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc
from codegen.targets import get_target
from graphc.errors import InputError

# A dense layer of 2^21 multiply-adds at batch 8: above the host target's parallel size.
WIDE = {"name": "wide", "inputs": {"x": [512]},
        "params": {"W": {"shape": [512, 512], "init": "he_normal"}},
        "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]}}, "outputs": ["h"]}

needs_openmp = pytest.mark.skipif("-fopenmp" not in get_target("host").build_flags,
                                  reason="the C compiler builds no OpenMP here")


@needs_openmp
def test_a_models_thread_count_changes_no_result_and_gives_the_caller_its_own_back():
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    models = {t: graphc.compile(WIDE, threads=t) for t in (None, 1, 3)}
    assert "#pragma omp parallel" in models[None].c_source   # the kernel runs in a team
    lib = models[None]._lib
    before = lib.omp_get_max_threads()
    lib.omp_set_num_threads(5)
    try:
        got = {t: m.forward(x=x)["h"] for t, m in models.items()}
        bound = models[1].bind("forward", x=x)
        bound()
        assert lib.omp_get_max_threads() == 5   # each call restored the caller's count
    finally:
        lib.omp_set_num_threads(before)
    for t in (1, 3):
        np.testing.assert_array_equal(got[t], got[None])
    np.testing.assert_array_equal(bound.outputs["h"], got[None])
    np.testing.assert_allclose(got[None], x @ models[None].get_params()["W"].T, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("threads, message", [
    (0, "threads must be None or an integer from 1 to 1024, got 0"),
    (True, "threads must be None or an integer from 1 to 1024, got True"),
    ("2", "threads must be None or an integer from 1 to 1024, got '2'")])
def test_a_thread_count_that_is_not_one_is_refused_before_any_build(threads, message):
    with pytest.raises(InputError, match=message):
        graphc.compile({"bad": "spec"}, threads=threads)


def test_threads_on_a_one_thread_target_is_refused():
    with pytest.raises(InputError, match=r"threads=2: model 'wide' was built without OpenMP "
                                         r"\(target 'c99'\), so it runs on one thread"):
        graphc.compile(WIDE, target="c99", threads=2)
    one = graphc.compile(WIDE, target="c99", threads=1)
    assert one.threads == 1
    with pytest.raises(AttributeError):   # fixed at compile: bound calls already hold it
        one.threads = 2


_LOAD = textwrap.dedent("""
    import os, graphc
    graphc.compile({spec!r})
    print("after:", os.environ.get("OMP_WAIT_POLICY"))
""")


@needs_openmp
@pytest.mark.parametrize("user_policy, runtime_policy", [(None, "PASSIVE"), ("active", "ACTIVE")])
def test_graphc_starts_the_runtime_passive_unless_the_user_chose(user_policy, runtime_policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "true"   # libgomp prints its settings once, when it starts
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    done = subprocess.run([sys.executable, "-c", _LOAD.format(spec=WIDE)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"OMP_WAIT_POLICY = '{runtime_policy}'" in done.stdout + done.stderr
    # graphc's setting lasted only while the runtime started: the environment is the user's
    assert f"after: {user_policy}" in done.stdout
