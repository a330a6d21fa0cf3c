"""An Explanation as a document: built once as blocks, then written as text, Markdown,
LaTeX or HTML. The HTML page is self-contained: formulas are MathML (converted from the
LaTeX on the server side, rendered natively by the browser), pictures are inline SVG, the
style is inline; nothing is fetched when the page is viewed."""

from __future__ import annotations

import html as _html
import re
import textwrap
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from graphc.ir import ACCUMULATE, array, grad_name

from . import notation as nt
from .derivation import local_partial, local_rhs
from .numbers import _normal, array_text, fmt, sum_of_products

Math = nt.Math


# ---------------------------------------------------------------- blocks

@dataclass
class H:
    level: int
    title: list            # str and Math parts


@dataclass
class P:
    parts: list            # str and Math parts


@dataclass
class Eqs:
    items: list            # (Math, tag or None)


@dataclass
class Code:
    fn: object             # CFunction
    file: str


@dataclass
class Row:
    left: list
    right: list


@dataclass
class Pre:
    text: str


@dataclass
class Table:
    head: list
    rows: list             # cells: str or Math


@dataclass
class Details:
    summary: str
    blocks: list = field(default_factory=list)


@dataclass
class Picture:
    which: str


# ---------------------------------------------------------------- the document

def _names(names) -> str:
    return ", ".join(names)


def _arrow_path(path: list[str]) -> Math:
    text = " ← ".join(["L"] + path)
    latex = r" \leftarrow ".join(["L"] + [nt.latex_name(v) for v in path])
    return Math(text, latex)


def _num(s: str) -> Math:
    """A printed number; a negative one in parentheses, to be read as one factor."""
    return Math(f"({s})" if s.startswith("-") else s, r"\left(" + s + r"\right)" if s.startswith("-") else s)


def _numbers(terms, total) -> tuple[Math, Math]:
    """`a × b + c + ...` and their total, printed with digits enough to add up (sum_of_products)."""
    shown, result = sum_of_products(terms, total)
    return (nt.join([nt.join([_num(x) for x in term], Math(" × ", r" \times ")) for term in shown],
                    Math(" + ", " + ")), Math(result, result))


def _element_math(buffer: str, element: tuple, params) -> Math:
    idx = tuple(sp.Integer(i) for i in element)
    if nt.is_grad(buffer) and nt.value_name(buffer) in params:
        return nt.grad_of_param(nt.value_name(buffer), idx)
    return nt.element(buffer, idx)


def _term_math(step, term, buffers, n) -> Math:
    """δout·(local derivative) at the term's loop point; a long local derivative by name."""
    (seed, _), (local, _) = term.factors
    if local == 1:
        return nt.show(seed)
    if len(nt.show(local).text) > 40:
        at = dict(term.point)
        k = step.local.kernel
        out = array(k.out)[tuple(sp.sympify(i).xreplace(at) for i in k.out_index)]
        local = nt.partial(_normal(out, buffers, n), _normal(step.local.wrt.xreplace(at), buffers, n))
    return nt.product(seed, local)


def _seed_name(step) -> str:
    """The δ buffer a backward kernel's terms multiply (its seed), or L's."""
    from .numbers import split_seed
    reads = [a for a in sp.Mul.make_args(split_seed(step.kernel)[0]) if isinstance(a, sp.Indexed)]
    return str(reads[0].base.label) if reads else "L"


def _trace_eqs(line, steps_here, params, buffers, n) -> list:
    """One kernel's part of a δ element, worked out: its terms, their numbers, their sum;
    then, after the last kernel that adds to the element, the parts added up."""
    out = []
    lhs = _element_math(line.buffer, line.element, params)
    pad = Math("    ", r"\phantom{=}")
    for step in [s for s in dict.fromkeys(s for s, _ in line.terms) if s in steps_here]:
        terms = [t for s, t in line.terms if s is step]
        op = nt.PLUS_EQ if step.kernel.mode == ACCUMULATE else nt.EQ
        omitted = line.omitted[step]
        symbolic = nt.join([_term_math(step, t, buffers, n) for t in terms], Math(" + ", " + ")) \
            if terms else Math("0", "0")
        values = [(t.factors[0][1], t.factors[1][1]) if t.factors[1][0] != 1 else (t.factors[0][1],)
                  for t in terms]
        zeros = line.zeros.get(step)
        if zeros is not None and zeros.count:   # a long sum lists its terms that are not 0
            seed = _seed_name(step)
            said = Math(f"({zeros.count} more terms, each 0: ", r"\text{(" + str(zeros.count) + " more terms, each 0: }")
            why = []
            if zeros.seed:
                why.append(Math(f"{nt.text_name(seed)} is 0 at {zeros.seed}",
                                nt.latex_name(seed) + r"\text{ is 0 at " + str(zeros.seed) + "}"))
            if zeros.local:
                where = " (its read lies in the padding)" if zeros.padding == zeros.local else ""
                why.append(Math(f"the local derivative at {zeros.local}{where}",
                                r"\text{the local derivative at " + str(zeros.local) + where + "}"))
            said = said + nt.join(why, Math(", ", r"\text{, }")) + Math(")", r"\text{)}")
            symbolic = symbolic + Math(" + ", " + ") + said if terms else said
            values = values + [(0.0,)]
        if omitted:   # the total has terms not shown: the shown ones cannot add up to it
            more = Math(f" + … ({omitted} more terms)", rf" + \ldots \text{{ ({omitted} more terms)}}")
            numbers = nt.join([nt.join([_num(fmt(x)) for x in v], Math(" × ", r" \times ")) for v in values],
                              Math(" + ", " + ")) + more
            symbolic, total = symbolic + more, Math(fmt(line.parts[step]), fmt(line.parts[step]))
        else:
            numbers, total = _numbers(values, line.parts[step])
        out += [(lhs + op + symbolic, None), (pad + nt.EQ + numbers, None), (pad + nt.EQ + total, None)]
    if len(line.parts) > 1 and list(line.parts)[-1] in steps_here:
        parts = [(v,) for s, v in line.parts.items() if any(s_ is s for s_, _ in line.terms)]
        added, total = _numbers(parts, line.value)
        out.append((lhs + nt.EQ + added + nt.EQ + total,
                    f"once all {len(line.parts)} kernels have added their part"))
    return out


