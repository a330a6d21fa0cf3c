"""Bare-metal firmware around generated C: build with arm-none-eabi-gcc, run on QEMU.

A firmware directory holds the model's `<name>.c`/`<name>.h`, a `main.c` (the test
harness of `codegen/harness.py`, a size probe or an instruction counter from here),
and graphc's own `startup.c` and linker scripts (package data in `codegen/cortexm/`).
Programs talk to the host through semihosting: printf to QEMU's stdout, the exit status
of `main` as QEMU's. Memory is all static; the only heap use is newlib's stdio buffer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError
from graphc.ir import DTYPES

from .printer import c_array
from .harness import harness, parse_output
from .targets import BOARDS, CHECK_FLAGS, Board, get_target

CC = "arm-none-eabi-gcc"
SIZE = "arm-none-eabi-size"
QEMU = "qemu-system-arm"
SUPPORT = ("startup.c", "cortexm.ld", "mps2_m.ld", "microbit.ld")
# -std=c99 keeps -ffp-contract=off: the C says where a multiply-add is fused (fmaf), and
# the compiler fuses nothing else.
CFLAGS = CHECK_FLAGS + ("-O2", "-g", "-ffunction-sections",
                        "-fdata-sections")
# newlib-nano with librdimon (semihosting syscalls); our startup.c, so -nostartfiles.
LDFLAGS = ("--specs=nano.specs", "--specs=rdimon.specs", "-nostartfiles", "-Wl,--gc-sections")


class FirmwareError(GraphcError):
    """The cross build or the emulated run failed."""


def missing_tools(run: bool = True) -> str | None:
    """Why firmware cannot be built (and run, with `run`) here, or None."""
    tools = (CC, SIZE) + ((QEMU,) if run else ())
    absent = [t for t in tools if shutil.which(t) is None]
    if not absent:  # the compiler without newlib cannot link (Debian only recommends it)
        found = subprocess.run([CC, "-print-file-name=nano.specs"], capture_output=True,
                               text=True).stdout.strip()
        if not Path(found).is_absolute():
            absent.append("newlib-nano")
    if absent:
        return (f"{', '.join(absent)} not found (Debian: gcc-arm-none-eabi "
                f"libnewlib-arm-none-eabi{' qemu-system-arm' if run else ''})")
    return None


def write_support(directory: Path) -> None:
    """graphc's startup code and linker scripts, copied from the package."""
    data = resources.files("codegen") / "cortexm"
    for name in SUPPORT:
        (directory / name).write_text(data.joinpath(name).read_text(encoding="utf-8"))


