"""Mixtures: BiMix's conditional entropy and entropy-driven weights (against hand-computed values and
an independent count over the prepared shards), the natural/entropy/held-out weight rules, the
`launcher.mixture` command, and the bivariate law's fit, prediction and optimum on points drawn from
a known law."""
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from launcher import bimix, mixture
from launcher.data import DataArgs, DataSource, mixture_weights, prepare
from launcher.data.mixture import conditional_entropy, entropy_weights
from launcher.data.tokenized import open_shard


def test_conditional_entropy_of_a_hand_counted_stream():
    # pairs of 0 1 0 1 1: (0,1) twice, (1,0) once, (1,1) once; P(1|0) = 1, P(0|1) = P(1|1) = 1/2
    # H = -(2/4 log 1 + 1/4 log 1/2 + 1/4 log 1/2) = (1/2) log 2
    assert conditional_entropy([np.array([0, 1, 0, 1, 1])], 2) == pytest.approx(0.5 * math.log(2), rel=1e-12)
    # The pair across two pieces counts: fed in any cut, the same counts.
    assert conditional_entropy([np.array([0, 1]), np.array([0]), np.array([1, 1])], 2) == \
        pytest.approx(0.5 * math.log(2), rel=1e-12)
    assert conditional_entropy([np.array([3, 3, 3, 3])], 5) == 0.0  # fully predictable
    with pytest.raises(ValueError, match="at least two tokens"):
        conditional_entropy([np.array([1])], 2)


def test_entropy_weights_are_the_softmax_of_the_entropies():
    assert entropy_weights([0.0, math.log(3)]) == pytest.approx([0.25, 0.75])
    # Natural-log entropies of 2.0, 3.0 and 3.5 nats: e^H / sum e^H, worked by hand
    e = [math.e ** 2, math.e ** 3, math.e ** 3.5]
    assert entropy_weights([2.0, 3.0, 3.5]) == pytest.approx([x / sum(e) for x in e])
    assert entropy_weights([800.0, 801.0]) == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])  # no overflow


