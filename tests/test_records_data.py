"""Records round trip, rejects, CLI errors, and the input pipeline's sharding."""

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import assert_one_line_error, module, run
from PIL import Image

from chexnet_hvd import data, records, views
from chexnet_hvd.labels import PATHOLOGIES, parse_finding_labels


def read_all(records_dir, split, encoding="png"):
    manifest = records.load_manifest(records_dir)
    out = {}
    for path, _ in records.split_shards(manifest, records_dir, split):
        for raw in tf.data.TFRecordDataset(path):
            ex = records.parse_example(raw, manifest["num_classes"], encoding)
            out[ex["image/id"].numpy().decode()] = ex
    return out


def test_round_trip_pixels_and_labels_equal_source(records_dir, synthetic):
    manifest = records.load_manifest(records_dir)
    csv = pd.read_csv(synthetic / "Data_Entry_2017.csv").set_index("Image Index")
    seen = {}
    for split in ("train", "val", "test"):
        seen |= read_all(records_dir, split)
    assert sorted(seen) == sorted(csv.index)  # every listed image written, once
    for name, ex in list(seen.items())[:100]:
        source = np.asarray(Image.open(synthetic / "images" / name))
        decoded = data.decode(ex).numpy()[..., 0]
        np.testing.assert_array_equal(decoded, source)
        np.testing.assert_array_equal(ex["label"].numpy(), parse_finding_labels(csv.loc[name, "Finding Labels"]))
        assert ex["patient/id"].numpy().decode() == str(csv.loc[name, "Patient ID"])
    total = sum(v["count"] for v in manifest["splits"].values())
    assert total == manifest["listed"] == len(csv) and manifest["rejected"] == 0
    for split, info in manifest["splits"].items():
        assert sum(s["count"] for s in info["shards"]) == info["count"]
        labels = np.stack([ex["label"].numpy() for ex in read_all(records_dir, split).values()])
        assert [info["positives"][n] for n in PATHOLOGIES] == labels.sum(0).astype(int).tolist()


@pytest.mark.slow
def test_corrupt_and_missing_images_are_rejected_and_counts_reconcile(synthetic, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic / "images", images)
    names = sorted(p.name for p in images.iterdir())
    (images / names[0]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / names[1]).unlink()
    args = ["--csv", synthetic / "Data_Entry_2017.csv", "--images", images, "--shard-size", 64,
            "--workers", 1, "--no-progress"]

    strict = module("records", *args, "--out", tmp_path / "out", "--max-rejects", 1)
    assert_one_line_error(strict, "1 unreadable", "1 missing", "--max-rejects 2")
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing looks complete

    default = module("records", *args, "--out", tmp_path / "out")  # completes, says what it rejected
    assert default.returncode == 0, default.stderr
    assert "warning: 1 of 600 images rejected as unreadable" in default.stderr
    assert "warning: 1 of 600 images missing" in default.stderr
    manifest = records.load_manifest(tmp_path / "out")
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert rejects["image"].tolist() == names[:1] and rejects["reason"][0].startswith("unreadable image")
    assert pd.read_csv(tmp_path / "out" / "missing.csv")["image"].tolist() == names[1:2]
    written = sum(v["count"] for v in manifest["splits"].values())
    assert written + len(rejects) + 1 == manifest["listed"] == 600
    assert (manifest["rejected"], manifest["missing"]) == (1, 1)

    # --images naming the wrong folder (the PNGs one level down): not a complete-looking empty
    # set with a warning and exit 0, but one line, and no manifest
    wrong = module("records", *args[:2], "--images", tmp_path, *args[4:], "--out", tmp_path / "empty")
    assert_one_line_error(wrong, str(tmp_path), "none of the 600 listed images was written",
                          "is --images the folder that holds them?")
    assert not (tmp_path / "empty" / "manifest.json").exists()


