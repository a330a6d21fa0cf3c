"""graphc against its peers on the workloads of issues 6 and 15, all timed in one run.

    python -m benchmarks [--workloads W1,W2,W3,W4,W5,W6,W7,P]
                         [--peers numpy,torch,torch_compile,jax,onnxruntime,casadi,pytensor]
                         [--repeats N] [--quick] [--no-competitor] [--out benchmarks/results]
                         [--keep]

Workloads (benchmarks/workloads.py): W1/W2 MLP 64-32-10 at batch 1, W3/W4 784-256-128-10
at batch 128, a train step (forward, backward, SGD) and a forward pass; W5 LeNet-5's SGD
step at batch 64; W6.1/W6.64 (`W6`: both) MLPerf Tiny's ResNet-8 forward at batch 1 and
64; W7 its DS-CNN forward at batch 1; P: spec → loaded module, cold and warm cache, for
W1's and W3's nets; S (not by default): the scaling table of benchmarks/scaling.py; C (not
by default): the digits CNN's train step and training against PyTorch eager
(benchmarks/cnn.py, written to cnn.md and cnn.json); O (not by default): imported ONNX
models against onnxruntime (benchmarks/onnx_models.py, onnx.md).

graphc is always run (benchmarks/peers/graphc.py: `graphc.compile`'s default target first,
then host and c99): its default target's float32 results are what every peer is checked
against (1e-4 relative) before it is timed, and its timings are what the ratios divide.
Its rows from Python are timed in a process of their own (benchmarks/graphc_timing.py),
where graphc starts its OpenMP runtime, not PyTorch's copy loaded here. Every row of W1-W7 is timed twice: quiet (retried while other processes keep the machine
busy), then again with one busy competitor process that the run starts before the
workload's second pass and stops after it (`machine.competitor`); peers are timed beside
the same competitor. A peer that is not installed, or does not run a workload, is skipped
with a note. Writes benchmarks.md and benchmarks.json to --out and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

from . import cnn, machine, onnx_models, prep, scaling, write_results
from .peers import NAMES, Skip, load
from .timing import Options
from .workloads import CHECK_RTOL, LR, WORKLOADS, check, problem

ROOT = Path(__file__).resolve().parent.parent
ALL = (*WORKLOADS, "P", "S", "C", "O")
DEFAULT = "W1,W2,W3,W4,W5,W6.1,W6.64,W7,P"


@dataclasses.dataclass(frozen=True)
class Target:
    """graphc at least `factor` times faster than the peer, quiet and beside the competitor.
    `against`: graphc's figure the peer's is divided by: "bound" (the bound call), or None
    for the row's own kind (pure C against C peers, graphc from Python against Python ones)."""
    factor: float
    against: str | None = None


FASTEST = ("jax", "torch", "torch_compile", "onnxruntime")
# The issues' targets, (workload, peer) -> Target. Issue 15's "≥ 1.0× the fastest of JAX,
# PyTorch and onnxruntime" is ≥ 1.0× each of them.
TARGETS = {**{(w, "casadi"): Target(4.0) for w in ("W1", "W2")},
           **{(w, "pytensor"): Target(3.0) for w in ("W1", "W2")},
           **{(w, "jax"): Target(5.0) for w in ("W1", "W2")},
           **{(w, "torch"): Target(30.0) for w in ("W1", "W2")},
           **{("W4", "jax"): Target(1.0)},
           **{(w, p): Target(1.0) for w in ("W3", "W5", "W6.64") for p in FASTEST},
           **{(w, "onnxruntime"): Target(2.0, "bound") for w in ("W6.1", "W7")},
           **{(w, "torch"): Target(5.0, "bound") for w in ("W6.1", "W7")}}
