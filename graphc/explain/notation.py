"""How derivations are written for people: one-line Unicode text and LaTeX.

Every formula shown by `explain` is a SymPy expression over the kernels' `Indexed` reads,
printed twice: as Unicode text for the terminal, and as LaTeX (which the HTML page turns
into MathML). Buffer names are shown as the C and the IR know them (`h1`, `loss.sumexp`),
except gradient buffers: `h1.grad` is δh1, the adjoint ∂L/∂h1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.str import StrPrinter

from graphc.ir import (ACC, ACCUMULATE, ARGMAX, ASSIGN, BATCH, MAX, SUM, Kernel, array, grad_of,
                       range_guard)

LOSS = "L"   # the batch-mean loss, what training minimises
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def value_name(buffer: str) -> str:
    """The value a buffer holds the gradient of, or the buffer itself."""
    return grad_of(buffer) or buffer


def is_grad(buffer: str) -> bool:
    return grad_of(buffer) is not None


def text_name(buffer: str) -> str:
    if buffer == "__batch_loss":
        return LOSS
    return "δ" + grad_of(buffer) if is_grad(buffer) else buffer


def _latex_word(name: str) -> str:
    # One letter reads as a math variable (x, W); longer names are words (h1, loss.sumexp).
    if len(name) == 1:
        return name
    return r"\mathrm{" + name.replace("_", r"\_") + "}"


def latex_name(buffer: str) -> str:
    if buffer == "__batch_loss":
        return LOSS
    if is_grad(buffer):
        return r"\delta_{" + _latex_word(value_name(buffer)) + "}"
    return _latex_word(buffer)


class TextPrinter(StrPrinter):
    """One line of Unicode: x[b, i0]·W[o, i0], h², Σ_{i0}, {1 if h > 0; 0 otherwise}."""
    printmethod = "_graphc_text"  # not `_sympystr`, through which Indexed prints itself

    def doprint(self, expr) -> str:
        # `*` is printed only for products (powers print as superscripts or `^`).
        return super().doprint(expr).replace("*", "·")

    def _print_Indexed(self, e):
        return f"{text_name(str(e.base.label))}[{', '.join(self._print(i) for i in e.indices)}]"

    def _print_IndexedBase(self, e):
        return text_name(str(e.label))

    def parenthesize(self, item, level, strict=False):
        # Σ_{i} reaches to the end of what follows it: as a power's base it needs the
        # parentheses its precedence (an atom's) would not give it, (Σ_{i} a)², not Σ_{i} a².
        if isinstance(item, sp.Sum) and level > PRECEDENCE["Mul"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    def _print_Add(self, expr, order=None):
        # StrPrinter's, except that a term other than the last is parenthesized when a Σ
        # in it is open to the right: Σ_{j} a[j] + 1 would read as Σ_{j} (a[j] + 1).
        terms = self._as_ordered_terms(expr, order=order)
        out = []
        for k, term in enumerate(terms):
            t = self._print(term)
            sign = "-" if t.startswith("-") and not term.is_Add else "+"
            if sign == "-":
                t = t[1:]
            if precedence(term) < PRECEDENCE["Add"] or term.is_Add or \
                    (k < len(terms) - 1 and _open_sum(t)):
                t = f"({t})"
            out += [sign, t]
        return ("" if out[0] == "+" else "-") + " ".join(out[1:])

    def _print_Pow(self, e, rational=False):
        if e.exp.is_Integer and 2 <= int(e.exp) <= 9:
            return self.parenthesize(e.base, PRECEDENCE["Pow"], strict=False) + \
                str(int(e.exp)).translate(_SUPERSCRIPTS)
        return super()._print_Pow(e, rational).replace("**", "^")

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Sum(self, e):
        ids = ", ".join(self._print(lim[0]) for lim in e.limits)
        return f"Σ_{{{ids}}} " + self.parenthesize(e.function, PRECEDENCE["Mul"], strict=True)

    def _print_Piecewise(self, e):
        parts = [f"{self._print(v)} if {self._print(c)}" if c != sp.true else
                 f"{self._print(v)} otherwise" for v, c in e.args]
        return "{" + "; ".join(parts) + "}"

    def _print_Relational(self, e):
        op = {">=": "≥", "<=": "≤", "!=": "≠", "==": "="}.get(e.rel_op, e.rel_op)
        return f"{self._print(e.lhs)} {op} {self._print(e.rhs)}"

    def _print_Max(self, e):
        return "max(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_floor(self, e):
        return "⌊" + self._print(e.args[0]) + "⌋"

    def _print_Mod(self, e):
        return f"{self.parenthesize(e.args[0], PRECEDENCE['Mul'])} mod {self.parenthesize(e.args[1], PRECEDENCE['Mul'])}"


def _open_sum(text: str) -> bool:
    """Does a Σ stand outside every bracket of `text` (so that it reaches to its end)?"""
    depth = 0
    for c in text:
        depth += (c in "([{") - (c in ")]}")
        if c == "Σ" and depth == 0:
            return True
    return False


class TexPrinter(LatexPrinter):
    """LaTeX with the same conventions: x[b, i_0], \\delta_{h1}, \\sum_{i_0}."""
    printmethod = "_graphc_latex"

    def __init__(self):
        super().__init__({"mul_symbol": "dot", "fold_short_frac": False})

    def _print_Indexed(self, e):
        return f"{latex_name(str(e.base.label))}[{', '.join(self._print(i) for i in e.indices)}]"

    def _print_IndexedBase(self, e):
        return latex_name(str(e.label))

    def _print_Float(self, e):
        s = repr(float(e))
        if "e" not in s:
            return s
        mantissa, exponent = s.split("e")
        return mantissa + r" \cdot 10^{" + str(int(exponent)) + "}"

    def _print_Sum(self, e):
        ids = ", ".join(self._print(lim[0]) for lim in e.limits)
        body = self._print(e.function)
        if e.function.is_Add:
            body = r"\left(" + body + r"\right)"
        return r"\sum_{" + ids + "} " + body

    def _print_Add(self, expr, order=None):
        # LatexPrinter's, except that a term other than the last that ends in a \sum is
        # bracketed: \sum_{j} a_j + 1 would read as a sum of a_j + 1.
        terms = self._as_ordered_terms(expr, order=order)
        tex = ""
        for k, term in enumerate(terms):
            if k > 0:
                if term.could_extract_minus_sign():
                    tex += " - "
                    term = -term
                else:
                    tex += " + "
            term_tex = self._print(term)
            if self._needs_add_brackets(term) or (k < len(terms) - 1 and _ends_in_sum(term)):
                term_tex = r"\left(" + term_tex + r"\right)"
            tex += term_tex
        return tex


def _ends_in_sum(e) -> bool:
    """Is a Σ the last thing printed of `e` (a Sum, or a product or a negation ending in one)?"""
    if isinstance(e, sp.Sum):
        return True
    return e.is_Mul and any(isinstance(f, sp.Sum) for f in e.args)


_text, _tex = TextPrinter(), TexPrinter()


@dataclass(frozen=True)
class Math:
    """One formula in both notations."""
    text: str
    latex: str

    def __add__(self, other: "Math") -> "Math":
        return Math(self.text + other.text, self.latex + other.latex)


def show(expr) -> Math:
    expr = sp.sympify(expr)
    return Math(_text.doprint(expr), _tex.doprint(expr))


def join(parts: list[Math], sep: Math) -> Math:
    out = parts[0]
    for p in parts[1:]:
        out = out + sep + p
    return out


EQ, PLUS_EQ = Math(" = ", " = "), Math(" += ", r" \mathrel{+}= ")


def product(left, right) -> Math:
    """left·right kept as two factors in this order (a worked term: the δ, then the local
    derivative), each in parentheses where precedence needs them, as a printer's own Mul
    would have them: a sum or a negative factor, and on the left a quotient or a Σ too
    (1/n·x reads as 1/(n·x) to many, Σ_{i} a·x as Σ_{i} (a·x)). A Math is taken as it is."""
    def text(e, first: bool) -> str:
        if isinstance(e, Math):
            return e.text
        t = _text.doprint(e)
        quotient = first and (sp.fraction(e)[1] != 1 or e.has(sp.Sum))
        return f"({t})" if precedence(e) < PRECEDENCE["Mul"] or t.startswith("-") or quotient else t

    def latex(e, first: bool) -> str:
        if isinstance(e, Math):
            return e.latex
        t = _tex.doprint(e)
        return r"\left(" + t + r"\right)" if _tex._needs_mul_brackets(e, first=first, last=not first) \
            or t.startswith("-") else t
    return Math(text(left, True) + "·" + text(right, False),
                latex(left, True) + r" \cdot " + latex(right, False))


def element(buffer: str, index) -> Math:
    """buffer[index], with ∂L/∂P for a param's gradient."""
    return show(array(buffer)[tuple(index)])


