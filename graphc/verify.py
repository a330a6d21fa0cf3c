"""Verification: the generated C against the NumPy reference, and the reference's gradients
against central finite differences."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .reference import Reference


def finite_difference_check(ref: Reference, inputs: dict, *, eps: float = 1e-6,
                            seed: int = 0) -> dict[str, dict]:
    """Compare each param's reference gradient with a central difference of the loss.

    Per trainable param P, along a random unit tangent t: the analytic <dL/dP, t> against
    (L(P + eps·t) - L(P - eps·t)) / (2·eps), L the loss the gradients differentiate (in
    training mode: batch norm by the batch's statistics). The direction is random, not all-ones:
    softmax ignores a constant shift of its input, so along all-ones both sides are zero
    for a softmax input whatever its backward computes (zeros would pass).

    Runs in float64 on a copy of `ref`'s params, so `ref` itself is left untouched.
    Returns {param: {"analytic", "numeric", "abs_err", "rel_err"}}.
    """
    work = Reference(ref.graph, dtype="float64")
    work.set_params(ref.get_params())
    _, grads = work.gradients(**inputs)
    rng = np.random.default_rng(seed)
    report = {}
    params = work.get_params()
    for name in work.graph.trainable_params:
        p = params[name]
        t = rng.standard_normal(p.shape)
        t /= np.linalg.norm(t)
        work.set_params({name: p + eps * t})
        plus = work.training_loss(**inputs)
        work.set_params({name: p - eps * t})
        minus = work.training_loss(**inputs)
        work.set_params({name: p})
        analytic = float(np.sum(grads[name] * t))
        numeric = (plus - minus) / (2 * eps)
        err = abs(analytic - numeric)
        report[name] = {"analytic": analytic, "numeric": numeric, "abs_err": err,
                        "rel_err": err / max(abs(analytic), abs(numeric), 1e-12)}
    return report


# ---------------------------------------------------------------- where it is differentiable

FD_TOLERANCE = 1e-6    # relative, reference gradient against central differences (float64)
NEARBY_TRIES = 4       # nearby points tried when the params sit on a kink
NEARBY_SCALE = 1e-4    # how far the first one is, relative to the params' size; then x10 each
# A float64 loss of a deep net (sums over many elements, a dozen batch norms) is off by tens
# of ulps, and the central difference divides that by the step: at |L| = 2.6 and a step of
# 1e-6 one ulp alone is 5e-10. A gradient that is exactly 0 (a conv bias before a batch
# norm) then "disagrees" with that noise; below this floor the difference cannot decide.
FD_ROUNDING_ULPS = 64


@dataclass(frozen=True)
class GradientCheck:
    """One param's reference gradient against central differences (`gradient_check`)."""
    param: str
    analytic: float        # <dL/dP, t> along a random unit direction t
    numeric: float         # (L(P + eps·t) - L(P - eps·t)) / (2·eps)
    abs_err: float
    rel_err: float
    ok: bool
    finite: bool = True    # False: a loss or gradient involved is NaN or infinite
    note: str = ""         # where it was checked instead, or where values are not finite


def _agree(analytic: float, numeric: float, loss: float = 0.0,
           eps: float = 1e-6) -> tuple[float, float, bool]:
    """Whether the two agree to FD_TOLERANCE, or within the central difference's rounding
    noise (FD_ROUNDING_ULPS of the loss over the step, at least 1e-10)."""
    err = abs(analytic - numeric)
    rel = err / max(abs(analytic), abs(numeric), 1e-12)
    noise = max(1e-10, FD_ROUNDING_ULPS * float(np.finfo(np.float64).eps)
                * max(abs(loss), 1.0) / eps)
    return err, rel, bool(rel <= FD_TOLERANCE or err <= noise)   # NaN: False


def _kinked(f, f0: float, h: float) -> bool:
    """Whether f (the loss along a line, f(0) = f0) is not smooth at the scale of the step
    h: its one-sided differences at h and at h/2 disagree beyond rounding. For a smooth f
    the gap between the forward and the backward difference is h·f'' (it halves with h),
    and the central differences at h and h/2 differ by h²·f'''/8; across a kink the gap
    stays the jump in slope, or the central difference moves with the step."""
    fp, fm, fp2, fm2 = f(h), f(-h), f(h / 2), f(-h / 2)
    values = (f0, fp, fm, fp2, fm2)
    if not all(math.isfinite(v) for v in values):
        return True
    dp, dm = (fp - f0) / h, (f0 - fm) / h
    dp2, dm2 = (fp2 - f0) / (h / 2), (f0 - fm2) / (h / 2)
    # Rounding: each loss is off by some ulps of the largest value; a quotient at h/2
    # amplifies that by 4/h, the two combinations below by at most 20/h.
    noise = 20 * 16 * np.finfo(np.float64).eps * max(abs(v) for v in values) / h
    tol = noise + 1e-9 * max(abs(dp), abs(dm), abs(dp2), abs(dm2))
    return abs((dp - dm) - 2 * (dp2 - dm2)) > tol or abs((dp + dm) - (dp2 + dm2)) / 2 > tol


def gradient_check(ref: Reference, inputs: dict, *, eps: float = 1e-6,
                   seed: int = 0) -> dict[str, GradientCheck]:
    """`finite_difference_check` (the same random directions), where the loss is
    differentiable only.

    When a param's central difference disagrees with the reference's gradient at params
    where the loss is not smooth at the step's scale (a relu at 0: the params of a
    zero-initialized relu net sit on its kink, where the central difference gives the mean
    of the two slopes and the reference, like torch, the left one), the param is checked
    at a nearby point instead: every param moved by a small seeded random amount, further
    on each of NEARBY_TRIES tries, until the loss is smooth there. A wrong gradient is
    wrong there too. Where a loss or gradient is NaN or infinite the check fails, and its
    note says where. Runs in float64; `ref`'s params are left as they were."""
    if ref.dtype == np.float64:   # building a Reference is not free (it lambdifies formulas)
        saved = ref.get_params()
        try:
            return _gradient_check(ref, _trainable(ref, saved), inputs, eps, seed)
        finally:
            ref.set_params(saved)
    work = Reference(ref.graph, dtype="float64")
    work.set_params(ref.get_params())
    return _gradient_check(work, _trainable(work, work.get_params()), inputs, eps, seed)


def _trainable(ref: Reference, params: dict) -> dict:
    """The params that have gradients (running statistics have none)."""
    return {k: params[k] for k in ref.graph.trainable_params}


def _gradient_check(work: Reference, at: dict, inputs: dict, eps: float,
                    seed: int) -> dict[str, GradientCheck]:
    loss0, grads = work.gradients(**inputs)
    loss0 = float(loss0)
    rng = np.random.default_rng(seed)
    directions = {}
    for name, p in at.items():   # drawn as finite_difference_check draws them
        t = rng.standard_normal(p.shape)
        directions[name] = t / np.linalg.norm(t) if t.size else t

    def loss_at(params: dict) -> float:
        work.set_params(params)
        return float(work.training_loss(**inputs))

    def along(params: dict, name: str):
        t = directions[name]
        return lambda s: loss_at({**params, name: params[name] + s * t})

    def central(params: dict, name: str, grad: np.ndarray) -> tuple[float, float]:
        f = along(params, name)
        return float(np.sum(grad * directions[name])), (f(eps) - f(-eps)) / (2 * eps)

    nearby: list = []   # (scale, params, loss, grads) of the points tried, for every param

    def nearby_point(k: int):
        while len(nearby) <= k:
            flat = np.concatenate([np.ravel(p) for p in at.values()])
            scale = NEARBY_SCALE * 10 ** len(nearby) * max(1.0, float(np.sqrt(np.mean(flat ** 2))))
            jitter = np.random.default_rng([seed, 7919, len(nearby)])
            moved = {n: p + scale * jitter.standard_normal(p.shape) for n, p in at.items()}
            work.set_params(moved)
            loss, g = work.gradients(**inputs)
            nearby.append((scale, moved, float(loss), g))
        return nearby[k]

    def not_finite(name: str, note: str, analytic=math.nan, numeric=math.nan) -> GradientCheck:
        return GradientCheck(name, analytic, numeric, math.nan, math.nan, False, False, note)

    out: dict[str, GradientCheck] = {}
    for name, p in at.items():
        if p.size == 0:
            out[name] = GradientCheck(name, 0.0, 0.0, 0.0, 0.0, True)
            continue
        if not math.isfinite(loss0):
            out[name] = not_finite(name, f"the reference's loss {describe_nonfinite(np.asarray(loss0))} "
                                         f"at these params, so finite differences cannot check "
                                         f"the gradient of {name}")
            continue
        bad = ~np.isfinite(grads[name])
        if bad.any():
            out[name] = not_finite(name, f"the reference's gradient of {name} "
                                         f"{describe_nonfinite(grads[name], bad)}")
            continue
        analytic, numeric = central(at, name, grads[name])
        if not math.isfinite(numeric):
            out[name] = not_finite(name, f"the reference's loss is not finite at these params "
                                         f"moved by {eps:g} along a direction in {name}",
                                   analytic, numeric)
            continue
        err, rel, ok = _agree(analytic, numeric, loss0, eps)
        result = GradientCheck(name, analytic, numeric, err, rel, ok)
        if not ok and _kinked(along(at, name), loss0, eps):
            result = GradientCheck(name, analytic, numeric, err, rel, False, True,
                                   f"the params sit on a kink (not differentiable here), and "
                                   f"so did the {NEARBY_TRIES} nearby points tried")
            for k in range(NEARBY_TRIES):
                scale, moved, loss, g = nearby_point(k)
                if not (math.isfinite(loss) and np.all(np.isfinite(g[name]))):
                    continue
                a, nu = central(moved, name, g[name])
                e, r, good = _agree(a, nu, loss, eps)
                where = (f"checked at a nearby point (every param moved by about {scale:.0e}, "
                         f"seeded): the params sit on a kink (not differentiable here)")
                if good:
                    result = GradientCheck(name, a, nu, e, r, True, True, where)
                    break
                if math.isfinite(nu) and not _kinked(along(moved, name), loss, eps):
                    result = GradientCheck(name, a, nu, e, r, False, True,
                                           where + "; the gradient disagrees there as well")
                    break
        out[name] = result
    return out


# ---------------------------------------------------------------- non-finite values in words

def _kind(values: np.ndarray) -> str:
    if np.all(np.isnan(values)):
        return "NaN"
    if np.all(np.isposinf(values)):
        return "+inf"
    if np.all(np.isneginf(values)):
        return "-inf"
    return "infinite" if not np.any(np.isnan(values)) else "not finite"


SHOWN_POSITIONS = 3   # positions of non-finite elements named, in row-major order


def describe_nonfinite(a: np.ndarray, bad: np.ndarray | None = None) -> str:
    """'is NaN at 5 of 128 elements (first at [0, 2], [1, 7], [3, 0], ...)', 'is not
    finite', ... for the elements of `a` marked `bad` (by default its NaN and infinite
    ones)."""
    a = np.asarray(a, dtype=np.float64)
    bad = ~np.isfinite(a) if bad is None else bad
    kind = _kind(a[bad])
    count = int(bad.sum())
    if a.size == 1:
        return f"is {kind}"
    if count == a.size:
        return f"is {kind} at all {count} elements"
    shown = ", ".join("[" + ", ".join(str(int(i)) for i in at) + "]"
                      for at in np.argwhere(bad)[:SHOWN_POSITIONS])
    more = ", ..." if count > SHOWN_POSITIONS else ""
    return f"is {kind} at {count} of {a.size} elements (first at {shown}{more})"


# ---------------------------------------------------------------- the model's report

# Per dtype of the compiled model: (rtol, floor) for C against the float64 reference. The
# tolerance is rtol times the reference tensor's largest magnitude, or the floor where that
# is smaller (a tensor of zeros). The reference runs on the same dtype-rounded params and
# inputs, so the difference is the C's own rounding; float32 leaves room for rounding summed
# over a batch and a layer. `verify` and the test suite (tests/conftest.py) both judge by
# `within_tolerance`.
TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-4, 1e-6), "float64": (1e-9, 1e-12)}


