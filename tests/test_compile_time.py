"""What keeps compile time flat in layer width: a wider convolutional net prints the same
C, line for line, with other numbers (its kernels call helpers shared by tile shape, which
take the channel counts as arguments: codegen/tiles.py)."""

from __future__ import annotations

import copy
import pathlib

import yaml

import graphc

SPEC = yaml.safe_load((pathlib.Path(__file__).resolve().parents[1] / "examples" /
                       "digits_cnn.yaml").read_text())


def _c(c1: int, c2: int):
    spec = copy.deepcopy(SPEC)
    p = spec["params"]
    p["K1"]["shape"], p["c1"]["shape"] = [c1, 1, 3, 3], [c1]
    p["K2"]["shape"], p["c2"]["shape"] = [c2, c1, 3, 3], [c2]
    p["W"]["shape"] = [10, c2 * 4]
    return graphc.generate(graphc.Graph.from_spec(spec), target="c99")[1]


def test_twice_the_channels_print_the_same_lines():
    narrow, wide = _c(16, 32), _c(32, 64)
    assert narrow.source != wide.source
    assert narrow.source.count("\n") == wide.source.count("\n")
    assert list(narrow.functions) == list(wide.functions)
    assert [t.count("\n") for t in narrow.functions.values()] == \
        [t.count("\n") for t in wide.functions.values()]


# Three dense layers: the second is the first under other names (it prints nothing new), the
# third differs in its sizes only, and its names sort otherwise (its params after its input).
REPEATED = {
    "name": "repeated",
    "inputs": {"x": [8], "y": [4]},
    "params": {"W1": [8, 8], "b1": [8], "W2": [8, 8], "b2": [8], "zw": [4, 8], "zb": [4]},
    "nodes": {
        "h1": {"op": "dense", "inputs": ["x", "W1", "b1"]},
        "s1": {"op": "elementwise", "inputs": ["h1"], "expr": "h1 * tanh(exp(h1))"},
        "h2": {"op": "dense", "inputs": ["s1", "W2", "b2"]},
        "s2": {"op": "elementwise", "inputs": ["h2"], "expr": "h2 * tanh(exp(h2))"},
        "z3": {"op": "dense", "inputs": ["s2", "zw", "zb"]},
        "loss": {"op": "mse", "inputs": ["z3", "y"]},
    },
    "outputs": ["z3"],
    "loss": "loss",
}


def test_kernels_of_one_structure_print_once_and_as_before(monkeypatch):
    """The emitter prints a kernel once per structure (codegen/emit.py: structure); the C
    is the same as when every kernel is printed."""
    import codegen.emit as emit
    keys = []
    structure = emit.structure

    def spy(*args):
        keys.append(structure(*args))
        return keys[-1]

    for target in ("c99", "host"):
        keys.clear()
        monkeypatch.setattr(emit, "structure", spy)
        remembered = graphc.generate(graphc.Graph.from_spec(REPEATED), target=target)[1]
        assert len(set(keys)) < len(keys)   # some kernel was not printed again
        monkeypatch.setattr(emit, "structure", lambda *args: object())   # never the same
        printed = graphc.generate(graphc.Graph.from_spec(REPEATED), target=target)[1]
        assert remembered.source == printed.source
        assert remembered.header == printed.header