def grad_of_param(param: str, index=None) -> Math:
    idx = "" if index is None else "[" + ", ".join(_text.doprint(i) for i in index) + "]"
    tidx = "" if index is None else "[" + ", ".join(_tex.doprint(i) for i in index) + "]"
    return Math(f"∂L/∂{param}{idx}", r"\frac{\partial L}{\partial " + _latex_word(param) + tidx + "}")


def partial(out: sp.Indexed, wrt: sp.Indexed) -> Math:
    """∂out[...]/∂wrt[...] for a local derivative."""
    o, w = show(out), show(wrt)
    return Math(f"∂{o.text}/∂{w.text}", r"\frac{\partial " + o.latex + r"}{\partial " + w.latex + "}")


def extent_limit(sym: sp.Symbol, extent) -> tuple:
    return (sym, 0, (BATCH if extent == BATCH else sp.Integer(extent)) - 1)


def _dims(buf) -> tuple:
    return ((BATCH,) if buf.batched else ()) + tuple(buf.shape)


def tidy(k: Kernel, buffers) -> Kernel:
    """The kernel with every access written as a plain multi-index. Reshape and flatten
    keep a row-major offset in their last index (only the offset matters to the C); for
    people it is unravelled: rs[b, 0, i0] with rs of shape [2, 4] is rs[b, ⌊i0/4⌋, i0 mod 4]."""
    swap = tidy_map(k, buffers)
    if not swap:
        return k
    out = swap.get(array(k.out)[tuple(k.out_index)])
    return replace(k, out_index=tuple(out.indices) if out is not None else k.out_index,
                   body=k.body.xreplace(swap), post=k.post.xreplace(swap))


