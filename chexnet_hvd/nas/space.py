"""The NAS-Bench-Macro search space that GenNAS searched (Su et al., CVPR 2021): a fixed stem and
head around 8 searchable layers in three stages, each layer one of three ops, so 3^8 = 6,561 codes.

A code is 8 digits, one per layer: 0 identity, 1 MobileNetV2 block kernel 3 expansion 3, 2 the
same with kernel 5 expansion 6. An identity on a stride-1 layer changes nothing but the depth at
which the stage's other blocks run, so it is moved to the end of its stage (the canonical key):
the 6,561 codes are 3,969 distinct networks, and the search trains each network once.
"""

from __future__ import annotations

import itertools
import re

NUM_LAYERS = 8
OPS = {0: "identity", 1: "MB k3 e3", 2: "MB k5 e6"}
MB_OPS = {1: (3, 3), 2: (5, 6)}  # op -> (kernel, expansion)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The 8 searchable layers (NAS-Bench-Macro): (output channels, stride); stages of 2, 3, 3 layers,
# each stage opening with its stride-2 layer.
LAYERS = [
    (64, 2), (64, 1),
    (128, 2), (128, 1), (128, 1),
    (256, 2), (256, 1), (256, 1),
]
STAGES = [(0, 2), (2, 5), (5, 8)]  # [start, end) layer indices
CODE_RE = re.compile(r"[012]{8}")
MODEL_PREFIX = "nas-"


def is_code(code: object) -> bool:
    """True for a string of exactly 8 digits from {0, 1, 2}."""
    return isinstance(code, str) and CODE_RE.fullmatch(code) is not None


def all_codes() -> list[str]:
    """The 6,561 codes in lexicographic order."""
    return ["".join(p) for p in itertools.product("012", repeat=NUM_LAYERS)]


def canonical(code: str) -> str:
    """The code of the network actually built: in every stage, the identities of the stride-1
    layers move behind its blocks (the stride-2 opener stays, its identity is a real conv)."""
    if not is_code(code):
        raise ValueError(f"not an architecture code (8 digits from 0, 1, 2): {code!r}")
    out = []
    for start, end in STAGES:
        rest = code[start + 1:end]
        blocks = rest.replace("0", "")
        out.append(code[start] + blocks + "0" * (len(rest) - len(blocks)))
    return "".join(out)


def model_name(code: str) -> str:
    """The trainer's --model name of an architecture, e.g. nas-22212220."""
    return MODEL_PREFIX + canonical(code)


def code_of_model(name: str) -> str | None:
    """The code in a model name made by model_name, or None for any other name."""
    if name.startswith(MODEL_PREFIX) and is_code(name[len(MODEL_PREFIX):]):
        return name[len(MODEL_PREFIX):]
    return None


def describe() -> str:
    """The space in words (the LLM proposer's prompt uses it)."""
    layers = ", ".join(f"L{i + 1} {c} channels stride {s}" for i, (c, s) in enumerate(LAYERS))
    return (f"Stem 3x3 conv to {STEM_CHANNELS} channels; 8 searchable layers: {layers}; head 1x1 "
            f"conv to {HEAD_CHANNELS}, global average pool, one sigmoid per class. Each layer is "
            "op 0 (identity; a 1x1 stride-2 conv on stride-2 layers), 1 (MobileNetV2 block, "
            "kernel 3, expansion 3) or 2 (MobileNetV2 block, kernel 5, expansion 6). An "
            "architecture is written as 8 digits, one op per layer L1..L8, e.g. 12012201.")


def build(code: str, image_size: int = 32, num_classes: int = 10, sigmoid: bool = True):
    """The Keras model of an architecture (its canonical form), NAS-Bench-Macro exactly: no conv
    has a bias; the head is Dense(num_classes). `sigmoid` ends it like every model of the suite
    (float32 sigmoid `predictions`); False leaves logits, as in the CIFAR-10 benchmark."""
    import tensorflow as tf

    layers = tf.keras.layers
    code = canonical(code)

    def conv_bn(x, filters, kernel, stride, name, relu=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, "same", use_bias=False, name=name)(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, "same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = layers.Input((image_size, image_size, 3), name="image")
    x = conv_bn(inputs, STEM_CHANNELS, 3, 1, "stem")
    for i, (op, (channels, stride)) in enumerate(zip(map(int, code), LAYERS, strict=True), 1):
        name = f"l{i}"
        if op == 0:
            if stride != 1:  # an identity cannot halve the map: a strided 1x1 conv stands in
                x = conv_bn(x, channels, 1, stride, f"{name}_reduce", relu=False)
            continue
        kernel, expansion = MB_OPS[op]
        y = conv_bn(x, x.shape[-1] * expansion, 1, 1, f"{name}_expand")
        y = conv_bn(y, None, kernel, stride, f"{name}_dw", depthwise=True)
        y = conv_bn(y, channels, 1, 1, f"{name}_project", relu=False)
        x = layers.Add(name=f"{name}_add")([x, y]) if stride == 1 and x.shape[-1] == channels else y
    x = conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    if sigmoid:
        x = layers.Activation("sigmoid", dtype="float32", name="predictions")(x)
    return tf.keras.Model(inputs, x, name=f"nas_{code}")