@pytest.mark.slow
def test_a_partial_image_folder_is_sharded_on_the_images_that_exist(tmp_path):
    """600 of 20,000 listed images present (a partial download against a full CSV), one of them
    corrupt: shards sized by the images that exist, sidecars that do not grow with the listed
    rows, the missing counted apart from the unreadable and listed compactly in missing.csv, and
    written + rejected + missing = listed in every split."""
    rng = np.random.default_rng(0)
    names = [f"{i:08d}_000.png" for i in range(20_000)]
    pd.DataFrame({"Image Index": names, "Finding Labels": rng.choice(["No Finding", "Hernia", "Mass"], len(names)),
                  "Patient ID": [str(i // 3) for i in range(len(names))]}).to_csv(tmp_path / "d.csv", index=False)
    images = tmp_path / "images"
    images.mkdir()
    present = sorted(rng.choice(len(names), 600, replace=False))
    for i in present:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / names[i])
    (images / names[present[0]]).write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = module("records", "--csv", tmp_path / "d.csv", "--images", images, "--out", out, "--shard-size", 100,
                  "--workers", 1, "--no-progress", check=True)
    assert "warning: 19400 of 20000 images missing from the image folders" in proc.stderr
    manifest = records.load_manifest(out)
    assert (manifest["listed"], manifest["rejected"], manifest["missing"]) == (20_000, 1, 19_400)
    for split, info in manifest["splits"].items():
        assert info["count"] + info["rejected"] + info["missing"] == info["listed"], split
        assert len(info["shards"]) == -(-(info["count"] + info["rejected"]) // 100), split
    assert sum(v["count"] for v in manifest["splits"].values()) == 599
    sidecars = [p for p in out.glob("*.json") if p.name != records.MANIFEST]
    assert len(sidecars) == sum(len(v["shards"]) for v in manifest["splits"].values()) < 12
    assert max(p.stat().st_size for p in sidecars) < 2000
    assert pd.read_csv(out / "rejects.csv")["image"].tolist() == [names[present[0]]]
    missing = pd.read_csv(out / "missing.csv", dtype=str)
    assert list(missing.columns) == ["image", "split"] and len(missing) == 19_400
    assert set(missing["image"]) == set(names) - {names[i] for i in present}


SPLIT_CSV = """path,patient,split,Effusion,Edema
p1.png,p1,train,1,0
p2.png,p2,train,0,1
p3.png,p3,train,1,1
p4.png,p4,train,0,0
p5.png,p5,val,1,0
p6.png,p6,val,0,0
p7.png,p7,val,0,1
p8.png,p8,test,1,1
p9.png,p9,test,1,1
"""


@pytest.mark.slow
def test_manifest_counts_the_patients_of_written_records_and_names_one_sided_classes(tmp_path):
    """p3's image is missing, p4's and p7's unreadable (p7 held val's only Edema positive): the
    patients per split are those of the written records, and the writer says, in one line per
    scored split and in the manifest, which classes have no positives or no negatives there."""
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 4, 5, 6, 7, 8, 9):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(images / f"p{i}.png")
    for i in (4, 7):
        (images / f"p{i}.png").write_bytes(b"not a png")
    (tmp_path / "split.csv").write_text(SPLIT_CSV)
    proc = module("records", "--dataset", "csv", "--csv", tmp_path / "split.csv", "--images", images,
                  "--split", "official", "--out", tmp_path / "out", "--workers", 1, "--no-progress", check=True)
    splits = records.load_manifest(tmp_path / "out")["splits"]
    assert {s: (v["count"], v["patients"]) for s, v in splits.items()} == {"train": (2, 2), "val": (2, 2),
                                                                          "test": (2, 2)}
    assert (splits["val"]["no_positives"], splits["val"]["no_negatives"]) == (["Edema"], [])
    assert (splits["test"]["no_positives"], splits["test"]["no_negatives"]) == ([], ["Effusion", "Edema"])
    assert (splits["train"]["no_positives"], splits["train"]["no_negatives"]) == ([], [])
    warnings = [line for line in proc.stderr.splitlines() if " split: " in line]
    assert warnings == [
        "warning: val split: no positives for Edema: AUROC undefined for these classes (more patients "
        "in the split, or another --seed or --fractions)",
        "warning: test split: no negatives for Effusion, Edema: AUROC undefined for these classes (more "
        "patients in the split, or another --seed or --fractions)"]


@pytest.mark.parametrize("problem", ["no_column", "unknown_label", "no_manifest"])
def test_bad_input_gives_one_line_error(problem, synthetic, tmp_path):
    csv = pd.read_csv(synthetic / "Data_Entry_2017.csv")
    bad = tmp_path / "bad.csv"
    if problem == "no_column":
        csv.drop(columns=["Finding Labels"]).to_csv(bad, index=False)
        proc = module("records", "--csv", bad, "--images", synthetic / "images", "--out", tmp_path / "o")
        assert_one_line_error(proc, str(bad), "missing column 'Finding Labels'")
    elif problem == "unknown_label":
        csv.loc[5, "Finding Labels"] = "Effusion|Pneumonitis"
        csv.to_csv(bad, index=False)
        proc = module("records", "--csv", bad, "--images", synthetic / "images", "--out", tmp_path / "o")
        assert_one_line_error(proc, str(bad), "row 7", "Pneumonitis")
    else:
        (tmp_path / "empty").mkdir()
        proc = module("train", "--data", tmp_path / "empty", "--run-dir", tmp_path / "run",
                      "--model", "small_cnn", "--image-size", 32)
        assert_one_line_error(proc, str(tmp_path / "empty"), "no manifest.json")
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("world", [2, 3])
def test_one_training_pass_reads_each_record_on_at_most_one_rank(records_dir, world):
    """Every rank the same count, no record twice, fewer than one global batch left out."""
    seen = []
    for rank in range(world):
        ds = data.train_dataset(records_dir, "train", 32, 4, rank=rank, world_size=world, epochs=1,
                                with_ids=True)
        seen.append([i.decode() for *_, ids in ds.as_numpy_iterator() for i in ids])
    total = records.load_manifest(records_dir)["splits"]["train"]["count"]
    flat = [i for part in seen for i in part]
    assert len({len(part) for part in seen}) == 1
    assert len(flat) == len(set(flat)) and 0 <= total - len(flat) < world * 4


@pytest.mark.slow
def test_one_shard_on_one_rank_is_read_in_a_new_order_every_epoch(synthetic, tmp_path):
    """A rank with a single shard (and with steps cut short) still sees a new order, and other
    records, every epoch: the record shuffle is seeded per epoch."""
    module("records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images",
           "--out", tmp_path, "--shard-size", 10_000, "--no-progress", check=True)
    assert len(records.load_manifest(tmp_path)["splits"]["train"]["shards"]) == 1
    ds = data.train_dataset(tmp_path, "train", 32, 10, epochs=3, steps_per_epoch=5,
                            shuffle_buffer=64, with_ids=True)
    batches = list(ds.as_numpy_iterator())
    epochs = [[i for *_, ids in batches[e * 5:(e + 1) * 5] for i in ids] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert set(epochs[0]) != set(epochs[1])


@pytest.mark.parametrize("world", [1, 2, 5])
def test_evaluation_sees_every_record_exactly_once(records_dir, world):
    ids = []
    for rank in range(world):
        for batch in data.eval_dataset(records_dir, "val", 32, 7, rank=rank, world_size=world):
            ids += [i.decode() for i in batch["id"].numpy()]
    assert sorted(ids) == sorted(read_all(records_dir, "val"))


@pytest.mark.parametrize("stored, side, crop", [(32, 28, True), (30, 26, True), (31, 31, False), (28, 28, False)])
def test_a_batchs_windows_and_mirrors_are_the_draws_numpy_cut(stored, side, crop):
    """augment_batch against numpy: image b's window starts at floor(draw x (positions)) on
    each axis, and it is mirrored when its flip draw is below 0.5; widths divisible by 4 (the
    word-wise mirror) and not, a batch with every image mirrored and one with none."""
    rng = np.random.default_rng(stored)
    images = rng.integers(0, 256, (6, stored, stored, 1), dtype=np.uint8)
    for flips in (rng.random(6), np.zeros(6), np.ones(6)):
        draw = np.column_stack([flips, rng.random((6, 2))]).astype(np.float32)
        out = data.augment_batch(tf.constant(images), tf.constant(draw), side, flip=True, crop=crop).numpy()
        assert out.shape == (6, side, side, 1)
        for b, image in enumerate(images):
            y, x = (np.floor(draw[b, 1:] * (stored - side + 1)).astype(int) if crop else (0, 0))
            window = image[y:y + side, x:x + side]
            np.testing.assert_array_equal(out[b], window[:, ::-1] if draw[b, 0] < 0.5 else window)


def test_preprocess_is_imagenet_normalised_three_channel():
    image = tf.fill((10, 12, 1), tf.constant(255, tf.uint8))
    out = views.preprocess(image, 8).numpy()
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out[0, 0], (1 - np.array(views.IMAGENET_MEAN)) / views.IMAGENET_STD, rtol=1e-5)


def test_manifest_records_sizes_and_weights(records_dir):
    manifest = json.loads((records_dir / "manifest.json").read_text())
    assert manifest["classes"] == list(PATHOLOGIES)
    train = manifest["splits"]["train"]
    for name in PATHOLOGIES:
        pos = train["positives"][name]
        if pos:
            assert manifest["pos_weight"][name] == pytest.approx((train["count"] - pos) / pos, rel=1e-5)


def test_an_epoch_is_the_same_batches_whether_started_or_resumed(records_dir):
    def ids(start, epochs):
        ds = data.train_dataset(records_dir, "train", 32, 8, rank=1, world_size=2, seed=3, steps_per_epoch=5,
                                start_epoch=start, epochs=epochs, with_ids=True)
        return [b[3].numpy().tolist() for b in ds]

    straight, resumed = ids(0, 2), ids(1, 1)
    assert len(straight) == 10 and len(resumed) == 5
    assert straight[5:] == resumed and straight[:5] != resumed  # new order every epoch


ORDER = """
import sys, json
import tensorflow as tf
from chexnet_hvd import data
tf.keras.utils.set_random_seed(int(sys.argv[2]))
ds = data.train_dataset(sys.argv[1], "train", 32, 8, seed=int(sys.argv[3]), steps_per_epoch=4, epochs=2,
                        with_ids=True)
print(json.dumps([b[3].numpy().astype(str).tolist() for b in ds]))
"""


def test_the_record_order_is_a_function_of_the_runs_seed_alone(records_dir):
    """The shuffle buffer's order depends on --seed, rank and epoch, not on the process's global
    seed (the trainer sets it from --seed: 0 is the default and once failed in TensorFlow's seed
    check), so every attempt of a run reads an epoch in one order."""
    orders = [json.loads(run([sys.executable, "-c", ORDER, str(records_dir), str(g), str(seed)], check=True).stdout)
              for g, seed in ((0, 3), (12345, 3), (0, 4))]
    assert orders[0] == orders[1]
    assert len(orders[0]) == 8 and orders[0][:4] != orders[0][4:]
    assert orders[2] != orders[0]  # the run's seed does change it (a single shard's: the test above)


def eval_by_id(data_dir, world):
    out = {}
    for rank in range(world):
        for batch in data.eval_dataset(data_dir, "val", 24, 16, rank=rank, world_size=world):
            for i, image, label in zip(batch["id"].numpy(), batch["image"].numpy(), batch["label"].numpy(),
                                       strict=True):
                out[i.decode()] = (image, label)
    return out


def test_raw_pipeline_gives_the_records_pipelines_inputs(raw_dir, records_dir):
    manifest = records.load_manifest(raw_dir)
    assert manifest["encoding"] == records.RAW_ENCODING and not list(raw_dir.glob("*.tfrecord"))
    assert manifest["splits"]["train"]["count"] == records.load_manifest(records_dir)["splits"]["train"]["count"]
    raw, rec = eval_by_id(raw_dir, 2), eval_by_id(records_dir, 1)
    assert sorted(raw) == sorted(rec)
    for key, (image, label) in rec.items():  # same decode -> preprocess -> same floats
        np.testing.assert_array_equal(raw[key][0], image)
        np.testing.assert_array_equal(raw[key][1], label)
    seen = []
    for rank in range(2):
        ds = data.train_dataset(raw_dir, "train", 24, 1, rank=rank, world_size=2, epochs=1, with_ids=True)
        seen += [i.decode() for *_, ids in ds.as_numpy_iterator() for i in ids]
    assert len(seen) == len(set(seen)) and 0 <= manifest["splits"]["train"]["count"] - len(seen) < 2


def test_raw_index_rejects_missing_files(synthetic, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic / "images", images)
    gone = sorted(images.iterdir())[3]
    gone.unlink()
    out = tmp_path / "raw"
    module("records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", images, "--out", out,
           "--format", "raw", "--no-progress", check=True)
    assert pd.read_csv(out / "rejects.csv").empty
    assert pd.read_csv(out / "missing.csv")["image"].tolist() == [gone.name]
    assert (records.load_manifest(out)["rejected"], records.load_manifest(out)["missing"]) == (0, 1)


@pytest.mark.slow
def test_uint8_records_and_preprocessing_in_the_model_graph_match_the_png_path(synthetic, tmp_path):
    """--encoding uint8 stores the same pixels as PNG records; a model built by
    models.with_preprocessing turns them into what `views.preprocess` makes of the PNG records
    (within 1/255); and the trainer runs on them, preprocessing in the model's graph, with
    checkpoints that evaluate like any other."""
    from chexnet_hvd import models
    from chexnet_hvd.runlog import read_runlog

    for encoding in ("png", "uint8"):
        module("records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images",
               "--out", tmp_path / encoding, "--image-size", 32, "--encoding", encoding,
               "--no-progress", check=True)
    assert records.load_manifest(tmp_path / "uint8")["encoding"] == "uint8"
    pixels = {}
    for encoding in ("png", "uint8"):
        source = data.Source(tmp_path / encoding, "val")
        items = source.read(data.as_tensor(data.sharding.eval_plan(source.counts, 1)[0]))
        pixels[encoding] = {source.example(i)["id"].numpy(): source.example(i)["image"].numpy() for i in items}
    assert pixels["png"].keys() == pixels["uint8"].keys()
    assert all(np.array_equal(pixels["png"][k], pixels["uint8"][k]) for k in pixels["png"])

    graph = models.with_preprocessing(models.build_model("small_cnn", 28, 14), 32)
    in_graph = tf.keras.Model(graph.input, graph.get_layer("preprocess").output)
    batch = np.stack(list(pixels["uint8"].values()))
    on_cpu = np.stack([views.preprocess(tf.constant(img), 28).numpy() for img in pixels["png"].values()])
    np.testing.assert_allclose(in_graph.predict_on_batch(batch), on_cpu, atol=1 / 255)

    run_dir = tmp_path / "run"
    module("train", "--data", tmp_path / "uint8", "--run-dir", run_dir, "--model", "small_cnn",
           "--image-size", 28, "--batch-size", 16, "--epochs", 1, "--verbose", 0, check=True, timeout=300)
    assert read_runlog(run_dir)[0]["preprocess"] == "model graph"
    module("evaluate", "--checkpoint", run_dir / "checkpoints" / "best", "--data", tmp_path / "uint8",
           "--bootstrap", 10, check=True, timeout=300)


def cpu_preprocess_before(image: np.ndarray, size: int) -> np.ndarray:
    """What the input pipeline made of a record on the CPU before the float work moved into the
    model's graph: /255, bilinear antialiased resize, 3 channels, ImageNet mean/std."""
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size), method="bilinear", antialias=True)
    return ((tf.image.grayscale_to_rgb(image) - views.IMAGENET_MEAN) / views.IMAGENET_STD).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["png", "uint8"])