def document(e) -> list:
    g, params, name = e.graph, e.graph.params, e.graph.name
    file = f"{name}.c"
    one = len(e.wrt) == 1
    what = f"∂L/∂{e.wrt[0]}" if one else "∂L/∂" + "{" + _names(e.wrt) + "}"
    what_tex = (r"\partial L / \partial " + nt.latex_name(e.wrt[0])) if one else \
        r"\partial L / \partial \{" + ", ".join(nt.latex_name(p) for p in e.wrt) + r"\}"
    doc: list = [H(1, ["Where ", Math(what, what_tex), f" comes from, in {name}"])]
    doc.append(P(["Training minimises ", Math(f"L = (1/n)·Σ_b {g.loss}[b]", r"L = \frac{1}{n}\sum_b "
                  + nt.latex_name(g.loss) + "[b]"), ", the mean over the n examples of a batch of the "
                  "per-example loss. ", Math("δv", r"\delta_{v}"), " stands for ", Math("∂L/∂v", r"\partial L/\partial v"),
                  ", an array shaped like v. The index b runs over the batch; i0, i1, ... index "
                  "each array's axes in order, and are the loop variables of the C. Every local "
                  "derivative is sympy.diff of the op's formula as graphc.derive recorded it, and "
                  f"every C function is taken from the generated {file} ({e.cmodule.dtype}), in "
                  "its plain-loop form (the Cortex-M targets' C; c99 and host print the same "
                  "sums as register tiles)."]))

    doc.append(H(2, ["Paths from the loss back to the parameter" + ("" if one else "s")]))
    for p in e.wrt:
        pv = e.params[p]
        if not pv.paths:
            doc.append(P([f"{p} does not affect the loss: ", Math(f"∂L/∂{p} = 0", r"\partial L/\partial "
                          + nt.latex_name(p) + " = 0"), " (the C writes zeros)."]))
            continue
        items = [(_arrow_path(path), None) for path in pv.paths]
        doc.append(Eqs(items))
        if pv.more_paths:
            doc.append(P([f"... and {pv.more_paths} more paths to {p}."]))
    doc.append(P(["The pictures: the forward graph (values and their formulas) and the backward "
                  "graph (one node per gradient, labelled with the formula computing it; "
                  "highlighted: what lies between L and ", Math(_names(e.wrt), ", ".join(
                      nt.latex_name(p) for p in e.wrt)), ")."]))
    doc.append(Picture("forward"))
    doc.append(Picture("backward"))

    kernels = e.derivation.gradients.kernels
    bufs = e.derivation.gradients.buffers
    traces = {}
    if e.worked:
        for p, lines in e.worked.traces.items():
            for line in lines:
                traces.setdefault(line.buffer, line)

    doc.append(H(2, ["Step by step, from the loss down"]))
    for number, node in enumerate(e.nodes, 1):
        v = g.values[node.name]
        doc.append(H(3, [f"Step {number}. ", Math(f"{node.name} = {v.op}({_names(v.inputs)})",
                                                  nt.latex_name(node.name) + r" = \mathrm{" + v.op.replace("_", r"\_")
                                                  + "}(" + ", ".join(nt.latex_name(i) for i in v.inputs) + ")")]))
        # The forward formula beside the C that computes it.
        left = [P(["The formula, in index notation:"])]
        items = []
        for i in node.forward:
            k = kernels[i]
            items.append((nt.kernel_equation(k, (), bufs), e.code[i].name if i in e.code else None))
            m = nt.matrix_rhs(k, e.derivation.gradients.buffers)
            if m is not None:
                items.append((Math(f"{k.out} = ", nt.latex_name(k.out) + " = ") + m, "as matrices"))
        left.append(Eqs(items))
        if e.worked:
            val = e.worked.env[node.name]
            left.append(P(["Its value on the worked example (first example):"]))
            left.append(Pre(array_text(val[0] if g.values[node.name].batched else val)))
        for note in node.notes:
            left.append(P([note + "."]))
        for r in node.rewrites:
            left.append(P(["Rewritten to a stable form: ", nt.show(r.before), " → ",
                           nt.show(r.after), f", by {', '.join(r.rules)} ({r.why})."]))
        doc.append(Row(left, _codes(e, node.forward, file)))

        # The local derivatives: SymPy's work, done once when graphc compiles.
        items = []
        for s in node.steps:
            rec = s.local
            lhs = local_partial(rec, bufs)
            items.append((lhs + nt.EQ + nt.show(local_rhs(rec, rec.derived, bufs)), None))
            if rec.output_form:
                items.append((Math("    ", r"\phantom{=}") + nt.EQ + nt.show(local_rhs(rec, s.simplified, bufs)),
                              f"through the output {rec.kernel.out}: the form the C uses"))
            elif s.simplified != rec.derived:
                items.append((Math("    ", r"\phantom{=}") + nt.EQ + nt.show(local_rhs(rec, s.simplified, bufs)),
                              "simplified"))
            if s.sigmoid_form is not None:
                items.append((Math("    ", r"\phantom{=}") + nt.EQ + nt.show(local_rhs(rec, s.sigmoid_form, bufs)),
                              "with σ(z) = 1/(1 + exp(-z))"))
        # (a count or an argmax is no function of the inputs that a gradient flows through)
        temps = sorted({k for i in node.forward for k in [kernels[i].out]
                        if k != node.name and bufs[k].differentiable})
        held = (f" Each holds the node's other quantities fixed ({', '.join(temps)} too); the chain "
                "rule below adds up the paths through them.") if temps else ""
        doc.append(P(["Local derivatives, by ", Math("sympy.diff", r"\texttt{sympy.diff}"),
                      " of the formula with respect to each read (a derivative of a sum's term "
                      "is summed over the terms that contain the read)." + held]))
        doc.append(Eqs(items))

        # The chain rule: each local derivative became one backward kernel.
        doc.append(P(["The chain rule: each local derivative, times the δ of what it feeds "
                      "(1/n for the loss), is added into the δ of what it reads:"]))
        groups: list[list] = []
        for s in node.steps:
            fn = e.code.get(s.index)
            if groups and fn is not None and e.code.get(groups[-1][0].index) is fn:
                groups[-1].append(s)
            else:
                groups.append([s])
        for group in groups:
            items = []
            for s in group:
                items.append((nt.kernel_equation(s.kernel, params, bufs), None))
                m = nt.matrix_rhs(s.kernel, e.derivation.gradients.buffers, params)
                if m is not None:
                    items.append((_matrix_lhs(s.kernel, params) + (nt.PLUS_EQ if s.kernel.mode == ACCUMULATE
                                                                   else nt.EQ) + m, "as matrices"))
            left = [Eqs(items)]
            for buf in dict.fromkeys(s.kernel.out for s in group):
                if buf in traces:
                    eqs = _trace_eqs(traces[buf], set(group), params, bufs, e.worked.n)
                    if eqs:
                        left.append(P(["With the worked example's numbers, at one element:"]))
                        left.append(Eqs(eqs))
            doc.append(Row(left, _codes(e, [s.index for s in group], file)))
        for u, c in node.combined.items():
            mine = [s for s in node.steps if s.kernel.out == grad_name(u)]
            if len(mine) < 2 and c.reading is None and not c.gathered and not c.words:
                continue
            lhs = nt.grad_of_param(u, c.index) if u in params else nt.element(grad_name(u), c.index)
            tag = "this node's kernels together" if len(mine) > 1 else "the same, per element"
            if c.gathered:
                tag += (": each element gathers the loop points that scatter into it (as a "
                        "formula of the element's own index)")
            items = [(lhs + nt.EQ + nt.show(c.expr), tag)]
            if c.reading is not None:
                items.append((Math("    ", r"\phantom{=}") + nt.EQ + nt.show(c.reading), "read as the textbook does"))
            doc.append(P([f"Together, {node.name}'s contribution to ",
                          _arg_name(grad_name(u), params), ":"]))
            doc.append(Eqs(items))
            for sym, text, latex in c.where:
                doc.append(P(["where ", Math(f"{sym} = {text}", nt.latex_name(sym) + " = " + latex), "."]))
            if c.condition:
                doc.append(P(["The last form holds when " + c.condition + "."]))
            if c.words:
                doc.append(P(list(c.words)))

    doc.append(H(2, ["The chain rule put together"]))
    for p in e.wrt:
        pv = e.params[p]
        if not pv.paths:
            continue
        if not one:
            doc.append(H(3, [Math(f"∂L/∂{p}", r"\partial L/\partial " + nt.latex_name(p))]))
        doc.append(P(["In index notation, from the loss down (each line uses the one above):"]))
        lines = []
        for link in pv.chain:
            if link.kernels:   # no formula per element: the kernels that add into it
                lines += [(eq, "a scatter: added over its loops") for eq in link.kernels]
            else:
                lines.append((link.lhs + nt.EQ + (link.reading if link.reading is not None else link.rhs),
                              "when " + link.condition.split(";")[0] if link.condition else None))
        doc.append(Eqs(lines))
        for sym, text, latex in dict.fromkeys(w for link in pv.chain for w in link.where):
            doc.append(P(["where ", Math(f"{sym} = {text}", nt.latex_name(sym) + " = " + latex), "."]))
        for link in pv.chain:
            if link.words:
                doc.append(P(list(link.words)))
        mats = [(_chain_matrix_lhs(link, p) + nt.EQ + link.matrix, None) for link in pv.chain
                if link.matrix is not None]
        if mats:
            doc.append(P(["As matrices (rows are examples; ", Math("ᵀ", r"^{\top}"), " transposes, ",
                          Math("·", r"\cdot"), " is the matrix product, ", Math("⊙", r"\odot"),
                          " the elementwise product; functions apply elementwise):"]))
            doc.append(Eqs(mats))
    if e.worked:
        doc += _worked_blocks(e)
    omitted = [x for x in e.expanded.values() if x.skipped]
    if omitted:   # one line, whichever params it concerns: the reason is the net's
        doc.append(P([f"The fully expanded view (L as one expression of the weights, "
                      f"differentiated directly) is omitted: {omitted[0].skipped}."]))
    for p, x in e.expanded.items():
        if not x.skipped:
            doc += _expanded_blocks(e, x)
    return doc


