"""CasADi's generated C: the same step built from CasADi symbols (SX, scalar expressions, for
small nets; MX, matrix operations, for the wide ones), `casadi.gradient` for the
backward pass, C from `casadi.CodeGenerator` with `casadi_real` float, and timed by the
same generated harness as graphc's pure C (benchmarks/charness.py), compiled with the
same compiler and flags.

CasADi is column-major: the params vector holds each W row-major, read as Wᵀ, and the
(batch, features) arrays are read as (features, batch) matrices, so every array is the
same bytes as graphc's. One step maps params to new params, so the harness alternates two
params buffers. Softmax is shifted by the batch's max logit (the same value for every
shift; CasADi has no per-column max)."""

from __future__ import annotations

from pathlib import Path

from .. import charness
from ..workloads import LR, Problem
from . import Runner, Skip, mlp_only

SX_LIMIT = 200_000   # multiply-adds per call above which the net is built from MX


def version() -> str:
    try:
        import casadi
    except ImportError:
        raise Skip("not installed (pip install '.[bench]')") from None
    return casadi.__version__


def function(problem: Problem, sym):
    """The casadi.Function of a step ([params, x, y] -> [loss, new params]) or of the
    forward pass ([params, x] -> [logits])."""
    import casadi as ca
    w = problem.workload
    n = w.batch
    p = sym.sym("p", problem.flat().size)
    x = sym.sym("x", w.sizes[0], n)
    a, at = x, 0
    for k, (i, o) in enumerate(w.layers):
        WT = ca.reshape(p[at:at + o * i], i, o)
        b = p[at + o * i:at + o * i + o]
        at += o * i + o
        a = ca.mtimes(WT.T, a) + ca.repmat(b, 1, n)
        if k < len(w.layers) - 1:
            a = ca.fmax(a, 0)
    if not w.train:
        return ca.Function("cas_forward", [p, x], [a])
    y = sym.sym("y", w.sizes[-1], n)
    shift = ca.mmax(a)
    lse = ca.log(ca.sum1(ca.exp(a - shift))) + shift
    loss = ca.sum2(lse - ca.sum1(y * a)) / n
    return ca.Function("cas_step", [p, x, y], [loss, p - LR * ca.gradient(loss, p)])


def runners(problem: Problem, workdir: Path) -> list[Runner]:
    mlp_only(problem)
    import casadi as ca
    w = problem.workload
    kind = "SX" if w.batch * sum(i * o for i, o in w.layers) <= SX_LIMIT else "MX"
    f = function(problem, ca.SX if kind == "SX" else ca.MX)
    name = f.name()
    out = workdir / f"casadi_{w.key.lower()}"
    out.mkdir(parents=True, exist_ok=True)
    gen = ca.CodeGenerator(f"{name}.c", {"casadi_real": "float", "with_header": True})
    gen.add(f)
    gen.generate(str(out) + "/")
    sources = {f"{name}.c": (out / f"{name}.c").read_text(),
               f"{name}.h": (out / f"{name}.h").read_text()}
    flat = problem.flat()
    decls = [f"const casadi_real *arg[{max(1, f.sz_arg())}];",
             f"casadi_real *res[{max(1, f.sz_res())}];",
             f"casadi_int iw[{max(1, f.sz_iw())}];"]
    zeroed = [("w", f.sz_w())]
    if w.train:
        read = [("p0", flat), ("x", problem.x), ("y", problem.y)]
        zeroed.append(("p1", flat.size))
        setup = ["arg[1] = x;", "arg[2] = y;", "res[0] = &result;"]
        call = ("arg[0] = (it & 1) ? p1 : p0; res[1] = (it & 1) ? p0 : p1; "
                f"{name}(arg, res, iw, w, 0);")
        dump = []
    else:
        read = [("p0", flat), ("x", problem.x)]
        dump = [("out", w.batch * w.sizes[-1])]
        zeroed += dump
        setup = ["arg[0] = p0;", "arg[1] = x;", "res[0] = out;"]
        call = f"{name}(arg, res, iw, w, 0);"
    program = charness.Program(f"casadi_{w.key.lower()}_{name}", sources, f"{name}.h", read,
                               zeroed, call, dump, decls, setup)
    return [charness.runner(f"CasADi C ({kind})", program, workdir, w.train,
                            f"{kind}, {len(sources[name + '.c'])} bytes of C")]
