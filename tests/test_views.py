"""A model's input from a stored image (chexnet_hvd.views.View): CheXNet's geometry with --crop
(random windows in training, seeded and resume-exact; the centre window in evaluation; ten-crop
at the same scale) and each backbone's own input scaling, recorded in the checkpoint."""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import SHARED, assert_one_line_error, module

from chexnet_hvd import checkpoints, data, images, models, records, views, weights

SIZE, SCALED = 28, 32  # 28 x 256/224 = 32: records stored at the scale --crop takes windows of


@pytest.fixture(scope="module")
def scaled_records(synthetic, tmp_path_factory):
    """The synthetic set as PNG records of one size, 32 px (the --crop scale of a 28-px model)."""
    out = tmp_path_factory.mktemp("scaled")
    module("records", "--csv", synthetic / "Data_Entry_2017.csv", "--images", synthetic / "images",
           "--out", out, "--image-size", SCALED, "--shard-size", 64, "--no-progress", check=True)
    return out


def stored_pixels(records_dir, split: str) -> dict:
    """{record id: its stored uint8 pixels [H, W]}."""
    manifest = records.load_manifest(records_dir)
    out = {}
    for path, _ in records.split_shards(manifest, records_dir, split):
        for raw in tf.data.TFRecordDataset(path):
            example = records.parse_example(raw, manifest["num_classes"])
            out[example["image/id"].numpy().decode()] = tf.io.decode_png(example["image/png"], 1).numpy()[..., 0]
    return out