def _matrix_lhs(k, params) -> Math:
    target = nt.value_name(k.out)
    if nt.is_grad(k.out) and target in params:
        return nt.grad_of_param(target)
    return Math(nt.text_name(k.out), nt.latex_name(k.out))


def _chain_matrix_lhs(link, param) -> Math:
    if link.value == param:
        return nt.grad_of_param(param)
    return Math(f"δ{link.value}", nt.latex_name(grad_name(link.value)))


def _codes(e, indices, file) -> list:
    seen, out = set(), []
    for i in indices:
        fn = e.code.get(i)
        if fn is not None and fn.name not in seen:
            seen.add(fn.name)
            out.append(Code(fn, file))
    return out


def _at_element(a, element, shape) -> float:
    # A scalar param's gradient is a 0-d array; its buffer has one element, [0].
    return float(np.asarray(a).reshape(-1)[np.ravel_multi_index(element, shape)])


def _worked_blocks(e) -> list:
    w, g = e.worked, e.graph
    out = [H(2, ["Worked example"])]
    out.append(P([f"n = {w.n} example{'s' if w.n != 1 else ''}. Every number above and below comes from evaluating the "
                  "formulas of the derivation themselves (NumPy over each kernel's loops, float64), "
                  "the way one works backpropagation by hand; the checks compare them with "
                  "graphc's independent NumPy reference and with the compiled C (float64)."]))
    rows = [[what, f"{err:.2e}", "ok" if ok else "MISMATCH"] for what, err, ok in w.checks]
    out.append(Table(["check", "max abs difference", "result"], rows))
    for p in e.wrt:
        lines = w.traces.get(p, [])
        if lines:
            first = lines[0]
            why = "the one asked for" if p in e.elements else "the largest in magnitude"
            out.append(P(["The element followed above: ", _element_math(first.buffer, first.element, g.params),
                          f" ({why}) = {fmt(first.value)}; model.gradients gives "
                          f"{fmt(_at_element(w.grads_c[p], first.element, w.env[first.buffer].shape))}."]))
    d = Details("The numbers in full: inputs, params, forward values and δs")
    for name, a in {**w.inputs, **w.params}.items():
        d.blocks += [P([f"{name} ({'input' if name in g.inputs else 'param'}):"]), Pre(array_text(a))]
    for v in [v for pv in e.params.values() for v in pv.on_path]:
        if v in g.nodes:
            d.blocks += [P([f"{v} ="]), Pre(array_text(w.env[v]))]
    for pv in e.params.values():
        for v in pv.on_path:
            if grad_name(v) in w.env:
                label = f"∂L/∂{v} =" if v in g.params else f"δ{v} ="
                d.blocks += [P([label]), Pre(array_text(w.env[grad_name(v)]))]
    out.append(d)
    return out


