"""tf.data input pipelines over the records (or a raw-image index), and `preprocess`, shared with
evaluation and inference.

Which records a rank reads in an epoch is decided by `chexnet_hvd.sharding` (pure, tested at
every world size up to 256): each rank its own contiguous range of steps x batch records of the
split's shards in a per-epoch order, so every rank trains the same number of steps, no record
twice, fewer than one global batch left out, and a different part each epoch. Training order per
rank: its segments of shards -> parallel interleave -> shuffle within blocks, seeded per (seed,
rank, epoch) -> parallel parse/decode/flip/preprocess (uint8 records: decode/flip only, the model
preprocesses) -> batch(drop_remainder) -> prefetch, on a private thread pool of the rank's
threads. Evaluation reads each record exactly once across ranks, with no dropped remainder. A raw
index (records --format raw) takes the same path with its rows (image files) as the units.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from chexnet_hvd import records, sharding
from chexnet_hvd.images import to_8bit

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


def decode(example: dict, encoding: str = "png", size: int | None = None) -> tf.Tensor:
    """A record's image -> uint8 [H, W, 1]: PNG bytes decoded, or uint8 pixels reshaped."""
    if encoding == "uint8":
        pixels = tf.io.decode_raw(example[records.IMAGE_KEYS["uint8"]], tf.uint8)
        return tf.reshape(pixels, [size, size, 1])
    return tf.io.decode_png(example[records.IMAGE_KEYS["png"]], channels=1)


def preprocess_on_device(manifest: dict) -> bool:
    """uint8 records are fixed-size pixels: the CPU pipeline ships them as they are and the
    model's graph (`models.with_preprocessing`) does `preprocess` on the accelerator."""
    return manifest.get("encoding") == "uint8"


def decode_file(raw: tf.Tensor) -> tf.Tensor:
    """Image file bytes (PNG, or grey/RGB JPEG: the raw index rejects what TF cannot decode) ->
    uint8 [H, W, 1], converted as the records writer
    converts them: 16-bit PNGs scaled by their real range (`images.to_8bit`)."""
    sixteen = tf.logical_and(tf.strings.substr(raw, 0, 4) == b"\x89PNG",
                             tf.strings.substr(raw, 24, 1) == b"\x10")  # IHDR bit depth

    def wide():
        values = tf.io.decode_png(raw, channels=1, dtype=tf.uint16)
        gray = tf.numpy_function(lambda v: to_8bit(v)[0], [values], tf.uint8)
        return tf.reshape(gray, tf.shape(values))

    return tf.cond(sixteen, wide, lambda: tf.io.decode_image(raw, channels=1, dtype=tf.uint8,
                                                             expand_animations=False))


def is_raw(manifest: dict) -> bool:
    """A raw-image index (records --format raw): CSV lists of image files instead of shards."""
    return manifest.get("encoding") == records.RAW_ENCODING


class Records:
    """A records directory (or raw-image index) opened once: its manifest, and each split's
    units as (path, record count), checked against the manifest when first asked for. The
    trainer opens its data once and builds every dataset from this."""

    def __init__(self, data_dir: str | Path, manifest: dict):
        self.data_dir, self.manifest = Path(data_dir), manifest
        self._units: dict[str, list[tuple[str, int]]] = {}

    def units(self, split: str) -> list[tuple[str, int]]:
        """Sorted (path, record count) of the split's units; a one-line error when it has none."""
        if split not in self._units:
            self._units[split] = records.split_shards(self.manifest, self.data_dir, split)
        return self._units[split]


def open_records(data: Records | str | Path) -> Records:
    """`data` opened (its manifest read and checked), or as it is when already open."""
    if isinstance(data, Records):
        return data
    return Records(Path(data), records.load_manifest(data))


