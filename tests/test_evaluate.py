"""Evaluation: patient-level bootstrap, operating points, ten-crop windows, the report under 1 and
2 ranks (also started by hand with --workers), and bad checkpoints."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    ENGINES,
    ROOT,
    VENV_BIN,
    assert_one_line_error,
    assert_ranks_identical,
    fill,
    module,
    ranks,
    run,
    small_disk,
)

from chexnet_hvd import checkpoints, launch, metrics, models, records, views
from chexnet_hvd.runlog import read_runlog


@pytest.mark.slow
def test_bootstrap_is_reproducible_contains_the_estimate_and_resamples_patients():
    rng = np.random.default_rng(0)
    n = 200
    label = (rng.random((n, 2)) < 0.3).astype(np.float32)
    prob = np.clip(label * 0.3 + rng.random((n, 2)) * 0.8, 0, 1).astype(np.float32)
    mask = np.ones_like(label)
    # One patient with 60 identical images: counted once per draw, it moves the AUROC a lot.
    label[:60], prob[:60] = [1, 0], [0.05, 0.9]
    patients = np.array(["p0"] * 60 + [f"p{i}" for i in range(1, n - 59)])
    a = metrics.bootstrap_ci(label, prob, mask, patients, resamples=300, seed=7)
    b = metrics.bootstrap_ci(label, prob, mask, patients, resamples=300, seed=7)
    np.testing.assert_array_equal(a["auroc_lo"], b["auroc_lo"])
    assert a["patients"] == n - 59
    # shared by 3 ranks, each scoring every 3rd resample, their shares allgathered (threads
    # meeting at a barrier stand in for the ranks): the same intervals as one process's
    shares, meet = [None] * 3, threading.Barrier(3)

    def share(k):
        def allgather(mine):
            shares[k] = mine
            meet.wait()
            return shares
        return metrics.bootstrap_ci(label, prob, mask, patients, resamples=300, seed=7, part=(k, 3), gather=allgather)

    with ThreadPoolExecutor(3) as pool:
        for shared in pool.map(share, range(3)):
            for key in ("auroc_lo", "auroc_hi", "auprc_lo", "defined"):
                np.testing.assert_array_equal(shared[key], a[key])
            assert shared["mean_auroc_lo"] == a["mean_auroc_lo"]
    assert sorted(i for part in shares for i in part) == list(range(300))
    point = metrics.per_class_auroc(label, prob, mask)
    assert np.all(a["auroc_lo"] <= point) and np.all(point <= a["auroc_hi"])
    per_image = metrics.bootstrap_ci(label, prob, mask, np.arange(n).astype(str), resamples=300, seed=7)
    width = a["auroc_hi"][0] - a["auroc_lo"][0]
    assert width > 1.5 * (per_image["auroc_hi"][0] - per_image["auroc_lo"][0])


def test_bootstrap_draws_every_image_of_each_drawn_patient_wherever_its_rows_are():
    # Patients' images scattered over the split, as in a shuffled test set: each draw must bring
    # exactly a drawn patient's rows (the grouping is one sort, not a scan per patient).
    rng = np.random.default_rng(1)
    n = 500
    patients = rng.choice([f"p{i:03d}" for i in range(140)], n)
    label = (rng.random((n, 3)) < 0.3).astype(np.float32)
    prob = np.clip(label * 0.4 + rng.random((n, 3)) * 0.7, 0, 1).astype(np.float32)
    mask = np.ones_like(label)
    got = metrics.bootstrap_ci(label, prob, mask, patients, resamples=40, seed=3)
    names = np.unique(patients)
    rows_of = {p: [i for i in range(n) if patients[i] == p] for p in names}
    draws = np.random.default_rng(3)
    means = []
    for _ in range(40):
        rows = [i for g in draws.integers(0, len(names), len(names)) for i in rows_of[names[g]]]
        means.append(metrics.mean_defined(metrics.per_class_auroc(label[rows], prob[rows], mask[rows])))
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert (got["mean_auroc_lo"], got["mean_auroc_hi"]) == (lo, hi)
    assert got["patients"] == len(names)


def test_youden_threshold_and_sensitivity_specificity():
    label = np.array([[0], [0], [0], [1], [1], [1], [1]], np.float32)
    prob = np.array([[0.1], [0.2], [0.6], [0.4], [0.7], [0.8], [0.9]], np.float32)
    mask = np.ones_like(label)
    thr = metrics.youden_thresholds(label, prob, mask)
    assert thr[0] == pytest.approx(0.7)  # J = 3/4 + 1 - 1; the cut at 0.4 gives 1 + 2/3 - 1
    sens, spec = metrics.sensitivity_specificity(label, prob, mask, thr)
    assert sens[0] == pytest.approx(3 / 4) and spec[0] == pytest.approx(1.0)


def test_tencrop_views_are_the_expected_windows_and_mirrors():
    size, big = 28, 32  # 28 x 256/224 = 32: the source is already the resized size
    rows, cols = np.mgrid[0:big, 0:big]
    pixels = ((rows * 7 + cols * 3) % 256).astype(np.uint8)
    crops = views.tta_views(tf.constant(pixels[..., None]), size, "tencrop").numpy()
    assert crops.shape == (10, size, size, 3)
    norm = (pixels[..., None] / 255.0 - np.array(views.IMAGENET_MEAN)) / np.array(views.IMAGENET_STD)
    windows = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # corners, then the centre
    for i, (r, c) in enumerate(windows):
        np.testing.assert_allclose(crops[i], norm[r:r + size, c:c + size], atol=1e-5)
        np.testing.assert_array_equal(crops[i + 5], crops[i][:, ::-1])


def tencrop_args(checkpoint, records_dir) -> list[str]:
    return ["-m", "chexnet_hvd.evaluate", "--checkpoint", str(checkpoint), "--data", str(records_dir),
            "--tta", "tencrop", "--bootstrap", "200"]


@pytest.fixture(scope="module")
def alone(checkpoint, records_dir, tmp_path_factory):
    """(report folder, stderr) of the checkpoint's ten-crop evaluation as one process."""
    out = tmp_path_factory.mktemp("alone") / "one"
    proc = run([sys.executable, *tencrop_args(checkpoint, records_dir), "--out", str(out)], check=True, timeout=300)
    return out, proc.stderr


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_evaluate_on_two_ranks_equals_one_and_writes_the_report(checkpoint, records_dir, alone, tmp_path, engine):
    one_dir, alone_stderr = alone
    # a model trained without --crop: ten-crop's windows are at a scale it never saw, and it says so
    note = "--tta tencrop: this model was trained without --crop, on whole images"
    assert f"warning: {note}" in alone_stderr
    proc = run(ranks(engine, 2, sys.executable, *tencrop_args(checkpoint, records_dir), "--out", tmp_path / "two"),
               check=True, timeout=300)
    # success says so once, without error lines from the engine (a tf worker leaving before the
    # chief had finished made its coordination service log three) or a launcher prefix per line
    # of the report (it is in report.md)
    assert not re.search(r"^(\[\d\]<std\w+>:)?E\d{4} |heartbeat timeout", proc.stderr, re.M), proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 2 and "mean AUROC" in proc.stdout, proc.stdout[-2000:]
    one, two = (json.loads((d / "report.json").read_text()) for d in (one_dir, tmp_path / "two"))
    assert (one["world_size"], two["world_size"], two["engine"]) == (1, 2, engine) and one["n"] == two["n"] > 0
    assert [(r["rank"], r["local_rank"]) for r in two["ranks"]] == [(0, 0), (1, 1)]  # one start-up
    assert all(r["threads"] == 1 for r in two["ranks"])  # the node's 2 cores shared by its 2 ranks
    for key in ("auroc", "auroc_tta", "auprc", "auroc_ci", "threshold", "sensitivity"):
        assert [c[key] for c in one["classes"]] == [c[key] for c in two["classes"]], key
    assert one["mean_auroc"] == two["mean_auroc"] and one["mean_auroc"]["value"] is not None
    assert one["mean_auroc"]["ci_lo"] <= one["mean_auroc"]["value"] <= one["mean_auroc"]["ci_hi"]
    atelectasis = one["classes"][0]
    assert atelectasis["pathology"] == "Atelectasis" and atelectasis["chexnet_paper_auroc"] == 0.8094
    for name in ("report.md", "roc.png", "pr.png"):
        assert (one_dir / name).stat().st_size > 1000
    report = (one_dir / "report.md").read_text()
    assert "AUROC tencrop" in report and "| **mean** |" in report and "0.841" in report
    assert f"Note: {note}" in report and one["tta_note"].startswith(note)


