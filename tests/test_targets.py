"""The host target resolved for this machine (codegen/targets.py): what the C compiler's
predefined macros say about SIMD width, which native and OpenMP flags it accepts, and the
$GRAPHC_HOST_VECTOR_BYTES override. Fake compilers stand in for the ones this machine
lacks (an arm64 clang that refuses -march=native, an Apple clang without OpenMP)."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat

import numpy as np
import pytest

import graphc
from codegen import targets as T
from graphc.errors import GraphcError

AVX512 = """#define __AVX2__ 1
#define __AVX512F__ 1
#define __AVX__ 1
#define __SSE2__ 1
"""
AVX2 = "#define __SSE2__ 1\n#define __AVX__ 1\n#define __AVX2__ 1\n#define __FMA__ 1\n"


@pytest.mark.parametrize("macros, expected", [
    (AVX512, (64, "AVX-512")),
    (AVX2, (32, "AVX2")),
    ("#define __AVX__ 1\n#define __SSE2__ 1\n", (32, "AVX")),   # Sandy Bridge: no AVX2
    ("#define __SSE2__ 1\n#define __x86_64__ 1\n", (16, "SSE2")),
    ("#define __aarch64__ 1\n#define __ARM_NEON 1\n", (16, "NEON")),
    ("#define __riscv 1\n", (16, "")),
    ("", (16, "")),
    # Only whole macro names count: AVX-512 FP16 alone is not __AVX512F__.
    ("#define __AVX512FP16__ 1\n#define __AVX2__ 1\n", (32, "AVX2")),
    ("#define __AVX512F__\n#define __AVX2__ 1\n", (64, "AVX-512")),   # defined without a value
    ("#undef __AVX512F__\n# define __AVX2__ 1\n", (16, "")),   # not what -dM prints
])
def test_simd_width_from_predefined_macros(macros, expected):
    assert T.simd_width(macros) == expected


def fake_cc(tmp_path, name: str, macros: str, refuses: tuple[str, ...] = (),
            libomp: bool = True) -> str:
    """A shell script that acts as a compiler: it fails on any flag in `refuses`, prints
    `macros` for -dM (and _OPENMP with -fopenmp), fails to link -fopenmp without `libomp`,
    and otherwise succeeds, writing the -o file it is asked for."""
    path = tmp_path / name
    rejected = " | ".join(refuses) or "--no-such-flag--"
    path.write_text(f"""#!/bin/sh
out=""
prev=""
openmp=""
for arg in "$@"; do
    case "$arg" in
        {rejected}) echo "{name}: error: unsupported option '$arg'" >&2; exit 1 ;;
        -fopenmp) openmp=1 ;;
    esac
    if [ "$prev" = "-o" ]; then out="$arg"; fi
    prev="$arg"
done
case " $* " in
    *" -dM "*)
        printf '%s' '{macros}'
        if [ -n "$openmp" ]; then echo "#define _OPENMP 201511"; fi
        exit 0 ;;
esac
if [ -n "$openmp" ] && [ -z "{'1' if libomp else ''}" ]; then
    echo "ld: error: unable to find library -lomp" >&2
    exit 1
fi
if [ -n "$out" ]; then : > "$out"; fi
exit 0
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


needs_sh = pytest.mark.skipif(shutil.which("sh") is None or os.name != "posix",
                              reason="the fake compilers are shell scripts")
CLANG = "#define __clang__ 1\n"


@needs_sh
def test_probe_takes_march_native_and_openmp_when_accepted(tmp_path):
    cc = fake_cc(tmp_path, "avx2-cc", AVX2)
    probe = T.probe_host_compiler((cc,))
    assert probe == T.HostCompiler(("-march=native",), True, 32, "AVX2", fma=True)
    assert probe.build_flags == ("-march=native", "-fopenmp")


