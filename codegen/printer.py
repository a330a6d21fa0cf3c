"""All math text in the generated C comes from this subclass of SymPy's C99 printer."""

from __future__ import annotations

import functools

import numpy as np
import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

from graphc.functions import without_max_min
from graphc.dtypes import representable
from graphc.ir import DTYPES



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
        self.helpers_used: set[str] = set()   # HELPERS the printed text calls

    def _helper(self, name: str, *args) -> str:
        self.helpers_used.add(name)
        return f"{name}({', '.join(self._print(a) for a in args)})"

    def _print_sigmoid(self, expr):
        return self._helper("sigmoid", *expr.args)

    def _print_softplus(self, expr):
        return self._helper("softplus", *expr.args)

    def _print_relu(self, expr):
        return self._helper("relu", *expr.args)

    def _print_leaky_relu(self, expr):
        return self._helper("leaky_relu", *expr.args)

    def _print_dropout_keep(self, expr):
        # The key and threshold as unsigned literals (a key may pass 2^31), the element's
        # flat index cast to the generator's 32-bit word.
        key, step, element, threshold = expr.args
        self.helpers_used.add("dropout_keep")
        return (f"dropout_keep({int(key):#x}U, {self._print(step)}, "
                f"(uint32_t)({self._print(element)}), {int(threshold):#x}U)")

    def _print_lerp(self, expr):
        # torch.lerp's two forms, each exact at its end of the weight (a number).
        start, end, weight = expr.args
        a, b = self.parenthesize(start, 50), self.parenthesize(end, 50)
        if weight < 0.5:
            return f"{a} + {self._print(weight)}*({b} - {a})"
        return f"{b} - {self._print(1 - weight)}*({b} - {a})"

    def _print_maximum(self, expr):
        # libm's fmax drops a NaN operand; torch.maximum propagates it.
        return self._nested("maximum", expr.args)

    def _print_minimum(self, expr):
        return self._nested("minimum", expr.args)

    _print_Max, _print_Min = _print_maximum, _print_minimum

    def _nested(self, name: str, args) -> str:
        self.helpers_used.add(name)
        text = self._print(args[0])
        for a in args[1:]:
            text = f"{name}({text}, {self._print(a)})"
        return text

    def _print_Mul(self, expr):
        """`a*b/c`, where the base printer writes `a*b*1.0F/c` for the reciprocals that
        `prepare` leaves unevaluated, and for a reciprocal of a sum holding one (SymPy
        cannot tell that it commutes): one division, and the text a reader expects."""
        num, den = [], []
        for f in expr.args:
            if f.is_Pow and f.exp == -1 and (isinstance(f.base, sp.UnevaluatedExpr)
                                             or f.base.has(sp.UnevaluatedExpr)):
                den.append(f.base.args[0] if isinstance(f.base, sp.UnevaluatedExpr) else f.base)
            else:
                num.append(f)
        if not den or not num:
            return super()._print_Mul(expr)
        sign = ""
        if num[0] == -1:
            sign, num = "-", num[1:]
        elif num[0].is_Number and num[0].is_negative:
            sign, num = "-", [-num[0], *num[1:]]
        top = "1" if not num else self._print(sp.Mul(*num, evaluate=False)) \
            if len(num) > 1 else self.parenthesize(num[0], PRECEDENCE["Mul"])
        if top == "1":
            top = self._print_Float(sp.Float(1))
        bottom = den[0] if len(den) == 1 else sp.Mul(*den, evaluate=False)
        simple = bottom.is_Atom or isinstance(bottom, (sp.Indexed, sp.Function))
        under = self._print(bottom) if simple else f"({self._print(bottom)})"
        return f"{sign}{top}/{under}"

    def _print_BooleanTrue(self, expr):
        return "1"   # C99 has no `true` without <stdbool.h>

    def _print_BooleanFalse(self, expr):
        return "0"

    def _print_Indexed(self, expr):
        var, buf = self.arrays[str(expr.base.label)]
        return f"{var}[{self._print_offset(buf.flat_offset(expr.indices))}]"

    def index(self, offset) -> str:
        """A flat offset as an array subscript: SymPy's printing for affine offsets (the
        text the golden files pin), the offset printer where a term reads an index array
        (`(size_t)tokens[16*b + i0]*8`), which SymPy would print without its cast."""
        if isinstance(offset, sp.Basic) and offset.has(sp.Indexed):
            return self._print_offset(offset)
        return self.doprint(offset)

    def _print_offset(self, offset):
        """An affine index, `784*b + i1 + 16`: terms by symbol name, the constant last.
        Printed directly (SymPy's Add printing orders terms the slow way, and blocked
        kernels print thousands of indices); anything else goes to SymPy.

        A term may be an element of an int32 array (an embedding's row, a class index):
        it is cast to size_t, `(size_t)tokens[16*b + i0]*8`, as -Wsign-conversion asks
        (the read is guarded, so the value is known to be >= 0 there)."""
        terms = offset.args if isinstance(offset, sp.Add) else (offset,)
        const, linear = 0, []
        for term in terms:
            coeff, rest = term.as_coeff_Mul()
            if rest == 1 and coeff.is_Integer:
                const += int(coeff)
            elif coeff.is_Integer and isinstance(rest, sp.Symbol):
                linear.append((rest.name, int(coeff)))
            elif coeff.is_Integer and isinstance(rest, sp.Indexed) and rest.is_integer:
                linear.append((f"(size_t){self._print_Indexed(rest)}", int(coeff)))
            else:
                return self._print(offset)
        text = ""
        for name, coeff in sorted(linear):
            mag = name if abs(coeff) == 1 else \
                f"{name}*{abs(coeff)}" if name.startswith("(") else f"{abs(coeff)}*{name}"
            text += (f" {'-' if coeff < 0 else '+'} " if text else ("-" if coeff < 0 else "")) + mag
        if const or not text:
            text += (f" {'-' if const < 0 else '+'} {abs(const)}" if text else str(const))
        return text

    def _print_Float(self, expr):
        """Round-trip digits (never the 15-digit default). A formula's constant that
        overflows the type, or is nonzero and rounds to zero in it, raises
        LiteralRangeError: the compiler would warn and the value would be wrong."""
        value = float(expr)
        if not representable(value, self.dtype):
            raise LiteralRangeError(f"constant {value!r} is out of the range of "
                                    f"{DTYPES[self.dtype].c_type} ({self.dtype})")
        return c_literal(value, self.dtype)

    def _print_Rational(self, expr):
        if max(abs(expr.p), expr.q) < 2**24:   # both exact in float: the division rounds once
            return f"{self._print_Float(sp.Float(expr.p))}/{self._print_Float(sp.Float(expr.q))}"
        return self._print_Float(sp.Float(expr, 20))

    def _print_NumberSymbol(self, expr):
        # pi, E, ...: a literal (the base printer would declare a variable mid-expression).
        return self._print_Float(sp.Float(expr.evalf(20), 20))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_NumberSymbol

    def _print_Infinity(self, expr):
        # C99's INFINITY is a float: in a double expression it would be a float-to-double
        # promotion (-Wdouble-promotion); HUGE_VAL is the double infinity under IEEE 754.
        return "INFINITY" if self.dtype == "float32" else "HUGE_VAL"

    def _print_NegativeInfinity(self, expr):
        return f"-{self._print_Infinity(expr)}"

    def _print_Integer(self, expr):
        # An int literal beyond 32 bits is not portable C (and 10**20 fits no integer type):
        # large values are floating constants.
        value = int(expr)
        return str(value) if abs(value) < 2**31 else self._print_Float(sp.Float(value))

    def _print_Piecewise(self, expr):
        # On one line, `((c) ? (a) : (b))`; the base printer breaks it over six lines.
        if expr.args[-1].cond != True:  # noqa: E712 (a SymPy boolean)
            return super()._print_Piecewise(expr)   # raises: no default branch
        text = f"({self._print_branch(expr.args[-1].expr)})"
        for value, cond in reversed(expr.args[:-1]):
            text = f"(({self._print(cond)}) ? ({self._print_branch(value)}) : {text})"
        return text

    def _print_branch(self, value):
        # Every value is real: a branch of integers only (sign(x) is 1, -1 or 0) would
        # otherwise be an int expression, converted where it meets a real (-Wconversion).
        return self._print_Float(sp.Float(value)) if value.is_Integer else self._print(value)

    def _print_Relational(self, expr):
        lhs, rhs = expr.lhs, expr.rhs
        if lhs.has(sp.Indexed) or rhs.has(sp.Indexed):
            if lhs.is_integer and rhs.is_integer:
                # An index read from an int32 array against its bound (`tokens[..] >= 0`,
                # `tokens[..] < 32`): compared as int32_t, with no cast to size_t (which
                # would turn a negative index into a large one that passes `>= 0`).
                assert all(isinstance(s, (sp.Indexed, sp.Integer)) for s in (lhs, rhs)), expr
                return f"{self._print(lhs)} {expr.rel_op} {self._print(rhs)}"
        if lhs.is_integer and rhs.is_integer:
            # Loop indices are size_t: `i - 1 >= 0` would wrap and always hold. Every term
            # is moved to the side where its coefficient is positive.
            terms = sp.Add.make_args(sp.expand(lhs - rhs))
            left = sp.Add(*[t for t in terms if t.could_extract_minus_sign() is False])
            right = -sp.Add(*[t for t in terms if t.could_extract_minus_sign() is not False])
            return f"{self._print_offset(left)} {expr.rel_op} {self._print_offset(right)}"
        if lhs.is_integer or rhs.is_integer:
            # A position compared with a stored one (an argmax): in the real type, said
            # explicitly (-Wconversion).
            real = DTYPES[self.dtype].c_type
            side = [f"({real})({self._print(s)})" if s.is_integer else self._print(s)
                    for s in (lhs, rhs)]
            return f"{side[0]} {expr.rel_op} {side[1]}"
        return super()._print_Relational(expr)

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
    """Rewrites applied before printing: small integer powers become products (max and
    min first become functions that do not re-check their unevaluated arguments)."""
    optimize, expand = _expand_small_pows()
    return optimize(without_max_min(expr), [expand])


