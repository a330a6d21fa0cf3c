"""How graphc's host modules run quiet and beside one busy process, per thread policy and
OpenMP wait setting.

    python -m benchmarks.threads [--workloads W3,W4,R8,CNN] [--variants adaptive,all,...]
                                 [--seconds 3] [--rounds 1]

Each (workload, variant) cell is a fresh process, so that libgomp starts with that
variant's environment: `adaptive` is graphc's default (`threads=None`: one thread or all,
whichever is lately faster, codegen/openmp.py), `all` runs every call on all cores
(`threads=os.cpu_count()`), both with graphc's wait settings (passive after 1,000 rounds of
spinning: 20-40 µs on a Zen 5 VM); `nospin`, `active` and `spin10k` are `all` with
`OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=0` (graphc's setting until 2026-12-04),
`OMP_WAIT_POLICY=active` and `GOMP_SPINCOUNT=10000`, `adaptive_nospin` is `adaptive` with
no spin, and `1thread` compiles with
`threads=1`. The process times a bound call for `--seconds` quiet, then as long again
beside one busy-looping process it starts and kills (`machine.competitor`), and prints the
fastest and the median call of each. With `--rounds R` the cells run R times interleaved
(every variant once per round, so that variants meet the same load) and a last table gives
each cell's median over rounds of its medians. Workloads: W3 and W4
(benchmarks/workloads.py, batch 128), R8 (ResNet-8 forward, batch 64), CNN (the digits
CNN's Adam step, batch 64). With `--alternate` the three thread policies (adaptive,
all, 1thread) run call by call in one process instead, quiet then beside the
competitor: the closest comparison a loaded machine allows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL = str(os.cpu_count() or 1)
# variant -> (environment, threads= as given to the cell: "none", or a count)
NO_SPIN = {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "0"}
VARIANTS = {"adaptive": ({}, "none"), "all": ({}, ALL), "nospin": (NO_SPIN, ALL),
            "active": ({"OMP_WAIT_POLICY": "active"}, ALL),
            "spin10k": ({"GOMP_SPINCOUNT": "10000"}, ALL), "1thread": ({}, "1"),
            "adaptive_nospin": (NO_SPIN, "none")}


def _call(workload: str, threads: int | None):
    """A bound call of the workload's model, on fixed random inputs."""
    import numpy as np
    import graphc
    from .workloads import spec
    rng = np.random.default_rng(0)
    if workload in ("W3", "W4"):
        model = graphc.compile(spec((784, 256, 128, 10)), threads=threads)
        x = rng.standard_normal((128, 784)).astype(np.float32)
        if workload == "W4":
            return model.bind("forward", x=x)
        y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 128)]
        return model.bind("train_step", x=x, y=y)
    if workload == "R8":
        return graphc.compile(str(ROOT / "examples/tiny/resnet8.yaml"),
                              threads=threads).bind("forward", batch=64)
    if workload == "CNN":
        return graphc.compile(str(ROOT / "examples/digits_cnn.yaml"),
                              threads=threads).bind("train_step", batch=64)
    raise SystemExit(f"unknown workload {workload!r} (W3, W4, R8, CNN)")


def _timed(call, seconds: float) -> tuple[float, float]:
    """(fastest, median) call in seconds over `seconds` of calls."""
    import time
    for _ in range(3):
        call()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def alternate(workload: str, seconds: float) -> dict:
    """In this process: the default, all cores and one thread, one call of each in turn for
    `seconds` quiet and as long beside the competitor, so that the three meet the same load;
    (median per variant, and the share of the default's calls that left one thread in use)."""
    import statistics
    import time
    from random import Random
    from .machine import competitor
    shuffle = Random(0).shuffle
    calls = {"adaptive": _call(workload, None), "all": _call(workload, os.cpu_count()),
             "1thread": _call(workload, 1)}
    races = calls["adaptive"].func.controller._races
    result = {}
    for condition in ("quiet", "busy"):
        with competitor() if condition == "busy" else contextlib.nullcontext():
            times, on_one = {v: [] for v in calls}, 0
            for call in calls.values():
                call()
            end, order = time.perf_counter() + seconds, list(calls)
            while time.perf_counter() < end:
                # A call right after one on all threads ran faster than the next (at load
                # 16, 2.5 against 18 ms for the same one-thread CNN step): a fresh order each
                # round, so each variant follows each other as often (a rotation does not).
                shuffle(order)
                for variant in order:
                    start = time.perf_counter()
                    calls[variant]()
                    times[variant].append(time.perf_counter() - start)
                on_one += any(race.one for race in races.values())
        result[condition] = {v: statistics.median(t) for v, t in times.items()}
        result[condition]["on_one"] = on_one / len(times["adaptive"])
    return result


