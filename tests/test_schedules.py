"""Learning-rate schedules (chexnet_hvd.schedules): their formulas in epochs of progress, the
same at every world size and batch once rescaled, through the parts a resumed epoch is split
into; reduce-on-plateau's bookkeeping, and a plateau lr kept across a resume; what ranks the epochs
when validation classes are one-sided."""

import pytest
from conftest import module

from chexnet_hvd.callbacks import validation_criterion
from chexnet_hvd.schedules import EpochSchedule


@pytest.mark.parametrize("world", [1, 2])
def test_lr_warmup_and_scaling_formula(world):
    """Warmup over 1 epoch from the single-rank lr to the scaled peak, then half a cosine to
    zero at epoch 10; 10 steps per epoch."""
    base, ref, local = 1e-3, 16, 16
    peak = base * local * world / ref
    sched = EpochSchedule(peak, 1 / world, warmup_epochs=1, epochs=10, schedule="cosine")
    sched.start_part(0, (0, 1), first_step=0, steps=10)
    assert float(sched(0)) == pytest.approx(peak / world)
    assert float(sched(5)) == pytest.approx(peak / world + (peak - peak / world) * 0.5)
    assert float(sched(10)) == pytest.approx(peak)
    assert float(sched(55)) == pytest.approx(peak * 0.5, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)
    assert EpochSchedule.from_config(sched.get_config()).peak == peak


@pytest.mark.parametrize("warmup", [2.5, 0])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_the_lr_is_a_function_of_epoch_progress_whatever_the_epochs_length(schedule, warmup):
    """An epoch of 10 steps on 2 ranks, interrupted after 4 and finished in 3 steps on 4 ranks
    (the global batch and peak twice as high): every step of the rest has the lr of the same
    progress, rescaled, in warmup too: the resumed attempt's own warmup (from the peak over 4,
    over a proportional warmup twice as long) is replaced by the run's (`set_warmup`)."""
    common = dict(epochs=4, schedule=schedule, step_epochs=2)
    straight = EpochSchedule(1e-3, 1 / 2, warmup_epochs=warmup, **common)
    resumed = EpochSchedule(2e-3, 1 / 4, warmup_epochs=2 * warmup, **common)
    resumed.set_warmup(1 / 2, warmup)
    straight.start_part(2, (0, 1), first_step=20, steps=10)  # epoch 3 of 4, steps 20..29
    resumed.start_part(2, (4 * 2, 10 * 2), first_step=24, steps=3)  # 4 of 10 batches of 2 done; 3 steps
    for k in range(4):
        progress = 2.4 + 0.2 * k
        assert float(resumed.progress(24 + k)) == pytest.approx(progress)
        assert float(resumed(24 + k)) == pytest.approx(2 * float(straight(20 + round((progress - 2) * 10))), rel=1e-5)


@pytest.mark.parametrize("steps", [26, 52, 97])
def test_a_part_resumed_at_the_same_shape_has_the_straight_runs_progress_to_the_last_bit(steps):
    """Resumed after any batch of an epoch at the same shape (2 ranks of 8), each later step's
    progress, so its lr in warmup or a cosine, is the straight run's bitwise (a float sum of
    the done fraction and the steps since differed in the last bit: weights then differed)."""
    straight = EpochSchedule(1e-3, 1 / 2, warmup_epochs=3, epochs=4, schedule="cosine")
    resumed = EpochSchedule(1e-3, 1 / 2, warmup_epochs=3, epochs=4, schedule="cosine")
    first = 2 * steps  # epoch 3
    straight.start_part(2, (0, 1), first_step=first, steps=steps)
    for done in range(1, steps):
        resumed.start_part(2, (16 * done, 16 * steps), first_step=first + done, steps=steps - done)
        later = range(first + done, first + steps + 1)
        assert [float(resumed(s)) for s in later] == [float(straight(s)) for s in later], done


