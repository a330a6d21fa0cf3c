"""ONNX -> graphc spec: each ONNX node becomes graphc nodes (or is folded, when all its
inputs are known at import: the shape arithmetic exporters put around Reshape).

graphc values are per-example: ONNX's first axis of every graph input is the batch (fixed
or symbolic), so an ONNX axis k on a batched tensor is graphc's axis k - 1, and an op on
the batch axis itself is refused. Shape arithmetic that reads the batch size (`x.view(
x.size(0), -1)` exports as Shape -> Gather -> Unsqueeze -> Concat -> Reshape) is folded with
the batch kept as a marker, so that the Reshape's target is known per example.
"""

from __future__ import annotations

import keyword
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from codegen.cnames import C_KEYWORDS

from ..errors import SpecError
from ..formula import CONSTANTS, FUNCTIONS
from ..graph import MAX_ELEMENTS, MAX_PARAM_ELEMENTS, Graph
from .ops import IMPORTERS, Batched, decimal

MAX_MODEL_BYTES = 1 << 31   # protobuf's own limit for one message
MIN_OPSET = 13
MAX_NAME = 48               # characters of an ONNX name kept in a graphc name
LOSSES = ("softmax_cross_entropy", "mse", "bce_with_logits")
GRAPHC_DOMAIN = "graphc"   # graphc.onnx.save's model-local functions
OPTIMIZER_PROP = "graphc.optimizer"   # metadata of a training graph graphc wrote: its optimizer


def _onnx():
    try:
        import onnx
    except ImportError:
        raise SpecError("reading ONNX needs the onnx package: pip install \"graphc[onnx]\"") \
            from None
    return onnx


# ---------------------------------------------------------------- names

class SafeNames:
    """ONNX names (`fc1.weight`, `/conv1/Conv_output_0`) as graphc identifiers by one rule:
    runs of other characters become `_`, a name not starting with a letter or clashing with
    a C or Python keyword or a formula's function gets `v_` in front, at most MAX_NAME
    characters, and a repeat gets `_2`, `_3`... `original` maps each back."""

    def __init__(self):
        self.original: dict[str, str] = {}    # graphc name -> ONNX name
        self._given: dict[str, str] = {}      # ONNX name -> graphc name

    def __call__(self, onnx_name: str) -> str:
        if onnx_name in self._given:
            return self._given[onnx_name]
        word = re.sub(r"[^A-Za-z0-9]+", "_", onnx_name).strip("_")[:MAX_NAME] or "value"
        if not word[0].isalpha() or word in C_KEYWORDS or keyword.iskeyword(word) \
                or word in FUNCTIONS or word in CONSTANTS or word == "n":
            word = "v_" + word
        name, k = word, 1
        while name in self.original:
            k += 1
            name = f"{word}_{k}"
        self.original[name], self._given[onnx_name] = onnx_name, name
        return name


# ---------------------------------------------------------------- reading the file

def _read(path: Path):
    """The ModelProto, read within bounds; external data only from the model's folder."""
    onnx = _onnx()
    where = str(path)
    try:
        info = path.stat()
    except OSError as e:
        raise SpecError(f"cannot read the model: {e.strerror}", file=where) from None
    if not stat.S_ISREG(info.st_mode):
        raise SpecError("not a regular file", file=where)
    if info.st_size > MAX_MODEL_BYTES:
        raise SpecError(f"{info.st_size} bytes: more than an ONNX file can hold "
                        f"({MAX_MODEL_BYTES})", file=where)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:   # protobuf's DecodeError and the like: not an ONNX file
        raise SpecError(f"not a valid ONNX model ({type(e).__name__}: {e})", file=where) \
            from None
    if not model.HasField("graph"):
        raise SpecError("the file holds no graph", file=where)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    version = opsets.get("ai.onnx")
    newest = onnx.defs.onnx_opset_version()
    if version is None or not MIN_OPSET <= version <= newest:
        raise SpecError(f"opset {version}: graphc reads opsets {MIN_OPSET} to {newest}",
                        file=where, field="opset_import")
    _load_external(model.graph, path.parent, where)
    return model


