"""Train a chest X-ray classifier on 1..N ranks (GPUs or CPU processes), with Horovod or
TensorFlow's own MultiWorkerMirroredStrategy (--engine tf) carrying the gradients.

    horovodrun -np 4 python -m chexnet_hvd.train --data RECORDS --run-dir runs/x --model densenet121
    python -m chexnet_hvd.launch -np 4 python -m chexnet_hvd.train --engine tf ...
    python -m chexnet_hvd.train ...            # no launcher: a world of size 1

Rank 0 writes RUN_DIR/config.json, RUN_DIR/runlog.jsonl and RUN_DIR/checkpoints/; every rank
computes the same validation AUROC from predictions gathered over all ranks. On SIGTERM or
SIGUSR1 all ranks stop after the same step, rank 0 writes a checkpoint, and the job exits 75
(EX_TEMPFAIL) so a requeued job continues with --resume.

`main` reads as the run does: setup, the engine, model and optimizer, resume, the run log,
data, callbacks, fit, the end. The configuration (flags, recipes, derived values) is
chexnet_hvd.config; the callbacks and the run state they share, chexnet_hvd.callbacks.
"""

from __future__ import annotations

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
    recipes,
    runlog,
    schedules,
    sharding,
    weights,
)
from chexnet_hvd.callbacks import RunState
from chexnet_hvd.config import Derived, TrainConfig
from chexnet_hvd.records import check_image_size


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
def make_loss(pos_weight=None):
    """Keras' view of `metrics.masked_bce`, the suite's one loss: y packs (label, mask) as
    [B, 2, C]; the batch's mean over its unmasked entries (validation: the split's)."""

    def loss(y, prob):
        return metrics.masked_bce(y[:, 0], prob, y[:, 1], pos_weight)

    return loss


def make_optimizer(cfg: TrainConfig, engine, derived: Derived):
    """Adam or SGD over the warmup schedule, made distributed by the engine; for fp16, Keras'
    dynamic loss scaling wraps it from outside (Horovod 0.28.1 cannot rebuild a LossScaleOptimizer
    from inside). The scaled gradients are allreduced before the finiteness check, and an
    overflow on any rank makes the sum non-finite on every rank, so all ranks skip the same steps
    and halve the loss scale alike (tested with an overflow on one rank only, both engines)."""
    decay_every = cfg.step_epochs * derived.steps_per_epoch if cfg.schedule == "step" else 0
    schedule = schedules.WarmupSchedule(derived.scaled_lr, derived.world_size,
                                        derived.warmup_steps, derived.total_steps,
                                        cfg.schedule, decay_every)
    optimizer = (tf.keras.optimizers.Adam(schedule) if cfg.optimizer == "adam"
                 else tf.keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True))
    optimizer = engine.distributed_optimizer(optimizer, cfg)
    if cfg.precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def build(cfg: TrainConfig, engine, records: data.Records, initial, derived: Derived):
    """(model, trained): the model checkpoints hold, and what `fit` trains: the same model, or
    with uint8 records the model behind `preprocess` in its graph. Compiled with the loss and
    the distributed optimizer; the same initial weights on every rank (one seed)."""
    tf.keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.xla:
        tf.config.optimizer.set_jit("autoclustering")
    tf.keras.mixed_precision.set_global_policy("float32" if cfg.precision == "fp32" else cfg.precision)
    manifest = records.manifest
    with engine.scope():
        model = models.build_model(cfg.model, cfg.image_size, manifest["num_classes"], initial)
        trained = (models.with_preprocessing(model, manifest["image_size"])
                   if data.preprocess_on_device(manifest) else model)
        trained.compile(optimizer=make_optimizer(cfg, engine, derived),
                        loss=make_loss(pos_weight(cfg, manifest)))
    return model, trained


def pos_weight(cfg: TrainConfig, manifest: dict) -> list[float] | None:
    """--class-weights manifest: the manifest's per-class positive weights, in class order."""
    return None if cfg.class_weights == "none" else [manifest["pos_weight"][c] for c in manifest["classes"]]


