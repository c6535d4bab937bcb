"""Train a chest X-ray classifier on 1..N ranks (GPUs or CPU processes), with Horovod or
TensorFlow's own MultiWorkerMirroredStrategy (--engine tf) carrying the gradients.

    horovodrun -np 4 python -m chexnet_hvd.train --data RECORDS --run-dir runs/x --model densenet121
    python -m chexnet_hvd.launch -np 4 python -m chexnet_hvd.train --engine tf ...
    python -m chexnet_hvd.train ...            # no launcher: a world of size 1

Rank 0 writes RUN_DIR/config.json, RUN_DIR/runlog.jsonl and RUN_DIR/checkpoints/; every rank
computes the same validation AUROC from predictions gathered over all ranks. On SIGTERM or
SIGUSR1 all ranks stop after the same step, rank 0 writes a checkpoint, and the job exits 75
(EX_TEMPFAIL) so a requeued job continues with --resume.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from chexnet_hvd import cli, distributed

PRECISIONS = ["fp32", "mixed_float16", "mixed_bfloat16"]


@dataclasses.dataclass
class TrainConfig:
    data: str = cli.field(help="records directory (has manifest.json)")
    run_dir: str = cli.field(help="where config.json, runlog.jsonl and checkpoints/ go")
    recipe: str = cli.field("none", help="named settings that the other flags override: "
                            "--recipe list, --recipe show NAME (chexnet_hvd/recipes.py)")
    model: str = cli.field("densenet121", help="densenet121 | resnet50 | resnet59 | small_cnn | "
                       "nas-<8 digits> (an architecture of chexnet_hvd.nas.space)")
    image_size: int = cli.field(224, help="model input side in pixels")
    batch_size: int = cli.field(16, help="images per rank per step (global batch = this x ranks)")
    epochs: int = cli.field(3, help="epochs to train (in total, counting resumed ones)")
    steps_per_epoch: int = cli.field(0, help="0: every full global batch of the training split "
                                     "(fewer than one global batch is left out, another each epoch)")
    optimizer: str = cli.field("adam", help="Adam (CheXNet) or SGD with Nesterov momentum 0.9",
                               choices=["adam", "sgd"])
    lr: float = cli.field(1e-3, help="base learning rate at --reference-batch (CheXNet: Adam 1e-3 at 16)")
    reference_batch: int = cli.field(16, help="lr = lr x global_batch / reference_batch (Goyal "
                                     "et al. 2017); 0: lr as given, not scaled (and, with "
                                     "--warmup-epochs -1, no warmup)")
    warmup_epochs: float = cli.field(-1.0, help="linear warmup from lr/world_size to the scaled lr; "
                                     "-1: proportional to the global batch, global_batch / "
                                     "reference_batch / 8 epochs, at most 5 (SURFsara's recipe)")
    schedule: str = cli.field("constant", help="lr after warmup: constant, cosine to zero, step "
                              "(x0.1 every --step-epochs), or plateau (x --plateau-factor after "
                              "--plateau-patience epochs without a better val mean AUROC)",
                              choices=["constant", "cosine", "step", "plateau"])
    step_epochs: int = cli.field(10, help="epochs between x0.1 decays of --schedule step")
    plateau_patience: int = cli.field(1, help="--schedule plateau: epochs without improvement "
                                      "before the lr drops (CheXNet: 1)")
    plateau_factor: float = cli.field(0.1, help="--schedule plateau: lr multiplier per drop")
    class_weights: str = cli.field("none", help="manifest: weighted BCE with the manifest's "
                                   "per-class positive weights (CheXNet)", choices=["none", "manifest"])
    precision: str = cli.field("fp32", help="Keras mixed-precision policy; mixed_float16 adds "
                               "dynamic loss scaling", choices=PRECISIONS)
    xla: bool = cli.field(False, help="XLA auto-clustering (the engine's collectives stay outside XLA)")
    engine: str = cli.field(distributed.DEFAULT_ENGINE, help="what carries the gradients between "
                            "ranks: Horovod (horovodrun, mpirun, srun --mpi=pmix) or TensorFlow's "
                            "MultiWorkerMirroredStrategy (chexnet_hvd.launch, srun, TF_CONFIG); "
                            "default: $CHEXNET_ENGINE, else horovod where installed, else tf",
                            choices=["horovod", "tf"])
    workers: str = cli.field("", help="--engine tf with no launcher: every worker as host:port in "
                             "rank order, the same list on each (in place of TF_CONFIG)")
    worker_index: int = cli.field(0, help="with --workers: this process' place in that list, from 0")
    fp16_allreduce: bool = cli.field(False, help="compress gradients to fp16 for the allreduce "
                                     "(Horovod only)")
    backward_passes_per_step: int = cli.field(1, help="accumulate gradients of N batches per "
                                              "allreduce (large inputs, small batches; Horovod only)")
    weights: str = cli.field("none", help="none, imagenet (from the cache `python -m "
                             "chexnet_hvd.weights fetch` fills; nothing is downloaded here), or "
                             "a weights file")
    seed: int = cli.field(0, help="seed of weights, shuffles and augmentation")
    augment: bool = cli.field(True, help="random horizontal flips")
    synthetic_input: bool = cli.field(False, help="train on one random in-memory batch, repeated "
                                      "(benchmarks: the trainer without its input pipeline)")
    shuffle_buffer: int = cli.field(2048, help="record shuffle buffer per rank")
    deterministic: bool = cli.field(False, help="deterministic input order and ops (slower)")
    val_split: str = cli.field("val", help="split validated after every epoch")
    val_batch_size: int = cli.field(64, help="images per rank per validation step")
    early_stopping: int = cli.field(0, help="stop after N epochs without a better val mean AUROC (0: off)")
    resume: bool = cli.field(False, help="continue from the newest complete checkpoint in RUN_DIR")
    checkpoint_every_steps: int = cli.field(0, help="also checkpoint every N steps (0: per epoch only)")
    stop_check_steps: int = cli.field(10, help="the ranks agree on a stop request (SIGTERM, "
                                      "SIGUSR1) every N steps: a collective, so not every step")
    preempt_at_step: int = cli.field(0, help="act as if SIGUSR1 arrived at this step (the ranks "
                                     "stop at their next agreement): rehearse preemption, "
                                     "checkpoint and --resume (0: off)")
    keep_checkpoints: int = cli.field(3, help="how many of the newest epoch checkpoints to keep")
    threads: int = cli.field(0, help="CPU threads per rank for TF ops; 0: from the CPUs this rank "
                             "may run on (all of them when bound, else a share per local rank)")
    timing_warmup_steps: int = cli.field(3, help="steps at the start of each epoch left out of img/s")
    tensorboard: bool = cli.field(True, help="rank 0 writes each epoch's train loss, lr, img/s, "
                                  "val loss and per-class and mean AUROC as TensorBoard scalars "
                                  "to RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`)")
    profile_steps: str = cli.field("", help="A,B: a TensorFlow profiler trace of rank 0's steps "
                                   "A..B (the run's step numbers, as in the run log, from 1) "
                                   "into RUN_DIR/tensorboard/profile")
    audit: bool = cli.field(False, help="each rank writes RUN_DIR/audit/rank<N>.json + .npz "
                            "(the records it read in epoch 1, its initial and final weights) and "
                            "rank<N>-optimizer.npz (its final optimizer state), for tests")
    verbose: int = cli.field(1, help="rank 0's output: 0 silent; 1 one line per epoch, plus "
                             "Keras' progress bar when stdout is a terminal; 2 one line per "
                             "epoch only", choices=[0, 1, 2])


def recipe_defaults(name: str) -> dict:
    """A recipe's trainer settings ('none': no recipe, none)."""
    from chexnet_hvd import recipes

    return recipes.get(name).train if name != "none" else {}


