#!/bin/bash
# Gstack as two dependent Slurm jobs: the small run, then the grown run, which Slurm starts only once
# the small one has succeeded (--dependency=afterok). Run it (not sbatch it) from the repository:
#
#   bash slurm/gstack_two_stage.sh                                    # the CPU-scale recipe
#   SMALL_JOB=jobs/x_small.yaml GROWN_JOB=jobs/x_grown.yaml bash slurm/gstack_two_stage.sh --nodes=2
#
# Arguments go to both sbatch calls (e.g. --nodes, --gpus-per-node); SMALL_OVERRIDES and
# GROWN_OVERRIDES (whitespace-split section.key=value) to each stage. The grown job's
# growth.from_run must name the small job's run directory (the recipes do).
set -euo pipefail
REPO=${REPO:-$PWD}
SMALL_JOB=${SMALL_JOB:-jobs/gstack_small_cpu.yaml}
GROWN_JOB=${GROWN_JOB:-jobs/gstack_grown_cpu.yaml}

small=$(JOB=$SMALL_JOB OVERRIDES="${SMALL_OVERRIDES:-}" sbatch --parsable --job-name=gstack-small "$@" \
    "$REPO/slurm/pretrain.sh")
small=${small%%;*}
grown=$(JOB=$GROWN_JOB OVERRIDES="${GROWN_OVERRIDES:-}" sbatch --parsable --job-name=gstack-grown \
    --dependency=afterok:"$small" --kill-on-invalid-dep=yes "$@" "$REPO/slurm/pretrain.sh")
grown=${grown%%;*}
echo "small run: job $small; grown run: job $grown (starts when $small has succeeded)"
