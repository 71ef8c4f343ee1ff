import itertools
import math

import pytest

from lrm_train.optim import (
    ScheduleConfig,
    ScheduleName,
    batch_fraction,
    constant_phase,
    decay_start,
    equilibration_times,
    lr_factor,
)


def factors(cfg, total):
    return [lr_factor(cfg, step, total) for step in range(total)]


def test_paper_schedule_warmup_constant_then_exponential_decay_by_8_over_the_last_sixth():
    cfg = ScheduleConfig(name="constant_exp_decay", warmup_steps=10, decay_fraction=1 / 6, decay_factor=8.0)
    f = factors(cfg, 120)
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10:100] == [1.0] * 90
    assert f[-1] == pytest.approx(1 / 8)
    ratios = [f[i + 1] / f[i] for i in range(100, 119)]
    assert ratios == pytest.approx([8 ** (-1 / 20)] * 19)  # exponential: a constant ratio per step


def test_cosine_and_wsd_end_at_the_floor():
    cosine = factors(ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1), 50)
    assert cosine[4] == 1.0 and cosine[-1] == pytest.approx(0.1, abs=2e-3)
    assert all(a >= b for a, b in itertools.pairwise(cosine[4:]))
    wsd = factors(ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0), 50)
    assert wsd[5:40] == [1.0] * 35 and wsd[-1] == pytest.approx(0.0)
    assert factors(ScheduleConfig(name="constant", warmup_steps=5), 50)[5:] == [1.0] * 45


def test_batch_ramp_scales_lr_by_sqrt_of_the_batch_share():
    cfg = ScheduleConfig(name="constant", warmup_steps=1, batch_ramp_steps=10, batch_ramp_start=0.25)
    assert batch_fraction(cfg, 0) == 0.25 and batch_fraction(cfg, 5) == pytest.approx(0.625)
    assert batch_fraction(cfg, 10) == 1.0
    assert lr_factor(cfg, 3, 100, used_batch_fraction=0.25) == pytest.approx(math.sqrt(0.25))


def test_bad_schedule_names_the_key():
    with pytest.raises(ValueError, match="schedule.name='linear'"):
        ScheduleConfig(name="linear")


def test_only_the_constant_then_decay_schedules_have_a_decay_start():
    assert [name for name in ScheduleName if name.decays] == [ScheduleName.constant_exp_decay, ScheduleName.wsd]
    for name in ScheduleName:
        cfg = ScheduleConfig(name=str(name), decay_fraction=0.25)  # plain strings become the enum
        assert cfg.name is name and decay_start(cfg, 100) == (75 if name.decays else 100)


def test_the_constant_phase_runs_from_the_warmup_end_to_the_decay_start_at_the_peak_lr():
    for name in ScheduleName:
        cfg = ScheduleConfig(name=str(name), warmup_steps=10, decay_fraction=0.25)
        phase = constant_phase(cfg, 100)
        if name is ScheduleName.cosine:
            assert phase is None  # it never holds the LR
            continue
        assert phase == (10, 75 if name.decays else 100)
        assert all(lr_factor(cfg, step, 100) == 1.0 for step in range(*phase))
        assert lr_factor(cfg, phase[0] - 2, 100) < 1.0  # still warming up
        if name.decays:
            assert lr_factor(cfg, phase[1], 100) < 1.0  # decaying
    assert constant_phase(ScheduleConfig(warmup_steps=80, decay_fraction=0.25), 100) is None  # warmup into the decay


def test_equilibration_times_sum_lr_times_wd_over_the_steps():
    # constant after a warmup of 4: factors 0.25, 0.5, 0.75, 1, then 1 for 6 more steps -> 8.5 x lr x wd
    constant = ScheduleConfig(name=ScheduleName.constant, warmup_steps=4)
    assert equilibration_times(constant, 10, 1, lr=0.01, weight_decay=2.0) == pytest.approx(8.5 * 0.02)
    # the paper's decay over the last 2 of 12 steps (decay_fraction 1/6, no warmup): 10 x 1, then 8^-1/2 and 8^-1
    paper = ScheduleConfig(warmup_steps=0)
    assert equilibration_times(paper, 12, 1, lr=0.1, weight_decay=1.0) == pytest.approx(0.1 * (10 + 8**-0.5 + 1 / 8))
    # a batch ramp of 2 steps from 1/2 with 2 micro-batches: steps of 1 and 2 micro-batches, LR x sqrt(1/2) then x 1
    ramp = ScheduleConfig(name=ScheduleName.constant, warmup_steps=0, batch_ramp_steps=2, batch_ramp_start=0.5)
    assert equilibration_times(ramp, 4, 2, lr=1.0, weight_decay=1.0) == pytest.approx(0.5**0.5 + 3)