def tidy_map(k: Kernel, buffers) -> dict:
    """Access -> the same access as a plain multi-index, for the accesses that need it."""
    if buffers is None:
        return {}
    extent = {s: e for s, e in k.loops}
    # A padded read (or scatter) leaves its array only where its guard is false: its index
    # is already per axis.
    guards = {c for p in (k.body.atoms(sp.Piecewise) | k.post.atoms(sp.Piecewise))
              for _, c in p.args} | {k.guard}
    swap = {}
    for a in [array(k.out)[tuple(k.out_index)]] + k.accesses():
        buf = buffers[str(a.base.label)]
        dims, idx = _dims(buf), tuple(a.indices)
        if range_guard(idx, dims, extent) in guards - {sp.true}:
            continue
        top = [sp.sympify(sp.sympify(i).xreplace({s: sp.Integer(e - 1 if e != BATCH else 0)
                                                   for s, e in extent.items()})) for i in idx]
        if len(idx) != len(dims) or not any(d != BATCH and t.is_number and t >= d for t, d in zip(top, dims)):
            continue
        lead = 1 if buf.batched else 0
        flat, stride = sp.Integer(0), 1
        for i, d in zip(reversed(idx[lead:]), reversed(dims[lead:])):
            flat += stride * i
            stride *= d
        new, stride = [], 1
        for d in reversed(dims[lead:]):
            new.append(sp.Mod(sp.floor(flat / stride), d) if stride * d < buf.size else sp.floor(flat / stride))
            stride *= d
        swap[a] = a.base[idx[:lead] + tuple(reversed(new))]
    return swap


