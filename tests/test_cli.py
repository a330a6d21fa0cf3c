"""The command line: outputs, exit codes, and errors as one line naming file, node, field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
