"""Learning-rate schedules as functions of epoch progress (epochs done plus the done fraction of
the epoch in progress), times a plateau scale that reduce-on-plateau lowers between epochs.

Progress, not the optimizer's step count, is what the schedule reads, because an epoch's
number of steps changes when a run resumes at another world size or batch: at each epoch's (or
resumed part's) start the trainer sets where that part starts and how much progress each of its
steps makes, and the optimizer's step counter only moves along inside it. Registered with Keras
because Horovod's DistributedOptimizer rebuilds the optimizer from its config; `live_schedule`
finds the rebuilt one.
"""

from __future__ import annotations

import math

import tensorflow as tf


def scheduled_lr(progress, peak: float, warmup_from, warmup_epochs, epochs: int,
                 schedule: str = "constant", step_epochs: int = 0):
    """Learning rate at `progress` epochs: linear warmup from peak x warmup_from (1 / the world
    size: the single-rank lr, as in Horovod's warmup) to peak = base x global_batch /
    reference_batch (Goyal et al. 2017) over `warmup_epochs`, then constant, half-cosine to zero
    at `epochs`, or step (x0.1 every `step_epochs`)."""
    progress = tf.cast(progress, tf.float32)
    warmup_epochs = tf.cast(warmup_epochs, tf.float32)
    start = peak * tf.cast(warmup_from, tf.float32)
    warm = start + (peak - start) * tf.minimum(1.0, progress / tf.maximum(warmup_epochs, 1e-9))
    if schedule == "cosine":
        done = tf.clip_by_value((progress - warmup_epochs) / tf.maximum(epochs - warmup_epochs, 1e-9), 0, 1)
        after = peak * 0.5 * (1.0 + tf.cos(math.pi * done))
    elif schedule == "step":
        after = peak * tf.pow(0.1, tf.floor(progress / max(step_epochs, 1)))
    else:
        after = tf.constant(peak, tf.float32)
    return tf.where(progress < warmup_epochs, warm, after)


def plateau_update(state: dict, metric, patience: int, factor: float, min_scale: float) -> dict:
    """One epoch of reduce-on-plateau on a metric to maximise (validation mean AUROC): after
    `patience` epochs without a new best, scale *= factor (not below min_scale) and wait again.
    state = {"scale", "best", "wait"}; an epoch whose metric is undefined (None) does not count:
    it neither improves nor waits (a validation split that cannot score must not cut the lr)."""
    if metric is None:
        return dict(state)
    if state["best"] is None or metric > state["best"]:
        return {"scale": state["scale"], "best": metric, "wait": 0}
    wait = state["wait"] + 1
    if wait < patience:
        return {**state, "wait": wait}
    return {"scale": max(state["scale"] * factor, min_scale), "best": state["best"], "wait": 0}


PLATEAU_MIN_SCALE = 1e-4  # reduce-on-plateau never takes the lr below 1e-4 x the scaled lr
PLATEAU_START = {"scale": 1.0, "best": None, "wait": 0}


@tf.keras.utils.register_keras_serializable("chexnet_hvd")
class EpochSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """`scheduled_lr` as a Keras schedule of the optimizer's step, through the progress of the
    part of an epoch in training (`start_part`). The part's terms, the plateau `scale` and the
    warmup's shape are variables (changed between epochs, or at a resume, without retracing the
    train step), set from the run state, not kept in checkpoints. The warmup keeps the shape of
    the run's first attempt (`set_warmup`): its length and start, as fractions of epochs and of
    the peak, do not follow a new world size."""

    def __init__(self, peak: float, warmup_from: float, warmup_epochs: float, epochs: int,
                 schedule: str = "constant", step_epochs: int = 0):
        self.peak, self.epochs, self.schedule, self.step_epochs = peak, epochs, schedule, step_epochs
        self.initial = (warmup_from, warmup_epochs)  # the config (Horovod rebuilds from it)
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")
        # progress = epoch + (offset + (step - first_step) x per_step) / whole: integers, so that
        # a resumed part's progress at a step is the very float of the straight run's there
        self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64, name="part_epoch")
        self.first_step = tf.Variable(0, trainable=False, dtype=tf.int64, name="part_first_step")
        self.offset = tf.Variable(0, trainable=False, dtype=tf.int64, name="part_offset")
        self.per_step = tf.Variable(1, trainable=False, dtype=tf.int64, name="part_per_step")
        self.whole = tf.Variable(1, trainable=False, dtype=tf.int64, name="part_whole")
        self.warmup_from = tf.Variable(warmup_from, trainable=False, dtype=tf.float32, name="warmup_from")
        self.warmup_epochs = tf.Variable(warmup_epochs, trainable=False, dtype=tf.float32, name="warmup_epochs")

    def set_warmup(self, warmup_from: float, warmup_epochs: float) -> None:
        self.warmup_from.assign(warmup_from)
        self.warmup_epochs.assign(warmup_epochs)

    def start_part(self, epoch: int, done: tuple[int, int], first_step: int, steps: int) -> None:
        """The part of epoch `epoch` about to train: earlier parts trained done[0] of its done[1]
        records; its `steps` steps, the optimizer's from `first_step` on, cover the rest. As a
        fraction of exact integers (done/whole + k (1 - done/whole)/steps over a common
        denominator), a resume at the same shape gives the same value as the straight run:
        (done + k)/steps; a float sum of the parts' fractions would differ in the last bit, and
        so would every weight after it."""
        trained, whole = done
        steps = max(steps, 1)
        self.epoch.assign(epoch)
        self.first_step.assign(first_step)
        self.offset.assign(trained * steps)
        self.per_step.assign(whole - trained)
        self.whole.assign(whole * steps)

    def progress(self, step):
        """Epochs of progress at optimizer step `step` (inside the current part)."""
        k = tf.cast(step, tf.int64) - self.first_step
        part = tf.cast(self.offset + k * self.per_step, tf.float64) / tf.cast(self.whole, tf.float64)
        return tf.cast(tf.cast(self.epoch, tf.float64) + part, tf.float32)

    def at(self, progress: float) -> float:
        """The learning rate at `progress` epochs, at the current plateau scale."""
        return float(self(None, progress))

    def __call__(self, step, progress=None):
        progress = self.progress(step) if progress is None else progress
        return self.scale * scheduled_lr(progress, self.peak, self.warmup_from, self.warmup_epochs,
                                         self.epochs, self.schedule, self.step_epochs)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_from": self.initial[0], "warmup_epochs": self.initial[1],
                "epochs": self.epochs, "schedule": self.schedule, "step_epochs": self.step_epochs}


def live_schedule(optimizer) -> EpochSchedule:
    """The schedule the (Horovod-rebuilt, maybe loss-scaled) optimizer really calls."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer._learning_rate  # Keras keeps the schedule object here