BUSY_LIMIT = 1.5   # issue 15: beside one competitor, no graphc row above 1.5× its quiet time
PEAK = ("W3", "W4")   # workloads also given as a fraction of the GEMM peak
PREP_NETS = {"W1": (64, 32, 10), "W3": (784, 256, 128, 10)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_workload(key: str, peers: list[str], opts: Options, workdir: Path,
                 competitor: bool = True) -> dict:
    w = WORKLOADS[key]
    prob = problem(w)
    out = {"title": w.title, "flops": w.flops(), "load_before": os.getloadavg(),
           "speed_before": machine.core_speed(), "rows": []}
    mine = load("graphc").runners(prob, workdir)
    prob.expected = mine[0].results()    # graphc from Python, fresh: the reference
    timed, reference = [], {}
    for r in mine:
        row = _measure("graphc", r, prob, opts, checked=r is not mine[0])
        row["reference"] = r is mine[0]
        reference.setdefault(r.kind, row)   # the default target's, listed first
        timed.append((row, r))
    for name in peers:
        try:
            version = load(name).version()
            runners = load(name).runners(prob, workdir)
        except Skip as e:
            out["rows"].append({"peer": name, "label": name, "skipped": str(e)})
            continue
        except Exception as e:   # a peer that breaks must not stop the others
            traceback.print_exc()
            out["rows"].append({"peer": name, "label": name, "skipped": f"error: {e}"})
            continue
        for r in runners:
            row = _measure(name, r, prob, opts)
            row["version"] = version
            timed.append((row, r))
    if competitor:
        log("  beside one busy competitor:")
        with machine.competitor():
            for row, r in timed:
                if "median_s" in row:
                    _measure_busy(row, r, opts)
    for row, _ in timed:
        if row["peer"] == "graphc":
            if "busy_ratio" in row:
                row["busy_met"] = row["busy_ratio"] <= BUSY_LIMIT
        elif "median_s" in row:
            _compare(key, row, reference)
    out["rows"] = [row for row, _ in timed] + out["rows"]
    out["load_after"] = os.getloadavg()
    out["speed_after"] = machine.core_speed()
    return out


def _measure(peer: str, r, prob, opts: Options, checked: bool = True) -> dict:
    log(f"  {r.label}")
    row = {"peer": peer, "label": r.label, "kind": r.kind, "notes": r.notes}
    try:
        err = check(prob, r.results()) if checked else 0.0
        row["check_rel_error"] = err
        if not err <= CHECK_RTOL:
            row["skipped"] = f"check failed: relative error {err:.2g} > {CHECK_RTOL}; not timed"
            return row
        t, foreign, attempts = machine.quietly(lambda: r.time(opts), opts)
    except Exception as e:
        traceback.print_exc()
        row["skipped"] = f"error: {e}"
        return row
    row.update(median_s=t.median, min_s=t.min, calls=t.calls, repeats=t.repeats,
               foreign_cores=foreign, attempts=attempts)
    if prob.workload.key in PEAK:
        row["gflops"] = prob.workload.flops() / t.median / 1e9
    return row


def _measure_busy(row: dict, r, opts: Options) -> None:
    """The row again, beside the competitor: busy_* figures and busy / quiet."""
    log(f"  {r.label} (beside the competitor)")
    try:
        t, foreign, attempts = machine.quietly(lambda: r.time(opts),
                                               machine.beside_competitor(opts))
    except Exception as e:
        traceback.print_exc()
        row["busy_skipped"] = f"error: {e}"
        return
    row.update(busy_median_s=t.median, busy_min_s=t.min, busy_foreign_cores=foreign,
               busy_attempts=attempts, busy_ratio=t.median / row["median_s"])


def _compare(key: str, row: dict, reference: dict) -> None:
    """A peer's speedups: its median over graphc's (quiet, and beside the competitor), and
    its target."""
    mine = reference.get(row["kind"], {})
    if "median_s" not in mine:   # graphc's own row failed: nothing to divide by
        return
    row["vs"] = mine["label"]
    for prefix in ("", "busy_"):
        if f"{prefix}median_s" not in row:
            continue
        for kind, name in ((row["kind"], "speedup"), ("c", "speedup_vs_c"),
                           ("bound", "speedup_vs_bound")):
            theirs = reference.get(kind, {}).get(f"{prefix}median_s")
            if theirs and (kind != "bound" or row["kind"] == "python"):
                row[prefix + name] = row[f"{prefix}median_s"] / theirs
    row["speedup_min"] = row["min_s"] / mine["min_s"]
    target = TARGETS.get((key, row["peer"]))
    if target:
        figure = "speedup_vs_bound" if target.against == "bound" else "speedup"
        row["target"], row["target_against"] = target.factor, target.against or row["kind"]
        if figure in row:
            row["met"] = row[figure] >= target.factor
        if "busy_" + figure in row:
            row["busy_met"] = row["busy_" + figure] >= target.factor


def run_prep(repeats: int) -> dict:
    """Spec → loaded module in fresh processes, as benchmarks/prep.py measures it."""
    out = {}
    options = {"target": "host", "optimizer": {"name": "sgd", "lr": LR}}
    for key, sizes in PREP_NETS.items():
        log(f"P: {key} net {'-'.join(map(str, sizes))}")
        cold, warm = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="graphc-prep-") as cache:
                cold.append(prep.run(list(sizes), cache, **options))
                warm.append(prep.run(list(sizes), cache, **options))
        total = {"cold": [c["graph"] + c["compile"] for c in cold],
                 "warm": [c["graph"] + c["compile"] for c in warm]}
        out[key] = {"sizes": list(sizes), "repeats": repeats,
                    "import_s": statistics.median(c["import"] for c in cold),
                    "cold_s": statistics.median(total["cold"]), "cold_min_s": min(total["cold"]),
                    "warm_s": statistics.median(total["warm"]), "warm_min_s": min(total["warm"]),
                    "again_s": statistics.median(c["again"] for c in warm),
                    "again_min_s": min(c["again"] for c in warm),
                    "init_s": statistics.median(c["init"] for c in cold),
                    "c_bytes": cold[0]["c_bytes"],
                    # a cold run must build; a warm one that does not find its build means the
                    # generated C changed in between (graphc's sources edited during the run)
                    "cold_cached": [c["cached"] for c in cold],
                    "warm_cached": [c["cached"] for c in warm]}
    return out


