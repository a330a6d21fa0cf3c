"""Compilation targets: one C emitter, and a small description of where the C will run.

Every target gets portable C99 (only `<math.h>`, `<stddef.h>`, `<stdint.h>`; no heap, no
recursion, no VLAs). A target changes how contractions are printed (register-blocked for a
SIMD width, or plain loops; OpenMP behind `#ifdef _OPENMP` on the host only), the header's
note on how to compile it, the warning flags the C is checked under, the flags of graphc's
own host build, and, for microcontrollers, the cross-compiler flags and the QEMU board that
`codegen/firmware.py` builds and runs firmware for.

The `host` target is resolved for this machine by `get_target("host")`: the C compiler is
asked once per process which of -march=native and -fopenmp it accepts and how wide the SIMD
vectors they enable are, and the contractions are tiled for that width. Tiles sized for
AVX-512 spill registers on an AVX2 machine; $GRAPHC_HOST_VECTOR_BYTES (16, 32 or 64) fixes
the width, to reproduce another machine's C.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass

from graphc.errors import GraphcError

from .build import CompileError, _compiler_stamp, c_compiler
from .plan import ALIGN

# What the generated C is checked under on every target (tests/test_embedded.py).
# What the generated C is clean under, as a code review would compile it: implicit
# conversions, float-to-double promotion, shadowed names and dropped qualifiers included.
CHECK_FLAGS = ("-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Wvla", "-Wconversion",
               "-Wdouble-promotion", "-Wshadow", "-Wcast-qual", "-Werror")


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
    # Padding read from zero-padded copies in the arena, not tested per tap (codegen/padding.py)
    padded_copies: bool = False
    # Contractions as rows of accumulators with the reduction unrolled, for cores without
    # SIMD (codegen/cortexm_kernels.py); fused by fmaf where the FPU computes the dtype
    unrolled: bool = False
    # SIMD tiles (codegen/tiles.py): accumulator arrays per tile, and whether each product
    # is added by fmaf (where the vector unit fuses: one rounding, as C99 specifies it)
    accumulators: int = 16
    fused: bool = False
    # host only: a digest of what the native flags enable on this machine. It keys the build
    # caches, so a cache shared by machines (an NFS home) never loads another CPU's binary.
    machine: str = ""

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
# The M4F prints contractions as rows of fmaf (`unrolled`); the M0 keeps plain loops: the
# rows would double its code (the mlp's from 2.8 to 5.3 kB) on a core whose time goes to
# soft-float calls.
# -Wdouble-promotion: a float32 model must never compute in double (an M4F has no double
# FPU, so one stray promotion costs a software call per use).


_NO_SIMD = "the C compiler named no SIMD it targets"


def _host_note(build_flags: tuple[str, ...], tiled_for: str) -> str:
    return ("compile with the host compiler, e.g. cc -std=c99 -O3 -march=native -fopenmp "
            f"(graphc's own build of it adds {' '.join(build_flags) or 'no flags'}; without "
            "-fopenmp the C runs on one thread). With OpenMP, omp_set_num_threads() in the "
            "calling thread sets how many threads its calls use, and OMP_WAIT_POLICY=passive "
            "keeps idle threads from spinning against other processes on the same cores "
            "(with GNU libgomp add GOMP_SPINCOUNT=1000, as graphc's own loads do: a spin of "
            "tens of microseconds before sleeping, so that a call's next parallel region "
            "does not wait for a sleeping thread to wake). "
            "Beside busy processes one thread can beat all: a parallel region waits for its "
            "slowest thread, and the scheduler parks one of them (graphc's Python calls time "
            "both and run on the faster; every count computes the same bits). "
            f"Contractions are tiled for {tiled_for}. With GCC add "
            "-fno-tree-loop-distribute-patterns, as graphc's build does: without it GCC may "
            "turn the loops that zero and store a tile's sums into memset and memcpy calls, "
            "which keeps the sums in memory instead of registers.")


# Tiles (codegen/tiles.py): c99 assumes 16-byte SIMD (SSE2, NEON), what a plain -O3 build
# gets; host tiles for what -march=native enables (resolved by `get_target`), and runs OpenMP
# over kernels of 2^20 multiply-adds or more (on the 784-256-128-10 MLP at batch 128, the big
# dense layers and their gradients).
TARGETS = {
    "c99": Target("c99", "", CHECK_FLAGS, vector_bytes=16, padded_copies=True),
    # -march=native and -fopenmp only for the module graphc builds and loads on this
    # machine; the written C stays portable (the pragmas sit behind #ifdef _OPENMP). This
    # entry is the host target when the compiler cannot be asked: no flags, 16-byte tiles.
    "host": Target("host", _host_note((), f"16-byte SIMD vectors ({_NO_SIMD})"),
                   CHECK_FLAGS, vector_bytes=16, parallel_work=1 << 20,
                   padded_copies=True),
    "cortex-m4": Target("cortex-m4", "Cortex-M4F, e.g. arm-none-eabi-gcc -mcpu=cortex-m4 "
                                     "-mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -std=c99 -O2. "
                                     "float32 contractions add each product with fmaf "
                                     "(VFMA.F32: one rounding, as C99 specifies it); keep "
                                     "-std=c99 (or -ffp-contract=off) so that the compiler "
                                     "fuses nothing else.",
                        CHECK_FLAGS, board="mps2-an386", fpu_dtypes=("float32",),
                        align=1, unrolled=True),
    "cortex-m0": Target("cortex-m0", "Cortex-M0/M0+ (no FPU), e.g. arm-none-eabi-gcc "
                                     "-mcpu=cortex-m0 -mthumb -mfloat-abi=soft -std=c99 -Os.",
                        CHECK_FLAGS, board="microbit", align=1),
}


def get_target(name: str | Target) -> Target:
    """A target by name; "host" is resolved for this machine (`host_target`)."""
    if isinstance(name, Target):
        return name
    if name == "host":
        return host_target()
    try:
        return TARGETS[name]
    except KeyError:
        raise GraphcError(f"unknown target {name!r} (targets: {', '.join(TARGETS)})") from None


# ---------------------------------------------------------------- the host, resolved

VECTOR_BYTES_ENV = "GRAPHC_HOST_VECTOR_BYTES"
VECTOR_WIDTHS = (16, 32, 64)

# The widest SIMD a compiler's predefined macros announce, first match wins. AVX without
# AVX2 still has 32-byte float vectors; anything else (SSE2, NEON, unknown) gets 16 bytes.
_SIMD_MACROS = (("__AVX512F__", 64, "AVX-512"), ("__AVX2__", 32, "AVX2"), ("__AVX__", 32, "AVX"),
                ("__SSE2__", 16, "SSE2"), ("__ARM_NEON", 16, "NEON"))

# The ways to ask for this machine's instruction set, first accepted wins: gcc and clang on
# x86 take -march=native; some clang on arm64 refuse it and take -mcpu=native; with neither,
# the compiler's default target (which a distribution may set above the baseline).
_NATIVE_FLAGS = (("-march=native",), ("-mcpu=native",), ())

# clang's driver takes -fopenmp without its runtime (libomp) installed, and the link then
# fails; GCC ships libgomp with its driver, so only clang is asked to link this.
_OPENMP_PROBE = """int main(void)
{
    int n = 0, i;
#pragma omp parallel for reduction(+:n)
    for (i = 0; i < 4; ++i) n += i;
    return n != 6;
}
"""


@dataclass(frozen=True)
class HostCompiler:
    """What the C compiler said about this machine."""
    native_flags: tuple[str, ...]   # -march=native, -mcpu=native, or () if it took neither
    openmp: bool                    # it compiles (and links) -fopenmp
    vector_bytes: int               # widest SIMD with native_flags (16 if unknown)
    simd: str                       # its name ("" if unknown)
    # It takes -mprefer-vector-width (GCC 8+, clang on x86), which sets the width its
    # vectorizer uses below the widest SIMD (see `vector_width_flags`).
    prefers_width: bool = False
    fma: bool = False               # the native flags enable fused multiply-add vectors
    # SIMD registers: x86-64 has 16 below AVX-512 (32 with it), arm64 32
    vector_registers: int = 32
    # sha256 of the macros the native flags define: the instruction set the build will use.
    # Not part of equality: two answers with the same flags and width tile the same C.
    machine: str = dataclasses.field(default="", compare=False)

    @property
    def build_flags(self) -> tuple[str, ...]:
        return self.native_flags + (("-fopenmp",) if self.openmp else ())


def defined_macros(macros: str) -> set[str]:
    """The macro names in `cc -dM -E` output."""
    return {line.split()[1] for line in macros.splitlines()
            if line.startswith("#define ") and len(line.split()) > 1}


def simd_width(macros: str) -> tuple[int, str]:
    """(bytes, name) of the widest SIMD in `cc -dM -E` output; (16, "") if none is named."""
    defined = defined_macros(macros)
    return next(((width, name) for macro, width, name in _SIMD_MACROS if macro in defined),
                (16, ""))


def _run(command: list[str], stdin: str = "", cwd: str | None = None) -> str | None:
    """The command's stdout, or None if it could not run or failed."""
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=cwd,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _links(cc: tuple[str, ...], flags: tuple[str, ...], source: str) -> bool:
    try:
        with tempfile.TemporaryDirectory(prefix="graphc-probe-") as tmp:
            return _run([*cc, *flags, "-x", "c", "-", "-o", "probe"], source, cwd=tmp) is not None
    except OSError:   # no writable temporary directory: graphc's build would fail anyway
        return False


