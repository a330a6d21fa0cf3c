"""graphc.schedules against torch.optim.lr_scheduler, step by step; their closed forms where
torch is missing; argument errors; the CLI's short form."""

from __future__ import annotations

import math

import pytest

from graphc.errors import GraphcError, InputError
from graphc.schedules import (CosineAnnealingLR, ExponentialLR, LinearLR, MultiStepLR,
                              OneCycleLR, ReduceLROnPlateau, StepLR, parse_schedule)

STEPS, LR = 50, 0.1
# A monitored value that improves, stalls, improves a little and stalls again.
PLATEAU = [1.0 - 0.05 * i for i in range(10)] + [0.55] * 20 + \
    [0.55 - 0.02 * i for i in range(5)] + [0.48] * 16

# (ours, torch's constructor arguments after the optimizer, metric sequence or None)
CASES = [
    (StepLR(7, gamma=0.5), ("StepLR", (7,), {"gamma": 0.5}), None),
    (MultiStepLR([30, 5, 12, 12], 0.3), ("MultiStepLR", ([30, 5, 12, 12], 0.3), {}), None),
    (ExponentialLR(0.93), ("ExponentialLR", (0.93,), {}), None),
    (CosineAnnealingLR(20, eta_min=0.001), ("CosineAnnealingLR", (20, 0.001), {}), None),
    # past T_max torch climbs back up (no restart): 13 steps down, 13 up, ...
    (CosineAnnealingLR(13), ("CosineAnnealingLR", (13,), {}), None),
    (LinearLR(0.1, 1.0, 10), ("LinearLR", (), {"start_factor": 0.1, "total_iters": 10}), None),
    (LinearLR(1.0, 0.2, 30), ("LinearLR", (), {"start_factor": 1.0, "end_factor": 0.2,
                                               "total_iters": 30}), None),
    (OneCycleLR(0.5, total_steps=STEPS),
     ("OneCycleLR", (0.5,), {"total_steps": STEPS, "cycle_momentum": False}), None),
    (OneCycleLR(0.5, epochs=5, steps_per_epoch=10, pct_start=0.25, anneal_strategy="linear",
                div_factor=10.0, final_div_factor=100.0, three_phase=True),
     ("OneCycleLR", (0.5,), {"epochs": 5, "steps_per_epoch": 10, "pct_start": 0.25,
                             "anneal_strategy": "linear", "div_factor": 10.0,
                             "final_div_factor": 100.0, "three_phase": True,
                             "cycle_momentum": False}), None),
    (ReduceLROnPlateau(patience=3, cooldown=2, factor=0.5, threshold=0.01),
     ("ReduceLROnPlateau", (), {"patience": 3, "cooldown": 2, "factor": 0.5,
                                "threshold": 0.01}), PLATEAU),
    (ReduceLROnPlateau(mode="max", threshold_mode="abs", threshold=0.02, patience=0,
                       min_lr=0.02, factor=0.5),
     ("ReduceLROnPlateau", (), {"mode": "max", "threshold_mode": "abs", "threshold": 0.02,
                                "patience": 0, "min_lr": 0.02, "factor": 0.5}),
     [-v for v in PLATEAU]),
]


def ours(schedule, metrics=None, lr=LR) -> list[float]:
    lrs = [schedule.start(lr)]
    for i in range(STEPS):
        lrs.append(schedule.step(metrics[i]) if metrics is not None else schedule.step())
    return lrs


def torchs(name, args, kwargs, metrics=None, lr=LR) -> list[float]:
    """The lr of torch's scheduler over STEPS steps, on a dummy SGD optimizer."""
    import torch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = getattr(torch.optim.lr_scheduler, name)(optimizer, *args, **kwargs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for i in range(STEPS):
        optimizer.step()
        scheduler.step(metrics[i]) if metrics is not None else scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) if y else abs(x) for x, y in zip(a, b))


@pytest.mark.parametrize("schedule, spec, metrics", CASES, ids=lambda c: repr(c)[:40])
def test_equals_torch_step_by_step(schedule, spec, metrics):
    pytest.importorskip("torch")
    want = torchs(*spec, metrics=metrics)
    got = ours(schedule, metrics)
    assert len(got) == len(want) == STEPS + 1 and len(set(got)) > 2   # it moves
    assert max_relative_difference(got, want) <= 1e-12   # (seen: 0, bit for bit)
    assert ours(schedule, metrics) == got   # start() begins anew


