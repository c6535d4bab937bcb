#!/usr/bin/env python3
"""Inference on this CPU, in one run: DenseNet-121 at 224 px in TensorFlow, OpenVINO FP32 and
OpenVINO INT8 (latency at batch 1, throughput at batch 32, and ten-crop images/s), plus the mean
AUROC of FP32 vs INT8 exports of a small CNN trained on synthetic data.

    .venv/bin/python bench/bench_inference.py [--out docs/bench_inference.json]

DenseNet-121 has random weights here (speed does not depend on them, and nothing may download
ImageNet weights); INT8 is calibrated on 300 synthetic 224-px images. The AUROC comparison needs a
trained model, which on this CPU means the small CNN (64 px, 10 epochs, test split of 1,500
synthetic images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))

from common import machine, today  # noqa: E402


def cli(*args) -> None:
    subprocess.run([PY, "-m", *map(str, args)], cwd=ROOT, check=True, capture_output=True)


def timed(fn, x, repeats: int, warm: int = 3) -> float:
    """Median seconds of fn(x) after warm-up calls."""
    for _ in range(warm):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def densenet_checkpoint(tmp: Path) -> Path:
    import tensorflow as tf

    from chexnet_hvd import checkpoints, models

    tf.keras.utils.set_random_seed(0)
    model = models.build_model("densenet121", 224)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    from chexnet_hvd.labels import PATHOLOGIES

    meta = {"model": "densenet121", "image_size": 224, "classes": list(PATHOLOGIES), "num_classes": 14}
    return checkpoints.save(model, tmp / "dn" / "checkpoints", "random", meta)


def speed(tmp: Path, repeats: int) -> dict:
    from chexnet_hvd import export, views

    ckpt = densenet_checkpoint(tmp)
    cli("chexnet_hvd.synthetic", "--out", tmp / "syn224", "--images", 300, "--size", 224, "--seed", 0)
    cli("chexnet_hvd.records", "--csv", tmp / "syn224" / "Data_Entry_2017.csv", "--images",
        tmp / "syn224" / "images", "--out", tmp / "rec224", "--fractions", 1, 0, 0, "--no-progress")
    cli("chexnet_hvd.export", "--checkpoint", ckpt, "--precision", "fp32", "--out", tmp / "fp32")
    cli("chexnet_hvd.export", "--checkpoint", ckpt, "--precision", "int8", "--calib", tmp / "rec224",
        "--out", tmp / "int8")
    backends = {"tensorflow": export.load_predictor(ckpt, "tf")[0],
                "openvino_fp32": export.load_predictor(tmp / "fp32", "openvino")[0],
                "openvino_int8": export.load_predictor(tmp / "int8", "openvino")[0]}
    rng = np.random.default_rng(0)
    one, batch = rng.normal(size=(1, 224, 224, 3)).astype(np.float32), rng.normal(size=(32, 224, 224, 3)).astype(np.float32)
    image = rng.integers(0, 255, (256, 256, 1), dtype=np.uint8)
    crops = np.concatenate([views.tta_views(image, 224, "tencrop").numpy()] * 4)  # 4 images x 10 views
    out = {}
    for name, fn in backends.items():
        out[name] = {"latency_ms_batch1": 1e3 * timed(fn, one, repeats * 4),
                     "images_per_sec_batch32": 32 / timed(fn, batch, repeats),
                     "images_per_sec_tencrop": 4 / timed(fn, crops, repeats)}
    return out


def auroc(tmp: Path) -> dict:
    cli("chexnet_hvd.synthetic", "--out", tmp / "syn", "--images", 1500, "--size", 64, "--seed", 2)
    cli("chexnet_hvd.records", "--csv", tmp / "syn" / "Data_Entry_2017.csv", "--images", tmp / "syn" / "images",
        "--out", tmp / "rec", "--no-progress")
    cli("chexnet_hvd.train", "--data", tmp / "rec", "--run-dir", tmp / "cnn", "--model", "small_cnn",
        "--image-size", 64, "--batch-size", 32, "--epochs", 10, "--verbose", 0)
    ckpt = tmp / "cnn" / "checkpoints" / "best"
    means = {}
    for precision in ("fp32", "int8"):
        cli("chexnet_hvd.export", "--checkpoint", ckpt, "--precision", precision, "--calib", tmp / "rec",
            "--out", tmp / f"cnn_{precision}")
        cli("chexnet_hvd.evaluate", "--checkpoint", tmp / f"cnn_{precision}", "--backend", "openvino",
            "--data", tmp / "rec", "--bootstrap", 10, "--out", tmp / f"eval_{precision}")
        report = json.loads((tmp / f"eval_{precision}" / "report.json").read_text())
        means[precision] = report["mean_auroc"]["value"]
        means["n"] = report["n"]
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (x4 at batch 1)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_inference.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(), "date": today(),
                  "speed": speed(Path(tmp), args.repeats), "small_cnn_mean_auroc": auroc(Path(tmp))}
    s = result["speed"]
    result["openvino_fp32_over_tf"] = s["openvino_fp32"]["images_per_sec_batch32"] / s["tensorflow"]["images_per_sec_batch32"]
    result["int8_over_fp32"] = s["openvino_int8"]["images_per_sec_batch32"] / s["openvino_fp32"]["images_per_sec_batch32"]
    result["int8_auroc_drop"] = result["small_cnn_mean_auroc"]["fp32"] - result["small_cnn_mean_auroc"]["int8"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
