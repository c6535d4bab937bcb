"""Checkpoints stay usable whatever moment a job is killed at."""

import os
import shutil
from pathlib import Path

import pytest
import tensorflow as tf
from conftest import Crash, crash_at

from chexnet_hvd import checkpoints, models


@pytest.mark.parametrize("n", range(10))
def test_a_complete_best_exists_whatever_step_of_its_replacement_is_killed(tmp_path, monkeypatch, n):
    """`best` is replaced by linking (or copying) the epoch's files, a symlink, renaming and
    cleaning up; a kill at any of those steps (simulated: the n-th file operation fails) leaves
    a complete best, old or new. (The old way moved the old best aside before the new one was
    in place.) The resume then sets the new one (its epoch's meta holds its score as the best),
    leaves it be where a later epoch did not improve on it, and deletes the copies it does not
    name, and only those: in a run directory given as a relative path too."""
    model = models.build_model("small_cnn", 32, 14)
    model.compile(optimizer=tf.keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    monkeypatch.chdir(tmp_path)
    ckpt_dir = Path("run") / "checkpoints"  # as --run-dir run
    meta = {"model": "small_cnn", "image_size": 32, "num_classes": 14, "classes": [], "step": 1}
    first = checkpoints.save(model, ckpt_dir, "epoch-0001", meta | {"epoch": 1, "val_mean_auroc": 0.6, "best": 0.6})
    second = checkpoints.save(model, ckpt_dir, "epoch-0002", meta | {"epoch": 2, "val_mean_auroc": 0.7, "best": 0.7})
    checkpoints.set_best(first)
    with monkeypatch.context() as patched:
        calls = crash_at(patched, n, ((os, "replace"), (os, "symlink"), (os, "unlink"), (os, "mkdir"),
                                      (os, "link"), (shutil, "rmtree"), (os, "rename")))
        try:
            checkpoints.set_best(second)
        except Crash:
            pass
    assert len(calls) > n  # the n-th step was reached, and killed
    meta = checkpoints.read_meta(ckpt_dir / "best")
    assert meta is not None and meta["epoch"] in (1, 2), calls
    checkpoints.load(ckpt_dir / "best")  # weights complete too
    checkpoints.clear_leftovers(ckpt_dir)
    mended = checkpoints.repair_best(ckpt_dir)
    assert checkpoints.read_meta(ckpt_dir / "best")["epoch"] == 2
    assert (mended is None) == (meta["epoch"] == 2), mended
    checkpoints.save(model, ckpt_dir, "epoch-0003", meta | {"epoch": 3, "val_mean_auroc": 0.7, "best": 0.7})  # a tie
    checkpoints.save(model, ckpt_dir, "epoch-0004", meta | {"epoch": 4, "val_mean_auroc": None, "best": 0.7})
    assert checkpoints.repair_best(ckpt_dir) is None and checkpoints.read_meta(ckpt_dir / "best")["epoch"] == 2
    assert [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")] == [os.readlink(ckpt_dir / "best")]
    checkpoints.clear_leftovers(ckpt_dir)  # again: the copy best names stays
    assert checkpoints.read_meta(ckpt_dir / "best")["epoch"] == 2
    shutil.rmtree((ckpt_dir / "best").resolve())  # a kill before the first best was set, as it were
    assert checkpoints.clear_leftovers(ckpt_dir) == []
    assert "now epoch-0002" in checkpoints.repair_best(ckpt_dir)  # the first of the tied epochs
    assert checkpoints.read_meta(ckpt_dir / "best")["epoch"] == 2


@pytest.mark.parametrize("n", range(4))
def test_a_resume_clears_what_a_kill_in_the_middle_of_a_save_left(tmp_path, monkeypatch, n):
    """A save that replaces a checkpoint of the same name, killed at its n-th file operation
    (clearing an old partial copy, moving the old one aside, renaming the new one into place,
    deleting the old one): `clear_leftovers` leaves no hidden copy behind and a complete
    checkpoint under the name, the old or the new one (where the kill came after the old one
    was moved aside and before the new one arrived, the old one goes back)."""
    model = models.build_model("small_cnn", 32, 14)
    model.compile(optimizer=tf.keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    meta = {"model": "small_cnn", "image_size": 32, "num_classes": 14, "classes": [], "epoch": 1}
    checkpoints.save(model, tmp_path, "step-000000003", meta | {"step": 3})
    os.symlink("nowhere", tmp_path / ".best-link.tmp7")  # set_best's, killed before its rename
    with monkeypatch.context() as patched:
        calls = crash_at(patched, n, ((os, "replace"), (shutil, "rmtree")))
        with pytest.raises(Crash):
            checkpoints.save(model, tmp_path, "step-000000003", meta | {"step": 4})
    assert len(calls) == n + 1
    done = checkpoints.clear_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000003"], done
    assert checkpoints.read_meta(tmp_path / "step-000000003")["step"] == (4 if n == 3 else 3)
    assert any("back as step-000000003" in line for line in done) == (n == 2)
    checkpoints.load(tmp_path / "step-000000003")


def test_best_shares_its_epochs_files_and_outlives_them(tmp_path):
    """best/ holds hard links to its epoch's files (no second copy on disk), and stays whole when
    that epoch is pruned."""
    model = models.build_model("small_cnn", 32, 14)
    model.compile(optimizer=tf.keras.optimizers.Adam(), loss="mse")
    meta = {"model": "small_cnn", "image_size": 32, "num_classes": 14, "classes": [], "step": 1, "epoch": 1}
    first = checkpoints.save(model, tmp_path, "epoch-0001", meta)
    best = checkpoints.set_best(first)
    assert all((best / f.name).stat().st_ino == f.stat().st_ino for f in first.iterdir())
    shutil.rmtree(first)
    checkpoints.load(best)


EPOCHS = (1, 2, 3, 9998, 9999, 10000)  # past 9999 the names outgrow their 4 digits


@pytest.mark.parametrize("keep", [1, 2, 3, 7])
def test_prune_keeps_the_newest_epochs_by_number_and_the_newest_step(tmp_path, keep):
    for name in [f"epoch-{n:04d}" for n in EPOCHS] + ["step-000000010", "step-000000020", ".best-epoch-0002-1",
                                                      ".epoch-0004.tmp12"]:
        (tmp_path / name).mkdir()
    os.symlink(".best-epoch-0002-1", tmp_path / "best")
    checkpoints.prune(tmp_path, keep)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in left if n.startswith("epoch-")] == sorted(f"epoch-{n:04d}" for n in EPOCHS[-keep:])
    assert [n for n in left if n.startswith("step-")] == ["step-000000020"]
    assert {"best", ".best-epoch-0002-1", ".epoch-0004.tmp12"} <= set(left)  # best and writes in progress


@pytest.mark.parametrize("keep", [0, -1])
def test_prune_refuses_to_keep_fewer_than_one(tmp_path, keep):
    """[:-0] kept every checkpoint; [:- -1] deleted all but the oldest."""
    for n in EPOCHS[:3]:
        (tmp_path / f"epoch-{n:04d}").mkdir()
    with pytest.raises(ValueError, match="at least 1"):
        checkpoints.prune(tmp_path, keep)
    assert len(list(tmp_path.iterdir())) == 3
