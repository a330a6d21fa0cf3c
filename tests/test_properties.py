"""Property tests over random small graphs.

A random DAG of 2-6 op nodes over a batched input x: unary maps (relu, leaky_relu, sigmoid,
tanh, exp of a tanh, smooth elementwise formulas), broadcasting add/sub/mul with existing
values or new params, dense, sum/mean, and two-input formulas. Each value no node consumes
(`out`) ends in a per-example scalar sum(mul(out, c_out)) with a random cotangent input
c_out; the loss is their sum. Kinks are avoided by construction: relu and leaky_relu only
ever see values bounded away from 0.

Properties:
(a) the C gradients (float64) equal the reference's within 1e-9, relative (three graphs side
    by side per model, to share a build);
(b) the reference's gradients pass graphc.verify.finite_difference_check;
(c) generating the C twice gives byte-identical text, also in another process with another
    hash seed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc
from graphc.reference import reference
from graphc.verify import finite_difference_check

from conftest import compile_strict

ROOT = Path(__file__).resolve().parents[1]
PROPERTY_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])
FD_RTOL = 1e-6

# Smooth one- and two-input formulas; {a}, {b} are value names.
UNARY_FORMULAS = ("{a} * sigmoid({a})", "{a} * tanh(softplus({a}))", "sin({a}) + {a} * {a} / 4",
                  "{a} / (1 + {a} * {a})", "log(1 + {a} * {a})", "{a} ** 3 / 3 - {a}")
BINARY_FORMULAS = ("{a} * {b} + tanh({b})", "{a} / (1 + {b} * {b})", "exp(-{a} * {a}) * {b}")


# ---------------------------------------------------------------- the random graph

class HypothesisChooser:
    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def choice(self, seq):
        return self.draw(st.sampled_from(list(seq)))


class RandomChooser:
    """The same choices from a seeded `random.Random`, for tests outside hypothesis."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return self.rng.choice(list(seq))


