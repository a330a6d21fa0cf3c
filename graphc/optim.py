"""The optimizer section of a spec: names, fields and defaults (torch.optim's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1

from .errors import SpecError
from .init import finite_number
from .ir import (ASSIGN, GRADS_BLOCK, PARAM, GRAD, PARAMS_BLOCK, STATE, STEP_COUNT, TEMP,
                 UPDATE, Buffer, Kernel, Program, index_symbols, state_buffer)
from .optimizers import OPTIMIZERS


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
# gradient `g` and its state slots, with the hyperparameters as symbols. `lower_update`
# substitutes the numbers and makes each formula an in-place kernel of the update program. The forms follow torch.optim (single-tensor CPU path) so that
# trajectories can be compared step by step.

P, G = sp.symbols("p g", real=True)   # a param element and its gradient


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer step, elementwise over the flat params.

    Every optimizer keeps the step count `t` first in its state (Adam's bias corrections
    need it; for SGD it tells a device how far training went). `scalars` are computed
    once per step from it; `steps` are evaluated in order for each element, a later formula
    seeing the new value of an earlier target. Targets are temporaries, state slots
    (`slots`, torch's names) or `p` itself. `lower_update` turns it into IR kernels."""
    name: str
    slots: tuple[str, ...]
    scalars: tuple[tuple[sp.Symbol, sp.Expr], ...]
    steps: tuple[tuple[sp.Symbol, sp.Expr], ...]
    values: dict[sp.Symbol, float]                     # the hyperparameters' numbers

    def slot_symbol(self, slot: str) -> sp.Symbol:
        return sp.Symbol(slot, real=True)

    def numeric(self, expr: sp.Expr) -> sp.Expr:
        return expr.xreplace({s: sp.Float(v) for s, v in self.values.items()})


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


class lerp(sp.Function):   # noqa: N801 (SymPy function classes are lower case, like sp.exp)
    """lerp(start, end, weight) = start + weight·(end - start), printed in torch.lerp's
    form: `start + weight·(end - start)` for weight < 0.5, `end - (1 - weight)·(end - start)`
    otherwise, exact at both ends. A function, so that SymPy does not distribute the weight
    over the difference."""
    nargs = 3
    is_real = True


def lower_update(rule: UpdateRule, layout: dict[str, tuple[int, int]], trainable_size: int,
                 running: dict[str, float]) -> Program:
    """The train step's update as IR kernels, run after the gradients program: the step
    count, the rule's per-step scalars, the rule's steps over the trainable params (the
    front `trainable_size` elements of the params block; a temporary of the rule is a
    buffer, which fusion turns into a variable of the loop), then each running statistic
    (param -> momentum; `layout`: param -> (offset, size)) moved towards the batch's value
    the gradients program left in its gradient slot, as torch does:
    p = (1 - momentum)·p + momentum·g, in torch.lerp's form.

    Each step is its own kernel; fusion (codegen/plan.py) runs those over the same params
    in one loop. A step's formula reads the new value of an earlier step's target from
    where that step stored it, as torch's in-place operations do."""
    params_size = sum(size for _, size in layout.values())
    buffers = {PARAMS_BLOCK: Buffer(PARAMS_BLOCK, (params_size,), False, PARAM),
               GRADS_BLOCK: Buffer(GRADS_BLOCK, (params_size,), False, GRAD)}
    count = state_buffer(STEP_COUNT)
    buffers[count] = Buffer(count, (1,), False, STATE)
    for slot in rule.slots:   # one element per trainable param element
        buffers[state_buffer(slot)] = Buffer(state_buffer(slot), (trainable_size,), False, STATE)
    t = buffers[count].base[0]
    # A float count is exact up to 2^24 steps (torch keeps its count as float32 too).
    kernels = [Kernel(count, (sp.Integer(0),), (), t + 1, ASSIGN, node=UPDATE, note="step_count")]
    known = {STEP: t}
    for sym, expr in rule.scalars if trainable_size else ():   # what the steps read
        name = f"__{sym}"
        buffers[name] = Buffer(name, (), False, TEMP)
        kernels.append(Kernel(name, (sp.Integer(0),), (), rule.numeric(expr).xreplace(known),
                              ASSIGN, node=UPDATE, note=str(sym)))
        known[sym] = buffers[name].base[0]
    (i,) = index_symbols(1)
    if trainable_size:
        loops = ((i, trainable_size),)
        reads = {P: buffers[PARAMS_BLOCK].base[i], G: buffers[GRADS_BLOCK].base[i],
                 **{rule.slot_symbol(s): buffers[state_buffer(s)].base[i] for s in rule.slots}}
        current = {**known, **reads}
        for sym, expr in rule.steps:
            if sym not in reads:   # a temporary: the decayed gradient d
                buffers[f"__{sym}"] = Buffer(f"__{sym}", (trainable_size,), False, TEMP)
                reads[sym] = buffers[f"__{sym}"].base[i]
            out = str(reads[sym].base.label)
            kernels.append(Kernel(out, (i,), loops, rule.numeric(expr).xreplace(current),
                                  ASSIGN, node=UPDATE, note=f"{rule.name}_update"))
            current[sym] = reads[sym]
    for param, momentum in running.items():
        offset, size = layout[param]
        at = (i + offset,)
        p, g = buffers[PARAMS_BLOCK].base[at], buffers[GRADS_BLOCK].base[at]
        kernels.append(Kernel(PARAMS_BLOCK, at, ((i, size),), lerp(p, g, sp.Float(momentum)),
                              ASSIGN, node=UPDATE, note=f"{param}_running_update"))
    program = Program(buffers, kernels, in_place=True)
    program.check()
    return program
