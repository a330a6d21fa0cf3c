"""Checkpoints (graphc/checkpoint.py): `model.save` and `graphc.load_model` resume training
bit for bit; pickle and multiprocessing rebuild a model from the same bytes; a damaged or
hostile file is one clear error naming the file and the field, and nothing is unpickled;
`graphc train --save` and `--resume` through the CLI entry."""

from __future__ import annotations

import io
import json
import multiprocessing
import operator
import pickle
import zipfile

import numpy as np
import pytest

import graphc
from graphc.checkpoint import state_slots
from graphc.model import load_model
from graphc.cli import main
from graphc.errors import InputError, SpecError


def _graph(optimizer=True):
    """Dense, batch norm (running statistics: params the optimizer does not train), relu,
    dropout (masks drawn from the step count), dense, cross-entropy; adam."""
    b = graphc.Builder("ckpt")
    x, y = b.input("x", [6]), b.input("y", [3])
    W1, b1 = b.param("W1", [8, 6], init="he_normal"), b.param("b1", [8])
    gamma, beta = b.param("gamma", [8], init="ones"), b.param("beta", [8])
    mean = b.param("mean", [8], trainable=False)
    var = b.param("var", [8], init="ones", trainable=False)
    W2, b2 = b.param("W2", [3, 8], init="glorot_uniform"), b.param("b2", [3])
    h = b.dense(x, W1, b1, name="h")
    n = b.batch_norm(h, gamma, beta, mean, var, name="n")
    d = b.dropout(b.relu(n, name="a"), p=0.3, name="d")
    logits = b.dense(d, W2, b2, name="logits")
    loss = b.softmax_cross_entropy(logits, y, name="loss")
    return b.build(outputs=[logits], loss=loss,
                   optimizer={"name": "adam", "lr": 0.01} if optimizer else None)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((10, 6)).astype(np.float32),
            "y": np.eye(3, dtype=np.float32)[rng.integers(0, 3, 10)]}


@pytest.fixture(scope="module")
def straight(batch):
    """Ten steps in one go: (model, the losses of steps 6 to 10)."""
    model = graphc.compile(_graph(), seed=1)
    losses = [model.train_step(**batch) for _ in range(10)]
    return model, losses[5:]


@pytest.fixture(scope="module")
def saved(batch, tmp_path_factory):
    """A checkpoint after five steps: (path, the model that wrote it)."""
    model = graphc.compile(_graph(), seed=1)
    for _ in range(5):
        model.train_step(**batch)
    path = tmp_path_factory.mktemp("ckpt") / "run.graphc"
    model.save(path)
    return path, model


def _same_state(a, b) -> None:
    sa, sb = a.optimizer_state(), b.optimizer_state()
    assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
    for slot in sa.keys() - {"step"}:
        for p in sa[slot]:
            assert np.array_equal(sa[slot][p], sb[slot][p]), (slot, p)
    pa, pb = a.get_params(), b.get_params()
    for p in pa:
        assert np.array_equal(pa[p], pb[p]), p


def test_five_steps_save_load_five_steps_equals_ten_bit_for_bit(straight, saved, batch):
    model, losses = straight
    path, _ = saved
    resumed = graphc.load_model(path)
    assert resumed.optimizer_state()["step"] == 5 and resumed.dtype == np.float32
    assert [resumed.train_step(**batch) for _ in range(5)] == losses
    _same_state(resumed, model)   # params (running statistics too), step count, moments


def test_the_step_count_is_what_makes_the_resume_exact(saved, batch):
    """Guard for the test above: the step count picks the dropout masks, so a model given
    the params and moments but not the count would take a different sixth step."""
    path, _ = saved
    a, b = graphc.load_model(path), graphc.load_model(path)
    step = b.cmodule.state_offsets["step"]
    b._state[step] = 0
    assert a.gradients(**batch)[1]["W1"].tolist() != b.gradients(**batch)[1]["W1"].tolist()


