"""launcher/plan.py: the figures for a small case against hand arithmetic, verdicts that flip and name
the knob, exit codes, and the launcher refusing, before training, a ring its storage cannot hold."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace

import pytest

from conftest import BIN, REPO, launcher_env
from launcher.config import load_job
from launcher.plan import RING_SHARE, Cluster, GiB, main, model_shape, plan
from launcher.ring import ring_room
from models.registry import count_parameters

SMOKE = str(REPO / "jobs/smoke.yaml")
# The micro GPT (2 layers, 32 wide, 2 heads) with a 4096 vocabulary and 64-token sequences; snapshots
# with EMA and SWA, so each slot holds three copies; LAWA over 2 snapshots needs at least 3 slots.
SMALL = ["model.vocab_size=4096", "snapshot.every=10", "snapshot.slots=6", "lawa.k=2", "ema.enabled=true",
         "swa.enabled=true", "sidecar.enabled=true", "parallel.tensor=2", "parallel.zero_stage=3"]


def small_case(**cluster):
    job = load_job(SMOKE, SMALL)
    config = job.model.resolve(4096, job.data.seq_len, job.parallel.tensor)
    cl = Cluster(**{**dict(nodes=2, gpus_per_node=4, gpu_mem=80 * GiB, host_mem=1024 * GiB, ring_room=512 * GiB),
                    **cluster})
    return job, config, cl


def part(resource, label):
    return dict(resource.parts)[label]


def test_small_case_by_hand():
    job, config, cl = small_case()
    C, L, V, T = 32, 2, 4096, 64
    # GPT-2 with biases: per block 2 LayerNorms (2·2C), qkv (3C² + 3C), projection (C² + C), MLP up
    # (4C² + 4C) and down (4C² + C); token embedding (tied head) V·C, positions T·C, final LayerNorm 2C.
    per_block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    params = V * C + T * C + L * per_block + 2 * C
    assert params == 158_592
    shape = model_shape(config)
    assert shape.params == params == count_parameters(config)
    # Tensor parallelism (t=2) replicates the LayerNorms, the row-parallel biases (projection, MLP down)
    # and the positions, and splits the rest: one tensor-parallel rank holds
    replicated = L * (4 * C + C + C) + T * C + 2 * C
    local = (params - replicated) // 2 + replicated
    assert shape.local(2) == local == 80_544
    # world 8 = tensor 2 × data 4; every parameter slice divides by 4, so no ZeRO padding
    dp, per_node = 4, 4
    partition = local // dp
    assert shape.partition(2, dp) == partition == 20_136

    result = plan(job, config, cl, shape)
    ring = result.ring
    assert ring.need == 6 * 3 * per_node * 4 * partition == 5_799_168  # slots × (raw, EMA, SWA) × a node's fp32 share
    assert ring.fits and result.fits

    # DeepSpeed's estimator, asked about one tensor-parallel slice over its 4 data-parallel ranks
    # (2 per node): 4 B × the largest layer (the embedding's half, 4096 × 32 / 2) + 18 B per parameter
    # per rank; zero.Init's host part 4 B × largest × 2 ranks × 1.5, for each of the 2 slices on a node.
    largest = V * C // 2
    assert shape.largest_layer(2) == largest
    assert part(result.gpu, "model states") == int(4 * largest + 18 * local / dp)
    assert part(result.host, "DeepSpeed zero.Init") == int(largest * 4 * 2 * 1.5) * 2
    # Korthikanti et al. without the attention-score term: s·b·h·(10 + 24/t) bytes per layer (bf16),
    # micro-batch 2; logits b·s·V/t × (2 + 4) bytes.
    assert part(result.gpu, "activations") == L * T * 2 * C * (10 + 24 / 2)
    assert part(result.gpu, "logits") == 2 * T * V / 2 * 6
    assert part(result.gpu, "EMA") == part(result.gpu, "SWA") == 4 * partition
    assert part(result.host, "snapshot buffers") == per_node * 3 * 4 * partition
    assert part(result.host, "sidecar sums") == per_node * 1 * 4 * partition  # one merge (lawa)
    assert part(result.host, "the ring (/dev/shm is RAM)") == ring.need

    # Restart points every 2nd snapshot: each holds AdamW's two moments besides the weights; of 6
    # slots 3 can be restart points, and the ring keeps the newest one (every kind) beyond its window.
    restarting = plan(replace(job, snapshot=replace(job.snapshot, restart_every=2)), config, cl, shape)
    assert restarting.ring.need == ring.need + per_node * 4 * partition * (2 * (3 + 1) + 3)
    assert part(restarting.host, "snapshot buffers") == per_node * (3 + 2) * 4 * partition
    # Buddy copies: the previous node's part of its newest restart slot (3 kinds + 2 moments), kept
    # and arriving.
    buddies = plan(replace(job, snapshot=replace(job.snapshot, restart_every=2, replicate="buddy")), config, cl, shape)
    assert cl.nodes == 2 and buddies.ring.need == restarting.ring.need + 2 * per_node * 4 * partition * (3 + 2)


def test_zero_1_and_2_by_hand():
    """ZeRO-1/2: the working weights and (ZeRO-1) the gradients whole on every rank, a dp-th of the
    16 bytes of master, its gradient and AdamW's moments; 16-bit ZeRO-2 is DeepSpeed's own estimate."""
    job, config, cl = small_case()
    shape = model_shape(config)
    local, dp = shape.local(2), 4
    for stage, grads in ((1, 2 * local), (2, 2 * local / dp)):
        result = plan(replace(job, parallel=replace(job.parallel, zero_stage=stage)), config, cl, shape)
        assert result.zero_stage == stage
        assert part(result.gpu, "model states") == 2 * local + grads + 16 * local / dp
        assert part(result.host, "model build") == 4 * local * 2 * 1.5 * 2  # 2 ranks of each slice per node
        partition = -(-local // (2 * dp)) * 2  # a dp-th of the group, padded to 2·dp elements
        assert part(result.gpu, "EMA") == 4 * partition
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    two = plan(replace(job, parallel=replace(job.parallel, zero_stage=2)), config, cl, shape)
    assert part(two.gpu, "model states") == estimate_zero2_model_states_mem_needs(local, 2, 2, cpu_offload=False)[1]


def test_auto_picks_the_lowest_stage_whose_memory_fits():
    """770M on 8 GPUs: each stage up needs less GPU memory; auto takes the lowest that fits, and says so."""
    job = load_job(REPO / "jobs/gpt2_770m.yaml", ["parallel.zero_stage=auto"])
    config = job.model.resolve(50304, job.data.seq_len, 1)
    big = Cluster(nodes=1, gpus_per_node=8, gpu_mem=141 * GiB, host_mem=2048 * GiB, ring_room=512 * GiB)
    need = {s: plan(replace(job, parallel=replace(job.parallel, zero_stage=s)), config, big).gpu.need for s in (1, 2, 3)}
    assert need[1] > need[2] > need[3]
    for gpu_mem, stage in ((need[1] + 1, 1), (need[1] - 1, 2), (need[2] - 1, 3)):
        result = plan(job, config, replace(big, gpu_mem=gpu_mem))
        assert (result.zero_stage, result.gpu.fits) == (stage, True), (gpu_mem, stage)
        expected = "auto: the lowest stage whose GPU and host memory fit" + {1: "", 2: "; ZeRO-1 does not",
                                                                            3: "; ZeRO-1 and 2 do not"}[stage]
        assert result.stage_reason == expected and f"ZeRO stage {stage} ({expected})" in "\n".join(result.lines())
    result = plan(job, config, replace(big, gpu_mem=need[3] - 1))
    assert result.zero_stage == 3 and not result.gpu.fits and result.stage_reason.startswith("auto: no stage fits")


def test_shm_verdict_flips_and_names_the_knobs():
    job, config, cl = small_case()
    ring = plan(job, config, cl).ring.need
    slot = ring / 6
    # Room for 3.5 slots (of the 90% the ring may use): 3 slots fit; EMA or SWA off (6 slots of two
    # copies, the room of 4) would not, nor would more nodes (8 sequences split over 6 or 8 data ranks).
    result = plan(job, config, replace(cl, ring_room=3.5 * slot / RING_SHARE))
    assert not result.ring.fits and not result.fits and result.gpu.fits
    to_disk = "set snapshot.dir to a disk with room (left unset, the launcher puts it in runs/smoke/snapshots)"
    assert result.ring.advice == ("lower snapshot.slots to 3", to_disk)
    line = next(ln for ln in result.lines() if ln.startswith("shm:"))
    assert line == (f"shm: {ring / 2**20:.1f} MiB of {3.5 * slot / RING_SHARE / 2**20:.1f} MiB per node (it may use "
                    f"90%) — does not fit: lower snapshot.slots to 3, or {to_disk}")
    # Room for 4.5: EMA off (or SWA off) fits as well, and is named.
    assert "turn EMA off (ema.enabled=false)" in plan(job, config, replace(cl, ring_room=4.5 * slot / RING_SHARE)).ring.advice
    assert plan(job, config, replace(cl, ring_room=ring / RING_SHARE + 1)).ring.fits


def test_micro_batch_too_big_names_a_micro_batch_that_fits():
    job = load_job(REPO / "jobs/gpt2_125m.yaml", ["train.micro_batch_size=64"])
    config = job.model.resolve(50304, job.data.seq_len, 1)
    cl = Cluster(nodes=1, gpus_per_node=8, gpu_mem=40 * GiB, host_mem=1024 * GiB, ring_room=512 * GiB)
    result = plan(job, config, cl)
    assert not result.gpu.fits and result.host.fits and result.ring.fits
    advice = result.gpu.advice
    assert advice[0].startswith("lower train.micro_batch_size to "), advice
    micro = int(advice[0].rsplit(" ", 1)[1])
    smaller = load_job(REPO / "jobs/gpt2_125m.yaml", [f"train.micro_batch_size={micro}"])
    assert plan(smaller, config, cl).gpu.fits
    bigger = load_job(REPO / "jobs/gpt2_125m.yaml", [f"train.micro_batch_size={2 * micro}"])  # 512 = 8 × 64 × 1
    assert not plan(bigger, config, cl).gpu.fits
    assert any(a.startswith("raise parallel.tensor to ") for a in advice)


def run_plan(capsys, *argv):
    code = main([*argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exit_codes(capsys):
    base = ["--job", SMOKE, "model.vocab_size=4096", "--nodes", "1", "--gpus-per-node", "2"]
    code, out, _ = run_plan(capsys, *base)
    assert code == 0 and out.count("— fits") == 2 and "shm: not used (snapshot.every=0)" in out, out
    code, out, _ = run_plan(capsys, *base, "snapshot.every=10", "--shm-gb", "0.001")
    assert code == 1 and "shm: 4.8 MiB of 1.0 MiB per node (it may use 90%) — does not fit: set snapshot.dir" in out, out
    code, out, err = run_plan(capsys, *base, "train.micro_batch_sise=4")
    assert code == 2 and not out and err.count("\n") == 1
    assert err.startswith("config error: unknown key 'train.micro_batch_sise'"), err
    code, out, err = run_plan(capsys, *base, "--nodes", "0")
    assert code == 2 and err.strip() == "config error: --nodes: must be positive, got 0"
    code, _, err = run_plan(capsys, *base, "parallel.tensor=3")  # 2 ranks do not split 3 ways
    assert code == 2 and err.count("\n") == 1 and "parallel.tensor" in err, err
    with pytest.raises(SystemExit) as stop:
        main(["--job", SMOKE])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nodes" in err, err


def test_ring_room_counts_what_the_ring_already_holds(tmp_path):
    root = tmp_path / "ring"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "shard.pt").write_bytes(b"\0" * (64 << 20))
    free = shutil.disk_usage(tmp_path).free
    assert abs(ring_room(str(root)) - (free + (64 << 20))) < 16 << 20
    assert abs(ring_room(str(tmp_path / "not" / "yet")) - free) < 16 << 20
    # Half-written copies a killed writer left are not room the ring can count on (it removes them).
    partial = root / ".step_00000020.partial-somehost-12345"
    partial.mkdir()
    (partial / "shard.pt").write_bytes(b"\0" * (64 << 20))
    free = shutil.disk_usage(tmp_path).free
    assert abs(ring_room(str(root)) - (free + (64 << 20))) < 16 << 20


def _cannot_mount() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare (a private tmpfs mount)"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot create a mount namespace: {probe.stderr.strip()}"


@pytest.mark.skipif(_cannot_mount() is not None, reason=str(_cannot_mount()))
@pytest.mark.parametrize("explicit", [True, False], ids=["snapshot.dir", "fallback"])
def test_the_launcher_refuses_a_ring_that_cannot_fit(tmp_path, pydoc_data, explicit):
    """A real start on private 1-2 MiB tmpfs mounts (the smoke ring needs 5 MiB): snapshot.dir pointing
    there is refused in one line before the engine is built; with it unset, /dev/shm too small makes
    the ring fall back to the run directory, which is refused when it lacks room as well."""
    small, run_dir = tmp_path / "small", tmp_path / "run"
    small.mkdir()
    run_dir.mkdir()
    args = ["--job", SMOKE, f"data.dir={pydoc_data}", f"run_dir={run_dir}", "snapshot.every=5"]
    mounts = f"mount -t tmpfs -o size=1m,mode=0700 tmpfs {small} && "
    if explicit:
        args.append(f"snapshot.dir={small}")
    else:
        mounts += f"mount -t tmpfs -o size=1m tmpfs /dev/shm && mount -t tmpfs -o size=2m tmpfs {run_dir} && "
    script = mounts + 'exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           str(BIN / "python"), "launcher/train.py", *args],
                          cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error")]
    assert len(error) == 1 and error[0].startswith("config error: the snapshot ring cannot fit"), proc.stderr
    where = f"snapshot.dir={small}" if explicit else f"{run_dir / 'snapshots'} (/dev/shm lacked room"
    assert where in error[0] and "set snapshot.dir to a disk with room" in error[0], error[0]
    assert "does not fit" in proc.stdout and "plan: smoke" in proc.stdout  # the block came first
    assert "model: " not in proc.stdout and "step 1/" not in proc.stdout  # refused before the engine
    if not explicit:
        assert "note: /dev/shm on" in proc.stdout