def test_closed_forms_without_torch():
    """What the recursive forms approximate, in the documented closed forms."""
    steps = range(STEPS + 1)

    def close(got, want):
        assert max_relative_difference(got, want) <= 1e-12

    close(ours(StepLR(7, 0.5)), [LR * 0.5 ** (e // 7) for e in steps])
    close(ours(MultiStepLR([5, 12, 12], 0.3)),
          [LR * 0.3 ** ((e >= 5) + 2 * (e >= 12)) for e in steps])
    close(ours(ExponentialLR(0.93)), [LR * 0.93 ** e for e in steps])
    close(ours(CosineAnnealingLR(20, 0.001))[:21],
          [0.001 + (LR - 0.001) * (1 + math.cos(math.pi * e / 20)) / 2 for e in range(21)])
    close(ours(LinearLR(0.1, 1.0, 10)), [LR * (0.1 + 0.9 * min(e, 10) / 10) for e in steps])
    lrs = ours(OneCycleLR(0.5, total_steps=STEPS, pct_start=0.3))
    assert lrs[0] == pytest.approx(0.5 / 25, rel=1e-12)     # max_lr / div_factor
    assert max(lrs) == lrs[14] == pytest.approx(0.5)          # at pct_start·total_steps - 1
    assert lrs[STEPS - 1] == pytest.approx(0.5 / 25 / 1e4, rel=1e-12)   # / final_div_factor
    # patience 3: the 4th value that fails to beat the best by 1% cuts the lr, then 2 quiet
    plateau = ours(ReduceLROnPlateau(patience=3, cooldown=2, factor=0.5, threshold=0.01),
                   PLATEAU)
    assert plateau[:14] == [LR] * 14 and plateau[14] == LR / 2


def test_plateau_needs_its_value_and_every_schedule_needs_start():
    with pytest.raises(TypeError):
        ReduceLROnPlateau().step()
    with pytest.raises(InputError, match="StepLR: call start\\(lr\\) before step\\(\\)"):
        StepLR(3).step()
    schedule = OneCycleLR(0.1, total_steps=3)
    schedule.start(1.0)
    for _ in range(3):
        schedule.step()
    with pytest.raises(InputError, match="OneCycleLR: stepped 4 times, past its total_steps "
                                         "of 3"):
        schedule.step()


@pytest.mark.parametrize("make, message", [
    (lambda: StepLR(0), "StepLR: step_size must be a positive integer, got 0"),
    (lambda: StepLR(2.5), "StepLR: step_size must be a positive integer, got 2.5"),
    (lambda: StepLR(3, gamma=float("nan")), "StepLR: gamma must be a finite number, got nan"),
    (lambda: MultiStepLR(10), "MultiStepLR: milestones must be a list of step counts, got 10"),
    (lambda: MultiStepLR([3, 0]), "MultiStepLR: milestones must be a positive integer, got 0"),
    (lambda: ExponentialLR(-0.5), "ExponentialLR: gamma must lie in [0, inf], got -0.5"),
    (lambda: CosineAnnealingLR(0), "CosineAnnealingLR: T_max must be a positive integer"),
    (lambda: LinearLR(start_factor=0), "LinearLR: start_factor must lie in (0, 1], got 0"),
    (lambda: LinearLR(end_factor=1.5), "LinearLR: end_factor must lie in [0, 1], got 1.5"),
    (lambda: OneCycleLR(0.1), "OneCycleLR: give total_steps, or epochs and steps_per_epoch"),
    (lambda: OneCycleLR(0.1, epochs=2, steps_per_epoch=0),
     "OneCycleLR: steps_per_epoch must be a positive integer, got 0"),
    (lambda: OneCycleLR(0.1, 10, pct_start=0.1), "OneCycleLR: pct_start 0.1 of total_steps "
                                                  "10 leaves a phase without steps"),
    (lambda: OneCycleLR(0.1, 10, pct_start=1.0), "leaves a phase without steps"),
    (lambda: OneCycleLR(0.1, 10, anneal_strategy="cosine"),
     "OneCycleLR: anneal_strategy must be 'cos' or 'linear', got 'cosine'"),
    (lambda: ReduceLROnPlateau(mode="lowest"), "ReduceLROnPlateau: mode must be 'min' or "
                                               "'max', got 'lowest'"),
    (lambda: ReduceLROnPlateau(factor=1.0), "ReduceLROnPlateau: factor must lie in [0, 1), "
                                            "got 1"),
    (lambda: ReduceLROnPlateau(patience=-1), "ReduceLROnPlateau: patience must be a "
                                             "non-negative integer, got -1"),
])
def test_bad_arguments_name_the_schedule_and_field(make, message):
    with pytest.raises(InputError) as e:
        make()
    assert message in str(e.value)


def test_parse_the_cli_form():
    s = parse_schedule("step:step_size=10,gamma=0.5")
    assert isinstance(s, StepLR) and (s.step_size, s.gamma) == (10, 0.5)
    s = parse_schedule("multistep:milestones=[10, 15],gamma=1e-1")
    assert s.milestones == [10, 15] and s.gamma == 0.1
    s = parse_schedule("onecycle:max_lr=0.1,three_phase=true", epochs=4, steps_per_epoch=7)
    assert s.total_steps == 28 and s.three_phase is True
    assert parse_schedule("onecycle:max_lr=0.1,total_steps=9", epochs=4,
                          steps_per_epoch=7).total_steps == 9   # torch's precedence
    assert isinstance(parse_schedule("plateau", epochs=3), ReduceLROnPlateau)
    assert repr(parse_schedule("cosine:T_max=20")) == "CosineAnnealingLR(T_max=20, eta_min=0.0)"


@pytest.mark.parametrize("text, message", [
    ("warm:x=1", "--lr-schedule: unknown schedule 'warm' (known: step, multistep, exponential, "
                 "cosine, linear, onecycle, plateau)"),
    ("step:gama=0.5", "--lr-schedule step: unknown field 'gama' (its fields: step_size, gamma)"),
    ("step:gamma=0.5", "--lr-schedule step: missing field 'step_size' (e.g. step:step_size=...)"),
    ("step:step_size", "--lr-schedule step: expected field=value, got 'step_size'"),
    ("step:step_size=0", "--lr-schedule step: StepLR: step_size must be a positive integer"),
    ("cosine:T_max=ten", "--lr-schedule cosine: CosineAnnealingLR: T_max must be a positive "
                         "integer, got 'ten'"),
])
def test_parse_errors_name_the_field(text, message):
    with pytest.raises(GraphcError) as e:
        parse_schedule(text)
    assert message in str(e.value)
