"""Schedule-derived merges, single process: the weights, the windows, and the WSM identity that
a merge of constant-LR checkpoints is one more stretch of training under a decayed LR."""
from __future__ import annotations

import re

import pytest
import torch

from averaging.lawa import (
    LawaArgs,
    Merge,
    MergeArgs,
    add_weighted,
    average_shards,
    average_state_dicts,
    merge_weights,
)
from core.config import ConfigError
from core.decay import DECAYS
from launcher.config import load_job

WEIGHTINGS = ["uniform", "linear", "cosine", "1-sqrt"]


@pytest.mark.parametrize("shape", sorted(DECAYS))
def test_each_decay_integral_is_the_integral_of_its_factor(shape):
    decay = DECAYS[shape]
    n = 20000
    for end in (0.25, 0.5, 1.0):
        numeric = sum(decay.factor((i + 0.5) / n * end) for i in range(n)) * end / n
        assert decay.integral(end) == pytest.approx(numeric, abs=1e-6)
    assert decay.factor(0.0) == pytest.approx(1.0) and decay.factor(1.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("steps", [[100, 200, 300, 400, 500], [10, 30, 35, 90], [7]])
def test_merge_weights_are_nonnegative_and_sum_to_one(weighting, steps):
    w = merge_weights(steps, weighting)
    assert len(w) == len(steps) and min(w) >= 0 and sum(w) == pytest.approx(1.0, abs=1e-12)


def test_known_weights_uniform_is_lawa_and_linear_is_the_trapezoid():
    steps = [100, 200, 300, 400, 500]
    assert merge_weights(steps, "uniform") == pytest.approx([0.2] * 5)
    assert merge_weights(steps, "linear") == pytest.approx([0.125, 0.25, 0.25, 0.25, 0.125])
    # 1-sqrt drops fastest at the start of the decay: the oldest snapshot weighs most.
    sqrt = merge_weights(steps, "1-sqrt")
    assert sqrt == sorted(sqrt, reverse=True) and sqrt[0] == pytest.approx(1 / 3)
    cosine = merge_weights(steps, "cosine")
    assert cosine == pytest.approx(cosine[::-1]) and max(cosine) == cosine[2]  # symmetric, heaviest mid-window
    with pytest.raises(ValueError, match="oldest first"):
        merge_weights([300, 200], "linear")


@pytest.mark.parametrize("shape", sorted(DECAYS))
def test_a_merge_of_constant_lr_checkpoints_is_a_decayed_run(shape):
    """SGD with gradients fixed in advance: θ_{t+1} = θ_t - η·lr_t·g_t. The merge of the
    constant-LR run's checkpoints equals (exactly) the run whose LR on each interval between
    checkpoints is the decay's mean over it, and (closely) the run decayed step by step."""
    torch.manual_seed(0)
    steps = [0, 40, 100, 120, 200]  # uneven spacing on purpose
    grads = torch.randn(steps[-1], 6, dtype=torch.float64)
    theta0 = torch.randn(6, dtype=torch.float64)
    eta = 0.01
    path = theta0 - eta * torch.cat([torch.zeros(1, 6, dtype=torch.float64), grads.cumsum(0)])  # θ_t, constant LR
    weights = merge_weights(steps, shape)
    merged = sum(w * path[s] for w, s in zip(weights, steps))

    decay = DECAYS[shape]
    span = steps[-1] - steps[0]
    per_interval = theta0.clone()
    for a, b in zip(steps, steps[1:]):
        lr = decay.mean((a - steps[0]) / span, (b - steps[0]) / span)
        per_interval -= eta * lr * grads[a:b].sum(0)
    torch.testing.assert_close(merged, per_interval, rtol=0, atol=1e-12)

    # Step by step, each update at the decay's value mid-step: the same up to the gradients' variation
    # within an interval (here i.i.d.: the difference is a small fraction of the distance travelled).
    stepwise = theta0 - eta * sum(decay.factor((t + 0.5) / span) * grads[t] for t in range(span))
    assert (merged - stepwise).norm() < 0.25 * (merged - theta0).norm()


def test_windows_select_by_count_or_by_steps_with_spacing():
    committed = list(range(10, 210, 10))  # 10 .. 200
    assert Merge("a", "uniform", spacing=10, k=3).select(committed) == [180, 190, 200]
    assert Merge("a", "uniform", spacing=30, k=3).select(committed) == [140, 170, 200]
    assert Merge("a", "linear", spacing=10, window_steps=50).select(committed) == [150, 160, 170, 180, 190, 200]
    assert Merge("a", "linear", spacing=20, window_steps=50).select(committed) == [160, 180, 200]
    assert Merge("a", "linear", spacing=10, window_steps=500).select([30, 40]) == [30, 40]  # short history
    assert Merge("a", "linear", spacing=10, k=4).select([]) == []


def test_resolve_turns_tokens_into_steps_and_defaults_to_one_lawa_merge():
    default = LawaArgs(k=4, spacing=20).resolve(snapshot_every=10, tokens_per_step=1000)
    assert [(m.name, m.weights, m.k, m.spacing) for m in default] == [("lawa", "uniform", 4, 20)]
    args = LawaArgs(k=4, merges=[MergeArgs(name="short", k=2), MergeArgs(name="wsm", window_tokens=95_000,
                                                                         weights="1-sqrt")])
    short, wsm = args.resolve(snapshot_every=10, tokens_per_step=1000)
    assert (short.k, short.spacing, short.window_steps) == (2, 10, None)
    assert (wsm.k, wsm.window_steps, wsm.weights) == (None, 95, "1-sqrt")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_streamed_weighted_sum_equals_the_weighted_average_bitwise(weighting):
    shards = [[torch.randn(33), torch.randn(5)] for _ in range(4)]
    weights = merge_weights([1, 3, 4, 9], weighting)
    total = None
    for shard, w in zip(shards, weights):
        total = add_weighted(total, shard, w)
    for got, want in zip(total, average_shards(shards, weights)):
        assert torch.equal(got, want)
    models = [{"w": s[0], "b": s[1]} for s in shards]
    reference = average_state_dicts(models, weights)
    assert torch.equal(reference["w"], total[0]) and torch.equal(reference["b"], total[1])


@pytest.mark.parametrize("override, message", [
    ("lawa.merges=[{name: raw}]", "reserved"),
    ("lawa.merges=[{name: a}, {name: a, k: 2}]", "used twice"),
    ("lawa.merges=[{name: Bad-Name}]", "lowercase"),
    ("lawa.merges=[{name: a, k: 3, window_tokens: 4096}]", "not both"),
    ("lawa.merges=[{name: a, window_tokens: 4096}]", "less than its spacing"),
    ("lawa.merges=[{name: a, window_tokens: 2000000}]", "snapshot.slots=8 cannot hold merge a"),
    ("lawa.merges=[{name: a, weights: sqrt}]", "lawa.merges[0].weights: must be one of"),
])
def test_bad_merges_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job(None, [override])