MAX_SHOWN = 1500   # characters of an expanded expression worth printing


def _expanded_blocks(e, x) -> list:
    out = [H(2, ["Fully expanded: ", Math(f"∂L/∂{x.param}", r"\partial L/\partial " + nt.latex_name(x.param)),
                 " without the chain rule"])]
    out.append(P(["This net has few parameters, so its loss can be written out. With one example "
                  "(inputs as symbols), L as one expression of the weights",
                  " (a softmax's max shift stays a symbol: L does not change with it)" if x.shifts else "",
                  ":"]))
    shown = nt.show(x.loss)
    if len(shown.text) <= MAX_SHOWN:
        out.append(Eqs([(Math("L = ", "L = ") + shown, None)]))
    else:
        out.append(P([f"(L has {sp.count_ops(x.loss)} operations; too long to print here.)"]))
    c = x.checks[0]
    w = _element_math(grad_name(x.param), c.element, e.graph.params)
    direct, chain = nt.show(c.direct), nt.show(c.chain)
    if len(direct.text) + len(chain.text) <= 2 * MAX_SHOWN:
        out.append(P(["sympy.diff of L directly, and what the backward kernels (the chain rule) "
                      "compute, for the first element:"]))
        out.append(Eqs([(w + nt.EQ + direct, "directly"), (w + nt.EQ + chain, "chain rule")]))
    sym = sum(1 for c in x.checks if c.symbolic)
    rows = [[_element_math(grad_name(x.param), c.element, e.graph.params),
             {True: "0", False: "not reduced to 0", None: "not tried (too large)"}[c.symbolic],
             f"{c.max_numeric_diff:.1e}", "ok" if c.ok else "MISMATCH"] for c in x.checks]
    out.append(P([f"Direct minus chain rule, for every element: SymPy reduces {sym} of "
                  f"{len(x.checks)} to 0, and all are compared at {x.points} random points."]))
    out.append(Table(["element", "simplify(direct − chain)", f"max |difference| at {x.points} points", "result"], rows))
    return out


