"""Train a chest X-ray classifier on 1..N ranks (GPUs or CPU processes), with Horovod or
TensorFlow's own MultiWorkerMirroredStrategy (--engine tf) carrying the gradients.

    horovodrun -np 4 python -m chexnet_hvd.train --data RECORDS --run-dir runs/x --model densenet121
    python -m chexnet_hvd.launch -np 4 python -m chexnet_hvd.train --engine tf ...
    python -m chexnet_hvd.train ...            # no launcher: a world of size 1

Rank 0 writes RUN_DIR/config.json, RUN_DIR/runlog.jsonl and RUN_DIR/checkpoints/; every rank
computes the same validation AUROC from predictions gathered over all ranks. On SIGTERM or
SIGUSR1 all ranks stop after the same step, rank 0 writes a checkpoint, and the job exits 75
(EX_TEMPFAIL) so a requeued job continues with --resume.

`main` reads as the run does, one named step each: `start` (settings, inputs, the run
directory, the engine, the stall watch), `restore` (model, optimizer, resume), `announce` (the
run log), `assemble` (validation, checkpoints, callbacks), `fit`, and the end (`end_preempted`,
`end_completed`, or `failed`). The configuration (flags, recipes, derived values) is
chexnet_hvd.config; the callbacks and the run state they share, chexnet_hvd.callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from chexnet_hvd import (
    callbacks,
    checkpoints,
    cli,
    config,
    data,
    distributed,
    metrics,
    models,
    monitor,
    recipes,
    resume,
    runlog,
    schedules,
    stall,
    views,
    weights,
)
from chexnet_hvd.checkpoints import RunState
from chexnet_hvd.config import Derived, TrainConfig
from chexnet_hvd.engine import Engine


# ---------------------------------------------------------------- preemption -----------------
class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm's time-limit and preemption warnings) only set a flag; the
    training loop acts on it between steps, on all ranks at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


# ---------------------------------------------------------------- model and optimizer -------
def pack_targets(label, mask):
    """What Keras hands the loss as y_true: label and mask side by side, [B, 2C]. Not stacked
    as [B, 2, C]: with one class Keras' loss wrapper squeezes that to [B, 2], and the loss
    broadcast it against the [B, 1] predictions into a [B, B] matrix (every prediction trained
    against every label of the batch). [B, 2C] has the predictions' rank, so nothing reshapes it."""
    return tf.concat([label, mask], axis=-1)


def make_loss(pos_weight=None):
    """Keras' view of `metrics.masked_bce`, the suite's one loss, over `pack_targets`' y: the
    batch's mean over its unmasked entries (validation: the split's)."""

    @data.plain
    def loss(y, prob):
        label, mask = tf.split(y, 2, axis=-1)
        return metrics.masked_bce(label, prob, mask, pos_weight)

    return loss


def make_optimizer(cfg: TrainConfig, engine, derived: Derived):
    """Adam or SGD over the warmup schedule, made distributed by the engine; for fp16, Keras'
    dynamic loss scaling wraps it from outside (Horovod 0.28.1 cannot rebuild a LossScaleOptimizer
    from inside). The scaled gradients are allreduced before the finiteness check, and an
    overflow on any rank makes the sum non-finite on every rank, so all ranks skip the same steps
    and halve the loss scale alike (tested with an overflow on one rank only, both engines)."""
    schedule = schedules.EpochSchedule(derived.scaled_lr, derived.warmup_from, derived.warmup_epochs,
                                       cfg.epochs, cfg.schedule, cfg.step_epochs)
    optimizer = (tf.keras.optimizers.Adam(schedule) if cfg.optimizer == "adam"
                 else tf.keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True))
    optimizer = engine.distributed_optimizer(optimizer, cfg)
    if cfg.precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def model_view(cfg: TrainConfig) -> views.View:
    """How the model's input is made from a stored image: --image-size, the backbone's own
    input scaling, --crop (checkpoints record it: evaluate, predict and export use it)."""
    return views.View(cfg.image_size, models.input_scaling(cfg.model), cfg.crop)


