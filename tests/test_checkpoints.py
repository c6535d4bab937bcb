"""Checkpoints stay usable whatever moment a job is killed at."""

import os
import shutil

import pytest
import tensorflow as tf
from conftest import Crash, crash_at

from chexnet_hvd import checkpoints, models


@pytest.mark.parametrize("n", range(6))
def test_a_complete_best_exists_whatever_step_of_its_replacement_is_killed(tmp_path, monkeypatch, n):
    """`best` is replaced by copying, linking, renaming and cleaning up; a kill at any of those
    steps (simulated: the n-th file operation fails) leaves a complete best, old or new. (The
    old way moved the old best aside before the new one was in place.)"""
    model = models.build_model("small_cnn", 32, 14)
    model.compile(optimizer=tf.keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    ckpt_dir = tmp_path / "checkpoints"
    meta = {"model": "small_cnn", "image_size": 32, "num_classes": 14, "classes": [], "step": 1}
    first = checkpoints.save(model, ckpt_dir, "epoch-0001", meta | {"epoch": 1})
    second = checkpoints.save(model, ckpt_dir, "epoch-0002", meta | {"epoch": 2})
    checkpoints.set_best(first)
    with monkeypatch.context() as patched:
        calls = crash_at(patched, n, ((os, "replace"), (os, "symlink"), (os, "unlink"),
                                      (shutil, "copytree"), (shutil, "rmtree"), (os, "rename")))
        try:
            checkpoints.set_best(second)
        except Crash:
            pass
    meta = checkpoints.read_meta(ckpt_dir / "best")
    assert meta is not None and meta["epoch"] in (1, 2), calls
    checkpoints.load(ckpt_dir / "best")  # weights complete too
