"""The optimizer section of a spec: names, fields and defaults (torch.optim's)."""

from __future__ import annotations

import math

from .errors import SpecError

# name -> field defaults; `momentum` is SGD with momentum 0.9 unless given.
OPTIMIZERS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "momentum": {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
}


def _number(value, field: str, *, low: float = 0.0, high: float = math.inf,
            open_low: bool = False, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"must be a finite number, got {value!r}", node="optimizer", field=field)
    bad_low = value <= low if open_low else value < low
    bad_high = value >= high if open_high else value > high
    if bad_low or bad_high:
        lo, hi = ("(" if open_low else "[") + f"{low:g}", f"{high:g}" + (")" if open_high else "]")
        raise SpecError(f"must lie in {lo}, {hi}, got {value!r}", node="optimizer", field=field)
    return float(value)


def check_optimizer(spec) -> dict:
    """A complete, validated optimizer description with every default filled in."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise SpecError("must be a mapping with a 'name'", field="optimizer")
    name = spec.get("name")
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})",
                        node="optimizer", field="name")
    defaults = OPTIMIZERS[name]
    extra = sorted(set(spec) - {"name"} - set(defaults), key=str)
    if extra:
        raise SpecError(f"unknown field {extra[0]!r} for optimizer '{name}' "
                        f"(its fields: {', '.join(defaults)})", node="optimizer",
                        field=str(extra[0]))
    out = {"name": name, **defaults, **{k: v for k, v in spec.items() if k != "name"}}
    out["lr"] = _number(out["lr"], "lr", open_low=True)
    out["weight_decay"] = _number(out["weight_decay"], "weight_decay")
    if name == "adam":
        betas = out["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise SpecError("must be a list of two numbers", node="optimizer", field="betas")
        out["betas"] = [_number(b, "betas", open_high=True, high=1.0) for b in betas]
        out["eps"] = _number(out["eps"], "eps")
    else:
        out["momentum"] = _number(out["momentum"], "momentum")
        if not isinstance(out["nesterov"], bool):
            raise SpecError("must be true or false", node="optimizer", field="nesterov")
        if out["nesterov"] and out["momentum"] == 0:
            raise SpecError("Nesterov momentum needs momentum > 0", node="optimizer", field="nesterov")
    return out
