"""Train a chest X-ray classifier with Horovod on 1..N ranks (GPUs or CPU processes).

    horovodrun -np 4 python -m chexnet_hvd.train --data RECORDS --run-dir runs/x --model densenet121
    python -m chexnet_hvd.train ...            # no launcher: a world of size 1

Rank 0 writes RUN_DIR/config.json, RUN_DIR/runlog.jsonl and RUN_DIR/checkpoints/; every rank
computes the same validation AUROC from predictions gathered over all ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from chexnet_hvd import cli

PRECISIONS = ["fp32", "mixed_float16", "mixed_bfloat16"]


@dataclasses.dataclass
class TrainConfig:
    data: str = cli.field(help="records directory (has manifest.json)")
    run_dir: str = cli.field(help="where config.json, runlog.jsonl and checkpoints/ go")
    model: str = cli.field("densenet121", help="densenet121 | small_cnn")
    image_size: int = cli.field(224, help="model input side in pixels")
    batch_size: int = cli.field(16, help="images per rank per step (global batch = this x ranks)")
    epochs: int = cli.field(3, help="epochs to train")
    steps_per_epoch: int = cli.field(0, help="0: one pass over the smallest rank's share")
    optimizer: str = cli.field("adam", help="optimizer", choices=["adam", "sgd"])
    lr: float = cli.field(1e-3, help="base learning rate at --reference-batch (CheXNet: Adam 1e-3 at 16)")
    reference_batch: int = cli.field(16, help="lr = lr x global_batch / reference_batch (Goyal et al. 2017)")
    warmup_epochs: float = cli.field(1.0, help="linear warmup from lr/world_size to the scaled lr")
    schedule: str = cli.field("constant", help="lr after warmup", choices=["constant", "cosine"])
    class_weights: str = cli.field("none", help="manifest: weighted BCE with the manifest's "
                                   "per-class positive weights (CheXNet)", choices=["none", "manifest"])
    precision: str = cli.field("fp32", help="Keras mixed-precision policy", choices=PRECISIONS)
    weights: str = cli.field("none", help="none or a local weights file (nothing is downloaded)")
    seed: int = cli.field(0, help="seed of weights, shuffles and augmentation")
    augment: bool = cli.field(True, help="random horizontal flips")
    shuffle_buffer: int = cli.field(2048, help="record shuffle buffer per rank")
    deterministic: bool = cli.field(False, help="deterministic input order and ops (slower)")
    val_split: str = cli.field("val", help="split validated after every epoch")
    val_batch_size: int = cli.field(64, help="images per rank per validation step")
    threads: int = cli.field(0, help="CPU threads per rank for TF ops; 0: cores / local ranks")
    keep_checkpoints: int = cli.field(3, help="how many of the newest epoch checkpoints to keep")
    timing_warmup_steps: int = cli.field(3, help="steps at the start of each epoch left out of img/s")
    audit: bool = cli.field(False, help="each rank writes RUN_DIR/audit/rank<N>.json + .npz "
                            "(its shard files and final weights), for tests")
    verbose: int = cli.field(1, help="Keras progress on rank 0: 0 silent, 1 bar, 2 line per epoch")


# ---------------------------------------------------------------- derived values -------------
def derive(cfg: TrainConfig, manifest: dict, world_size: int) -> dict:
    """Every number computed from the config in one place, logged at start."""
    from chexnet_hvd import data, records

    shards = records.split_shards(manifest, cfg.data, "train")
    global_batch = cfg.batch_size * world_size
    steps = cfg.steps_per_epoch or data.steps_per_epoch(shards, world_size, cfg.batch_size)
    if steps < 1:
        raise cli.InputError("--batch-size", f"{cfg.batch_size} per rank x {world_size} ranks is more "
                             f"than the {min(data.records_per_rank(shards, world_size))} training "
                             "records of the smallest rank's share")
    return {
        "world_size": world_size,
        "local_batch": cfg.batch_size,
        "global_batch": global_batch,
        "steps_per_epoch": steps,
        "scaled_lr": cfg.lr * global_batch / cfg.reference_batch,
        "warmup_steps": int(round(cfg.warmup_epochs * steps)),
        "total_steps": steps * cfg.epochs,
        "train_records": manifest["splits"]["train"]["count"],
        "records_per_rank": data.records_per_rank(shards, world_size),
    }


# ---------------------------------------------------------------- Horovod setup --------------
def init_horovod(cfg: TrainConfig):
    """hvd.init() first; one GPU per local rank; CPU threads shared among the node's ranks."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    hvd.init()  # Horovod: initialise before anything touches the TF runtime
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:  # Horovod: pin one GPU per process
        tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // hvd.local_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(threads, 2)))
    return hvd