def _broadcast(a, b):
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def random_spec(choose, name="prop", prefix: str = "") -> dict:
    """A spec of a random DAG; see the module docstring. Every name starts with `prefix`."""
    shapes: dict[str, tuple] = {}
    positive: set[str] = set()      # values known to be > 0 (away from relu's kink)
    from_tanh: set[str] = set()     # values in (-1, 1): exp of them stays bounded
    nodes: dict[str, dict] = {}
    params: dict[str, list] = {}
    x, loss = f"{prefix}x", f"{prefix}loss"
    x_shape = tuple(choose.integer(1, 3) for _ in range(choose.integer(1, 2)))
    shapes[x] = x_shape
    counter = iter(range(1000))

    def node(op, inputs, shape, **attrs):
        n = f"{prefix}n{next(counter)}"
        nodes[n] = {"op": op, "inputs": list(inputs), **attrs}
        shapes[n] = tuple(shape)
        return n

    def param(shape):
        p = f"{prefix}P{len(params)}"
        params[p] = list(shape)
        shapes[p] = tuple(shape)
        return p

    def param_like(shape):
        """A new param that broadcasts against `shape`: some axes 1, maybe fewer or more."""
        s = [d if choose.integer(0, 2) else 1 for d in shape]
        how = choose.integer(0, 3)
        if how == 1:    # fewer axes (aligned on the right)
            s = s[choose.integer(0, len(s)):]
        elif how == 2:  # one more, leading axis: a param of higher rank than the value
            s = [choose.integer(1, 2)] + s
        return param(s)

    def away_from_zero(v):
        if v in positive:
            return v
        shift = choose.choice(["+", "-"])
        return node("elementwise", [v], shapes[v], expr=f"tanh({v}) {shift} 1.5")

    values = [x]
    for _ in range(choose.integer(2, 6)):
        v = values[-1] if choose.integer(0, 1) else choose.choice(values)  # chains, and forks
        s = shapes[v]
        kind = choose.choice(["unary", "unary", "binary", "binary", "dense", "reduce",
                              "formula2"])
        if kind == "unary":
            op = choose.choice(["relu", "leaky_relu", "sigmoid", "tanh", "exp", "formula"])
            if op in ("relu", "leaky_relu"):
                attrs = {"alpha": choose.choice([0.01, 0.2])} if op == "leaky_relu" else {}
                out = node(op, [away_from_zero(v)], s, **attrs)
            elif op == "exp":
                t = v if v in from_tanh else node("tanh", [v], s)
                out = node("exp", [t], s)
                positive.add(out)
            elif op == "formula":
                out = node("elementwise", [v], s, expr=choose.choice(UNARY_FORMULAS).format(a=v))
            else:
                out = node(op, [v], s)
                (positive if op == "sigmoid" else from_tanh).add(out)
        elif kind in ("binary", "formula2"):
            others = [w for w in values if _broadcast(shapes[w], s) is not None]
            w = choose.choice(others) if choose.integer(0, 1) else param_like(s)
            a, b = (v, w) if choose.integer(0, 1) else (w, v)
            shape = _broadcast(shapes[a], shapes[b])
            if kind == "binary":
                out = node(choose.choice(["add", "sub", "mul"]), [a, b], shape)
            elif a == b:
                expr = choose.choice(UNARY_FORMULAS).format(a=a)
                out = node("elementwise", [a], shape, expr=expr)
            else:
                expr = choose.choice(BINARY_FORMULAS).format(a=a, b=b)
                out = node("elementwise", [a, b], shape, expr=expr)
        elif kind == "dense" and s:
            o = choose.integer(1, 3)
            W = param([o, s[-1]])
            ins = [v, W] + ([param([o])] if choose.integer(0, 1) else [])
            out = node("dense", ins, s[:-1] + (o,))
        elif kind == "reduce" and s:
            op = choose.choice(["sum", "mean"])
            how = choose.integer(0, 2)
            if how == 0:
                out = node(op, [v], ())
            else:
                axes = sorted({choose.integer(-len(s), len(s) - 1) % len(s) for _ in range(how)})
                attr = axes if len(axes) > 1 or choose.integer(0, 1) else axes[0]
                if isinstance(attr, int) and choose.integer(0, 1):
                    attr -= len(s)  # a negative axis
                out = node(op, [v], tuple(d for k, d in enumerate(s) if k not in axes), axis=attr)
        else:
            out = node("tanh", [v], s)
            from_tanh.add(out)
        values.append(out)

    if not params:  # something must get a gradient
        v = values[-1]
        P = param_like(shapes[v])
        values.append(node("mul", [v, P], _broadcast(shapes[v], shapes[P])))
    # Every value no node consumes is projected onto its own cotangent input; their sum is
    # the loss, so every node counts.
    used = {i for n in nodes.values() for i in n["inputs"]}
    leaves = [v for v in values[1:] if v not in used]
    inputs = {x: list(x_shape)}
    terms = []
    for v in leaves:
        inputs[f"c_{v}"] = list(shapes[v])
        nodes[f"proj_{v}"] = {"op": "mul", "inputs": [v, f"c_{v}"]}
        nodes[f"term_{v}"] = {"op": "sum", "inputs": [f"proj_{v}"]}
        terms.append(f"term_{v}")
    if len(terms) == 1:
        nodes[loss] = nodes.pop(terms[0])
    else:
        nodes[loss] = {"op": "elementwise", "inputs": terms, "expr": " + ".join(terms)}
    return {"name": name, "inputs": inputs,
            "params": {p: {"shape": s} for p, s in params.items()},
            "nodes": nodes, "outputs": [f"proj_{v}" for v in leaves], "loss": loss}


@st.composite
def graph_cases(draw):
    spec = random_spec(HypothesisChooser(draw))
    seed = draw(st.integers(0, 2**32 - 1))
    batch = draw(st.sampled_from([1, 3]))
    return spec, seed, batch


GRAPHS_PER_MODEL = 3


def side_by_side(specs: list[dict], name: str = "prop") -> dict:
    """Graphs of distinct names (random_spec's prefix) in one model: no value or param is
    shared, so each param's gradient of the summed loss is its own graph's. Each graph's
    loss is an output too, compared on its own."""
    merged = {"name": name, "inputs": {}, "params": {}, "nodes": {}, "outputs": []}
    for spec in specs:
        for section in ("inputs", "params", "nodes"):
            merged[section].update(spec[section])
        merged["outputs"] += spec["outputs"] + [spec["loss"]]
    losses = [spec["loss"] for spec in specs]
    merged["nodes"]["loss"] = {"op": "elementwise", "inputs": losses, "expr": " + ".join(losses)}
    merged["loss"] = "loss"
    return merged


