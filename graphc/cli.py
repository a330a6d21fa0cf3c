"""The `graphc` command. User mistakes exit 2 with one message; `check` exits 1 on a mismatch;
`train` exits 130 when interrupted, after reporting and saving what it has.

Only light modules are imported here (argparse, the dtype and optimizer tables): each
command imports its pipeline when it runs, so `graphc --help` and `--version` load no
SymPy or NumPy (tests/test_cli.py checks)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import __version__
from .dtypes import DTYPES
from .errors import GraphcError
from .optimizers import OPTIMIZERS

TARGETS = ("host", "c99", "cortex-m4", "cortex-m0")
LOSSES = ("softmax_cross_entropy", "mse", "bce_with_logits")   # graphc.onnx's


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphc", description="Compile a network spec to C99 with "
                                "SymPy-derived gradients, and verify it against NumPy.")
    p.add_argument("--version", action="version", version=f"graphc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="write <name>.c and <name>.h for a spec")
    c.add_argument("spec", help="YAML or JSON spec file")
    c.add_argument("-o", "--out", required=True, help="output directory")
    c.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    c.add_argument("--target", choices=TARGETS, default="c99",
                   help="every target gets portable C99 (no heap, only <math.h>, <stddef.h>, "
                        "<stdint.h>); the header says how to compile it; Cortex-M targets "
                        "pack the arena tighter and report flash/RAM when arm-none-eabi-gcc "
                        "is installed")
    c.add_argument("--max-batch", type=int, metavar="N",
                   help="plan static memory for batches up to N: adds <NAME>_MAX_BATCH to "
                        "the header and reports memory at N (default: report at batch 1)")
    c.add_argument("--params", metavar="FILE.npz",
                   help="trained params (from `graphc train --out`) to bake into the C as a "
                        "static const array, with an inference entry <name>_predict")

    k = sub.add_parser("check", help="verify C against the NumPy reference on random inputs")
    k.add_argument("spec", help="YAML or JSON spec file")
    k.add_argument("--dtype", choices=(*DTYPES, "both"), default="both")
    k.add_argument("--batch", type=int, default=8, help="examples per random batch (default 8)")
    k.add_argument("--seed", type=int, default=0, help="seed for params and inputs (default 0)")

    t = sub.add_parser("train", help="train a spec in generated C and report held-out metrics")
    t.add_argument("spec", nargs="?", help="YAML or JSON spec file (or .onnx); with --resume "
                   "it may be left out, and if given must describe the checkpoint's model")
    t.add_argument("--data", required=True, metavar="digits|FILE.npz",
                   help="'digits' (scikit-learn's 8x8 digits, matched to the inputs by shape) "
                        "or an .npz file with one array per input")
    t.add_argument("--epochs", type=int, default=20, help="passes over the data (default 20)")
    t.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    t.add_argument("--optimizer", choices=tuple(OPTIMIZERS),
                   help="replaces the spec's optimizer section (torch's defaults otherwise)")
    t.add_argument("--lr", type=float, help="learning rate of the optimizer that applies")
    t.add_argument("--clip-grad-norm", type=float, metavar="MAX_NORM",
                   help="scale the gradients to a global 2-norm of at most MAX_NORM before "
                        "each step (torch.nn.utils.clip_grad_norm_)")
    t.add_argument("--dtype", choices=tuple(DTYPES),
                   help="default float32 (with --resume: the checkpoint's)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed for init, the split and the shuffling (default 0)")
    t.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the data held out for the final metrics (default 0.2)")
    t.add_argument("--validation-split", type=float, metavar="F",
                   help="hold out the last fraction F of the training examples (after the "
                        "test split, before shuffling) and record val_loss each epoch")
    t.add_argument("--lr-schedule", metavar="NAME:FIELD=VALUE,...",
                   help="a learning-rate schedule as torch.optim.lr_scheduler's: step, "
                        "multistep, exponential, cosine, linear, onecycle, plateau, e.g. "
                        "'step:step_size=10,gamma=0.5', 'multistep:milestones=[10,15]', "
                        "'cosine:T_max=20', 'onecycle:max_lr=0.1' (stepped each batch; its "
                        "steps from --epochs), 'plateau:patience=2' (on val_loss with "
                        "--validation-split, else loss)")
    t.add_argument("--out", metavar="FILE.npz", help="write the trained params here")
    t.add_argument("--save", metavar="RUN.graphc",
                   help="write a checkpoint here: the spec, params and optimizer state (step "
                        "count, moments), one file to --resume from")
    t.add_argument("--resume", metavar="RUN.graphc",
                   help="continue training a checkpoint (from --save) for --epochs more: its "
                        "params, optimizer and step count carry on; give the same --data, "
                        "--seed and --test-fraction to hold out the same examples")
    t.add_argument("--loss", choices=LOSSES,
                   help="for an .onnx model: the loss to train it with (fine-tuning from its "
                        "weights)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("import", help="an ONNX model as an editable spec and its weights")
    i.add_argument("model", help="ONNX file (PyTorch's torch.onnx.export, opset 13 on)")
    i.add_argument("-o", "--out", required=True, metavar="SPEC.yaml", help="the spec to write")
    i.add_argument("--params", metavar="PARAMS.npz",
                   help="where to write the weights (default: beside the spec, <stem>.npz); "
                        "`graphc compile SPEC --params PARAMS.npz` bakes them into the C")
    i.add_argument("--loss", choices=LOSSES,
                   help="add this loss on the model's output, so that the spec can be trained "
                        "(class indices as an int32 input 'target' for softmax_cross_entropy)")

    e = sub.add_parser("export", help="a spec's inference graph as an ONNX file")
    e.add_argument("spec", help="YAML or JSON spec file (or .onnx)")
    e.add_argument("-o", "--out", required=True, metavar="MODEL.onnx")
    e.add_argument("--params", metavar="PARAMS.npz",
                   help="the weights to write (from `graphc train --out`); default: the "
                        "spec's initializers drawn with seed 0")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")

    x = sub.add_parser("explain", help="the chain rule step by step, from formula to C")
    x.add_argument("spec", help="YAML or JSON spec file")
    x.add_argument("--wrt", metavar="PARAM[i,j]",
                   help="the param whose gradient to explain (default: all), or one element of it, "
                        "e.g. 'W2[0,0]', to follow through the worked example (default: the largest)")
    x.add_argument("--format", choices=("text", "markdown", "latex", "html"), default="text")
    x.add_argument("-o", "--out", metavar="FILE", help="write here (atomically) instead of stdout")
    x.add_argument("--at", default="random", metavar="random|none|FILE.npz",
                   help="numbers for a worked example, checked against the compiled C: random "
                        "inputs and seeded params (default), none, or an .npz of inputs/params")
    x.add_argument("--seed", type=int, default=0, help="seed for --at random (default 0)")
    return p


def _compile(args) -> int:
    from . import generate
    from .model import MAX_BATCH
    from codegen.build import check_strict
    from codegen.files import write_all
    from codegen import report as memory
    from codegen.targets import TARGETS as TARGET_INFO, get_target
    from .init import initial_params
    if args.max_batch is not None and not 1 <= args.max_batch <= MAX_BATCH:
        raise GraphcError(f"--max-batch must lie in 1..{MAX_BATCH} (2^24), got "
                          f"{args.max_batch}")
    graph, cm = generate(args.spec, args.dtype, params=args.params, target=args.target,
                         max_batch=args.max_batch)
    # What is written must build: test-compile it under the target's warnings as errors
    # before writing anything.
    try:
        checked = check_strict(cm.name, cm.source, cm.header, get_target(args.target).check_flags)
    except GraphcError as e:
        raise GraphcError(f"{e}; nothing written") from None
    if not checked:
        print("graphc: warning: no C compiler found (install one or set $CC), so the "
              "generated C was written without a test compile", file=sys.stderr)
    report = memory.memory_report(cm)
    if TARGET_INFO[args.target].embedded:
        memory.add_firmware(report, cm, args.target, initial_params(graph, cm))
    out = Path(args.out)
    c_path, h_path, json_path = out / f"{cm.name}.c", out / f"{cm.name}.h", \
        out / f"{cm.name}.memory.json"
    try:  # the three files, or none of them
        write_all({c_path: cm.source, h_path: cm.header, json_path: memory.report_json(report)})
    except OSError as e:
        raise GraphcError(f"cannot write to {args.out}: {e.filename or args.out}: "
                          f"{e.strerror or e}; nothing written") from None
    item = 4 if args.dtype == "float32" else 8
    print(f"wrote {c_path}, {h_path} ({len(cm.source)} + {len(cm.header)} bytes) and {json_path}")
    print(f"params     {cm.params_size} elements, {cm.params_size * item} bytes"
          + (" (gradients the same)" if "gradients" in cm.entries else ""))
    if args.params:
        print(f"params from {args.params} baked in as a static const array; "
              f"{cm.name}_predict runs the forward pass on them")
    print(memory.format_report(report))
    return 0


def _check(args) -> int:
    from . import compile, load
    from .verify import sample_inputs
    if args.batch < 1:
        raise GraphcError(f"--batch must be at least 1, got {args.batch}")
    graph = load(args.spec)
    inputs = sample_inputs(graph, args.batch, args.seed)
    ok = True
    for dtype in (tuple(DTYPES) if args.dtype == "both" else (args.dtype,)):
        report = compile(graph, dtype=dtype, seed=args.seed).verify(seed=args.seed, **inputs)
        print(report.table(), end="\n\n")
        ok &= report.ok
    return 0 if ok else 1


def _train(args) -> int:
    from . import compile, evaluate, fit
    from .data import hold_out_last, load_dataset, split
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise GraphcError(f"{flag} must be at least 1, got {value}")
    if args.lr is not None and not 0 <= args.lr < math.inf:  # also rejects nan (0: as torch)
        raise GraphcError(f"--lr must be a finite number >= 0, got {args.lr}")
    if args.clip_grad_norm is not None and not args.clip_grad_norm >= 0:
        raise GraphcError(f"--clip-grad-norm must be a number >= 0, got {args.clip_grad_norm}")
    if args.validation_split is not None and not 0 < args.validation_split < 1:
        raise GraphcError(f"--validation-split must lie strictly between 0 and 1, got "
                          f"{args.validation_split}")
    if args.resume is not None:
        model = _resume(args)
        graph = model.graph
    elif args.spec is None:
        raise GraphcError("give the SPEC to train, or --resume RUN.graphc to continue training")
    else:
        graph = _graph_to_train(args)
        optimizer = {"name": args.optimizer} if args.optimizer else graph.optimizer
        if optimizer is None:
            optimizer = {"name": "adam"}
            print("no optimizer in the spec or on the command line: using adam "
                  f"(torch's defaults{', lr ' + format(args.lr, 'g') if args.lr else ''})")
        if args.lr is not None:
            optimizer = {**optimizer, "lr": args.lr}
        if args.clip_grad_norm is not None:
            optimizer = {**optimizer, "clip_grad_norm": args.clip_grad_norm}
    train, test = split(load_dataset(args.data, graph), args.test_fraction, args.seed)
    validation = None
    if args.validation_split is not None:   # held out here: the schedule needs the rest's size
        train, validation = hold_out_last(train, len(next(iter(train.values()))),
                                          args.validation_split)
    callbacks = []
    if args.lr_schedule is not None:   # before the build: a typo costs no compile
        from .callbacks import LearningRateScheduler
        from .schedules import parse_schedule
        n_train = len(next(iter(train.values())))
        schedule = parse_schedule(args.lr_schedule, epochs=args.epochs,
                                  steps_per_epoch=-(-n_train // args.batch_size))
        monitor = "val_loss" if args.validation_split is not None else "loss"
        callbacks.append(LearningRateScheduler(schedule, monitor=monitor))
        print(f"learning rate: {schedule!r}, stepped each {callbacks[0].per}")
    if args.resume is None:
        model = compile(graph, args.dtype or "float32", optimizer=optimizer, seed=args.seed)
    history = fit(model, train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                  validation=validation, callbacks=callbacks,
                  progress=not args.no_progress)
    if args.validation_split is not None and history.epochs:
        last = history.epochs[-1]
        print(f"validation loss {last['val_loss']:.4f}" + (
            f", accuracy {last['val_accuracy']:.2%}" if "val_accuracy" in last else "")
            + " after the last epoch")
    metrics = evaluate(model, test)
    n_test = len(next(iter(test.values())))
    shown = f"test loss {metrics['loss']:.4f}" + (
        f", accuracy {metrics['accuracy']:.2%}" if "accuracy" in metrics else "")
    stopped = " (interrupted)" if history.interrupted else ""
    print(f"{shown} on {n_test} held-out examples after {len(history)} epochs "
          f"({history.steps} steps) in {history.seconds:.2f} s{stopped}")
    if args.out:
        model.save_params(args.out)  # creates the directory; InputError if it cannot
        print(f"wrote {args.out}")
    if args.save:
        model.save(args.save)
        print(f"wrote {args.save} (step {model.optimizer_state().get('step', 0)}; "
              f"graphc train --resume {args.save} continues it)")
    return 130 if history.interrupted else 0


def _graph_to_train(args):
    """The graph SPEC describes, with its loss (an .onnx model takes --loss)."""
    from . import load
    if args.loss is not None:
        if Path(args.spec).suffix.lower() != ".onnx":
            raise GraphcError("--loss is for an .onnx model; a spec states its own 'loss'")
        from .onnx import load as load_onnx
        graph = load_onnx(args.spec, loss=args.loss)
    else:
        graph = load(args.spec)
    if graph.loss is None:
        hint = " (an .onnx model: give --loss)" if Path(args.spec).suffix.lower() == ".onnx" \
            else ""
        raise GraphcError(f"{args.spec}: the spec has no 'loss', so there is nothing to "
                          f"train{hint}")
    return graph


def _resume(args):
    """The checkpoint's model, checked against the other flags (and SPEC, if given)."""
    from .model import load_model
    for flag, value in (("--optimizer", args.optimizer),
                        ("--clip-grad-norm", args.clip_grad_norm)):
        if value is not None:
            raise GraphcError(f"{flag} cannot be given with --resume: training continues with "
                              f"the optimizer and state saved in {args.resume}")
    if args.loss is not None and args.spec is None:
        raise GraphcError("--loss is for an .onnx model; a checkpoint's spec has its loss")
    model = load_model(args.resume)
    if args.dtype is not None and args.dtype != model.dtype.name:
        raise GraphcError(f"--dtype {args.dtype}: {args.resume} holds a {model.dtype.name} "
                          "model; leave --dtype out to continue it")
    if args.spec is not None:
        _check_same_model(_graph_to_train(args), model.graph, args.spec, args.resume)
    if args.lr is not None:   # the lr is a state slot: the checkpoint's moments carry on
        model.set_lr(args.lr)
    print(f"resuming {args.resume}: model '{model.name}' at step "
          f"{model.optimizer_state().get('step', 0)}, lr {model.optimizer['lr']:g}")
    return model


