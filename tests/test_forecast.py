"""The forecast of a cooldown: the job keys that schedule real cooldowns, and the pure functions
that set each merge's score at a cooldown's end beside it (launcher/forecast.py). The real runs are
in tests/test_lawa_distributed.py."""
from __future__ import annotations

import pytest

from core.config import ConfigError
from launcher.branch import Branch
from launcher.config import load_job
from launcher.forecast import Cooldown, end_of_run, forecasts, shown, verdict

WSD = ["schedule.name=wsd", "schedule.cooldown_steps=40", "schedule.cooldown_shape=1-sqrt", "train.steps=250",
       "snapshot.every=10"]


def test_cooldowns_default_to_the_schedules_decay_and_must_end_inside_the_stable_phase_at_a_scored_step():
    job = load_job(None, [*WSD, "cooldowns.at=[100,170]"])
    assert job.cooldown_branches() == [(100, 40, "1-sqrt", 0.1), (170, 40, "1-sqrt", 0.1)]
    assert job.stable_phase == (25, 210) and job.forecast_merge() == job.merges()[0].name  # the headline merge
    bad = {"cooldowns.at=[180]": "end by step 210, where the stable phase ends",
           "cooldowns.at=[10]": "start after the 25-step warmup",
           "cooldowns.at=[105]": "ends at step 145, which must be a step the sidecar scores",
           "cooldowns.at=[100,100]": "cooldowns.at: list distinct steps in order",
           "lawa.forecast=nope": "lawa.forecast: 'nope' names none of the merges"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_job(None, [*WSD, override])
    with pytest.raises(ConfigError, match="a stable phase to branch from: schedule.name=wsd or constant, not cosine"):
        load_job(None, ["schedule.name=cosine", "cooldowns.at=[100]", "cooldowns.steps=40"])
    cosine = load_job(None, ["schedule.name=cosine", "cooldowns.at=[]"])
    assert cosine.forecast_merge() is None  # a cosine anneals the raw weights itself
    assert load_job(None, [*WSD, "lawa.forecast=none"]).forecast_merge() is None


def records(n: int, every: int = 10) -> list[dict]:
    out = []
    for i in range(1, n + 1):
        raw = 6.0 - 0.01 * i
        out.append({"step": i * every, "tokens": i * every * 100, "raw_val_loss": raw, "merges": {"lawa": {}, "wsm": {}},
                    "lawa_val_loss": raw - 0.02, "wsm_val_loss": raw + (0.01 if i % 2 else -0.01)})
    return out


def cooldown(at: int, steps: int, final: float) -> Cooldown:
    branch = Branch(parent="/p", step=at, tokens=at * 100, checkpoint="/c", cooldown_steps=steps, shape="1-sqrt",
                    tokens_per_step=100)
    return Cooldown("/p_cd", branch, [(at + steps // 2, final + 0.05), (at + steps, final)])


def test_a_forecast_error_is_each_merge_at_the_cooldowns_end_minus_the_cooldown():
    evals = records(20)
    found = forecasts(evals, [cooldown(60, 40, 5.85), cooldown(150, 20, 5.7), cooldown(190, 30, 5.0)])
    assert [f.cooldown.branch.step for f in found] == [60, 150]  # step 220 was never scored: left out
    at100 = evals[9]
    assert found[0].errors == pytest.approx({"raw": at100["raw_val_loss"] - 5.85, "lawa": at100["lawa_val_loss"] - 5.85,
                                             "wsm": at100["wsm_val_loss"] - 5.85})
    unfinished = Cooldown("/x", cooldown(60, 40, 5.8).branch, [(80, 5.9)])
    assert forecasts(evals, [unfinished]) == []


def test_the_end_of_run_table_is_short_and_ends_with_a_sentence_of_what_it_shows():
    evals = records(25)
    rows = shown(evals)
    assert len(rows) <= 12 and rows[-1] is evals[-1]
    text = end_of_run(evals, [cooldown(60, 40, 5.85)], "wsm", stable_phase=(0, 200))
    assert "one in 3 of 25 scored steps, and the last" in text and "| 250 |" in text and "wsm (forecast) − raw" in text
    assert "| 1-sqrt, 40 steps from 60 | 100 | 5.8500 |" in text and "no forecast" not in text
    # A cooldown whose end step the sidecar never scored is named, not silently dropped.
    missed = end_of_run(records(25), [cooldown(60, 40, 5.85), cooldown(85, 20, 5.8)], "wsm", stable_phase=(0, 200))
    assert "no forecast for the cooldown from step 85: the sidecar did not score step 105" in missed
    sentence = verdict(evals, forecasts(evals, [cooldown(60, 40, 5.85)]), "wsm", stable_phase=(0, 200))
    assert sentence.startswith("Through the stable phase (steps 1–200), lawa scored below raw at 20 of 20 steps")
    assert "wsm scored below raw at 10 of 20 steps" in sentence
    assert ("At the ends of the 1 real cooldown, the scores were off the cooldown's loss by: wsm (the forecast) 0.040 "
            "on average (at most +0.040); raw 0.050 on average (at most +0.050).") in sentence
    assert "The run's own decay ended at 5.7500 (step 250), 0.050 below raw at the stable phase's end (step 200)" in sentence
