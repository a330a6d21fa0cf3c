"""Dropout's masks: a counter-based generator, a pure function of (key, step, element).

No state but the train step's count: the backward pass draws the mask again instead of
storing it, a microcontroller keeps no generator state, and the NumPy reference draws the
same bits. Only 32-bit integer arithmetic (a Cortex-M0 has no 64-bit multiply), so that
every target agrees bit for bit:

    stream = mix32(mix32(key) ^ step)                  per dropout node and train step
    bits   = mix32(mix32(element ^ stream) + stream)   per element
    kept   = (bits >> 8) < threshold,  threshold = round((1 - p) * 2**24)

`element` is the element's flat index in the node's output over the whole batch (example
b's element i of a size-S value is b*S + i, taken mod 2**32); `key` comes from the node's
name and its `seed` attribute. mix32 is "lowbias32" from C. Wellons' hash prospector: a
bijection of 32-bit words with low avalanche bias. The outer `+ stream` keeps two streams
whose `element ^ stream` words coincide from giving equal bits.

The C twin of `keep_mask` is codegen/printer.py's `dropout_keep` helper; tests check the
two bit for bit, on the host and on emulated Cortex-M.
"""

from __future__ import annotations

import zlib

import numpy as np
import sympy as sp

THRESHOLD_BITS = 24   # the bits compared: a float32 holds any 24-bit count exactly


def node_key(node: str, seed: int) -> int:
    """The 32-bit key of a dropout node: its name and seed, so that two nodes (or two
    seeds) draw unrelated masks."""
    return zlib.crc32(f"{node}:{seed}".encode())


def keep_threshold(p: float) -> int:
    """Elements whose top 24 bits lie below this are kept: a fraction 1 - p, to 2**-25."""
    return round((1.0 - p) * (1 << THRESHOLD_BITS))


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on uint32 words (NumPy's uint32 products wrap as C's do)."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):   # a 0-d product warns where an array's wraps silently
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def keep_mask(key: int, step: int, elements: np.ndarray, threshold: int) -> np.ndarray:
    """True where the elements (flat indices, any integer array) are kept at `step`."""
    words = (np.asarray(elements, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)
    stream = mix32(mix32(np.uint32(key)) ^ np.uint32(step & 0xFFFFFFFF))
    bits = mix32(mix32(words ^ stream) + stream)
    return (bits >> np.uint32(8)) < np.uint32(threshold)


class dropout_keep(sp.Function):   # noqa: N801 (SymPy function classes are lower case)
    """dropout_keep(key, step, element, threshold): 1 where the mask keeps the element, else
    0. A step function of integers: its derivative is 0 wherever it has one, so SymPy's
    derivative of x·dropout_keep(...)·scale with respect to x is the mask times the scale."""
    nargs = 4
    is_real = True
    is_nonnegative = True

    @classmethod
    def eval(cls, key, step, element, threshold):
        if all(a.is_Integer for a in (key, step, element, threshold)):
            return sp.Integer(int(keep_mask(int(key), int(step), np.array(int(element)),
                                            int(threshold))))
        return None

    def fdiff(self, argindex=1):
        return sp.Integer(0)
