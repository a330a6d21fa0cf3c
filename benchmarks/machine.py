"""The machine a run measured: CPU, cores, SIMD flags, load, compiler; and its float32
GEMM peak, measured with NumPy's `matmul` (whatever BLAS NumPy was built with) and, when
installed, PyTorch's and JAX's: a BLAS may not use every SIMD extension the CPU has
(NumPy's OpenBLAS says which kernel it picked, e.g. "Haswell": AVX2 only)."""

from __future__ import annotations

import importlib.util
import os
import platform
import dataclasses
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np

from . import charness
from .timing import Options, time_python

# SIMD features that decide how fast float32 loops can run.
SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
        "avx512_bf16", "avx512_fp16", "amx_tile")


def _cpuinfo() -> dict:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def blas() -> str:
    """NumPy's BLAS as loaded (threadpoolctl, if installed) or as built."""
    try:
        from threadpoolctl import threadpool_info
        for pool in threadpool_info():
            if pool.get("user_api") == "blas":
                return (f"{pool['internal_api']} {pool.get('version')} "
                        f"({pool.get('architecture')}, {pool['num_threads']} threads)")
    except ImportError:
        pass
    try:
        dep = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{dep.get('name')} {dep.get('version')}"
    except Exception:   # older NumPy: no dicts mode
        return "unknown"


def info() -> dict:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    compiler = subprocess.run([*charness.cc(), "--version"], capture_output=True,
                              text=True).stdout.splitlines()
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_id": " ".join(f"{k} {cpu[k]}" for k in ("vendor_id", "cpu family", "model", "stepping")
                           if k in cpu),
        "cores": os.cpu_count(), "cores_usable": affinity,
        "simd": [f for f in SIMD if f in flags],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "python": sys.version.split()[0],
        "compiler": compiler[0] if compiler else "",
        "graphc_flags": " ".join(charness.flags()),
        "numpy_blas": blas(),
    }


def _limit(threads: int | None):
    """A context limiting BLAS threads (threadpoolctl), or none without a number."""
    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=threads, user_api="blas")


# (label, m, k, n): C[m,n] = A[m,k] · B[k,n]; the W3 shapes are its forward products.
SHAPES = [("1024²", 1024, 1024, 1024), ("W3 layer 1", 128, 784, 256),
          ("W3 layer 2", 128, 256, 128)]


def _matmuls(a: np.ndarray, b: np.ndarray):
    """(library, threads, call) for every installed library that multiplies float32
    matrices: NumPy (its BLAS), PyTorch, JAX (jit, waiting for each result)."""
    c = np.empty((a.shape[0], b.shape[1]), np.float32)
    threads = [1, os.cpu_count()] if importlib.util.find_spec("threadpoolctl") else [None]
    for t in threads:
        yield "NumPy", t, _limit(t), lambda: np.matmul(a, b, out=c)
    if importlib.util.find_spec("torch"):
        import torch
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        for t in (1, torch.get_num_threads()):
            yield "PyTorch", t, torch_threads(t), lambda: torch.matmul(ta, tb, out=tc)
    if importlib.util.find_spec("jax"):
        import jax
        ja, jb, f = jax.numpy.asarray(a), jax.numpy.asarray(b), jax.jit(lambda x, y: x @ y)
        yield "JAX", None, nullcontext(), lambda: f(ja, jb).block_until_ready()


@contextmanager
def torch_threads(threads: int):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gemm_peak(opts: Options) -> dict:
    """GFLOP/s of a float32 matrix product per shape and library, from the median and
    from the fastest repeat, on 1 thread and on the library's default. The peak is the
    best fastest-repeat figure: what the machine reaches with the libraries at hand."""
    rows = []
    rng = np.random.default_rng(0)
    for label, m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        for library, threads, context, call in _matmuls(a, b):
            with context:
                timing, foreign, attempts = quietly(lambda: time_python(call, opts), opts)
            flop = 2 * m * k * n
            rows.append({"shape": label, "m": m, "k": k, "n": n, "library": library,
                         "threads": threads or "default", "median_s": timing.median,
                         "min_s": timing.min, "gflops": flop / timing.median / 1e9,
                         "gflops_best": flop / timing.min / 1e9,
                         "foreign_cores": foreign, "attempts": attempts})
    best = max(rows, key=lambda r: r["gflops_best"])
    return {"blas": blas(), "rows": rows, "peak_gflops": best["gflops_best"],
            "peak_from": f"{best['library']}, {best['shape']}, {best['threads']} threads"}


# The core speed probe: 30 repeats of at least 0.3 ms, no warm-up (about 20 ms).
PROBE = Options(repeats=30, min_repeat=0.0003, warmup=0.0, retries=0)


def core_speed() -> float:
    """One core's speed now, in GFLOP/s: a 128 x 128 float32 matrix product on one BLAS
    thread, the fastest of 30 repeats (about 20 ms). On a shared virtual machine a neighbour on the same
    physical core, or the host's clock, can halve a core's speed with no busy process in
    this machine's /proc/stat to show for it (seen here: a fixed FMA loop at 18 GMAC/s,
    an hour later at 7.5 to 8.7 for five minutes, then at 15.7); rows timed in such a
    period are that much slower, so each workload is probed before and after it."""
    a = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    c = np.empty_like(a)
    with _limit(1):
        timing = time_python(lambda: np.matmul(a, a, out=c), PROBE)
    return 2 * 128 ** 3 / timing.min / 1e9


class ForeignLoad:
    """How many cores other processes kept busy while a block ran: the machine's busy CPU
    time (/proc/stat) minus this process's and its children's, over the wall time. A
    figure near 0 means the measurement had the machine to itself; None off Linux."""

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        self.cores = None
        if self.start and end and end[0] > self.start[0]:
            wall = end[0] - self.start[0]
            foreign = (end[1] - self.start[1]) - (end[2] - self.start[2])
            self.cores = max(0.0, foreign / wall)
        return False

    @staticmethod
    def _sample():
        import resource
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), f) for who in
                  (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
        return time.monotonic(), busy, own


def quietly(measure, opts: Options):
    """(result of `measure()`, others' load in cores or None, attempts): measured again
    while other processes were busy (see Options), keeping the quietest attempt."""
    best = None
    for attempt in range(1 + opts.retries):
        if attempt:
            time.sleep(opts.pause)
        with ForeignLoad() as foreign:
            result = measure()
        load = foreign.cores
        if best is None or (load is not None and load < best[1]):
            best = (result, load)
        if load is None or load <= opts.busy:
            break
    return best[0], best[1], attempt + 1


@contextmanager
def competitor():
    """One busy-looping Python process beside the measurement, as another user of a shared
    machine would be: started, given 0.5 s to be scheduled, and killed afterwards by its
    id. Yields the process."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def beside_competitor(opts: Options) -> Options:
    """The options for timing beside `competitor()`: it counts among others' load (one
    core), so a row is retried only while others keep `opts.busy` cores busy beyond it."""
    return dataclasses.replace(opts, busy=opts.busy + 1.0)