def build(cfg: TrainConfig, engine, records: data.Records, initial, derived: Derived):
    """(model, trained): the model checkpoints hold, and what `fit` trains: the same model, or
    with fixed-size records the model behind `views.preprocess` in its graph. Compiled with the loss
    and the distributed optimizer; the same initial weights on every rank (one seed)."""
    tf.keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.xla:
        tf.config.optimizer.set_jit("autoclustering")
    tf.keras.mixed_precision.set_global_policy("float32" if cfg.precision == "fp32" else cfg.precision)
    manifest = records.manifest
    with engine.scope():
        model = models.build_model(cfg.model, cfg.image_size, manifest["num_classes"], initial)
        view = model_view(cfg)
        trained = (models.with_preprocessing(model, views.shipped_side(manifest["image_size"], view), view.scaling)
                   if data.preprocess_on_device(manifest) else model)
        trained.compile(optimizer=make_optimizer(cfg, engine, derived),
                        loss=make_loss(pos_weight(cfg, manifest)),
                        steps_per_execution=cfg.steps_per_execution)
    return model, trained


def pos_weight(cfg: TrainConfig, manifest: dict) -> list[float] | None:
    """--class-weights manifest: the manifest's per-class positive weights, in class order."""
    return None if cfg.class_weights == "none" else [manifest["pos_weight"][c] for c in manifest["classes"]]


# ---------------------------------------------------------------- run log --------------------
def start_run_log(cfg: TrainConfig, engine, run_dir: Path, model, state: RunState, derived: Derived,
                  ranks: list[dict], on_device: bool) -> runlog.RunLogWriter:
    """The chief's config.json (the settings alone: `--config RUN_DIR/config.json` trains with
    them again) and the run log's start record: what runs where, and how."""
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    writer = runlog.RunLogWriter(run_dir)
    recipe = recipes.RECIPES.get(cfg.recipe)
    writer.write("start", config=dataclasses.asdict(cfg), model=cfg.model, recipe=cfg.recipe,
                 recipe_version=recipe.version if recipe else None,
                 image_size=cfg.image_size, precision=cfg.precision,
                 engine=engine.name, backend=engine.backend(),
                 hostnames=sorted({r["host"] for r in ranks}), ranks=ranks,
                 slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                 resumed_from=state.resumed_from, initial_epoch=state.epoch,
                 initial_step=state.step, resumed_parts=state.parts, first_part_steps=state.part_steps,
                 best_by=state.best_by,
                 trainable_params=int(sum(v.shape.num_elements() for v in model.trainable_variables)),
                 synthetic_input=cfg.synthetic_input,
                 preprocess="model graph" if on_device else "input pipeline",
                 versions={"python": sys.version.split()[0], "tensorflow": tf.__version__,
                           **engine.versions()},
                 **dataclasses.asdict(derived))
    return writer


def start_line(cfg: TrainConfig, engine, derived: Derived, state: RunState) -> str:
    """One line for the job's log before anything slow (building the input, tracing the step):
    what runs, where, and how long an epoch is."""
    first = (f"epoch {state.epoch + 1} resumed ({state.part_steps} steps left)" if state.parts
             else f"epochs {state.epoch + 1}..{cfg.epochs}")
    return (f"start: {derived.world_size} rank(s) of the {engine.name} engine ({engine.backend()}), "
            f"{cfg.model} {cfg.image_size} px {cfg.precision}, global batch {derived.global_batch}, "
            f"{derived.steps_per_epoch} steps per epoch over {derived.train_records} training records; {first}")


# ---------------------------------------------------------------- data -----------------------
def train_batches(run: Run, shapes: list, parts: list, start_epoch: int, epochs: int,
                  trail: callbacks.AuditTrail | None = None) -> tf.data.Dataset:
    """This rank's training batches for `epochs` epochs from `start_epoch` (of that epoch, when
    earlier attempts trained `parts` of it, this rank's share of the rest), as Keras' (x, y)
    with y packing label and mask (`pack_targets`), counted by the run's feed; with a `trail`,
    each batch's record ids noted as it is delivered."""
    cfg, engine, records, derived = run.cfg, run.engine, run.records, run.derived
    on_device, view = data.preprocess_on_device(records.manifest), model_view(cfg)
    if cfg.synthetic_input:
        ds = data.synthetic_dataset(cfg.image_size, cfg.batch_size, records.manifest["num_classes"], cfg.seed,
                                    views.shipped_side(records.manifest["image_size"], view) if on_device else None)
    else:
        ds = data.train_dataset(records, "train", view, cfg.batch_size,
                                rank=engine.rank, world_size=engine.size, seed=cfg.seed,
                                augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer,
                                steps_per_epoch=derived.steps_per_epoch, start_epoch=start_epoch,
                                epochs=epochs, shapes=shapes, parts=parts, threads=engine.placement.threads,
                                with_ids=trail is not None)
    pack = data.plain(lambda x, y, m: (x, pack_targets(y, m)))
    if trail is not None:
        @data.plain
        def pack(x, y, m, ids):  # in delivery order: a sequential map
            with tf.control_dependencies([tf.py_function(trail.record, [ids], tf.int64)]):
                return x, pack_targets(y, m)

    return run.feed.counted(ds.map(pack))


