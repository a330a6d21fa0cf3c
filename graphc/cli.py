"""The `graphc` command. User mistakes exit 2 with one message; `check` exits 1 on a mismatch."""

from __future__ import annotations

import argparse
import sys

from .errors import GraphcError

TARGETS = ("host", "c99", "cortex-m4", "cortex-m0")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphc", description="Compile a network spec to C99 with "
                                "SymPy-derived gradients, and verify it against NumPy.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="write <name>.c and <name>.h for a spec")
    c.add_argument("spec", help="YAML or JSON spec file")
    c.add_argument("-o", "--out", required=True, help="output directory")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    c.add_argument("--target", choices=TARGETS, default="c99",
                   help="all targets get the same portable C99 for now (no heap, only "
                        "<math.h>, <stddef.h>, <stdint.h>)")

    k = sub.add_parser("check", help="verify C against the NumPy reference on random inputs")
    k.add_argument("spec", help="YAML or JSON spec file")
    k.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    k.add_argument("--batch", type=int, default=8, help="examples per random batch (default 8)")
    k.add_argument("--seed", type=int, default=0, help="seed for params and inputs (default 0)")
    return p


def _compile(args) -> int:
    from . import generate
    from codegen.files import write_sources
    graph, cm = generate(args.spec, args.dtype)
    try:
        c_path, h_path = write_sources(cm, args.out)
    except OSError as e:
        raise GraphcError(f"cannot write to {args.out}: {e.strerror or e}") from None
    item = 4 if args.dtype == "float32" else 8
    print(f"wrote {c_path} and {h_path} ({len(cm.source)} + {len(cm.header)} bytes)")
    print(f"params     {cm.params_size} elements, {cm.params_size * item} bytes "
          f"(gradients the same)")
    for kind, e in cm.entries.items():
        m = e.memory
        print(f"{kind:<10} work {m.fixed * item} + {m.per_example * item}·n bytes; "
              f"{m.report(item, 1)}")
    return 0


def _check(args) -> int:
    from . import compile, load
    from .verify import sample_inputs
    if args.batch < 1:
        raise GraphcError(f"--batch must be at least 1, got {args.batch}")
    graph = load(args.spec)
    inputs = sample_inputs(graph, args.batch, args.seed)
    ok = True
    for dtype in (("float32", "float64") if args.dtype == "both" else (args.dtype,)):
        report = compile(graph, dtype=dtype, seed=args.seed).verify(seed=args.seed, **inputs)
        print(report.table(), end="\n\n")
        ok &= report.ok
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compile":
            return _compile(args)
        return _check(args)
    except GraphcError as e:
        print(f"graphc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
