"""Verification: the generated C against the NumPy reference, and the reference's gradients
against central finite differences."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .reference import Reference


def finite_difference_check(ref: Reference, inputs: dict, *, eps: float = 1e-6,
                            seed: int = 0) -> dict[str, dict]:
    """Compare each param's reference gradient with a central difference of the loss.

    Per param P, along a random unit tangent t: the analytic <dL/dP, t> against
    (L(P + eps·t) - L(P - eps·t)) / (2·eps). The direction is random, not all-ones:
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
    for name, p in work.get_params().items():
        t = rng.standard_normal(p.shape)
        t /= np.linalg.norm(t)
        work.set_params({name: p + eps * t})
        plus = work.loss(**inputs)
        work.set_params({name: p - eps * t})
        minus = work.loss(**inputs)
        work.set_params({name: p})
        analytic = float(np.sum(grads[name] * t))
        numeric = (plus - minus) / (2 * eps)
        err = abs(analytic - numeric)
        report[name] = {"analytic": analytic, "numeric": numeric, "abs_err": err,
                        "rel_err": err / max(abs(analytic), abs(numeric), 1e-12)}
    return report


# ---------------------------------------------------------------- the model's report

# Per dtype: (rtol, atol) for C against the float64 reference, relative to the tensor's
# largest magnitude. float32 leaves room for rounding summed over a batch and a layer.
TOLERANCES = {"float32": (1e-4, 1e-6), "float64": (1e-9, 1e-12)}
FD_TOLERANCE = 1e-6  # relative, reference gradient against central differences (float64)


@dataclass(frozen=True)
class Check:
    tensor: str
    kind: str          # "C vs reference" | "reference vs finite differences"
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool


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

    def table(self) -> str:
        head = ("tensor", "check", "max abs err", "max rel err", "tolerance", "result")
        rows = [head] + [(c.tensor, c.kind, f"{c.max_abs:.3e}", f"{c.max_rel:.3e}",
                          f"{c.tolerance:.0e}", "ok" if c.ok else "MISMATCH") for c in self.checks]
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        lines = [f"{self.model} ({self.dtype}, batch {self.batch})"]
        for k, r in enumerate(rows):
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("all checks passed" if self.ok else
                     f"{len(self.failures())} check(s) failed")
        return "\n".join(lines)

    __str__ = table

    def _repr_markdown_(self) -> str:
        out = [f"**{self.model}** ({self.dtype}, batch {self.batch})", "",
               "| tensor | check | max abs err | max rel err | tolerance | result |", "|---|---|---|---|---|---|"]
        out += [f"| {c.tensor} | {c.kind} | {c.max_abs:.3e} | {c.max_rel:.3e} | {c.tolerance:.0e} | "
                f"{'ok' if c.ok else '**MISMATCH**'} |" for c in self.checks]
        return "\n".join(out)


def _compare(name: str, got: np.ndarray, want: np.ndarray, dtype: str) -> Check:
    rtol, atol = TOLERANCES[dtype]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not np.all(np.isfinite(got)) or not np.all(np.isfinite(want)):
        err = float("nan") if not np.array_equal(got, want, equal_nan=True) else 0.0
    ok = bool(err <= atol + rtol * scale)  # NaN compares false: a mismatch
    return Check(name, "C vs reference", err, err / scale if scale else err, rtol, ok)


def sample_inputs(graph, n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that respect how each input is used: loss targets get valid targets
    (probability rows for softmax_cross_entropy, [0, 1] for bce_with_logits), inputs of a
    positive-domain argument (log, a divisor) get positive values, the rest N(0, 1)."""
    from .ops import OPS
    rng = np.random.default_rng(seed)
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
        if kind == "probabilities":
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
    finite differences along random directions."""
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
        report.checks.append(_compare(name, got, want[name], dtype))
    if graph.loss:
        loss, grads = model.gradients(**inputs)
        ref_loss, ref_grads = ref.gradients(**inputs)
        report.checks.append(_compare(f"loss ({graph.loss})", np.array(loss), np.array(ref_loss), dtype))
        for p in graph.params:
            report.checks.append(_compare(f"d loss/d {p}", grads[p], ref_grads[p], dtype))
        for p, r in finite_difference_check(ref, inputs, seed=seed).items():
            report.checks.append(Check(f"d loss/d {p}", "reference vs finite differences",
                                       r["abs_err"], r["rel_err"], FD_TOLERANCE,
                                       bool(r["rel_err"] <= FD_TOLERANCE or r["abs_err"] <= 1e-10)))
    return report
