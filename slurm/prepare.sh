#!/bin/bash
# Prepare a job's data dir on one node's CPUs, before the training job: tokenize its text (one worker
# process per core of the allocation, a progress line every few seconds) and check the ids of its
# token files. Killed or preempted, it keeps the units it finished and --requeue/resubmitting goes on.
#
#   sbatch slurm/prepare.sh --job jobs/gpt2_125m_high_lr.yaml data.sources='[{path: /data/owt}]' \
#       data.tokenizer=/models/gpt2/tokenizer.json data.dir=/data/owt_gpt2
#   # the training job, started by Slurm once the preparation succeeded:
#   id=$(sbatch --parsable slurm/prepare.sh --job J [overrides]) && \
#       sbatch --dependency=afterok:${id%%;*} slurm/pretrain.sh --job J [overrides]
#
# Partition, account, time and cores come from sbatch's options (sbatch -p cpu -A myproj -t 4:00:00
# -c 64 slurm/prepare.sh ...); the defaults below are for a 32-core CPU node. The arguments are
# lawa-prepare's (--job, overrides, --force, --unit-mb). REPO (default: the submit directory) holds the
# code; PYTHON (default: $REPO/.venv/bin/python) runs it. Output: slurm-lawa-prepare-<job id>.out in
# the submit directory (the run directory's logs/ may not exist yet).
#SBATCH --job-name=lawa-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
echo "job ${SLURM_JOB_ID:-none} on $(hostname): lawa-prepare $* (${SLURM_CPUS_PER_TASK:-all} cores)"
exec "$PYTHON" -m launcher.prepare ${SLURM_CPUS_PER_TASK:+--processes "$SLURM_CPUS_PER_TASK"} "$@"
