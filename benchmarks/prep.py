"""Preparation time: spec -> loaded C module, cold cache and warm cache, each in a fresh process.

    python -m benchmarks.prep [--repeats 3]

Reports, per network, the median of `--repeats` runs of: importing graphc, then
load + derive + emit + build (cold: an empty cache dir; warm: the entry already built), and
a second `graphc.compile` of the same graph in the same process (warm, modules imported).
`run` is also used by `python -m benchmarks` (workload P) and `benchmarks.scaling`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the child imports graphc from here

NETWORKS = {
    "mlp 64-32-10": [64, 32, 10],
    "mlp 784-512-512-10": [784, 512, 512, 10],
}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import graphc
t1 = time.perf_counter()
sizes = json.loads(sys.argv[1])
options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}   # more graphc.compile arguments
b = graphc.Builder("prep")
h = b.input("x", [sizes[0]])
y = b.input("y", [sizes[-1]])
for k, (i, o) in enumerate(zip(sizes, sizes[1:])):
    h = b.dense(h, b.param(f"W{k}", [o, i], init="he_normal"), b.param(f"b{k}", [o]), name=f"h{k}")
    if k < len(sizes) - 2:
        h = b.relu(h, name=f"a{k}")
g = b.build(outputs=[h], loss=b.softmax_cross_entropy(h, y, name="loss"))
t2 = time.perf_counter()
model = graphc.compile(g, dtype="float32", **options)
t3 = time.perf_counter()
model.init_params(0)   # again: how much of "compile" drawing the params takes
t4 = time.perf_counter()
again = graphc.compile(g, dtype="float32", **options)   # warm, modules already imported
t5 = time.perf_counter()
assert again.built.cached
print(json.dumps({"import": t1 - t0, "graph": t2 - t1, "compile": t3 - t2, "init": t4 - t3,
                  "again": t5 - t4, "c_bytes": len(model.c_source.encode()),
                  "cached": model.built.cached}))
"""


# The children cache bytecode as an installed package does (in a directory of their own, not
# the source tree), even where the environment says PYTHONDONTWRITEBYTECODE: otherwise every
# graphc module is compiled from source in every process, 1-2 ms each, which no user pays.
_PYCACHE = tempfile.mkdtemp(prefix="graphc-prep-pyc-")
atexit.register(shutil.rmtree, _PYCACHE, True)
_compiled: list = []


def run(sizes, cache: str, **options) -> dict:
    """One fresh process: import graphc, build the MLP `sizes`, `graphc.compile(**options)`
    with `cache` as the build cache. Seconds per phase, the C's size, and whether cached."""
    env = dict(os.environ, GRAPHC_CACHE_DIR=cache, PYTHONPYCACHEPREFIX=_PYCACHE)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not _compiled:   # the bytecode, once, outside any measurement
        subprocess.run([sys.executable, "-c", "import graphc, graphc.derive, codegen.emit, "
                        "codegen.build, cffi, numpy.random"], env=env, cwd=ROOT, check=True)
        _compiled.append(True)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sizes), json.dumps(options)],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'network':<22} {'import':>8} {'cold':>8} {'warm':>8} {'again':>8}   "
          f"(median of {args.repeats}, seconds; again: warm in the same process)")
    for name, sizes in NETWORKS.items():
        cold, warm, imp, again = [], [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                c = run(sizes, cache)
                w = run(sizes, cache)
            assert not c["cached"] and w["cached"]
            cold.append(c["graph"] + c["compile"])
            warm.append(w["graph"] + w["compile"])
            imp.append(c["import"])
            again.append(w["again"])
        print(f"{name:<22} {statistics.median(imp):8.3f} {statistics.median(cold):8.3f} "
              f"{statistics.median(warm):8.3f} {statistics.median(again):8.4f}")


if __name__ == "__main__":
    main()
