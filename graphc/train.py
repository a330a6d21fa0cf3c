"""Training loops: the data loop in Python, every step (forward, backward, update) in C."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from .callbacks import Callback
from .data import check_arrays, hold_out_last
from .errors import InputError
from .metrics import batch_sums, finish, resolve_metrics
from .model import check_seed
from .nonfinite import NonFiniteGuard


class History:
    """What `fit` recorded: one dict of metrics per completed epoch."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self.interrupted = False
        self.stop_training = False   # set by a callback (EarlyStopping) to end after an epoch
        self.metric_names: list[str] = []   # what each epoch records, known before the first
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
                f"{', interrupted' if self.interrupted else ''}"
                f"{', stopped early' if self.stop_training else ''}"
                f"{'; last: ' + last if last else ''}>")

    def _counts(self) -> str:
        e, s = len(self.epochs), self.steps
        return f"{e} epoch{'s' * (e != 1)}, {s} step{'s' * (s != 1)}"

    def describe(self) -> str:
        """'20 epochs, 900 steps, 1.5 s': what a plot's title and the notebook show."""
        return (f"{self._counts()}, {self.seconds:.1f} s"
                + (" (interrupted)" if self.interrupted else ""))

    def plot(self, path=None):
        """The loss curves (and accuracy or other metrics on a second axis) as a matplotlib
        Figure, drawn without pyplot (no global state; Jupyter shows it inline). With a
        `path`, also saved there in the format its suffix names (.png, .svg, .pdf; PNG
        without one)."""
        from .display import history_figure, save_figure
        fig = history_figure(self)
        if path is not None:
            save_figure(fig, path)
        return fig

    def _repr_html_(self) -> str:
        from .display import history_html
        return history_html(self)


