"""ONNX in: models exported by PyTorch against onnxruntime, ONNX's own node conformance
cases, hostile files, and the name rule.

Needs the `onnx` package (CI installs it with the test extra); the PyTorch exports need
torch and onnxruntime and skip without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphc  # noqa: E402
import graphc.onnx  # noqa: E402
import graphc.spec  # noqa: E402
from graphc.errors import SpecError  # noqa: E402
from graphc.onnx.importer import SafeNames  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _external(name: str, dims: list[int], location: str, length: int) -> TensorProto:
    """A float tensor whose values are in a file beside the model."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _float_input(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *dims])


def _dense_model(tmp_path: Path, op_type="Gemm") -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "fc.weight")
    b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "fc.bias")
    node = helper.make_node(op_type, ["x", "fc.weight", "fc.bias"], ["y"], transB=1) \
        if op_type == "Gemm" else helper.make_node(op_type, ["x"], ["y"])
    return _save(_model([node], [_float_input("x", 4)], [_float_input("y", 3)], [w, b]),
                 tmp_path / "dense.onnx")


# ---------------------------------------------------------------- names

def test_onnx_names_become_safe_identifiers_by_one_rule():
    names = SafeNames()
    assert names("fc1.weight") == "fc1_weight"
    assert names("/conv1/Conv_output_0") == "conv1_Conv_output_0"
    assert names("0") == "v_0" and names("exp") == "v_exp" and names("for") == "v_for"
    assert names("fc1/weight") == "fc1_weight_2"     # a second name with the same spelling
    assert names("fc1.weight") == "fc1_weight"       # the same ONNX name, the same name
    assert names("x" * 200) == "x" * 48
    assert names.original["fc1_weight_2"] == "fc1/weight"


# ---------------------------------------------------------------- PyTorch exports

def _torch_models():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(20, 32), nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    class GeluMLP(MLP):
        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
            self.f1, self.f2, self.f3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2)
            x = x.view(x.size(0), -1)
            return self.f3(F.relu(self.f2(F.relu(self.f1(x)))))

    class BatchNormCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), \
                nn.Linear(8, 5)

        def forward(self, x):
            x = F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class LayerNormMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.drop, self.fc2 = nn.Linear(12, 16), nn.LayerNorm(16), \
                nn.Dropout(0.3), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.drop(F.relu(self.ln(self.fc1(x)))))

    class CeilCNN(nn.Module):
        """ceil_mode's clipped last windows: dilated max pooling, an average without
        padding (the overhang not counted) and one with padding counted."""
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(180, 5)

        def forward(self, x):
            h = torch.tanh(self.conv(x))                                     # [4, 10, 10]
            a = F.max_pool2d(h, 2, 2, dilation=2, ceil_mode=True)           # [4, 5, 5]
            a = F.avg_pool2d(a, 2, 2, ceil_mode=True)                        # [4, 3, 3]
            b = F.avg_pool2d(h, 3, 2, padding=1, ceil_mode=True)            # [4, 6, 6]
            return self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))

    return {"mlp": (MLP, (20,)), "gelu_mlp": (GeluMLP, (20,)), "lenet5": (LeNet, (1, 28, 28)),
            "bn_cnn": (BatchNormCNN, (3, 8, 8)), "ln_mlp": (LayerNormMLP, (12,)),
            "ceil_cnn": (CeilCNN, (2, 10, 10))}


def _export(torch, name: str, dynamo: bool, folder: Path, batch: int = 8, dynamic=True):
    cls, shape = _torch_models()[name]
    torch.manual_seed(0)
    module = cls().eval()
    if name == "bn_cnn":   # running statistics that are not the identity
        with torch.no_grad():
            module.bn.running_mean.uniform_(-0.5, 0.5)
            module.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(batch, *shape)
    path = folder / f"{name}_{'dynamo' if dynamo else 'script'}.onnx"
    if dynamic:
        extra = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}} if dynamo \
            else {"dynamic_axes": {"x": {0: "batch"}}}
    else:
        extra = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["out"],
                          dynamo=dynamo, verbose=False, **extra)
    return module, path, x.numpy()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["mlp", "gelu_mlp", "lenet5", "bn_cnn", "ln_mlp", "ceil_cnn"])
