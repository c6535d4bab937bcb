#!/usr/bin/env bash
#SBATCH --job-name=chexnet-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# Machines without GPUs: one rank per --cpus-per-task cores, fp32 (the tests run this one).
# Every setting is an environment variable with a default: see common.sh.
set -euo pipefail
: "${PRECISION:=fp32}"
source "${CHEXNET_HOME:-${SLURM_SUBMIT_DIR:-.}}/job_submissions/slurm/common.sh"
run_training
