"""How graphc's own host builds use the OpenMP runtime: how its threads wait, and how many
of them a call runs on.

The written C holds only `#pragma omp` lines behind `#ifdef _OPENMP`; everything here is
about the module graphc builds and loads on this machine (codegen/build.py), whose build
adds -fopenmp when the compiler takes it (codegen/targets.py).

Waiting. GNU libgomp's idle threads spin by default (up to 300,000 rounds, milliseconds)
before they sleep, so that the next parallel region starts fast. Beside one busy process, on
2 cores already at load 1, that spinning took the 784-256-128-10 train step from 1.5 ms to
42 ms: the spinning threads hold the cores the working thread needs. Sleeping at once
(`OMP_WAIT_POLICY=passive`, no spin) costs the other way: on a 2-core Zen 5 VM a sleeping
thread took ~50 µs to wake, at every parallel region (and ~30 µs at a barrier), so W3's
step on 2 threads (0.91 ms) was hardly faster than on one (0.95). So graphc's modules wait
passive after a short spin (`WAIT_SETTINGS`): 1,000 rounds, 20-40 µs there, which covers
the gaps between one call's regions and ends soon after the call; beside a busy process
the call runs on one thread anyway (below). W3's step from Python, 2 cores, medians:
quiet 0.49 ms against 0.77 with no spin, beside a busy process 0.85 against 0.82 (W5
5.0 against 5.7 ms quiet, 7.1 against 6.9 busy; `python -m benchmarks --workloads
W3,W5,W6.64 --peers graphc`, once without and once with GOMP_SPINCOUNT=1000 set).
libgomp reads these settings once, when it is loaded; so graphc sets them for that moment
only, when it is the first to load libgomp and the user set neither of them, and restores
the environment right after. A process that loaded libgomp before graphc did (a PyTorch
import loads its copy) keeps that runtime's settings; the header tells C callers what to
set themselves.

Threads. The count is OpenMP's own per-thread setting (`omp_set_num_threads`), so a C
caller sets it per call from the calling thread; a model compiled with `threads=k` sets it
around each of its calls and restores the caller's (`OnThreads`).

By default (`threads=None`) each call of a batch big enough for a parallel region runs on
one thread or on all of the caller's, whichever has lately been the faster at that batch
size (`FasterOfOneOrAll`). Quiet, all threads win; beside a busy process, all threads are
no faster than one, because each parallel region ends in a barrier that waits for the thread
the scheduler has parked, and with a spinning runtime they are slower (W3's step on a 2-core
Zen 1, `python -m benchmarks.threads --workloads W3 --variants passive,active,1thread`,
medians: quiet 2.6 ms on 2 threads and 4.3 on one; beside a busy process 4.7 passive, 6.4
spinning, 4.7 on one). Either count computes the same bits (codegen/tiles.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

FLAG = "-fopenmp"
# libgomp takes GOMP_SPINCOUNT over the policy's own (none for passive); other runtimes
# read the policy alone
WAIT_SETTINGS = {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "1000"}
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
    into the process, starts with `WAIT_SETTINGS` unless the user chose how it waits."""
    chosen = any(v in os.environ for v in WAIT_SETTINGS)
    if chosen or not hasattr(os, "RTLD_NOLOAD") or _runtime_loaded():
        yield
        return
    os.environ.update(WAIT_SETTINGS)
    try:
        yield
    finally:
        for name in WAIT_SETTINGS:
            os.environ.pop(name, None)


def check_threads(threads) -> int | None:
    """`threads` as given to `graphc.compile`: None (each call on one thread or all,
    whichever is lately faster: `FasterOfOneOrAll`) or a fixed count from 1 to 1024."""
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