def test_pytorch_exports_compute_what_onnxruntime_computes(name, dynamo, tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    _, path, x = _export(torch, name, dynamo, tmp_path)
    model = graphc.compile(graphc.onnx.load(path), dtype="float32")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):    # the batch axis is free whatever the export traced
        got = model.forward(x=batch)["out"]
        want = session.run(None, {"x": batch})[0]
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), name


def test_a_static_export_writes_its_batch_into_reshape_and_still_imports(tmp_path):
    """`x.view(x.size(0), -1)` traced without a dynamic axis exports Reshape to [8, 400]:
    the 8 is the batch, so per example the target is [400], and other batch sizes run."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    module, path, x = _export(torch, "lenet5", False, tmp_path, dynamic=False)
    reshapes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Reshape"]
    assert reshapes
    model = graphc.compile(graphc.onnx.load(path), dtype="float32")
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert np.max(np.abs(model.forward(x=x)["out"] - want)) <= 1e-4 * np.max(np.abs(want))
    with torch.no_grad():
        three = module(torch.tensor(x[:3])).numpy()
    assert np.max(np.abs(model.forward(x=x[:3])["out"] - three)) <= \
        1e-4 * np.max(np.abs(three))


@pytest.mark.parametrize("name", ["lenet5", "ln_mlp", "ceil_cnn"])   # eval exports fold
# batch norm away
def test_an_imported_model_with_a_loss_has_torchs_gradients(name, tmp_path):
    """Fine-tuning: the imported graph with class-index cross-entropy, in float64, gives
    PyTorch autograd's loss and weight gradients (the weights from the ONNX file)."""
    torch = pytest.importorskip("torch")
    module, path, x = _export(torch, name, False, tmp_path)
    graph = graphc.onnx.load(path, loss="softmax_cross_entropy")
    model = graphc.compile(graph, dtype="float64", optimizer={"name": "sgd", "lr": 0.1})
    labels = np.arange(len(x), dtype=np.int32) % 4
    loss, grads = model.gradients(x=x.astype(np.float64), target=labels)
    module = module.double()
    out = module(torch.tensor(x, dtype=torch.float64))
    want = torch.nn.functional.cross_entropy(out, torch.tensor(labels, dtype=torch.long))
    want.backward()
    assert abs(loss - want.item()) <= 1e-10 * abs(want.item())
    by_onnx = {graph.onnx_names.get(p, p): p for p in grads}
    checked = 0
    for torch_name, tensor in module.named_parameters():
        if torch_name in by_onnx:
            got = grads[by_onnx[torch_name]]
            np.testing.assert_allclose(got, tensor.grad.numpy(), rtol=1e-8,
                                       atol=1e-10 * np.max(np.abs(tensor.grad.numpy())))
            checked += 1
    assert checked >= 2, list(by_onnx)
    before = model.get_params()
    model.train_step(x=x.astype(np.float64), target=labels)
    assert any(not np.array_equal(before[p], v) for p, v in model.get_params().items())


# ---------------------------------------------------------------- models made here

def test_gemm_and_its_weights_start_the_model(tmp_path):
    path = _dense_model(tmp_path)
    graph = graphc.onnx.load(path)
    assert set(graph.params) == {"fc_weight", "fc_bias"}
    assert graph.onnx_names["fc_weight"] == "fc.weight"
    model = graphc.compile(graph, dtype="float64")
    proto = onnx.load(str(path))
    w, b = (numpy_helper.to_array(t) for t in proto.graph.initializer)
    x = np.random.default_rng(1).normal(size=(5, 4))
    np.testing.assert_allclose(model.forward(x=x)["y"], x @ w.T.astype(np.float64) + b,
                               rtol=1e-12)