def within_tolerance(got, want, dtype: str) -> tuple[bool, float, float]:
    """(ok, err, tol): err = max |got - want|, tol = max(rtol · max |want|, floor) with
    (rtol, floor) = TOLERANCES[dtype], and ok = err <= tol. NaN anywhere, or shapes that
    differ (err NaN), are not ok; two empty tensors are."""
    rtol, floor = TOLERANCES[str(dtype)]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if want.size == 0 and got.size == 0:
        return True, 0.0, floor
    tol = max(rtol * float(np.max(np.abs(want))), floor) if want.size else floor
    if got.shape != want.shape:
        return False, math.nan, tol
    err = float(np.max(np.abs(got - want)))
    return bool(err <= tol), err, tol   # NaN compares false


@dataclass(frozen=True)
class Check:
    tensor: str
    kind: str          # "C vs reference" | "reference vs finite differences"
    max_abs: float     # NaN when values that should agree are not finite
    max_rel: float
    tolerance: float
    ok: bool
    note: str = ""     # in words: where values are not finite, where it was checked instead
    finite: bool = True

    @property
    def result(self) -> str:
        return "ok" if self.ok else "MISMATCH" if self.finite else "NOT FINITE"


def _err(x: float) -> str:
    return f"{x:.3e}" if math.isfinite(x) else "n/a"


