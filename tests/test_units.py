"""graphc's own build of a big module as several translation units (codegen/units.py): the
same functions, compiled apart, compute the same bits as the one file users get."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import graphc
from codegen import build as B
from codegen.units import _chunks, split

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "digits_cnn.yaml"


@pytest.fixture(scope="module")
def cmodule():
    return graphc.generate(SPEC, target="host")[1]


def test_units_hold_every_function_once_and_the_entries_first(cmodule):
    source = cmodule.source
    assert "\n".join(c.text for c in _chunks(source)) == source   # nothing lost or moved
    units = split(source, "digits_cnn", 2)
    assert len(units) == 2

    def defined(text):
        return re.findall(r"^(?:static )?\w+ (\w+)\([^;]*?\n\{", text, re.M | re.S)
    whole = defined(source)
    kernels = [f for f in whole if not f.startswith("digits_cnn_")]
    first, second = defined(units[0]), defined(units[1])
    # Entry points in the first unit only; every kernel in exactly one unit, except the
    # static helpers (relu, the tile sums) that both units call.
    assert [f for f in first if f.startswith("digits_cnn_")] == \
        [f for f in whole if f.startswith("digits_cnn_")]
    assert not [f for f in second if f.startswith("digits_cnn_")]
    assert set(first) | set(second) == set(whole)
    shared = set(first) & set(second)
    assert shared and all(not f.endswith(("_forward", "_grad")) for f in shared)
    # What the second unit defines for the first is external there and declared here.
    called = [f for f in second if f in kernels and f not in shared
              and re.search(rf"\b{f}\(", units[0])]
    assert called
    for f in called:
        assert re.search(rf"^void {f}\(", units[1], re.M)
        assert re.search(rf"^void {f}\([^{{]*?\);", units[0], re.M | re.S)
    assert split(source, "digits_cnn", 1) == [source]


def run(model, n):
    rng = np.random.default_rng(n)
    x = rng.random((n, 1, 8, 8))
    y = np.eye(10)[rng.integers(0, 10, n)]
    return model.forward(x=x)["logits"], *model.gradients(x=x, y=y)


def test_units_compute_the_same_bits(cmodule, tmp_path, monkeypatch):
    results = []
    for count in (1, 2):
        monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / str(count)))
        monkeypatch.setattr(B, "_unit_count", lambda source, count=count: count)
        # Warnings as errors: no unit warns of what it leaves unused.
        built = B.build("digits_cnn", cmodule.source, cmodule.header, cmodule.cdef,
                        extra_flags=("-Wall", "-Wextra", "-Werror"))
        assert not built.cached
        model = graphc.model.CompiledModel(graphc.load(SPEC), cmodule, built, seed=1)
        results.append([run(model, n) for n in (1, 5)])
    for (logits1, loss1, grads1), (logits2, loss2, grads2) in zip(*results):
        assert np.array_equal(logits1, logits2) and loss1 == loss2
        assert grads1.keys() == grads2.keys()
        assert all(np.array_equal(grads1[p], grads2[p]) for p in grads1)


def test_c_not_in_the_emitters_layout_stays_one_unit():
    source = '#include "tiny.h"\nint tiny_add(int a, int b) { return a + b; }\n'
    assert split(source, "tiny", 2) == [source]