def _load_external(graph, folder: Path, where: str) -> None:
    """Each external tensor's bytes, from a file inside `folder`, within the size bound."""
    root = folder.resolve()
    for t in graph.initializer:
        if t.data_location != 1:   # TensorProto.EXTERNAL
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(root) \
                or target == root:
            raise SpecError(f"external data {location!r} is outside the model's folder",
                            file=where, node=t.name, field="external_data")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
            size = target.stat().st_size
        except (ValueError, OSError) as e:
            raise SpecError(f"external data {location!r}: {e}", file=where, node=t.name,
                            field="external_data") from None
        expected = _elements(t, where) * _itemsize(t, where)
        if length < 0:
            length = expected
        if offset < 0 or length != expected or offset + length > size \
                or not stat.S_ISREG(target.stat().st_mode):
            raise SpecError(f"external data {location!r} does not hold the tensor's "
                            f"{expected} bytes at offset {offset}", file=where, node=t.name,
                            field="external_data")
        with open(target, "rb") as f:
            f.seek(offset)
            t.raw_data = f.read(length)
        del t.external_data[:]
        t.data_location = 0


_ITEMSIZE = {1: 4, 11: 8, 6: 4, 7: 8, 10: 2, 16: 2, 9: 1, 2: 1, 3: 1, 4: 2, 5: 2, 12: 4, 13: 8}
_FLOAT_TYPES = {1: np.float32, 11: np.float64, 10: np.float16}
_INT_TYPES = {6: np.int32, 7: np.int64}


def _itemsize(t, where: str) -> int:
    if t.data_type not in _ITEMSIZE:
        raise SpecError(f"tensor type {t.data_type} is not a number type graphc reads",
                        file=where, node=t.name, field="data_type")
    return _ITEMSIZE[t.data_type]


def _elements(t, where: str) -> int:
    dims = list(t.dims)
    if any(d < 0 for d in dims) or (dims and max(dims) > MAX_PARAM_ELEMENTS) \
            or math.prod(dims) > MAX_PARAM_ELEMENTS:
        raise SpecError(f"tensor of shape {dims} is larger than graphc takes "
                        f"({MAX_PARAM_ELEMENTS} elements)", file=where, node=t.name,
                        field="dims")
    return math.prod(dims)


def _array(t, where: str) -> np.ndarray:
    """A TensorProto's values, its size checked before they are decoded."""
    from onnx import numpy_helper
    _elements(t, where)
    _itemsize(t, where)
    try:
        value = numpy_helper.to_array(t)
    except Exception as e:
        raise SpecError(f"cannot decode the tensor ({e})", file=where, node=t.name) from None
    return np.array(value)


