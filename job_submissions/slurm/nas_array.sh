#!/usr/bin/env bash
#SBATCH --job-name=chexnet-nas
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
# Architecture search (GenNAS space): one worker per array task, one GPU per worker, all on the
# study in STUDY_DIR; more workers = a larger --array. Settings: see common.sh (run_nas).
set -euo pipefail
: "${IMAGE_SIZE:=224}" "${BATCH_SIZE:=32}" "${EPOCHS:=5}"
source "${CHEXNET_HOME:-${SLURM_SUBMIT_DIR:-.}}/job_submissions/slurm/common.sh"
run_nas