def horovod_backend(hvd) -> str:
    if hvd.mpi_enabled():
        return "mpi"
    return "gloo" if hvd.gloo_enabled() else "none"


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


# ---------------------------------------------------------------- callbacks ------------------
def make_callbacks(cfg, hvd, model, derived, manifest, run_dir, writer):
    """Horovod's canonical order: broadcast, metric average, validation, then rank-0 writers."""
    import tensorflow as tf

    from chexnet_hvd import data, metrics

    names = manifest["classes"]

    class Validation(tf.keras.callbacks.Callback):
        """Predict this rank's part of the split, gather all ranks, score over the whole split."""

        def __init__(self):
            super().__init__()
            self.dataset = data.eval_dataset(cfg.data, cfg.val_split, cfg.image_size,
                                             cfg.val_batch_size, hvd.rank(), hvd.size())
            self.result: dict = {}

        def on_epoch_end(self, epoch, logs=None):
            t0 = time.perf_counter()
            local = predict(self.model, self.dataset)
            merged = metrics.gather(local)
            self.result = metrics.summarize(merged["label"], merged["prob"], merged["mask"], names)
            self.result["seconds"] = round(time.perf_counter() - t0, 3)
            self.result["ids_unique"] = len(set(merged["id"].tolist())) == len(merged["id"])
            if logs is not None:
                logs["val_loss"] = self.result["loss"]
                logs["val_mean_auroc"] = self.result["mean_auroc"]

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
                         val_seconds=val.get("seconds"), val_n=val.get("n"))
            if cfg.verbose:
                print(f"epoch {epoch + 1}: {ips:.1f} img/s, loss {logs.get('loss', 0):.4f}, "
                      f"val mean AUROC {val.get('mean_auroc')}", flush=True)

    class Checkpoint(tf.keras.callbacks.Callback):
        """Rank 0: model + optimizer + counters, written to a temporary directory then renamed."""

        def on_epoch_end(self, epoch, logs=None):
            save_checkpoint(model, run_dir / "checkpoints", epoch + 1, cfg, manifest,
                            validation.result.get("mean_auroc"), cfg.keep_checkpoints)

    validation = Validation()
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # Horovod: same start on all ranks
        hvd.callbacks.MetricAverageCallback(),  # Horovod: average train metrics over ranks
        validation,
    ]
    if hvd.rank() == 0:
        callbacks += [Checkpoint(), RunLog()]
    return callbacks


