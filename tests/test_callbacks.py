"""graphc.callbacks in fit: EarlyStopping stops where its rule says and restores the best
params, ModelCheckpoint saves, LearningRateScheduler drives the learning rate as torch's
schedulers would."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.callbacks import Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint
from graphc.errors import InputError
from graphc.schedules import OneCycleLR, ReduceLROnPlateau, StepLR
from test_train import _data, _spec


@pytest.fixture(scope="module")
def compiled():
    return graphc.compile(_spec(optimizer={"name": "sgd", "lr": 0.05}), dtype="float64")


@pytest.fixture
def model(compiled):
    compiled.init_params(0)
    compiled.reset_optimizer()
    return compiled


def _fit(model, data, **kw):
    return graphc.fit(model, data, progress=False, **kw)


class ParamsEachEpoch(Callback):
    """The params at each epoch's end, to compare a restore with."""

    def on_train_begin(self, logs=None):
        self.params_at = []

    def on_epoch_end(self, epoch, logs=None):
        self.params_at.append(self.model.get_params())


def _overfitting_validation() -> dict[str, np.ndarray]:
    """Half of it follows the training rule, half has random labels: the validation loss
    falls while the rule is learned, then rises as the logits grow confident (its minimum
    is at epoch 12 of this fit)."""
    val = _data(40, seed=2)
    val["y"][20:] = np.eye(3)[np.random.default_rng(0).integers(0, 3, 20)]
    return val


def test_early_stopping_stops_after_patience_and_restores_the_best_params(model):
    val, patience = _overfitting_validation(), 3
    stop, record = EarlyStopping(patience=patience, restore_best_weights=True), ParamsEachEpoch()
    h = _fit(model, _data(60, seed=1), epochs=40, batch_size=10, validation=val,
             callbacks=[record, stop])
    losses = h["val_loss"]
    best = int(np.argmin(losses))
    assert 0 < best == stop.best_epoch and stop.stopped_epoch == best + patience
    assert len(h) == best + patience + 1 < 40 and h.stop_training and "stopped early" in repr(h)
    assert all(v >= losses[best] for v in losses[best + 1:])
    restored = model.get_params()
    assert all(np.array_equal(restored[p], v) for p, v in record.params_at[best].items())
    assert not np.array_equal(restored["W"], record.params_at[-1]["W"])
    assert graphc.evaluate(model, val)["loss"] == pytest.approx(losses[best], rel=1e-12)


def test_early_stopping_rule_on_a_scripted_sequence():
    """Keras's rule: stop when `patience` epochs in a row fail to beat the best by more
    than min_delta; "auto" maximizes an accuracy."""
    def stopped(values, **kw):
        stop = EarlyStopping(**kw)
        stop.history = graphc.History()
        stop.history.metric_names = ["loss", "val_loss", "val_accuracy"]
        stop.on_train_begin()
        for epoch, v in enumerate(values):
            stop.on_epoch_end(epoch, {kw.get("monitor", "val_loss"): v})
            if stop.history.stop_training:
                return epoch, stop.best_epoch
        return None, stop.best_epoch

    assert stopped([5, 4, 4, 4.5, 3], patience=2) == (3, 1)
    assert stopped([5, 4, 4, 4.5, 3], patience=3) == (None, 4)
    assert stopped([5, 4, 3.95, 3.92], patience=2, min_delta=0.1) == (3, 1)
    assert stopped([5, 6], patience=0) == (1, 0)
    assert stopped([0.5, 0.6, 0.55, 0.58], monitor="val_accuracy", patience=2) == (3, 1)
    assert stopped([0.5, 0.4, 0.3], monitor="val_accuracy", mode="min", patience=5) == (None, 2)


def test_model_checkpoint_saves_each_epoch_or_the_best(model, monkeypatch, tmp_path):
    """`model.save` comes with the checkpoint work; a stand-in records the calls here."""
    saved = []
    monkeypatch.setattr(model, "save", lambda path: saved.append((path, model.get_params())),
                        raising=False)
    val = _overfitting_validation()
    every = ModelCheckpoint(tmp_path / "e{epoch:02d}-{val_loss:.4f}.npz", save_best_only=False)
    best = ModelCheckpoint(str(tmp_path / "best.npz"), save_best_only=True)
    record = ParamsEachEpoch()
    h = _fit(model, _data(60, seed=1), epochs=16, batch_size=10, validation=val,
             callbacks=[record, every, best])
    each = [p for p, _ in saved if "best" not in p]
    losses = h["val_loss"]
    assert each == [str(tmp_path / f"e{e + 1:02d}-{v:.4f}.npz") for e, v in enumerate(losses)]
    improved = [e for e, v in enumerate(losses) if v < min(losses[:e], default=np.inf)]
    best_saves = [params for p, params in saved if p.endswith("best.npz")]
    assert len(best_saves) == len(improved) == len(best.saved) and 0 < improved[-1] < 15
    assert all(np.array_equal(best_saves[-1][p], v)
               for p, v in record.params_at[improved[-1]].items())


class LrModel:
    """The model with a settable learning rate, as `set_lr` and a live `optimizer["lr"]`
    give it after the optimizer-state work; until then this stand-in records the rates
    (the steps themselves run at the compiled lr)."""

    def __init__(self, model):
        self._model, self.lr, self.set = model, model.optimizer["lr"], []

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def optimizer(self):
        return {**self._model.optimizer, "lr": self.lr}

    def set_lr(self, lr):
        self.lr = lr
        self.set.append(lr)


