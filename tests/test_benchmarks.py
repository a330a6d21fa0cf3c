"""The benchmark machinery (`python -m benchmarks`) in its quick mode, with NumPy as the only
peer: the table and JSON are written, every peer passes its check against graphc before it
is timed (quiet, then beside a busy competitor process), and the pure-C timing harness
compiles and runs. The convolutional peers (PyTorch, JAX, onnxruntime) are checked against
graphc at small batches, and fail their check at a perturbed param. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

import graphc
from benchmarks import charness, graphc_timing, machine
from benchmarks.__main__ import BUSY_LIMIT, _measure, main
from benchmarks.peers import Runner, Skip, load
from benchmarks.peers.graphc import C_TARGET, DEFAULT_TARGET, TARGETS, problem_file
from benchmarks.timing import Options, Timing, time_python
from benchmarks.workloads import CHECK_RTOL, WORKLOADS, ConvWorkload, check, problem
from codegen.targets import get_target


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = main(["--quick", "--workloads", "W1,W2", "--peers", "numpy", "--out", str(out)])
    return out, result


def test_quick_run_writes_table_and_json(quick, capsys):
    out, result = quick
    assert json.loads((out / "benchmarks.json").read_text()) == json.loads(json.dumps(result))
    text = (out / "benchmarks.md").read_text()
    for heading in ("## W1: MLP 64-32-10, batch 1, train step", "## W2: MLP 64-32-10, batch 1, forward"):
        assert heading in text
    assert f"| graphc {C_TARGET} (pure C) |" in text and "| NumPy |" in text
    m = result["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["graphc_flags"] == " ".join(charness.flags())
    if hasattr(os, "getloadavg"):   # 1, 5 and 15 minute averages; None where there are none
        assert len(m["load_average"]) == 3 and all(v >= 0 for v in m["load_average"])
    else:
        assert m["load_average"] is None
    assert set(result["versions"]) == {"graphc", "numpy"}


@pytest.mark.skipif("-fopenmp" not in get_target("host").build_flags,
                    reason="the C compiler builds no OpenMP here")
def test_graphc_rows_are_timed_on_graphc_s_own_openmp_runtime(tmp_path):
    """In `python -m benchmarks`'s process PyTorch's libgomp (spinning 300,000 rounds while
    idle) would be the runtime of every graphc module: the Python rows are timed by
    benchmarks/graphc_timing.py in a process of their own, where graphc starts it with its
    own short spin (libgomp's verbose display shows the spin count)."""
    w = WORKLOADS["W2"]
    prob = problem(w)
    data = problem_file(prob, tmp_path)
    argv, env = graphc_timing.command(data, "W2", "host", "bound", Options.quick())
    env["OMP_DISPLAY_ENV"] = "verbose"
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "GOMP_SPINCOUNT = '1000'" in done.stderr, done.stderr
    timing = Timing(**json.loads(done.stdout.splitlines()[-1]))
    assert 0 < timing.min <= timing.median and timing.repeats == Options.quick().repeats
    assert graphc_timing.timed_apart(data, "W2", "host", "python", Options.quick()).repeats == 3


@pytest.mark.parametrize("key", ["W1", "W2"])
def test_every_peer_checked_then_timed(quick, key):
    rows = {r["label"]: r for r in quick[1]["workloads"][key]["rows"]}
    graphc_rows = {f"graphc {t} ({how})" for t in TARGETS for how in ("Python", "bound call")}
    pure_c = {f"graphc {C_TARGET} (pure C)"} | \
        ({f"graphc {C_TARGET} (pure C, OMP_NUM_THREADS=1)"} if charness.threaded() else set())
    assert set(rows) == graphc_rows | pure_c | {"NumPy"}
    reference = rows[f"graphc {DEFAULT_TARGET} (Python)"]
    assert reference["reference"] and list(rows)[0] == reference["label"]
    for row in rows.values():
        assert "skipped" not in row, row
        assert row["check_rel_error"] <= CHECK_RTOL
        assert 0 < row["min_s"] <= row["median_s"]
        # timed again beside the competitor
        assert 0 < row["busy_min_s"] <= row["busy_median_s"]
        assert row["busy_ratio"] == pytest.approx(row["busy_median_s"] / row["median_s"])
        if row["peer"] == "graphc":
            assert row["busy_met"] == (row["busy_ratio"] <= BUSY_LIMIT)
    numpy = rows["NumPy"]
    assert numpy["vs"] == reference["label"] and numpy["speedup"] > 0
    bound = rows[f"graphc {DEFAULT_TARGET} (bound call)"]
    assert numpy["speedup_vs_bound"] == pytest.approx(numpy["median_s"] / bound["median_s"])
    assert numpy["busy_speedup"] == pytest.approx(numpy["busy_median_s"]
                                                  / reference["busy_median_s"])


def test_pure_c_harness_reports_first_calls_and_timing(tmp_path):
    """A hand-written entry point: the harness reads its data, reports `result` and the
    dumped array after calls 1 and 2, and times the call."""
    header = "void twice(const float *x, float *y, int n);\n"
    source = ('#include "tw.h"\nvoid twice(const float *x, float *y, int n)\n'
              "{\n    int i;\n    for (i = 0; i < n; ++i) {\n        y[i] = 2.0F * x[i];\n    }\n}\n")
    x = np.array([1.0, -2.5, 3.0], np.float32)
    p = charness.Program("tw", {"tw.c": source, "tw.h": header}, "tw.h", [("x", x)],
                         [("y", 3)], "twice(x, y, 3); result = y[0] + (float)it;", [("y", 3)])
    binary = charness.build(p, tmp_path / "tw")
    timing, calls = charness.run(p, binary, Options(repeats=3, min_repeat=0.0, warmup=0.0))
    np.testing.assert_array_equal(calls[0], [2.0, 2.0, -5.0, 6.0])
    np.testing.assert_array_equal(calls[1], [3.0, 2.0, -5.0, 6.0])
    assert timing.repeats == 3 and timing.calls >= 1 and 0 < timing.min <= timing.median


def test_overhead_benchmark_checks_the_harness_and_times_every_row_by_both_clocks(tmp_path):
    """benchmarks/overhead.py: the C harness (run once per clock, by the wall and by this
    thread's CPU time) matches model.forward before its rows are written."""
    from benchmarks import overhead
    result = overhead.main(["--quick", "--out", str(tmp_path)])
    assert set(result["rows"]) == {"pure C (harness)", "bound call", "model.forward(x=x)",
                                   "model.forward(x=a new array)",
                                   "cffi floor (np.empty, 2 from_buffer, C)"}
    for row in result["rows"].values():
        assert set(row) == {"cpu", "wall"}
        assert all(0 < t["min"] <= t["median"] for t in row.values())
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["rows"] == result["rows"]
    assert "| model.forward(x=x) |" in (tmp_path / "overhead.md").read_text()


def test_one_core_times_the_cases_asked_for(capsys):
    """benchmarks/one_core.py: one line per case named, a positive time per call."""
    from benchmarks import one_core
    one_core.main(["--cases", "w2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].split()[:4] == ["w2", "forward", "batch", "1"]
    assert float(lines[0].split()[4]) > 0
    with pytest.raises(SystemExit):
        one_core.main(["--cases", "w2,resnet9"])
    assert "unknown case resnet9 (cases: lenet5, resnet8," in capsys.readouterr().err


def test_machine_core_speed_is_a_rate():
    """benchmarks/machine.py: a 128² float32 product's GFLOP/s, within what a core does."""
    from benchmarks import machine
    assert 0.1 < machine.core_speed() < 1000


def test_a_peer_that_fails_its_check_is_not_timed():
    prob = problem(WORKLOADS["W1"])
    prob.expected = {"losses": [2.0, 1.5]}

    def never(opts):
        raise AssertionError("timed despite a failed check")
    wrong = Runner("wrong", "python", lambda: {"losses": [2.0, 1.6]}, never)
    row = _measure("wrong", wrong, prob, Options.quick())
    assert "check failed" in row["skipped"] and "median_s" not in row
    right = Runner("right", "python", lambda: {"losses": [2.0, 1.5]},
                   lambda opts: Timing(1e-6, 1e-6, 1, 1))
    assert _measure("right", right, prob, Options.quick())["median_s"] == 1e-6


def test_time_python_counts_calls():
    calls = []
    t = time_python(lambda: calls.append(1), Options(repeats=5, min_repeat=0.0, warmup=0.0))
    # one warm-up call, one calibration repeat of K = 1, then 5 repeats of K
    assert t.calls == 1 and t.repeats == 5 and len(calls) == 1 + 1 + 5


def test_quietly_keeps_the_quietest_attempt(monkeypatch):
    from benchmarks import machine
    loads = []

    class Load:   # others' load per attempt, as ForeignLoad would measure it
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.cores = loads.pop(0)
            return False
    monkeypatch.setattr(machine, "ForeignLoad", Load)
    runs = []

    def measure():
        runs.append(1)
        return len(runs)
    # busy on every attempt: all 1 + retries run, and the quietest (the 2nd) is kept
    loads[:] = [0.5, 0.2, 0.9]
    assert machine.quietly(measure, Options(retries=2, busy=0.1, pause=0.0)) == (2, 0.2, 3)
    # quiet enough on the 2nd attempt: no 3rd
    runs.clear()
    loads[:] = [0.5, 0.05, 0.9]
    assert machine.quietly(measure, Options(retries=2, busy=0.1, pause=0.0)) == (2, 0.05, 2)
    # no measurement of the load (not Linux): one attempt, whatever the limit
    runs.clear()
    loads[:] = [None]
    assert machine.quietly(measure, Options(retries=2, busy=-1.0, pause=0.0)) == (1, None, 1)


def test_foreign_load_is_measured_where_proc_stat_is():
    from benchmarks.machine import quietly
    _, load, attempts = quietly(lambda: time.sleep(0.05), Options(retries=2, busy=float("inf"),
                                                                 pause=0.0))
    assert attempts == 1
    if os.path.exists("/proc/stat"):
        assert isinstance(load, float) and 0 <= load < float("inf")
    else:
        assert load is None


def test_prep_runs_cold_then_warm_in_fresh_processes(tmp_path):
    """benchmarks/prep.py: a cold child builds, a warm one finds the build, and each also
    times a second compile of the same graph in its own process."""
    from benchmarks import prep
    cold = prep.run([4, 3], str(tmp_path))
    warm = prep.run([4, 3], str(tmp_path))
    assert not cold["cached"] and warm["cached"]
    for r in (cold, warm):
        assert r["c_bytes"] > 0 and r["again"] > 0 and r["compile"] > 0


def test_cnn_benchmark_checks_torch_then_times_every_peer(tmp_path):
    """benchmarks/cnn.py in its quick mode at one small batch: torch agrees with graphc
    (loss, gradients, params after a step) before anything is timed, every variant has a
    row, and the table is written. No timing is asserted."""
    pytest.importorskip("torch")
    from benchmarks import cnn
    result = cnn.run(Options.quick(), batches=(4,), competitor_pass=False, training=False)
    text = cnn.write(result, tmp_path)
    labels = [r["label"] for r in result["steps"]]
    assert {"graphc c99 (Python)", "graphc host (pure C)", "PyTorch eager, 1 thread"} <= set(labels)
    assert all(r["check"]["ok"] and 0 < r["min_s"] <= r["median_s"] for r in result["steps"])
    assert "| 4 | graphc c99 (bound call)" in text and (tmp_path / "cnn.json").exists()


def test_competitor_runs_beside_and_is_gone_after():
    with machine.competitor() as proc:
        assert proc.poll() is None   # running (busy) while the block runs
        pid = proc.pid
    assert proc.returncode is not None   # killed and reaped: no process left behind
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # beside it, the competitor's own core does not count as others' load
    assert machine.beside_competitor(Options(busy=0.25)).busy == 1.25


def test_a_workload_family_selects_every_batch(monkeypatch, tmp_path):
    """`--workloads W6` is W6.1 and W6.64 (nothing is run: the workload runner is stubbed)."""
    import benchmarks.__main__ as bench
    seen = []
    monkeypatch.setattr(bench, "run_workload", lambda key, *a: seen.append(key) or
                        {"title": key, "flops": 1, "load_before": (0, 0, 0),
                         "load_after": (0, 0, 0), "rows": []})
    bench.main(["--quick", "--workloads", "W6", "--peers", "numpy", "--out", str(tmp_path)])
    assert seen == ["W6.1", "W6.64"]


# Small versions of W5 (LeNet-5, a step) and W7 (DS-CNN, a forward pass: grouped and
# asymmetric padding, batch norm with running statistics, dropout as identity).
SMALL = {"lenet5": ConvWorkload("T5", "lenet5", "LeNet-5", 2, True),
         "ds_cnn": ConvWorkload("T7", "ds_cnn", "DS-CNN", 1, False)}
PERTURBED = {"lenet5": "K2", "ds_cnn": "Kd3"}


@pytest.fixture(scope="module", params=sorted(SMALL))
def small(request):
    """A small conv problem with graphc's float32 results filled in."""
    w = SMALL[request.param]
    prob = problem(w)
    model = graphc.compile(w.graph())
    model.set_params(prob.params)
    prob.expected = ({"losses": [model.train_step(x=prob.x, y=prob.y) for _ in range(2)]}
                     if w.train else {"logits": model.forward(x=prob.x)["logits"]})
    return prob


@pytest.mark.parametrize("peer", ["torch", "jax", "onnxruntime"])
def test_conv_peers_match_graphc_and_fail_at_a_perturbed_param(small, peer, tmp_path):
    """Each peer's results equal graphc's; with one inner layer's weights scaled by 1.01,
    its check fails: the check compares the peer's own numbers."""
    pytest.importorskip(peer)
    try:
        runners = load(peer).runners(small, tmp_path)
    except Skip as e:   # onnxruntime does not train
        assert small.workload.train and peer == "onnxruntime", e
        return
    assert runners
    for r in runners:
        assert check(small, r.results()) <= CHECK_RTOL, r.label
    name = PERTURBED[small.workload.model]
    original = small.params[name]
    small.params[name] = original * np.float32(1.01)
    try:
        for r in load(peer).runners(small, tmp_path):
            assert check(small, r.results()) > CHECK_RTOL, r.label
    finally:
        small.params[name] = original


def test_targets_are_judged_against_the_figure_named_quiet_and_busy():
    """W7's onnxruntime target is against graphc's bound call: a peer 3× slower than the
    bound call but only 1.5× slower than graphc from Python meets ≥ 2; beside the
    competitor it is 1.2× slower than the bound call and misses."""
    from benchmarks.__main__ import _compare, _targets_table
    reference = {"python": {"label": "graphc (Python)", "median_s": 2.0, "min_s": 2.0,
                            "busy_median_s": 2.0},
                 "bound": {"label": "graphc (bound call)", "median_s": 1.0, "min_s": 1.0,
                           "busy_median_s": 2.5}}
    measured = {"label": "onnxruntime, 1 thread", "kind": "python", "median_s": 3.0,
                "min_s": 3.0, "busy_median_s": 3.0}
    row = dict(measured, peer="onnxruntime")
    _compare("W7", row, reference)
    assert row["speedup"] == 1.5 and row["speedup_vs_bound"] == 3.0
    assert row["target"] == 2.0 and row["target_against"] == "bound"
    assert row["met"] is True and row["busy_speedup_vs_bound"] == 1.2 and row["busy_met"] is False
    table = "\n".join(_targets_table({"W7": {"rows": [row]}}))
    assert "| W7 | onnxruntime, 1 thread | graphc (bound call) ≥ 2× it | met (3.00×) | " \
           "**missed** (1.20×) |" in table
    # a peer without a target on this workload gets none
    other = dict(measured, peer="numpy")
    _compare("W7", other, reference)
    assert "target" not in other and "met" not in other


def test_onnx_table_shows_busy_beside_quiet():
    """benchmarks/onnx_models.py's table from made-up rows: each cell the quiet median, the
    busy one and their ratio; the last column onnxruntime's fastest over graphc's bound
    call, quiet and busy."""
    from benchmarks import onnx_models

    def row(label, quiet, busy):
        return {"model": "m", "batch": 1, "label": label, "median_s": quiet, "foreign_cores": 0.0,
                "busy_median_s": busy, "busy_ratio": busy / quiet}
    text = onnx_models.markdown({"date": "today", "onnxruntime": "1", "busy": 0.25, "rows": [
        row("graphc host, bound call", 10e-6, 20e-6),
        row("onnxruntime, 1 thread", 30e-6, 30e-6)]})
    assert "| m | 1 | 10.0 µs; busy 20.0 µs (2.00×) | 30.0 µs; busy 30.0 µs (1.00×) | " \
           "3.00×; busy 1.50× |" in text


def test_pure_c_harness_runs_with_the_environment_given(tmp_path, monkeypatch):
    """charness.run's `env` reaches the program (how OMP_NUM_THREADS=1 rows are run)."""
    p = charness.Program("probe", {"probe.h": "#include <stdlib.h>\n"}, "probe.h",
                         [("x", np.zeros(1, np.float32))], [],
                         'result = getenv("GRAPHC_BENCH_PROBE") ? x[0] + 1.0F : x[0];')
    binary = charness.build(p, tmp_path / "probe")
    once = Options(repeats=1, min_repeat=0.0, warmup=0.0)
    assert charness.run(p, binary, once)[1][0][0] == 0.0
    assert charness.run(p, binary, once, {"GRAPHC_BENCH_PROBE": "1"})[1][0][0] == 1.0
    # OpenMP's idle threads sleep after 1,000 rounds unless the user said how they wait;
    # `env` comes last
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = charness.environment()
    assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"]) == ("passive", "1000")
    assert charness.environment({"OMP_WAIT_POLICY": "active"})["OMP_WAIT_POLICY"] == "active"
    monkeypatch.setenv("GOMP_SPINCOUNT", "20")
    env = charness.environment()
    assert "OMP_WAIT_POLICY" not in env and env["GOMP_SPINCOUNT"] == "20"
