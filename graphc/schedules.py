"""Learning-rate schedules that give the values `torch.optim.lr_scheduler` gives, step by step.

Each class takes its torch namesake's arguments (less the optimizer) and follows its code,
for one param group: the same recursive forms (ExponentialLR multiplies the last lr by
gamma, CosineAnnealingLR scales the last lr by a ratio of cosines), so the floats agree to
the last bit or nearly, not only the formulas. A schedule starts from the optimizer's lr
(`start`) and gives the next lr at each `step`, as `scheduler.step()` does; the
LearningRateScheduler callback drives one through `fit`, once an epoch or once a batch.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter

from .errors import GraphcError, InputError


class Schedule:
    """A learning rate per step. `start(lr)` resets it at the optimizer's lr and returns the
    first rate; each `step()` returns the next. `per` is the cadence torch users step it at."""

    per = "epoch"
    needs_metric = False   # ReduceLROnPlateau steps on a monitored value

    def start(self, lr: float) -> float:
        self.base_lr = self.lr = float(lr)
        self.last_epoch = 0
        self.lr = self._first()
        return self.lr

    def step(self) -> float:
        if not hasattr(self, "lr"):
            raise InputError(f"{type(self).__name__}: call start(lr) before step()")
        self.last_epoch += 1
        self.lr = self._next()
        return self.lr

    def _first(self) -> float:
        return self.lr

    def _next(self) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}"
                         for k in inspect.signature(type(self)).parameters)
        return f"{type(self).__name__}({args})"


class StepLR(Schedule):
    """lr × gamma every `step_size` steps."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size = _positive_int(self, "step_size", step_size)
        self.gamma = _number(self, "gamma", gamma, low=0.0)

    def _next(self) -> float:
        return self.lr * self.gamma if self.last_epoch % self.step_size == 0 else self.lr


class MultiStepLR(Schedule):
    """lr × gamma at each milestone (× gamma² at a milestone given twice, as torch)."""

    def __init__(self, milestones, gamma: float = 0.1):
        if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
            raise InputError(f"MultiStepLR: milestones must be a list of step counts, got "
                             f"{milestones!r}")
        self.milestones = sorted(_positive_int(self, "milestones", m) for m in milestones)
        self.gamma = _number(self, "gamma", gamma, low=0.0)
        self._counts = Counter(self.milestones)

    def _next(self) -> float:
        times = self._counts.get(self.last_epoch)
        return self.lr * self.gamma ** times if times else self.lr


class ExponentialLR(Schedule):
    """lr × gamma at every step."""

    def __init__(self, gamma: float):
        self.gamma = _number(self, "gamma", gamma, low=0.0)

    def _next(self) -> float:
        return self.lr * self.gamma


class CosineAnnealingLR(Schedule):
    """From the optimizer's lr down to `eta_min` along half a cosine over `T_max` steps, and
    (as torch, which has no restarts here) back up over the next `T_max`, and so on."""

    def __init__(self, T_max: int, eta_min: float = 0.0):
        self.T_max = _positive_int(self, "T_max", T_max)
        self.eta_min = _number(self, "eta_min", eta_min, low=0.0)

    def _next(self) -> float:
        e, t, eta_min = self.last_epoch, self.T_max, self.eta_min
        if (e - 1 - t) % (2 * t) == 0:   # leaving the minimum: the ratio below would be 0/0
            return self.lr + (self.base_lr - eta_min) * (1 - math.cos(math.pi / t)) / 2
        return ((1 + math.cos(math.pi * e / t)) / (1 + math.cos(math.pi * (e - 1) / t))
                * (self.lr - eta_min) + eta_min)


class LinearLR(Schedule):
    """Linear warmup (or decay): lr × a factor going from `start_factor` to `end_factor`
    over `total_iters` steps, then constant."""

    def __init__(self, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5):
        self.start_factor = _number(self, "start_factor", start_factor, low=0.0, high=1.0,
                                    open_low=True)
        self.end_factor = _number(self, "end_factor", end_factor, low=0.0, high=1.0)
        self.total_iters = _positive_int(self, "total_iters", total_iters)

    def _first(self) -> float:
        return self.lr * self.start_factor

    def _next(self) -> float:
        if self.last_epoch > self.total_iters:
            return self.lr
        change = self.end_factor - self.start_factor
        return self.lr * (1.0 + change / (self.total_iters * self.start_factor
                                          + (self.last_epoch - 1) * change))


