"""predict: probabilities for real NIH PNGs (RGBA included), class activation maps that find the
planted findings of the synthetic set, stay defined for a saturated prediction, are dense and
drawn over an untinted X-ray, heatmap files that never overwrite each other, and bad input."""

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import SHARED, assert_one_line_error, module, run
from PIL import Image

from chexnet_hvd import checkpoints, data, models, views
from chexnet_hvd.labels import PATHOLOGIES
from chexnet_hvd.predict import cam_probe, grad_cam, load_image, overlay, save_overlay, upsample

NIH_IMAGES = SHARED / "data" / "real" / "images" / "nih"


@pytest.mark.slow
def test_activation_maps_peak_inside_the_planted_findings(trained_cnn):
    model, meta = checkpoints.load(trained_cnn / "run" / "checkpoints" / "best")
    probe = cam_probe(model)
    test_ids = [i.decode() for b in data.eval_dataset(trained_cnn / "records", "test", 64, 64) for i in b["id"].numpy()]
    planted = pd.read_csv(trained_cnn / "syn" / "planted.csv")
    planted = planted[planted["Image Index"].isin(test_ids)]
    hits = []
    for _, row in planted.iterrows():
        image = load_image(trained_cnn / "syn" / "images" / row["Image Index"])
        view = views.preprocess(image[..., None], 64).numpy()
        heat = upsample(grad_cam(probe, view, meta["classes"].index(row["Pathology"])), image.shape)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(np.hypot(x + 0.5 - row["cx"], y + 0.5 - row["cy"]) <= row["r"])
    assert len(hits) > 100 and np.mean(hits) >= 0.8, np.mean(hits)


@pytest.mark.slow
@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="no real NIH images")
def test_predict_gives_a_row_for_every_real_png(trained_cnn, tmp_path):
    proc = module("predict", NIH_IMAGES, "--checkpoint", trained_cnn / "run" / "checkpoints" / "best",
                  "--format", "json", check=True, timeout=600)
    rows = json.loads(proc.stdout)
    names = sorted(p.name for p in NIH_IMAGES.glob("*.png"))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == names and len(rows) == 121
    assert all(0 <= r[p] <= 1 for r in rows for p in PATHOLOGIES)


@pytest.mark.slow
def test_cam_files_and_bad_input(trained_cnn, tmp_path):
    images = sorted((trained_cnn / "syn" / "images").iterdir())[:2]
    images[0] = Path(shutil.copy(images[0], tmp_path / 'Smith, "J".png'))  # quoted in CSV, not split
    ckpt = trained_cnn / "run" / "checkpoints" / "best"
    proc = module("predict", *images, "--checkpoint", ckpt, "--cam", tmp_path / "cam", "--top", 2,
                  "--format", "csv", check=True)
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert len(rows) == 3 and {len(r) for r in rows} == {len(rows[0])}  # header + 2 rows, aligned
    assert str(images[0]) in [r[0] for r in rows[1:]]
    assert len(list((tmp_path / "cam").rglob("*.png"))) == 4
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(module("predict", text, "--checkpoint", ckpt), "notes.png", "not a readable image")
    assert_one_line_error(module("predict", tmp_path / "missing.png", "--checkpoint", ckpt), "no such file")


@pytest.mark.slow
def test_peak_memory_stays_flat_in_the_number_of_inputs(trained_cnn, tmp_path):
    """predict decodes one --batch-size chunk at a time: 320 images of 1024 x 1024 (1 MB each
    decoded) take no more peak memory than 40 (holding them all took ~280 MB more)."""
    from PIL import Image

    source = tmp_path / "one.png"
    Image.fromarray(np.tile(np.arange(1024, dtype=np.uint16) // 4, (1024, 1)).astype(np.uint8)).save(source)
    peaks = {}
    for n in (40, 320):
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:04d}.png").hardlink_to(source)
        probe = ("import resource, sys; from chexnet_hvd import predict; sys.argv[0] = 'predict'\n"
                 "try:\n    predict.main(sys.argv[1:])\n"
                 "finally:\n    print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        proc = run([sys.executable, "-c", probe, str(folder), "--checkpoint",
                    str(trained_cnn / "run" / "checkpoints" / "best"), "--format", "csv"], check=True, timeout=600)
        assert len(proc.stdout.strip().splitlines()) == n + 1
        peaks[n] = int(proc.stderr.rsplit("peak_kb", 1)[1].split()[0]) / 1024
    assert peaks[320] - peaks[40] < 40, peaks  # MB