class Importer:
    """The state of one import: ONNX names bound to graphc values or constants, and the
    spec being written."""

    def __init__(self, model, where: str):
        self.model, self.where = model, where
        self.names = SafeNames()
        self.env: dict[str, Batched | np.ndarray] = {}
        self.initializers: dict[str, object] = {t.name: t for t in model.graph.initializer}
        self.spec: dict = {"inputs": {}, "params": {}, "nodes": {}}
        self.initial: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}   # graphc value -> per-example shape
        self.static_batch: set[int] = set()   # fixed first axes of the inputs (a static export)
        self.sources: dict[str, str] = {}      # param -> the initializer it comes from
        self.node = ""          # the ONNX node being imported, for errors
        self.op = ""

    # ------------------------------------------------------------ errors and attributes
    def error(self, message: str, field: str | None = None) -> SpecError:
        return SpecError(message, file=self.where, node=self.node, field=field)

    def attrs(self, node) -> dict:
        from onnx import helper
        out = {}
        for a in node.attribute:
            if a.type in (5, 10, 11, 12, 13):   # GRAPH, GRAPHS, SPARSE...: no subgraphs
                raise self.error(f"attribute {a.name!r} holds a subgraph, which graphc does "
                                 "not import", field=a.name)
            value = helper.get_attribute_value(a)
            if a.type == 1:   # FLOAT: stored as float32; meant as its shortest decimal (1e-5)
                value = decimal(value)
            elif a.type == 6:
                value = [decimal(v) for v in value]
            elif a.type == 4:   # TENSOR
                value = _array(value, self.where)
            elif isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            out[a.name] = value
        return out

    # ------------------------------------------------------------ values
    def get(self, onnx_name: str):
        if onnx_name in self.env:
            return self.env[onnx_name]
        if onnx_name in self.initializers:
            value = _array(self.initializers[onnx_name], self.where)
            self.env[onnx_name] = value
            return value
        raise self.error(f"input {onnx_name!r} is produced by no node, input or initializer",
                         field="input")

    def batched(self, onnx_name: str) -> Batched:
        v = self.get(onnx_name)
        if not isinstance(v, Batched):
            raise self.error(f"{onnx_name!r} is a constant where graphc needs a value with "
                             "the batch axis", field="input")
        return v

    def constant(self, onnx_name: str, what: str) -> np.ndarray:
        v = self.get(onnx_name) if onnx_name else None
        if not isinstance(v, np.ndarray):
            raise self.error(f"{what} must be a constant (an initializer or folded shape "
                             "arithmetic)", field="input")
        return v

    def param(self, onnx_name: str, value: np.ndarray | None = None,
              trainable: bool = True) -> str:
        """A weight as a graphc param starting from its value (the initializer's, or
        `value`: a transposed or scaled form of it)."""
        array = self.constant(onnx_name, "a weight") if value is None else value
        if not np.issubdtype(array.dtype, np.floating):
            raise self.error(f"weight {onnx_name!r} is not a floating tensor", field="input")
        name = self.names(onnx_name if value is None else f"{onnx_name}_{self.op.lower()}")
        if name not in self.spec["params"]:
            self.spec["params"][name] = {"shape": list(array.shape), "init": "zeros",
                                         **({} if trainable else {"trainable": False})}
            self.initial[name] = np.asarray(array, np.float64)
            self.sources[name] = onnx_name
        return name

    def add(self, op: str, inputs: list[str], onnx_name: str, **attrs) -> Batched:
        """A graphc node named after the ONNX output it computes, its shape inferred by
        graphc's own rules (from a spec of the node and its inputs alone)."""
        name = self.names(onnx_name)
        node = {"op": op, "inputs": list(inputs), **attrs}
        self.spec["nodes"][name] = node
        local: dict = {"name": "node", "inputs": {}, "params": {}, "nodes": {name: node},
                       "outputs": [name]}
        for i in dict.fromkeys(inputs):
            if i in self.spec["params"]:
                local["params"][i] = self.spec["params"][i]
            else:
                local["inputs"][i] = self.spec["inputs"].get(i) or {"shape": list(self.shapes[i])}
        try:
            shape = Graph.from_spec(local).values[name].shape
        except SpecError as e:   # the field as the ONNX node names it
            raise self.error(f"{op}: {e.message}",
                             field=ONNX_FIELDS.get(e.field, e.field)) from None
        self.shapes[name] = shape
        return Batched(name, shape)


# graphc's convolution and pooling attributes under their ONNX names
ONNX_FIELDS = {"kernel_size": "kernel_shape", "stride": "strides", "padding": "pads",
               "dilation": "dilations", "groups": "group"}


