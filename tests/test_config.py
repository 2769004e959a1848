"""Job config: YAML + overrides -> typed dataclasses; every mistake is one line naming the key."""
import json
from pathlib import Path

import pytest

from core.config import ConfigError, dump_yaml
from core.engine import deepspeed_config
from launcher.config import JobConfig, load_job

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job_file", JOBS, ids=[p.stem for p in JOBS])
def test_every_shipped_job_loads(job_file):
    job = load_job(job_file)
    assert job.name == job_file.stem


def test_default_job_is_the_tiny_cpu_job():
    job = load_job()
    assert job.name == "tiny_cpu" and job.data.sources[0].path == "builtin:stdlib"
    assert [m.name for m in job.merges()] == ["lawa", "lawa_20", "wsm_1sqrt"]
    # warmup-stable-decay, its headline merge the forecast of the cooldowns it schedules after the run
    assert job.schedule.name == "wsd" and job.stable_phase == (25, 210) and job.forecast_merge() == "lawa"
    assert job.cooldown_branches() == [(60, 40, "1-sqrt", 0.1), (170, 40, "1-sqrt", 0.1)]


@pytest.mark.parametrize("size, lr, min_lr, batch, micro, interval", [
    ("770m", 2e-3, 1e-5, 128, 2, 1000), ("350m", 3e-3, 3e-4, 384, 6, 2000), ("125m", 6e-3, 6e-4, 1024, 16, 200)])
def test_the_lawa_recipes_are_the_authors_scripts(size, lr, min_lr, batch, micro, interval):
    """jobs/gpt2_*_high_lr.yaml hold train_{large,medium,small}.py's values; the baselines differ in LR only."""
    high = load_job(REPO / f"jobs/gpt2_{size}_high_lr.yaml")
    assert (high.train.steps, high.schedule.decay_steps, high.schedule.warmup_steps) == (70000, 70000, 2000)
    assert (high.optimizer.lr, high.schedule.min_lr, high.optimizer.weight_decay) == (lr, min_lr, 0.1)
    assert (high.optimizer.beta1, high.optimizer.beta2, high.train.grad_clip) == (0.9, 0.95, 1.0)
    assert (high.train.global_batch_size, high.train.micro_batch_size) == (batch, micro)
    assert not high.model.bias and high.model.scale_attn_by_inverse_layer_idx and high.model.dropout == 0.0
    assert (high.ema.decay, high.ema.every, high.ema.start_step, high.ema.warmup_power) == (0.9, 1, 0, 2 / 3)
    assert (high.swa.start_step, high.swa.every) == (0, 10)
    assert (high.lawa.k, high.lawa.spacing, high.snapshot.every, high.eval.every) == (5, interval, interval, interval)
    assert high.data.val_fraction == 0.0005 and high.eval.batches * 8 * micro == 200 * micro
    base = load_job(REPO / f"jobs/gpt2_{size}.yaml")
    assert base.optimizer.lr == pytest.approx(lr / 10)
    differs = {k for k in ("model", "data", "train", "ema", "swa", "lawa", "snapshot", "eval", "parallel")
               if getattr(base, k) != getattr(high, k)}
    assert not differs and base.schedule.decay_steps == high.schedule.decay_steps
    assert base.learning_rate(69999) == pytest.approx(base.schedule.min_lr, rel=1e-3)


def test_the_high_lr_770m_from_the_command_line():
    from launcher.config import main

    with pytest.raises(ConfigError, match=r"swa.start_step=300000: SWA's first weights \(step 300000"):
        load_job(REPO / "jobs/gpt2_770m.yaml", ["train.steps=70000", "swa.start_step=300000"])
    assert main(["--job", str(REPO / "jobs/gpt2_770m_high_lr.yaml"), "--get", "schedule.min_lr"]) == 0


