"""The front command (`python -m launcher.run`, the `lawa-train` script): a bad job is one line and
exit status 2 from one process, before any rank, rendezvous or JIT build; a good one becomes the
launcher's command line (the real launch is tests/test_train_distributed.py's first test)."""
import subprocess
import sys
import time

import pytest

import launcher.run
from conftest import BIN, REPO, launcher_env


def front(*args: str, script: str = "") -> subprocess.CompletedProcess:
    cmd = [script] if script else [sys.executable, "-m", "launcher.run"]
    return subprocess.run([*cmd, *args], cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "2", "--job", "jobs/smoke.yaml", "nosuch.key=1"], "unknown key 'nosuch'"),
    (["--nproc-per-node", "2", "--job", "jobs/smoke.yaml", "parallel.tensor=3", "model.n_head=3", "model.n_embd=48"],
     "world size 2 is not divisible by parallel.tensor=3"),
    (["--nproc-per-node", "3", "--job", "jobs/smoke.yaml"],
     "train.global_batch_size=8 is not divisible by train.micro_batch_size × data-parallel size = 2 × 3"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--job", "jobs/smoke.yaml", "train.global_batch_size=10",
      "train.micro_batch_size=1"], "train.global_batch_size=10 is not divisible by train.micro_batch_size × "
                                   "data-parallel size = 1 × 4"),
    (["--job", "jobs/smoke.yaml", "data.sources=[{path: /no/such/corpus.jsonl}]"],
     "data.sources[0].path: no such file or directory: '/no/such/corpus.jsonl'"),
    (["--job", "jobs/smoke.yaml", "data.tokenizer=/no/tokenizer.json"], "data.tokenizer: no such file or directory"),
    (["--job", "jobs/smoke.yaml", "checkpoint.init_from=/no/run/checkpoints"], "checkpoint.init_from: no such file"),
    (["--job", "jobs/nosuch.yaml"], "nosuch.yaml"),
    (["--job", "jobs/smoke.yaml", "eval.harness_tasks=[no_such_task]", "snapshot.every=2"],
     "eval.harness_tasks: no_such_task: the harness has no task of this name"),
    (["--job", "jobs/smoke.yaml", "eval.harness_tasks=[lambada_openai]", "snapshot.every=2"],
     "eval.harness_tasks: lambada_openai: cannot load its data (it needs a dataset from the internet"),
    (["--rdzv-endpoint", "node1:29400", "--job", "jobs/smoke.yaml"], "'node1:29400' is not of the form section.key=value"),
])
def test_a_bad_job_is_one_line_and_exit_2_before_any_rank(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert launcher.run.main([*args, f"run_dir={run}"]) == 2  # returns before it would exec the launcher
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and message in lines[0], err
    assert not run.exists()  # no rank ever started


def test_in_its_own_process_too_and_quickly():
    start = time.monotonic()
    proc = front("--nproc-per-node", "2", "--job", "jobs/smoke.yaml", "nosuch.key=1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("config error: unknown key 'nosuch' (known keys of job: name, run_dir, model,")
    print(f"\nthe front command refused a bad job in {time.monotonic() - start:.1f} s")


def test_a_good_job_becomes_the_launchers_command(pydoc_data, capsys):
    proc = front("--check", "--nproc-per-node", "4", "--job", "jobs/smoke.yaml", "parallel.tensor=2",
                 f"data.dir={pydoc_data}", "train.steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "job ok: smoke: world 4 = tensor 2 × data 2, 2 accumulation steps" in proc.stdout
    would = proc.stdout.split("would run: ")[1].split()
    assert would[0].endswith("torchrun") and would[1:3] == ["--standalone", "--nproc-per-node=4"]
    assert would[3].endswith("launcher/train.py") and would[4:] == ["--job", "jobs/smoke.yaml", "parallel.tensor=2",
                                                                     f"data.dir={pydoc_data}", "train.steps=3"]
    for args, expected in (
        (["--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint=node1:29400", "--rdzv-backend=c10d", "--job",
          "jobs/smoke.yaml"], "--nnodes=2 --nproc-per-node=2 --rdzv-endpoint=node1:29400 --rdzv-backend=c10d"),
        (["--launcher", "deepspeed", "--nproc-per-node", "2", "--master_port=29731"],  # the embedded default job
         "deepspeed --num_gpus 2 --master_port=29731 ")):
        capsys.readouterr()
        assert launcher.run.main(["--check", *args]) == 0
        assert expected in capsys.readouterr().out


def test_the_console_script_is_the_front_command(tmp_path):
    script = BIN / "lawa-train"
    if not script.exists():
        pytest.skip("the project is not pip-installed in this environment (bash .ci/setup installs it)")
    proc = front("--nproc-per-node", "2", "--job", "jobs/smoke.yaml", "nosuch.key=1", script=str(script))
    assert proc.returncode == 2 and proc.stderr.startswith("config error: unknown key 'nosuch'")
