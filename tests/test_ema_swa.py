"""EMA and SWA math against single-process references, and the stateful wrapper's bookkeeping."""
import pytest
import torch

from averaging.ema_swa import (
    EmaArgs,
    ShardAverages,
    SwaArgs,
    ema_decay,
    ema_reference,
    ema_update_,
    scheduled_lr,
    swa_update_,
)
from averaging.lawa import average_tensors


def history(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(37, generator=g), torch.randn(5, 3, generator=g)] for _ in range(n)]


def test_half_life_means_half_the_weight_after_that_many_steps():
    for every in (1, 4):
        decay = ema_decay(half_life=100, every=every)
        assert decay ** (100 / every) == pytest.approx(0.5)


def test_in_place_ema_equals_the_reference():
    h = history(12)
    average = [t.clone() for t in h[0]]
    for weights in h[1:]:
        ema_update_(average, weights, 0.8)
    for a, b in zip(average, ema_reference(h, 0.8)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_running_swa_equals_the_uniform_mean():
    h = history(9)
    average = [t.clone() for t in h[0]]
    for count, weights in enumerate(h[1:], start=1):
        swa_update_(average, weights, count)
    for i, a in enumerate(average):
        torch.testing.assert_close(a, average_tensors([w[i] for w in h]), rtol=1e-6, atol=1e-6)


def test_wrapper_follows_start_step_and_update_interval():
    """Weights change every step; the wrapper's EMA/SWA must equal the references over exactly the
    steps its settings select."""
    h = history(20, seed=3)
    weights = [t.clone() for t in h[0]]
    ema_args = EmaArgs(enabled=True, half_life=3.0, start_step=4, every=2)
    swa_args = SwaArgs(enabled=True, start_step=9)
    avg = ShardAverages(ema_args, swa_args, weights, snapshot_every=3)
    seen = {}
    for step in range(1, 20):
        for w, new in zip(weights, h[step]):
            w.copy_(new)  # the optimizer's in-place update of the partition
        avg.update(step)
        seen[step] = [t.clone() for t in h[step]]
    ema_steps = [s for s in range(1, 20) if s >= 4 and (s - 4) % 2 == 0]
    swa_steps = [s for s in range(1, 20) if s >= 9 and s % 3 == 0]
    assert avg.ema_updates == len(ema_steps) and avg.swa_count == len(swa_steps) == 4
    for a, b in zip(avg.ema, ema_reference([seen[s] for s in ema_steps], ema_decay(3.0, 2))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for i, a in enumerate(avg.swa):
        torch.testing.assert_close(a, average_tensors([seen[s][i] for s in swa_steps]), rtol=1e-6, atol=1e-6)
    assert avg.describe() == {"ema": {"decay": ema_decay(3.0, 2), "every": 2, "start_step": 4, "updates": len(ema_steps)},
                              "swa": {"start_step": 9, "every": 3, "count": 4}}


def test_averages_appear_only_once_started_and_survive_a_state_dict_round_trip():
    weights = [torch.ones(4)]
    avg = ShardAverages(EmaArgs(enabled=True, start_step=5), SwaArgs(enabled=True, start_step=10), weights, 5)
    avg.update(4)
    assert avg.current() == {}
    avg.update(5)
    assert set(avg.current()) == {"ema"}  # SWA starts at step 10
    weights[0].fill_(3.0)
    avg.update(6)
    restored = ShardAverages(avg.ema_args, avg.swa_args, [torch.zeros(4)], 5)
    restored.load_state_dict(avg.state_dict())
    torch.testing.assert_close(restored.ema[0], avg.ema[0])
    assert restored.ema_updates == avg.ema_updates == 2 and restored.swa is None
    with pytest.raises(ValueError, match="layout"):
        ShardAverages(avg.ema_args, avg.swa_args, [torch.zeros(5)], 5).load_state_dict(avg.state_dict())


def test_the_offload_path_keeps_the_ema_math():
    """Offloaded, the EMA is updated by a worker thread from a staging copy of the weights, fenced
    before it is read; the weights may change right after `update` returns (the next step), and the
    EMA still holds the values they had. On CPU weights both placements are host memory, so where it
    lives is checked on a GPU (bench/gpu_check.py); here, its values and its fences."""
    weights = [torch.randn(1000), torch.randn(10)]
    avg = ShardAverages(EmaArgs(enabled=True, half_life=2.0, offload=True), SwaArgs(), weights, 0)
    history = [[w.clone() for w in weights]]
    avg.update(0)
    for step in range(1, 6):
        for w in weights:
            w.add_(torch.randn_like(w))
        history.append([w.clone() for w in weights])
        avg.update(step)
        avg.fence()
        for w in weights:  # the next optimizer step, while the host update may still run
            w.mul_(0.0)
        for w, h in zip(weights, history[-1]):
            w.copy_(h)
    assert avg.host is not None and avg.ema_updates == 6
    got = avg.current()["ema"]
    want = ema_reference(history, ema_decay(2.0, 1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    restored = ShardAverages(avg.ema_args, avg.swa_args, weights, 0)
    restored.load_state_dict(avg.state_dict())
    assert restored.host is not None and all(torch.equal(a, b) for a, b in zip(restored.current()["ema"], got))


def test_swa_learning_rate_phase_replaces_the_schedule_from_its_start():
    swa = SwaArgs(enabled=True, start_step=100, lr=5e-4)
    assert scheduled_lr(99, 1e-3, swa) == 1e-3 and scheduled_lr(100, 1e-3, swa) == 5e-4
    assert scheduled_lr(100, 1e-3, SwaArgs(enabled=True, start_step=100)) == 1e-3


def test_a_decay_can_be_given_instead_of_a_half_life():
    avg = ShardAverages(EmaArgs(enabled=True, decay=0.9), SwaArgs(), [torch.zeros(3)], 0)
    assert avg.decay == 0.9


def authors_ema(history: list[list[torch.Tensor]], beta: float, power: float) -> list[torch.Tensor]:
    """The LAWA paper's EMA written as its training scripts run it: called after every optimizer step,
    the first call copies the weights, call k (k = 1, 2, ...) lerps with decay 1 - (1 + k)^-power, capped
    at beta (update_after_step=0, update_every=1, inv_gamma=1)."""
    average = None
    for k, weights in enumerate(history):
        if average is None:
            average = [w.clone() for w in weights]
            continue
        decay = min(beta, 1.0 - (1.0 + k) ** -power)
        average = [decay * a + (1.0 - decay) * w for a, w in zip(average, weights)]
    return average


def test_the_warmup_follows_the_lawa_papers_ema_update_for_update():
    h = history(60, seed=5)  # long enough that the warmup reaches its cap of 0.9 (at update 31)
    weights = [t.clone() for t in h[0]]
    avg = ShardAverages(EmaArgs(enabled=True, decay=0.9, warmup_power=2 / 3), SwaArgs(), weights, snapshot_every=10)
    for step in range(1, 61):
        for w, new in zip(weights, h[step - 1]):
            w.copy_(new)
        avg.update(step)
        if step in (2, 5, 31, 60):
            for a, b in zip(avg.current()["ema"], authors_ema(h[:step], 0.9, 2 / 3)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert avg.current_decay == 0.9
    # Without the warmup the same decay from the second update on: a different average.
    plain = ShardAverages(EmaArgs(enabled=True, decay=0.9), SwaArgs(), [t.clone() for t in h[0]], snapshot_every=10)
    for step in range(1, 6):
        for w, new in zip(plain.weights, h[step - 1]):
            w.copy_(new)
        plain.update(step)
    assert not torch.allclose(plain.current()["ema"][0], authors_ema(h[:5], 0.9, 2 / 3)[0])


def test_swa_every_sets_its_own_interval():
    h = history(25, seed=6)
    weights = [t.clone() for t in h[0]]
    avg = ShardAverages(EmaArgs(), SwaArgs(enabled=True, every=10), weights, snapshot_every=7)
    for step in range(1, 25):
        for w, new in zip(weights, h[step]):
            w.copy_(new)
        avg.update(step)
    assert avg.swa_count == 2  # steps 10 and 20, not the snapshot steps
    for a, i in zip(avg.current()["swa"], range(2)):
        torch.testing.assert_close(a, average_tensors([h[10][i], h[20][i]]), rtol=1e-6, atol=1e-6)
