"""The digits MLP on emulated Cortex-M cores: flash, RAM, instructions, accuracy; and the
MLPerf Tiny DS-CNN's and ResNet-8's inference on the Cortex-M4F.

    python -m benchmarks.embedded [--spec examples/digits/spec.yaml] [--out benchmarks/results]

Needs arm-none-eabi-gcc, newlib and qemu-system-arm (Debian: gcc-arm-none-eabi
libnewlib-arm-none-eabi qemu-system-arm). Writes embedded.md and embedded.json.

- Flash and RAM: `arm-none-eabi-size` of graphc's size probes (codegen/firmware.py):
  static arrays sized by the header's macros, one call of each entry point, startup code,
  libm, no stdio. Flash = text + data (code, constants, initial values of .data);
  RAM = data + bss (static); the stack's high-water mark is measured on QEMU.
- Instructions: SysTick under `qemu-system-arm -icount shift=0`, where every guest
  instruction advances virtual time by 1 ns; ticks are converted to instructions with a
  2-instruction calibration loop, and each figure is the difference between 2k and k
  calls divided by k, so the timing code cancels. These are instructions retired in
  QEMU's TCG model, exact to one SysTick tick (40 instructions) over k calls, and
  deterministic; they are not cycles (QEMU models no pipeline, wait states or FPU
  latency).
- Accuracy: `codegen/harness.py`'s program on the target (forward, gradients, one Adam
  step), against the NumPy reference in float64 on the same float32 params and inputs.
- MLPerf Tiny (examples/tiny/ds_cnn.yaml, resnet8.yaml; `--no-tiny` leaves them out):
  inference as deployed, the params baked into flash (`graphc compile --params`), one
  example: the memory report's flash, RAM and stack, the arena against the liveness bound,
  `<name>_predict` on the M4F against the reference, and instructions per inference (the
  forward entry, the same kernels reading the params from RAM).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import sympy as sp

from . import write_results

import graphc
from codegen import firmware
from graphc.init import initial_params
from codegen.targets import BOARDS, TARGETS
from graphc.ir import BATCH, SUM
from graphc.model import as_graph
from graphc.verify import sample_inputs

ROOT = Path(__file__).resolve().parent.parent
# (target whose C is built, board it runs on)
CORES = [("cortex-m4", "mps2-an386"), ("cortex-m0", "mps2-an385"), ("cortex-m0", "microbit")]
COUNTED = [("forward", 1, 40), ("forward", 32, 2), ("train_step", 1, 20), ("train_step", 32, 2)]


def rel_errors(got: dict, graph, cm, flat, inputs, params=None) -> dict:
    ref = graphc.reference(graph)
    ref.set_params(params if params is not None else {
        p: flat[cm.param_offsets[p]:cm.param_offsets[p] + int(np.prod(v.shape))]
        .astype(np.float64).reshape(v.shape) for p, v in graph.params.items()})
    x = {k: v.astype(np.float64) for k, v in inputs.items()}

    def rel(a, b):
        a, b = np.ravel(a), np.ravel(b)
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    out = {o: rel(got[o], w) for o, w in ref.forward(**x).items()}
    if "train_loss" in got:
        loss, grads = ref.gradients(**x)
        out["grads"] = rel(got["grads"], np.concatenate([grads[p].ravel() for p in graph.params]))
        ref.train_step(**x)
        after = np.concatenate([ref.get_params()[p].ravel() for p in graph.params])
        out["params after one step"] = rel(got["params"], after)
    return out


def sizes(spec, tmp: Path) -> dict:
    out = {}
    for target, board in [("cortex-m4", "mps2-an386"), ("cortex-m0", "microbit")]:
        for batch in (1, 32):
            graph, cm = graphc.generate(spec, target=target, max_batch=batch)
            rep = firmware.firmware_sizes(cm, target, initial_params(graph, cm), batch,
                                          tmp / f"size-{board}-{batch}")
            out[f"{board} batch {batch}"] = rep
    return out


def counts(spec, tmp: Path) -> dict:
    out = {}
    for target, board in CORES:
        if BOARDS[board].ram < 64 << 10:
            continue  # training the digits MLP needs ~39 KB of RAM at batch 1
        graph, cm = graphc.generate(spec, target=target)
        flat = initial_params(graph, cm)
        inputs = sample_inputs(graph, 32, seed=0)
        d = firmware.write_model(tmp / f"count-{board}", cm,
                                 firmware.counter(cm, flat, inputs, COUNTED))
        elf = firmware.build(d, board)
        t0 = time.perf_counter()
        done = firmware.run(elf, board, icount=True, timeout=300)
        seconds = time.perf_counter() - t0
        if done.status:
            raise firmware.FirmwareError(f"{board}: status {done.status}\n{done.stderr}")
        parsed = firmware.parse_counts(done.stdout)
        out[board] = {"core": BOARDS[board].core,
                      "forward_multiply_adds": multiply_adds(cm.entries["forward"].program),
                      "instructions_per_tick": parsed["instructions_per_tick"],
                      "qemu_seconds": round(seconds, 2),
                      "per_call": {f"{k} batch {n}": round(v) for (k, n), v
                                   in parsed["instructions"].items()}}
    return out


def accuracy(spec, tmp: Path) -> dict:
    out = {}
    for target, board in CORES:
        graph, cm = graphc.generate(spec, target=target)
        inputs = {k: v.astype(np.float32) for k, v in sample_inputs(graph, 8, seed=1).items()}
        if BOARDS[board].ram < 64 << 10:  # inference with baked params on the 16 KiB M0
            params = graphc.compile(spec, seed=1).get_params()
            graph, cm = graphc.generate(spec, target=target, params=params)
            got = firmware.run_harness(cm, None, inputs, board, tmp / f"acc-{board}")
            errs = rel_errors(got, graph, cm, None, inputs, params)
        else:
            flat = initial_params(graph, cm, seed=1).astype(np.float32)
            got = firmware.run_harness(cm, flat, inputs, board, tmp / f"acc-{board}",
                                       train_steps=1)
            errs = rel_errors(got, graph, cm, flat, inputs)
        out[board] = {"batch": 8, "max_relative_error": errs}
    return out


TINY = [ROOT / "examples/tiny/ds_cnn.yaml", ROOT / "examples/tiny/resnet8.yaml"]
# The Cortex-M4F target with its contractions as plain loops, for comparison.
PLAIN_M4 = dataclasses.replace(TARGETS["cortex-m4"], unrolled=False)


def multiply_adds(program) -> int:
    """Multiply-adds per example of a program: the terms of its sums of products of two
    or more reads (dense layers, convolutions, matmuls; a padded tap counts)."""
    total = 0
    for k in program.kernels:
        if k.mode == SUM and isinstance(k.body, sp.Mul) and \
                sum(bool(f.atoms(sp.Indexed)) for f in k.body.args) >= 2:
            total += math.prod(1 if e == BATCH else int(e) for _, e in k.loops)
    return total


def forward_instructions(cm, flat, x: dict, calls: int) -> float:
    """Instructions of one forward call of `cm` at batch 1 on the Cortex-M4F, the params
    `flat` read from RAM."""
    with tempfile.TemporaryDirectory(prefix="graphc-count-") as tmp:
        d = firmware.write_model(tmp, cm, firmware.counter(cm, flat, x, [("forward", 1, calls)]))
        done = firmware.run(firmware.build(d, "mps2-an386"), "mps2-an386", icount=True,
                            timeout=600)
    if done.status:
        raise firmware.FirmwareError(f"mps2-an386: status {done.status}\n{done.stderr}")
    return firmware.parse_counts(done.stdout)["instructions"][("forward", 1)]


# The 64-32-10 ReLU MLP (issue 15's yardstick for instructions per multiply-add).
RELU_MLP = {"name": "relu_mlp", "inputs": {"x": [64], "y": [10]},
            "params": {"W1": {"shape": [32, 64], "init": "he_normal"}, "b1": [32],
                       "W2": {"shape": [10, 32], "init": "glorot_uniform"}, "b2": [10]},
            "nodes": {"h1": {"op": "dense", "inputs": ["x", "W1", "b1"]},
                      "a1": {"op": "relu", "inputs": ["h1"]},
                      "logits": {"op": "dense", "inputs": ["a1", "W2", "b2"]},
                      "loss": {"op": "softmax_cross_entropy", "inputs": ["logits", "y"]}},
            "outputs": ["logits"], "loss": "loss", "optimizer": {"name": "adam", "lr": 0.001}}


def tiny_inference(spec, tmp: Path, seed: int = 1, calls: int = 1, plain: bool = False) -> dict:
    """One model's inference on the Cortex-M4F (mps2-an386) at batch 1, params baked;
    instructions per call (over `calls` calls) as printed for the target and, with `plain`,
    with plain loops to compare."""
    from codegen.report import add_firmware, memory_report
    graph = as_graph(spec)
    params = graphc.compile(graph, seed=seed).get_params()
    _, baked = graphc.generate(graph, target="cortex-m4", params=params)
    report = add_firmware(memory_report(baked), baked, "cortex-m4", None, tmp / "size")
    if "missing" in report["firmware"]:
        raise firmware.FirmwareError(report["firmware"]["missing"])
    x = {"x": sample_inputs(graph, 1, seed=seed)["x"].astype(np.float32)}
    got = firmware.run_harness(baked, None, x, "mps2-an386", tmp / "acc", timeout=300)
    errors = rel_errors(got, graph, baked, None, x, params)

    def count(target) -> float:   # the forward entry as `target` prints it
        _, cm = graphc.generate(graph, target=target)
        return forward_instructions(cm, initial_params(graph, cm, seed), x, calls)
    instructions = count("cortex-m4")
    macs = multiply_adds(baked.entries["predict"].program)
    predict, fw = report["entries"]["predict"], report["firmware"]["inference"]
    return {"model": graph.name, "params": report["params"], "flash": fw["flash"],
            "ram": fw["ram"], "stack": fw.get("stack"), "arena": predict["arena"],
            "live_peak": predict["live_peak"], "io": report["inference_total"] - predict["work"],
            "model_code": report["firmware"]["model_object"]["text"],
            "instructions": round(instructions), "multiply_adds": macs,
            "instructions_per_mac": round(instructions / macs, 2),
            **({"plain_instructions_per_mac": round(count(PLAIN_M4) / macs, 2)} if plain else {}),
            "max_relative_error": max(errors.values())}


def tiny_markdown(rows: list[dict]) -> list[str]:
    lines = ["## Inference on the Cortex-M4F (mps2-an386): an MLP and MLPerf Tiny", "",
             "Batch 1, float32, params baked into flash (`graphc compile --target cortex-m4 "
             "--params`). Flash and RAM as above (the size probe of `<name>_predict`); the "
             "arena is the planned work arena, the bound the most bytes live at once; "
             "instructions per inference as above (the forward entry: the same kernels, "
             "params read from RAM). Multiply-adds are counted from the forward program "
             "(every term of a sum of products, padded taps included); instructions per "
             "multiply-add divide the whole inference by them (activations, batch norm and "
             "pooling included), for the C as printed for the target (rows of accumulators, "
             "codegen/cortexm_kernels.py) and as plain loops. Error against the NumPy "
             "float64 reference on the same params and input.", "",
             "| model | params (bytes) | flash | RAM | stack | arena | liveness bound | "
             "inputs + outputs | model object (code, params) | instructions | "
             "multiply-adds | instructions per multiply-add | plain loops | "
             "max relative error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']} | {r['flash']} | {r['ram']} | "
                     f"{r['stack']} | {r['arena']} | {r['live_peak']} | {r['io']} | "
                     f"{r['model_code']} | {r['instructions']:,} | {r['multiply_adds']:,} | "
                     f"{r['instructions_per_mac']} | {r['plain_instructions_per_mac']} | "
                     f"{r['max_relative_error']:.2e} |")
    return lines + [""]


def markdown(result: dict) -> str:
    lines = [f"# {result['model']} on emulated Cortex-M", "",
             f"Spec `{result['spec']}`, float32, Adam. Toolchain: {result['toolchain']}; "
             f"{result['qemu']}. Generated by `python -m benchmarks.embedded`.", "",
             "## Flash and RAM (bytes)", "",
             "Size probes: static arrays sized by the header's macros, one call of each entry "
             "point, graphc's startup code, newlib-nano and libm, no stdio. flash = text + data, "
             "RAM = data + bss (static); the stack is measured on QEMU and comes on top. "
             "Inference keeps the params `const` in flash; training keeps params, Adam state "
             "and the work arena in RAM and also runs the forward pass.", "",
             "| board | batch | inference flash | inference RAM | stack | training flash | "
             "training RAM | stack | model code alone |", "|---|---|---|---|---|---|---|---|---|"]
    for key, s in result["sizes"].items():
        inf, tr = s["inference"], s.get("training", {})
        fits = "" if tr.get("fits", True) else " (does not fit 16 KiB)"
        lines.append(f"| {s['board']} ({s['core']}) | {s['batch']} | {inf['flash']} | "
                     f"{inf['ram']} | {inf.get('stack', '')} | {tr.get('flash', '')} | "
                     f"{tr.get('ram', '')}{fits} | {tr.get('stack', '')} | "
                     f"{s['model_object']['text']} |")
    lines += ["", "## Instructions per call", "",
              "Instructions retired in QEMU's TCG model (`-icount shift=0`: one instruction = "
              "1 ns of virtual time), read from SysTick (25 MHz: 40 instructions per tick, "
              "calibrated with a 2-instruction loop) as the difference between 2k and k calls "
              "divided by k. Deterministic; not cycles: QEMU models no pipeline, wait states "
              "or FPU latency. The M3 has no FPU: its float arithmetic is libgcc calls.", "",
              "| board | " + " | ".join(f"{k} batch {n}" for k, n, _ in COUNTED) +
              " | forward batch 1 per multiply-add |", "|---|" + "---|" * (len(COUNTED) + 1)]
    for board, c in result["instructions"].items():
        per_mac = c["per_call"]["forward batch 1"] / c["forward_multiply_adds"]
        lines.append(f"| {board} ({c['core']}) | " + " | ".join(
            f"{c['per_call'][f'{k} batch {n}']:,}" for k, n, _ in COUNTED) +
            f" | {per_mac:.2f} |")
    lines += ["", "## Accuracy on the target", "",
              "Max over elements of |target − reference| / max |reference| per array; "
              "reference: NumPy float64 on the same float32 params and inputs, batch 8.", "",
              "| board | what ran | " + "max relative error |", "|---|---|---|"]
    for board, a in result["accuracy"].items():
        what = ", ".join(a["max_relative_error"])
        lines.append(f"| {board} | {what} | {max(a['max_relative_error'].values()):.2e} |")
    lines.append("")
    if result.get("tiny"):
        lines += tiny_markdown(result["tiny"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    digits = ROOT / "examples/digits/spec.yaml"   # the same 64-32-10 net as examples/mlp.yaml
    ap.add_argument("--spec", default=str(digits if digits.exists() else
                                          ROOT / "examples/mlp.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--no-tiny", action="store_true", help="leave out the MLPerf Tiny models")
    args = ap.parse_args()
    missing = firmware.missing_tools(run=True)
    if missing:
        raise SystemExit(f"benchmarks.embedded: {missing}")
    spec = Path(args.spec)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphc-embedded-") as tmp:
        tmp = Path(tmp)
        result = {
            "model": graphc.load(spec).name,
            "spec": str(spec.resolve().relative_to(ROOT)) if spec.resolve().is_relative_to(ROOT)
            else str(spec),
            "toolchain": subprocess.run([firmware.CC, "--version"], capture_output=True,
                                        text=True).stdout.splitlines()[0],
            "qemu": subprocess.run([firmware.QEMU, "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0],
            "host": platform.machine(),
            "sizes": sizes(spec, tmp), "instructions": counts(spec, tmp),
            "accuracy": accuracy(spec, tmp),
            "tiny": [tiny_inference(RELU_MLP, tmp / "relu_mlp", calls=40, plain=True)] +
            ([] if args.no_tiny else [tiny_inference(s, tmp / s.stem, plain=True)
                                      for s in TINY]),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    text = markdown(result)
    write_results(out, "embedded", result, text)
    print(text)
    print(f"wrote {out / 'embedded.md'} and {out / 'embedded.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