def test_the_file_is_an_npz_of_plain_arrays_and_a_json_header(saved):
    path, model = saved
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "header.json"}
    assert {k for k in arrays if k.startswith("params/")} == \
        {f"params/{p}" for p in model.graph.params}
    # the state slot by slot, by the module's own slot names: whatever the optimizer keeps
    assert {k for k in arrays if k.startswith("state/")} == \
        {f"state/{s}" for s in model.cmodule.state_offsets}
    assert arrays["state/step"].tolist() == [5.0]
    assert np.array_equal(arrays["params/W1"], model.get_params()["W1"])
    header = json.loads(zipfile.ZipFile(path).read("header.json"))
    assert {k: header[k] for k in ("format", "version", "dtype", "target", "baked_params")} == \
        {"format": "graphc-checkpoint", "version": 1, "dtype": "float32", "target": "host",
         "baked_params": False}
    assert header["spec"] == model.graph.to_spec()
    assert sum(size for _, size in state_slots(model.cmodule).values()) == \
        model.cmodule.state_size


def test_saving_the_same_state_twice_gives_the_same_bytes(saved, tmp_path):
    path, model = saved
    model.save(tmp_path / "again.graphc")
    assert (tmp_path / "again.graphc").read_bytes() == path.read_bytes()


def test_pickle_rebuilds_the_model_and_training_continues_alike(saved, batch):
    path, _ = saved
    model = graphc.load_model(path)
    copy = pickle.loads(pickle.dumps(model))
    assert copy is not model and copy.threads == model.threads
    assert np.array_equal(copy.forward(x=batch["x"])["logits"],
                          model.forward(x=batch["x"])["logits"])
    (loss, grads), (want_loss, want_grads) = copy.gradients(**batch), model.gradients(**batch)
    assert loss == want_loss and np.array_equal(grads["W1"], want_grads["W1"])
    assert [copy.train_step(**batch) for _ in range(3)] == \
        [model.train_step(**batch) for _ in range(3)]
    _same_state(copy, model)


def test_a_multiprocessing_pool_maps_over_models(saved, batch):
    path, _ = saved
    model = graphc.load_model(path)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outs = pool.map(operator.methodcaller("forward", x=batch["x"]), [model, model])
    want = model.forward(x=batch["x"])["logits"]
    assert all(np.array_equal(o["logits"], want) for o in outs)


def test_an_onnx_model_resumes_and_keeps_its_start_values(tmp_path):
    """An imported graph round-trips through its spec; its weights (Graph.initial, not part
    of a spec) are saved too, so init_params after a load starts from them again."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import graphc.onnx
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", size])
            for name, size in (("x", 4), ("y", 3)))
    gemm = helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)
    proto = helper.make_model(
        helper.make_graph([gemm], "g", [x], [y], [numpy_helper.from_array(w, "fc.weight")]),
        opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(proto, str(tmp_path / "fc.onnx"))
    model = graphc.compile(graphc.onnx.load(tmp_path / "fc.onnx", loss="mse"), optimizer="sgd")
    batch = {"x": rng.normal(size=(5, 4)), "target": rng.normal(size=(5, 3))}
    model.train_step(**batch)
    model.save(tmp_path / "fc.graphc")
    copy = graphc.load_model(tmp_path / "fc.graphc")
    assert copy.train_step(**batch) == model.train_step(**batch)
    _same_state(copy, model)
    copy.init_params(3)
    assert np.array_equal(copy.get_params()["fc_weight"], w)


def test_a_model_with_baked_params_and_no_optimizer_round_trips(saved, batch):
    model = graphc.compile(_graph(optimizer=False), params=saved[1].get_params())
    copy = pickle.loads(pickle.dumps(model))
    assert copy.cmodule.baked_params and copy.cmodule.state_size == 0
    assert np.array_equal(copy.predict(x=batch["x"])["logits"],
                          model.predict(x=batch["x"])["logits"])


def test_save_to_an_unwritable_place_is_one_error(saved, tmp_path):
    _, model = saved
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"cannot write checkpoint to .*file/run.graphc"):
        model.save(tmp_path / "file" / "run.graphc")
    target = tmp_path / "run.graphc"
    target.mkdir()
    with pytest.raises(InputError, match="cannot write checkpoint to"):
        model.save(target)
    assert [p.name for p in tmp_path.iterdir()] != [] and \
        not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- damaged and hostile files

def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _header(members, **changes) -> dict[str, bytes]:
    header = json.loads(members["header.json"])
    header.update(changes)
    return {**members, "header.json": json.dumps(header).encode()}


def _header_text(members, old: bytes, new: bytes) -> dict[str, bytes]:
    assert old in members["header.json"]
    return {**members, "header.json": members["header.json"].replace(old, new)}


def _spec(members, edit) -> dict[str, bytes]:
    header = json.loads(members["header.json"])
    edit(header["spec"])
    return {**members, "header.json": json.dumps(header).encode()}


def _without(members, name):
    return {k: v for k, v in members.items() if k != name}


def _claiming(shape) -> bytes:
    """An .npy member whose header claims `shape` of float32, with 32 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue() + bytes(32)


