"""The floating types graphc generates C in: one table, read by the CLI, the model, the
reference and the C printer. No imports, so that `graphc --help` stays quick."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """A floating type the C is generated in."""
    name: str        # numpy's
    c_type: str      # C's
    itemsize: int    # bytes
    libm: str        # libm's suffix: expf, exp
    literal: str     # a C constant's suffix: 1.0F, 1.0


DTYPES = {"float32": DType("float32", "float", 4, "f", "F"),
          "float64": DType("float64", "double", 8, "", "")}


def representable(value: float, dtype: str) -> bool:
    """Whether `value` survives rounding to `dtype`: finite, and not a nonzero that
    rounds to 0 (a C constant, a hyperparameter slot)."""
    import numpy as np   # here: this module stays import-free for `graphc --help`
    with np.errstate(over="ignore", under="ignore"):
        cast = np.dtype(dtype).type(value)
    return bool(np.isfinite(cast)) and (value == 0 or cast != 0)
