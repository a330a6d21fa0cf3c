"""Training loops: the data loop in Python, every step (forward, backward, update) in C."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from .data import check_arrays
from .errors import GraphcError, InputError
from .model import check_seed
from .nonfinite import NonFiniteGuard

# loss op -> how a prediction is judged right; accuracy is reported for these losses
CLASSIFIER_LOSSES = ("softmax_cross_entropy", "bce_with_logits")


class History:
    """What `fit` recorded: one dict of metrics per completed epoch."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self.interrupted = False
        self.steps = 0
        self.seconds = 0.0

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for e in self.epochs for k in e))

    def __getitem__(self, key: str) -> list[float]:
        if key not in self.keys():
            raise KeyError(f"no metric {key!r} in this history (recorded: "
                           f"{', '.join(self.keys()) or 'nothing yet'})")
        return [e[key] for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    def __repr__(self) -> str:
        last = ", ".join(f"{k} {v:.4g}" for k, v in self.epochs[-1].items()) if self.epochs else ""
        return (f"<History {self._counts()}, {self.seconds:.2f} s"
                f"{', interrupted' if self.interrupted else ''}{'; last: ' + last if last else ''}>")

    def _counts(self) -> str:
        e, s = len(self.epochs), self.steps
        return f"{e} epoch{'s' * (e != 1)}, {s} step{'s' * (s != 1)}"

    def plot(self, path) -> None:
        """Save the loss curves (and accuracy on a second axis, if recorded) as a PNG."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            raise GraphcError("plotting needs matplotlib: pip install matplotlib") from None
        # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
        x = range(1, len(self.epochs) + 1)
        keys = self.keys()
        lines = [ax.plot(x, self[k], marker=".", label=k.replace("_", " "))[0]
                 for k in ("loss", "val_loss") if k in keys]
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        if "accuracy" in keys:
            acc = ax.twinx()
            lines += [acc.plot(x, self[k], marker=".", linestyle="--", color=f"C{2 + i}",
                               label=k.replace("_", " "))[0]
                      for i, k in enumerate(("accuracy", "val_accuracy")) if k in keys]
            acc.set_ylabel("accuracy")
        if lines:  # none before the first epoch ends
            fig.legend(handles=lines, loc="outside lower center", ncols=len(lines))
        ax.set_title(f"{self._counts()}, {self.seconds:.1f} s"
                     + (" (interrupted)" if self.interrupted else ""))
        fig.savefig(path, format="png")


def fit(model, data, epochs: int = 10, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
        validation=None, progress: bool = True, on_nonfinite: str = "raise") -> History:
    """Train `model` in place with `model.train_step` on shuffled mini-batches of `data` (a
    dict of arrays named after the inputs). Each epoch records "loss" (the example-weighted
    mean of its step losses, each taken before its update) and, for classifiers, "accuracy"
    on `data` at the epoch's end; `validation` adds "val_loss" and "val_accuracy".

    Ctrl-C stops between steps: the history of the completed epochs is returned with
    `interrupted=True`, and the model keeps the params of every step taken.

    A step whose loss or gradient is NaN or infinite is not applied (the C train step
    refuses it). `on_nonfinite="raise"` then raises NonFiniteError naming the epoch, the
    step and the first non-finite tensor; "warn" warns once and skips such steps, "ignore"
    skips them silently. Skipped steps count neither in the loss nor in `history.steps`."""
    from tqdm import tqdm  # imported here: `import graphc` stays light
    _positive(epochs, "epochs")
    _positive(batch_size, "batch_size")
    check_seed(seed)
    if model.graph.loss is None:
        raise InputError(f"model '{model.name}' has no loss, so it cannot be trained")
    arrays, n = check_arrays(model.graph, data, model.dtype, "data")
    if validation is not None:
        validation, _ = check_arrays(model.graph, validation, model.dtype, "validation")
    guard = NonFiniteGuard(model, on_nonfinite)
    classifier = _classifier(model.graph)
    rng = np.random.default_rng(seed)  # once per fit: the same seed gives the same params
    history = History()
    start = time.perf_counter()
    with _deferred_interrupt() as interrupted:
        try:
            for epoch in range(epochs):
                order = rng.permutation(n) if shuffle else np.arange(n)
                with tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit="ex",
                          disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
                    total, counted = 0.0, 0
                    for lo in range(0, n, batch_size):
                        idx = order[lo:lo + batch_size]
                        batch = {k: a[idx] for k, a in arrays.items()}
                        loss = model.train_step(**batch)
                        if math.isfinite(loss):
                            history.steps += 1
                            total, counted = total + loss * len(idx), counted + len(idx)
                        else:   # refused by the C: nothing changed
                            guard(batch, epoch + 1, lo // batch_size + 1)
                        bar.update(len(idx))
                        bar.set_postfix(loss=f"{total / max(counted, 1):.4f}", refresh=False)
                        if interrupted():
                            raise KeyboardInterrupt
                    record = {"loss": total / counted if counted else math.nan}
                    if classifier:
                        record["accuracy"] = evaluate(model, arrays)["accuracy"]
                    if validation is not None:
                        record.update((f"val_{k}", v) for k, v in evaluate(model, validation).items())
                    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()})
                if interrupted():
                    raise KeyboardInterrupt
                history.epochs.append(record)
        except KeyboardInterrupt:
            history.interrupted = True
    history.seconds = time.perf_counter() - start
    return history


def evaluate(model, data, batch_size: int = 256) -> dict[str, float]:
    """The batch-mean loss over `data` (and accuracy for classifiers), in batches."""
    _positive(batch_size, "batch_size")
    arrays, n = check_arrays(model.graph, data, model.dtype, "data")
    classifier = _classifier(model.graph)
    loss_sum = hits = 0.0
    for lo in range(0, n, batch_size):
        batch = {k: a[lo:lo + batch_size] for k, a in arrays.items()}
        loss, outputs = model.evaluate(**batch)
        loss_sum += loss * min(batch_size, n - lo)
        if classifier:
            op, logits, target = classifier
            hits += float(_correct(op, outputs[logits], batch[target]).sum())
    return {"loss": loss_sum / n, **({"accuracy": hits / n} if classifier else {})}


def _classifier(graph) -> tuple[str, str, str] | None:
    """(loss op, logits, target) when accuracy can be measured: a classification loss whose
    logits are an output (so `evaluate` returns them) and whose target is an input."""
    node = graph.values.get(graph.loss) if graph.loss else None
    if node is None or node.op not in CLASSIFIER_LOSSES:
        return None
    logits, target = node.inputs[:2]
    if logits in graph.outputs and graph.values[target].kind == "input":
        return node.op, logits, target
    return None


def _correct(op: str, logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per example, the fraction of its predictions that are right."""
    if op == "softmax_cross_entropy":
        # class indices (an integer target, the logits' shape without the class axis), or
        # one-hot / probability rows
        labels = target if target.ndim == logits.ndim - 1 else target.argmax(axis=-1)
        right = logits.argmax(axis=-1) == labels
    else:  # bce_with_logits: each element is a yes/no prediction
        right = (logits > 0) == (target > 0.5)
    return right.reshape(len(right), -1).mean(axis=1)


def _positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


@contextmanager
def _deferred_interrupt():
    """While active, a first Ctrl-C only sets a flag that the loop checks between steps, so
    a step is never cut off half-way through its Python bookkeeping; a second Ctrl-C raises
    at once. Only in the main thread, and only over Python's default handler."""
    hit = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: False
        return

    def handler(signum, frame):
        hit.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)

