"""Compilation targets: one C emitter, and a small description of where the C will run.

Every target gets portable C99 (only `<math.h>`, `<stddef.h>`, `<stdint.h>`; no heap, no
recursion, no VLAs). A target changes how contractions are printed (register-blocked for a
SIMD width, or plain loops; OpenMP behind `#ifdef _OPENMP` on the host only), the header's
note on how to compile it, the warning flags the C is checked under, the flags of graphc's
own host build, and, for microcontrollers, the cross-compiler flags and the QEMU board that
`codegen/firmware.py` builds and runs firmware for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import ALIGN

# What the generated C is checked under on every target (tests/test_embedded.py).
CHECK_FLAGS = ("-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Wvla", "-Werror")


@dataclass(frozen=True)
class Board:
    """A QEMU machine with semihosting, and the linker script that maps its memory."""
    machine: str                # qemu-system-arm -M
    core: str                   # for people
    cpu_flags: tuple[str, ...]  # arm-none-eabi-gcc flags for this core's ABI
    linker_script: str          # in codegen/cortexm/
    flash: int                  # bytes
    ram: int                    # bytes


BOARDS = {
    # mps2-an385/386: 4 MiB "flash" (ZBT SSRAM at 0) and 4 MiB RAM; SysTick at 25 MHz.
    "mps2-an386": Board("mps2-an386", "Cortex-M4F (FPv4-SP, hard float)",
                        ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
                        "mps2_m.ld", 4 << 20, 4 << 20),
    "mps2-an385": Board("mps2-an385", "Cortex-M3 (no FPU, soft float)",
                        ("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"),
                        "mps2_m.ld", 4 << 20, 4 << 20),
    # The BBC micro:bit's nRF51822: 256 KiB flash, 16 KiB RAM.
    "microbit": Board("microbit", "Cortex-M0 (nRF51, no FPU, soft float)",
                      ("-mcpu=cortex-m0", "-mthumb", "-mfloat-abi=soft"),
                      "microbit.ld", 256 << 10, 16 << 10),
}


@dataclass(frozen=True)
class Target:
    name: str
    note: str                        # the header's line on how to compile; "" for c99
    check_flags: tuple[str, ...]     # warnings the C must pass for this target (with -Werror)
    build_flags: tuple[str, ...] = ()  # added to graphc's cffi build (host only)
    board: str | None = None         # QEMU board for firmware, sizes and instruction counts
    fpu_dtypes: tuple[str, ...] = ()  # dtypes the core computes in hardware
    align: int = ALIGN               # arena alignment in elements (codegen/plan.py)
    vector_bytes: int = 0            # SIMD width the contractions are blocked for (0: plain loops)
    parallel_work: int = 0           # OpenMP for kernels of this many multiply-adds (0: never)

    @property
    def embedded(self) -> bool:
        return self.board is not None

    def cpu_flags(self) -> tuple[str, ...]:
        return BOARDS[self.board].cpu_flags if self.board else ()

    def header_note(self, dtype: str) -> str:
        """The header's comment text for this target ("" for plain c99: unchanged text)."""
        if not self.note:
            return ""
        text = f"Target {self.name}: {self.note}"
        if self.embedded and dtype not in self.fpu_dtypes:
            # Correct, but every operation becomes a libgcc call.
            text += f" This core has no FPU for {dtype}: the arithmetic runs in software."
        return text


# Cortex-M targets pack the arena (align=1): no cache lines or SIMD to align for, and RAM
# is scarce; a per-example scalar would otherwise take 16 elements per example.
# -Wdouble-promotion: a float32 model must never compute in double (an M4F has no double
# FPU, so one stray promotion costs a software call per use).
_EMBEDDED_CHECKS = CHECK_FLAGS + ("-Wdouble-promotion",)

# Tiles (codegen/tiles.py): c99 assumes 16-byte SIMD (SSE2, NEON), what a plain -O3 build
# gets; host assumes 64-byte (AVX-512), and runs OpenMP over kernels of 2^20 multiply-adds
# or more (on the 784-256-128-10 MLP at batch 128, the big dense layers and their gradients).
TARGETS = {
    "c99": Target("c99", "", CHECK_FLAGS, vector_bytes=16),
    # -march=native and -fopenmp only for the module graphc builds and loads on this
    # machine; the written C stays portable (the pragmas sit behind #ifdef _OPENMP).
    "host": Target("host", "compile with the host compiler, e.g. cc -std=c99 -O3 "
                           "-march=native -fopenmp (graphc's own build of it adds -march=native "
                           "-fopenmp; without -fopenmp the C runs on one thread).",
                   CHECK_FLAGS, build_flags=("-march=native", "-fopenmp"), vector_bytes=64,
                   parallel_work=1 << 20),
    "cortex-m4": Target("cortex-m4", "Cortex-M4F, e.g. arm-none-eabi-gcc -mcpu=cortex-m4 "
                                     "-mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -std=c99 -O2. "
                                     "Keep -std=c99 (or -ffp-contract=off): fused multiply-adds "
                                     "change the last bit.",
                        _EMBEDDED_CHECKS, board="mps2-an386", fpu_dtypes=("float32",),
                        align=1),
    "cortex-m0": Target("cortex-m0", "Cortex-M0/M0+ (no FPU), e.g. arm-none-eabi-gcc "
                                     "-mcpu=cortex-m0 -mthumb -mfloat-abi=soft -std=c99 -Os.",
                        _EMBEDDED_CHECKS, board="microbit", align=1),
}


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        from graphc.errors import GraphcError
        raise GraphcError(f"unknown target {name!r} (targets: {', '.join(TARGETS)})") from None
