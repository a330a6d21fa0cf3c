"""How graphc's own host builds use the OpenMP runtime: how its threads wait, and how many
of them a call runs on.

The written C holds only `#pragma omp` lines behind `#ifdef _OPENMP`; everything here is
about the module graphc builds and loads on this machine (codegen/build.py), whose build
adds -fopenmp when the compiler takes it (codegen/targets.py).

Waiting. GNU libgomp's idle threads spin by default (up to 300,000 rounds, milliseconds)
before they sleep, so that the next parallel region starts fast. Beside one busy process, on
2 cores already at load 1, that spinning took the 784-256-128-10 train step from 1.5 ms to
42 ms: the spinning threads hold the cores the working thread needs. libgomp reads its wait policy
once, when it is loaded, from `OMP_WAIT_POLICY`; so graphc sets `passive` for that moment
only, when it is the first to load libgomp and the user set no policy of their own, and
restores the environment right after. A process that loaded libgomp before graphc did (a
PyTorch import loads its copy) keeps that runtime's policy; the header tells C callers to
set `OMP_WAIT_POLICY=passive` themselves.

Threads. The count is OpenMP's own per-thread setting (`omp_set_num_threads`), so a C
caller sets it per call from the calling thread; a model compiled with `threads=k` sets it
around each of its calls and restores the caller's (`OnThreads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

FLAG = "-fopenmp"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
WAIT_POLICY = "passive"
_RUNTIME = "libgomp.so.1"

# The two calls graphc makes itself, declared rather than included: <omp.h> is not on every
# compiler's default include path, and these signatures are the standard's.
API = "int omp_get_max_threads(void);\nvoid omp_set_num_threads(int count);\n"


def uses_openmp(flags: tuple[str, ...]) -> bool:
    return FLAG in flags


def _runtime_loaded() -> bool:
    try:
        ctypes.CDLL(_RUNTIME, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def runtime_defaults():
    """Around loading a module built with -fopenmp: libgomp, if this load is what brings it
    into the process, starts with passive waiting unless the user chose how it waits."""
    chosen = any(v in os.environ for v in (WAIT_POLICY_ENV, "GOMP_SPINCOUNT"))
    if chosen or not hasattr(os, "RTLD_NOLOAD") or _runtime_loaded():
        yield
        return
    os.environ[WAIT_POLICY_ENV] = WAIT_POLICY
    try:
        yield
    finally:
        os.environ.pop(WAIT_POLICY_ENV, None)


def check_threads(threads) -> int | None:
    """`threads` as given to `graphc.compile`: None (OpenMP's default, every core) or a
    count from 1 to 1024."""
    from graphc.errors import InputError
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise InputError(f"threads must be None or an integer from 1 to 1024, got {threads!r}")
    return threads


class OnThreads:
    """A C entry point that runs on `count` threads: OpenMP's count is set in the calling
    thread for the call, and the thread gets back the count it had (two calls of about
    0.1 µs each)."""

    def __init__(self, lib, fn, count: int):
        self._get, self._set = lib.omp_get_max_threads, lib.omp_set_num_threads
        self._fn, self.count = fn, count

    def __call__(self, *args):
        before = self._get()
        self._set(self.count)
        try:
            return self._fn(*args)
        finally:
            self._set(before)