def fit(run: Run, trained, keras_callbacks: list, state: RunState, trail: callbacks.AuditTrail | None) -> None:
    """Train to --epochs: the rest of an epoch a resumed run entered in mid-epoch (nothing but
    its validation when less than one global batch of it is left), then whole epochs, unless a
    stop (preemption, early stopping) comes first."""
    cfg, engine = run.cfg, run.engine

    def epochs(first: int, end: int) -> None:
        if state.part_steps == 0:  # an epoch with nothing left to train still ends as epochs do
            callbacks.end_empty_epoch(keras_callbacks, trained, first)
            return
        shapes, parts = list(state.shapes), list(state.parts)  # as they are now, for the dataset
        trained.fit(engine.fit_input(lambda: train_batches(run, shapes, parts, first, end - first, trail)),
                    epochs=end, initial_epoch=first,
                    steps_per_epoch=state.part_steps, callbacks=keras_callbacks,
                    verbose=progress_bar(cfg.verbose) if engine.rank == 0 else 0)

    first = state.epoch
    if state.parts and first < cfg.epochs:
        epochs(first, first + 1)
        first += 1
    if first < cfg.epochs and not (state.preempted or state.stopped_early):
        state.part_steps = run.derived.steps_per_epoch  # whole epochs from here on (a stop above keeps its part's)
        epochs(first, cfg.epochs)


