"""The trainer's Keras callbacks (chexnet_hvd.train builds them): each reads and writes the one
RunState of the run (chexnet_hvd.checkpoints), the same on every rank."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import tensorflow as tf

from chexnet_hvd import bottleneck, checkpoints, cli, data, metrics, schedules, sharding, stall
from chexnet_hvd.checkpoints import RunState
from chexnet_hvd.config import Derived, TrainConfig, profile_range

# What ranks the epochs for best/, plateau and early stopping: (key of the validation result,
# +1 to maximise or -1 to minimise). The mean AUROC, unless the validation split has no class
# with both positives and negatives; then the validation loss.
CRITERIA = {"val_mean_auroc": ("mean_auroc", 1), "val_loss": ("loss", -1)}


def validation_criterion(manifest: dict, split: str) -> tuple[str, list[str]]:
    """What ranks this run's epochs (a key of callbacks.CRITERIA), and a warning per kind of
    class of the validation split whose AUROC is undefined (no positives, or no negatives)."""
    info, classes = manifest["splits"][split], manifest["classes"]
    if "no_positives" in info:
        one_sided = {"positives": info["no_positives"], "negatives": info["no_negatives"]}
    else:  # a manifest from before these were kept: every record labelled
        one_sided = {"positives": [c for c in classes if info["positives"][c] == 0],
                     "negatives": [c for c in classes if info["positives"][c] == info["count"]]}
    warnings = [f"warning: validation split {split!r} has no {kind} for {len(names)} of "
                f"{len(classes)} classes ({', '.join(names)}): their AUROC is undefined"
                for kind, names in one_sided.items() if names]
    if set(one_sided["positives"]) | set(one_sided["negatives"]) >= set(classes):
        warnings.append(f"warning: no class of validation split {split!r} has both positives and "
                        "negatives: the best checkpoint, --schedule plateau and --early-stopping "
                        "go by the validation loss instead of the mean AUROC")
        return "val_loss", warnings
    return "val_mean_auroc", warnings


def reached(state: RunState, every: int) -> bool:
    """Whether the steps the last call of Keras' train function took (--steps-per-execution of
    them) include a multiple of `every`: the step-counted actions happen at the first call's end
    at or after it, the same one on every rank."""
    return state.step // every > (state.step - state.executed) // every


def score(result: dict, best_by: str) -> float | None:
    """The validation `result`'s value of criterion `best_by`, signed so that more is better;
    None when undefined."""
    key, sign = CRITERIA[best_by]
    return None if result.get(key) is None else sign * result[key]


# ---------------------------------------------------------------- callbacks ------------------
# All of them read and write one RunState. The order of `make_callbacks` matters: EpochProgress
# counts the step and batch the others see; Timing stops the clock before Validation runs;
# Validation sets best/improved, which Plateau, EarlyStop and EpochCheckpoint read; RunLog writes
# last, when the epoch's results are all in. Per-step hooks do integer work only and accept TF
# logs (`_supports_tf_logs`), so Keras adds no host sync per step.
class EpochProgress(tf.keras.callbacks.Callback):
    """The run's counters (epoch, step, batch of the epoch's part) and, as each epoch or resumed
    part of one begins, where the learning-rate schedule's progress starts and how far each of
    the part's steps takes it: epochs done plus the fraction earlier attempts trained."""

    _supports_tf_logs = True

    def __init__(self, state: RunState, beat=None, rest=None):
        super().__init__()
        self.state, self.beat = state, beat  # beat(step, steps, phase): the stall watchdog's progress
        self.rest = rest  # the stall watchdog: fit has ended, no step is due

    def on_train_end(self, logs=None):
        if self.rest:
            self.rest()

    def on_epoch_begin(self, epoch, logs=None):
        state = self.state
        state.epoch, state.batch = epoch, 0
        schedules.live_schedule(self.model.optimizer).start_part(
            epoch, sharding.records_done(state.parts), state.step, state.part_steps)

    def on_train_batch_begin(self, batch, logs=None):
        if self.beat:  # only a rank in a training call waits for its input
            self.beat(phase=stall.TRAINING)

    def on_train_batch_end(self, batch, logs=None):
        state = self.state  # Keras passes the index of the call's last step in the epoch
        state.executed = batch + 1 - state.batch
        state.step += state.executed
        state.batch = batch + 1
        if self.beat:
            self.beat(state.step, state.executed)

    def on_epoch_end(self, epoch, logs=None):
        if not self.state.preempted:
            self.state.parts = []  # the epoch is whole
            # the lr the epoch ended at: just before its end (a step decay at the epoch boundary
            # belongs to the next epoch), as the plateau scale had it during the epoch;
            # comparable across world sizes and batches, unlike the last step's lr
            self.state.lr = schedules.live_schedule(self.model.optimizer).at(epoch + 1 - 1e-6)