@needs_sh
def test_probe_falls_back_to_mcpu_native_and_drops_openmp(tmp_path):
    """An arm64 clang that wants -mcpu=native, and has no OpenMP (Apple's)."""
    cc = fake_cc(tmp_path, "arm-clang", CLANG + "#define __ARM_NEON 1\n",
                 refuses=("-march=native", "-fopenmp"))
    probe = T.probe_host_compiler((cc,))
    assert probe == T.HostCompiler(("-mcpu=native",), False, 16, "NEON")
    assert probe.build_flags == ("-mcpu=native",)


@needs_sh
def test_probe_drops_openmp_when_clang_cannot_link_it(tmp_path):
    """A clang that accepts -fopenmp but has no libomp to link."""
    cc = fake_cc(tmp_path, "clang", CLANG + AVX512, libomp=False)
    assert T.probe_host_compiler((cc,)) == T.HostCompiler(("-march=native",), False, 64, "AVX-512")
    cc = fake_cc(tmp_path, "clang-with-libomp", CLANG + AVX512)
    assert T.probe_host_compiler((cc,)).openmp


@needs_sh
def test_probe_without_native_flags_keeps_openmp(tmp_path):
    """Tiles for the compiler's default target when it takes no native flag."""
    cc = fake_cc(tmp_path, "plain-cc", "#define __SSE2__ 1\n",
                 refuses=("-march=native", "-mcpu=native"))
    probe = T.probe_host_compiler((cc,))
    assert probe == T.HostCompiler((), True, 16, "SSE2")
    assert probe.build_flags == ("-fopenmp",)


def test_probe_without_a_compiler_does_not_raise(tmp_path):
    probe = T.probe_host_compiler((str(tmp_path / "no-such-cc"),))
    assert probe == T.HostCompiler((), False, 16, "")


@needs_sh
def test_host_target_follows_the_compiler(tmp_path, monkeypatch):
    monkeypatch.delenv(T.VECTOR_BYTES_ENV, raising=False)
    monkeypatch.setenv("CC", fake_cc(tmp_path, "avx2-cc", AVX2))
    host = T.get_target("host")
    assert host.vector_bytes == 32 and host.build_flags == ("-march=native", "-fopenmp")
    assert "tiled for 32-byte SIMD vectors (AVX2" in host.note
    assert T.get_target("host") == host   # asked once, the same answer
    # The rest is the base entry's: checks, alignment, when to run OpenMP.
    base = T.TARGETS["host"]
    assert (host.check_flags, host.align, host.parallel_work) == \
        (base.check_flags, base.align, base.parallel_work)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    host = T.get_target("host")
    assert host.vector_bytes == 16 and host.build_flags == ()
    assert "adds no flags" in host.note and "16-byte" in host.note


GCC_X86 = "#define __GNUC__ 12\n#define __x86_64__ 1\n"


@needs_sh
@pytest.mark.parametrize("name, macros, fused, accumulators", [
    ("avx2-fma", GCC_X86 + AVX2, True, 8),              # 16 ymm registers
    ("sse2", GCC_X86 + "#define __SSE2__ 1\n", False, 8),
    ("avx512", GCC_X86 + AVX512 + "#define __FMA__ 1\n", True, 16),   # 32 zmm
    ("arm64", "#define __GNUC__ 12\n#define __aarch64__ 1\n#define __ARM_NEON 1\n"
              "#define __ARM_FEATURE_FMA 1\n", True, 16)])
def test_host_tiles_fit_the_registers_and_fuse_where_the_vectors_do(
        tmp_path, monkeypatch, name, macros, fused, accumulators):
    """Tiles of 8 accumulators where x86 has 16 vector registers, 16 where it has 32;
    products added by fmaf only where the native flags enable vector FMA (elsewhere
    fmaf would be a library call per product), and the header says so."""
    monkeypatch.delenv(T.VECTOR_BYTES_ENV, raising=False)
    monkeypatch.setenv("CC", fake_cc(tmp_path, name, macros))
    host = T.get_target("host")
    assert (host.fused, host.accumulators) == (fused, accumulators)
    assert ("add each product with fmaf" in host.note) == fused