class _Race:
    """One batch-size class's record for `FasterOfOneOrAll`: the recent time per example on
    all threads and on one, which is in use, and when the other is tried again."""

    __slots__ = ("per_example", "one", "left", "interval", "warm", "wins", "woken")

    def __init__(self):
        self.per_example = [0.0, 0.0]     # [all threads, one thread], seconds
        self.one = False                  # all threads first: what a quiet machine favours
        self.left = 2                     # calls until the other count is tried
        self.interval = FIRST_RETRY
        self.warm = False                 # a bound call's first run (cold caches) is not timed
        self.wins = 0                     # trials in a row that beat the count in use
        self.woken = False                # the last call ran on all threads

    def next(self) -> tuple[bool, bool]:
        """(on one thread, whether this call tries the count not in use)."""
        self.left -= 1
        if self.left > 0:
            return self.one, False
        return not self.one, True

    def record(self, one: bool, trial: bool, seconds: float) -> None:
        woken, self.woken = self.woken, not one
        if not self.warm:
            self.warm, self.left = True, 2
            return
        # The first call on all threads after one on one thread wakes the others, asleep
        # since, with cold caches: on a quiet 2-core Zen 5 VM W3's step took 0.9-1.3 ms
        # so, 0.5-0.6 ms on the calls right after (one thread: 0.8-0.87). Judged on it,
        # trials of all threads lost and the default stayed on one thread for hundreds of
        # calls (15-63 % of them): a trial goes on at the next call. Nor is it a stall.
        waking = not one and not woken
        if trial and waking:
            self.left = 1
            return
        if not trial:   # the count in use: a moving average, a quarter per call
            average = self.per_example[one]
            if not one and average and seconds > STALL * average and not waking:
                # All threads waited for one the scheduler parked: another process may have
                # come. One thread is tried at the next call, and while trials lose, after
                # 2, 4, 8 ... calls again: the average of all threads takes calls to rise.
                self.left, self.interval = 1, 1
            self.per_example[one] = seconds if not average else average + (seconds - average) / 4
            return
        # A trial is one call: conditions may have changed since that count last ran.
        self.per_example[one] = seconds
        in_use = self.per_example[self.one]
        if in_use and seconds < in_use and self.wins + 1 < WINS_TO_SWITCH[one]:
            # Beside busy processes the time on all threads is bimodal (fast while the
            # competitor is parked, else a stall): one lucky call is not enough to switch.
            self.wins, self.left = self.wins + 1, 1
            return
        self.wins = 0
        if not in_use or seconds < in_use:
            self.one, self.interval = one, FIRST_RETRY
        else:   # confirmed: try again later and later, so trials cost little
            self.interval = min(2 * self.interval, LAST_RETRY)
        self.left = self.interval


# Calls between trials of the count not in use: 4 after a switch, doubling while trials
# confirm the choice, up to 64. A trial of the slower count costs its difference once, so at
# most 1/64 of it in the long run (1.5% of a call on the MLP step, quiet or beside a busy
# process), and a change of conditions is followed within 64 calls. Trials in a row must
# win to switch: 3 to all threads, whose calls beside a busy process are bimodal (where half
# of them are fast, 2 lucky trials in a row switch a quarter of the time), 2 to one thread,
# the safe count. A call on all threads that takes STALL times their average is a stall,
# and one thread is tried at the next call: after a quiet spell the next trial was up to 64
# calls away (W6.64 beside a competitor: about 60 calls at 1.4 times one thread's time).
# Those figures are of a spinning runtime (a PyTorch import, or the user, may start libgomp
# so); with graphc's passive one (no spin, before 2026-12-04), stalls were rarer and both rules
# measured the same.
FIRST_RETRY, LAST_RETRY = 4, 64
WINS_TO_SWITCH = (3, 2)   # [to all threads, to one thread]
STALL = 1.5
_clock = time.perf_counter


class FasterOfOneOrAll:
    """A C entry point run, for each batch of `parallel_from` examples or more, on one
    thread or on all of the calling thread's OpenMP count, whichever has lately taken less
    time per example for batches of that size class (n's bit length). A caller whose count
    is 1 runs on 1 either way. About 0.5 µs a timed call, where the calls timed take tens of
    microseconds at least; `entry` is what a model calls."""

    def __init__(self, lib, fn, n_at: int, parallel_from: int):
        self._get, self._set = lib.omp_get_max_threads, lib.omp_set_num_threads
        self._fn, self._n_at = fn, n_at
        self._races: dict[int, _Race] = {}

        def entry(*args):
            # Smaller batches run no parallel region: straight to C, one comparison away
            # (a plain function: an instance's __call__ cost 20% more on W2's forward).
            if args[n_at] < parallel_from:
                return fn(*args)
            return self.timed(args)
        entry.controller = self
        self.entry = entry

    def timed(self, args: tuple):
        n = args[self._n_at]
        race = self._races.get(n.bit_length()) or self._races.setdefault(n.bit_length(),
                                                                         _Race())
        one, trial = race.next()
        start = _clock()
        if one:   # the caller's count is read only to give it back
            every = self._get()
            self._set(1)
            try:
                result = self._fn(*args)
            finally:
                self._set(every)
        else:
            result = self._fn(*args)
        race.record(one, trial, (_clock() - start) / (n or 1))
        return result
