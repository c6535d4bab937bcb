# The one body every template in this folder sources (after its #SBATCH lines and defaults).
# Every path and setting is an environment variable with a default; override any at submit time:
#   DATA_DIR=/scratch/records EPOCHS=20 sbatch job_submissions/slurm/tfrec_8gpu.sh
#
#   CHEXNET_HOME  the clone (default: where sbatch was run, $SLURM_SUBMIT_DIR)
#   VENV          its virtual environment (default: $CHEXNET_HOME/.venv)
#   DATA_DIR      records directory (or raw index, see raw_1gpu.sh) with manifest.json
#   RUN_ROOT      runs go to $RUN_ROOT/<job name>/<job id>/ (default: $CHEXNET_HOME/runs)
#   CHEXNET_RUN_DIR   the run directory instead: a run's directory from an earlier job
#                 continues that run from its newest checkpoint (after scancel, or a job that
#                 ended); one job at a time
#   MODEL IMAGE_SIZE BATCH_SIZE EPOCHS PRECISION   the training run (BATCH_SIZE is per rank)
#   RECIPE        a named recipe (python -m chexnet_hvd.train --recipe list) instead of the
#                 defaults above: then only MODEL IMAGE_SIZE BATCH_SIZE EPOCHS set at submit
#                 time override it; PRECISION stays the template's (it is the hardware's choice)
#   TRAIN_ARGS    more flags for python -m chexnet_hvd.train, e.g. "--schedule plateau"
#   STEPS_PER_EXECUTION   the training templates' steps per call of Keras' train function
#                 (default 8: Python's cost per call, ~1 ms, paid once per 8 steps of a few ms
#                 on a GPU; stops and step checkpoints then happen at the end of a call;
#                 docs/benchmarks.md). nas_array.sh's candidates train at the trainer's 1.
#   CSV IMAGES RECORDS_ARGS   records_mpi.sh only: the records writer's input and more flags
#   STUDY_DIR N_TRIALS PROPOSER NAS_ARGS   nas_array.sh only: the shared study (default
#                 $RUN_ROOT/nas, on a filesystem all nodes see), its trial budget, the proposer
#                 and more flags for python -m chexnet_hvd.nas (MODEL is the search's, unused)
#   LAUNCHER      srun (default; PMIx, as real clusters start MPI ranks; binds each rank to its
#                 --cpus-per-task CPUs) | mpirun (Open MPI over the job's nodes, ranks unbound).
#                 Not horovodrun: it passes no signal on to the ranks (so preemption would lose
#                 the run) and needs ssh between nodes; it is for workstations.
#   SRUN_MPI      srun's --mpi plugin (default pmix)
#   ENGINE        horovod | tf: TensorFlow's MultiWorkerMirroredStrategy carries the gradients
#                 instead of Horovod (for clusters where Horovod does not build); srun then
#                 starts the workers without MPI (LAUNCHER must be srun). Default: $CHEXNET_ENGINE,
#                 else horovod where the venv has it, else tf (the trainer's own default)
#
# Preemption: the templates ask Slurm for SIGUSR1 some minutes before the time limit
# (--signal=B:USR1@...) and are --requeue-able. The signal reaches this shell, which passes it
# to the ranks; they agree to stop after the same step, rank 0 writes a checkpoint, and they exit
# 75. Then this script requeues the job; the job id, and so the run directory, stay the same, and
# the trainer always runs with --resume, so the requeued job continues from that checkpoint.
# Stalls: a rank without progress for --stall-timeout seconds (600 by default; TRAIN_ARGS can
# change it) ends the attempt, naming the ranks and hosts it waited for; the job is then requeued,
# and ends if it stalls again before it completes an epoch (a bad node or link is not retried
# for the whole time limit; stalls days apart are not one fault, nor a resubmitted job's and the
# one before it). A rank stuck in its start-up (before the watch runs) is killed at the timeout
# plus a minute, and that stall is logged and requeued the same way. A suspended job (scontrol
# suspend, gang scheduling) is no stall: its ranks see that every rank was stopped, and go on
# (under the tf engine, one suspended past the stall timeout plus a minute ends as a stall:
# requeued, not counted against the job). Each attempt is judged by what it wrote to the run
# log: one that failed before its start record (its exit code stands) is not taken for the
# attempt before it.

