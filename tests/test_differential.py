"""Differential test: random graphs compiled by graphc (float64 C) against PyTorch autograd.

Each seed gives a random spec (tests/torch_graphs.py: every op of graphc.ops.OPS, every
formula function, constant and operator, broadcasting, concat, values used twice, random
declaration order), random inputs and graphc's own initial params. The same graph is run
by PyTorch in float64, one example at a time, with the loss the mean over the batch and
the param gradients from autograd. Every output (forward and evaluate), the batch-mean
loss (gradients and evaluate) and every param gradient must agree element by element:
|graphc - torch| <= 1e-8 * max(1, |torch|). graphc's NumPy reference is held to the same.

Then one input element of example 0 is made NaN: the outputs must be NaN exactly where
torch's are (unless SymPy simplifies an input away, as in x - x). A second family puts
swish, mish, gelu, softplus, sigmoid, log_softmax, ... at |h| in the hundreds and
thousands, where float32's (and float64's) exp overflows.

A failure prints the seed, what differs by how much, the command that reproduces it
(`python tests/torch_graphs.py SEED`; `--shrink SEED` finds a smaller failing spec) and
the spec as YAML.

Always run (about 15 s): 10 random graphs and one extreme-activation graph in float32.
Marked slow, and collected only when selected (300 random graphs, and 30 extreme graphs in
float64 and float32; GRAPHC_DIFFERENTIAL_GRAPHS=N for N random graphs and N/10 extreme):

    python -m pytest tests/test_differential.py -m slow
    GRAPHC_DIFFERENTIAL_GRAPHS=2000 python -m pytest tests/test_differential.py -m slow
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_graphs as tg  # noqa: E402

import graphc  # noqa: E402
from graphc.formula import CONSTANTS, FUNCTIONS  # noqa: E402
from graphc.ops import OPS  # noqa: E402

FAST_SEEDS = (*range(11), 12)   # seeds < 1000: tg.SMALL_STEPS random op steps, ~1 s each
# (0-9 hold every op between them, tg.OPS_PER_SEED each; 12 also has a concat into a dense)
FAST_EXTREME_SEEDS = range(1)   # swish, mish, gelu, softplus, ... in float32 (7 of 27)
SLOW_FIRST_SEED = 1000          # seeds >= 1000: tg.LARGE_STEPS
SLOW_COUNT = int(os.environ.get("GRAPHC_DIFFERENTIAL_GRAPHS", "300"))
SLOW_EXTREME_COUNT = max(3, SLOW_COUNT // 10)


def _slow_selected(config) -> bool:
    expr = config.getoption("markexpr", "") or ""
    return ("slow" in expr and "not slow" not in expr) or "GRAPHC_DIFFERENTIAL_GRAPHS" in os.environ


def pytest_generate_tests(metafunc):
    # The slow seeds are only collected when asked for (-m slow, or the count set), so
    # that a plain run lists one skipped test per slow family instead of hundreds.
    for name, seeds in (("slow_seed", range(SLOW_FIRST_SEED, SLOW_FIRST_SEED + SLOW_COUNT)),
                        ("slow_extreme_seed", range(len(FAST_EXTREME_SEEDS),
                                                    len(FAST_EXTREME_SEEDS) + SLOW_EXTREME_COUNT))):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, seeds if _slow_selected(metafunc.config) else [None])


def _skip_unless_selected(seed):
    if seed is None:
        pytest.skip(f"{SLOW_COUNT} more random graphs: run with -m slow "
                    "(GRAPHC_DIFFERENTIAL_GRAPHS=N sets how many)")


def check_seed(seed: int) -> None:
    case, inputs, rng = tg.find_case(seed)
    problems, what = tg.check_case(case, inputs, rng)
    assert not problems, tg.report(case, problems, note=what)


def check_extreme(seed: int, dtype: str) -> None:
    case, problems = tg.check_extreme_case(seed, dtype)
    flag = " --float32" if dtype == "float32" else ""
    assert not problems, tg.report(case, problems, dtype=dtype, note=" (extreme activations)",
                                   repro=f"python tests/torch_graphs.py --extreme {seed}{flag}")


# ---------------------------------------------------------------- the generator itself

def test_generator_knows_every_op_and_formula_item():
    """A new op or formula function must be added to the generator (torch_graphs.py)."""
    assert set(tg.OP_NAMES) | set(tg.LOSS_OPS) == set(OPS)
    assert set(tg.FORMULA_FUNCTIONS) == set(FUNCTIONS)
    assert set(tg.FORMULA_CONSTANTS) == set(CONSTANTS)


def _coverage(specs) -> dict[str, set]:
    """What the specs exercise: ops, formula functions, constants and operators, and
    structural features (shapes from graphc's own shape inference)."""
    import ast
    from collections import Counter
    seen = {"ops": set(), "functions": set(), "constants": set(), "operators": set(),
            "features": set()}
    binops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
    for spec in specs:
        values = graphc.Graph.from_spec(spec).values
        uses = Counter(i for d in spec["nodes"].values() for i in d["inputs"])
        for name, d in spec["nodes"].items():
            ins = [values[i] for i in d["inputs"]]
            out = values[name]
            seen["ops"].add(d["op"])
            if len(d["inputs"]) != len(set(d["inputs"])):
                seen["features"].add("a value used twice by one node")
            if uses[name] >= 2:
                seen["features"].add("a node with two consumers")
            if not out.batched:
                seen["features"].add("a node computed from params only")
            if d["op"] in ("add", "sub", "mul", "div", "elementwise"):
                if any(v.kind == "param" for v in ins) and out.batched:
                    seen["features"].add("a param broadcast across the batch")
                if sum(v.shape != out.shape for v in ins) >= 2 and all(
                        math.prod(v.shape) < math.prod(out.shape) for v in ins):
                    seen["features"].add("operands expanding each other ([3, 1] and [1, 4])")
            if d["op"] == "concat":
                seen["features"].add("concat")
                if any(values[c].op == "dense" for c in spec["nodes"]
                       if name in spec["nodes"][c]["inputs"]):
                    seen["features"].add("concat into a dense")
            if d["op"] == "elementwise":
                for n in ast.walk(ast.parse(d["expr"], mode="eval")):
                    if isinstance(n, ast.Call):
                        seen["functions"].add(n.func.id)
                    elif isinstance(n, ast.Name) and n.id in CONSTANTS \
                            and n.id not in d["inputs"]:
                        seen["constants"].add(n.id)
                    elif isinstance(n, ast.BinOp):
                        seen["operators"].add(binops[type(n.op)])
                    elif isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
                        seen["operators"].add("neg")
    return seen


FEATURES = {"concat", "concat into a dense", "a value used twice by one node",
            "a node with two consumers", "a node computed from params only",
            "a param broadcast across the batch",
            "operands expanding each other ([3, 1] and [1, 4])"}


def test_generator_covers_everything_in_the_fast_set():
    """The always-run seeds use every op, formula function, constant and operator, and
    the structures above; a random declaration order too (checked for one seed)."""
    specs = [tg.find_case(seed)[0].spec for seed in FAST_SEEDS]
    seen = _coverage(specs)
    assert seen["ops"] == set(OPS), sorted(set(OPS) - seen["ops"])
    assert seen["functions"] == set(FUNCTIONS), sorted(set(FUNCTIONS) - seen["functions"])
    assert seen["constants"] == set(CONSTANTS), sorted(set(CONSTANTS) - seen["constants"])
    assert seen["operators"] == set(tg.FORMULA_OPERATORS), \
        sorted(set(tg.FORMULA_OPERATORS) - seen["operators"])
    assert FEATURES <= seen["features"], sorted(FEATURES - seen["features"])
    order = list(specs[0]["nodes"])
    topo = tg.topological(specs[0]["nodes"])
    assert order != topo   # declared out of dependency order


def test_generator_is_reproducible():
    a, b = tg.generate(7), tg.generate(7)
    assert a.spec == b.spec and list(a.spec["nodes"]) == list(b.spec["nodes"])
    assert tg.generate(8).spec != a.spec


def test_torch_evaluator_on_a_known_graph():
    """The oracle itself, on a graph whose gradient is known in closed form."""
    spec = {"name": "known", "inputs": {"x": [3], "y": [2]},
            "params": {"W": {"shape": [2, 3]}, "c": [2]},
            "nodes": {"h": {"op": "dense", "inputs": ["x", "W", "c"]},
                      "l": {"op": "mse", "inputs": ["h", "y"]}},
            "outputs": ["h"], "loss": "l"}
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    W, c = rng.normal(size=(2, 3)), rng.normal(size=2)
    ref = tg.torch_evaluate(spec, {"x": X, "y": Y}, {"W": W, "c": c})
    H = X @ W.T + c
    R = (H - Y) / Y.size * 2          # d mean_b mean_o (h - y)^2 / dh
    np.testing.assert_allclose(ref.outputs["h"], H, rtol=1e-14)
    np.testing.assert_allclose(ref.loss, ((H - Y) ** 2).mean(), rtol=1e-14)
    np.testing.assert_allclose(ref.grads["W"], R.T @ X, rtol=1e-12)
    np.testing.assert_allclose(ref.grads["c"], R.sum(0), rtol=1e-12)


# ---------------------------------------------------------------- integer inputs

# An embedding (2-D indices, a row read many times, the first and the last row) into a
# class-index cross-entropy over two positions and one over the example, against
# F.embedding and F.cross_entropy with integer targets.
INDICES_SPEC = {
    "name": "tokens", "inputs": {"tok": {"shape": [2, 5], "dtype": "int32"},
                                 "pos": {"shape": [2], "dtype": "int32"},
                                 "label": {"shape": [], "dtype": "int32"}},
    "params": {"E": {"shape": [7, 3], "init": "normal"},
               "W": {"shape": [4, 15], "init": "glorot_uniform"}, "b": [4],
               "V": {"shape": [6, 3], "init": "glorot_uniform"}},
    "nodes": {"emb": {"op": "embedding", "inputs": ["tok", "E"]},
              "flat": {"op": "reshape", "inputs": ["emb"], "shape": [2, 15]},
              "h": {"op": "dense", "inputs": ["flat", "W", "b"]},
              "a": {"op": "tanh", "inputs": ["h"]},
              "per_pos": {"op": "softmax_cross_entropy", "inputs": ["a", "pos"]},
              "l1": {"op": "mean", "inputs": ["per_pos"]},
              "rows": {"op": "embedding", "inputs": ["label", "V"]},
              "zt": {"op": "dense", "inputs": ["emb", "V"]},
              "s": {"op": "sum", "inputs": ["zt"], "axis": [0, 1]},
              "l2": {"op": "softmax_cross_entropy", "inputs": ["s", "label"]},
              "loss": {"op": "add", "inputs": ["l1", "l2"]}},
    "outputs": ["h", "s", "rows"], "loss": "loss"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_embedding_and_class_indices_match_torch(dtype):
    case = tg.case_from_spec(INDICES_SPEC, batch=5)
    assert case.input_kinds == {"tok": "index:7", "pos": "index:4", "label": "index:6"}
    inputs = tg.draw_inputs(case, np.random.default_rng(3))
    assert {0, 6} <= set(inputs["tok"].ravel().tolist()) and inputs["tok"].dtype == np.int32
    model = tg.compile_strict(case.spec, dtype)
    if dtype == "float32":
        problems = tg.check_model(model, case.spec, inputs, rtol=tg.FLOAT32_RTOL,
                                  per_array=True, reference=False)
    else:
        problems = tg.check_model(model, case.spec, inputs)
    assert not problems, tg.report(case, problems, dtype=dtype)


# ---------------------------------------------------------------- graphc against torch

@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_random_graph_matches_torch(seed):
    check_seed(seed)


@pytest.mark.parametrize("seed", FAST_EXTREME_SEEDS)
def test_extreme_activations_match_torch_in_float32(seed):
    check_extreme(seed, "float32")


@pytest.mark.slow
def test_many_random_graphs_match_torch(slow_seed):
    _skip_unless_selected(slow_seed)
    check_seed(slow_seed)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_extreme_activations_match_torch(slow_extreme_seed, dtype):
    _skip_unless_selected(slow_extreme_seed)
    check_extreme(slow_extreme_seed, dtype)
