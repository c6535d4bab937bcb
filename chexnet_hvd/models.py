"""One model builder over a plain registry: densenet121 (CheXNet), resnet50, resnet59 (large
inputs, SURFsara), small_cnn (tests, demo), and nas-<8 digits>, any architecture of the GenNAS
search space (chexnet_hvd.nas.space, which imports nothing of the suite).

Every model ends in a float32 sigmoid layer named `predictions` (kept float32 under mixed
precision for a stable loss). Weights are never downloaded: `weights` is None or a local file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from chexnet_hvd import data, views
from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import NUM_CLASSES
from chexnet_hvd.nas import space
from chexnet_hvd.weights import PUBLISHED

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
    No batch normalisation, so every variable is identical on all ranks under either engine."""
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


def resnet50(image_size: int, num_classes: int, weights: str | None) -> tf.keras.Model:
    """Keras' ResNet-50 backbone (so a local ImageNet no-top file loads), pooled, sigmoid head."""
    backbone = tf.keras.applications.ResNet50(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg")
    return tf.keras.Model(backbone.input, _head(backbone.output, num_classes), name="resnet50")


# ResNet-59 for 896-1024 px inputs (SURFsara/Intel): ResNet-50's bottleneck stages plus a fifth at
# 4096 channels, every stage halving the map, so 896 px ends at 7x7 (1024 px at 8x8).
#            (bottleneck width, output channels, blocks, stride of the first block)
RESNET59_STAGES = [
    (64, 256, 3, 2),      # 224 -> 112 (the first residual stage gets stride 2)
    (128, 512, 4, 2),     # -> 56
    (256, 1024, 6, 2),    # -> 28
    (512, 2048, 3, 2),    # -> 14
    (1024, 4096, 3, 2),   # -> 7, the added stage
]


def _bottleneck(x: tf.Tensor, width: int, out: int, stride: int, name: str) -> tf.Tensor:
    """1x1 reduce, 3x3, 1x1 expand, with a projection shortcut when the shape changes."""
    shortcut = x
    if stride != 1 or x.shape[-1] != out:
        shortcut = layers.Conv2D(out, 1, stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_proj_bn")(shortcut)
    for i, (filters, kernel, s) in enumerate([(width, 1, stride), (width, 3, 1), (out, 1, 1)]):
        x = layers.Conv2D(filters, kernel, s, padding="same", use_bias=False, name=f"{name}_conv{i + 1}")(x)
        x = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_bn{i + 1}")(x)
        if i < 2:
            x = layers.ReLU(name=f"{name}_relu{i + 1}")(x)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, x]))


def resnet59(image_size: int, num_classes: int, weights: str | None) -> tf.keras.Model:
    """Stem (7x7/2 conv, 3x3/2 max-pool), the five stages of RESNET59_STAGES, pool, sigmoid head.
    `weights`: a ResNet-59 weights file, or Keras' ResNet-50 ImageNet no-top file (by its
    published name, see chexnet_hvd.weights), which initialises the stem and the first four
    stages, whose shapes are ResNet-50's; the added fifth stage and the head start at random."""
    inputs = layers.Input((image_size, image_size, 3), name="image")
    # ResNet-50's stem exactly (Keras pads 3, then 1 before the pool): 'same' padding puts the
    # 7x7/2 windows one pixel off theirs, and then the copied kernels see other pixels
    x = layers.ZeroPadding2D(3, name="stem_pad")(inputs)
    x = layers.Conv2D(64, 7, 2, use_bias=False, name="stem_conv")(x)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(epsilon=1.001e-5, name="stem_bn")(x))
    x = layers.MaxPool2D(3, 2, name="stem_pool")(layers.ZeroPadding2D(1, name="stem_pool_pad")(x))
    for s, (width, out, blocks, stride) in enumerate(RESNET59_STAGES, 1):
        for b in range(blocks):
            x = _bottleneck(x, width, out, stride if b == 0 else 1, f"stage{s}_block{b + 1}")
    features = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = tf.keras.Model(inputs, _head(features, num_classes), name="resnet59")
    if weights and Path(weights).name == PUBLISHED["resnet50"][0]:
        _from_resnet50(model, weights)
    elif weights:
        model.load_weights(weights)
    return model


