"""LR schedules are pure functions of the step."""
import math

import pytest

from launcher.schedule import ScheduleArgs, lr_at


def test_warmup_then_cosine_to_min_lr():
    args = ScheduleArgs(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 1.0, args, total_steps=110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # falling decay
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)  # min_lr after the end


def test_decay_steps_can_end_before_training_does():
    args = ScheduleArgs(name="linear", warmup_steps=0, min_lr_ratio=0.0, decay_steps=50)
    assert lr_at(0, 2.0, args, total_steps=100) == pytest.approx(2.0)
    assert lr_at(25, 2.0, args, total_steps=100) == pytest.approx(1.0)
    assert lr_at(75, 2.0, args, total_steps=100) == 0.0


def test_constant_holds_the_peak_after_warmup():
    args = ScheduleArgs(name="constant", warmup_steps=4)
    assert [lr_at(s, 1.0, args, 10) for s in (0, 3, 5, 20)] == [0.25, 1.0, 1.0, 1.0]