def test_the_three_rules_and_held_out_sources():
    manifest = {"sources": [{"train_tokens": 300, "conditional_entropy": 1.0},
                            {"train_tokens": 100, "conditional_entropy": 2.0},
                            {"train_tokens": 600, "conditional_entropy": 3.0}]}
    assert mixture_weights("weights", [2, 1, 1], manifest) == pytest.approx([0.5, 0.25, 0.25])
    assert mixture_weights("natural", [1, 1, 1], manifest) == pytest.approx([0.3, 0.1, 0.6])
    assert mixture_weights("natural", [5, 0, 1], manifest) == pytest.approx([1 / 3, 0, 2 / 3])  # only in/out counts
    assert mixture_weights("entropy", [1, 1, 0], manifest) == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e), 0])
    with pytest.raises(ValueError, match="no conditional entropy"):
        mixture_weights("entropy", [1, 1], {"sources": [{"train_tokens": 1}, {"train_tokens": 2}]})
    with pytest.raises(ValueError, match="data.mixture"):
        mixture_weights("magic", [1, 1, 1], manifest)


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    words = [" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "slept"], 30)) for _ in range(60)]
    digits = [" ".join("".join(rng.choice(list("0123456789"), 5)) for _ in range(20)) for _ in range(60)]
    abab = ["ab " * 100 for _ in range(60)]
    args = DataArgs(sources=[DataSource(write_jsonl(d / "words.jsonl", words)),
                             DataSource(write_jsonl(d / "digits.jsonl", digits), name="numbers"),
                             DataSource(write_jsonl(d / "abab.jsonl", abab), weight=0.0)],
                    dir=str(d / "data"), vocab_size=300, seq_len=16, mixture="entropy")
    return args, prepare(args, progress=False)


def test_prepare_records_each_sources_entropy_counted_independently(three_sources):
    args, m = three_sources
    assert args.source_names() == ["words", "numbers", "abab"]
    for s in m["sources"]:
        tokens = np.concatenate([np.asarray(open_shard(args.dir, f, m["dtype"])).astype(int)
                                 for f in s["train_shards"]])
        pairs, firsts = Counter(zip(tokens[:-1], tokens[1:])), Counter(tokens[:-1])
        n = len(tokens) - 1
        expected = -sum(c / n * math.log(c / firsts[a]) for (a, _), c in pairs.items())
        assert s["conditional_entropy"] == pytest.approx(expected, rel=1e-9)
    h = [s["conditional_entropy"] for s in m["sources"]]
    assert h[2] < h[0] < h[1]  # "ab ab ..." is nearly predictable, random digits are least so
    assert m["entropy_weights"] == pytest.approx(entropy_weights(h))
    # The job's own mixture: the held-out-only source takes no share, the others keep their ratio.
    got = mixture_weights("entropy", [s.weight for s in args.sources], m)
    assert got[2] == 0 and got[0] / got[1] == pytest.approx(math.exp(h[0] - h[1]))


def test_the_weights_command_prints_every_rule_without_training(three_sources, capsys):
    args, m = three_sources
    a, b, c = (s.path for s in args.sources)
    sources = f"[{{path: {a}}}, {{path: {b}, name: numbers}}, {{path: {c}, weight: 0}}]"
    assert mixture.main(["weights", "--job", "jobs/smoke.yaml", f"data.dir={args.dir}", f"data.sources={sources}",
                         "data.vocab_size=300", "data.seq_len=16", "data.mixture=entropy"]) == 0
    out = capsys.readouterr().out
    weights = entropy_weights([s["conditional_entropy"] for s in m["sources"]])
    row = next(line for line in out.splitlines() if line.startswith("| numbers |"))
    assert f"{m['sources'][1]['conditional_entropy']:.4f}" in row and f"{weights[1]:.4f}" in row
    assert f"| {m['sources'][1]['train_tokens']:,} |" in row
    assert mixture.main(["weights", "--job", "jobs/smoke.yaml", "data.mixture=best"]) == 2
    assert "data.mixture: must be one of weights, natural, entropy" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the bivariate law

TRUE = {"prose": bimix.Law(alpha=0.08, B=2.0, beta=0.35, C=2.5), "code": bimix.Law(alpha=0.05, B=1.5, beta=0.5, C=1.8)}
RUNS = {"a": {"prose": 0.2, "code": 0.8}, "b": {"prose": 0.5, "code": 0.5}, "c": {"prose": 0.7, "code": 0.3}}
TOKENS = [0.2e6, 0.4e6, 0.8e6, 1.6e6, 3.2e6]


def law_points(noise: float = 0.0) -> list[bimix.Point]:
    rng = np.random.default_rng(0)
    return [bimix.Point(run, source, share, t, float(TRUE[source].loss(share, t)) * (1 + noise * rng.standard_normal()))
            for run, shares in RUNS.items() for source, share in shares.items() for t in TOKENS]


def test_the_fit_recovers_a_known_law_and_predicts_unseen_mixtures():
    laws = {name: bimix.fit(points) for name, points in bimix.by_source(law_points()).items()}
    for name, law in laws.items():
        assert bimix.relative_errors(law, bimix.by_source(law_points())[name]).max() < 1e-6
        assert law.alpha == pytest.approx(TRUE[name].alpha, rel=1e-3)
        # A share and a data size none of the runs had
        assert float(law.loss(0.35, 6.4e6)) == pytest.approx(float(TRUE[name].loss(0.35, 6.4e6)), rel=1e-4)
    held = bimix.leave_one_share_out(bimix.by_source(law_points()))
    assert len(held) == 6 and max(h.relative_error for h in held) < 1e-4
    # With 1% noise the law still predicts every left-out run within a few percent.
    noisy = bimix.leave_one_share_out(bimix.by_source(law_points(noise=0.01)))
    assert max(h.relative_error for h in noisy) < 0.05


def test_the_optimum_beats_every_proxy_mixture_by_the_law():
    best = bimix.optimal_shares(TRUE, 3.2e6)
    assert sum(best.values()) == pytest.approx(1.0) and min(best.values()) > 0
    total = sum(bimix.predict(TRUE, best, 3.2e6).values())
    assert all(total <= sum(bimix.predict(TRUE, shares, 3.2e6).values()) + 1e-9 for shares in RUNS.values())
    with pytest.raises(ValueError, match="no share given for code"):
        bimix.predict(TRUE, {"prose": 1.0}, 1e6)
    with pytest.raises(ValueError, match="two or more positive shares"):
        bimix.fit([p for p in law_points() if p.run == "a" and p.source == "prose"])
    with pytest.raises(ValueError, match="points of one source"):
        bimix.fit(law_points())


def write_run(run_dir, shares: dict[str, float], steps=(5, 10, 20, 40, 80), tokens_per_step=40_000):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"event": "mixture", "step": 0, "mixture": "weights", "weights": {**shares, "held": 0.0}})
                + "\n")
        for step in steps:
            t = step * tokens_per_step
            by_source = {s: float(TRUE[s].loss(r, t)) for s, r in shares.items()}
            by_source["held"] = 9.0  # held out only: no share, not fitted
            f.write(json.dumps({"step": step, "tokens": t, "val_loss": 0.0, "val_loss_by_source": by_source}) + "\n")
    return str(run_dir)


def test_the_fit_command_reads_runs_and_reports_error_prediction_and_optimum(tmp_path, capsys):
    runs = [write_run(tmp_path / name, shares) for name, shares in RUNS.items()]
    out_json = tmp_path / "fit.json"
    assert mixture.main(["fit", *runs, "--predict", "prose=0.4,code=0.6", "--optimize", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| prose | 15 |" in text and "| code | 15 |" in text and "held" not in text
    fit = json.loads(out_json.read_text())
    assert all(s["mean_relative_error"] < 1e-6 and s["r2_log"] > 0.999999 for s in fit["sources"].values())
    assert len(fit["left_out"]) == 6
    assert fit["prediction"]["losses"]["prose"] == pytest.approx(float(TRUE["prose"].loss(0.4, 3.2e6)), rel=1e-4)
    assert set(fit["optimal"]["shares"]) == {"prose", "code"}
    assert mixture.main(["fit", str(tmp_path / "nowhere")]) == 2
    assert "no " in capsys.readouterr().err
    assert mixture.main(["fit", runs[0]]) == 2  # one mixture: the law cannot tell share from noise
    assert "two or more positive shares" in capsys.readouterr().err


def test_source_names_come_from_the_paths_and_stay_unique():
    args = DataArgs(sources=[DataSource("builtin:pydoc"), DataSource("/data/pile/*.jsonl"), DataSource("~/c/code.jsonl"),
                             DataSource("/other/code.jsonl"), DataSource("/x/web/", name="code_3")])
    assert args.source_names() == ["pydoc", "pile", "code", "code_4", "code_3"]
