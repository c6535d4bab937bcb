"""The model learns what the user asked: real training runs on synthetic X-rays whose findings
are planted (chexnet_hvd.synthetic), checked by what the model learned."""

import json

import pandas as pd
import pytest
from conftest import assert_one_line_error, module

from chexnet_hvd.runlog import read_runlog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted(trained_cnn):
    """The trained small CNN's 1,500 synthetic 64-px images with planted findings, as a CSV in
    the own-data layout."""
    root = trained_cnn / "syn"
    nih = pd.read_csv(root / "Data_Entry_2017.csv")
    findings = nih["Finding Labels"].str.split("|")
    table = pd.DataFrame({"path": nih["Image Index"], "patient": nih["Patient ID"]})
    for name in ("Effusion", "Infiltration"):
        table[name] = findings.map(lambda f, n=name: int(n in f))
    return root, table


def best_auroc(root, table, columns, tmp_path) -> float:
    """Records of `columns` of the table, 8 epochs of the small CNN at 32 px (a quarter of 64
    px's compute; the planted findings are still plain); the best val AUROC of the first column."""
    tmp_path.mkdir()
    table[["path", "patient", *columns]].to_csv(tmp_path / "labels.csv", index=False)
    module("records", "--dataset", "csv", "--csv", tmp_path / "labels.csv", "--images", root / "images",
           "--out", tmp_path / "records", "--no-progress", check=True)
    module("train", "--data", tmp_path / "records", "--run-dir", tmp_path / "run", "--model", "small_cnn",
           "--image-size", 32, "--batch-size", 32, "--epochs", 8, "--verbose", 0, "--no-tensorboard",
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


def test_a_validation_split_that_cannot_score_still_steers(planted, tmp_path):
    """Every validation image negative for both classes (AUROC undefined for all): the run says
    so, and its best checkpoint, plateau and early stopping go by the validation loss instead
    (recorded). (It used to cut the lr 10x every epoch, write no best checkpoint, and stop early
    'without a better val mean AUROC than None'.)"""
    root, table = planted
    table = table.assign(split="train")
    clean = table.groupby("patient")[["Effusion", "Infiltration"]].max().sum(axis=1) == 0
    table.loc[table["patient"].isin(clean[clean].index[:60]), "split"] = "val"
    table.loc[table["patient"].isin(clean[~clean].index[:40]), "split"] = "test"
    tmp_path.joinpath("data").mkdir()
    table.to_csv(tmp_path / "data" / "labels.csv", index=False)
    module("records", "--dataset", "csv", "--csv", tmp_path / "data" / "labels.csv", "--images", root / "images",
           "--split", "official", "--out", tmp_path / "records", "--no-progress", check=True)
    proc = module("train", "--data", tmp_path / "records", "--run-dir", tmp_path / "run", "--model", "small_cnn",
                  "--image-size", 32, "--batch-size", 32, "--epochs", 3, "--steps-per-epoch", 4, "--verbose", 0,
                  "--schedule", "plateau", "--plateau-patience", 1, "--early-stopping", 1, "--no-tensorboard",
                  check=True, timeout=600)
    assert "no class of validation split 'val' has both positives and negatives" in proc.stderr
    assert "split 'val' has no positives for 2 of 2 classes (Effusion, Infiltration)" in proc.stderr
    log = read_runlog(tmp_path / "run")
    assert log[0]["best_by"] == "val_loss"
    meta = json.loads((tmp_path / "run" / "checkpoints" / "best" / "meta.json").read_text())
    losses = [r["val_loss"] for r in log if r["event"] == "epoch"]
    assert meta["best_by"] == "val_loss" and meta["best"] == min(losses)
    assert all(r["val_mean_auroc"] is None for r in log if r["event"] == "epoch")

    # A run validated on a split that scores, resumed on this one: its best and patience went
    # by AUROC there, and are counted afresh by the loss here (they once stayed on AUROC, whose
    # value here is undefined: best, plateau and early stopping stood still).
    train = ["train", "--data", tmp_path / "records", "--run-dir", tmp_path / "moved", "--model", "small_cnn",
             "--image-size", 32, "--batch-size", 32, "--steps-per-epoch", 4, "--verbose", 0, "--no-tensorboard"]
    module(*train, "--val-split", "test", "--epochs", 1, check=True, timeout=600)
    proc = module(*train, "--val-split", "val", "--epochs", 3, "--resume", check=True, timeout=600)
    assert "--val-split test -> val" in proc.stderr
    assert "went by val_mean_auroc on 'test', this attempt's by val_loss on 'val': not comparable" in proc.stderr
    log = read_runlog(tmp_path / "moved")
    assert [r["best_by"] for r in log if r["event"] == "start"] == ["val_mean_auroc", "val_loss"]
    meta = json.loads((tmp_path / "moved" / "checkpoints" / "best" / "meta.json").read_text())
    losses = [r["val_loss"] for r in log if r["event"] == "epoch"][1:]
    assert meta["best_by"] == "val_loss" and meta["best"] == min(losses) and meta["epoch"] > 1


def test_a_diverging_run_ends_with_one_line_and_a_new_run_does_not_overwrite_an_old_one(planted, tmp_path):
    """An lr that makes the weights overflow: validation's predictions are not numbers; the run
    ends with one line saying it diverged, its run log's end says so (it was a scikit-learn
    traceback, 'Input contains NaN'). Then a run without --resume into a run directory that
    holds a checkpoint is refused (a settings file's run_dir once trained over the old run)."""
    root, table = planted
    tmp_path.joinpath("data").mkdir()
    table.to_csv(tmp_path / "data" / "labels.csv", index=False)
    module("records", "--dataset", "csv", "--csv", tmp_path / "data" / "labels.csv", "--images", root / "images",
           "--out", tmp_path / "records", "--no-progress", check=True)
    train = ["train", "--data", tmp_path / "records", "--model", "small_cnn", "--image-size", 32,
             "--steps-per-epoch", 4, "--epochs", 1, "--verbose", 0, "--no-tensorboard"]
    proc = module(*train, "--run-dir", tmp_path / "diverged", "--optimizer", "sgd", "--lr", "1e4", timeout=600)
    assert_one_line_error(proc, "error: epoch 1: ", "of the model's validation predictions are not numbers: "
                          "training diverged")
    end = read_runlog(tmp_path / "diverged")[-1]
    assert end["event"] == "end" and end["status"] == "failed" and "training diverged" in end["error"]

    module(*train, "--run-dir", tmp_path / "run", check=True, timeout=600)
    before = (tmp_path / "run" / "config.json").read_text(), len(read_runlog(tmp_path / "run"))
    proc = module("train", "--config", tmp_path / "run" / "config.json", "--lr", "1e-2", timeout=600)
    assert_one_line_error(proc, f"error: --run-dir: {tmp_path / 'run'} holds a run (its checkpoint epoch-0001), "
                          "which a new run would write over: --resume to go on with it, or start a new run")
    assert ((tmp_path / "run" / "config.json").read_text(), len(read_runlog(tmp_path / "run"))) == before


def test_a_resume_on_records_of_other_classes_is_refused(planted, tmp_path):
    """Two classes each, the second another (Infiltration's column named Mass): the weights
    would restore without error and output 1 go on learning Mass as it had Infiltration; the
    resume is refused with one line naming the output. The same records resume."""
    root, table = planted
    for name, frame in (("first", table), ("other", table.rename(columns={"Infiltration": "Mass"}))):
        tmp_path.joinpath(name).mkdir()
        frame.to_csv(tmp_path / name / "labels.csv", index=False)
        module("records", "--dataset", "csv", "--csv", tmp_path / name / "labels.csv", "--images", root / "images",
               "--out", tmp_path / name / "records", "--no-progress", check=True)
    train = ["train", "--run-dir", tmp_path / "run", "--model", "small_cnn", "--image-size", 32,
             "--steps-per-epoch", 2, "--verbose", 0, "--no-tensorboard"]
    module(*train, "--data", tmp_path / "first" / "records", "--epochs", 1, check=True)
    assert_one_line_error(module(*train, "--data", tmp_path / "other" / "records", "--epochs", 2, "--resume"),
                          f"{tmp_path / 'other' / 'records'}: not the classes of ",
                          "output 1: Infiltration in the checkpoint, Mass in the records", "start a new run")
    module(*train, "--data", tmp_path / "first" / "records", "--epochs", 2, "--resume", check=True)
