"""The digits CNN (examples/digits_cnn.yaml: conv-relu-pool twice, dense, Adam) trained by
graphc and by PyTorch eager, for issue 13's "its training is faster than PyTorch eager's".

    python -m benchmarks.cnn [--quick] [--batches 32,64] [--no-competitor] [--no-train]
                             [--out benchmarks/results]

(also `python -m benchmarks --workloads C`). Three parts, written to cnn.md and cnn.json:

1. **One train step** (forward, backward, Adam) on a batch of 32 and of 64 digits: graphc's
   `c99` and `host` targets from Python (`model.train_step`) and as a bound call
   (`model.bind`), each timed in a process of graphc's own (benchmarks/graphc_timing.py:
   graphc's OpenMP runtime and wait settings, not PyTorch's spinning one), the host's C
   also in a pure-C loop (benchmarks/charness.py; OpenMP on the default threads, and on
   one), against
   PyTorch eager (`nn.Sequential`, `F.cross_entropy`, `torch.optim.Adam`) on one thread
   and on its default number. Every peer starts from the same params and batch, and is
   checked first: the loss, every gradient and every param after one step against
   graphc's (`check_step`).
2. **The same rows with a competitor**: one busy-looping Python process that this
   benchmark starts before and kills after (`machine.competitor`), as another user of a shared
   2-core machine would be. Each row records the load average and the cores others kept
   busy while it ran (benchmarks/machine.py); rows of part 1 timed while others used more
   than `Options.busy` cores are marked.
3. **Training to the end** (quiet, then all of it again beside the competitor):
   `graphc train examples/digits_cnn.yaml --data digits` (20
   epochs, batch 32, a seeded 20 % test split, Adam lr 0.003) run as a command (its wall
   time, the training time and test accuracy it prints), then the same training with
   graphc's `fit` (c99, host; `--fit TARGET`, in a process of its own) and in PyTorch
   eager: the same split, the same initial params, the same batches in the same order
   (fit's permutations), the same evaluation of the training set after each epoch that
   `fit` does, then test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import graphc

from . import charness, graphc_timing, machine, write_results
from .machine import torch_threads
from .timing import Options, time_python

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "digits_cnn.yaml"
BATCHES = (32, 64)
TARGETS = ("c99", "host")
EPOCHS, BATCH, SEED, TEST_FRACTION = 20, 32, 0, 0.2
CHECK_RTOL = 1e-4     # losses and gradients, relative to the largest element


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the problem

def problem(batch: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """graphc's initial params (seed 0) and the first `batch` digits of the training split."""
    from graphc.data import load_dataset, split
    graph = graphc.load(SPEC)
    train, _ = split(load_dataset("digits", graph), TEST_FRACTION, SEED)
    x = np.ascontiguousarray(train["x"][:batch], np.float32)
    y = np.ascontiguousarray(train["y"][:batch], np.float32)
    params = graphc.compile(graph, seed=SEED).get_params()
    return params, x, y


def torch_net(params: dict):
    """The spec as torch modules, with graphc's params copied in."""
    import torch
    from torch import nn
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(128, 10))
    with torch.no_grad():
        for module, (w, b) in zip((net[0], net[3], net[7]), (("K1", "c1"), ("K2", "c2"), ("W", "b"))):
            module.weight.copy_(torch.from_numpy(params[w]))
            module.bias.copy_(torch.from_numpy(params[b]))
    return net


TORCH_NAMES = {"0.weight": "K1", "0.bias": "c1", "3.weight": "K2", "3.bias": "c2",
               "7.weight": "W", "7.bias": "b"}


