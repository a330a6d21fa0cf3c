"""The Graph: named values (inputs, params, op nodes) with inferred, checked shapes.

A spec (YAML/JSON/dict), the Python `Builder` and `from_networkx` all go through
`Graph.from_spec`, so one validation path guards every way of declaring a model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import networkx as nx
import sympy as sp

from .errors import SpecError
from .formula import parse_formula
from .init import check_init
from .names import check_name
from .ops import OPS
from .optim import check_optimizer

TOP_LEVEL = ("name", "description", "inputs", "params", "nodes", "outputs", "loss", "optimizer")
# Bounds that protect against absurd shapes in untrusted specs before anything is
# allocated: 2^26 elements (256 MiB in float32, 512 MiB in float64) per value (per example
# for batched values), and as many for all params together (the flat params array, and as
# much again for gradients and each optimizer slot). benchmarks/scaling.py's widest MLP
# (4096-4096-10) has 16.8M params.
MAX_ELEMENTS = 1 << 26
MAX_PARAM_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Value:
    name: str
    kind: str                      # input | param | node
    shape: tuple[int, ...]         # per-example (params: their whole shape)
    batched: bool                  # has the implicit leading batch axis
    op: str | None = None
    inputs: tuple[str, ...] = ()
    attrs: dict = field(default_factory=dict)        # checked, defaults filled, expr parsed
    spec_attrs: dict = field(default_factory=dict)   # as written, for round trips
    init: dict | None = None                          # params only
    dtype: str = "float"     # inputs: "int32" (indices), else the model's floating type
    # params only: False for a running statistic (batch_norm's running_mean/var), which has
    # no gradient and no optimizer slot and is updated by the train step, or a frozen param
    trainable: bool = True


# An input's `dtype`: "float" (the default) is the model's floating type (float32 or
# float64, chosen at compile time); "int32" holds indices, for the op positions that take
# them (OpDef.integer_inputs).
INPUT_DTYPES = ("float", "int32")
INT32 = "int32"


@dataclass(frozen=True)
class IndexBound:
    """What an int32 input may hold: indices 0 to `bound` - 1, and which node says so."""
    bound: int
    node: str
    op: str
    unit: str          # "rows", "classes"

    def describe(self) -> str:
        return (f"{self.op} '{self.node}' has {self.bound} {self.unit} "
                f"(indices 0 to {self.bound - 1})")


def _shape(value: Any, *, node: str, field_: str = "shape") -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in value):
        raise SpecError(f"must be a list of positive integers, got {value!r}", node=node, field=field_)
    if math.prod(value) > MAX_ELEMENTS:
        # A dimension beyond the bound is not printed: Python refuses to print 4300+ digits.
        shown = f"shape {list(value)}" if max(value) <= MAX_ELEMENTS else "a dimension"
        raise SpecError(f"{shown} has more than {MAX_ELEMENTS} elements",
                        node=node, field=field_)
    return tuple(value)


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"'{what}' must be a mapping of name to definition, got "
                        f"{type(value).__name__}", field=what)
    return value


class Graph:
    """A validated model: values in topological order, outputs, loss and optimizer."""

    def __init__(self, name: str, values: dict[str, Value], outputs: tuple[str, ...],
                 loss: str | None, optimizer: dict | None, description: str = "", *,
                 initial: dict | None = None):
        self.name, self.values, self.outputs, self.loss = name, values, outputs, loss
        self.optimizer, self.description = optimizer, description
        # Values some params start from instead of their initializers (an imported model's
        # weights, graphc/onnx); not part of the spec, as the values of a params file.
        self.initial: dict = dict(initial or {})

    # ------------------------------------------------------------ views
    @property
    def inputs(self) -> dict[str, Value]:
        return {k: v for k, v in self.values.items() if v.kind == "input"}

    @property
    def params(self) -> dict[str, Value]:
        return {k: v for k, v in self.values.items() if v.kind == "param"}

    @property
    def trainable_params(self) -> dict[str, Value]:
        """The params the optimizer trains (those not declared `trainable: false`)."""
        return {k: v for k, v in self.params.items() if v.trainable}

    @property
    def nodes(self) -> dict[str, Value]:
        """Op nodes in topological order."""
        return {k: v for k, v in self.values.items() if v.kind == "node"}

    def index_bounds(self) -> dict[str, IndexBound]:
        """Each int32 input's valid range: the tightest over the nodes that read it (an
        embedding's table rows, a cross-entropy's classes)."""
        out: dict[str, IndexBound] = {}
        for v in self.nodes.values():
            op = OPS[v.op]
            for k, i in enumerate(v.inputs):
                if k in op.integer_inputs and self.values[i].dtype == INT32:
                    spec = op.integer_inputs[k]
                    bound = spec.bound([self.values[j].shape for j in v.inputs])
                    if i not in out or bound < out[i].bound:
                        out[i] = IndexBound(bound, v.name, v.op, spec.unit)
        return out

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """`names` and every value they depend on."""
        seen, todo = set(), list(names)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.values[n].inputs)
        return seen

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}: {len(self.inputs)} inputs, {len(self.params)} params, "
                f"{len(self.nodes)} nodes)")

    def summary(self, print_fn=None) -> None:
        """Print a table of the graph, as Keras's `model.summary()`: per input and node its
        op, inputs, output shape (None: the batch) and param count, then the totals.
        `print_fn` gets the text instead of `print` (e.g. `print_fn=lines.append`).
        `CompiledModel.summary` adds the bytes of C memory."""
        from .display import Summary, print_summary
        print_summary(Summary(self), print_fn)

    def _repr_html_(self) -> str:
        """Jupyter: the graph drawn (inline SVG, when Graphviz is installed) and its table."""
        from .display import graph_html
        return graph_html(self)

    # ------------------------------------------------------------ spec round trip
    def to_spec(self) -> dict:
        spec: dict[str, Any] = {"name": self.name}
        if self.description:
            spec["description"] = self.description
        spec["inputs"] = {k: {"shape": list(v.shape), **({"dtype": v.dtype} if v.dtype != "float"
                                                          else {})}
                          for k, v in self.inputs.items()}
        spec["params"] = {k: {"shape": list(v.shape), **(v.init or {}),
                              **({} if v.trainable else {"trainable": False})}
                          for k, v in self.params.items()}
        spec["nodes"] = {k: {"op": v.op, "inputs": list(v.inputs), **copy.deepcopy(v.spec_attrs)}
                         for k, v in self.nodes.items()}
        spec["outputs"] = list(self.outputs)
        if self.loss:
            spec["loss"] = self.loss
        if self.optimizer:
            spec["optimizer"] = copy.deepcopy(self.optimizer)
        return spec

    def to_networkx(self) -> nx.DiGraph:
        """A copy as a networkx.DiGraph: node attributes kind/op/shape/batched/inputs/attrs;
        an edge per use, its `index` the argument position (the first one when repeated)."""
        g = nx.DiGraph(name=self.name, outputs=list(self.outputs), loss=self.loss,
                       optimizer=copy.deepcopy(self.optimizer), description=self.description)
        for v in self.values.values():
            g.add_node(v.name, kind=v.kind, op=v.op, shape=list(v.shape), batched=v.batched,
                       inputs=list(v.inputs), attrs=copy.deepcopy(v.spec_attrs),
                       init=copy.deepcopy(v.init), dtype=v.dtype, trainable=v.trainable)
        for v in self.values.values():
            for pos, src in enumerate(v.inputs):
                if not g.has_edge(src, v.name):
                    g.add_edge(src, v.name, index=pos)
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> "Graph":
        """Inverse of `to_networkx` (validated like any spec)."""
        spec: dict[str, Any] = {"name": g.graph.get("name"), "inputs": {}, "params": {}, "nodes": {},
                                "outputs": g.graph.get("outputs") or [], "loss": g.graph.get("loss"),
                                "description": g.graph.get("description") or ""}
        if g.graph.get("optimizer"):
            spec["optimizer"] = g.graph["optimizer"]
        for name, d in g.nodes(data=True):
            kind = d.get("kind", "node")
            if kind == "input":
                spec["inputs"][name] = {"shape": d["shape"]}
                if d.get("dtype", "float") != "float":
                    spec["inputs"][name]["dtype"] = d["dtype"]
            elif kind == "param":
                spec["params"][name] = {"shape": d["shape"], **(d.get("init") or {}),
                                        **({} if d.get("trainable", True) else
                                           {"trainable": d["trainable"]})}
            else:
                inputs = d.get("inputs") or [u for u, _, _ in sorted(
                    g.in_edges(name, data="index"), key=lambda e: e[2])]
                spec["nodes"][name] = {"op": d.get("op"), "inputs": inputs, **(d.get("attrs") or {})}
        return cls.from_spec(spec)

    # ------------------------------------------------------------ validation
    @classmethod
    def from_spec(cls, spec: Any, *, default_name: str | None = None) -> "Graph":
        if not isinstance(spec, dict):
            raise SpecError(f"a spec must be a mapping at the top level, got {type(spec).__name__}")
        unknown = [k for k in spec if k not in TOP_LEVEL]
        if unknown:
            raise SpecError(f"unknown top-level field(s) {', '.join(map(repr, unknown))} "
                            f"(allowed: {', '.join(TOP_LEVEL)})", field=str(unknown[0]))
        name = spec.get("name") if spec.get("name") is not None else default_name
        if name is None:
            raise SpecError("the spec needs a 'name' (it becomes the C prefix)", field="name")
        check_name(name, what="model name", field="name")
        description = spec.get("description") or ""
        if not isinstance(description, str):
            raise SpecError("must be a string", field="description")

        values: dict[str, Value] = {}
        declared: dict[str, str] = {}

        def claim(n: Any, section: str) -> str:
            check_name(n, what=f"{section[:-1]} name", node=str(n), field=section)
            if n in declared:
                raise SpecError(f"name '{n}' is declared twice (in '{declared[n]}' and '{section}')",
                                node=n, field=section)
            declared[n] = section
            return n

        for n, d in _mapping(spec.get("inputs"), "inputs").items():
            claim(n, "inputs")
            shape = d.get("shape") if isinstance(d, dict) else d
            if isinstance(d, dict) and set(d) - {"shape", "dtype"}:
                extra = sorted(set(d) - {"shape", "dtype"}, key=str)
                raise SpecError(f"unknown field(s) {extra} (inputs take 'shape' and 'dtype')",
                                node=n, field=str(extra[0]))
            dtype = d.get("dtype", "float") if isinstance(d, dict) else "float"
            if not isinstance(dtype, str) or dtype not in INPUT_DTYPES:
                raise SpecError(f"must be 'int32' (indices: an embedding's rows, class "
                                f"indices) or 'float' (the default: the model's dtype), got "
                                f"{dtype!r}", node=n, field="dtype")
            values[n] = Value(n, "input", _shape(shape, node=n) if shape != [] else (), True,
                              dtype=dtype)

        param_elements = 0
        default_init: set[str] = set()   # params whose init is the default (see _init_by_use)
        for n, d in _mapping(spec.get("params"), "params").items():
            claim(n, "params")
            if not isinstance(d, dict):
                d = {"shape": d}
            shape = _shape(d.get("shape"), node=n)
            if "init" not in d:
                default_init.add(n)
            d = {"init": "zeros" if len(shape) <= 1 else "glorot_uniform", **d}
            init = check_init(n, d)
            trainable = d.get("trainable", True)
            if not isinstance(trainable, bool):
                raise SpecError(f"must be true or false, got {trainable!r}", node=n,
                                field="trainable")
            extra = sorted(set(d) - {"shape", "trainable"} - set(init), key=str)
            if extra:
                raise SpecError(f"unknown field(s) {extra} for init '{init['init']}'",
                                node=n, field=str(extra[0]))
            values[n] = Value(n, "param", shape, False, init=init, trainable=trainable)
            param_elements += math.prod(shape)
            if param_elements > MAX_PARAM_ELEMENTS:
                raise SpecError(f"the params up to '{n}' have {param_elements} elements in "
                                f"total, more than {MAX_PARAM_ELEMENTS}", node=n, field="shape")

        raw_nodes = _mapping(spec.get("nodes"), "nodes")
        if not raw_nodes:
            raise SpecError("the graph has no nodes: declare at least one op under 'nodes'",
                            field="nodes")
        for n, d in raw_nodes.items():
            claim(n, "nodes")
            if not isinstance(d, dict):
                raise SpecError("a node must be a mapping with 'op' and 'inputs'", node=n)
            if "op" not in d:
                raise SpecError("missing 'op'", node=n, field="op")
            if not isinstance(d["op"], str) or d["op"] not in OPS:
                raise SpecError(f"unknown op {d['op']!r} (known: {', '.join(sorted(OPS))})",
                                node=n, field="op")
            op = OPS[d["op"]]
            ins = d.get("inputs")
            if not isinstance(ins, list) or not all(isinstance(i, str) for i in ins):
                raise SpecError("must be a list of value names", node=n, field="inputs")
            lo, hi = op.arity
            if len(ins) < lo or (hi is not None and len(ins) > hi):
                want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi else f"at least {lo}"
                names = f"{', '.join(op.input_names)}: " if op.input_names else ""
                raise SpecError(f"op '{op.name}' takes {want} input(s), got {len(ins)} "
                                f"({names}{op.doc})", node=n, field="inputs")
            extra = sorted(set(d) - {"op", "inputs"} - set(op.attrs), key=str)
            if extra:
                allowed = ", ".join(sorted(op.attrs)) or "none"
                raise SpecError(f"unknown field {extra[0]!r} for op '{op.name}' "
                                f"(its attributes: {allowed})", node=n, field=str(extra[0]))
            spec_attrs = {k: copy.deepcopy(d[k]) for k in op.attrs if k in d}
            values[n] = Value(n, "node", (), False, op.name, tuple(ins), {}, spec_attrs)

        for n, v in values.items():
            for i in v.inputs:
                if i not in values:
                    raise SpecError(f"input '{i}' is not an input, param or node of this graph",
                                    node=n, field="inputs")

        _check_param_uses(values)
        _init_by_use(values, default_init)
        order = cls._topological(values)
        ordered: dict[str, Value] = {}
        for n in order:
            v = values[n]
            if v.kind == "node":
                v = cls._infer(v, ordered)
            ordered[n] = v

        outputs = spec.get("outputs", [])
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list):
            raise SpecError("must be a list of node names", field="outputs")
        loss = spec.get("loss")
        if not outputs and loss is None:
            raise SpecError("the graph needs 'outputs' or a 'loss'", field="outputs")
        for k, o in enumerate(outputs):
            if not isinstance(o, str) or o not in ordered or ordered[o].kind != "node":
                raise SpecError(f"output {o!r} is not a node of this graph", node=str(o),
                                field="outputs")
            if not ordered[o].batched:
                raise SpecError(f"output '{o}' does not depend on any input", node=o, field="outputs")
            if o in outputs[:k]:
                raise SpecError(f"output '{o}' is listed twice", node=o, field="outputs")
        if loss is not None:
            if not isinstance(loss, str) or loss not in ordered or ordered[loss].kind != "node":
                raise SpecError(f"loss {loss!r} is not a node of this graph", node=str(loss),
                                field="loss")
            lv = ordered[loss]
            if lv.shape != () or not lv.batched:
                got = f"per-example shape {list(lv.shape)}" if lv.batched else "no batch axis"
                raise SpecError(f"the loss must be a per-example scalar, got {got}; reduce it "
                                "with 'sum' or 'mean'", node=loss, field="loss")
        optimizer = check_optimizer(spec.get("optimizer")) if spec.get("optimizer") is not None else None
        if optimizer is not None and loss is None:
            raise SpecError("an optimizer needs a loss to minimise: add a 'loss' entry",
                            field="optimizer")
        return cls(name, ordered, tuple(outputs), loss, optimizer, description)

    @staticmethod
    def _topological(values: dict[str, Value]) -> list[str]:
        g = nx.DiGraph()
        position = {n: k for k, n in enumerate(values)}
        g.add_nodes_from(values)
        for n, v in values.items():
            g.add_edges_from((i, n) for i in v.inputs)
        try:
            return list(nx.lexicographical_topological_sort(g, key=position.__getitem__))
        except nx.NetworkXUnfeasible:
            cycle = [u for u, _ in nx.find_cycle(g)]
            raise SpecError("the graph has a cycle: " + " -> ".join(cycle + [cycle[0]]),
                            node=cycle[0], field="inputs") from None

    @staticmethod
    def _infer(v: Value, known: dict[str, Value]) -> Value:
        op = OPS[v.op]
        ins = [known[i] for i in v.inputs]
        for k, i in enumerate(ins):
            if i.dtype == INT32 and k not in op.integer_inputs:
                takers = " and ".join(f"{o.name}'s {spec.what}" for o in OPS.values()
                                      for spec in o.integer_inputs.values())
                raise SpecError(f"input '{i.name}' is int32: only {takers} take integers",
                                node=v.name, field="inputs")
        attrs = op.normalize_attrs(v.name, v.spec_attrs)
        if op.name == "elementwise":
            symbols = {}
            for i in v.inputs:
                symbols.setdefault(i, sp.Symbol(i, real=True))
            expr = parse_formula(attrs["expr"], symbols, node=v.name)
            attrs["expr"] = (expr, tuple(symbols[i] for i in v.inputs))
        if op.is_loss and (not ins[1].batched or _depends_on_param(ins[1], known)):
            # Targets are data: the reference gives them no gradient, and neither may C.
            raise SpecError(f"the target '{ins[1].name}' must be data computed from inputs "
                            "only, not from params", node=v.name, field="inputs")
        shape = op.shape(v.name, [i.shape for i in ins], attrs)
        for k, spec in op.integer_inputs.items():
            want = spec.wanted([i.shape for i in ins])
            got = ins[k]
            if want and got.dtype != INT32:
                declared = ("declare it with 'dtype: int32'" if got.kind == "input"
                            else "it must be an input declared with 'dtype: int32'")
                raise SpecError(f"{op.name}'s {spec.what} '{got.name}' must hold int32 "
                                f"indices: {declared}", node=v.name, field="inputs")
            if not want and got.dtype == INT32:
                raise SpecError(f"input '{got.name}' is int32, so it is {op.name}'s "
                                f"{spec.what}: it needs {spec.shape_rule([i.shape for i in ins])}"
                                f", got {list(got.shape)}", node=v.name, field="inputs")
        if math.prod(shape) > MAX_ELEMENTS:
            raise SpecError(f"result shape {list(shape)} is too large", node=v.name, field="inputs")
        batched = any(i.batched for i in ins)
        return Value(v.name, "node", tuple(shape), batched, v.op, v.inputs, attrs, v.spec_attrs)


def _check_param_uses(values: dict[str, Value]) -> None:
    """The inputs an op declares as params (`OpDef.param_inputs`: batch_norm's weight, bias
    and running statistics) are params; a running statistic is a param declared
    `trainable: false` that nothing else reads (the train step writes it); and a
    non-trainable param is read only where an op takes one."""
    statistic_of: dict[str, str] = {}
    for n, v in values.items():
        if v.kind != "node":
            continue
        op = OPS[v.op]
        for k, i in enumerate(v.inputs):
            src, role = values[i], op.param_inputs.get(k)
            what = f"{op.input_names[k]} '{i}'" if k < len(op.input_names) else f"input '{i}'"
            if role is not None and src.kind != "param":
                raise SpecError(f"{what} must be a param (declared under 'params'), not "
                                f"{'an input' if src.kind == 'input' else 'a node'}",
                                node=n, field="inputs")
            if role == "statistic":
                if src.trainable:
                    raise SpecError(f"{what} is a running statistic: declare it with "
                                    "`trainable: false` (the train step updates it; it has "
                                    "no gradient)", node=n, field="inputs")
                if i in statistic_of:
                    where = ("twice by this node" if statistic_of[i] == n
                             else f"also by node '{statistic_of[i]}'")
                    raise SpecError(f"{what} is a running statistic used {where}: each "
                                    "needs a param of its own", node=n, field="inputs")
                statistic_of[i] = n
            elif src.kind == "param" and not src.trainable and role is None:
                raise SpecError(f"param '{i}' is declared `trainable: false`: such a param "
                                f"may only be {_takers()} (for now)", node=n, field="inputs")
    for n, v in values.items():
        for i in v.inputs:
            if i in statistic_of and statistic_of[i] != n:
                raise SpecError(f"param '{i}' is the running statistic of node "
                                f"'{statistic_of[i]}' and may not be read elsewhere",
                                node=n, field="inputs")


def _takers() -> str:
    """'batch_norm's weight, bias, running_mean or running_var': where such a param goes."""
    out = []
    for op in OPS.values():
        if op.param_inputs:
            names = [op.input_names[k] for k in sorted(op.param_inputs)]
            out.append(f"{op.name}'s {', '.join(names[:-1])} or {names[-1]}")
    return "; ".join(out)


def _init_by_use(values: dict[str, Value], default_init: set[str]) -> None:
    """A param without an `init` that an op reads where it wants another start (batch_norm's
    weight and running_var start at ones, as torch's BatchNorm) gets that initializer."""
    for v in values.values():
        if v.kind != "node":
            continue
        for k, i in enumerate(v.inputs):
            init = OPS[v.op].param_init.get(k)
            if init is not None and i in default_init and values[i].kind == "param":
                values[i] = replace(values[i], init=check_init(i, {"init": init}))


def _depends_on_param(v: Value, known: dict[str, Value]) -> bool:
    todo, seen = [v.name], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if known[n].kind == "param":
            return True
        todo.extend(known[n].inputs)
    return False
