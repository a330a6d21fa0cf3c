"""graphc: a symbolic computation-graph compiler (SymPy gradients, generated C99, verified).

The public names load on first use (PEP 562): `import graphc.ir` (what codegen reads) or
`graphc --help` then cost no SymPy derivation, NumPy reference or explain machinery.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

from .errors import (GraphcError, InputError, NonFiniteError,  # noqa: E402, F401  (light,
                     SpecError)                                # re-exported)

_EXPORTS = {
    "Explanation": "explain", "explain": "explain", "Graph": "graph", "Builder": "builder",
    "BoundCall": "model", "CompiledModel": "model", "compile": "model", "generate": "model",
    "load_params": "model", "save_params": "model", "load_model": "model", "Reference": "reference",
    "reference": "reference", "load": "spec", "History": "train", "evaluate": "train",
    "fit": "train",
}

__all__ = sorted(["GraphcError", "InputError", "NonFiniteError", "SpecError", *_EXPORTS])


# modules of classes reached as `graphc.callbacks.EarlyStopping`, `graphc.schedules.StepLR`
_SUBMODULES = ("callbacks", "schedules")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """`graphc.explain` and `graphc.reference` are functions named like the modules that
    define them. Importing such a module sets it as this package's attribute; the function
    keeps the name, as it did when this file imported everything at once."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("explain", "reference") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
