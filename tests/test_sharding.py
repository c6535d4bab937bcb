"""Epoch coverage (chexnet_hvd.sharding), proven on the NIH official split's real training count
cut at the default shard size, at every world size 1..256 and per-rank batch 8..64: every rank
the same number of steps, no record twice in an epoch, fewer than one global batch left out, and
over any 2 consecutive epochs every record trained on. No training: the plan is pure."""

import numpy as np
import pytest
from conftest import SHARED

from chexnet_hvd import metadata, records, sharding

NIH = SHARED / "data" / "real" / "nih"


@pytest.fixture(scope="module")
def nih_train_counts() -> list[int]:
    if not (NIH / "Data_Entry_2017_v2020.csv").is_file():
        pytest.skip("no real NIH metadata")
    table = metadata.load_table(metadata.TableConfig(
        csv=str(NIH / "Data_Entry_2017_v2020.csv"), images=str(NIH), split="official"))
    jobs = records.plan_shards(table[table["split"] == "train"], 1024, None, seed=0)
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
def test_every_world_size_and_batch_covers_the_nih_training_split(nih_train_counts):
    counts = nih_train_counts
    total = sum(counts)
    assert total == 77_707 and len(counts) == 76  # the official split's training part, seed 0
    for world in range(1, 257):
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