class StopAgreement(tf.keras.callbacks.Callback):
    """The ranks agree (allreduce max of their stop flags) every `every` steps (`reached`) and as
    an epoch begins, at points all ranks share, and all stop after the same step. Never on an
    epoch's last step: that epoch is validated and checkpointed first, so a resumed run never
    meets a finished but unvalidated epoch. Agreed as an epoch begins, Keras still trains one
    call of its train function before it looks: that call is cut to one step (a call of
    --steps-per-execution steps as long as the epoch would finish it unvalidated).
    --preempt-at-step raises the flag as a signal would."""

    _supports_tf_logs = True

    def __init__(self, state: RunState, stop, engine, every: int, preempt_at: int):
        super().__init__()
        self.state, self.stop, self.engine = state, stop, engine
        self.every, self.preempt_at = every, preempt_at

    def on_epoch_begin(self, epoch, logs=None):
        if self.agree():
            self.model._steps_per_execution.assign(1)  # Keras reads it before each call

    def on_train_batch_end(self, batch, logs=None):
        state = self.state
        if state.step - state.executed < self.preempt_at <= state.step:
            self.stop.requested = True  # as if SIGUSR1 arrived now
        if reached(state, self.every) and state.batch < state.part_steps:
            self.agree()

    def agree(self) -> bool:
        requested = self.stop.requested  # alone, a rank agrees with itself: no collective,
        if self.engine.size > 1:          # and no wait for the device's queued steps
            requested = self.engine.any_rank(requested)  # Horovod/TF: a collective, same step
        if requested:
            self.state.preempted = True
            self.model.stop_training = True
        return self.state.preempted


class Timing(tf.keras.callbacks.Callback):
    """Rank 0: the epoch's training time and img/s, its first `warmup` steps (to the end of the
    call of Keras' train function that reaches them) left out."""

    _supports_tf_logs = True

    def __init__(self, state: RunState, warmup: int, global_batch: int):
        super().__init__()
        self.state, self.warmup, self.global_batch = state, warmup, global_batch

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = self.t_warm = time.perf_counter()
        self.warm = 0 if self.warmup == 0 else None  # the step the timed part starts after

    def on_train_batch_end(self, batch, logs=None):
        if self.warm is None and self.state.batch >= self.warmup:  # the first call's end past it
            float(logs["loss"])  # wait for the step itself (GPUs run ahead of Python)
            self.t_warm, self.warm = time.perf_counter(), self.state.batch

    def on_epoch_end(self, epoch, logs=None):
        t_end = time.perf_counter()  # Keras has synced the epoch's logs already
        steps = self.state.batch
        warmed = self.warm is not None and steps > self.warm
        timed = steps - self.warm if warmed else steps
        seconds = t_end - (self.t_warm if warmed else self.t0)
        self.state.timing = {"steps": steps, "timed_steps": timed,  # no step, no throughput:
                             "seconds": round(t_end - self.t0, 3),  # (an epoch a resume left empty)
                             "images_per_sec": round(timed * self.global_batch / max(seconds, 1e-9), 3)
                             if steps else None}


class Diagnosis(tf.keras.callbacks.Callback):
    """Why the epoch ran at its speed (chexnet_hvd.bottleneck): after its timing, every rank
    times passes of its compute probe and reads how often its input was empty; gathered once
    (a collective), rank 0 gives the epoch its verdict (RunState.diagnosis). The probe's time
    per pass is the median of `windows` windows, each of one pass or more and `min_seconds` /
    `windows` long or more: a rank slowed all the time (a CPU quota's 100 ms period, time slices
    shared with other work) shows as slowed in every window, where a few passes of a small model
    could fit between its pauses; a moment's contention (another process woken for a tenth of
    a second) slows one window and is not taken for a straggler."""

    def __init__(self, state: RunState, engine, feed_counts, global_batch: int, probe, windows: int = 3,
                 min_seconds: float = 0.25):
        super().__init__()
        self.state, self.engine, self.feed_counts, self.global_batch = state, engine, feed_counts, global_batch
        self.probe, self.windows, self.min_seconds = probe, windows, min_seconds

    def per_pass(self) -> float:
        """One window's seconds per pass of the probe."""
        passes, t0 = 0, time.perf_counter()
        while passes < 1 or time.perf_counter() - t0 < self.min_seconds / self.windows:
            float(self.probe())  # float(): wait for it
            passes += 1
        return (time.perf_counter() - t0) / passes

    def on_epoch_begin(self, epoch, logs=None):
        self.before = self.feed_counts()
        self.state.diagnosis = {}

    def on_epoch_end(self, epoch, logs=None):
        if self.state.preempted or not self.state.batch:
            return
        float(self.probe())  # traced (first epoch), warm
        compute = statistics.median(self.per_pass() for _ in range(self.windows))
        (taken, starved), (taken0, starved0) = self.feed_counts(), self.before
        mine = (compute, (starved - starved0) / max(taken - taken0, 1))
        everyone = self.engine.allgather_object(mine)  # a collective: every rank
        ips = self.state.timing.get("images_per_sec")
        if ips:  # rank 0, which times the epoch
            self.state.diagnosis = bottleneck.verdict(self.global_batch / ips, [c for c, _ in everyone],
                                                      [s for _, s in everyone])


