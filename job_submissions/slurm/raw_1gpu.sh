#!/usr/bin/env bash
#SBATCH --job-name=chexnet-raw_1gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# 1 GPU reading the PNG files themselves (a raw index: records --format raw).
# One rank per GPU; every setting is an environment variable with a default: see common.sh.
set -euo pipefail
: "${DATA_DIR:=${CHEXNET_HOME:-${SLURM_SUBMIT_DIR:-.}}/data/raw_index}"
source "${CHEXNET_HOME:-${SLURM_SUBMIT_DIR:-.}}/job_submissions/slurm/common.sh"
run_training
