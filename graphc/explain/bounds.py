"""How big an expression is, measured with an early exit, so that every symbolic step of an
explanation (simplify, expand, cancel, the fully expanded view) is tried on expressions of
bounded size only. SymPy's own `count_ops` walks the whole tree first; a net's expressions
share subtrees, and written out as a tree they can grow exponentially with depth."""

from __future__ import annotations

import sympy as sp


def _is_leaf(e: sp.Basic) -> bool:
    return not e.args or isinstance(e, sp.Indexed)


def _own_ops(e: sp.Basic) -> int:
    """Operations of one node: k terms or factors take k - 1, any other operation one."""
    return len(e.args) - 1 if isinstance(e, (sp.Add, sp.Mul)) else 1


def ops_within(e, limit: int) -> int | None:
    """The operations in `e` (written out as a tree: a shared subexpression counts every
    time it occurs), or None as soon as there are more than `limit`."""
    if not isinstance(e, sp.Basic):
        return 0
    n, visits, stack = 0, 0, [e]
    while stack:
        x = stack.pop()
        visits += 1
        if _is_leaf(x):
            continue
        n += _own_ops(x)
        if n > limit or visits > 4 * limit + 64:
            return None
        stack.extend(x.args)
    return n


def small(e, limit: int) -> bool:
    """sympy.count_ops(e) <= limit, without counting a large `e` to the end."""
    return ops_within(e, 4 * limit) is not None and sp.count_ops(e) <= limit


class TreeOps:
    """Operations of expressions built from one another (each value of a program from the
    values it reads), memoized by identity: the new nodes of each are counted once."""

    def __init__(self):
        self._memo: dict[int, tuple[sp.Basic, int]] = {}

    def __call__(self, e) -> int:
        if not isinstance(e, sp.Basic) or _is_leaf(e):
            return 0
        hit = self._memo.get(id(e))
        if hit is not None and hit[0] is e:
            return hit[1]
        n = _own_ops(e) + sum(self(a) for a in e.args)
        self._memo[id(e)] = (e, n)   # keeps e alive, so its id stays its own
        return n


class _Stop(Exception):
    pass


def expansion_work(e, limit: int) -> int | None:
    """An upper estimate of the terms `sympy.expand(e, power_exp=True)` writes, inside
    function arguments and denominators too; None past `limit`. A product of sums expands
    to the product of their term counts, a positive integer power to the power."""
    memo: dict[sp.Basic, tuple[int, int]] = {}

    def go(x) -> tuple[int, int]:   # (terms of x expanded, work inside it)
        if _is_leaf(x):
            return 1, 0
        if x in memo:
            return memo[x]
        if isinstance(x, (sp.Add, sp.Mul)):
            parts = [go(a) for a in x.args]
            work = sum(w for _, w in parts)
            terms = 0 if isinstance(x, sp.Add) else 1
            for t, _ in parts:
                terms = terms + t if isinstance(x, sp.Add) else terms * t
                if terms > limit:
                    raise _Stop
        elif isinstance(x, sp.Pow) and x.exp.is_Integer:
            t, work = go(x.base)
            k = abs(int(x.exp))
            if k > 64 or (t > 1 and t ** k > limit):
                raise _Stop
            terms = t ** k if x.exp > 0 else 1
            work += 0 if x.exp > 0 else t ** k   # a denominator is expanded on its own
        else:   # a function, a fractional power: its arguments are expanded on their own
            parts = [go(a) for a in x.args]
            terms, work = 1, sum(t + w for t, w in parts)
        if terms + work > limit:
            raise _Stop
        memo[x] = (terms, work)
        return memo[x]

    try:
        t, w = go(e)
    except _Stop:
        return None
    return t + w


def rewritten_within(e, rule, limit: int):
    """`e.rewrite(rule)`, one node at a time from the leaves up, or None as soon as the
    result grows past `limit` operations. (Rewritten whole, tanh(tanh(tanh(x))) through
    exp repeats each argument four times per level before anything could stop it.)"""
    if not isinstance(e, sp.Basic):
        return e
    size = TreeOps()
    memo: dict[sp.Basic, sp.Basic] = {}

    def go(x):
        if _is_leaf(x):
            return x
        if x in memo:
            return memo[x]
        args = [go(a) for a in x.args]
        y = x.func(*args) if any(a is not b for a, b in zip(args, x.args)) else x
        r = y.rewrite(rule, deep=False)
        if size(r) > limit:
            raise _Stop
        memo[x] = r
        return r

    try:
        return go(e)
    except _Stop:
        return None