class _Source:
    """A split's units (shard files, or the rows of a raw index) with their record counts, and
    `read(segments)`: the records of [k, 3] (unit, skip, take) segments, before parsing."""

    def __init__(self, data: Records | str | Path, split: str):
        opened = open_records(data)
        self.manifest = opened.manifest
        self.num_classes = self.manifest["num_classes"]
        self.raw = is_raw(self.manifest)
        self.encoding, self.stored_size = self.manifest.get("encoding"), self.manifest["image_size"]
        shards = opened.units(split)
        if self.raw:  # every row a unit of one record
            self.rows = {k: tf.constant(v) for k, v in
                         records.read_raw_index([path for path, _ in shards]).items()}
            self.counts = [1] * int(self.rows["path"].shape[0])
        else:
            self.files = tf.constant([path for path, _ in shards])
            self.counts = [count for _, count in shards]

    def read(self, segments: tf.Tensor) -> tf.data.Dataset:
        if self.raw:
            return tf.data.Dataset.from_tensor_slices(
                {k: tf.gather(v, segments[:, 0]) for k, v in self.rows.items()})

        def segment(seg):
            return tf.data.TFRecordDataset(tf.gather(self.files, seg[0])).skip(seg[1]).take(seg[2])

        return tf.data.Dataset.from_tensor_slices(segments).interleave(
            segment, cycle_length=min(len(self.counts), 8), num_parallel_calls=AUTOTUNE,
            deterministic=True)  # the order is part of the plan: what a resumed epoch skips

    def example(self, item) -> dict:
        """An item -> image (uint8 [H, W, 1]), label, mask, id, patient."""
        if self.raw:  # PNG or grey/RGB JPEG
            image = decode_file(tf.io.read_file(item["path"]))
            return {"image": image, "label": item["label"], "mask": item["mask"],
                    "id": item["id"], "patient": item["patient"]}
        example = records.parse_example(item, self.num_classes, self.encoding)
        return {"image": decode(example, self.encoding, self.stored_size), "label": example["label"], "mask": example["mask"],
                "id": example["image/id"], "patient": example["patient/id"]}


def as_tensor(segments: list[sharding.Segment]) -> np.ndarray:
    """Segments as the [k, 3] int64 array `_Source.read` takes."""
    return np.asarray(segments, dtype=np.int64).reshape(-1, 3)


