"""Where a compile's time goes (issue 15 §4): spec to loaded module, split by stage.

    python -m benchmarks.compile_split SPEC [--target host] [--repeats 3]

Each run is a fresh process, once with an empty GRAPHC_CACHE_DIR (cold) and once with the
cache that run filled (warm). Per stage it reports the process's own CPU seconds (derive;
fuse, pad_guards and plan; emit) and, for the build, the CPU seconds of the C compiler
processes (children), besides wall seconds: on a shared machine CPU is what stays
comparable. The minimum over the repeats is printed, and the load average beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# Runs in the child: wraps the pipeline's stages to time them, then compiles.
_CHILD = r"""
import json, resource, sys, time
wall0, cpu0 = time.perf_counter(), time.process_time()
import graphc
from graphc import model, pipeline
import codegen.build


def children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


seconds = {}


def timed(module, name, label):
    function = getattr(module, name)

    def run(*args, **kwargs):
        cpu, child = time.process_time(), children()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.process_time() - cpu
            seconds[label + " cc"] = seconds.get(label + " cc", 0.0) + children() - child
    setattr(module, name, run)


for stage, label in (("derive", "derive"), ("fuse", "plan"), ("pad_guards", "plan"),
                     ("plan", "plan"), ("emit", "emit")):
    timed(pipeline, stage, label)
timed(codegen.build, "build", "build")
imported = time.perf_counter() - wall0
wall1, cpu1 = time.perf_counter(), time.process_time()
graphc.compile(graphc.load(sys.argv[1]), target=sys.argv[2])
seconds.update(imports=imported, compile_wall=time.perf_counter() - wall1,
               compile_cpu=time.process_time() - cpu1, total_wall=time.perf_counter() - wall0)
print(json.dumps({k: round(v, 3) for k, v in seconds.items() if v or not k.endswith(" cc")}))
"""


def run(spec: str, target: str, cache: str) -> dict:
    env = dict(os.environ, GRAPHC_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", _CHILD, spec, target], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--target", default="host")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="graphc-split-") as cache:
            results["cold"].append(run(args.spec, args.target, cache))
            results["warm"].append(run(args.spec, args.target, cache))
    print(f"{args.spec} --target {args.target}, min of {args.repeats}, "
          f"load {os.getloadavg()[0]:.1f}")
    for kind, runs in results.items():
        keys = dict.fromkeys(k for r in runs for k in r)
        print(f"  {kind}: " + ", ".join(f"{k} {min(r.get(k, 0.0) for r in runs):.3f}"
                                        for k in keys))


if __name__ == "__main__":
    main()
