"""The memory report of a generated module: what `graphc compile` prints and writes as
`<name>.memory.json`.

All figures are bytes at one batch size (the header's `<NAME>_MAX_BATCH` if stated).
Per entry point: `work` is the header's `<NAME>_<ENTRY>_WORK_SIZE(n)`; `arena` the
planned arena inside it; `live_peak` the most bytes live at once at any kernel, the lower
bound the liveness analysis gives for any arena; `no_reuse` the arena if no buffer shared
memory. On a Cortex-M target with the ARM toolchain present, `firmware` adds flash and RAM
from `arm-none-eabi-size` (codegen/firmware.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import textwrap

import numpy as np

from graphc.ir import DTYPES

from . import firmware


def memory_report(cmodule, batch: int = 1) -> dict:
    item = DTYPES[cmodule.dtype].itemsize
    n = cmodule.max_batch or batch
    e = cmodule.entries
    training = "gradients" in e
    per_example = {**{f"in_{k}": s for k, s in cmodule.input_shapes.items()},
                   **{f"out_{k}": s for k, s in cmodule.output_shapes.items()}}
    entries = {}
    for kind, entry in e.items():
        mem = entry.memory
        # train_step's update runs in the gradients' arena once they are done: its
        # temporaries (update_work) are live alone, and without reuse they would come on top.
        entries[kind] = {
            "work": (entry.work_fixed() + mem.per_example * n) * item,
            "arena": (entry.work_fixed() - entry.work_before + mem.per_example * n) * item,
            "live_peak": max(mem.live_peak(n), entry.update_work) * item,
            "no_reuse": (mem.no_reuse(n) + entry.update_work) * item,
        }
        if entry.work_before:
            entries[kind]["gradients_in_work"] = entry.work_before * item
    # int32 inputs take 4 bytes an element whatever the model's dtype
    size = {f"in_{k}": 4 for k in cmodule.input_dtypes}
    io = {k: n * max(1, math.prod(s)) * size.get(k, item) for k, s in per_example.items()}
    report = {
        "model": cmodule.name, "dtype": cmodule.dtype, "target": cmodule.target, "batch": n,
        "params": cmodule.params_size * item,
        "params_baked": cmodule.baked_params,   # then const data: flash on a microcontroller
        "gradients": cmodule.params_size * item if training else 0,
        "optimizer": (cmodule.optimizer or {}).get("name"),
        "optimizer_state": cmodule.state_size * item,
        "arrays": io,
        "entries": entries,
        "work": cmodule.work_elements(n) * item,   # <NAME>_WORK_SIZE(n): every entry point
    }
    fwd = e.get("predict") or e["forward"]
    report["inference_total"] = (0 if cmodule.baked_params else report["params"]) + \
        entries[fwd.kind]["work"] + sum(io[f"in_{i}"] for i in fwd.inputs) + \
        sum(io[f"out_{o}"] for o in fwd.outputs)
    if "train_step" in e:
        t = e["train_step"]
        report["training_total"] = report["params"] + report["optimizer_state"] + \
            entries["train_step"]["work"] + sum(io[f"in_{i}"] for i in t.inputs)
    return report


def add_firmware(report: dict, cmodule, target, params_flat, workdir=None) -> dict:
    """Flash and RAM of firmware for a Cortex-M target, if the ARM toolchain is present;
    otherwise the reason it is missing."""
    reason = firmware.missing_tools(run=False)
    if reason:
        report["firmware"] = {"missing": reason}
        return report
    with tempfile.TemporaryDirectory(prefix="graphc-firmware-") as tmp:
        try:
            report["firmware"] = firmware.firmware_sizes(cmodule, target, params_flat,
                                                         report["batch"], workdir or tmp)
        except (firmware.FirmwareError, subprocess.CalledProcessError, OSError) as e:
            # The C is written either way; a broken toolchain only costs the sizes.
            report["firmware"] = {"missing": f"the firmware build failed: {str(e).strip()}"}
    return report


def format_report(report: dict) -> str:
    lines = [f"memory at batch {report['batch']} ({report['dtype']}, bytes): "
             f"params {report['params']}{' (const)' if report['params_baked'] else ''}, "
             f"gradients {report['gradients']}, optimizer state {report['optimizer_state']}"
             + (f" ({report['optimizer']})" if report["optimizer"] else "")]
    lines.append(f"  {'entry':<11}{'work':>9}{'arena':>9}{'live peak':>11}{'no reuse':>10}")
    for kind, e in report["entries"].items():
        lines.append(f"  {kind:<11}{e['work']:>9}{e['arena']:>9}{e['live_peak']:>11}"
                     f"{e['no_reuse']:>10}")
    lines.append(textwrap.fill(
        "(work: the header's _WORK_SIZE(n), train_step's holding the gradients; arena: "
        "buffers sharing memory by liveness; live peak: most bytes live at once, the lower "
        "bound for any arena; no reuse: the arena without reuse)",
        90, initial_indent="  ", subsequent_indent="   "))
    totals = [f"inference {report['inference_total']}"]
    if "training_total" in report:
        totals.append(f"training {report['training_total']}")
    lines.append("  total RAM for arrays: " + ", ".join(totals) + " (params, state, work, I/O)")
    fw = report.get("firmware")
    if fw and "missing" in fw:
        lines.append(f"  firmware sizes skipped: {fw['missing'].splitlines()[0]}")
    elif fw:
        lines.append(f"  firmware for {fw['core']} on QEMU {fw['board']}, from "
                     "arm-none-eabi-size: flash = text + data, RAM = data + bss")
        for kind in ("inference", "training"):
            if kind in fw:
                s = fw[kind]
                extra = f", stack {s['stack']}" if s.get("stack") is not None else ""
                fits = "" if s["fits"] else \
                    f"  (does not fit the board's {fw['board_ram'] // 1024} KiB of RAM)"
                lines.append(f"    {kind:<10} flash {s['flash']:>7}  RAM {s['ram']:>7}"
                             f"{extra}{fits}")
        lines.append(f"    model code alone: {fw['model_object']['text']} bytes")
    return "\n".join(lines)


def report_json(report: dict) -> str:
    """The report as `<name>.memory.json` holds it."""
    return json.dumps(report, indent=2, default=_plain) + "\n"


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")