# ---------------------------------------------------------------- resume ---------------------
def resume_state(cfg: TrainConfig, engine, model, optimizer, run_dir: Path, derived: Derived) -> RunState:
    """The run state, and every rank on the chief's weights and optimizer state before the
    first step: with --resume restored from the newest complete checkpoint (resuming in mid-
    epoch skips the batches already trained), else the chief's fresh initial weights."""
    state = RunState(plateau=dict(schedules.PLATEAU_START))
    optimizer.build(model.trainable_variables)  # create the slots so they can be restored
    # Only the chief reads the checkpoint; the broadcasts below share it
    found = checkpoints.newest(run_dir / "checkpoints") if cfg.resume and engine.rank == 0 else None
    if found is not None:
        checkpoints.restore(model, found, optimizer)
        meta = checkpoints.read_meta(found)
        state = RunState(plateau=meta["plateau"], epoch=meta["epoch"], step=meta["step"],
                         best=meta["best_val_mean_auroc"], since_best=meta.get("since_best", 0),
                         resumed_from=str(found))
        same_epochs = (meta.get("steps_per_epoch"), meta.get("global_batch")) == \
            (derived.steps_per_epoch, derived.global_batch)
        done = meta["step"] - meta["epoch"] * derived.steps_per_epoch
        if same_epochs and 0 < done < derived.steps_per_epoch:
            state.skip_batches = done
        elif done:  # no checkpoint of ours ends an epoch unvalidated: the epochs changed
            print(f"warning: {found}: its epochs were {meta.get('steps_per_epoch')} steps of "
                  f"{meta.get('global_batch')}, now {derived.steps_per_epoch} of "
                  f"{derived.global_batch}: epoch {meta['epoch'] + 1} starts over",
                  file=sys.stderr, flush=True)
    state = engine.broadcast_object(state)  # counters from the chief
    schedules.live_schedule(optimizer).scale.assign(state.plateau["scale"])
    engine.broadcast_variables(model.variables + checkpoints.optimizer_variables(optimizer))
    return state


# ---------------------------------------------------------------- run log --------------------
def start_run_log(cfg: TrainConfig, engine, run_dir: Path, model, state: RunState, derived: Derived,
                  ranks: list[dict], on_device: bool) -> runlog.RunLogWriter:
    """The chief's config.json and the run log's start record: what runs where, and how."""
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | dataclasses.asdict(derived),
                                                    indent=1))
    writer = runlog.RunLogWriter(run_dir)
    recipe = recipes.RECIPES.get(cfg.recipe)
    writer.write("start", config=dataclasses.asdict(cfg), model=cfg.model, recipe=cfg.recipe,
                 recipe_version=recipe.version if recipe else None,
                 image_size=cfg.image_size, precision=cfg.precision,
                 engine=engine.name, backend=engine.backend(),
                 hostnames=sorted({r["host"] for r in ranks}), ranks=ranks,
                 slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                 resumed_from=state.resumed_from, initial_epoch=state.epoch,
                 initial_step=state.step, skipped_batches=state.skip_batches,
                 trainable_params=int(sum(v.shape.num_elements() for v in model.trainable_variables)),
                 synthetic_input=cfg.synthetic_input,
                 preprocess="model graph" if on_device else "input pipeline",
                 versions={"python": sys.version.split()[0], "tensorflow": tf.__version__,
                           **engine.versions()},
                 **dataclasses.asdict(derived))
    return writer


# ---------------------------------------------------------------- data -----------------------
def train_batches(cfg: TrainConfig, engine, records: data.Records, derived: Derived, threads: int,
                  start_epoch: int, epochs: int, skip: int = 0) -> tf.data.Dataset:
    """This rank's training batches for `epochs` epochs from `start_epoch` (the first `skip`
    batches of the first left out: a mid-epoch resume), as Keras' (x, y) with y packing label
    and mask ([B, 2, C], see `make_loss`)."""
    on_device = data.preprocess_on_device(records.manifest)
    if cfg.synthetic_input:
        ds = data.synthetic_dataset(cfg.image_size, cfg.batch_size, records.manifest["num_classes"],
                                    cfg.seed, records.manifest["image_size"] if on_device else None)
    else:
        ds = data.train_dataset(records, "train", cfg.image_size, cfg.batch_size,
                                rank=engine.rank, world_size=engine.size, seed=cfg.seed,
                                augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer,
                                deterministic=cfg.deterministic,
                                steps_per_epoch=derived.steps_per_epoch,
                                start_epoch=start_epoch, epochs=epochs, skip_batches=skip,
                                threads=threads)
    return ds.map(lambda x, y, m: (x, tf.stack([y, m], axis=1)))


def fit(cfg: TrainConfig, engine, trained, keras_callbacks: list, state: RunState,
        make_batches, steps: int) -> None:
    """Train to --epochs: the rest of an epoch a resumed run entered in mid-epoch, then whole
    epochs, unless a stop (preemption, early stopping) comes first."""

    def epochs(first: int, end: int, skip: int = 0) -> None:
        batches = engine.fit_input(lambda: make_batches(first, end - first, skip))
        trained.fit(batches, epochs=end, initial_epoch=first, steps_per_epoch=steps - skip,
                    callbacks=keras_callbacks,
                    verbose=progress_bar(cfg.verbose) if engine.rank == 0 else 0)

    first = state.epoch
    if state.skip_batches and first < cfg.epochs:
        epochs(first, first + 1, state.skip_batches)
        first += 1
    if first < cfg.epochs and not (state.preempted or state.stopped_early):
        epochs(first, cfg.epochs)


def progress_bar(verbose: int) -> int:
    """Keras' verbose: its bar only on a terminal; batch logs get our one line per epoch."""
    return int(verbose == 1 and sys.stdout.isatty())


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


