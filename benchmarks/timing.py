"""One way of timing, in Python and in C alike: warm up for a while, find the number of
calls K that makes one repeat last at least `min_repeat` seconds (doubling from 1), then
time `repeats` repeats of K calls and report the median and the minimum per call.

The C version is `benchmarks/charness.py`'s generated `main`, with the same steps.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Options:
    repeats: int = 21
    min_repeat: float = 0.02   # seconds per repeat
    warmup: float = 0.2        # seconds of calls before calibrating
    # Timed again (after `pause` seconds), at most `retries` times, while other processes
    # kept more than `busy` cores busy (benchmarks/machine.py: quietly); the machine is shared.
    retries: int = 3
    busy: float = 0.25
    pause: float = 2.0

    @classmethod
    def quick(cls) -> "Options":
        return cls(repeats=3, min_repeat=0.001, warmup=0.0, retries=0)


@dataclass(frozen=True)
class Timing:
    median: float   # seconds per call
    min: float
    calls: int      # calls per repeat
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def time_python(fn, opts: Options, sync=None, clock=time.perf_counter) -> Timing:
    """Time `fn()`; the garbage collector is off while timing, as in timeit. `sync()`, if
    given, runs at the end of every repeat inside the clock (for asynchronous dispatch).
    `clock`: time.thread_time counts this thread's CPU time only, which other processes
    on a shared machine barely change."""
    sync = sync or (lambda: None)
    was = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        fn()
        while clock() - t0 < opts.warmup:
            fn()
        sync()
        k = 1
        while True:
            t0 = clock()
            for _ in range(k):
                fn()
            sync()
            if clock() - t0 >= opts.min_repeat:
                break
            k *= 2
        per_call = []
        for _ in range(opts.repeats):
            t0 = clock()
            for _ in range(k):
                fn()
            sync()
            per_call.append((clock() - t0) / k)
    finally:
        if was:
            gc.enable()
    return Timing(statistics.median(per_call), min(per_call), k, opts.repeats)
