"""tf.data input pipelines over the records (or a raw-image index): training, evaluation and the
synthetic input.

Which records a rank reads in an epoch is decided by `chexnet_hvd.sharding` (pure, tested at
world sizes up to 256): each rank its own contiguous range of steps x batch records of the
split's shards in a per-epoch order, so every rank trains the same number of steps, no record
twice, fewer than one global batch left out, and a different part each epoch. Training order per
rank: its segments of shards -> parallel interleave -> shuffle buffer, seeded per (seed,
rank, epoch) -> each record zipped with its random draws (flip, crop), a pure function of (the
reader's seed, its index in that reader's stream) -> batch(drop_remainder) -> parse the batch in
one op, decode, crop (slices) and flip (uint8) -> prefetch, on a private thread pool of the rank's
threads. Records of one stored size (uint8, or PNG written with --image-size) leave the CPU as
uint8 batches: resizing, scaling and normalising run in the model's graph
(`models.with_preprocessing`), on the GPU when there is one. Images of source sizes (PNG records
written without --image-size, a raw index) are decoded, flipped and preprocessed one by one on
the CPU. Evaluation reads each record exactly once across ranks, with no dropped remainder. A
raw index (records --format raw) takes the same path with its rows (image files) as the units.

What a model's input is made of (`View`: side, input scaling, CheXNet's crops): chexnet_hvd.views.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from chexnet_hvd import records, sharding, views
from chexnet_hvd.cli import InputError
from chexnet_hvd.images import to_8bit
from chexnet_hvd.records import check_image_size

# The functions the suite hands tf.data and Keras are plain TensorFlow ops (a branch on a
# tensor is written as tf.cond): traced as written, not rewritten by AutoGraph first. The
# rewriting cost every trainer process 1.8 s of CPU at start (small CNN, 1 rank: 2.4 s of
# AutoGraph, 0.6 s left for Keras' and Horovod's own functions).
plain = tf.autograph.experimental.do_not_convert

AUTOTUNE = tf.data.AUTOTUNE
def check_view(manifest: dict, data_dir: str | Path, view: views.View) -> None:
    """A one-line error for records a model with `view` cannot use without upsampling: stored
    smaller than S, or with --crop smaller than S x 256/224 or of no fixed size."""
    check_image_size(manifest, data_dir, view.image_size)
    if not view.crop:
        return
    stored, scaled = manifest.get("image_size"), views.crop_scale_side(view.image_size)
    if not stored or is_raw(manifest):
        raise InputError("--crop", f"{data_dir} holds images at their source sizes: --crop takes "
                         f"{view.image_size}-px windows of records written with --image-size "
                         f"{scaled} (S x 256/224) or more")
    if stored < scaled:
        raise InputError("--crop", f"records stored at {stored} px, --crop takes {view.image_size}-px "
                         f"windows of the image at {scaled} px (S x 256/224): write records with "
                         f"--image-size {scaled} or more, or train without --crop")


def decode(example: dict, encoding: str = "png", size: int | None = None) -> tf.Tensor:
    """A record's image -> uint8 [H, W, 1]: PNG bytes decoded, or uint8 pixels reshaped."""
    if encoding == "uint8":
        pixels = tf.io.decode_raw(example[records.IMAGE_KEYS["uint8"]], tf.uint8)
        return tf.reshape(pixels, [size, size, 1])
    image = tf.io.decode_png(example[records.IMAGE_KEYS["png"]], channels=1)
    return tf.ensure_shape(image, [size, size, 1]) if size else image


def decode_batch(examples: dict, encoding: str, size: int) -> tf.Tensor:
    """A batch of parsed fixed-size records' images -> uint8 [B, S, S, 1]: uint8 pixels in one
    op, PNGs decoded one by one (there is no batched PNG decoder)."""
    if encoding == "uint8":
        pixels = tf.io.decode_raw(examples[records.IMAGE_KEYS["uint8"]], tf.uint8)
        return tf.reshape(pixels, [-1, size, size, 1])
    return tf.map_fn(lambda png: decode({records.IMAGE_KEYS["png"]: png}, "png", size),
                     examples[records.IMAGE_KEYS["png"]],
                     fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8))


def fixed_size(manifest: dict) -> bool:
    """Records of one stored size (uint8, or PNG written with --image-size): their batches are
    uint8 images of one shape, so the float work can run in the model's graph."""
    return bool(manifest.get("image_size")) and not is_raw(manifest)


def preprocess_on_device(manifest: dict) -> bool:
    """Fixed-size records (`fixed_size`): the CPU pipeline decodes, crops and flips them and
    ships uint8 batches; the model's graph (`models.with_preprocessing`) does `views.preprocess`
    on the accelerator. Images of source sizes are preprocessed in the pipeline."""
    return fixed_size(manifest)


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


