"""Parameter initializers, seeded; fan-in and fan-out as PyTorch computes them."""

from __future__ import annotations

import math

import numpy as np

from .errors import SpecError

# name -> the extra fields it accepts, with defaults
INITIALIZERS: dict[str, dict[str, float]] = {
    "zeros": {}, "ones": {}, "normal": {"std": 1.0, "mean": 0.0},
    "uniform": {"low": -1.0, "high": 1.0},
    "glorot_uniform": {}, "glorot_normal": {}, "he_uniform": {}, "he_normal": {},
}


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them for rank >= 2 (W is [out, in,
    *kernel]); torch refuses lower ranks, so a vector's fans are its length and a scalar's
    are 1, as Keras takes them."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def finite_number(value, *, node: str | None, field: str) -> float:
    """`value` as a float if it is a finite real number (not a bool); else a SpecError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"must be a finite number, got {value!r}", node=node, field=field)
    try:
        number = float(value)
    except OverflowError:   # an int beyond float's range; its repr may not even print
        raise SpecError("must be a finite number, got an integer too large for a float",
                        node=node, field=field) from None
    if not math.isfinite(number):
        raise SpecError(f"must be a finite number, got {value!r}", node=node, field=field)
    return number


def check_init(node: str, spec: dict) -> dict:
    name = spec.get("init")
    if not isinstance(name, str) or name not in INITIALIZERS:
        raise SpecError(f"unknown initializer {name!r} (known: {', '.join(INITIALIZERS)})",
                        node=node, field="init")
    out = {"init": name}
    for key, default in INITIALIZERS[name].items():
        out[key] = finite_number(spec.get(key, default), node=node, field=key)
    if name == "normal" and out["std"] < 0:
        raise SpecError("std must be >= 0", node=node, field="std")
    if name == "uniform" and out["low"] > out["high"]:
        raise SpecError("low must not exceed high", node=node, field="low")
    return out


def initialize(shape: tuple[int, ...], init: dict, rng: np.random.Generator) -> np.ndarray:
    """Draw one parameter (float64) from `rng`."""
    name = init["init"]
    fan_in, fan_out = fans(shape)
    if name == "zeros":
        return np.zeros(shape)
    if name == "ones":
        return np.ones(shape)
    if name == "normal":
        return rng.normal(init["mean"], init["std"], shape)
    if name == "uniform":
        return rng.uniform(init["low"], init["high"], shape)
    if name == "glorot_uniform":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, shape)
    if name == "glorot_normal":
        return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), shape)
    if name == "he_uniform":
        bound = math.sqrt(6.0 / fan_in)
        return rng.uniform(-bound, bound, shape)
    if name == "he_normal":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
    raise AssertionError(name)


def init_params(params: dict[str, tuple[tuple[int, ...], dict]], seed: int) -> dict[str, np.ndarray]:
    """Every param, drawn in declaration order from one seeded generator."""
    rng = np.random.default_rng(seed)
    return {name: initialize(shape, init, rng) for name, (shape, init) in params.items()}


def start_params(graph, seed: int) -> dict[str, np.ndarray]:
    """The params a model starts from: drawn from their initializers in declaration order,
    except those the graph holds values for (`Graph.initial`: an imported model's
    weights)."""
    drawn = init_params({p: (v.shape, v.init) for p, v in graph.params.items()}, seed)
    for p, value in graph.initial.items():
        drawn[p] = np.array(value, dtype=np.float64)
    return drawn


def initial_params(graph, cmodule, seed: int = 0) -> np.ndarray | None:
    """The flat params block drawn from the spec's initializers (None when baked)."""
    if cmodule.baked_params:
        return None
    flat = np.zeros(cmodule.params_size)
    drawn = start_params(graph, seed)
    for p, value in drawn.items():
        at = cmodule.param_offsets[p]
        flat[at:at + value.size] = np.asarray(value, dtype=np.float64).ravel()
    return flat
