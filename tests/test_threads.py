"""How graphc's host modules run OpenMP: the thread count a model is compiled with (by
default, one thread or all, whichever is lately faster), and the wait policy graphc gives
the runtime it loads (codegen/openmp.py)."""

import itertools
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc
from codegen import openmp
from codegen.openmp import FasterOfOneOrAll
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
    x = np.random.default_rng(0).standard_normal((12, 512)).astype(np.float32)
    models = {t: graphc.compile(WIDE, threads=t) for t in (None, 1, 3)}
    assert "#pragma omp parallel" in models[None].c_source   # the kernel runs in a team
    lib = models[None]._lib
    before = lib.omp_get_max_threads()
    lib.omp_set_num_threads(5)
    try:
        got = {t: m.forward(x=x)["h"] for t, m in models.items()}
        # again, through the C call (codegen/fastcall.c), which sets and restores the count
        assert [m._runs["forward"].__self__.threads for m in models.values()] == [0, 1, 3]
        for t in (1, 3):
            np.testing.assert_array_equal(models[t].forward(x=x)["h"], got[t])
            assert lib.omp_get_max_threads() == 5
        bound = models[1].bind("forward", x=x)
        bound()
        assert lib.omp_get_max_threads() == 5   # each call restored the caller's count
        # The default tries one thread and all (the caller's 5) in turn: every call of
        # either gives the same bits, and leaves the caller its count.
        default = models[None].bind("forward", x=x)
        for _ in range(12):
            default()
            np.testing.assert_array_equal(default.outputs["h"], got[1])
            assert lib.omp_get_max_threads() == 5
        (race,) = default.func.controller._races.values()
        assert all(race.per_example)   # both counts ran, and were timed
    finally:
        lib.omp_set_num_threads(before)
    for t in (1, 3):
        np.testing.assert_array_equal(got[t], got[None])
    np.testing.assert_array_equal(bound.outputs["h"], got[None])
    np.testing.assert_allclose(got[None], x @ models[None].get_params()["W"].T, rtol=1e-5,
                               atol=1e-5)