class Source:
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

        @plain
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
        return {"image": decode(example, self.encoding, self.stored_size), "label": example["label"],
                "mask": example["mask"], "id": example["image/id"], "patient": example["patient/id"]}

    def batch_examples(self, serialized: tf.Tensor) -> dict:
        """A batch of serialized fixed-size records -> image (uint8 [B, S, S, 1]), label, mask,
        id: parsed in one op (`records.parse_batch`), the pixels decoded (`decode_batch`)."""
        example = records.parse_batch(serialized, self.num_classes, self.encoding)
        return {"image": decode_batch(example, self.encoding, self.stored_size), "label": example["label"],
                "mask": example["mask"], "id": example["image/id"]}


def as_tensor(segments: list[sharding.Segment]) -> np.ndarray:
    """Segments as the [k, 3] int64 array `Source.read` takes."""
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


# The order an epoch's records are read in, by version: a checkpoint stopped in mid-epoch records
# it, and a resume under another order is refused (its parts index into the one it was read in).
# 1: a shuffle within blocks (batch, permute, unbatch); 2: Dataset.shuffle, `shuffled`.
RECORD_ORDER = 2
SHUFFLE_GRAPH_SEED = 7919  # part of RECORD_ORDER 2 (`shuffled`): changing it changes the order


def shuffled(ds: tf.data.Dataset, size: int, seed: tf.Tensor) -> tf.data.Dataset:
    """`ds` through a shuffle buffer of `size` records, in an order that is a pure function of
    `seed`, a tensor that changes per epoch and reader, when built inside a traced function
    (as `train_dataset` builds it; built eagerly, it also depends on the global seed): the same
    in every attempt. The buffer holds references to the records, not copies (a shuffle within
    blocks by batch, permute and unbatch copied every record three times: 1.4-1.6x the uint8
    pipeline's CPU time)."""
    # Dataset.shuffle pairs its seed with the graph's, which a traced function takes from the
    # global seed (--seed); fixed while it is built, so the order depends on `seed` alone, and a
    # global seed of 0 beside a tensor seed no longer fails in TensorFlow's seed check.
    graph = tf.compat.v1.get_default_graph()
    graph_seed, graph.seed = graph.seed, SHUFFLE_GRAPH_SEED
    try:
        return ds.shuffle(size, seed=seed, reshuffle_each_iteration=False)
    finally:
        graph.seed = graph_seed


DRAW_CHUNK = 1024  # records whose random draws one stateless op makes


def draws(seed: tf.Tensor) -> tf.data.Dataset:
    """Endless [3] float32 uniform draws (flip, window row, window column), one per record of a
    reader's stream, record i's a pure function of (seed, i): the i % DRAW_CHUNK-th of the chunk
    drawn with seed (seed, i // DRAW_CHUNK). So a record gets the same flip and crop whichever
    attempt, world size or batch it is trained in, and one op draws for a thousand records."""

    @plain
    def chunk(k):
        return tf.random.stateless_uniform([DRAW_CHUNK, 3], tf.stack([seed, k]))

    return tf.data.Dataset.range(2**62).map(chunk).unbatch()


