#!/usr/bin/env bash
#SBATCH --job-name=chexnet-tfrec_8gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# 8 GPUs as 2 nodes x 4, TFRecords.
# One rank per GPU; every setting is an environment variable with a default: see common.sh.
set -euo pipefail
source "${CHEXNET_HOME:-${SLURM_SUBMIT_DIR:-.}}/job_submissions/slurm/common.sh"
run_training