@functools.lru_cache(maxsize=None)
def probe_host_compiler(cc: tuple[str, ...]) -> HostCompiler:
    """Ask `cc` (once per process) which native and OpenMP flags it accepts and what they
    enable: one preprocessor run for GCC (a warm compile takes a few ms; this should not
    dominate it), more for compilers that refuse some. Never raises: without a working
    compiler the answer is no flags and 16-byte vectors."""
    native, macros, openmp = (), "", False
    for flags in _NATIVE_FLAGS:
        answer = _run([*cc, *flags, "-fopenmp", "-dM", "-E", "-x", "c", "-"])
        openmp = answer is not None and "_OPENMP" in defined_macros(answer)
        if answer is None:   # -fopenmp or the native flag refused: which one?
            answer = _run([*cc, *flags, "-dM", "-E", "-x", "c", "-"])
        if answer is not None:
            native, macros = flags, answer
            break
    if openmp and "__clang__" in defined_macros(macros):
        openmp = _links(cc, (*native, "-fopenmp"), _OPENMP_PROBE)
    width, simd = simd_width(macros)
    machine = hashlib.sha256(macros.encode()).hexdigest()[:16] if macros else ""
    defined = defined_macros(macros)
    return HostCompiler(native, openmp, width, simd, machine=machine,
                        prefers_width=takes_prefer_vector_width(macros),
                        fma=bool({"__FMA__", "__ARM_FEATURE_FMA"} & defined),
                        vector_registers=16 if {"__x86_64__", "__i386__"} & defined
                        and "__AVX512F__" not in defined else 32)


