"""The model learns what the user asked: real training runs on synthetic X-rays whose findings
are planted (chexnet_hvd.synthetic), checked by what the model learned."""

import pandas as pd
import pytest
from conftest import module

from chexnet_hvd.runlog import read_runlog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """1,500 synthetic 64-px images with planted findings, as a CSV in the own-data layout."""
    root = tmp_path_factory.mktemp("planted")
    module("synthetic", "--out", root, "--images", 1500, "--size", 64, "--seed", 2, check=True)
    nih = pd.read_csv(root / "Data_Entry_2017.csv")
    findings = nih["Finding Labels"].str.split("|")
    table = pd.DataFrame({"path": nih["Image Index"], "patient": nih["Patient ID"]})
    for name in ("Effusion", "Infiltration"):
        table[name] = findings.map(lambda f, n=name: int(n in f))
    return root, table


def best_auroc(root, table, columns, tmp_path) -> float:
    """Records of `columns` of the table, 8 epochs of the small CNN; the best val AUROC of the
    first column."""
    tmp_path.mkdir()
    table[["path", "patient", *columns]].to_csv(tmp_path / "labels.csv", index=False)
    module("records", "--dataset", "csv", "--csv", tmp_path / "labels.csv", "--images", root / "images",
           "--out", tmp_path / "records", "--no-progress", check=True)
    module("train", "--data", tmp_path / "records", "--run-dir", tmp_path / "run", "--model", "small_cnn",
           "--image-size", 64, "--batch-size", 32, "--epochs", 8, "--verbose", 0, "--no-tensorboard",
           check=True, timeout=600)
    epochs = [r for r in read_runlog(tmp_path / "run") if r["event"] == "epoch"]
    return max(r["val_auroc"][columns[0]] for r in epochs)


def test_a_one_label_dataset_learns_its_label_as_a_two_label_one_does(planted, tmp_path):
    """Effusion alone, and Effusion beside Infiltration, from the same images: Effusion is
    learned as well either way. (With one class the loss once trained every prediction against
    every label of its batch: 0.57 where two classes reached 1.00.)"""
    root, table = planted
    alone = best_auroc(root, table, ["Effusion"], tmp_path / "alone")
    beside = best_auroc(root, table, ["Effusion", "Infiltration"], tmp_path / "beside")
    assert beside > 0.9, beside
    assert alone > beside - 0.05, (alone, beside)
