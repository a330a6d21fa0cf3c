"""The command line: outputs, exit codes, and errors as one line naming file, node, field."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphc
from codegen.printer import c_literal
from graphc.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_compile_writes_the_files_and_prints_sizes(tmp_path, capsys):
    assert main(["compile", str(ROOT / "examples/mlp.yaml"), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "mlp.c").exists() and (tmp_path / "mlp.h").exists()
    assert "params     2410 elements, 9640 bytes" in out
    assert "arena" in out and "without reuse" in out


def test_compile_float64_uses_double(tmp_path, capsys):
    assert main(["compile", str(ROOT / "examples/regression.yaml"), "-o", str(tmp_path),
                 "--dtype", "float64"]) == 0
    assert "double regression_gradients(" in (tmp_path / "regression.h").read_text()


def test_check_passes_on_an_example(capsys):
    assert main(["check", str(ROOT / "examples/regression.yaml"), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("all checks passed") == 2 and "d loss/d W3" in out


def test_check_exits_1_on_a_mismatch(monkeypatch, capsys):
    from graphc.reference import Reference
    real = Reference.forward

    def wrong(self, **inputs):
        return {k: v + 1.0 for k, v in real(self, **inputs).items()}
    monkeypatch.setattr(Reference, "forward", wrong)
    assert main(["check", str(ROOT / "examples/regression.yaml"), "--dtype", "float64"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


BAD = """\
name: broken
inputs: {x: [4]}
params: {W: {shape: [3, 5]}}
nodes:
  h: {op: dense, inputs: [x, W]}
outputs: [h]
"""


def test_user_error_exits_2_with_one_line_and_writes_nothing(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text(BAD)
    out_dir = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "graphc", "compile", str(spec), "-o", str(out_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"{spec}: node 'h': field 'inputs': input's last dimension 4" in r.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("text, expected", [
    ("name: a\nnodes: {h: {op: nope, inputs: []}}\n", "node 'h': field 'op': unknown op 'nope'"),
    ("name: a\ninputs: {x: [2]}\nnodes:\n  h: {op: relu, inputs: [x]}\n  h: {op: tanh, inputs: [x]}\n",
     "duplicate key 'h'"),
    ("name: a\ninputs: {x: [2]}\nnodes: {h: {op: relu, inputs: [x]}}\noutputs: [h]\nloss: h\n",
     "node 'h': field 'loss': the loss must be a per-example scalar"),
    ("[1, 2", "invalid YAML"),
])
def test_check_reports_spec_errors(tmp_path, capsys, text, expected):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    assert main(["check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"graphc: error: {spec}") and expected in err


def test_unwritable_output_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compile", str(ROOT / "examples/mlp.yaml"), "-o", str(blocker / "sub")]) == 2
    assert "cannot write to" in capsys.readouterr().err


# ---------------------------------------------------------------- train, compile --params

TOY = """\
name: toy
inputs: {x: [4], y: [3]}
params: {W: {shape: [3, 4]}, b: {shape: [3]}}
nodes:
  logits: {op: dense, inputs: [x, W, b]}
  loss: {op: softmax_cross_entropy, inputs: [logits, y]}
