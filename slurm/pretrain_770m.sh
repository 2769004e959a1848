#!/bin/bash
# GPT-2 770M, the LAWA paper's recipes (jobs/gpt2_770m.yaml, jobs/gpt2_770m_high_lr.yaml) on 4 nodes x 8
# GPUs, with the LAWA sidecar beside the trainers. Everything is overridable:
#
#   sbatch slurm/pretrain_770m.sh data.sources=... data.tokenizer=... data.dir=...   # baseline LR 2e-4
#   sbatch slurm/pretrain_770m.sh --job jobs/gpt2_770m_high_lr.yaml data.sources=...  # the paper's high LR
#   sbatch --nodes=8 slurm/pretrain_770m.sh parallel.tensor=2                        # TP inside each node
#
# The body is slurm/pretrain.sh's: this file only sets the 770M defaults.
#SBATCH --job-name=gpt2-770m
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=2-00:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=/dev/null  # slurm/pretrain.sh sends the output under the run directory
set -euo pipefail
export JOB=${JOB:-jobs/gpt2_770m.yaml}
exec bash "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/pretrain.sh" "$@"