def mirror(images: tf.Tensor) -> tf.Tensor:
    """uint8 [B, H, W, 1] mirrored left-right. tf.reverse moves uint8 one byte at a time (~3 ns
    each here), so for widths divisible by 4 each row is reversed as 32-bit words, each word's
    bytes then swapped back: ~4x faster on the CPU, bitwise the same."""
    width = images.shape[2]
    if width is None or width % 4 or images.shape[3] != 1:
        return tf.reverse(images, [2])
    shape = tf.shape(images)
    words = tf.reverse(tf.bitcast(tf.reshape(images, [shape[0], shape[1], width // 4, 4]), tf.uint32), [2])
    bits, u32 = tf.bitwise, (lambda v: tf.constant(v, tf.uint32))
    swapped = bits.bitwise_or(  # bytes 0123 -> 3210
        bits.bitwise_or(bits.right_shift(words, u32(24)), bits.bitwise_and(bits.right_shift(words, u32(8)), u32(0xFF00))),
        bits.bitwise_or(bits.bitwise_and(bits.left_shift(words, u32(8)), u32(0xFF0000)), bits.left_shift(words, u32(24))))
    return tf.reshape(tf.bitcast(swapped, tf.uint8), shape)


def augment_batch(images: tf.Tensor, draw: tf.Tensor, side: int, flip: bool, crop: bool) -> tf.Tensor:
    """uint8 [B, H, W, 1] -> [B, side, side, 1]: each image's window (with `crop`, at the
    offsets its draws pick, uniform over every position; else the whole image), mirrored
    when its flip draw is below 0.5 (with `flip`). Windows are slices (whole rows of bytes) and
    only the images drawn for a flip are mirrored: an element-wise gather or a tf.where over
    the batch cost 5x more CPU per image (docs/benchmarks.md)."""
    if crop:
        span = tf.shape(images)[1:3] - side  # the last offset, per axis
        offsets = tf.minimum(tf.cast(tf.floor(draw[:, 1:] * tf.cast(span + 1, tf.float32)), tf.int32), span)
        images = tf.map_fn(lambda item: tf.slice(item[0], tf.concat([item[1], [0]], 0), [side, side, -1]),
                           (images, offsets), fn_output_signature=tf.TensorSpec([side, side, 1], tf.uint8))
    if flip:
        mirrored = tf.cast(draw[:, 0] < 0.5, tf.int32)
        kept, flipped = tf.dynamic_partition(images, mirrored, 2)
        places = tf.dynamic_partition(tf.range(tf.shape(images)[0]), mirrored, 2)
        images = tf.dynamic_stitch(places, [kept, mirror(flipped)])
    return images


def train_dataset(data: Records | str | Path, split: str, view: views.View | int, batch_size: int, *,
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
    share of the rest (`sharding.rank_pieces`), each record in the order and with the flip and
    crop its first reader would have given it (`draws`).

    Everything up to the choice of records is deterministic, whatever the flags, so that a
    resumed epoch trains exactly the records its interrupted attempt did not. Fixed-size
    records come out as uint8 images (with --crop, windows of them: `views.shipped_side`), parsed
    and augmented a batch at a time, for a model that preprocesses in its graph
    (`preprocess_on_device`); images of source sizes are preprocessed here, one by one."""
    source, view = Source(data, split), views.as_view(view)
    on_device = fixed_size(source.manifest)
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

    @plain
    def one_piece(epoch, reader, segments, is_tail, length, skip, take):
        epoch_seed = tf.constant(seed * 1009, tf.int64) + reader + epoch * 1_000_003
        ds = source.read(segments)
        ds = tf.cond(is_tail, lambda: ds,  # the tail is read in stored order
                     lambda: shuffled(ds, shuffle_buffer, epoch_seed).take(length))
        ds = tf.data.Dataset.zip((ds, draws(epoch_seed)))  # record i of the stream, its draws
        return ds.skip(skip).take(take)

    @plain
    def parse_batch(serialized, draw):  # fixed-size records: the CPU's work is uint8 only
        example = source.batch_examples(serialized)
        side = views.shipped_side(source.stored_size, view)
        image = augment_batch(example["image"], draw, side, augment, view.crop)
        out = (image, example["label"], example["mask"])
        return out + (example["id"],) if with_ids else out

    @plain
    def parse_one(item, draw):  # images of source sizes: float work here, image by image
        example = source.example(item)
        image = example["image"]
        if augment:  # CheXNet's only augmentation
            image = tf.where(draw[0] < 0.5, tf.reverse(image, [1]), image)
        out = (views.preprocess(image, view.image_size, view.scaling), example["label"], example["mask"])
        return out + (example["id"],) if with_ids else out

    scalar = tf.TensorSpec((), tf.int64)
    ds = tf.data.Dataset.from_generator(plan, output_signature=(
        scalar, scalar, tf.TensorSpec((None, 3), tf.int64), tf.TensorSpec((), tf.bool), scalar, scalar, scalar))
    ds = ds.flat_map(one_piece)
    if on_device:
        ds = ds.batch(batch_size, drop_remainder=True)
        ds = ds.map(parse_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(parse_one, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=True)
    return sized(ds.prefetch(AUTOTUNE), threads)


def eval_dataset(data: Records | str | Path, split: str, view: views.View | int, batch_size: int, *,
                 rank: int = 0, world_size: int = 1, tta: str | None = None,
                 threads: int | None = None) -> tf.data.Dataset:
    """Dicts of image, label, mask, id, patient: this rank's part, each record exactly once.
    image is the model's input (`views.model_input`), or with `tta` the views of `views.tta_views`
    ([B, V, S, S, 3])."""
    source, view = Source(data, split), views.as_view(view)
    segments = sharding.eval_plan(source.counts, world_size)[rank]

    @plain
    def parse(item):
        example = source.example(item)
        image = (views.model_input(example["image"], view) if tta is None
                 else views.tta_views(example["image"], view, tta))
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