def _shape_of_input(importer: Importer, vi) -> tuple[str, tuple[int, ...]]:
    onnx_type = vi.type
    if not onnx_type.HasField("tensor_type"):
        raise importer.error(f"input {vi.name!r} is not a tensor", field="input")
    t = onnx_type.tensor_type
    if t.elem_type in _FLOAT_TYPES:
        dtype = "float"
    elif t.elem_type in _INT_TYPES:
        dtype = "int32"
    else:
        raise importer.error(f"input {vi.name!r} has element type {t.elem_type}; graphc "
                             "takes floating inputs and integer indices", field="input")
    dims = []
    for k, d in enumerate(t.shape.dim):
        if k == 0:   # the batch axis, fixed or symbolic
            if d.HasField("dim_value") and d.dim_value > 0:
                importer.static_batch.add(d.dim_value)
            continue
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise importer.error(f"input {vi.name!r}: axis {k} has no fixed size "
                                 "(only the batch axis, the first, may vary)", field="input")
        dims.append(d.dim_value)
    if not t.shape.dim:
        raise importer.error(f"input {vi.name!r} has no batch axis", field="input")
    if math.prod(dims) > MAX_ELEMENTS:
        raise importer.error(f"input {vi.name!r} of shape {dims} per example is larger than "
                             "graphc takes", field="input")
    return dtype, tuple(dims)


def load(path, *, loss: str | None = None, target=None) -> Graph:
    """An ONNX model (opset 13 on) as a Graph whose params start from its weights.

    With `loss` (one of softmax_cross_entropy, mse, bce_with_logits) the graph gets a loss
    on its one output, so that it can be trained: `target` names the loss's second input
    and its per-example shape, `("y", [10])`; by default class indices (int32, shape [])
    for softmax_cross_entropy and the output's shape otherwise."""
    path = Path(path)
    model = _read(path)
    imp = Importer(model, str(path))
    graph = model.graph
    for vi in graph.input:
        if vi.name in imp.initializers:
            continue   # older exporters list weights as inputs too
        dtype, shape = _shape_of_input(imp, vi)
        name = imp.names(vi.name)
        imp.spec["inputs"][name] = {"shape": list(shape),
                                    **({"dtype": dtype} if dtype != "float" else {})}
        imp.env[vi.name] = Batched(name, shape)
        imp.shapes[name] = shape
    functions = {(f.domain, f.name): f for f in model.functions}
    for node in graph.node:
        imp.node, imp.op = node.name or (node.output[0] if node.output else node.op_type), \
            node.op_type
        if not node.output or not node.output[0]:
            raise imp.error("a node without an output", field="output")
        if node.domain == GRAPHC_DOMAIN and (node.domain, node.op_type) in functions:
            _graphc_node(imp, node, functions[node.domain, node.op_type])
            continue
        if node.domain not in ("", "ai.onnx"):
            raise imp.error(f"op {node.domain}::{node.op_type} is not a standard ONNX op")
        rule = IMPORTERS.get(node.op_type)
        if rule is None:
            raise imp.error(f"op type {node.op_type!r} is not supported (graphc imports: "
                            f"{', '.join(sorted(IMPORTERS))})", field="op_type")
        rule(imp, node, imp.attrs(node))
    imp.node = ""
    outputs, written_loss = [], None
    for o in graph.output:
        value = imp.get(o.name)
        if isinstance(value, Batched) and \
                imp.spec["nodes"].get(value.name, {}).get("op") in LOSSES:
            written_loss = value.name   # graphc.onnx.save(..., include_loss=True)'s loss
            continue
        if not isinstance(value, Batched):
            raise imp.error(f"output {o.name!r} is a constant", field="output")
        if value.name not in imp.spec["nodes"]:   # an input passed through: a node of its own
            value = imp.add("reshape", [value.name], o.name, shape=list(value.shape))
        outputs.append(value)
    # Params in the file's order of initializers (the layout of the params block; for a
    # PyTorch export, the module's order of parameters), not in the order of first use.
    order = {t.name: k for k, t in enumerate(graph.initializer)}
    imp.spec["params"] = dict(sorted(imp.spec["params"].items(),
                                     key=lambda item: order.get(imp.sources[item[0]], len(order))))
    # A model graphc wrote keeps its name; others (torch names every graph "main_graph")
    # are named after their file.
    own = model.producer_name == "graphc" and graph.name
    spec = {"name": SafeNames()(graph.name if own else path.stem), **imp.spec,
            "outputs": [o.name for o in outputs]}
    if written_loss is not None:
        if loss is not None:
            raise SpecError(f"the model already has a loss ('{written_loss}'); load it "
                            "without loss=", file=str(path), field="loss")
        spec["loss"] = written_loss
        props = {p.key: p.value for p in model.metadata_props}
        if OPTIMIZER_PROP in props:   # checked by Graph.from_spec like a spec's section
            import json
            try:
                spec["optimizer"] = json.loads(props[OPTIMIZER_PROP])
            except ValueError:
                raise SpecError("the optimizer in the model's metadata is not JSON",
                                file=str(path), field=OPTIMIZER_PROP) from None
    elif loss is not None:
        _add_loss(imp, spec, outputs, loss, target)
    try:
        result = Graph.from_spec(spec)
    except SpecError as e:   # a graphc rule the ONNX model breaks: where, in ONNX's names
        original = imp.names.original.get(e.node or "", e.node)
        raise SpecError(e.message, file=str(path), node=original, field=e.field) from None
    result.initial = imp.initial
    result.onnx_names = dict(imp.names.original)
    return result


