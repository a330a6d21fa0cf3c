"""What a call from Python costs above the C (issue 15 §5), on W2: the 64-32-10 ReLU MLP's
forward at batch 1 (benchmarks/workloads.py), compiled with `graphc.compile`'s defaults.

    python -m benchmarks.overhead [--repeats N] [--quick] [--out benchmarks/results]

Rows: the pure C (the generated timing harness calling `<name>_forward` in a loop,
benchmarks/charness.py), the bound call (`model.bind("forward", x=x)`), `model.forward(x=x)`
on one array and on a new array every call (cycling through 64, so that nothing keyed by
the array's identity can help), and the floor of a cffi call from Python: one `np.empty`,
two `ffi.from_buffer` and the C call, with no lock, kwargs or checks (model.forward runs
below it: its plain case is C, codegen/fastcall.c). Each is
timed twice (benchmarks/timing.py: warm-up, K calls per repeat, median and min per call):
by the wall clock, and by this thread's CPU time (CLOCK_THREAD_CPUTIME_ID, in Python
`time.thread_time`), which other processes on a shared machine barely change: the CPU
figures are the ones to compare. Writes overhead.md and overhead.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import graphc

from . import charness, write_results
from .peers.graphc import c_program
from .timing import Options, time_python
from .workloads import WORKLOADS, problem

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": ("CLOCK_MONOTONIC", time.perf_counter),
          "cpu": ("CLOCK_THREAD_CPUTIME_ID", time.thread_time)}
FRESH_INPUTS = 64


def python_rows(model, x: np.ndarray) -> dict:
    """name -> a call without arguments, each doing one W2 forward."""
    bound = model.bind("forward", x=x.copy())
    fresh = [x.copy() for _ in range(FRESH_INPUTS)]
    turn = iter(range(1 << 62))

    def forward():
        return model.forward(x=x)

    def forward_fresh():
        return model.forward(x=fresh[next(turn) % FRESH_INPUTS])

    entry = model.cmodule.entries["forward"]
    (output,) = entry.outputs
    shape = (x.shape[0], *model.cmodule.output_shapes[output])
    fn, buffer, ctype, dtype = getattr(model._lib, entry.c_name), model._ffi.from_buffer, \
        model._ctype, model.dtype
    params, work, n = model._c_params, model._work_for(x.shape[0]), x.shape[0]

    def floor():
        out = np.empty(shape, dtype)
        fn(params, work, n, buffer(ctype, x), buffer(ctype, out))
        return out

    return {"bound call": bound, "model.forward(x=x)": forward,
            "model.forward(x=a new array)": forward_fresh,
            "cffi floor (np.empty, 2 from_buffer, C)": floor}


def run(opts: Options, workdir: Path) -> dict:
    w = WORKLOADS["W2"]
    prob = problem(w)
    model = graphc.compile(w.graph())
    model.set_params(prob.params)
    want = model.forward(x=prob.x)[model.graph.outputs[0]]
    rows = {}
    for clock, (c_clock, py_clock) in CLOCKS.items():
        program = dataclasses.replace(c_program(model.cmodule, prob, train=False),
                                      clock=c_clock)
        program.name += f"_{clock}"
        binary = charness.build(program, workdir / program.name)
        timing, calls = charness.run(program, binary, opts)
        if not np.allclose(calls[0][1:], want.ravel(), rtol=1e-5, atol=1e-6):
            raise SystemExit("the C harness's logits differ from model.forward's")
        rows.setdefault("pure C (harness)", {})[clock] = timing.as_dict()
        for name, call in python_rows(model, prob.x).items():
            rows.setdefault(name, {})[clock] = time_python(call, opts, clock=py_clock).as_dict()
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    c = rows["pure C (harness)"]
    lines = ["# Per-call overhead from Python: W2 forward (64-32-10 MLP, batch 1)", "",
             f"`{result['command']}` on {result['date']}; load average "
             f"{', '.join(f'{v:.2f}' for v in result['load_before'])} before, "
             f"{', '.join(f'{v:.2f}' for v in result['load_after'])} after (1, 5, 15 min); "
             f"{result['options']['repeats']} repeats. µs per call; *above C*: the median "
             "minus the pure C's median, by the same clock. The CPU-time columns are the "
             "ones that survive a shared machine.", "",
             "| call | CPU median | CPU min | CPU above C | wall median | wall min "
             "| wall above C |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cells = []
        for clock in ("cpu", "wall"):
            t = r[clock]
            above = t["median"] - c[clock]["median"]
            cells += [f"{t['median'] * 1e6:.3f}", f"{t['min'] * 1e6:.3f}",
                      "" if r is c else f"{above * 1e6:+.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None, help="default 21; 3 with --quick")
    ap.add_argument("--quick", action="store_true", help="short timing: a smoke test")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args(argv)
    opts = Options.quick() if args.quick else Options()
    if args.repeats:
        opts = dataclasses.replace(opts, repeats=args.repeats)
    result = {"command": " ".join(["python -m benchmarks.overhead",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "options": dataclasses.asdict(opts), "load_before": os.getloadavg()}
    workdir = Path(tempfile.mkdtemp(prefix="graphc-overhead-"))
    try:
        result["rows"] = run(opts, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    text = markdown(result)
    write_results(args.out, "overhead", result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
