"""Records that stay right under re-runs, kills and unusual inputs: a shard is reused only when
everything its bytes depend on is unchanged, a sidecar never vouches for a shard it does not
describe, class weights count only labelled negatives, and 16-bit PNGs holding 12-bit data are
scaled by their real range (in the records and the raw pipeline alike)."""

import io
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import SHARED, Crash, assert_one_line_error, crash_at, module, small_disk
from PIL import Image

from chexnet_hvd import data, images, metadata, records, sharding, sources
from chexnet_hvd.images import read_grayscale
from chexnet_hvd.labels import CHEXPERT_COMPETITION
from chexnet_hvd.records import writer

pytestmark = pytest.mark.slow
CHEXPERT = SHARED / "data" / "real" / "chexpert"
needs_chexpert = pytest.mark.skipif(not (CHEXPERT / "train_sample.csv").is_file(), reason="no CheXpert CSVs")


def write(csv, images, out, *extra):
    return module("records", "--csv", csv, "--images", images, "--out", out, "--shard-size", 64,
                  "--workers", 1, "--no-progress", *extra, check=True)


def by_id(out) -> dict:
    """image id -> (label, mask, uint8 pixels [H, W]) over every split of a records directory
    (or raw index), as the training pipeline decodes them."""
    found = {}
    for split in records.load_manifest(out)["splits"]:
        source = data.Source(out, split)
        for item in source.read(data.as_tensor(sharding.eval_plan(source.counts, 1)[0])):
            ex = source.example(item)
            found[ex["id"].numpy().decode()] = (ex["label"].numpy().tolist(), ex["mask"].numpy().tolist(),
                                                ex["image"].numpy()[..., 0])
    return found


def test_a_relabelled_row_rewrites_its_shard(synthetic, tmp_path):
    table = pd.read_csv(synthetic / "Data_Entry_2017.csv", dtype=str)
    write(synthetic / "Data_Entry_2017.csv", synthetic / "images", tmp_path / "out")
    row = table.index[table["Finding Labels"] == "No Finding"][0]
    table.loc[row, "Finding Labels"] = "Hernia"
    relabelled = tmp_path / "relabelled.csv"
    table.to_csv(relabelled, index=False)
    write(relabelled, synthetic / "images", tmp_path / "out")
    label, _, _ = by_id(tmp_path / "out")[table.loc[row, "Image Index"]]
    assert label[-1] == 1 and sum(label) == 1  # Hernia, the last of the 14
    manifest = records.load_manifest(tmp_path / "out")
    assert manifest["sources"][0]["csv_sha256"] == metadata.file_sha256(relabelled)


def test_a_full_disk_ends_the_conversion_with_one_line_and_a_rerun_finishes_the_rest(synthetic, tmp_path):
    """Records on a file system that fills up part way (2 worker processes): one line naming
    the shard, exit 2, no partial shard and no manifest left; once there is space, the same
    command reuses the shards already complete and writes the rest."""
    csv, images = synthetic / "Data_Entry_2017.csv", synthetic / "images"
    args = ["--csv", csv, "--images", images, "--shard-size", 64, "--workers", 2, "--no-progress"]
    with small_disk(tmp_path / "disk", "300k") as disk:
        out = disk / "records"
        assert_one_line_error(module("records", *args, "--out", out), "cannot write this shard", ": No space left on device")
        assert not list(out.glob("*.tmp*")) and not (out / records.MANIFEST).exists()
        complete = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord") if p.with_suffix(".json").exists()}
        assert complete  # some shards were written before the disk filled
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        module("records", *args, "--out", out, check=True)
        assert {name: (out / name).stat().st_mtime_ns for name in complete} == complete  # reused
        assert sum(s["count"] for s in records.load_manifest(out)["splits"].values()) == len(pd.read_csv(csv))


def test_the_same_images_in_another_order_have_another_training_signature(synthetic, tmp_path):
    """A CSV listing the same images in another order writes the same split into the same shard
    files and counts, its records in another order: what a mid-epoch resume must not take for
    its own records (split_signature); a copy of the records keeps the signature."""
    csv = synthetic / "Data_Entry_2017.csv"
    pd.read_csv(csv, dtype=str).iloc[::-1].to_csv(tmp_path / "reversed.csv", index=False)
    write(csv, synthetic / "images", tmp_path / "a")
    write(tmp_path / "reversed.csv", synthetic / "images", tmp_path / "b")
    order = {d: list(by_id(tmp_path / d)) for d in "ab"}
    assert sorted(order["a"]) == sorted(order["b"]) and order["a"] != order["b"]
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    a, b, copy = (records.split_signature(records.load_manifest(tmp_path / d), "train") for d in ("a", "b", "copy"))
    assert (a["shards"], a["records"]) == (b["shards"], b["records"]) and a != b and a == copy


