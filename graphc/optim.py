"""The optimizer section of a spec: names, fields and defaults (torch.optim's)."""

from __future__ import annotations

import math

import sympy as sp
from sympy.codegen.cfunctions import expm1

from .errors import SpecError
from .init import finite_number
from .ir import G, P, UpdateRule

# name -> field defaults; `momentum` is SGD with momentum 0.9 unless given.
OPTIMIZERS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "momentum": {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
}


def _number(value, field: str, *, low: float = 0.0, high: float = math.inf,
            open_low: bool = False, open_high: bool = False) -> float:
    number = finite_number(value, node="optimizer", field=field)
    bad_low = number <= low if open_low else number < low
    bad_high = number >= high if open_high else number > high
    if bad_low or bad_high:
        lo, hi = ("(" if open_low else "[") + f"{low:g}", f"{high:g}" + (")" if open_high else "]")
        raise SpecError(f"must lie in {lo}, {hi}, got {value!r}", node="optimizer", field=field)
    return number


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


# ---------------------------------------------------------------- update rules as formulas
#
# Each optimizer is declared once, as SymPy formulas over one param element `p`, its
# gradient `g` and its state slots, with the hyperparameters as symbols. The C emitter
# substitutes the numbers and prints the formulas like any kernel body; `explain` can show
# them as written here. The forms follow torch.optim (single-tensor CPU path) so that
# trajectories can be compared step by step.

STEP = sp.Symbol("t", positive=True)                   # the step count, after this step
D = sp.Symbol("d", real=True)                          # the gradient after weight decay
LR, WD, MU = sp.symbols("lr weight_decay momentum", nonnegative=True)
BETA1, BETA2, EPS = sp.symbols("beta1 beta2 eps", nonnegative=True)
BC1, BC2 = sp.symbols("bias_correction1 bias_correction2", positive=True)
STEP_SIZE, BC2_SQRT = sp.symbols("step_size bias_correction2_sqrt", positive=True)


def _bias_correction(beta: sp.Symbol, value: float) -> sp.Expr:
    """torch's 1 - β^t (t >= 1) as -expm1(t·log β): no cancellation at small t, even in
    float. For β = 0 that form folds log(0) to NaN, while 1 - 0^t is exactly 1."""
    return sp.Integer(1) if value == 0 else -expm1(STEP * sp.log(beta))


def update_rule(opt: dict) -> UpdateRule:
    """The formulas of a validated optimizer description (see `check_optimizer`)."""
    decay = (D, G + WD * P)
    if opt["name"] == "adam":
        m, v = sp.Symbol("exp_avg", real=True), sp.Symbol("exp_avg_sq", real=True)
        b1, b2 = opt["betas"]
        return UpdateRule(
            "adam", ("exp_avg", "exp_avg_sq"),
            scalars=((BC1, _bias_correction(BETA1, b1)), (BC2, _bias_correction(BETA2, b2)),
                     (STEP_SIZE, LR / BC1), (BC2_SQRT, sp.sqrt(BC2))),
            steps=(decay,
                   (m, BETA1 * m + (1 - BETA1) * D),
                   (v, BETA2 * v + (1 - BETA2) * D * D),
                   (P, P - STEP_SIZE * m / (sp.sqrt(v) / BC2_SQRT + EPS))),
            values={LR: opt["lr"], WD: opt["weight_decay"], BETA1: b1, BETA2: b2, EPS: opt["eps"]})
    values = {LR: opt["lr"], WD: opt["weight_decay"], MU: opt["momentum"]}
    if opt["momentum"] == 0:
        return UpdateRule("sgd", (), (), (decay, (P, P - LR * D)), values)
    buf = sp.Symbol("momentum_buffer", real=True)
    # torch starts the buffer at the first d; with dampening 0 that equals μ·0 + d.
    direction = D + MU * buf if opt["nesterov"] else buf
    return UpdateRule("nesterov" if opt["nesterov"] else "momentum", ("momentum_buffer",),
                      (), (decay, (buf, MU * buf + D), (P, P - LR * direction)), values)
