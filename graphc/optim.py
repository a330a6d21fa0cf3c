"""Optimizers: the spec's section (names, fields, torch.optim's defaults), each update rule
as formulas lowered to IR kernels, and a compiled model's hyperparameters as a live mapping
over its optimizer state."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .dtypes import representable
from .errors import SpecError
from .init import finite_number
from .ir import (ASSIGN, GRADS_BLOCK, PARAM, GRAD, PARAMS_BLOCK, STATE, STEP_COUNT, SUM, TEMP,
                 UPDATE, Buffer, Kernel, Program, index_symbols, state_buffer)
from .optimizers import OPTIMIZERS

# torch.nn.utils.clip_grad_norm_'s max_norm, applied before every optimizer; None: off.
CLIP_DEFAULT = {"clip_grad_norm": None}
# The fields that are flags of the formulas (true or false).
FLAGS = ("nesterov", "amsgrad", "centered", "decoupled_weight_decay")
# The number fields besides `betas` (each in [0, 1)): finite and >= 0 (torch allows lr 0).
NUMBERS = ("lr", "momentum", "weight_decay", "eps", "alpha", "lr_decay",
           "initial_accumulator_value", "momentum_decay", "clip_grad_norm")


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
    if not isinstance(spec, Mapping):
        raise SpecError("must be a mapping with a 'name'", field="optimizer")
    name = spec.get("name")
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})",
                        node="optimizer", field="name")
    defaults = {**OPTIMIZERS[name], **CLIP_DEFAULT}
    extra = sorted(set(spec) - {"name"} - set(defaults), key=str)
    if extra:
        raise SpecError(f"unknown field {extra[0]!r} for optimizer '{name}' "
                        f"(its fields: {', '.join(defaults)})", node="optimizer",
                        field=str(extra[0]))
    out = {"name": name, **defaults, **{k: v for k, v in spec.items() if k != "name"}}
    for field in out:
        if field in FLAGS and not isinstance(out[field], bool):
            raise SpecError("must be true or false", node="optimizer", field=field)
        if field == "betas":
            betas = out["betas"]
            if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                raise SpecError("must be a list of two numbers", node="optimizer", field="betas")
            out["betas"] = [_number(b, "betas", open_high=True, high=1.0) for b in betas]
        elif field in NUMBERS and not (field == "clip_grad_norm" and out[field] is None):
            out[field] = _number(out[field], field)   # lr 0 too, as torch: a schedule may reach it
    if out.get("nesterov") and out["momentum"] == 0:
        raise SpecError("Nesterov momentum needs momentum > 0", node="optimizer", field="nesterov")
    return out


# The decay rates' slots hold their complements 1 - β, which is what the update weighs each
# new gradient by: a float32 slot holding 0.999 would make 1 - β2 from it 0.00100004673
# (its rounding error 3e-8 over 0.001, 5e-5 relative), while one holding 1 - 0.999 is
# float's nearest to 0.001, as the literal of the same formula (and torch's scalar) is.
COMPLEMENTS = {"betas": ("one_minus_beta1", "one_minus_beta2"), "alpha": ("one_minus_alpha",)}


def hyperparameters(opt: dict) -> dict[str, tuple[str, ...]]:
    """The fields of a validated description that the update reads from the state block,
    each with its state slots (`betas`: one_minus_beta1, one_minus_beta2), in slot order:
    what a schedule or a user may change between steps. Every other field shapes the
    formulas (a flag, momentum zero or not, clipping on or off, the accumulator's start)
    and is fixed by the compile."""
    out = {"lr": ("lr",)}
    for field in ("alpha", "betas", "momentum", "momentum_decay", "lr_decay", "eps",
                  "weight_decay", "clip_grad_norm"):
        if field not in opt or (field == "momentum" and not opt[field]) \
                or (field == "clip_grad_norm" and opt[field] is None):
            # SGD and RMSprop without momentum keep no buffer; None: no clipping (0 clips,
            # to zero gradients, as torch's does)
            continue
        out[field] = COMPLEMENTS.get(field, (field,))
    return out


def slot_values(field: str, value) -> list[float]:
    """What a hyperparameter's slots hold for a validated value of its field."""
    values = value if field == "betas" else [value]
    return [1 - v if field in COMPLEMENTS else v for v in values]


def field_value(field: str, held: list[float]):
    """A hyperparameter field's value from what its slots hold (`slot_values` reversed)."""
    values = [1 - h if field in COMPLEMENTS else h for h in held]
    return values if field == "betas" else values[0]


def structure(opt: dict) -> dict:
    """What of a validated description the generated C is fixed by (see `hyperparameters`):
    two descriptions with the same structure run the same update, from different slots."""
    live = hyperparameters(opt)
    return {k: v for k, v in opt.items() if k not in live}


class LiveOptimizer(MutableMapping):
    """A compiled model's optimizer description, live over its state block: a
    hyperparameter (see `hyperparameters`) reads as the value the next train step will
    use, and an assignment validates it as a spec's would and writes its slots; a field
    that shapes the update's formulas reads as compiled, and assigning another value to it
    is an error saying to recompile.

    `state` is the model's state array, `offsets` its slots' offsets, `lock` the model's
    (the C updates the state under it)."""

    def __init__(self, compiled: dict, state: np.ndarray, offsets: dict[str, int], lock):
        self._compiled, self._state, self._offsets, self._lock = compiled, state, offsets, lock
        self._live = hyperparameters(compiled)
        # The values last written, exactly: the slot holds their rounding to the state's
        # dtype, and a read gives them back while it still does.
        self._given = {f: copy.deepcopy(compiled[f]) for f in self._live}

    def __getitem__(self, field: str):
        if field not in self._live:
            return copy.deepcopy(self._compiled[field])
        with self._lock:
            held = [self._state[self._offsets[s]] for s in self._live[field]]
            given = self._given[field]
        if [self._state.dtype.type(v) for v in slot_values(field, given)] == held:
            return copy.deepcopy(given)
        # changed from C, or loaded: the shortest decimal the slot holds exactly (0.01, not
        # float32 0.009999999776)
        return field_value(field, [float(str(h)) for h in held])

    def __setitem__(self, field: str, value) -> None:
        new = check_optimizer({**self, field: value})   # the spec's checks and messages
        if structure(new) != structure(self._compiled):
            raise SpecError(f"{field}={value!r} would change the update's formulas, which "
                            f"are fixed when the train step is compiled (its hyperparameters "
                            f"are {', '.join(self._live)}): compile again with the new "
                            "optimizer", node="optimizer", field=field)
        if field not in self._live:
            return   # the compiled value again
        numbers = slot_values(field, new[field])
        if not all(representable(v, self._state.dtype.name) for v in numbers):
            raise SpecError(f"{value!r} is out of the range of {self._state.dtype}: compile "
                            "with dtype float64, or change the value", node="optimizer",
                            field=field)
        with self._lock:   # the slots and the value they were written from, together
            for slot, v in zip(self._live[field], numbers):
                self._state[self._offsets[slot]] = v
            self._given[field] = new[field]

    def __delitem__(self, field: str) -> None:
        raise SpecError("an optimizer field cannot be removed; assign a value instead",
                        node="optimizer", field=field)

    def __iter__(self):
        return iter(self._compiled)

    def __len__(self) -> int:
        return len(self._compiled)

    def __repr__(self) -> str:
        return repr(dict(self))


# ---------------------------------------------------------------- update rules as formulas
#
# Each optimizer is declared once, as SymPy formulas over one param element `p`, its
# gradient `g` and its state slots, with the hyperparameters as symbols that `lower_update`
# makes reads of their state slots. The forms follow torch.optim (single-tensor CPU path,
# foreach=False), operation for operation, so that trajectories can be compared step by step.

P, G = sp.symbols("p g", real=True)   # a param element and its gradient


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer step, elementwise over the flat params.

    The state block holds the step count `t` first, then each hyperparameter (`hyper`:
    slot -> its symbol, as `hyperparameters` lists them), then the scalar slots
    (`scalar_slots`, NAdam's mu_product), then the per-element slots (`slots`), all by
    torch's names. `scalars` are computed once per step, in order, each target a
    temporary or a scalar slot (read after that as its new value); `steps` are evaluated
    in order for each element, a later formula seeing the new value of an earlier target
    (a temporary, a per-element slot or `p` itself). `initial` is what a fresh state holds
    in each slot (the hyperparameters' compiled values; per-element slots absent are 0).
    `clip`: the gradient is first scaled by CLIP_COEF (torch's clip_grad_norm_)."""
    name: str
    hyper: dict[str, sp.Symbol]
    scalar_slots: tuple[str, ...]
    slots: tuple[str, ...]
    scalars: tuple[tuple[sp.Symbol, sp.Expr], ...]
    steps: tuple[tuple[sp.Symbol, sp.Expr], ...]
    initial: dict[str, float]
    clip: bool = False

    def slot_symbol(self, slot: str) -> sp.Symbol:
        return sp.Symbol(slot, real=True)


STEP = sp.Symbol("t", positive=True)                   # the step count, after this step
D = sp.Symbol("d", real=True)                          # the gradient after weight decay
LR, WD, MU, EPS = sp.symbols("lr weight_decay momentum eps", nonnegative=True)
LR_DECAY, MOMENTUM_DECAY, MAX_NORM = sp.symbols("lr_decay momentum_decay clip_grad_norm",
                                                nonnegative=True)
# The decay rates through their complements' slots (COMPLEMENTS): 1 - BETA1 is C1 itself.
C1, C2, C_ALPHA = sp.symbols("one_minus_beta1 one_minus_beta2 one_minus_alpha", nonnegative=True)
BETA1, BETA2, ALPHA = 1 - C1, 1 - C2, 1 - C_ALPHA
BC1, BC2 = sp.symbols("bias_correction1 bias_correction2", positive=True)
BC2_REAL = sp.Symbol("bias_correction2", real=True)
STEP_SIZE, BC2_SQRT, CLR = sp.symbols("step_size bias_correction2_sqrt clr", positive=True)
NU, NU_NEXT, NU_PRODUCT_NEXT = sp.symbols("mu mu_next mu_product_next", positive=True)
GRAD_STEP, AVG_STEP = sp.symbols("grad_step avg_step", real=True)
SHRUNK, HALFWAY = sp.symbols("p_decayed p_halfway", real=True)   # the param between steps
# torch.nn.utils.clip_grad_norm_: the gradients' global 2-norm, then the factor each
# gradient is multiplied by (1 unless the norm passes max_norm; its 1e-6 keeps it finite).
NORM_SQ, CLIP = sp.symbols("grad_norm_sq clip_coef", nonnegative=True)
CLIPPED = sp.Symbol("g_clipped", real=True)
CLIP_COEF = sp.Min(1, MAX_NORM / (sp.sqrt(NORM_SQ) + sp.Float(1e-6)))
# Each hyperparameter slot's symbol in the formulas.
SLOT_SYMBOLS = {str(s): s for s in (LR, WD, MU, EPS, LR_DECAY, MOMENTUM_DECAY, MAX_NORM, C1, C2,
                                    C_ALPHA)}


# What each hyperparameter slot holds, for the header.
HYPERPARAMETER_DOC = {
    "lr": "the learning rate", "weight_decay": "the weight decay (L2 penalty)",
    "momentum": "the momentum factor",
    "one_minus_beta1": "1 - betas[0], the first moment's weight of a new gradient",
    "one_minus_beta2": "1 - betas[1], the second moment's weight of a new gradient",
    "one_minus_alpha": "1 - alpha, the square average's weight of a new gradient",
    "eps": "eps, added to the denominator", "lr_decay": "the learning rate's decay",
    "momentum_decay": "the momentum decay (NAdam's psi)",
    "clip_grad_norm": "the gradients' largest global 2-norm (torch's clip_grad_norm_)"}


def _bias_correction(complement: sp.Symbol) -> sp.Expr:
    """torch's 1 - β^t (t >= 1) from 1 - β, as -expm1(t·log1p(-(1 - β))): no cancellation
    at small t, even in float; for β = 0, log1p(-1) = -inf and the C's IEEE arithmetic
    gives exactly 1."""
    return -expm1(STEP * log1p(-complement))


def _lerp(start: sp.Expr, end: sp.Expr, weight: sp.Expr) -> sp.Expr:
    """torch.lerp's `start + weight·(end - start)`, the form its weight < 0.5 takes (the
    betas' 1 - β are small; for β < 0.5 it differs from torch's other form by rounding)."""
    return start + weight * (end - start)


def update_rule(opt: dict) -> UpdateRule:
    """The formulas of a validated optimizer description (see `check_optimizer`)."""
    name = opt["name"]
    slot = lambda s: sp.Symbol(s, real=True)   # noqa: E731
    decay = (D, G + WD * P)
    # AdamW's and NAdam's decoupled decay shrink the param first (torch's p.mul_), then
    # the step reads the shrunk param (`base`) and the gradient as it is.
    decoupled = opt.get("decoupled_weight_decay") or name == "adamw"
    base = SHRUNK if decoupled else P
    shrink = ((SHRUNK, P * (1 - LR * WD)),) if decoupled else ()
    grad = () if decoupled else (decay,)
    scalars, slots, scalar_slots, extra_initial = (), (), (), {}
    if name in ("adam", "adamw"):
        m, v, vmax = slot("exp_avg"), slot("exp_avg_sq"), slot("max_exp_avg_sq")
        slots = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if opt["amsgrad"] else ())
        scalars = ((BC1, _bias_correction(C1)), (BC2, _bias_correction(C2)),
                   (STEP_SIZE, LR / BC1), (BC2_SQRT, sp.sqrt(BC2)))
        second = ((vmax, sp.Max(vmax, v)),) if opt["amsgrad"] else ()
        steps = (*shrink, *grad,
                 (m, _lerp(m, D, 1 - BETA1)),
                 (v, BETA2 * v + (1 - BETA2) * D * D),
                 *second,
                 (P, base - STEP_SIZE * m / (sp.sqrt(vmax if second else v) / BC2_SQRT + EPS)))
    elif name in ("sgd", "momentum"):
        if opt["momentum"] == 0:
            steps = (decay, (P, P - LR * D))
        else:
            buf = slot("momentum_buffer")
            slots = ("momentum_buffer",)
            # torch starts the buffer at the first d; with dampening 0 that equals μ·0 + d.
            direction = D + MU * buf if opt["nesterov"] else buf
            steps = (decay, (buf, MU * buf + D), (P, P - LR * direction))
            name = "nesterov" if opt["nesterov"] else "momentum"
    elif name == "rmsprop":
        sq, avg, buf = slot("square_avg"), slot("grad_avg"), slot("momentum_buffer")
        slots = ("square_avg",) + (("grad_avg",) if opt["centered"] else ()) + \
            (("momentum_buffer",) if opt["momentum"] else ())
        centered = ((avg, _lerp(avg, D, 1 - ALPHA)),) if opt["centered"] else ()
        denom = sp.sqrt(sq - avg * avg if centered else sq) + EPS
        moved = ((buf, MU * buf + D / denom), (P, P - LR * buf)) if opt["momentum"] else \
            ((P, P - LR * D / denom),)
        steps = (decay, (sq, ALPHA * sq + (1 - ALPHA) * D * D), *centered, *moved)
    elif name == "adagrad":
        total = slot("sum")
        slots = ("sum",)
        extra_initial = {"sum": opt["initial_accumulator_value"]}
        scalars = ((CLR, LR / (1 + (STEP - 1) * LR_DECAY)),)
        steps = (decay, (total, total + D * D), (P, P - CLR * D / (sp.sqrt(total) + EPS)))
    elif name == "adamax":
        m, u = slot("exp_avg"), slot("exp_inf")
        slots = ("exp_avg", "exp_inf")
        scalars = ((BC1, _bias_correction(C1)), (CLR, LR / BC1))
        steps = (decay, (m, _lerp(m, D, 1 - BETA1)),
                 (u, sp.Max(BETA2 * u, sp.Abs(D) + EPS)),
                 (P, P - CLR * m / u))
    elif name == "nadam":
        m, v, product = slot("exp_avg"), slot("exp_avg_sq"), slot("mu_product")
        slots, scalar_slots = ("exp_avg", "exp_avg_sq"), ("mu_product",)
        extra_initial = {"mu_product": 1.0}
        half = sp.Rational(1, 2)
        decay_at = lambda t: 1 - half * sp.Float(0.96) ** (t * MOMENTUM_DECAY)   # noqa: E731
        scalars = ((BC2_REAL, _bias_correction(C2)),
                   (NU, BETA1 * decay_at(STEP)), (NU_NEXT, BETA1 * decay_at(STEP + 1)),
                   (product, product * NU),
                   (GRAD_STEP, -LR * (1 - NU) / (1 - product)),
                   (NU_PRODUCT_NEXT, product * NU_NEXT),
                   (AVG_STEP, -LR * NU_NEXT / (1 - NU_PRODUCT_NEXT)))
        # torch's sqrt(v / bc2): a positive bc2 would let SymPy split the root in two
        denom = sp.sqrt(v / BC2_REAL) + EPS
        steps = (*shrink, *grad, (m, _lerp(m, D, 1 - BETA1)),
                 (v, BETA2 * v + (1 - BETA2) * D * D),
                 (HALFWAY, base + GRAD_STEP * D / denom),   # torch's two addcdiv_
                 (P, HALFWAY + AVG_STEP * m / denom))
    else:
        raise AssertionError(f"no update rule for optimizer {name!r}")
    if decoupled:
        steps = tuple((target, e.xreplace({D: G})) for target, e in steps)
    live = hyperparameters(opt)
    values = {s: v for f, ss in live.items() for s, v in zip(ss, slot_values(f, opt[f]))}
    return UpdateRule(name, {s: SLOT_SYMBOLS[s] for s in values}, scalar_slots, slots, scalars,
                      steps, {**{s: float(v) for s, v in values.items()}, **extra_initial},
                      clip=opt["clip_grad_norm"] is not None)


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
    count, with clipping the gradients' norm and factor, the rule's per-step scalars, the
    rule's steps over the trainable params (the front `trainable_size` elements of the
    params block; a temporary of the rule is a buffer, which fusion turns into a variable
    of the loop), then each running statistic (param -> momentum; `layout`: param ->
    (offset, size)) moved towards the batch's value the gradients program left in its
    gradient slot, as torch does: p = (1 - momentum)·p + momentum·g, in torch.lerp's form.

    The state buffers are declared in the block's order (the step count, the
    hyperparameters, the scalar slots, the per-element slots); a hyperparameter is a read
    of its one-element buffer. Each step is its own kernel; fusion (codegen/plan.py) runs
    those over the same params in one loop. A step's formula reads the new value of an
    earlier step's target from where that step stored it, as torch's in-place operations
    do."""
    params_size = sum(size for _, size in layout.values())
    buffers = {PARAMS_BLOCK: Buffer(PARAMS_BLOCK, (params_size,), False, PARAM),
               GRADS_BLOCK: Buffer(GRADS_BLOCK, (params_size,), False, GRAD)}
    for slot in (STEP_COUNT, *rule.hyper, *rule.scalar_slots):
        buffers[state_buffer(slot)] = Buffer(state_buffer(slot), (1,), False, STATE)
    for slot in rule.slots:   # one element per trainable param element
        buffers[state_buffer(slot)] = Buffer(state_buffer(slot), (trainable_size,), False, STATE)

    def scalar(slot: str) -> sp.Indexed:
        return buffers[state_buffer(slot)].base[0]

    t = scalar(STEP_COUNT)
    # A float count is exact up to 2^24 steps (torch keeps its count as float32 too).
    kernels = [Kernel(state_buffer(STEP_COUNT), (sp.Integer(0),), (), t + 1, ASSIGN,
                      node=UPDATE, note="step_count")]
    known = {STEP: t, **{sym: scalar(slot) for slot, sym in rule.hyper.items()},
             **{rule.slot_symbol(s): scalar(s) for s in rule.scalar_slots}}
    (i,) = index_symbols(1)
    grad = buffers[GRADS_BLOCK].base[i]

    def per_step(sym: sp.Symbol, expr: sp.Expr, mode: str = ASSIGN, loops=()) -> None:
        """A scalar kernel: into its slot if `sym` is a scalar slot, else a temporary."""
        name = state_buffer(str(sym))
        if name not in buffers:
            buffers[name] = Buffer(name, (), False, TEMP)
        kernels.append(Kernel(name, (sp.Integer(0),), loops, expr.xreplace(known), mode,
                              node=UPDATE, note=str(sym)))
        known[sym] = buffers[name].base[0]

    if trainable_size:
        steps = rule.steps
        if rule.clip:   # one sum over every trainable gradient, in order: deterministic
            per_step(NORM_SQ, grad * grad, SUM, ((i, trainable_size),))
            per_step(CLIP, CLIP_COEF)
            # torch scales the gradients in place first: the scaled gradient, once
            steps = ((CLIPPED, CLIP * G), *(
                (target, e.xreplace({G: CLIPPED})) for target, e in steps))
        for sym, expr in rule.scalars:   # what the steps read
            per_step(sym, expr)
        loops = ((i, trainable_size),)
        reads = {P: buffers[PARAMS_BLOCK].base[i], G: grad,
                 **{rule.slot_symbol(s): buffers[state_buffer(s)].base[i] for s in rule.slots}}
        current = {**known, **reads}
        for sym, expr in steps:
            if sym not in reads:   # a temporary: the decayed gradient d
                buffers[f"__{sym}"] = Buffer(f"__{sym}", (trainable_size,), False, TEMP)
                reads[sym] = buffers[f"__{sym}"].base[i]
            out = str(reads[sym].base.label)
            kernels.append(Kernel(out, (i,), loops, expr.xreplace(current),
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
