#!/bin/bash
# Pretrain any job on Slurm: one task per GPU through srun, the LAWA sidecar (if the job enables it)
# beside every trainer, preemption-safe (USR1 warning -> checkpoint + snapshot -> requeue -> resume).
#
#   sbatch --nodes=2 slurm/pretrain.sh --job jobs/gpt2_125m_high_lr.yaml [section.key=value ...]
#   sbatch -p gpu -A myproj -t 2-00:00:00 --nodes=4 --gpus-per-node=4 --ntasks-per-node=4 \
#       slurm/pretrain.sh --job jobs/gpt2_770m_high_lr.yaml data.dir=/data/owt_gpt2 ...
#   id=$(sbatch --parsable slurm/prepare.sh --job J ...) && sbatch --dependency=afterok:${id%%;*} slurm/pretrain.sh --job J ...
#
# Partition (-p), account (-A), time (-t), nodes, GPUs and cores come from sbatch's options; the
# #SBATCH lines below are only defaults (one node of 8 GPUs, 8 cores per GPU). Keep --ntasks-per-node
# equal to the GPUs per node. The job is --job JOB (or $JOB; default jobs/gpt2_770m.yaml), overrides
# the other arguments and/or $OVERRIDES (split on whitespace). REPO (default: the submit directory)
# holds the code; PYTHON (default: $REPO/.venv/bin/python) runs it.
#
# Before srun the front command checks the job in this one process (keys, the layout against the
# tasks, the data and tokenizer paths, the evaluation tasks) and prepares data.dir if it is not
# prepared yet (better: slurm/prepare.sh ahead, on a CPU node): a bad job stops here, with one line,
# and no rank ever waits on another's tokenization. docs/cluster.md: the site checklist.
#
# Output: this script's own (and srun's) goes to <run_dir>/logs/sbatch-<job id>.out, each rank's to
# <run_dir>/logs/slurm-<job id>-<attempt>-rank<N>.log. Slurm cannot be pointed there itself (it
# refuses to start a job whose --output folder does not exist yet), so its file is /dev/null; if
# the job config cannot be read, the error goes to runs/slurm-<job id>.out in the submit directory.
#SBATCH --job-name=lawa-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=2-00:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=/dev/null
set -euo pipefail

SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
REPO=${REPO:-$SUBMIT_DIR}
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
JOB=${JOB:-jobs/gpt2_770m.yaml}
if [ "${1:-}" = "--job" ]; then
  JOB=$2
  shift 2
fi
read -r -a EXTRA <<< "${OVERRIDES:-}"
EXTRA+=("$@")

fail_early() {  # before the run directory is known: one line in the submit directory
  mkdir -p "$SUBMIT_DIR/runs"
  echo "job $SLURM_JOB_ID: $1" >> "$SUBMIT_DIR/runs/slurm-$SLURM_JOB_ID.out"
  exit 2
}
RUN_DIR=$("$PYTHON" -m launcher.config --job "$JOB" "${EXTRA[@]}" --get run_dir 2>&1) || fail_early "$RUN_DIR"
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"
exec >> "$LOG_DIR/sbatch-$SLURM_JOB_ID.out" 2>&1

# Rendezvous: the first node of the allocation, a port derived from the job id (stable across requeues).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS}

ATTEMPT=${SLURM_RESTART_COUNT:-0}
echo "job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST ($SLURM_NTASKS tasks): $JOB ${EXTRA[*]}"

# The front command's checks, and the data prepared once, here, before any rank starts.
if ! "$PYTHON" -m launcher.run --no-launch --nproc-per-node "$SLURM_NTASKS" --job "$JOB" "${EXTRA[@]}"; then
  echo "job $SLURM_JOB_ID: stopped before srun: the job above cannot start (its line says why)"
  exit 2
fi
echo "rendezvous $MASTER_ADDR:$MASTER_PORT; per-rank logs: $LOG_DIR/slurm-$SLURM_JOB_ID-$ATTEMPT-rank*.log"

# The trainers resume from $RUN_DIR by themselves; on the warning signal they checkpoint, snapshot,
# and requeue this job (checkpoint.requeue), so a preempted run continues where it stopped.
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): it is given again, or each task
# would get one core for its data loader, its snapshot thread and its sidecar.
srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS" --output="$LOG_DIR/slurm-$SLURM_JOB_ID-$ATTEMPT-rank%t.log" \
    "$PYTHON" launcher/train.py --job "$JOB" "${EXTRA[@]}"