# ---------------------------------------------------------------- the report

def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _met(ok: bool | None) -> str:
    return "" if ok is None else "met" if ok else "**missed**"


def _target_cell(r: dict) -> str:
    if r["peer"] == "graphc":
        return f"busy ≤ {BUSY_LIMIT:g}× quiet: {_met(r['busy_met'])}" if "busy_met" in r else ""
    if "target" not in r:
        return ""
    against = {"c": "C", "python": "Python", "bound": "bound"}[r["target_against"]]
    cell = f"≥ {r['target']:g} vs {against}: {_met(r.get('met'))}"
    if r["target_against"] == "python" and r.get("met") is False \
            and r.get("speedup_vs_bound", 0) >= r["target"]:
        cell += " (met by the bound call)"
    if "busy_met" in r:
        cell += f"; busy: {_met(r['busy_met'])}"
    return cell


def _targets_table(workloads: dict) -> list[str]:
    """Every row that has a target, in one place: met or missed, quiet and busy."""
    lines = []
    for key, wl in workloads.items():
        for r in wl["rows"]:
            if "median_s" not in r or not ("target" in r or "busy_met" in r):
                continue
            if r["peer"] == "graphc":
                goal, quiet = f"busy ≤ {BUSY_LIMIT:g}× quiet ({r['busy_ratio']:.2f}×)", ""
            else:
                figure = "speedup_vs_bound" if r["target_against"] == "bound" else "speedup"
                against = {"c": "pure C", "python": "from Python", "bound": "bound call"}
                goal = f"graphc ({against[r['target_against']]}) ≥ {r['target']:g}× it"
                quiet = f"{_met(r.get('met'))} ({r[figure]:.2f}×)" if figure in r else ""
                busy = r.get("busy_" + figure)
            busy_cell = _met(r.get("busy_met"))
            if r["peer"] != "graphc" and busy is not None:
                busy_cell += f" ({busy:.2f}×)"
            lines.append(f"| {key} | {r['label']} | {goal} | {quiet} | {busy_cell} |")
    if not lines:
        return []
    return ["## Targets", "",
            "Each row with a target (details in its workload's table); graphc's rows are held "
            f"to busy / quiet ≤ {BUSY_LIMIT:g}, peers to graphc's speedup over them, quiet and "
            "beside the competitor.", "",
            "| workload | row | target | quiet | busy |", "|---|---|---|---|---|", *lines, ""]