def parse(argv: list[str] | None = None) -> TrainConfig:
    """The trainer's config: a --recipe's settings, overridden by the flags given. argparse
    finds the recipe (the last --recipe, abbreviations too), then parses again over it."""
    parser = cli.build_parser(TrainConfig, __doc__.splitlines()[0])
    name = parser.parse_known_args(argv)[0].recipe
    parser.set_defaults(**recipe_defaults(name))
    return TrainConfig(**vars(parser.parse_args(argv)))


def argv_of(cfg: TrainConfig) -> list[str]:
    """The flags that `parse` turns back into `cfg` (its recipe's settings left implicit)."""
    return cli.to_argv(cfg, defaults=recipe_defaults(cfg.recipe))


def command(cfg: TrainConfig, python: str = sys.executable) -> list[str]:
    """The trainer's command line for `cfg`: what the NAS worker, the GPU check, the benchmarks
    and the tests start (a launcher goes in front)."""
    return [python, "-m", "chexnet_hvd.train", *argv_of(cfg)]


# ---------------------------------------------------------------- derived values -------------
def derive(cfg: TrainConfig, manifest: dict, world_size: int) -> dict:
    """Every number computed from the config in one place, logged at start."""
    from chexnet_hvd import sharding

    records_total = manifest["splits"]["train"]["count"]
    global_batch = cfg.batch_size * world_size
    full = sharding.steps_per_epoch(records_total, world_size, cfg.batch_size)
    if full < 1:
        raise cli.InputError("--batch-size", f"{cfg.batch_size} per rank x {world_size} ranks is more "
                             f"than the {records_total} training records")
    if cfg.steps_per_epoch > full and not cfg.synthetic_input:
        raise cli.InputError("--steps-per-epoch", f"{cfg.steps_per_epoch} is more than the {full} "
                             f"global batches of {global_batch} the training split holds")
    steps = cfg.steps_per_epoch or full
    ratio = global_batch / cfg.reference_batch if cfg.reference_batch else 1.0
    proportional = min(5.0, ratio / 8) if cfg.reference_batch else 0.0  # unscaled: no warmup
    warmup_epochs = cfg.warmup_epochs if cfg.warmup_epochs >= 0 else proportional
    return {
        "world_size": world_size,
        "local_batch": cfg.batch_size,
        "global_batch": global_batch,
        "steps_per_epoch": steps,
        "scaled_lr": cfg.lr * ratio,
        "warmup_epochs": warmup_epochs,
        "warmup_steps": int(round(warmup_epochs * steps)),
        "total_steps": steps * cfg.epochs,
        "train_records": records_total,
        "records_per_rank": full * cfg.batch_size,  # every rank the same (chexnet_hvd.sharding)
        "epoch_coverage": round(steps * global_batch / records_total, 6),
    }