@st.composite
def model_cases(draw):
    """GRAPHS_PER_MODEL random graphs side by side: one C build checks all of them (a build
    costs about a second, mostly fixed)."""
    chooser = HypothesisChooser(draw)
    spec = side_by_side([random_spec(chooser, prefix=f"g{k}_") for k in range(GRAPHS_PER_MODEL)])
    seed = draw(st.integers(0, 2**32 - 1))
    batch = draw(st.sampled_from([1, 3]))
    return spec, seed, batch


def case_data(graph, seed: int, batch: int):
    """Params in [-1, 1] and inputs: modest magnitudes, so nothing saturates or overflows."""
    rng = np.random.default_rng(seed)
    params = {p: rng.uniform(-1, 1, v.shape) for p, v in graph.params.items()}
    data = {i: rng.uniform(-1, 1, (batch,) + v.shape) for i, v in graph.inputs.items()}
    return params, data


# ---------------------------------------------------------------- properties

def test_random_specs_are_valid():
    """The strategy's specs all load, and cover every kind of node it can draw."""
    ops = set()
    for seed in range(200):
        spec = random_spec(RandomChooser(seed))
        g = graphc.Graph.from_spec(spec)
        assert g.values["loss"].shape == () and g.params
        ops |= {v.op for v in g.nodes.values()}
    assert ops >= {"relu", "leaky_relu", "sigmoid", "tanh", "exp", "elementwise", "add", "sub",
                   "mul", "dense", "sum", "mean"}
    # Side by side, each keeps its params, and its loss as an output.
    specs = [random_spec(RandomChooser(seed), prefix=f"g{seed}_") for seed in range(3)]
    g = graphc.Graph.from_spec(side_by_side(specs))
    assert list(g.params) == [p for s in specs for p in s["params"]]
    assert {"g0_loss", "g1_loss", "g2_loss"} <= set(g.outputs) and g.values["loss"].shape == ()


@PROPERTY_SETTINGS   # 8 models of GRAPHS_PER_MODEL graphs
@given(case=model_cases())
def test_c_gradients_equal_the_reference(case, assert_close):
    spec, seed, batch = case
    model = compile_strict(spec, "float64")   # warning-free under -Werror
    ref = reference(model.graph)
    params, data = case_data(model.graph, seed, batch)
    model.set_params(params)
    ref.set_params(params)
    (loss, grads), (ref_loss, ref_grads) = model.gradients(**data), ref.gradients(**data)
    assert_close(loss, ref_loss, "float64", "loss")
    for p in params:
        assert_close(grads[p], ref_grads[p], "float64", f"gradient of {p}")
    got, want = model.forward(**data), ref.forward(**data)
    for o in model.graph.outputs:
        assert_close(got[o], want[o], "float64", f"forward output {o}")


@settings(PROPERTY_SETTINGS, max_examples=60)  # no C: cheap
@given(case=graph_cases())
def test_reference_gradients_match_finite_differences(case):
    spec, seed, batch = case
    ref = reference(graphc.Graph.from_spec(spec))
    params, data = case_data(ref.graph, seed, batch)
    ref.set_params(params)
    loss = ref.loss(**data)
    for p, r in finite_difference_check(ref, data, seed=seed % 1000).items():
        # rel_err is the criterion; the absolute bound only admits a directional derivative
        # that is ~0, where the central difference is left with the loss's rounding alone.
        assert r["rel_err"] < FD_RTOL or r["abs_err"] < 1e-9 * (1 + abs(loss)), (p, r)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(case=graph_cases())
def test_generated_c_is_deterministic(case):
    spec = case[0]
    for dtype in ("float64", "float32"):
        _, first = graphc.generate(spec, dtype)
        _, again = graphc.generate(graphc.Graph.from_spec(json.loads(json.dumps(spec))), dtype)
        assert first.source == again.source
        assert first.header == again.header


GENERATE_SCRIPT = """
import json, sys
import graphc
out = []
for spec in json.load(sys.stdin):
    _, c = graphc.generate(spec, "float64")
    out.append([c.source, c.header])
json.dump(out, sys.stdout)
"""


def test_generated_c_does_not_depend_on_the_hash_seed():
    """Same text in another process with another PYTHONHASHSEED (set and dict orders of
    str): one child whose seed differs from this process's is enough."""
    specs = [random_spec(RandomChooser(seed)) for seed in range(6)]
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "12345" else "12345"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT], input=json.dumps(specs),
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    here = [[c.source, c.header] for c in (graphc.generate(s, "float64")[1] for s in specs)]
    assert here == json.loads(run.stdout)
