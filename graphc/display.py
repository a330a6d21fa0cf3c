"""What a notebook shows: `summary()` tables and the HTML of Graph, CompiledModel, History and
the verify report (their `_repr_html_` methods call in here), and History's figure.

Every name in a spec is untrusted text (a description, a node called `<script>`): all of it
goes through `html.escape` before it reaches HTML. Pictures are inline SVG, so a saved
notebook shows them without the files they came from.
"""

from __future__ import annotations

import functools
import html
import io
import math
import subprocess

from .dtypes import DTYPES
from .errors import GraphcError

# The tables' look, scoped to graphc's own elements so a notebook's other cells are left alone.
CSS = """<style>
.graphc table { border-collapse: collapse; margin: 0.4em 0; font-size: 0.92em; }
.graphc th, .graphc td { padding: 0.15em 0.7em; text-align: left; vertical-align: top;
  border-bottom: 1px solid #ddd; }
.graphc td.number, .graphc th.number { text-align: right; font-variant-numeric: tabular-nums; }
.graphc .bad { color: #b00020; font-weight: bold; }
.graphc .note { color: #555; font-size: 0.9em; }
.graphc svg { max-width: 100%; height: auto; }
</style>"""


def _e(value) -> str:
    return html.escape(str(value))


def _count(n: int) -> str:
    return f"{n:,}"


