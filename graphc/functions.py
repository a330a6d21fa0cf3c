"""Functions that formulas keep whole: so that derived forms stay finite, and small.

Written out, the logistic function's derivative is `exp(-x)/(1 + exp(-x))**2`: in float32
that is inf/inf = NaN for x < -88, although the value is 0 (swish's gradient; torch gives
0). Kept as functions, `sigmoid` and `softplus` have derivatives in terms of `sigmoid`
itself, each factor of which lies in [0, 1]; the C prints each as one stable expression
(codegen/printer.py's HELPERS). `relu` and `leaky_relu` are functions so that nesting
them does not double the expression at each level.

No derivative is typed in: each is `sympy.diff` of the function's definition, folded back
into these functions by `stable_forms`, the same rewrite user formulas go through: the
table RULES (`exp(u)/(1 + exp(u))` -> sigmoid(u), `log(1 + exp(u))` -> softplus(u),
log-sum-exp, log-sigmoid, ...). Every rule is an identity; tests/test_stable_forms.py has
SymPy prove each one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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

@dataclass(frozen=True)
class Rule:
    """One rewrite to a stable form: `pattern` -> `stable` in words, and why."""
    name: str
    pattern: str
    stable: str
    why: str


# The rewrites `stable_forms` applies, each an identity (tests/test_stable_forms.py has
# SymPy prove every one on its general form, and checks the float32 C against the exact
# values over [-100, 100]). u, v, a, b are any expressions; c, positive numbers; k, j whole numbers.
RULES = {r.name: r for r in (
    Rule("softplus", "log(1 + exp(u))", "softplus(u)",
         "exp(u) overflows above u = 88 in float32; softplus never does"),
    Rule("log-sum-exp", "log(exp(a) + exp(b) + ... (+ c))",
         "a + softplus(b - a), nested for more terms",
         "each exp overflows on its own; the shifted form stays finite"),
    Rule("reciprocal", "(exp(a) + exp(b) + ... (+ c))^-k", "exp(-k*logsumexp(a, b, ...))",
         "the sum overflows to inf, and inf/inf is NaN; its log does not"),
    Rule("exp product", "exp(u)*exp(v)*(c1*exp(a) + ...)", "exp(u + v) + ... , distributed",
         "so that each exp over a log-sum-exp becomes a ratio in [0, 1]"),
    Rule("logistic", "exp(j*w - k*softplus(w))", "sigmoid(w)^j*sigmoid(-w)^(k-j)",
         "a ratio of exponentials is a product of sigmoids, each in [0, 1]"),
    Rule("logistic product", "exp(j*u)*sigmoid(-u)^k", "sigmoid(u)^j*sigmoid(-u)^(k-j)",
         "exp(u) overflows where sigmoid(-u) is 0: inf*0 is NaN"),
    Rule("log-sigmoid", "log(sigmoid(u))", "-softplus(-u)",
         "sigmoid(u) underflows to 0 below u = -104 in float32, and log(0) is -inf"),
    Rule("one minus sigmoid", "1 - sigmoid(u)", "sigmoid(-u)",
         "1 - sigmoid(u) rounds to 0 above u = 17 in float32, losing every digit"),
)}


@dataclass(frozen=True)
class Rewrite:
    """What `stable_forms` did at one subexpression of a formula: before -> after, by rules."""
    before: sp.Expr
    after: sp.Expr
    rules: tuple[str, ...]   # names in RULES, the one applied at the top first

    @property
    def why(self) -> str:
        return RULES[self.rules[0]].why

    def __str__(self) -> str:
        return f"rewritten: {self.before} → {self.after} by {', '.join(self.rules)} ({self.why})"


def _log_terms(e: sp.Expr) -> list[sp.Expr] | None:
    """[a, b, ...] when e is c1·exp(a') + c2·exp(b') + ... (+ c) with at least one exp and
    two terms, every c a positive number: e = exp(a) + exp(b) + ... with a = a' + log(c1),
    and a constant term c as log(c)."""
    if not isinstance(e, sp.Add):
        return None
    out, exps = [], 0
    for t in e.args:
        coeff, rest = t.as_coeff_Mul()
        if not (coeff.is_number and coeff.is_positive):
            return None
        if rest == sp.S.One:
            out.append(sp.log(coeff))
        elif isinstance(rest, sp.exp):
            out.append(rest.args[0] + sp.log(coeff))
            exps += 1
        else:
            return None
    return out if exps else None


def _logsumexp(terms: list[sp.Expr]) -> sp.Expr:
    """log(exp(a) + exp(b) + ...) as a + softplus(b - a), nested: finite wherever the
    value is."""
    total = terms[0]
    for t in terms[1:]:
        total = total + softplus(t - total)
    return total


def _whole(q: sp.Expr) -> int | None:
    q = sp.cancel(q)
    return int(q) if q.is_Integer else None


def _logistic(arg: sp.Expr) -> sp.Expr | None:
    """exp(arg) as sigmoids where arg = R - k·softplus(w) - ... and R = j·w, 0 <= j <= k:
    e^(jw)/(1 + e^w)^k = sigmoid(w)^j·sigmoid(-w)^(k-j)."""
    spl, rest = [], []
    for t in sp.Add.make_args(arg):
        coeff, f = t.as_coeff_Mul()
        k = -coeff
        if isinstance(f, softplus) and k.is_Integer and k > 0:
            spl.append((int(k), f.args[0]))
        else:
            rest.append(t)
    remain, factors, left = sp.Add(*rest), [], []
    for k, w in spl:
        j = 0 if remain == 0 else _whole(remain / w)
        if j is None or not 0 <= j <= k:
            left.append(-k * softplus(w))
            continue
        factors.append(sigmoid(w) ** j * sigmoid(-w) ** (k - j))
        remain = remain - j * w
    if not factors:
        return None
    return sp.Mul(*factors) * sp.exp(remain + sp.Add(*left))


def _merge(mul: sp.Mul) -> sp.Expr | None:
    """exp(j·u)·sigmoid(-u)^k -> sigmoid(u)^j·sigmoid(-u)^(k-j), 1 <= j <= k."""
    factors = list(mul.args)
    for i, f in enumerate(factors):
        if not isinstance(f, sp.exp):
            continue
        for m, g in enumerate(factors):
            base, power = g.as_base_exp()
            if not (isinstance(base, sigmoid) and power.is_Integer and power > 0):
                continue
            u = -base.args[0]
            j = _whole(f.args[0] / u)
            if j is not None and 1 <= j <= power:
                rest = [h for n, h in enumerate(factors) if n not in (i, m)]
                return sp.Mul(*rest, sigmoid(u) ** j, base ** (power - j))
    return None


def _exp_product(mul: sp.Mul) -> sp.Expr | None:
    """exp(u)·exp(v)·(c1·exp(a) + ...) -> c1·exp(u + v + a) + ... when some exp's argument
    holds a softplus (a log-sum-exp left there): the ratios meet in one argument."""
    exps = [f for f in mul.args if isinstance(f, sp.exp)]
    if not exps or not any(f.args[0].has(softplus) for f in exps):
        return None
    sums = [f for f in mul.args if isinstance(f, sp.Add) and all(
        isinstance(t.as_coeff_Mul()[1], sp.exp) for t in f.args)]
    if len(exps) < 2 and not sums:
        return None
    others = [f for f in mul.args if f not in exps and f not in sums[:1]]
    arg = sp.Add(*(f.args[0] for f in exps))
    if not sums:
        return sp.Mul(*others) * sp.exp(arg)
    terms = [c * sp.exp(e.args[0] + arg) for c, e in (t.as_coeff_Mul() for t in sums[0].args)]
    return sp.Mul(*others) * sp.Add(*terms)


def _one_minus_sigmoid(add: sp.Add) -> sp.Expr | None:
    if sp.S.One not in add.args:
        return None
    for t in add.args:
        coeff, f = t.as_coeff_Mul()
        if coeff == -1 and isinstance(f, sigmoid):
            rest = list(add.args)
            rest.remove(sp.S.One)
            rest.remove(t)
            return sp.Add(*rest, sigmoid(-f.args[0]))
    return None


def _rewrite_once(e: sp.Expr) -> tuple[str, sp.Expr] | None:
    """(rule, result) of the first rule that applies at the top of e, whose arguments are
    already folded."""
    if isinstance(e, sp.log):
        x = e.args[0]
        base, power = x.as_base_exp()
        if isinstance(base, sigmoid) and power.is_Integer and power > 0:
            return "log-sigmoid", -power * softplus(-base.args[0])
        terms = _log_terms(x)
        if terms is not None:
            one_plus = len(terms) == 2 and terms[0] == 0
            return ("softplus" if one_plus else "log-sum-exp"), _logsumexp(terms)
    elif isinstance(e, sp.Pow) and e.exp.is_Integer and e.exp < 0:
        terms = _log_terms(e.base)
        if terms is not None:
            return "reciprocal", sp.exp(e.exp * _logsumexp(terms))
    elif isinstance(e, sp.exp) and e.args[0].has(softplus):
        out = _logistic(e.args[0])
        if out is not None:
            return "logistic", out
    elif isinstance(e, sp.Mul) and e.has(sp.exp):
        out = _exp_product(e)
        if out is not None:
            return "exp product", out
        out = _merge(e)
        if out is not None:
            return "logistic product", out
    elif isinstance(e, sp.Add) and e.has(sigmoid):
        out = _one_minus_sigmoid(e)
        if out is not None:
            return "one minus sigmoid", out
    return None


# Each rule removes an exp or a sigmoid, so a formula takes at most as many rewrites as it
# has of them (counted in its tree, repeats included); the budget is that count, and only
# bounds the work should a rule ever fail to shrink it.
MIN_REWRITES = 64


def stable_forms(expr: sp.Expr, record: list[Rewrite] | None = None) -> sp.Expr:
    """`expr` with every pattern of RULES rewritten to its stable form, bottom up (the
    arguments first, then the node, until no rule applies there). With `record`, a Rewrite
    is appended to it for each largest part of the formula that a rule changed, naming
    every rule applied within it."""
    memo: dict[sp.Basic, tuple[sp.Basic, tuple[str, ...]]] = {}
    budget = [MIN_REWRITES + sum(isinstance(e, (sp.exp, sigmoid))
                                 for e in sp.preorder_traversal(expr))]
    found: list[Rewrite] = []

    def fold(e: sp.Basic, shown: bool) -> tuple[sp.Basic, tuple[str, ...]]:
        """(folded e, the rules applied in it); `shown`: e is a part of the formula as
        given, whose rewrites are recorded (not a form a rule produced)."""
        if not e.args or not e.has(sp.exp, sigmoid):
            return e, ()
        if e in memo and not shown:
            return memo[e]
        folded = [fold(a, shown) for a in e.args]
        args = [a for a, _ in folded]
        before = out = e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
        below = [r for _, rs in folded for r in rs]
        rules: list[str] = []
        while budget[0] > 0:
            step = _rewrite_once(out)
            if step is None:
                break
            budget[0] -= 1
            out, inner = fold(step[1], False)
            rules += [step[0], *inner]
            if out == before:
                break
        if rules and shown and out != before:
            found.append(Rewrite(e, out, tuple(dict.fromkeys(rules[:1] + below + rules))))
        memo[e] = out, tuple(dict.fromkeys(below + rules))
        return memo[e]

    out = fold(expr, True)[0]
    if record is not None:   # the largest parts of the formula rewritten, each once
        record += [r for r in found if not any(o is not r and o.before.has(r.before)
                                               for o in found)]
    return out


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