@dataclass
class VerifyReport:
    model: str
    dtype: str
    batch: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def notes(self) -> list[str]:
        """One line per check that has something to say, numbered as the table marks it."""
        return [f"[{k}] {c.tensor}, {c.kind}: {c.note}"
                for k, c in enumerate((c for c in self.checks if c.note), 1)]

    def _results(self) -> list[str]:
        out, k = [], 0
        for c in self.checks:
            if c.note:
                k += 1
            out.append(c.result + (f" [{k}]" if c.note else ""))
        return out

    COLUMNS = ("tensor", "check", "max abs err", "max rel err", "tolerance", "result")

    def rows(self) -> list[tuple[str, ...]]:
        """The table's cells, one row per check, in COLUMNS' order."""
        return [(c.tensor, c.kind, _err(c.max_abs), _err(c.max_rel), f"{c.tolerance:.0e}", r)
                for c, r in zip(self.checks, self._results())]

    def table(self) -> str:
        head = self.COLUMNS
        rows = [head] + self.rows()
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        lines = [f"{self.model} ({self.dtype}, batch {self.batch})"]
        for k, r in enumerate(rows):
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += self.notes()
        lines.append("all checks passed" if self.ok else
                     f"{len(self.failures())} check(s) failed")
        return "\n".join(lines)

    __str__ = table

    def _repr_markdown_(self) -> str:
        out = [f"**{self.model}** ({self.dtype}, batch {self.batch})", "",
               "| tensor | check | max abs err | max rel err | tolerance | result |", "|---|---|---|---|---|---|"]
        out += [f"| {c.tensor} | {c.kind} | {_err(c.max_abs)} | {_err(c.max_rel)} | {c.tolerance:.0e} | "
                f"{r if c.ok else '**' + r + '**'} |" for c, r in zip(self.checks, self._results())]
        notes = [f"- {n}" for n in self.notes()]
        return "\n".join(out + ([""] + notes if notes else []))

    def _repr_html_(self) -> str:
        from .display import verify_html
        return verify_html(self)