def test_overrides_reach_typed_fields():
    job = load_job(REPO / "jobs/gpt2_125m.yaml",
                   ["optimizer.lr=6e-3", "train.steps=10000", "name=hi", "model.dropout=0.1",
                    "data.sources=[{path: a.txt, weight: 2}, {path: b.jsonl}]", "checkpoint.resume=false"])
    assert job.optimizer.lr == 6e-3 and isinstance(job.optimizer.lr, float)  # YAML reads 6e-3 as text
    assert job.train.steps == 10000 and job.name == "hi" and job.model.dropout == 0.1
    assert [(s.path, s.weight) for s in job.data.sources] == [("a.txt", 2.0), ("b.jsonl", 1.0)]
    assert job.checkpoint.resume is False
    assert job.schedule.warmup_steps == 2000 and job.model.size == "gpt2-125m"


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "unknown key 'optimizer.lrr'"),
    ("optimiser.lr=1", "unknown key 'optimiser'"),
    ("data.sources=[{path: a, wieght: 1}]", "unknown key 'data.sources[0].wieght'"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=2.5", "train.steps: expected an integer"),
    ("optimizer.lr=fast", "optimizer.lr: expected a number"),
    ("checkpoint.resume=maybe", "checkpoint.resume: expected true or false"),
    ("train.steps.max=3", "train.steps is a value, not a section"),
    ("train.steps", "not of the form section.key=value"),
    ("model.size=gpt5", "model.size: unknown size 'gpt5'"),
    ("model.n_head=5", "model.n_embd=128 is not divisible by model.n_head=5"),
    ("schedule.warmup_steps=5000", "schedule: the cooldown would start at step 210, inside the 5000-step warmup"),
    ("train.micro_batch_size=5", "train.global_batch_size=32 is not divisible by train.micro_batch_size=5"),
    ("train.precision=fp16", "train.precision: must be one of auto, fp32, bf16"),
    ("parallel.zero_stage=4", "parallel.zero_stage: must be one of auto, 1, 2, 3, got 4"),
    ("parallel.zero_stage=0", "parallel.zero_stage: must be one of auto, 1, 2, 3, got 0"),
    ("parallel.tensor=3", "model.n_head=4 is not divisible by parallel.tensor=3"),
    ("train.stop_at=251", "train.stop_at=251 must be in [1, train.steps=250]"),
    ("schedule.cooldown_steps=0", "schedule.cooldown_steps: schedule.name=wsd needs a cooldown length > 0"),
    ("schedule.name=cosne", "schedule.name: must be one of cosine, linear, constant, wsd, got 'cosne'"),
    ("schedule.name=wsd & schedule.cooldown_steps=240", "the cooldown would start at step 10, inside the 25-step warmup"),
    ("schedule.name=wsd & schedule.cooldown_steps=50 & schedule.cooldown_shape=sqrt",
     "schedule.cooldown_shape: must be one of cosine, linear, 1-sqrt, got 'sqrt'"),
    ("ema.enabled=true & snapshot.every=0 & sidecar.enabled=false", "ema.enabled/swa.enabled need snapshot.every > 0"),
    ("ema.half_life=0", "ema.half_life: must be positive"),
    ("ema.decay=1.0", "ema.decay: must be in (0, 1), got 1.0"),
    ("swa.lr=-1", "swa.lr: must be positive"),
    ("checkpoint.init_optimizer=true", "checkpoint.init_optimizer needs checkpoint.init_from"),
    ("growth.order=random", "growth.order: must be one of stack, interpolate, got 'random'"),
    ("model.size=neox-tiny & model.n_head=32", "a 4-dim head rotates 1 dims (25%), which must be even"),
    ("model.size=neox-tiny & model.n_embd=96 & model.n_head=8", "a 12-dim head rotates 3 dims"),
    ("growth.factor=0", "growth.factor: must be >= 1, got 0"),
    ("growth.from_run=a & checkpoint.init_from=b", "checkpoint.init_from and growth.from_run each say where the"),
    ("growth.from_run=a & checkpoint.branch_from=b", "checkpoint.branch_from and growth.from_run each say where the"),
    ("checkpoint.init_from=a & checkpoint.branch_from=b", "checkpoint.init_from and checkpoint.branch_from each say"),
    ("growth.at_tokens=100", "growth.at_tokens needs growth.from_run"),
    ("eval.tasks=[/no/such.jsonl]", "eval.tasks[0]: no such file: /no/such.jsonl"),
    ("eval.harness_include=/no/tasks", "eval.harness_include: no such folder: /no/tasks"),
    ("eval.harness_tasks=[x] & eval.task_every=7", "eval.task_every=7 must be a multiple of snapshot.every="),
    ("data.sources=[{path: a, weight: 0}]", "data.sources: at least one weight must be positive"),
    ("logging.wandb.mode=cloud", "logging.wandb.mode: must be one of online, offline, disabled, got 'cloud'"),
    ("data.mixture=optimal", "data.mixture: must be one of weights, natural, entropy, got 'optimal'"),
    ("data.sources=[{path: a.txt, split: paragraph}]", "data.sources[0].split: must be one of blank-line, line, whole-file"),
    ("data.sources=[{path: a.txt, split: 'regex:('}]", "data.sources[0].split: 'regex:(' is not a valid regular expression"),
    ("data.sources=[{path: a, name: 'my web'}]", "data.sources[0].name: 'my web' must be letters"),
    ("data.sources=[{path: a, name: x}, {path: b, name: x}]", "data.sources[*].name: names must differ"),
    ("model.block_size=64", "data.seq_len=128 exceeds model.block_size=64"),
])
def test_mistakes_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_job(None, override.split(" & "))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_paths_are_expanded_once_where_the_job_is_read(tmp_path, monkeypatch):
    """`~` in a path key is the same path for the front command's checks and for every rank."""
    monkeypatch.setenv("HOME", str(tmp_path))
    job = load_job(None, ["checkpoint.init_from=~/weights", "growth.factor=2", "snapshot.dir=~/ring",
                          "data.sources=[{path: ~/web.jsonl}]", "run_dir=~/runs/x"])
    assert job.checkpoint.init_from == str(tmp_path / "weights") and job.snapshot.dir == str(tmp_path / "ring")
    assert job.data.sources[0].path == str(tmp_path / "web.jsonl") and job.resolved_run_dir == str(tmp_path / "runs/x")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_layout_world_is_tensor_times_data():
    job = load_job(None, ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tensor=2"):
        job.parallel.data_parallel(3)
    job = load_job(REPO / "jobs/gpt2_125m.yaml")
    assert job.train.accumulation_steps(job.parallel.data_parallel(8)) == 1024 // (16 * 8)
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size × data-parallel size = 16 × 3"):
        job.train.accumulation_steps(job.parallel.data_parallel(3))


def test_deepspeed_config_is_generated_from_the_job():
    job = load_job(REPO / "jobs/gpt2_125m.yaml", ["train.grad_clip=0.5"])
    accum = job.train.accumulation_steps(8)
    assert job.parallel.zero_stage == "auto"  # resolved at start by the plan (test_plan)
    ds = deepspeed_config(job.train.micro_batch_size, accum, 8, job.train.grad_clip, 2,
                          bf16=job.train.resolved_precision("cuda") == "bf16")
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 8 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    json.dumps(ds)  # it is written to the run directory


def test_model_vocab_defaults_to_the_tokenizer_rounded_up():
    job = load_job()
    assert job.model.resolve(4000, job.data.seq_len).vocab_size == 4032
    assert job.model.resolve(4000, job.data.seq_len).block_size == job.data.seq_len
    job = load_job(None, ["model.vocab_size=1000"])
    with pytest.raises(ConfigError, match="model.vocab_size=1000 is smaller than the tokenizer's vocabulary"):
        job.model.resolve(4000, job.data.seq_len)


def test_resolved_config_round_trips(tmp_path):
    job = load_job(None, ["optimizer.lr=1e-3"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(job))
    assert load_job(path) == job
    assert isinstance(load_job(path), JobConfig)


@pytest.mark.parametrize("overrides, message", [
    (["snapshot.every=10", "snapshot.slots=4", "lawa.k=5", "lawa.spacing=10"],
     "snapshot.slots=4 cannot hold merge lawa (uniform, k=5, spacing 10) at snapshot.every=10 plus one being "
     "written: needs at least 6"),
    (["snapshot.every=10", "snapshot.slots=7", "lawa.k=3", "lawa.spacing=25"], "needs at least 8"),
    (["snapshot.every=0", "sidecar.enabled=true"], "sidecar.enabled needs snapshot.every > 0"),
    (["snapshot.if_busy=queue"], "snapshot.if_busy: must be one of skip, wait"),
    (["sidecar.device=tpu"], "sidecar.device: must be one of auto, cpu, cuda"),
    (["lawa.k=0"], "lawa.k: must be >= 1"),
    (["snapshot.replicate=buddy"], "snapshot.replicate: buddy copies the restart slots, and snapshot.restart_every is 0"),
    (["snapshot.replicate=all"], "snapshot.replicate: must be one of none, buddy"),
    # Settings that could never take effect in the run are errors naming their keys, not silent no-ops.
    (["train.steps=700", "swa.enabled=true", "swa.start_step=800"],
     "swa.start_step=800: SWA's first weights (step 800, every 10 steps) come after the run's last step, train.steps=700"),
    (["swa.enabled=true", "swa.every=300"], "(step 300, every 300 steps) come after the run's last step, train.steps=250"),
    (["ema.enabled=true", "ema.start_step=250"], "ema.start_step=250: the EMA would start after the run's last step"),
    (["train.steps=100", "lawa.merges=[]", "lawa.k=12", "lawa.spacing=10", "snapshot.slots=14", "cooldowns.at=[]"],
     "lawa.k and lawa.spacing: lawa (uniform, k=12, spacing 10) spans 110 steps, longer than a run of "
     "train.steps=100 with snapshot.every=10 can fill"),
    (["train.steps=100", "cooldowns.at=[]", "snapshot.slots=30", "lawa.merges=[{name: long, window_tokens: 1000000}]"],
     "lawa.merges[0]: long (uniform, window 244 steps, spacing 10) spans 244 steps"),
])
def test_lawa_settings_are_checked_up_front(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_job(None, overrides)
    assert message in str(info.value)


def test_a_full_lawa_window_that_just_fits_is_accepted():
    job = load_job(None, ["train.steps=100", "lawa.merges=[]", "lawa.k=10", "lawa.spacing=10", "snapshot.slots=12",
                          "cooldowns.at=[]"])
    assert job.merges()[0].k == 10


def test_a_recipe_states_only_what_it_changes_over_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\noptimizer: {lr: 1.0e-3, weight_decay: 0.05}\n"
                                        "schedule: {name: cosine, warmup_steps: 10}\ntrain: {steps: 100}\n")
    (tmp_path / "high_lr.yaml").write_text("base: base.yaml\nname: high\noptimizer: {lr: 1.0e-2}\n")
    job = load_job(tmp_path / "high_lr.yaml", ["train.steps=50"])
    assert (job.name, job.optimizer.lr, job.optimizer.weight_decay, job.train.steps) == ("high", 1e-2, 0.05, 50)
    (tmp_path / "typo.yaml").write_text("base: base.yaml\noptimizer: {lrr: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrr'"):
        load_job(tmp_path / "typo.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_job(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base job file not found"):
        load_job(tmp_path / "orphan.yaml")