# ---------------------------------------------------------------- text

def _plain(parts) -> str:
    return "".join(p.text if isinstance(p, Math) else p for p in parts)


def _arg_name(buf: str, params) -> Math:
    if nt.is_grad(buf) and nt.value_name(buf) in params:
        return nt.grad_of_param(nt.value_name(buf))
    return Math(nt.text_name(buf), nt.latex_name(buf))


def _fused_note(fn) -> str:
    if len(fn.parts) < 2:
        return ""
    return f" Fusion made this one function compute {len(fn.parts)} steps: {', '.join(fn.parts)}."


def _code_caption(b: Code, params) -> str:
    legend = "; ".join(f"{a} = {_arg_name(buf, params).text} ({ptr})" for a, buf, ptr in b.fn.arguments)
    return f"{b.fn.name} in {b.file}, called as {b.fn.call}: {legend}.{_fused_note(b.fn)}"


def text(e) -> str:
    out: list[str] = []

    def emit(blocks, indent=""):
        for b in blocks:
            if isinstance(b, H):
                t = _plain(b.title)
                out.append("")
                out.append(indent + t)
                if b.level < 3:
                    out.append(indent + ("=" if b.level == 1 else "-") * len(t))
            elif isinstance(b, P):
                out.extend(textwrap.wrap(_plain(b.parts), 96, initial_indent=indent,
                                         subsequent_indent=indent, break_long_words=False))
            elif isinstance(b, Eqs):
                for m, tag in b.items:
                    out.append(indent + "    " + m.text + (f"    [{tag}]" if tag else ""))
            elif isinstance(b, Code):
                out.extend(textwrap.wrap(_code_caption(b, e.graph.params), 96, initial_indent=indent + "    C: ",
                                         subsequent_indent=indent + "       ", break_long_words=False))
                out.extend(indent + "    │ " + line for line in b.fn.text.splitlines())
            elif isinstance(b, Row):
                emit(b.left, indent)
                emit(b.right, indent)
            elif isinstance(b, Pre):
                out.extend(indent + "    " + line for line in b.text.splitlines())
            elif isinstance(b, Table):
                cells = [b.head] + [[c.text if isinstance(c, Math) else c for c in r] for r in b.rows]
                widths = [max(len(r[k]) for r in cells) for k in range(len(b.head))]
                for n_, r in enumerate(cells):
                    out.append(indent + "    " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip())
                    if n_ == 0:
                        out.append(indent + "    " + "  ".join("-" * wd for wd in widths))
            elif isinstance(b, Details):
                out.append("")
                out.append(indent + b.summary + ":")
                emit(b.blocks, indent + "  ")
            elif isinstance(b, Picture):
                if b.which == "backward":
                    out.append(indent + "    (pictures: Explanation.dot('forward' or 'backward'), "
                               ".svg(), or the HTML page)")
    emit(document(e))
    return "\n".join(out).lstrip("\n") + "\n"


# ---------------------------------------------------------------- markdown

def _md_inline(parts) -> str:
    return "".join(f"${p.latex}$" if isinstance(p, Math) else p for p in parts)


def markdown(e) -> str:
    out: list[str] = []

    def emit(blocks):
        for b in blocks:
            if isinstance(b, H):
                out.append("#" * b.level + " " + _md_inline(b.title))
            elif isinstance(b, P):
                out.append(_md_inline(b.parts))
            elif isinstance(b, Eqs):
                for m, tag in b.items:
                    out.append(f"$$ {m.latex} $$" + (f" *({tag})*" if tag else ""))
            elif isinstance(b, Code):
                out.append(f"`{b.fn.name}` in `{b.file}`, called as `{b.fn.call}`: " + "; ".join(
                    f"`{a}` = ${_arg_name(buf, e.graph.params).latex}$ (`{ptr}`)"
                    for a, buf, ptr in b.fn.arguments) + "." + _fused_note(b.fn))
                out.append("```c\n" + b.fn.text + "\n```")
            elif isinstance(b, Row):
                emit(b.left)
                emit(b.right)
            elif isinstance(b, Pre):
                out.append("```\n" + b.text + "\n```")
            elif isinstance(b, Table):
                out.append("| " + " | ".join(b.head) + " |\n|" + "---|" * len(b.head))
                out[-1] += "".join("\n| " + " | ".join(f"${c.latex}$" if isinstance(c, Math) else c
                                                       for c in r) + " |" for r in b.rows)
            elif isinstance(b, Details):
                out.append(f"<details><summary>{_html.escape(b.summary)}</summary>\n")
                emit(b.blocks)
                out.append("</details>")
            elif isinstance(b, Picture) and b.which == "backward":
                out.append("*(The forward and backward graphs: `Explanation.dot()` / `.svg()`, "
                           "or the HTML page.)*")
    emit(document(e))
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------- LaTeX

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex_text(s: str) -> str:
    s = "".join(_TEX_SPECIAL.get(c, c) for c in s)
    # Unicode outside math in prose: the few symbols the prose uses.
    for u, t in (("∂", r"$\partial$"), ("δ", r"$\delta$"), ("σ", r"$\sigma$"), ("Σ", r"$\Sigma$"),
                 ("·", r"$\cdot$"), ("−", "-"), ("…", r"\ldots{}"), ("ᵀ", r"$^\top$"), ("⊙", r"$\odot$"),
                 ("|", r"$|$"), ("→", r"$\to$")):
        s = s.replace(u, t)
    return s


