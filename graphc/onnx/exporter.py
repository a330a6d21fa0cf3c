"""graphc -> ONNX: a Graph (or a compiled model, with its current params) as an ONNX
inference model, so that what graphc trained runs in onnxruntime or any ONNX runtime.

Each graphc value keeps its name (an imported model's values take back their ONNX names),
the batch axis comes back as the first axis of every tensor (symbolic, "batch"), and each
graphc op becomes the ONNX ops of the same semantics; an `elementwise` formula becomes the
ONNX ops of its expression tree. The loss and its target are left out unless asked for."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import sympy as sp

from ..errors import GraphcError
from ..functions import relu, sigmoid, softplus
from ..graph import Graph
from ..ops import SELU_ALPHA, SELU_SCALE, _per_axis, _window
from .importer import GRAPHC_DOMAIN, OPTIMIZER_PROP, _onnx

BATCH_AXIS = "batch"
MIN_OPSET = 18
LOSS_OPS = ("mse", "softmax_cross_entropy", "bce_with_logits")




class Exporter:
    def __init__(self, graph: Graph, params: dict[str, np.ndarray], opset: int):
        self.onnx = _onnx()
        self.graph, self.params, self.opset = graph, params, opset
        self.names = dict(getattr(graph, "onnx_names", {}))   # graphc name -> ONNX name
        self.nodes, self.initializers, self.count = [], [], 0
        self.functions = []

    def name(self, graphc_name: str) -> str:
        return self.names.get(graphc_name, graphc_name)

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{self.name(base)}__{self.count}"

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.fresh(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output],
                                                      name=f"{output}_{op}", **attrs))
        return output

    def constant(self, value, dtype=np.float32, base: str = "const") -> str:
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values) -> str:
        return self.constant(np.array(list(values), dtype=np.int64), np.int64, "ints")


class Body(Exporter):
    """The nodes of a model-local function: constants are Constant nodes (a function has
    no initializers)."""

    def __init__(self, parent: Exporter):
        self.onnx, self.graph, self.opset = parent.onnx, parent.graph, parent.opset
        self.names, self.nodes, self.count = {}, [], 0

    def constant(self, value, dtype=np.float32, base: str = "const") -> str:
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self.node("Constant", [], self.fresh(base), value=tensor)


def _as_function(ex: Exporter, v, shapes, build) -> None:
    """Node `v` as a call of a model-local function in the graphc domain: standard ops in
    its body (what any runtime computes), and the graphc node itself in its doc_string
    (what graphc.onnx.load reads back, so that a graphc model survives the round trip)."""
    import json
    body = Body(ex)
    inputs = [f"in{k}" for k in range(len(v.inputs))]
    build(body, inputs)
    fname = f"{v.op}_{ex.name(v.name)}"
    doc = json.dumps({"op": v.op, "inputs": [ex.name(i) for i in v.inputs],
                      **{k: val for k, val in v.spec_attrs.items()}}, default=list)
    ex.functions.append(ex.onnx.helper.make_function(
        GRAPHC_DOMAIN, fname, inputs, ["out"], body.nodes,
        [ex.onnx.helper.make_opsetid("", ex.opset)], doc_string=doc))
    ex.node(fname, [ex.name(i) for i in v.inputs], ex.name(v.name), domain=GRAPHC_DOMAIN)


def _spatial_pads(x_shape, kernel, attrs, node) -> tuple[list[int], list[int], list[int]]:
    """(strides, dilations, pads) in ONNX's form from graphc's window rule."""
    window = _window(node, tuple(x_shape[1:]), tuple(kernel), attrs)
    return list(window.stride), list(window.dilation), list(window.before) + list(window.after)


def _ceil_mode(v, x_shape, kernel, pads: list[int]) -> dict:
    """ceil_mode for a pooling node, only where it adds a window, and `pads` made to agree
    with ONNX's shape inference (onnx 1.23), which lacks ceil_mode's rule that takes back a
    window starting past the input and the padding before it (ONNX's reference and
    onnxruntime apply it, as torch does): where the rule applies, the windows are floor's,
    and the padding after is cut to where the last one ends (no window reads past it)."""
    spatial = tuple(x_shape[1:])
    floor = _window(v.name, spatial, tuple(kernel), {**v.attrs, "ceil_mode": False})
    out = tuple(v.shape[1:])
    if out == floor.out:
        return {}
    rank = len(spatial)
    for axis, (n, k, s, d) in enumerate(zip(spatial, kernel, floor.stride, floor.dilation)):
        span = d * (k - 1) + 1
        if out[axis] == floor.out[axis]:
            pads[rank + axis] = max(0, (out[axis] - 1) * s + span - n - pads[axis])
    return {"ceil_mode": 1}


def _export_node(ex: Exporter, v, shapes) -> None:
    """The ONNX nodes of graphc node `v`, its output named as the graphc value."""
    out = ex.name(v.name)
    ins = [ex.name(i) for i in v.inputs]
    a, op = v.attrs, v.op
    rank = len(v.shape)
    simple = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "relu": "Relu",
              "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log",
              "hard_swish": "HardSwish", "mish": "Mish"}
    if op in ("add", "sub", "mul", "div"):
        ins = [_lift(ex, i, shapes[i], rank, ex.graph.values[i].batched) for i in v.inputs]
        ex.node(simple[op], ins, out)
    elif op in simple:
        ex.node(simple[op], ins, out)
    elif op == "dropout":   # the identity at inference; kept as graphc's node for training
        _as_function(ex, v, shapes, lambda body, names: body.node("Identity", names, "out"))
    elif op == "leaky_relu":
        ex.node("LeakyRelu", ins, out, alpha=float(a["alpha"]))
    elif op == "elu":
        ex.node("Elu", ins, out, alpha=float(a["alpha"]))
    elif op == "selu":
        ex.node("Selu", ins, out, alpha=SELU_ALPHA, gamma=SELU_SCALE)
    elif op == "hard_sigmoid":
        ex.node("HardSigmoid", ins, out, alpha=1 / 6, beta=0.5)
    elif op in ("silu", "softplus", "gelu"):
        x = sp.Symbol("x", real=True)
        expr = {"silu": lambda: x * sigmoid(x),
                "softplus": lambda: softplus(x * float(a["beta"])) / float(a["beta"]),
                "gelu": lambda: x * (1 + sp.tanh(math.sqrt(2 / math.pi)
                                                 * (x + 0.044715 * x ** 3))) / 2
                if a["approximate"] == "tanh" else x * (1 + sp.erf(x / math.sqrt(2))) / 2}[op]()
        _as_function(ex, v, shapes, lambda body, names: _formula(body, expr, {x: names[0]}, "out"))
    elif op == "elementwise":
        expr, symbols = a["expr"]

        def build(body, names):
            lifted = [_lift(body, n, shapes[i], rank, ex.graph.values[i].batched)
                      for n, i in zip(names, v.inputs)]
            _formula(body, expr, dict(zip(symbols, lifted)), "out")
        _as_function(ex, v, shapes, build)
    elif op == "dense":
        if len(shapes[v.inputs[0]]) == 1:
            ex.node("Gemm", ins, out, transB=1)
        else:
            product = ex.node("MatMul", [ins[0], ex.node("Transpose", [ins[1]], perm=[1, 0])])
            ex.node("Add", [product, ins[2]], out) if len(ins) > 2 else \
                ex.node("Identity", [product], out)
    elif op == "matmul":
        ex.node("MatMul", ins, out)
    elif op in ("sum", "mean"):
        x_rank = len(shapes[v.inputs[0]])
        axes = range(x_rank) if a.get("axis") is None else [k % x_rank for k in a["axis"]]
        ex.node("ReduceSum" if op == "sum" else "ReduceMean",
                [ins[0], ex.ints(k + 1 for k in axes)], out, keepdims=0)
    elif op in ("softmax", "log_softmax"):
        ex.node("Softmax" if op == "softmax" else "LogSoftmax", ins, out,
                axis=a["axis"] % len(shapes[v.inputs[0]]) + 1)
    elif op == "reshape":
        ex.node("Reshape", [ins[0], ex.ints([-1, *v.shape])], out)
    elif op == "flatten":
        ex.node("Flatten", ins, out, axis=1)
    elif op == "concat":
        ex.node("Concat", ins, out, axis=a["axis"] % rank + 1)
    elif op == "transpose":
        perm = a["perm"] if a["perm"] is not None else tuple(reversed(range(rank)))
        ex.node("Transpose", ins, out, perm=[0] + [p + 1 for p in perm])
    elif op == "slice":
        x_shape = shapes[v.inputs[0]]
        axis = a["axis"] % len(x_shape)
        start, stop, step = slice(a["start"], a["stop"], a["step"]).indices(x_shape[axis])
        ex.node("Slice", [ins[0], ex.ints([start]), ex.ints([stop]), ex.ints([axis + 1]),
                          ex.ints([step])], out)
    elif op == "pad":
        x_rank = len(shapes[v.inputs[0]])
        widths = [(0, 0)] * x_rank
        pads = list(a["pad"])
        for k in range(len(pads) // 2):
            widths[x_rank - 1 - k] = (pads[2 * k], pads[2 * k + 1])
        ex.node("Pad", [ins[0], ex.ints([0] + [b for b, _ in widths] + [0] +
                                         [e for _, e in widths]),
                        ex.constant(float(a["value"]))], out, mode="constant")
    elif op == "embedding":
        ex.node("Gather", [ins[1], ins[0]], out, axis=0)
    elif op in ("conv1d", "conv2d"):
        w = ex.graph.values[v.inputs[1]].shape
        strides, dilations, pads = _spatial_pads(shapes[v.inputs[0]], w[2:], a, v.name)
        ex.node("Conv", ins, out, kernel_shape=list(w[2:]), strides=strides,
                dilations=dilations, pads=pads, group=int(a["groups"]))
    elif op in ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"):
        dims = int(op[-2])
        kernel = list(_per_axis(v.name, "kernel_size", a["kernel_size"], dims))
        strides, dilations, pads = _spatial_pads(shapes[v.inputs[0]], kernel, a, v.name)
        extra = _ceil_mode(v, shapes[v.inputs[0]], kernel, pads)
        if any(d != 1 for d in dilations):
            if op.startswith("avg") and ex.opset < 19:
                raise GraphcError(f"node '{v.name}': an average pooling's dilation needs "
                                  f"opset 19 or later (AveragePool's dilations), got {ex.opset}")
            extra["dilations"] = dilations
        if op.startswith("max"):
            ex.node("MaxPool", ins, out, kernel_shape=kernel, strides=strides, pads=pads,
                    **extra)
        else:
            ex.node("AveragePool", ins, out, kernel_shape=kernel, strides=strides, pads=pads,
                    count_include_pad=int(bool(a["count_include_pad"])), **extra)
    elif op == "global_avg_pool":   # ONNX keeps the spatial axes: [C, 1, 1]
        _as_function(ex, v, shapes, lambda body, names: body.node(
            "Flatten", [body.node("GlobalAveragePool", names)], "out", axis=1))
    elif op == "batch_norm":
        ex.node("BatchNormalization", ins, out, epsilon=float(a["eps"]),
                momentum=1.0 - float(a["momentum"]))
    elif op == "layer_norm":
        x_shape = shapes[v.inputs[0]]
        first = min(k % len(x_shape) for k in a["axes"])
        normalized = x_shape[first:]
        scale = ins[1] if len(ins) > 1 else ex.constant(np.ones(normalized))
        bias = [ins[2]] if len(ins) > 2 else []
        ex.node("LayerNormalization", [ins[0], scale, *bias], out, axis=first + 1,
                epsilon=float(a["eps"]))
    elif op in LOSS_OPS:
        _as_function(ex, v, shapes, lambda body, names: _loss(body, op, names,
                                                              shapes[v.inputs[0]],
                                                              ex.graph.values[v.inputs[1]]))
    else:
        raise GraphcError(f"node '{v.name}': op '{op}' has no ONNX export")


def _loss(body: Exporter, op: str, names: list[str], shape, target) -> None:
    """The per-example loss, as graphc's loss node computes it (the batch mean is the
    caller's): mse and bce_with_logits average over the example's elements,
    softmax_cross_entropy sums over the class axis (the last)."""
    x, t = names
    axes = list(range(1, len(shape) + 1))
    if op == "softmax_cross_entropy":
        log_p = body.node("LogSoftmax", [x], axis=-1)
        if target.dtype == "int32":   # class indices: -log_softmax(x)[t]
            index = body.node("Unsqueeze", [body.node("Cast", [t], to=7), body.ints([-1])])
            picked = body.node("GatherElements", [log_p, index], axis=-1)
            body.node("Neg", [body.node("Squeeze", [picked, body.ints([-1])])], "out")
        else:
            total = body.node("ReduceSum", [body.node("Mul", [t, log_p]), body.ints([-1])],
                              keepdims=0)
            body.node("Neg", [total], "out")
        return
    if op == "mse":
        d = body.node("Sub", [x, t])
        per_element = body.node("Mul", [d, d])
    else:   # bce_with_logits: max(x, 0) - x·t + log(1 + exp(-|x|))
        per_element = body.node("Add", [
            body.node("Sub", [body.node("Relu", [x]), body.node("Mul", [x, t])]),
            body.node("Softplus", [body.node("Neg", [body.node("Abs", [x])])])])
    if axes:
        body.node("ReduceMean", [per_element, body.ints(axes)], "out", keepdims=0)
    else:
        body.node("Identity", [per_element], "out")


def _lift(ex: Exporter, name: str, shape, rank: int, batched: bool) -> str:
    """A batched operand of lower per-example rank than the result, with ones inserted
    after the batch axis (per example, shapes broadcast from the right; with the batch
    axis in front, ONNX would align it against a per-example axis)."""
    onnx_name = ex.names.get(name, name)
    if not batched or len(shape) == rank:
        return onnx_name
    return ex.node("Unsqueeze", [onnx_name, ex.ints(range(1, rank - len(shape) + 1))])


_UNARY = {sp.exp: "Exp", sp.log: "Log", sp.tanh: "Tanh", sp.sin: "Sin", sp.cos: "Cos",
          sp.tan: "Tan", sp.sinh: "Sinh", sp.cosh: "Cosh", sp.asin: "Asin", sp.acos: "Acos",
          sp.atan: "Atan", sp.erf: "Erf", sp.Abs: "Abs", sigmoid: "Sigmoid",
          softplus: "Softplus", relu: "Relu"}


def _formula(ex: Exporter, expr: sp.Expr, names: dict, out: str) -> None:
    """ONNX nodes computing `expr` over the inputs `names` (symbol -> ONNX name)."""
    done: dict[sp.Expr, str] = {}

    def build(e: sp.Expr) -> str:
        if e in names:
            return names[e]
        if e in done:
            return done[e]
        if e.is_Number or e.is_NumberSymbol:
            result = ex.constant(float(e))
        elif isinstance(e, sp.Add):
            result = build(e.args[0])
            for t in e.args[1:]:
                result = ex.node("Add", [result, build(t)])
        elif isinstance(e, sp.Mul):
            result = build(e.args[0])
            for t in e.args[1:]:
                result = ex.node("Mul", [result, build(t)])
        elif isinstance(e, sp.Pow):
            base, exponent = e.args
            if exponent == sp.Rational(1, 2):
                result = ex.node("Sqrt", [build(base)])
            elif exponent == -1:
                result = ex.node("Reciprocal", [build(base)])
            elif exponent == 2:
                b = build(base)
                result = ex.node("Mul", [b, b])
            else:
                result = ex.node("Pow", [build(base), build(exponent)])
        elif type(e) in _UNARY or e.func in _UNARY:
            result = ex.node(_UNARY[e.func], [build(e.args[0])])
        elif isinstance(e, (sp.Max, sp.Min)):
            result = ex.node("Max" if isinstance(e, sp.Max) else "Min",
                             [build(t) for t in e.args])
        else:
            raise GraphcError(f"the formula term {e} has no ONNX export")
        done[e] = result
        return result

    ex.node("Identity", [build(expr)], out)


def save(model_or_graph, path, *, params: dict | None = None, opset: int = 18,
         include_loss: bool = False) -> Path:
    """Write the inference graph of a Graph (params: `params`, else the graph's imported
    values, else its initializers' draw) or a compiled model (its current params) as an
    ONNX file, checked with onnx.checker (full_check). Returns the path.

    With `include_loss`, the loss's target inputs and the per-example loss (an output
    named as the loss node; its mean over the batch is graphc's loss) are written too,
    and `graphc.onnx.load` reads the file back as the training graph."""
    from ..init import start_params
    newest = _onnx().defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise GraphcError(f"opset must be an integer from {MIN_OPSET} (ReduceMean's axes as an "
                          f"input, Mish, LayerNormalization) to {newest}, got {opset!r}")
    graph = getattr(model_or_graph, "graph", model_or_graph)
    if not isinstance(graph, Graph):
        raise GraphcError(f"expected a Graph or a compiled model, got "
                          f"{type(model_or_graph).__name__}")
    if params is None:
        params = model_or_graph.get_params() if hasattr(model_or_graph, "get_params") \
            else start_params(graph, 0)
    if include_loss and graph.loss is None:
        raise GraphcError("include_loss=True: the graph has no loss")
    ex = Exporter(graph, params, opset)
    onnx = ex.onnx
    exported = list(graph.outputs) + ([graph.loss] if include_loss else [])
    needed = graph.ancestors(exported)
    shapes = {k: v.shape for k, v in graph.values.items()}
    inputs = []
    for name, v in graph.inputs.items():
        if name in needed:
            elem = onnx.TensorProto.INT32 if v.dtype == "int32" else onnx.TensorProto.FLOAT
            inputs.append(onnx.helper.make_tensor_value_info(ex.name(name), elem,
                                                             [BATCH_AXIS, *v.shape]))
    for name, v in graph.params.items():
        if name in needed:
            ex.initializers.append(onnx.numpy_helper.from_array(
                np.asarray(params[name], np.float32).reshape(v.shape), ex.name(name)))
    for name, v in graph.nodes.items():
        if name in needed:
            _export_node(ex, v, shapes)
    outputs = [onnx.helper.make_tensor_value_info(ex.name(o), onnx.TensorProto.FLOAT,
                                                  [BATCH_AXIS, *graph.values[o].shape])
               for o in exported]
    opsets = [onnx.helper.make_opsetid("", opset)] + \
        ([onnx.helper.make_opsetid(GRAPHC_DOMAIN, 1)] if ex.functions else [])
    model = onnx.helper.make_model(
        onnx.helper.make_graph(ex.nodes, graph.name, inputs, outputs, ex.initializers),
        opset_imports=opsets, producer_name="graphc", functions=ex.functions,
        # the oldest IR version that holds the opset (and local functions): what every
        # runtime of that opset reads
        ir_version=max(8, onnx.helper.find_min_ir_version_for(opsets[:1])))
    if include_loss and graph.optimizer:   # the training graph's optimizer, for load
        import json
        onnx.helper.set_model_props(model, {OPTIMIZER_PROP: json.dumps(graph.optimizer)})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:   # an exporter defect: said, nothing written
        raise GraphcError(f"the ONNX model written for '{graph.name}' fails onnx.checker "
                          f"({str(e).splitlines()[0]}); nothing written") from None
    path = Path(path)
    onnx.save(model, str(path))
    return path