def accumulators(vector_registers: int) -> int:
    """Accumulator arrays per tile that fit the register file beside the tile's operands.
    With 16 registers (x86 below AVX-512) a tile of 8 x 2 accumulators and the 8 broadcasts
    and 2 rows GCC loads for them spill to the stack on every step; 4 x 2 does not. On Zen 1
    (AVX2, GCC 12) a 3 x 3 convolution's tile summed 9.8 GMAC/s as 8 x 2, 18.0 as 4 x 2
    with fmaf (the core's peak); dense dot products 10.7 as 8 x 2, 14.3 as 8 x 1."""
    return 16 if vector_registers >= 32 else 8


def takes_prefer_vector_width(macros: str) -> bool:
    """Whether the compiler that printed these macros takes -mprefer-vector-width: GCC from
    8 and clang from 7, on x86 (clang says __GNUC__ 4 whatever its version)."""
    values = dict(line.split()[1:3] for line in macros.splitlines()
                  if line.startswith("#define ") and len(line.split()) > 2)
    if not {"__x86_64__", "__i386__"} & values.keys():
        return False
    def version(macro: str) -> int:
        text = values.get(macro, "0")
        return int(text) if text.isdigit() else 0
    if "__clang__" in values:
        return version("__clang_major__") >= 7
    return version("__GNUC__") >= 8