class Validation(tf.keras.callbacks.Callback):
    """Predict this rank's part of the split, gather all ranks, score over the whole split; then
    the bookkeeping every rank shares: the best value of the run's criterion (`best_by`), epochs
    since it improved."""

    def __init__(self, state: RunState, dataset, names: list[str], pos_weight, predict, engine, beat=None):
        super().__init__()
        self.state, self.dataset, self.names, self.pos_weight = state, dataset, names, pos_weight
        self.predict = predict  # the model on preprocessed images, this rank alone
        self.beat = beat or (lambda **_: None)  # the stall watchdog's progress, per batch
        self.allgather, self.average_statistics = engine.allgather_object, engine.average_statistics

    def on_epoch_end(self, epoch, logs=None):
        if self.state.preempted:
            return
        self.beat(phase=stall.VALIDATING)
        self.average_statistics(self.model)  # every rank validates (and the chief saves) one model
        t0, batches = time.perf_counter(), []

        def predict(images):
            batches.append(len(images))
            self.beat()
            return self.predict(images)

        merged = metrics.gather(data.predictions(predict, self.dataset), self.allgather)
        if bad := metrics.not_numbers(merged["prob"]):  # the same on every rank: all stop here
            raise cli.InputError(f"epoch {epoch + 1}", f"{bad} of the model's validation predictions are "
                                 "not numbers: training diverged (try a lower --lr)")
        result = metrics.summarize(merged["label"], merged["prob"], merged["mask"], self.names,
                                   self.pos_weight)
        self.state.validation = result | {"seconds": round(time.perf_counter() - t0, 3),
                                          "batches": len(batches)}
        state = self.state
        key, sign = CRITERIA[state.best_by]
        value = result[key]
        state.improved = value is not None and (state.best is None or sign * value > sign * state.best)
        if state.improved:
            state.best, state.since_best = value, 0
        elif value is not None:  # an undefined value neither improves nor counts toward patience
            state.since_best += 1
        logs["val_loss"] = result["loss"]
        logs["val_mean_auroc"] = result["mean_auroc"] or 0.0


class Plateau(tf.keras.callbacks.Callback):
    """Every rank takes the same decision from the same gathered AUROC, so no broadcast."""

    def __init__(self, state: RunState, patience: int, factor: float):
        super().__init__()
        self.state, self.patience, self.factor = state, patience, factor

    def on_epoch_end(self, epoch, logs=None):
        if self.state.preempted:
            return
        self.state.plateau = schedules.plateau_update(
            self.state.plateau, score(self.state.validation, self.state.best_by), self.patience,
            self.factor, schedules.PLATEAU_MIN_SCALE)
        schedules.live_schedule(self.model.optimizer).scale.assign(self.state.plateau["scale"])


class EarlyStop(tf.keras.callbacks.Callback):
    """Stop after `patience` epochs without a better validation score (the run's `best_by`:
    mean AUROC, or the loss); the count is in the run state, so a resumed run stops where an
    uninterrupted one would."""

    def __init__(self, state: RunState, patience: int, verbose: bool):
        super().__init__()
        self.state, self.patience, self.verbose = state, patience, verbose

    def on_epoch_end(self, epoch, logs=None):
        if not self.state.preempted and self.state.since_best >= self.patience:
            self.state.stopped_early = self.model.stop_training = True
            if self.verbose:
                print(f"epoch {epoch + 1}: early stopping, {self.state.since_best} epochs without "
                      f"a better {self.state.best_by} than {self.state.best}", flush=True)


