"""One core's time per call of the host C, for comparing two versions of graphc's kernels.

    python -m benchmarks.one_core [--cases resnet8,ds_cnn,...]

Each case is `graphc.compile(spec, threads=1).bind(kind, batch)`, timed as every Python
row of the benchmarks is (benchmarks/timing.py: warm-up, K calls per repeat, here 30
repeats) by this thread's CPU time (`time.thread_time`); the fastest repeat per call is
printed, then the median. Thread CPU time leaves out other processes, but not a shared
virtual machine's slower periods (benchmarks/machine.py: core_speed), so a comparison of
two checkouts runs this in alternation, a fresh process each, and keeps each side's best
of several rounds:

    for r in 1 2 3; do (cd old && python -m benchmarks.one_core); \\
                       (cd new && python -m benchmarks.one_core); done
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import graphc

from .timing import Options, time_python
from .workloads import spec

OPTIONS = Options(repeats=30)

ROOT = Path(__file__).resolve().parent.parent
# (name, spec, entry, batch)
CASES = [("lenet5", ROOT / "benchmarks/lenet5.yaml", "train_step", 64),
         ("resnet8", ROOT / "examples/tiny/resnet8.yaml", "forward", 1),
         ("resnet8", ROOT / "examples/tiny/resnet8.yaml", "forward", 64),
         ("ds_cnn", ROOT / "examples/tiny/ds_cnn.yaml", "forward", 1),
         ("ds_cnn", ROOT / "examples/tiny/ds_cnn.yaml", "forward", 64),
         ("mobilenet", ROOT / "examples/tiny/mobilenet_v1_025.yaml", "forward", 1),
         ("w3", spec((784, 256, 128, 10)), "train_step", 128),
         ("w4", spec((784, 256, 128, 10)), "forward", 128),
         ("w1", spec((64, 32, 10)), "train_step", 1),
         ("w2", spec((64, 32, 10)), "forward", 1)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.one_core",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="",
                    help="comma-separated names (default: all of "
                         f"{', '.join(dict.fromkeys(c[0] for c in CASES))})")
    args = ap.parse_args(argv)
    wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = wanted - {c[0] for c in CASES}
    if unknown:
        ap.error(f"unknown case {', '.join(sorted(unknown))} "
                 f"(cases: {', '.join(dict.fromkeys(c[0] for c in CASES))})")
    for name, source, entry, batch in CASES:
        if wanted and name not in wanted:
            continue
        model = graphc.compile(str(source) if isinstance(source, Path) else source,
                               threads=1)
        timing = time_python(model.bind(entry, batch), OPTIONS, clock=time.thread_time)
        print(f"{name:10s} {entry:10s} batch {batch:<4d} {timing.min * 1e3:10.4f} ms "
              f"(median {timing.median * 1e3:.4f})", flush=True)


if __name__ == "__main__":
    main()