def test_records_of_one_size_leave_the_cpu_as_uint8_and_the_graph_preprocesses_them_as_before(
        synthetic, tmp_path, encoding):
    """PNG records written at one size, like uint8 records, come out of the training pipeline as
    uint8 batches, about half of the images mirrored; the model graph's preprocessing of each
    gives what the CPU's preprocessing gave for that record (or its mirror) within 1/255. The
    trainer then preprocesses in the model graph."""
    from chexnet_hvd import models
    from chexnet_hvd.runlog import read_runlog

    module("records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images",
           "--out", tmp_path / encoding, "--image-size", 32, "--encoding", encoding, "--shard-size", 64,
           "--no-progress", check=True)
    key = records.IMAGE_KEYS[encoding]
    stored = {i.encode(): (tf.io.decode_png(ex[key], 1) if encoding == "png" else
                           tf.reshape(tf.io.decode_raw(ex[key], tf.uint8), [32, 32, 1])).numpy()
              for i, ex in read_all(tmp_path / encoding, "train", encoding).items()}
    graph = models.with_preprocessing(models.build_model("small_cnn", 28, 14), 32)
    in_graph = tf.keras.Model(graph.input, graph.get_layer("preprocess").output)
    mirrored, seen = 0, 0
    for images, _, _, ids in data.train_dataset(tmp_path / encoding, "train", 28, 16, epochs=1, with_ids=True):
        assert images.dtype == tf.uint8 and images.shape[1:] == (32, 32, 1)
        for out, image, i in zip(in_graph.predict_on_batch(images), images.numpy(), ids.numpy(), strict=True):
            flipped = not np.array_equal(image, stored[i])
            assert np.array_equal(image, stored[i][:, ::-1] if flipped else stored[i])
            before = cpu_preprocess_before(stored[i], 28)
            np.testing.assert_allclose(out, before[:, ::-1] if flipped else before, atol=1 / 255)
            mirrored, seen = mirrored + flipped, seen + 1
    assert seen >= 400 and 0.4 < mirrored / seen < 0.6
    if encoding == "png":  # (the uint8 records' run is the test above)
        run_dir = tmp_path / "run"
        module("train", "--data", tmp_path / encoding, "--run-dir", run_dir, "--model", "small_cnn",
               "--image-size", 28, "--batch-size", 16, "--epochs", 1, "--steps-per-epoch", 4, "--verbose", 0,
               check=True, timeout=300)
        assert read_runlog(run_dir)[0]["preprocess"] == "model graph"