def _compare(name: str, got: np.ndarray, want: np.ndarray, dtype: str, what: str | None = None) -> Check:
    """C (`got`) against the reference (`want`). `what` names the tensor in words ("output
    'logits'", "loss", "gradient of W1") for the note on values that are not finite."""
    rtol, _ = TOLERANCES[dtype]
    what = what or f"'{name}'"
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad_got, bad_want = ~np.isfinite(got), ~np.isfinite(want)
    note = ""
    if bad_got.any() or bad_want.any():
        if np.array_equal(bad_got, bad_want) and np.array_equal(got[bad_got], want[bad_want],
                                                                equal_nan=True):
            # The same NaN and inf in both: they agree there; the rest is compared.
            note = (f"the {what} {describe_nonfinite(want, bad_want)} in both the C and the "
                    f"reference" + ("; the other elements are compared" if (~bad_want).any() else ""))
            got, want = got[~bad_got], want[~bad_want]
        else:
            parts = []
            if bad_got.any():
                parts.append(f"the C {what} {describe_nonfinite(got, bad_got)}"
                             + ("" if bad_want.any() else ", where the reference is finite"))
            if bad_want.any():
                parts.append(f"the reference's {what} {describe_nonfinite(want, bad_want)}"
                             + ("" if bad_got.any() else ", where the C is finite"))
            # The elements finite on both sides are still compared, and reported.
            both = ~bad_got & ~bad_want
            err = rel = math.nan
            if both.any():
                _, err, _ = within_tolerance(got[both], want[both], dtype)
                scale = float(np.max(np.abs(want[both])))
                rel = err / scale if scale else err
                k = int(both.sum())
                parts.append(f"the {k} element{'s' * (k != 1)} finite in both "
                             f"differ{'s' * (k == 1)} by at most {err:.3e}")
            return Check(name, "C vs reference", err, rel, rtol, False, "; ".join(parts),
                         finite=False)
    ok, err, _ = within_tolerance(got, want, dtype)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return Check(name, "C vs reference", err, err / scale if scale else err, rtol, ok, note)