@pytest.mark.slow
@pytest.mark.mpi
def test_a_chief_that_cannot_write_its_report_ends_both_ranks_with_one_line_each(checkpoint, records_dir, tmp_path):
    """The report's file system is full: the chief says so in one line (exit 2); the other
    rank, waiting for it in a collective, ends with one line saying another rank left."""
    with small_disk(tmp_path / "disk") as disk:
        fill(disk)
        proc = run(ranks("tf", 2, sys.executable, "-m", "chexnet_hvd.evaluate", "--checkpoint", checkpoint,
                         "--data", records_dir, "--bootstrap", "20", "--out", disk / "eval"), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert re.search(rf"^error: {disk}/eval/report.json: cannot write this file: No space left on device$", out, re.M), out[-3000:]
    assert "error: rank 1: another rank left the job (" in out, out[-3000:]


def by_hand(n: int, logs, *command) -> None:
    """n tf-engine workers started one by one with no launcher and no TF_CONFIG, as a user would
    on n hosts: each given the same --workers list and its own --worker-index."""
    workers = ",".join(f"localhost:{port}" for port in launch.free_ports(n))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"} | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    procs = [subprocess.Popen([*map(str, command), "--engine", "tf", "--workers", workers, "--worker-index", str(i)],
                              cwd=ROOT, env=env, stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT)
             for i in range(n)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * n, [(logs / f"worker{i}.log").read_text()[-2000:] for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tf"])  # the engine --workers is for (marks it for the TF 2.21 lane)
def test_workers_flags_make_one_job_of_processes_started_by_hand(records_dir, tmp_path, engine):
    """Without --workers each process would train alone (world size 1, its own weights)."""
    run_dir = tmp_path / "run"
    by_hand(2, tmp_path, sys.executable, "-m", "chexnet_hvd.train", "--data", records_dir, "--run-dir", run_dir,
            "--model", "small_cnn", "--image-size", 32, "--batch-size", 16, "--epochs", 1, "--audit",
            "--verbose", 0, "--threads", 1)
    start = read_runlog(run_dir)[0]
    assert (start["world_size"], start["engine"], [r["rank"] for r in start["ranks"]]) == (2, engine, [0, 1])
    assert_ranks_identical(run_dir)
    args = ["-m", "chexnet_hvd.evaluate", "--checkpoint", run_dir / "checkpoints" / "epoch-0001",
            "--data", records_dir, "--bootstrap", 50]
    run([sys.executable, *map(str, args), "--out", str(tmp_path / "one")], check=True, timeout=300)
    by_hand(2, tmp_path, sys.executable, *args, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["n"] == two["n"] > 0
    assert [c["auroc"] for c in one["classes"]] == [c["auroc"] for c in two["classes"]]


@pytest.mark.slow
def test_bad_checkpoints_give_one_line_errors(checkpoint, records_dir, tmp_path):
    not_ckpt = module("evaluate", "--checkpoint", tmp_path, "--data", records_dir)
    assert_one_line_error(not_ckpt, "not a checkpoint directory")
    no_best = module("evaluate", "--checkpoint", checkpoint.parent / "nothing" / "best", "--data", records_dir)
    assert_one_line_error(no_best, "best: no such checkpoint (a run writes best/ once an epoch", "no checkpoints in")
    shutil.copytree(checkpoint.parent, tmp_path / "run" / "checkpoints", symlinks=True)
    (tmp_path / "run" / "checkpoints" / "best").unlink()
    no_best = module("evaluate", "--checkpoint", tmp_path / "run" / "checkpoints" / "best", "--data", records_dir)
    assert_one_line_error(no_best, "checkpoints there: epoch-0001, epoch-0002, epoch-0003")
    # best is a link: copied as one (cp -r, rsync -a), it names a folder that is not there
    (tmp_path / "copied").mkdir()
    subprocess.run(["cp", "-r", checkpoint, tmp_path / "copied"], check=True)
    copied = module("evaluate", "--checkpoint", tmp_path / "copied" / "best", "--data", records_dir)
    assert_one_line_error(copied, "best: a link to .best-epoch-", "which is not beside it", "cp -rL")
    # weights a diverged run wrote: not numbers (was scikit-learn's traceback, 'Input contains NaN')
    model, meta = checkpoints.load(checkpoint)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    checkpoints.save(model, tmp_path / "nan", "epoch-0001", meta, tf.keras.optimizers.Adam())
    nan = module("evaluate", "--checkpoint", tmp_path / "nan" / "epoch-0001", "--data", records_dir,
                 "--bootstrap", 10)
    assert_one_line_error(nan, "epoch-0001: ", "of its predictions on split 'test' are not numbers: its "
                          "weights are a diverged run's")

    five = models.build_model("small_cnn", 32, num_classes=5)
    five.compile(optimizer="adam", loss="binary_crossentropy")
    meta = json.loads((checkpoint / "meta.json").read_text())
    checkpoints.save(five, tmp_path / "ckpts", "five", meta | {"num_classes": 5, "classes": list("ABCDE")})
    other = module("evaluate", "--checkpoint", tmp_path / "ckpts" / "five", "--data", records_dir)
    assert_one_line_error(other, "predicts 5 classes", "records hold 14")

    wrong = tmp_path / "wrong"  # weights of a 32-px small CNN, meta claiming 48 px
    shutil.copytree(checkpoint, wrong)
    (wrong / "meta.json").write_text(json.dumps(meta | {"image_size": 48}))
    mismatch = module("evaluate", "--checkpoint", wrong, "--data", records_dir)
    assert_one_line_error(mismatch, "weights do not fit")


def test_chexnet_paper_numbers_only_beside_nih_records_of_its_14_classes():
    """CheXpert's Atelectasis is not NIH's: no paper AUROC beside it (they used to be shown)."""
    from chexnet_hvd.evaluate import paper_comparable
    from chexnet_hvd.labels import CHEXPERT_COMPETITION, PATHOLOGIES

    assert paper_comparable({"dataset": "nih", "classes": list(PATHOLOGIES)})
    assert not paper_comparable({"dataset": "chexpert", "classes": list(CHEXPERT_COMPETITION)})
    assert not paper_comparable({"dataset": "chexpert", "classes": list(PATHOLOGIES)})
    assert not paper_comparable({"dataset": "nih", "classes": list(PATHOLOGIES[:5])})


def test_the_report_counts_the_labelled_images_of_each_class_beside_its_positives():
    """A class scored on 3 of 6 images (the rest unlabelled) says so: 'labelled' 3, positives 2."""
    from chexnet_hvd.evaluate import class_rows, markdown

    label = np.array([[1, 1], [0, 0], [1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    mask = np.array([[1, 1], [1, 0], [1, 0], [1, 1], [1, 1], [1, 0]], np.float32)
    pred = {"label": label, "mask": mask, "prob": np.linspace(0.1, 0.9, 12, dtype=np.float32).reshape(6, 2)}
    ci = metrics.bootstrap_ci(label, pred["prob"], mask, np.arange(6).astype(str), resamples=20, seed=0)
    none = np.full(2, np.nan)
    rows = class_rows(["Atelectasis", "Edema"], pred, ci, None, none, none, none, comparable=False)
    assert [(r["labelled"], r["positives"]) for r in rows] == [(6, 3), (3, 2)]
    report = {"tta": "none", "classes": rows, "paper_comparable": False, "split": "test", "data": "d",
              "checkpoint": "c", "checkpoint_epoch": 2, "model": "m", "image_size": 32, "n": 6, "val_split": "",
              "mean_auroc": {"value": 0.5, "ci_lo": 0.4, "ci_hi": 0.6}, "mean_auroc_tta": None,
              "bootstrap": {"patients": 6, "resamples": 20, "seed": 0}}
    text = markdown(report)
    assert "| pathology | labelled | positives |" in text and "| Edema | 3 | 2 |" in text
    assert "(epoch 2, m, 32 px)" in text


def test_one_patient_has_no_interval_and_undefined_numbers_are_null_in_the_report():
    """A test split of one patient: every resample is that patient, so no interval (it was a
    zero-width "95% CI"); a split where no class has both positives and negatives: the mean
    AUROC and its interval are undefined, written as null (round(nan) wrote NaN, not JSON)."""
    from chexnet_hvd.evaluate import class_rows, num

    label = np.array([[1, 0], [0, 0], [1, 0]], np.float32)
    pred = {"label": label, "mask": np.ones_like(label), "prob": np.array([[0.9, 0.2], [0.3, 0.1], [0.6, 0.4]], np.float32)}
    ci = metrics.bootstrap_ci(label, pred["prob"], pred["mask"], np.array(["p1"] * 3), resamples=20, seed=0)
    assert np.isnan([ci["mean_auroc_lo"], ci["mean_auroc_hi"], *ci["auroc_lo"], *ci["auprc_hi"]]).all()
    rows = class_rows(["Atelectasis", "Edema"], pred, ci, None, *[np.full(2, np.nan)] * 3, comparable=False)
    assert rows[0]["auroc"] == 1.0 and rows[0]["auroc_ci"] == [None, None] and rows[1]["auroc"] is None
    undefined = metrics.mean_defined(metrics.per_class_auroc(label[:, 1:], pred["prob"][:, 1:], pred["mask"][:, 1:]))
    mean = {"value": num(undefined), "ci_lo": num(ci["mean_auroc_lo"]), "ci_hi": num(ci["mean_auroc_hi"])}

    def strict(constant):
        raise AssertionError(f"{constant} in report.json")

    assert json.loads(json.dumps({"mean_auroc": mean, "classes": rows}), parse_constant=strict)["mean_auroc"] == {
        "value": None, "ci_lo": None, "ci_hi": None}


def test_the_default_output_lies_outside_the_checkpoints(tmp_path):
    """RUN_DIR/eval/<name>-<split>: for RUN_DIR/checkpoints/NAME and for an export beside them;
    ten-crop and other records than the run's add their names (they overwrote each other)."""
    from chexnet_hvd.evaluate import EvalConfig, default_out, other_records

    run_dir = tmp_path / "runs" / "x"
    assert default_out(run_dir / "checkpoints" / "best", "test") == run_dir / "eval" / "best-test"
    assert default_out(f"{run_dir}/checkpoints/epoch-0003/", "val") == run_dir / "eval" / "epoch-0003-val"
    assert default_out(run_dir / "export-openvino-int8", "test") == run_dir / "eval" / "export-openvino-int8-test"
    # ten-crop, and records other than the training run's, get their own folder
    best = run_dir / "checkpoints" / "best"
    assert default_out(best, "test", "tencrop") == run_dir / "eval" / "best-test-tencrop"
    assert default_out(best, "test", "flip", "chexpert-0a1b2c3d") == run_dir / "eval" / "best-test-flip-chexpert-0a1b2c3d"
    # other records: those whose training split is not the one the checkpoint was trained on,
    # named by their folder and the evaluated split's digest
    shards = {"shards": [{"file": "test-0", "count": 9}]}
    manifest = {"splits": {"train": {"shards": [{"file": "train-0", "count": 9}]}, "test": shards}}
    cfg = EvalConfig(checkpoint="c", data=str(tmp_path / "staged" / "records"))
    trained_on = {"train_signature": records.split_signature(manifest, "train")}
    assert other_records(cfg, trained_on, manifest) == ""  # the same records, wherever they are
    named = other_records(cfg, {"train_signature": None}, manifest)
    assert named == f"records-{records.split_signature(manifest, 'test')['digest'][:8]}"
    assert other_records(cfg, trained_on, {"splits": {"test": shards}}) == named
    # another hospital's folder of the same name: another name
    other = {"splits": {"test": {"shards": [{"file": "test-0", "count": 8}]}}}
    assert other_records(cfg, trained_on, other) not in ("", named)


@pytest.mark.slow
def test_reports_outlive_the_checkpoints_training_prunes_and_replaces(records_dir, tmp_path):
    """Evaluate `best` and `epoch-0001` of a 1-epoch run, resume it for 3 more epochs keeping
    one checkpoint: epoch-0001 is pruned and best moves to a later epoch (its old copy deleted),
    and both reports are still where evaluate said it wrote them. (They were written inside the
    checkpoints: CHECKPOINT/eval-SPLIT.)"""
    run_dir = tmp_path / "run"
    train = ["--data", records_dir, "--run-dir", run_dir, "--model", "small_cnn", "--image-size", 32,
             "--batch-size", 16, "--keep-checkpoints", 1, "--deterministic", "--verbose", 0]
    module("train", *train, "--epochs", 1, check=True, timeout=300)
    written = {}
    for name in ("best", "epoch-0001"):
        proc = module("evaluate", "--checkpoint", run_dir / "checkpoints" / name, "--data", records_dir,
                      "--bootstrap", 20, check=True, timeout=300)
        out = run_dir / "eval" / f"{name}-test"
        assert f"wrote {out}/report.md" in proc.stdout
        written[name] = {f: (out / f).read_bytes() for f in ("report.md", "report.json", "roc.png", "pr.png")}
    assert json.loads(written["best"]["report.json"])["checkpoint_epoch"] == 1
    module("train", *train, "--epochs", 4, "--resume", check=True, timeout=300)
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "epoch-0001").exists() and checkpoints.read_meta(ckpts / "best")["epoch"] > 1
    assert not list(ckpts.glob(".best-epoch-0001-*"))  # best's old copy is gone
    for name, files in written.items():
        assert {f: (run_dir / "eval" / f"{name}-test" / f).read_bytes() for f in files} == files