def small_cnn(size: int = 32) -> "tf.keras.Model":
    tf.keras.utils.set_random_seed(0)
    return models.build_model("small_cnn", size, 14)


def test_a_saturated_prediction_still_gets_a_map():
    """A confident model (here: class 0's bias +60) predicts p = 1.0 exactly in float32, where
    the sigmoid's gradient is exactly 0: a map of the probability was blank. The map of the
    pre-sigmoid score is not."""
    model = small_cnn()
    kernel, bias = model.get_layer("logits").get_weights()
    bias[0] = 60.0
    model.get_layer("logits").set_weights([kernel, bias])
    view = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    layer = models.cam_layer(model)
    with tf.GradientTape() as tape:
        maps, prob = tf.keras.Model(model.inputs, [layer.output, model.output])(view[None])
        saturated = prob[:, 0]
    assert float(saturated[0]) == 1.0 and not tape.gradient(saturated, maps).numpy().any()
    cam = grad_cam(cam_probe(model), view, 0)
    assert cam.shape == (16, 16) and cam.max() == 1.0 and (cam > 0).mean() > 0.1


def test_an_all_zero_map_is_written_with_a_warning(tmp_path, capsys):
    """No location raises the score (class 0's weights zeroed): a blank map says so."""
    from chexnet_hvd.predict import write_maps

    model = small_cnn()
    kernel, bias = model.get_layer("logits").get_weights()
    kernel[:, 0] = 0.0
    model.get_layer("logits").set_weights([kernel, bias])
    gray = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)
    view = views.preprocess(gray[..., None], 32).numpy()
    row = np.eye(14, dtype=np.float32)[0]  # class 0 on top
    [path] = write_maps(cam_probe(model), Path("a/x.png"), gray, view, views.View(32), row, list(PATHOLOGIES), 1,
                        tmp_path)
    assert path == tmp_path / "a" / "x.png_Atelectasis.png" and path.is_file()
    assert "warning: a/x.png: the Atelectasis map is all zeros" in capsys.readouterr().err


def test_a_crop_models_map_covers_the_centre_window_it_saw():
    """With --crop the model saw the centre S-px window of the image at S x 256/224: its map is
    placed over that window of the written overlay (zero outside), not stretched over the image."""
    from chexnet_hvd.predict import place_map

    whole = place_map(np.ones((4, 4), np.float32), (64, 64), views.View(28))
    cropped = place_map(np.ones((4, 4), np.float32), (64, 64), views.View(28, crop=True))
    assert whole.shape == cropped.shape == (64, 64) and whole.min() > 0.99
    top, left, rows, cols = views.window_box(64, 64, 28)
    assert (top, left, rows, cols) == (4, 4, 56, 56)
    inside = np.zeros((64, 64), bool)
    inside[top:top + rows, left:left + cols] = True
    assert cropped[inside].min() > 0.99 and not cropped[~inside].any()