def kernel_rhs(k: Kernel, buffers=None) -> Math:
    """The right-hand side of a kernel in index notation: post(Σ_r body), max_r body, body."""
    k = tidy(k, buffers)
    red = k.reduction_loops()
    ext = dict(k.loops)
    if k.mode == ARGMAX:   # the position (row-major in the window) of the first maximum
        at = show(k.reduction_position())
        b = show(k.body)
        if precedence(k.body) < PRECEDENCE["Mul"]:
            b = Math(f"({b.text})", r"\left(" + b.latex + r"\right)")
        return Math(f"argmax_{{{at.text}}} {b.text}",
                    r"\operatorname*{argmax}_{" + at.latex + "} " + b.latex)
    if k.mode == MAX:
        ids = ", ".join(str(r) for r in red)
        tids = ", ".join(_tex.doprint(r) for r in red)
        b = show(k.body)
        if precedence(k.body) < PRECEDENCE["Mul"]:   # max_{i} (a + b), as Σ has it
            b = Math(f"({b.text})", r"\left(" + b.latex + r"\right)")
        return Math(f"max_{{{ids}}} {b.text}", r"\max_{" + tids + "} " + b.latex)
    if k.mode == SUM and red:
        total = sp.Sum(k.body, *[extent_limit(r, ext[r]) for r in red])
        return show(k.post.xreplace({ACC: total}))
    if k.mode == ACCUMULATE and red:  # the scatter-add also sums over loops not in its index
        return show(sp.Sum(k.body, *[extent_limit(r, ext[r]) for r in red]))
    return show(k.post.xreplace({ACC: k.body}) if k.mode == SUM else k.body)


def kernel_lhs(k: Kernel, params=()) -> Math:
    target = value_name(k.out)
    if is_grad(k.out) and target in params:
        return grad_of_param(target, k.out_index)
    return element(k.out, k.out_index)


def kernel_equation(k: Kernel, params=(), buffers=None) -> Math:
    """The kernel as an equation in index notation; `+=` marks a further contribution, and
    a guarded scatter says where it runs (where its target index lies inside the array)."""
    k = tidy(k, buffers)
    eq = kernel_lhs(k, params) + (PLUS_EQ if k.mode == ACCUMULATE else EQ) + kernel_rhs(k)
    if k.guard != sp.true:
        g = show(k.guard)
        eq = eq + Math(f", where {g.text}", r", \quad \text{where } " + g.latex)
    return eq


# ---------------------------------------------------------------- matrix notation
# Kernels over rank-2 (batch × features, or [out, in]) arrays often have a matrix form.
# Only the patterns that hold exactly are recognised; the rest stay in index notation.

def _factors(body: sp.Expr):
    """(scalar coefficient, [Indexed factors]) of a product, or None."""
    coeff, reads = sp.Integer(1), []
    for f in sp.Mul.make_args(body):
        if isinstance(f, sp.Indexed):
            reads.append(f)
        elif not f.atoms(sp.Indexed):
            coeff *= f
        else:
            return None
    return coeff, reads


def _matrix_name(buffer: str, params=()) -> Math:
    target = value_name(buffer)
    if is_grad(buffer) and target in params:
        return grad_of_param(target)
    return Math(text_name(buffer), latex_name(buffer))


def _whole(buf, index, extent) -> bool:
    """Does the access run over all of the buffer, one loop per axis? (Then a statement
    about the element is one about the whole array.)"""
    dims = _dims(buf)
    return len(index) == len(dims) and len(set(index)) == len(index) and \
        all(isinstance(i, sp.Symbol) and extent.get(i) == d for i, d in zip(index, dims))


def _plain(index, syms) -> bool:
    return all(isinstance(i, sp.Symbol) and i in syms for i in index) and len(set(index)) == len(index)


def _scaled(coeff: sp.Expr, m: Math) -> Math:
    if coeff == 1:
        return m
    if coeff == -1:
        return Math("-" + m.text, "-" + m.latex)
    c = show(coeff)
    return Math(f"({c.text})·{m.text}", r"\left(" + c.latex + r"\right) \cdot " + m.latex)


T = Math("ᵀ", r"^{\top}")


