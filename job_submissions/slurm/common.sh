# The one body every template in this folder sources (after its #SBATCH lines and defaults).
# Every path and setting is an environment variable with a default; override any at submit time:
#   DATA_DIR=/scratch/records EPOCHS=20 sbatch job_submissions/slurm/tfrec_8gpu.sh
#
#   CHEXNET_HOME  the clone (default: where sbatch was run, $SLURM_SUBMIT_DIR)
#   VENV          its virtual environment (default: $CHEXNET_HOME/.venv)
#   DATA_DIR      records directory (or raw index, see raw_1gpu.sh) with manifest.json
#   RUN_ROOT      runs go to $RUN_ROOT/<job name>/<job id>/ (default: $CHEXNET_HOME/runs)
#   MODEL IMAGE_SIZE BATCH_SIZE EPOCHS PRECISION   the training run (BATCH_SIZE is per rank)
#   TRAIN_ARGS    more flags for python -m chexnet_hvd.train, e.g. "--schedule plateau"
#   CSV IMAGES RECORDS_ARGS   records_mpi.sh only: the records writer's input and more flags
#   STUDY_DIR N_TRIALS PROPOSER NAS_ARGS   nas_array.sh only: the shared study (default
#                 $RUN_ROOT/nas, on a filesystem all nodes see), its trial budget, the proposer
#                 and more flags for python -m chexnet_hvd.nas (MODEL is the search's, unused)
#   LAUNCHER      srun (default; PMIx, as real clusters start MPI ranks) | mpirun | horovodrun
#   SRUN_MPI      srun's --mpi plugin (default pmix)
#
# Preemption: the templates ask Slurm for SIGUSR1 some minutes before the time limit
# (--signal=B:USR1@...) and are --requeue-able. The signal reaches this shell, which passes it
# to the ranks; they agree to stop after the same step, rank 0 writes a checkpoint, and they exit
# 75. Then this script requeues the job; the job id, and so the run directory, stay the same, and
# the trainer always runs with --resume, so the requeued job continues from that checkpoint.

: "${CHEXNET_HOME:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${VENV:=$CHEXNET_HOME/.venv}"
: "${DATA_DIR:=$CHEXNET_HOME/data/records}"
: "${RUN_ROOT:=$CHEXNET_HOME/runs}"
: "${MODEL:=densenet121}" "${IMAGE_SIZE:=224}" "${BATCH_SIZE:=16}" "${EPOCHS:=10}"
: "${PRECISION:=mixed_float16}" "${TRAIN_ARGS:=}" "${LAUNCHER:=srun}" "${SRUN_MPI:=pmix}"
: "${SLURM_JOB_ID:=local-$$}" "${SLURM_JOB_NAME:=chexnet}" "${SLURM_NTASKS:=1}"
EXIT_PREEMPTED=75

RUN_DIR="$RUN_ROOT/$SLURM_JOB_NAME/$SLURM_JOB_ID"
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
# Open MPI busy-polls while waiting; yielding keeps ranks that share cores from starving.
export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"

# Start "$@" once per rank, in the background (so this shell can take signals), pid in $launched.
launch() {
  case "$LAUNCHER" in
    srun) srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 "$@" & ;;
    mpirun) mpirun --bind-to none -np "$SLURM_NTASKS" "$@" & ;;
    horovodrun) horovodrun -np "$SLURM_NTASKS" \
        -H "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/:${SLURM_NTASKS_PER_NODE:-1}/" | paste -sd,)" \
        "$@" & ;;
    *) echo "error: LAUNCHER: unknown launcher '$LAUNCHER' (srun, mpirun or horovodrun)" >&2; exit 2 ;;
  esac
  launched=$!
}

# Wait for the launched ranks; pass SIGUSR1/SIGTERM on to them; return their exit code.
wait_ranks() {
  trap 'echo "job $SLURM_JOB_ID: signal received, asking the ranks to checkpoint and stop"; kill -USR1 "$launched" 2>/dev/null || true' USR1 TERM
  local rc=0
  while true; do
    wait "$launched" && rc=0 || rc=$?
    kill -0 "$launched" 2>/dev/null || break  # still running: wait was cut short by a signal
  done
  trap - USR1 TERM
  return "$rc"
}

run_training() {
  mkdir -p "$RUN_DIR"
  exec > >(tee -a "$RUN_DIR/job.log") 2>&1  # the job's output beside its run log, every attempt
  echo "job $SLURM_JOB_ID: $SLURM_NTASKS ranks via $LAUNCHER on ${SLURM_JOB_NODELIST:-$(hostname)}; run dir $RUN_DIR"
  launch "$PY" -m chexnet_hvd.train --data "$DATA_DIR" --run-dir "$RUN_DIR" --model "$MODEL" \
    --image-size "$IMAGE_SIZE" --batch-size "$BATCH_SIZE" --epochs "$EPOCHS" \
    --precision "$PRECISION" --resume $TRAIN_ARGS
  local rc=0
  wait_ranks || rc=$?
  requeue_if_preempted "$rc"
}

requeue_if_preempted() {
  if (( $1 == EXIT_PREEMPTED )) && [[ $SLURM_JOB_ID != local-* ]]; then
    echo "job $SLURM_JOB_ID: preempted with a checkpoint; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$1"
}

# One architecture-search worker per array task; the study directory coordinates them all.
run_nas() {
  : "${STUDY_DIR:=$RUN_ROOT/nas}" "${N_TRIALS:=100}" "${PROPOSER:=evolution}" "${NAS_ARGS:=}"
  mkdir -p "$STUDY_DIR"
  echo "job $SLURM_JOB_ID (array task ${SLURM_ARRAY_TASK_ID:-0}): NAS worker on $(hostname), study $STUDY_DIR"
  "$PY" -m chexnet_hvd.nas --study-dir "$STUDY_DIR" --data "$DATA_DIR" --proposer "$PROPOSER" \
    --n-trials "$N_TRIALS" --image-size "$IMAGE_SIZE" --batch-size "$BATCH_SIZE" \
    --epochs "$EPOCHS" --train-args "--precision $PRECISION $TRAIN_ARGS" $NAS_ARGS &
  launched=$!
  local rc=0
  wait_ranks || rc=$?
  requeue_if_preempted "$rc"
}

run_records() {
  : "${CSV:?set CSV to the metadata CSV}" "${IMAGES:?set IMAGES to the image directory}"
  launch "$PY" -m chexnet_hvd.records --csv "$CSV" --images "$IMAGES" --out "$DATA_DIR" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress ${RECORDS_ARGS:-}
  wait_ranks
}
