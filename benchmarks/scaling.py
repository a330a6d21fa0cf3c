"""How preparation time, generated code size and step time grow with width and depth.

    python -m benchmarks.scaling [--repeats N] [--quick] [--out benchmarks/results]

Width: MLP w-w-10 (depth 2) for w in 64, 256, 1024, 4096. Depth: 64-...-64-10 with 2, 4,
8, 16 dense layers. For each: spec → loaded module with a cold cache in a fresh process
(benchmarks/prep.py; target host, SGD; median of the repeats, and how much of it is
drawing the initial params, which grows with the param count), the generated .c in
bytes, and one SGD step at batch 1 in pure C (benchmarks/charness.py), checked against
NumPy's step. The issue asks prep time and code size to stay flat with width and grow
linearly with depth. Writes scaling.md and scaling.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import graphc

from . import charness, prep, write_results
from .machine import quietly
from .peers import graphc as graphc_peer
from .peers import numpy as numpy_peer
from .timing import Options
from .workloads import LR, Workload, problem, rel_error, spec

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (64, 256, 1024, 4096)
DEPTHS = (2, 4, 8, 16)
BATCH = 1


def networks(quick: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    widths, depths = (WIDTHS[:2], DEPTHS[:2]) if quick else (WIDTHS, DEPTHS)
    return ([("width", (w, w, 10)) for w in widths]
            + [("depth", (64,) * d + (10,)) for d in depths])


def measure(sizes: tuple[int, ...], repeats: int, opts: Options, workdir: Path) -> dict:
    colds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="graphc-scaling-") as cache:
            colds.append(prep.run(list(sizes), cache, target=graphc_peer.C_TARGET,
                                  optimizer={"name": "sgd", "lr": LR}))
    assert not any(c["cached"] for c in colds)
    w = Workload(f"S{'-'.join(map(str, sizes))}", sizes, BATCH, True)
    prob = problem(w)
    _, cmodule = graphc.generate(spec(sizes), target=graphc_peer.C_TARGET)
    runner = charness.runner("graphc (pure C)", graphc_peer.c_program(cmodule, prob, True),
                             workdir, True)
    got = runner.results()["losses"]
    layers = [(W.copy(), b.copy()) for W, b in prob.layers]
    want = [numpy_peer.train_step(layers, prob.x, prob.labels) for _ in range(2)]
    step, foreign, _ = quietly(lambda: runner.time(opts), opts)
    return {"sizes": list(sizes), "depth": len(sizes) - 1, "width": sizes[1],
            "params": int(sum(o * i + o for i, o in w.layers)),
            "prep_cold_s": statistics.median(c["graph"] + c["compile"] for c in colds),
            "init_s": statistics.median(c["init"] for c in colds),
            "c_bytes": colds[0]["c_bytes"],
            "step_median_s": step.median, "step_min_s": step.min,
            "check_rel_error": rel_error(got, want), "foreign_cores": foreign}


def run(opts: Options, repeats: int, quick: bool = False, log=None) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphc-scaling-build-") as tmp:
        done: dict[tuple, dict] = {}
        for series, sizes in networks(quick):
            if sizes not in done:
                if log:
                    log(f"scaling: {'-'.join(map(str, sizes))}")
                done[sizes] = measure(sizes, repeats, opts, Path(tmp))
            rows.append(dict(done[sizes], series=series))
    return {"batch": BATCH, "repeats": repeats, "rows": rows}


def _time(s: float) -> str:
    return f"{s * 1e6:.3g} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def markdown(result: dict, level: str = "#") -> str:
    lines = [f"{level} Scaling with width and depth", "",
             f"Spec → loaded module with a cold cache, in a fresh process (median of "
             f"{result['repeats']}; *init* is the part spent drawing the initial params), "
             f"the generated `.c` in bytes, and one SGD step at batch {result['batch']} in "
             "pure C (median and min per call; checked against NumPy's float32 step). "
             "× first: relative to the first row of the series.", "",
             "| series | network | layers | params | prep cold | of it init | × first | "
             ".c bytes | × first | step median | step min | check | others' load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict[str, dict] = {}
    for r in result["rows"]:
        f = first.setdefault(r["series"], r)
        sizes = r["sizes"]
        net = "-".join(map(str, sizes)) if len(sizes) <= 5 else f"{sizes[0]}-…-{sizes[-2]}-{sizes[-1]}"
        others = "" if r.get("foreign_cores") is None else f"{r['foreign_cores']:.2f}"
        lines.append(
            f"| {r['series']} | {net} | {r['depth']} | {r['params']:,} | "
            f"{_time(r['prep_cold_s'])} | {_time(r['init_s'])} | "
            f"{r['prep_cold_s'] / f['prep_cold_s']:.2f} | {r['c_bytes']:,} | "
            f"{r['c_bytes'] / f['c_bytes']:.2f} | {_time(r['step_median_s'])} | "
            f"{_time(r['step_min_s'])} | {r['check_rel_error']:.1e} | {others} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None,
                    help="timing repeats (default 21; 3 with --quick); prep runs 3 times (1)")
    ap.add_argument("--quick", action="store_true", help="two widths, two depths, short timing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    opts = Options.quick() if args.quick else Options()
    if args.repeats:
        opts = dataclasses.replace(opts, repeats=args.repeats)
    result = run(opts, 1 if args.quick else 3, args.quick,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    result["flags"] = " ".join(charness.flags())
    out = Path(args.out)
    text = markdown(result)
    write_results(out, "scaling", result, text)
    print(text)
    print(f"wrote {out / 'scaling.md'} and {out / 'scaling.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
