"""predict: probabilities for real NIH PNGs (RGBA included), class activation maps that find the
planted findings of the synthetic set, heatmap files, and bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, assert_one_line_error, module

from chexnet_hvd import checkpoints, data
from chexnet_hvd.labels import PATHOLOGIES
from chexnet_hvd.predict import grad_cam, load_image, upsample

pytestmark = pytest.mark.slow
NIH_IMAGES = SHARED / "data" / "real" / "images" / "nih"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on 64-px synthetic images with planted findings (about 30 s)."""
    root = tmp_path_factory.mktemp("cam")
    module("synthetic", "--out", root / "syn", "--images", 1500, "--size", 64, "--seed", 2, check=True)
    module("records", "--csv", root / "syn" / "Data_Entry_2017.csv", "--images", root / "syn" / "images",
           "--out", root / "records", "--no-progress", check=True)
    module("train", "--data", root / "records", "--run-dir", root / "run", "--model", "small_cnn",
           "--image-size", 64, "--batch-size", 32, "--epochs", 10, "--verbose", 0, check=True, timeout=600)
    return root


def test_activation_maps_peak_inside_the_planted_findings(trained):
    model, meta = checkpoints.load(trained / "run" / "checkpoints" / "best")
    test_ids = [i.decode() for b in data.eval_dataset(trained / "records", "test", 64, 64) for i in b["id"].numpy()]
    planted = pd.read_csv(trained / "syn" / "planted.csv")
    planted = planted[planted["Image Index"].isin(test_ids)]
    hits = []
    for _, row in planted.iterrows():
        image = load_image(trained / "syn" / "images" / row["Image Index"])
        view = data.preprocess(image[..., None], 64).numpy()
        heat = upsample(grad_cam(model, view, meta["classes"].index(row["Pathology"])), image.shape)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(np.hypot(x + 0.5 - row["cx"], y + 0.5 - row["cy"]) <= row["r"])
    assert len(hits) > 100 and np.mean(hits) >= 0.8, np.mean(hits)


@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="no real NIH images")
def test_predict_gives_a_row_for_every_real_png(trained, tmp_path):
    proc = module("predict", NIH_IMAGES, "--checkpoint", trained / "run" / "checkpoints" / "best",
                  "--format", "json", check=True, timeout=600)
    rows = json.loads(proc.stdout)
    names = sorted(p.name for p in NIH_IMAGES.glob("*.png"))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == names and len(rows) == 121
    assert all(0 <= r[p] <= 1 for r in rows for p in PATHOLOGIES)


def test_cam_files_and_bad_input(trained, tmp_path):
    images = sorted((trained / "syn" / "images").iterdir())[:2]
    ckpt = trained / "run" / "checkpoints" / "best"
    proc = module("predict", *images, "--checkpoint", ckpt, "--cam", tmp_path / "cam", "--top", 2,
                  "--format", "csv", check=True)
    assert len(proc.stdout.strip().splitlines()) == 3  # header + 2 rows
    assert len(list((tmp_path / "cam").glob("*.png"))) == 4
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(module("predict", text, "--checkpoint", ckpt), "notes.png", "not a readable image")
    assert_one_line_error(module("predict", tmp_path / "missing.png", "--checkpoint", ckpt), "no such file")
