"""Models build and train a step; ResNet-59's shape and size; bf16 and fp16 steps; class weights
reach the loss."""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ENGINES, run

from chexnet_hvd import models
from chexnet_hvd.train import make_loss, pack_targets


@pytest.fixture(autouse=True)
def fp32_policy():
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def one_step(model, size, optimizer=None):
    model.compile(optimizer=optimizer or tf.keras.optimizers.Adam(1e-3), loss=make_loss())
    x = tf.random.stateless_normal((2, size, size, 3), seed=[1, 2])
    y = pack_targets(tf.ones((2, 14)), tf.ones((2, 14)))
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    changed = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    return loss, changed


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("small_cnn", 32), ("densenet121", 32), ("resnet50", 64), ("resnet59", 64)])
def test_every_model_builds_and_takes_a_step(name, size):
    model = models.build_model(name, size)
    assert model.output_shape == (None, 14) and model.layers[-1].dtype == "float32"
    loss, changed = one_step(model, size)
    assert np.isfinite(loss) and changed


def test_resnet59_at_896_ends_7x7x4096_with_about_83m_parameters():
    model = models.build_model("resnet59", 896)
    assert model.get_layer("stage5_block3_out").output.shape[1:] == (7, 7, 4096)
    assert 80e6 <= model.count_params() <= 95e6


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step(policy):
    tf.keras.mixed_precision.set_global_policy(policy)
    model = models.build_model("small_cnn", 32)
    assert model.get_layer("conv1").compute_dtype == policy.split("_")[1]
    assert model.get_layer("predictions").dtype == "float32"
    opt = tf.keras.optimizers.Adam(1e-3)
    if policy == "mixed_float16":
        opt = tf.keras.mixed_precision.LossScaleOptimizer(opt)
    loss, changed = one_step(model, 32, opt)
    assert np.isfinite(loss) and changed
    if policy == "mixed_float16":
        assert float(opt.loss_scale) > 1  # dynamic loss scaling is active


def test_class_weights_change_the_loss_and_masked_entries_do_not():
    y_true = pack_targets(tf.constant([[1.0, 0.0, 1.0]]), tf.constant([[1.0, 1.0, 0.0]]))  # 3rd masked
    prob = tf.constant([[0.3, 0.4, 0.01]])
    plain = float(make_loss()(y_true, prob))
    weighted = float(make_loss([5.0, 1.0, 1.0])(y_true, prob))
    expected = -(np.log(0.3) + np.log(0.6)) / 2
    assert plain == pytest.approx(expected, rel=1e-5)
    assert weighted == pytest.approx(-(5 * np.log(0.3) + np.log(0.6)) / 2, rel=1e-5)
    flipped = tf.constant([[0.3, 0.4, 0.99]])  # a masked entry's prediction does not matter
    assert float(make_loss()(y_true, flipped)) == pytest.approx(plain)


def test_training_and_validation_share_one_loss():
    """A batch with masks (one image has one labelled class, the other three): the training
    loss and the validation loss are both the mean over the 4 unmasked entries (by hand)."""
    from chexnet_hvd import metrics

    label = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
    mask = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
    prob = np.array([[0.2, 0.9, 0.9], [0.4, 0.7, 0.6]], np.float32)
    by_hand = -(np.log(0.2) + np.log(0.6) + np.log(0.7) + np.log(0.6)) / 4
    train_loss = float(make_loss()(pack_targets(label, mask), tf.constant(prob)))
    val_loss = metrics.summarize(label, prob, mask, ["a", "b", "c"])["loss"]
    assert train_loss == pytest.approx(by_hand, rel=1e-5) and val_loss == pytest.approx(by_hand, rel=1e-5)



@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_the_training_loss_is_masked_bce_for_any_number_of_classes(tmp_path, engine):
    """For 1, 2, 14 and 21 classes, with and without masks, fp32 and mixed_float16, under each
    engine: the loss Keras trains on equals `metrics.masked_bce` of the same predictions. With
    [B, 2, C] targets, one class made Keras squeeze them to [B, 2] and train every prediction
    against every label of the batch. Where every logit is -30 against positive labels, Keras
    trains on the loss from the logits (30), not the clipped probabilities' (16.1): the graph
    hands the loss its logits under both engines."""
    out = tmp_path / "losses.json"
    run([sys.executable, "tests/loss_worker.py", str(out), engine], timeout=600, check=True)
    results = json.loads(out.read_text())
    assert len(results) == 18
    for r in results:
        assert r["train_on_batch"] == pytest.approx(r["masked_bce"], rel=1e-5), r
        if r["saturated"]:
            assert (r["train_on_batch"], r["of_probabilities"]) == (pytest.approx(30.0, rel=1e-4), pytest.approx(16.118, rel=1e-3)), r
        else:
            assert r["train_on_batch"] == pytest.approx(r["of_probabilities"], rel=1e-5), r