def _tex_inline(parts) -> str:
    return "".join(f"${p.latex}$" if isinstance(p, Math) else _tex_text(p) for p in parts)


def latex_body(e) -> str:
    out: list[str] = []

    def emit(blocks):
        for b in blocks:
            if isinstance(b, H):
                cmd = {1: "section*", 2: "subsection*", 3: "subsubsection*"}[b.level]
                out.append(f"\\{cmd}{{{_tex_inline(b.title)}}}")
            elif isinstance(b, P):
                out.append(_tex_inline(b.parts))
            elif isinstance(b, Eqs):
                for m, tag in b.items:
                    out.append("\\[ " + m.latex + (f" \\qquad \\text{{({_tex_text(tag)})}}" if tag else "")
                               + " \\]")
            elif isinstance(b, Code):
                out.append(_tex_text(_code_caption(b, e.graph.params)))
                out.append("\\begin{verbatim}\n" + _ascii(b.fn.text) + "\n\\end{verbatim}")
            elif isinstance(b, Row):
                emit(b.left)
                emit(b.right)
            elif isinstance(b, Pre):
                out.append("\\begin{verbatim}\n" + b.text + "\n\\end{verbatim}")
            elif isinstance(b, Table):
                cols = "l" * len(b.head)
                rows = [" & ".join(_tex_text(h) for h in b.head) + r" \\ \hline"]
                rows += [" & ".join(f"${c.latex}$" if isinstance(c, Math) else _tex_text(c) for c in r)
                         + r" \\" for r in b.rows]
                out.append(f"\\begin{{tabular}}{{{cols}}}\n" + "\n".join(rows) + "\n\\end{tabular}")
            elif isinstance(b, Details):
                out.append(f"\\paragraph{{{_tex_text(b.summary)}}}")
                emit(b.blocks)
    emit(document(e))
    return "\n\n".join(out) + "\n"


def _ascii(code: str) -> str:
    # verbatim under pdflatex takes ASCII only; the C's comments carry the formula in Unicode.
    for u, a in (("Σ", "sum"), ("·", "*"), ("δ", "d"), ("∂", "d"), ("ᵀ", "^T")):
        code = code.replace(u, a)
    return code


def latex(e, standalone: bool = True) -> str:
    body = latex_body(e)
    if not standalone:
        return body
    return ("\\documentclass[10pt]{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{amsmath}\n"
            "\\usepackage[margin=2cm,landscape]{geometry}\n\\setlength{\\parindent}{0pt}\n"
            "\\setlength{\\parskip}{0.6em}\n\\allowdisplaybreaks\n\\begin{document}\n"
            + body + "\\end{document}\n")


def latex_summary(e) -> str:
    """The chain rule put together, as display math (Jupyter's text/latex)."""
    lines = []
    for p in e.wrt:
        for link in e.params[p].chain:
            rhs = link.reading if link.reading is not None else link.rhs
            lines.append(link.lhs.latex + " &= " + rhs.latex)
    return "$$\\begin{aligned}\n" + " \\\\\n".join(lines) + "\n\\end{aligned}$$"


# ---------------------------------------------------------------- HTML

# Scoped to the explanation's own <div>, so that in a notebook it styles nothing else.
CSS = """
.graphc-explain { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 0 auto;
  max-width: 1500px; padding: 1.2em 2em; color: #1b1f24; line-height: 1.45; }
.graphc-explain h1 { font-size: 1.6em; }
.graphc-explain h2 { margin-top: 2em; border-bottom: 1px solid #d0d7de; }
.graphc-explain h3 { margin-top: 1.6em; color: #0b3d75; }
.graphc-explain .row { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr);
  gap: 1.5em; border-top: 1px dashed #d0d7de; padding: .6em 0; }
.graphc-explain .eq { display: flex; flex-wrap: wrap; align-items: baseline; column-gap: 1em;
  padding: .15em 0; }
.graphc-explain .eq > .f { min-width: 0; max-width: 100%; }
.graphc-explain .eq math { font-size: 1.12em; math-style: normal; }
.graphc-explain .tag { color: #57606a; font-size: .8em; }
.graphc-explain code.formula { font-family: "DejaVu Sans Mono", monospace; font-size: .82em;
  white-space: break-spaces; overflow-wrap: anywhere; }
.graphc-explain figure.c { margin: 0; }
.graphc-explain figure.c figcaption { font-size: .8em; color: #57606a; margin-bottom: .3em;
  overflow-wrap: anywhere; }
.graphc-explain figure.c figcaption code { color: #0b3d75; }
.graphc-explain pre { background: #f6f8fa; padding: .6em .8em; font-size: .82em;
  font-family: "DejaVu Sans Mono", monospace; border-radius: 4px; margin: .2em 0;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.graphc-explain pre .cm { color: #6e7781; }
.graphc-explain table { border-collapse: collapse; margin: .5em 0; max-width: 100%; }
.graphc-explain td, .graphc-explain th { border: 1px solid #d0d7de; padding: .25em .6em;
  text-align: left; font-size: .9em; overflow-wrap: anywhere; }
.graphc-explain .picture { margin: 1em 0; }
.graphc-explain .picture svg { max-width: 100%; height: auto; }
.graphc-explain .picture figcaption { color: #57606a; font-size: .9em; }
.graphc-explain details { margin: .8em 0; }
.graphc-explain summary { cursor: pointer; color: #0b3d75; }
.graphc-explain .ok { color: #1a7f37; }
.graphc-explain .bad { color: #cf222e; font-weight: bold; }
.graphc-explain footer { margin-top: 3em; font-size: .8em; color: #57606a; }
"""
# Nothing on the page scrolls sideways: C and number listings wrap their lines, pictures
# scale to the width, and formulas wrap between <math> pieces (see _formula).