def _torch_lrs(name, steps, *args, metrics=None, **kwargs):
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    scheduler = getattr(torch.optim.lr_scheduler, name)(optimizer, *args, **kwargs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for i in range(steps):
        optimizer.step()
        scheduler.step(*([metrics[i]] if metrics else []))
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_schedule_per_epoch_sets_the_lr_each_epoch_and_history_records_it(model):
    lr_model = LrModel(model)
    h = _fit(lr_model, _data(30), epochs=7, batch_size=8,
             callbacks=[LearningRateScheduler(StepLR(2, gamma=0.5))])
    # the epoch's rate: 0.05 for epochs 0-1, 0.025 for 2-3, ...; set once before training
    # and after each epoch but the last
    assert h["lr"] == [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125, 0.00625]
    assert lr_model.set == h["lr"]
    assert h["lr"] == _torch_lrs("StepLR", 6, 2, gamma=0.5)


def test_onecycle_steps_each_batch_as_torch(model):
    lr_model = LrModel(model)
    schedule = OneCycleLR(0.2, epochs=3, steps_per_epoch=4)   # 30 examples, batches of 8
    h = _fit(lr_model, _data(30), epochs=3, batch_size=8,
             callbacks=[LearningRateScheduler(schedule)])
    want = _torch_lrs("OneCycleLR", 11, 0.2, epochs=3, steps_per_epoch=4, cycle_momentum=False)
    assert max(abs(a - b) / b for a, b in zip(lr_model.set, want)) <= 1e-12
    assert len(lr_model.set) == 12 and h["lr"] == [want[0], want[4], want[8]]
    with pytest.raises(InputError, match="this fit takes 15 batch steps of the schedule, more "
                                         "than its total_steps of 12"):
        _fit(lr_model, _data(30), epochs=4, batch_size=8,
             callbacks=[LearningRateScheduler(schedule)])


def test_plateau_and_function_schedules(model):
    lr_model = LrModel(model)
    schedule = ReduceLROnPlateau(patience=0, factor=0.5)
    val = _overfitting_validation()
    h = _fit(lr_model, _data(60, seed=1), epochs=16, batch_size=10, validation=val,
             callbacks=[LearningRateScheduler(schedule)])
    # (the steps ran at the compiled lr: the same val_loss sequence drives torch's)
    want = _torch_lrs("ReduceLROnPlateau", 15, patience=0, factor=0.5, metrics=h["val_loss"])
    assert h["lr"] == want[:16] and want[15] < 0.05

    lr_model = LrModel(model)
    h = _fit(lr_model, _data(30), epochs=4, batch_size=8,
             callbacks=[LearningRateScheduler(lambda epoch: 0.1 / (1 + epoch))])
    assert h["lr"] == [0.1, 0.05, 0.1 / 3, 0.025]
    with pytest.raises(InputError, match="the schedule gave lr -1.0 at epoch 1; a learning rate "
                                         "must be a non-negative finite number"):
        _fit(LrModel(model), _data(30), epochs=3,
             callbacks=[LearningRateScheduler(lambda epoch: 0.1 - 1.1 * epoch)])


@pytest.mark.parametrize("callback, message", [
    (lambda: EarlyStopping(), "EarlyStopping: monitor 'val_loss' is not recorded by this fit "
                              "(recorded: loss, accuracy) (validation values need validation= "
                              "or validation_split=)"),
    (lambda: EarlyStopping(monitor="mae"), "monitor 'mae' is not recorded"),
    (lambda: ModelCheckpoint("m.npz", save_best_only=True), "ModelCheckpoint: monitor "
                                                            "'val_loss' is not recorded"),
    (lambda: LearningRateScheduler(ReduceLROnPlateau()), "LearningRateScheduler: monitor "
                                                         "'val_loss' is not recorded"),
])
def test_a_monitor_fit_does_not_record_is_refused_before_any_step(model, callback, message):
    before = model.get_params()
    with pytest.raises(InputError) as e:
        _fit(LrModel(model), _data(20), epochs=2, callbacks=[callback()])
    assert message in str(e.value)
    assert all(np.array_equal(before[p], v) for p, v in model.get_params().items())


@pytest.mark.parametrize("make, message", [
    (lambda: EarlyStopping(patience=-1), "EarlyStopping: patience must be a non-negative "
                                         "integer, got -1"),
    (lambda: EarlyStopping(mode="lower"), "EarlyStopping: mode must be 'auto', 'min' or 'max'"),
    (lambda: EarlyStopping(min_delta=-0.1), "EarlyStopping: min_delta must be a non-negative"),
    (lambda: LearningRateScheduler(0.1), "LearningRateScheduler: schedule must be a "
                                         "graphc.schedules object or a function"),
    (lambda: LearningRateScheduler(StepLR(2), per="step"), "per must be 'epoch' or 'batch'"),
    (lambda: LearningRateScheduler(ReduceLROnPlateau(), per="batch"),
     "ReduceLROnPlateau steps once an epoch"),
])
def test_bad_callback_arguments(make, message):
    with pytest.raises(InputError) as e:
        make()
    assert message in str(e.value)