def _bytes(n: int) -> str:
    """'9,640 B (9.4 KiB)'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} B ({n / size:.1f} {unit})"
    return f"{n:,} B"


NUMBER, BAD = ' class="number"', ' class="bad"'


def _table(head, rows, numeric=()) -> str:
    """An HTML table (without a header row when `head` is None); `numeric`: the columns to
    right-align."""
    def cells(row, tag):
        return "".join(f"<{tag}{NUMBER if k in numeric else ''}>{_e(v)}</{tag}>"
                       for k, v in enumerate(row))
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    thead = f"<thead><tr>{cells(head, 'th')}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _text_table(head, rows, numeric=()) -> list[str]:
    widths = [max(len(str(r[k])) for r in (head, *rows)) for k in range(len(head))]

    def line(row):
        return "  ".join(str(v).rjust(w) if k in numeric else str(v).ljust(w)
                         for k, (v, w) in enumerate(zip(row, widths))).rstrip()
    rule = "-" * len(line(["-" * w for w in widths]))
    return [line(head), rule.replace("-", "=")] + [line(r) for r in rows] + [rule]


# ---------------------------------------------------------------- summary

class Summary:
    """A model's table: one row per input and op node, then the totals.

    Each param is counted at the first node that reads it (in topological order), as Keras
    counts a shared layer once. With a compiled module, the "C bytes" column is the memory
    a node's params take in C: their values, gradients and optimizer slots; the step count,
    the hyperparameters (one element each) and the work arena (shared by every node through
    liveness) are totals only."""

    HEAD = ("node", "op", "inputs", "output shape", "params")

    def __init__(self, graph, cmodule=None, batch: int = 1):
        self.graph, self.cmodule = graph, cmodule
        self.rows: list[tuple] = []
        counted: set[str] = set()
        item = DTYPES[cmodule.dtype].itemsize if cmodule else 0
        training = cmodule is not None and "gradients" in cmodule.entries
        slots = len(cmodule.element_slots) if cmodule else 0
        for v in graph.values.values():
            if v.kind == "param":
                continue
            shape = ("None",) * v.batched + tuple(map(str, v.shape))
            shown = f"({', '.join(shape)}{',' if len(shape) == 1 else ''})"
            if v.kind == "input":
                op = "input" if v.dtype == "float" else f"input ({v.dtype})"
                self.rows.append((v.name, op, "", shown, 0, 0))
                continue
            first = [i for i in dict.fromkeys(v.inputs)
                     if graph.values[i].kind == "param" and i not in counted]
            counted.update(first)
            count = sum(_elements(graph.values[p].shape) for p in first)
            # value + gradient (when training) + a slot per optimizer slot (trainable only);
            # the C keeps one element for a scalar param (graphc.ir.param_layout)
            size = sum(max(1, _elements(graph.values[p].shape)) * item
                       * (1 + training + slots * graph.values[p].trainable) for p in first)
            self.rows.append((v.name, v.op, ", ".join(v.inputs), shown, count, size))
        params = graph.params.values()
        self.trainable = sum(_elements(p.shape) for p in params if p.trainable)
        self.frozen = sum(_elements(p.shape) for p in params if not p.trainable)
        self.memory = None
        if cmodule is not None:
            from codegen.report import memory_report
            self.memory = memory_report(cmodule, batch)
            self.per_example = cmodule.work_per_example() * item

    def _head(self) -> tuple:
        return self.HEAD + (("C bytes",) if self.cmodule else ())

    def _cells(self) -> list[tuple]:
        keep = len(self._head())
        return [(*r[:4], _count(r[4]), _count(r[5]))[:keep] for r in self.rows]

    def _title(self) -> str:
        if self.cmodule is None:
            return f'Graph "{self.graph.name}"'
        m = self.memory
        return (f'Model "{self.graph.name}" ({m["dtype"]}, target {m["target"]}'
                + (f', {m["optimizer"]}' if m["optimizer"] else "") + ")")

    def _roles(self) -> str:
        g = self.graph
        out = f"outputs: {', '.join(g.outputs) or 'none'}"
        return out + (f"; loss: {g.loss} (its batch mean is minimised)" if g.loss else "")

    def _totals(self) -> list[tuple[str, str]]:
        """(label, value) lines under the table."""
        out = [("Total params", _count(self.trainable + self.frozen)),
               ("Trainable params", _count(self.trainable)),
               ("Non-trainable params", _count(self.frozen))]
        m = self.memory
        if m is not None:
            state = _bytes(m["optimizer_state"])
            if m["optimizer"]:
                held = ["step count", *(s for s in self.cmodule.state_offsets if s != "step")]
                state += f" ({m['optimizer']}: {', '.join(held)})"
            work = (f"{_bytes(m['work'])} at batch {m['batch']} "
                    f"(+{self.per_example:,} B per example)")
            out += [("C memory", ""),
                    ("  params" + (" (const, baked in)" if m["params_baked"] else ""),
                     _bytes(m["params"])),
                    ("  gradients", _bytes(m["gradients"])),
                    ("  optimizer state", state),
                    ("  work arena", work),
                    ("  total", _bytes(m["params"] + m["gradients"] + m["optimizer_state"]
                                       + m["work"]))]
        return out

    def text(self) -> str:
        numeric = (4, 5)
        lines = [self._title()] + _text_table(self._head(), self._cells(), numeric)
        lines.append(self._roles())
        width = max(len(k) for k, _ in self._totals())
        lines += [(f"{k + ':'}".ljust(width + 2) + v if v else k) for k, v in self._totals()]
        return "\n".join(lines)

    __str__ = text

    def html(self) -> str:
        totals = "".join(f"<tr><td>{_e(k.strip())}</td><td class=\"number\">{_e(v)}</td></tr>"
                         if v else f'<tr><td colspan="2"><b>{_e(k)}</b></td></tr>'
                         for k, v in self._totals())
        return (f"{_table(self._head(), self._cells(), numeric=(4, 5))}"
                f'<p class="note">{_e(self._roles())}</p><table>{totals}</table>')


def _elements(shape) -> int:
    return math.prod(shape)


def print_summary(summary: Summary, print_fn) -> None:
    (print if print_fn is None else print_fn)(summary.text())


# ---------------------------------------------------------------- Graph

def graph_dot(graph) -> str:
    """The graph as Graphviz DOT: inputs and params as ellipses, op nodes as boxes with
    their op and per-example shape, the loss and outputs outlined."""
    import networkx as nx

    from .dot import HIGHLIGHT, to_dot
    g = nx.DiGraph(name=graph.name, rankdir="TB")
    for v in graph.values.values():
        shape = list(v.shape)
        if v.kind == "node":
            role = " (loss)" if v.name == graph.loss else " (output)" \
                if v.name in graph.outputs else ""
            attrs = {"label": f"{v.name}{role}\n{v.op}  {shape}", "shape": "box"}
            if role:
                attrs.update(color=HIGHLIGHT, penwidth="2")
        else:
            attrs = {"label": f"{v.name}\n{v.kind}  {shape}", "shape": "ellipse"}
            if v.kind == "param":
                attrs.update(color="gray50", fontcolor="gray30")
        g.add_node(v.name, **attrs)
    for v in graph.values.values():
        for i in dict.fromkeys(v.inputs):
            g.add_edge(i, v.name)
    return to_dot(g)


def graph_svg(graph) -> str | None:
    """The picture as an inline <svg> element, or None without Graphviz's `dot`."""
    from .dot import render_dot
    data = render_dot(graph_dot(graph), "svg")
    if data is None:
        return None
    svg = data.decode("utf-8")
    return svg[svg.index("<svg"):]   # without the XML prolog and DOCTYPE


def graph_html(graph) -> str:
    out = [CSS, '<div class="graphc">', f"<h4>Graph {_e(repr(graph.name))}</h4>"]
    if graph.description:
        out.append(f"<p>{_e(graph.description)}</p>")
    try:
        svg = graph_svg(graph)
    except (GraphcError, OSError, subprocess.SubprocessError) as e:
        # a picture is a bonus: its failure must not hide the table
        svg, why = None, f"the graph could not be drawn: {e}"
    else:
        why = "install Graphviz (its `dot` program) to see the graph drawn"
    out.append(svg if svg is not None else f'<p class="note">({_e(why)})</p>')
    out.append(Summary(graph).html())
    if graph.optimizer:
        out.append(f'<p class="note">optimizer: {_e(_optimizer_text(graph.optimizer))}</p>')
    out.append("</div>")
    return "".join(out)