def torch_adam(net, lr: float):
    import torch
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr() -> float:
    return float(graphc.load(SPEC).optimizer["lr"])


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_step(params: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """torch against graphc (c99) from the same params on the same batch: the loss and the
    gradients (relative to each one's largest element), and the params after one Adam step.
    Adam's first step moves each param by about lr·sign(g), so a gradient that is rounding
    (a dead relu's, |g| < 1e-6·max|g|) may move either way in either library: those
    elements are left out of the params' comparison and counted."""
    import torch
    import torch.nn.functional as F
    model = graphc.compile(graphc.load(SPEC), target="c99")
    model.set_params(params)
    loss, grads = model.gradients(x=x, y=y)
    model.train_step(x=x, y=y)
    after = model.get_params()
    net = torch_net(params)
    opt = torch_adam(net, lr())
    tl = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    tl.backward()
    tgrads = {TORCH_NAMES[k]: p.grad.numpy().copy() for k, p in net.named_parameters()}
    opt.step()
    tafter = {TORCH_NAMES[k]: p.detach().numpy().copy() for k, p in net.named_parameters()}
    out = {"loss_rel_error": abs(float(loss) - tl.item()) / abs(tl.item()),
           "grad_rel_error": max(_rel(grads[p], tgrads[p]) for p in grads)}
    worst, skipped = 0.0, 0
    for p in after:
        keep = np.abs(tgrads[p]) > 1e-6 * np.max(np.abs(tgrads[p]))
        skipped += int((~keep).sum())
        if keep.any():
            worst = max(worst, float(np.max(np.abs(after[p][keep] - tafter[p][keep]))))
    out.update(params_max_abs_error=worst, params_left_out=skipped,
               ok=out["loss_rel_error"] <= CHECK_RTOL and out["grad_rel_error"] <= CHECK_RTOL
               and worst <= 1e-5)
    return out


# ---------------------------------------------------------------- one step, timed

def runners(params: dict, x: np.ndarray, y: np.ndarray, workdir: Path) -> list[tuple[str, object]]:
    """(label, time(opts)) for every variant of one train step. graphc's rows from Python
    are timed in a process of their own (benchmarks/graphc_timing.py), where graphc starts
    the OpenMP runtime with its own wait settings: in this one PyTorch's copy, which spins
    300,000 rounds while idle, is loaded first and would be the runtime of any graphc
    module loaded here."""
    import torch
    import torch.nn.functional as F
    out = []
    data = workdir / f"digits_cnn_{len(x)}.npz"
    np.savez(data, **graphc_timing.problem_arrays(params, x, y))
    for target in TARGETS:
        for kind, label in (("python", "Python"), ("bound", "bound call")):
            out.append((f"graphc {target} ({label})",
                        lambda opts, target=target, kind=kind: graphc_timing.timed_apart(
                            data, graphc_timing.DIGITS_CNN, target, kind, opts)))
        if target == "host":
            model = graphc.compile(graphc.load(SPEC), target=target)
            program = _c_program(model.cmodule, params, x, y)
            binary = charness.build(program, workdir / program.name)
            out.append(("graphc host (pure C)",
                        lambda opts, p=program, b=binary: charness.run(p, b, opts)[0]))
            # OpenMP's two threads wait for each other when another process holds a core
            out.append(("graphc host (pure C, OMP_NUM_THREADS=1)",
                        lambda opts, p=program, b=binary:
                        charness.run(p, b, opts, charness.ONE_THREAD)[0]))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for threads in sorted({1, torch.get_num_threads()}):
        net = torch_net(params)
        opt = torch_adam(net, lr())

        def step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xt), yt)
            loss.backward()
            opt.step()
            return loss

        def timed(opts, step=step, threads=threads):
            with torch_threads(threads):
                return time_python(step, opts)
        out.append((f"PyTorch eager, {threads} thread{'s' * (threads > 1)}", timed))
    return out