def test_plateau_update_waits_patience_epochs_then_scales_down():
    from chexnet_hvd.schedules import PLATEAU_START, plateau_update

    state, scales = dict(PLATEAU_START), []
    for auroc in [0.70, 0.75, 0.74, 0.75, None, 0.80, 0.79, 0.78]:
        state = plateau_update(state, auroc, patience=2, factor=0.1, min_scale=0.005)
        scales.append(state["scale"])
    # 0.74, 0.75 (not > best) -> drop; None does not count; 0.80 -> new best; 0.79, 0.78 -> drop, floored
    assert scales == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01])
    assert state["best"] == 0.80 and state["wait"] == 0
    assert plateau_update(state, None, 1, 0.1, 0.005) == state  # an undefined epoch does not count


@pytest.mark.slow
def test_plateau_schedule_lowers_the_lr_and_resume_keeps_it(records_dir, tmp_path):
    """With an lr too small to move the weights, val AUROC never improves after epoch 1, so
    patience 1 drops the lr x0.5 (--plateau-factor) after every later epoch; a resumed run keeps
    the dropped lr."""
    from chexnet_hvd.runlog import read_runlog

    args = ["--data", records_dir, "--run-dir", tmp_path, "--model", "small_cnn", "--image-size", 32,
            "--batch-size", 32, "--steps-per-epoch", 2, "--lr", 1e-12, "--warmup-epochs", 0,
            "--schedule", "plateau", "--plateau-patience", 1, "--plateau-factor", 0.5, "--verbose", 0]
    module("train", *args, "--epochs", 2, check=True, timeout=300)
    module("train", *args, "--epochs", 4, "--resume", check=True, timeout=300)
    lrs = [r["lr"] for r in read_runlog(tmp_path) if r["event"] == "epoch"]
    assert lrs == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13], rel=1e-4)


def test_a_resumed_run_keeps_the_warmup_of_its_first_attempt():
    """The warmup a resume keeps: the one its checkpoint recorded; for a checkpoint written
    before it was recorded, the first attempt's as that attempt derived it (4 ranks x 8 at
    --reference-batch 2: 2 epochs from a quarter of the peak), not this attempt's; this
    attempt's own when --warmup-epochs changed."""
    from chexnet_hvd.config import TrainConfig
    from chexnet_hvd.resume import run_warmup

    cfg = TrainConfig(data="d", run_dir="r", batch_size=16, reference_batch=2)
    old = {"config": {"warmup_epochs": -1.0, "reference_batch": 2, "batch_size": 8}, "global_batch": 16,
           "shapes": [(0, 4, 8), (2, 2, 8)]}
    assert run_warmup(cfg, old) == (0.25, 2.0)
    assert run_warmup(cfg, {k: v for k, v in old.items() if k != "shapes"}) == (0.5, 1.0)  # before shapes: its own
    assert run_warmup(cfg, old | {"warmup": [0.5, 1.5]}) == (0.5, 1.5)
    assert run_warmup(TrainConfig(data="d", run_dir="r", warmup_epochs=3.0), old) is None


@pytest.mark.parametrize("old", [False, True], ids=["manifest", "manifest-without-one-sided-lists"])
def test_one_sided_validation_classes_are_named_and_the_rest_still_rank_by_auroc(old):
    """Of three classes, one has no positives and one no negatives in the validation split: the
    warnings name just those, and the mean AUROC (defined by the third) still ranks the epochs."""
    info = {"count": 10, "positives": {"A": 0, "B": 10, "C": 4}}
    if not old:
        info |= {"no_positives": ["A"], "no_negatives": ["B"]}
    criterion, warnings = validation_criterion({"classes": ["A", "B", "C"], "splits": {"val": info}}, "val")
    assert criterion == "val_mean_auroc"
    assert warnings == ["warning: validation split 'val' has no positives for 1 of 3 classes (A): their AUROC is "
                        "undefined", "warning: validation split 'val' has no negatives for 1 of 3 classes (B): their "
                        "AUROC is undefined"]
    info["positives"]["C"] = 0  # no class defined: the loss ranks them
    if not old:
        info["no_positives"] = ["A", "C"]
    assert validation_criterion({"classes": ["A", "B", "C"], "splits": {"val": info}}, "val")[0] == "val_loss"