@needs_openmp
def test_train_steps_by_default_end_where_one_thread_ends():
    # The default switches counts between calls (trials): the params must not notice.
    spec = {**WIDE, "name": "wide_fit", "inputs": {"x": [512], "y": [512]},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W"]},
                      "loss": {"op": "mse", "inputs": ["h", "y"]}},
            "loss": "loss", "optimizer": {"name": "adam", "lr": 0.01}}
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((8, 512)).astype(np.float32) for _ in range(2))
    models = {t: graphc.compile(spec, threads=t) for t in (None, 1)}
    assert models[None].cmodule.parallel_from["train_step"] <= 8
    losses = {t: [m.train_step(x=x, y=y) for _ in range(12)] for t, m in models.items()}
    assert losses[None] == losses[1] and losses[1][-1] < losses[1][0]
    (race,) = models[None]._calls["train_step"].controller._races.values()
    assert all(race.per_example)   # steps ran on one thread and on all
    np.testing.assert_array_equal(models[None].get_params()["W"], models[1].get_params()["W"])


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
    print("after:", os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"))
""")


@needs_openmp
@pytest.mark.parametrize("user_policy, runtime_settings", [
    (None, ["OMP_WAIT_POLICY = 'PASSIVE'", "GOMP_SPINCOUNT = '1000'"]),
    ("active", ["OMP_WAIT_POLICY = 'ACTIVE'", "GOMP_SPINCOUNT = '30000000000'"])])
def test_graphc_starts_the_runtime_with_a_short_spin_unless_the_user_chose(user_policy,
                                                                          runtime_settings):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"   # libgomp prints its settings once, when it starts
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    done = subprocess.run([sys.executable, "-c", _LOAD.format(spec=WIDE)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # libgomp shows an unset policy as PASSIVE too; the spin count tells them apart: with
    # the policy unset it spins 300,000 rounds before sleeping, with graphc's 1,000
    for setting in runtime_settings:
        assert setting in done.stdout + done.stderr, done.stderr
    # graphc's settings lasted only while the runtime started: the environment is the user's
    assert f"after: {user_policy} None" in done.stdout


@needs_openmp
def test_the_batch_from_which_an_entry_runs_a_team_is_the_one_its_c_tests():
    model = graphc.compile(WIDE)
    # 512 x 512 multiply-adds an example: the host's 2^20 from a batch of 4; OpenMP shares
    # out tiles of 8 examples, so a team gives two threads work from 9 on (a tile and a
    # tail)
    assert model.cmodule.parallel_from == {"forward": 9}
    assert re.findall(r"if \(n >= (\d+)\) \{\n#pragma omp parallel", model.c_source) == ["9"]
    assert isinstance(model.bind("forward", batch=9).func.controller, FasterOfOneOrAll)
    # no parallel region: the C function itself, no Python between a bound call and C
    c_function = model._lib.wide_forward
    assert model.bind("forward", batch=8).func is c_function
    # Calls from Python on small inputs (no staging): a plan for a batch below the first
    # parallel region calls C without the timing wrapper.
    fan_out = graphc.compile({**WIDE, "name": "fan_out", "inputs": {"x": [64]},
                              "params": {"W": {"shape": [256, 64], "init": "he_normal"}}})
    assert fan_out.cmodule.parallel_from == {"forward": 64}
    assert hasattr(fan_out._calls["forward"], "controller")
    fan_out.forward(x=np.ones((3, 64), np.float32))
    ((n, _, _, call),) = fan_out._sizes["forward"].values()
    assert n == 3 and call.func is fan_out._lib.fan_out_forward
    # and the C call from Python (codegen/fastcall.c) serves just those batches
    assert fan_out._runs["forward"].__self__.direct_below == 64
    small = graphc.compile({**WIDE, "name": "narrow", "inputs": {"x": [8]},
                            "params": {"W": {"shape": [8, 8], "init": "he_normal"}}})
    assert small.cmodule.parallel_from == {}
    assert small.bind("forward", batch=4).func is small._lib.narrow_forward
    # predict runs the forward's kernels (with the params baked in): the same choice
    baked = graphc.compile(WIDE, params=model.get_params())
    assert baked.cmodule.parallel_from == {"forward": 9, "predict": 9}
    assert isinstance(baked.bind("predict", batch=9).func.controller, FasterOfOneOrAll)
    assert baked.bind("predict", batch=8).func is baked._lib.wide_predict


class _FakeRuntime:
    """OpenMP's count in the calling thread, and a clock that a call advances by what it
    costs on the count it runs with: the choice made by timing, without timing."""

    def __init__(self, every: int, cost: dict):
        self.count, self.cost, self.now, self.runs = every, cost, 0.0, []

    def omp_get_max_threads(self):
        return self.count

    def omp_set_num_threads(self, count):
        self.count = count

    def entry(self, n):
        self.runs.append(self.count)
        cost = self.cost["one" if self.count == 1 else "all"]
        if callable(cost):   # a cost that varies from call to call
            cost = cost()
        self.now += cost * n
        return n


@needs_openmp
def test_a_kernel_sharing_out_its_batch_loop_runs_no_team_for_one_example():
    """At batch 1 a convolution's shared loop (the batch's) has one iteration: a team would
    wake the other threads only to wait at the barrier."""
    conv = {"name": "conv_team", "inputs": {"x": [16, 32, 32]},
            "params": {"K": {"shape": [16, 16, 3, 3], "init": "he_normal"}},
            "nodes": {"c": {"op": "conv2d", "inputs": ["x", "K"], "padding": 1}},
            "outputs": ["c"]}
    model = graphc.compile(conv)
    # 16·16·9 multiply-adds at each of 32·32 pixels: 2.4 M an example, over a team's 2^20
    assert "for (size_t b = 0; b < n; ++b)" in model.c_source
    assert model.cmodule.parallel_from == {"forward": 2}
    # the padded copy of x first (16·34·34 elements an example, each worth 16 multiply-adds:
    # from 4 examples), then the convolution
    assert re.findall(r"if \(n >= (\d+)\) \{\n#pragma omp parallel", model.c_source) == \
        ["4", "2"]
    assert model.bind("forward", batch=1).func is model._lib.conv_team_forward
    assert isinstance(model.bind("forward", batch=2).func.controller, FasterOfOneOrAll)


def _race(monkeypatch, cost, calls, n=8, every=2, start=4):
    runtime = _FakeRuntime(every, cost)
    monkeypatch.setattr(openmp, "_clock", lambda: runtime.now)
    call = FasterOfOneOrAll(runtime, runtime.entry, 0, start).entry
    for _ in range(calls):
        assert call(n) == n
        assert runtime.count == every   # the caller's count, back after every call
    return runtime, call


def test_the_default_runs_on_all_threads_while_they_are_faster(monkeypatch):
    runtime, _ = _race(monkeypatch, {"all": 1.0, "one": 2.0}, 500)
    ones = runtime.runs.count(1)
    assert runtime.runs[:2] == [2, 2] and runtime.runs[2] == 1   # warm-up, then a trial
    assert 1 <= ones <= 500 // openmp.LAST_RETRY + 5   # trials only, ever rarer
    assert runtime.runs[-openmp.LAST_RETRY:].count(1) == 1   # at the longest interval


def test_the_default_moves_to_one_thread_when_one_is_faster_and_back(monkeypatch):
    runtime, call = _race(monkeypatch, {"all": 3.0, "one": 1.7}, 50)
    assert runtime.runs[-10:].count(1) >= 9          # beside a busy process
    runtime.cost = {"all": 1.0, "one": 1.7}          # the competitor has gone
    for _ in range(openmp.LAST_RETRY + 20):
        call(8)
    assert runtime.runs[-10:].count(2) >= 9
    # each batch size class keeps its own record: a batch of 100 starts on all threads
    runtime.runs.clear()
    call(100)
    assert runtime.runs == [2]


def test_a_trial_of_all_threads_is_judged_after_the_call_that_wakes_them(monkeypatch):
    """On all threads the first call after one on one thread is slow (the other threads
    wake, their caches cold), the next ones fast: judged on that first call, trials lost and
    the default stayed on one thread once a competitor had come and gone; taken for a stall
    after each trial of one thread, it started trials of one thread again."""
    runtime, call = _race(monkeypatch, {"all": 3.0, "one": 1.7}, 50)   # beside a competitor
    assert runtime.runs[-10:].count(1) >= 9
    woken = {"all": lambda: 3.0 if runtime.runs[-2] == 1 else 1.0, "one": 1.7}
    runtime.cost = woken                                                # it has gone
    for _ in range(openmp.LAST_RETRY + 20):
        call(8)
    assert runtime.runs[-10:].count(2) >= 9
    assert runtime.runs[-64:].count(1) <= 5   # one thread's trials only, ever rarer


def test_a_competitor_arriving_moves_the_default_to_one_thread_within_a_few_calls(
        monkeypatch):
    worst = 0
    for quiet in range(500, 500 + openmp.LAST_RETRY):   # every phase of the longest interval
        runtime, call = _race(monkeypatch, {"all": 1.0, "one": 1.7}, quiet)
        runtime.cost = {"all": 2.1, "one": 1.7}   # a busy process holds a core from now on
        runtime.runs.clear()
        for _ in range(40):
            call(8)
        worst = max(worst, runtime.runs.count(2))
    # the first slow call on all threads starts trials of one at once, not up to 64 calls
    # later (the call on all threads right after a trial of one wakes the others and is
    # not taken for a stall: one call more); after the switch all threads are only tried,
    # after 4, 8, 16 calls
    assert worst <= 11, worst


def test_all_threads_that_stall_every_third_call_do_not_win_by_their_lucky_calls(
        monkeypatch):
    # Fast while the competitor is parked, else a stall: 3.7 per example on average, where
    # one thread takes 1.7. With two wins to switch, trials of all switched to it in runs
    # (1,065 of the last 3,200 calls on all, 39 % above one thread's time).
    stalls = itertools.cycle([1.0, 1.0, 9.0])
    calls, n = 5000, 8
    runtime, _ = _race(monkeypatch, {"all": lambda: next(stalls), "one": 1.7}, calls, n=n)
    assert runtime.runs[-3200:].count(2) <= 200, runtime.runs[-3200:].count(2)
    assert runtime.now <= 1.1 * 1.7 * n * calls, runtime.now / (1.7 * n * calls)


def test_a_batch_below_the_parallel_one_goes_straight_to_c_and_one_thread_stays_one(
        monkeypatch):
    runtime, call = _race(monkeypatch, {"all": 1.0, "one": 2.0}, 20, n=3)
    assert runtime.runs == [2] * 20 and not call.controller._races   # nothing set, nothing timed
    runtime, call = _race(monkeypatch, {"all": 1.0, "one": 2.0}, 20, every=1)
    assert runtime.runs == [1] * 20   # the caller's one thread is "all"