def write_audit(run_dir: Path, engine, model, optimizer, cfg: TrainConfig, records: data.Records) -> None:
    """Per-rank evidence for tests: the records this rank read in epoch 1 (shard file, skip,
    take; records directories only), its final weights and optimizer state."""
    audit_weights(run_dir, engine.rank, model, optimizer=optimizer)
    shards = records.units("train")
    segments = None
    if not data.is_raw(records.manifest):
        _, (mine,) = next(sharding.train_plan([c for _, c in shards], engine.size, cfg.batch_size,
                                              cfg.seed, range(1), ranks=[engine.rank]))
        segments = [(shards[u][0], skip, take) for u, skip, take in mine]
    (run_dir / "audit" / f"rank{engine.rank}.json").write_text(
        json.dumps({"rank": engine.rank, "segments": segments}))


# ---------------------------------------------------------------- main -----------------------
def open_inputs(cfg: TrainConfig) -> data.Records:
    """The records, opened once and checked (bad input fails here, before the engine starts)."""
    records = data.open_records(cfg.data)
    for split in ("train", cfg.val_split):
        records.units(split)
    check_image_size(records.manifest, cfg.data, cfg.image_size)
    return records


def main(argv: list[str] | None = None) -> int:
    # --- setup: flags, inputs, the run directory ---
    words = recipes.asked(sys.argv[1:] if argv is None else argv)
    if words[:1] in (["list"], ["show"]):  # describe, train nothing
        print(recipes.listing() if words[0] == "list" else recipes.show(words[1] if words[1:] else ""))
        return 0
    cfg = config.parse(argv)
    config.check_config(cfg)
    cluster = distributed.workers_flag(cfg.engine, cfg.workers, cfg.worker_index)
    records = open_inputs(cfg)
    initial = weights.resolve(cfg.weights, cfg.model)  # from the cache: compute nodes never download
    run_dir = cli.make_dir(cfg.run_dir)
    stop = StopRequest()

    # --- the distribution engine ---
    if cfg.xla:  # auto-clustering leaves CPU ops alone unless the CPU's global JIT is on too
        os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_cpu_global_jit".strip()
    engine, placement = distributed.start(cfg.engine, cfg.threads, cluster)
    rank0 = engine.rank == 0  # the chief writes files
    derived = config.derive(cfg, records.manifest, engine.size)
    ranks = engine.allgather_object(dataclasses.asdict(placement))  # where each rank runs
    writer = None  # opened with the start record: a run that fails before it leaves no log

    try:
        # --- model, optimizer, resume ---
        model, trained = build(cfg, engine, records, initial, derived)
        state = resume_state(cfg, engine, model, trained.optimizer, run_dir, derived)
        if cfg.audit:
            audit_weights(run_dir, engine.rank, model, "-initial")
        if rank0:
            writer = start_run_log(cfg, engine, run_dir, model, state, derived, ranks,
                                   data.preprocess_on_device(records.manifest))

        # --- data and callbacks ---
        validation = callbacks.Validation(
            state, data.eval_dataset(records, cfg.val_split, cfg.image_size, cfg.val_batch_size,
                                     rank=engine.rank, world_size=engine.size, threads=placement.threads),
            records.manifest["classes"], pos_weight(cfg, records.manifest), engine.predictor(model), engine)
        saver = checkpoints.Saver(model, trained.optimizer, run_dir / "checkpoints", cfg.keep_checkpoints,
                                  chief=rank0, meta=lambda epochs_done: checkpoints.run_meta(
                                      cfg, records.manifest, derived, state, epochs_done))
        keras_callbacks = callbacks.make_callbacks(cfg, engine, state, derived, stop, validation,
                                                   saver, writer)

        # --- fit ---
        fit(cfg, engine, trained, keras_callbacks, state, steps=derived.steps_per_epoch,
            make_batches=lambda first, epochs, skip: train_batches(
                cfg, engine, records, derived, placement.threads, first, epochs, skip))

        # --- the end: preempted (checkpoint, exit 75) or completed ---
        if state.preempted:
            if engine.saves_here:  # the chief writes the preemption checkpoint (see Saver)
                saver(f"step-{state.step:09d}", state.epoch)
            if rank0:
                writer.write("end", status="preempted", step=state.step, epoch=state.epoch)
            engine.broadcast_object(0)  # nobody exits before the checkpoint
            print(f"rank {engine.rank}: preempted after step {state.step}; checkpoint written, "
                  f"exiting {cli.EXIT_PREEMPTED}", file=sys.stderr, flush=True)
            return cli.EXIT_PREEMPTED
        if cfg.audit:
            write_audit(run_dir, engine, model, trained.optimizer, cfg, records)
    except BaseException as err:
        if writer:
            writer.write("end", status="failed", error=f"{type(err).__name__}: {err}")
        raise
    if writer:
        writer.write("end", status="completed")
        writer.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