class StepCheckpoint(tf.keras.callbacks.Callback):
    """A checkpoint every `every` steps (`reached`; only the newest is kept), except on an
    epoch's last step, whose epoch checkpoint follows once it is validated. On every rank at the
    same steps (`save` shares what the ranks hold apart first, and knows where each writes)."""

    _supports_tf_logs = True

    def __init__(self, state: RunState, every: int, save):
        super().__init__()
        self.state, self.every, self.save = state, every, save

    def on_train_batch_end(self, batch, logs=None):
        state = self.state
        if reached(state, self.every) and state.batch < state.part_steps and not state.preempted:
            self.save(f"step-{state.step:09d}", state.epoch)


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """The epoch's checkpoint, and best/ when the validation criterion improved (ranks as
    StepCheckpoint; `save` returns None where it wrote no checkpoint of the run)."""

    def __init__(self, state: RunState, save):
        super().__init__()
        self.state, self.save = state, save

    def on_epoch_end(self, epoch, logs=None):
        if self.state.preempted:
            return
        path = self.save(f"epoch-{epoch + 1:04d}", epoch + 1)
        if path and self.state.improved:
            checkpoints.set_best(path)


class RunLog(tf.keras.callbacks.Callback):
    """Rank 0: the epoch record of the run log, the same numbers as TensorBoard scalars (when
    `summary_dir` is given), and one line on stdout. The run log stays what reports read."""

    def __init__(self, state: RunState, writer, world_size: int, verbose: bool, summary_dir=None):
        super().__init__()
        self.state, self.writer, self.world_size, self.verbose = state, writer, world_size, verbose
        self.summary = tf.summary.create_file_writer(str(summary_dir)) if summary_dir else None

    def on_epoch_end(self, epoch, logs=None):
        if self.state.preempted:
            return
        t, val = self.state.timing, self.state.validation
        ips, loss = t["images_per_sec"], logs.get("loss")  # None: the epoch trained no step
        record = self.writer.write("epoch", epoch=epoch + 1, **t,
                          images_per_sec_per_rank=None if ips is None else round(ips / self.world_size, 3),
                          train_loss=None if loss is None else round(float(loss), 6),
                          lr=self.state.lr,
                          val_loss=val.get("loss"), val_mean_auroc=val.get("mean_auroc"),
                          val_auroc=val.get("auroc"), val_auprc=val.get("auprc"),
                          val_seconds=val.get("seconds"), val_n=val.get("n"),
                          val_batches=val.get("batches"), peak_memory_mb=round(peak_memory_mb(), 1),
                          **self.state.diagnosis)
        if self.summary:
            write_scalars(self.summary, record)
        if self.verbose:
            trained = ("no step left to train (resumed at its end)" if ips is None
                       else f"{ips:.1f} img/s, loss {float(loss):.4f}")
            print(f"epoch {epoch + 1}: {trained}, val mean AUROC {val.get('mean_auroc')}; "
                  f"{bottleneck.summary(self.state.diagnosis)}", flush=True)


class Heartbeat(tf.keras.callbacks.Callback):
    """Rank 0 in a batch log (stdout not a terminal, so no progress bar): a line every `every`
    seconds of a long epoch, so that a job's log shows it is alive long before the first epoch
    line: step of the epoch, img/s since the last line, loss, time in the epoch."""

    _supports_tf_logs = True

    def __init__(self, state: RunState, every: float, global_batch: int):
        super().__init__()
        self.state, self.every, self.global_batch = state, every, global_batch

    def on_epoch_begin(self, epoch, logs=None):
        self.began = self.last = time.monotonic()
        self.last_batch = 0

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self.last < self.every:
            return
        state, steps = self.state, self.state.batch - self.last_batch
        print(f"epoch {state.epoch + 1}: step {state.batch}/{state.part_steps}, "
              f"{steps * self.global_batch / (now - self.last):.1f} img/s, loss {float(logs['loss']):.4f}, "
              f"{now - self.began:.0f} s into the epoch", flush=True)
        self.last, self.last_batch = now, state.batch


SCALARS = ("train_loss", "lr", "images_per_sec", "val_loss", "val_mean_auroc")


def write_scalars(summary, record: dict) -> None:
    """An epoch record's numbers as TensorBoard scalars at step = epoch (undefined ones left out)."""
    values = {k: record[k] for k in SCALARS} | {
        f"val_auroc/{name}": v for name, v in (record["val_auroc"] or {}).items()}
    with summary.as_default(step=record["epoch"]):
        for tag, value in values.items():
            if value is not None:
                tf.summary.scalar(tag, value)
    summary.flush()


