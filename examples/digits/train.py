"""The whole job, end to end, with graphc's Python API:

    python examples/digits/train.py [--out DIR]      (default DIR: out/digits)

1. load the spec and compile it to C (float32, built through cffi);
2. verify the C against the NumPy reference and finite differences on a small batch;
3. train in C (`graphc.fit`: only the data loop is Python), validating on a held-out split;
4. save the loss curve (loss.png) and the params (params.npz);
5. export standalone C with the params baked in (c/digits.c, c/digits.h), build it with the
   host compiler and strict flags, together with a generated `main` that runs
   `digits_predict` on the held-out images compiled into it;
6. check that its predictions are the Python model's.

Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

import graphc
from codegen.files import write_sources
from codegen.harness import harness, parse_output
from codegen.targets import CHECK_FLAGS
from graphc.data import load_dataset, split

HERE = Path(__file__).resolve().parent
STRICT = (*CHECK_FLAGS, "-O2")   # the review flags graphc's own check uses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/digits", help="output directory (default out/digits)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="init, split and shuffling")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    graph = graphc.load(HERE / "spec.yaml")
    train, test = split(load_dataset("digits", graph), test_fraction=0.2, seed=args.seed)
    model = graphc.compile(graph, dtype="float32", seed=args.seed)

    report = model.verify(seed=args.seed, **{k: a[:8] for k, a in train.items()})
    print(report.table())
    if not report.ok:
        return 1

    history = graphc.fit(model, train, epochs=args.epochs, batch_size=32, seed=args.seed,
                         validation=test)
    print(history)
    accuracy = graphc.evaluate(model, test)["accuracy"]
    print(f"test accuracy {accuracy:.2%} on {len(test['x'])} held-out images")
    history.plot(out / "loss.png")
    model.save_params(out / "params.npz")

    # Inference C with the trained params as a static const table: no Python, no files.
    _, cmodule = graphc.generate(graph, "float32", params=out / "params.npz")
    c_dir = out / "c"
    c_path, h_path = write_sources(cmodule, c_dir)
    (c_dir / "main.c").write_text(harness(cmodule, None, test))
    cc = shlex.split(os.environ.get("CC") or "cc")
    build = subprocess.run([*cc, *STRICT, "main.c", c_path.name, "-o", "predict", "-lm"],
                           cwd=c_dir, capture_output=True, text=True)
    if build.returncode != 0:
        print(f"building the standalone C failed:\n{build.stderr}", file=sys.stderr)
        return 1
    run = subprocess.run([str((c_dir / "predict").resolve())], capture_output=True, text=True,
                         check=True)
    c_logits = parse_output(run.stdout)["logits"].reshape(-1, 10)
    py_logits = model.forward(x=test["x"])["logits"]
    same = np.array_equal(c_logits.argmax(axis=1), py_logits.argmax(axis=1))
    print(f"wrote {out / 'loss.png'}, {out / 'params.npz'}, {c_path}, {h_path}")
    print(f"standalone C ({' '.join(cc + list(STRICT))}): {len(c_logits)} predictions, "
          f"{'all equal to' if same else 'NOT equal to'} the Python model's "
          f"(max |logit difference| {np.abs(c_logits - py_logits).max():.2g})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
