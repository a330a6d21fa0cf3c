"""Arrays of int32 indices (an embedding's rows, class indices) checked before any C runs.

Apart from graphc.model so that the reference checks them the same way without importing
the compiled model (model -> verify -> reference -> model would be an import cycle)."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def _position(bad: np.ndarray) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.argwhere(bad)[0]) + "]"


def index_array(name: str, arr: np.ndarray, bound=None) -> np.ndarray:
    """`arr` as the int32 array of an input of indices, after checking every value: whole
    numbers (1.0 is taken, 1.5 is not) inside the valid range (`bound`, a
    graphc.graph.IndexBound: an embedding's rows, a cross-entropy's classes). The C checks
    every index it reads too (one outside reads as 0), but a wrong index is the caller's
    mistake, and is reported here, with the value, where it is and what bounds it."""
    if arr.dtype.kind not in "iub" and not (arr.dtype.kind == "f" and arr.size == 0):
        if arr.dtype.kind != "f":
            raise InputError(f"input '{name}' takes int32 indices, got dtype {arr.dtype}")
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            value = float(arr[tuple(np.argwhere(bad)[0])])
            raise InputError(f"input '{name}' holds {value!r} at {_position(bad)}: int32 "
                             "indices must be whole numbers")
    low, high = (0, bound.bound) if bound is not None else (-2 ** 31, 2 ** 31)
    bad = (arr < low) | (arr >= high)
    if bad.any():
        value = arr[tuple(np.argwhere(bad)[0])]
        value = int(value) if abs(value) < 2 ** 63 else value
        where = bound.describe() if bound is not None else "int32 holds -2^31 to 2^31 - 1"
        raise InputError(f"input '{name}' holds {value} at {_position(bad)}; {where}")
    return np.ascontiguousarray(arr, dtype=np.int32)