def make_optimizer(cfg: TrainConfig, engine, derived: dict):
    """Adam or SGD over the warmup schedule, made distributed by the engine; for fp16, Keras'
    dynamic loss scaling wraps it from outside (Horovod 0.28.1 cannot rebuild a LossScaleOptimizer
    from inside). The scaled gradients are allreduced before the finiteness check, and an
    overflow on any rank makes the sum non-finite on every rank, so all ranks skip the same steps
    and halve the loss scale alike (tested with an overflow on one rank only, both engines)."""
    import tensorflow as tf

    from chexnet_hvd import schedules

    decay_every = cfg.step_epochs * derived["steps_per_epoch"] if cfg.schedule == "step" else 0
    schedule = schedules.WarmupSchedule(derived["scaled_lr"], derived["world_size"],
                                        derived["warmup_steps"], derived["total_steps"],
                                        cfg.schedule, decay_every)
    optimizer = (tf.keras.optimizers.Adam(schedule) if cfg.optimizer == "adam"
                 else tf.keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True))
    optimizer = engine.distributed_optimizer(optimizer, cfg)
    if cfg.precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def profile_range(steps: str) -> tuple[int, int]:
    """--profile-steps 'A,B' (or 'A') -> (A, B)."""
    first, _, last = steps.partition(",")
    return int(first), int(last or first)