def test_a_replaced_image_file_rewrites_its_shard(synthetic, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic / "images", images)
    write(synthetic / "Data_Entry_2017.csv", images, tmp_path / "out")
    name = sorted(p.name for p in images.iterdir())[0]
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(images / name)
    write(synthetic / "Data_Entry_2017.csv", images, tmp_path / "out")
    assert (by_id(tmp_path / "out")[name][2] == 7).all()


def pillow_png(pixels: np.ndarray) -> bytes:
    """The records' PNG as the conversion before gray8-v6 wrote it (Pillow's own filters)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_shards_of_the_previous_png_encoder_read_alike_and_a_rerun_rewrites_them(synthetic, tmp_path,
                                                                               monkeypatch):
    """Records written before the Up-filtered PNGs (conversion gray8-v5, Pillow's encoder) give
    the pipeline the very pixels today's do, and the next conversion into their directory
    rewrites every shard (the conversion is part of each shard's key)."""
    args = ["--csv", str(synthetic / "Data_Entry_2017.csv"), "--images", str(synthetic / "images"),
            "--out", str(tmp_path / "out"), "--shard-size", "64", "--workers", "1", "--no-progress"]
    with monkeypatch.context() as before:
        before.setattr(images, "CONVERSION", "gray8-v5")
        before.setattr(images, "png_up", pillow_png)
        assert writer.main(args) == 0
    shards = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tfrecord")}
    old = by_id(tmp_path / "out")
    write(synthetic / "Data_Entry_2017.csv", synthetic / "images", tmp_path / "out")
    assert all((tmp_path / "out" / name).read_bytes() != before for name, before in shards.items())
    new = by_id(tmp_path / "out")
    assert old.keys() == new.keys() and all(np.array_equal(old[k][2], new[k][2]) for k in old)


def jpegs_for(rows: pd.DataFrame, root) -> None:
    """Generated JPEGs at the CSV's paths (no CheXpert images ship with the real CSVs)."""
    rng = np.random.default_rng(0)
    for rel in rows["Path"]:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(target, quality=90)


@needs_chexpert
def test_another_uncertainty_policy_rewrites_the_shards_and_weights_count_labelled_negatives(tmp_path):
    """The whole 2,000-row sample: --uncertainty ones, then ignore, into the same directory.
    The records then hold every uncertain competition cell masked, and Atelectasis' positive
    weight counts only labelled negatives: (20 negatives + 1,456 blank) / 266 = 5.55 (counting
    the 258 uncertain, masked ones too gave 6.52)."""
    rows = pd.read_csv(CHEXPERT / "train_sample.csv", dtype=str)
    rows.to_csv(tmp_path / "train.csv", index=False)
    jpegs_for(rows, tmp_path)
    common = ["--dataset", "chexpert", "--fractions", 1, 0, 0, "--image-size", 8]
    write(tmp_path / "train.csv", tmp_path, tmp_path / "out", *common, "--uncertainty", "ones")
    write(tmp_path / "train.csv", tmp_path, tmp_path / "out", *common, "--uncertainty", "ignore")
    manifest = records.load_manifest(tmp_path / "out")
    assert manifest["labels"]["uncertainty"] == "ignore" and manifest["splits"]["train"]["count"] == 2000
    masked = sum(5 - sum(mask) for _, mask, _ in by_id(tmp_path / "out").values())
    uncertain = int((rows[list(CHEXPERT_COMPETITION)] == "-1.0").sum().sum())
    assert masked == uncertain > 0
    assert manifest["pos_weight"]["Atelectasis"] == pytest.approx((20 + 1456) / 266, rel=1e-5)
    assert manifest["splits"]["train"]["negatives"]["Atelectasis"] == 20 + 1456


@pytest.mark.parametrize("n", [0, 1, 2])  # the old sidecar's removal, the 2 renames
def test_a_kill_at_any_commit_step_never_leaves_a_stale_shard_in_use(synthetic, tmp_path, monkeypatch, n):
    """A shard written with one labelling, then a re-run with another killed at a step of its
    commit, then the re-run done: the shard holds the new labels. (The old order renamed the
    sidecar first: a kill before the shard's rename left the old shard vouched for as new.)"""
    table = sources.load_table(sources.TableConfig(csv=str(synthetic / "Data_Entry_2017.csv"),
                                                     images=str(synthetic / "images")))
    job = writer.plan_shards(table, 1000, None, seed=0)[0]
    flipped = writer.ShardJob(job.split, job.file, [(i, p, pt, [1 - v for v in lab], m, src)
                                                     for i, p, pt, lab, m, src in job.rows], None, job.names)
    writer.write_shard(job, str(tmp_path))
    with monkeypatch.context() as patched:
        crash_at(patched, n, ((os, "replace"), (os, "unlink")))
        with pytest.raises(Crash):
            writer.write_shard(flipped, str(tmp_path))
    assert writer.write_shard(flipped, str(tmp_path))["count"] == len(flipped.rows)
    stored = [records.parse_example(r, 14)["label"].numpy().tolist()
              for r in tf.data.TFRecordDataset(str(tmp_path / job.file))]
    assert stored == [list(map(float, r[3])) for r in flipped.rows]


def test_twelve_bit_pngs_are_scaled_by_their_real_range(tmp_path):
    """A 16-bit PNG holding 12-bit data (0..4095, as DICOM exports write them): full 0..255 in
    the records, in the raw pipeline and in predict's reader, and counted in the manifest."""
    images = tmp_path / "images"
    images.mkdir()
    ramp = (np.arange(64 * 64).reshape(64, 64) * 4095 // (64 * 64 - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(images / "00000001_000.png")  # PIL writes mode I;16
    Image.fromarray((ramp // 16).astype(np.uint8)).save(images / "00000002_000.png")
    Image.fromarray(ramp // 3).save(images / "00000003_000.png")  # darker 12-bit: max 1,365
    csv = tmp_path / "Data_Entry_2017.csv"
    pd.DataFrame({"Image Index": ["00000001_000.png", "00000002_000.png", "00000003_000.png"],
                  "Finding Labels": ["No Finding", "Hernia", "Mass"],
                  "Patient ID": ["1", "2", "3"]}).to_csv(csv, index=False)
    common = ["--fractions", 1, 0, 0]
    assert "grey-level depths" not in write(csv, images, tmp_path / "rec", *common).stderr  # one depth above 8
    module("records", "--csv", csv, "--images", images, "--out", tmp_path / "raw", "--format", "raw",
           *common, "--no-progress", check=True)
    manifest = records.load_manifest(tmp_path / "rec")
    assert manifest["source_bit_depths"] == {"12": 2, "8": 1}
    expected = np.round(ramp * (255 / 4095)).astype(np.uint8)
    assert np.array_equal(np.asarray(read_grayscale(images / "00000001_000.png")), expected)
    for out in ("rec", "raw"):
        pixels = by_id(tmp_path / out)
        assert np.array_equal(pixels["00000001_000.png"][2], expected), out
        assert pixels["00000001_000.png"][2].max() == 255
        darker = np.round((ramp // 3) * (255 / 4095)).astype(np.uint8)  # by 12 bits, as its neighbour
        assert np.array_equal(pixels["00000003_000.png"][2], darker), out


def test_a_split_asked_for_that_gets_no_record_is_warned_of(tmp_path):
    """3 patients at the default fractions (0.7/0.1/0.2): 2 train, none for val, 1 for test;
    the test split's one image is missing: both splits are named with the reason."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"0000000{i}_000.png" for i in (1, 2, 3)]
    csv = tmp_path / "Data_Entry_2017.csv"
    pd.DataFrame({"Image Index": names, "Finding Labels": ["No Finding", "Hernia", "Mass"],
                  "Patient ID": ["1", "2", "3"]}).to_csv(csv, index=False)
    for name in names:
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(images / name)
    listing = sources.load(sources.TableConfig(csv=[str(csv)], images=[str(images)]))
    [test_image] = listing.table.loc[listing.table["split"] == "test", "image"]
    (images / test_image).unlink()
    stderr = write(csv, images, tmp_path / "rec").stderr
    assert "warning: val split: no record written (no patient drawn for it: too few patients for --fractions 0.1)" in stderr
    assert "warning: test split: no record written (all 1 of its images missing or unreadable)" in stderr
    assert "AUROC" not in stderr  # an empty split is not also a one-sided one
