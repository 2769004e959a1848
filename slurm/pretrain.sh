#!/bin/bash
# Pretrain any job on Slurm: one task per GPU through srun, the LAWA sidecar (if the job enables it)
# beside every trainer, preemption-safe (USR1 warning -> checkpoint + snapshot -> requeue -> resume).
#
#   JOB=jobs/gpt2_125m.yaml sbatch --nodes=2 slurm/pretrain.sh [section.key=value ...]
#   JOB=jobs/gpt2_125m.yaml OVERRIDES="optimizer.lr=6e-3 name=gpt2_125m_high_lr" sbatch slurm/pretrain.sh
#
# Every #SBATCH default below can be overridden on the sbatch command line. Overrides come from the
# script's arguments and/or $OVERRIDES (split on whitespace). REPO (default: the directory sbatch was
# run from) holds the code; PYTHON (default: $REPO/.venv/bin/python) runs it.
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
read -r -a EXTRA <<< "${OVERRIDES:-}"
EXTRA+=("$@")

if ! RUN_DIR=$("$PYTHON" -m launcher.config --job "$JOB" "${EXTRA[@]}" --get run_dir 2>&1); then
  mkdir -p "$SUBMIT_DIR/runs"
  echo "job $SLURM_JOB_ID: $RUN_DIR" >> "$SUBMIT_DIR/runs/slurm-$SLURM_JOB_ID.out"
  exit 2
fi
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"
exec >> "$LOG_DIR/sbatch-$SLURM_JOB_ID.out" 2>&1

# Rendezvous: the first node of the allocation, a port derived from the job id (stable across requeues).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

ATTEMPT=${SLURM_RESTART_COUNT:-0}
echo "job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST ($SLURM_NTASKS tasks): $JOB ${EXTRA[*]}"
echo "rendezvous $MASTER_ADDR:$MASTER_PORT; per-rank logs: $LOG_DIR/slurm-$SLURM_JOB_ID-$ATTEMPT-rank*.log"

# The trainers resume from $RUN_DIR by themselves; on the warning signal they checkpoint, snapshot,
# and requeue this job (checkpoint.requeue), so a preempted run continues where it stopped.
srun --kill-on-bad-exit=1 --output="$LOG_DIR/slurm-$SLURM_JOB_ID-$ATTEMPT-rank%t.log" \
    "$PYTHON" launcher/train.py --job "$JOB" "${EXTRA[@]}"
