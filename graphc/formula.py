"""Parse a user formula (the `elementwise` op's `expr`) into SymPy, safely.

The text is parsed by Python's `ast` and rebuilt node by node from a whitelist: numbers,
the input names, + - * / **, unary minus, and the functions in FUNCTIONS. Nothing is
evaluated, so no text in a spec can run code or reach the C file except as the SymPy
expression this module builds.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Callable, Mapping

import sympy as sp

from .errors import SpecError
from .functions import Rewrite, relu, sigmoid, softplus, stable_forms


def _pow(a, b):
    # SymPy folds number ** integer exactly: refuse before 9**9**9 takes forever.
    if a.is_Rational and b.is_Integer and abs(a) != 1 and a != 0 \
            and abs(int(b)) * (max(a.p.bit_length(), a.q.bit_length()) - 1) > MAX_CONSTANT_BITS:
        raise ValueError(f"constant ({a})**({b}) is out of the range of a double")
    return sp.Pow(a, b)


# name -> (arity, builder). Every builder returns functions the C99 printer knows.
FUNCTIONS: Mapping[str, tuple[int, Callable]] = {
    "exp": (1, sp.exp), "log": (1, sp.log), "sqrt": (1, sp.sqrt),
    "sin": (1, sp.sin), "cos": (1, sp.cos), "tan": (1, sp.tan),
    "sinh": (1, sp.sinh), "cosh": (1, sp.cosh), "tanh": (1, sp.tanh),
    "asin": (1, sp.asin), "acos": (1, sp.acos), "atan": (1, sp.atan),
    "erf": (1, sp.erf),
    # Functions, not Piecewise: nested max(max(h, 1), 2) stays small (a Piecewise repeats
    # its argument in every branch), and NaN propagates (fabs; the C's max and min are
    # written for it). diff gives Heaviside for max/min: 1/2 at a tie, as torch splits it.
    "abs": (1, sp.Abs), "relu": (1, relu), "max": (2, sp.Max), "min": (2, sp.Min),
    "sigmoid": (1, sigmoid), "softplus": (1, softplus), "pow": (2, _pow),
}
CONSTANTS = {"pi": sp.pi, "e": sp.E}

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.Pow: _pow}
MAX_FORMULA_LENGTH = 2000
MAX_CONSTANT_BITS = 1100  # beyond a double's range (and its smallest subnormal)
# Numbers, names, operators, parentheses, commas, blanks: no '#' comments, quotes or
# backslashes, so nothing a C comment or string could be broken out of ever parses.
NOT_FORMULA_CHAR = re.compile(r"[^A-Za-z0-9_.+\-*/(), \t\n]")


def number(value: float | int) -> sp.Expr:
    """A SymPy number that keeps every bit of a Python float (printed round-trip later)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number here")
    if isinstance(value, int):
        return sp.Integer(value)
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return sp.Integer(int(value)) if float(value).is_integer() and abs(value) < 2**53 \
        else sp.Float(repr(float(value)), 17)


def parse_formula(text: object, symbols: Mapping[str, sp.Symbol], *, node: str,
                  field: str = "expr", rewrites: list[Rewrite] | None = None) -> sp.Expr:
    """Build the SymPy expression for `text`, whose free names must be keys of `symbols`,
    with unstable patterns in their stable forms (functions.RULES); `rewrites`, if given,
    receives what was rewritten."""
    def fail(msg: str) -> SpecError:
        return SpecError(msg, node=node, field=field)

    if not isinstance(text, str) or not text.strip():
        raise fail("must be a non-empty formula string, e.g. \"x * sigmoid(x)\"")
    if len(text) > MAX_FORMULA_LENGTH:
        raise fail(f"formula is longer than {MAX_FORMULA_LENGTH} characters")
    bad = NOT_FORMULA_CHAR.search(text)
    if bad:
        raise fail(f"character {bad.group()!r} is not allowed in a formula (use numbers, "
                   "input names, + - * / **, parentheses and known functions)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise fail(f"cannot parse formula {text!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise fail("formula is nested too deeply") from None

    def build(n: ast.AST) -> sp.Expr:
        if isinstance(n, ast.Expression):
            return build(n.body)
        if isinstance(n, ast.Constant):
            if isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
                try:
                    return number(n.value)
                except ValueError as e:
                    raise fail(str(e)) from None
            raise fail(f"only numbers may appear as constants, not {n.value!r}")
        if isinstance(n, ast.Name):
            if n.id in symbols:
                return symbols[n.id]
            if n.id in CONSTANTS:
                return CONSTANTS[n.id]
            known = ", ".join(sorted(symbols)) or "none"
            raise fail(f"unknown name '{n.id}' in formula (this node's inputs: {known})")
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](build(n.left), build(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = build(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.Call):
            if not isinstance(n.func, ast.Name) or n.func.id not in FUNCTIONS:
                name = n.func.id if isinstance(n.func, ast.Name) else ast.unparse(n.func)
                raise fail(f"unknown function '{name}' (known: {', '.join(sorted(FUNCTIONS))})")
            if n.keywords:
                raise fail(f"function '{n.func.id}' takes no keyword arguments")
            arity, make = FUNCTIONS[n.func.id]
            if len(n.args) != arity:
                raise fail(f"function '{n.func.id}' takes {arity} argument(s), got {len(n.args)}")
            return make(*[build(a) for a in n.args])
        raise fail(f"'{ast.unparse(n)}' is not allowed in a formula "
                   "(use numbers, input names, + - * / **, and known functions)")

    try:
        expr = build(tree)
    except SpecError:
        raise
    except ValueError as e:  # from _pow
        raise fail(str(e)) from None
    except RecursionError:
        raise fail("formula is nested too deeply") from None
    if expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
        raise fail(f"formula {text!r} is not finite (it simplifies to {expr})")
    if expr.has(sp.I):
        raise fail(f"formula {text!r} is not real (it simplifies to {expr})")
    # Written-out logistic, softplus and log-sum-exp become forms that stay finite, and so
    # do their derivatives.
    try:
        expr = stable_forms(expr, rewrites)
    except ValueError as e:   # from sp.Max/Min, on arguments they cannot compare
        raise fail(f"formula {text!r}: {e}") from None
    for a in expr.atoms(sp.Number):
        if not math.isfinite(float(a)) or (a.is_Rational and max(
                abs(a.p), a.q).bit_length() > MAX_CONSTANT_BITS):
            raise fail(f"formula {text!r} has a constant out of the range of a double")
    return expr


def formula_rewrites(text: str, inputs, *, node: str) -> list[Rewrite]:
    """What parsing `text` over the names `inputs` rewrote to stable forms (as the graph
    parses an elementwise node's formula), for `explain` to show."""
    out: list[Rewrite] = []
    parse_formula(text, {i: sp.Symbol(i, real=True) for i in inputs}, node=node, rewrites=out)
    return out
