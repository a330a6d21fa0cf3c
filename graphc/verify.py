"""Checks of gradients: the NumPy reference against finite differences."""

from __future__ import annotations

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
