"""Which records each rank reads in each epoch: pure functions of the units' record counts (the
split's shard files, or the rows of a raw-image index), the world, the batch, the seed and the
epoch. No TensorFlow, so tests check the properties directly at any scale.

Training. An epoch reads the units in an order permuted for that epoch, as one sequence of
N records; rank r takes records [r*L, (r+1)*L) of it, L = steps x batch and steps = N // (world x
batch). So every rank trains the same number of steps, no record is read twice, and the epoch
leaves out fewer than one global batch: the tail of the sequence. The units that held an epoch's
tail come first in the next epoch's order, so no record is left out two epochs running. A rank
reads only the units its range touches, skipping into the first (at most one unit's records read
and dropped per rank and epoch).

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
    """For each (start, length): records [start, start + length) of the units read in
    `order`, as segments."""
    ends = np.cumsum(counts[order])
    begins = ends - counts[order]
    out = []
    for start, length in zip(starts, lengths, strict=True):
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(begins, start + length, side="left"))
        segments = []
        for i in range(first, last):
            skip = max(0, start - int(begins[i]))
            take = min(int(ends[i]), start + length) - int(begins[i]) - skip
            if take > 0:
                segments.append((int(order[i]), skip, take))
        out.append(segments)
    return out


def unit_orders(counts: Sequence[int], taken: int, seed: int) -> Iterator[np.ndarray]:
    """The unit order of epoch 0, 1, 2, ...: a fresh seeded permutation each epoch, except that
    the units holding the previous epoch's tail (records at or after `taken`) come first."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.random.default_rng([seed, 0]).permutation(len(counts))
    epoch = 0
    while True:
        yield order
        epoch += 1
        ends = np.cumsum(counts[order])
        tail = order[int(np.searchsorted(ends, taken, side="right")):]
        rest = np.setdiff1d(order, tail, assume_unique=True)
        order = np.concatenate([tail, np.random.default_rng([seed, epoch]).permutation(rest)])


def train_plan(counts: Sequence[int], world_size: int, batch_size: int, seed: int,
               epochs: range, ranks: Sequence[int] | None = None
               ) -> Iterator[tuple[int, list[list[Segment]]]]:
    """(epoch, segments of each rank in `ranks`, default all) for each epoch in `epochs`."""
    counts = np.asarray(counts, dtype=np.int64)
    per_rank = steps_per_epoch(int(counts.sum()), world_size, batch_size) * batch_size
    ranks = range(world_size) if ranks is None else ranks
    for epoch, order in enumerate(unit_orders(counts, per_rank * world_size, seed)):
        if epoch >= epochs.stop:
            return
        if epoch in epochs:
            yield epoch, _cuts(counts, order, [r * per_rank for r in ranks], [per_rank] * len(ranks))


def eval_plan(counts: Sequence[int], world_size: int) -> list[list[Segment]]:
    """Segments per rank covering every record once, in stored order."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    sizes = [total // world_size + (r < total % world_size) for r in range(world_size)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return _cuts(counts, np.arange(len(counts)), [int(s) for s in starts], sizes)