def fit(model, data, epochs: int = 10, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
        validation=None, validation_split: float | None = None, metrics=None, callbacks=(),
        progress: bool = True, on_nonfinite: str = "raise") -> History:
    """Train `model` in place with `model.train_step` on shuffled mini-batches of `data`: a
    dict of arrays named after the inputs, or a tuple of arrays in the inputs' order
    (`(X, y)`). Each epoch records "loss" (the example-weighted mean of its step losses, each
    taken before its update) and each metric of `metrics` (graphc.metrics: "accuracy",
    "top_k_accuracy", "mae", "mse", "rmse"; default: accuracy for classifiers) on `data` at
    the epoch's end. `validation` (data as above), or `validation_split` (the last fraction
    of `data`, held out before shuffling), adds "val_loss" and "val_<metric>".
    `callbacks` (graphc.callbacks) run around epochs and batches; one may stop the run.

    One generator seeded by `seed` draws every epoch's order: the same seed, data and
    starting params give the same shuffles, losses and params, bit for bit.

    A step whose loss or gradient is NaN or infinite is not applied (the C train step
    refuses it). `on_nonfinite="raise"` then raises NonFiniteError naming the epoch, the
    step and the first non-finite tensor; "warn" warns once and skips such steps, "ignore"
    skips them silently. Skipped steps count neither in the loss nor in `history.steps`.

    Ctrl-C stops between steps: the history of the completed epochs is returned with
    `interrupted=True`, and the model keeps the params of every step taken (callbacks'
    `on_train_end` does not run)."""
    from tqdm.auto import tqdm  # a widget in Jupyter; imported here: `import graphc` stays light
    _positive(epochs, "epochs")
    _positive(batch_size, "batch_size")
    check_seed(seed)
    if model.graph.loss is None:
        raise InputError(f"model '{model.name}' has no loss, so it cannot be trained")
    arrays, n = check_arrays(model.graph, data, model.dtype, "data")
    if validation_split is not None:
        if validation is not None:
            raise InputError("give validation or validation_split, not both")
        arrays, validation = hold_out_last(arrays, n, validation_split)
        n = len(next(iter(arrays.values())))
    elif validation is not None:
        validation, _ = check_arrays(model.graph, validation, model.dtype, "validation")
    pair, chosen = resolve_metrics(model.graph, metrics)
    callbacks = _check_callbacks(callbacks)
    guard = NonFiniteGuard(model, on_nonfinite)
    rng = np.random.default_rng(seed)  # once per fit: the same seed gives the same params
    history = History()
    names = ["loss", *(m.key for m in chosen)]
    history.metric_names = names + [f"val_{k}" for k in names] * (validation is not None)
    for callback in callbacks:
        callback.model, callback.history = model, history
        callback.params = {"epochs": epochs, "steps_per_epoch": -(-n // batch_size)}
    start = time.perf_counter()
    for callback in callbacks:
        callback.on_train_begin()
    with _deferred_interrupt() as interrupted:
        try:
            for epoch in range(epochs):
                for callback in callbacks:
                    callback.on_epoch_begin(epoch)
                order = rng.permutation(n) if shuffle else np.arange(n)
                with tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit="ex",
                          disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
                    total, counted = 0.0, 0
                    for batch, lo in enumerate(range(0, n, batch_size)):
                        idx = order[lo:lo + batch_size]
                        inputs = {k: a[idx] for k, a in arrays.items()}
                        loss = model.train_step(**inputs)
                        if math.isfinite(loss):
                            history.steps += 1
                            total, counted = total + loss * len(idx), counted + len(idx)
                        else:   # refused by the C: nothing changed
                            guard(inputs, epoch + 1, batch + 1)
                        bar.update(len(idx))
                        bar.set_postfix(loss=f"{total / max(counted, 1):.4f}", refresh=False)
                        for callback in callbacks:
                            callback.on_batch_end(batch, {"loss": loss})
                        if interrupted():
                            raise KeyboardInterrupt
                    record = {"loss": total / counted if counted else math.nan}
                    if chosen:
                        record.update(_evaluate(model, arrays, pair, chosen)[1:])
                    if validation is not None:
                        record.update((f"val_{k}", v) for k, v in
                                      _evaluate(model, validation, pair, chosen))
                    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()})
                if interrupted():
                    raise KeyboardInterrupt
                history.epochs.append(record)
                for callback in callbacks:
                    callback.on_epoch_end(epoch, record)
                if history.stop_training:
                    break
        except KeyboardInterrupt:
            history.interrupted = True
    if not history.interrupted:
        for callback in callbacks:
            callback.on_train_end()
    history.seconds = time.perf_counter() - start
    return history


def evaluate(model, data, batch_size: int = 256, metrics=None) -> dict[str, float]:
    """The batch-mean loss over `data` (a dict of arrays or a tuple in the inputs' order) and
    each metric of `metrics` (default: accuracy for classifiers), in batches."""
    _positive(batch_size, "batch_size")
    arrays, _ = check_arrays(model.graph, data, model.dtype, "data")
    pair, chosen = resolve_metrics(model.graph, metrics)
    return dict(_evaluate(model, arrays, pair, chosen, batch_size))


def _evaluate(model, arrays, pair, chosen, batch_size: int = 256) -> list[tuple[str, float]]:
    """[("loss", ...), (metric, ...), ...] over checked `arrays`."""
    n = len(next(iter(arrays.values())))
    loss_sum, sums = 0.0, [0.0] * len(chosen)
    for lo in range(0, n, batch_size):
        batch = {k: a[lo:lo + batch_size] for k, a in arrays.items()}
        loss, outputs = model.evaluate(**batch)
        loss_sum += loss * min(batch_size, n - lo)
        if chosen:
            sums = [a + b for a, b in zip(sums, batch_sums(chosen, pair, outputs, batch))]
    return [("loss", loss_sum / n), *finish(chosen, sums, n).items()]


def _check_callbacks(callbacks) -> list[Callback]:
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    callbacks = list(callbacks or ())
    for c in callbacks:
        if not isinstance(c, Callback):
            raise InputError(f"callbacks must be graphc.callbacks.Callback objects, got "
                             f"{type(c).__name__}")
    return callbacks


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

