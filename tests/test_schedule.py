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


def test_wsd_holds_the_peak_then_cools_down_in_each_shape():
    peak, floor = 1.0, 0.1
    for shape, quarter in (("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))), ("1-sqrt", 0.5)):
        args = ScheduleArgs(name="wsd", warmup_steps=10, min_lr_ratio=floor, cooldown_steps=40, cooldown_shape=shape)
        lrs = [lr_at(s, peak, args, total_steps=100) for s in range(110)]
        assert lrs[9] == lrs[10] == lrs[59] == pytest.approx(peak)  # stable phase up to 100 - 40
        assert lrs[70] == pytest.approx(floor + (peak - floor) * quarter)  # a quarter into the cooldown
        assert all(a >= b for a, b in zip(lrs[60:100], lrs[61:101]))
        assert lrs[100] == lrs[109] == pytest.approx(floor)


def test_a_cooldown_can_start_anywhere_in_the_stable_phase():
    """An "infinite" run: the same settings with the cooldown started at step 300 (e.g. a resume
    from the step-300 checkpoint with train.steps=400) equal the stable run up to 300."""
    infinite = ScheduleArgs(name="wsd", warmup_steps=10, cooldown_steps=100, cooldown_start=10**9)
    triggered = ScheduleArgs(name="wsd", warmup_steps=10, cooldown_steps=100)  # starts at train.steps - 100
    assert [lr_at(s, 1.0, infinite, 10**9) for s in range(300)] == [lr_at(s, 1.0, triggered, 400) for s in range(300)]
    assert lr_at(300, 1.0, triggered, 400) == 1.0 and lr_at(350, 1.0, triggered, 400) == pytest.approx(0.55)


def test_schedules_plot(tmp_path):
    """Each schedule, drawn: the PNG is kept for a person to look at under pytest's tmp_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = 1000
    shapes = {
        "cosine": ScheduleArgs(name="cosine", warmup_steps=50),
        "linear": ScheduleArgs(name="linear", warmup_steps=50),
        "constant": ScheduleArgs(name="constant", warmup_steps=50),
        **{f"wsd {s}": ScheduleArgs(name="wsd", warmup_steps=50, cooldown_steps=200, cooldown_shape=s, min_lr_ratio=0.0)
           for s in ("linear", "cosine", "1-sqrt")},
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, args in shapes.items():
        lrs = [lr_at(s, 1.0, args, total) for s in range(total)]
        assert max(lrs) == pytest.approx(1.0) and lrs[0] == pytest.approx(1 / 50)
        ax.plot(lrs, label=label)
    ax.legend()
    fig.savefig(tmp_path / "schedules.png")
    assert (tmp_path / "schedules.png").stat().st_size > 10_000