def _c_program(cmodule, params: dict, x: np.ndarray, y: np.ndarray) -> charness.Program:
    """The pure-C loop around `<name>_train_step` (compiled with the host's flags)."""
    flat = np.zeros(cmodule.params_size, np.float32)
    for name, value in params.items():
        at = cmodule.param_offsets[name]
        flat[at:at + value.size] = value.ravel()
    n = len(x)
    entry = cmodule.entries["train_step"]
    return charness.Program(
        f"digits_cnn_train_{n}", {f"{cmodule.name}.c": cmodule.source,
                                  f"{cmodule.name}.h": cmodule.header}, f"{cmodule.name}.h",
        [("params", flat), ("in_x", x), ("in_y", y)],
        [("work", cmodule.work_elements(n)), ("state", cmodule.state_size)],
        f"result = {entry.c_name}(params, state, work, {n}, in_x, in_y);",
        setup=[f"{cmodule.name}_init_state(state);"])   # the hyperparameters, in the state


def time_steps(batches, opts: Options, busy: bool, workdir: Path) -> list[dict]:
    rows = []
    for n in batches:
        params, x, y = problem(n)
        log(f"batch {n}: checking torch against graphc")
        check = check_step(params, x, y)
        if not check["ok"]:
            raise AssertionError(f"PyTorch and graphc disagree at batch {n}: {check}")
        variants = runners(params, x, y, workdir)
        for label, timed in variants:
            log(f"batch {n}: {label}{' (with a competitor)' if busy else ''}")
            before = os.getloadavg()
            if busy:
                with machine.competitor():
                    t, foreign, attempts = machine.quietly(lambda: timed(opts),
                                                           machine.beside_competitor(opts))
            else:
                t, foreign, attempts = machine.quietly(lambda: timed(opts), opts)
            rows.append({"batch": n, "label": label, "competitor": busy, "median_s": t.median,
                         "min_s": t.min, "calls": t.calls, "repeats": t.repeats,
                         "foreign_cores": foreign, "attempts": attempts,
                         "load_before": before, "load_after": os.getloadavg(), "check": check})
    return rows


# ---------------------------------------------------------------- training to the end

def train_cli() -> dict:
    """`graphc train examples/digits_cnn.yaml --data digits` as a command: its wall time
    (interpreter, imports, a warm compile, data, training, test) and what it prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "graphc", "train", str(SPEC.relative_to(ROOT)), "--data",
               "digits", "--no-progress"]
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)   # warm the cache
    before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    m = re.search(r"accuracy ([\d.]+)% on (\d+) held-out examples after (\d+) epochs "
                  r"\((\d+) steps\) in ([\d.]+) s", done.stdout)
    return {"command": "graphc train examples/digits_cnn.yaml --data digits", "wall_s": wall,
            "train_s": float(m[5]), "accuracy": float(m[1]) / 100, "test_examples": int(m[2]),
            "epochs": int(m[3]), "steps": int(m[4]), "load_before": before,
            "load_after": os.getloadavg(), "output": done.stdout.strip().splitlines()[-1]}


def _data():
    from graphc.data import load_dataset, split
    graph = graphc.load(SPEC)
    return graph, *split(load_dataset("digits", graph), TEST_FRACTION, SEED)


def train_graphc(target: str) -> dict:
    graph, train, test = _data()
    model = graphc.compile(graph, target=target, seed=SEED)
    before = os.getloadavg()
    history = graphc.fit(model, train, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    metrics = graphc.evaluate(model, test)
    return {"label": f"graphc {target} (fit)", "train_s": history.seconds,
            "accuracy": metrics["accuracy"], "load_before": before, "load_after": os.getloadavg()}


def train_torch(threads: int) -> dict:
    """fit's loop in PyTorch eager: the same params, batches and per-epoch evaluation."""
    import torch
    import torch.nn.functional as F
    graph, train, test = _data()
    params = graphc.compile(graph, seed=SEED).get_params()
    net = torch_net(params)
    opt = torch_adam(net, lr())
    x, y = torch.from_numpy(train["x"].astype(np.float32)), torch.from_numpy(train["y"].astype(np.float32))
    n = len(x)

    def accuracy(xs, ys) -> float:
        hits = 0
        with torch.no_grad():
            for lo in range(0, len(xs), 256):
                logits = net(xs[lo:lo + 256])
                hits += int((logits.argmax(1) == ys[lo:lo + 256].argmax(1)).sum())
        return hits / len(xs)

    rng = np.random.default_rng(SEED)   # fit's permutations
    before = os.getloadavg()
    with torch_threads(threads):
        start = time.perf_counter()
        for _ in range(EPOCHS):
            order = torch.from_numpy(rng.permutation(n))
            for lo in range(0, n, BATCH):
                idx = order[lo:lo + BATCH]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            accuracy(x, y)   # fit evaluates the training set after every epoch
        seconds = time.perf_counter() - start
        acc = accuracy(torch.from_numpy(test["x"].astype(np.float32)),
                       torch.from_numpy(test["y"].astype(np.float32)))
    return {"label": f"PyTorch eager, {threads} thread{'s' * (threads > 1)}", "train_s": seconds,
            "accuracy": acc, "load_before": before, "load_after": os.getloadavg()}


