"""Learning-rate schedules as functions of the optimizer's step (so a restored optimizer resumes
its schedule exactly), times a plateau scale that reduce-on-plateau lowers between epochs.
Registered with Keras because Horovod's DistributedOptimizer rebuilds the optimizer from its
config; `live_schedule` finds the rebuilt one."""

from __future__ import annotations

import math

import tensorflow as tf


def scheduled_lr(step, peak: float, world_size: int, warmup_steps: int, total_steps: int,
                 schedule: str = "constant", decay_every: int = 0):
    """Learning rate at `step`: linear warmup from peak / world_size (the single-rank lr, as in
    Horovod's warmup) to peak = base x global_batch / reference_batch (Goyal et al. 2017), then
    constant, half-cosine to zero at total_steps, or step (x0.1 every `decay_every` steps)."""
    step = tf.cast(step, tf.float32)
    start = peak / world_size
    warm = start + (peak - start) * tf.minimum(1.0, step / max(warmup_steps, 1))
    if schedule == "cosine":
        progress = tf.clip_by_value((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
        after = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
    elif schedule == "step":
        after = peak * tf.pow(0.1, tf.floor(step / max(decay_every, 1)))
    else:
        after = tf.constant(peak, tf.float32)
    return tf.where(step < warmup_steps, warm, after)


def plateau_update(state: dict, metric, patience: int, factor: float, min_scale: float) -> dict:
    """One epoch of reduce-on-plateau on a metric to maximise (validation mean AUROC): after
    `patience` epochs without a new best, scale *= factor (not below min_scale) and wait again.
    state = {"scale", "best", "wait"}; an undefined metric (None) counts as no improvement."""
    if metric is not None and (state["best"] is None or metric > state["best"]):
        return {"scale": state["scale"], "best": metric, "wait": 0}
    wait = state["wait"] + 1
    if wait < patience:
        return {**state, "wait": wait}
    return {"scale": max(state["scale"] * factor, min_scale), "best": state["best"], "wait": 0}


PLATEAU_MIN_SCALE = 1e-4  # reduce-on-plateau never takes the lr below 1e-4 x the scaled lr
PLATEAU_START = {"scale": 1.0, "best": None, "wait": 0}


@tf.keras.utils.register_keras_serializable("chexnet_hvd")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """`scheduled_lr` as a Keras schedule, times `scale` (a variable, so that changing it between
    epochs reaches the compiled train step; not part of the config, so checkpoints carry it)."""

    def __init__(self, peak: float, world_size: int, warmup_steps: int, total_steps: int,
                 schedule: str = "constant", decay_every: int = 0):
        self.peak, self.world_size, self.schedule = peak, world_size, schedule
        self.warmup_steps, self.total_steps, self.decay_every = warmup_steps, total_steps, decay_every
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")

    def __call__(self, step):
        return self.scale * scheduled_lr(step, self.peak, self.world_size, self.warmup_steps,
                                         self.total_steps, self.schedule, self.decay_every)

    def get_config(self) -> dict:
        return {"peak": self.peak, "world_size": self.world_size, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "schedule": self.schedule,
                "decay_every": self.decay_every}


def live_schedule(optimizer) -> WarmupSchedule:
    """The schedule the (Horovod-rebuilt, maybe loss-scaled) optimizer really calls."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer._learning_rate  # Keras keeps the schedule object here
