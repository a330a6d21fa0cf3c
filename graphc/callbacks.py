"""Callbacks for `fit`, after Keras's: hooks around epochs and batches that can stop the run,
save the model, restore its best params or change its learning rate.

`fit` sets each callback's `model`, `history` (the History being filled) and `params`
(`{"epochs": ..., "steps_per_epoch": ...}`) before `on_train_begin`. Epochs and batches
count from 0. `logs` at an epoch's end is the epoch's record, the dict History keeps, so a
callback may add to it (LearningRateScheduler adds "lr"). A callback stops the run after the
current epoch by setting `history.stop_training`.
"""

from __future__ import annotations

import math
import numbers
import os

from .errors import InputError
from .schedules import Schedule


class Callback:
    model = None
    history = None
    params: dict = {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        pass

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """After each train step; `batch` counts within the epoch, logs holds its "loss"."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        pass

    def on_train_end(self, logs: dict | None = None) -> None:
        """After the last epoch or an early stop; not after Ctrl-C, which leaves the model
        with the params of the steps taken."""


class Monitor:
    """Which recorded value to watch and which way is better (Keras's rules: "auto" is max
    for accuracies, min for everything else; an improvement must beat the best by more
    than min_delta)."""

    def __init__(self, owner: str, monitor: str, mode: str, min_delta: float = 0.0):
        if mode not in ("auto", "min", "max"):
            raise InputError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) \
                or not min_delta >= 0:
            raise InputError(f"{owner}: min_delta must be a non-negative number, got "
                             f"{min_delta!r}")
        self.owner, self.key, self.min_delta = owner, monitor, float(min_delta)
        self.maximize = mode == "max" or (mode == "auto" and "accuracy" in monitor)
        self.best = -math.inf if self.maximize else math.inf

    def check_recorded(self, history) -> None:
        """Before any step: the monitored value must be one fit records."""
        if self.key not in history.metric_names:
            hint = (" (validation values need validation= or validation_split=)"
                    if self.key.startswith("val_") else "")
            raise InputError(f"{self.owner}: monitor {self.key!r} is not recorded by this fit "
                             f"(recorded: {', '.join(history.metric_names)}){hint}")

    def reset(self) -> None:
        self.best = -math.inf if self.maximize else math.inf

    def improved(self, logs: dict) -> bool:
        """Whether this epoch's value beats the best so far; if so it becomes the best."""
        value = logs[self.key]
        better = (value - self.min_delta > self.best if self.maximize
                  else value + self.min_delta < self.best)
        if better:
            self.best = value
        return better


class EarlyStopping(Callback):
    """Stop once `monitor` has not improved for `patience` epochs (0: at the first epoch
    that does not improve), as Keras's. `restore_best_weights`:
    at the end, the model gets back the params of the best epoch (the optimizer state is left
    as it is, as Keras does). `best_epoch` and `stopped_epoch` (None: ran to the end) tell
    what happened."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise InputError(f"EarlyStopping: patience must be a non-negative integer, got "
                             f"{patience!r}")
        self.monitor = Monitor("EarlyStopping", monitor, mode, min_delta)
        self.patience, self.restore_best_weights = patience, restore_best_weights

    def on_train_begin(self, logs=None) -> None:
        self.monitor.check_recorded(self.history)
        self.monitor.reset()
        self.wait, self.best_epoch, self.stopped_epoch, self.best_params = 0, None, None, None

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self.monitor.improved(logs):
            self.wait, self.best_epoch = 0, epoch
            if self.restore_best_weights:
                self.best_params = self.model.get_params()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.history.stop_training = True

    def on_train_end(self, logs=None) -> None:
        if self.best_params is not None:
            self.model.set_params(self.best_params)


class ModelCheckpoint(Callback):
    """`model.save(path)` after each epoch, or only when `monitor` improves
    (`save_best_only`). `path` may name the epoch (from 1) and any recorded value, as
    `"ckpt-{epoch:02d}-{val_loss:.3f}.graphc"`."""

    def __init__(self, path, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto"):
        self.path = os.fspath(path)
        self.monitor = Monitor("ModelCheckpoint", monitor, mode)
        self.save_best_only = save_best_only

    def on_train_begin(self, logs=None) -> None:
        if self.save_best_only:
            self.monitor.check_recorded(self.history)
        self.monitor.reset()
        self.saved: list[str] = []
        # A template mistake shows before the first epoch is spent, not after it.
        self._fill(0, {k: 0.0 for k in [*self.history.metric_names, "lr"]})

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self.save_best_only and not self.monitor.improved(logs):
            return
        path = self._fill(epoch, logs)
        self.model.save(path)
        self.saved.append(path)

    def _fill(self, epoch: int, logs: dict) -> str:
        try:
            return self.path.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise InputError(f"ModelCheckpoint: cannot fill in path {self.path!r} ({e!r}; "
                             f"it may name epoch and {', '.join(logs)})") from None


class LearningRateScheduler(Callback):
    """Set the model's learning rate from `schedule` (a graphc.schedules object, or a
    function from the epoch index, or with per="batch" the step index, to the lr) at each
    epoch or batch (`per`; default: the schedule's own cadence, "batch" for OneCycleLR,
    else "epoch"). A schedule starts from the model's lr when training begins. Each epoch's
    record gets "lr", the rate the epoch began with. ReduceLROnPlateau steps on `monitor`."""

    def __init__(self, schedule, per: str | None = None, monitor: str = "val_loss"):
        if not isinstance(schedule, Schedule) and not callable(schedule):
            raise InputError(f"LearningRateScheduler: schedule must be a graphc.schedules "
                             f"object or a function of the epoch, got {type(schedule).__name__}")
        per = per or getattr(schedule, "per", "epoch")
        if per not in ("epoch", "batch"):
            raise InputError(f"LearningRateScheduler: per must be 'epoch' or 'batch', got "
                             f"{per!r}")
        if per == "batch" and getattr(schedule, "needs_metric", False):
            raise InputError("LearningRateScheduler: ReduceLROnPlateau steps once an epoch, "
                             "on a value recorded at the epoch's end: per='epoch'")
        self.schedule, self.per = schedule, per
        self.monitor = Monitor("LearningRateScheduler", monitor, "min") \
            if getattr(schedule, "needs_metric", False) else None

    def on_train_begin(self, logs=None) -> None:
        if self.monitor is not None:
            self.monitor.check_recorded(self.history)
        # The schedule's steps this fit uses: one after each epoch or batch but the last,
        # whose lr no update would take.
        self.total = self.params["epochs"] * (self.params["steps_per_epoch"]
                                              if self.per == "batch" else 1) - 1
        limit = getattr(self.schedule, "total_steps", None)
        if limit is not None and self.total > limit:
            raise InputError(f"LearningRateScheduler: this fit takes {self.total} {self.per} "
                             f"steps of the schedule, more than its total_steps of {limit} "
                             f"({self.params['epochs']} epochs of "
                             f"{self.params['steps_per_epoch']} batches)")
        self.steps = 0
        if isinstance(self.schedule, Schedule):
            self._set(self.schedule.start(self.model.optimizer["lr"]))
        else:
            self._set(self.schedule(0))

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self.epoch_lr = self.lr

    def on_batch_end(self, batch, logs=None) -> None:
        if self.per == "batch":
            self._advance(None)

    def on_epoch_end(self, epoch, logs=None) -> None:
        logs["lr"] = self.epoch_lr
        if self.per == "epoch":
            self._advance(logs)

    def _advance(self, logs) -> None:
        if self.steps == self.total:   # after the fit's last step: no update would use it
            return
        self.steps += 1
        if not isinstance(self.schedule, Schedule):
            self._set(self.schedule(self.steps))
        elif self.monitor is not None:
            self._set(self.schedule.step(logs[self.monitor.key]))
        else:
            self._set(self.schedule.step())

    def _set(self, lr) -> None:
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr >= 0 \
                or not math.isfinite(lr):
            raise InputError(f"LearningRateScheduler: the schedule gave lr {lr!r} at "
                             f"{self.per} {self.steps}; a learning rate must be a "
                             "non-negative finite number")
        self.lr = float(lr)
        self.model.set_lr(self.lr)