: "${CHEXNET_HOME:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${VENV:=$CHEXNET_HOME/.venv}"
: "${DATA_DIR:=$CHEXNET_HOME/data/records}"
: "${RUN_ROOT:=$CHEXNET_HOME/runs}"
: "${RECIPE:=}" "${PRECISION:=mixed_float16}" "${TRAIN_ARGS:=}" "${LAUNCHER:=srun}" "${SRUN_MPI:=pmix}"
: "${STEPS_PER_EXECUTION:=8}"
: "${ENGINE:=${CHEXNET_ENGINE:-$("$VENV/bin/python" -c 'from chexnet_hvd.distributed import DEFAULT_ENGINE; print(DEFAULT_ENGINE)' 2>/dev/null || echo horovod)}}"
if [[ -z $RECIPE ]]; then
  : "${MODEL:=densenet121}" "${IMAGE_SIZE:=224}" "${BATCH_SIZE:=16}" "${EPOCHS:=10}"
fi
: "${SLURM_JOB_ID:=local-$$}" "${SLURM_JOB_NAME:=chexnet}" "${SLURM_NTASKS:=1}"
EXIT_PREEMPTED=75

case "$LAUNCHER" in
  srun|mpirun) ;;
  horovodrun) echo "error: LAUNCHER: horovodrun does not pass Slurm's USR1 on to the ranks (a preempted job would lose its run); use srun (default) or mpirun" >&2; exit 2 ;;
  *) echo "error: LAUNCHER: unknown launcher '$LAUNCHER' (srun or mpirun)" >&2; exit 2 ;;
esac
case "$ENGINE" in
  horovod) ;;
  tf) if [[ $LAUNCHER != srun ]]; then
        echo "error: ENGINE: the tf engine's workers are started by srun; unset LAUNCHER" >&2; exit 2
      fi ;;
  *) echo "error: ENGINE: unknown engine '$ENGINE' (horovod or tf)" >&2; exit 2 ;;
esac

RUN_DIR="${CHEXNET_RUN_DIR:-$RUN_ROOT/$SLURM_JOB_NAME/$SLURM_JOB_ID}"
export CHEXNET_ENGINE=$ENGINE  # the default of --engine, also for the search's candidates
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
# A rank that dies in native code (MPI, TensorFlow) prints every Python thread's stack to job.log.
export PYTHONFAULTHANDLER=1
# Open MPI busy-polls while waiting; yielding keeps ranks that share cores from starving.
export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
# Since Slurm 22.05 srun does not inherit the job's --cpus-per-task: pass it on, so each rank
# gets (and is bound to) the CPUs the job asked for, and sizes its threads from them.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# Open MPI refuses root unless told; only the rehearsal cluster runs jobs as root.
if ((EUID == 0)); then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

# Start "$@" once per rank, in the background (so this shell can take signals), pid in $launched.
launch() {
  case "$LAUNCHER" in
    srun) srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 "$@" & ;;
    mpirun) mpirun --bind-to none -np "$SLURM_NTASKS" "$@" & ;;  # forwards USR1 to the ranks
  esac
  launched=$!
}