class LiteralRangeError(ValueError):
    """A constant has no finite value in the C type (e.g. 1e300 as float)."""


# The C text a helper name calls, for one C type `T` and its libm suffix `F`.
HELPERS = {
    # exp of -|x| only: below 0, e^x/(1 + e^x), which keeps the subnormal tail that
    # 1/(1 + e^-x) loses to e^-x overflowing (x < -88 in float). NaN stays NaN.
    "sigmoid": "static T sigmoid(T x)\n{\n    const T e = expF(-fabsF(x));\n"
               "    return x >= 0 ? 1 / (1 + e) : e / (1 + e);\n}",
    # max(x, 0) + log(1 + exp(-|x|)): exp never overflows; NaN stays NaN.
    "softplus": "static T softplus(T x)\n{\n    return (x > 0 ? x : 0) + log1pF(expF(-fabsF(x)));\n}",
    # The negative side is the guarded one, so that NaN propagates, as in torch.
    "relu": "static T relu(T x)\n{\n    return x <= 0 ? 0 : x;\n}",
    "leaky_relu": "static T leaky_relu(T x, T alpha)\n{\n    return x <= 0 ? alpha * x : x;\n}",
    # As torch.maximum and torch.minimum: a NaN operand gives NaN.
    "maximum": "static T maximum(T a, T b)\n{\n    return (a > b || isnan(a)) ? a : b;\n}",
    "minimum": "static T minimum(T a, T b)\n{\n    return (a < b || isnan(a)) ? a : b;\n}",
    # graphc/dropout.py's generator (lowbias32 rounds), its bits compared as keep_mask does.
    "dropout_keep": "static uint32_t dropout_mix(uint32_t x)\n{\n    x ^= x >> 16;\n"
                    "    x *= 0x7feb352dU;\n    x ^= x >> 15;\n    x *= 0x846ca68bU;\n"
                    "    x ^= x >> 16;\n    return x;\n}\n\n"
                    "/* 1 where dropout keeps the element at this step, else 0. */\n"
                    "static T dropout_keep(uint32_t key, uint32_t step, uint32_t element, "
                    "uint32_t threshold)\n{\n"
                    "    const uint32_t stream = dropout_mix(dropout_mix(key) ^ step);\n"
                    "    const uint32_t bits = dropout_mix(dropout_mix(element ^ stream) + stream);"
                    "\n    return (bits >> 8) < threshold ? (T)1 : (T)0;\n}",
}
# File-scope functions a helper's text defines besides the one it is named after.
HELPER_SUPPORT = {"dropout_keep": ("dropout_mix",)}