def check_config(cfg: TrainConfig) -> None:
    """Flag combinations that cannot work, refused before anything starts."""
    for flag in ("backward_passes_per_step", "stop_check_steps", "batch_size", "image_size"):
        if getattr(cfg, flag) < 1:
            raise cli.InputError(f"--{flag.replace('_', '-')}", "must be at least 1")
    if cfg.profile_steps and not (re.fullmatch(r"[1-9]\d*(,[1-9]\d*)?", cfg.profile_steps)
                                  and operator.le(*profile_range(cfg.profile_steps))):
        raise cli.InputError("--profile-steps", f"{cfg.profile_steps!r}: give A,B, the first and "
                             "last step to trace (from 1, A <= B)")
    refused = distributed.engine_class(cfg.engine).refuses(cfg)
    if refused:
        flag, why = refused
        raise cli.InputError(flag, f"{why} (--engine {cfg.engine})")
    if cfg.reference_batch < 0:
        raise cli.InputError("--reference-batch", "must be 0 (no scaling) or more")
    if cfg.backward_passes_per_step > 1 and cfg.precision == "mixed_float16":
        # Horovod accumulates the passes locally and allreduces only every Nth: an overflow in
        # a local pass would make one rank skip while the others apply, and the loss scale differ.
        raise cli.InputError("--backward-passes-per-step", "cannot be combined with --precision "
                             "mixed_float16 (ranks would skip different steps); use fp32 or "
                             "mixed_bfloat16, which need no loss scaling")


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


# ---------------------------------------------------------------- loss -----------------------
def make_loss(pos_weight=None):
    """Keras' view of `metrics.masked_bce`, the suite's one loss: y packs (label, mask) as
    [B, 2, C]; the batch's mean over its unmasked entries (validation: the split's)."""
    from chexnet_hvd import metrics

    def loss(y, prob):
        return metrics.masked_bce(y[:, 0], prob, y[:, 1], pos_weight)

    return loss


# ---------------------------------------------------------------- checkpoints ----------------
def checkpoint_meta(cfg: TrainConfig, manifest: dict, derived: dict, state,
                    epochs_done: int) -> dict:
    """What a checkpoint's meta.json records: enough to rebuild the model and resume the run
    exactly (step, epoch, the plateau and early-stopping counts, the epoch's length)."""
    from chexnet_hvd import checkpoints

    return checkpoints.meta_record(
        model=cfg.model, image_size=cfg.image_size, classes=manifest["classes"],
        num_classes=manifest["num_classes"], epoch=epochs_done, step=state.step,
        steps_per_epoch=derived["steps_per_epoch"], global_batch=derived["global_batch"],
        precision=cfg.precision, val_mean_auroc=state.validation.get("mean_auroc"),
        best_val_mean_auroc=state.best, since_best=state.since_best, plateau=state.plateau,
        config=dataclasses.asdict(cfg))


def resume_state(cfg: TrainConfig, engine, model, optimizer, run_dir: Path, derived: dict):
    """The run state, and every rank on the chief's weights and optimizer state before the
    first step: with --resume restored from the newest complete checkpoint (resuming in mid-
    epoch skips the batches already trained), else the chief's fresh initial weights."""
    from chexnet_hvd import checkpoints, schedules
    from chexnet_hvd.callbacks import RunState

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
            (derived["steps_per_epoch"], derived["global_batch"])
        done = meta["step"] - meta["epoch"] * derived["steps_per_epoch"]
        if same_epochs and 0 < done < derived["steps_per_epoch"]:
            state.skip_batches = done
        elif done:  # no checkpoint of ours ends an epoch unvalidated: the epochs changed
            print(f"warning: {found}: its epochs were {meta.get('steps_per_epoch')} steps of "
                  f"{meta.get('global_batch')}, now {derived['steps_per_epoch']} of "
                  f"{derived['global_batch']}: epoch {meta['epoch'] + 1} starts over",
                  file=sys.stderr, flush=True)
    state = engine.broadcast_object(state)  # counters from the chief
    schedules.live_schedule(optimizer).scale.assign(state.plateau["scale"])
    engine.broadcast_variables(model.variables + optimizer_variables(optimizer))
    return state


def optimizer_variables(optimizer) -> list:
    """Every variable of the optimizer's checkpoint, in a fixed order: its step and slots, and
    under mixed_float16 the loss scale and its count of good steps (which `optimizer.variables`
    leaves out: broadcasting only those left the other ranks on a fresh loss scale at resume)."""
    import tensorflow as tf

    found = {id(t): t for t in tf.train.TrackableView(optimizer).descendants() if isinstance(t, tf.Variable)}
    return list(found.values())


