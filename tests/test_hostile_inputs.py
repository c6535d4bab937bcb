"""Every CLI that reads files, fed its bad inputs: missing, empty, wrong format, truncated,
another schema version, the wrong class count, records of another image size, an unwritable
output directory, a full disk (/dev/full where a path is written). Each must end with one line
`error: <file or flag>: <problem>` on stderr, exit code 2, no traceback, and leave nothing
half-written that looks complete. CASES counts the distinct bad inputs (the closing note
quotes it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line_error, module, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bad(tmp_path_factory, records_dir, trained_cnn) -> dict[str, Path]:
    """One folder of bad inputs, made once; names below refer to its entries."""
    root = tmp_path_factory.mktemp("bad")
    b: dict[str, Path] = {"root": root, "records": records_dir, "ckpt": trained_cnn / "run" / "checkpoints" / "best",
                          "images": trained_cnn / "syn" / "images", "good_csv": trained_cnn / "syn" / "Data_Entry_2017.csv"}
    (root / "empty.csv").write_text("")
    (root / "binary.csv").write_bytes((ROOT / "docs" / "scaling.png").read_bytes()[:4000])
    (root / "no_labels.csv").write_text("Image Index,Patient ID\n00000001_000.png,1\n")
    (root / "unknown_label.csv").write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Pneumonitis,1\n")
    (root / "twice.csv").write_text("Image Index,Finding Labels,Patient ID\n"
                                    "00000001_000.png,Hernia,1\n00000001_000.png,Mass,1\n")
    good = b["good_csv"].read_text()
    (root / "truncated.csv").write_text(good[: len(good) // 2].rsplit(",", 3)[0])
    (root / "a_file").write_text("a regular file where a directory should be")
    (root / "text.png").write_text("not an image")
    b["one_png"] = sorted(b["images"].iterdir())[0]
    png = b["one_png"].read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "no_images").mkdir()
    (root / "weights.txt").write_text("not weights")

    def records_copy(name: str, change) -> None:
        shutil.copytree(records_dir, root / name)
        change(root / name)

    def manifest_edit(edit):
        def change(path):
            manifest = json.loads((path / "manifest.json").read_text())
            edit(manifest)
            (path / "manifest.json").write_text(json.dumps(manifest))
        return change

    first_train = json.loads((records_dir / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    records_copy("no_manifest", lambda p: (p / "manifest.json").unlink())
    records_copy("bad_json", lambda p: (p / "manifest.json").write_text('{"schema_version": 1, "spl'))
    records_copy("old_schema", manifest_edit(lambda m: m.update(schema_version=0)))
    records_copy("shard_missing", lambda p: (p / first_train).unlink())
    records_copy("shard_truncated", lambda p: (p / first_train).write_bytes((p / first_train).read_bytes()[:500]))
    records_copy("five_classes", manifest_edit(lambda m: m.update(classes=m["classes"][:5], num_classes=5)))
    records_copy("stored_16px", manifest_edit(lambda m: m.update(image_size=16)))
    ckpt = root / "ckpt_bad_meta"
    shutil.copytree(b["ckpt"], ckpt)
    (ckpt / "meta.json").write_text("{")
    other = root / "ckpt_other_schema"
    shutil.copytree(b["ckpt"], other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | {"schema": "chexnet_hvd.checkpoint/9"}))
    runs = root / "runs"
    runs.mkdir()
    (runs / "other_schema.jsonl").write_text(json.dumps({"schema": "someone-else/3", "event": "start"}) + "\n")
    (runs / "empty.jsonl").write_text("")
    (runs / "garbled.jsonl").write_text('{"schema": "chexnet_hvd.runlog/1", "event": "start"}\nnot json\n'
                                        '{"schema": "chexnet_hvd.runlog/1", "event": "end"}\n')
    (runs / "good").mkdir()
    shutil.copy(trained_cnn / "run" / "runlog.jsonl", runs / "good" / "runlog.jsonl")
    (root / "baseline_cols.csv").write_text("gpus,throughput\n1,100\n")
    (root / "files.txt").write_text("images_001.tar.gz\n")
    return b


OUT = "OUT"  # the case's own output path, BAD/<case id>


def p(name: str):
    """A path in the bad-input folder (resolved when the case runs)."""
    return lambda b: b["root"] / name


def f(key: str):
    return lambda b: b[key]


def lit(value):
    return lambda b: value


TRAIN = [f("records"), "--run-dir", OUT, "--model", "small_cnn", "--image-size", "32", "--epochs", "1"]
EVAL = ["--checkpoint", f("ckpt"), "--data", f("records"), "--bootstrap", "10", "--out", OUT]
# (id, command, arguments, fragments of the one error line, what must not exist afterwards: True
# for the case's own output OUT, or a name in the bad-input folder)
CASES = [
    # records: the metadata CSV and the images folder
    ("records-csv-missing", "records", ["--csv", p("none.csv"), "--images", f("images"), "--out", OUT], ["none.csv", "no such file"], True),
    ("records-csv-empty", "records", ["--csv", p("empty.csv"), "--images", f("images"), "--out", OUT], ["empty.csv"], True),
    ("records-csv-binary", "records", ["--csv", p("binary.csv"), "--images", f("images"), "--out", OUT], ["binary.csv"], True),
    ("records-csv-no-labels", "records", ["--csv", p("no_labels.csv"), "--images", f("images"), "--out", OUT], ["missing column 'Finding Labels'"], True),
    ("records-csv-unknown-label", "records", ["--csv", p("unknown_label.csv"), "--images", f("images"), "--out", OUT], ["Pneumonitis"], True),
    ("records-csv-twice", "records", ["--csv", p("twice.csv"), "--images", f("images"), "--out", OUT], ["listed twice"], True),
    ("records-csv-truncated", "records", ["--csv", p("truncated.csv"), "--images", f("images"), "--out", OUT], ["truncated.csv"], True),
    ("records-csv-other-dataset", "records", ["--csv", f("good_csv"), "--images", f("images"), "--out", OUT, "--dataset", "chexpert"], ["missing column 'Path'"], True),
    ("records-images-missing", "records", ["--csv", f("good_csv"), "--images", p("no_such_dir"), "--out", OUT], ["no_such_dir", "no such directory"], True),
    ("records-out-unwritable", "records", ["--csv", f("good_csv"), "--images", f("images"), "--out", p("a_file/out")], ["a_file/out", "cannot create"], None),
    ("records-uint8-without-size", "records", ["--csv", f("good_csv"), "--images", f("images"), "--out", OUT, "--encoding", "uint8"], ["--encoding", "--image-size"], True),
    ("records-shard-size-0", "records", ["--csv", f("good_csv"), "--images", f("images"), "--out", OUT, "--shard-size", "0"], ["--shard-size"], True),
    # train: records directories, weights, flags, the run directory
    ("train-data-missing", "train", ["--data", p("nothing"), *TRAIN[1:]], ["nothing", "no such directory"], True),
    ("train-no-manifest", "train", ["--data", p("no_manifest"), *TRAIN[1:]], ["no manifest.json"], True),
    ("train-manifest-not-json", "train", ["--data", p("bad_json"), *TRAIN[1:]], ["manifest.json", "not valid JSON"], True),
    ("train-manifest-old-schema", "train", ["--data", p("old_schema"), *TRAIN[1:]], ["records schema 0"], True),
    ("train-shard-missing", "train", ["--data", p("shard_missing"), *TRAIN[1:]], ["shard listed in the manifest is missing"], True),
    ("train-shard-truncated", "train", ["--data", p("shard_truncated"), *TRAIN[1:]], ["truncated or changed"], True),
    ("train-records-smaller-than-model", "train", ["--data", p("stored_16px"), *TRAIN[1:]], ["stored at 16 px"], True),
    ("train-val-split-missing", "train", ["--data", *TRAIN, "--val-split", "nope"], ["no records for split 'nope'"], True),
    ("train-weights-missing", "train", ["--data", *TRAIN, "--weights", p("none.h5")], ["none.h5", "not found"], "runlog"),
    ("train-weights-not-weights", "train", ["--data", *TRAIN, "--weights", p("weights.txt")], ["weights.txt", "not weights of a small_cnn"], "runlog"),
    ("train-model-unknown", "train", ["--data", *TRAIN, "--model", "densenet999"], ["--model", "densenet999"], "runlog"),
    ("train-batch-0", "train", ["--data", *TRAIN, "--batch-size", "0"], ["--batch-size"], True),
    ("train-batch-too-big", "train", ["--data", *TRAIN, "--batch-size", "100000"], ["--batch-size", "training records"], "runlog"),
    ("train-steps-too-many", "train", ["--data", *TRAIN, "--steps-per-epoch", "100000"], ["--steps-per-epoch"], "runlog"),
    ("train-workers-twice", "train", ["--data", *TRAIN, "--engine", "tf", "--workers", "localhost:1,localhost:1"], ["--workers", "'localhost:1' is named twice"], True),
    ("launch-no-such-program", "launch", ["-np", "2", p("no_such_program")], ["no_such_program", "no such program on PATH"], None),
    ("train-workers-not-host-port", "train", ["--data", *TRAIN, "--engine", "tf", "--workers", "localhost:1,nohost"], ["--workers", "'nohost' is not host:port"], True),
    ("train-run-dir-unwritable", "train", ["--data", *TRAIN[:2], p("a_file/run"), *TRAIN[3:]], ["a_file/run", "cannot create"], None),
    # evaluate: checkpoints against records
    ("evaluate-checkpoint-missing", "evaluate", ["--checkpoint", p("no_ckpt"), *EVAL[2:]], ["no_ckpt", "no such checkpoint"], True),
    ("evaluate-meta-corrupt", "evaluate", ["--checkpoint", p("ckpt_bad_meta"), *EVAL[2:]], ["ckpt_bad_meta", "not a checkpoint"], True),
    ("evaluate-meta-other-schema", "evaluate", ["--checkpoint", p("ckpt_other_schema"), *EVAL[2:]], ["meta.json", "checkpoint schema"], True),
    ("evaluate-wrong-class-count", "evaluate", [*EVAL[:3], p("five_classes"), *EVAL[4:]], ["predicts 14 classes", "hold 5", "output 5: Nodule in the checkpoint, none"], True),
    ("evaluate-records-smaller-than-model", "evaluate", [*EVAL[:3], p("stored_16px"), *EVAL[4:]], ["stored at 16 px"], True),
    ("evaluate-worker-index-outside-workers", "evaluate", [*EVAL, "--engine", "tf", "--workers", "a:1,b:2", "--worker-index", "2"], ["--worker-index", "names 2"], True),
    ("evaluate-val-split-missing", "evaluate", [*EVAL, "--val-split", "nosuch"], ["no records for split 'nosuch'", "--val-split"], True),
    ("evaluate-out-unwritable", "evaluate", [*EVAL[:-1], p("a_file/eval")], ["a_file/eval", "cannot create"], None),
    # predict: image files
    ("predict-input-missing", "predict", [p("gone.png"), "--checkpoint", f("ckpt")], ["gone.png", "no such file"], None),
    ("predict-not-an-image", "predict", [p("text.png"), "--checkpoint", f("ckpt")], ["text.png", "not a readable image"], None),
    ("predict-truncated-png", "predict", [p("truncated.png"), "--checkpoint", f("ckpt")], ["truncated.png", "not a readable image"], None),
    ("predict-empty-folder", "predict", [p("no_images"), "--checkpoint", f("ckpt")], ["no PNG, JPEG or DICOM images found"], None),
    ("predict-checkpoint-missing", "predict", [f("images"), "--checkpoint", p("no_ckpt")], ["no_ckpt", "no such checkpoint"], None),
    ("predict-cam-unwritable", "predict", [f("one_png"), "--checkpoint", f("ckpt"), "--cam", p("a_file/cam")], ["a_file/cam", "cannot create"], None),
    # export
    ("export-checkpoint-missing", "export", ["--checkpoint", p("no_ckpt"), "--out", OUT], ["no_ckpt", "no such checkpoint"], True),
    ("export-int8-without-calib", "export", ["--checkpoint", f("ckpt"), "--precision", "int8", "--out", OUT], ["--calib"], True),
    ("export-out-unwritable", "export", ["--checkpoint", f("ckpt"), "--format", "savedmodel", "--out", p("a_file/x")], ["a_file", "cannot create"], None),
    ("export-calib-missing", "export", ["--checkpoint", f("ckpt"), "--precision", "int8", "--calib", p("nothing"), "--out", OUT], ["nothing"], True),
    # reports over run logs and studies
    ("scaling-missing", "tools/scaling_report.py", [p("runs/none")], ["no such file or directory"], None),
    ("scaling-empty-dir", "tools/scaling_report.py", [p("no_images")], ["no runlog.jsonl found"], None),
    ("scaling-other-schema", "tools/scaling_report.py", [p("runs/other_schema.jsonl")], ["someone-else/3"], None),
    ("scaling-empty-log", "tools/scaling_report.py", [p("runs/empty.jsonl")], ["empty run log"], None),
    ("scaling-garbled-log", "tools/scaling_report.py", [p("runs/garbled.jsonl")], ["garbled.jsonl:1", "start record without world_size"], None),
    ("scaling-csv-full-disk", "tools/scaling_report.py", [p("runs/good"), "--csv", lit("/dev/full")], ["/dev/full", "cannot write"], None),
    ("scaling-plot-full-disk", "tools/scaling_report.py", [p("runs/good"), "--plot", lit("/dev/full")], ["/dev/full", "cannot write"], None),
    ("scaling-baseline-columns", "tools/scaling_report.py", [p("runs/good"), "--baseline", p("baseline_cols.csv")], ["ranks,images_per_sec"], None),
    ("nas-report-missing", "tools/nas_report.py", [p("no_study")], ["no_study", "no such directory"], "no_study"),
    ("runlog-missing", "runlog", [p("runs/none")], ["no run log"], None),
    # download, dataset statistics, synthetic data
    ("download-file-list-missing", "download", ["--out", p("dl"), "--file-list", p("none.txt")], ["none.txt", "no such file"], None),
    ("download-md5-missing", "download", ["--out", p("dl"), "--md5", p("none.md5"), "--file-list", p("files.txt"), "--base-url", lit("http://127.0.0.1:9")], ["none.md5", "no such file"], None),
    ("download-no-url", "download", ["--out", p("dl"), "--file-list", p("files.txt")], ["no URL"], None),
    ("download-out-unwritable", "download", ["--out", p("a_file/dl"), "--file-list", p("files.txt"), "--base-url", lit("http://127.0.0.1:9")], ["a_file/dl", "cannot create"], None),
    ("stats-csv-missing", "tools/dataset_stats.py", ["--csv", p("none.csv")], ["none.csv", "no such file"], None),
    ("stats-csv-empty", "tools/dataset_stats.py", ["--csv", p("empty.csv")], ["empty.csv"], None),
    ("stats-out-unwritable", "tools/dataset_stats.py", ["--csv", f("good_csv"), "--out", p("a_file/stats")], ["a_file", "cannot create"], None),
    ("synthetic-out-unwritable", "synthetic", ["--out", p("a_file/syn"), "--images", "2"], ["a_file/syn", "cannot create"], None),
    ("a-wrong-flag", "train", ["--data", *TRAIN, "--precision", "fp8"], ["--precision"], True),
]


def test_there_are_at_least_40_distinct_bad_inputs():
    ids = [c[0] for c in CASES if c[0] != "a-wrong-flag"]  # argparse's own two-line usage error
    assert len(ids) == len(set(ids)) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(bad, case):
    name, command, args, fragments, absent = case
    out = bad["root"] / name
    argv = [str(out) if a == OUT else str(a(bad)) if callable(a) else a for a in args]
    if command.startswith("tools/"):
        proc = run(["python", command, *argv], timeout=300)
    else:
        proc = module(command, *argv, timeout=300)
    if command == "train" and "--precision" in fragments:  # argparse's own usage error
        assert proc.returncode == 2 and "invalid choice: 'fp8'" in proc.stderr
    else:
        assert_one_line_error(proc, *fragments)
    if absent:  # nothing written, so nothing half-written
        gone = out if absent is True else out / "runlog.jsonl" if absent == "runlog" else bad["root"] / absent
        assert not gone.exists(), gone