def probe_batch(trained, batch_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of zeros in the shape and type `trained` takes, with targets (the compute probe's)."""
    classes = trained.output.shape[-1]
    return (tf.zeros([batch_size, *trained.input.shape[1:]], trained.input.dtype),
            pack_targets(tf.zeros([batch_size, classes]), tf.ones([batch_size, classes])))


def progress_bar(verbose: int) -> int:
    """Keras' verbose: its bar only on a terminal; batch logs get our one line per epoch."""
    return int(verbose == 1 and cli.watched())


# ---------------------------------------------------------------- audit (tests) --------------
def audit_weights(run_dir: Path, rank: int, model, suffix: str = "", optimizer=None) -> None:
    """--audit: this rank's weights as RUN_DIR/audit/rank<N><suffix>.npz (and its optimizer's
    state as rank<N><suffix>-optimizer.npz)."""
    audit = run_dir / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    np.savez(audit / f"rank{rank}{suffix}.npz", *model.get_weights())
    if optimizer is not None:
        np.savez(audit / f"rank{rank}{suffix}-optimizer.npz",
                 *(v.numpy() for v in checkpoints.optimizer_variables(optimizer)))


# ---------------------------------------------------------------- main -----------------------
def open_inputs(cfg: TrainConfig) -> data.Records:
    """The records, opened once and checked (bad input fails here, before the engine starts)."""
    records = data.open_records(cfg.data)
    for split in ("train", cfg.val_split):
        records.units(split)
    data.check_view(records.manifest, cfg.data, model_view(cfg))
    return records


@dataclasses.dataclass
class Run:
    """What the steps of one attempt share: made by `start`, `derived` completed by `restore`
    (the warmup a resumed run keeps), `writer` by `announce` (the chief's run log)."""
    cfg: TrainConfig
    records: data.Records
    initial: str | None  # the initial weights' file (weights.resolve)
    dir: Path
    stop: StopRequest
    engine: Engine
    derived: Derived
    ranks: list[dict]  # every rank's placement, in rank order
    feed: monitor.Feed
    watch: monitor.StallWatch | None
    writer: runlog.RunLogWriter | None = None  # opened with the start record: a run that fails before it leaves no log


def main(argv: list[str] | None = None) -> int:
    words = recipes.asked(sys.argv[1:] if argv is None else argv)
    if words[:1] in (["list"], ["show"]):  # describe, train nothing
        print(recipes.listing() if words[0] == "list" else recipes.show(words[1] if words[1:] else ""))
        return 0
    run = start(config.parse(argv))
    finished = False  # trained to the end (not preempted, not failed)
    try:
        model, trained, state, warnings = restore(run)
        announce(run, model, state, warnings)
        saver, keras_callbacks, trail = assemble(run, model, trained, state)
        fit(run, trained, keras_callbacks, state, trail)
        if state.preempted:  # checkpoint, exit 75
            return end_preempted(run.engine, state, saver, run.writer)
        if run.cfg.audit:
            audit_weights(run.dir, run.engine.rank, model, optimizer=trained.optimizer)
        finished = True
    except BaseException as err:
        code = failed(run, err)
        if code is None:
            raise
        return code
    finally:
        if run.watch and not finished:
            run.watch.watchdog.stop()
    if run.writer:
        run.writer.write("end", status="completed")
    try:
        return end_completed(run.engine)  # watched: a rank stopped before the last barrier is named
    finally:
        if run.watch:
            run.watch.watchdog.stop()
        if run.writer:
            run.writer.close()


def start(cfg: TrainConfig) -> Run:
    """Check the settings and open the inputs (bad input fails here, before the engine starts),
    make the run directory, start the engine, derive the world's values (a batch or step count
    the records cannot fill fails here, on every rank before any collective), start the watch
    for stalled ranks (until it runs, each rank's start-up has a bound of its own: stall.StartUp)."""
    config.check_config(cfg)
    models.check_model(cfg.model, cfg.image_size)
    cluster = distributed.workers_flag(cfg.engine, cfg.workers, cfg.worker_index)
    stalled = {"schema": runlog.SCHEMA, "event": "end", "status": "stalled", "before_start": True,
               "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    with stall.StartUp(cfg.stall_timeout, Path(cfg.run_dir) / runlog.FILENAME, stalled) as bound:  # until the watch runs
        bound.at("opening the records")
        records = open_inputs(cfg)
        initial = weights.resolve(cfg.weights, cfg.model)  # from the cache: compute nodes never download
        run_dir = cli.make_dir(cfg.run_dir)
        stop = StopRequest()
        if cfg.xla:  # auto-clustering leaves CPU ops alone unless the CPU's global JIT is on too
            os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_cpu_global_jit".strip()
        bound.at(f"starting the {cfg.engine} engine (waiting for every rank to join)")
        engine, placement = distributed.start(cfg.engine, cfg.threads, cluster, cfg.stall_timeout,
                                              shared=run_dir / ".rendezvous")
        derived = config.derive(cfg, records.manifest, engine.size)
        bound.at(f"exchanging where each rank runs, as rank {engine.rank} (waiting for every rank)")
        ranks = engine.allgather_object(dataclasses.asdict(placement))  # Horovod/TF: where each rank runs
        feed = monitor.Feed()
        # Horovod/TF: the watch gathers every rank's heartbeat address
        watch = monitor.StallWatch(cfg.stall_timeout, engine, ranks, run_dir, feed) if cfg.stall_timeout > 0 else None
    return Run(cfg, records, initial, run_dir, stop, engine, derived, ranks, feed, watch)


def restore(run: Run) -> tuple[tf.keras.Model, tf.keras.Model, RunState, list[str]]:
    """(model, trained, state, warnings): the model and what trains it (`build`), with --resume
    restored from the run's newest checkpoint (see chexnet_hvd.resume), the run's warmup kept
    in `run.derived`; the warnings about the validation criterion. --audit: the initial weights."""
    cfg, engine = run.cfg, run.engine
    model, trained = build(cfg, engine, run.records, run.initial, run.derived)
    best_by, warnings = callbacks.validation_criterion(run.records.manifest, cfg.val_split)
    state = resume.resume_state(cfg, engine, model, trained.optimizer, run.dir, run.derived, run.records, best_by)
    run.derived = dataclasses.replace(run.derived, warmup_from=state.warmup[0], warmup_epochs=state.warmup[1])
    if cfg.audit:
        audit_weights(run.dir, engine.rank, model, "-initial")
    return model, trained, state, warnings


def announce(run: Run, model, state: RunState, warnings: list[str]) -> None:
    """The chief's config.json and the run log's start record, its warnings and start line."""
    if run.engine.rank != 0:  # Horovod/TF: the chief writes files
        return
    run.writer = start_run_log(run.cfg, run.engine, run.dir, model, state, run.derived, run.ranks,
                               data.preprocess_on_device(run.records.manifest))
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    if run.cfg.verbose:
        print(start_line(run.cfg, run.engine, run.derived, state), flush=True)
    if run.watch:
        run.watch.writer = run.writer


def assemble(run: Run, model, trained, state: RunState) -> tuple[checkpoints.Saver, list, callbacks.AuditTrail | None]:
    """(saver, Keras callbacks, audit trail or None): validation on this rank's share of the
    split, the checkpoint writer, and the callbacks that watch, log and stop the training."""
    cfg, engine, records = run.cfg, run.engine, run.records
    beat = run.watch.beat if run.watch else None
    validation = callbacks.Validation(
        state, data.eval_dataset(records, cfg.val_split, model_view(cfg), cfg.val_batch_size, rank=engine.rank,
                                 world_size=engine.size, threads=engine.placement.threads),
        records.manifest["classes"], pos_weight(cfg, records.manifest), engine.predictor(model), engine, beat)
    saver = checkpoints.Saver(model, trained.optimizer, run.dir / "checkpoints", cfg.keep_checkpoints,
                              chief=engine.rank == 0, writes=engine.saves_here,
                              meta=lambda epochs_done: checkpoints.run_meta(cfg, records.manifest, run.derived,
                                                                            state, epochs_done),
                              beat=beat or (lambda **_: None),
                              share=lambda: engine.average_accumulation(trained.optimizer))
    trail = (callbacks.AuditTrail(state, run.dir / "audit" / f"rank{engine.rank}-trained.jsonl")
             if cfg.audit and not cfg.synthetic_input else None)
    diagnosis = callbacks.Diagnosis(
        state, engine, run.feed.counts, run.derived.global_batch,
        monitor.compute_probe(engine, trained, make_loss(), *probe_batch(trained, cfg.batch_size)))
    return saver, callbacks.make_callbacks(cfg, engine, state, run.derived, run.stop, validation, saver, run.writer,
                                           run.watch, [c for c in (trail, diagnosis) if c]), trail


def failed(run: Run, err: BaseException) -> int | None:
    """The exit code of a rank whose attempt raised `err`, or None to raise it: a stalled
    collective is named (exit 76); otherwise the run log ends "failed", and a rank that only
    heard another fail says no more (it told why)."""
    stalled = run.watch.failed_collective(err) if run.watch else None
    if stalled:
        print(f"error: {stalled}; ending the job (exit {stall.EXIT_STALLED})", file=sys.stderr, flush=True)
        return stall.EXIT_STALLED
    if run.writer:
        with contextlib.suppress(OSError):  # a full disk: the error itself is the news
            run.writer.write("end", status="failed", error=f"{type(err).__name__}: {cli.error_text(err, limit=1000)}")
    return cli.EXIT_FAILED if run.engine.says_peer_left(err) else None


def last_barrier(engine, run: str) -> None:
    """No rank leaves before the chief has written what the run ends with; a rank that left
    meanwhile, past its own barrier (the tf engine's: once it holds the others' parts of the
    collective, before they hold its), makes this one say so, not fail. A rank stopped before it
    reaches the barrier is the stall watch's (still running): it ends the job."""
    try:
        engine.barrier()  # Horovod/TF: every rank
    except Exception as err:
        if engine.size == 1 or not engine.peer_left(err):
            raise
        print(f"warning: rank {engine.rank}: another rank left at the end of a {run} run "
              f"({cli.error_text(err, limit=200)})", file=sys.stderr, flush=True)


def end_completed(engine) -> int:
    """The run has completed, and the chief has written the run log's end."""
    last_barrier(engine, "completed")
    return 0


def end_preempted(engine, state: RunState, saver: checkpoints.Saver, writer) -> int:
    """Every rank stopped after the same step: the chief writes the checkpoint (see Saver) and
    the run log's end, and no rank exits before it has (exit 75: requeue me). Each rank says so
    before the last collective: once one rank exits, a launcher may kill the others (srun
    --kill-on-bad-exit), and a line after it could be lost."""
    saver(f"step-{state.step:09d}", state.epoch)
    if writer:
        writer.write("end", status="preempted", step=state.step, epoch=state.epoch)
    print(f"rank {engine.rank}: preempted after step {state.step}; exiting {cli.EXIT_PREEMPTED} "
          "once the checkpoint is written", file=sys.stderr, flush=True)
    last_barrier(engine, "preempted")  # nobody exits before the checkpoint
    return cli.EXIT_PREEMPTED


if __name__ == "__main__":
    cli.run(main, leave=(cli.EXIT_PREEMPTED, stall.EXIT_STALLED, cli.EXIT_FAILED))