# Wait for the launched ranks and return their exit code. USR1 (Slurm's warning before a time
# limit or preemption) and TERM (scancel) both reach the ranks as USR1: they checkpoint after the
# same step and exit 75. Only after USR1 does the job requeue itself; a cancelled job stays so.
wait_ranks() {
  requeue=0
  trap 'echo "job $SLURM_JOB_ID: USR1: checkpointing, then requeueing"; requeue=1; kill -USR1 "$launched" 2>/dev/null || true' USR1
  trap 'echo "job $SLURM_JOB_ID: TERM: checkpointing, then stopping"; kill -USR1 "$launched" 2>/dev/null || true' TERM
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
  echo "job $SLURM_JOB_ID: $SLURM_NTASKS ranks of $ENGINE via $LAUNCHER on ${SLURM_JOB_NODELIST:-$(hostname)}; run dir $RUN_DIR"
  # --verbose 2: one line per epoch in job.log, never a progress bar, whatever the launcher.
  local settings=(--precision "$PRECISION" --engine "$ENGINE" --steps-per-execution "$STEPS_PER_EXECUTION") var flag
  if [[ $ENGINE == tf ]]; then SRUN_MPI=none; fi  # TensorFlow's own collectives: no MPI
  if [[ -n $RECIPE ]]; then settings+=(--recipe "$RECIPE"); fi
  for var in MODEL IMAGE_SIZE BATCH_SIZE EPOCHS; do  # IMAGE_SIZE -> --image-size "$IMAGE_SIZE", if set
    flag=${var,,}
    if [[ -n ${!var:-} ]]; then settings+=("--${flag//_/-}" "${!var}"); fi
  done
  local rc=0 status before
  before=$("$PY" -m chexnet_hvd.runlog "$RUN_DIR" --records 2>/dev/null || echo 0)
  launch "$PY" -m chexnet_hvd.train --data "$DATA_DIR" --run-dir "$RUN_DIR" "${settings[@]}" \
    --resume --verbose 2 $TRAIN_ARGS
  wait_ranks || rc=$?
  # The run log, not the launcher's code, says whether the ranks stopped at a checkpoint: srun
  # ends the other ranks (143) as soon as the first one exits 75. This attempt's records only.
  status=$("$PY" -m chexnet_hvd.runlog "$RUN_DIR" --after "$before" 2>/dev/null || true)
  if ((rc)) && [[ $status == preempted ]]; then
    rc=$EXIT_PREEMPTED
  fi
  if [[ $status == stalled ]]; then requeue_stalled; fi
  requeue_if_preempted "$rc"
}

# A stalled rank ended the attempt (its error line above names it): the job goes again from its
# newest checkpoint, likely on other nodes; a second stall before an epoch completes ends it,
# so that a bad node or network is not retried for the whole time limit.
requeue_stalled() {
  local stalls
  stalls=$("$PY" -m chexnet_hvd.runlog "$RUN_DIR" --stalled-in-a-row || echo 0)
  if ((stalls > 1)); then
    echo "job $SLURM_JOB_ID: stalled again before an epoch completed ($stalls attempts in a row); not requeueing"
  elif [[ $SLURM_JOB_ID != local-* ]]; then
    echo "job $SLURM_JOB_ID: stalled (see the error above); requeueing to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}

requeue_if_preempted() {
  if (( $1 == EXIT_PREEMPTED && requeue )) && [[ $SLURM_JOB_ID != local-* ]]; then
    echo "job $SLURM_JOB_ID: preempted with a checkpoint; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$1"
}

# One architecture-search worker per array task; the study directory coordinates them all.
run_nas() {
  : "${STUDY_DIR:=$RUN_ROOT/nas}" "${N_TRIALS:=100}" "${PROPOSER:=evolution}" "${NAS_ARGS:=}"
  if [[ -n $RECIPE ]]; then
    echo "error: RECIPE: the search trains every candidate with the nas_candidate recipe; unset RECIPE" >&2
    return 2
  fi
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
  # Each rank's worker processes default to the CPUs srun bound it to (--cpus-per-task).
  launch "$PY" -m chexnet_hvd.records --csv "$CSV" --images "$IMAGES" --out "$DATA_DIR" \
    --no-progress ${RECORDS_ARGS:-}
  wait_ranks
}