class Profile(tf.keras.callbacks.Callback):
    """Rank 0: TensorFlow's profiler over the run's steps first..last, from the start of the call
    of Keras' train function (`per_call` steps at most) that takes step `first` (EpochProgress,
    earlier in the list, has counted the steps that just ended)."""

    _supports_tf_logs = True

    def __init__(self, state: RunState, first: int, last: int, logdir, per_call: int = 1):
        super().__init__()
        self.state, self.first, self.last, self.logdir = state, first, last, str(logdir)
        self.per_call, self.tracing = per_call, False

    def on_train_batch_begin(self, batch, logs=None):
        if not self.tracing and self.state.step < self.first <= self.state.step + self.per_call:
            tf.profiler.experimental.start(self.logdir)
            self.tracing = True

    def on_train_batch_end(self, batch, logs=None):
        if self.tracing and self.state.step >= self.last:
            self.on_train_end()

    def on_train_end(self, logs=None):
        if self.tracing:
            tf.profiler.experimental.stop()
            self.tracing = False


def make_callbacks(cfg: TrainConfig, engine, state: RunState, derived: Derived, stop,
                   validation: Validation, save, writer, watch=None, observers=()) -> list:
    """In the order the comment above the callbacks gives; rank 0 alone times and writes.
    `watch`: the stall watch (monitor.StallWatch) or None; `observers`: callbacks that watch
    the epoch's training before it is validated (AuditTrail, Diagnosis)."""
    rank0 = engine.rank == 0  # only the chief writes files
    callbacks = [EpochProgress(state, watch and watch.beat, watch and watch.rest),
                 StopAgreement(state, stop, engine, cfg.stop_check_steps, cfg.preempt_at_step),
                 *engine.callbacks()]
    if rank0:
        callbacks.append(Timing(state, cfg.timing_warmup_steps, derived.global_batch))
    callbacks += [*observers, validation]
    if cfg.schedule == "plateau":
        callbacks.append(Plateau(state, cfg.plateau_patience, cfg.plateau_factor))
    if cfg.early_stopping:
        callbacks.append(EarlyStop(state, cfg.early_stopping, rank0 and cfg.verbose > 0))
    if cfg.checkpoint_every_steps:  # on every rank: `save` knows where each writes
        callbacks.append(StepCheckpoint(state, cfg.checkpoint_every_steps, save))
    logdir = Path(cfg.run_dir) / "tensorboard"
    callbacks.append(EpochCheckpoint(state, save))
    if rank0:
        callbacks.append(RunLog(state, writer, engine.size, cfg.verbose > 0, cfg.tensorboard and logdir))
    if rank0 and cfg.verbose and cfg.heartbeat and not cli.watched():
        callbacks.append(Heartbeat(state, cfg.heartbeat, derived.global_batch))
    if rank0 and cfg.profile_steps:  # rank 0's trace
        callbacks.append(Profile(state, *profile_range(cfg.profile_steps), logdir / "profile",
                                 cfg.steps_per_execution))
    return callbacks


class AuditTrail(tf.keras.callbacks.Callback):
    """--audit: the ids of the records each epoch (or part of one) trained on this rank, as the
    input pipeline delivered them, one JSON line per epoch part in RUN_DIR/audit/
    rank<N>-trained.jsonl: tests check coverage across ranks, attempts and shapes with it. The
    pipeline calls `record` for each batch it delivers, in order; of those, the first `batch`
    of each part were trained (the rest were prefetched when a stop came)."""

    def __init__(self, state: RunState, path: Path):
        super().__init__()
        self.state, self.path = state, path
        self.delivered: list[list[str]] = []
        self.consumed = 0

    def record(self, ids) -> int:
        self.delivered.append([i.decode() for i in ids.numpy()])
        return 0

    def on_epoch_end(self, epoch, logs=None):
        state = self.state
        trained = self.delivered[self.consumed:self.consumed + state.batch]
        self.consumed += state.batch
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"epoch": epoch + 1, "shape": list(state.shape), "step": state.step,
                                 "ids": [i for batch in trained for i in batch]}) + "\n")


def end_empty_epoch(callbacks: list, model, epoch: int) -> None:
    """An epoch with no step left to train (a resumed attempt's share of its rest was less than
    one global batch) ends as trained epochs do: validated, checkpointed, logged."""
    handler = tf.keras.callbacks.CallbackList(callbacks, model=model)
    handler.on_epoch_begin(epoch)
    handler.on_epoch_end(epoch, {})


def peak_memory_mb() -> float:
    """This rank's peak memory so far: the GPU allocator's peak, else the process' peak RSS."""
    if tf.config.list_logical_devices("GPU"):
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


