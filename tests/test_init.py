"""Initializers: fans as torch.nn.init computes them, the distributions they draw, seeding.

The statistical checks use large draws and tolerances of about six standard errors, so
they hold for any seed, not just the one used here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphc
from graphc.init import INITIALIZERS, fans, init_params, initialize

# (shape, (fan_in, fan_out)) worked out by hand from torch.nn.init's rule:
# fan_in = shape[1]·receptive, fan_out = shape[0]·receptive, receptive = prod(shape[2:]).
KNOWN_FANS = [
    ((4, 5), (5, 4)),
    ((32, 64), (64, 32)),
    ((2, 3, 4), (12, 8)),
    ((8, 3, 5, 5), (75, 200)),
    ((16, 1, 3, 1), (3, 48)),
]
SHAPES = [(7, 1), (1, 9), (3, 7), (6, 2, 5), (4, 3, 1, 2), (16, 8, 3, 3)]


@pytest.mark.parametrize("shape, expected", KNOWN_FANS, ids=str)
def test_known_fans(shape, expected):
    assert fans(shape) == expected


def test_fans_of_vectors_and_scalars():
    # torch refuses rank < 2; graphc (like Keras) uses n for both fans of a vector, 1 for a scalar.
    assert fans((7,)) == (7, 7)
    assert fans(()) == (1, 1)


@pytest.mark.parametrize("shape", SHAPES + [s for s, _ in KNOWN_FANS], ids=str)
def test_fans_match_torch(shape):
    torch = pytest.importorskip("torch", reason="torch is not installed; the hard-coded fans still ran")
    assert fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


def test_torch_refuses_fans_below_rank_2():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(7))


# ---------------------------------------------------------------- distributions

BIG = (400, 250)  # 100,000 draws; fan_in 250, fan_out 400
N = math.prod(BIG)
FAN_IN, FAN_OUT = fans(BIG)
# P(|Z| < 1) for a normal; a uniform of the same std has 1/sqrt(3) of its mass there.
WITHIN_ONE_STD = math.erf(1 / math.sqrt(2))


def draw(name: str, shape=BIG, seed: int = 0, **fields) -> np.ndarray:
    spec = {"init": name, **{k: float(v) for k, v in INITIALIZERS[name].items()}, **fields}
    return initialize(shape, spec, np.random.default_rng(seed))


def assert_normal(x: np.ndarray, mean: float, std: float):
    n = x.size
    assert abs(x.mean() - mean) < 6 * std / math.sqrt(n)
    # the sample std's standard error is std/sqrt(2n)
    assert abs(x.std() - std) < 6 * std / math.sqrt(2 * n)
    # a normal, not another distribution of that std: its mass within one std
    within = np.mean(np.abs(x - mean) < std)
    assert abs(within - WITHIN_ONE_STD) < 6 * math.sqrt(WITHIN_ONE_STD * (1 - WITHIN_ONE_STD) / n)


def assert_uniform(x: np.ndarray, low: float, high: float):
    n, width = x.size, high - low
    assert x.min() >= low and x.max() <= high
    # both ends are reached: P(no draw in the last 0.1%) = 0.999^n ~ e^-100
    assert x.min() < low + 1e-3 * width and x.max() > high - 1e-3 * width
    # flat: each tenth of the range holds a tenth of the draws
    counts, _ = np.histogram(x, bins=10, range=(low, high))
    assert np.all(np.abs(counts / n - 0.1) < 6 * math.sqrt(0.09 / n))


def test_he_normal():
    assert_normal(draw("he_normal"), 0.0, math.sqrt(2 / FAN_IN))


def test_glorot_normal():
    assert_normal(draw("glorot_normal"), 0.0, math.sqrt(2 / (FAN_IN + FAN_OUT)))


def test_he_uniform():
    bound = math.sqrt(6 / FAN_IN)
    assert_uniform(draw("he_uniform"), -bound, bound)


def test_glorot_uniform():
    bound = math.sqrt(6 / (FAN_IN + FAN_OUT))
    assert_uniform(draw("glorot_uniform"), -bound, bound)


def test_normal_and_uniform_fields():
    assert_normal(draw("normal"), 0.0, 1.0)
    assert_normal(draw("normal", mean=-3.0, std=0.25), -3.0, 0.25)
    assert_uniform(draw("uniform"), -1.0, 1.0)
    assert_uniform(draw("uniform", low=2.0, high=5.0), 2.0, 5.0)
    assert np.all(draw("normal", (5,), mean=1.5, std=0.0) == 1.5)
    assert np.all(draw("uniform", (5,), low=-2.0, high=-2.0) == -2.0)


def test_constants():
    for shape in [(), (3,), (2, 3), (2, 3, 4)]:
        z, o = draw("zeros", shape), draw("ones", shape)
        assert z.shape == o.shape == shape and z.dtype == o.dtype == np.float64
        assert np.all(z == 0) and np.all(o == 1)


def test_scaled_initializers_follow_the_fans_of_every_rank():
    """The scale depends on the fans only, so a conv-shaped kernel matches a matrix."""
    for shape in [(100, 50, 20), (50, 40, 5, 10)]:
        fan_in, fan_out = fans(shape)
        assert_normal(draw("he_normal", shape), 0.0, math.sqrt(2 / fan_in))
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert_uniform(draw("glorot_uniform", shape), -bound, bound)


# torch's name and arguments for each scaled graphc initializer
TORCH_INITS = {
    "he_normal": ("kaiming_normal_", {}),
    "he_uniform": ("kaiming_uniform_", {}),
    "glorot_normal": ("xavier_normal_", {}),
    "glorot_uniform": ("xavier_uniform_", {}),
}


@pytest.mark.parametrize("name", sorted(TORCH_INITS))
@pytest.mark.parametrize("shape", [(200, 300), (40, 30, 8, 8)], ids=str)
def test_same_scale_as_torch(name, shape):
    """graphc's names mean torch.nn.init's defaults (kaiming: fan_in, gain sqrt(2))."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    fn, kwargs = TORCH_INITS[name]
    torch.manual_seed(0)
    theirs = getattr(torch.nn.init, fn)(torch.empty(shape, dtype=torch.float64), **kwargs).numpy()
    ours = draw(name, shape)
    n = ours.size
    # both stds estimate the same number; their difference has standard error std·sqrt(1/n)
    assert abs(ours.std() - theirs.std()) < 6 * theirs.std() / math.sqrt(n)
    if name.endswith("uniform"):
        assert abs(np.abs(ours).max() - np.abs(theirs).max()) < 1e-3 * np.abs(theirs).max()