def _check_same_model(graph, saved, spec: str, checkpoint: str) -> None:
    """An error naming the first field where SPEC's model and the checkpoint's differ (the
    description aside; the optimizer only when SPEC states one)."""
    from .errors import SpecError
    mine, theirs = graph.to_spec(), saved.to_spec()
    fields = ("name", "inputs", "params", "nodes", "outputs", "loss") + \
        (("optimizer",) if graph.optimizer is not None else ())
    for field in fields:
        a, b = mine.get(field), theirs.get(field)
        if a == b:
            continue
        node = None
        if field in ("inputs", "params", "nodes"):
            node = next((k for k in [*a, *b] if a.get(k) != b.get(k)), None)
        elif field == "optimizer":
            node = "optimizer"
        raise SpecError(f"differs from the model saved in {checkpoint} (leave SPEC out to "
                        "continue the checkpoint's model)", node=node, field=field, file=spec)


def _import(args) -> int:
    import io

    import numpy as np
    import yaml

    from .onnx import load as load_onnx
    from codegen.files import write_all
    graph = load_onnx(args.model, loss=args.loss)
    out = Path(args.out)
    params = Path(args.params) if args.params else out.with_suffix(".npz")
    spec = graph.to_spec()
    spec["description"] = (f"imported from {Path(args.model).name} by graphc; the weights are "
                           f"in {params.name} (graphc compile {out.name} --params {params.name})")
    names = "".join(f"#   {name}: {original}\n" for name, original in graph.onnx_names.items()
                    if name != original)
    text = (f"# {out.name}: {Path(args.model).name} as a graphc spec. Names from ONNX:\n"
            + (names or "#   (all kept)\n")
            + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100))
    buffer = io.BytesIO()
    np.savez(buffer, **{p: np.asarray(v) for p, v in graph.initial.items()})
    try:   # both files or neither
        write_all({out: text, params: buffer.getvalue()})
    except OSError as e:
        raise GraphcError(f"cannot write {e.filename or out}: {e.strerror or e}; nothing "
                          "written") from None
    print(f"wrote {out} ({len(graph.nodes)} nodes) and {params} ({len(graph.initial)} arrays)")
    return 0


