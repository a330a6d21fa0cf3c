"""Every entry point at batch sizes that take every path through its C (n = 0 included),
under AddressSanitizer and UBSan.

`codegen.harness.batch_sweep` gives each call arrays of exactly the sizes the header states
for that n (its own malloc each), so a read past the inputs or the work arena is an ASan
report. The printed results are compared with the float64 NumPy reference at each n > 0;
at n = 0 the contract is: nothing read, loss 0, gradients 0, a train step changes nothing.

Sanitizer builds are compiled without -g (debug info made one such build 5x slower) and at
-O0 (a quarter of -O1's compile time; the runs are short), several at once.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np

from codegen.harness import batch_sweep, parse_output
from graphc.init import initial_params
from graphc.reference import reference
from graphc.verify import sample_inputs, within_tolerance

from conftest import generated

# Every path the batch takes through the C without OpenMP: the kernels take it 8 or 4
# examples at a time and peel the first, so these are none, one, tails of every length, one,
# two and several whole blocks, and a long tail after several. Larger batches repeat those
# paths (n = 64, 65 and 129 were 72 % of the examples the sweeps ran, and of their time at
# -O0 under the sanitizers); the parallel regions that open from larger batches are tested
# with OpenMP in test_kernels.py.
BATCHES = (0, 1, 2, 3, 5, 8, 15, 16, 17, 33, 47)
CC = os.environ.get("CC", "cc")
SANITIZE = ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]


class Sweep:
    """A generated module with the params the sweep runs on (the spec's initializers, seed
    0, rounded to the dtype): no cffi build is needed to test the C."""

    def __init__(self, spec, target: str, dtype: str = "float32"):
        self.graph, self.cmodule = generated(spec, dtype, target)
        self.dtype = dtype
        self.params = initial_params(self.graph, self.cmodule).astype(dtype).astype(np.float64)

    def get_params(self) -> dict[str, np.ndarray]:
        shapes = self.graph.params
        return {p: self.params[off:off + math.prod(shapes[p].shape)].reshape(shapes[p].shape)
                for p, off in self.cmodule.param_offsets.items()}


def start_build(model: Sweep, directory: Path, batches=BATCHES,
                extra_flags=()) -> subprocess.Popen:
    """Write the model's C and a sweep over `batches`; start compiling it (not waited for)."""
    cm = model.cmodule
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{cm.name}.c").write_text(cm.source)
    (directory / f"{cm.name}.h").write_text(cm.header)
    inputs = sample_inputs(model.graph, max(batches), seed=1)
    (directory / "main.c").write_text(batch_sweep(cm, model.params, inputs, batches))
    return subprocess.Popen([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", *SANITIZE,
                             *extra_flags, "main.c", f"{cm.name}.c", "-o", "sweep", "-lm"],
                            cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run_and_check(model: Sweep, directory: Path, build: subprocess.Popen, assert_close,
                  batches=BATCHES, env=None) -> None:
    """Wait for `build`, run the sweep, compare every result with the reference."""
    out, _ = build.communicate(timeout=600)
    assert build.returncode == 0, out
    run = subprocess.run(["./sweep"], cwd=directory, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1",
                                           **(env or {})})
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr[-3000:]
    check_sweep(model, parse_output(run.stdout), batches, assert_close)


def check_sweep(model: Sweep, got: dict[str, np.ndarray], batches, assert_close) -> None:
    graph, cm, dtype, params = model.graph, model.cmodule, model.dtype, model.params
    what = f"{graph.name}/{cm.target}/{dtype}"
    inputs = {k: v.astype(dtype).astype(np.float64)
              for k, v in sample_inputs(graph, max(batches), seed=1).items()}
    ref = reference(graph)
    for n in batches:
        data = {k: v[:n] for k, v in inputs.items()}
        if n == 0:
            for o in cm.entries["forward"].outputs:
                assert got[f"forward.{o}.0"].size == 0
            for kind in ("evaluate", "gradients", "train_step"):
                if kind in cm.entries:
                    assert got[f"{kind}.loss.0"].tolist() == [0.0], f"{what}: {kind} at n=0"
            if "gradients" in cm.entries:
                assert not np.any(got["gradients.grads.0"]), f"{what}: gradients at n=0"
            if "train_step" in cm.entries:
                # Printed with the digits that read back to the same float: equal bits.
                assert np.array_equal(got["train_step.params.0"].astype(dtype),
                                      params.astype(dtype)), f"{what}: params moved at n=0"
                assert np.array_equal(got["train_step.state.0"].astype(dtype),   # as init_state wrote
                                      cm.initial_state().astype(dtype)), f"{what}: state at n=0"
            continue
        ref.set_params(model.get_params())
        ref.reset_optimizer()   # each n starts from zeroed state: dropout's masks of step 0
        want = ref.forward(**data)
        for o, shape in cm.output_shapes.items():
            assert_close(got[f"forward.{o}.{n}"].reshape(n, *shape), want[o], dtype,
                         f"{what}: forward '{o}' at n={n}")
            if "evaluate" in cm.entries:
                assert_close(got[f"evaluate.{o}.{n}"].reshape(n, *shape), want[o], dtype,
                             f"{what}: evaluate '{o}' at n={n}")
        if "gradients" not in cm.entries:
            continue
        # evaluate's loss is the evaluation mode's, the gradients' the training mode's
        # (they differ with batch norm: running statistics against the batch's)
        assert_close(got[f"evaluate.loss.{n}"], [ref.loss(**data)], dtype,
                     f"{what}: evaluate loss, n={n}")
        loss, grads = ref.gradients(**data)
        assert_close(got[f"gradients.loss.{n}"], [loss], dtype, f"{what}: loss at n={n}")
        flat = got[f"gradients.grads.{n}"]
        for p, g in grads.items():   # the trainable params (running statistics: below)
            off = cm.param_offsets[p]
            assert_close(flat[off:off + g.size].reshape(g.shape), g, dtype,
                         f"{what}: d{p} at n={n}")
        if "train_step" in cm.entries:
            ref.optimizer = cm.optimizer
            assert_close(got[f"train_step.loss.{n}"], [ref.train_step(**data)], dtype,
                         f"{what}: train_step loss at n={n}")
            stepped = got[f"train_step.params.{n}"]
            for p, off in cm.param_offsets.items():   # running statistics included
                want_p = ref.get_params()[p]
                got_p = stepped[off:off + want_p.size].reshape(want_p.shape)
                # Adam's first step moves each param by about lr·sign(g): where the reference
                # gradient is within the dtype's tolerance of 0, the C's gradient may have
                # either sign (a gradient of 3e-8 beside one of 0.15, in float32), and the
                # param moves by up to lr either way. Elsewhere the step must agree.
                # (A running statistic has no gradient: its step is torch's blend, compared
                # as it is.)
                undecided = np.zeros(want_p.shape, bool)
                if p in grads:
                    _, _, tol = within_tolerance(grads[p], grads[p], dtype)
                    undecided = np.abs(grads[p]) <= tol
                if cm.optimizer["name"] == "adam" and undecided.any():
                    near = np.abs(got_p - want_p) <= 2 * cm.optimizer["lr"]
                    got_p = np.where(undecided & near, want_p, got_p)
                assert_close(got_p, want_p, dtype, f"{what}: {p} after one step at n={n}")
            assert got[f"train_step.state.{n}"][cm.state_offsets["step"]] == 1
