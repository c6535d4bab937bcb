#!/usr/bin/env bash
#SBATCH --job-name=chexnet-records
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
# Images + CSV -> TFRecords across nodes: one MPI rank per node, each with --cpus-per-task
# worker processes; rank 0 writes the manifest. CSV, IMAGES and DATA_DIR (the output), plus
# RECORDS_ARGS for more flags, e.g. RECORDS_ARGS="--split official --image-size 256".
set -euo pipefail
source "${CHEXNET_HOME:-${SLURM_SUBMIT_DIR:-.}}/job_submissions/slurm/common.sh"
run_records