def test_static_shape_arithmetic_is_folded(tmp_path):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as exporters write a flatten."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Constant", [], ["zero"], value_int=0),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Constant", [], ["axes"], value_ints=[0]),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Constant", [], ["minus"], value_ints=[-1]),
             helper.make_node("Concat", ["n1", "minus"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    path = _save(_model(nodes, [_float_input("x", 2, 3)], [_float_input("y", 6)]),
                 tmp_path / "flat.onnx")
    graph = graphc.onnx.load(path)
    assert graph.values["y"].shape == (6,)
    x = np.arange(12.0).reshape(2, 2, 3)
    np.testing.assert_array_equal(graphc.reference(graph).forward(x=x)["y"], x.reshape(2, 6))


@pytest.mark.parametrize("op", ["ReduceL2", "ReduceLogSumExp", "ReduceMean"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reductions_over_one_axis(op, keepdims, tmp_path):
    """ReduceLogSumExp through the stable shift of log_softmax: finite at |x| = 1000."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    path = _save(_model([node], [_float_input("x", 3, 4)], [_float_input("y")], [axes]),
                 tmp_path / "reduce.onnx")
    graph = graphc.onnx.load(path)
    x = np.random.default_rng(2).normal(size=(2, 3, 4)) * np.array([1, 10, 1000])[:, None]
    want = {"ReduceL2": lambda: np.sqrt(np.sum(x ** 2, axis=2, keepdims=True)),
            "ReduceMean": lambda: np.mean(x, axis=2, keepdims=True),
            "ReduceLogSumExp": lambda: np.max(x, axis=2, keepdims=True) + np.log(np.sum(
                np.exp(x - np.max(x, axis=2, keepdims=True)), axis=2, keepdims=True))}[op]()
    want = want if keepdims else want[..., 0]
    got = graphc.compile(graph, dtype="float64").forward(x=x)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------- untrusted files

def test_an_unsupported_op_is_one_error_naming_it_the_node_and_the_list(tmp_path):
    node = helper.make_node("Einsum", ["x", "x"], ["y"], name="mix", equation="bi,bi->b")
    path = _save(_model([node], [_float_input("x", 4)], [_float_input("y")]),
                 tmp_path / "einsum.onnx")
    with pytest.raises(SpecError) as e:
        graphc.onnx.load(path)
    message = str(e.value)
    assert "einsum.onnx" in message and "node 'mix'" in message
    assert "'Einsum' is not supported" in message and "Conv, " in message


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "graphc", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_the_cli_checks_an_onnx_file_and_reports_a_bad_one_without_a_traceback(tmp_path):
    good = _cli("check", _dense_model(tmp_path))
    assert good.returncode == 0, good.stderr
    assert "PASS" in good.stdout or "pass" in good.stdout.lower(), good.stdout
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf message" * 3)
    with pytest.raises(SpecError, match="not a valid ONNX model"):
        graphc.onnx.load(bad)
    out = _cli("check", bad)
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert "bad.onnx" in out.stderr and "not a valid ONNX model" in out.stderr


def _digits_mlp(path: Path) -> Path:
    """A 64-32-10 MLP with He-initialized weights, as an exporter writes it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=shape) * np.sqrt(2 / shape[-1]))
                                     .astype(np.float32), name)
             for name, shape in (("fc1.weight", (32, 64)), ("fc2.weight", (10, 32)))]
    inits += [numpy_helper.from_array(np.zeros(n, np.float32), name)
              for name, n in (("fc1.bias", 32), ("fc2.bias", 10))]
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "fc2.weight", "fc2.bias"], ["logits"], transB=1)]
    return _save(_model(nodes, [_float_input("x", 64)], [_float_input("logits", 10)], inits),
                 path)


def test_graphc_import_writes_a_spec_and_weights_that_compute_the_same(tmp_path):
    source = _digits_mlp(tmp_path / "mlp.onnx")
    out = _cli("import", source, "-o", tmp_path / "spec" / "mlp.yaml")
    assert out.returncode == 0, out.stderr
    spec, weights = tmp_path / "spec" / "mlp.yaml", tmp_path / "spec" / "mlp.npz"
    assert "#   fc1_weight: fc1.weight" in spec.read_text()
    x = np.random.default_rng(3).normal(size=(4, 64))
    direct = graphc.compile(graphc.onnx.load(source), dtype="float64").forward(x=x)["logits"]
    edited = graphc.compile(spec, dtype="float64", params=weights).forward(x=x)["logits"]
    np.testing.assert_array_equal(edited, direct)
    refused = _cli("import", tmp_path / "missing.onnx", "-o", tmp_path / "no" / "x.yaml")
    assert refused.returncode == 2 and "cannot read the model" in refused.stderr
    assert not (tmp_path / "no").exists()