_MRM = re.compile(r"\\mathrm\{((?:[^{}\\]|\\_)+)\}")
_PLUS_EQ = "<mo><mrow><mo>&#x0002B;</mo></mrow></mo><mo>&#x0003D;</mo>"


def _mathml(latex_src: str, display: bool, infix: bool = False) -> str:
    from latex2mathml.converter import convert
    # A multi-letter name is one word in MathML (one <mtext>), not letters and a `.` operator.
    src = _MRM.sub(lambda m: r"\text{" + m.group(1).replace(r"\_", "_") + "}", latex_src)
    out = convert(src, display="block" if display else "inline").replace(_PLUS_EQ, "<mo>+=</mo>")
    if infix:   # a piece that begins with a binary operator: spaced as one, not as a sign
        out = re.sub(r"^(<math[^>]*><mrow>)<mo>", r'\1<mo form="infix">', out)
    return out


# Chromium does not break a line inside one <math>, so a formula wider than its column is
# written as several, split before binary operators outside every group; the browser wraps
# between them. Widths are estimated in characters (a command such as \cdot is one glyph):
PIECE_CHARS = 36      # at most this wide a piece fits the narrower column of a 1280 px page
# Before a relation or a term first; before a factor only when a term is still too wide.
_TERMS = (" = ", r" \mathrel{+}= ", " + ", " - ", r" \leftarrow ")
_FACTORS = _TERMS + (r" \cdot ", r" \odot ", r" \times ")
# What a binary operator cannot follow (then it is a sign, or the body of a Σ begins):
_OPERAND_NEXT = re.compile(r"(?:[=+\-(]|\\(?:cdot|odot|times|leftarrow|left\(|phantom\{=\})"
                           r"|\\(?:sum|max|min)_\{(?:[^{}]|\{[^{}]*\})*\})\s*$")
_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|.", re.S)
_NAMED = {r"\log", r"\exp", r"\tanh", r"\cosh", r"\sinh", r"\sin", r"\cos", r"\max", r"\min"}


def _unbraced_arguments(src: str) -> str:
    """\\tanh{\\left(x\\right)} -> \\tanh\\left(x\\right): the same formula, but the argument
    no longer a {} group that cannot be split."""
    tokens, out, kept = _TOKEN.findall(src), [], []

    def follows_function(k: int) -> bool:   # \\tanh{ or \\tanh^{2}{
        if k > 0 and tokens[k - 1] == "}":
            depth, k = 0, k - 1
            while k >= 0:
                depth += (tokens[k] == "}") - (tokens[k] == "{")
                if depth == 0:
                    break
                k -= 1
            if k < 1 or tokens[k - 1] != "^":
                return False
            k -= 1
        return k > 0 and tokens[k - 1] in _NAMED

    for k, t in enumerate(tokens):
        if t == "{":
            drop = tokens[k + 1:k + 2] == [r"\left"] and follows_function(k)
            kept.append(not drop)
            if drop:
                continue
        elif t == "}" and kept and not kept.pop():
            continue
        out.append(t)
    return "".join(out)


def _pieces(src: str, flat: bool, breaks: tuple) -> list[str]:
    """src split before its binary operators in `breaks` outside every {} group, index [],
    environment and (unless `flat`: then they are plain parentheses, which may be split)
    \\left(...\\right) pair."""
    if flat:
        src = _unbraced_arguments(src).replace(r"\left(", "(").replace(r"\right)", ")")
    out, start, depth = [], 0, 0
    for m in _TOKEN.finditer(src):
        t, i = m.group(), m.start()
        if depth == 0 and i > start and src.startswith(breaks, i) \
                and not _OPERAND_NEXT.search(src[start:i]):
            out.append(src[start:i].strip())
            start = i
        depth += (t in ("{", "[", r"\left", r"\begin")) - (t in ("}", "]", r"\right", r"\end"))
    return out + [src[start:].strip()]


def _chars(src: str) -> float:
    """The width of LaTeX, estimated in characters: a fraction as its wider part, scripts
    smaller, a command one glyph (a function's name its letters)."""
    tokens = [t for t in _TOKEN.findall(src) if not t.isspace()]
    at = 0

    def arg() -> float:
        nonlocal at
        at += 1
        if at > len(tokens):
            return 0.0
        return run() if tokens[at - 1] == "{" else 1.0

    def run() -> float:   # up to the "}" closing the current group, or the end
        nonlocal at
        width = 0.0
        while at < len(tokens):
            t = tokens[at]
            at += 1
            if t == "}":
                break
            if t == "{":
                width += run()
            elif t == r"\frac":
                width += max(arg(), arg())
            elif t in ("^", "_"):
                width += 0.7 * arg()
            elif t in (r"\text", r"\mathrm", r"\operatorname", r"\phantom"):
                width += arg()
            elif t not in (r"\left", r"\right"):
                width += len(t) - 1 if t in _NAMED else 1
        return width
    return run()


