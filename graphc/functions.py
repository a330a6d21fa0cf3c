"""Functions that formulas keep whole: so that derived forms stay finite, and small.

Written out, the logistic function's derivative is `exp(-x)/(1 + exp(-x))**2`: in float32
that is inf/inf = NaN for x < -88, although the value is 0 (swish's gradient; torch gives
0). Kept as functions, `sigmoid` and `softplus` have derivatives in terms of `sigmoid`
itself, each factor of which lies in [0, 1]; the C prints each as one stable expression
(codegen/printer.py's HELPERS). `relu` and `leaky_relu` are functions so that nesting
them does not double the expression at each level.

No derivative is typed in: each is `sympy.diff` of the function's definition, folded back
into these functions by `stable_forms`, the same rewrite user formulas go through
(`exp(u)/(1 + exp(u))` -> sigmoid(u), `log(1 + exp(u))` -> softplus(u)). The folds are
identities; tests/test_numerics.py has SymPy prove them.
"""

from __future__ import annotations

import functools

import sympy as sp


class _Defined(sp.Function):
    """A function with a closed-form `definition`; its derivatives are `sympy.diff` of the
    definition, taken once per class and argument, folded by `stable_forms`."""
    is_real = True

    @classmethod
    def definition(cls, *args: sp.Expr) -> sp.Expr:
        raise NotImplementedError

    @classmethod
    def eval(cls, *args):
        # Of numbers, the value (relu(4) = 4): max and min must compare it to other numbers.
        if all(a.is_number for a in args):
            return cls.definition(*args)
        return None

    def fdiff(self, argindex=1):
        if not 1 <= argindex <= len(self.args):
            raise sp.ArgumentIndexError(self, argindex)
        key = (type(self), len(self.args), argindex)
        if key not in _derived:
            dummies = [sp.Dummy(f"t{k}", real=True) for k in range(len(self.args))]
            d = sp.diff(self.definition(*dummies), dummies[argindex - 1])
            _derived[key] = (dummies, stable_forms(d))
        dummies, d = _derived[key]
        return d.xreplace(dict(zip(dummies, self.args)))

    def _eval_rewrite_as_exp(self, *args, **kwargs):
        return self.definition(*args)


_derived: dict[tuple, tuple[list[sp.Dummy], sp.Expr]] = {}


class sigmoid(_Defined):   # noqa: N801 (SymPy function classes are lower case, like sp.exp)
    """1/(1 + exp(-x))"""
    nargs = 1

    @classmethod
    def definition(cls, x):
        return 1 / (1 + sp.exp(-x))


class softplus(_Defined):  # noqa: N801
    """log(1 + exp(x))"""
    nargs = 1

    @classmethod
    def definition(cls, x):
        return sp.log(1 + sp.exp(x))


# relu and leaky_relu are functions for size: as a Piecewise, relu(relu(x)) repeats x in
# every branch and condition, and 40 nested relus (or fused relu nodes) are 2^40 terms.
# The guarded branch is the negative one, so that NaN takes the identity branch and
# propagates, as in torch; the derivative is 0 at the kink (torch's convention), not the
# 1/2 that Max(0, x) would give.

class relu(_Defined):  # noqa: N801
    """0 if x <= 0 else x"""
    nargs = 1

    @classmethod
    def definition(cls, x):
        return sp.Piecewise((0, x <= 0), (x, True))


class leaky_relu(_Defined):  # noqa: N801
    """alpha·x if x <= 0 else x (alpha: a number)"""
    nargs = 2

    @classmethod
    def definition(cls, x, alpha):
        return sp.Piecewise((alpha * x, x <= 0), (x, True))


DEFINED_FUNCTIONS = (sigmoid, softplus, relu, leaky_relu)


def expand_definitions(expr: sp.Expr) -> sp.Expr:
    """`expr` with every defined function written out (for proofs and plain evaluation)."""
    for cls in DEFINED_FUNCTIONS:
        expr = expr.replace(cls, cls.definition)
    return expr


# ---------------------------------------------------------------- the fold