def test_graphc_train_fine_tunes_an_onnx_model_on_the_digits(tmp_path):
    pytest.importorskip("sklearn")
    source = _digits_mlp(tmp_path / "mlp.onnx")
    out = _cli("train", source, "--loss", "softmax_cross_entropy", "--data", "digits",
               "--epochs", "20", "--no-progress")
    assert out.returncode == 0, out.stderr
    accuracy = float(re.search(r"accuracy ([\d.]+)%", out.stdout).group(1))
    assert accuracy >= 90, out.stdout
    missing = _cli("train", source, "--data", "digits")
    assert missing.returncode == 2 and "give --loss" in missing.stderr


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_models_folder_is_refused_unread(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 48)
    w = _external("w", [3, 4], location, 48)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    path = _save(_model([node], [_float_input("x", 4)], [_float_input("y", 3)], [w]),
                 folder / "m.onnx")
    with pytest.raises(SpecError, match="outside the model's folder"):
        graphc.onnx.load(path)


def test_external_data_inside_the_folder_is_read(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    (tmp_path / "w.bin").write_bytes(values.tobytes())
    w = _external("w", [3, 4], "w.bin", 48)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    path = _save(_model([node], [_float_input("x", 4)], [_float_input("y", 3)], [w]),
                 tmp_path / "m.onnx")
    graph = graphc.onnx.load(path)
    np.testing.assert_array_equal(graph.initial["w"], values)


def test_a_tensor_too_large_is_refused_before_it_is_allocated(tmp_path):
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    path = _save(_model([node], [_float_input("x", 1 << 20)], [_float_input("y", 3)], [w]),
                 tmp_path / "huge.onnx")
    with pytest.raises(SpecError, match="larger than graphc takes"):
        graphc.onnx.load(path)


def test_an_old_opset_and_a_directory_are_clear_errors(tmp_path):
    path = _save(_model([helper.make_node("Relu", ["x"], ["y"])], [_float_input("x", 3)],
                        [_float_input("y", 3)], opset=9), tmp_path / "old.onnx")
    with pytest.raises(SpecError, match="opset 9: graphc reads opsets 13 to"):
        graphc.onnx.load(path)
    with pytest.raises(SpecError, match="not a regular file"):
        graphc.onnx.load(tmp_path)


def test_a_node_without_an_output_is_a_clear_error(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], [], name="nowhere"),
             helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [_float_input("x", 3)], [_float_input("y", 3)])
    path = tmp_path / "empty.onnx"
    path.write_bytes(model.SerializeToString())   # onnx.save would check it first
    with pytest.raises(SpecError, match="node 'nowhere': field 'output': a node without"):
        graphc.onnx.load(path)


def test_an_op_on_the_batch_axis_is_refused(tmp_path):
    node = helper.make_node("Softmax", ["x"], ["y"], axis=0, name="over_batch")
    path = _save(_model([node], [_float_input("x", 3)], [_float_input("y", 3)]),
                 tmp_path / "softmax0.onnx")
    with pytest.raises(SpecError, match="node 'over_batch': field 'axis': an op along the "
                                        "batch axis"):
        graphc.onnx.load(path)


# ---------------------------------------------------------------- ONNX's node cases

def _node_cases(cache_root: str) -> Path:
    """ONNX's node conformance cases whose ops graphc imports and whose tensors are float,
    written once into the cache (the onnx wheel ships generators, not data): <case>.onnx
    and <case>_<k>.npz (inputs in_<i>, expected outputs out_<i>)."""
    from onnx.backend.test.case.node import collect_testcases
    key = hashlib.sha256(json.dumps([onnx.__version__, sorted(graphc.onnx.SUPPORTED_OPS)])
                         .encode()).hexdigest()[:16]
    folder = Path(cache_root) / f"onnx-node-cases-{key}"
    if (folder / "done").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    kept = 0
    for case in cases:
        graph = case.model.graph
        tensors = list(graph.input) + list(graph.output)
        if not {n.op_type for n in graph.node} <= graphc.onnx.SUPPORTED_OPS or \
                not all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
                        for v in tensors):
            continue
        onnx.save(case.model, str(tmp / f"{case.name}.onnx"))
        for k, (ins, outs) in enumerate(case.data_sets):
            arrays = {f"in_{i}": np.asarray(numpy_helper.to_array(a) if hasattr(a, "dims") else a)
                      for i, a in enumerate(ins)}
            arrays.update({f"out_{i}": np.asarray(numpy_helper.to_array(a)
                                                  if hasattr(a, "dims") else a)
                           for i, a in enumerate(outs)})
            np.savez(tmp / f"{case.name}_{k}.npz", **arrays)
        kept += 1
    (tmp / "done").write_text(f"{len(cases)} {kept}\n")
    try:
        tmp.rename(folder)
    except OSError:   # another worker finished first
        pass
    return folder