def vector_width_flags(compiler: HostCompiler, width: int) -> tuple[str, ...]:
    """The flag that makes the compiler vectorize with the `width`-byte vectors the tiles
    are sized for. GCC's tuning for some CPUs prefers narrower vectors than it may use
    (-march=native on AMD Zen 1 prefers 128 bits, on AVX-512 CPUs 256): a tile's 8-lane
    accumulator array then takes two registers and a tile of 8 x 2 of them spills: on
    Zen 1 (GCC 12) ResNet-8's forward pass at batch 64 took 154 ms of one core's time
    without this flag, 107 ms with it."""
    if not compiler.prefers_width or compiler.vector_bytes <= 16:
        return ()
    return (f"-mprefer-vector-width={8 * min(width, compiler.vector_bytes)}",)


def vector_bytes_override() -> int | None:
    """$GRAPHC_HOST_VECTOR_BYTES as a width, None if unset or empty."""
    text = os.environ.get(VECTOR_BYTES_ENV, "").strip()
    if not text:
        return None
    if text not in {str(w) for w in VECTOR_WIDTHS}:
        raise GraphcError(f"${VECTOR_BYTES_ENV} must be one of "
                          f"{', '.join(map(str, VECTOR_WIDTHS))} (bytes), got {text!r}")
    return int(text)


def host_target() -> Target:
    """TARGETS["host"] for this machine: graphc's build adds the flags the compiler ($CC,
    as codegen/build.py runs it) accepts, and the tiles fit the vectors they enable, unless
    $GRAPHC_HOST_VECTOR_BYTES says otherwise. The same machine, compiler and environment
    give the same target, hence the same C."""
    base = TARGETS["host"]
    cc = c_compiler()
    compiler = probe_host_compiler(cc)
    override = vector_bytes_override()
    if override is not None:
        width, why = override, f"set by ${VECTOR_BYTES_ENV}"
    elif compiler.simd:
        enabled_by = " ".join(compiler.native_flags) or "the compiler's default target"
        width, why = compiler.vector_bytes, (f"{compiler.simd}, enabled by {enabled_by} on "
                                             "the machine that wrote this C")
    else:
        width, why = compiler.vector_bytes, _NO_SIMD
    flags = compiler.build_flags + vector_width_flags(compiler, width)
    fused = " and add each product with fmaf, one rounding (the native flags enable " \
        "vector FMA)" if compiler.fma else ""
    note = _host_note(flags, f"{width}-byte SIMD vectors ({why}){fused}")
    return dataclasses.replace(base, note=note, build_flags=flags, vector_bytes=width,
                               machine=compiler.machine, fused=compiler.fma,
                               accumulators=accumulators(compiler.vector_registers))


# What identifies this CPU's instruction set in /proc/cpuinfo (x86, then arm64), without
# the fields that change from core to core or second to second (MHz, ids, bogomips).
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags",
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")


def _cpu_identity() -> str | None:
    """The first processor's identifying /proc/cpuinfo fields, or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            block = f.read(1 << 16).split("\n\n", 1)[0]
    except OSError:
        return None
    fields = [line for line in block.splitlines()
              if line.split(":", 1)[0].strip() in _CPU_FIELDS]
    return "\n".join(fields) or None


def target_identity(name: str) -> str:
    """A string that determines `get_target(name)`, for the prepared-module cache key; for
    "host" it is made without running the compiler where it can be (its path, size and
    mtime, $CC, the override and the CPU's /proc/cpuinfo fields), since asking the compiler
    costs a warm compile in a fresh process 15 ms, several times the rest of it."""
    if name != "host":
        return repr(get_target(name))
    cpu = _cpu_identity()
    if cpu is None:
        return repr(host_target())
    cc = c_compiler()
    try:
        stamp = _compiler_stamp(cc)
    except CompileError:   # no compiler: the build says so; the key need not
        stamp = "no compiler"
    return repr(("host", TARGETS["host"], cc, stamp, os.environ.get(VECTOR_BYTES_ENV, ""), cpu))