def matrix_rhs(k: Kernel, buffers, params=()) -> Math | None:
    """The kernel's right-hand side as matrices (rows = examples), when it has one."""
    syms = {s for s, _ in k.loops}
    extent = dict(k.loops)
    out_idx = tuple(k.out_index)
    if not _plain(out_idx, syms) or len(out_idx) > 2 or \
            not _whole(buffers[k.out], out_idx, extent) or \
            not all(_whole(buffers[str(a.base.label)], tuple(a.indices), extent) for a in k.accesses()):
        return None
    red = k.reduction_loops()
    parts = _factors(k.body)
    # A contraction: out[u, v] = Σ_c A·B, with A and B each indexed by one of u, v and c.
    if k.mode in (SUM, ACCUMULATE) and len(red) == 1 and len(out_idx) == 2 and parts \
            and len(parts[1]) == 2 and all(_plain(a.indices, syms) and len(a.indices) == 2
                                           for a in parts[1]):
        (c,), (u, v) = red, out_idx
        A, B = parts[1]
        if v in A.indices and u in B.indices:
            A, B = B, A
        if set(A.indices) == {u, c} and set(B.indices) == {v, c}:
            left = _matrix_name(str(A.base.label), params) + (T if A.indices[0] == c else Math("", ""))
            right = _matrix_name(str(B.base.label), params) + (T if B.indices[1] == c else Math("", ""))
            prod = _scaled(parts[0], left + Math("·", r" \cdot ") + right)
            post = k.post - ACC if k.mode == SUM else sp.Integer(0)
            if post == 0:
                return prod
            bias = _factors(post)
            if bias and bias[0] == 1 and len(bias[1]) == 1 and tuple(bias[1][0].indices) == (v,):
                name = _matrix_name(str(bias[1][0].base.label), params)
                return prod + Math(" + ", " + ") + name
            return None
    # A sum over the batch: out[i] = Σ_b A[b, i] (a bias gradient).
    if k.mode in (SUM, ACCUMULATE) and len(red) == 1 and len(out_idx) == 1 and parts \
            and len(parts[1]) == 1 and tuple(parts[1][0].indices) == (red[0], out_idx[0]) \
            and (k.mode == ACCUMULATE or k.post == ACC):
        name = _matrix_name(str(parts[1][0].base.label), params)
        r = show(red[0])
        return _scaled(parts[0], Math(f"Σ_{r.text} {name.text}[{r.text}, :]",
                                      r"\sum_{" + r.latex + "} " + name.latex + "[" + r.latex + r", :]"))
    # Elementwise: every read at the written index, so the formula holds for whole arrays.
    if k.mode in (ASSIGN, ACCUMULATE) and not red and \
            all(tuple(a.indices) == out_idx for a in k.accesses()):
        return elementwise(k.body, out_idx)
    return None


def elementwise(expr: sp.Expr, index, buffers=None, target=None) -> Math | None:
    """An expression whose reads all sit at `index`, written over whole arrays (⊙ between
    array factors at the top level; functions apply elementwise). With `buffers`, every
    read must have the target's shape."""
    index = tuple(index)
    reads = expr.atoms(sp.Indexed)
    if any(tuple(a.indices) != index for a in reads):
        return None
    if buffers is not None and any(str(a.base.label) not in buffers or
                                   _dims(buffers[str(a.base.label)]) != _dims(buffers[target])
                                   for a in reads):
        return None
    names = {a: sp.Symbol(text_name(str(a.base.label))) for a in reads}
    tex_names = {sp.Symbol(text_name(str(a.base.label))): latex_name(str(a.base.label)) for a in reads}
    plain = expr.xreplace(names)
    arrays, scalars = [], []
    for f in sp.Mul.make_args(plain):
        (arrays if f.free_symbols & set(tex_names) else scalars).append(f)
    tex = TexPrinter()
    tex._settings["symbol_names"] = tex_names
    if len(arrays) < 2:
        return Math(_text.doprint(plain), tex.doprint(plain))
    pieces = [Math(_text.parenthesize(a, PRECEDENCE["Mul"], strict=False).replace("*", "·"),
                   tex.parenthesize(a, PRECEDENCE["Mul"], strict=False)) for a in arrays]
    body = join(pieces, Math(" ⊙ ", r" \odot "))
    coeff = sp.Mul(*scalars)
    return _scaled(coeff, body) if coeff != 1 else body