def _frozen(model, values: list[np.ndarray]):
    """The case's model with every input after the first made an initializer holding the
    case's value: ONNX's cases pass weights as inputs, graphc reads weights as initializers
    and only the data as batched inputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep = graph.input[0]
    for vi, value in zip(list(graph.input)[1:], values[1:]):
        graph.initializer.append(numpy_helper.from_array(value, vi.name))
    del graph.input[:]
    graph.input.append(keep)
    return model


# Cases whose expected outputs ONNX types by hand, rounded: compared at ONNX's own runner's
# tolerance (rtol 1e-3) rather than 1e-4. Channel 1 of this one averages 2.5564 / 9 =
# 0.28404 (torch: 0.2840), typed 0.2841.
HAND_ROUNDED = {"test_averagepool_2d_ceil_last_window_starts_on_pad": 1e-3}


def _run_case(folder: Path, name: str, tmp_path: Path):
    """'refused' (graphc says why it cannot import it), or a list of mismatches."""
    model = onnx.load(str(folder / f"{name}.onnx"))
    data = [dict(np.load(p, allow_pickle=False)) for p in sorted(folder.glob(f"{name}_*.npz"))
            if re.fullmatch(rf"{re.escape(name)}_\d+\.npz", p.name)]
    first = data[0]
    ins = [first[f"in_{i}"] for i in range(len(model.graph.input))]
    attempts = [model]
    if len(ins) > 1:
        attempts.append(_frozen(model, ins))
    for attempt in attempts:
        path = tmp_path / f"{name}.onnx"
        onnx.save(attempt, str(path))
        try:
            graph = graphc.onnx.load(path)
        except SpecError:
            continue
        batched = len(graph.inputs)
        if len({first[f"in_{i}"].shape[:1] for i in range(batched)}) > 1:
            continue   # inputs of different batch sizes: try the frozen form
        reference = graphc.reference(graph)
        problems = []
        for d in data:
            feed = {g: d[f"in_{i}"] for i, g in enumerate(graph.inputs)}
            got = reference.forward(**feed)
            got = got if isinstance(got, dict) else {graph.outputs[0]: got}
            for i, o in enumerate(graph.outputs):
                want = d[f"out_{i}"]
                if got[o].shape != want.shape or not np.allclose(
                        got[o], want, rtol=HAND_ROUNDED.get(name, 1e-4), atol=1e-5,
                        equal_nan=True):
                    problems.append(f"{name}: output {o} differs")
        return problems
    return "refused"


def test_onnx_node_conformance_cases(graphc_cache_dir, tmp_path):
    """Every case of ONNX's own whose ops graphc imports and whose tensors are float, and
    which graphc claims (imports rather than refusing with a reason), computes ONNX's
    expected outputs in graphc's reference to 1e-4. Counts in the assertion message."""
    folder = _node_cases(graphc_cache_dir)
    total, kept = map(int, (folder / "done").read_text().split())
    names = sorted(p.stem for p in folder.glob("*.onnx"))
    claimed, failures = 0, []
    for name in names:
        result = _run_case(folder, name, tmp_path)
        if result == "refused":
            continue
        claimed += 1
        failures += result
    counts = f"{claimed - len(failures)} passed / {claimed} claimed / {kept} candidates " \
             f"/ {total} cases"
    assert not failures, (counts, failures[:10])
    assert claimed >= 205, counts   # 205 of 257 with onnx 1.23


