"""predict: probabilities for real NIH PNGs (RGBA included), class activation maps that find the
planted findings of the synthetic set, heatmap files, and bad input."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, assert_one_line_error, module, run

from chexnet_hvd import checkpoints, data
from chexnet_hvd.labels import PATHOLOGIES
from chexnet_hvd.predict import grad_cam, load_image, upsample

pytestmark = pytest.mark.slow
NIH_IMAGES = SHARED / "data" / "real" / "images" / "nih"


def test_activation_maps_peak_inside_the_planted_findings(trained_cnn):
    model, meta = checkpoints.load(trained_cnn / "run" / "checkpoints" / "best")
    test_ids = [i.decode() for b in data.eval_dataset(trained_cnn / "records", "test", 64, 64) for i in b["id"].numpy()]
    planted = pd.read_csv(trained_cnn / "syn" / "planted.csv")
    planted = planted[planted["Image Index"].isin(test_ids)]
    hits = []
    for _, row in planted.iterrows():
        image = load_image(trained_cnn / "syn" / "images" / row["Image Index"])
        view = data.preprocess(image[..., None], 64).numpy()
        heat = upsample(grad_cam(model, view, meta["classes"].index(row["Pathology"])), image.shape)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(np.hypot(x + 0.5 - row["cx"], y + 0.5 - row["cy"]) <= row["r"])
    assert len(hits) > 100 and np.mean(hits) >= 0.8, np.mean(hits)


@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="no real NIH images")
def test_predict_gives_a_row_for_every_real_png(trained_cnn, tmp_path):
    proc = module("predict", NIH_IMAGES, "--checkpoint", trained_cnn / "run" / "checkpoints" / "best",
                  "--format", "json", check=True, timeout=600)
    rows = json.loads(proc.stdout)
    names = sorted(p.name for p in NIH_IMAGES.glob("*.png"))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == names and len(rows) == 121
    assert all(0 <= r[p] <= 1 for r in rows for p in PATHOLOGIES)


def test_cam_files_and_bad_input(trained_cnn, tmp_path):
    images = sorted((trained_cnn / "syn" / "images").iterdir())[:2]
    ckpt = trained_cnn / "run" / "checkpoints" / "best"
    proc = module("predict", *images, "--checkpoint", ckpt, "--cam", tmp_path / "cam", "--top", 2,
                  "--format", "csv", check=True)
    assert len(proc.stdout.strip().splitlines()) == 3  # header + 2 rows
    assert len(list((tmp_path / "cam").glob("*.png"))) == 4
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(module("predict", text, "--checkpoint", ckpt), "notes.png", "not a readable image")
    assert_one_line_error(module("predict", tmp_path / "missing.png", "--checkpoint", ckpt), "no such file")


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