class OneCycleLR(Schedule):
    """The 1cycle policy, stepped once a batch: from max_lr / div_factor up to `max_lr` over
    the first `pct_start` of `total_steps` (or epochs × steps_per_epoch), then down to
    max_lr / div_factor / final_div_factor (`three_phase`: back to the start first). The
    optimizer's own lr is not used. torch's `cycle_momentum` is not supported: graphc's
    optimizers take a fixed momentum (or betas)."""

    per = "batch"

    def __init__(self, max_lr: float, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False):
        self.max_lr = _number(self, "max_lr", max_lr, low=0.0, open_low=True)
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        if total_steps is not None:
            self.total_steps = _positive_int(self, "total_steps", total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (_positive_int(self, "epochs", epochs)
                                * _positive_int(self, "steps_per_epoch", steps_per_epoch))
        else:
            raise InputError("OneCycleLR: give total_steps, or epochs and steps_per_epoch")
        self.pct_start = _number(self, "pct_start", pct_start, low=0.0, high=1.0)
        if anneal_strategy not in ("cos", "linear"):
            raise InputError(f"OneCycleLR: anneal_strategy must be 'cos' or 'linear', got "
                             f"{anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self.div_factor = _number(self, "div_factor", div_factor, low=0.0, open_low=True)
        self.final_div_factor = _number(self, "final_div_factor", final_div_factor, low=0.0,
                                        open_low=True)
        if not isinstance(three_phase, bool):
            raise InputError(f"OneCycleLR: three_phase must be True or False, got "
                             f"{three_phase!r}")
        self.three_phase = three_phase
        initial = self.max_lr / self.div_factor
        low = initial / self.final_div_factor
        rise = float(self.pct_start * self.total_steps) - 1
        # (last step of the phase, lr at its start, lr at its end), torch's table
        self._phases = ([(rise, initial, self.max_lr),
                         (float(2 * self.pct_start * self.total_steps) - 2, self.max_lr, initial),
                         (self.total_steps - 1, initial, low)] if three_phase else
                        [(rise, initial, self.max_lr), (self.total_steps - 1, self.max_lr, low)])
        # torch divides by each phase's length: a length of exactly 0 is a ZeroDivisionError
        # there (a negative one, a phase shorter than a step, is only skipped)
        begins = [0.0] + [last for last, _, _ in self._phases[:-1]]
        if any(last == begin for (last, _, _), begin in zip(self._phases, begins)):
            raise InputError(f"OneCycleLR: pct_start {self.pct_start:g} of total_steps "
                             f"{self.total_steps} leaves a phase without steps; give more "
                             "steps or another pct_start")

    def _first(self) -> float:
        return self._at(0)

    def _next(self) -> float:
        if self.last_epoch > self.total_steps:
            raise InputError(f"OneCycleLR: stepped {self.last_epoch} times, past its "
                             f"total_steps of {self.total_steps}")
        return self._at(self.last_epoch)

    def _at(self, step: int) -> float:
        begin = 0.0
        for i, (last, lr_from, lr_to) in enumerate(self._phases):
            if step <= last or i == len(self._phases) - 1:
                pct = (step - begin) / (last - begin)
                if self.anneal_strategy == "cos":
                    return lr_to + (lr_from - lr_to) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (lr_to - lr_from) * pct + lr_from
            begin = last
        raise AssertionError("unreachable: the last phase always matches")


class ReduceLROnPlateau(Schedule):
    """lr × factor (not below `min_lr`) once a monitored value has not improved for more
    than `patience` steps; `step(value)` takes that value, as torch's."""

    needs_metric = True

    def __init__(self, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, eps: float = 1e-8):
        for name, value, allowed in (("mode", mode, ("min", "max")),
                                     ("threshold_mode", threshold_mode, ("rel", "abs"))):
            if value not in allowed:
                raise InputError(f"ReduceLROnPlateau: {name} must be "
                                 f"{' or '.join(map(repr, allowed))}, got {value!r}")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = _number(self, "factor", factor, low=0.0, high=1.0, open_high=True)
        self.patience = _count(self, "patience", patience)
        self.threshold = _number(self, "threshold", threshold, low=0.0)
        self.cooldown = _count(self, "cooldown", cooldown)
        self.min_lr = _number(self, "min_lr", min_lr, low=0.0)
        self.eps = _number(self, "eps", eps, low=0.0)

    def start(self, lr: float) -> float:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.bad_epochs = self.cooldown_counter = 0
        return super().start(lr)

    def step(self, metric: float) -> float:
        if not hasattr(self, "lr"):
            raise InputError("ReduceLROnPlateau: call start(lr) before step(value)")
        current = float(metric)
        self.last_epoch += 1
        if self._better(current):
            self.best, self.bad_epochs = current, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.bad_epochs = 0   # bad epochs in the cooldown do not count
        if self.bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:   # torch skips reductions smaller than eps
                self.lr = new_lr
            self.cooldown_counter, self.bad_epochs = self.cooldown, 0
        return self.lr

    def _better(self, value: float) -> bool:
        if self.threshold_mode == "rel":
            if self.mode == "min":
                return value < self.best * (1.0 - self.threshold)
            return value > self.best * (self.threshold + 1.0)
        if self.mode == "min":
            return value < self.best - self.threshold
        return value > self.best + self.threshold


def _number(schedule, name: str, value, *, low: float = -math.inf, high: float = math.inf,
            open_low: bool = False, open_high: bool = False) -> float:
    where = f"{type(schedule).__name__}: {name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(float(value)):
        raise InputError(f"{where} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or value > high or (open_low and value == low) \
            or (open_high and value == high):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise InputError(f"{where} must lie in {lo}{low:g}, {high:g}{hi}, got {value:g}")
    return value


def _count(schedule, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{type(schedule).__name__}: {name} must be a non-negative integer, "
                         f"got {value!r}")
    return value


def _positive_int(schedule, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{type(schedule).__name__}: {name} must be a positive integer, "
                         f"got {value!r}")
    return value


# ---------------------------------------------------------------- the CLI's short form

# `graphc train --lr-schedule NAME:field=value,...` -> the class
SCHEDULES: dict[str, type[Schedule]] = {
    "step": StepLR, "multistep": MultiStepLR, "exponential": ExponentialLR,
    "cosine": CosineAnnealingLR, "linear": LinearLR, "onecycle": OneCycleLR,
    "plateau": ReduceLROnPlateau,
}


def parse_schedule(text: str, **defaults) -> Schedule:
    """A schedule from `name:field=value,...`, e.g. `step:step_size=10,gamma=0.5` or
    `multistep:milestones=[10,20]`; `defaults` fill fields the text leaves out (the CLI
    gives onecycle its epochs and steps per epoch)."""
    where = "--lr-schedule"
    name, _, rest = text.partition(":")
    cls = SCHEDULES.get(name.strip())
    if cls is None:
        raise GraphcError(f"{where}: unknown schedule {name.strip()!r} (known: "
                          f"{', '.join(SCHEDULES)})")
    fields = list(inspect.signature(cls).parameters)
    given = {}
    for item in _split_fields(rest):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise GraphcError(f"{where} {name}: expected field=value, got {item.strip()!r}")
        if key not in fields:
            raise GraphcError(f"{where} {name}: unknown field {key!r} (its fields: "
                              f"{', '.join(fields)})")
        given[key] = _value(value)
    required = [p.name for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty]
    missing = [f for f in required if f not in given and f not in defaults]
    if missing:
        raise GraphcError(f"{where} {name}: missing field {missing[0]!r} (e.g. "
                          f"{name}:{missing[0]}=...)")
    try:
        return cls(**{**{k: v for k, v in defaults.items() if k in fields}, **given})
    except InputError as e:
        raise GraphcError(f"{where} {name}: {e}") from None


def _split_fields(text: str) -> list[str]:
    """`text` split at the commas outside brackets (`milestones=[10,20],gamma=0.5`)."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if current.strip() or items:
        items.append(current)
    return [i for i in items if i.strip()]


def _value(text: str):
    """An int, a float, true/false, a [list] of those, or else the text itself."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_value(t) for t in text[1:-1].split(",") if t.strip()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