def train_graphc_apart(target: str) -> dict:
    """train_graphc(target) in a process of its own, on graphc's own OpenMP runtime (as
    runners' rows are)."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.cnn", "--fit", target], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"graphc's training process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def train_all() -> dict:
    import torch
    log("training: graphc train (command)")
    out = {"cli": train_cli(), "rows": []}
    for target in TARGETS:
        log(f"training: graphc {target}")
        out["rows"].append(train_graphc_apart(target))
    for threads in sorted({1, torch.get_num_threads()}):
        log(f"training: PyTorch, {threads} threads")
        out["rows"].append(train_torch(threads))
    return out


# ---------------------------------------------------------------- report

def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.1 else f"{s:.2f} s"


def _load(row) -> str:
    return f"{row['load_before'][0]:.2f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    out = ["# The digits CNN: graphc against PyTorch eager", "",
           f"`{result['command']}` on {result['date']}; {m['cpu']}, {m['cores']} cores "
           f"({', '.join(m['simd'])}); {m['compiler']}; torch {result['torch']}. "
           f"The machine is shared: *load* is the 1-minute load average when the row started, "
           f"*others* the cores other processes kept busy while it ran (retried up to "
           f"{result['options']['retries']} times above {result['options']['busy']:g} cores; the "
           "quietest attempt is kept). Rows marked *under load* had others above that.", ""]
    steps = result.get("steps", [])
    if steps:
        out += ["## One train step (forward, backward, Adam)", "",
                "Median (fastest) time per step; *vs torch 1 thread* is PyTorch's median on one "
                "thread over the row's. Each batch's peers were checked first: "
                + "; ".join(f"batch {r['batch']}: loss {r['check']['loss_rel_error']:.1e}, "
                            f"gradients {r['check']['grad_rel_error']:.1e} (relative), params "
                            f"after one step {r['check']['params_max_abs_error']:.1e} (absolute, "
                            f"{r['check']['params_left_out']} with a rounding-size gradient left out)"
                            for r in {r['batch']: r for r in steps}.values()) + ".", ""]
        for busy in (False, True):
            rows = [r for r in steps if r["competitor"] == busy]
            if not rows:
                continue
            if busy:
                out += ["### With one busy competitor process (started and stopped by the "
                        "benchmark)", ""]
            out += ["| batch | peer | median | fastest | vs torch 1 thread | load | others |"
                    + (" busy / quiet |" if busy else ""),
                    "|---|---|---|---|---|---|---|" + ("---|" if busy else "")]
            quiet = {(r["batch"], r["label"]): r for r in steps if not r["competitor"]}
            for r in rows:
                torch1 = next(t for t in rows if t["batch"] == r["batch"]
                              and t["label"] == "PyTorch eager, 1 thread")
                others = "" if r["foreign_cores"] is None else f"{r['foreign_cores']:.2f}"
                loaded = not busy and r["foreign_cores"] is not None and \
                    r["foreign_cores"] > result["options"]["busy"]
                out.append(f"| {r['batch']} | {r['label']}{' *(under load)*' if loaded else ''} | "
                           f"{_ms(r['median_s'])} | {_ms(r['min_s'])} | "
                           f"{torch1['median_s'] / r['median_s']:.2f}x | {_load(r)} | {others} |"
                           + (f" {r['median_s'] / quiet[r['batch'], r['label']]['median_s']:.2f} |"
                              if busy else ""))
            out.append("")
    train = result.get("training")
    if train:
        c = train["cli"]
        out += ["## Training to the end", "",
                f"`{c['command']}` ({c['epochs']} epochs, batch {BATCH}, Adam lr {lr():g}, seed "
                f"{SEED}, {c['test_examples']} test examples): {c['wall_s']:.2f} s wall for the "
                f"whole command (interpreter, imports, warm compile, data, training, test; load "
                f"{_load(c)}); it prints: `{c['output']}`.", ""]
        busy = result.get("training_busy")
        if busy:
            out += [f"Beside one busy competitor process, the command took "
                    f"{busy['cli']['wall_s']:.2f} s wall "
                    f"({busy['cli']['wall_s'] / c['wall_s']:.2f}× quiet).", ""]
        out += ["In process, the same split, initial params, batches and per-epoch evaluation of "
                "the training set (`fit`'s):", "",
                "| peer | training | test accuracy | load |"
                + (" beside a competitor | busy / quiet |" if busy else ""),
                "|---|---|---|---|" + ("---|---|" if busy else "")]
        for k, r in enumerate(train["rows"]):
            line = f"| {r['label']} | {r['train_s']:.2f} s | {r['accuracy']:.2%} | {_load(r)} |"
            if busy:
                b = busy["rows"][k]
                line += f" {b['train_s']:.2f} s | {b['train_s'] / r['train_s']:.2f} |"
            out.append(line)
        out.append("")
    return "\n".join(out)


def run(opts: Options, batches=BATCHES, competitor_pass: bool = True, training: bool = True) -> dict:
    import torch
    # Run alone or as `python -m benchmarks --workloads C`: the command that made the file.
    command = "python -m benchmarks" + (".cnn" if Path(sys.argv[0]).stem == "cnn" else "")
    result = {"command": " ".join([command, *sys.argv[1:]]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine.info(), "torch": torch.__version__,
              "options": dataclasses.asdict(opts), "steps": []}
    workdir = Path(tempfile.mkdtemp(prefix="graphc-cnn-"))
    result["steps"] = time_steps(batches, opts, False, workdir)
    if competitor_pass:
        result["steps"] += time_steps(batches, opts, True, workdir)
    if training:
        result["training"] = train_all()
        if competitor_pass:
            log("training again beside one busy competitor")
            with machine.competitor():
                result["training_busy"] = train_all()
    return result


def write(result: dict, out: Path) -> str:
    text = markdown(result)
    write_results(out, "cnn", result, text)
    return text


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cnn", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing: a smoke test")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--no-competitor", action="store_true", help="skip part 2")
    ap.add_argument("--no-train", action="store_true", help="skip part 3")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--fit", choices=TARGETS, help="only train with graphc's fit on this "
                    "target and print its row as JSON (what part 3 runs in a process of its "
                    "own)")
    args = ap.parse_args(argv)
    if args.fit:
        row = train_graphc(args.fit)
        print(json.dumps(row))
        return row
    opts = Options.quick() if args.quick else Options()
    result = run(opts, [int(b) for b in args.batches.split(",")], not args.no_competitor,
                 not args.no_train)
    text = write(result, Path(args.out))
    print(text)
    return result


if __name__ == "__main__":
    main()