# One case per op family, run as compiled C too (the reference stands for the rest: the
# suite checks the C against it op by op, tests/test_ops_c.py).
C_CASES = ("test_basic_conv_with_padding", "test_conv_with_strides_and_asymmetric_padding",
           "test_maxpool_2d_precomputed_same_upper", "test_averagepool_2d_default",
           "test_averagepool_2d_same_lower", "test_averagepool_2d_ceil",
           "test_maxpool_2d_dilations",
           "test_globalaveragepool", "test_gemm_default_scalar_bias",
           "test_gemm_alpha", "test_softmax_axis_1", "test_batchnorm_epsilon",
           "test_gelu_tanh_1", "test_transpose_all_permutations_1")


@pytest.mark.parametrize("name", C_CASES)
def test_onnx_node_cases_in_the_compiled_c(name, graphc_cache_dir, tmp_path):
    folder = _node_cases(graphc_cache_dir)
    if not (folder / f"{name}.onnx").exists():
        pytest.skip(f"{name} is not among this onnx version's cases")
    model = onnx.load(str(folder / f"{name}.onnx"))
    data = dict(np.load(folder / f"{name}_0.npz", allow_pickle=False))
    ins = [data[f"in_{i}"] for i in range(len(model.graph.input))]
    for attempt in [model] + ([_frozen(model, ins)] if len(ins) > 1 else []):
        onnx.save(attempt, str(tmp_path / "case.onnx"))
        try:
            graph = graphc.onnx.load(tmp_path / "case.onnx")
        except SpecError:
            continue
        if len({data[f"in_{i}"].shape[:1] for i in range(len(graph.inputs))}) == 1:
            break
    else:
        pytest.fail(f"{name} is refused")
    compiled = graphc.compile(graph, dtype="float32")
    got = compiled.forward(**{g: data[f"in_{i}"] for i, g in enumerate(graph.inputs)})
    for i, o in enumerate(graph.outputs):
        want = data[f"out_{i}"]
        assert got[o].shape == want.shape
        assert np.max(np.abs(got[o] - want)) <= 1e-4 * max(1.0, np.max(np.abs(want))), o


# ---------------------------------------------------------------- ONNX out

EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml"))


def _inference(graph):
    """The graph without its loss: what an exported file holds."""
    from graphc.graph import Graph
    spec = graph.to_spec()
    spec.pop("loss", None)
    spec.pop("optimizer", None)
    needed = graph.ancestors(graph.outputs)
    for part in ("inputs", "params", "nodes"):
        spec[part] = {k: v for k, v in spec[part].items() if k in needed}
    return Graph.from_spec(spec)


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_exports_and_runs_in_onnxruntime(spec, tmp_path):
    """The file passes onnx.checker's full check (inside save) and onnxruntime computes
    graphc's forward (the float64 reference at the same float32 params) to 1e-4."""
    ort = pytest.importorskip("onnxruntime")
    from graphc.verify import sample_inputs
    graph = graphc.spec.load(spec)
    path = graphc.onnx.save(graph, tmp_path / "model.onnx")
    needed = graph.ancestors(graph.outputs)
    inputs = {k: v for k, v in sample_inputs(graph, 2, 0).items() if k in needed}
    feed = {k: v.astype(np.int32 if graph.inputs[k].dtype == "int32" else np.float32)
            for k, v in inputs.items()}
    reference = graphc.reference(graph)
    from graphc.init import start_params
    reference.set_params({p: np.asarray(v, np.float32).astype(np.float64)
                          for p, v in start_params(graph, 0).items()})
    want = reference.forward(**{k: v.astype(np.float64) if v.dtype == np.float32 else v
                                for k, v in feed.items()})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(graph.outputs), feed)
    for o, value in zip(graph.outputs, got):
        assert value.shape == want[o].shape, o
        assert np.max(np.abs(value - want[o])) <= 1e-4 * max(1.0, np.max(np.abs(want[o]))), o


@pytest.mark.parametrize("spec", [p for p in EXAMPLES if p.parent.name != "tiny"]
                         + [ROOT / "examples/tiny/resnet8.yaml"], ids=lambda p: p.stem)