def window_of(window: np.ndarray, stored: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, mirrored) of the only place in `stored` that `window` was cut from."""
    side = window.shape[0]
    found = [(y, x, m) for y in range(stored.shape[0] - side + 1) for x in range(stored.shape[1] - side + 1)
             for m in (False, True)
             if np.array_equal(window, stored[y:y + side, x:x + side][:, ::-1] if m else stored[y:y + side, x:x + side])]
    assert len(found) == 1, found
    return found[0]


def by_id(dataset) -> dict:
    """{record id: delivered image} over a with_ids training dataset."""
    return {i.decode(): image[..., 0] for images_, _, _, ids in dataset.as_numpy_iterator()
            for image, i in zip(images_, ids, strict=True)}


@pytest.mark.slow
def test_training_windows_are_random_seeded_and_a_resumed_epoch_cuts_the_same(scaled_records):
    """With --crop the pipeline ships 28-px windows of the 32-px records, at offsets spread over
    every position, mirrored about half the time; a pure function of the seed and the record's
    place in its reader's stream: an epoch resumed in mid-epoch on 2 ranks of another batch
    gives each record the window and flip the straight run gave it, another epoch others."""
    view = views.View(SIZE, crop=True)
    stored = stored_pixels(scaled_records, "train")

    def epoch(e, batch=8, steps=6, **kw):
        return data.train_dataset(scaled_records, "train", view, batch, seed=5, start_epoch=e, epochs=1,
                                  steps_per_epoch=steps, with_ids=True, **kw)

    straight = by_id(epoch(0))
    assert len(straight) == 48 and all(image.shape == (SIZE, SIZE) for image in straight.values())
    places = {i: window_of(image, stored[i]) for i, image in straight.items()}
    assert len({(y, x) for y, x, _ in places.values()}) >= 12  # of the 25 positions
    assert {y for y, _, _ in places.values()} >= {0, 4} and {x for _, x, _ in places.values()} >= {0, 4}
    assert 12 <= sum(m for *_, m in places.values()) <= 36
    # the same run again: the same windows; the next epoch: the same records cut elsewhere
    assert all(np.array_equal(image, straight[i]) for i, image in by_id(epoch(0)).items())
    whole = [{i: window_of(image, stored[i]) for i, image in by_id(epoch(e, steps=None)).items()} for e in (0, 1)]
    both = set(whole[0]) & set(whole[1])
    assert len(both) >= 300 and sum(whole[0][i] != whole[1][i] for i in both) >= 0.9 * len(both)
    # stopped after 2 of 6 batches on 1 rank; the rest on 2 ranks of batch 4
    parts = [(1, 8, 6, 2)]
    resumed = {}
    for rank in range(2):
        resumed |= by_id(epoch(0, 4, rank=rank, world_size=2, shapes=[(0, 1, 8)], parts=parts))
    assert len(resumed) == 32 and set(resumed) <= set(straight)
    for i, image in resumed.items():
        np.testing.assert_array_equal(image, straight[i])


@pytest.mark.slow
def test_a_crop_model_sees_the_centre_window_and_ten_crop_is_at_the_same_scale(scaled_records, tmp_path):
    """A checkpoint trained with --crop records it; evaluation's input is then the centre window
    at the training scale, bitwise the centre view of ten-crop, with bitwise equal predictions;
    evaluate and predict use it without being told."""
    run_dir = tmp_path / "run"
    module("train", "--data", scaled_records, "--run-dir", run_dir, "--model", "small_cnn", "--image-size",
           SIZE, "--crop", "--batch-size", 16, "--epochs", 1, "--steps-per-epoch", 4, "--verbose", 0,
           check=True, timeout=300)
    best = run_dir / "checkpoints" / "best"
    meta = checkpoints.read_meta(best)
    assert (meta["crop"], meta["scaling"], views.View.of(meta)) == (True, "torch", views.View(SIZE, "torch", True))
    model, _ = checkpoints.load(best)
    plain = next(iter(data.eval_dataset(scaled_records, "test", views.View.of(meta), 12)))
    tencrop = next(iter(data.eval_dataset(scaled_records, "test", views.View.of(meta), 12, tta="tencrop")))
    centre = tencrop["image"].numpy()[:, views.PLACES.index("centre")]
    np.testing.assert_array_equal(plain["image"].numpy(), centre)
    np.testing.assert_array_equal(model.predict_on_batch(plain["image"]), model.predict_on_batch(centre))
    stored = stored_pixels(scaled_records, "test")
    first = stored[plain["id"].numpy()[0].decode()]
    np.testing.assert_array_equal(plain["image"].numpy()[0], views.preprocess(first[2:30, 2:30, None], SIZE).numpy())
    # the whole image at 28 px is what a model without --crop sees: another input
    assert not np.allclose(plain["image"].numpy()[0], views.preprocess(first[..., None], SIZE).numpy(), atol=0.1)

    report = tmp_path / "eval"
    module("evaluate", "--checkpoint", best, "--data", scaled_records, "--tta", "tencrop", "--bootstrap", 10,
           "--val-split", "", "--out", report, check=True, timeout=300)
    written = json.loads((report / "report.json").read_text())
    assert written["n"] == records.load_manifest(scaled_records)["splits"]["test"]["count"]
    assert written["tta_note"] is None  # a --crop model: ten-crop is at the scale it trained at
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(first).save(png)
    out = module("predict", png, "--checkpoint", best, "--format", "json", check=True).stdout
    row = json.loads(out)[0]
    expected = model.predict_on_batch(plain["image"].numpy()[:1])[0]
    np.testing.assert_allclose([row[c] for c in meta["classes"]], expected, atol=1e-5)


def test_a_numpy_image_gets_the_same_crop_model_input_as_a_tensor():
    """predict reads images as NumPy arrays: with --crop their centre window is cut as from a
    tensor (it was an AttributeError: a NumPy shape has no is_fully_defined)."""
    image = np.random.default_rng(2).integers(0, 256, (40, 36, 1), dtype=np.uint8)
    view = views.View(SIZE, crop=True)
    from_numpy = views.model_input(image, view).numpy()
    assert from_numpy.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(from_numpy, views.model_input(tf.constant(image), view).numpy())
    top, left, rows, cols = views.window_box(40, 36, SIZE)
    np.testing.assert_array_equal(from_numpy, views.preprocess(image[top:top + rows, left:left + cols], SIZE).numpy())


@pytest.mark.slow
def test_crop_refuses_records_below_its_scale(synthetic, scaled_records, records_dir, tmp_path):
    """--crop needs records of one size, at least S x 256/224: one line, exit 2, nothing written."""
    proc = module("train", "--data", scaled_records, "--run-dir", tmp_path / "a", "--model", "small_cnn",
                  "--image-size", 30, "--crop")  # 30 x 256/224 = 34 > 32
    assert_one_line_error(proc, "--crop", "records stored at 32 px", "--image-size 34")
    proc = module("train", "--data", records_dir, "--run-dir", tmp_path / "b", "--model", "small_cnn",
                  "--image-size", 28, "--crop")  # stored at the source sizes
    assert_one_line_error(proc, "--crop", "source sizes")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- input scaling -------------
REAL = sorted((SHARED / "data" / "real" / "images" / "nih").glob("*.png"))
# (our model, its first layer, Keras' stock model, its first layer, Keras' preprocess_input)
FIRST_LAYERS = {
    "densenet121": ("conv1/relu", tf.keras.applications.DenseNet121, "conv1/relu",
                    tf.keras.applications.densenet.preprocess_input),
    "resnet50": ("conv1_relu", tf.keras.applications.ResNet50, "conv1_relu",
                 tf.keras.applications.resnet50.preprocess_input),
    "resnet59": ("stem_relu", tf.keras.applications.ResNet50, "conv1_relu",
                 tf.keras.applications.resnet50.preprocess_input),
}


def published_file(name: str, folder) -> str:
    """Keras' published no-top ImageNet file of `name`'s source model, in the cache under
    `folder`: random values (never downloaded), batch-norm statistics too, so that a wrong
    input scale shows."""
    source = weights.INITIALISED_FROM.get(name, name)
    stock = FIRST_LAYERS[source][1](include_top=False, weights=None)
    rng = np.random.default_rng(0)
    values = []
    for w in stock.weights:
        if "moving_variance" in w.name:
            values.append(rng.uniform(0.5, 2.0, w.shape))
        elif "moving_mean" in w.name:
            values.append(rng.normal(0.0, 0.5, w.shape))
        else:
            values.append(w.numpy())
    stock.set_weights([np.asarray(v, np.float32) for v in values])
    path = folder / weights.PUBLISHED[source][0]
    if not path.exists():
        stock.save_weights(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not REAL, reason="no real NIH images")
@pytest.mark.parametrize("name", sorted(FIRST_LAYERS))
def test_each_backbone_first_layer_sees_what_its_imagenet_weights_were_trained_on(name, tmp_path, monkeypatch):
    """With --weights imagenet, the first layer's activations on a real X-ray equal those of
    Keras' own preprocess_input + Keras' stock model with the same file: DenseNet-121 in torch
    mode, ResNet-50 (and ResNet-59's stem, from ResNet-50's file) in caffe mode; and the
    on-device path preprocesses as the pipeline does."""
    monkeypatch.setenv("CHEXNET_WEIGHTS_DIR", str(tmp_path))
    size = 224
    published_file(name, tmp_path)
    path = weights.resolve("imagenet", name)
    ours_layer, stock_model, stock_layer, preprocess_input = FIRST_LAYERS[name]
    gray = np.asarray(images.read_grayscale(REAL[0], 256))[..., None]  # a 256-px record of it

    model = models.build_model(name, size, 14, path)
    x = views.preprocess(gray, size, models.input_scaling(name))[None]
    ours = tf.keras.Model(model.input, model.get_layer(ours_layer).output)(x).numpy()

    stock = stock_model(include_top=False, weights=path, input_shape=(size, size, 3))
    rgb = np.repeat(tf.image.resize(gray[None].astype(np.float32), (size, size), antialias=True).numpy(), 3, -1)
    theirs = tf.keras.Model(stock.input, stock.get_layer(stock_layer).output)(preprocess_input(rgb)).numpy()
    assert ours.shape == theirs.shape and theirs.std() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())

    on_device = models.with_preprocessing(model, 256, models.input_scaling(name))
    in_graph = tf.keras.Model(on_device.input, on_device.get_layer("preprocess").output)
    np.testing.assert_array_equal(in_graph(gray[None]).numpy(), x.numpy())


@pytest.mark.slow
def test_the_checkpoint_records_the_scaling_and_predict_uses_it(scaled_records, tmp_path, monkeypatch):
    """A ResNet-50 from the ImageNet file trains on caffe inputs (in the model's graph: PNG
    records of one size); its checkpoint says so, and predict feeds it caffe inputs. (An export
    carries the checkpoint's scaling: tests/test_export.py.)"""
    monkeypatch.setenv("CHEXNET_WEIGHTS_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    published_file("resnet50", tmp_path / "cache")
    run_dir = tmp_path / "run"
    module("train", "--data", scaled_records, "--run-dir", run_dir, "--model", "resnet50", "--image-size", 32,
           "--weights", "imagenet", "--batch-size", 8, "--epochs", 1, "--steps-per-epoch", 1, "--verbose", 0,
           env={"CHEXNET_WEIGHTS_DIR": str(tmp_path / "cache")}, check=True, timeout=600)
    best = run_dir / "checkpoints" / "best"
    assert checkpoints.read_meta(best)["scaling"] == "caffe"
    gray = stored_pixels(scaled_records, "test")
    image = next(iter(gray.values()))
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "x.png")
    row = json.loads(module("predict", tmp_path / "x.png", "--checkpoint", best, "--format", "json",
                            check=True, timeout=300).stdout)[0]
    model, meta = checkpoints.load(best)
    got = np.array([row[c] for c in meta["classes"]])
    caffe = model.predict_on_batch(views.preprocess(image[..., None], 32, "caffe")[None])[0]
    torch = model.predict_on_batch(views.preprocess(image[..., None], 32, "torch")[None])[0]
    np.testing.assert_allclose(got, caffe, atol=1e-5)
    assert np.abs(caffe - torch).max() > 1e-3