def _bomb(members):
    """params/W1 declaring 256 kB uncompressed (deflated to a few hundred bytes)."""
    return {**members, "params/W1.npy": (_npy(np.zeros(1 << 16, np.float32)), zipfile.ZIP_DEFLATED)}


HOSTILE = [   # (case, damage(members, raw bytes), what the error says)
    ("truncated", lambda m, raw: raw[:len(raw) // 2], "not an .npz file"),
    ("not a zip", lambda m, raw: b"name: ckpt\n", "not an .npz file"),
    ("no header", lambda m, raw: _without(m, "header.json"),
     "header.json: missing: not a graphc checkpoint"),
    ("format", lambda m, raw: _header(m, format="zip"),
     "field 'format': must be 'graphc-checkpoint'"),
    ("newer version", lambda m, raw: _header(m, version=2),
     "field 'version': version 2 is newer than this graphc reads (1)"),
    ("version type", lambda m, raw: _header(m, version="1"),
     "field 'version': must be a positive integer"),
    ("dtype", lambda m, raw: _header(m, dtype="float16"),
     "field 'dtype': must be one of float32, float64"),
    ("target", lambda m, raw: _header(m, target="../../etc"), "field 'target': must be one of"),
    ("extra field", lambda m, raw: _header(m, code="import os"), "field 'code': unknown field"),
    ("missing field", lambda m, raw: _header_text(m, b'"baked_params": false, ', b""),
     "field 'baked_params': missing"),
    ("duplicate key", lambda m, raw: {**m, "header.json": b'{"format": 1, "format": 2}'},
     "header.json: duplicate key 'format'"),
    ("NaN", lambda m, raw: _header_text(m, b'"lr": 0.01', b'"lr": NaN'),
     "header.json: NaN is not a valid number"),
    ("deep", lambda m, raw: {**m, "header.json": b"[" * 200_000}, "header.json: nested too deeply"),
    ("not text", lambda m, raw: {**m, "header.json": b"\xff\xfe"}, "header.json: not UTF-8 text"),
    ("bad model name", lambda m, raw: _spec(m, lambda s: s.update(name='x; system("rm")')),
     "header.json: spec: field 'name': model name 'x; system(\"rm\")' is not a valid identifier"),
    ("bad node name",
     lambda m, raw: _spec(m, lambda s: s["nodes"].update({"a b": {"op": "relu", "inputs": ["h"]}})),
     "header.json: spec: node 'a b': field 'nodes': node name 'a b' is not a valid identifier"),
    ("huge param", lambda m, raw: _spec(m, lambda s: s["params"]["W1"].update(shape=[1 << 40, 6])),
     "header.json: spec: node 'W1'"),
    ("wrong shape", lambda m, raw: {**m, "params/W1.npy": _npy(np.zeros((6, 8), np.float32))},
     "params/W1: must be float32 of shape (8, 6), got float32 (6, 8)"),
    ("wrong dtype", lambda m, raw: {**m, "params/W1.npy": _npy(np.zeros((8, 6)))},
     "params/W1: must be float32 of shape (8, 6)"),
    ("non-finite", lambda m, raw: {**m, "params/b1.npy": _npy(np.full(8, np.inf, np.float32))},
     "params/b1: holds non-finite values"),
    ("lying npy header", lambda m, raw: {**m, "params/b1.npy": _claiming((10 ** 13,))},
     "array 'params/b1': its header claims shape (10000000000000,)"),
    ("zip bomb", lambda m, raw: _bomb(m),
     "params/W1: must be float32 of shape (8, 6), but its member is 262272 bytes"),
    ("pickled array",
     lambda m, raw: {**m, "params/b1.npy": _npy(np.array([{}] * 8, object), allow_pickle=True)},
     "array 'params/b1': holds object values, not numbers"),
    ("missing param", lambda m, raw: _without(m, "params/b2.npy"),
     "params/b2: missing (model 'ckpt' has params"),
    ("unknown param", lambda m, raw: {**m, "params/W3.npy": _npy(np.zeros(2, np.float32))},
     "params/W3: unknown"),
    ("unknown member", lambda m, raw: {**m, "run.sh": b"rm -rf /"}, "member 'run.sh': unknown"),
    ("missing slot", lambda m, raw: _without(m, "state/exp_avg.npy"), "state/exp_avg: missing"),
    ("unknown slot", lambda m, raw: {**m, "state/velocity.npy": _npy(np.zeros(3, np.float32))},
     "state/velocity: unknown"),
    ("slot size", lambda m, raw: {**m, "state/exp_avg.npy": _npy(np.zeros(3, np.float32))},
     "state/exp_avg: must be float32 of shape (99,)"),
    ("step count", lambda m, raw: {**m, "state/step.npy": _npy(np.array([2.5], np.float32))},
     "state/step: must hold a step count"),
    ("negative lr", lambda m, raw: {**m, "state/lr.npy": _npy(np.array([-5], np.float32))},
     "state/lr: lr: must lie in [0, inf], got -5.0"),
    ("beta1 of 1", lambda m, raw: {**m, "state/one_minus_beta1.npy": _npy(np.zeros(1, np.float32))},
     "state/one_minus_beta1: betas: must lie in [0, 1), got 1.0"),
]


def _write(path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
        return
    with zipfile.ZipFile(path, "w") as z:
        for name, data in content.items():
            data, compression = data if isinstance(data, tuple) else (data, zipfile.ZIP_STORED)
            z.writestr(name, data, compress_type=compression)


@pytest.fixture
def no_unpickling(monkeypatch):
    """NumPy's readers are the route by which an .npy member gets unpickled: the checkpoint
    reader must not take it. (pickle itself stays: the build cache's own entries use it.)"""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint member went through NumPy's reader")
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(np.lib.format, "read_array", refuse)


@pytest.mark.parametrize("case, damage, message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_damaged_or_hostile_file_is_one_error_naming_the_file_and_field(
        saved, tmp_path, no_unpickling, case, damage, message):
    path, _ = saved
    bad = tmp_path / "bad.graphc"
    _write(bad, damage(_members(path), path.read_bytes()))
    with pytest.raises((InputError, SpecError)) as e:
        load_model(bad)
    assert str(bad) in str(e.value) and message in str(e.value), str(e.value)


# ---------------------------------------------------------------- the CLI

TOY = """\
name: toy
inputs: {x: [4], y: [3]}
params: {W: {shape: [3, 4]}, b: {shape: [3]}}
nodes:
  logits: {op: dense, inputs: [x, W, b]}
  drop: {op: dropout, inputs: [logits], p: 0.2}
  loss: {op: softmax_cross_entropy, inputs: [drop, y]}
outputs: [logits]
loss: loss
optimizer: {name: adam, lr: 0.05}
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A spec, data for it, and a checkpoint after two epochs of `graphc train --save`."""
    d = tmp_path_factory.mktemp("toy")
    (d / "toy.yaml").write_text(TOY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4))
    np.savez(d / "toy.npz", x=x, y=np.eye(3)[(x @ rng.standard_normal((4, 3))).argmax(1)])
    assert main(["train", str(d / "toy.yaml"), "--data", str(d / "toy.npz"), "--epochs", "2",
                 "--no-progress", "--save", str(d / "a.graphc")]) == 0
    return d


def test_train_save_then_resume_continues_the_run(toy, capsys):
    """Two more epochs from the checkpoint are two epochs of `fit` on the loaded model
    (the same split and shuffling): the step count and the optimizer state carry on."""
    from graphc.data import load_dataset, split
    assert main(["train", "--resume", str(toy / "a.graphc"), "--data", str(toy / "toy.npz"),
                 "--epochs", "2", "--no-progress", "--save", str(toy / "b.graphc")]) == 0
    out = capsys.readouterr().out
    assert f"resuming {toy / 'a.graphc'}: model 'toy' at step 4" in out
    assert f"wrote {toy / 'b.graphc'} (step 8;" in out
    model = load_model(toy / "a.graphc")
    train, _ = split(load_dataset(str(toy / "toy.npz"), model.graph), 0.2, 0)
    graphc.fit(model, train, epochs=2, batch_size=32, seed=0, progress=False)
    _same_state(load_model(toy / "b.graphc"), model)


def test_resume_with_the_same_spec_is_accepted(toy, capsys):
    assert main(["train", str(toy / "toy.yaml"), "--resume", str(toy / "a.graphc"), "--data",
                 str(toy / "toy.npz"), "--epochs", "1", "--no-progress"]) == 0
    assert "at step 4, lr 0.05" in capsys.readouterr().out


def test_resume_with_a_new_lr_keeps_the_moments(toy, tmp_path, capsys):
    """--lr on --resume sets the lr slot of the restored state; the moments carry on."""
    out = tmp_path / "c.graphc"
    assert main(["train", "--resume", str(toy / "a.graphc"), "--lr", "0.125", "--data",
                 str(toy / "toy.npz"), "--epochs", "1", "--no-progress", "--save", str(out)]) == 0
    assert "at step 4, lr 0.125" in capsys.readouterr().out
    before, after = load_model(toy / "a.graphc"), load_model(out)
    assert after.optimizer["lr"] == 0.125 and before.optimizer["lr"] == 0.05
    assert after.optimizer_state()["step"] == before.optimizer_state()["step"] + 2   # 2 batches


@pytest.mark.parametrize("spec_edit, flags, message", [
    (("shape: [3]}", "shape: [3], init: ones}"), [],
     "{spec}: node 'b': field 'params': differs from the model saved in {ckpt} (leave SPEC "
     "out to continue the checkpoint's model)"),
    (("lr: 0.05", "lr: 0.1"), [], "{spec}: node 'optimizer': field 'optimizer': differs"),
    (None, ["--clip-grad-norm", "1"], "--clip-grad-norm cannot be given with --resume"),
    (None, ["--optimizer", "sgd"], "--optimizer cannot be given with --resume"),
    (None, ["--dtype", "float64"], "--dtype float64: {ckpt} holds a float32 model"),
])
def test_resume_refuses_a_different_model_or_optimizer(toy, tmp_path, capsys, spec_edit, flags,
                                                       message):
    spec, ckpt = tmp_path / "other.yaml", toy / "a.graphc"
    spec.write_text(TOY.replace(*spec_edit) if spec_edit else TOY)
    assert main(["train", str(spec), "--resume", str(ckpt), "--data", str(toy / "toy.npz"),
                 "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(spec=spec, ckpt=ckpt) in err, err


def test_train_without_spec_or_resume_and_a_bad_checkpoint_are_one_line(toy, tmp_path, capsys):
    assert main(["train", "--data", str(toy / "toy.npz")]) == 2
    assert "give the SPEC to train, or --resume RUN.graphc" in capsys.readouterr().err
    bad = tmp_path / "bad.graphc"
    bad.write_bytes((toy / "a.graphc").read_bytes()[:200])
    assert main(["train", "--resume", str(bad), "--data", str(toy / "toy.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"graphc: error: cannot read checkpoint from {bad}") and \
        err.count("\n") == 1