def _optimizer_text(optimizer: dict) -> str:
    return optimizer["name"] + " (" + ", ".join(f"{k} {v}" for k, v in optimizer.items()
                                                if k != "name") + ")"


# ---------------------------------------------------------------- CompiledModel

def model_html(model, batch: int = 1) -> str:
    cm = model.cmodule
    lines = cm.source.count("\n")
    facts = [("dtype", cm.dtype), ("target", cm.target),
             ("threads", model.threads if model.threads is not None else "one or all, the faster"),
             ("optimizer", _optimizer_text(cm.optimizer) if cm.optimizer else "none"),
             ("C entry points", ", ".join(e.c_name for e in cm.entries.values())),
             ("C source", f"{lines:,} lines, {len(cm.source):,} characters "
                          f"(model.c_source, model.write_c(dir))")]
    return (f'{CSS}<div class="graphc"><h4>CompiledModel {_e(repr(model.name))}</h4>'
            + _table(None, facts) + Summary(model.graph, cm, batch).html() + "</div>")


# ---------------------------------------------------------------- History

@functools.cache
def _figure_class(figure):
    """matplotlib's Figure that shows itself in Jupyter. A plain Figure shows as a line of
    text unless pyplot's inline backend is loaded (it registers a formatter for figures);
    this one is SVG without pyplot, as a cell's value or through `display(fig)`. Made on
    first use: matplotlib is optional."""

    class InlineFigure(figure):
        def _repr_svg_(self) -> str:
            return figure_svg(self)

    return InlineFigure


def figure_svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def history_figure(history):
    """The curves of `history`: the losses on the left axis, any other metric (accuracy) on
    a second axis. A bare Figure, drawn without pyplot's global state or backend."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise GraphcError("plotting needs matplotlib: pip install matplotlib") from None
    fig = _figure_class(Figure)(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    x = range(1, len(history) + 1)
    keys = history.keys()
    losses = [k for k in keys if k.endswith("loss")]
    others = [k for k in keys if k not in losses]
    lines = [ax.plot(x, history[k], marker=".", label=k.replace("_", " "))[0] for k in losses]
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    if others:
        second = ax.twinx()
        lines += [second.plot(x, history[k], marker=".", linestyle="--",
                              color=f"C{len(losses) + i}", label=k.replace("_", " "))[0]
                  for i, k in enumerate(others)]
        names = {k.removeprefix("val_") for k in others}   # accuracy and val_accuracy: one
        second.set_ylabel(names.pop() if len(names) == 1 else "metrics")
    if lines:  # none before the first epoch ends
        fig.legend(handles=lines, loc="outside lower center", ncols=min(len(lines), 4))
    ax.set_title(history.describe())
    return fig


def save_figure(fig, path) -> None:
    """Save in the format the suffix names (png, svg, pdf, ...), PNG without one."""
    from pathlib import Path
    path = Path(path)
    try:
        fig.savefig(path, format=path.suffix.lstrip(".").lower() or "png")
    except ValueError as e:   # matplotlib's "Format 'xyz' is not supported"
        raise GraphcError(f"cannot save the plot as {path}: {e}") from None
    except OSError as e:
        raise GraphcError(f"cannot write the plot to {path}: {e.strerror or e}") from None


def history_html(history) -> str:
    out = [CSS, '<div class="graphc">', f"<h4>History: {_e(history.describe())}</h4>"]
    if history.epochs:
        try:
            out.append(figure_svg(history_figure(history)))
        except GraphcError as e:   # no matplotlib: the numbers still show
            out.append(f'<p class="note">({_e(e)})</p>')
        last = history.epochs[-1]
        out.append(_table(("last epoch", *last), [(len(history), *(f"{v:.4g}" for v in
                                                                   last.values()))],
                          numeric=range(len(last) + 1)))
    else:
        out.append('<p class="note">no epoch completed</p>')
    out.append("</div>")
    return "".join(out)


# ---------------------------------------------------------------- the verify report

def verify_html(report) -> str:
    """The report's own table, notes and verdict (graphc.verify words them) as HTML."""
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row[:-1])
        + f"<td{'' if check.ok else BAD}>{_e(row[-1])}</td></tr>"
        for check, row in zip(report.checks, report.rows()))
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes())
    verdict = report.table().splitlines()[-1]   # the table's last line: its verdict
    return "".join([
        CSS, '<div class="graphc">',
        f"<h4>Verify {_e(report.model)} ({_e(report.dtype)}, batch {_e(report.batch)})</h4>",
        "<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in report.COLUMNS), "</tr></thead>",
        f"<tbody>{rows}</tbody></table>",
        f'<ol class="note">{notes}</ol>' if notes else "",
        f"<p{'' if report.ok else BAD}>{_e(verdict)}</p></div>"])
