"""Which records each rank reads in each epoch: pure functions of the units' record counts (the
split's shard files, or the rows of a raw-image index), the world, the batch, the seed and the
epoch. No TensorFlow, so tests check the properties directly at any scale.

Training. An epoch reads the units in an order permuted for that epoch, as one cyclic sequence of
N records, starting at an offset; rank r takes records [offset + r*L, offset + (r+1)*L) of it
(wrapping around), L = steps x batch and steps = N // (world x batch). So every rank trains the
same number of steps, no record is read twice, and the epoch leaves out fewer than one global
batch: the records after the last rank's range. The next epoch starts exactly there: the units
holding those records come first (from the first left-out record on), the others follow in a
new seeded permutation. So no record is left out two epochs running, and with a single shard
the ranks' ranges move every epoch too. A rank reads only the units its range touches, skipping
into the first (at most one unit's records read and dropped per rank and epoch).

Resuming. An epoch interrupted in mid-epoch is finished by whatever shape (world size, batch)
the next attempt has. Its records form one nominal sequence: rank 0's range of the epoch's
starting shape (its first steps x batch records, in the order that rank reads them), rank 1's,
..., then the records the epoch leaves out. Each attempt ("part") of the epoch trained, on each of
its ranks, the first `done` batches of that rank's slice; what is left, in the same order, is
cut again into equal contiguous slices for the next part's ranks (the last part's remainder,
fewer than one of its global batches, is left out). With the same shape this is exactly the
rest of each rank's own range, so an interrupted epoch ends as an uninterrupted one does.

Evaluation. The units in stored order, cut into world parts of N // world records (the first
N % world ranks one more): every record exactly once, in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

Segment = tuple[int, int, int]  # (unit index, records to skip, records to take)
Shape = tuple[int, int]  # (world size, per-rank batch)
# Which shape each epoch started with: (first epoch, world size, batch) from the run's first epoch
# on, one entry per change; every epoch's order depends on how many records the epochs before it
# took, so a resumed run must know the shapes they ran at.
Shapes = Sequence[tuple[int, int, int]]
Part = tuple[int, int, int, int]  # a part of an epoch: (world size, batch, steps, batches done)
Piece = tuple[int, int, int]  # (source: a rank of the epoch's starting shape or TAIL, skip, take)
TAIL = -1  # the records an epoch leaves out, as a source of pieces


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Full global batches an epoch holds."""
    return total // (world_size * batch_size)


def _cuts(counts: np.ndarray, order: np.ndarray, starts: Sequence[int],
          lengths: Sequence[int]) -> list[list[Segment]]:
    """For each (start, length): records [start, start + length) of the cyclic sequence of the
    units read in `order`, as segments (a range past the end continues at the beginning)."""
    ends = np.cumsum(counts[order])
    begins = ends - counts[order]
    total = int(ends[-1]) if len(ends) else 0

    def linear(start: int, stop: int) -> list[Segment]:
        out = []
        for i in range(int(np.searchsorted(ends, start, side="right")),
                       int(np.searchsorted(begins, stop, side="left"))):
            skip = max(0, start - int(begins[i]))
            take = min(int(ends[i]), stop) - int(begins[i]) - skip
            if take > 0:
                out.append((int(order[i]), skip, take))
        return out

    out = []
    for start, length in zip(starts, lengths, strict=True):
        start = start % total if total else 0
        first = linear(start, min(start + length, total))
        out.append(first + (linear(0, start + length - total) if start + length > total else []))
    return out


def shape_at(shapes: Shapes, epoch: int) -> Shape:
    """The (world size, batch) epoch `epoch` started with."""
    found = [(w, b) for first, w, b in shapes if first <= epoch]
    if not found:
        raise ValueError(f"no shape recorded for epoch {epoch}: {list(shapes)}")
    return found[-1]