def sized(ds: tf.data.Dataset, threads: int | None) -> tf.data.Dataset:
    """The pipeline on a private thread pool of `threads` threads: the rank's share of the CPUs
    (its affinity under Slurm's binding), not every core of the node (TF's default)."""
    if not threads:
        return ds
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def shuffle_blocks(ds: tf.data.Dataset, size: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Shuffle within consecutive blocks of `size` records, by a permutation that is a pure
    function of (seed, block): Dataset.shuffle cannot take a seed that changes per epoch inside
    the epoch loop (it would repeat one order every epoch), this can. A record moves as far as
    in a shuffle buffer of the same size."""

    def permute(i, block):
        n = tf.shape(tf.nest.flatten(block)[0])[0]
        order = tf.argsort(tf.random.stateless_uniform([n], tf.stack([seed, i])))
        return tf.nest.map_structure(lambda t: tf.gather(t, order), block)

    return ds.batch(size).enumerate().map(permute).unbatch()


def train_dataset(data: Records | str | Path, split: str, image_size: int, batch_size: int, *,
                  rank: int = 0, world_size: int = 1, seed: int = 0, augment: bool = True,
                  shuffle_buffer: int = 2048, steps_per_epoch: int | None = None,
                  start_epoch: int = 0, epochs: int | None = None,
                  shapes: sharding.Shapes | None = None, parts: Sequence[sharding.Part] = (),
                  with_ids: bool = False, threads: int | None = None) -> tf.data.Dataset:
    """(image, label, mask) batches for this rank, `steps_per_epoch` (default: every full global
    batch) per epoch from `start_epoch` (`epochs=None`: endless). Epoch e is its layout's range
    for this rank (`sharding.epoch_layouts`, at the shape each epoch started with: `shapes`,
    default this one throughout), read in an order fixed by (seed, epoch, rank): the same
    whether the run started at 0 or was resumed at e. `parts`: what earlier attempts trained of
    `start_epoch` (a resume in mid-epoch, at this shape or another); this rank then takes its
    share of the rest (`sharding.rank_pieces`), each record in the order and with the flip its
    first reader would have given it.

    Everything up to the choice of records is deterministic, whatever the flags, so that a
    resumed epoch trains exactly the records its interrupted attempt did not. uint8 records come
    out as flipped uint8 pixels, for a model that preprocesses in its graph
    (`preprocess_on_device`)."""
    source = _Source(data, split)
    on_device = preprocess_on_device(source.manifest)
    last = 2**62 if epochs is None else start_epoch + epochs
    shapes = shapes or [(0, world_size, batch_size)]

    def plan():
        for epoch, layout in sharding.epoch_layouts(source.counts, shapes, seed, range(start_epoch, last)):
            done = list(parts) if epoch == start_epoch else []
            steps = done[0][2] if done else steps_per_epoch or layout.per_rank // layout.batch
            for piece, skip, take in sharding.rank_pieces(layout, steps, done, (world_size, batch_size), rank):
                segments = layout.tail if piece == sharding.TAIL else layout.ranks[piece]
                reader = layout.world if piece == sharding.TAIL else piece  # whose seed orders it
                yield epoch, reader, as_tensor(segments), piece == sharding.TAIL, steps * layout.batch, skip, take

    def one_piece(epoch, reader, segments, is_tail, length, skip, take):
        epoch_seed = tf.constant(seed * 1009, tf.int64) + reader + epoch * 1_000_003
        ds = source.read(segments)
        if not is_tail:  # the tail is read in stored order
            ds = shuffle_blocks(ds, shuffle_buffer, epoch_seed).take(length)
        ds = ds.enumerate().map(lambda i, r: (r, tf.stack([epoch_seed, i])))
        return ds.skip(skip).take(take)

    def parse(item, flip_seed):
        example = source.example(item)
        image = example["image"]
        if augment:  # CheXNet's only augmentation; stateless, so a resumed epoch flips the same
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        out = (image if on_device else preprocess(image, image_size), example["label"], example["mask"])
        return out + (example["id"],) if with_ids else out

    scalar = tf.TensorSpec((), tf.int64)
    ds = tf.data.Dataset.from_generator(plan, output_signature=(
        scalar, scalar, tf.TensorSpec((None, 3), tf.int64), tf.TensorSpec((), tf.bool), scalar, scalar, scalar))
    ds = ds.flat_map(one_piece)
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return sized(ds.prefetch(AUTOTUNE), threads)


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


def eval_dataset(data: Records | str | Path, split: str, image_size: int, batch_size: int, *,
                 rank: int = 0, world_size: int = 1, tta: str | None = None,
                 threads: int | None = None) -> tf.data.Dataset:
    """Dicts of image, label, mask, id, patient: this rank's part, each record exactly once.
    With `tta`, image holds the views of `tta_views` ([B, V, S, S, 3])."""
    source = _Source(data, split)
    segments = sharding.eval_plan(source.counts, world_size)[rank]

    def parse(item):
        example = source.example(item)
        image = (preprocess(example["image"], image_size) if tta is None
                 else tta_views(example["image"], image_size, tta))
        return example | {"image": image}

    ds = source.read(as_tensor(segments)).map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    return sized(ds.batch(batch_size).prefetch(AUTOTUNE), threads)


def synthetic_dataset(image_size: int, batch_size: int, num_classes: int, seed: int = 0,
                      uint8_size: int | None = None) -> tf.data.Dataset:
    """One random batch held in memory and repeated: the same element structure as
    `train_dataset` (preprocessed floats, or uint8 pixels of `uint8_size` for a model that
    preprocesses in its graph), with no input cost (benchmarks compare the two)."""
    g = tf.random.Generator.from_seed(seed)
    if uint8_size:
        images = tf.cast(g.uniform((batch_size, uint8_size, uint8_size, 1), 0, 256, tf.int32), tf.uint8)
    else:
        images = g.normal((batch_size, image_size, image_size, 3))
    labels = tf.cast(g.uniform((batch_size, num_classes)) < 0.1, tf.float32)
    return tf.data.Dataset.from_tensors((images, labels, tf.ones_like(labels))).repeat()


def predictions(predict, dataset: tf.data.Dataset) -> dict:
    """Run `predict` ([N, S, S, 3] -> [N, C]) over an `eval_dataset`: probabilities (averaged
    over the views when it has a TTA axis), labels, masks, ids and patients, as numpy; a rank
    with no records of the split gets empty arrays of the same shapes."""
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
    classes = dataset.element_spec["label"].shape[-1]
    empty = {"prob": np.zeros((0, classes), np.float32), "label": np.zeros((0, classes), np.float32),
             "mask": np.zeros((0, classes), np.float32), "id": np.zeros((0,), object),
             "patient": np.zeros((0,), object)}
    return {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