def _formula(m: Math) -> str:
    """One formula as MathML that wraps to its column: whole when it is short; else split
    outside brackets, or inside them (bracketing with plain, unstretched parentheses); a
    formula with a piece too wide even so (a long fraction) as wrapping Unicode text."""
    if _chars(m.latex) <= PIECE_CHARS:
        return _mathml(m.latex, False)
    for flat, breaks in ((False, _TERMS), (False, _FACTORS), (True, _TERMS), (True, _FACTORS)):
        pieces = _pieces(m.latex, flat, breaks)
        if max(map(_chars, pieces)) <= PIECE_CHARS:
            return "<wbr>".join(_mathml(p, False, infix=k > 0) for k, p in enumerate(pieces))
    return f'<code class="formula">{_html.escape(m.text)}</code>'


def _html_inline(parts) -> str:
    return "".join(_mathml(p.latex, False) if isinstance(p, Math) else _html.escape(p) for p in parts)


def _html_paragraph(parts) -> str:
    return "".join(_formula(p) if isinstance(p, Math) else _html.escape(p) for p in parts)


def _html_code(text: str) -> str:
    esc = _html.escape(text)
    return re.sub(r"(/\*.*?\*/)", r'<span class="cm">\1</span>', esc, flags=re.S)


def html_body(e) -> str:
    out: list[str] = []
    pictures: list[str] = []

    def emit(blocks, sink):
        for b in blocks:
            if isinstance(b, H):
                anchor = re.match(r"Step (\d+)\.", _plain(b.title))
                ident = f' id="step-{anchor.group(1)}"' if anchor else ""
                sink.append(f"<h{b.level}{ident}>{_html_inline(b.title)}</h{b.level}>")
            elif isinstance(b, P):
                sink.append(f"<p>{_html_paragraph(b.parts)}</p>")
            elif isinstance(b, Eqs):
                for m, tag in b.items:
                    sink.append(f'<div class="eq"><span class="f">{_formula(m)}</span>'
                                + (f'<span class="tag">{_html.escape(tag)}</span>' if tag else "") + "</div>")
            elif isinstance(b, Code):
                legend = "; ".join(f"<code>{a}</code> = {_mathml(_arg_name(buf, e.graph.params).latex, False)} "
                                   f"(<code>{_html.escape(ptr)}</code>)" for a, buf, ptr in b.fn.arguments)
                sink.append(f'<figure class="c"><figcaption><code>{b.fn.name}</code> in '
                            f'<code>{b.file}</code>, called as <code>{_html.escape(b.fn.call)}</code>: '
                            f'{legend}.{_html.escape(_fused_note(b.fn))}</figcaption>'
                            f'<pre><code>{_html_code(b.fn.text)}</code></pre></figure>')
            elif isinstance(b, Row):
                left, right = [], []
                emit(b.left, left)
                emit(b.right, right)
                sink.append('<div class="row"><div class="math">' + "\n".join(left)
                            + '</div><div class="code">' + "\n".join(right) + "</div></div>")
            elif isinstance(b, Pre):
                sink.append(f"<pre>{_html.escape(b.text)}</pre>")
            elif isinstance(b, Table):
                head = "".join(f"<th>{_html.escape(h)}</th>" for h in b.head)
                rows = []
                for r in b.rows:
                    cells = []
                    for c in r:
                        cls = ' class="ok"' if c == "ok" else ' class="bad"' if c == "MISMATCH" else ""
                        cells.append(f"<td{cls}>" + (_mathml(c.latex, False) if isinstance(c, Math)
                                                     else _html.escape(c)) + "</td>")
                    rows.append("<tr>" + "".join(cells) + "</tr>")
                sink.append(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
            elif isinstance(b, Details):
                inner = []
                emit(b.blocks, inner)
                sink.append(f"<details><summary>{_html.escape(b.summary)}</summary>{''.join(inner)}</details>")
            elif isinstance(b, Picture):
                svg = e.svg(b.which)
                title = {"forward": "Forward graph", "backward": "Backward graph"}[b.which]
                if svg is not None:
                    svg = svg[svg.index("<svg"):]
                    pictures.append(f'<figure class="picture"><figcaption>{title}</figcaption>{svg}</figure>')
                else:
                    pictures.append(f"<figure><figcaption>{title} (install Graphviz to see it drawn; "
                                    f"its DOT text:)</figcaption><pre>{_html.escape(e.dot(b.which))}</pre></figure>")
                if b.which == "backward":
                    sink.append('<div class="pictures">' + "".join(pictures) + "</div>")
    emit(document(e), out)
    out.append("<footer>Generated by graphc explain. Formulas are MathML, rendered by the browser; "
               "the page needs no network.</footer>")
    return "\n".join(out)


def html(e, standalone: bool = True) -> str:
    body = html_body(e)
    if not standalone:
        return f'<div class="graphc-explain"><style>{CSS}</style>{body}</div>'
    title = _html.escape(f"graphc explain: {e.graph.name}, ∂L/∂{', '.join(e.wrt)}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{title}</title>\n"
            f"<style>body {{ margin: 0; }}{CSS}</style>\n</head>\n<body>\n<div class=\"graphc-explain\">\n"
            f"{body}\n</div>\n</body>\n</html>\n")