def test_load_of_save_compiles_to_the_same_c(spec, tmp_path):
    """A graphc model survives the round trip: names, param order, attributes (float32 in
    ONNX, read back as their shortest decimal) and the ops without an ONNX op of their own
    (formulas, activations, global average pooling, dropout: model-local functions whose
    doc_string holds the graphc node)."""
    graph = _inference(graphc.spec.load(spec))
    back = graphc.onnx.load(graphc.onnx.save(graph, tmp_path / "model.onnx"))
    before, after = (graphc.generate(g, "float32")[1] for g in (graph, back))
    assert after.source == before.source and after.header == before.header


# Pooling with ONNX's geometry: padding per side and over half the kernel, dilation (an
# average's too) and ceil_mode, whose last windows run past the input (m, i, d, m1) or whose
# rule takes back the window that would start past it (a: floor's windows).
POOLS = {"name": "pools", "inputs": {"x": [2, 7, 8], "z": [2, 9]}, "params": {}, "nodes": {
    "m": {"op": "max_pool2d", "inputs": ["x"], "kernel_size": 3, "stride": 2,
          "dilation": [1, 2], "padding": [[0, 2], 1], "ceil_mode": True},
    "a": {"op": "avg_pool2d", "inputs": ["x"], "kernel_size": [3, 2], "stride": 3,
          "padding": [[2, 1], 0], "ceil_mode": True, "count_include_pad": False},
    "i": {"op": "avg_pool2d", "inputs": ["x"], "kernel_size": 3, "stride": [2, 3],
          "padding": [[1, 0], 1], "ceil_mode": True, "count_include_pad": True},
    "d": {"op": "avg_pool2d", "inputs": ["x"], "kernel_size": 2, "stride": 3, "dilation": 2,
          "ceil_mode": True, "count_include_pad": False},
    "m1": {"op": "max_pool1d", "inputs": ["z"], "kernel_size": 3, "stride": 4, "dilation": 2,
           "padding": [[2, 1]], "ceil_mode": True}},
    "outputs": ["m", "a", "i", "d", "m1"]}


def test_pooling_geometry_exports_runs_in_onnxruntime_and_comes_back(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    graph = graphc.Graph.from_spec(POOLS)
    with pytest.raises(graphc.errors.GraphcError, match="node 'd': an average pooling's "
                                                        "dilation needs opset 19"):
        graphc.onnx.save(graph, tmp_path / "old.onnx")
    assert not (tmp_path / "old.onnx").exists()
    path = graphc.onnx.save(graph, tmp_path / "pools.onnx", opset=19)
    nodes = {n.output[0]: {a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in onnx.load(str(path)).graph.node}
    assert nodes["m"]["pads"] == [0, 1, 2, 1] and nodes["m"]["dilations"] == [1, 2]
    assert [k for k in nodes if nodes[k].get("ceil_mode")] == ["m", "i", "d", "m1"]
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(3, 2, 7, 8)).astype(np.float32),
            "z": rng.normal(size=(3, 2, 9)).astype(np.float32)}
    want = graphc.reference(graph).forward(**{k: v.astype(np.float64) for k, v in feed.items()})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        list(graph.outputs), feed)
    for o, value in zip(graph.outputs, got):
        assert value.shape == want[o].shape, o
        assert np.max(np.abs(value - want[o])) <= 1e-5 * np.max(np.abs(want[o])), o
    back = graphc.onnx.load(path)
    before, after = (graphc.generate(g, "float32")[1] for g in (graph, back))
    assert after.source == before.source and after.header == before.header


