"""One model builder over a plain registry: densenet121 (CheXNet), small_cnn (tests, demo).

Every model ends in a float32 sigmoid layer named `predictions` (kept float32 under mixed
precision for a stable loss). Weights are never downloaded: `weights` is None or a local file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import NUM_CLASSES

layers = tf.keras.layers


def _head(features: tf.Tensor, num_classes: int) -> tf.Tensor:
    logits = layers.Dense(num_classes, name="logits")(features)
    return layers.Activation("sigmoid", dtype="float32", name="predictions")(logits)


def densenet121(image_size: int, num_classes: int, weights: str | None) -> tf.keras.Model:
    """CheXNet: DenseNet-121 backbone, global average pool, 14 sigmoid outputs (Rajpurkar 2017).
    `weights` may be a local ImageNet no-top weights file (keras.applications reads it)."""
    backbone = tf.keras.applications.DenseNet121(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg")
    return tf.keras.Model(backbone.input, _head(backbone.output, num_classes), name="densenet121")


def small_cnn(image_size: int, num_classes: int, weights: str | None) -> tf.keras.Model:
    """Four conv layers and a flattened head that keeps where a finding is (fast tests, demo).
    No batch normalisation, so every variable is identical on all Horovod ranks."""
    inputs = layers.Input((image_size, image_size, 3), name="image")
    x = inputs
    for i, width in enumerate((16, 32, 64)):
        x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPool2D(name=f"pool{i + 1}")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.AveragePooling2D(max(1, image_size // 64), name="pool_head")(x)
    x = layers.Flatten(name="flatten")(x)
    model = tf.keras.Model(inputs, _head(x, num_classes), name="small_cnn")
    if weights:
        model.load_weights(weights)
    return model


BUILDERS: dict[str, Callable[[int, int, str | None], tf.keras.Model]] = {
    "densenet121": densenet121,
    "small_cnn": small_cnn,
}


def build_model(name: str, image_size: int, num_classes: int = NUM_CLASSES,
                weights: str | None = None) -> tf.keras.Model:
    """Build a registered model; `weights` is None/'none' or the path of a local weights file."""
    if name not in BUILDERS:
        raise InputError("--model", f"unknown model {name!r} (choose from {', '.join(BUILDERS)})")
    if weights in (None, "", "none"):
        weights = None
    elif not Path(weights).is_file():
        raise InputError(weights, "weights file not found (nothing is downloaded)")
    return BUILDERS[name](image_size, num_classes, weights)


def load_checkpoint(ckpt_dir: str | Path) -> tuple[tf.keras.Model, dict]:
    """Rebuild the model a trainer checkpoint directory describes (meta.json) and restore it."""
    import json

    meta_path = Path(ckpt_dir) / "meta.json"
    if not meta_path.is_file():
        raise InputError(ckpt_dir, "not a checkpoint directory (no meta.json)")
    meta = json.loads(meta_path.read_text())
    model = build_model(meta["model"], meta["image_size"], meta["num_classes"])
    tf.train.Checkpoint(model=model).read(str(Path(ckpt_dir) / "ckpt")).expect_partial()
    return model, meta