# ---------------------------------------------------------------- seeding

SPEC = {
    "name": "seeded",
    "inputs": {"x": [6]},
    "params": {"W1": {"shape": [40, 6], "init": "he_normal"},
               "W2": {"shape": [40, 6], "init": "he_normal"},  # same shape and init as W1
               "b": {"shape": [40], "init": "uniform", "low": -0.5, "high": 0.5},
               "c": {"shape": [40], "init": "ones"}},
    "nodes": {"h": {"op": "dense", "inputs": ["x", "W1", "b"]},
              "k": {"op": "dense", "inputs": ["x", "W2", "c"]},
              "y": {"op": "add", "inputs": ["h", "k"]}},
    "outputs": ["y"],
}


def drawn(seed: int) -> dict[str, np.ndarray]:
    g = graphc.Graph.from_spec(SPEC)
    return init_params({k: (v.shape, v.init) for k, v in g.params.items()}, seed)


def uncorrelated(a: np.ndarray, b: np.ndarray) -> bool:
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    return abs(r) < 6 / math.sqrt(a.size)


def test_the_same_seed_draws_the_same_params():
    a, b = drawn(11), drawn(11)
    assert list(a) == ["W1", "W2", "b", "c"]
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_different_seeds_and_params_draw_independently():
    a, b = drawn(0), drawn(1)
    for k in ("W1", "W2", "b"):
        assert uncorrelated(a[k], b[k]), k
    # two params of one seed are different draws, not one draw reused
    assert uncorrelated(a["W1"], a["W2"])
    assert np.array_equal(a["c"], b["c"])   # constants do not depend on the seed


def test_compiled_model_init_params_redraws_from_the_seed():
    model = graphc.compile(SPEC, dtype="float32", seed=3)
    first = model.get_params()
    model.set_params({k: np.zeros(v.shape) for k, v in first.items()})
    model.init_params(3)
    for k, v in model.get_params().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, first[k])
        np.testing.assert_array_equal(v, drawn(3)[k].astype(np.float32))
    model.init_params(4)
    again = model.get_params()
    assert uncorrelated(again["W1"], first["W1"]) and not np.array_equal(again["W1"], first["W1"])
    # the default seed is 0, the same as graphc.compile's
    model.init_params()
    np.testing.assert_array_equal(model.get_params()["W2"], drawn(0)["W2"].astype(np.float32))


def test_float64_model_holds_the_exact_draws():
    model = graphc.compile(SPEC, dtype="float64", seed=5)
    want = drawn(5)
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, want[k])