def _graphc_node(imp: Importer, node, function) -> None:
    """A node graphc.onnx.save wrote as a call of a model-local function: the graphc node
    its doc_string holds (op, ONNX names of its inputs, attributes), so that formulas and
    activations come back as they were; the function's body is what other runtimes run."""
    import json
    try:
        record = json.loads(function.doc_string)
        op, names = record.pop("op"), record.pop("inputs")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise imp.error("a graphc function without the graphc node it stands for",
                        field="doc_string") from None
    if not isinstance(op, str) or not isinstance(names, list) or len(names) != len(node.input):
        raise imp.error("a graphc function whose record does not match its call",
                        field="doc_string")
    ins = []
    for onnx_name in node.input:
        v = imp.get(onnx_name)
        ins.append(v.name if isinstance(v, Batched) else imp.param(onnx_name))
    if op == "elementwise" and isinstance(record.get("expr"), str):
        rename = dict(zip(map(str, names), ins))
        record["expr"] = re.sub(r"[A-Za-z_][A-Za-z0-9_]*",
                                lambda m: rename.get(m[0], m[0]), record["expr"])
    imp.env[node.output[0]] = imp.add(op, ins, node.output[0], **record)


def _add_loss(imp: Importer, spec: dict, outputs: list[Batched], loss: str, target) -> None:
    if loss not in LOSSES:
        raise SpecError(f"unknown loss {loss!r} (one of {', '.join(LOSSES)})", field="loss")
    if len(outputs) != 1:
        raise SpecError(f"a loss needs one output; the model has {len(outputs)}",
                        field="loss")
    (out,) = outputs
    if target is None:
        target = ("target", [] if loss == "softmax_cross_entropy" else list(out.shape))
    if not (isinstance(target, (tuple, list)) and len(target) == 2
            and isinstance(target[0], str) and isinstance(target[1], (tuple, list))):
        raise SpecError("target must be (name, per-example shape), e.g. ('y', [10])",
                        field="target")
    name, shape = target
    labels = loss == "softmax_cross_entropy" and list(shape) == []
    target_name, loss_name = imp.names(name), imp.names("loss")
    spec["inputs"][target_name] = {"shape": list(shape), **({"dtype": "int32"} if labels else {})}
    spec["nodes"][loss_name] = {"op": loss, "inputs": [out.name, target_name]}
    spec["loss"] = loss_name
