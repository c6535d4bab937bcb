"""Epoch coverage (chexnet_hvd.sharding), proven on the NIH official split's real training count
cut at the default shard size, at world sizes 1..16 and 11 more up to 256, each at every
per-rank batch 8..64: every rank the same number of steps, no record twice in an epoch, fewer
than one global batch left out, and over any 2 consecutive epochs every record trained on. No
training: the plan is pure."""

import numpy as np
import pytest
from conftest import SHARED

from chexnet_hvd import sharding, sources
from chexnet_hvd.records import writer

NIH = SHARED / "data" / "real" / "nih"


@pytest.fixture(scope="module")
def nih_train_counts() -> list[int]:
    if not (NIH / "Data_Entry_2017_v2020.csv").is_file():
        pytest.skip("no real NIH metadata")
    table = sources.load_table(sources.TableConfig(
        csv=str(NIH / "Data_Entry_2017_v2020.csv"), images=str(NIH), split="official"))
    jobs = writer.plan_shards(table[table["split"] == "train"], 1024, None, seed=0)
    return [len(job.rows) for job in jobs]


def coverage(counts: list[int], per_rank: list[list[sharding.Segment]]) -> np.ndarray:
    """How often each record (in stored order) is read by all ranks together."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    seg = np.array([s for rank in per_rank for s in rank], dtype=np.int64).reshape(-1, 3)
    starts = offsets[seg[:, 0]] + seg[:, 1]
    diff = np.zeros(offsets[-1] + 1, np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, starts + seg[:, 2], -1)
    return np.cumsum(diff)[:-1]


@pytest.mark.slow
def test_world_sizes_to_256_and_every_batch_cover_the_nih_training_split(nih_train_counts):
    """Every world size to 16, then up to 256 in steps (every one of them took two minutes of
    CI), each with every batch from 8 to 64."""
    counts = nih_train_counts
    total = sum(counts)
    assert total == 77_707 and len(counts) == 76  # the official split's training part, seed 0
    for world in [*range(1, 17), 24, 31, 32, 48, 64, 96, 127, 128, 192, 255, 256]:
        for batch in range(8, 65):
            steps = sharding.steps_per_epoch(total, world, batch)
            both = np.zeros(total, np.int64)
            for _, per_rank in sharding.train_plan(counts, world, batch, seed=0, epochs=range(2)):
                assert all(sum(t for _, _, t in segs) == steps * batch for segs in per_rank)
                seen = coverage(counts, per_rank)
                assert seen.max() == 1, (world, batch)  # no record twice
                assert total - seen.sum() < world * batch, (world, batch)
                both += seen
            assert both.min() >= 1, (world, batch)  # what one epoch left out, the next trains


@pytest.mark.slow
def test_sixteen_ranks_batch_16_train_99_7_percent_per_epoch(nih_train_counts):
    total = sum(nih_train_counts)
    assert sharding.steps_per_epoch(total, 16, 16) * 256 / total >= 0.997


@pytest.mark.parametrize("counts", [[221], [100, 121], [5, 7, 7, 6, 9, 40, 1], [1] * 57],
                         ids=["one shard", "two shards", "uneven shards", "raw rows"])
def test_few_shards_too_cover_every_record_over_any_two_epochs(counts):
    """One shard of 221 records on 5 ranks used to leave the same 21 out every epoch; now the
    ranges move, for one shard as for many, and a raw index's rows alike."""
    total = sum(counts)
    for world in range(1, 9):
        for batch in range(1, 9):
            if sharding.steps_per_epoch(total, world, batch) * world * batch * 2 < total:
                continue  # more than half left out: no plan can cover it in 2 epochs
            seen = [coverage(counts, per_rank) for _, per_rank in
                    sharding.train_plan(counts, world, batch, seed=1, epochs=range(6))]
            for epoch in seen:
                assert epoch.max() == 1 and total - epoch.sum() < world * batch, (world, batch)
            for a, b in zip(seen, seen[1:], strict=False):
                assert (a + b).min() >= 1, (counts, world, batch)


def test_epochs_differ_and_the_plan_is_a_function_of_seed_and_epoch():
    counts = [5, 7, 7, 6, 9]
    plans = [dict(sharding.train_plan(counts, 3, 2, seed, range(4))) for seed in (0, 0, 1)]
    assert plans[0] == plans[1] and plans[0] != plans[2]
    assert plans[0][0] != plans[0][1] != plans[0][2]
    resumed = dict(sharding.train_plan(counts, 3, 2, 0, range(2, 4)))
    assert resumed == {e: plans[0][e] for e in (2, 3)}
    mine = dict(sharding.train_plan(counts, 3, 2, 0, range(4), ranks=[1]))
    assert all(mine[e] == [plans[0][e][1]] for e in range(4))