def _speed_note(wl: dict) -> str:
    """The core speed probes around a workload (machine.core_speed), if it has them."""
    if "speed_before" not in wl:
        return ""
    return (f" Core speed probe (one thread's 128² float32 product): "
            f"{wl['speed_before']:.1f} GFLOP/s before, {wl['speed_after']:.1f} after.")


def _workload_table(key: str, wl: dict, gemm: dict | None) -> list[str]:
    lines = [f"## {key}: {wl['title']}", "",
             f"Load average {wl['load_before'][0]:.2f} before, {wl['load_after'][0]:.2f} "
             f"after. {wl['flops'] / 1e6:.3g} MFLOP of matrix products and convolutions per "
             f"call.{_speed_note(wl)}", "",
             "| peer | median | min | busy | busy / quiet | check | graphc × | graphc × busy "
             "| target | others' load (quiet, busy) |" + (" GFLOP/s | of GEMM peak |" if gemm else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gemm else "")]
    notes = []
    for r in wl["rows"]:
        if "median_s" not in r:
            notes.append(f"- {r['label']}: {r['skipped']}")
            continue
        vs = (f"{r['speedup']:.2f} (vs {'C' if r['kind'] == 'c' else 'Python'})"
              if "speedup" in r else "")
        if "speedup_vs_bound" in r:
            vs += f", {r['speedup_vs_bound']:.2f} (vs bound)"
        busy_vs = f"{r['busy_speedup']:.2f}" if "busy_speedup" in r else ""
        if "busy_speedup_vs_bound" in r:
            busy_vs += f", {r['busy_speedup_vs_bound']:.2f} (vs bound)"
        busy = (f"{fmt_time(r['busy_median_s'])} | {r['busy_ratio']:.2f}"
                if "busy_median_s" in r else f"{r.get('busy_skipped', '')} | ")
        checked = "reference" if r.get("reference") else f"{r['check_rel_error']:.1e}"
        others = ", ".join("" if r.get(k) is None else f"{r[k]:.2f}"
                           for k in ("foreign_cores", "busy_foreign_cores"))
        line = (f"| {r['label']} | {fmt_time(r['median_s'])} | {fmt_time(r['min_s'])} | {busy} | "
                f"{checked} | {vs} | {busy_vs} | {_target_cell(r)} | {others} |")
        if gemm:
            line += f" {r['gflops']:.1f} | {r['gflops'] / gemm['peak_gflops']:.1%} |"
        lines.append(line)
    if notes:
        lines += ["", "Not timed:"] + notes
    return lines + [""]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# graphc benchmarks", "",
             f"`{result['command']}` on {result['date']}.", "",
             f"- Machine: {m['cpu']} ({m['cpu_id']}), {m['cores']} cores ({m['cores_usable']} usable), "
             f"SIMD {' '.join(m['simd']) or 'none found'}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['load_average'])} (1, 5, 15 min).",
             f"- Compiler: {m['compiler']}; graphc's C (module and timing harness) and "
             f"CasADi's C compiled with `{m['graphc_flags']}`.",
             f"- Python {m['python']}, {m['platform']}; NumPy's BLAS: {m['numpy_blas']}.",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
             f"- Timing: warm-up {result['options']['warmup']} s, then K calls per repeat "
             f"(K doubled until a repeat takes ≥ {result['options']['min_repeat'] * 1e3:g} ms), "
             f"{result['options']['repeats']} repeats; median and min per call. Python peers "
             "with `time.perf_counter`, C with `clock_gettime(CLOCK_MONOTONIC)` in a generated "
             "`main` (benchmarks/charness.py), the same way.",
             f"- Every peer starts from the same params and batch, and its losses of the first "
             f"two steps (before and after one SGD step, lr {LR}), or its logits, match "
             f"graphc's float32 ones to {CHECK_RTOL:g} relative before it is timed (column "
             "*check*: max relative difference).",
             "- *graphc ×*: the peer's median over graphc's (how many times faster graphc is): "
             "C peers against graphc's pure C, Python peers against graphc from Python "
             "(`model.train_step(x=, y=)` / `model.forward(x=)` on the default target: "
             "kwargs, checks, new output arrays) and against its bound call (`model.bind`, "
             "the same C as a call without arguments on fixed arrays). *others' load*: cores "
             "kept busy by other processes while the row was timed (from /proc/stat); on a "
             "shared 2-core machine a row timed with other work running, especially a "
             "multi-threaded one, is slower than the machine can do, so a row is timed again "
             f"(up to {result['options']['retries']} times, {result['options']['pause']:g} s "
             f"apart) while that exceeds {result['options']['busy']:g} cores, and the quietest "
             "attempt is kept.",
             "- *busy*: the same row timed again beside one busy-looping process that the "
             "benchmark starts before a workload's second pass and stops after it (every peer "
             "beside the same competitor); *busy / quiet*: that median over the quiet one; "
             "*graphc × busy*: the peer's busy median over graphc's busy median. Beside it, "
             "*others' load* counts the competitor's core too (retried above "
             f"{result['options']['busy'] + 1:g})." if result["options"].get("competitor", True)
             else "- *busy*: not measured (`--no-competitor`).",
             "- *target*: the issues' (graphc at least that many times faster, against the "
             "figure named, quiet and busy); for graphc's rows issue 15's busy / quiet ≤ "
             f"{BUSY_LIMIT:g}.", ""]
    gemm = result.get("gemm")
    lines += _targets_table(result["workloads"])
    for key in [k for k in WORKLOADS if k in result["workloads"]]:
        lines += _workload_table(key, result["workloads"][key], gemm if key in PEAK else None)
    if gemm:
        lines += ["## Float32 GEMM peak", "",
                  f"`np.matmul` (NumPy's BLAS: {gemm['blas']}), and `torch.matmul` and a "
                  "jitted JAX `x @ y` when installed. The peak is the best GFLOP/s of a "
                  f"fastest repeat below, **{gemm['peak_gflops']:.1f} GFLOP/s** "
                  f"({gemm['peak_from']}); W3/W4's *of GEMM peak* divides their median "
                  "GFLOP/s by it. It is what these libraries reach, not the CPU's "
                  "arithmetic limit: code using wider SIMD than the BLAS kernel can exceed it.", "",
                  "| shape (m×k·k×n) | library | threads | median | min | GFLOP/s (median) | "
                  "GFLOP/s (min) | others' load |", "|---|---|---|---|---|---|---|---|"]
        for g in gemm["rows"]:
            lines.append(f"| {g['shape']} ({g['m']}×{g['k']}·{g['k']}×{g['n']}) | "
                         f"{g['library']} | {g['threads']} | {fmt_time(g['median_s'])} | "
                         f"{fmt_time(g['min_s'])} | {g['gflops']:.1f} | {g['gflops_best']:.1f} | "
                         + ("" if g["foreign_cores"] is None else f"{g['foreign_cores']:.2f}") + " |")
        lines.append("")
    if "prep" in result:
        lines += ["## P: spec → loaded module", "",
                  "Fresh process per measurement (benchmarks/prep.py; bytecode cached as for "
                  "an installed package): graph from the spec, "
                  "derive, emit, build and load (target host, SGD), median (min) of "
                  f"{next(iter(result['prep'].values()))['repeats']}; cold: an empty build "
                  "cache, warm: the module already built; *warm, same process*: a second "
                  "`graphc.compile` of the graph in that process, whose modules are imported "
                  "(most of a fresh process's warm time is first imports: numpy.random, "
                  "codegen's targets and plan, cffi's backend). *init*: the part of cold that "
                  "draws the initial params. The issue asks ≤ 1 s cold for W3, a few ms warm.",
                  "", "| net | import graphc | cold | warm | warm, same process | init | .c bytes |",
                  "|---|---|---|---|---|---|---|"]
        odd = []
        for key, p in result["prep"].items():
            lines.append(f"| {key}: {'-'.join(map(str, p['sizes']))} | {fmt_time(p['import_s'])} | "
                         f"{fmt_time(p['cold_s'])} ({fmt_time(p['cold_min_s'])}) | "
                         f"{fmt_time(p['warm_s'])} ({fmt_time(p['warm_min_s'])}) | "
                         f"{fmt_time(p['again_s'])} ({fmt_time(p['again_min_s'])}) | "
                         f"{fmt_time(p['init_s'])} | {p['c_bytes']:,} |")
            if not all(p["warm_cached"]) or any(p["cold_cached"]):
                odd.append(f"{key}: cold runs found a build {p['cold_cached']}, warm runs "
                           f"{p['warm_cached']}: graphc's sources changed during the run.")
        lines += [""] + odd + ([""] if odd else [])
    if "scaling" in result:
        lines.append(scaling.markdown(result["scaling"], level="##"))
    for stage, error in result.get("errors", {}).items():
        lines.append(f"{stage} failed: {error}\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=DEFAULT,
                    help=f"comma-separated, of {','.join(ALL)}; W6 is W6.1 and W6.64 "
                         f"(default {DEFAULT})")
    ap.add_argument("--peers", default=",".join(n for n in NAMES if n != "graphc"),
                    help=f"comma-separated, of {','.join(NAMES)} (graphc always runs)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timing repeats per peer (default 21; 3 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="short timing, one prep run, the small scaling table: a smoke test")
    ap.add_argument("--no-competitor", action="store_true",
                    help="time every row quiet only (no second pass beside a busy process)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"),
                    help="where benchmarks.md and benchmarks.json go (default %(default)s)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the C harnesses' build directory (sources, binaries, data: each "
                         "binary reruns as BINARY DATA CHECK REPEATS MIN_REPEAT WARMUP)")
    args = ap.parse_args(argv)
    workloads = []
    for w in (w.strip() for w in args.workloads.split(",") if w.strip()):
        # a workload's family stands for all its batch sizes: W6 is W6.1 and W6.64
        workloads += [k for k in ALL if k.split(".")[0] == w and k != w] or [w]
    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "graphc"]
    for w in workloads:
        if w not in ALL:
            ap.error(f"unknown workload {w!r} (workloads: {', '.join(ALL)})")
    for p in peers:
        if p not in NAMES:
            ap.error(f"unknown peer {p!r} (peers: {', '.join(NAMES)})")
    opts = Options.quick() if args.quick else Options()
    if args.repeats:
        opts = dataclasses.replace(opts, repeats=args.repeats)

    versions = {}
    for name in ["graphc"] + peers:
        try:
            versions[name] = load(name).version()
        except Skip as e:
            versions[name] = f"not run: {e}"
    result = {"command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine.info(), "versions": versions,
              "options": dict(dataclasses.asdict(opts), quick=args.quick,
                              competitor=not args.no_competitor),
              "workloads": {}}
    if any(w in PEAK for w in workloads):
        log("GEMM peak")
        result["gemm"] = machine.gemm_peak(opts)
    workdir = Path(tempfile.mkdtemp(prefix="graphc-bench-"))
    try:
        for key in [w for w in workloads if w in WORKLOADS]:
            log(f"{key}: {WORKLOADS[key].title}")
            result["workloads"][key] = run_workload(key, peers, opts, workdir,
                                                    not args.no_competitor)
    finally:
        if args.keep:
            log(f"C harnesses kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    stages = {"prep": lambda: run_prep(1 if args.quick else 3),
              "scaling": lambda: scaling.run(opts, 1 if args.quick else 3, args.quick, log)}
    for key, stage in zip("PS", stages):
        if key in workloads:
            try:
                result[stage] = stages[stage]()
            except Exception as e:   # keep the timings already measured
                traceback.print_exc()
                result.setdefault("errors", {})[stage] = repr(e)
    out = Path(args.out)
    if "C" in workloads:
        log("C: the digits CNN against PyTorch eager")
        text = cnn.write(cnn.run(opts, competitor_pass=not args.no_competitor,
                                 training=not args.quick),
                         out)
        print(text)
        log(f"wrote {out / 'cnn.md'} and {out / 'cnn.json'}")
        if workloads == ["C"]:
            return {}
    if "O" in workloads:
        log("O: imported ONNX models against onnxruntime")
        print(onnx_models.write(onnx_models.run(opts, not args.no_competitor), out))
        log(f"wrote {out / 'onnx.md'} and {out / 'onnx.json'}")
        if set(workloads) <= {"C", "O"}:
            return {}
    text = markdown(result)
    write_results(out, "benchmarks", result, text)
    print(text)
    log(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.json'}")
    return result


if __name__ == "__main__":
    main()
