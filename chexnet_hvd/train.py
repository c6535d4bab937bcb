"""Train a chest X-ray classifier with Horovod on 1..N ranks (GPUs or CPU processes).

    horovodrun -np 4 python -m chexnet_hvd.train --data RECORDS --run-dir runs/x --model densenet121
    python -m chexnet_hvd.train ...            # no launcher: a world of size 1

Rank 0 writes RUN_DIR/config.json, RUN_DIR/runlog.jsonl and RUN_DIR/checkpoints/; every rank
computes the same validation AUROC from predictions gathered over all ranks. On SIGTERM or
SIGUSR1 all ranks stop after the same step, rank 0 writes a checkpoint, and the job exits 75
(EX_TEMPFAIL) so a requeued job continues with --resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from chexnet_hvd import cli

PRECISIONS = ["fp32", "mixed_float16", "mixed_bfloat16"]
PLATEAU_MIN_SCALE = 1e-4  # reduce-on-plateau never takes the lr below 1e-4 x the scaled lr


@dataclasses.dataclass
class TrainConfig:
    data: str = cli.field(help="records directory (has manifest.json)")
    run_dir: str = cli.field(help="where config.json, runlog.jsonl and checkpoints/ go")
    model: str = cli.field("densenet121", help="densenet121 | resnet50 | resnet59 | small_cnn | "
                       "nas-<8 digits> (an architecture of chexnet_hvd.nas.space)")
    image_size: int = cli.field(224, help="model input side in pixels")
    batch_size: int = cli.field(16, help="images per rank per step (global batch = this x ranks)")
    epochs: int = cli.field(3, help="epochs to train (in total, counting resumed ones)")
    steps_per_epoch: int = cli.field(0, help="0: one pass over the smallest rank's share")
    optimizer: str = cli.field("adam", help="Adam (CheXNet) or SGD with Nesterov momentum 0.9",
                               choices=["adam", "sgd"])
    lr: float = cli.field(1e-3, help="base learning rate at --reference-batch (CheXNet: Adam 1e-3 at 16)")
    reference_batch: int = cli.field(16, help="lr = lr x global_batch / reference_batch (Goyal et al. 2017)")
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
    xla: bool = cli.field(False, help="XLA auto-clustering (Horovod's collectives stay outside XLA)")
    fp16_allreduce: bool = cli.field(False, help="compress gradients to fp16 for the allreduce")
    backward_passes_per_step: int = cli.field(1, help="accumulate gradients of N batches per "
                                              "allreduce (large inputs, small batches)")
    weights: str = cli.field("none", help="none or a local weights file (nothing is downloaded)")
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
    keep_checkpoints: int = cli.field(3, help="how many of the newest epoch checkpoints to keep")
    threads: int = cli.field(0, help="CPU threads per rank for TF ops; 0: cores / local ranks")
    timing_warmup_steps: int = cli.field(3, help="steps at the start of each epoch left out of img/s")
    audit: bool = cli.field(False, help="each rank writes RUN_DIR/audit/rank<N>.json + .npz "
                            "(its shard files and final weights), for tests")
    verbose: int = cli.field(1, help="rank 0's output: 0 silent; 1 one line per epoch, plus "
                             "Keras' progress bar when stdout is a terminal; 2 one line per "
                             "epoch only", choices=[0, 1, 2])


# ---------------------------------------------------------------- derived values -------------
def derive(cfg: TrainConfig, manifest: dict, world_size: int) -> dict:
    """Every number computed from the config in one place, logged at start."""
    from chexnet_hvd import data, records

    shards = records.split_shards(manifest, cfg.data, "train")
    global_batch = cfg.batch_size * world_size
    per_rank = data.records_per_rank(shards, world_size)
    steps = cfg.steps_per_epoch or min(per_rank) // cfg.batch_size
    if steps < 1:
        raise cli.InputError("--batch-size", f"{cfg.batch_size} per rank x {world_size} ranks is more "
                             f"than the {min(per_rank)} training records of the smallest rank's share")
    ratio = global_batch / cfg.reference_batch
    warmup_epochs = cfg.warmup_epochs if cfg.warmup_epochs >= 0 else min(5.0, ratio / 8)
    return {
        "world_size": world_size,
        "local_batch": cfg.batch_size,
        "global_batch": global_batch,
        "steps_per_epoch": steps,
        "scaled_lr": cfg.lr * ratio,
        "warmup_epochs": warmup_epochs,
        "warmup_steps": int(round(warmup_epochs * steps)),
        "total_steps": steps * cfg.epochs,
        "train_records": manifest["splits"]["train"]["count"],
        "records_per_rank": per_rank,
    }


def make_optimizer(cfg: TrainConfig, hvd, derived: dict):
    """Adam or SGD over the warmup schedule, in Horovod's DistributedOptimizer; for fp16, Keras'
    dynamic loss scaling wraps it from outside (Horovod 0.28.1 cannot rebuild a LossScaleOptimizer
    from inside). The scaled gradients are allreduced before the finiteness check, and an
    overflow on any rank makes the sum non-finite on every rank, so all ranks skip the same steps
    and halve the loss scale alike (tested with an overflow on one rank only)."""
    import tensorflow as tf

    from chexnet_hvd import schedules

    decay_every = cfg.step_epochs * derived["steps_per_epoch"] if cfg.schedule == "step" else 0
    schedule = schedules.WarmupSchedule(derived["scaled_lr"], derived["world_size"],
                                        derived["warmup_steps"], derived["total_steps"],
                                        cfg.schedule, decay_every)
    optimizer = (tf.keras.optimizers.Adam(schedule) if cfg.optimizer == "adam"
                 else tf.keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True))
    optimizer = hvd.DistributedOptimizer(  # Horovod: allreduce the gradients
        optimizer, backward_passes_per_step=cfg.backward_passes_per_step,
        compression=hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none)
    if cfg.precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def check_config(cfg: TrainConfig) -> None:
    """Flag combinations that cannot work, refused before anything starts."""
    if cfg.backward_passes_per_step < 1:
        raise cli.InputError("--backward-passes-per-step", "must be at least 1")
    if cfg.backward_passes_per_step > 1 and cfg.precision == "mixed_float16":
        # Horovod accumulates the passes locally and allreduces only every Nth: an overflow in
        # a local pass would make one rank skip while the others apply, and the loss scale differ.
        raise cli.InputError("--backward-passes-per-step", "cannot be combined with --precision "
                             "mixed_float16 (ranks would skip different steps); use fp32 or "
                             "mixed_bfloat16, which need no loss scaling")


# ---------------------------------------------------------------- loss -----------------------
def masked_bce(pos_weight=None):
    """Binary cross-entropy over unmasked entries; y packs (label, mask) as [B, 2, C].
    With pos_weight, a positive of class c counts pos_weight[c] times (CheXNet's weighted loss)."""
    import tensorflow as tf

    def loss(y, prob):
        label, mask = y[:, 0], y[:, 1]
        prob = tf.clip_by_value(tf.cast(prob, tf.float32), 1e-7, 1 - 1e-7)
        w = 1.0 if pos_weight is None else tf.constant(pos_weight, tf.float32)
        bce = -(w * label * tf.math.log(prob) + (1 - label) * tf.math.log(1 - prob))
        return tf.reduce_sum(bce * mask, -1) / tf.maximum(tf.reduce_sum(mask, -1), 1.0)

    return loss


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


# ---------------------------------------------------------------- callbacks ------------------
def make_callbacks(cfg, hvd, model, derived, manifest, run_dir, writer, stop, state):
    """Horovod's canonical order: broadcast, metric average, then our all-rank callbacks
    (preemption agreement, validation, early stopping), then the rank-0 writers."""
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    from chexnet_hvd import checkpoints, data, metrics, schedules

    names = manifest["classes"]
    ckpt_dir = run_dir / "checkpoints"

    def meta(epochs_done: int, val_mean_auroc=None) -> dict:
        return checkpoint_meta(cfg, manifest, model, epochs_done, state["best"], state["plateau"],
                               val_mean_auroc)

    class Preemption(tf.keras.callbacks.Callback):
        """All ranks agree (allreduce max of the flag) after every step; then stop together."""

        def on_epoch_begin(self, epoch, logs=None):
            state["epoch"] = epoch

        def on_train_batch_end(self, batch, logs=None):
            flag = tf.constant(1.0 if stop.requested else 0.0)
            if float(hvd_tf.allreduce(flag, op=hvd_tf.Max, name="stop_request")) > 0:
                state["preempted"] = True
                self.model.stop_training = True
            elif hvd.rank() == 0 and cfg.checkpoint_every_steps:
                step = int(model.optimizer.iterations.numpy())
                if step % cfg.checkpoint_every_steps == 0:
                    checkpoints.save(model, ckpt_dir, f"step-{step:09d}", meta(state["epoch"]))
                    checkpoints.prune(ckpt_dir, cfg.keep_checkpoints)

    class Validation(tf.keras.callbacks.Callback):
        """Predict this rank's part of the split, gather all ranks, score over the whole split."""

        def __init__(self):
            super().__init__()
            self.dataset = data.eval_dataset(cfg.data, cfg.val_split, cfg.image_size,
                                             cfg.val_batch_size, hvd.rank(), hvd.size())
            self.result: dict = {}

        def on_epoch_end(self, epoch, logs=None):
            if state["preempted"]:
                return
            t0, batches = time.perf_counter(), []

            def predict(images):
                batches.append(len(images))
                return self.model.predict_on_batch(images)

            merged = metrics.gather(data.predictions(predict, self.dataset))
            self.result = metrics.summarize(merged["label"], merged["prob"], merged["mask"], names)
            self.result |= {"seconds": round(time.perf_counter() - t0, 3), "batches": len(batches)}
            logs["val_loss"] = self.result["loss"]
            logs["val_mean_auroc"] = self.result["mean_auroc"] or 0.0

    class Plateau(tf.keras.callbacks.Callback):
        """Every rank takes the same decision from the same gathered AUROC, so no broadcast."""

        def on_epoch_end(self, epoch, logs=None):
            if state["preempted"]:
                return
            state["plateau"] = schedules.plateau_update(
                state["plateau"], validation.result.get("mean_auroc"), cfg.plateau_patience,
                cfg.plateau_factor, PLATEAU_MIN_SCALE)
            schedules.live_schedule(model.optimizer).scale.assign(state["plateau"]["scale"])

    class Checkpoint(tf.keras.callbacks.Callback):
        """Rank 0: the epoch's checkpoint, and a copy as best/ when the val mean AUROC improved."""

        def on_epoch_end(self, epoch, logs=None):
            if state["preempted"]:
                return
            auroc = validation.result.get("mean_auroc")
            improved = auroc is not None and (state["best"] is None or auroc > state["best"])
            state["best"] = auroc if improved else state["best"]
            path = checkpoints.save(model, ckpt_dir, f"epoch-{epoch + 1:04d}", meta(epoch + 1, auroc))
            if improved:
                checkpoints.copy_as_best(path)
            checkpoints.prune(ckpt_dir, cfg.keep_checkpoints)

    class RunLog(tf.keras.callbacks.Callback):
        """Rank 0: epoch time and img/s with the first steps of each epoch left out."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = self.t_warm = self.t_last = time.perf_counter()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            self.t_last = time.perf_counter()
            if self.steps == min(cfg.timing_warmup_steps, derived["steps_per_epoch"] - 1):
                self.t_warm = self.t_last

        def on_epoch_end(self, epoch, logs=None):
            if state["preempted"]:
                return
            skip = min(cfg.timing_warmup_steps, derived["steps_per_epoch"] - 1)
            timed = self.steps - skip
            ips = timed * derived["global_batch"] / max(self.t_last - self.t_warm, 1e-9)
            val = validation.result
            writer.write("epoch", epoch=epoch + 1, steps=self.steps, timed_steps=timed,
                         seconds=round(self.t_last - self.t0, 3),
                         images_per_sec=round(ips, 3),
                         images_per_sec_per_rank=round(ips / derived["world_size"], 3),
                         train_loss=round(float(logs.get("loss", float("nan"))), 6),
                         lr=float(model.optimizer.learning_rate),  # the rate of the last step
                         val_loss=val.get("loss"), val_mean_auroc=val.get("mean_auroc"),
                         val_auroc=val.get("auroc"), val_auprc=val.get("auprc"),
                         val_seconds=val.get("seconds"), val_n=val.get("n"),
                         val_batches=val.get("batches"),
                         peak_memory_mb=round(peak_memory_mb(), 1))
            if cfg.verbose:
                print(f"epoch {epoch + 1}: {ips:.1f} img/s, loss {logs.get('loss', 0):.4f}, "
                      f"val mean AUROC {val.get('mean_auroc')}", flush=True)

    validation = Validation()
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # Horovod: same start on all ranks
        hvd.callbacks.MetricAverageCallback(),  # Horovod: average train metrics over ranks
        Preemption(),
        validation,
    ]
    if cfg.schedule == "plateau":
        callbacks.append(Plateau())
    if cfg.early_stopping:
        callbacks.append(tf.keras.callbacks.EarlyStopping(
            "val_mean_auroc", mode="max", patience=cfg.early_stopping, verbose=int(hvd.rank() == 0)))
    if hvd.rank() == 0:
        callbacks += [Checkpoint(), RunLog()]
    return callbacks


def progress_bar(verbose: int) -> int:
    """Keras' verbose: its bar only on a terminal; batch logs get our one line per epoch."""
    return int(verbose == 1 and sys.stdout.isatty())


def peak_memory_mb() -> float:
    """This rank's peak memory so far: the GPU allocator's peak, else the process' peak RSS."""
    import resource

    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def checkpoint_meta(cfg, manifest, model, epochs_done: int, best, plateau: dict,
                    val_mean_auroc=None) -> dict:
    """What a checkpoint's meta.json records: enough to rebuild the model and resume the run."""
    return {"model": cfg.model, "image_size": cfg.image_size, "classes": manifest["classes"],
            "num_classes": manifest["num_classes"], "epoch": epochs_done,
            "step": int(model.optimizer.iterations.numpy()), "precision": cfg.precision,
            "val_mean_auroc": val_mean_auroc, "best_val_mean_auroc": best,
            "plateau": plateau, "config": dataclasses.asdict(cfg)}


def resume_state(cfg, hvd, model, run_dir: Path) -> dict:
    """With --resume, the chief restores its newest complete checkpoint and every rank receives
    the weights, optimizer state and counters before the first step."""
    import horovod.tensorflow as hvd_tf

    from chexnet_hvd import checkpoints, schedules

    state = {"epoch": 0, "best": None, "preempted": False, "from": None,
             "plateau": dict(schedules.PLATEAU_START)}
    if not cfg.resume:
        return state
    found = checkpoints.newest(run_dir / "checkpoints") if hvd.rank() == 0 else None
    model.optimizer.build(model.trainable_variables)  # create the slots so they can be restored
    if found is not None:
        checkpoints.restore(model, found)
        meta = checkpoints.read_meta(found)
        state |= {"epoch": meta["epoch"], "best": meta.get("best_val_mean_auroc"), "from": str(found),
                  "plateau": meta.get("plateau") or state["plateau"]}
    state = hvd_tf.broadcast_object(state, root_rank=0)  # Horovod: counters from the chief
    schedules.live_schedule(model.optimizer).scale.assign(state["plateau"]["scale"])
    variables = model.optimizer.variables
    variables = variables() if callable(variables) else variables
    hvd_tf.broadcast_variables(model.variables + list(variables), root_rank=0)  # Horovod
    return state


def audit_weights(run_dir: Path, rank: int, model, suffix: str = "") -> None:
    """--audit: this rank's weights as RUN_DIR/audit/rank<N><suffix>.npz."""
    import numpy as np

    audit = run_dir / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    np.savez(audit / f"rank{rank}{suffix}.npz", *model.get_weights())


def write_audit(run_dir: Path, hvd, model, cfg, derived) -> None:
    """Per-rank evidence for tests: which shards this rank read, and its final weights."""
    from chexnet_hvd import data, records

    audit_weights(run_dir, hvd.rank(), model)
    audit = run_dir / "audit"
    shards = records.split_shards(records.load_manifest(cfg.data), cfg.data, "train")
    files, by_record = data.rank_shards(shards, hvd.rank(), hvd.size())
    (audit / f"rank{hvd.rank()}.json").write_text(json.dumps(
        {"rank": hvd.rank(), "files": files, "by_record": by_record,
         "records": derived["records_per_rank"][hvd.rank()]}))


# ---------------------------------------------------------------- main -----------------------
def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(TrainConfig, __doc__.splitlines()[0], argv)
    check_config(cfg)
    stop = StopRequest()

    # --- setup + Horovod ---
    if cfg.xla:  # auto-clustering leaves CPU ops alone unless the CPU's global JIT is on too
        os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_cpu_global_jit".strip()
    from chexnet_hvd import distributed

    hvd, placement = distributed.start(cfg.threads)
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    from chexnet_hvd import checkpoints, data, models, records, runlog

    rank0 = hvd.rank() == 0
    run_dir = Path(cfg.run_dir)
    manifest = records.load_manifest(cfg.data)
    derived = derive(cfg, manifest, hvd.size())
    ranks = hvd_tf.allgather_object(dataclasses.asdict(placement))  # Horovod: where each rank runs
    writer = runlog.RunLogWriter(run_dir) if rank0 else None

    try:
        # --- model + optimizer ---
        tf.keras.utils.set_random_seed(cfg.seed)  # same initial weights on every rank
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        if cfg.xla:
            tf.config.optimizer.set_jit("autoclustering")
        tf.keras.mixed_precision.set_global_policy("float32" if cfg.precision == "fp32" else cfg.precision)
        model = models.build_model(cfg.model, cfg.image_size, manifest["num_classes"], cfg.weights)
        pos_weight = (None if cfg.class_weights == "none"
                      else [manifest["pos_weight"][c] for c in manifest["classes"]])
        model.compile(optimizer=make_optimizer(cfg, hvd, derived), loss=masked_bce(pos_weight))
        state = resume_state(cfg, hvd, model, run_dir)
        if cfg.audit:
            audit_weights(run_dir, hvd.rank(), model, "-initial")
        if rank0:
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | derived, indent=1))
            writer.write("start", config=dataclasses.asdict(cfg), model=cfg.model,
                         image_size=cfg.image_size, precision=cfg.precision,
                         horovod_backend=distributed.backend_name(hvd),
                         hostnames=sorted({r["host"] for r in ranks}), ranks=ranks,
                         slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                         resumed_from=state["from"], initial_epoch=state["epoch"],
                         trainable_params=int(sum(v.shape.num_elements() for v in model.trainable_variables)),
                         synthetic_input=cfg.synthetic_input,
                         versions={"python": sys.version.split()[0], "tensorflow": tf.__version__,
                                   "horovod": __import__("horovod").__version__},
                         **derived)

        # --- data ---
        if cfg.synthetic_input:
            train_ds = data.synthetic_dataset(cfg.image_size, cfg.batch_size, manifest["num_classes"],
                                              cfg.seed)
        else:
            train_ds = data.train_dataset(cfg.data, "train", cfg.image_size, cfg.batch_size,
                                          hvd.rank(), hvd.size(), cfg.seed, cfg.augment,
                                          cfg.shuffle_buffer, cfg.deterministic,
                                          derived["steps_per_epoch"], start_epoch=state["epoch"],
                                          epochs=max(cfg.epochs - state["epoch"], 0))
        train_ds = train_ds.map(lambda x, y, m: (x, tf.stack([y, m], axis=1)))

        # --- callbacks + fit ---
        callbacks = make_callbacks(cfg, hvd, model, derived, manifest, run_dir, writer, stop, state)
        if state["epoch"] < cfg.epochs:
            model.fit(train_ds, epochs=cfg.epochs, initial_epoch=state["epoch"],
                      steps_per_epoch=derived["steps_per_epoch"], callbacks=callbacks,
                      verbose=progress_bar(cfg.verbose) if rank0 else 0)

        # --- the end: preempted (checkpoint, exit 75) or completed ---
        if state["preempted"]:
            if rank0:
                meta = checkpoint_meta(cfg, manifest, model, state["epoch"], state["best"],
                                       state["plateau"])
                checkpoints.save(model, run_dir / "checkpoints", f"step-{meta['step']:09d}", meta)
                writer.write("end", status="preempted", step=meta["step"], epoch=state["epoch"])
            hvd_tf.broadcast_object(0, root_rank=0)  # Horovod: nobody exits before the checkpoint
            step = int(model.optimizer.iterations.numpy())
            print(f"rank {hvd.rank()}: preempted after step {step}; checkpoint written, exiting "
                  f"{cli.EXIT_PREEMPTED}",
                  file=sys.stderr, flush=True)
            return cli.EXIT_PREEMPTED
        if cfg.audit:
            write_audit(run_dir, hvd, model, cfg, derived)
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