@needs_sh
def test_host_build_vectorizes_as_wide_as_the_tiles(tmp_path, monkeypatch):
    """GCC on x86 is told the tiles' width (its Zen 1 tuning prefers 128-bit vectors under
    -march=native, which split each 8-lane accumulator over two registers); an override
    narrows it with the tiles; compilers that may not take the flag are not given it."""
    monkeypatch.delenv(T.VECTOR_BYTES_ENV, raising=False)
    monkeypatch.setenv("CC", fake_cc(tmp_path, "gcc-avx2", GCC_X86 + AVX2))
    host = T.get_target("host")
    assert host.vector_bytes == 32
    assert host.build_flags == ("-march=native", "-fopenmp", "-mprefer-vector-width=256")
    assert "adds -march=native -fopenmp -mprefer-vector-width=256;" in host.note
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, "16")
    assert T.get_target("host").build_flags[-1] == "-mprefer-vector-width=128"
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, "64")   # no wider than the compiler's SIMD
    assert T.get_target("host").build_flags[-1] == "-mprefer-vector-width=256"
    monkeypatch.delenv(T.VECTOR_BYTES_ENV)
    for name, macros in [("gcc7", "#define __GNUC__ 7\n#define __x86_64__ 1\n" + AVX2),
                         ("gcc-sse2", GCC_X86 + "#define __SSE2__ 1\n"),
                         ("gcc-arm", "#define __GNUC__ 12\n#define __aarch64__ 1\n"
                                     "#define __ARM_NEON 1\n")]:
        monkeypatch.setenv("CC", fake_cc(tmp_path, name, macros))
        assert not any(f.startswith("-mprefer") for f in T.get_target("host").build_flags), name
    clang_x86 = CLANG + "#define __GNUC__ 4\n#define __x86_64__ 1\n" + AVX512
    monkeypatch.setenv("CC", fake_cc(tmp_path, "clang6", clang_x86 + "#define __clang_major__ 6\n"))
    assert not any(f.startswith("-mprefer") for f in T.get_target("host").build_flags)
    monkeypatch.setenv("CC", fake_cc(tmp_path, "clang-avx512",
                                     clang_x86 + "#define __clang_major__ 18\n"))
    assert T.get_target("host").build_flags[-1] == "-mprefer-vector-width=512"


@pytest.mark.parametrize("value", ["16", "32", "64", " 32 "])
def test_vector_bytes_override(value, monkeypatch):
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, value)
    host = T.get_target("host")
    assert host.vector_bytes == int(value)
    assert f"tiled for {int(value)}-byte SIMD vectors (set by $GRAPHC_HOST_VECTOR_BYTES)" \
        in host.note
    # The tiles, and the vector width the compiler is told to use for them: graphc's own
    # build still takes the native and OpenMP flags the compiler accepts.
    monkeypatch.delenv(T.VECTOR_BYTES_ENV)
    compiler = T.probe_host_compiler(T.c_compiler())
    assert host.build_flags == compiler.build_flags + T.vector_width_flags(compiler,
                                                                            int(value))


@pytest.mark.parametrize("value", ["48", "0", "128", "avx2", "32.0", "-32"])
def test_vector_bytes_override_is_validated(value, monkeypatch):
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, value)
    with pytest.raises(GraphcError, match=r"GRAPHC_HOST_VECTOR_BYTES must be one of 16, 32, "
                                          rf"64 \(bytes\), got '{value}'"):
        T.get_target("host")
    # The other targets do not read it.
    assert T.get_target("c99").vector_bytes == 16


def test_empty_override_means_unset(monkeypatch):
    monkeypatch.delenv(T.VECTOR_BYTES_ENV, raising=False)
    probed = T.get_target("host")
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, "")
    assert T.get_target("host") == probed


MLP = {"name": "mlp", "inputs": {"x": [40], "y": [10]},
       "params": {"W0": {"shape": [24, 40]}, "b0": {"shape": [24]},
                  "W1": {"shape": [10, 24]}, "b1": {"shape": [10]}},
       "nodes": {"h0": {"op": "dense", "inputs": ["x", "W0", "b0"]},
                 "a0": {"op": "relu", "inputs": ["h0"]},
                 "h1": {"op": "dense", "inputs": ["a0", "W1", "b1"]},
                 "loss": {"op": "softmax_cross_entropy", "inputs": ["h1", "y"]}},
       "outputs": ["h1"], "loss": "loss", "optimizer": {"name": "sgd", "lr": 0.1}}