outputs: [logits]
loss: loss
"""


@pytest.fixture
def toy(tmp_path):
    """A spec without an optimizer section, and an .npz of learnable data for it."""
    spec = tmp_path / "toy.yaml"
    spec.write_text(TOY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 4))
    np.savez(tmp_path / "toy.npz", x=x, y=np.eye(3)[(x @ rng.standard_normal((4, 3))).argmax(1)])
    return spec, tmp_path / "toy.npz"


def test_train_on_npz_data_writes_loadable_params(toy, tmp_path, capsys):
    spec, data = toy
    out = tmp_path / "new" / "dir" / "toy.npz"
    assert main(["train", str(spec), "--data", str(data), "--epochs", "30", "--lr", "0.05",
                 "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no optimizer in the spec or on the command line: using adam" in text
    m = re.search(r"test loss [\d.]+, accuracy ([\d.]+)% on 23 held-out examples after 30 epochs", text)
    assert m and float(m.group(1)) >= 85, text
    params = graphc.load_params(out, graphc.load(spec))
    assert params["W"].shape == (3, 4) and params["W"].dtype == np.float32


def test_train_progress_goes_to_stderr(toy, capsys):
    spec, data = toy
    assert main(["train", str(spec), "--data", str(data), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "epoch 1/2" not in captured.out


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("data, message", [
    (lambda d: "nope", "unknown data set 'nope': give 'digits' or a .npz file"),
    (lambda d: str(d / "missing.npz"), "missing.npz: No such file"),
    (lambda d: _npz(d / "names.npz", x=np.zeros((5, 4)), label=np.zeros((5, 3))),
     "names.npz: unknown input 'label' (this model's inputs: x, y)"),
    (lambda d: _npz(d / "shape.npz", x=np.zeros((5, 5)), y=np.zeros((5, 3))),
     "shape.npz: input 'x' must have shape (n, 4)"),
    (lambda d: _npz(d / "length.npz", x=np.zeros((5, 4)), y=np.zeros((6, 3))),
     "length.npz: input 'y' has batch size 6, but 'x' has 5"),
    (lambda d: "digits", "the digits data set does not fit input 'x' of shape [4]"),
])
def test_train_data_errors_exit_2_with_one_line(toy, tmp_path, capsys, data, message):
    spec, _ = toy
    assert main(["train", str(spec), "--data", data(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphc: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--test-fraction", "1.5"], "test fraction must lie strictly between 0 and 1"),
    (["--validation-split", "0"], "--validation-split must lie strictly between 0 and 1, got 0.0"),
    (["--lr-schedule", "cosine"], "--lr-schedule cosine: missing field 'T_max'"),
    (["--lr-schedule", "step:step_size=2,gama=0.5"], "--lr-schedule step: unknown field 'gama' "
                                                     "(its fields: step_size, gamma)"),
    (["--lr-schedule", "plateau:mode=up"], "--lr-schedule plateau: ReduceLROnPlateau: mode "
                                           "must be 'min' or 'max', got 'up'"),
])
def test_train_flag_errors_exit_2(toy, capsys, flags, message):
    spec, data = toy
    assert main(["train", str(spec), "--data", str(data), "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err


def test_train_with_a_validation_split_and_a_schedule(toy, capsys, monkeypatch):
    """The rates the schedule sets (a spy on `set_lr`, which then sets them)."""
    from graphc.model import CompiledModel
    rates, set_lr = [], CompiledModel.set_lr
    monkeypatch.setattr(CompiledModel, "set_lr",
                        lambda self, lr: (rates.append(lr), set_lr(self, lr))[1])
    spec, data = toy
    # 120 examples: 97 train after the test split, of which the last 25% validate: int(72.75)
    # train, in 3 batches of 32 an epoch
    assert main(["train", str(spec), "--data", str(data), "--epochs", "2", "--no-progress",
                 "--lr", "0.01", "--validation-split", "0.25",
                 "--lr-schedule", "onecycle:max_lr=0.1,pct_start=0.5"]) == 0
    out = capsys.readouterr().out
    assert "learning rate: OneCycleLR(max_lr=0.1, total_steps=6, epochs=2, steps_per_epoch=3" \
        in out and "stepped each batch" in out
    assert re.search(r"validation loss [\d.]+, accuracy [\d.]+% after the last epoch", out), out
    assert len(rates) == 6 and rates[0] == pytest.approx(0.1 / 25) and max(rates) == 0.1


def test_train_digits_reaches_96_percent(tmp_path, capsys):
    """With one-hot labels, and with class indices (examples/digits_labels.yaml: the label
    an int32 input of shape []): the same split, the same steps, the same test loss and
    accuracy."""
    pytest.importorskip("sklearn")
    results = []
    for spec in ("digits/spec.yaml", "digits_labels.yaml"):
        assert main(["train", str(ROOT / "examples" / spec), "--data", "digits",
                     "--no-progress"]) == 0
        out = capsys.readouterr().out
        m = re.search(r"test loss ([\d.]+), accuracy ([\d.]+)% on 359 held-out examples "
                      r"after 20 epochs", out)
        assert m and float(m.group(2)) >= 96, out
        results.append(m.groups())
    assert results[0] == results[1]


CC = os.environ.get("CC", "cc")


def test_compile_with_params_bakes_them_into_strict_c99(tmp_path, capsys):
    spec = ROOT / "examples/digits/spec.yaml"
    model = graphc.compile(spec, seed=4)
    model.save_params(tmp_path / "p.npz")
    assert main(["compile", str(spec), "-o", str(tmp_path / "c"), "--params",
                 str(tmp_path / "p.npz")]) == 0
    out = capsys.readouterr().out
    assert "baked in as a static const array; digits_predict runs" in out
    source = (tmp_path / "c" / "digits.c").read_text()
    assert "static const float" in source and "digits_predict(" in source
    w1 = model.get_params()["W1"]
    assert c_literal(w1[0, 0], "float32") in source  # these params, not an initializer's
    if shutil.which(CC) is None:
        pytest.skip("no C compiler")
    r = subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-c",
                        "digits.c", "-o", "digits.o"], cwd=tmp_path / "c", capture_output=True,
                       text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_compile_with_params_of_another_model_exits_2(tmp_path, capsys):
    graphc.compile(ROOT / "examples/regression.yaml").save_params(tmp_path / "p.npz")
    assert main(["compile", str(ROOT / "examples/digits/spec.yaml"), "-o", str(tmp_path / "c"),
                 "--params", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert "p.npz: " in err and "model 'digits' has params: W1, b1, W2, b2" in err
    assert not (tmp_path / "c").exists()


def test_compile_writes_its_three_files_or_none(tmp_path):
    """A directory that cannot take the files gets none of them: no .c without its .h
    or its memory report."""
    blocked = tmp_path / "out"
    blocked.mkdir()
    (blocked / "mlp.memory.json").mkdir()   # a directory where the report must go
    r = subprocess.run([sys.executable, "-m", "graphc", "compile", str(ROOT / "examples/mlp.yaml"),
                        "-o", str(blocked)], capture_output=True, text=True)
    assert r.returncode == 2 and "mlp.memory.json: a directory is in the way; nothing written" in r.stderr
    assert sorted(p.name for p in blocked.iterdir()) == ["mlp.memory.json"]


# ---------------------------------------------------------------- --version, a quick --help

def test_version_prints_the_package_version():
    r = subprocess.run([sys.executable, "-m", "graphc", "--version"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout == f"graphc {graphc.__version__}\n" and not r.stderr


HELP_IMPORTS = """
import sys
from graphc.cli import main
for argv in (["--help"], ["--version"], *([c, "--help"] for c in {commands})):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print(" ".join(sorted(m for m in ("sympy", "numpy", "networkx", "cffi", "yaml", "tqdm")
                      if m in sys.modules)) or "none")
"""


def test_help_imports_no_sympy_or_numpy():
    """`graphc --help` took 1.5 s, nearly all of it importing SymPy: the help of every
    command must load none of the pipeline (measured by what is imported, not by time)."""
    commands = ["compile", "check", "train", "import", "export", "explain"]
    r = subprocess.run([sys.executable, "-c", HELP_IMPORTS.format(commands=commands)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "none"
    for command in commands:   # each one's help was printed
        assert f"usage: graphc {command}" in r.stdout