@pytest.mark.parametrize("world", [1, 2, 3, 7, 40])
def test_evaluation_plan_reads_every_record_once(world):
    counts = [5, 7, 7, 6, 9]
    per_rank = sharding.eval_plan(counts, world)
    assert coverage(counts, per_rank).tolist() == [1] * sum(counts)
    sizes = [sum(t for _, _, t in segs) for segs in per_rank]
    assert max(sizes) - min(sizes) <= 1  # with 40 ranks, 6 get nothing: still exact


def trained_in_parts(layout, steps, parts, last_shape):
    """Nominal positions each part trains (every part's `done` batches on each of its ranks, the
    last part all its steps), by following rank_pieces: {position: times trained}."""
    seen: dict[int, int] = {}
    history: list = []
    per_source = steps * layout.batch
    for world, batch, done in [*parts, (*last_shape, None)]:
        part = sharding.part_steps(layout, steps, history, (world, batch))
        for rank in range(world):
            pieces = sharding.rank_pieces(layout, steps, history, (world, batch), rank)
            assert sum(t for _, _, t in pieces) == part * batch  # every rank the same steps
            positions = [(layout.world * per_source if s == sharding.TAIL else s * per_source) + k + i
                         for s, k, t in pieces for i in range(t)]
            for p in positions[:(part if done is None else done) * batch]:
                seen[p] = seen.get(p, 0) + 1
        history.append((world, batch, part, done))
    return seen, part * last_shape[0] * last_shape[1]


@pytest.mark.parametrize("seed", range(40))
def test_an_epoch_resumed_at_other_shapes_trains_each_record_once(seed):
    """An epoch interrupted up to 4 times and finished at random world sizes and batches: no
    record twice, and fewer than one global batch of the last shape left out (all of an epoch's
    records, the tail it would leave out included, are what the parts share out)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, rng.integers(1, 12)).tolist()
    total = sum(counts)
    shapes = [(int(rng.choice([1, 2, 4])), int(rng.integers(1, 9))) for _ in range(5)]
    shapes = [s for s in shapes if s[0] * s[1] <= total // 2] or [(1, 1)]
    (_, layout), = sharding.epoch_layouts(counts, [(0, *shapes[0])], seed, range(1))
    steps = layout.per_rank // layout.batch
    parts, history = [], []
    for world, batch in shapes[:-1]:
        part = sharding.part_steps(layout, steps, history, (world, batch))
        done = int(rng.integers(0, part + 1))
        parts.append((world, batch, done))
        history.append((world, batch, part, done))
    seen, last_part = trained_in_parts(layout, steps, parts, shapes[-1])
    assert max(seen.values(), default=1) == 1
    world, batch = shapes[-1]
    assert total - len(seen) < world * batch
    assert all(0 <= p < total for p in seen)


def test_a_resume_at_the_same_shape_is_the_rest_of_each_ranks_own_range():
    (_, layout), = sharding.epoch_layouts([50, 30, 41], [(0, 3, 4)], 0, range(1))
    steps = layout.per_rank // 4  # 10
    for rank in range(3):
        assert sharding.rank_pieces(layout, steps, [(3, 4, steps, 6)], (3, 4), rank) == [(rank, 24, 16)]
    # a cap on the steps (--steps-per-epoch) leaves the tail out of the epoch
    assert sharding.part_steps(layout, 5, [(3, 4, 5, 2)], (3, 4)) == 3


def test_epochs_after_a_change_of_shape_follow_the_shapes_they_started_with():
    counts = [5, 7, 7, 6, 9]
    before = dict(sharding.train_plan(counts, 3, 2, 0, range(4)))
    changed = {e: layout.ranks for e, layout in
               sharding.epoch_layouts(counts, [(0, 3, 2), (2, 2, 3)], 0, range(4))}
    assert {e: changed[e] for e in (0, 1)} == {e: before[e] for e in (0, 1)}
    for epoch in (2, 3):  # 2 ranks of 5 steps x 3, each its own records
        assert [sum(t for _, _, t in rank) for rank in changed[epoch]] == [15, 15]
        assert coverage(counts, changed[epoch]).max() == 1
