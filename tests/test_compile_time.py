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