def sample_inputs(graph, n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that respect how each input is used: loss targets get valid targets
    (probability rows for softmax_cross_entropy, [0, 1] for bce_with_logits), inputs of a
    positive-domain argument (log, a divisor) get positive values, int32 inputs indices
    drawn uniformly from their range (an embedding's rows, the classes), the rest N(0, 1)."""
    from .ops import OPS
    rng = np.random.default_rng(seed)
    bounds = graph.index_bounds()
    domain: dict[str, str] = {}
    for v in graph.nodes.values():
        for k, i in enumerate(v.inputs):
            d = OPS[v.op].domain[k] if k < len(OPS[v.op].domain) else None
            if i in graph.inputs and d:
                domain.setdefault(i, d)
    out = {}
    for name, v in graph.inputs.items():
        shape = (n,) + v.shape
        kind = domain.get(name)
        if v.dtype == "int32":
            bound = bounds[name].bound if name in bounds else 1
            out[name] = rng.integers(0, bound, shape).astype(np.int32)
        elif kind == "probabilities":
            z = rng.standard_normal(shape)
            e = np.exp(z - z.max(axis=-1, keepdims=True))
            out[name] = e / e.sum(axis=-1, keepdims=True)
        elif kind == "unit":
            out[name] = rng.uniform(0.0, 1.0, shape)
        elif kind == "positive":
            out[name] = rng.uniform(0.5, 2.0, shape)
        else:
            out[name] = rng.standard_normal(shape)
    return out


def verify(model, inputs: dict | None = None, *, seed: int = 0, n: int = 8) -> VerifyReport:
    """Every output, the loss and every gradient of `model` (C) against the float64
    reference at the model's params, then the reference's gradients against central
    finite differences along random directions, where the loss is differentiable (see
    `gradient_check`). Values that are not finite are reported in words."""
    from .reference import Reference
    graph = model.graph
    inputs = sample_inputs(graph, n, seed) if not inputs else inputs
    ref = Reference(graph, dtype="float64")
    ref.set_params({k: v.astype(np.float64) for k, v in model.get_params().items()})
    batch = len(next(iter(inputs.values())))
    report = VerifyReport(graph.name, model.dtype.name, batch)
    dtype = model.dtype.name
    want = ref.forward(**inputs)
    for name, got in model.forward(**inputs).items():
        report.checks.append(_compare(name, got, want[name], dtype, f"output '{name}'"))
    if graph.loss:
        checks = _c_gradient_checks(model, ref, inputs)
        if any(not c.ok and c.finite for c in checks):
            checks = _recheck_nearby(model, ref, inputs, checks, seed)
        report.checks += checks
        for p, r in gradient_check(ref, inputs, seed=seed).items():
            report.checks.append(Check(f"d loss/d {p}", "reference vs finite differences",
                                       r.abs_err, r.rel_err, FD_TOLERANCE, r.ok, r.note, r.finite))
    return report


def _c_gradient_checks(model, ref, inputs: dict) -> list[Check]:
    """The C's loss and gradients against the reference's, at their params."""
    dtype = model.dtype.name
    loss, grads = model.gradients(**inputs)
    ref_loss, ref_grads = ref.gradients(**inputs)
    checks = [_compare(f"loss ({model.graph.loss})", np.array(loss), np.array(ref_loss), dtype,
                       "loss")]
    for p in model.graph.trainable_params:
        checks.append(_compare(f"d loss/d {p}", grads[p], ref_grads[p], dtype, f"gradient of {p}"))
    return checks


def _recheck_nearby(model, ref, inputs: dict, checks: list[Check], seed: int) -> list[Check]:
    """The C's gradients where they disagree with the reference's, compared again at nearby
    params (moved as `gradient_check` moves them, further on each of NEARBY_TRIES tries).

    A relu input within the C's rounding of 0 can fall on the other side of the kink in
    the C than in the float64 reference: its mask, and so the gradients, then differ by
    far more than rounding (a ResNet-8 at batch 8 in float32 has such an input: flipping
    that one mask in float64 gives the C's gradients to 1e-5). A wrong gradient is wrong
    at a nearby point too; an agreement there is reported with a note. The model's and
    the reference's params are left as they were."""
    graph, dtype = model.graph, model.dtype.name
    saved = model.get_params()
    trainable = list(graph.trainable_params)
    flat = np.concatenate([np.ravel(saved[p]) for p in trainable]).astype(np.float64)
    size = max(1.0, float(np.sqrt(np.mean(flat ** 2)))) if flat.size else 1.0
    failed = {c.tensor for c in checks if not c.ok}
    try:
        for k in range(NEARBY_TRIES):
            scale = NEARBY_SCALE * 10 ** k * size
            jitter = np.random.default_rng([seed, 104729, k])
            moved = {p: (v + scale * jitter.standard_normal(v.shape)).astype(v.dtype)
                     if p in graph.trainable_params else v for p, v in saved.items()}
            model.set_params(moved)
            ref.set_params({p: v.astype(np.float64) for p, v in moved.items()})
            again = _c_gradient_checks(model, ref, inputs)
            if all(c.ok for c in again):
                note = (f"checked at a nearby point (every param moved by about {scale:.0e}, "
                        f"seeded): at the params given, the {dtype} C and the float64 "
                        f"reference disagree, as where a relu input lies within rounding of "
                        f"its kink and each takes another side")
                return [dataclasses.replace(c, note=note) if c.tensor in failed else old
                        for c, old in zip(again, checks)]
    finally:
        model.set_params(saved)
        ref.set_params({p: v.astype(np.float64) for p, v in saved.items()})
    return checks
