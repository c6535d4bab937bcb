"""tf.data input pipelines over the records (or a raw-image index), and `preprocess`, shared with
evaluation and inference.

Training order (DESIGN.md, section 4): sorted files -> shard by rank before any shuffle (disjoint,
complete) -> seeded file shuffle per epoch -> parallel interleave -> record shuffle buffer ->
parallel parse/decode/augment/preprocess -> batch(drop_remainder) -> prefetch. With fewer files
than ranks, records are sharded instead of files. Evaluation reads each record exactly once
across ranks, in order, with no dropped remainder. A raw index (records --format raw) takes the
same path with image files in place of records: every world_size-th row per rank, a seeded
permutation per epoch, then read + decode in the parallel map.
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


def is_raw(manifest: dict) -> bool:
    """A raw-image index (records --format raw): CSV lists of image files instead of shards."""
    return manifest.get("encoding") == records.RAW_ENCODING


class _Source:
    """A split's records for one rank, before parsing: serialized TFRecords, or for a raw index
    the rows (path, label, mask, id, patient) of the listed image files. `items(seed)` gives
    them in an order that is a pure function of the [2] seed tensor (stateless, so
    Dataset.shuffle's global-seed rules do not apply), or in stored order without a seed."""

    def __init__(self, data_dir, split: str, rank: int, world_size: int, deterministic: bool):
        self.manifest = records.load_manifest(data_dir)
        self.num_classes = self.manifest["num_classes"]
        self.raw = is_raw(self.manifest)
        self.deterministic, self.rank, self.world_size = deterministic, rank, world_size
        shards = records.split_shards(self.manifest, data_dir, split)
        if self.raw:  # every world_size-th row: disjoint, complete, the same counts as records
            rows = records.read_raw_index([path for path, _ in shards])
            self.rows = {k: v[rank::world_size] for k, v in rows.items()}
        else:
            self.files, self.by_record = rank_shards(shards, rank, world_size)

    def _order(self, n: int, seed):
        return tf.argsort(tf.random.stateless_uniform([n], seed))

    def items(self, seed=None) -> tf.data.Dataset:
        if self.raw:
            rows = self.rows
            if seed is not None:
                order = self._order(len(rows["path"]), seed)
                rows = {k: tf.gather(v, order) for k, v in rows.items()}
            return tf.data.Dataset.from_tensor_slices(rows)
        if self.by_record:
            return tf.data.TFRecordDataset(self.files).shard(self.world_size, self.rank)
        names = tf.constant(self.files)
        if seed is not None:
            names = tf.gather(names, self._order(len(self.files), seed))
        return tf.data.Dataset.from_tensor_slices(names).interleave(
            tf.data.TFRecordDataset, cycle_length=min(len(self.files), 8),
            num_parallel_calls=AUTOTUNE, deterministic=self.deterministic)

    def example(self, item) -> dict:
        """An item -> image (uint8 [H, W, 1]), label, mask, id, patient."""
        if self.raw:  # PNG or JPEG, any mode; 16-bit scaled to 8-bit
            image = tf.io.decode_image(tf.io.read_file(item["path"]), channels=1, dtype=tf.uint8,
                                       expand_animations=False)
            return {"image": image, "label": item["label"], "mask": item["mask"],
                    "id": item["id"], "patient": item["patient"]}
        example = records.parse_example(item, self.num_classes)
        return {"image": decode(example), "label": example["label"], "mask": example["mask"],
                "id": example["image/id"], "patient": example["patient/id"]}


def train_dataset(data_dir: str | Path, split: str, image_size: int, batch_size: int,
                  rank: int = 0, world_size: int = 1, seed: int = 0, augment: bool = True,
                  shuffle_buffer: int = 2048, deterministic: bool = False,
                  steps_per_epoch: int | None = None, start_epoch: int = 0,
                  epochs: int | None = None, with_ids: bool = False) -> tf.data.Dataset:
    """(image, label, mask) batches for this rank: one pass over its share per epoch, in an order
    fixed by (seed, epoch, rank) and cut to `steps_per_epoch` batches, so epoch e is the same
    whether the run started at 0 or was resumed at e. `epochs=None`: endless."""
    source = _Source(data_dir, split, rank, world_size, deterministic)

    def one_pass(epoch):
        epoch_seed = tf.stack([tf.constant(seed * 1009 + rank, tf.int64), epoch])
        ds = source.items(epoch_seed)
        # A fixed integer seed; the order still changes every epoch because the file order does.
        ds = ds.shuffle(shuffle_buffer, seed=seed * 1009 + rank)
        if steps_per_epoch:
            ds = ds.take(steps_per_epoch * batch_size)
        return ds.enumerate().map(lambda i, r: (r, tf.stack([epoch_seed[0] + epoch * 1_000_003, i])))

    def parse(item, flip_seed):
        example = source.example(item)
        image = example["image"]
        if augment:  # CheXNet's only augmentation; stateless, so a resumed epoch flips the same
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        out = (preprocess(image, image_size), example["label"], example["mask"])
        return out + (example["id"],) if with_ids else out

    last = tf.int64.max if epochs is None else start_epoch + epochs
    ds = tf.data.Dataset.range(start_epoch, last).flat_map(one_pass)
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(AUTOTUNE)


TTA_MODES = ("none", "flip", "tencrop")
TENCROP_SCALE = 256 / 224  # CheXNet: resize to 256, ten 224 crops


def tta_views(image: tf.Tensor, image_size: int, mode: str) -> tf.Tensor:
    """uint8 [H, W, 1] -> preprocessed views [V, S, S, 3] whose predictions are averaged.
    none: the image (V=1); flip: it and its mirror (V=2); tencrop: resized to S x 256/224, the
    four corner crops and the centre crop of side S, then the five mirrored (V=10)."""
    if mode == "none":
        return preprocess(image, image_size)[None]
    if mode == "flip":
        view = preprocess(image, image_size)
        return tf.stack([view, tf.image.flip_left_right(view)])
    big = int(round(image_size * TENCROP_SCALE))
    full = preprocess(image, big)
    s, e, c = image_size, big - image_size, (big - image_size) // 2
    crops = tf.stack([full[:s, :s], full[:s, e:], full[e:, :s], full[e:, e:], full[c:c + s, c:c + s]])
    return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)


