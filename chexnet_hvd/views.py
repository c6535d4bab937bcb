"""What a model sees of a stored image (`View`): its side S, its backbone's input scaling (Keras'
"torch" mode for DenseNet, "caffe" for the ResNets' ImageNet weights), and with --crop CheXNet's
geometry: S-px windows of the image at S x 256/224, random in training (chexnet_hvd.data), the
centre one in evaluation and inference, the corners and centre (and mirrors) in ten-crop. The one
preprocessing of training (in the input pipeline or the model's graph), evaluation and inference.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

# ImageNet statistics: the backbones' pretrained weights expect them (and CheXNet used them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keras' "caffe" mode (its ResNet-50 ImageNet weights were trained on it): BGR, 0-255, the
# ImageNet mean subtracted per channel (B, G, R), no division.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
SCALINGS = ("torch", "caffe")  # Keras' names: /255 then mean/std (DenseNet), or caffe (ResNet)
CROP_SCALE = 256 / 224  # CheXNet's geometry: the image at S x 256/224, S-px windows of it


def scale_pixels(image: tf.Tensor, scaling: str = "torch") -> tf.Tensor:
    """Float grey levels 0-255 [..., 1] -> the 3-channel input a backbone's ImageNet weights were
    trained on: "torch" (/255, ImageNet mean/std, RGB) or "caffe" (0-255, BGR mean subtracted)."""
    rgb = tf.image.grayscale_to_rgb(image)
    if scaling == "caffe":
        return rgb[..., ::-1] - CAFFE_MEAN_BGR  # BGR order as Keras' caffe mode (grey: equal channels)
    if scaling != "torch":
        raise ValueError(f"unknown input scaling {scaling!r} (one of {SCALINGS})")
    return (rgb / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def preprocess(image: tf.Tensor, image_size: int, scaling: str = "torch") -> tf.Tensor:
    """uint8 grayscale [H, W, 1] (or a batch) -> float32 [S, S, 3] as the backbone expects.

    The one preprocessing used by training (in the input pipeline or in the model's graph),
    evaluation and inference: bilinear resize with antialiasing (exactly the identity when the
    size is already S), replication to 3 channels, the backbone's input scaling (`scale_pixels`).
    """
    image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                            method="bilinear", antialias=True)
    return scale_pixels(image, scaling)


@dataclasses.dataclass(frozen=True)
class View:
    """How a model's input is made from a stored image: its side S, its backbone's input scaling
    (`scale_pixels`), and whether it sees S-px windows of the image at S x 256/224 (--crop:
    random windows in training, the centre one in evaluation) or the whole image."""

    image_size: int
    scaling: str = "torch"
    crop: bool = False

    @classmethod
    def of(cls, meta: dict) -> View:
        """The view a checkpoint's (or an export's) meta.json records; one written before these
        were recorded trained on the whole image with torch scaling."""
        return cls(meta["image_size"], meta.get("scaling") or "torch", bool(meta.get("crop")))


def as_view(view: View | int) -> View:
    """`view`, or a model side alone as the default view of that side."""
    return view if isinstance(view, View) else View(int(view))


def crop_scale_side(image_size: int) -> int:
    """The side of the image that --crop takes S-px windows of: S x 256/224, rounded."""
    return round(image_size * CROP_SCALE)


def window_side(stored, image_size: int):
    """The side, in stored pixels, of an S-px window of the image at S x 256/224 (S itself when
    the records are stored at that size); `stored` an int or an int tensor."""
    scaled = crop_scale_side(image_size)
    return (2 * image_size * stored + scaled) // (2 * scaled)  # round(S x stored / scaled)


def shipped_side(stored: int, view: View) -> int:
    """The side of the uint8 images the training pipeline ships for `view` (fixed-size records):
    the stored image, or with --crop a window of it."""
    return window_side(stored, view.image_size) if view.crop else stored


PLACES = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


def window_box(height, width, image_size: int, place: str = "centre") -> tuple:
    """(top, left, rows, columns) of the S-px window at `place` (one of PLACES) of an image of
    `height` x `width` stored pixels at S x 256/224 (`window_side`, each axis on its own)."""
    rows, cols = window_side(height, image_size), window_side(width, image_size)
    vertical, _, horizontal = place.partition("-")
    top = {"top": 0, "bottom": height - rows, "centre": (height - rows) // 2}[vertical]
    left = {"left": 0, "right": width - cols, "centre": (width - cols) // 2}[horizontal or vertical]
    return top, left, rows, cols


def window(image: tf.Tensor, image_size: int, place: str = "centre") -> tf.Tensor:
    """The window of `window_box` of a stored image [H, W, 1] (static sizes stay static; a
    NumPy image, as predict reads one, too)."""
    image = tf.convert_to_tensor(image)
    static = image.shape[:2]
    height, width = (int(static[0]), int(static[1])) if static.is_fully_defined() else tf.unstack(tf.shape(image)[:2])
    top, left, rows, cols = window_box(height, width, image_size, place)
    return image[top:top + rows, left:left + cols]


def model_input(image: tf.Tensor, view: View | int) -> tf.Tensor:
    """A stored image (uint8 [H, W, 1]) as the model sees it in evaluation and inference: the
    whole image, or with --crop its centre window, preprocessed ([S, S, 3])."""
    view = as_view(view)
    if view.crop:
        image = window(image, view.image_size)
    return preprocess(image, view.image_size, view.scaling)


TTA_MODES = ("none", "flip", "tencrop")


def tta_views(image: tf.Tensor, view: View | int, mode: str) -> tf.Tensor:
    """uint8 [H, W, 1] -> preprocessed views [V, S, S, 3] whose predictions are averaged.
    none: the model's input (`model_input`, V=1); flip: it and its mirror (V=2); tencrop: the
    four corner windows and the centre window of the image at S x 256/224 (`window`: the scale
    --crop trains at; the centre one is a --crop model's own input), then the five mirrored
    (V=10)."""
    view = as_view(view)
    if mode == "none":
        return model_input(image, view)[None]
    if mode == "flip":
        one = model_input(image, view)
        return tf.stack([one, tf.image.flip_left_right(one)])
    crops = tf.stack([preprocess(window(image, view.image_size, place), view.image_size, view.scaling)
                      for place in PLACES])
    return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)