def cell(workload: str, threads: int | None, seconds: float) -> dict:
    """One cell, in this process: quiet, then beside the competitor."""
    from .machine import competitor
    call = _call(workload, threads)
    quiet = _timed(call, seconds)
    with competitor():
        busy = _timed(call, seconds)
    return {"quiet": quiet, "busy": busy, "load": os.getloadavg()[0]}


def main(argv=None) -> list[dict]:
    import statistics
    ap = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W3,W4,R8,CNN")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--alternate", action="store_true",
                    help="adaptive, all and 1thread call by call in one process "
                         "(graphc's wait policy), instead of a process per cell")
    ap.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)   # workload threads seconds
    args = ap.parse_args(argv)
    if args.alternate:
        print("| workload | condition | adaptive (ms) | all (ms) | 1thread (ms) | "
              "adaptive on one thread | load |\n|---|---|---|---|---|---|---|", flush=True)
        for workload in args.workloads.split(","):
            r = alternate(workload, args.seconds)
            for condition, m in r.items():
                print(f"| {workload} | {condition} | {m['adaptive'] * 1e3:.3f} | "
                      f"{m['all'] * 1e3:.3f} | {m['1thread'] * 1e3:.3f} | "
                      f"{m['on_one']:.0%} | {os.getloadavg()[0]:.2f} |", flush=True)
        return []
    if args.cell:
        workload, threads, seconds = args.cell
        print(json.dumps(cell(workload, None if threads == "none" else int(threads),
                              float(seconds))))
        return []
    for name, known in ((args.workloads, ("W3", "W4", "R8", "CNN")), (args.variants, VARIANTS)):
        unknown = [v for v in name.split(",") if v not in known]
        if unknown:
            ap.error(f"unknown {unknown[0]!r} (choose from {', '.join(known)})")
    rows = []
    print("| round | workload | variant | quiet fastest / median (ms) | "
          "busy fastest / median (ms) | busy / quiet (medians) | load |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for round_ in range(1, args.rounds + 1):
        for workload in args.workloads.split(","):
            for variant in args.variants.split(","):
                extra, threads = VARIANTS[variant]
                env = {k: v for k, v in os.environ.items()
                       if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                env.update(extra)
                done = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--cell",
                                       workload, threads, str(args.seconds)], env=env,
                                      cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    print(f"| {round_} | {workload} | {variant} | failed: "
                          f"{done.stderr.strip()[-300:]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                (qf, qm), (bf, bm) = r["quiet"], r["busy"]
                rows.append({"round": round_, "workload": workload, "variant": variant, **r})
                print(f"| {round_} | {workload} | {variant} | {qf * 1e3:.3f} / {qm * 1e3:.3f} | "
                      f"{bf * 1e3:.3f} / {bm * 1e3:.3f} | {bm / qm:.2f} | {r['load']:.2f} |",
                      flush=True)
    if args.rounds > 1:
        print("\n| workload | variant | quiet median (ms) | busy median (ms) | busy / quiet |"
              "\n|---|---|---|---|---|")
        for workload in args.workloads.split(","):
            for variant in args.variants.split(","):
                mine = [r for r in rows if (r["workload"], r["variant"]) == (workload, variant)]
                if mine:
                    quiet = statistics.median(r["quiet"][1] for r in mine)
                    busy = statistics.median(r["busy"][1] for r in mine)
                    print(f"| {workload} | {variant} | {quiet * 1e3:.3f} | {busy * 1e3:.3f} | "
                          f"{busy / quiet:.2f} |")
    return rows


if __name__ == "__main__":
    main()