def eval_dataset(data_dir: str | Path, split: str, image_size: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, tta: str | None = None) -> tf.data.Dataset:
    """Dicts of image, label, mask, id, patient: this rank's part, each record exactly once.
    With `tta`, image holds the views of `tta_views` ([B, V, S, S, 3])."""
    source = _Source(data_dir, split, rank, world_size, deterministic=True)

    def parse(item):
        example = source.example(item)
        image = (preprocess(example["image"], image_size) if tta is None
                 else tta_views(example["image"], image_size, tta))
        return example | {"image": image}

    ds = source.items().map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def synthetic_dataset(image_size: int, batch_size: int, num_classes: int, seed: int = 0) -> tf.data.Dataset:
    """One random preprocessed batch held in memory and repeated: the same element structure as
    `train_dataset`, with no input cost (benchmarks compare the two)."""
    g = tf.random.Generator.from_seed(seed)
    images = g.normal((batch_size, image_size, image_size, 3))
    labels = tf.cast(g.uniform((batch_size, num_classes)) < 0.1, tf.float32)
    return tf.data.Dataset.from_tensors((images, labels, tf.ones_like(labels))).repeat()


def predictions(predict, dataset: tf.data.Dataset) -> dict:
    """Run `predict` ([N, S, S, 3] -> [N, C]) over an `eval_dataset`: probabilities (averaged
    over the views when it has a TTA axis), labels, masks, ids and patients, as numpy."""
    import numpy as np

    parts: dict[str, list] = {"prob": [], "label": [], "mask": [], "id": [], "patient": []}
    for batch in dataset:
        images = batch["image"].numpy()
        if images.ndim == 5:  # [B, V, S, S, 3]: predict all views, average per image
            flat = np.asarray(predict(images.reshape(-1, *images.shape[2:])), np.float32)
            parts["prob"].append(flat.reshape(images.shape[0], images.shape[1], -1).mean(axis=1))
        else:
            parts["prob"].append(np.asarray(predict(images), np.float32))
        for key in ("label", "mask", "id", "patient"):
            parts[key].append(batch[key].numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