def progress_bar(verbose: int) -> int:
    """Keras' verbose: its bar only on a terminal; batch logs get our one line per epoch."""
    return int(verbose == 1 and sys.stdout.isatty())


def audit_weights(run_dir: Path, rank: int, model, suffix: str = "", optimizer=None) -> None:
    """--audit: this rank's weights as RUN_DIR/audit/rank<N><suffix>.npz (and its optimizer's
    state as rank<N><suffix>-optimizer.npz)."""
    import numpy as np

    audit = run_dir / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    np.savez(audit / f"rank{rank}{suffix}.npz", *model.get_weights())
    if optimizer is not None:
        np.savez(audit / f"rank{rank}{suffix}-optimizer.npz", *(v.numpy() for v in optimizer_variables(optimizer)))


def write_audit(run_dir: Path, engine, model, optimizer, cfg) -> None:
    """Per-rank evidence for tests: the records this rank read in epoch 1 (shard file, skip,
    take; records directories only), its final weights and optimizer state."""
    from chexnet_hvd import data, records, sharding

    audit_weights(run_dir, engine.rank, model, optimizer=optimizer)
    manifest = records.load_manifest(cfg.data)
    shards = records.split_shards(manifest, cfg.data, "train")
    segments = None
    if not data.is_raw(manifest):
        _, (mine,) = next(sharding.train_plan([c for _, c in shards], engine.size, cfg.batch_size,
                                              cfg.seed, range(1), ranks=[engine.rank]))
        segments = [(shards[u][0], skip, take) for u, skip, take in mine]
    (run_dir / "audit" / f"rank{engine.rank}.json").write_text(
        json.dumps({"rank": engine.rank, "segments": segments}))