@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_the_header_says_what_the_tiles_were_sized_for(vector_bytes, monkeypatch):
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, str(vector_bytes))
    _, cm = graphc.generate(MLP, target="host")
    # Accumulators of one vector; a tail chunk of lanes takes fewer than two.
    lanes = vector_bytes // 4
    sizes = {int(k) for k in re.findall(r"float c\d+\[(\d+)\]", cm.source)}
    assert lanes in sizes and max(sizes) < 2 * lanes
    note = " ".join(line.strip(" */") for line in cm.header.split("*/")[1].splitlines())
    assert f"tiled for {vector_bytes}-byte SIMD vectors" in " ".join(note.split())
    _, again = graphc.generate(MLP, target="host")
    assert (again.source, again.header) == (cm.source, cm.header)   # deterministic


needs_cpuinfo = pytest.mark.skipif(T._cpu_identity() is None, reason="no /proc/cpuinfo here")


@needs_cpuinfo
def test_the_host_identity_needs_no_compiler_run(monkeypatch):
    """A warm compile keys its prepared module by what decides the host target (compiler
    stamp, $CC, the override, the CPU) without asking the compiler: 15 ms a process."""
    monkeypatch.delenv(T.VECTOR_BYTES_ENV, raising=False)
    before = T.target_identity("host")

    def refuse(cc):
        raise AssertionError("the compiler was asked")
    monkeypatch.setattr(T, "probe_host_compiler", refuse)
    assert T.target_identity("host") == before
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, "32")
    assert T.target_identity("host") != before
    monkeypatch.setenv("CC", "some-other-cc")
    assert T.target_identity("host") != before
    assert T.target_identity("c99") == repr(T.get_target("c99"))
    with pytest.raises(GraphcError, match="unknown target 'vax'"):
        T.target_identity("vax")


def test_the_cpu_identity_leaves_out_what_varies_between_cores(tmp_path, monkeypatch):
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
               "cpu MHz\t\t: 3000.1\nflags\t\t: fpu sse2 avx2 avx512f\nbogomips\t: 6000\n\n"
               "processor\t: 1\nvendor_id\t: AuthenticAMD\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO(cpuinfo)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", fake_open)
    assert T._cpu_identity() == ("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                                 "flags\t\t: fpu sse2 avx2 avx512f")


def test_a_host_build_is_keyed_by_the_machine(tmp_path, monkeypatch):
    """The same C with -march=native is another binary on another CPU: a cache shared by
    two machines must not hand one the other's module."""
    from codegen import build as B
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    _, cm = graphc.generate(MLP, target="c99")
    here = B.build(cm.name, cm.source, cm.header, cm.cdef, machine="cpu-a")
    again = B.build(cm.name, cm.source, cm.header, cm.cdef, machine="cpu-a")
    there = B.build(cm.name, cm.source, cm.header, cm.cdef, machine="cpu-b")
    assert again.cached and again.key == here.key
    assert not there.cached and there.key != here.key


def test_the_override_reaches_a_cached_compile(tmp_path, monkeypatch):
    """Setting $GRAPHC_HOST_VECTOR_BYTES after a host compile gives C tiled for the new
    width, not the prepared module of the old one."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, "64")
    wide = graphc.compile(MLP, target="host")
    monkeypatch.setenv(T.VECTOR_BYTES_ENV, "16")
    narrow = graphc.compile(MLP, target="host")
    def words(header):   # the header's text, its comment lines joined
        return " ".join(header.replace("\n *", " ").split())
    assert "tiled for 64-byte" in words(wide.cmodule.header)
    assert "tiled for 16-byte" in words(narrow.cmodule.header)
    x = np.random.default_rng(0).standard_normal((3, 40))
    np.testing.assert_allclose(wide.forward(x=x)["h1"], narrow.forward(x=x)["h1"], rtol=1e-5)