def _export(args) -> int:
    import tempfile

    from . import load
    from .model import load_params
    from .onnx import save
    from codegen.files import write_all
    graph = load(args.spec)
    params = load_params(args.params, graph) if args.params else None
    with tempfile.TemporaryDirectory() as tmp:   # checked in full, then written whole
        staged = save(graph, Path(tmp) / "model.onnx", params=params, opset=args.opset)
        data = staged.read_bytes()
    try:
        write_all({Path(args.out): data})
    except OSError as e:
        raise GraphcError(f"cannot write {args.out}: {e.strerror or e}; nothing written") \
            from None
    print(f"wrote {args.out} ({len(data)} bytes, opset {args.opset}; the inference graph)")
    return 0


def _explain(args) -> int:
    from .explain import explain
    from .npz import MAX_NPZ_MEMBER_BYTES, NpzReader
    at = None if args.at == "none" else args.at
    if at not in (None, "random"):
        # Read here, defensively (a damaged or renamed file is one clear error, a zip bomb
        # is refused unread), and hand explain the arrays.
        with NpzReader(at, "--at arrays") as z:
            z.refuse_larger_than(MAX_NPZ_MEMBER_BYTES, "more than any model's params")
            at = z.read_all()
    text = explain(args.spec, wrt=args.wrt, at=at, seed=args.seed).render(args.format)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from .explain import write_atomic
    try:
        write_atomic(Path(args.out), text)
    except OSError as e:
        raise GraphcError(f"cannot write to {args.out}: {e.strerror or e}") from None
    print(f"wrote {args.out} ({len(text)} characters)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "seed", 0) < 0:   # NumPy's generators refuse them with a traceback
            raise GraphcError(f"--seed must be a non-negative integer, got {args.seed}")
        if args.command == "compile":
            return _compile(args)
        if args.command == "train":
            return _train(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "import":
            return _import(args)
        if args.command == "export":
            return _export(args)
        return _check(args)
    except GraphcError as e:
        print(f"graphc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