def epoch_orders(counts: Sequence[int], shapes: Shapes, seed: int) -> Iterator[tuple[np.ndarray, int]]:
    """(unit order, offset) of epoch 0, 1, 2, ...: each epoch starts at the previous epoch's first
    left-out record (the records it took: its starting shape's full global batches), the units
    holding its left-out records first, the rest in a fresh seeded permutation."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    order, offset, epoch = np.random.default_rng([seed, 0]).permutation(len(counts)), 0, 0
    while True:
        yield order, offset
        world, batch = shape_at(shapes, epoch)
        taken = steps_per_epoch(total, world, batch) * world * batch
        epoch += 1
        ends = np.cumsum(counts[order])
        begins = ends - counts[order]
        start, left = (offset + taken) % total, total - taken  # the left-out records
        held: list[int] = []
        i, position = int(np.searchsorted(ends, start, side="right")), start
        first = i
        while left > 0 and len(held) < len(order):
            k = i % len(order)
            held.append(int(order[k]))
            left -= int(ends[k]) - position
            i, position = i + 1, int(begins[(i + 1) % len(order)])
        rest = np.setdiff1d(order, held, assume_unique=True)
        offset = start - int(begins[first % len(order)]) if held else 0
        order = np.concatenate([np.asarray(held, dtype=order.dtype),
                                np.random.default_rng([seed, epoch]).permutation(rest)])


def train_plan(counts: Sequence[int], world_size: int, batch_size: int, seed: int,
               epochs: range, ranks: Sequence[int] | None = None
               ) -> Iterator[tuple[int, list[list[Segment]]]]:
    """(epoch, segments of each rank in `ranks`, default all) for each epoch in `epochs`, every
    epoch at one shape."""
    for epoch, layout in epoch_layouts(counts, [(0, world_size, batch_size)], seed, epochs):
        yield epoch, [layout.ranks[r] for r in (range(world_size) if ranks is None else ranks)]


@dataclasses.dataclass(frozen=True)
class Layout:
    """An epoch's records at the shape it started with: each rank's range of `per_rank` records
    and the left-out `tail`, as segments of the units."""

    world: int
    batch: int
    per_rank: int
    ranks: list[list[Segment]]
    tail: list[Segment]


def epoch_layouts(counts: Sequence[int], shapes: Shapes, seed: int, epochs: range
                  ) -> Iterator[tuple[int, Layout]]:
    """(epoch, its Layout) for each epoch in `epochs`, each at the shape it started with."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    for epoch, (order, offset) in enumerate(epoch_orders(counts, shapes, seed)):
        if epoch >= epochs.stop:
            return
        if epoch in epochs:
            world, batch = shape_at(shapes, epoch)
            per_rank = steps_per_epoch(total, world, batch) * batch
            cuts = _cuts(counts, order, [offset + r * per_rank for r in range(world + 1)],
                         [per_rank] * world + [total - world * per_rank])
            yield epoch, Layout(world, batch, per_rank, cuts[:world], cuts[world])


def _slice(ranges: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """Records [start, start + length) of the concatenation of `ranges` ([a, b) each), as ranges."""
    out = []
    for a, b in ranges:
        if length <= 0:
            break
        if start >= b - a:
            start -= b - a
            continue
        take = min(b - a - start, length)
        out.append((a + start, a + start + take))
        length, start = length - take, 0
    return out


def _length(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


def rest_of_epoch(layout: Layout, steps: int, parts: Sequence[Part]) -> list[tuple[int, int]]:
    """What an epoch has not trained after `parts` (the first at the layout's shape, `steps`
    steps), as ranges of its nominal sequence: each starting rank's first steps x batch
    records, then the left-out tail when the epoch takes every full global batch."""
    tail = sum(take for _, _, take in layout.tail) if steps * layout.batch == layout.per_rank else 0
    left = [(0, layout.world * steps * layout.batch + tail)]
    for world, batch, part_steps, done in parts:
        per = part_steps * batch
        kept = [r for rank in range(world) for r in _slice(left, rank * per + done * batch, per - done * batch)]
        left = kept + _slice(left, world * per, _length(left) - world * per)
    return left


def records_done(parts: Sequence[Part]) -> tuple[int, int]:
    """What of an epoch `parts` trained: (their records, the records of the whole epoch at its
    starting shape: the first part's world x batch x steps); (0, 1) before any part."""
    if not parts:
        return 0, 1
    world, batch, steps, _ = parts[0]
    return sum(w * b * done for w, b, _, done in parts), world * batch * steps


def with_shape(shapes: Shapes, epoch: int, shape: Shape) -> list[tuple[int, int, int]]:
    """`shapes` with every epoch from `epoch` on started at `shape` (a resumed attempt's)."""
    kept = [tuple(s) for s in shapes if s[0] < epoch]
    if not kept or shape_at(kept, epoch) != tuple(shape):
        kept.append((epoch, *shape))
    return kept


def part_steps(layout: Layout, steps: int, parts: Sequence[Part], shape: Shape) -> int:
    """Steps of the next part of an epoch at `shape`: the epoch's `steps` when it starts (no
    parts yet), else the full global batches of what is left."""
    if not parts:
        return steps
    return _length(rest_of_epoch(layout, steps, parts)) // (shape[0] * shape[1])


def rank_pieces(layout: Layout, steps: int, parts: Sequence[Part], shape: Shape, rank: int) -> list[Piece]:
    """What `rank` trains in the next part of the epoch, at `shape`: pieces (source, skip, take)
    of the starting ranks' ranges (in the order each reads them) and of the tail (in stored
    order). Without parts: its own first steps x batch records."""
    world, batch = shape
    if not parts:
        return [(rank, 0, steps * batch)]
    per = part_steps(layout, steps, parts, shape) * batch
    mine = _slice(rest_of_epoch(layout, steps, parts), rank * per, per)
    nominal = layout.world * steps * layout.batch
    pieces = []
    for a, b in mine:
        while a < b:
            if a >= nominal:
                pieces.append((TAIL, a - nominal, b - a))
                break
            source, skip = divmod(a, steps * layout.batch)
            take = min(b - a, steps * layout.batch - skip)
            pieces.append((source, skip, take))
            a += take
    return pieces


def eval_plan(counts: Sequence[int], world_size: int) -> list[list[Segment]]:
    """Segments per rank covering every record once, in stored order."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    sizes = [total // world_size + (r < total % world_size) for r in range(world_size)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return _cuts(counts, np.arange(len(counts)), [int(s) for s in starts], sizes)