def write_model(directory: str | Path, cmodule, main_c: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{cmodule.name}.c").write_text(cmodule.source)
    (directory / f"{cmodule.name}.h").write_text(cmodule.header)
    (directory / "main.c").write_text(main_c)
    write_support(directory)
    return directory


def build(directory: str | Path, board: str | Board, *, elf: str = "firmware.elf",
          layout: str | None = None, printf_float: bool = False,
          extra: tuple[str, ...] = ()) -> Path:
    """Compile every .c in `directory` for the board's core and link an ELF.

    `layout` overrides the board's linker script (e.g. to size a program too large for
    the board's RAM). `printf_float` links newlib-nano's %f/%g support."""
    directory = Path(directory)
    board = BOARDS[board] if isinstance(board, str) else board
    write_support(directory)
    sources = sorted(p.name for p in directory.glob("*.c"))
    command = [CC, *board.cpu_flags, *CFLAGS, *extra, *sources, *LDFLAGS,
               *(("-u", "_printf_float") if printf_float else ()),
               "-T", layout or board.linker_script, "-L.", f"-Wl,-Map={elf}.map", "-lm",
               "-o", elf]
    run = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if run.returncode:
        raise FirmwareError(f"{CC} failed for {board.machine} in {directory}:\n"
                            f"$ {' '.join(command)}\n{run.stderr.strip()[-3000:]}")
    return directory / elf


@dataclass(frozen=True)
class Run:
    status: int
    stdout: str
    stderr: str
    stack: int | None   # bytes: high-water mark of the stack, from startup.c
    heap: int | None    # bytes: newlib's stdio buffers


def run(elf: str | Path, board: str, *, timeout: float = 60, icount: bool = False) -> Run:
    """Run an ELF on the QEMU board; its semihosting output and exit status."""
    command = [QEMU, "-M", board, "-nographic", "-monitor", "none",
               "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
    if icount:
        command[1:1] = ["-icount", "shift=0"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"{board}: no exit within {timeout} s: $ {' '.join(command)}") from None
    m = re.search(r"graphc: stack (\d+) bytes, heap (\d+) bytes", done.stderr)
    return Run(done.returncode, done.stdout, done.stderr,
               int(m.group(1)) if m else None, int(m.group(2)) if m else None)


def size(elf: str | Path) -> dict[str, int]:
    """Berkeley sizes: text (code and read-only data), data, bss; flash = text + data
    (the initial values of .data are stored in flash), ram = data + bss (static RAM;
    the stack and heap come on top)."""
    out = subprocess.run([SIZE, "-B", str(elf)], capture_output=True, text=True, check=True)
    text, data, bss = (int(v) for v in out.stdout.splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": data + bss}


# ---------------------------------------------------------------- generated main() files

def _arrays(cmodule, params_flat, inputs: dict[str, np.ndarray], n: str, names, *,
            const_params: bool, outputs=()) -> list[str]:
    """Static arrays sized by the header's macros; inputs hold `inputs` or are zero."""
    M, real, dtype = cmodule.name.upper(), DTYPES[cmodule.dtype].c_type, cmodule.dtype
    out = []
    if params_flat is not None:
        out.append(c_array("params", params_flat, dtype, const=const_params,
                           size=f"{M}_PARAMS_SIZE"))
    for i in names:
        if i in inputs:
            out.append(c_array(f"in_{i}", inputs[i], cmodule.input_dtype(i), const=True))
        else:  # filled by the application
            ctype = "int32_t" if i in cmodule.input_dtypes else real
            out.append(f"static {ctype} in_{i}[{n} * {M}_INPUT_{i}_SIZE];")
    out += [f"static {real} out_{o}[{n} * {M}_OUTPUT_{o}_SIZE];" for o in outputs]
    return out


def size_probe(cmodule, params_flat, batch: int, training: bool) -> str:
    """main() for a size report: the arrays a deployed program needs, static and sized by
    the header's macros, and one call of each entry point it uses; no stdio.

    Inference keeps the params `const` (flash); training keeps them in RAM, with the
    optimizer state and a work arena for every entry point."""
    name, M, real = cmodule.name, cmodule.name.upper(), DTYPES[cmodule.dtype].c_type
    n = f"{M}_MAX_BATCH" if cmodule.max_batch else str(batch)
    fwd = cmodule.entries.get("predict") or cmodule.entries["forward"]
    entries = [fwd] + ([cmodule.entries["train_step"]] if training else [])
    names = list(dict.fromkeys(i for e in entries for i in e.inputs))
    work = f"{M}_WORK_SIZE({n})" if training else f"{M}_{fwd.kind.upper()}_WORK_SIZE({n})"
    lines = [f"/* Size probe for {name}: generated by graphc. "
             f"{'Training and inference' if training else 'Inference'} at batch {n}. */",
             "#include <stddef.h>", f'#include "{name}.h"', ""]
    lines += _arrays(cmodule, None if fwd.kind == "predict" else params_flat, {}, n, names,
                     const_params=not training, outputs=fwd.outputs)
    lines.append(f"static {real} work[{work}];")
    if training and cmodule.state_size:
        lines.append(f"static {real} state[{M}_STATE_SIZE];")
    lines += [f"volatile {real} graphc_sink;", "", "int main(void)", "{"]
    if training:
        t = cmodule.entries["train_step"]
        state = "state" if cmodule.state_size else "NULL"
        if cmodule.state_size:   # the hyperparameters and slots' start, before any step
            lines.append(f"    {name}_init_state(state);")
        lines.append(f"    graphc_sink = {t.c_name}(params, {state}, work, {n}"
                     + "".join(f", in_{i}" for i in t.inputs) + ");")
    args = (["params"] if fwd.kind != "predict" else []) + ["work", n] + \
        [f"in_{i}" for i in fwd.inputs] + [f"out_{o}" for o in fwd.outputs]
    lines += [f"    {fwd.c_name}({', '.join(args)});",
              f"    graphc_sink = out_{fwd.outputs[0]}[0];", "    return 0;", "}", ""]
    return "\n".join(lines)


def counter(cmodule, params_flat, inputs: dict[str, np.ndarray],
            runs: list[tuple[str, int, int]]) -> str:
    """main() that counts instructions: for each (entry kind, batch, calls), SysTick ticks
    for `calls` and `2·calls` calls, and for 10^5 and 2·10^5 turns of a 2-instruction loop
    (the calibration). Run under `qemu -icount shift=0`; prints integers only."""
    name, M, real = cmodule.name, cmodule.name.upper(), DTYPES[cmodule.dtype].c_type
    batch = max(b for _, b, _ in runs)
    assert all(len(v) >= batch for v in inputs.values())
    fwd = cmodule.entries["forward"]
    # Only what is counted is linked: counting inference alone leaves out the train step,
    # its state and its arena (MobileNetV1's would not fit the board's 4 MiB of RAM).
    train = cmodule.entries.get("train_step") if any(k == "train_step" for k, _, _ in runs) \
        else None
    names = list(dict.fromkeys(fwd.inputs + (train.inputs if train else ())))
    lines = [f"/* Instruction counter for {name}: generated by graphc. */",
             "#include <stdint.h>", "#include <stdio.h>", f'#include "{name}.h"', "",
             "#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)",
             "#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)",
             "#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)", ""]
    lines += _arrays(cmodule, params_flat, {k: v[:batch] for k, v in inputs.items()}, str(batch),
                     names, const_params=False, outputs=fwd.outputs)
    work = f"{M}_WORK_SIZE({batch})" if train else f"{M}_FORWARD_WORK_SIZE({batch})"
    lines.append(f"static {real} work[{work}];")
    if train and cmodule.state_size:
        lines.append(f"static {real} state[{M}_STATE_SIZE];")
    # Inline asm is in divided syntax on Thumb-1 cores (where `sub` sets the flags) and
    # unified on Thumb-2 (where only `subs` does).
    lines += ["", "static void spin(uint32_t turns)", "{", "#if defined(__thumb2__)",
              '    __asm__ volatile("1: subs %0, %0, #1\\n\\tbne 1b" : "+l"(turns) : : "cc");',
              "#else",
              '    __asm__ volatile("1: sub %0, #1\\n\\tbne 1b" : "+l"(turns) : : "cc");',
              "#endif", "}", "",
              "static void call(int entry, size_t n)", "{", "    if (entry == 0) {",
              f"        {fwd.c_name}(params, work, n"
              + "".join(f", in_{i}" for i in fwd.inputs)
              + "".join(f", out_{o}" for o in fwd.outputs) + ");"]
    if train:
        state = "state" if cmodule.state_size else "NULL"
        lines += ["    } else {", f"        (void){train.c_name}(params, {state}, work, n"
                  + "".join(f", in_{i}" for i in train.inputs) + ");"]
    lines += ["    }", "}", "",
              "/* SysTick ticks (24-bit, counting down) for `count` calls, or spin turns. */",
              "static unsigned long ticks(int entry, size_t n, unsigned long count)", "{",
              "    uint32_t start, stop;", "    unsigned long k;",
              "    SYST_RVR = 0xFFFFFFu;", "    SYST_CVR = 0u;",
              "    SYST_CSR = 5u; /* enable, core clock, no interrupt */",
              "    start = SYST_CVR;", "    (void)SYST_CSR; /* clears COUNTFLAG */",
              "    if (entry < 0) {", "        spin((uint32_t)count);", "    } else {",
              "        for (k = 0; k < count; ++k) {", "            call(entry, n);",
              "        }", "    }", "    stop = SYST_CVR;",
              "    if (SYST_CSR & 0x10000u) { /* wrapped: the count is ambiguous */",
              '        printf("overflow\\n");', "        return 0;", "    }",
              "    return (unsigned long)((start - stop) & 0xFFFFFFu);", "}", "",
              "int main(void)", "{"]
    if train and cmodule.state_size:   # the hyperparameters and slots' start
        lines.append(f"    {name}_init_state(state);")
    lines += ['    printf("calibrate 100000 %lu 200000 %lu\\n", ticks(-1, 0, 100000ul), '
              'ticks(-1, 0, 200000ul));']
    for kind, n, calls in runs:
        entry = 0 if kind == "forward" else 1
        lines.append(f'    printf("{kind} {n} {calls} %lu {2 * calls} %lu\\n", '
                     f"ticks({entry}, {n}, {calls}ul), ticks({entry}, {n}, {2 * calls}ul));")
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def parse_counts(text: str) -> dict:
    """Instructions per call from a `counter` program's output: the difference between
    2k and k calls, so the timing code's own cost cancels, in calibrated instructions."""
    if "overflow" in text:
        raise FirmwareError("SysTick wrapped during a measurement: use fewer calls")
    per_tick = None
    out = {}
    for line in text.splitlines():
        f = line.split()
        if f and f[0] == "calibrate":
            (n1, t1, n2, t2) = map(int, f[1:])
            per_tick = 2 * (n2 - n1) / (t2 - t1)  # two instructions per turn
        elif len(f) == 6:
            kind, n, k1, t1, k2, t2 = f[0], *map(int, f[1:])
            out[(kind, n)] = (t2 - t1) / (k2 - k1)
    if per_tick is None:
        raise FirmwareError(f"no calibration in the counter's output:\n{text}")
    return {"instructions_per_tick": per_tick,
            "instructions": {k: ticks * per_tick for k, ticks in out.items()}}


def firmware_sizes(cmodule, target, params_flat, batch: int, workdir: str | Path) -> dict:
    """Flash and RAM of the size probes on the target's board: inference, and training
    when the module trains; and of the model's object file alone. A probe that does not
    fit the board's RAM is linked for a 4 MiB board instead, to give its figures anyway.
    With QEMU present each probe also runs once, for the stack's high-water mark."""
    target = get_target(target) if isinstance(target, str) else target
    board = BOARDS[target.board]
    workdir = Path(workdir)
    report: dict = {"board": board.machine, "core": board.core, "board_flash": board.flash,
                    "board_ram": board.ram, "batch": cmodule.max_batch or batch,
                    "cflags": " ".join(board.cpu_flags + CFLAGS)}
    kinds = ["inference"] + (["training"] if "train_step" in cmodule.entries else [])
    for kind in kinds:
        d = write_model(workdir / kind, cmodule,
                        size_probe(cmodule, params_flat, batch, kind == "training"))
        try:
            elf, fits = build(d, board), True
        except FirmwareError as e:
            if "overflow" not in str(e) and "will not fit" not in str(e):
                raise
            elf, fits = build(d, board, layout="mps2_m.ld"), False
        entry = {**size(elf), "fits": fits}
        if fits and missing_tools(run=True) is None:
            done = run(elf, board.machine)
            if done.status != 0:
                raise FirmwareError(f"the {kind} size probe failed on {board.machine}:\n"
                                    f"{done.stdout}{done.stderr}")
            entry["stack"] = done.stack
        report[kind] = entry
    obj = workdir / "model.o"
    subprocess.run([CC, *board.cpu_flags, *CFLAGS, "-c", f"{cmodule.name}.c", "-o", str(obj)],
                   cwd=workdir / "inference", check=True, capture_output=True)
    report["model_object"] = size(obj)
    return report


def run_harness(cmodule, params_flat, inputs: dict[str, np.ndarray], board: str,
                directory: str | Path, *, train_steps: int = 0, timeout: float = 60) -> dict:
    """Build `codegen/harness.py`'s program for the board, run it, parse what it printed.

    Returns the arrays by label, plus "_run" (the Run) and "_size" (flash/RAM)."""
    directory = write_model(directory, cmodule,
                            harness(cmodule, params_flat, inputs, train_steps=train_steps))
    elf = build(directory, board, printf_float=True)  # the harness prints with %.9g
    done = run(elf, board, timeout=timeout)
    if done.status != 0:
        raise FirmwareError(f"the harness exited with status {done.status} on {board}:\n"
                            f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {**parse_output(done.stdout), "_run": done, "_size": size(elf)}