def helper_source(name: str, dtype: str) -> str:
    t = DTYPES[dtype]
    return HELPERS[name].replace("T ", t.c_type + " ").replace("(T)", f"({t.c_type})") \
        .replace("F(", t.libm + "(")


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
    length (e.g. a header macro, so firmware shows where the size comes from). With
    dtype "int32", an int32_t array (an input of indices)."""
    if dtype == "int32":
        flat = np.asarray(values).ravel()
        if flat.size and not np.array_equal(flat, np.round(flat)):
            raise ValueError("int32 array values must be integers")
        flat = flat.astype(np.int64)
        body = ",\n    ".join(", ".join(str(int(v)) for v in flat[k:k + 12])
                              for k in range(0, max(1, flat.size), 12)) if flat.size else "0"
        length = size or str(max(1, flat.size))
        return f"static {'const ' if const else ''}int32_t {name}[{length}] = {{\n    {body}\n}};"
    flat = np.asarray(values, dtype=np.float64).ravel()
    body = ",\n    ".join(", ".join(c_literal(v, dtype) for v in flat[k:k + 6])
                          for k in range(0, max(1, flat.size), 6)) if flat.size else "0"
    length = size or str(max(1, flat.size))
    c_type = DTYPES[dtype].c_type
    return f"static {'const ' if const else ''}{c_type} {name}[{length}] = {{\n    {body}\n}};"
