"""Learning-rate schedules as functions of the optimizer's step (so a restored optimizer resumes
its schedule exactly). Registered with Keras because Horovod's DistributedOptimizer rebuilds the
optimizer from its config."""

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


@tf.keras.utils.register_keras_serializable("chexnet_hvd")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """`scheduled_lr` as a Keras schedule."""

    def __init__(self, peak: float, world_size: int, warmup_steps: int, total_steps: int,
                 schedule: str = "constant", decay_every: int = 0):
        self.peak, self.world_size, self.schedule = peak, world_size, schedule
        self.warmup_steps, self.total_steps, self.decay_every = warmup_steps, total_steps, decay_every

    def __call__(self, step):
        return scheduled_lr(step, self.peak, self.world_size, self.warmup_steps, self.total_steps,
                            self.schedule, self.decay_every)

    def get_config(self) -> dict:
        return {"peak": self.peak, "world_size": self.world_size, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "schedule": self.schedule,
                "decay_every": self.decay_every}
