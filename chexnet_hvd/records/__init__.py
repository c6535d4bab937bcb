"""What a records directory is: the TFRecord schema (one definition, for writing and parsing),
manifest.json and its checks, and the raw-image index of `--format raw`. The writer and its CLI,
`python -m chexnet_hvd.records`, are `chexnet_hvd.records.writer`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from chexnet_hvd import cli, metadata

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.csv"
MISSING = "missing.csv"  # listed images not found in the image folders: image, split
RAW_ENCODING = "raw-index"  # --format raw: per-split CSV lists of the image files, no conversion
# How a record holds its image: grayscale PNG bytes (any size: source-size records), or the
# uncompressed uint8 pixels of an image resized offline to image_size x image_size, which cost
# a CPU core next to nothing to read (the float work then runs in the model's graph).
IMAGE_KEYS = {"png": "image/png", "uint8": "image/uint8"}


# ---------------------------------------------------------------- schema (one definition) ----
def feature_spec(num_classes: int, encoding: str = "png") -> dict:
    """The tf.io feature spec every reader parses with; `serialize_example` writes the same keys."""
    import tensorflow as tf

    return {
        IMAGE_KEYS[encoding]: tf.io.FixedLenFeature([], tf.string),
        "image/id": tf.io.FixedLenFeature([], tf.string),
        "patient/id": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([num_classes], tf.float32),
        "mask": tf.io.FixedLenFeature([num_classes], tf.float32),
        # The dataset a record came from (manifest "sources"); absent in records written before
        # merging existed, hence the default.
        "source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def serialize_example(image: bytes, image_id: str, patient: str, label, mask,
                      encoding: str = "png", source: str = "") -> bytes:
    """One record in the schema of `feature_spec`."""
    import tensorflow as tf

    def b(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def f(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(map(float, v))))

    feature = {IMAGE_KEYS[encoding]: b(image), "image/id": b(image_id.encode()),
               "patient/id": b(patient.encode()), "label": f(label), "mask": f(mask),
               "source": b(source.encode())}
    # deterministic: the features map in key order; protobuf's default order is not fixed
    # (it varied between runs under protobuf 7, so equal records were not equal bytes)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def parse_example(serialized, num_classes: int, encoding: str = "png") -> dict:
    """Parse one serialized record (a scalar string tensor) into the feature dict."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec(num_classes, encoding))


def parse_batch(serialized, num_classes: int, encoding: str = "png") -> dict:
    """Parse a batch of serialized records (a [B] string tensor) into the feature dict, in one op."""
    import tensorflow as tf

    return tf.io.parse_example(serialized, feature_spec(num_classes, encoding))


def load_manifest(data_dir: str | Path) -> dict:
    """manifest.json of a records directory; a clear error when it is not one."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise cli.InputError(data_dir, "no such directory")
    if not path.is_file():
        raise cli.InputError(data_dir, f"no {MANIFEST}: not a complete records directory "
                             "(write one with python -m chexnet_hvd.records)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise cli.InputError(path, f"not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise cli.InputError(path, f"records schema {found}, this suite reads {SCHEMA_VERSION}")
    return manifest


def check_image_size(manifest: dict, data_dir: str | Path, image_size: int) -> None:
    """A model input larger than the records' stored size would train on upsampled, blurred
    images without a word: refused."""
    stored = manifest.get("image_size")
    if stored and image_size > stored:
        raise cli.InputError(data_dir, f"records stored at {stored} px, the model takes {image_size}: "
                             f"write records with --image-size {image_size} or more, or use a "
                             f"model size of at most {stored}")


def write_errors() -> tuple[type[Exception], ...]:
    """What a file write (a shard, a checkpoint, an export) fails with when the file system
    refuses it: a full disk or quota (TensorFlow's ResourceExhausted), a permission. A collective
    failing inside a save (the tf engine reads variables through one) is not the disk's fault and
    keeps its own handling."""
    import tensorflow as tf

    return OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError


def split_signature(manifest: dict, split: str) -> dict:
    """Which records a split holds, in brief: its shards, records and a digest of every shard's
    (file, records, bytes, key: the rows it was written from, in order). Two records directories
    with the same signature are copies (staged to another path, say); a rewrite with another
    shard size, other images or the same images in another order is not."""
    shards = sorted((s["file"], s["count"], s.get("bytes"), s.get("key")) for s in manifest["splits"][split]["shards"])
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
    return {"shards": len(shards), "records": sum(shard[1] for shard in shards), "digest": digest}


def split_shards(manifest: dict, data_dir: str | Path, split: str) -> list[tuple[str, int]]:
    """Sorted (path, record count) of a split's shards; an error when the split is empty."""
    info = manifest["splits"].get(split)
    if not info or not info["shards"]:
        raise cli.InputError(data_dir, f"no records for split {split!r}")
    shards = []
    for shard in info["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise cli.InputError(path, "shard listed in the manifest is missing")
        if "bytes" in shard and path.stat().st_size != shard["bytes"]:
            raise cli.InputError(path, f"{path.stat().st_size} bytes, the manifest says "
                                 f"{shard['bytes']}: truncated or changed since it was written")
        shards.append((str(path), shard["count"]))
    return sorted(shards)


def read_raw_index(files: list[str]) -> dict[str, np.ndarray]:
    """The rows of raw-index CSVs as arrays: path, label [N, C], mask [N, C], id, patient."""
    frame = pd.concat([pd.read_csv(f, dtype={"image": str, "path": str, "patient": str}) for f in files],
                      ignore_index=True)
    names = metadata.class_names(frame)
    return {"path": frame["path"].to_numpy(str), "id": frame["image"].to_numpy(str),
            "patient": frame["patient"].to_numpy(str),
            "label": frame[metadata.label_columns(names)].to_numpy(np.float32),
            "mask": frame[metadata.mask_columns(names)].to_numpy(np.float32)}
