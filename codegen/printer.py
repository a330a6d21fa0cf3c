"""All math text in the generated C comes from this subclass of SymPy's C99 printer."""

from __future__ import annotations

import functools

import numpy as np
import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

C_TYPES = {"float32": "float", "float64": "double"}


class GraphcPrinter(C99CodePrinter):
    """C99 printer for one dtype: `expf`/`1.0F` for float32, flat offsets for `Indexed`.

    `strict` stays on, so an expression with no C form is an internal error rather than a
    comment in the output."""

    def __init__(self, dtype: str, arrays: dict[str, tuple[str, "object"]]):
        """`arrays` maps a buffer name to (C variable, Buffer) for printing its reads."""
        alias = {"float32": float32, "float64": float64}[dtype]
        super().__init__({"type_aliases": {real: alias}, "strict": True,
                          "error_on_reserved": True, "math_macros": {}})
        self.dtype = dtype
        self.arrays = arrays

    def _print_Indexed(self, expr):
        var, buf = self.arrays[str(expr.base.label)]
        return f"{var}[{self._print_offset(buf.flat_offset(expr.indices))}]"

    def _print_offset(self, offset):
        """An affine index, `784*b + i1 + 16`: terms by symbol name, the constant last.
        Printed directly (SymPy's Add printing orders terms the slow way, and blocked
        kernels print thousands of indices); anything else goes to SymPy."""
        terms = offset.args if isinstance(offset, sp.Add) else (offset,)
        const, linear = 0, []
        for term in terms:
            coeff, rest = term.as_coeff_Mul()
            if rest == 1 and coeff.is_Integer:
                const += int(coeff)
            elif coeff.is_Integer and isinstance(rest, sp.Symbol):
                linear.append((rest.name, int(coeff)))
            else:
                return self._print(offset)
        text = ""
        for name, coeff in sorted(linear):
            mag = name if abs(coeff) == 1 else f"{abs(coeff)}*{name}"
            text += (f" {'-' if coeff < 0 else '+'} " if text else ("-" if coeff < 0 else "")) + mag
        if const or not text:
            text += (f" {'-' if const < 0 else '+'} {abs(const)}" if text else str(const))
        return text

    def _print_Float(self, expr):
        # Round-trip digits: repr of the double, never the 15-digit default.
        text = repr(float(expr))
        if "e" not in text and "." not in text and "inf" not in text:
            text += ".0"
        return text + ("F" if self.dtype == "float32" else "")

    def _print_Rational(self, expr):
        return f"{self._print_Float(sp.Float(expr.p))}/{self._print_Float(sp.Float(expr.q))}"

    def _print_NumberSymbol(self, expr):
        # pi, E, ...: a literal (the base printer would declare a variable mid-expression).
        return self._print_Float(sp.Float(expr.evalf(20), 20))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_NumberSymbol

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Piecewise(self, expr):
        # On one line, `((c) ? (a) : (b))`; the base printer breaks it over six lines.
        if expr.args[-1].cond != True:  # noqa: E712 (a SymPy boolean)
            return super()._print_Piecewise(expr)   # raises: no default branch
        text = f"({self._print(expr.args[-1].expr)})"
        for value, cond in reversed(expr.args[:-1]):
            text = f"(({self._print(cond)}) ? ({self._print(value)}) : {text})"
        return text

    def _print_Symbol(self, expr):
        # Loop indices, the batch size `n`, cse temporaries and `acc`: all generated names.
        return expr.name


@functools.lru_cache(maxsize=None)
def _expand_small_pows():
    # sympy.codegen.rewriting imports sympy.tensor and combinatorics (25 ms): only on use,
    # so that loading a prepared module does not pay for it.
    from sympy.codegen.rewriting import create_expand_pow_optimization, optimize
    return optimize, create_expand_pow_optimization(4)


def prepare(expr: sp.Expr) -> sp.Expr:
    """Rewrites applied before printing: small integer powers become products."""
    optimize, expand = _expand_small_pows()
    return optimize(expr, [expand])


def c_literal(x: float, dtype: str) -> str:
    """A finite number as a C constant that reads back to the same value in `dtype`:
    the shortest digits that round-trip (float32 values are rounded to float32 first)."""
    text = str(np.float32(x)) if dtype == "float32" else repr(float(x))
    if text in ("inf", "-inf", "nan"):
        raise ValueError("C array values must be finite")
    if "e" not in text and "." not in text:
        text += ".0"
    return text + ("F" if dtype == "float32" else "")


def c_array(name: str, values: np.ndarray, dtype: str, const: bool = True,
            size: str | None = None) -> str:
    """A static C array definition, six numbers per line; `size` replaces the literal
    length (e.g. a header macro, so firmware shows where the size comes from)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    body = ",\n    ".join(", ".join(c_literal(v, dtype) for v in flat[k:k + 6])
                          for k in range(0, max(1, flat.size), 6)) if flat.size else "0"
    length = size or str(max(1, flat.size))
    return f"static {'const ' if const else ''}{C_TYPES[dtype]} {name}[{length}] = {{\n    {body}\n}};"