def _exp_of_one_plus(e: sp.Expr) -> sp.Expr | None:
    """u when e is exactly 1 + exp(u)."""
    if isinstance(e, sp.Add) and len(e.args) == 2 and sp.S.One in e.args:
        (other,) = [a for a in e.args if a != sp.S.One]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def _merge(mul: sp.Expr) -> sp.Expr:
    """exp(u)·sigmoid(-u)^k -> sigmoid(u)·sigmoid(-u)^(k-1): e^u/(1 + e^u) = sigmoid(u)."""
    while isinstance(mul, sp.Mul):
        factors = list(mul.args)
        for i, f in enumerate(factors):
            if not isinstance(f, sp.exp):
                continue
            u = f.args[0]
            for j, g in enumerate(factors):
                base, power = g.as_base_exp()
                if isinstance(base, sigmoid) and base.args[0] == -u and power.is_Integer \
                        and power > 0:
                    rest = [h for k, h in enumerate(factors) if k not in (i, j)]
                    mul = sp.Mul(*rest, sigmoid(u), base ** (power - 1))
                    break
            else:
                continue
            break
        else:
            return mul
    return mul


def stable_forms(expr: sp.Expr) -> sp.Expr:
    """Fold logistic and softplus patterns into `sigmoid` and `softplus`, bottom up:
    (1 + exp(u))^-k -> sigmoid(-u)^k, then exp(u)·sigmoid(-u) -> sigmoid(u), and
    log(1 + exp(u)) -> softplus(u)."""
    memo: dict[sp.Basic, sp.Basic] = {}

    def fold(e: sp.Basic) -> sp.Basic:
        if not e.args or not e.has(sp.exp):
            return e
        if e in memo:
            return memo[e]
        args = [fold(a) for a in e.args]
        out = e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
        if isinstance(out, sp.Pow) and out.exp.is_Integer and out.exp < 0:
            u = _exp_of_one_plus(out.base)
            if u is not None:
                out = sigmoid(-u) ** (-out.exp)
        elif isinstance(out, sp.log):
            u = _exp_of_one_plus(out.args[0])
            if u is not None:
                out = softplus(u)
        if isinstance(out, sp.Mul):
            out = _merge(out)
        memo[e] = out
        return out

    return fold(expr)



# ---------------------------------------------------------------- numeric evaluation

class maximum(sp.Function):  # noqa: N801
    """max(a, b, ...) once derivatives are taken, for printing and evaluation: sp.Max checks
    that its arguments compare whenever it is rebuilt, which the printer's unevaluated
    forms (x*(1 + x*x)**-1) fail, and NumPy's amax needs operands of one shape."""


class minimum(sp.Function):  # noqa: N801
    """min(a, b, ...), as `maximum`."""


def without_max_min(expr):
    """expr with sp.Max and sp.Min as `maximum` and `minimum`."""
    if not isinstance(expr, sp.Basic) or not expr.has(sp.Max, sp.Min):
        return expr
    return expr.replace(sp.Max, maximum).replace(sp.Min, minimum)


def for_lambdify(expr):
    """expr ready for `sympy.lambdify` with `numpy_namespace()`."""
    return without_ite(without_max_min(expr))


def numpy_namespace() -> dict:
    """NumPy forms of the defined functions, by name, for `sympy.lambdify`: stable (exp of
    non-positive numbers only) and NaN-propagating, like the C's."""
    import numpy as np

    def sigmoid_(x):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))

    return {"sigmoid": sigmoid_, "softplus": lambda x: np.logaddexp(0.0, x),
            "relu": lambda x: np.where(x <= 0, 0.0, x),
            "leaky_relu": lambda x, alpha: np.where(x <= 0, alpha * x, x),
            # np.maximum, not fmax: NaN propagates, as in torch
            "maximum": lambda *a: functools.reduce(np.maximum, a),
            "minimum": lambda *a: functools.reduce(np.minimum, a)}


def without_ite(expr):
    """expr with every ITE(a, b, c) in a condition written (a & b) | (~a & c). lambdify's
    NumPy printer would simplify_logic each such condition first, in time exponential in
    its variables (derivatives of nested max/min carry them)."""
    if not isinstance(expr, sp.Basic) or not expr.has(sp.ITE):
        return expr
    return expr.replace(lambda z: isinstance(z, sp.ITE),
                        lambda z: sp.Or(sp.And(z.args[0], z.args[1]),
                                        sp.And(sp.Not(z.args[0]), z.args[2])))