# ---------------------------------------------------------------- main -----------------------
def main(argv: list[str] | None = None) -> int:
    from chexnet_hvd import recipes, weights

    words = recipes.asked(sys.argv[1:] if argv is None else argv)
    if words[:1] in (["list"], ["show"]):  # describe, train nothing
        print(recipes.listing() if words[0] == "list" else recipes.show(words[1] if words[1:] else ""))
        return 0
    cfg = parse(argv)
    check_config(cfg)
    cluster = distributed.workers_flag(cfg.engine, cfg.workers, cfg.worker_index)
    from chexnet_hvd import records

    manifest = records.load_manifest(cfg.data)  # bad input fails here, before the engine starts
    for split in ("train", cfg.val_split):
        records.split_shards(manifest, cfg.data, split)
    records.check_image_size(manifest, cfg.data, cfg.image_size)
    initial = weights.resolve(cfg.weights, cfg.model)  # from the cache: compute nodes never download
    run_dir = cli.make_dir(cfg.run_dir)
    stop = StopRequest()

    # --- setup + the distribution engine ---
    if cfg.xla:  # auto-clustering leaves CPU ops alone unless the CPU's global JIT is on too
        os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_cpu_global_jit".strip()
    engine, placement = distributed.start(cfg.engine, cfg.threads, cluster)
    import tensorflow as tf

    from chexnet_hvd import callbacks, checkpoints, data, models, runlog

    rank0 = engine.rank == 0  # the chief writes files
    derived = derive(cfg, manifest, engine.size)
    ranks = engine.allgather_object(dataclasses.asdict(placement))  # where each rank runs
    writer = None  # opened with the start record: a run that fails before it leaves no log

    try:
        # --- model + optimizer ---
        tf.keras.utils.set_random_seed(cfg.seed)  # same initial weights on every rank
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        if cfg.xla:
            tf.config.optimizer.set_jit("autoclustering")
        tf.keras.mixed_precision.set_global_policy("float32" if cfg.precision == "fp32" else cfg.precision)
        on_device = data.preprocess_on_device(manifest)  # uint8 records: preprocess in the graph
        pos_weight = (None if cfg.class_weights == "none"
                      else [manifest["pos_weight"][c] for c in manifest["classes"]])
        with engine.scope():
            model = models.build_model(cfg.model, cfg.image_size, manifest["num_classes"], initial)
            trained = models.with_preprocessing(model, manifest["image_size"]) if on_device else model
            trained.compile(optimizer=make_optimizer(cfg, engine, derived), loss=make_loss(pos_weight))
            state = resume_state(cfg, engine, model, trained.optimizer, run_dir, derived)
        if cfg.audit:
            audit_weights(run_dir, engine.rank, model, "-initial")
        if rank0:  # the chief writes the config and the run log
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | derived, indent=1))
            writer = runlog.RunLogWriter(run_dir)
            writer.write("start", config=dataclasses.asdict(cfg), model=cfg.model,
                         recipe=cfg.recipe, recipe_version=recipes.RECIPES[cfg.recipe].version
                         if cfg.recipe in recipes.RECIPES else None,
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
                         **derived)

        # --- data ---
        def train_data(start_epoch: int, epochs: int, skip: int = 0):  # this rank's batches
            if cfg.synthetic_input:
                ds = data.synthetic_dataset(cfg.image_size, cfg.batch_size, manifest["num_classes"],
                                            cfg.seed, manifest["image_size"] if on_device else None)
            else:
                ds = data.train_dataset(cfg.data, "train", cfg.image_size, cfg.batch_size,
                                        rank=engine.rank, world_size=engine.size, seed=cfg.seed,
                                        augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer,
                                        deterministic=cfg.deterministic,
                                        steps_per_epoch=derived["steps_per_epoch"],
                                        start_epoch=start_epoch, epochs=epochs, skip_batches=skip,
                                        threads=placement.threads)
            return ds.map(lambda x, y, m: (x, tf.stack([y, m], axis=1)))

        # --- callbacks ---
        def save(name: str, epochs_done: int) -> Path | None:
            """The chief's checkpoint; with an engine whose variable reads are collectives,
            the other ranks write alongside into a scratch directory they then delete."""
            meta = checkpoint_meta(cfg, manifest, derived, state, epochs_done)
            if not rank0:
                with tempfile.TemporaryDirectory() as scratch:
                    checkpoints.save(model, Path(scratch), name, meta, trained.optimizer)
                return None
            path = checkpoints.save(model, run_dir / "checkpoints", name, meta, trained.optimizer)
            checkpoints.prune(run_dir / "checkpoints", cfg.keep_checkpoints)
            return path

        steps = derived["steps_per_epoch"]
        keras_callbacks = callbacks.make_callbacks(cfg, engine, state, stop, derived, manifest["classes"],
                                                   pos_weight, save, writer, engine.predictor(model),
                                                   placement.threads)

        # --- fit: the rest of an epoch a resumed run entered in mid-epoch, then whole epochs ---
        def fit(start_epoch: int, end_epoch: int, skip: int = 0) -> None:
            batches = engine.fit_input(lambda: train_data(start_epoch, end_epoch - start_epoch, skip))
            trained.fit(batches, epochs=end_epoch,
                        initial_epoch=start_epoch, steps_per_epoch=steps - skip,
                        callbacks=keras_callbacks, verbose=progress_bar(cfg.verbose) if rank0 else 0)

        start = state.epoch
        if state.skip_batches and start < cfg.epochs:
            fit(start, start + 1, state.skip_batches)
            start += 1
        if start < cfg.epochs and not (state.preempted or state.stopped_early):
            fit(start, cfg.epochs)

        # --- the end: preempted (checkpoint, exit 75) or completed ---
        if state.preempted:
            if engine.saves_here:  # the chief writes the preemption checkpoint (see `save`)
                save(f"step-{state.step:09d}", state.epoch)
            if rank0:
                writer.write("end", status="preempted", step=state.step, epoch=state.epoch)
            engine.broadcast_object(0)  # nobody exits before the checkpoint
            print(f"rank {engine.rank}: preempted after step {state.step}; checkpoint written, "
                  f"exiting {cli.EXIT_PREEMPTED}", file=sys.stderr, flush=True)
            return cli.EXIT_PREEMPTED
        if cfg.audit:
            write_audit(run_dir, engine, model, trained.optimizer, cfg)
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
