"""Labels, metadata splits and the AUROC code against scikit-learn."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexnet_hvd import metadata, metrics, splits
from chexnet_hvd.cli import InputError
from chexnet_hvd.labels import (
    PATHOLOGIES,
    UnknownLabelError,
    format_finding_labels,
    label_cells,
    parse_finding_labels,
)


def test_finding_labels_round_trip_in_canonical_order():
    v = parse_finding_labels("Pneumothorax|Pneumonia")
    assert v[PATHOLOGIES.index("Pneumonia")] == 1 and v[PATHOLOGIES.index("Pneumothorax")] == 1
    assert v.sum() == 2
    assert PATHOLOGIES.index("Pneumonia") == 6 and PATHOLOGIES.index("Pneumothorax") == 7
    assert format_finding_labels(v) == "Pneumonia|Pneumothorax"
    assert parse_finding_labels("No Finding").sum() == 0


def test_unknown_pathology_is_an_error():
    with pytest.raises(UnknownLabelError, match="Pneumonitis"):
        parse_finding_labels("Effusion|Pneumonitis")


def test_bad_cells_and_policies_are_quoted_as_typed():
    """The offending value appears as the user typed it, not as numpy's repr (numpy 2 would
    print np.str_('yes'))."""
    with pytest.raises(UnknownLabelError) as bad_cell:
        label_cells([["1", "yes"]], "zeros")
    assert str(bad_cell.value) == "label value 'yes' is not 1, 0, -1 or blank"
    with pytest.raises(ValueError) as bad_policy:
        label_cells([["1", "0"]], ["zeros", "maybe"])
    assert str(bad_policy.value) == "unknown uncertainty policy 'maybe'"


def test_auroc_equals_sklearn_and_undefined_is_nan():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < [0.3, 0.05, 0.0]).astype(np.float32)
    scores = rng.random((200, 3)) + y * 0.5
    auroc = metrics.per_class_auroc(y, scores)
    for c in range(2):
        assert auroc[c] == pytest.approx(roc_auc_score(y[:, c], scores[:, c]), abs=1e-12)
    assert np.isnan(auroc[2])  # no positives: undefined, never 0.5
    assert metrics.mean_defined(auroc) == pytest.approx(np.mean(auroc[:2]))
    summary = metrics.summarize(y, np.clip(scores, 0, 1), np.ones_like(y), ["a", "b", "c"])
    assert summary["auroc"]["c"] is None and summary["auroc"]["a"] is not None


def test_masked_entries_are_left_out_of_auroc():
    y = np.array([[1], [0], [1], [0]], dtype=np.float32)
    s = np.array([[0.9], [0.1], [0.0], [0.2]])
    mask = np.array([[1], [1], [0], [1]], dtype=np.float32)
    assert metrics.per_class_auroc(y, s, mask)[0] == 1.0
    assert metrics.per_class_auroc(y, s)[0] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))


def _table(patients):
    t = pd.DataFrame({"image": [f"{i}.png" for i in range(len(patients))], "path": "",
                      "patient": [str(p) for p in patients], "split": ""})
    z = np.zeros((len(patients), 14), dtype=np.float32)
    return metadata.attach_labels(t, z, z + 1, PATHOLOGIES)


def test_a_confidently_wrong_prediction_still_gets_its_gradient():
    """In a graph, from Keras' sigmoid (as in training), the loss is computed from the logits:
    at logit -17 for a positive and +30 for a negative (probabilities that round past the clip
    of 1e-7) each entry's gradient is still about 1 (over 4 entries: 0.25), where the clipped
    probability gave exactly 0; the other entries' loss is the probabilities' (validation's)."""
    import tensorflow as tf

    @tf.function
    def loss_and_gradient(z, label, weighted):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = metrics.masked_bce(label, tf.keras.activations.sigmoid(z), tf.ones_like(label), weighted)
        return loss, tape.gradient(loss, z)

    z = tf.constant([[-17.0, 30.0, 0.5, -2.0]])
    label = tf.constant([[1.0, 0.0, 1.0, 0.0]])
    loss, gradient = loss_and_gradient(z, label, None)
    assert gradient.numpy()[0, :2] == pytest.approx([-0.25, 0.25], rel=1e-6)
    entries = np.log1p(np.exp([17.0, 30.0, -0.5, -2.0]))  # softplus(-z) of positives, (z) of negatives
    assert float(loss) == pytest.approx(entries.mean(), rel=1e-6)
    by_prob = metrics.masked_bce(label[:, 2:], tf.sigmoid(z[:, 2:]).numpy(), np.ones((1, 2)))
    assert float(by_prob) == pytest.approx(entries[2:].mean(), rel=1e-6)
    weighted, gradient = loss_and_gradient(z, label, [3.0, 1.0, 1.0, 1.0])
    assert gradient.numpy()[0, 0] == pytest.approx(-0.75, rel=1e-6)


def test_random_split_is_by_patient_seeded_and_leak_free():
    table = _table(np.repeat(np.arange(100), 3))
    a, b = splits.random_split(table, seed=3), splits.random_split(table, seed=3)
    assert (a["split"] == b["split"]).all()
    assert a.groupby("patient")["split"].nunique().max() == 1
    counts = a.groupby("split")["patient"].nunique()
    assert (counts["train"], counts["val"], counts["test"]) == (70, 10, 20)
    splits.check_no_leak(a)


def test_leak_guard_refuses_a_patient_in_two_splits():
    table = _table([1, 1, 2])
    table["split"] = ["train", "test", "val"]
    with pytest.raises(InputError, match="1 patients are in more than one split"):
        splits.check_no_leak(table)