def test_the_map_upsamples_smoothly():
    """No dot grid: behind the small CNN's max-pool each channel of the map layer gets gradient
    at one location of each 2x2 window, but the channels' maxima lie in different places, so
    nearly every location of the summed map gets some (all but 0.1% here; 97.5% on the trained
    fixture). Upsampling is bilinear: neighbouring pixels differ by at most the map's range / the
    scale."""
    model = small_cnn(64)
    view = np.random.default_rng(2).normal(size=(64, 64, 3)).astype(np.float32)
    probe = cam_probe(model)
    with tf.GradientTape() as tape:
        maps, logits = probe(view[None], training=False)
        score = logits[:, 3]
    grads = np.abs(tape.gradient(score, maps)[0].numpy())
    assert (grads > 0).mean() == pytest.approx(0.25, abs=0.01)  # per channel: a dot grid
    assert (grads.sum(-1) > 0).mean() > 0.9  # summed over channels: dense
    cam = grad_cam(probe, view, 3)
    heat = upsample(cam, (256, 256))
    np.testing.assert_allclose(heat, tf.image.resize(cam[..., None], (256, 256), "bilinear").numpy()[..., 0])
    scale = 256 / cam.shape[0]
    for axis in (0, 1):
        assert np.abs(np.diff(heat, axis=axis)).max() <= (cam.max() - cam.min()) / scale + 1e-6


def test_the_overlay_leaves_the_x_ray_untinted_where_the_map_is_low(tmp_path):
    """Opacity follows the map: where it is 0 the pixel is the X-ray's grey, where it is 1 the
    colour shows (a fixed 35% jet overlay tinted the whole image blue)."""
    gray = np.random.default_rng(3).integers(0, 256, (100, 100), dtype=np.uint8)
    rows, cols = np.mgrid[0:100, 0:100]
    heat = np.clip(1 - np.hypot(rows - 30, cols - 60) / 20, 0, 1)  # a cone over a 20-px disc
    rgb = overlay(gray, heat)
    low = heat == 0
    assert low.mean() > 0.8
    assert all(np.array_equal(rgb[..., c][low], gray[low]) for c in range(3))
    assert np.abs(rgb[heat == 1].astype(int) - gray[heat == 1][:, None]).max() > 50
    save_overlay(gray, heat, "x.png: Effusion 0.91", tmp_path / "o.png")
    saved = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    grey = (saved[..., 0] == saved[..., 1]) & (saved[..., 1] == saved[..., 2])
    assert grey.mean() > 0.8, grey.mean()  # the white margin, the title and the untinted X-ray


def test_heatmaps_of_inputs_with_the_same_name_never_overwrite_each_other(tmp_path):
    """a/x.png, b/x.png, c/x.png and c/x.dcm: 4 images x --top 2 = 8 heatmaps under their paths
    relative to the inputs' common folder (they were all {stem}_{class}.png: 2 files written,
    8 counted), and the count printed is the files written."""
    from test_own_data import write_dicom

    model = small_cnn()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    meta = {"model": "small_cnn", "image_size": 32, "num_classes": 14, "classes": list(PATHOLOGIES), "step": 0}
    ckpt = checkpoints.save(model, tmp_path / "checkpoints", "epoch-0001", meta)
    inputs = tmp_path / "in"
    pixels = np.random.default_rng(4).integers(0, 256, (48, 40), dtype=np.uint8)
    for folder in "abc":
        (inputs / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(inputs / folder / "x.png")
    write_dicom(inputs / "c" / "x.dcm", pixels.astype(np.int64) * 16, 12)
    shutil.copy(inputs / "c" / "x.dcm", inputs / "c" / "IM0001")  # a PACS export's name, in the folder
    (inputs / "c" / "notes").write_text("not an image, not named as one: left out")
    files = [inputs / "a" / "x.png", inputs / "b" / "x.png", inputs / "c"]
    proc = module("predict", *files, "--checkpoint", ckpt, "--cam", tmp_path / "cam", "--top", 2,
                  "--format", "csv", check=True)
    written = sorted(str(p.relative_to(tmp_path / "cam")) for p in (tmp_path / "cam").rglob("*.png"))
    assert len(written) == 10 and f"wrote 10 heatmaps to {tmp_path / 'cam'}" in proc.stderr
    assert [w.rsplit("_", 1)[0] for w in written[::2]] == ["a/x.png", "b/x.png", "c/IM0001", "c/x.dcm", "c/x.png"]
    rows = {r[0]: r[1:] for r in csv.reader(io.StringIO(proc.stdout))}
    assert rows[str(inputs / "c" / "IM0001")] == rows[str(inputs / "c" / "x.dcm")]  # read as the DICOM it is