def _from_resnet50(model: tf.keras.Model, weights: str) -> None:
    """Copy ResNet-50's stem and stages (conv2..conv5 in Keras' names) into ResNet-59's stem and
    stages 1-4. Keras' convolutions have a bias and these do not; each is followed by batch
    normalisation, so the bias moves into its moving mean (BN(x + b) with mean m is BN(x) with
    mean m - b) and each convolution + batch norm computes what ResNet-50's did on the same
    input; the stem (padded as Keras pads it) computes ResNet-50's stem on the same image, which
    takes ResNet-50's input scaling (INPUT_SCALING). (The network is still not ResNet-50: stage
    1 has stride 2 here.)"""
    source = tf.keras.applications.ResNet50(include_top=False, weights=weights)
    pairs = [("conv1", "stem_conv", "stem_bn")]
    for s, (_, _, blocks, _) in enumerate(RESNET59_STAGES[:4], 1):
        for b in range(1, blocks + 1):
            ours = f"stage{s}_block{b}"
            pairs.append((f"conv{s + 1}_block{b}_0", f"{ours}_proj", f"{ours}_proj_bn"))
            pairs += [(f"conv{s + 1}_block{b}_{i}", f"{ours}_conv{i}", f"{ours}_bn{i}") for i in (1, 2, 3)]
    names = {layer.name for layer in source.layers}
    for theirs, conv, bn in pairs:
        if f"{theirs}_conv" not in names:  # only the first block of a stage has a projection
            continue
        kernel, bias = source.get_layer(f"{theirs}_conv").get_weights()
        gamma, beta, mean, variance = source.get_layer(f"{theirs}_bn").get_weights()
        model.get_layer(conv).set_weights([kernel])
        model.get_layer(bn).set_weights([gamma, beta, mean - bias, variance])


BUILDERS: dict[str, Callable[[int, int, str | None], tf.keras.Model]] = {
    "densenet121": densenet121,
    "resnet50": resnet50,
    "resnet59": resnet59,
    "small_cnn": small_cnn,
}


# The smallest input side each builder takes (Keras' DenseNet and ResNet refuse below 32; the
# small CNN's three 2x2 poolings need 8); the others take any side.
MIN_SIZE = {"densenet121": 32, "resnet50": 32, "small_cnn": 8}


def check_model(name: str, image_size: int) -> None:
    """A registered model, at a side it can take: else one line naming the flag."""
    if name not in BUILDERS and space.code_of_model(name) is None:
        raise InputError("--model", f"unknown model {name!r} (choose from {', '.join(BUILDERS)}, "
                         "or nas-<8 digits from 0, 1, 2>)")
    if image_size < MIN_SIZE.get(name, 1):
        raise InputError("--image-size", f"{image_size}: {name} takes at least {MIN_SIZE[name]} px")


def build_model(name: str, image_size: int, num_classes: int = NUM_CLASSES,
                weights: str | None = None) -> tf.keras.Model:
    """Build a registered model; `weights` is None/'none' or the path of a local weights file."""
    check_model(name, image_size)
    code = space.code_of_model(name)
    if weights in (None, "", "none"):
        weights = None
    elif not Path(weights).is_file():
        raise InputError(weights, "weights file not found (nothing is downloaded)")
    try:
        if code is None:
            return BUILDERS[name](image_size, num_classes, weights)
        model = space.build(code, image_size, num_classes)
        if weights:
            model.load_weights(weights)
        return model
    except (ValueError, OSError, KeyError) as err:  # Keras' words for a file that does not fit
        if weights is None:
            raise
        raise InputError(weights, f"not weights of a {name} with {num_classes} classes at "
                         f"{image_size} px ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


# Each backbone's input scaling (views.scale_pixels): the one Keras' ImageNet weights for it were
# trained on (keras.applications' preprocess_input), used whatever the initialisation, so that
# weights trained here always meet the scaling they were trained with. Others: "torch".
INPUT_SCALING = {"densenet121": "torch", "resnet50": "caffe", "resnet59": "caffe"}


def input_scaling(name: str) -> str:
    """The input scaling model `name` takes (INPUT_SCALING; "torch" for the rest)."""
    return INPUT_SCALING.get(name, "torch")


def with_preprocessing(model: tf.keras.Model, side: int, scaling: str = "torch") -> tf.keras.Model:
    """`model` behind `views.preprocess` as a layer of its graph: it takes the uint8 images the
    training pipeline ships for fixed-size records ([B, side, side, 1]: the stored image, or a
    --crop window of it), so resizing, scaling, replication to 3 channels and the backbone's
    input scaling run where the model runs (a GPU), not on the CPU. The weights are `model`'s
    own: checkpoints hold `model`, which takes preprocessed input."""
    size = model.input_shape[1]
    pixels = tf.keras.Input((side, side, 1), dtype=tf.uint8, name="pixels")
    images = tf.keras.layers.Lambda(data.plain(lambda t: views.preprocess(t, size, scaling)), name="preprocess")(pixels)
    return tf.keras.Model(pixels, model(images), name=f"{model.name}_on_pixels")


def cam_layer(model: tf.keras.Model) -> tf.keras.layers.Layer:
    """The layer class activation maps are taken at: the last layer with a spatial [B, H, W, C]
    output (the backbones' final activation, before global pooling); for the small CNN `conv2`,
    at half resolution: on 64-px synthetic images its map peaked inside the planted finding for
    86% of positive test images (after its max-pool, `pool2`, for 70%), against 56% for conv1,
    61% for conv3 and 4% for last_conv, whose 8x8 cells are coarser than the findings."""
    if model.name == "small_cnn":
        return model.get_layer("conv2")
    return next(layer for layer in reversed(model.layers) if len(layer.output.shape) == 4)
