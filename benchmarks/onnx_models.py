"""Imported ONNX models: graphc (graphc.onnx.load, then compiled) against onnxruntime on the
same file, for issue 14's benchmark.

    python -m benchmarks.onnx_models [--quick] [--out benchmarks/results]

(also `python -m benchmarks --workloads O`). Writes onnx.md and onnx.json. Models: the
digits MLP, the MLPerf Tiny DS-CNN and ResNet-8 written by `graphc.onnx.save` from their
specs (seed-0 params), and LeNet-5 exported by `torch.onnx.export` when torch is
installed. Each is checked first (graphc's forward against onnxruntime's, 1e-4 relative),
then timed at batch 1 and 64: graphc's c99 and host targets as a bound call
(`model.bind`: the C on fixed arrays, no argument conversion) and from Python
(`model.forward`), against onnxruntime's `InferenceSession.run` on one intra-op thread and
on its default. Each row records the cores others kept busy (benchmarks/machine.py); rows
timed while others used more than `Options.busy` cores are marked. Then every variant of a
model and batch is timed again beside one busy-looping process started before and stopped
after that pass (`machine.competitor`): each cell shows the quiet median, the busy one and
their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import graphc
import graphc.onnx

from . import machine, write_results
from .peers.onnxruntime import session
from .timing import Options, time_python

ROOT = Path(__file__).resolve().parent.parent
SPECS = {"digits_mlp": ROOT / "examples/digits/spec.yaml",
         "ds_cnn": ROOT / "examples/tiny/ds_cnn.yaml",
         "resnet8": ROOT / "examples/tiny/resnet8.yaml"}
BATCHES = (1, 64)
CHECK_RTOL = 1e-4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _lenet(path: Path) -> Path | None:
    """LeNet-5 from torch.onnx.export (TorchScript exporter, dynamic batch), or None."""
    try:
        import torch
    except ImportError:
        return None
    from .peers.torch import lenet5
    torch.manual_seed(0)
    net = lenet5().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 1, 28, 28),), str(path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}},
                          dynamo=False)
    return path


def models(folder: Path) -> dict[str, Path]:
    out = {}
    for name, spec in SPECS.items():
        out[name] = graphc.onnx.save(graphc.load(spec), folder / f"{name}.onnx")
    lenet = _lenet(folder / "lenet5.onnx")
    if lenet is not None:
        out["lenet5_torch"] = lenet
    return out


def run_model(name: str, path: Path, opts: Options, competitor: bool = True) -> list[dict]:
    graph = graphc.onnx.load(path)
    (input_name,) = graph.inputs
    (output,) = graph.outputs
    onnx_input = graph.onnx_names.get(input_name, input_name)
    compiled = {t: graphc.compile(graph, target=t) for t in ("c99", "host")}
    rows = []
    for n in BATCHES:
        x = np.random.default_rng(n).normal(size=(n, *graph.inputs[input_name].shape)) \
            .astype(np.float32)
        want = session(path, None).run(None, {onnx_input: x})[0]
        for target, model in compiled.items():
            got = model.forward(**{input_name: x})[output]
            error = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            if not error <= CHECK_RTOL:
                raise AssertionError(f"{name}: graphc {target} and onnxruntime differ by "
                                     f"{error:.2e} at batch {n}")
        variants = []
        for target, model in compiled.items():
            bound = model.bind("forward", **{input_name: np.ascontiguousarray(x)})
            variants.append((f"graphc {target}, bound call", bound))
            variants.append((f"graphc {target}, from Python",
                             lambda m=model: m.forward(**{input_name: x})))
        for threads in (1, None):
            variants.append((f"onnxruntime, {threads or 'default'} thread{'s' if not threads else ''}",
                             lambda s=session(path, threads): s.run(None, {onnx_input: x})))
        timed = []
        for label, fn in variants:
            log(f"{name} batch {n}: {label}")
            before = os.getloadavg()
            timing, foreign, attempts = machine.quietly(lambda: time_python(fn, opts), opts)
            timed.append({"model": name, "batch": n, "label": label, "median_s": timing.median,
                          "min_s": timing.min, "foreign_cores": foreign, "attempts": attempts,
                          "load_before": before, "load_after": os.getloadavg(),
                          "checked_rel_error": error})
        if competitor:
            with machine.competitor():
                for row, (label, fn) in zip(timed, variants):
                    log(f"{name} batch {n}: {label} (beside the competitor)")
                    timing, foreign, _ = machine.quietly(lambda: time_python(fn, opts),
                                                         machine.beside_competitor(opts))
                    row.update(busy_median_s=timing.median, busy_min_s=timing.min,
                               busy_foreign_cores=foreign,
                               busy_ratio=timing.median / row["median_s"])
        rows += timed
    return rows


def run(opts: Options, competitor: bool = True) -> dict:
    import onnxruntime
    with tempfile.TemporaryDirectory() as tmp:
        files = models(Path(tmp))
        rows = []
        for name, path in files.items():
            rows += run_model(name, path, opts, competitor)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine.info(), "onnxruntime": onnxruntime.__version__,
            "busy": opts.busy, "rows": rows}


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def markdown(result: dict) -> str:
    lines = ["# Imported ONNX models: graphc against onnxruntime", "",
             f"Generated by `python -m benchmarks.onnx_models` on {result['date']}, "
             f"onnxruntime {result['onnxruntime']}. How the rows are taken: the docstring of "
             "`benchmarks/onnx_models.py`. Median per call (forward pass, float32); the ratio is "
             "onnxruntime's fastest row over graphc's fastest bound call (quiet; busy: beside the "
             "competitor). *busy*: beside one busy-looping process, with busy / quiet in "
             f"brackets. † timed while others kept more than {result['busy']} cores busy.", ""]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["model"], r["batch"]), []).append(r)
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    lines += ["| model | batch | " + " | ".join(labels) + " | onnxruntime / graphc |",
              "|---|---|" + "---|" * (len(labels) + 1)]
    for (model, batch), rows in by.items():
        cell = {r["label"]: _cell(r, result["busy"]) for r in rows}
        ratio = _best_ratio(rows, "median_s")
        if all("busy_median_s" in r for r in rows):
            ratio += f"; busy {_best_ratio(rows, 'busy_median_s')}"
        lines.append(f"| {model} | {batch} | " + " | ".join(cell.get(k, "") for k in labels)
                     + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def _cell(r: dict, busy: float) -> str:
    """The quiet median († under others' load), then beside the competitor, and the ratio."""
    text = _fmt(r["median_s"]) + (" †" if (r["foreign_cores"] or 0) > busy else "")
    if "busy_median_s" in r:
        text += f"; busy {_fmt(r['busy_median_s'])} ({r['busy_ratio']:.2f}×)"
    return text


def _best_ratio(rows: list[dict], key: str) -> str:
    """onnxruntime's fastest row over graphc's fastest bound call."""
    graphc_best = min(r[key] for r in rows if "bound call" in r["label"])
    ort_best = min(r[key] for r in rows if r["label"].startswith("onnxruntime"))
    return f"{ort_best / graphc_best:.2f}×"


def write(result: dict, out: Path) -> str:
    text = markdown(result)
    write_results(out, "onnx", result, text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.onnx_models",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing: a smoke test")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args(argv)
    opts = Options.quick() if args.quick else Options()
    print(write(run(opts), Path(args.out)))


if __name__ == "__main__":
    main()