def test_pooling_that_would_read_padding_alone_is_one_error_naming_onnxs_field(tmp_path):
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 2, 0])
    path = _save(_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               ["n", 1, 3, 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
                 tmp_path / "pool.onnx")
    with pytest.raises(SpecError, match=r"node 'y': field 'pads': max_pool2d: padding \[0, 2\] "
                                        r"along spatial axis 0 must be smaller than the "
                                        r"window's extent 2"):
        graphc.onnx.load(path)


def test_pow_with_a_tensor_exponent_or_base_is_a_formula_of_a_param(tmp_path):
    """x ** c and c ** x with c a tensor constant: c becomes a param (broadcast per
    example), the node an elementwise formula whose derivatives SymPy takes (in c too)."""
    c = np.array([0.5, 2.0, 3.0], np.float32)
    path = _save(_model(
        [helper.make_node("Pow", ["x", "c"], ["p"]), helper.make_node("Pow", ["c", "x"], ["q"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", 3]) for o in ("p", "q")],
        [numpy_helper.from_array(c, "c")]), tmp_path / "pow.onnx")
    g = graphc.onnx.load(path)
    assert {v.op for v in g.nodes.values()} == {"elementwise"}
    x = np.random.default_rng(1).uniform(0.5, 2.0, size=(4, 3))
    out = graphc.reference(g).forward(x=x)
    np.testing.assert_allclose(out["p"], x ** c.astype(np.float64), rtol=1e-12)
    np.testing.assert_allclose(out["q"], c.astype(np.float64) ** x, rtol=1e-12)
    spec = g.to_spec()   # a loss on both, so that the gradient of the param c is checked
    spec["inputs"]["t"] = {"shape": [3]}
    spec["nodes"]["s"] = {"op": "add", "inputs": ["p", "q"]}
    spec["nodes"]["loss"] = {"op": "mse", "inputs": ["s", "t"]}
    spec["loss"] = "loss"
    model = graphc.compile(graphc.Graph.from_spec(spec), dtype="float64")
    model.set_params(g.initial)
    report = model.verify(x=x, t=np.zeros((4, 3)))
    assert report.ok, report


def test_a_trained_model_exports_its_current_params(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = graphc.compile(ROOT / "examples/mlp.yaml", dtype="float32")
    x = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(6)]
    for _ in range(3):
        model.train_step(x=x, y=y)
    path = graphc.onnx.save(model, tmp_path / "trained.onnx")
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    want = model.forward(x=x)["logits"]
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    with pytest.raises(graphc.errors.GraphcError, match="include_loss=True: the graph has no"):
        graphc.onnx.save(_inference(model.graph), tmp_path / "x.onnx", include_loss=True)
    out = _cli("export", ROOT / "examples/mlp.yaml", "-o", tmp_path / "m.onnx", "--opset", "9")
    assert out.returncode == 2 and "opset must be an integer from 18" in out.stderr
    assert not (tmp_path / "m.onnx").exists()
    out = _cli("export", ROOT / "examples/digits_cnn.yaml", "-o", tmp_path / "cnn.onnx")
    assert out.returncode == 0 and onnx.load(str(tmp_path / "cnn.onnx")).graph.node


@pytest.mark.parametrize("spec", [p for p in EXAMPLES if p.parent.name != "tiny"]
                         + [ROOT / "examples/tiny/resnet8.yaml"], ids=lambda p: p.stem)
def test_a_training_graph_exports_and_comes_back_whole(spec, tmp_path):
    """include_loss: the file holds the targets and the per-example loss (graphc's loss
    node as a model-local function, its optimizer in the metadata); onnxruntime's mean of
    it is graphc's loss, and load gives back the training graph: the same C, train_step
    included."""
    ort = pytest.importorskip("onnxruntime")
    from graphc.init import start_params
    from graphc.verify import sample_inputs
    graph = graphc.spec.load(spec)
    path = graphc.onnx.save(graph, tmp_path / "train.onnx", include_loss=True)
    back = graphc.onnx.load(path)
    assert back.loss == graph.loss and back.optimizer == graph.optimizer
    before, after = (graphc.generate(g, "float32")[1] for g in (graph, back))
    assert after.source == before.source and after.header == before.header
    feed = {k: v.astype(np.int32 if graph.inputs[k].dtype == "int32" else np.float32)
            for k, v in sample_inputs(graph, 4, 0).items()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    per_example = session.run([graph.loss], {i.name: feed[i.name]
                                             for i in session.get_inputs()})[0]
    reference = graphc.reference(graph)
    reference.set_params({p: np.asarray(v, np.float32).astype(np.float64)
                          for p, v in start_params(graph, 0).items()})
    want = reference.loss(**{k: v.astype(np.float64) if v.dtype == np.float32 else v
                             for k, v in feed.items()})
    assert per_example.shape == (4,)
    assert abs(float(np.mean(per_example)) - want) <= 1e-5 * max(1.0, abs(want))
