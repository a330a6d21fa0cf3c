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
    compiled.set_lr(0.05)   # a reset keeps the lr a schedule left
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


def test_model_checkpoint_saves_each_epoch_or_the_best(model, tmp_path):
    """Each epoch's file, and the best one, load back (graphc.load_model) as the params of
    that epoch."""
    val = _overfitting_validation()
    every = ModelCheckpoint(tmp_path / "e{epoch:02d}-{val_loss:.4f}.graphc", save_best_only=False)
    best = ModelCheckpoint(str(tmp_path / "best.graphc"), save_best_only=True)
    record = ParamsEachEpoch()
    h = _fit(model, _data(60, seed=1), epochs=16, batch_size=10, validation=val,
             callbacks=[record, every, best])
    losses = h["val_loss"]
    each = sorted(p.name for p in tmp_path.glob("e*.graphc"))
    assert each == [f"e{e + 1:02d}-{v:.4f}.graphc" for e, v in enumerate(losses)]
    improved = [e for e, v in enumerate(losses) if v < min(losses[:e], default=np.inf)]
    assert len(improved) == len(best.saved) and 0 < improved[-1] < 15
    for epoch, name in ((3, each[3]), (improved[-1], "best.graphc")):
        saved = graphc.load_model(tmp_path / name).get_params()
        assert all(np.array_equal(saved[p], v) for p, v in record.params_at[epoch].items())


class LrEachStep(Callback):
    """The learning rate each train step ran at, read back from the C's state (first in
    the callback list, so before the scheduler sets the next one)."""

    def on_train_begin(self, logs=None):
        self.lrs = []

    def on_batch_end(self, batch, logs=None):
        self.lrs.append(self.model.optimizer["lr"])


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
    steps = LrEachStep()
    h = _fit(model, _data(30), epochs=7, batch_size=8,
             callbacks=[steps, LearningRateScheduler(StepLR(2, gamma=0.5))])
    # the epoch's rate: 0.05 for epochs 0-1, 0.025 for 2-3, ...; set once before training
    # and after each epoch but the last; each epoch's 4 steps run at it
    assert h["lr"] == [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125, 0.00625]
    assert steps.lrs == [lr for lr in h["lr"] for _ in range(4)]
    assert h["lr"] == _torch_lrs("StepLR", 6, 2, gamma=0.5)


def test_onecycle_steps_each_batch_as_torch(model):
    steps = LrEachStep()
    schedule = OneCycleLR(0.2, epochs=3, steps_per_epoch=4)   # 30 examples, batches of 8
    h = _fit(model, _data(30), epochs=3, batch_size=8,
             callbacks=[steps, LearningRateScheduler(schedule)])
    want = _torch_lrs("OneCycleLR", 11, 0.2, epochs=3, steps_per_epoch=4, cycle_momentum=False)
    assert len(steps.lrs) == 12 and max(abs(a - b) / b for a, b in zip(steps.lrs, want)) <= 1e-12
    assert h["lr"] == [want[0], want[4], want[8]]
    with pytest.raises(InputError, match="this fit takes 15 batch steps of the schedule, more "
                                         "than its total_steps of 12"):
        _fit(model, _data(30), epochs=4, batch_size=8,
             callbacks=[LearningRateScheduler(schedule)])


def test_scheduled_steps_equal_torch_sgd_under_the_same_scheduler(model):
    """The params after a fit with StepLR equal torch's SGD stepped by torch's StepLR on
    the same batches (no shuffling), float64."""
    torch = pytest.importorskip("torch")
    data = _data(24)
    start = {k: torch.tensor(v, requires_grad=True) for k, v in model.get_params().items()}
    _fit(model, data, epochs=4, batch_size=8, shuffle=False,
         callbacks=[LearningRateScheduler(StepLR(1, gamma=0.5))])
    opt = torch.optim.SGD(list(start.values()), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x, y = torch.tensor(data["x"]), torch.tensor(data["y"])
    for _ in range(4):
        for lo in range(0, 24, 8):
            opt.zero_grad()
            logits = x[lo:lo + 8] @ start["W"].T + start["b"]
            loss = -(y[lo:lo + 8] * torch.log_softmax(logits, -1)).sum(-1).mean()
            loss.backward()
            opt.step()
        scheduler.step()
    got = model.get_params()
    assert max(float(np.max(np.abs(got[k] - v.detach().numpy()))) for k, v in start.items()) \
        < 1e-12


def test_plateau_and_function_schedules(model):
    steps = LrEachStep()
    schedule = ReduceLROnPlateau(patience=0, factor=0.5)
    val = _overfitting_validation()
    h = _fit(model, _data(60, seed=1), epochs=16, batch_size=10, validation=val,
             callbacks=[steps, LearningRateScheduler(schedule)])
    want = _torch_lrs("ReduceLROnPlateau", 15, patience=0, factor=0.5, metrics=h["val_loss"])
    assert h["lr"] == want[:16] and want[15] < 0.05
    assert steps.lrs == [lr for lr in h["lr"] for _ in range(6)]

    h = _fit(model, _data(30), epochs=4, batch_size=8,
             callbacks=[LearningRateScheduler(lambda epoch: 0.1 / (1 + epoch))])
    assert h["lr"] == [0.1, 0.05, 0.1 / 3, 0.025] and model.optimizer["lr"] == 0.025
    with pytest.raises(InputError, match="the schedule gave lr -1.0 at epoch 1; a learning rate "
                                         "must be a non-negative finite number"):
        _fit(model, _data(30), epochs=3,
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
    (lambda: ModelCheckpoint("m-{loss.x}.graphc"), "ModelCheckpoint: cannot fill in path "
                                                   "'m-{loss.x}.graphc' (AttributeError"),
    (lambda: ModelCheckpoint("m-{val_loss}.graphc"), "ModelCheckpoint: cannot fill in path "
                                                     "'m-{val_loss}.graphc' (KeyError"),
])
def test_a_monitor_fit_does_not_record_is_refused_before_any_step(model, callback, message):
    before = model.get_params()
    with pytest.raises(InputError) as e:
        _fit(model, _data(20), epochs=2, callbacks=[callback()])
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