def predict(model, dataset) -> dict:
    """Probabilities and labels of every record of a (rank-local) eval dataset, as numpy."""
    import numpy as np

    parts: dict[str, list] = {"prob": [], "label": [], "mask": [], "id": [], "patient": []}
    for batch in dataset:
        parts["prob"].append(model.predict_on_batch(batch["image"]))
        for key in ("label", "mask", "id", "patient"):
            parts[key].append(batch[key].numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def save_checkpoint(model, ckpt_dir: Path, epoch: int, cfg, manifest, val_mean_auroc, keep: int) -> Path:
    """Atomic: everything goes into a hidden temporary directory that is renamed when complete."""
    import tensorflow as tf

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = ckpt_dir / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp / "ckpt"))
    meta = {"model": cfg.model, "image_size": cfg.image_size, "classes": manifest["classes"],
            "num_classes": manifest["num_classes"], "epoch": epoch,
            "step": int(model.optimizer.iterations.numpy()), "precision": cfg.precision,
            "val_mean_auroc": val_mean_auroc, "config": dataclasses.asdict(cfg)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("epoch-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_audit(run_dir: Path, hvd, model, cfg, derived) -> None:
    """Per-rank evidence for tests: which shards this rank read, and its final weights."""
    import numpy as np

    from chexnet_hvd import data, records

    audit = run_dir / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    shards = records.split_shards(records.load_manifest(cfg.data), cfg.data, "train")
    files, by_record = data.rank_shards(shards, hvd.rank(), hvd.size())
    (audit / f"rank{hvd.rank()}.json").write_text(json.dumps(
        {"rank": hvd.rank(), "files": files, "by_record": by_record,
         "records": derived["records_per_rank"][hvd.rank()]}))
    np.savez(audit / f"rank{hvd.rank()}.npz", *[w for w in model.get_weights()])


# ---------------------------------------------------------------- main -----------------------
def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(TrainConfig, __doc__.splitlines()[0], argv)

    # --- setup + Horovod ---
    hvd = init_horovod(cfg)
    import tensorflow as tf
    from horovod.tensorflow import allgather_object

    from chexnet_hvd import data, models, records, runlog, schedules

    rank0 = hvd.rank() == 0
    run_dir = Path(cfg.run_dir)
    manifest = records.load_manifest(cfg.data)
    derived = derive(cfg, manifest, hvd.size())
    writer = None
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | derived, indent=1))
        writer = runlog.RunLogWriter(run_dir)
        writer.write("start", config=dataclasses.asdict(cfg), model=cfg.model,
                     image_size=cfg.image_size, precision=cfg.precision,
                     horovod_backend=horovod_backend(hvd),
                     hostnames=sorted(set(allgather_object(socket.gethostname()))),
                     slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                     versions={"python": sys.version.split()[0], "tensorflow": tf.__version__,
                               "horovod": __import__("horovod").__version__},
                     **derived)
    else:
        allgather_object(socket.gethostname())  # Horovod: every rank joins the collective

    try:
        # --- data ---
        train_ds = data.train_dataset(cfg.data, "train", cfg.image_size, cfg.batch_size,
                                      hvd.rank(), hvd.size(), cfg.seed, cfg.augment,
                                      cfg.shuffle_buffer, cfg.deterministic)
        train_ds = train_ds.map(lambda x, y, m: (x, tf.stack([y, m], axis=1)))

        # --- model ---
        tf.keras.utils.set_random_seed(cfg.seed)  # same initial weights on every rank
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        tf.keras.mixed_precision.set_global_policy("float32" if cfg.precision == "fp32" else cfg.precision)
        model = models.build_model(cfg.model, cfg.image_size, manifest["num_classes"], cfg.weights)

        # --- optimizer ---
        schedule = schedules.WarmupSchedule(derived["scaled_lr"], hvd.size(), derived["warmup_steps"],
                                            derived["total_steps"], cfg.schedule)
        optimizer = (tf.keras.optimizers.Adam(schedule) if cfg.optimizer == "adam"
                     else tf.keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True))
        optimizer = hvd.DistributedOptimizer(optimizer)  # Horovod: allreduce the gradients
        pos_weight = (None if cfg.class_weights == "none"
                      else [manifest["pos_weight"][c] for c in manifest["classes"]])
        model.compile(optimizer=optimizer, loss=masked_bce(pos_weight))

        # --- callbacks + fit ---
        callbacks = make_callbacks(cfg, hvd, model, derived, manifest, run_dir, writer)
        model.fit(train_ds, epochs=cfg.epochs, steps_per_epoch=derived["steps_per_epoch"],
                  callbacks=callbacks, verbose=cfg.verbose if rank0 else 0)

        # --- the end ---
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
