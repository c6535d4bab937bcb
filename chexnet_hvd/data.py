"""tf.data input pipelines over the records, and `preprocess`, shared with evaluation and inference.

Training order (DESIGN.md, section 4): sorted files -> shard by rank before any shuffle (disjoint,
complete) -> seeded file shuffle per epoch -> parallel interleave -> record shuffle buffer ->
parallel parse/decode/augment/preprocess -> batch(drop_remainder) -> prefetch. With fewer files
than ranks, records are sharded instead of files. Evaluation reads each record exactly once
across ranks, in order, with no dropped remainder.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from chexnet_hvd import records

AUTOTUNE = tf.data.AUTOTUNE
# ImageNet statistics: the backbones' pretrained weights expect them (and CheXNet used them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 grayscale [H, W, 1] (or a batch) -> float32 [S, S, 3], ImageNet mean/std.

    The one preprocessing used by training, evaluation and inference: bilinear resize with
    antialiasing, scale to [0, 1], replicate to 3 channels, normalise.
    """
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (image_size, image_size),
                            method="bilinear", antialias=True)
    image = tf.image.grayscale_to_rgb(image)
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def decode(example: dict) -> tf.Tensor:
    """PNG bytes -> uint8 [H, W, 1]."""
    return tf.io.decode_png(example["image/png"], channels=1)


def rank_shards(shards: list[tuple[str, int]], rank: int, world_size: int) -> tuple[list[str], bool]:
    """This rank's files (every world_size-th of the sorted list), or all files plus a flag saying
    records must be sharded instead, when there are fewer files than ranks."""
    files = [path for path, _ in sorted(shards)]
    if len(files) >= world_size:
        return files[rank::world_size], False
    return files, True


def records_per_rank(shards: list[tuple[str, int]], world_size: int) -> list[int]:
    """How many records each rank reads per pass, from the manifest's counts alone."""
    shards = sorted(shards)
    if len(shards) >= world_size:
        return [sum(c for _, c in shards[r::world_size]) for r in range(world_size)]
    total = sum(c for _, c in shards)
    return [total // world_size + (r < total % world_size) for r in range(world_size)]


def _read(files: list[str], rank: int, world_size: int, by_record: bool, deterministic: bool,
          shuffle_files_seed=None) -> tf.data.Dataset:
    """Serialized records of these files; with a seed (a [2] tensor), in a file order that is a
    pure function of it (stateless, so Dataset.shuffle's global-seed rules do not apply)."""
    if by_record:
        return tf.data.TFRecordDataset(files).shard(world_size, rank)
    names = tf.constant(files)
    if shuffle_files_seed is not None:
        names = tf.gather(names, tf.argsort(tf.random.stateless_uniform([len(files)], shuffle_files_seed)))
    return tf.data.Dataset.from_tensor_slices(names).interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                         num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def train_dataset(data_dir: str | Path, split: str, image_size: int, batch_size: int,
                  rank: int = 0, world_size: int = 1, seed: int = 0, augment: bool = True,
                  shuffle_buffer: int = 2048, deterministic: bool = False,
                  steps_per_epoch: int | None = None, start_epoch: int = 0,
                  epochs: int | None = None, with_ids: bool = False) -> tf.data.Dataset:
    """(image, label, mask) batches for this rank: one pass over its share per epoch, in an order
    fixed by (seed, epoch, rank) and cut to `steps_per_epoch` batches, so epoch e is the same
    whether the run started at 0 or was resumed at e. `epochs=None`: endless."""
    manifest = records.load_manifest(data_dir)
    num_classes = manifest["num_classes"]
    files, by_record = rank_shards(records.split_shards(manifest, data_dir, split), rank, world_size)

    def one_pass(epoch):
        epoch_seed = tf.stack([tf.constant(seed * 1009 + rank, tf.int64), epoch])
        ds = _read(files, rank, world_size, by_record, deterministic, shuffle_files_seed=epoch_seed)
        # A fixed integer seed; the order still changes every epoch because the file order does.
        ds = ds.shuffle(shuffle_buffer, seed=seed * 1009 + rank)
        if steps_per_epoch:
            ds = ds.take(steps_per_epoch * batch_size)
        return ds.enumerate().map(lambda i, r: (r, tf.stack([epoch_seed[0] + epoch * 1_000_003, i])))

    def parse(serialized, flip_seed):
        example = records.parse_example(serialized, num_classes)
        image = decode(example)
        if augment:  # CheXNet's only augmentation; stateless, so a resumed epoch flips the same
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        out = (preprocess(image, image_size), example["label"], example["mask"])
        return out + (example["image/id"],) if with_ids else out

    last = tf.int64.max if epochs is None else start_epoch + epochs
    ds = tf.data.Dataset.range(start_epoch, last).flat_map(one_pass)
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(data_dir: str | Path, split: str, image_size: int, batch_size: int,
                 rank: int = 0, world_size: int = 1) -> tf.data.Dataset:
    """Dicts of image, label, mask, id, patient: this rank's part, each record exactly once."""
    manifest = records.load_manifest(data_dir)
    num_classes = manifest["num_classes"]
    files, by_record = rank_shards(records.split_shards(manifest, data_dir, split), rank, world_size)
    ds = _read(files, rank, world_size, by_record, deterministic=True, shuffle_files_seed=None)

    def parse(serialized):
        example = records.parse_example(serialized, num_classes)
        return {"image": preprocess(decode(example), image_size), "label": example["label"],
                "mask": example["mask"], "id": example["image/id"], "patient": example["patient/id"]}

    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
