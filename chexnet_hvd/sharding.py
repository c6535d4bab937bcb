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

Evaluation. The units in stored order, cut into world parts of N // world records (the first
N % world ranks one more): every record exactly once, in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

Segment = tuple[int, int, int]  # (unit index, records to skip, records to take)


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


def epoch_orders(counts: Sequence[int], taken: int, seed: int) -> Iterator[tuple[np.ndarray, int]]:
    """(unit order, offset) of epoch 0, 1, 2, ...: each epoch starts at the previous epoch's first
    left-out record (`taken` records read per epoch), the units holding its left-out records
    first, the rest in a fresh seeded permutation."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    order, offset, epoch = np.random.default_rng([seed, 0]).permutation(len(counts)), 0, 0
    while True:
        yield order, offset
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
    """(epoch, segments of each rank in `ranks`, default all) for each epoch in `epochs`."""
    counts = np.asarray(counts, dtype=np.int64)
    per_rank = steps_per_epoch(int(counts.sum()), world_size, batch_size) * batch_size
    ranks = range(world_size) if ranks is None else ranks
    for epoch, (order, offset) in enumerate(epoch_orders(counts, per_rank * world_size, seed)):
        if epoch >= epochs.stop:
            return
        if epoch in epochs:
            yield epoch, _cuts(counts, order, [offset + r * per_rank for r in ranks],
                               [per_rank] * len(ranks))


def eval_plan(counts: Sequence[int], world_size: int) -> list[list[Segment]]:
    """Segments per rank covering every record once, in stored order."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    sizes = [total // world_size + (r < total % world_size) for r in range(world_size)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return _cuts(counts, np.arange(len(counts)), [int(s) for s in starts], sizes)
